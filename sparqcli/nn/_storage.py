"""Compressed storage of one table as the modules hold it: the file's packed tensors + a row index.

`PackedTable` holds `codes` (bit-packed as in the file), `scale`, `zero_point` (float32 or float16
as in the file), `mask` (bit-packed keep-mask as in the file; empty when nothing is pruned) and
`base`, the row index: the code number of the first row of every `group` mask units (a unit is a
block row for a block mask, a row for a value mask), one int64 each. A row's first code is
`base[unit // group]` plus the codes of the units between (a popcount of their mask bits), plus
its earlier rows in its own block row; `group` (a power of two) is chosen so that popcount covers
at most 128 mask bits. The index takes 8 / (group * block height) bytes per row (2 for a table of
128 columns with (1, 4) blocks), and nothing when there is no mask (a row's codes start at `row * cols`).

`gather_rows` decodes a set of rows with tensor ops (any device): the fallback of the kernel.
"""

from __future__ import annotations

import difflib
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from sparqcli.errors import FormatError, InputError
from sparqcli.nn._format import (
    MASK_KINDS,
    ORDERS,
    CompressedTable,
    TableInfo,
    check_bits,
    pack_bits,
    pack_codes,
    part_sizes,
    read_info,
)

MaskKind = Literal["none", "block", "value"]
INDEX_GROUP_BITS = 128
_DTYPE_NAMES = {
    torch.float32: "float32",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.float64: "float64",
}
_ROUND = {torch.float16: 1, torch.bfloat16: 2}
_STORED = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "U8": torch.uint8}
_PACKED_DTYPES = {
    "codes": (torch.uint8,),
    "mask": (torch.uint8,),
    "scale": (torch.float32, torch.float16),
    "zero_point": (torch.float32, torch.float16),
}
# Work on at most this many (row x bit) entries at a time in the tensor-op paths.
_CHUNK = 1 << 22


