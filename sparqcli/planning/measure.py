"""Measuring candidates with the engine itself: each one's exact bytes and its error.

Every number comes from the engine's own functions, called as `compress_rows` calls them
(docs/PLAN.md, "Measuring"):

* Bytes are always exact. They follow from the format's formula (`format.spec.part_sizes`) and
  the kept count: pruned blocks times what one block loses where every block is whole; with
  partial edge blocks, from the whole table's pruned blocks (the `round(level * n_blocks)`
  lowest scores, ties by position, or per block row its stable sort's first blocks).
* Errors of a large table are estimated on a stratified sample of block rows: strata of equal
  importance (the row's share of the error denominators), the same number of block rows drawn
  from each (seeded, so plans are deterministic), and a ratio estimator per stratum. Each
  sampled row is pruned as the whole table's ranking prunes it, so it decodes as in the real
  run. sparsify-first, the candidates are computed in batches (`_SparsityGroups`): a keep-mask
  per sparsity, each distinct (row, keep-mask) quantized once per quantization, rows stacked;
  float16 MSE ranges derived from the float32 search (`DERIVE_NARROW_MSE`). quantize-first,
  each candidate is one `compress_table` run on the sample.
* A small table is measured on every row the same way (sparsify-first), or by one
  `compress_rows` run per candidate (quantize-first).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from sparqcli.engine.blocks import block_grid, fit_blocks
from sparqcli.engine.pipeline import check_rows_finite, compress_rows
from sparqcli.engine.quantize import (
    decodes_past_message,
    dequantize,
    may_decode_past,
    mse_qparams,
    qparams_from_range,
    quantize_levels,
    row_errors,
    row_qparams,
    row_range,
)
from sparqcli.engine.sparsify import (
    ChunkKeep,
    block_scores,
    blocks_to_prune,
    value_norms,
)
from sparqcli.engine.stats import row_cosines, row_figures, row_norms
from sparqcli.errors import UnfitSettingsError
from sparqcli.format.spec import file_bytes, part_sizes, table_file_bytes
from sparqcli.planning.space import Candidate
from sparqcli.settings import Order, Quantization, Sparsity

RowReader = Callable[[int, int], torch.Tensor]
Progress = Callable[[float], None]

STRATA = 32
"""Strata of a row sample (of equal importance)."""
LOW_NORM_UNITS = 64
"""Block rows of smallest norm added to a sample to check the row-cosine gate (not estimated)."""
PEAK_UNITS = 64
"""float16 tables: block rows of largest magnitude added to a sample (not estimated), where a
setting may decode past float16's range, a refusal the sample must see."""
_CHUNK_VALUES = 1 << 20
_CDF_SHIFT = 12
"""quantize-first thresholds: the float scores' distribution function is counted in bins of
their bits' high 19 bits (relative width 2^-11), linear inside a bin."""
DERIVE_NARROW_MSE = True
"""Sampled tables: a float16/bfloat16 MSE candidate's range is the float32 search's (see
`_SparsityGroups._qparams`)."""
_STACK_VALUES = 1 << 18
"""Sampled rows of several quantizations are decoded stacked, up to this many values per call:
small tables' calls are mostly fixed cost; past ~2^18 values (1 MiB) the stack leaves the CPU's
caches (a small model's plan: 0.225 s stacking 2^20, 0.192 s stacking 2^18)."""
_HELD_VALUES = 1 << 22
"""A sample's rows as each sparsity leaves them are kept between quantizations up to this many
values (twice 16 MiB); past it they are made again for each quantization."""


