"""The compressed sparq file (format version 1): write, validate, read, decode.

One `.safetensors` file. Pass-through tensors keep their key, dtype and bytes. A compressed table
`K` is stored as `K.codes` (kept codes, bit-packed), `K.scale` and `K.zero_point` (one per row)
and `K.mask` (bit-packed keep-mask; absent when nothing is pruned). The safetensors metadata
holds one entry, `"sparq"`, a JSON document with the format version and, per table, everything
needed to decode it. `docs/FORMAT.md` is the specification; this module implements it.

The container is written and parsed by the safetensors library. torch.ao is imported by nothing
here: `torch_ao_state_dict` builds the reference's quantized tensors with torch core functions.
"""

from __future__ import annotations

import difflib
import json
import math
import re
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import safetensors
import torch
from safetensors import SafetensorError, safe_open

import sparqcli
from sparqcli.engine.settings import ORDERS, Order, QuantizationSettings, SparsitySettings
from sparqcli.engine.sparsify import block_grid
from sparqcli.engine.stats import TableStats
from sparqcli.engine.table import CompressedTable
from sparqcli.errors import (
    FormatError,
    InputError,
    OutputError,
    SettingError,
    UsageError,
    first_line,
)
from sparqcli.select import TensorInfo

FORMAT_VERSION = 1
METADATA_KEY = "sparq"
PARTS: tuple[str, ...] = ("codes", "scale", "zero_point", "mask")
MaskKind = Literal["block", "value", "none"]

TABLE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}
_TABLE_DTYPE_NAMES = {dtype: name for name, dtype in TABLE_DTYPES.items()}
_SCALE_DTYPES = {"float32": torch.float32, "float16": torch.float16}
# safetensors' dtype codes -> torch's names, for describing stored tensors.
_STORED_DTYPE_NAMES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U64": "uint64",
    "U32": "uint32",
    "U16": "uint16",
    "U8": "uint8",
    "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E4M3FNUZ": "float8_e4m3fnuz",
    "F8_E5M2": "float8_e5m2",
    "F8_E5M2FNUZ": "float8_e5m2fnuz",
    "F8_E8M0": "float8_e8m0fnu",
    "C64": "complex64",
}


# --- bit packing ------------------------------------------------------------------------------


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or isinstance(bits, bool) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an integer from 1 to 8, got {bits!r}")


