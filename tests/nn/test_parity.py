"""Lookups equal F.embedding / F.embedding_bag over the decoded table, with both backends."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from sparqcli.engine.table import CompressedTable
from sparqcli.errors import TableError
from sparqcli.nn import Embedding, EmbeddingBag
from sparqcli.settings import BITS
from tests.nn.conftest import make_table, write_tables

SETTINGS = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@st.composite
def tables(draw: st.DrawFn, dtypes: tuple[torch.dtype, ...] = (torch.float32,)) -> dict:
    rows = draw(st.integers(1, 40))
    cols = draw(st.sampled_from([1, 2, 3, 5, 7, 8, 13, 16, 33, 70]))
    bh = draw(st.integers(1, 3))
    bw = draw(st.sampled_from([1, 2, 3, 4, 5, 8]))
    zeros = draw(st.sampled_from([None, None, 1, bh * bw]))
    if zeros is not None:
        zeros = min(zeros, bh * bw)
    return {
        "rows": rows,
        "cols": cols,
        "level": draw(st.sampled_from([0.0, 0.3, 0.8, 1.0])),
        "block_shape": (bh, bw),
        "zeros_per_block": zeros,
        "bits": draw(st.sampled_from(BITS)),
        "scale_dtype": draw(st.sampled_from(["float32", "float16"])),
        "order": draw(st.sampled_from(["sparsify-first", "quantize-first"])),
        "dtype": draw(st.sampled_from(dtypes)),
        "seed": draw(st.integers(0, 5)),
    }


def _table(spec: dict) -> CompressedTable:
    """Returns the table `spec` describes; rejects the example when sparq refuses to compress it
    (a float16 zero point out of range, say)."""
    try:
        return make_table(**spec)
    except TableError:
        assume(False)
        raise


def _tolerance(dtype: torch.dtype) -> dict[str, float]:
    if dtype in (torch.float16, torch.bfloat16):
        return {"rtol": 1e-2, "atol": 1e-2}
    return {"rtol": 1e-5, "atol": 1e-5}


@SETTINGS
@given(
    spec=tables(dtypes=(torch.float32, torch.float16, torch.bfloat16, torch.float64)),
    data=st.data(),
)
def test_embedding_is_exact(backend: str, spec: dict, data: st.DataObject) -> None:
    table = _table(spec)
    module = Embedding.from_table(table)
    shape = data.draw(st.sampled_from([(0,), (5,), (3, 4), (2, 1, 3)]))
    index_dtype = data.draw(st.sampled_from([torch.int32, torch.int64]))
    indices = torch.randint(0, spec["rows"], shape, dtype=index_dtype)
    got = module(indices)
    want = F.embedding(indices, table.decode())
    assert got.dtype == table.dtype
    assert got.shape == (*shape, spec["cols"])
    assert torch.equal(got, want)


@SETTINGS
@given(spec=tables(dtypes=(torch.float32, torch.float16, torch.bfloat16)), data=st.data())
def test_bag_matches_embedding_bag(backend: str, spec: dict, data: st.DataObject) -> None:
    table = _table(spec)
    rows = spec["rows"]
    mode = data.draw(st.sampled_from(["sum", "mean", "max"]))
    padding = data.draw(st.sampled_from([None, 0, rows - 1, -1]))
    include_last = data.draw(st.booleans())
    index_dtype = data.draw(st.sampled_from([torch.int32, torch.int64]))
    two_d = data.draw(st.booleans())
    weighted = mode == "sum" and data.draw(st.booleans())
    module = EmbeddingBag.from_table(
        table, mode=mode, padding_idx=padding, include_last_offset=include_last
    )
    decoded = table.decode()
    if two_d:
        indices = torch.randint(0, rows, (data.draw(st.integers(0, 5)), 3), dtype=index_dtype)
        offsets = None
    else:
        n = data.draw(st.integers(0, 30))
        indices = torch.randint(0, rows, (n,), dtype=index_dtype)
        cuts = sorted(data.draw(st.lists(st.integers(0, n), min_size=0, max_size=6)))
        starts = [0, *cuts]
        if include_last:
            starts.append(n)
        offsets = torch.tensor(starts, dtype=index_dtype)
    weights = torch.rand(indices.shape, dtype=table.dtype) * 2 - 0.5 if weighted else None
    got = module(indices, offsets, per_sample_weights=weights)
    want = F.embedding_bag(
        indices,
        decoded,
        offsets,
        mode=mode,
        per_sample_weights=weights,
        include_last_offset=include_last if not two_d else False,
        padding_idx=module.padding_idx,
    )
    assert got.dtype == table.dtype
    assert got.shape == want.shape
    if mode == "max" or (mode == "sum" and not weighted and table.dtype == torch.float32):
        assert torch.equal(got, want)
    else:
        torch.testing.assert_close(got, want, **_tolerance(table.dtype))


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize(
    ("level", "block_shape", "zeros"),
    [(0.0, (1, 4), None), (0.7, (1, 4), None), (0.6, (2, 3), None), (0.5, (1, 4), 2)],
    ids=["none", "block", "block-2x3", "value"],
)
@pytest.mark.parametrize("memory_map", [False, True])
def test_from_file_every_mask_kind(
    backend: str,
    tmp_path: Path,
    bits: int,
    level: float,
    block_shape: tuple[int, int],
    zeros: int | None,
    memory_map: bool,
) -> None:
    table = make_table(
        101, 37, level=level, block_shape=block_shape, zeros_per_block=zeros, bits=bits
    )
    path = write_tables(tmp_path / "t.sparq.safetensors", {"emb.weight": table})
    decoded = table.decode()
    embedding = Embedding.from_file(path, "emb.weight", memory_map=memory_map)
    indices = torch.randint(0, 101, (64,))
    assert torch.equal(embedding(indices), F.embedding(indices, decoded))
    bag = EmbeddingBag.from_file(path, "emb.weight", mode="sum", memory_map=memory_map)
    offsets = torch.tensor([0, 10, 10, 40])
    assert torch.equal(
        bag(indices, offsets), F.embedding_bag(indices, decoded, offsets, mode="sum")
    )
    assert torch.equal(embedding.decoded_weight(), decoded)


def test_large_bags_run_in_parallel(backend: str) -> None:
    table = make_table(3000, 64, level=0.8, bits=4)
    module = EmbeddingBag.from_table(table, mode="mean")
    indices = torch.randint(0, 3000, (4096, 20))
    want = F.embedding_bag(indices, table.decode(), mode="mean")
    torch.testing.assert_close(module(indices), want, rtol=1e-5, atol=1e-6)


def test_wide_rows_and_value_masks(backend: str) -> None:
    table = make_table(20, 300, level=0.6, block_shape=(2, 2), zeros_per_block=1, bits=2)
    module = Embedding.from_table(table)
    indices = torch.arange(20)
    assert torch.equal(module(indices), table.decode())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(
    ("bits", "scale_dtype"),
    [
        (1, "float32"),
        (3, "float16"),
        (4, "float32"),
        (5, "bfloat16"),
        (7, "float32"),
        (8, "float16"),
    ],
)
def test_cuda_matches_cpu(bits: int, scale_dtype: str) -> None:
    table = make_table(500, 64, level=0.8, bits=bits, scale_dtype=scale_dtype)
    cpu = EmbeddingBag.from_table(table, mode="sum")
    gpu = EmbeddingBag.from_table(table, mode="sum", device="cuda")
    indices = torch.randint(0, 500, (256, 8))
    assert torch.equal(gpu(indices.cuda()).cpu(), cpu(indices))
    embedding = Embedding.from_table(table).to("cuda")
    assert torch.equal(embedding(indices.cuda()).cpu(), F.embedding(indices, table.decode()))
