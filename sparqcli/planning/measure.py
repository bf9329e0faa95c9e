"""Measuring candidates with the engine itself: each one's exact bytes and its error.

A table is measured whole (every candidate compressed by `compress_rows`, as `sparq compress`
does) when it is small, or on a row sample when it is large:

* Bytes are always exact. They follow from the format's formula (`format.spec.part_sizes`) and
  the kept count; where pruning runs over the whole table the kept count is found from the whole
  table's block scores (computed by the engine's own functions): the `round(level * n_blocks)`
  lowest blocks, ties by position, each losing `min(zeros_per_block, its size)` values (edge
  blocks are partial). Other settings (e.g. per-row scopes) get their kept count from one engine
  run over the whole table.
* Errors are estimated on a stratified sample of block rows: strata of equal importance (the
  row's share of the error denominators), the same number of block rows drawn from each (seeded,
  so plans are deterministic), and a ratio estimator per stratum. The sample is compressed by
  `compress_table` at the level that prunes, on those rows, exactly the blocks that the whole
  table's ranking prunes there, so every sampled row is compressed exactly as in the real run.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from sparqcli.engine.blocks import block_grid, fit_blocks
from sparqcli.engine.pipeline import compress_rows, compress_table
from sparqcli.engine.quantize import dequantize, quantize_levels, row_qparams
from sparqcli.engine.sparsify import block_scores, blocks_to_prune, kth_smallest, value_norms
from sparqcli.format.spec import file_bytes, part_sizes, table_file_bytes
from sparqcli.planning.space import Candidate
from sparqcli.settings import Order

RowReader = Callable[[int, int], torch.Tensor]
Progress = Callable[[float], None]

STRATA = 32
"""Strata of a row sample (of equal importance)."""
LOW_NORM_UNITS = 64
"""Block rows of smallest norm added to a sample to check the row-cosine gate (not estimated)."""
_CHUNK_VALUES = 1 << 20
SMALL_TABLE_VALUES = 1 << 20
"""Tables of at most this many values are measured on one thread (see `one_thread`)."""


@dataclass(frozen=True)
class Option:
    """One candidate measured on one table.

    `bytes`: exact bytes of the table's stored tensors; `rel_error`: relative L2 error
    ||W_hat - W|| / ||W|| (what `sparq compress` reports); `weighted_error`: the same with each
    row's terms weighted by its row weight (equal to `rel_error` without weights);
    `row_cosine_min`: the smallest row cosine over the rows measured; `exact`: measured on the
    whole table (else estimated on a sample).
    """

    candidate: Candidate
    bytes: int
    rel_error: float
    weighted_error: float
    row_cosine_min: float
    exact: bool

    def to_dict(self) -> dict[str, Any]:
        """Returns the option as JSON-able data."""
        return {
            "settings": self.candidate.label,
            **self.candidate.to_dict(),
            "bytes": self.bytes,
            "rel_error": self.rel_error,
            "weighted_error": self.weighted_error,
            "row_cosine_min": self.row_cosine_min,
            "exact": self.exact,
        }


def measure_exact(
    read_rows: RowReader,
    shape: tuple[int, int],
    dtype: torch.dtype,
    order: Order,
    candidate: Candidate,
    *,
    weights: torch.Tensor | None = None,
    name: str = "table",
) -> Option:
    """Returns `candidate` measured on the whole table, with the engine as `sparq compress` runs it.

    Raises TableError for NaN/Inf values.
    """
    table, stats = compress_rows(
        read_rows, shape, dtype, order, candidate.sparsity, candidate.quantization, name=name
    )
    weighted = stats.rel_error
    if weights is not None:
        weighted = _weighted_error(read_rows, table, weights)
    return Option(
        candidate,
        table_file_bytes(table),
        _finite_or_zero(stats.rel_error),
        _finite_or_zero(weighted),
        _finite_or_one(stats.row_cosine_min),
        exact=True,
    )


def measure_table(
    read_rows: RowReader,
    shape: tuple[int, int],
    dtype: torch.dtype,
    order: Order,
    candidates: Sequence[Candidate],
    *,
    weights: torch.Tensor | None = None,
    sample_rows: int | None = None,
    name: str = "table",
    progress: Progress | None = None,
) -> list[Option]:
    """Returns every candidate measured on one table, in the order given.

    With `sample_rows` below half the table's rows, errors are estimated on about that many
    rows (bytes stay exact); otherwise every candidate runs on the whole table.
    `weights` holds one non-negative float per row. Raises TableError for NaN/Inf values.
    """
    rows = shape[0]
    if sample_rows is None or 2 * sample_rows >= rows:
        options = []
        small = rows * shape[1] <= SMALL_TABLE_VALUES
        with one_thread() if small else contextlib.nullcontext():
            for index, candidate in enumerate(candidates):
                options.append(
                    measure_exact(
                        read_rows, shape, dtype, order, candidate, weights=weights, name=name
                    )
                )
                if progress is not None:
                    progress((index + 1) / len(candidates))
        return options
    return _SampledTable(
        read_rows, shape, dtype, order, candidates, weights, sample_rows, name
    ).run(progress)


class _SampledTable:
    """A large table: one pass for row norms and block scores, a sample, every candidate on it."""

    def __init__(
        self,
        read_rows: RowReader,
        shape: tuple[int, int],
        dtype: torch.dtype,
        order: Order,
        candidates: Sequence[Candidate],
        weights: torch.Tensor | None,
        sample_rows: int,
        name: str,
    ) -> None:
        self.read_rows = read_rows
        self.shape = shape
        self.dtype = dtype
        self.order = order
        self.candidates = list(candidates)
        self.weights = weights
        self.sample_rows = sample_rows
        self.name = name
        self.rows, self.cols = shape
        self.values = self.rows * self.cols
        heights = {fit_blocks(shape, c.sparsity.block_shape)[0] for c in self.candidates}
        step = math.lcm(*heights)
        self.chunk_rows = max(step, _CHUNK_VALUES // max(1, self.cols) // step * step)
        self.scores: dict[tuple[Any, ...], torch.Tensor] = {}
        self.pruned: dict[tuple[Any, ...], torch.Tensor] = {}
        self.lost: dict[tuple[Any, ...], int] = {}
        self.kept_by_engine: dict[tuple[Any, ...], tuple[int, bool]] = {}
        self.samples: dict[int, _Sample] = {}

    def run(self, progress: Progress | None) -> list[Option]:
        score_keys = {self._score_key(c): c for c in self.candidates if self._ranked_over_table(c)}
        row_norms = self._first_pass(score_keys)
        heights = sorted(
            {fit_blocks(self.shape, c.sparsity.block_shape)[0] for c in self.candidates}
        )
        for height in heights:
            self.samples[height] = self._draw(row_norms, height)
        self._gather()
        options = []
        with one_thread():
            for index, candidate in enumerate(self.candidates):
                options.append(self._measure(candidate))
                if progress is not None:
                    progress((index + 1) / len(self.candidates))
        return options

    # -- pass 1: row norms and the whole table's block scores -----------------------------------

    def _ranked_over_table(self, candidate: Candidate) -> bool:
        return candidate.prunes and getattr(candidate.sparsity, "scope", "table") == "table"

    def _score_key(self, candidate: Candidate) -> tuple[Any, ...]:
        sparsity = candidate.sparsity
        key: tuple[Any, ...] = (tuple(sparsity.block_shape), sparsity.norm)
        if self.order == "quantize-first":  # the sparsifier sees the dequantized table
            key += tuple(sorted(candidate.quantization.to_dict().items()))
        return key

    def _first_pass(self, score_keys: dict[tuple[Any, ...], Candidate]) -> torch.Tensor:
        row_norms = torch.empty(self.rows, dtype=torch.float64)
        for key, candidate in score_keys.items():
            grid = block_grid(self.shape, candidate.sparsity.block_shape)
            self.scores[key] = torch.empty(grid, dtype=torch.float32)
        for start in range(0, self.rows, self.chunk_rows):
            stop = min(start + self.chunk_rows, self.rows)
            values = self.read_rows(start, stop).to(torch.float32)
            row_norms[start:stop] = values.double().square().sum(dim=1)
            for key, candidate in score_keys.items():
                seen = values
                if self.order == "quantize-first":
                    scale, zero_point = row_qparams(values, candidate.quantization, start)
                    levels = quantize_levels(values, scale, zero_point, candidate.quantization.bits)
                    seen = dequantize(levels, scale, zero_point)
                norms = value_norms(seen, candidate.sparsity.norm)
                bh = fit_blocks(self.shape, candidate.sparsity.block_shape)[0]
                scores = block_scores(norms, candidate.sparsity.block_shape)
                self.scores[key][start // bh : start // bh + scores.shape[0]] = scores
        return row_norms

    # -- the sample ------------------------------------------------------------------------------

    def _draw(self, row_norms: torch.Tensor, height: int) -> _Sample:
        """Returns a stratified sample of block rows of `height` rows."""
        units = -(-self.rows // height)
        pad = units * height - self.rows
        weights = self.weights.double() if self.weights is not None else None
        weighted = row_norms * weights if weights is not None else row_norms
        mass_w = torch.nn.functional.pad(weighted, (0, pad)).view(units, height).sum(dim=1)
        mass_u = torch.nn.functional.pad(row_norms, (0, pad)).view(units, height).sum(dim=1)
        total_w, total_u = float(mass_w.sum()), float(mass_u.sum())
        importance = torch.zeros(units, dtype=torch.float64)
        if total_w > 0:
            importance += mass_w / total_w
        if total_u > 0:
            importance += mass_u / total_u
        order = torch.sort(-importance, stable=True).indices
        order = order[importance[order] > 0]
        share = importance[order]
        before = torch.cumsum(share, 0) - share
        total = float(share.sum()) or 1.0
        stratum_of = (before / total * STRATA).floor().clamp(max=STRATA - 1).long()
        members = [order[stratum_of == s] for s in range(STRATA)]
        members = [m for m in members if m.numel()]
        wanted = max(len(members), self.sample_rows // height)
        counts = _allocate(wanted, [m.numel() for m in members])
        generator = torch.Generator().manual_seed(0)
        strata = []
        chosen_units = []
        for group, count in zip(members, counts, strict=True):
            pick = group[torch.randperm(group.numel(), generator=generator)[:count]]
            strata.append((pick, float(mass_w[group].sum()), float(mass_u[group].sum())))
            chosen_units.append(pick)
        estimated = torch.cat(chosen_units) if chosen_units else torch.empty(0, dtype=torch.long)
        # The block rows of smallest norm: where pruning may empty a row (row-cosine gate).
        low = torch.sort(mass_u, stable=True).indices[:LOW_NORM_UNITS]
        all_units = torch.unique(torch.cat([estimated, low]))  # sorted: the table's row order
        return _Sample(height, all_units, strata, total_w, total_u)

    def _gather(self) -> None:
        """Reads the sampled rows of every sample, in one more pass over the table."""
        wanted: dict[int, torch.Tensor] = {}
        for height, sample in self.samples.items():
            rows = (sample.units[:, None] * height + torch.arange(height)[None, :]).flatten()
            sample.rows = rows[rows < self.rows]
            sample.values = torch.empty((sample.rows.numel(), self.cols), dtype=torch.float32)
            wanted[height] = sample.rows
        for start in range(0, self.rows, self.chunk_rows):
            stop = min(start + self.chunk_rows, self.rows)
            chunk = None
            for sample in self.samples.values():
                inside = (sample.rows >= start) & (sample.rows < stop)
                if not bool(inside.any()):
                    continue
                if chunk is None:
                    chunk = self.read_rows(start, stop).to(torch.float32)
                sample.values[inside] = chunk[sample.rows[inside] - start]
        for sample in self.samples.values():
            sample.finish(self.weights)

    # -- one candidate -------------------------------------------------------------------------

    def _measure(self, candidate: Candidate) -> Option:
        height = fit_blocks(self.shape, candidate.sparsity.block_shape)[0]
        sample = self.samples[height]
        sparsity = candidate.sparsity
        if self._ranked_over_table(candidate):
            pruned = self._pruned_blocks(candidate)
            lost_key = (*self._score_key(candidate), candidate.sparsity.level, "lost")
            if lost_key not in self.lost:
                self.lost[lost_key] = self._lost_values(candidate, pruned)
            kept = self.values - self.lost[lost_key]
            in_sample = int(pruned[sample.units].sum())
            n_sample_blocks = sample.units.numel() * pruned.shape[1]
            sparsity = replace(sparsity, level=in_sample / n_sample_blocks)
            prunes = blocks_to_prune(candidate.sparsity.level, pruned.numel()) > 0
        elif candidate.prunes:
            kept, prunes = self._kept_from_engine(candidate)
        else:
            kept, prunes = self.values, False
        table, _ = compress_table(
            sample.values, self.order, sparsity, candidate.quantization, name=self.name
        )
        rel, weighted, cosine = sample.errors(table.decode())
        mask = "none"
        if prunes and candidate.sparsity.effective_zeros_per_block > 0:
            mask = "block" if candidate.sparsity.prunes_whole_blocks else "value"
        sizes = part_sizes(
            self.shape, kept, candidate.quantization.bits, mask, candidate.sparsity.block_shape
        )
        size = file_bytes(sizes, candidate.quantization.scale_dtype)
        return Option(candidate, size, rel, weighted, cosine, exact=False)

    def _pruned_blocks(self, candidate: Candidate) -> torch.Tensor:
        """Returns the whole table's pruned blocks (bool, the block grid) under `candidate`."""
        key = (*self._score_key(candidate), candidate.sparsity.level)
        if key not in self.pruned:
            scores = self.scores[self._score_key(candidate)]
            flat = scores.reshape(-1)
            k = blocks_to_prune(candidate.sparsity.level, flat.numel())
            pruned = torch.zeros(flat.numel(), dtype=torch.bool)
            if k >= flat.numel():
                pruned[:] = True
            elif k > 0:
                value, below = kth_smallest(lambda: [flat], k)
                pruned = flat < value
                ties = torch.nonzero(flat == value).flatten()[: k - below]
                pruned[ties] = True
            self.pruned[key] = pruned.view(scores.shape)
        return self.pruned[key]

    def _lost_values(self, candidate: Candidate, pruned: torch.Tensor) -> int:
        """Returns how many values the pruned blocks lose (edge blocks hold fewer)."""
        zeros = candidate.sparsity.effective_zeros_per_block
        bh, bw = fit_blocks(self.shape, candidate.sparsity.block_shape)
        n_rows, n_cols = pruned.shape
        heights = torch.full((n_rows,), bh, dtype=torch.int64)
        widths = torch.full((n_cols,), bw, dtype=torch.int64)
        heights[-1] = self.rows - (n_rows - 1) * bh
        widths[-1] = self.cols - (n_cols - 1) * bw
        if bool((heights == bh).all()) and bool((widths == bw).all()):
            return int(pruned.sum()) * min(zeros, bh * bw)
        sizes = (heights[:, None] * widths[None, :]).clamp_(max=zeros)
        return int((sizes * pruned).sum())

    def _kept_from_engine(self, candidate: Candidate) -> tuple[int, bool]:
        """Returns the kept count and whether anything is pruned, from a whole-table run."""
        key = (
            candidate.sparsity,
            candidate.quantization if self.order == "quantize-first" else None,
        )
        if key not in self.kept_by_engine:
            table, _ = compress_rows(
                self.read_rows,
                self.shape,
                self.dtype,
                self.order,
                candidate.sparsity,
                candidate.quantization,
                name=self.name,
            )
            self.kept_by_engine[key] = (int(table.codes.numel()), table.keep_mask is not None)
        return self.kept_by_engine[key]