def packed_size(n_codes: int, bits: int) -> int:
    """Returns the bytes `n_codes` codes of `bits` bits take packed: ceil(n_codes * bits / 8).

    Raises ValueError for bits outside 1..8 or a negative count.
    """
    _check_bits(bits)
    if n_codes < 0:
        raise ValueError(f"n_codes must not be negative, got {n_codes}")
    return (n_codes * bits + 7) // 8


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Returns uint8 codes (any shape, read row-major) packed continuously, LSB first, 1-D uint8.

    Code i occupies bits i * bits .. i * bits + bits - 1 of the stream, bit k of the stream
    being bit k % 8 of byte k // 8; at 3, 5, 6 and 7 bits a code can straddle two bytes. The
    first code of a byte takes its lowest bits (4 bits: the low nibble, as torch.quint4x2); the
    last byte is zero-padded. Raises ValueError for non-uint8 codes, bits outside 1..8, or a
    code that does not fit `bits`.
    """
    _check_bits(bits)
    if codes.dtype != torch.uint8:
        raise ValueError(f"codes must be uint8, got {codes.dtype}")
    flat = codes.reshape(-1)
    if bits == 8:
        return flat.contiguous()
    if flat.numel() and int(flat.max()) >> bits:
        raise ValueError(f"codes must be below {1 << bits} for {bits} bits")
    if 8 % bits:
        return _pack_groups(flat, bits)
    per_byte = 8 // bits
    pad = -flat.numel() % per_byte
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    slots = flat.view(-1, per_byte)
    packed = slots[:, 0].clone()
    for slot in range(1, per_byte):
        packed |= slots[:, slot] << (slot * bits)
    return packed


def unpack_codes(packed: torch.Tensor, bits: int, n_codes: int) -> torch.Tensor:
    """Returns the first `n_codes` codes of a packed 1-D uint8 stream, one per byte (1-D uint8).

    Raises ValueError when `packed` is not uint8 or its length is not `packed_size(n_codes, bits)`.
    """
    expected = packed_size(n_codes, bits)
    if packed.dtype != torch.uint8 or packed.numel() != expected:
        raise ValueError(
            f"packed codes must be {expected} uint8 bytes, got {packed.numel()} {packed.dtype}"
        )
    flat = packed.reshape(-1)
    if bits == 8:
        return flat
    if 8 % bits:
        return _unpack_groups(flat, bits, n_codes)
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=flat.device)
    codes = (flat[:, None] >> shifts) & ((1 << bits) - 1)
    return codes.reshape(-1)[:n_codes]


# Codes packed per group of 8 (8 * bits bits, a whole number of bytes) at a time, so that the
# int64 temporaries stay bounded whatever the number of codes.
_GROUPS_PER_STEP = 1 << 20


def _pack_groups(flat: torch.Tensor, bits: int) -> torch.Tensor:
    """Returns 1-D uint8 codes packed at a width that does not divide 8 (3, 5, 6, 7 bits).

    Every 8 codes fill exactly `bits` bytes: they are gathered into one int64 (code k at bit
    k * bits) whose low `bits` bytes, least significant first, are the packed bytes.
    """
    n_codes = flat.numel()
    pad = -n_codes % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    groups = flat.view(-1, 8)
    out = torch.empty((groups.shape[0], bits), dtype=torch.uint8, device=flat.device)
    for start in range(0, groups.shape[0], _GROUPS_PER_STEP):
        part = groups[start : start + _GROUPS_PER_STEP].to(torch.int64)
        word = part[:, 0].clone()
        for k in range(1, 8):
            word |= part[:, k] << (k * bits)
        for j in range(bits):
            out[start : start + _GROUPS_PER_STEP, j] = (word >> (8 * j)) & 0xFF
    return out.reshape(-1)[: packed_size(n_codes, bits)]


def _unpack_groups(flat: torch.Tensor, bits: int, n_codes: int) -> torch.Tensor:
    """Returns the first `n_codes` codes of bytes packed by `_pack_groups`, 1-D uint8."""
    pad = -flat.numel() % bits
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    groups = flat.view(-1, bits)
    out = torch.empty((groups.shape[0], 8), dtype=torch.uint8, device=flat.device)
    mask = (1 << bits) - 1
    for start in range(0, groups.shape[0], _GROUPS_PER_STEP):
        part = groups[start : start + _GROUPS_PER_STEP].to(torch.int64)
        word = part[:, 0].clone()
        for j in range(1, bits):
            word |= part[:, j] << (8 * j)
        for k in range(8):
            out[start : start + _GROUPS_PER_STEP, k] = (word >> (k * bits)) & mask
    return out.reshape(-1)[:n_codes]


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Returns a bool mask (any shape, read row-major) packed LSB-first, 1-D uint8.

    Bit i of byte j is element 8*j + i; the last byte is zero-padded.
    """
    flat = mask.reshape(-1)
    # A bool is one byte holding 0 or 1: viewing it as uint8 spares a copy of the whole mask.
    flat = flat.view(torch.uint8) if flat.dtype == torch.bool else flat.to(torch.uint8)
    pad = -flat.numel() % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    slots = flat.view(-1, 8)
    packed = slots[:, 0].clone()
    for bit in range(1, 8):
        packed |= slots[:, bit] << bit
    return packed


