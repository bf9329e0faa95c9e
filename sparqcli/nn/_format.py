"""The one place where sparqcli.nn reaches into the file format and the engine.

Everything `sparqcli.nn` needs from `sparqcli.format` and `sparqcli.engine` is imported here, so a
reorganisation of those modules is followed by changing this file only.
"""

from __future__ import annotations

from sparqcli.engine.table import CompressedTable
from sparqcli.format import TableInfo, pack_bits, pack_codes, read_info
from sparqcli.format.folder import CompressedFolderInfo
from sparqcli.format.reader import load_table
from sparqcli.format.sharded import is_sharded_output
from sparqcli.format.spec import MASK_KINDS, check_bits, part_sizes
from sparqcli.settings import ORDERS
from sparqcli.sources.folder import find_layout

__all__ = [
    "MASK_KINDS",
    "ORDERS",
    "CompressedFolderInfo",
    "CompressedTable",
    "TableInfo",
    "check_bits",
    "find_layout",
    "is_sharded_output",
    "load_table",
    "pack_bits",
    "pack_codes",
    "part_sizes",
    "read_info",
]
