"""The two pipeline orders of `post_training_sparse_quantize`, chunk by chunk over table rows.

sparsify-first: prune the float table, then quantize the pruned rows (row min/max include the
zeros of pruned values, as in the reference). quantize-first: quantize and dequantize, prune the
dequantized table, then re-quantize it with the same scales and zero points.

Pass 1 reads the table once for block scores (and, quantize-first, the qparams); the selection
threshold comes from a radix select over those scores; pass 2 reads the table again to build the
keep-mask, quantize and keep only the codes of kept values. Block scores are held in memory when
they fit `score_budget_bytes`, otherwise recomputed in each pass, so memory stays bounded by a
few row chunks plus the (compressed) result.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from sparqcli.engine.quantize import dequantize, quantize, row_qparams
from sparqcli.engine.settings import Order, QuantizationSettings, SparsitySettings
from sparqcli.engine.sparsify import (
    BlockPruner,
    block_grid,
    block_scores,
    blocks_to_prune,
    keep_in_pruned_blocks,
    value_norms,
)
from sparqcli.engine.stats import StatsAccumulator, TableStats
from sparqcli.engine.table import CompressedTable
from sparqcli.errors import SettingError, TableError

RowReader = Callable[[int, int], torch.Tensor]
"""Reads rows `start:stop` of a table as a 2-D tensor (any float dtype, any device)."""

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
DEFAULT_CHUNK_VALUES = 1 << 21
DEFAULT_SCORE_BUDGET_BYTES = 256 << 20


def compress_table(
    table: torch.Tensor,
    order: Order,
    sparsity: SparsitySettings,
    quantization: QuantizationSettings,
    *,
    device: torch.device | str | None = None,
    chunk_rows: int | None = None,
    name: str = "table",
) -> tuple[CompressedTable, TableStats]:
    """Returns the compressed form of an in-memory 2-D float table and its statistics.

    Computes on `device` (default: the table's own). Raises TableError for a table that is not
    2-D floating or holds NaN/Inf, SettingError for an unknown order.
    """
    if table.dim() != 2:
        raise TableError(f"{name}: must be a 2-D table, got shape {list(table.shape)}")
    rows, cols = table.shape
    return compress_rows(
        lambda start, stop: table[start:stop],
        (rows, cols),
        table.dtype,
        order,
        sparsity,
        quantization,
        device=table.device if device is None else device,
        chunk_rows=chunk_rows,
        name=name,
    )


def compress_rows(
    read_rows: RowReader,
    shape: tuple[int, int],
    dtype: torch.dtype,
    order: Order,
    sparsity: SparsitySettings,
    quantization: QuantizationSettings,
    *,
    device: torch.device | str = "cpu",
    chunk_rows: int | None = None,
    score_budget_bytes: int = DEFAULT_SCORE_BUDGET_BYTES,
    name: str = "table",
    progress: Callable[[float], None] | None = None,
) -> tuple[CompressedTable, TableStats]:
    """Returns the compressed form of a table read in row chunks, and its statistics.

    `read_rows(start, stop)` is called for row ranges in order, twice per range (three times
    when the block scores exceed `score_budget_bytes`). Results live on `device`. `progress`,
    when given, is called with the fraction of the work done after each chunk.
    Raises TableError for a non-floating dtype or NaN/Inf values (naming the first bad row),
    SettingError for an unknown order.
    """
    if order not in ("sparsify-first", "quantize-first"):
        raise SettingError(f"order: must be sparsify-first or quantize-first, got {order!r}")
    if dtype not in FLOAT_DTYPES:
        raise TableError(
            f"{name}: must be a floating table, got dtype {str(dtype).replace('torch.', '')}"
        )
    device = torch.device(device)
    job = _TableJob(read_rows, shape, order, sparsity, quantization, device, chunk_rows, name)
    job.progress = progress
    return job.run(dtype, score_budget_bytes)


class _TableJob:
    """The state of one table's compression: row ranges, per-row qparams, pass 1 and pass 2."""

    def __init__(
        self,
        read_rows: RowReader,
        shape: tuple[int, int],
        order: Order,
        sparsity: SparsitySettings,
        quantization: QuantizationSettings,
        device: torch.device,
        chunk_rows: int | None,
        name: str,
    ) -> None:
        self.read_rows = read_rows
        self.rows, self.cols = shape
        self.order = order
        self.sparsity = sparsity
        self.quantization = quantization
        self.device = device
        self.name = name
        block_height = sparsity.block_shape[0]
        if chunk_rows is None:
            chunk_rows = max(1, DEFAULT_CHUNK_VALUES // max(1, self.cols))
        chunk_rows = max(block_height, chunk_rows // block_height * block_height)
        self.ranges = [
            (start, min(start + chunk_rows, self.rows)) for start in range(0, self.rows, chunk_rows)
        ]
        self.checked_finite = False
        self.progress: Callable[[float], None] | None = None
        self.passes = 1
        self.saved_scale: torch.Tensor | None = None
        self.saved_zero_point: torch.Tensor | None = None

    def run(
        self, dtype: torch.dtype, score_budget_bytes: int
    ) -> tuple[CompressedTable, TableStats]:
        n_block_rows, n_block_cols = block_grid((self.rows, self.cols), self.sparsity.block_shape)
        n_blocks = n_block_rows * n_block_cols
        prunes = (
            self.sparsity.effective_zeros_per_block > 0
            and blocks_to_prune(self.sparsity.level, n_blocks) > 0
        )
        if self.order == "quantize-first" or prunes:
            self.passes = 2
            held = self._first_pass(hold_scores=prunes and n_blocks * 4 <= score_budget_bytes)
        else:
            held = None
        if prunes:
            chunks = (lambda: iter(held)) if held is not None else self._score_chunks
            pruner = BlockPruner.for_scores(chunks, n_blocks, self.sparsity.level)
        else:
            pruner = None
        return self._second_pass(pruner, held, dtype)

    def _read(self, start: int, stop: int) -> torch.Tensor:
        chunk = self.read_rows(start, stop)
        return chunk.to(device=self.device, dtype=torch.float32, non_blocking=True)

    def _values_to_score(self, start: int, stop: int) -> torch.Tensor:
        """Returns rows start:stop as the sparsifier sees them (dequantized, quantize-first)."""
        values = self._read(start, stop)
        if self.order == "quantize-first" and self.saved_scale is not None:
            scale = self.saved_scale[start:stop]
            zero_point = self.saved_zero_point[start:stop]
            values = dequantize(
                quantize(values, scale, zero_point, self.quantization.bits), scale, zero_point
            )
        return values

    def _first_pass(self, hold_scores: bool) -> list[torch.Tensor] | None:
        """Checks every value is finite, saves quantize-first qparams, optionally keeps scores."""
        # Results are written into tensors allocated once (see _second_pass); `held` lists views.
        quantize_first = self.order == "quantize-first"
        scales = self._empty(self.rows) if quantize_first else None
        zero_points = self._empty(self.rows) if quantize_first else None
        bh = self.sparsity.block_shape[0]
        grid = block_grid((self.rows, self.cols), self.sparsity.block_shape)
        all_scores = self._empty(grid) if hold_scores else None
        held = []
        for start, stop in self.ranges:
            values = self._read(start, stop)
            self._check_finite(values, start)
            if quantize_first:
                scale, zero_point = row_qparams(values, self.quantization, start)
                scales[start:stop] = scale
                zero_points[start:stop] = zero_point
                values = dequantize(
                    quantize(values, scale, zero_point, self.quantization.bits), scale, zero_point
                )
            if hold_scores:
                scores = all_scores[start // bh : -(-stop // bh)]
                scores.copy_(
                    block_scores(value_norms(values, self.sparsity.norm), self.sparsity.block_shape)
                )
                held.append(scores)
            self._report(0, stop)
        self.checked_finite = True
        if quantize_first:
            self.saved_scale = scales
            self.saved_zero_point = zero_points
        return held if hold_scores else None

    def _empty(
        self, shape: int | tuple[int, ...], dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, device=self.device)

    def _max_kept(self, pruner: BlockPruner | None) -> int:
        """Returns an upper bound of the values kept: exact when every block is whole.

        The pruner prunes exactly `blocks_to_prune` blocks, each losing at least
        min(zeros_per_block, the smallest (corner) block's size) values.
        """
        values = self.rows * self.cols
        if pruner is None or pruner.threshold is None or values == 0:
            return values
        bh, bw = self.sparsity.block_shape
        n_block_rows, n_block_cols = block_grid((self.rows, self.cols), self.sparsity.block_shape)
        smallest = (self.rows - (n_block_rows - 1) * bh) * (self.cols - (n_block_cols - 1) * bw)
        lost = min(self.sparsity.effective_zeros_per_block, smallest)
        return values - blocks_to_prune(self.sparsity.level, n_block_rows * n_block_cols) * lost

    def _score_chunks(self) -> Iterator[torch.Tensor]:
        for start, stop in self.ranges:
            norms = value_norms(self._values_to_score(start, stop), self.sparsity.norm)
            yield block_scores(norms, self.sparsity.block_shape)

    def _report(self, finished_passes: int, rows_done: int) -> None:
        if self.progress is not None and self.rows:
            self.progress((finished_passes + rows_done / self.rows) / self.passes)

    def _check_finite(self, values: torch.Tensor, start: int) -> None:
        # A row sum is finite whenever every value is (bar overflow), and costs one fused read;
        # only a chunk with a non-finite sum is checked value by value.
        if bool(torch.isfinite(values.sum(dim=1)).all()):
            return
        finite_rows = torch.isfinite(values).all(dim=1)
        if not bool(finite_rows.all()):
            row = start + int((~finite_rows).nonzero()[0, 0].item())
            raise TableError(f"{self.name}: row {row} holds NaN or Inf values")

    def _second_pass(
        self, pruner: BlockPruner | None, held: list[torch.Tensor] | None, dtype: torch.dtype
    ) -> tuple[CompressedTable, TableStats]:
        bits = self.quantization.bits
        per_block = self.sparsity.prunes_whole_blocks
        bh = self.sparsity.block_shape[0]
        # Results go straight into tensors allocated once. Kept in lists of per-chunk pieces, they
        # would lie in the heap between each chunk's freed temporaries, which the allocator then
        # cannot give back: peak RSS on an 8M x 128 table varied from 2.1 to 4.1 GiB that way.
        codes = self._empty(self._max_kept(pruner), torch.uint8)
        n_codes = 0
        mask = None
        if pruner is not None:
            grid = block_grid((self.rows, self.cols), self.sparsity.block_shape)
            mask = self._empty(grid if per_block else (self.rows, self.cols), torch.bool)
        if self.order == "quantize-first":
            scales, zero_points = self.saved_scale, self.saved_zero_point
        else:
            scales, zero_points = self._empty(self.rows), self._empty(self.rows)
        stats = StatsAccumulator()
        for index, (start, stop) in enumerate(self.ranges):
            original = self._read(start, stop)
            if not self.checked_finite:
                self._check_finite(original, start)
            values = (
                original if self.order == "sparsify-first" else self._values_to_score(start, stop)
            )
            keep = None
            if pruner is not None:
                norms = value_norms(values, self.sparsity.norm)
                scores = (
                    held[index]
                    if held is not None
                    else block_scores(norms, self.sparsity.block_shape)
                )
                pruned_blocks = pruner.prune(scores)
                keep = keep_in_pruned_blocks(norms, pruned_blocks, self.sparsity)
                if per_block:
                    torch.logical_not(pruned_blocks, out=mask[start // bh : -(-stop // bh)])
                else:
                    mask[start:stop] = keep
            if self.order == "quantize-first":
                scale = self.saved_scale[start:stop]
                zero_point = self.saved_zero_point[start:stop]
            else:
                pruned_values = values if keep is None else values * keep
                scale, zero_point = row_qparams(pruned_values, self.quantization, start)
                scales[start:stop] = scale
                zero_points[start:stop] = zero_point
            dense = quantize(values, scale, zero_point, bits)
            kept = dense.reshape(-1) if keep is None else dense[keep]
            end = n_codes + kept.numel()
            if end > codes.numel():  # never, while _max_kept holds; stays correct if it did not
                codes = torch.cat([codes[:n_codes], codes.new_empty(end - n_codes)])
            codes[n_codes:end] = kept
            n_codes = end
            decoded = dequantize(dense, scale, zero_point)
            if keep is not None:
                decoded.masked_fill_(~keep, 0.0)
            stats.add(original, decoded)
            self._report(self.passes - 1, stop)
        all_codes = codes if n_codes == codes.numel() else codes[:n_codes].clone()
        table = CompressedTable(
            shape=(self.rows, self.cols),
            dtype=dtype,
            order=self.order,
            sparsity=self.sparsity,
            quantization=self.quantization,
            codes=all_codes,
            scale=scales,
            zero_point=zero_points,
            keep_mask=mask,
            mask_per_block=per_block,
        )
        return table, stats.finish(scales, zero_points, int(all_codes.numel()))
