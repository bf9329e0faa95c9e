"""Reading sparq files: validation against the spec, tables, dense tensors, and `SparqFile`.

The container is parsed by the safetensors library; the metadata is validated against every
stored tensor before anything is decoded (docs/FORMAT.md, "Validation").
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open

from sparqcli.dtypes import (
    BY_NAME,
    BY_SAFETENSORS,
    TABLE_DTYPES,
    TensorInfo,
    dtype_name,
    torch_dtype,
)
from sparqcli.engine.blocks import block_grid
from sparqcli.engine.table import CompressedTable
from sparqcli.errors import FormatError, InputError, SettingError, UsageError, first_line
from sparqcli.format.handle import OpenHandle
from sparqcli.format.packing import padding_is_zero, unpack_bits, unpack_code_range, unpack_codes
from sparqcli.format.spec import (
    FORMAT_VERSION,
    MASK_KINDS,
    METADATA_KEY,
    PARTS,
    MaskKind,
    file_bytes,
    mask_values,
    part_sizes,
    reserved_owner,
)
from sparqcli.format.writer import SourceInfo
from sparqcli.settings import ORDERS, Order, Quantization, Sparsity

if TYPE_CHECKING:
    from sparqcli.format.folder import SparqFolder


@dataclass(frozen=True)
class TableInfo:
    """One compressed table as the file's metadata describes it (validated against the file)."""

    key: str
    shape: tuple[int, int]
    dtype: torch.dtype
    order: Order
    sparsity: Sparsity
    quantization: Quantization
    mask: MaskKind
    kept: int
    stats: dict[str, Any] | None
    file_bytes: int
    aliases: tuple[str, ...] = ()

    @property
    def tensor_keys(self) -> dict[str, str]:
        """Returns the stored key of each part of the table (`codes` -> `K.codes`, ...)."""
        parts = PARTS if self.mask != "none" else PARTS[:3]
        return {part: f"{self.key}.{part}" for part in parts}

    def to_dict(self) -> dict[str, Any]:
        """Returns the table's metadata as a JSON-able dict, plus `file_bytes` (and `aliases`
        when it has some)."""
        entry = {
            "shape": list(self.shape),
            "dtype": dtype_name(self.dtype),
            "bits": self.quantization.bits,
            "order": self.order,
            "sparsity": self.sparsity.to_dict(),
            "quantization": self.quantization.to_dict(),
            "mask": self.mask,
            "kept": self.kept,
            "stats": self.stats,
            "file_bytes": self.file_bytes,
        }
        if self.aliases:
            entry["aliases"] = list(self.aliases)
        return entry


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
    file_bytes: int = 0

    def dense_keys(self) -> list[str]:
        """Returns the keys of the dense state dict the file decodes to, sorted (aliases too)."""
        return sorted([*self.tables, *self.passthrough, *self.aliases])

    @property
    def aliases(self) -> dict[str, str]:
        """Returns each alias key and the table it decodes as."""
        return {alias: key for key, table in self.tables.items() for alias in table.aliases}

    def to_dict(self) -> dict[str, Any]:
        """Returns the information as a JSON-able dict (tables and pass-through tensors)."""
        return {
            "file": self.path,
            "compressed": self.is_sparq,
            "file_bytes": self.file_bytes,
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
        sparsity = Sparsity(
            level=sparsity_entry.get("level"),
            block_shape=tuple(block_shape) if isinstance(block_shape, list) else block_shape,
            zeros_per_block=sparsity_entry.get("zeros_per_block"),
            norm=sparsity_entry.get("norm"),
            # Members added in sparq 0.2; files written before lack them (the defaults).
            scope=sparsity_entry.get("scope", "table"),
        )
        quantization = Quantization(
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
    if mask not in MASK_KINDS:
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

    aliases = entry.get("aliases", [])
    if not isinstance(aliases, list) or not all(isinstance(name, str) for name in aliases):
        raise problem(f"aliases must be a list of keys, got {_show(aliases)}")
    if len(set(aliases)) != len(aliases) or key in aliases:
        raise problem(f"aliases must be distinct keys other than the table's, got {_show(aliases)}")

    sizes = part_sizes((rows, cols), kept, quantization.bits, mask, sparsity.block_shape)
    scale_code = BY_NAME[quantization.scale_dtype].safetensors
    expected_dtypes = {"codes": "U8", "scale": scale_code, "zero_point": scale_code, "mask": "U8"}
    for part, count in sizes.items():
        name = f"{key}.{part}"
        info = stored.get(name)
        if info is None:
            raise problem(f"missing tensor '{name}'")
        want = BY_SAFETENSORS[expected_dtypes[part]].name
        if info.dtype != want:
            raise problem(f"tensor '{name}' has dtype {info.dtype}, expected {want}")
        if info.shape != (count,):
            raise problem(f"tensor '{name}' has shape {list(info.shape)}, expected [{count}]")
    return TableInfo(
        key=key,
        shape=(rows, cols),
        dtype=torch_dtype(entry["dtype"]),
        order=entry["order"],
        sparsity=sparsity,
        quantization=quantization,
        mask=mask,
        kept=kept,
        stats=stats,
        file_bytes=file_bytes(sizes, quantization.scale_dtype),
        aliases=tuple(aliases),
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
        dtype = BY_SAFETENSORS.get(code)
        stored[key] = TensorInfo(tuple(view.get_shape()), dtype.name if dtype else code)
    metadata = handle.metadata() or {}
    if METADATA_KEY not in metadata:
        return CompressedFileInfo(
            where, False, None, None, None, {}, stored, file_bytes=Path(where).stat().st_size
        )
    document = _parse_document(where, metadata[METADATA_KEY])
    tables: dict[str, TableInfo] = {}
    for key in sorted(document["tables"]):
        owner = reserved_owner(key, document["tables"], itself=False)
        if owner is not None:
            raise FormatError(
                f"{where}: table '{key}': its key lies under compressed table '{owner}'"
            )
        tables[key] = _parse_table(where, key, document["tables"][key], stored)
    passthrough: dict[str, TensorInfo] = {}
    for key, info in stored.items():
        owner = reserved_owner(key, tables)
        if owner is None:
            passthrough[key] = info
        elif key not in tables[owner].tensor_keys.values():
            raise FormatError(f"{where}: table '{owner}': unexpected tensor '{key}'")
    named: dict[str, str] = {}
    for key, table in tables.items():
        for alias in table.aliases:
            other = named.get(alias) or (alias if alias in stored else None)
            owner = reserved_owner(alias, tables)
            if other is not None or owner is not None:
                clash = f"table '{owner}'" if owner is not None else f"'{other}'"
                raise FormatError(f"{where}: table '{key}': alias '{alias}' collides with {clash}")
            named[alias] = key
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
        file_bytes=Path(where).stat().st_size,
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
    where: str, handle: Any, info: TableInfo, device: torch.device | str, codes: bool = True
) -> CompressedTable:
    """Returns the table `info` describes; with `codes` False, its codes are left empty."""
    problem = _table_problem(where, info.key)
    names = info.tensor_keys
    bits = info.quantization.bits
    unpacked = torch.empty(0, dtype=torch.uint8)
    if codes:
        packed_codes = _get_tensor(handle, where, names["codes"])
        if not padding_is_zero(packed_codes, info.kept * bits):
            raise problem(f"tensor '{names['codes']}' has nonzero padding bits")
        unpacked = unpack_codes(packed_codes, bits, info.kept)
    keep_mask = None
    if info.mask != "none":
        packed_mask = _get_tensor(handle, where, names["mask"])
        n_mask = mask_values(info.mask, info.shape, info.sparsity.block_shape)
        if not padding_is_zero(packed_mask, n_mask):
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
        codes=unpacked,
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
    return table.to(device)


def _unknown_key(where: str, key: str, keys: list[str]) -> InputError:
    if not isinstance(key, str):
        return InputError(f"{where}: keys are strings, got {type(key).__name__} {key!r}")
    close = difflib.get_close_matches(key, keys, n=3, cutoff=0.6)
    if close:
        hint = "did you mean " + ", ".join(f"'{k}'" for k in close) + "?"
    elif keys:
        shown = ", ".join(f"'{k}'" for k in keys[:5])
        hint = f"it holds {shown}" + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")
    else:
        hint = "it holds no tensors"
    return InputError(f"{where}: no tensor '{key}'; {hint}")


def _not_a_table(
    where: str, key: str, passthrough: Mapping[str, Any], tables: list[str]
) -> InputError:
    """Returns the error for asking for table `key` of a file that holds it stored as it was
    (`passthrough`), or not at all (naming close table keys)."""
    if key in passthrough:
        return InputError(
            f"{where}: '{key}' is not a compressed table (it is stored as it was); get_tensor "
            "reads it"
        )
    return _unknown_key(where, key, tables)


class SparqFile(OpenHandle):
    """An open sparq file (or plain safetensors file), like `safetensors.safe_open`.

    The header is read and validated on opening; tensors are read when asked for. Use it as a
    context manager, or call `close()`; reading a tensor after that raises UsageError. Keys are
    the original keys: a compressed table `K` is one key, not its stored parts. `device` as
    `reader_device` takes it.
    """

    def __init__(self, path: str | Path, device: torch.device | str = "cpu") -> None:
        self.path = str(path)
        self.device = reader_device(device)
        self._context = _opened(path)
        self._handle = self._context.__enter__()
        try:
            self.info = _parse_info(self.path, self._handle)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Closes the file; the handle cannot read after this."""
        if self._context is not None:
            self._context.__exit__(None, None, None)
            self._context = None

    def _open_handle(self) -> Any:
        """Returns the safetensors handle. Raises UsageError once the file is closed."""
        if self._context is None:
            raise UsageError(f"{self.path}: the file is closed; open it again to read from it")
        return self._handle

    def keys(self) -> list[str]:
        """Returns the keys of the dense state dict the file decodes to, sorted."""
        return self.info.dense_keys()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Returns the dense state dict, keys sorted; a table's aliases are the same tensor
        object as the table (decoded once), as tied weights are. Raises FormatError when the
        file is corrupt or inconsistent."""
        decoded: dict[str, torch.Tensor] = {}
        state: dict[str, torch.Tensor] = {}
        for key in self.keys():
            target = self.info.aliases.get(key, key)
            if target not in decoded:
                decoded[target] = self.get_tensor(target)
            state[key] = decoded[target]
        return state

    def get_tensor(self, key: str) -> torch.Tensor:
        """Returns tensor `key` decoded to its original dtype (pass-through tensors as stored).

        Raises InputError when the file holds no such key (naming close keys), FormatError when
        it is corrupt or inconsistent.
        """
        key = self.info.aliases.get(key, key)
        if key in self.info.tables:
            return self.get_table(key).decode()
        if key in self.info.passthrough:
            return _get_tensor(self._open_handle(), self.path, key).to(self.device)
        raise _unknown_key(self.path, key, self.keys())

    def get_table(self, key: str) -> CompressedTable:
        """Returns compressed table `key`, validated and unpacked (codes one per byte, the mask
        as a bool grid, as the engine makes them).

        An alias gives its table. Raises InputError when `key` is not a compressed table of the
        file, FormatError when the table is inconsistent or corrupt.
        """
        key = self.info.aliases.get(key, key)
        if key not in self.info.tables:
            raise _not_a_table(self.path, key, self.info.passthrough, self.tables())
        return _read_table(self.path, self._open_handle(), self.info.tables[key], self.device)

    def get_rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Returns rows `start:stop` of tensor `key`, decoded, reading only what they need.

        A compressed table reads its mask, scales and zero points, and only the codes of the
        block rows that hold those rows. Raises IndexError for a range outside the tensor,
        TypeError for ends that are not ints, InputError for an unknown key, FormatError for a
        corrupt table.
        """
        key = self.info.aliases.get(key, key)
        if key in self.info.passthrough:
            shape = self.info.passthrough[key].shape
            _check_range(key, start, stop, shape[0] if shape else 0)
            view = self._open_handle().get_slice(key)
            return view[start:stop].to(self.device)
        if key not in self.info.tables:
            raise _unknown_key(self.path, key, self.keys())
        info = self.info.tables[key]
        _check_range(key, start, stop, info.shape[0])
        return _read_rows(self.path, self._open_handle(), info, start, stop).to(self.device)


def reader_device(device: torch.device | str) -> torch.device:
    """Returns `device` as the torch.device a reader puts tensors on. Raises UsageError for a
    name that is not a device, a kind other than cpu or cuda, or a CUDA device this machine
    does not have."""
    try:
        found = torch.device(device)
    except (RuntimeError, TypeError):
        raise UsageError(
            f"{{opt:device}}: {device!r} is not a device (cpu, cuda, cuda:N)", option="device"
        ) from None
    if found.type == "cpu":
        return found
    if found.type != "cuda":
        raise UsageError(f"{{opt:device}}: must be cpu or cuda, got {device!r}", option="device")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if (found.index or 0) >= count:
        have = f"{count} CUDA device{'s' if count != 1 else ''}" if count else "no CUDA device"
        raise UsageError(f"{{opt:device}} {device!r}: this machine has {have}", option="device")
    return found


def open_file(path: str | Path, device: torch.device | str = "cpu") -> SparqFile | SparqFolder:
    """Returns the open `SparqFile` at `path` (`sparqcli.open`); a folder of sparq shards gives a
    `SparqFolder` (what compressing a model folder writes) or a `ShardedSparqFile` (what a
    distributed run writes: tables split by rows across shards), which read the same way.

    Raises InputError when the file is missing or unreadable (or the folder is not a model
    folder), FormatError when it is not valid safetensors or its sparq metadata is inconsistent,
    UsageError for a device it cannot read to (`reader_device`).
    """
    from sparqcli.format.sharded import ShardedSparqFile, is_sharded_output

    device = reader_device(device)
    if is_sharded_output(path):
        return ShardedSparqFile(path, device)  # type: ignore[return-value]
    if Path(path).is_dir():
        from sparqcli.format.folder import SparqFolder

        return SparqFolder(path, device)
    return SparqFile(path, device)


def _check_range(key: str, start: int, stop: int, rows: int) -> None:
    if not all(isinstance(end, int) and not isinstance(end, bool) for end in (start, stop)):
        raise TypeError(
            f"rows of '{key}' are read by integer start and stop, got {start!r}:{stop!r}"
        )
    if not (0 <= start <= stop <= rows):
        raise IndexError(f"rows {start}:{stop} of '{key}' are outside its {rows} rows")


def _read_rows(where: str, handle: Any, info: TableInfo, start: int, stop: int) -> torch.Tensor:
    """Returns rows start:stop of a table, decoding the codes of the block rows that hold them."""
    table = _read_table(where, handle, info, "cpu", codes=False)
    height = info.sparsity.block_shape[0] if info.mask == "block" else 1
    first, last = start // height * height, min(info.shape[0], -(-stop // height) * height)
    offsets = table.code_offsets()
    code_start, code_stop = int(offsets[first]), int(offsets[last])
    bits = info.quantization.bits
    byte_start, byte_stop = code_start * bits // 8, -(-code_stop * bits // 8)
    packed = handle.get_slice(info.tensor_keys["codes"])[byte_start:byte_stop]
    codes = unpack_code_range(
        packed, code_start * bits - byte_start * 8, code_stop - code_start, bits
    )
    mask = table.keep_mask
    if mask is not None:
        mask = mask[first // height : -(-last // height)]
    part = replace(
        table,
        shape=(last - first, info.shape[1]),
        codes=codes,
        scale=table.scale[first:last],
        zero_point=table.zero_point[first:last],
        keep_mask=mask,
    )
    return part.decode()[start - first : stop - first]


def read_table(path: str | Path, key: str, device: torch.device | str = "cpu") -> CompressedTable:
    """Returns compressed table `key` of a sparq file, validated and unpacked, on `device`.

    Raises InputError when `key` is not a compressed table of the file (naming close keys) or the
    file is unreadable, FormatError when the file or the table is inconsistent or corrupt.
    """
    with open_file(path, device) as file:
        return file.get_table(key)


def load(path: str | Path, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Returns the dense state dict of a sparq (or plain safetensors) file, or of a folder of
    sparq shards, keys sorted. A table's aliases are the same tensor object as the table.

    Tables come back with their original keys, shapes and dtypes: pruned values exactly 0.0,
    kept ones `(q - zero_point) * scale`; pass-through tensors as stored. Raises InputError when
    the file is missing or unreadable, FormatError when it is corrupt or inconsistent.
    """
    with open_file(path, device) as file:
        return file.state_dict()


def load_table(path: str | Path, key: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """Returns one tensor of the dense state dict of a sparq file, decoding only that table.

    Raises InputError when the file holds no such key (naming close keys) or is unreadable,
    FormatError when it is corrupt or inconsistent.
    """
    with open_file(path, device) as file:
        return file.get_tensor(key)
