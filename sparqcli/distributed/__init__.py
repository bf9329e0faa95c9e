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


def local_rank(environ: Mapping[str, str] = os.environ) -> int:
    """Returns this process's rank on its machine (LOCAL_RANK; 0 outside torchrun)."""
    try:
        return max(0, int(environ.get("LOCAL_RANK", "0")))
    except ValueError:
        return 0


def free_local_port() -> int:
    """Returns a TCP port of 127.0.0.1 that is free now (for a group on this machine)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def local_rank_environments(ranks: int, port: int) -> list[dict[str, str]]:
    """Returns, for each of `ranks` processes on this machine, the variables torchrun gives it
    (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR 127.0.0.1, MASTER_PORT `port`), so that processes
    started without torchrun join one group (the tests and benchmarks start ranks this way)."""
    return [
        {
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(ranks),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
        for rank in range(ranks)
    ]


def __getattr__(name: str) -> Any:
    if name == "compress_distributed":
        from sparqcli.distributed.runner import compress_distributed

        return compress_distributed
    raise AttributeError(name)


__all__ = ["compress_distributed", "world_size"]