def unpack_bits(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Returns the first `n` bits of an LSB-first packed 1-D uint8 tensor as a 1-D bool tensor.

    Raises ValueError when `packed` is not uint8 or holds other than ceil(n / 8) bytes.
    """
    expected = (n + 7) // 8
    if packed.dtype != torch.uint8 or packed.numel() != expected or n < 0:
        raise ValueError(
            f"packed bits must be {expected} uint8 bytes, got {packed.numel()} {packed.dtype}"
        )
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bits = (packed.reshape(-1)[:, None] >> shifts) & 1
    return bits.reshape(-1)[:n].bool()


def _padding_is_zero(packed: torch.Tensor, used_bits: int) -> bool:
    """Returns True when the bits of `packed` past the first `used_bits` are all zero."""
    tail = used_bits % 8
    if tail == 0 or packed.numel() == 0:
        return True
    return int(packed[-1]) >> tail == 0


# --- sizes ------------------------------------------------------------------------------------


def _mask_values(kind: MaskKind, shape: tuple[int, int], block_shape: tuple[int, int]) -> int:
    if kind == "none":
        return 0
    if kind == "value":
        return shape[0] * shape[1]
    block_rows, block_cols = block_grid(shape, block_shape)
    return block_rows * block_cols


def _mask_kind(table: CompressedTable) -> MaskKind:
    if table.keep_mask is None:
        return "none"
    return "block" if table.mask_per_block else "value"


def _part_sizes(
    shape: tuple[int, int], kept: int, bits: int, mask: MaskKind, block_shape: tuple[int, int]
) -> dict[str, int]:
    """Returns the element count of each stored tensor of a table (all 1-D), keyed by part."""
    sizes = {
        "codes": packed_size(kept, bits),
        "scale": shape[0],
        "zero_point": shape[0],
    }
    if mask != "none":
        sizes["mask"] = (_mask_values(mask, shape, block_shape) + 7) // 8
    return sizes


def _file_bytes(sizes: Mapping[str, int], scale_dtype: str) -> int:
    scale_bytes = 2 if scale_dtype == "float16" else 4
    return sum(
        count * (scale_bytes if part in ("scale", "zero_point") else 1)
        for part, count in sizes.items()
    )


def table_file_bytes(table: CompressedTable) -> int:
    """Returns the bytes `table`'s tensors take in a sparq file (codes, scale, zero point, mask).

    That is ceil(kept * bits / 8) + 2 * rows * (4, or 2 for float16 scales) + ceil(mask bits / 8),
    not counting the file header.
    """
    sizes = _part_sizes(
        table.shape,
        int(table.codes.numel()),
        table.quantization.bits,
        _mask_kind(table),
        table.sparsity.block_shape,
    )
    return _file_bytes(sizes, table.quantization.scale_dtype)


# --- writing ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SourceInfo:
    """The input a compressed file was made from: its base name and SHA-256 (hex)."""

    name: str
    sha256: str


def save_safetensors(
    path: str | Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None
) -> None:
    """Writes `tensors` (any device, any layout of strided tensors) to exactly `path`.

    Uses the safetensors library's serializer directly from the tensors' memory, so tensors
    that share storage are each written in full and numpy is not needed. Raises OutputError on
    an unsupported tensor or a failed write (one line naming the path and the reason).
    """
    if sys.byteorder != "little":
        raise OutputError(f"{path}: cannot write: safetensors output needs a little-endian host")
    prepared: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):
            raise OutputError(
                f"{path}: cannot write '{key}': not a tensor ({type(tensor).__name__})"
            )
        if tensor.layout != torch.strided or tensor.is_quantized:
            raise OutputError(
                f"{path}: cannot write '{key}': safetensors stores only dense, unquantized tensors"
            )
        prepared[key] = tensor.detach().cpu().contiguous()
    try:
        specs = {
            key: safetensors.TensorSpec(
                dtype=_torch_dtype_name(tensor.dtype),
                shape=list(tensor.shape),
                data_ptr=tensor.data_ptr(),
                data_len=tensor.numel() * tensor.element_size(),
            )
            for key, tensor in prepared.items()
        }
        safetensors.serialize_file(specs, str(path), metadata=dict(metadata or {}) or None)
    except SafetensorError as error:
        raise OutputError(f"{path}: cannot write: {_write_reason(error)}") from None
    except OSError as error:
        raise OutputError(f"{path}: cannot write: {error.strerror or error}") from None


def _torch_dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _write_reason(error: BaseException) -> str:
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    io_error = re.search(r"I/O error: (.*?) \(os error \d+\)", text)
    if io_error:
        return io_error.group(1)
    return text.removeprefix("Error while serializing: ")


def _reserved_owner(key: str, tables: Mapping[str, Any], *, itself: bool = True) -> str | None:
    """Returns the table whose namespace (`K` or `K.*`) holds `key`, or None.

    With `itself` False, `key` does not count as its own owner (for table keys).
    """
    for index, char in enumerate(key):
        if char == "." and key[:index] in tables:
            return key[:index]
    return key if itself and key in tables else None


def _json_safe_stats(stats: TableStats | None) -> dict[str, Any] | None:
    if stats is None:
        return None
    return {
        name: (None if isinstance(value, float) and not math.isfinite(value) else value)
        for name, value in stats.to_dict().items()
    }


def _table_metadata(table: CompressedTable, stats: TableStats | None) -> dict[str, Any]:
    sparsity = table.sparsity
    return {
        "shape": [table.rows, table.cols],
        "dtype": _TABLE_DTYPE_NAMES[table.dtype],
        "bits": table.quantization.bits,
        "order": table.order,
        "sparsity": {
            "level": float(sparsity.level),
            "block_shape": list(sparsity.block_shape),
            "zeros_per_block": sparsity.zeros_per_block,
            "norm": sparsity.norm,
            "scope": sparsity.scope,
        },
        "quantization": {
            "bits": table.quantization.bits,
            "scale_dtype": table.quantization.scale_dtype,
            "range": table.quantization.range,
        },
        "mask": _mask_kind(table),
        "kept": int(table.codes.numel()),
        "stats": _json_safe_stats(stats),
    }


def _table_tensors(path: str, key: str, table: CompressedTable) -> dict[str, torch.Tensor]:
    """Returns the stored tensors of one table. Raises OutputError when it is inconsistent."""
    if table.dtype not in _TABLE_DTYPE_NAMES:
        raise OutputError(f"{path}: table '{key}': unsupported dtype {table.dtype}")
    codes = table.codes.reshape(-1)
    if codes.dtype != torch.uint8:
        raise OutputError(f"{path}: table '{key}': codes must be uint8, got {codes.dtype}")
    if table.keep_mask is not None:
        grid = (
            block_grid(table.shape, table.sparsity.block_shape)
            if table.mask_per_block
            else table.shape
        )
        if tuple(table.keep_mask.shape) != grid:
            raise OutputError(
                f"{path}: table '{key}': keep-mask has shape {list(table.keep_mask.shape)}, "
                f"expected {list(grid)}"
            )
    kept = table.kept_count()
    if kept != codes.numel():
        raise OutputError(
            f"{path}: table '{key}': {codes.numel()} codes, but its mask keeps {kept} values"
        )
    scale_dtype = _SCALE_DTYPES[table.quantization.scale_dtype]
    parts = {
        "codes": pack_codes(codes, table.quantization.bits),
        "scale": table.scale.to(scale_dtype),
        "zero_point": table.zero_point.to(scale_dtype),
    }
    for name in ("scale", "zero_point"):
        original = getattr(table, name)
        if original.shape != (table.rows,):
            raise OutputError(
                f"{path}: table '{key}': {name} must hold one value per row ({table.rows}), "
                f"got shape {list(original.shape)}"
            )
        if scale_dtype == torch.float16 and not torch.equal(parts[name].float(), original.float()):
            raise OutputError(
                f"{path}: table '{key}': scale_dtype is float16 but its {name} values are not "
                f"float16 values"
            )
    if table.keep_mask is not None:
        parts["mask"] = pack_bits(table.keep_mask)
    return {f"{key}.{part}": tensor for part, tensor in parts.items()}


def write_compressed(
    path: str | Path,
    passthrough: Mapping[str, torch.Tensor],
    tables: Mapping[str, CompressedTable],
    stats: Mapping[str, TableStats] | None = None,
    source: SourceInfo | None = None,
    extra: Mapping[str, Any] | None = None,
) -> None:
    """Writes a sparq file (format version 1) to exactly `path`; returns None.

    `passthrough` tensors are stored unchanged; each table `K` becomes `K.codes`, `K.scale`,
    `K.zero_point` and `K.mask`; `stats` (per table key), `source` and `extra` (JSON-able) go
    into the metadata. The caller makes the write atomic. Raises OutputError when a key collides
    with a table's reserved names (`K` and `K.*`), when `extra` is not JSON-able, when a tensor
    cannot be stored, or when the write fails.
    """
    where = str(path)
    for key, is_table in [(k, False) for k in passthrough] + [(k, True) for k in tables]:
        owner = _reserved_owner(key, tables, itself=not is_table)
        if owner is not None:
            raise OutputError(
                f"{where}: cannot write: key '{key}' collides with compressed table '{owner}' "
                f"(keys '{owner}' and '{owner}.*' are reserved for its parts)"
            )
    stored: dict[str, torch.Tensor] = dict(passthrough)
    table_meta: dict[str, Any] = {}
    for key, table in tables.items():
        stored.update(_table_tensors(where, key, table))
        table_meta[key] = _table_metadata(table, (stats or {}).get(key))
    document = {
        "format_version": FORMAT_VERSION,
        "sparq_version": sparqcli.__version__,
        "source": None
        if source is None
        else {"name": Path(source.name).name, "sha256": source.sha256},
        "tables": table_meta,
        "extra": dict(extra or {}),
    }
    try:
        text = json.dumps(document, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as error:
        raise OutputError(f"{where}: cannot write: metadata is not JSON-able ({error})") from None
    save_safetensors(where, stored, {METADATA_KEY: text})


# --- reading ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TableInfo:
    """One compressed table as the file's metadata describes it (validated against the file)."""

    key: str
    shape: tuple[int, int]
    dtype: torch.dtype
    order: Order
    sparsity: SparsitySettings
    quantization: QuantizationSettings
    mask: MaskKind
    kept: int
    stats: dict[str, Any] | None
    file_bytes: int

    @property
    def tensor_keys(self) -> dict[str, str]:
        """Returns the stored key of each part of the table (`codes` -> `K.codes`, ...)."""
        parts = PARTS if self.mask != "none" else PARTS[:3]
        return {part: f"{self.key}.{part}" for part in parts}

    def to_dict(self) -> dict[str, Any]:
        """Returns the table's metadata as a JSON-able dict, plus `file_bytes`."""
        return {
            "shape": list(self.shape),
            "dtype": _TABLE_DTYPE_NAMES[self.dtype],
            "bits": self.quantization.bits,
            "order": self.order,
            "sparsity": {
                "level": self.sparsity.level,
                "block_shape": list(self.sparsity.block_shape),
                "zeros_per_block": self.sparsity.zeros_per_block,
                "norm": self.sparsity.norm,
                "scope": self.sparsity.scope,
            },
            "quantization": {
                "bits": self.quantization.bits,
                "scale_dtype": self.quantization.scale_dtype,
                "range": self.quantization.range,
            },
            "mask": self.mask,
            "kept": self.kept,
            "stats": self.stats,
            "file_bytes": self.file_bytes,
        }


@dataclass(frozen=True)
class CompressedFileInfo:
    """What a safetensors file holds: for a sparq file its tables, always its other tensors.

    `is_sparq` is False for a plain safetensors file (no `sparq` metadata); then `tables` is
    empty and every tensor is in `passthrough`.
    """

    path: str
    is_sparq: bool
    format_version: int | None
    sparq_version: str | None
    source: SourceInfo | None
    tables: dict[str, TableInfo]
    passthrough: dict[str, TensorInfo]
    extra: dict[str, Any] = field(default_factory=dict)

    def dense_keys(self) -> list[str]:
        """Returns the keys of the dense state dict the file decodes to, sorted."""
        return sorted([*self.tables, *self.passthrough])

    def to_dict(self) -> dict[str, Any]:
        """Returns the information as a JSON-able dict (tables and pass-through tensors)."""
        return {
            "format_version": self.format_version,
            "sparq_version": self.sparq_version,
            "source": None
            if self.source is None
            else {"name": self.source.name, "sha256": self.source.sha256},
            "tables": {key: table.to_dict() for key, table in self.tables.items()},
            "passthrough": {
                key: {"shape": list(info.shape), "dtype": info.dtype}
                for key, info in self.passthrough.items()
            },
            "extra": self.extra,
        }


@contextmanager
def _opened(path: str | Path) -> Iterator[Any]:
    """Yields the safetensors handle of `path`. Raises InputError / FormatError when unreadable."""
    where = str(path)
    file = Path(path)
    if file.is_dir():
        raise InputError(f"{where}: is a directory, not a file")
    if not file.exists():
        raise InputError(f"{where}: no such file")
    try:
        handle = safe_open(where, framework="pt", device="cpu")
    except SafetensorError as error:
        reason = first_line(error).removeprefix("Error while deserializing header: ")
        raise FormatError(f"{where}: not a valid safetensors file ({reason})") from None
    except OSError as error:
        raise InputError(f"{where}: cannot read: {error.strerror or error}") from None
    with handle as opened:
        yield opened


def _get_tensor(handle: Any, where: str, key: str) -> torch.Tensor:
    try:
        return handle.get_tensor(key)
    except (SafetensorError, OSError, RuntimeError) as error:
        raise FormatError(f"{where}: cannot read tensor '{key}' ({first_line(error)})") from None


def _table_problem(where: str, key: str) -> Callable[[str], FormatError]:
    """Returns a maker of FormatErrors that name the file and table `key`."""

    def problem(message: str) -> FormatError:
        return FormatError(f"{where}: table '{key}': {message}")

    return problem


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _show(value: Any) -> str:
    return json.dumps(value) if _jsonable(value) else repr(value)


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def _parse_table(where: str, key: str, entry: Any, stored: Mapping[str, TensorInfo]) -> TableInfo:
    problem = _table_problem(where, key)
    if not isinstance(entry, dict):
        raise problem("metadata entry must be a JSON object")
    missing = [
        name
        for name in ("shape", "dtype", "bits", "order", "sparsity", "quantization", "mask", "kept")
        if name not in entry
    ]
    if missing:
        raise problem(f"metadata lacks {', '.join(missing)}")
    shape = entry["shape"]
    if not (
        isinstance(shape, list) and len(shape) == 2 and all(_is_int(s) and s >= 0 for s in shape)
    ):
        raise problem(f"shape must be two non-negative integers, got {_show(shape)}")
    rows, cols = shape
    if not isinstance(entry["dtype"], str) or entry["dtype"] not in TABLE_DTYPES:
        raise problem(
            f"dtype must be one of {', '.join(TABLE_DTYPES)}, got {_show(entry['dtype'])}"
        )
    if entry["order"] not in ORDERS:
        raise problem(f"order must be one of {', '.join(ORDERS)}, got {_show(entry['order'])}")
    sparsity_entry = entry["sparsity"]
    quantization_entry = entry["quantization"]
    if not isinstance(sparsity_entry, dict) or not isinstance(quantization_entry, dict):
        raise problem("sparsity and quantization must be JSON objects")
    try:
        block_shape = sparsity_entry.get("block_shape")
        sparsity = SparsitySettings(
            level=sparsity_entry.get("level"),
            block_shape=tuple(block_shape) if isinstance(block_shape, list) else block_shape,
            zeros_per_block=sparsity_entry.get("zeros_per_block"),
            norm=sparsity_entry.get("norm"),
            # Members added in sparq 0.2; files written before lack them (the defaults).
            scope=sparsity_entry.get("scope", "table"),
        )
        quantization = QuantizationSettings(
            bits=quantization_entry.get("bits"),
            scale_dtype=quantization_entry.get("scale_dtype"),
            range=quantization_entry.get("range", "minmax"),
        )
    except (SettingError, TypeError) as error:
        raise problem(str(error)) from None
    if entry["bits"] != quantization.bits:
        raise problem(
            f"bits {_show(entry['bits'])} disagrees with quantization.bits {quantization.bits}"
        )
    mask = entry["mask"]
    if mask not in ("block", "value", "none"):
        raise problem(f"mask must be one of block, value, none, got {_show(mask)}")
    kept = entry["kept"]
    if not _is_int(kept) or not 0 <= kept <= rows * cols:
        raise problem(f"kept must be an integer in [0, {rows * cols}], got {_show(kept)}")
    if mask == "none" and kept != rows * cols:
        raise problem(f"kept is {kept} but there is no mask, so all {rows * cols} values are kept")
    stats = entry.get("stats")
    if stats is not None and not isinstance(stats, dict):
        raise problem(f"stats must be a JSON object or null, got {_show(stats)}")
    for name, value in (stats or {}).items():
        if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)):
            raise problem(f"stats.{name} must be a number or null, got {_show(value)}")

    sizes = _part_sizes((rows, cols), kept, quantization.bits, mask, sparsity.block_shape)
    scale_code = "F16" if quantization.scale_dtype == "float16" else "F32"
    expected_dtypes = {"codes": "U8", "scale": scale_code, "zero_point": scale_code, "mask": "U8"}
    for part, count in sizes.items():
        name = f"{key}.{part}"
        info = stored.get(name)
        if info is None:
            raise problem(f"missing tensor '{name}'")
        want = _STORED_DTYPE_NAMES[expected_dtypes[part]]
        if info.dtype != want:
            raise problem(f"tensor '{name}' has dtype {info.dtype}, expected {want}")
        if info.shape != (count,):
            raise problem(f"tensor '{name}' has shape {list(info.shape)}, expected [{count}]")
    return TableInfo(
        key=key,
        shape=(rows, cols),
        dtype=TABLE_DTYPES[entry["dtype"]],
        order=entry["order"],
        sparsity=sparsity,
        quantization=quantization,
        mask=mask,
        kept=kept,
        stats=stats,
        file_bytes=_file_bytes(sizes, quantization.scale_dtype),
    )


