"""Block-norm sparsification with `DataNormSparsifier` semantics, as plain tensor ops.

The table is cut into blocks of `block_shape` starting at index 0 (edge blocks are partial). A
block's score is the mean of its values' norms (|x| for L1, x*x for L2) over its valid values,
summed in the same order as `avg_pool2d(ceil_mode=True)`, so scores are bit-identical to the
reference's. The `round(level * n_blocks)` lowest-scoring blocks of the whole table are pruned
(`scope: table`), or the `round(level * n_block_cols)` lowest of each block row (`scope: row`).

Ties: blocks with equal scores are pruned in row-major block order (lower block index first);
inside a pruned block, values with equal norms are zeroed in row-major order. The reference
breaks ties with an unstable sort; on untied data both agree exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from sparqcli.engine.blocks import block_grid, fit_blocks
from sparqcli.settings import Norm, Sparsity

if TYPE_CHECKING:
    from sparqcli.engine.reduce import Reducer

# Non-negative float32 values order like their int32 bit patterns; the k-th smallest score is
# found with two 16-bit histogram passes (radix select) instead of a sort: linear time, and the
# temporaries are bounded by the size of one chunk of scores.
_RADIX_BITS = 16


def value_norms(values: torch.Tensor, norm: Norm, out: torch.Tensor | None = None) -> torch.Tensor:
    """Returns the per-value norms (|x| for L1, x*x for L2) of a float32 tensor.

    Written into `out` (float32, the shape of `values`; may be `values` itself) when given.
    """
    return torch.abs(values, out=out) if norm == "L1" else torch.mul(values, values, out=out)


def _pad_to_blocks(values: torch.Tensor, block_shape: tuple[int, int], fill: float) -> torch.Tensor:
    rows, cols = values.shape
    bh, bw = fit_blocks((rows, cols), block_shape)
    pad_rows, pad_cols = (-rows) % bh, (-cols) % bw
    if pad_rows == 0 and pad_cols == 0:
        return values
    return F.pad(values, (0, pad_cols, 0, pad_rows), value=fill)


def block_scores(
    norms: torch.Tensor, block_shape: tuple[int, int], out: torch.Tensor | None = None
) -> torch.Tensor:
    """Returns the mean norm of each block, shape `block_grid(norms.shape, block_shape)`.

    Bit-identical to `F.avg_pool2d(norms, block_shape, block_shape, ceil_mode=True)`: values are
    summed in row-major order inside the block, then divided by the count of valid values.
    Written into `out` (float32, that shape) when given.
    """
    rows, cols = norms.shape
    bh, bw = fit_blocks((rows, cols), block_shape)
    n_block_rows, n_block_cols = block_grid((rows, cols), block_shape)
    if norms.numel() == 0:
        zeros = norms.new_zeros((n_block_rows, n_block_cols))
        return zeros if out is None else out.copy_(zeros)
    padded = _pad_to_blocks(norms, block_shape, 0.0)
    blocks = padded.view(n_block_rows, bh, n_block_cols, bw)
    first = blocks[:, 0, :, 0]
    total = first.clone() if out is None else out.copy_(first)
    for i in range(bh):
        for j in range(bw):
            if i or j:
                total += blocks[:, i, :, j]
    if rows % bh == 0 and cols % bw == 0:
        # A tensor divisor: CUDA multiplies by a Python number's reciprocal (not bit-exact).
        return total.div_(total.new_tensor(float(bh * bw)))
    row_counts = torch.full((n_block_rows, 1), float(bh), device=norms.device)
    row_counts[-1] = rows - (n_block_rows - 1) * bh
    col_counts = torch.full((1, n_block_cols), float(bw), device=norms.device)
    col_counts[0, -1] = cols - (n_block_cols - 1) * bw
    return total.div_(row_counts * col_counts)


def blocks_to_prune(level: float, n_blocks: int) -> int:
    """Returns how many blocks `level` prunes: `round(level * n_blocks)`, as the reference does."""
    return round(level * n_blocks)


ChunkMap = Callable[[Callable[[torch.Tensor], torch.Tensor]], Iterable[torch.Tensor]]
"""`map_chunks(fn)` yields `fn(chunk)` for every chunk of values (computed in any thread)."""


def kth_smallest(
    chunks: Callable[[], Iterable[torch.Tensor]], k: int, map_chunks: ChunkMap | None = None
) -> tuple[float, int]:
    """Returns `(value, n_below)` for the k-th smallest (1-based) of non-negative float32 values.

    `chunks()` yields the values in pieces and is called twice; or, when given, `map_chunks`
    is called twice instead (the histograms are integer counts: any order sums the same).
    `n_below` counts values strictly smaller than the returned one. Requires 1 <= k <= the
    number of values.
    """
    if map_chunks is None:

        def map_chunks(fn: Callable[[torch.Tensor], torch.Tensor]) -> Iterable[torch.Tensor]:
            return (fn(chunk) for chunk in chunks())

    def high_counts(chunk: torch.Tensor) -> torch.Tensor:
        return torch.bincount(_bits(chunk) >> _RADIX_BITS, minlength=1 << (31 - _RADIX_BITS))

    high = None
    for counts in map_chunks(high_counts):
        high = counts if high is None else high + counts
    if high is None:
        raise ValueError("kth_smallest needs at least one value")
    high_bin, below = _bin_holding(high, k)

    def low_counts(chunk: torch.Tensor) -> torch.Tensor:
        bits = _bits(chunk)
        in_bin = bits[(bits >> _RADIX_BITS) == high_bin] & ((1 << _RADIX_BITS) - 1)
        return torch.bincount(in_bin, minlength=1 << _RADIX_BITS)

    low = None
    for counts in map_chunks(low_counts):
        low = counts if low is None else low + counts
    low_bin, below_in_bin = _bin_holding(low, k - below)
    value_bits = torch.tensor([(high_bin << _RADIX_BITS) | low_bin], dtype=torch.int32)
    return float(value_bits.view(torch.float32).item()), below + below_in_bin


def kth_smallest_sorted(values: torch.Tensor, k: int) -> tuple[float, int]:
    """Returns what `kth_smallest` returns, for values held in one tensor, by sorting them."""
    flat = values.reshape(-1)
    value = torch.sort(flat).values[k - 1]
    return float(value.item()), int((flat < value).sum().item())


def kth_smallest_topk(values: torch.Tensor, k: int) -> tuple[float, int]:
    """Returns what `kth_smallest` returns, for values held in one tensor, with torch.topk.

    The k-th smallest is the largest of the k smallest, or the smallest of the n - k + 1
    largest: whichever asks topk for fewer values.
    """
    flat = values.reshape(-1)
    n = flat.numel()
    if k <= n - k + 1:
        value = torch.topk(flat, k, largest=False, sorted=False).values.max()
    else:
        value = torch.topk(flat, n - k + 1, largest=True, sorted=False).values.min()
    return float(value.item()), int((flat < value).sum().item())


def _bits(values: torch.Tensor) -> torch.Tensor:
    flat = values.reshape(-1)
    return flat.view(torch.int32)


def _bin_holding(counts: torch.Tensor, k: int) -> tuple[int, int]:
    """Returns the histogram bin that holds the k-th value and the count of values below it."""
    cumulative = torch.cumsum(counts.cpu(), 0)
    index = int(torch.searchsorted(cumulative, torch.tensor([k], dtype=cumulative.dtype)).item())
    below = int(cumulative[index - 1].item()) if index > 0 else 0
    return index, below


class BlockPruner:
    """Decides, chunk by chunk in row-major block order, which blocks are pruned.

    Built from the global threshold: every block scoring below it is pruned, and of those scoring
    exactly it, the first `ties_to_prune` in block order.
    """

    def __init__(self, threshold: float | None, ties_to_prune: int) -> None:
        self.threshold = threshold
        self.ties_left = ties_to_prune

    @classmethod
    def for_scores(
        cls,
        chunks: Callable[[], Iterable[torch.Tensor]],
        n_blocks: int,
        level: float,
        all_scores: torch.Tensor | None = None,
        cuda_selection: str = "topk",
        reducer: Reducer | None = None,
        map_chunks: ChunkMap | None = None,
    ) -> BlockPruner:
        """Returns the pruner for `level` over the scores that `chunks()` yields (in block order).

        `all_scores`, when the caller holds every score in one tensor, lets a CUDA device select
        by `cuda_selection` (`topk`, `sort`; `radix` selects as on CPU). With a `reducer`, the
        scores are one part of a table of `n_blocks` blocks (see `engine/reduce.py`): the
        threshold and the ties pruned are those of the whole table. `map_chunks` (the chunk
        workers) is passed on to `kth_smallest`.
        """
        k = blocks_to_prune(level, n_blocks)
        if k == 0:
            return cls(None, 0)
        if reducer is not None:
            from sparqcli.engine.reduce import shared_kth_smallest, ties_for_part

            value, below, equal_here = shared_kth_smallest(chunks, k, reducer)
            return cls(value, ties_for_part(k - below, equal_here, reducer))
        if all_scores is not None and all_scores.is_cuda and cuda_selection == "sort":
            value, below = kth_smallest_sorted(all_scores, k)
        elif all_scores is not None and all_scores.is_cuda and cuda_selection == "topk":
            value, below = kth_smallest_topk(all_scores, k)
        else:
            value, below = kth_smallest(chunks, k, map_chunks)
        return cls(value, k - below)

    def prune(self, scores: torch.Tensor) -> torch.Tensor:
        """Returns the bool pruned-block mask for the next chunk of scores (in block order)."""
        if self.threshold is None:
            return torch.zeros_like(scores, dtype=torch.bool)
        pruned = scores < self.threshold
        if self.ties_left > 0:
            ties = scores == self.threshold
            n_ties = int(ties.sum().item())
            if n_ties <= self.ties_left:
                pruned |= ties
                self.ties_left -= n_ties
            else:
                order = torch.cumsum(ties.reshape(-1), 0, dtype=torch.int64).view(ties.shape)
                pruned |= ties & (order <= self.ties_left)
                self.ties_left = 0
        return pruned


class RowBlockPruner:
    """Prunes, in every block row, its `per_row` lowest-scoring blocks (`scope: row`).

    Ties break by position: among equal scores the lower block column is pruned first. Every
    block row loses exactly `per_row` blocks, so none is emptied unless `per_row` is the
    number of block columns.
    """

    def __init__(self, per_row: int) -> None:
        self.per_row = per_row

    @classmethod
    def for_level(cls, level: float, n_block_cols: int) -> RowBlockPruner:
        """Returns the pruner for `level`: `round(level * n_block_cols)` blocks per block row."""
        return cls(blocks_to_prune(level, n_block_cols))

    def prune(self, scores: torch.Tensor) -> torch.Tensor:
        """Returns the bool pruned-block mask of a chunk of whole block rows of scores."""
        pruned = torch.zeros_like(scores, dtype=torch.bool)
        if self.per_row <= 0 or scores.numel() == 0:
            return pruned
        if self.per_row >= scores.shape[1]:
            return pruned.fill_(True)
        lowest = torch.sort(scores, dim=1, stable=True).indices[:, : self.per_row]
        return pruned.scatter_(1, lowest, True)


def expand_blocks(
    block_mask: torch.Tensor, block_shape: tuple[int, int], shape: tuple[int, int]
) -> torch.Tensor:
    """Returns a per-value mask of `shape` where each value takes its block's entry."""
    n_block_rows, n_block_cols = block_mask.shape
    bh, bw = fit_blocks(shape, block_shape)
    expanded = block_mask[:, None, :, None].expand(n_block_rows, bh, n_block_cols, bw)
    return expanded.reshape(n_block_rows * bh, n_block_cols * bw)[: shape[0], : shape[1]]


