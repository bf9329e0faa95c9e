"""Writing sparq files: `write_compressed` (and the safetensors serializer under it)."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors
import torch
from safetensors import SafetensorError

import sparqcli
from sparqcli.dtypes import TABLE_DTYPES, dtype_name, torch_dtype
from sparqcli.engine.blocks import block_grid
from sparqcli.engine.stats import TableStats
from sparqcli.engine.table import CompressedTable
from sparqcli.errors import OutputError
from sparqcli.format.packing import pack_bits, pack_codes
from sparqcli.format.spec import ALIASES_VERSION, METADATA_KEY, key_collision, mask_kind


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
                dtype=dtype_name(tensor.dtype),
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


def _write_reason(error: BaseException) -> str:
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    io_error = re.search(r"I/O error: (.*?) \(os error \d+\)", text)
    if io_error:
        return io_error.group(1)
    return text.removeprefix("Error while serializing: ")


def _table_metadata(
    table: CompressedTable, stats: TableStats | None, aliases: Sequence[str]
) -> dict[str, Any]:
    entry = {
        "shape": [table.rows, table.cols],
        "dtype": dtype_name(table.dtype),
        "bits": table.quantization.bits,
        "order": table.order,
        "sparsity": table.sparsity.to_dict(),
        "quantization": table.quantization.to_dict(),
        "mask": mask_kind(table),
        "kept": int(table.codes.numel()),
        "stats": None if stats is None else stats.to_dict(),
    }
    if aliases:
        entry["aliases"] = list(aliases)
    return entry


def _table_tensors(path: str, key: str, table: CompressedTable) -> dict[str, torch.Tensor]:
    """Returns the stored tensors of one table. Raises OutputError when it is inconsistent."""
    if dtype_name(table.dtype) not in TABLE_DTYPES:
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
    scale_dtype = torch_dtype(table.quantization.scale_dtype)
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
        if scale_dtype != torch.float32 and not torch.equal(parts[name].float(), original.float()):
            raise OutputError(
                f"{path}: table '{key}': scale_dtype is {table.quantization.scale_dtype} but its "
                f"{name} values are not {table.quantization.scale_dtype} values"
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
    aliases: Mapping[str, Sequence[str]] | None = None,
) -> None:
    """Writes a sparq file to exactly `path`; returns None.

    `passthrough` tensors are stored unchanged; each table `K` becomes `K.codes`, `K.scale`,
    `K.zero_point` and `K.mask`; `stats` (per table key), `aliases` (per table key: the other
    keys that decode to the same tensor), `source` and `extra` (JSON-able) go into the metadata.
    The file is format version 1 without aliases, 2 with. The caller makes the write atomic.
    Raises OutputError when a key collides with a table's reserved names (`K` and `K.*`) or
    another key, when `extra` is not JSON-able, when a tensor cannot be stored, or when the
    write fails.
    """
    where = str(path)
    aliases = {key: list(names) for key, names in (aliases or {}).items() if names}
    alias_names = [name for names in aliases.values() for name in names]
    for key in aliases:
        if key not in tables:
            raise OutputError(f"{where}: cannot write: aliases of '{key}', which is not a table")
    seen = set(passthrough)
    for name in alias_names:
        if name in seen or name in tables:
            raise OutputError(f"{where}: cannot write: alias '{name}' is also another key")
        seen.add(name)
    collision = key_collision([*passthrough, *alias_names], tables)
    if collision is not None:
        raise OutputError(f"{where}: cannot write: {collision}", path=where)
    stored: dict[str, torch.Tensor] = dict(passthrough)
    table_meta: dict[str, Any] = {}
    for key, table in tables.items():
        stored.update(_table_tensors(where, key, table))
        table_meta[key] = _table_metadata(table, (stats or {}).get(key), aliases.get(key, ()))
    document = {
        "format_version": ALIASES_VERSION if alias_names else 1,
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