def _parse_document(where: str, text: str) -> dict[str, Any]:
    try:
        document = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as error:
        raise FormatError(
            f"{where}: metadata '{METADATA_KEY}' is not valid JSON ({error})"
        ) from None
    if not isinstance(document, dict):
        raise FormatError(f"{where}: metadata '{METADATA_KEY}' must be a JSON object")
    version = document.get("format_version")
    if not _is_int(version) or version < 1:
        raise FormatError(
            f"{where}: metadata '{METADATA_KEY}': format_version must be a positive integer, "
            f"got {_show(version)}"
        )
    if version > FORMAT_VERSION:
        raise FormatError(
            f"{where}: format version {version} is newer than this sparq supports "
            f"({FORMAT_VERSION}); upgrade sparq"
        )
    optional = (
        ("sparq_version", str, "string"),
        ("source", dict, "object"),
        ("extra", dict, "object"),
    )
    for name, kind, label in (("tables", dict, "object"), *optional):
        value = document.get(name)
        if (value is not None or name == "tables") and not isinstance(value, kind):
            raise FormatError(
                f"{where}: metadata '{METADATA_KEY}': '{name}' must be a JSON {label}, "
                f"got {_show(value)}"
            )
    source = document.get("source")
    if source is not None and not (
        isinstance(source.get("name"), str) and isinstance(source.get("sha256"), str)
    ):
        raise FormatError(
            f"{where}: metadata '{METADATA_KEY}': source must hold a string name and sha256"
        )
    return document


