"""A table compressed in parts (each part a thread, sharing the global step through a reducer)
equals the table compressed whole, bit for bit: threshold, ties by block position, partial
blocks, both orders, held or recomputed scores, per-value masks."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from sparqcli.engine.pipeline import compress_rows, compress_table
from sparqcli.engine.reduce import LocalReducer, TablePart, part_ranges
from sparqcli.engine.stats import PartSums
from sparqcli.settings import Quantization, Sparsity


class ThreadReducer:
    """The reducer of `parts` threads, each compressing one part: barriers around shared slots."""

    def __init__(self, shared: dict, part: int) -> None:
        self.shared = shared
        self.part = part
        self.calls = 0

    def _exchange(self, value):
        self.calls += 1
        slots, barrier = self.shared["slots"], self.shared["barrier"]
        slots[self.part] = value
        barrier.wait()
        values = list(slots)
        barrier.wait()
        return values

    def sum_counts(self, counts):
        values = self._exchange(counts.clone())
        total = values[0].clone()
        for other in values[1:]:
            total += other
        return total

    def gather_count(self, count):
        return [int(value) for value in self._exchange(count)]


def compress_in_parts(table, order, sparsity, quantization, parts, **kwargs):
    """Returns each part's (CompressedTable, TableStats, TablePart), compressed in threads."""
    ranges = part_ranges(tuple(table.shape), sparsity.block_shape, parts)
    shared = {"slots": [None] * parts, "barrier": threading.Barrier(parts, timeout=10)}

    def run(index):
        start, stop = ranges[index]
        part = TablePart(start, stop, ThreadReducer(shared, index))
        result, stats = compress_rows(
            lambda a, b: table[a:b],
            tuple(table.shape),
            table.dtype,
            order,
            sparsity,
            quantization,
            part=part,
            **kwargs,
        )
        return result, stats, part

    with ThreadPoolExecutor(parts) as pool:
        return list(pool.map(run, range(parts)))


def _assert_parts_equal_whole(whole, pieces):
    assert sum(piece.rows for piece, _, _ in pieces) == whole.rows
    assert torch.equal(torch.cat([piece.codes for piece, _, _ in pieces]), whole.codes)
    assert torch.equal(torch.cat([piece.scale for piece, _, _ in pieces]), whole.scale)
    assert torch.equal(torch.cat([piece.zero_point for piece, _, _ in pieces]), whole.zero_point)
    if whole.keep_mask is None:
        assert all(piece.keep_mask is None for piece, _, _ in pieces)
    else:
        masks = [piece.keep_mask for piece, _, _ in pieces]
        assert torch.equal(torch.cat(masks), whole.keep_mask)
    decoded = torch.cat([piece.decode() for piece, _, _ in pieces])
    assert torch.equal(decoded, whole.decode())


CASES = [
    # shape, block shape, zeros per block, level
    ((101, 13), (3, 4), None, 0.6),  # partial blocks on both edges
    ((64, 16), (1, 4), None, 0.5),
    ((50, 9), (2, 2), 3, 0.7),  # a per-value mask
    ((7, 8), (4, 4), None, 0.5),  # fewer block rows than some part counts
    ((2, 5), (8, 2), None, 0.5),  # a block taller than the table
]


@pytest.mark.parametrize("parts", [1, 2, 3, 5])
@pytest.mark.parametrize("order", ["sparsify-first", "quantize-first"])
@pytest.mark.parametrize(("shape", "block_shape", "zeros", "level"), CASES)
def test_parts_equal_the_whole_table(parts, order, shape, block_shape, zeros, level):
    table = torch.randn(shape, generator=torch.Generator().manual_seed(parts))
    settings = (Sparsity(level, block_shape, zeros), Quantization(4))
    whole, whole_stats = compress_table(table, order, *settings)
    pieces = compress_in_parts(table, order, *settings, parts, chunk_rows=8)
    _assert_parts_equal_whole(whole, pieces)
    assert sum(stats.kept for _, stats, _ in pieces) == whole_stats.kept
    sums = [part.sums for _, _, part in pieces]
    assert all(isinstance(item, PartSums) for item in sums)
    assert sum(item.rows for item in sums) == shape[0]


@pytest.mark.parametrize("parts", [2, 3, 4])
@pytest.mark.parametrize("score_budget_bytes", [None, 0])
def test_ties_break_by_global_block_position(parts, score_budget_bytes):
    # Many blocks score exactly the threshold, spread over every part: the pruned ties are the
    # lowest global block indexes, whichever part holds them.
    generator = torch.Generator().manual_seed(7)
    table = torch.randint(0, 3, (60, 12), generator=generator).float()
    table[20:45] = 1.0
    settings = (Sparsity(0.55, (2, 3)), Quantization(8))
    whole, _ = compress_table(table, "sparsify-first", *settings)
    pieces = compress_in_parts(
        table,
        "sparsify-first",
        *settings,
        parts,
        chunk_rows=4,
        score_budget_bytes=score_budget_bytes,
    )
    _assert_parts_equal_whole(whole, pieces)


def test_the_local_reducer_equals_no_reducer():
    table = torch.randn(99, 10, generator=torch.Generator().manual_seed(2))
    settings = (Sparsity(0.5, (2, 4)), Quantization(8))
    whole, _ = compress_table(table, "quantize-first", *settings)
    alone, _ = compress_rows(
        lambda a, b: table[a:b],
        (99, 10),
        table.dtype,
        "quantize-first",
        *settings,
        part=TablePart(0, 99, LocalReducer()),
    )
    assert torch.equal(alone.codes, whole.codes)
    assert torch.equal(alone.keep_mask, whole.keep_mask)


def test_parts_must_be_whole_block_rows():
    table = torch.randn(10, 4)
    with pytest.raises(ValueError, match="whole block rows"):
        compress_rows(
            lambda a, b: table[a:b],
            (10, 4),
            table.dtype,
            "sparsify-first",
            Sparsity(0.5, (4, 2)),
            Quantization(8),
            part=TablePart(3, 10, LocalReducer()),
        )


def test_part_ranges_cover_the_rows_in_whole_blocks():
    assert part_ranges((10, 4), (4, 2), 2) == [(0, 8), (8, 10)]
    assert part_ranges((10, 4), (4, 2), 4) == [(0, 4), (4, 8), (8, 10), (10, 10)]
    assert part_ranges((3, 4), (8, 2), 2) == [(0, 3), (3, 3)]
