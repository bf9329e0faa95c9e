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

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import ModuleType

import torch

from sparqcli.engine.options import DEFAULT_OPTIONS, EngineOptions
from sparqcli.engine.quantize import (
    decodes_past_message,
    dequantize,
    exact_zero_minimums,
    may_decode_past,
    may_decode_to_zero,
    mse_qparams,
    qparams_from_range,
    quantize_levels,
    row_qparams,
)
from sparqcli.engine.reduce import TablePart
from sparqcli.engine.sparsify import (
    BlockPruner,
    ChunkKeep,
    RowBlockPruner,
    block_grid,
    block_scores,
    blocks_to_prune,
    expand_blocks,
    fit_blocks,
    value_norms,
)
from sparqcli.engine.stats import StatsAccumulator, TableStats
from sparqcli.engine.table import CompressedTable
from sparqcli.engine.workers import ChunkWorkers, Sequencer
from sparqcli.errors import SettingError, TableError, UnfitSettingsError
from sparqcli.settings import Order, Quantization, Sparsity

RowReader = Callable[[int, int], torch.Tensor]
"""Reads rows `start:stop` of a table as a 2-D tensor (any float dtype, any device)."""

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# Values per row chunk. On CPU: small enough that a chunk's few float32 work buffers stay in the
# caches, large enough that each op's fixed cost (dispatch, waking the threads) is amortized
# (measured on 1M x 128 with 2 threads: 2^19 ran 10-20% faster than 2^21 or 2^17; end to end on
# 2M x 128, faster than 2^18 or 2^20). No result depends on it, the statistics included.
# On CUDA a chunk is large so that kernel launches and the few host syncs per chunk are amortized;
# the fused kernels need no chunk-sized work buffers, so their chunks are larger still.
CPU_CHUNK_VALUES = 1 << 19
# With chunk workers (engine/workers.py), each worker's chunk is larger: every torch call hands
# the GIL over between the workers, and fewer, longer calls amortize that (measured on 1M x 128
# with 2 workers: see benchmarks/README.md, "Sharing the machine").
CPU_WORKER_CHUNK_VALUES = 1 << 20
CUDA_CHUNK_VALUES = 1 << 26
CUDA_FUSED_CHUNK_VALUES = 1 << 28
# Block scores are held between the passes when they fit this budget (else recomputed).
CPU_SCORE_BUDGET_BYTES = 512 << 20
CUDA_SCORE_BUDGET_BYTES = 2 << 30


def check_rows_finite(
    name: str, values: torch.Tensor, start: int, read_rows: Callable[[int, int], torch.Tensor]
) -> None:
    """Raises TableError naming the first row of float32 `values` (rows `start:` of table
    `name`) that holds a non-finite value: NaN or Inf, or, in its own dtype (`read_rows`), a
    float64 value beyond float32's range."""
    finite_rows = torch.isfinite(values).all(dim=1)
    if bool(finite_rows.all()):
        return
    row = start + int((~finite_rows).nonzero()[0, 0].item())
    original = read_rows(row, row + 1)[0]
    if bool(torch.isfinite(original).all()):
        largest = float(original.abs().max())
        raise TableError(
            f"{name}: row {row} holds a value beyond float32's range ({largest:.3g}); sparq "
            "computes in float32, so scale the table down"
        )
    raise TableError(f"{name}: row {row} holds NaN or Inf values")


def compress_table(
    table: torch.Tensor,
    order: Order,
    sparsity: Sparsity,
    quantization: Quantization,
    *,
    device: torch.device | str | None = None,
    chunk_rows: int | None = None,
    name: str = "table",
    options: EngineOptions = DEFAULT_OPTIONS,
    threads: int | None = None,
) -> tuple[CompressedTable, TableStats]:
    """Returns the compressed form of an in-memory 2-D float table and its statistics.

    Computes on `device` (default: the table's own), with `threads` as in `compress_rows`.
    Raises TableError for a table that is not 2-D floating or holds NaN/Inf, SettingError for
    an unknown order.
    """
    if table.dim() != 2:
        raise TableError(f"{name}: must be a 2-D table, got shape {list(table.shape)}")
    rows, cols = table.shape
    table = table.detach()  # a parameter's values, not its graph
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
        options=options,
        threads=threads,
    )


