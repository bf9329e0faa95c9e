"""Per-table statistics: sparsity, scale and zero-point ranges, reconstruction error."""

from __future__ import annotations

import math
import threading
from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch


@dataclass(frozen=True)
class TableStats:
    """What compression did to one table, measured against the original values.

    `pruned_fraction` is the share of values pruned by the mask; `zero_fraction` the share that
    decodes to exactly 0.0 (pruned ones plus kept ones whose code equals the zero point).
    `rel_error` is ||x_hat - x|| / ||x|| over the whole table; row cosines compare each decoded
    row with its original (1.0 for a row that is zero in both, 0.0 for one zero in just one).
    """

    values: int
    kept: int
    pruned_fraction: float
    zero_fraction: float
    scale_min: float
    scale_median: float
    scale_max: float
    zero_point_min: float
    zero_point_max: float
    rel_error: float
    row_cosine_mean: float
    row_cosine_min: float
    zero_rows: int = 0

    def to_dict(self) -> dict[str, float | int | None]:
        """Returns the statistics as strict JSON-able data: a non-finite value becomes None."""
        return {
            name: None if isinstance(value, float) and not math.isfinite(value) else value
            for name, value in asdict(self).items()
        }


@dataclass(frozen=True)
class PartSums:
    """The additive figures of a part of a table's rows (see `engine/reduce.py`)."""

    rows: int
    error_sq: float
    original_sq: float
    cosine_sum: float
    cosine_min: float
    zeros: int


class MeasuredAgain(NamedTuple):
    """Rows whose float32 figures under- or overflowed, measured again in float64 (CPU)."""

    rows: torch.Tensor
    """The rows' indices within the chunk (int64)."""
    cosine: torch.Tensor
    """Each row's cosine (float32)."""
    original_sq: torch.Tensor
    """Each row's squared norm of the original values (float64)."""
    error_sq: torch.Tensor
    """Each row's squared norm of the error (float64)."""


_TINY_NORM = 2.0**-60
"""A row norm below this (every value under ~1e-18) was summed from float32 squares near or
below float32's smallest normal number, where they lose their digits or vanish."""