@dataclass(frozen=True)
class Layout:
    """What is needed to interpret a table's packed tensors (all from the file's metadata)."""

    rows: int
    cols: int
    dtype: torch.dtype
    bits: int
    mask: MaskKind
    block_shape: tuple[int, int]
    kept: int
    level: float
    order: str

    @property
    def unit_shape(self) -> tuple[int, int]:
        """Returns (rows, columns) one mask bit covers: the block shape, or (1, 1) for values."""
        if self.mask == "block":
            return (max(1, min(self.block_shape[0], self.rows)), self.block_shape[1])
        return (1, 1)

    @property
    def unit_bits(self) -> int:
        """Returns the mask bits of one unit (block row, or row): its number of grid columns."""
        return -(-self.cols // self.unit_shape[1]) if self.cols else 0

    @property
    def last_width(self) -> int:
        """Returns the number of valid columns of the last grid column."""
        bw = self.unit_shape[1]
        return self.cols - (self.unit_bits - 1) * bw if self.cols else bw

    @property
    def units(self) -> int:
        """Returns the number of mask units (grid rows)."""
        return -(-self.rows // self.unit_shape[0])

    @property
    def group(self) -> int:
        """Returns the number of units per index entry."""
        units = max(1, INDEX_GROUP_BITS // max(1, self.unit_bits))
        return 1 << (units.bit_length() - 1)

    def geometry(self) -> list[int]:
        """Returns the kernel's geometry vector (see _csrc.py make_table)."""
        bh, bw = self.unit_shape
        return [
            self.rows,
            self.cols,
            self.bits,
            int(self.mask != "none"),
            bh,
            bw,
            self.unit_bits,
            self.last_width,
            self.group,
            _ROUND.get(self.dtype, 0),
        ]

    def describe(self) -> str:
        """Returns a short text of the settings: bits, mask and block shape, kept share."""
        kept = self.kept / max(1, self.rows * self.cols)
        mask = {"none": "no mask", "value": "value mask"}.get(
            self.mask, f"block mask {tuple(self.block_shape)}"
        )
        return f"bits={self.bits}, {mask}, kept={kept:.1%}"


def layout_from_state(state: Any) -> Layout:
    """Returns the layout a module's state dict saved (`get_extra_state`'s dict).

    Raises ValueError when `state` is not such a dict or describes no table the format stores.
    """
    by_name = {name: dtype for dtype, name in _DTYPE_NAMES.items()}
    try:
        layout = Layout(
            rows=int(state["rows"]),
            cols=int(state["cols"]),
            dtype=by_name[state["dtype"]],
            bits=int(state["bits"]),
            mask=state["mask"],
            block_shape=(int(state["block_shape"][0]), int(state["block_shape"][1])),
            kept=int(state["kept"]),
            level=float(state["level"]),
            order=str(state["order"]),
        )
    except (KeyError, TypeError, ValueError, IndexError) as error:
        raise ValueError(f"not a sparqcli.nn layout: {error!r}") from None
    values = layout.rows * layout.cols
    check_bits(layout.bits)
    if layout.rows < 0 or layout.cols < 0:
        raise ValueError(f"layout shape must not be negative, got {layout.rows} x {layout.cols}")
    if layout.mask not in MASK_KINDS:
        raise ValueError(f"layout mask must be one of {', '.join(MASK_KINDS)}, got {layout.mask!r}")
    if min(layout.block_shape) < 1:
        raise ValueError(f"layout block_shape must be positive, got {list(layout.block_shape)}")
    if layout.order not in ORDERS:
        raise ValueError(f"layout order must be one of {', '.join(ORDERS)}, got {layout.order!r}")
    if not 0 <= layout.kept <= values or (layout.mask == "none" and layout.kept != values):
        raise ValueError(f"layout keeps {layout.kept} of {values} values with mask {layout.mask!r}")
    return layout


def layout_of(info: TableInfo) -> Layout:
    """Returns the layout of a table described by the file's metadata."""
    return Layout(
        rows=info.shape[0],
        cols=info.shape[1],
        dtype=info.dtype,
        bits=info.quantization.bits,
        mask=info.mask,
        block_shape=tuple(info.sparsity.block_shape),
        kept=info.kept,
        level=float(info.sparsity.level),
        order=info.order,
    )


def pack_table(table: CompressedTable) -> tuple[Layout, dict[str, torch.Tensor]]:
    """Returns the layout and packed tensors (as a file would store them) of an engine table.

    Raises ValueError when the table is inconsistent (codes that its mask does not account for).
    """
    kind: MaskKind = (
        "none" if table.keep_mask is None else ("block" if table.mask_per_block else "value")
    )
    codes = table.codes.reshape(-1).cpu()
    kept = table.kept_count()
    if kept != codes.numel():
        raise ValueError(f"table holds {codes.numel()} codes but its mask keeps {kept} values")
    scale_dtype = torch.float16 if table.quantization.scale_dtype == "float16" else torch.float32
    tensors = {
        "codes": pack_codes(codes, table.quantization.bits),
        "scale": table.scale.cpu().to(scale_dtype).contiguous(),
        "zero_point": table.zero_point.cpu().to(scale_dtype).contiguous(),
        "mask": torch.zeros(0, dtype=torch.uint8)
        if table.keep_mask is None
        else pack_bits(table.keep_mask.cpu()),
    }
    layout = Layout(
        rows=table.rows,
        cols=table.cols,
        dtype=table.dtype,
        bits=table.quantization.bits,
        mask=kind,
        block_shape=tuple(table.sparsity.block_shape),
        kept=kept,
        level=float(table.sparsity.level),
        order=table.order,
    )
    return layout, tensors


def read_packed(
    path: str | Path, key: str, *, memory_map: bool = False
) -> tuple[Layout, dict[str, torch.Tensor]]:
    """Returns the layout and the packed tensors of table `key` of a sparq file, as stored.

    The header is validated by `read_info`; the data checks (padding bits, qparams, the mask's
    kept count) are made by `check_packed` / `build_index`. With `memory_map`, codes and mask
    are views of a private read-only mapping of the file (pages load on first use) and
    scales/zero points are copied. Raises InputError when the file is unreadable or `key` is not
    a compressed table in it (naming close keys), FormatError when the file is inconsistent.
    An alias of a table (a tied weight, format version 2) gives that table.
    """
    where = str(path)
    info = read_info(path)
    key = info.aliases.get(key, key)
    if key not in info.tables:
        keys = sorted(info.tables)
        close = difflib.get_close_matches(key, keys, n=3, cutoff=0.6)
        if close:
            hint = "did you mean " + ", ".join(f"'{k}'" for k in close) + "?"
        elif keys:
            hint = "its tables are " + ", ".join(f"'{k}'" for k in keys[:5])
        else:
            hint = "it holds no compressed tables"
        raise InputError(f"{where}: no compressed table '{key}'; {hint}")
    table = info.tables[key]
    names = table.tensor_keys
    tensors = _read_mapped(where, names) if memory_map else _read_copied(where, names)
    if "mask" not in tensors:
        tensors["mask"] = torch.zeros(0, dtype=torch.uint8)
    for part in ("scale", "zero_point"):
        if tensors[part].dtype == torch.bfloat16:  # the kernels read float32 or float16;
            tensors[part] = tensors[part].float()  # widening bfloat16 is exact
    return layout_of(table), tensors


def _read_copied(where: str, names: dict[str, str]) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(where, framework="pt", device="cpu") as handle:
            return {part: handle.get_tensor(name) for part, name in names.items()}
    except (SafetensorError, OSError, RuntimeError) as error:
        raise FormatError(f"{where}: cannot read table tensors ({error})") from None


def _read_mapped(where: str, names: dict[str, str]) -> dict[str, torch.Tensor]:
    import json

    try:
        with open(where, "rb") as file:
            (header_len,) = struct.unpack("<Q", file.read(8))
            header = json.loads(file.read(header_len))
            mapped = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_COPY)
    except (OSError, ValueError) as error:
        raise InputError(f"{where}: cannot map: {error}") from None
    start = 8 + header_len
    tensors: dict[str, torch.Tensor] = {}
    for part, name in names.items():
        entry = header[name]
        dtype = _STORED[entry["dtype"]]
        begin, end = entry["data_offsets"]
        count = (end - begin) // torch.empty(0, dtype=dtype).element_size()
        if count == 0:
            tensors[part] = torch.zeros(0, dtype=dtype)
            continue
        raw = torch.frombuffer(mapped, dtype=torch.uint8, count=end - begin, offset=start + begin)
        if (
            part in ("scale", "zero_point")
            or (start + begin) % raw.new_empty(0, dtype=dtype).element_size()
        ):
            tensors[part] = raw.clone().view(dtype)
        else:
            tensors[part] = raw.view(dtype)
    return tensors


HUGE_PAGE_MIN_BYTES = 2 << 20


def in_huge_pages(tensor: torch.Tensor) -> torch.Tensor:
    """Returns a copy of a large contiguous CPU tensor in memory advised for transparent huge
    pages (Linux, `madvise` mode), else `tensor` itself.

    A lookup touches a random row of each of several arrays; with 4 KiB pages every one of them
    is a TLB miss. Anonymous memory with MADV_HUGEPAGE is backed by 2 MiB pages where the kernel
    allows it (falls back to normal pages otherwise); the copy behaves like any tensor.
    """
    nbytes = tensor.numel() * tensor.element_size()
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if nbytes < HUGE_PAGE_MIN_BYTES or advice is None or tensor.device.type != "cpu":
        return tensor
    try:
        region = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        region.madvise(advice)
    except (OSError, ValueError, AttributeError):
        return tensor
    copy = torch.frombuffer(region, dtype=torch.uint8, count=nbytes).view(tensor.dtype)
    copy.copy_(tensor.reshape(-1))
    return copy


def check_packed(where: str, layout: Layout, tensors: dict[str, torch.Tensor]) -> None:
    """Checks packed tensors against their layout: lengths and dtypes as the file format stores
    them, padding bits zero, scales finite and positive, zero points finite; returns None.
    Raises FormatError naming `where` otherwise."""
    sizes = part_sizes(
        (layout.rows, layout.cols), layout.kept, layout.bits, layout.mask, layout.block_shape
    )
    for part, dtypes in _PACKED_DTYPES.items():
        tensor = tensors[part]
        if tensor.dtype not in dtypes:
            raise FormatError(f"{where}: tensor '{part}' has dtype {tensor.dtype}")
        if tensor.numel() != sizes.get(part, 0):
            raise FormatError(
                f"{where}: tensor '{part}' holds {tensor.numel()} values; the layout "
                f"({layout.rows} x {layout.cols}, {layout.describe()}) needs {sizes.get(part, 0)}"
            )
    if tensors["scale"].dtype != tensors["zero_point"].dtype:
        raise FormatError(f"{where}: scales and zero points have different dtypes")
    used = {
        "codes": layout.kept * layout.bits,
        "mask": layout.units * layout.unit_bits if layout.mask != "none" else 0,
    }
    if layout.mask == "value":
        used["mask"] = layout.rows * layout.cols
    for part, bits in used.items():
        packed = tensors[part]
        tail = bits % 8
        if tail and packed.numel() and int(packed[-1]) >> tail:
            raise FormatError(f"{where}: tensor '{part}' has nonzero padding bits")
    scale = tensors["scale"].float()
    if not bool(torch.isfinite(scale).all()) or not bool((scale > 0).all()):
        raise FormatError(f"{where}: scales must be finite and positive")
    if not bool(torch.isfinite(tensors["zero_point"].float()).all()):
        raise FormatError(f"{where}: zero points must be finite")


_POPCOUNT = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int64)


def _popcount_lut(device: torch.device) -> torch.Tensor:
    return _POPCOUNT.to(device)


def _bits_at(mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Returns the mask bits (0/1, int64) at the given bit positions."""
    return (mask[positions >> 3].long() >> (positions & 7)) & 1


def _unit_kept(layout: Layout, mask: torch.Tensor, units: torch.Tensor) -> torch.Tensor:
    """Returns the kept values per row of each mask unit in `units` (int64, same shape)."""
    c = layout.unit_bits
    bw = layout.unit_shape[1]
    flat = units.reshape(-1)
    out = torch.empty_like(flat)
    step = max(1, _CHUNK // max(1, c))
    cols = torch.arange(c, device=mask.device)
    widths = torch.full((c,), bw, dtype=torch.int64, device=mask.device)
    if c:
        widths[-1] = layout.last_width
    for start in range(0, flat.numel(), step):
        part = flat[start : start + step]
        bits = _bits_at(mask, part[:, None] * c + cols)
        out[start : start + step] = (bits * widths).sum(dim=1)  # no integer matmul on CUDA
    return out.view(units.shape)


def build_index(where: str, layout: Layout, mask: torch.Tensor) -> torch.Tensor:
    """Returns the row index (int64 code number of every `group`-th unit's first row).

    Empty when the table has no mask. Raises FormatError when the mask's kept count disagrees
    with the layout's `kept`.
    """
    if layout.mask == "none":
        return torch.zeros(0, dtype=torch.int64)
    bh = layout.unit_shape[0]
    group = layout.group
    units = layout.units
    step = max(group, (_CHUNK // max(1, layout.unit_bits)) // group * group)
    bases = []
    total = 0
    for start in range(0, units, step):
        stop = min(units, start + step)
        kept = _unit_kept(layout, mask, torch.arange(start, stop, device=mask.device))
        heights = torch.full_like(kept, bh)
        if stop == units:
            heights[-1] = layout.rows - (units - 1) * bh
        counts = kept * heights
        before = torch.cumsum(counts, 0) - counts + total
        bases.append(before[::group].cpu())
        total += int(counts.sum())
    if total != layout.kept:
        raise FormatError(
            f"{where}: mask keeps {total} values but the metadata says kept {layout.kept}"
        )
    return torch.cat(bases) if bases else torch.zeros(0, dtype=torch.int64)


def _row_offsets(
    layout: Layout, mask: torch.Tensor, base: torch.Tensor, rows: torch.Tensor
) -> torch.Tensor:
    """Returns the code number of each row's first code (int64), with tensor ops."""
    if layout.mask == "none":
        return rows * layout.cols
    bh = layout.unit_shape[0]
    group = layout.group
    unit = rows // bh
    first = unit // group * group
    earlier = first[:, None] + torch.arange(group, device=rows.device)
    valid = earlier < unit[:, None]
    kept_earlier = _unit_kept(layout, mask, torch.where(valid, earlier, 0)) * valid
    return (
        base[unit // group]
        + bh * kept_earlier.sum(1)
        + (rows - unit * bh) * _unit_kept(layout, mask, unit)
    )


def gather_rows(
    layout: Layout, tensors: dict[str, torch.Tensor], base: torch.Tensor, rows: torch.Tensor
) -> torch.Tensor:
    """Returns rows `rows` (int64, in range) decoded, shape (n, cols), in the table's dtype.

    Pruned values are 0.0, kept ones `(q - zero_point) * scale` in float32, then cast: the
    same values as decoding the whole table. Tensor ops only, on the tensors' device.
    """
    cols = layout.cols
    out = torch.empty((rows.numel(), cols), dtype=layout.dtype, device=rows.device)
    step = max(1, _CHUNK // max(1, cols, layout.group * layout.unit_bits))
    codes = tensors["codes"]
    mask = tensors["mask"]
    limit = (1 << layout.bits) - 1
    for start in range(0, rows.numel(), step):
        part = rows[start : start + step]
        offsets = _row_offsets(layout, mask, base, part)
        if layout.mask == "none":
            keep = torch.ones((part.numel(), cols), dtype=torch.bool, device=rows.device)
        else:
            c = layout.unit_bits
            unit = part // layout.unit_shape[0]
            bits = _bits_at(mask, unit[:, None] * c + torch.arange(c, device=rows.device))
            keep = bits.bool().repeat_interleave(layout.unit_shape[1], dim=1)[:, :cols]
        numbers = offsets[:, None] + torch.cumsum(keep, 1) - 1
        numbers = torch.where(keep, numbers, 0).clamp_(min=0)
        if codes.numel():
            position = numbers * layout.bits
            byte = position >> 3
            low = codes[byte].long()
            high = codes[(byte + 1).clamp_(max=codes.numel() - 1)].long()
            q = ((low | (high << 8)) >> (position & 7)) & limit
        else:
            q = numbers
        scale = tensors["scale"][part].float()[:, None]
        zero_point = tensors["zero_point"][part].float()[:, None]
        values = (q.float() - zero_point) * scale
        values = torch.where(keep, values, 0.0)
        out[start : start + step] = values.to(layout.dtype)
    return out