def _parse_info(where: str, handle: Any) -> CompressedFileInfo:
    stored: dict[str, TensorInfo] = {}
    names: list[str] = handle.keys()
    for key in names:
        view = handle.get_slice(key)
        code = view.get_dtype()
        stored[key] = TensorInfo(tuple(view.get_shape()), _STORED_DTYPE_NAMES.get(code, code))
    metadata = handle.metadata() or {}
    if METADATA_KEY not in metadata:
        return CompressedFileInfo(where, False, None, None, None, {}, stored)
    document = _parse_document(where, metadata[METADATA_KEY])
    tables: dict[str, TableInfo] = {}
    for key in sorted(document["tables"]):
        owner = _reserved_owner(key, document["tables"], itself=False)
        if owner is not None:
            raise FormatError(
                f"{where}: table '{key}': its key lies under compressed table '{owner}'"
            )
        tables[key] = _parse_table(where, key, document["tables"][key], stored)
    passthrough: dict[str, TensorInfo] = {}
    for key, info in stored.items():
        owner = _reserved_owner(key, tables)
        if owner is None:
            passthrough[key] = info
        elif key not in tables[owner].tensor_keys.values():
            raise FormatError(f"{where}: table '{owner}': unexpected tensor '{key}'")
    source = document.get("source")
    return CompressedFileInfo(
        path=where,
        is_sparq=True,
        format_version=document["format_version"],
        sparq_version=document.get("sparq_version"),
        source=None if source is None else SourceInfo(source["name"], source["sha256"]),
        tables=tables,
        passthrough=passthrough,
        extra=document.get("extra") or {},
    )