class StatsAccumulator:
    """Gathers each row's error and cosine figures chunk by chunk; `finish` sums them.

    A row's norms and dot product are reduced in float32 (one row at a time) and kept per row
    (four floats per row); `finish` sums them over the table in float64, in a fixed order. So
    the statistics (stored in the file) depend neither on torch's thread count nor on how the
    table was cut into chunks, and a CUDA run never waits for a chunk's statistics. On the CPU,
    rows whose float32 sums under- or overflow (values below ~1e-18 or above ~1e18) are
    measured again in float64, their cosines and float64 squared norms kept aside
    (`row_figures`): float32 could not hold them. Chunks of distinct rows may be added from
    several threads at once.
    """

    def __init__(self, rows: int, cols: int, device: torch.device) -> None:
        self.cols = cols
        # original norm, decoded norm, error norm, dot product
        self.per_row = torch.zeros((4, rows), dtype=torch.float32, device=device)
        self.zeros = torch.zeros((), dtype=torch.int64, device=device)
        self._lock = threading.Lock()
        self._measured_again: list[MeasuredAgain] = []

    def add(
        self,
        start: int,
        original: torch.Tensor,
        decoded: torch.Tensor,
        work: torch.Tensor | None = None,
        zeros: int | None = None,
    ) -> None:
        """Adds rows `start:` given as original float32 values and the same rows decoded.

        `work`, when given, is a float32 tensor of the chunk's shape used for temporaries;
        `zeros`, when the caller knows it, the number of decoded values that are 0.0.
        """
        if original.numel() == 0:
            return  # rows with no columns are zero in both forms: all figures stay 0
        figures = self.per_row[:, start:][:, : len(original)]
        again = row_figures(original, decoded, figures, work=work)
        count = zeros if zeros is not None else decoded.numel() - torch.count_nonzero(decoded)
        with self._lock:  # an integer count: the same whatever order the chunks come in
            self.zeros += count
            if again is not None:
                self._measured_again.append(again._replace(rows=again.rows + start))

    def add_row_sums(self, start: int, sums: torch.Tensor) -> None:
        """Adds rows `start:` given per-row float32 sums, as the fused kernels compute them.

        `sums` has shape (rows, 5): the sums of x^2, x_hat^2, (x_hat - x)^2 and x * x_hat, and
        the count of x_hat == 0 (x the original, x_hat the decoded value).
        """
        figures = self.per_row[:, start : start + sums.shape[0]]
        torch.sqrt(sums[:, :3].T, out=figures[:3])
        figures[3] = sums[:, 3]
        self.zeros += sums[:, 4].to(torch.int64).sum()

    def part_sums(self) -> PartSums:
        """Returns this part's sums, from which `combine_parts` builds a whole table's figures."""
        original_sq, error_sq = self._squares()
        cosine = self._cosines()
        return PartSums(
            rows=int(self.per_row.shape[1]),
            error_sq=error_sq,
            original_sq=original_sq,
            cosine_sum=float(_total(cosine.double())),
            cosine_min=float(cosine.min()) if cosine.numel() else 1.0,
            zeros=int(self.zeros),
        )

    def _cosines(self) -> torch.Tensor:
        original_norm, decoded_norm, _, dot = self.per_row
        cosine = row_cosines(original_norm, decoded_norm, dot)
        for again in self._measured_again:
            cosine[again.rows] = again.cosine.to(cosine.device)
        return cosine

    def _squares(self) -> tuple[float, float]:
        """Returns the table's squared norms of the original values and of the error (float64
        sums in row order; rows measured again in float64 give their own)."""
        original_norm, _, error_norm, _ = self.per_row
        original_sq, error_sq = original_norm.double().square(), error_norm.double().square()
        for again in self._measured_again:
            original_sq[again.rows] = again.original_sq.to(original_sq.device)
            error_sq[again.rows] = again.error_sq.to(error_sq.device)
        return float(_total(original_sq)), float(_total(error_sq))

    def finish(self, scale: torch.Tensor, zero_point: torch.Tensor, kept: int) -> TableStats:
        """Returns the statistics of the whole table, given its qparams and kept-value count."""
        original_norm = self.per_row[0]
        rows = self.per_row.shape[1]
        n_values = rows * self.cols
        original_sq, error_sq = self._squares()
        cosine = self._cosines()
        if original_sq > 0:
            rel_error = math.sqrt(error_sq / original_sq)
        else:
            rel_error = 0.0 if error_sq == 0 else math.inf
        scale = scale.float().cpu()
        zero_point = zero_point.float().cpu()
        has_rows = rows > 0
        return TableStats(
            values=n_values,
            kept=kept,
            pruned_fraction=(n_values - kept) / n_values if n_values else 0.0,
            zero_fraction=int(self.zeros) / n_values if n_values else 0.0,
            scale_min=float(scale.min()) if has_rows else 0.0,
            scale_median=float(scale.median()) if has_rows else 0.0,
            scale_max=float(scale.max()) if has_rows else 0.0,
            zero_point_min=float(zero_point.min()) if has_rows else 0.0,
            zero_point_max=float(zero_point.max()) if has_rows else 0.0,
            rel_error=rel_error,
            row_cosine_mean=float(_total(cosine.double())) / rows if has_rows else 1.0,
            row_cosine_min=float(cosine.min()) if has_rows else 1.0,
            zero_rows=int((original_norm == 0).sum()) if self.cols else rows,
        )


