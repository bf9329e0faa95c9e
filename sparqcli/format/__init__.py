"""The compressed sparq file (format version 1). `docs/FORMAT.md` is the specification.

One `.safetensors` file. Pass-through tensors keep their key, dtype and bytes. A compressed table
`K` is stored as `K.codes` (kept codes, bit-packed), `K.scale` and `K.zero_point` (one per row)
and `K.mask` (bit-packed keep-mask; absent when nothing is pruned). The safetensors metadata
holds one entry, `"sparq"`, a JSON document with the format version and, per table, everything
needed to decode it.

* `spec`: the constants and the size rules (no torch);
* `packing`: codes and masks to and from bytes;
* `writer`: `write_compressed`, `save_safetensors`;
* `reader`: validation, `read_info`, `read_table`, `load`, `load_table`, and `SparqFile`, the
  handle `sparqcli.open` returns;
* `torch_ao`: the reference's own state dict, for the torch-ao output format;
* `folder`: `SparqFolder`, the sparq shards of a compressed model folder read as one.

The names below are importable from `sparqcli.format` directly (loaded on first use).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "FORMAT_VERSION": "spec",
    "METADATA_KEY": "spec",
    "table_file_bytes": "spec",
    "pack_codes": "packing",
    "unpack_codes": "packing",
    "pack_bits": "packing",
    "unpack_bits": "packing",
    "packed_size": "spec",
    "SourceInfo": "writer",
    "save_safetensors": "writer",
    "write_compressed": "writer",
    "TableInfo": "reader",
    "CompressedFileInfo": "reader",
    "SparqFile": "reader",
    "read_info": "reader",
    "read_table": "reader",
    "load": "reader",
    "load_table": "reader",
    "torch_ao_state_dict": "torch_ao",
    "SparqFolder": "folder",
    "CompressedFolderInfo": "folder",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"sparqcli.format.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'sparqcli.format' has no attribute {name!r}")