@dataclass
class _Sample:
    """Sampled block rows, their strata and masses, and their values."""

    height: int
    units: torch.Tensor
    strata: list[tuple[torch.Tensor, float, float]]
    total_w: float
    total_u: float
    rows: torch.Tensor | None = None
    values: torch.Tensor | None = None

    def finish(self, weights: torch.Tensor | None) -> None:
        """Precomputes, per stratum, the positions of its rows in the sample and their masses."""
        position = {int(unit): index for index, unit in enumerate(self.units.tolist())}
        unit_of_row = torch.div(self.rows, self.height, rounding_mode="floor")
        row_index = torch.tensor([position[int(u)] for u in unit_of_row.tolist()], dtype=torch.long)
        self.row_unit = row_index
        norms = self.values.double().square().sum(dim=1)
        self.row_weights = weights.double()[self.rows] if weights is not None else None
        self.row_norms = norms
        self.members = []
        for units, mass_w, mass_u in self.strata:
            slots = torch.tensor([position[int(u)] for u in units.tolist()], dtype=torch.long)
            in_stratum = torch.isin(row_index, slots)
            w = self.row_weights[in_stratum] if self.row_weights is not None else None
            sampled_u = float(norms[in_stratum].sum())
            sampled_w = float((norms[in_stratum] * w).sum()) if w is not None else sampled_u
            self.members.append((in_stratum, mass_w, mass_u, sampled_w, sampled_u))

    def errors(self, decoded: torch.Tensor) -> tuple[float, float, float]:
        """Returns the estimated (rel_error, weighted_error) and the sample's smallest row cosine."""
        original = self.values
        diff = (decoded - original).square_().sum(dim=1, dtype=torch.float64)
        num_u = num_w = 0.0
        for in_stratum, mass_w, mass_u, sampled_w, sampled_u in self.members:
            err = diff[in_stratum]
            if sampled_u > 0:
                num_u += mass_u * float(err.sum()) / sampled_u
            if sampled_w > 0:
                w = self.row_weights[in_stratum] if self.row_weights is not None else None
                num_w += mass_w * float((err * w).sum() if w is not None else err.sum()) / sampled_w
        rel = math.sqrt(num_u / self.total_u) if self.total_u > 0 else 0.0
        weighted = math.sqrt(num_w / self.total_w) if self.total_w > 0 else 0.0
        return rel, weighted, _row_cosine_min(original, decoded)


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Runs the block with torch on one intra-op thread, then restores the thread count.

    Samples and small tables make many short engine runs; with several threads each of their
    many short parallel regions waits for every thread, which costs more than it gains, and far
    more on a busy machine (measured on 2 shared cores: a plan took 10x one compression's CPU
    time with 2 threads, 6x with one). Sets process-wide state for the block's duration.
    """
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _allocate(wanted: int, sizes: list[int]) -> list[int]:
    """Returns how many of each stratum to draw: equal shares, capped by size, rest spread."""
    counts = [0] * len(sizes)
    left = min(wanted, sum(sizes))
    open_strata = [i for i, size in enumerate(sizes) if size > 0]
    while left > 0 and open_strata:
        share = max(1, left // len(open_strata))
        for i in list(open_strata):
            take = min(share, sizes[i] - counts[i], left)
            counts[i] += take
            left -= take
            if counts[i] == sizes[i]:
                open_strata.remove(i)
            if left == 0:
                break
    return counts


def _row_cosine_min(original: torch.Tensor, decoded: torch.Tensor) -> float:
    """Returns the smallest row cosine, with the engine's conventions for zero rows."""
    if original.numel() == 0:
        return 1.0
    x, y = original.double(), decoded.double()
    dot = (x * y).sum(dim=1)
    nx, ny = x.norm(dim=1), y.norm(dim=1)
    cosine = dot / (nx * ny)
    cosine = torch.where((nx == 0) & (ny == 0), torch.ones_like(cosine), cosine)
    cosine = torch.where((nx == 0) ^ (ny == 0), torch.zeros_like(cosine), cosine)
    return float(cosine.min())


def _weighted_error(read_rows: RowReader, table: Any, weights: torch.Tensor) -> float:
    """Returns the row-weighted relative error of a whole compressed table."""
    rows = table.rows
    step = max(1, _CHUNK_VALUES // max(1, table.cols))
    bh = table.sparsity.block_shape[0]
    step = max(bh, step // bh * bh)
    num = den = 0.0
    w_all = weights.double()
    for start in range(0, rows, step):
        stop = min(start + step, rows)
        original = read_rows(start, stop).double()
        decoded = table.decode(start, stop).double()
        w = w_all[start:stop]
        num += float(((decoded - original).square().sum(dim=1) * w).sum())
        den += float((original.square().sum(dim=1) * w).sum())
    return math.sqrt(num / den) if den > 0 else 0.0


def _finite_or_zero(value: float) -> float:
    return value if math.isfinite(value) else 0.0


def _finite_or_one(value: float) -> float:
    return value if math.isfinite(value) else 1.0
