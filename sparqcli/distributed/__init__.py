"""Scale-out on torch.distributed: `torchrun ... -m sparqcli compress` runs one compression
across processes and hosts.

The only global step of compression is the pruning threshold of each table; the engine takes a
reducer for it (`engine/reduce.py`), and `ProcessGroup` (`group.py`) is the torch.distributed
one. `runner.py` splits each table's block rows over the ranks, compresses, writes one shard per
rank and the index, all or nothing. Importing this package does not import torch.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sparqcli.distributed.runner import compress_distributed


def world_size(environ: Mapping[str, str] = os.environ) -> int:
    """Returns the number of ranks torchrun started (WORLD_SIZE; 1 outside torchrun)."""
    try:
        return max(1, int(environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def __getattr__(name: str) -> Any:
    if name == "compress_distributed":
        from sparqcli.distributed.runner import compress_distributed

        return compress_distributed
    raise AttributeError(name)


__all__ = ["compress_distributed", "world_size"]
