"""The kernel's AVX2 bag path for 8-bit (1, 4)-block tables of whole blocks, and its edges.

That path (`bag_chunk_b8w4` in _csrc.py) serves float32 tables with float32 scales, 8 bits, a
(1, 4) block mask, columns a multiple of 4 up to 224, sum and mean. Rows near the end of the mask
take a bounds-checked branch, the others unchecked 64-bit reads; tables just outside the
conditions (a partial last block, 228 columns, float16 scales, (2, 4) blocks, other widths) take
the generic path. Every case must equal F.embedding_bag over the decoded table: bit for bit for
unweighted sums, within float32 rounding for mean and weighted sums.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from sparqcli.engine.table import CompressedTable
from sparqcli.errors import TableError
from sparqcli.nn import EmbeddingBag
from tests.nn.conftest import make_table

SETTINGS = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
# Columns the fast path takes (multiples of 4, at most 56 blocks) and neighbours it does not.
FAST_COLS = [4, 8, 12, 32, 128, 132, 224]
OTHER_COLS = [1, 3, 130, 228]


def _table(**spec: object) -> CompressedTable:
    try:
        return make_table(**spec)  # type: ignore[arg-type]
    except TableError:
        assume(False)
        raise


def _check(module: EmbeddingBag, table: CompressedTable, **call: object) -> None:
    """Compares one call of `module` with F.embedding_bag over the decoded table."""
    weights = call.get("per_sample_weights")
    got = module(call["input"], call.get("offsets"), per_sample_weights=weights)
    want = F.embedding_bag(
        call["input"],  # type: ignore[arg-type]
        table.decode(),
        call.get("offsets"),  # type: ignore[arg-type]
        mode=module.mode,
        per_sample_weights=weights,  # type: ignore[arg-type]
        include_last_offset=module.include_last_offset
        if call.get("offsets") is not None
        else False,
        padding_idx=module.padding_idx,
    )
    assert got.shape == want.shape
    if module.mode == "sum" and weights is None:
        assert torch.equal(got, want)
    else:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@SETTINGS
@given(
    rows=st.sampled_from([1, 2, 7, 64, 300, 1000, 1000]),
    cols=st.sampled_from(FAST_COLS * 2 + OTHER_COLS),
    level=st.sampled_from([0.0, 0.3, 0.8, 0.95, 1.0]),
    block_shape=st.sampled_from([(1, 4), (1, 4), (1, 4), (2, 4)]),
    scale_dtype=st.sampled_from(["float32", "float32", "float16"]),
    seed=st.integers(0, 3),
    data=st.data(),
)
def test_fast_path_matches_embedding_bag(
    backend: str,
    rows: int,
    cols: int,
    level: float,
    block_shape: tuple[int, int],
    scale_dtype: str,
    seed: int,
    data: st.DataObject,
) -> None:
    table = _table(
        rows=rows,
        cols=cols,
        level=level,
        block_shape=block_shape,
        bits=8,
        scale_dtype=scale_dtype,
        seed=seed,
    )
    mode = data.draw(st.sampled_from(["sum", "sum", "mean"]))
    weighted = mode == "sum" and data.draw(st.booleans())
    padding = data.draw(st.sampled_from([None, None, 0, rows - 1]))
    include_last = data.draw(st.booleans())
    index_dtype = data.draw(st.sampled_from([torch.int32, torch.int64]))
    n = data.draw(st.integers(0, 200))
    generator = torch.Generator().manual_seed(seed)
    indices = torch.randint(0, rows, (n,), generator=generator)
    if n >= 4:  # the first and last rows (the checked branch) and a repeat, in every run
        indices[:4] = torch.tensor([rows - 1, 0, rows - 1, rows // 2])
    indices = indices.to(index_dtype)
    cuts = sorted(data.draw(st.lists(st.integers(0, n), max_size=12)))
    starts = [0, *cuts, *([n] if include_last else [])]
    offsets = torch.tensor(starts, dtype=index_dtype)
    weights = torch.rand(n, generator=generator) * 2 - 0.5 if weighted else None
    module = EmbeddingBag.from_table(
        table, mode=mode, padding_idx=padding, include_last_offset=include_last
    )
    _check(module, table, input=indices, offsets=offsets, per_sample_weights=weights)


@pytest.mark.parametrize("cols", [128, 224, 12, 8, 4])
@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_many_bags_every_row(backend: str, cols: int, mode: str) -> None:
    """Many bags over parallel chunks (the prefetch ring restarts per chunk), every row used,
    empty bags and a bag of padding only."""
    rows = 2000
    table = make_table(rows, cols, level=0.8, bits=8)
    module = EmbeddingBag.from_table(table, mode=mode, padding_idx=5)
    indices = torch.cat(
        [torch.arange(rows), torch.randint(0, rows, (4096 * 20,)), torch.tensor([5, 5])]
    )
    offsets = torch.cat(
        [
            torch.arange(0, rows, 7),
            torch.arange(rows, rows + 4096 * 20, 20),
            torch.tensor([rows + 4096 * 20] * 3),
        ]
    )
    _check(module, table, input=indices, offsets=offsets)


def test_two_d_input_and_weights(backend: str) -> None:
    table = make_table(500, 64, level=0.5, bits=8)
    module = EmbeddingBag.from_table(table, mode="sum")
    indices = torch.randint(0, 500, (300, 9))
    _check(module, table, input=indices)
    weights = torch.rand(300, 9) - 0.25
    _check(module, table, input=indices, per_sample_weights=weights)


def test_out_of_range_index_raises(backend: str) -> None:
    table = make_table(300, 128, level=0.8, bits=8)
    module = EmbeddingBag.from_table(table, mode="sum")
    with pytest.raises(IndexError, match="index 300 at position 2"):
        module(torch.tensor([0, 1, 300, 2]), torch.tensor([0, 2]))