def compress_rows(
    read_rows: RowReader,
    shape: tuple[int, int],
    dtype: torch.dtype,
    order: Order,
    sparsity: Sparsity,
    quantization: Quantization,
    *,
    device: torch.device | str = "cpu",
    chunk_rows: int | None = None,
    score_budget_bytes: int | None = None,
    name: str = "table",
    progress: Callable[[float], None] | None = None,
    options: EngineOptions = DEFAULT_OPTIONS,
    part: TablePart | None = None,
    threads: int | None = None,
) -> tuple[CompressedTable, TableStats]:
    """Returns the compressed form of a table read in row chunks, and its statistics.

    `read_rows(start, stop)` is called for row ranges in order, twice per range (three times
    when the block scores exceed `score_budget_bytes`, by default 512 MiB on CPU and 2 GiB on
    CUDA). Results live on `device`. `progress`, when given, is called with the fraction of
    the work done after each chunk. `options` choose how it computes, not what.
    With `part`, only rows `part.start:part.stop` of the table of `shape` are read and
    compressed (the result has those rows; `read_rows` takes table row indexes) as one part of
    the table: the pruning threshold and ties are the whole table's, combined through
    `part.reducer`, so the parts of a table equal, row for row, the table compressed whole.
    Every part must make the same calls in the same order (the reducer's are collective).
    `threads` (CPU only): that many worker threads compress whole row chunks, each with one
    torch thread (see engine/workers.py); the results are the same bytes for any count.
    None leaves torch's own threads to parallelize each operation. With a count,
    torch's process-wide thread count is 1 while the table is compressed (restored after).
    With `threads` above 1, `read_rows` is called from several threads at once, and the rows
    it returns must stay valid until the same thread calls it again.
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
    job = _TableJob(
        read_rows,
        shape,
        order,
        sparsity,
        quantization,
        device,
        chunk_rows,
        name,
        options,
        part,
        threads,
    )
    job.progress = progress
    if score_budget_bytes is None:
        cuda = device.type == "cuda"
        score_budget_bytes = CUDA_SCORE_BUDGET_BYTES if cuda else CPU_SCORE_BUDGET_BYTES
    with ChunkWorkers(job.worker_threads) as job.workers:
        return job.run(dtype, score_budget_bytes)


def _fused_kernels(device: torch.device, options: EngineOptions) -> ModuleType | None:
    """Returns the fused-kernel module when it can run on `device`, else None.

    They run on CUDA where Triton is installed, and on CPU tensors through Triton's interpreter
    when `options.interpret_kernels` is set (how they are checked without a GPU).
    """
    if not options.fused_kernels:
        return None
    if device.type != "cuda" and not options.interpret_kernels:
        return None  # checked before importing Triton, which costs time
    try:
        from sparqcli.engine import fused
    except ImportError:  # no Triton
        return None
    return fused


class _TableJob:
    """The state of one table's compression: row ranges, per-row qparams, pass 1 and pass 2.

    Every chunk is computed in two float32 work buffers allocated once per table and thread
    (and the read chunk itself), so the passes do not allocate chunk-sized temporaries. Chunks
    are computed by `workers`, results written into disjoint rows; what depends on the order
    of the chunks runs in a Sequencer's turns.
    """

    def __init__(
        self,
        read_rows: RowReader,
        shape: tuple[int, int],
        order: Order,
        sparsity: Sparsity,
        quantization: Quantization,
        device: torch.device,
        chunk_rows: int | None,
        name: str,
        options: EngineOptions,
        part: TablePart | None = None,
        threads: int | None = None,
    ) -> None:
        self.read_rows = read_rows
        self.rows, self.cols = shape
        self.order = order
        self.sparsity = sparsity
        self.quantization = quantization
        self.device = device
        self.name = name
        block_height = sparsity.block_shape[0]
        self.options = options
        self.fused = _fused_kernels(device, options) if self.cols else None
        # Worker threads only where the chunks are computed by the CPU with tensor ops.
        on_cpu = device.type == "cpu" and self.fused is None
        threads = threads if threads is not None else options.threads
        self.worker_threads = threads if on_cpu else None
        if chunk_rows is None:
            several = self.worker_threads is not None and self.worker_threads > 1
            chunk_values = CPU_WORKER_CHUNK_VALUES if several else CPU_CHUNK_VALUES
            if device.type == "cuda":
                fused = self.fused is not None and sparsity.prunes_whole_blocks
                chunk_values = CUDA_FUSED_CHUNK_VALUES if fused else CUDA_CHUNK_VALUES
            chunk_rows = max(1, chunk_values // max(1, self.cols))
        chunk_rows = max(block_height, chunk_rows // block_height * block_height)
        self.part = part
        self.first, self.last = (part.start, part.stop) if part is not None else (0, self.rows)
        bh = fit_blocks(shape, sparsity.block_shape)[0]
        if not (
            0 <= self.first <= self.last <= self.rows
            and (self.first % bh == 0 or self.first == self.rows)
            and (self.last % bh == 0 or self.last == self.rows)
        ):
            raise ValueError(
                f"a part must be whole block rows of the table: rows {self.first}:{self.last} "
                f"of {self.rows}, block height {bh}"
            )
        self.local_rows = self.last - self.first
        self.ranges = [
            (start, min(start + chunk_rows, self.last))
            for start in range(self.first, self.last, chunk_rows)
        ]
        self.chunk_values = (
            max((stop - start for start, stop in self.ranges), default=0) * self.cols
        )
        self.scratch = threading.local()  # per thread: .work (2 to 4 buffers), .read_buffer
        self.workers = ChunkWorkers(None)
        self.checked_finite = False
        self.progress: Callable[[float], None] | None = None
        self.passes = 1
        self.pruned_blocks = 0
        self.saved_scale: torch.Tensor | None = None
        self.saved_zero_point: torch.Tensor | None = None

    def run(
        self, dtype: torch.dtype, score_budget_bytes: int
    ) -> tuple[CompressedTable, TableStats]:
        n_block_rows, n_block_cols = block_grid((self.rows, self.cols), self.sparsity.block_shape)
        n_blocks = n_block_rows * n_block_cols
        if self.sparsity.scope == "row":
            # Each block row is ranked on its own: no global threshold, no held scores.
            row_pruner = RowBlockPruner.for_level(self.sparsity.level, n_block_cols)
            local_block_rows = block_grid((self.local_rows, self.cols), self.sparsity.block_shape)[
                0
            ]
            self.pruned_blocks = row_pruner.per_row * local_block_rows if n_block_cols else 0
            prunes = self.sparsity.effective_zeros_per_block > 0 and self.pruned_blocks > 0
            if self.order == "quantize-first":
                self.passes = 2
                self._first_pass(hold_scores=False)
            return self._second_pass(row_pruner if prunes else None, None, dtype)
        self.pruned_blocks = blocks_to_prune(self.sparsity.level, n_blocks)
        prunes = self.sparsity.effective_zeros_per_block > 0 and self.pruned_blocks > 0
        all_scores = None
        if self.order == "quantize-first" or prunes:
            self.passes = 2
            local_grid = block_grid((self.local_rows, self.cols), self.sparsity.block_shape)
            hold_scores = prunes and local_grid[0] * local_grid[1] * 4 <= score_budget_bytes
            all_scores = self._first_pass(hold_scores)
        pruner = None
        held = None
        reducer = self.part.reducer if self.part is not None else None
        if prunes:
            if all_scores is not None:
                held = [all_scores[self._block_rows(start, stop)] for start, stop in self.ranges]
                pruner = BlockPruner.for_scores(
                    lambda: iter(held),
                    n_blocks,
                    self.sparsity.level,
                    all_scores,
                    self.options.cuda_selection,
                    reducer,
                    lambda fn: self.workers.map(lambda index: fn(held[index]), len(held)),
                )
            else:
                pruner = BlockPruner.for_scores(
                    self._score_chunks,
                    n_blocks,
                    self.sparsity.level,
                    reducer=reducer,
                    map_chunks=self._map_score_chunks,
                )
        return self._second_pass(pruner, held, dtype)

    def _read(self, start: int, stop: int) -> torch.Tensor:
        """Returns rows start:stop as a contiguous float32 tensor on the job's device."""
        chunk = self.read_rows(start, stop)
        if chunk.dtype == torch.float32 and chunk.device == self.device and chunk.is_contiguous():
            return chunk
        read_buffer = getattr(self.scratch, "read_buffer", None)
        if read_buffer is None:
            read_buffer = self.scratch.read_buffer = self._empty(self.chunk_values)
        converted = read_buffer[: chunk.numel()].view(chunk.shape)
        return converted.copy_(chunk, non_blocking=True)

    def _buffer(self, index: int, like: torch.Tensor) -> torch.Tensor:
        """Returns this thread's work buffer `index` (0 to 3) as a float32 tensor of `like`'s shape.

        Buffers 0 and 1 serve every chunk.
        """
        work = getattr(self.scratch, "work", None)
        if work is None:
            work = self.scratch.work = []
        while len(work) <= index:
            work.append(self._empty(self.chunk_values))
        return work[index][: like.numel()].view(like.shape)

    def _qparams(
        self, values: torch.Tensor, keep: ChunkKeep | None, start: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the qparams of rows start:stop (read as `values`, pruned values zeroed).

        `range: minmax` takes each row's min and max; `range: mse` searches the range that
        minimises the squared error of the kept values (`keep`; None: all of them).
        """
        if self.quantization.range == "minmax":
            return row_qparams(values, self.quantization, start)
        dense = None if keep is None else keep.dense()
        return mse_qparams(values, self.quantization, dense, start)

    def _seen(self, values: torch.Tensor, start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
        """Returns rows start:stop as the quantize-first sparsifier sees them: dequantized codes."""
        scale = self.saved_scale[self._local(start, stop)]
        zero_point = self.saved_zero_point[self._local(start, stop)]
        levels = quantize_levels(values, scale, zero_point, self.quantization.bits, out=out)
        return dequantize(levels, scale, zero_point, out=levels)

    def _scores(
        self, values: torch.Tensor, start: int, stop: int, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Returns the block scores of rows start:stop (read as `values`) as the sparsifier sees them."""
        if self.fused is not None and out is not None:
            block_shape = fit_blocks(values.shape, self.sparsity.block_shape)
            qparams = None
            if self.order == "quantize-first":
                qparams = self._fused_qparams(
                    self.saved_scale[self._local(start, stop)],
                    self.saved_zero_point[self._local(start, stop)],
                )
            return self.fused.block_scores(values, block_shape, self.sparsity.norm, out, qparams)
        work = self._buffer(0, values)
        if self.order == "quantize-first":
            values = self._seen(values, start, stop, out=work)
        norms = value_norms(values, self.sparsity.norm, out=work)
        return block_scores(norms, self.sparsity.block_shape, out=out)

    def _first_pass(self, hold_scores: bool) -> torch.Tensor | None:
        """Checks every value is finite, saves quantize-first qparams; returns all block scores.

        The scores are computed and returned only when `hold_scores`.
        """
        quantize_first = self.order == "quantize-first"
        if quantize_first:
            self.saved_scale = self._empty(self.local_rows)
            self.saved_zero_point = self._empty(self.local_rows)
        grid = block_grid((self.local_rows, self.cols), self.sparsity.block_shape)
        all_scores = self._empty(grid) if hold_scores else None

        def first_pass_chunk(index: int) -> None:
            start, stop = self.ranges[index]
            values = self._read(start, stop)
            self._check_finite(values, start)
            if quantize_first:
                scale, zero_point = self._qparams(values, None, start)
                self.saved_scale[self._local(start, stop)] = scale
                self.saved_zero_point[self._local(start, stop)] = zero_point
            if all_scores is not None:
                self._scores(values, start, stop, out=all_scores[self._block_rows(start, stop)])

        for index, _ in enumerate(self.workers.map(first_pass_chunk, len(self.ranges))):
            self._report(0, self.ranges[index][1])
        self.checked_finite = True
        return all_scores

    def _empty(
        self, shape: int | tuple[int, ...], dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, device=self.device)

    def _max_kept(self, pruner: BlockPruner | RowBlockPruner | None) -> int:
        """Returns an upper bound of the values kept: exact when every block is whole.

        The pruner prunes exactly `self.pruned_blocks` blocks of the table (row scope: of this
        part's block rows), each losing at least
        min(zeros_per_block, the smallest (corner) block's size) values.
        """
        values = self.local_rows * self.cols
        if pruner is None or self.pruned_blocks == 0 or values == 0:
            return values
        bh, bw = self.sparsity.block_shape
        n_block_rows, n_block_cols = block_grid((self.rows, self.cols), self.sparsity.block_shape)
        smallest = (self.rows - (n_block_rows - 1) * bh) * (self.cols - (n_block_cols - 1) * bw)
        lost = min(self.sparsity.effective_zeros_per_block, smallest)
        pruned_here = self.pruned_blocks
        if self.sparsity.scope == "table":
            # A part prunes at least what the other parts' blocks cannot hold.
            local_block_rows = block_grid((self.local_rows, self.cols), self.sparsity.block_shape)[
                0
            ]
            pruned_here -= (n_block_rows - local_block_rows) * n_block_cols
        return values - max(0, pruned_here) * lost

    def _score_chunks(self) -> Iterator[torch.Tensor]:
        return self._map_score_chunks(lambda scores: scores)

    def _map_score_chunks(
        self, fn: Callable[[torch.Tensor], torch.Tensor]
    ) -> Iterator[torch.Tensor]:
        """Yields `fn(scores)` for each chunk's block scores, read and computed by the workers."""

        def scores(index: int) -> torch.Tensor:
            start, stop = self.ranges[index]
            return fn(self._scores(self._read(start, stop), start, stop))

        return self.workers.map(scores, len(self.ranges))

    def _report(self, finished_passes: int, rows_done: int) -> None:
        if self.progress is not None and self.local_rows:
            done = (rows_done - self.first) / self.local_rows
            self.progress((finished_passes + done) / self.passes)

    def _check_finite(self, values: torch.Tensor, start: int) -> None:
        # A row sum is finite whenever every value is (bar overflow), and costs one fused read;
        # only a chunk with a non-finite sum is checked value by value.
        if not bool(torch.isfinite(values.sum(dim=1)).all()):
            check_rows_finite(self.name, values, start, self.read_rows)

    def _second_pass(
        self,
        pruner: BlockPruner | RowBlockPruner | None,
        held: list[torch.Tensor] | None,
        dtype: torch.dtype,
    ) -> tuple[CompressedTable, TableStats]:
        per_block = self.sparsity.prunes_whole_blocks
        # Results go straight into tensors allocated once. Kept in lists of per-chunk pieces, they
        # would lie in the heap between each chunk's freed temporaries, which the allocator then
        # cannot give back: peak RSS on an 8M x 128 table varied from 2.1 to 4.1 GiB that way.
        out = _Outputs(
            codes=self._empty(self._max_kept(pruner), torch.uint8),
            scale=(
                self.saved_scale if self.saved_scale is not None else self._empty(self.local_rows)
            ),
            zero_point=(
                self.saved_zero_point
                if self.saved_zero_point is not None
                else self._empty(self.local_rows)
            ),
            stats=StatsAccumulator(self.local_rows, self.cols, self.device),
        )
        if pruner is not None:
            grid = block_grid((self.local_rows, self.cols), self.sparsity.block_shape)
            shape = grid if per_block else (self.local_rows, self.cols)
            out.mask = self._empty(shape, torch.bool)
        fused = self.fused if pruner is None or per_block else None
        if self.quantization.range != "minmax":  # the MSE search runs on tensor ops
            fused = None
        # In chunk order: which tied blocks are pruned (the pruner counts them), where the codes go.
        prune_order, codes_order = Sequencer(), Sequencer()

        def second_pass_chunk(index: int) -> None:
            start, stop = self.ranges[index]
            original = self._read(start, stop)
            if not self.checked_finite:
                self._check_finite(original, start)
            pruned_blocks = None
            if pruner is not None:
                scores = held[index] if held is not None else self._scores(original, start, stop)
                with prune_order.turn(index):
                    pruned_blocks = pruner.prune(scores)
            if fused is not None:
                self._fused_chunk(original, start, stop, pruned_blocks, out)
            else:
                self._chunk(original, start, stop, pruned_blocks, out, codes_order, index)

        chunks = self.workers.map(second_pass_chunk, len(self.ranges), (prune_order, codes_order))
        for index, _ in enumerate(chunks):
            self._report(self.passes - 1, self.ranges[index][1])
        n_codes = int(out.n_codes)
        codes = out.codes if n_codes == out.codes.numel() else out.codes[:n_codes].clone()
        table = CompressedTable(
            shape=(self.local_rows, self.cols),
            dtype=dtype,
            order=self.order,
            sparsity=self.sparsity,
            quantization=self.quantization,
            codes=codes,
            scale=out.scale,
            zero_point=out.zero_point,
            keep_mask=out.mask,
            mask_per_block=per_block,
        )
        self._check_decodes_finite(table)
        if self.part is not None:
            self.part.sums = out.stats.part_sums()
        return table, out.stats.finish(out.scale, out.zero_point, n_codes)

    def _check_decodes_finite(self, table: CompressedTable) -> None:
        """Raises TableError naming the first row of `table` with a value that decodes to ±inf
        in the table's dtype: a value within a quantization step of the dtype's largest, where
        a narrow or MSE-chosen range reaches past it (float16 tables at +-65504)."""
        if table.rows == 0:
            return
        bits = self.quantization.bits
        risky = torch.cat(
            [
                may_decode_past(
                    table.scale[start : start + _QPARAM_ROWS],
                    table.zero_point[start : start + _QPARAM_ROWS],
                    bits,
                    table.dtype,
                )
                for start in range(0, table.rows, _QPARAM_ROWS)
            ]
        )
        rows = risky.nonzero().flatten().tolist()
        span = _DECODE_CHECK_ROWS
        checked_to = 0
        for row in rows:
            if row < checked_to:
                continue
            checked_to = min(row + span, table.rows)
            finite = torch.isfinite(table.decode(row, checked_to)).all(dim=1)
            bad = (~finite & risky[row:checked_to]).nonzero()
            if bad.numel():
                first_bad = self.first + row + int(bad[0, 0])
                raise UnfitSettingsError(
                    f"{self.name}: {decodes_past_message(first_bad, table.dtype)}", row=first_bad
                )

    def _chunk(
        self,
        original: torch.Tensor,
        start: int,
        stop: int,
        pruned_blocks: torch.Tensor | None,
        out: _Outputs,
        codes_order: Sequencer,
        index: int,
    ) -> None:
        """Compresses rows start:stop (chunk `index`) with tensor ops, writing into `out`.

        The chunk's codes are appended in its turn of `codes_order`.
        """
        bits = self.quantization.bits
        values, spare = self._buffer(0, original), self._buffer(1, original)
        # `seen` is the chunk as the sparsifier sees it; `values` ends up holding the chunk's
        # codes as float levels, then its decoded values.
        quantize_first = self.order == "quantize-first"
        seen = self._seen(original, start, stop, out=values) if quantize_first else original
        keep = None
        if pruned_blocks is not None:
            keep = ChunkKeep(
                value_norms(seen, self.sparsity.norm, out=spare), pruned_blocks, self.sparsity
            )
            self._store_mask(out, start, stop, pruned_blocks, keep)
        if quantize_first:
            scale, zero_point = (
                out.scale[self._local(start, stop)],
                out.zero_point[self._local(start, stop)],
            )
        else:
            if keep is not None:
                seen = keep.multiply(seen, out=values)
            scale, zero_point = self._qparams(seen, keep, start)
            out.scale[self._local(start, stop)] = scale
            out.zero_point[self._local(start, stop)] = zero_point
        levels = quantize_levels(seen, scale, zero_point, bits, out=values)
        if keep is None:
            kept = levels.reshape(-1)
        elif levels.is_cuda:  # gathering uint8 codes moves a quarter of the bytes
            kept = keep.select(levels.to(torch.uint8))
        else:  # float-to-uint8 is slow on CPU: only the kept values are converted
            kept = keep.select(levels)
        with codes_order.turn(index):
            out.append_codes(kept)
        decoded = dequantize(levels, scale, zero_point, out=values)
        if keep is not None:
            keep.multiply(decoded, out=decoded)
        # Pruned values decode to 0.0; kept ones only in rows that may_decode_to_zero (rare):
        # counting is needed only then.
        zeros = None
        if not bool(may_decode_to_zero(zero_point).any()):
            zeros = decoded.numel() - kept.numel()
        out.stats.add(start - self.first, original, decoded, work=spare, zeros=zeros)

    def _fused_chunk(
        self,
        original: torch.Tensor,
        start: int,
        stop: int,
        pruned_blocks: torch.Tensor | None,
        out: _Outputs,
    ) -> None:
        """Compresses rows start:stop with the fused kernels (whole blocks pruned, if any)."""
        block_shape = fit_blocks(original.shape, self.sparsity.block_shape)
        keep_blocks = None
        if pruned_blocks is not None:
            keep_blocks = self._store_mask(out, start, stop, pruned_blocks, None)
        if self.order == "sparsify-first":
            if keep_blocks is None:
                scale, zero_point = row_qparams(original, self.quantization, start)
            else:
                row_min, row_max = self.fused.pruned_range(original, keep_blocks, block_shape)

                def pruned_rows(chosen: torch.Tensor) -> torch.Tensor:
                    keep = expand_blocks(keep_blocks, block_shape, tuple(original.shape))
                    return original[chosen] * keep[chosen]

                row_min = exact_zero_minimums(row_min, pruned_rows)
                scale, zero_point = qparams_from_range(row_min, row_max, self.quantization, start)
            out.scale[self._local(start, stop)] = scale
            out.zero_point[self._local(start, stop)] = zero_point
        if keep_blocks is None:
            kept_per_row = torch.full((stop - start,), self.cols, device=self.device)
        else:
            kept_per_row = ChunkKeep.count_per_row(keep_blocks, block_shape, tuple(original.shape))
        offsets = torch.cumsum(kept_per_row, 0) - kept_per_row + out.n_codes
        sums = self.fused.quantize_and_keep(
            original,
            keep_blocks,
            block_shape,
            self._fused_qparams(
                out.scale[self._local(start, stop)], out.zero_point[self._local(start, stop)]
            ),
            offsets,
            out.codes,
            seen=self.order == "quantize-first",
        )
        out.n_codes = out.n_codes + kept_per_row.sum()
        out.stats.add_row_sums(start - self.first, sums)

    def _fused_qparams(
        self, scale: torch.Tensor, zero_point: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        # 1.0 / scale is quantize_levels' own reciprocal, so the kernels multiply by the same bits.
        return scale, 1.0 / scale, zero_point, self.quantization.quant_max

    def _store_mask(
        self,
        out: _Outputs,
        start: int,
        stop: int,
        pruned_blocks: torch.Tensor,
        keep: ChunkKeep | None,
    ) -> torch.Tensor:
        """Stores rows start:stop of the keep-mask; returns them (per block or per value)."""
        if self.sparsity.prunes_whole_blocks:
            rows = out.mask[self._block_rows(start, stop)]
            return torch.logical_not(pruned_blocks, out=rows)
        out.mask[self._local(start, stop)] = keep.dense()
        return out.mask[self._local(start, stop)]

    def _block_rows(self, start: int, stop: int) -> slice:
        """Returns the part's block rows that hold table rows start:stop (start a block-height
        multiple)."""
        bh = self.sparsity.block_shape[0]
        return slice((start - self.first) // bh, -(-(stop - self.first) // bh))

    def _local(self, start: int, stop: int) -> slice:
        """Returns the part's per-row entries of table rows start:stop."""
        return slice(start - self.first, stop - self.first)


_DECODE_CHECK_ROWS = 4096
"""Rows decoded at a time to find the rows that decode to ±inf (`_check_decodes_finite`)."""
_QPARAM_ROWS = 1 << 20
"""Rows whose extreme codes are decoded at a time (a few bytes each) by the same check."""


@dataclass
class _Outputs:
    """A table's results as the second pass fills them in, chunk by chunk."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor
    stats: StatsAccumulator
    mask: torch.Tensor | None = None
    # A Python int, or a 0-D device tensor once fused kernels count codes without a host sync.
    n_codes: int | torch.Tensor = 0

    def append_codes(self, kept: torch.Tensor) -> None:
        """Appends the codes of a chunk's kept values (any dtype holding whole numbers)."""
        start = int(self.n_codes)
        end = start + kept.numel()
        if end > self.codes.numel():  # never, while _max_kept holds; stays correct if it did not
            self.codes = torch.cat([self.codes[:start], self.codes.new_empty(end - start)])
        self.codes[start:end] = kept
        self.n_codes = end
