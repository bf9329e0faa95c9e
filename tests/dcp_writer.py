"""Writes DCP test checkpoints with `torch.distributed.checkpoint.save` in this one process.

Not a test module. Sharded tables are `ShardedTensor`s whose shards all live on rank 0 of a
one-process gloo group, so any chunk layout (row-wise, column-wise, a grid) is written exactly as
DCP writes it for a job with one rank per shard.
"""

from __future__ import annotations

import itertools
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

Cut = tuple[int, int, int, int]
"""A chunk: rows r0:r1, columns c0:c1."""


def row_cuts(rows: int, cols: int, edges: Sequence[int]) -> list[Cut]:
    """Returns row-wise chunks split at `edges` (row indices), full width."""
    bounds = [0, *edges, rows]
    return [(a, b, 0, cols) for a, b in itertools.pairwise(bounds) if b > a]


def save_dcp(
    folder: Path,
    state: Mapping[str, Any],
    layouts: Mapping[str, Sequence[Cut]] | None = None,
    file_per_item: bool = False,
) -> Path:
    """Saves `state` as a DCP folder; tensors named in `layouts` as chunks cut that way."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed._shard.metadata import ShardMetadata
    from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor

    layouts = layouts or {}
    store = tempfile.mktemp(prefix="sparq-dcp-store-")
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    try:
        saved: dict[str, Any] = {}
        for key, value in state.items():
            if key not in layouts:
                saved[key] = value
                continue
            shards = [
                Shard(
                    value[r0:r1, c0:c1].clone(),
                    ShardMetadata([r0, c0], [r1 - r0, c1 - c0], "rank:0/cpu"),
                )
                for r0, r1, c0, c1 in layouts[key]
            ]
            saved[key] = ShardedTensor._init_from_local_shards(shards, list(value.shape))
        writer = dcp.FileSystemWriter(str(folder), single_file_per_rank=not file_per_item)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.save(saved, storage_writer=writer)
    finally:
        dist.destroy_process_group()
    return folder