def keep_in_pruned_blocks(
    norms: torch.Tensor, pruned_blocks: torch.Tensor, settings: Sparsity
) -> torch.Tensor:
    """Returns the per-value keep-mask of a row chunk (its value norms) given its pruned blocks.

    In a pruned block the `zeros_per_block` smallest-norm values are dropped (all of them by
    default); every value of an unpruned block is kept.
    """
    shape = (norms.shape[0], norms.shape[1])
    pruned = expand_blocks(pruned_blocks, settings.block_shape, shape)
    if settings.prunes_whole_blocks:
        return ~pruned
    zeros = settings.effective_zeros_per_block
    if zeros == 0:
        return torch.ones_like(pruned)
    bh, bw = fit_blocks(shape, settings.block_shape)
    n_block_rows, n_block_cols = pruned_blocks.shape
    # Padding sorts last (NaN), as in the reference: it is dropped only after every real value.
    padded = _pad_to_blocks(norms, settings.block_shape, float("nan"))
    per_block = (
        padded.view(n_block_rows, bh, n_block_cols, bw)
        .permute(0, 2, 1, 3)
        .reshape(n_block_rows, n_block_cols, bh * bw)
    )
    order = torch.sort(per_block, dim=-1, stable=True).indices[..., :zeros]
    keep_in_block = torch.ones_like(per_block, dtype=torch.bool)
    keep_in_block.scatter_(-1, order, False)
    keep_padded = (
        keep_in_block.view(n_block_rows, n_block_cols, bh, bw)
        .permute(0, 2, 1, 3)
        .reshape(n_block_rows * bh, n_block_cols * bw)
    )
    return keep_padded[: shape[0], : shape[1]] | ~pruned


