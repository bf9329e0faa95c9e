"""The one global step, over a table split into parts: the k-th smallest block score.

A table may be compressed in parts (contiguous ranges of whole block rows, one per process).
Everything but the pruning threshold is local to rows; the threshold is the k-th smallest block
score of the whole table. The radix select's histograms add up across parts, so each part builds
its local histograms and a `Reducer` sums them (an `all_reduce` under torch.distributed, nothing
in one process). Ties at the threshold are pruned in global block order: each part counts its
blocks that equal the threshold, the reducer gathers those counts in part order, and a part prunes
the ties left after the parts before it. So N parts prune exactly the blocks one process prunes.

The engine stays pure: a reducer is passed in; the torch.distributed one lives in
`sparqcli.distributed`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

import torch

from sparqcli.engine.blocks import fit_blocks
from sparqcli.engine.sparsify import _RADIX_BITS, _bin_holding, _bits


class Reducer(Protocol):
    """Combines what the parts of a table computed: the parts are numbered in row order."""

    part: int
    """This part's index (0-based, in row order)."""

    def sum_counts(self, counts: torch.Tensor) -> torch.Tensor:
        """Returns the element-wise sum of an int64 tensor over every part (same shape)."""
        ...

    def gather_count(self, count: int) -> list[int]:
        """Returns every part's `count`, in part order."""
        ...


class LocalReducer:
    """The reducer of a table in one part: nothing to combine."""

    part = 0

    def sum_counts(self, counts: torch.Tensor) -> torch.Tensor:
        """Returns `counts` unchanged."""
        return counts

    def gather_count(self, count: int) -> list[int]:
        """Returns `[count]`."""
        return [count]


@dataclass
class TablePart:
    """Rows `start:stop` of a table, compressed as one part of it (see `compress_rows`).

    `start` is a multiple of the block height and `stop` one too or the table's end, so no
    block is cut. `reducer` combines the global step with the other parts. After compression,
    `sums` holds the part's statistics sums (`PartSums`), for combining the table's statistics.
    """

    start: int
    stop: int
    reducer: Reducer
    sums: object | None = None


def shared_kth_smallest(
    chunks: Callable[[], Iterable[torch.Tensor]], k: int, reducer: Reducer
) -> tuple[float, int, int]:
    """Returns `(value, n_below, n_equal_here)`: the k-th smallest (1-based) of the non-negative
    float32 values of every part, how many of all parts' values are smaller, and how many of this
    part's values equal it.

    `chunks()` yields this part's values and is called twice (it may yield nothing). Two
    `sum_counts` calls per table: 2^15 then 2^16 int64 counts (768 KiB in all).
    Raises ValueError when k is not in 1..the number of values of every part.
    """
    high = torch.zeros(1 << (31 - _RADIX_BITS), dtype=torch.int64)
    for chunk in chunks():
        counts = torch.bincount(_bits(chunk) >> _RADIX_BITS, minlength=1 << (31 - _RADIX_BITS))
        high += counts.cpu()
    high = reducer.sum_counts(high)
    if not 1 <= k <= int(high.sum()):
        raise ValueError(f"k = {k} is not within the {int(high.sum())} values")
    high_bin, below = _bin_holding(high, k)
    low = torch.zeros(1 << _RADIX_BITS, dtype=torch.int64)
    for chunk in chunks():
        bits = _bits(chunk)
        in_bin = bits[(bits >> _RADIX_BITS) == high_bin] & ((1 << _RADIX_BITS) - 1)
        low += torch.bincount(in_bin, minlength=1 << _RADIX_BITS).cpu()
    local_low = low.clone()
    low = reducer.sum_counts(low)
    low_bin, below_in_bin = _bin_holding(low, k - below)
    value_bits = torch.tensor([(high_bin << _RADIX_BITS) | low_bin], dtype=torch.int32)
    value = float(value_bits.view(torch.float32).item())
    return value, below + below_in_bin, int(local_low[low_bin])


def ties_for_part(ties_to_prune: int, equal_here: int, reducer: Reducer) -> int:
    """Returns how many of this part's blocks that equal the threshold are pruned.

    `ties_to_prune` is the global count of tied blocks to prune (the lowest block indexes first),
    `equal_here` this part's tied blocks. One `gather_count` call.
    """
    counts = reducer.gather_count(equal_here)
    before = sum(counts[: reducer.part])
    return max(0, min(equal_here, ties_to_prune - before))


def part_ranges(
    shape: tuple[int, int], block_shape: tuple[int, int], parts: int
) -> list[tuple[int, int]]:
    """Returns `parts` row ranges that split a table of `shape` into whole block rows, in order.

    Block rows are shared out as evenly as they go (the first ranges get one more); a range may
    be empty when there are fewer block rows than parts.
    """
    rows = shape[0]
    bh = fit_blocks(shape, block_shape)[0]
    block_rows = -(-rows // bh)
    share, extra = divmod(block_rows, parts)
    ranges = []
    first = 0
    for index in range(parts):
        last = first + share + (1 if index < extra else 0)
        ranges.append((min(rows, first * bh), min(rows, last * bh)))
        first = last
    return ranges