def read_info(path: str | Path) -> CompressedFileInfo:
    """Returns what the safetensors file at `path` holds, reading its header only.

    For a sparq file the metadata is validated against every stored tensor (presence, dtype,
    exact shape, no stray `K.*` keys); tensor data (and so the mask's count) is checked by
    `read_table` / `load`. A plain safetensors file gives `is_sparq=False`. Raises InputError
    when the file is missing or unreadable, FormatError when it is not valid safetensors, its
    sparq metadata is inconsistent, or its format version is newer than this reader's.
    """
    with _opened(path) as handle:
        return _parse_info(str(path), handle)


def _read_table(
    where: str, handle: Any, info: TableInfo, device: torch.device | str
) -> CompressedTable:
    problem = _table_problem(where, info.key)
    names = info.tensor_keys
    bits = info.quantization.bits
    packed_codes = _get_tensor(handle, where, names["codes"])
    if not _padding_is_zero(packed_codes, info.kept * bits):
        raise problem(f"tensor '{names['codes']}' has nonzero padding bits")
    keep_mask = None
    if info.mask != "none":
        packed_mask = _get_tensor(handle, where, names["mask"])
        n_mask = _mask_values(info.mask, info.shape, info.sparsity.block_shape)
        if not _padding_is_zero(packed_mask, n_mask):
            raise problem(f"tensor '{names['mask']}' has nonzero padding bits")
        grid = (
            block_grid(info.shape, info.sparsity.block_shape)
            if info.mask == "block"
            else info.shape
        )
        keep_mask = unpack_bits(packed_mask, n_mask).view(grid)
    scale = _get_tensor(handle, where, names["scale"]).float()
    zero_point = _get_tensor(handle, where, names["zero_point"]).float()
    if not bool(torch.isfinite(scale).all()) or not bool((scale > 0).all()):
        raise problem(f"tensor '{names['scale']}' holds values that are not finite and positive")
    if not bool(torch.isfinite(zero_point).all()):
        raise problem(f"tensor '{names['zero_point']}' holds values that are not finite")
    table = CompressedTable(
        shape=info.shape,
        dtype=info.dtype,
        order=info.order,
        sparsity=info.sparsity,
        quantization=info.quantization,
        codes=unpack_codes(packed_codes, bits, info.kept),
        scale=scale,
        zero_point=zero_point,
        keep_mask=keep_mask,
        mask_per_block=info.mask == "block"
        if keep_mask is not None
        else info.sparsity.prunes_whole_blocks,
    )
    if keep_mask is not None:
        counted = table.kept_count()
        if counted != info.kept:
            raise problem(f"mask keeps {counted} values but the metadata says kept {info.kept}")
    if torch.device(device) == torch.device("cpu"):
        return table
    return CompressedTable(
        shape=table.shape,
        dtype=table.dtype,
        order=table.order,
        sparsity=table.sparsity,
        quantization=table.quantization,
        codes=table.codes.to(device),
        scale=table.scale.to(device),
        zero_point=table.zero_point.to(device),
        keep_mask=None if keep_mask is None else keep_mask.to(device),
        mask_per_block=table.mask_per_block,
    )