# Block widths whose flags can be spread over their values with one integer multiplication.
_REPEAT_BYTES = {
    1: (torch.uint8, 1),
    2: (torch.int16, 0x0101),
    4: (torch.int32, 0x01010101),
    8: (torch.int64, 0x0101010101010101),
}


class ChunkKeep:
    """Which values of a row chunk are kept, given the chunk's pruned blocks.

    Where whole blocks are pruned and the blocks tile the chunk exactly, works on the block mask
    and never builds a mask per value; otherwise builds that mask once.
    """

    def __init__(
        self, norms: torch.Tensor, pruned_blocks: torch.Tensor, settings: Sparsity
    ) -> None:
        rows, cols = norms.shape
        self.shape = (rows, cols)
        self.block_shape = fit_blocks(self.shape, settings.block_shape)
        bh, bw = self.block_shape
        self.keep_blocks: torch.Tensor | None = None
        self._dense: torch.Tensor | None = None
        self._dense_float: torch.Tensor | None = None
        if settings.prunes_whole_blocks and rows % bh == 0 and cols % bw == 0:
            self.keep_blocks = torch.logical_not(pruned_blocks)
        else:
            self._dense = keep_in_pruned_blocks(norms, pruned_blocks, settings)

    @staticmethod
    def count_per_row(
        keep_blocks: torch.Tensor, block_shape: tuple[int, int], shape: tuple[int, int]
    ) -> torch.Tensor:
        """Returns the number of kept values in each row of a chunk of `shape` (int64).

        `keep_blocks` is the chunk's bool keep-mask per block, `block_shape` cut to the chunk.
        """
        rows, cols = shape
        bh, bw = block_shape
        widths = torch.full(
            (keep_blocks.shape[1],), bw, dtype=torch.int64, device=keep_blocks.device
        )
        widths[-1] = cols - (keep_blocks.shape[1] - 1) * bw
        per_block_row = (keep_blocks * widths).sum(1)
        return per_block_row.repeat_interleave(bh)[:rows]

    def dense(self) -> torch.Tensor:
        """Returns the per-value bool keep-mask of the chunk."""
        if self._dense is None:
            self._dense = expand_blocks(self.keep_blocks, self.block_shape, self.shape)
        return self._dense

    def multiply(self, values: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Returns `values * keep` (pruned values become signed zeros, as in the reference).

        Written into `out` (float32, the chunk's shape; may be `values` itself).
        """
        if self._dense_float is None:
            self._dense_float = self._value_mask().to(values.dtype)
        return torch.mul(values, self._dense_float, out=out)

    def _value_mask(self) -> torch.Tensor:
        """Returns the per-value keep-mask as bool or as uint8 0/1 (whichever is cheaper)."""
        bh, bw = self.block_shape
        if self.keep_blocks is None or bw not in _REPEAT_BYTES:
            return self.dense()
        # A multiplication broadcasting a block's flag over bw values runs ~6x slower than a
        # plain one; instead each flag becomes bw bytes of one word: flag * 0x0101...01.
        word_dtype, repeat = _REPEAT_BYTES[bw]
        rows, cols = self.shape
        per_value = (self.keep_blocks.to(word_dtype) * repeat).view(torch.uint8)
        if bh > 1:
            n_block_rows = self.keep_blocks.shape[0]
            per_value = per_value[:, None, :].expand(n_block_rows, bh, cols).reshape(rows, cols)
        return per_value

    def select(self, values: torch.Tensor) -> torch.Tensor:
        """Returns the kept entries of a tensor of the chunk's shape, in row-major order (1-D)."""
        if self.keep_blocks is None:
            return values[self.dense()]
        n_block_rows, n_block_cols = self.keep_blocks.shape
        bh, bw = self.block_shape
        segments = self.keep_blocks[:, None, :].expand(n_block_rows, bh, n_block_cols)
        return values.reshape(-1, bw)[segments.reshape(-1)].reshape(-1)


def sparsify(values: torch.Tensor, settings: Sparsity) -> torch.Tensor:
    """Returns the bool keep-mask `DataNormSparsifier` gives a 2-D float table (in memory).

    The whole-table convenience form of what the pipeline does chunk by chunk; the table is read
    as float32. Raises nothing beyond what `validate_table` raises in the pipeline.
    """
    norms = value_norms(values.float(), settings.norm)
    scores = block_scores(norms, settings.block_shape)
    if settings.scope == "row":
        pruner: BlockPruner | RowBlockPruner = RowBlockPruner.for_level(
            settings.level, scores.shape[1]
        )
    else:
        pruner = BlockPruner.for_scores(lambda: [scores], scores.numel(), settings.level)
    return keep_in_pruned_blocks(norms, pruner.prune(scores), settings)
