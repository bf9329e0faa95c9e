"""Block scores, the radix select and the keep-mask rules."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from sparqcli.engine.sparsify import (
    BlockPruner,
    block_grid,
    block_scores,
    blocks_to_prune,
    kth_smallest,
    kth_smallest_sorted,
    kth_smallest_topk,
    sparsify,
)
from sparqcli.settings import Sparsity

shapes = st.tuples(st.integers(1, 40), st.integers(1, 40))
block_shapes = st.tuples(st.integers(1, 5), st.integers(1, 5))


@settings(max_examples=60, deadline=None)
@given(shape=shapes, block_shape=block_shapes, seed=st.integers(0, 2**16))
def test_block_scores_equal_avg_pool2d_bit_for_bit(shape, block_shape, seed):
    norms = torch.rand(shape, generator=torch.Generator().manual_seed(seed))
    expected = F.avg_pool2d(norms[None, None], block_shape, block_shape, ceil_mode=True)[0, 0]
    assert torch.equal(block_scores(norms, block_shape), expected)


@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(st.floats(0, 2.0**100, width=32), min_size=1, max_size=300),
    data=st.data(),
    pieces=st.integers(1, 4),
)
def test_kth_smallest_agrees_with_sorting(values, data, pieces):
    tensor = torch.tensor(values, dtype=torch.float32)
    k = data.draw(st.integers(1, len(values)))
    value, below = kth_smallest(lambda: tensor.tensor_split(pieces), k)
    ordered = torch.sort(tensor).values
    assert value == ordered[k - 1].item()
    assert below == int((tensor < value).sum())
    # The ways a CUDA device may select among scores held in one tensor agree.
    assert kth_smallest_sorted(tensor, k) == (value, below)
    assert kth_smallest_topk(tensor, k) == (value, below)


@settings(max_examples=60, deadline=None)
@given(
    shape=shapes,
    block_shape=block_shapes,
    level=st.floats(0, 1),
    norm=st.sampled_from(["L1", "L2"]),
    seed=st.integers(0, 2**16),
)
def test_exactly_round_level_times_blocks_are_pruned(shape, block_shape, level, norm, seed):
    table = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    keep = sparsify(table, Sparsity(level, block_shape, None, norm))
    n_block_rows, n_block_cols = block_grid(shape, block_shape)
    padded = F.pad(
        keep.float(),
        (0, n_block_cols * block_shape[1] - shape[1], 0, n_block_rows * block_shape[0] - shape[0]),
        value=0.0,
    )
    kept_blocks = F.max_pool2d(padded[None, None], block_shape)[0, 0]
    assert int((kept_blocks == 0).sum()) == blocks_to_prune(level, n_block_rows * n_block_cols)


@settings(max_examples=40, deadline=None)
@given(shape=shapes, block_shape=block_shapes, zeros=st.integers(0, 25), seed=st.integers(0, 2**16))
def test_partial_zeroing_drops_the_smallest_values_of_pruned_blocks(
    shape, block_shape, zeros, seed
):
    zeros = min(zeros, block_shape[0] * block_shape[1])
    table = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    keep = sparsify(table, Sparsity(1.0, block_shape, zeros))
    # Level 1 prunes every block: each block keeps all but its `zeros` smallest |values|.
    for block_row in range(0, shape[0], block_shape[0]):
        for block_col in range(0, shape[1], block_shape[1]):
            block = table[
                block_row : block_row + block_shape[0], block_col : block_col + block_shape[1]
            ].abs()
            kept = keep[
                block_row : block_row + block_shape[0], block_col : block_col + block_shape[1]
            ]
            dropped = min(zeros, block.numel())
            assert int((~kept).sum()) == dropped
            if 0 < dropped < block.numel():
                assert block[~kept].max() <= block[kept].min()


def test_block_pruner_splits_ties_across_chunks_in_block_order():
    scores = torch.tensor([[1.0, 0.5, 0.5], [0.5, 0.5, 2.0]])
    pruner = BlockPruner.for_scores(lambda: [scores[:1], scores[1:]], 6, 0.5)
    first, second = pruner.prune(scores[:1]), pruner.prune(scores[1:])
    assert first.tolist() == [[False, True, True]]
    assert second.tolist() == [[True, False, False]]


def test_level_zero_and_one():
    table = torch.randn(7, 9)
    assert sparsify(table, Sparsity(0.0, (2, 2))).all()
    assert not sparsify(table, Sparsity(1.0, (2, 2))).any()