def row_figures(
    original: torch.Tensor,
    decoded: torch.Tensor,
    out: torch.Tensor,
    work: torch.Tensor | None = None,
    original_norm: torch.Tensor | None = None,
) -> MeasuredAgain | None:
    """Writes each row's figures into `out` (float32, (4, rows)): the norms of the original
    values, of the decoded ones and of the error, and their dot product, each a float32
    reduction of one row (`original_norm`, when known, is the first).

    On the CPU, rows whose float32 sums under- or overflowed (a non-zero row of norm below
    2^-60, a figure not finite) are measured again in float64: their figures are written as
    float32 holds them, and returned (MeasuredAgain) with their cosines and float64 squared
    norms, which float32 may not hold; None when there are none. `work` (float32, the rows'
    shape) holds temporaries when given.
    """
    norm_of_original, decoded_norm, error_norm, dot = out
    if original_norm is None:
        row_norms(original, out=norm_of_original)
    else:
        norm_of_original.copy_(original_norm)
    row_norms(decoded, out=decoded_norm)
    row_sums(torch.mul(original, decoded, out=work), out=dot)
    row_norms(torch.sub(decoded, original, out=work), out=error_norm)
    if original.device.type != "cpu":
        return None
    # a few reductions over the per-row figures decide for the usual chunk
    small = norm_of_original < _TINY_NORM
    finite = bool(torch.isfinite(out.sum()))
    if finite and not bool(small.any()):
        return None
    suspect = small if finite else small | ~torch.isfinite(out).all(dim=0)
    rows = suspect.nonzero().flatten()
    x = original[rows]
    nonzero = x.any(dim=1)  # an all-zero row (a padding row) is exact in float32
    if not bool(nonzero.all()):
        rows, x = rows[nonzero], x[nonzero]
        if rows.numel() == 0:
            return None
    x, y = x.double(), decoded[rows].double()
    figures = [row_norms(x), row_norms(y), row_norms(y - x), row_sums(x * y)]
    for index, figure in enumerate(figures):
        out[index, rows] = figure.float()
    cosine = row_cosines(figures[0], figures[1], figures[3]).float()
    return MeasuredAgain(rows, cosine, figures[0].square(), figures[2].square())


def row_cosines(
    original_norm: torch.Tensor, decoded_norm: torch.Tensor, dot: torch.Tensor
) -> torch.Tensor:
    """Returns each row's cosine from its norms and dot product: 1 for a row zero in both forms,
    0 for one zero in just one, clamped to [-1, 1]."""
    denominator = original_norm * decoded_norm
    cosine = torch.where(denominator > 0, dot / denominator, torch.zeros_like(dot))
    both_zero = (original_norm == 0) & (decoded_norm == 0)
    return torch.where(both_zero, torch.ones_like(cosine), cosine).clamp_(-1.0, 1.0)


# ATen splits one output's reduction across threads once it sums 32768 values or more, and the
# rounding then depends on the thread count. Sums here go through pieces of at most _PIECE
# values, so every output of every reduction is summed by one thread, in a fixed order.
_PIECE = 8192


def row_sums(values: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Returns the sum of each row of a 2-D tensor, the same for any number of threads.

    Written into `out` (one value per row) when given.
    """
    rows = values.shape[0]
    while values.shape[1] > _PIECE:
        pad = -values.shape[1] % _PIECE
        if pad:
            values = torch.nn.functional.pad(values, (0, pad))
        values = values.view(rows, values.shape[1] // _PIECE, _PIECE).sum(2)
    return values.sum(1) if out is None else torch.sum(values, 1, out=out)


def row_norms(values: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Returns the L2 norm of each row of a 2-D tensor, the same for any number of threads.

    Written into `out` (one value per row) when given.
    """
    if values.shape[1] <= _PIECE:
        return torch.linalg.vector_norm(values, dim=1, out=out)
    norms = row_sums(values * values).sqrt()
    return norms if out is None else out.copy_(norms)


def _total(values: torch.Tensor) -> torch.Tensor:
    """Returns the sum of all values of a tensor (0-D), the same for any number of threads."""
    return row_sums(values.reshape(1, -1))[0]