@dataclass(frozen=True)
class Option:
    """One candidate measured on one table.

    `bytes`: exact bytes of the table's stored tensors; `rel_error`: relative L2 error
    ||W_hat - W|| / ||W|| (what `sparq compress` reports); `weighted_error`: the same with each
    row's terms weighted by its row weight (equal to `rel_error` without weights);
    `row_cosine_min`: the smallest row cosine over the rows measured; `exact`: measured on the
    whole table (else estimated on a sample); `refused`: why the engine refuses this candidate
    on this table (the TableError it raises, without the table's name; such an option is never
    chosen), else None.
    """

    candidate: Candidate
    bytes: int
    rel_error: float
    weighted_error: float
    row_cosine_min: float
    exact: bool
    refused: str | None = None

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
    threads: int | None = None,
) -> Option:
    """Returns `candidate` measured on the whole table, with the engine as `sparq compress` runs it.

    `threads` as for `compress_rows` (`sparq compress` passes its thread count). Raises
    TableError for NaN/Inf values, UnfitSettingsError where the engine refuses the candidate on
    this table.
    """
    table, stats = compress_rows(
        read_rows,
        shape,
        dtype,
        order,
        candidate.sparsity,
        candidate.quantization,
        name=name,
        threads=threads,
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
    rows (bytes stay exact, except quantize-first ones with partial edge blocks); otherwise
    every row is measured by the same batched evaluation (the engine's figures up to the order
    of float sums; options are not marked exact, so a chosen one is verified).
    `weights` holds one non-negative float per row. Raises TableError for NaN/Inf values.
    """
    rows = shape[0]
    whole = sample_rows is None or 2 * sample_rows >= rows
    # A whole table is measured as a sample of every row (the estimators are then the errors
    # themselves), with no float16 range derived: every option is the engine's, up to the
    # order of float sums (marked not exact: a chosen one is verified). Quantize-first never
    # derives float16 ranges.
    # Not for float16 tables: values near 65504 make some settings decode to inf, and whether
    # one does depends on the engine's own float16 search, which a derived range only
    # approximates (bfloat16 and float32 tables would need values near 3.4e38).
    derive_narrow = (
        order == "sparsify-first" and DERIVE_NARROW_MSE and not whole and dtype != torch.float16
    )
    return _SampledTable(
        read_rows,
        shape,
        dtype,
        order,
        candidates,
        weights,
        2 * rows if whole else sample_rows,
        name,
        derive_narrow=derive_narrow,
    ).run(progress)


class _SampledTable:
    """A table measured on a row sample (or, sparsify-first, on all its rows): one pass for row
    norms and block scores, the sample, every candidate on it."""

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
        derive_narrow: bool = False,
    ) -> None:
        self.read_rows = read_rows
        self.derive_narrow = derive_narrow
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
        self.lost: dict[tuple[Any, ...], tuple[int, bool]] = {}
        self.sizes: dict[tuple[Any, ...], int] = {}  # `_bytes` of each distinct layout
        self.row_ranks: dict[tuple[Any, ...], torch.Tensor] = {}
        self.kth: dict[tuple[Any, ...], tuple[float, int, int]] = {}
        self.row_peaks: torch.Tensor | None = None  # float16 tables: each row's largest |value|
        self.samples: dict[int, _Sample] = {}
        self.cuts: dict[tuple[Any, ...], tuple[torch.Tensor, dict[int, int]]] = {}
        self.cdf: dict[tuple[Any, ...], tuple[torch.Tensor, torch.Tensor]] = {}

    def run(self, progress: Progress | None) -> list[Option]:
        with one_thread():
            score_keys = {self._score_key(c): c for c in self.candidates if c.prunes}
            row_norms = self._first_pass(score_keys)
            heights = sorted(
                {fit_blocks(self.shape, c.sparsity.block_shape)[0] for c in self.candidates}
            )
            for height in heights:
                self.samples[height] = self._draw(row_norms, height)
            self._gather()
            if self.order == "sparsify-first":
                return self._measure_batched(progress)
            return self._measure_quantize_first(progress)

    # -- pass 1: row norms and the whole table's block scores -----------------------------------

    def _ranked_over_table(self, candidate: Candidate) -> bool:
        return candidate.prunes and getattr(candidate.sparsity, "scope", "table") == "table"

    def _score_key(self, candidate: Candidate) -> tuple[Any, ...]:
        sparsity = candidate.sparsity
        return (tuple(sparsity.block_shape), sparsity.norm)

    def _first_pass(self, score_keys: dict[tuple[Any, ...], Candidate]) -> torch.Tensor:
        row_norms = torch.empty(self.rows, dtype=torch.float64)
        if self.dtype == torch.float16:
            self.row_peaks = torch.empty(self.rows, dtype=torch.float32)
        for key, candidate in score_keys.items():
            grid = block_grid(self.shape, candidate.sparsity.block_shape)
            self.scores[key] = torch.empty(grid, dtype=torch.float32)
        for start in range(0, self.rows, self.chunk_rows):
            stop = min(start + self.chunk_rows, self.rows)
            values = self.read_rows(start, stop).to(torch.float32)
            norms = values.double().square().sum(dim=1)
            if not bool(torch.isfinite(norms).all()):  # as the engine's first pass refuses them
                check_rows_finite(self.name, values, start, self.read_rows)
            row_norms[start:stop] = norms
            if self.row_peaks is not None:
                self.row_peaks[start:stop] = values.abs().amax(dim=1)
            for key, candidate in score_keys.items():
                norms = value_norms(values, candidate.sparsity.norm)
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
        # A block row's importance: its share of the error's denominator (weighted and not),
        # plus its share of the denominator's square roots, which keeps strata for the
        # low-norm rows where table-scope pruning puts its error (Zipf tables: the largest
        # miss at a 128-row sample 24.6 % -> 8.3 %; docs/PLAN.md).
        importance = torch.zeros(units, dtype=torch.float64)
        for mass, total in ((mass_w, total_w), (mass_u, total_u)):
            if total > 0:
                roots = mass.sqrt()
                importance += mass / total + roots / float(roots.sum())
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
        drawn = torch.zeros(units, dtype=torch.float64)  # each unit's weight in block counts
        for group, count in zip(members, counts, strict=True):
            pick = group[torch.randperm(group.numel(), generator=generator)[:count]]
            strata.append((pick, float(mass_w[group].sum()), float(mass_u[group].sum())))
            chosen_units.append(pick)
            drawn[pick] = group.numel() / max(1, count)
        estimated = torch.cat(chosen_units) if chosen_units else torch.empty(0, dtype=torch.long)
        if self.sample_rows >= self.rows:  # every block row (rows of zero norm included)
            all_units = torch.arange(units)
            drawn.fill_(1.0)
        else:
            # The block rows of smallest norm: where pruning may empty a row (row-cosine gate).
            # All-zero ones are left out: they decode to zeros whatever the setting (cosine 1),
            # and a table with many would fill these places with rows that tell nothing.
            low = torch.sort(mass_u, stable=True).indices
            low = low[mass_u[low] > 0][:LOW_NORM_UNITS]
            extra = [estimated, low]
            if pad:  # the short last block row, whose pruned blocks lose fewer values
                extra.append(torch.tensor([units - 1]))
            if self.row_peaks is not None:
                peaks = torch.nn.functional.pad(self.row_peaks, (0, pad)).view(units, height)
                extra.append(torch.sort(-peaks.amax(dim=1), stable=True).indices[:PEAK_UNITS])
            all_units = torch.unique(torch.cat(extra))  # sorted: the table's row order
        return _Sample(height, all_units, strata, total_w, total_u, drawn[all_units])

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

    def _candidates_of_height(self, height: int) -> list[int]:
        """Returns the indices of the candidates whose block height (fitted to the table) is
        `height`: those one sample serves."""
        return [
            index
            for index, candidate in enumerate(self.candidates)
            if fit_blocks(self.shape, candidate.sparsity.block_shape)[0] == height
        ]

    def _measure_batched(self, progress: Progress | None) -> list[Option]:
        """Returns every candidate measured on its sample (sparsify-first), computed in batches.

        Per sample, each distinct sparsity gives the sample's keep-mask (the whole table's
        pruned blocks on the sampled block rows) and its pruned values; then each distinct
        quantization finds the qparams of the pruned values of every sparsity at once, rows
        stacked (the qparams, codes and decoded values of a row depend on that row only), and
        the rows of several quantizations are decoded in one stack (`_SparsityGroups.errors`).
        Every step is the engine's own function, as `compress_rows` calls it, so each sampled
        row decodes exactly as in the real run.
        """
        options: list[Option | None] = [None] * len(self.candidates)
        quantizations = list(dict.fromkeys(c.quantization for c in self.candidates))
        steps = len(quantizations) * len(self.samples)
        done = 0
        for height, sample in self.samples.items():
            mine = self._candidates_of_height(height)
            groups = _SparsityGroups(sample, self.dtype)
            groups.derive_narrow = self.derive_narrow
            group_of: dict[int, int] = {}
            for index in mine:
                candidate = self.candidates[index]
                kept, prunes = self._kept(candidate)
                key = candidate.sparsity if prunes else None
                if key not in groups.keys:
                    pruned = self._pruned_blocks(candidate, sample.units) if prunes else None
                    groups.add(key, pruned)
                group_of[index] = groups.keys[key]
            by_quantization: dict[Quantization, list[int]] = {q: [] for q in quantizations}
            for index in mine:
                by_quantization[self.candidates[index].quantization].append(index)
            # Quantizations needing the same groups are measured together (`errors` stacks
            # their rows), one step per range and scale dtype.
            together: dict[tuple[Any, ...], list[Quantization]] = {}
            for quantization in quantizations:
                wanted = by_quantization[quantization]
                needed = tuple(sorted({group_of[i] for i in wanted}))
                key = (needed, quantization.range, quantization.scale_dtype)
                together.setdefault(key, []).append(quantization)
            for (needed, *_), measured in together.items():
                figures = {}  # no candidate of these quantizations is this sample's
                if needed:
                    try:
                        figures = groups.errors(list(needed), measured)
                    except UnfitSettingsError as error:  # one that its refusal checks did not place
                        raise UnfitSettingsError(f"{self.name}: {error}", row=error.row) from None
                for quantization in measured:
                    for index in by_quantization[quantization]:
                        candidate = self.candidates[index]
                        rel, weighted, cosine, refused = figures[quantization][group_of[index]]
                        kept, prunes = self._kept(candidate)
                        size = self._bytes(candidate, kept, prunes)
                        options[index] = Option(
                            candidate, size, rel, weighted, cosine, False, refused
                        )
                done += len(measured)
                if progress is not None:
                    progress(done / steps)
        return [option for option in options if option is not None]

    def _measure_quantize_first(self, progress: Progress | None) -> list[Option]:
        """Returns every candidate measured on its sample (quantize-first), in batches.

        In quantize-first a row's qparams are those of its unpruned values, so per quantization
        the sample is quantized once (`_engine_qparams` with no mask, as the pipeline's first
        pass) and every sparsity shares its dequantized values, which the sparsifier sees. Their
        block scores give each sparsity's pruned blocks on the sample: `scope: row` exactly (a
        block row's own ranking); `scope: table` from the whole table's threshold, estimated
        (`_quantized_cuts`) unless the sample is the whole table. The keep-mask, the second
        quantization and the decoded values are the pipeline's own steps.
        """
        options: list[Option | None] = [None] * len(self.candidates)
        quantizations = list(dict.fromkeys(c.quantization for c in self.candidates))
        steps = len(quantizations) * len(self.samples)
        done = 0
        for height, sample in self.samples.items():
            mine = self._candidates_of_height(height)
            original = sample.values
            original_norm = row_norms(original)
            for quantization in quantizations:
                wanted = [i for i in mine if self.candidates[i].quantization == quantization]
                done += 1
                if not wanted:
                    continue
                try:
                    scale, zero_point = _engine_qparams(original, quantization, 0)
                except UnfitSettingsError as error:  # the first pass refuses every sparsity
                    row = int(error.row or 0)
                    table_row = int(sample.rows[row])
                    why = _unfit_message(original[row], quantization, table_row)
                    for index in wanted:
                        kept, prunes = self._kept(self.candidates[index])
                        size = self._bytes(self.candidates[index], kept, prunes)
                        options[index] = Option(
                            self.candidates[index], size, math.inf, math.inf, 0.0, False, why
                        )
                    continue
                bits = quantization.bits
                seen = dequantize(
                    quantize_levels(original, scale, zero_point, bits), scale, zero_point
                )
                decoded = dequantize(
                    quantize_levels(seen, scale, zero_point, bits), scale, zero_point
                )
                risky = may_decode_past(scale, zero_point, bits, self.dtype)  # every sparsity's
                norms: dict[str, torch.Tensor] = {}
                scores: dict[tuple[Any, ...], torch.Tensor] = {}
                figures: dict[
                    Sparsity | None, tuple[torch.Tensor, float, int | None, str | None]
                ] = {}
                for index in wanted:
                    candidate = self.candidates[index]
                    _, prunes = self._kept(candidate)
                    key = candidate.sparsity if prunes else None
                    if key in figures:
                        continue
                    lost = None
                    keep = None
                    if key is not None:
                        norm = key.norm
                        if norm not in norms:
                            norms[norm] = value_norms(seen, norm)
                        score_key = self._score_key(candidate)
                        if score_key not in scores:
                            scores[score_key] = block_scores(norms[norm], key.block_shape)
                        pruned = self._pruned_quantized(
                            candidate, sample, scores[score_key], quantization
                        )
                        keep = ChunkKeep(norms[norm], pruned, key).dense()
                        lost = self._sample_lost(candidate, sample, pruned)
                    kept_decoded = decoded.clone() if keep is None else decoded * keep
                    past = _decoding_past(kept_decoded, risky, self.dtype)
                    why = None
                    if bool(past.any()):
                        table_row = int(sample.rows[int(past.nonzero()[0, 0])])
                        why = decodes_past_message(table_row, self.dtype)
                    squared, cosine = _row_figures(original, original_norm, kept_decoded)
                    low = float(cosine.min()) if cosine.numel() else 1.0
                    figures[key] = (squared, low, lost, why)
                keys = list(figures)
                estimates = sample.estimate(torch.stack([figures[k][0] for k in keys]))
                found = dict(zip(keys, estimates, strict=True))
                for index in wanted:
                    candidate = self.candidates[index]
                    kept, prunes = self._kept(candidate)
                    key = candidate.sparsity if prunes else None
                    _, low, lost, why = figures[key]
                    if lost is not None:
                        kept = self.values - lost
                    rel, weighted = found[key]
                    size = self._bytes(candidate, kept, prunes)
                    options[index] = Option(candidate, size, rel, weighted, low, False, why)
                if progress is not None:
                    progress(done / steps)
        return [option for option in options if option is not None]

    def _whole_sample(self, sample: _Sample) -> bool:
        """Whether `sample` holds every block row of the table."""
        return sample.units.numel() == -(-self.rows // sample.height)

    def _pruned_quantized(
        self,
        candidate: Candidate,
        sample: _Sample,
        scores: torch.Tensor,
        quantization: Quantization,
    ) -> torch.Tensor:
        """Returns the sample's pruned blocks (quantize-first), given its block scores as the
        sparsifier sees them under `quantization`."""
        sparsity = candidate.sparsity
        n_block_rows, n_block_cols = block_grid(self.shape, sparsity.block_shape)
        if sparsity.scope == "row":  # as RowBlockPruner: a stable sort of each block row
            order = torch.sort(scores, dim=1, stable=True).indices
            ranks = torch.empty_like(order)
            ranks.scatter_(1, order, torch.arange(scores.shape[1]).expand_as(order))
            return ranks < blocks_to_prune(sparsity.level, n_block_cols)
        k = blocks_to_prune(sparsity.level, n_block_rows * n_block_cols)
        key = (self._score_key(candidate), quantization, id(sample))
        if key not in self.cuts:
            self.cuts[key] = self._quantized_cuts(candidate, sample, scores)
        order, cuts = self.cuts[key]
        cut = cuts.get(k, 0)
        pruned = torch.zeros(scores.numel(), dtype=torch.bool)
        pruned[order[:cut]] = True
        return pruned.view(scores.shape)

    def _quantized_cuts(
        self, candidate: Candidate, sample: _Sample, scores: torch.Tensor
    ) -> tuple[torch.Tensor, dict[int, int]]:
        """Returns the sample's blocks in the engine's pruning order (score, then position) and,
        for each `scope: table` level's block count k, how many of them come first: exactly the
        whole table's k lowest when the sample is the whole table; else where the estimated
        number of the table's blocks before a block reaches k.

        The estimate is a difference estimator: the weighted count of sampled blocks scoring
        less (each block row counts for the block rows of its stratum), corrected by how far the
        same count of the table's float scores (the first pass's, exact) is from its sampled
        count. The quantized and float scores of a block are close (the same values, rounded),
        so most of the sampling error cancels.
        """
        flat = scores.reshape(-1)
        order = torch.sort(flat, stable=True).indices  # ties by position: units are sorted
        ks = sorted(
            {
                blocks_to_prune(c.sparsity.level, self.n_blocks(c))
                for c in self.candidates
                if self._ranked_over_table(c) and self._score_key(c) == self._score_key(candidate)
            }
        )
        if self._whole_sample(sample):
            return order, {k: min(max(k, 0), flat.numel()) for k in ks}
        cols = scores.shape[1]
        weights = sample.unit_weights.repeat_interleave(cols)
        ordered = weights[order]
        before = torch.cumsum(ordered, 0) - ordered
        correction = self._float_correction(candidate, sample)
        bits = flat[order].view(torch.int32)
        high = (bits >> _CDF_SHIFT).long()
        fraction = (bits & ((1 << _CDF_SHIFT) - 1)).double() / (1 << _CDF_SHIFT)
        counts_below, counts_in = correction
        estimated = before + counts_below[high] + counts_in[high] * fraction + ordered / 2
        reached = torch.cummax(estimated, 0).values
        found = torch.searchsorted(reached, torch.tensor(ks, dtype=torch.float64)).tolist()
        return order, dict(zip(ks, found, strict=True))

    def n_blocks(self, candidate: Candidate) -> int:
        """Returns the number of blocks of the table under `candidate`'s block shape."""
        n_block_rows, n_block_cols = block_grid(self.shape, candidate.sparsity.block_shape)
        return n_block_rows * n_block_cols

    def _float_correction(
        self, candidate: Candidate, sample: _Sample
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns, per bin of the float scores' high bits, (the table's count of float scores
        in lower bins minus the sample's weighted count, the same for the bin itself): a
        piecewise-linear difference of the two distribution functions (`_quantized_cuts`)."""
        key = (self._score_key(candidate), id(sample), "cdf")
        if key not in self.cdf:
            table = self.scores[self._score_key(candidate)]
            bins = 1 << (31 - _CDF_SHIFT)
            whole = torch.bincount(
                (table.reshape(-1).view(torch.int32) >> _CDF_SHIFT).long(), minlength=bins
            ).double()
            sampled_scores = table[sample.units]
            weights = sample.unit_weights.repeat_interleave(sampled_scores.shape[1])
            sampled = torch.bincount(
                (sampled_scores.reshape(-1).view(torch.int32) >> _CDF_SHIFT).long(),
                weights=weights,
                minlength=bins,
            )
            difference = whole - sampled
            below = torch.cumsum(difference, 0) - difference
            self.cdf[key] = (below, difference)
        return self.cdf[key]

    def _sample_lost(
        self, candidate: Candidate, sample: _Sample, pruned: torch.Tensor
    ) -> int | None:
        """Returns how many values the table's pruned blocks lose, where partial edge blocks
        make it depend on which blocks are pruned (quantize-first; None where every block is
        whole): exact when the sample is the whole table; else the short last block row's own
        loss (it is always sampled: `_draw`) plus the other pruned blocks' count times the
        sampled full-height pruned blocks' weighted mean loss, within the table's values."""
        sparsity = candidate.sparsity
        bh, bw = fit_blocks(self.shape, sparsity.block_shape)
        if self.rows % bh == 0 and self.cols % bw == 0:
            return None
        zeros = sparsity.effective_zeros_per_block
        n_rows, n_cols = pruned.shape
        heights = torch.full((n_rows,), bh, dtype=torch.float64)
        # the last block row, where the block height does not divide the rows
        short = (sample.units == -(-self.rows // bh) - 1) & (self.rows % bh != 0)
        heights[short] = self.rows % bh
        widths = torch.full((n_cols,), bw, dtype=torch.float64)
        widths[-1] = self.cols - (n_cols - 1) * bw
        sizes = (heights[:, None] * widths[None, :]).clamp_(max=zeros) * pruned
        if self._whole_sample(sample):
            return int(sizes.sum())
        n_block_rows, n_block_cols = block_grid(self.shape, sparsity.block_shape)
        if sparsity.scope == "row":
            n_pruned = (
                min(blocks_to_prune(sparsity.level, n_block_cols), n_block_cols) * n_block_rows
            )
        else:
            n_pruned = blocks_to_prune(sparsity.level, n_block_rows * n_block_cols)
        # The short block row counts once, as it is; the others by their strata's weights.
        short_lost = float(sizes[short].sum())
        others = n_pruned - float(pruned[short].sum())
        weights = sample.unit_weights[~short][:, None]
        count = float((weights * pruned[~short]).sum())
        if count <= 0:
            others_lost = others * min(zeros, bh * bw)
        else:
            others_lost = others * float((weights * sizes[~short]).sum()) / count
        return min(self.values, max(0, round(short_lost + others_lost)))

    def _bytes(self, candidate: Candidate, kept: int, prunes: bool) -> int:
        """Returns the table's exact stored bytes under `candidate`, given its kept count."""
        mask = "none"
        if prunes and candidate.sparsity.effective_zeros_per_block > 0:
            mask = "block" if candidate.sparsity.prunes_whole_blocks else "value"
        quantization = candidate.quantization
        block_shape = tuple(candidate.sparsity.block_shape)
        key = (kept, quantization.bits, quantization.scale_dtype, mask, block_shape)
        if key not in self.sizes:
            sizes = part_sizes(self.shape, kept, quantization.bits, mask, block_shape)
            self.sizes[key] = file_bytes(sizes, quantization.scale_dtype)
        return self.sizes[key]

    def _kept(self, candidate: Candidate) -> tuple[int, bool]:
        """Returns the whole table's kept count under `candidate` and whether anything is pruned
        (as the engine decides it: no block to prune means no mask).

        Each pruned block loses `min(zeros_per_block, its size)` values. Where every block is
        whole, that is the number of pruned blocks (`round(level * n_blocks)`, or per block row
        `round(level * n_block_cols)`) times one block's loss; with partial edge blocks, the
        whole table's pruned blocks say which blocks lose fewer.
        """
        if not candidate.prunes:
            return self.values, False
        sparsity = candidate.sparsity
        key = (*self._score_key(candidate), sparsity.level, sparsity.scope, "kept")
        if key not in self.lost:
            zeros = sparsity.effective_zeros_per_block
            bh, bw = fit_blocks(self.shape, sparsity.block_shape)
            n_block_rows, n_block_cols = block_grid(self.shape, sparsity.block_shape)
            if sparsity.scope == "row":
                per_row = min(blocks_to_prune(sparsity.level, n_block_cols), n_block_cols)
                n_pruned = per_row * n_block_rows if n_block_cols else 0
            else:
                n_pruned = blocks_to_prune(sparsity.level, n_block_rows * n_block_cols)
            if self.rows % bh == 0 and self.cols % bw == 0:
                lost = n_pruned * min(zeros, bh * bw)
            else:
                lost = self._lost_values(candidate, self._pruned_blocks(candidate))
            self.lost[key] = (lost, n_pruned > 0)
        lost, prunes = self.lost[key]
        return self.values - lost, prunes

    def _pruned_blocks(
        self, candidate: Candidate, units: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Returns the pruned blocks (bool) of block rows `units` (None: the whole block grid)
        under `candidate`, as the engine prunes the whole table.

        `scope: table`: the `round(level * n_blocks)` lowest scores of the whole table, ties by
        position (the engine's radix select); `scope: row`: in each block row, the
        `round(level * n_block_cols)` first blocks of its stable ascending sort, as
        `RowBlockPruner` prunes (a block row's own scores decide: only `units` are ranked).
        """
        score_key = self._score_key(candidate)
        scores = self.scores[score_key]
        if candidate.sparsity.scope == "row":
            rank_key = (*score_key, None if units is None else id(units))
            if rank_key not in self.row_ranks:
                chosen = scores if units is None else scores[units]
                order = torch.sort(chosen, dim=1, stable=True).indices
                ranks = torch.empty_like(order)
                ranks.scatter_(1, order, torch.arange(chosen.shape[1]).expand_as(order))
                self.row_ranks[rank_key] = ranks
            per_row = blocks_to_prune(candidate.sparsity.level, scores.shape[1])
            return self.row_ranks[rank_key] < per_row
        flat = scores.reshape(-1)
        k = blocks_to_prune(candidate.sparsity.level, flat.numel())
        chosen = scores if units is None else scores[units]
        if k <= 0:
            return torch.zeros_like(chosen, dtype=torch.bool)
        if k >= flat.numel():
            return torch.ones_like(chosen, dtype=torch.bool)
        value, below, equal = self._kth_score(candidate, k)
        if below + equal == k:  # every block scoring the threshold is pruned
            return chosen <= value
        key = (*score_key, k)
        if key not in self.pruned:  # some ties are kept: the first ones by position are pruned
            pruned = flat < value
            pruned[torch.nonzero(flat == value).flatten()[: k - below]] = True
            self.pruned[key] = pruned.view(scores.shape)
        pruned = self.pruned[key]
        return pruned if units is None else pruned[units]

    def _kth_score(self, candidate: Candidate, k: int) -> tuple[float, int, int]:
        """Returns the k-th smallest block score of the whole table (`scope: table`), how many
        score less, and how many score the same; found for every level of the candidates at
        once (`_kth_values`)."""
        score_key = self._score_key(candidate)
        if (*score_key, k) not in self.kth:
            flat = self.scores[score_key].reshape(-1)
            ks = {
                blocks_to_prune(c.sparsity.level, flat.numel())
                for c in self.candidates
                if self._ranked_over_table(c) and self._score_key(c) == score_key
            }
            ks = sorted(j for j in ks | {k} if 0 < j < flat.numel())
            for j, found in zip(ks, _kth_values(flat, ks), strict=True):
                self.kth[(*score_key, j)] = found
        return self.kth[(*score_key, k)]

    def _lost_values(self, candidate: Candidate, pruned: torch.Tensor) -> int:
        """Returns how many values the pruned blocks lose (edge blocks hold fewer)."""
        zeros = candidate.sparsity.effective_zeros_per_block
        bh, bw = fit_blocks(self.shape, candidate.sparsity.block_shape)
        n_rows, n_cols = pruned.shape
        heights = torch.full((n_rows,), bh, dtype=torch.int64)
        widths = torch.full((n_cols,), bw, dtype=torch.int64)
        heights[-1] = self.rows - (n_rows - 1) * bh
        widths[-1] = self.cols - (n_cols - 1) * bw
        sizes = (heights[:, None] * widths[None, :]).clamp_(max=zeros)
        return int((sizes * pruned).sum())


@dataclass
class _Sample:
    """Sampled block rows, their strata and masses, and their values."""

    height: int
    units: torch.Tensor
    strata: list[tuple[torch.Tensor, float, float]]
    total_w: float
    total_u: float
    unit_weights: torch.Tensor | None = None
    """Per sampled block row, how many of the table's block rows it stands for (its stratum's
    size over its draw; 0 for block rows drawn only for the row-cosine gate)."""
    rows: torch.Tensor | None = None
    values: torch.Tensor | None = None

    def finish(self, weights: torch.Tensor | None) -> None:
        """Precomputes each sampled row's factor in the ratio estimators of its stratum.

        A stratum's error sum is estimated as its exact ||W||^2 mass times the sampled rows'
        error sum over their ||W||^2 sum: each row's error counts `mass / sampled` times (0 for
        rows in no stratum: the low-norm rows, drawn only for the row-cosine gate).
        """
        position = {int(unit): index for index, unit in enumerate(self.units.tolist())}
        unit_of_row = torch.div(self.rows, self.height, rounding_mode="floor")
        row_index = torch.tensor([position[int(u)] for u in unit_of_row.tolist()], dtype=torch.long)
        norms = self.values.double().square().sum(dim=1)
        row_weights = weights.double()[self.rows] if weights is not None else None
        self.factor_u = torch.zeros_like(norms)
        self.factor_w = torch.zeros_like(norms)
        for units, mass_w, mass_u in self.strata:
            slots = torch.tensor([position[int(u)] for u in units.tolist()], dtype=torch.long)
            in_stratum = torch.isin(row_index, slots)
            sampled_u = float(norms[in_stratum].sum())
            if row_weights is None:
                sampled_w, w = sampled_u, 1.0
            else:
                w = row_weights[in_stratum]
                sampled_w = float((norms[in_stratum] * w).sum())
            if sampled_u > 0:
                self.factor_u[in_stratum] = mass_u / sampled_u
            if sampled_w > 0:
                self.factor_w[in_stratum] = w * (mass_w / sampled_w)

    def estimate(self, squared: torch.Tensor) -> list[tuple[float, float]]:
        """Returns the estimated (rel_error, weighted_error) of each row of `squared`: float64
        (options, sampled rows), each sampled row's squared error under one option."""
        num_u = (squared @ self.factor_u).tolist()
        num_w = (squared @ self.factor_w).tolist()
        return [
            (_relative(u, self.total_u), _relative(w, self.total_w))
            for u, w in zip(num_u, num_w, strict=True)
        ]

    def errors(self, decoded: torch.Tensor) -> tuple[float, float, float]:
        """Returns the estimated (rel_error, weighted_error) and the sample's smallest row cosine."""
        original = self.values
        squared = (decoded.double() - original.double()).square_().sum(dim=1)
        [(rel, weighted)] = self.estimate(squared[None])
        return rel, weighted, _row_cosine_min(original, decoded)


@dataclass
class _Chunk:
    """Sampled rows decoded together: their name (the same rows under the same name each time),
    their keep-masks (bool; None: no pruning) and their rows in the sample."""

    batch: tuple[str, int]
    keep: torch.Tensor | None
    rows: torch.Tensor

    def keep_values(self) -> torch.Tensor:
        """Returns the keep-masks as float32 0/1, made for this use (4 bytes a value: not held):
        converting and multiplying by floats is ~3x faster than a product with a bool mask, and
        the same (as `ChunkKeep.multiply` multiplies)."""
        return self.keep.float()


@dataclass
class _Quantized:
    """A chunk under one quantization: its rows (original, and as the quantizer sees them), its
    qparams and width, and its rows' refusals so far."""

    chunk: _Chunk
    bits: int
    original: torch.Tensor
    seen: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor
    refusals: torch.Tensor


class _SparsityGroups:
    """A sample's distinct sparsities (None: no pruning), each one's keep-mask, and the errors
    of all of them under several quantizations, computed at once.

    A sampled row's qparams, codes and decoded values depend on that row's values and keep-mask
    only, so each distinct (row, keep-mask) is quantized once: a row that several levels or
    scopes prune alike (rows no level touches, levels that prune as many blocks per block row)
    costs one row. Rows without pruning (no mask at all) are a batch of their own, where the
    MSE search sees no mask (`keep` None), as in the engine. Only the masks are held (a byte
    per sampled value and sparsity); rows are quantized in chunks of `_CHUNK_VALUES` values.
    """

    def __init__(self, sample: _Sample, dtype: torch.dtype) -> None:
        self.sample = sample
        self.dtype = dtype
        self.keys: dict[Any, int] = {}
        self.keep: list[torch.Tensor | None] = []
        self.original_norm = row_norms(sample.values)
        # float64: a float32 row's squared norm overflows float32 from values of about 1e19
        self.original_squared = sample.values.double().square().sum(dim=1)
        self._distinct: tuple[torch.Tensor, ...] | None = None
        self._quantized_rows = 0
        self.derive_narrow = False
        self._wide_mse: dict[tuple[str, int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self._held: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self._ranges: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self._held_values = 0

    def add(self, sparsity: Sparsity | None, pruned_blocks: torch.Tensor | None) -> int:
        """Returns the group of `sparsity` pruning `pruned_blocks` (the sample's block grid),
        its keep-mask made as the pipeline's second pass makes a chunk's.
        Every group is added before the first `errors`."""
        if sparsity not in self.keys:
            keep = None
            if sparsity is not None:
                norms = value_norms(self.sample.values, sparsity.norm)
                keep = ChunkKeep(norms, pruned_blocks, sparsity).dense().contiguous()
            self.keys[sparsity] = len(self.keep)
            self.keep.append(keep)
        return self.keys[sparsity]

    def errors(
        self, groups: list[int], quantizations: Sequence[Quantization]
    ) -> dict[Quantization, dict[int, tuple[float, float, float, str | None]]]:
        """Returns, per quantization, (rel_error, weighted_error, row_cosine_min, refused) of
        each group under it, estimated on the sample; `refused` is the engine's message for the
        group's first sampled row it refuses (UnfitSettingsError), else None.

        Each quantization's qparams are its own (min/max ranges and float32 searches are
        shared where they can be); the rows of all of them are then decoded stacked
        (`_decode`): a row's codes and figures depend on that row, its keep-mask, its qparams
        and its width only, and on a small table the tensor calls' fixed cost is most of the
        work."""
        rows, cols = self.sample.values.shape
        keep, row_of, index = self.distinct()
        dense = any(self.keep[g] is None for g in groups)
        dense_rows = rows if dense else 0
        # Rows that keep nothing decode to zeros whatever their qparams (distinct() puts them
        # last): their squared error is their own, their cosine 0 (1 for a zero row).
        quantized = self._quantized_rows
        batches = [("dense", None, torch.arange(rows))] if dense else []
        batches.append(("pruned", keep[:quantized], row_of[:quantized]))
        step = max(1, _CHUNK_VALUES // max(1, cols))
        chunks = []
        for name, batch_keep, batch_rows in batches:
            for start in range(0, batch_rows.numel(), step):
                chunk_keep = None if batch_keep is None else batch_keep[start : start + step]
                chunks.append(_Chunk((name, start), chunk_keep, batch_rows[start : start + step]))
        decoded = self._decode([(q, chunk) for q in quantizations for chunk in chunks])
        emptied = self.original_squared[row_of[quantized:]]
        emptied_cosine = (emptied == 0).float()
        emptied_refusals = torch.zeros(emptied.numel(), dtype=torch.int8)
        # (groups, rows): where each group's sampled rows are in the results
        positions = torch.stack(
            [torch.arange(rows) if self.keep[g] is None else index[g] + dense_rows for g in groups]
        )
        found = {}
        for number, quantization in enumerate(quantizations):
            mine = decoded[number * len(chunks) : (number + 1) * len(chunks)]
            all_squared = torch.cat([part[0] for part in mine] + [emptied])
            all_cosine = torch.cat([part[1] for part in mine] + [emptied_cosine])
            all_refusals = torch.cat([part[2] for part in mine] + [emptied_refusals])
            estimates = self.sample.estimate(all_squared[positions])
            lowest = all_cosine[positions].amin(dim=1).tolist() if rows else [1.0] * len(groups)
            refused = [None] * len(groups)
            if bool(all_refusals.any()):
                refused = [
                    self._refusal(line, all_refusals, dense_rows, quantization)
                    for line in positions
                ]
            found[quantization] = {
                group: (rel, weighted, low, why)
                for group, (rel, weighted), low, why in zip(
                    groups, estimates, lowest, refused, strict=True
                )
            }
        return found

    def _refusal(
        self,
        positions: torch.Tensor,
        refusals: torch.Tensor,
        dense_rows: int,
        quantization: Quantization,
    ) -> str | None:
        """Returns the engine's message for the first of a group's sampled rows (`positions` in
        the results) that it refuses under `quantization` (`refusals`: `_UNFIT` or `_PAST` per
        result row), or None."""
        kinds = refusals[positions]
        if not bool(kinds.any()):
            return None
        first = int(kinds.nonzero()[0, 0])
        position = int(positions[first])
        if position < dense_rows:
            row, keep = position, None
        else:
            distinct_keep, row_of, _ = self.distinct()
            row, keep = int(row_of[position - dense_rows]), distinct_keep[position - dense_rows]
        table_row = int(self.sample.rows[row])
        if int(kinds[first]) == _PAST:
            return decodes_past_message(table_row, self.dtype)
        values = self.sample.values[row]
        return _unfit_message(values if keep is None else values * keep, quantization, table_row)

    def distinct(self) -> tuple[torch.Tensor, ...]:
        """Returns the distinct pruned rows: their keep-masks, their rows in the sample, and for
        each group and sampled row the index of its distinct row (-1 for groups without
        pruning)."""
        if self._distinct is None:
            rows, cols = self.sample.values.shape
            pruned = [g for g in range(len(self.keep)) if self.keep[g] is not None]
            index = torch.full((len(self.keep), rows), -1, dtype=torch.long)
            if not pruned or rows == 0:
                self._distinct = (
                    torch.empty((0, cols), dtype=torch.bool),
                    torch.empty(0, dtype=torch.long),
                    index,
                )
                return self._distinct
            keep = torch.stack([self.keep[g] for g in pruned]).view(-1, cols)
            row_ids = torch.arange(rows).repeat(len(pruned))
            # a key per (row, keep-mask): the row, then the mask's bits packed 62 to an int64
            pad = -cols % 62
            bits = torch.nn.functional.pad(keep, (0, pad)).view(keep.shape[0], -1, 62).long()
            packed = (bits << torch.arange(62)).sum(dim=2)
            keys = torch.cat([row_ids[:, None], packed], dim=1)
            inverse, first = _distinct_rows(keys)
            # the rows that keep something first, then those that keep nothing
            order = torch.sort(~keep[first].any(dim=1), stable=True).indices
            self._quantized_rows = int(keep[first].any(dim=1).sum())
            place = torch.empty_like(order)
            place[order] = torch.arange(order.numel())
            index[pruned] = place[inverse].view(len(pruned), rows)
            first = first[order]
            self._distinct = (keep[first], row_ids[first], index)
        return self._distinct

    def _decode(
        self, parts: list[tuple[Quantization, _Chunk]]
    ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Returns, per part (a chunk of sampled rows under a quantization), each row's squared
        error (float64), row cosine and refusal: the rows, pruned values zeroed (as
        `ChunkKeep.multiply` zeroes them), quantized as the pipeline does. A row the engine
        refuses (its qparams do not fit: `_UNFIT`; it decodes to ±inf in the table's dtype:
        `_PAST`; else 0, int8) has meaningless figures. Consecutive parts are decoded as one
        stack of rows, each row with its own qparams and width, up to `_STACK_VALUES` values."""
        found: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        cols = self.sample.values.shape[1]
        stack: list[_Quantized] = []
        stacked = 0
        for quantization, chunk in parts:
            if stack and stacked + chunk.rows.numel() * cols > _STACK_VALUES:
                found += self._decode_stack(stack)
                stack, stacked = [], 0
            stack.append(self._quantized(chunk, quantization))
            stacked += chunk.rows.numel() * cols
        if stack:
            found += self._decode_stack(stack)
        return found

    def _quantized(self, chunk: _Chunk, quantization: Quantization) -> _Quantized:
        """Returns `chunk`'s rows and their qparams under `quantization`, ready to decode."""
        original, seen = self._rows(chunk)
        refusals = torch.zeros(chunk.rows.numel(), dtype=torch.int8)
        try:
            scale, zero_point = self._qparams(seen, chunk.keep, quantization, chunk.batch)
        except UnfitSettingsError:
            unfit = _unfit_rows(seen, quantization)
            if not bool(unfit.any()):
                raise
            refusals[unfit] = _UNFIT
            seen = seen.masked_fill(unfit[:, None], 0.0)  # the rows' figures are discarded
            # Not under the batch's name: a float32 search of these zeroed rows, kept, would
            # serve the next quantization of this width, which must see (and refuse) the rows.
            scale, zero_point = self._qparams(seen, chunk.keep, quantization, None)
        return _Quantized(chunk, quantization.bits, original, seen, scale, zero_point, refusals)

    def _decode_stack(
        self, stack: list[_Quantized]
    ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Returns `_decode`'s figures of `stack`, its rows decoded stacked: one call of each
        step for all of them."""
        sizes = [part.chunk.rows.numel() for part in stack]
        widths = {part.bits for part in stack}
        bits: int | torch.Tensor = next(iter(widths))
        if len(widths) > 1:
            bits = torch.cat(
                [torch.full((n,), part.bits) for part, n in zip(stack, sizes, strict=True)]
            )

        def stacked(parts: list[torch.Tensor]) -> torch.Tensor:
            return parts[0] if len(parts) == 1 else torch.cat(parts)

        original = stacked([part.original for part in stack])
        seen = stacked([part.seen for part in stack])
        scale = stacked([part.scale for part in stack])
        zero_point = stacked([part.zero_point for part in stack])
        norms = self.original_norm[stacked([part.chunk.rows for part in stack])]
        levels = quantize_levels(seen, scale, zero_point, bits)
        decoded = dequantize(levels, scale, zero_point, out=levels)
        for part, rows in zip(stack, decoded.split(sizes), strict=True):
            if part.chunk.keep is not None:
                rows *= part.chunk.keep_values()
        risky = may_decode_past(scale, zero_point, bits, self.dtype)
        past = _decoding_past(decoded, risky, self.dtype)
        squared, cosine = _row_figures(original, norms, decoded)
        found = []
        for part, part_squared, part_cosine, part_past in zip(
            stack, squared.split(sizes), cosine.split(sizes), past.split(sizes), strict=True
        ):
            part.refusals[(part.refusals == 0) & part_past] = _PAST
            found.append((part_squared, part_cosine, part.refusals))
        return found

    def _rows(self, chunk: _Chunk) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the chunk's sampled rows and the same rows with pruned values zeroed (as
        `ChunkKeep.multiply` zeroes them), kept for the next quantization while they fit
        `_HELD_VALUES`."""
        if chunk.batch in self._held:
            return self._held[chunk.batch]
        original = self.sample.values[chunk.rows]
        found = (original, original if chunk.keep is None else original * chunk.keep_values())
        if self._held_values + original.numel() <= _HELD_VALUES:
            self._held[chunk.batch] = found
            self._held_values += original.numel()
        return found

    def _qparams(
        self,
        seen: torch.Tensor,
        keep: torch.Tensor | None,
        quantization: Quantization,
        batch: tuple[str, int] | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the rows' qparams: the engine's, except that with `derive_narrow`, a float16
        or bfloat16 MSE range is the float32 search's range, rounded as that dtype stores it
        (the search itself is run once per width, for float32). `batch` names the rows (the
        same rows under the same name each time): their min/max range and float32 searches
        are kept for the next quantization; None: nothing is kept or reused (rows some of which
        were zeroed because this quantization refuses them)."""
        if quantization.range == "minmax":
            return self._minmax_qparams(seen, quantization, batch)
        wide = replace(quantization, scale_dtype="float32")
        derive = self.derive_narrow and quantization.scale_dtype != "float32"
        if quantization.scale_dtype != "float32" and not derive:
            return mse_qparams(seen, quantization, keep)
        if batch is None:
            scale, zero_point = mse_qparams(seen, wide, keep)
        else:
            key = (*batch, quantization.bits)
            if key not in self._wide_mse:
                self._wide_mse[key] = mse_qparams(seen, wide, keep)
            scale, zero_point = self._wide_mse[key]
        if not derive:
            return scale, zero_point
        low = -1 * zero_point * scale
        high = low + scale * float(quantization.quant_max)
        # a candidate of the search (scored by its error), as the kernel makes them
        scale, zero_point = qparams_from_range(
            low, high, quantization, check=False, refuse_off_grid=False
        )
        # As in the search, a row keeps min/max's qparams where they do better (rows whose
        # float16 rounding dominates: near-zero rows); min/max's raise where the engine would.
        minmax_scale, minmax_zero_point = self._minmax_qparams(seen, quantization, batch)
        weights = None if keep is None else keep.float()
        derived = row_errors(seen, weights, scale, zero_point, quantization.bits)
        minmax = row_errors(seen, weights, minmax_scale, minmax_zero_point, quantization.bits)
        better = derived.nan_to_num_(nan=float("inf")) < minmax
        return (
            torch.where(better, scale, minmax_scale),
            torch.where(better, zero_point, minmax_zero_point),
        )

    def _minmax_qparams(
        self, seen: torch.Tensor, quantization: Quantization, batch: tuple[str, int] | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns `row_qparams(seen, quantization)`, from the rows' range kept under `batch`
        (every width and scale dtype starts from the same range)."""
        if batch is None or seen.shape[1] == 0:
            return row_qparams(seen, quantization)
        if batch not in self._ranges:
            self._ranges[batch] = row_range(seen)
        return qparams_from_range(*self._ranges[batch], quantization)


_UNFIT, _PAST = 1, 2
"""Why the engine refuses a sampled row: its qparams do not fit (`row_qparams` raises), or it
decodes to ±inf in the table's dtype (the pipeline's last check)."""


def _unfit_rows(seen: torch.Tensor, quantization: Quantization) -> torch.Tensor:
    """Returns, per row of `seen` (pruned values zeroed), whether `row_qparams` refuses it: its
    min/max qparams are not finite once unchecked (`qparams_from_range`). An MSE search raises
    for the same rows (it starts from min/max's qparams)."""
    scale, zero_point = qparams_from_range(
        seen.amin(dim=1), seen.amax(dim=1), quantization, check=False
    )
    return ~(torch.isfinite(scale) & torch.isfinite(zero_point))


def _unfit_message(row: torch.Tensor, quantization: Quantization, table_row: int) -> str:
    """Returns the engine's message refusing `row` (its values, pruned ones zeroed), found
    unfit by `_unfit_rows`, as row `table_row` of the table."""
    try:
        row_qparams(row[None], quantization, table_row)
    except UnfitSettingsError as error:
        return str(error)
    raise AssertionError(f"row {table_row} was found unfit but its qparams fit")


def _decoding_past(decoded: torch.Tensor, risky: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Returns, per row of `decoded` (float32, pruned values zeroed), whether a value is ±inf
    once rounded to the table's `dtype`: the pipeline's last check, on the rows whose extreme
    codes may decode past it (`risky`, from `may_decode_past` of the rows' qparams)."""
    past = risky.clone()
    if bool(risky.any()):
        past[risky] = ~torch.isfinite(decoded[risky].to(dtype)).all(dim=1)
    return past


def _row_figures(
    original: torch.Tensor, original_norm: torch.Tensor, decoded: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns each row's squared error (float64) and row cosine, as the engine's statistics
    reduce them (`engine.stats.row_figures`)."""
    figures = torch.empty((4, original.shape[0]), dtype=torch.float32)
    again = row_figures(original, decoded, figures, original_norm=original_norm)
    cosine = row_cosines(*figures[[0, 1, 3]])
    squared = figures[2].double().square_()
    if again is not None:
        cosine[again.rows] = again.cosine
        squared[again.rows] = again.error_sq
    return squared, cosine


def _distinct_rows(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns, for an int64 matrix `keys`, each row's index among its distinct rows in
    ascending lexicographic order (`torch.unique(keys, dim=0, return_inverse=True)`'s inverse)
    and, per distinct row, the first row that holds it.

    One stable sort per column, last column first, orders the rows lexicographically (equal
    rows stay in row order); torch's `unique(dim=0)` compares rows one pair at a time, which
    cost a fifth of a small model's plan.
    """
    order = torch.arange(keys.shape[0])
    for column in reversed(range(keys.shape[1])):
        order = order[torch.sort(keys[order, column], stable=True).indices]
    ordered = keys[order]
    starts = torch.ones(keys.shape[0], dtype=torch.bool)
    starts[1:] = (ordered[1:] != ordered[:-1]).any(dim=1)
    inverse = torch.empty_like(order)
    inverse[order] = torch.cumsum(starts, 0) - 1
    return inverse, order[starts]


def _kth_values(flat: torch.Tensor, ks: list[int]) -> list[tuple[float, int, int]]:
    """Returns, for each k (1-based, ascending), the k-th smallest of non-negative float32
    values, how many values are smaller and how many equal it.

    The value `engine.sparsify.kth_smallest` selects, for several k in one pass: non-negative
    floats order like their int32 bits, so one histogram of the high 16 bits gives each k's bin,
    and the values of those few bins are sorted.
    """
    bits = flat.view(torch.int32)
    high = bits >> 16
    counts = torch.bincount(high, minlength=1 << 15)
    cumulative = torch.cumsum(counts, 0)
    bins = torch.searchsorted(cumulative, torch.tensor(ks, dtype=cumulative.dtype)).tolist()
    in_bin: dict[int, torch.Tensor] = {}
    found = []
    for k, bin_index in zip(ks, bins, strict=True):
        if bin_index not in in_bin:
            in_bin[bin_index] = torch.sort(flat[high == bin_index]).values
        ordered = in_bin[bin_index]
        before = int(cumulative[bin_index - 1]) if bin_index > 0 else 0
        value = ordered[k - before - 1]
        below = before + int(torch.searchsorted(ordered, value, right=False))
        equal = int(torch.searchsorted(ordered, value, right=True)) - (below - before)
        found.append((float(value), below, equal))
    return found


def _engine_qparams(
    values: torch.Tensor,
    quantization: Quantization,
    first_row: int,
    keep: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns the qparams the pipeline gives rows `values` (pruned values zeroed, kept ones
    marked by `keep`; None: all kept): min/max or the MSE range search."""
    if quantization.range == "minmax":
        return row_qparams(values, quantization, first_row)
    return mse_qparams(values, quantization, keep, first_row)


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


def _relative(error_sum: float, total: float) -> float:
    """Returns sqrt(error_sum / total), 0 for a zero table; +inf where the error sum is not a
    number (an overflow), so that such an estimate is never chosen."""
    if math.isnan(error_sum):
        return math.inf
    return math.sqrt(max(0.0, error_sum) / total) if total > 0 else 0.0


def _finite_or_zero(value: float) -> float:
    return value if math.isfinite(value) else 0.0


def _finite_or_one(value: float) -> float:
    return value if math.isfinite(value) else 1.0