def _unknown_key(where: str, key: str, keys: list[str]) -> InputError:
    close = difflib.get_close_matches(key, keys, n=3, cutoff=0.6)
    if close:
        hint = "did you mean " + ", ".join(f"'{k}'" for k in close) + "?"
    elif keys:
        shown = ", ".join(f"'{k}'" for k in keys[:5])
        hint = f"it holds {shown}" + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")
    else:
        hint = "it holds no tensors"
    return InputError(f"{where}: no tensor '{key}'; {hint}")


def read_table(path: str | Path, key: str, device: torch.device | str = "cpu") -> CompressedTable:
    """Returns compressed table `key` of a sparq file, validated and unpacked, on `device`.

    Codes come back one per byte and the mask as a bool grid, as the engine makes them. Raises
    InputError when `key` is not a compressed table of the file (naming close keys) or the file
    is unreadable, FormatError when the file or the table is inconsistent or corrupt.
    """
    where = str(path)
    with _opened(path) as handle:
        info = _parse_info(where, handle)
        if key not in info.tables:
            raise _unknown_key(where, key, sorted(info.tables))
        return _read_table(where, handle, info.tables[key], device)


def load(path: str | Path, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Returns the dense state dict of a sparq (or plain safetensors) file, keys sorted.

    Tables come back with their original keys, shapes and dtypes: pruned values exactly 0.0,
    kept ones `(q - zero_point) * scale`; pass-through tensors as stored. Raises InputError when
    the file is missing or unreadable, FormatError when it is corrupt or inconsistent.
    """
    where = str(path)
    state: dict[str, torch.Tensor] = {}
    with _opened(path) as handle:
        info = _parse_info(where, handle)
        for key in info.dense_keys():
            if key in info.tables:
                state[key] = _read_table(where, handle, info.tables[key], device).decode()
            else:
                state[key] = _get_tensor(handle, where, key).to(device)
    return state


def load_table(path: str | Path, key: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """Returns one tensor of the dense state dict of a sparq file, decoding only that table.

    Raises InputError when the file holds no such key (naming close keys) or is unreadable,
    FormatError when it is corrupt or inconsistent.
    """
    where = str(path)
    with _opened(path) as handle:
        info = _parse_info(where, handle)
        if key in info.tables:
            return _read_table(where, handle, info.tables[key], device).decode()
        if key in info.passthrough:
            return _get_tensor(handle, where, key).to(device)
        raise _unknown_key(where, key, info.dense_keys())


def write_dense(path: str | Path, output: str | Path) -> int:
    """Decodes the sparq file at `path` and writes the dense state dict to `output` atomically.

    `.safetensors` outputs are written with safetensors (no metadata), anything else with
    torch.save. Returns the number of tensors written. Raises what `load` raises, and
    OutputError when the output cannot be written.
    """
    from sparqcli.checkpoint import atomic_output, write_torch

    state = load(path)
    output = Path(output)
    if output.suffix.lower() == ".safetensors":
        with atomic_output(output) as temp:
            save_safetensors(temp, state, None)
    else:
        write_torch(output, state)
    return len(state)


# --- torch-ao output --------------------------------------------------------------------------


def _module_prefix(key: str) -> str:
    if key == "weight":
        return ""
    if key.endswith(".weight"):
        return key[: -len("weight")]
    raise UsageError(
        f"table '{key}': --format torch-ao needs a module weight key ending in '.weight'"
    )


def _quint4x2_per_channel(
    key: str, codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor
) -> torch.Tensor:
    """Returns a per-channel float-qparams quint4x2 tensor whose int_repr packs `codes`."""
    rows, cols = codes.shape
    packed = pack_codes(codes, 4)
    quantized = torch._empty_per_channel_affine_quantized(
        [rows, cols], scales=scale, zero_points=zero_point, axis=0, dtype=torch.quint4x2
    )
    storage = quantized.untyped_storage()
    if storage.nbytes() != packed.numel():
        raise OutputError(
            f"table '{key}': this torch stores quint4x2 in {storage.nbytes()} bytes, "
            f"expected {packed.numel()}; cannot write torch-ao 4-bit output"
        )
    if packed.numel():
        storage.copy_(packed.untyped_storage())
    return quantized


def torch_ao_problem(subject: str, bits: int, cols: int | None = None) -> str | None:
    """Returns why `--format torch-ao` cannot hold a table, as `subject: reason`, or None.

    torch.ao's embeddings are 8-bit (quint8) or 4-bit (quint4x2), the latter with an even
    number of columns (`cols` None: not known yet); anything else cannot be written. `subject`
    names the table (`table 'emb.weight'`) or the setting (`layers[0].quantization.bits`).
    """
    if bits not in (8, 4):
        return (
            f"{subject}: --format torch-ao supports 8 and 4 bits; torch.ao has no {bits}-bit "
            f"embedding (use --format sparq)"
        )
    if bits == 4 and cols is not None and cols % 2:
        return (
            f"{subject}: --format torch-ao at 4 bits needs an even number of columns, "
            f"got {cols} (torch.ao's quint4x2 embeddings mis-pack odd widths)"
        )
    return None


def torch_ao_state_dict(
    tables: Mapping[str, CompressedTable], passthrough: Mapping[str, torch.Tensor]
) -> dict[str, Any]:
    """Returns the state dict torch.ao's converted model has, for `--format torch-ao`.

    Each table `<module>.weight` becomes `<module>._packed_params._packed_weight` (a per-channel
    float-qparams quantized tensor, axis 0: torch.quint8 at 8 bits, torch.quint4x2 at 4 bits,
    int_repr = the dense codes, pruned values holding the code of 0.0) and
    `<module>._packed_params.dtype`. Pass-through tensors are returned unchanged. The result is
    dense and decodes pruned values to `(round(zp) - zp) * scale`, as the reference does.
    Raises UsageError for a table at other than 8 or 4 bits, a 4-bit table with an odd number
    of columns (torch.ao mis-packs those) or a key not ending in `.weight`; OutputError when a produced key collides
    with a pass-through key.
    """
    state: dict[str, Any] = dict(passthrough)
    for key, table in tables.items():
        bits = table.quantization.bits
        problem = torch_ao_problem(f"table '{key}'", bits, table.cols)
        if problem is not None:
            raise UsageError(problem)
        prefix = _module_prefix(key)
        names = (f"{prefix}_packed_params._packed_weight", f"{prefix}_packed_params.dtype")
        for name in (key, *names):
            if name in state:
                raise OutputError(
                    f"table '{key}': torch-ao key '{name}' collides with a tensor of the checkpoint"
                )
        codes = table.dense_codes().cpu()
        scale = table.scale.float().cpu().contiguous()
        zero_point = table.zero_point.float().cpu().contiguous()
        if bits == 8:
            weight = torch._make_per_channel_quantized_tensor(codes, scale, zero_point, 0)
            dtype = torch.quint8
        else:
            weight = _quint4x2_per_channel(key, codes, scale, zero_point)
            dtype = torch.quint4x2
        state[names[0]] = weight
        state[names[1]] = dtype
    return state
