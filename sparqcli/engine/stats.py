"""Per-table statistics: sparsity, scale and zero-point ranges, reconstruction error."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

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

    def to_dict(self) -> dict[str, float | int]:
        """Returns the statistics as a JSON-able dict."""
        return asdict(self)


class StatsAccumulator:
    """Gathers error and cosine statistics chunk by chunk, in float64.

    The running sums stay tensors on the chunks' device, so a CUDA run does not wait for each
    chunk's statistics; `finish` reads them once.
    """

    def __init__(self) -> None:
        self.values = 0
        self.rows = 0
        self.error_sq: torch.Tensor | float = 0.0
        self.original_sq: torch.Tensor | float = 0.0
        self.cosine_sum: torch.Tensor | float = 0.0
        self.cosine_min: torch.Tensor | float = math.inf
        self.zeros: torch.Tensor | int = 0

    def add(
        self, original: torch.Tensor, decoded: torch.Tensor, work: torch.Tensor | None = None
    ) -> None:
        """Adds a chunk of original float32 rows and the same rows decoded.

        `work`, when given, is a float32 tensor of the chunk's shape used for temporaries.
        """
        self.values += original.numel()
        rows = original.shape[0]
        self.rows += rows
        if original.numel() == 0:
            # Rows with no columns are zero in both forms.
            self.cosine_sum += float(rows)
            if rows:
                self.cosine_min = min(self.cosine_min, 1.0)
            return
        # Row norms and dot products are reduced in float32 (one row at a time) and summed
        # over rows in float64: accurate to float32 precision per row, and 3x cheaper.
        # Every sum goes through _row_sums, so the statistics (stored in the file) do not
        # depend on torch's thread count.
        original_norm = _row_norms(original)
        decoded_norm = _row_norms(decoded)
        zeros = decoded.numel() - torch.count_nonzero(decoded)
        dot = _row_sums(torch.mul(original, decoded, out=work))
        error_norm = _row_norms(torch.sub(decoded, original, out=work))
        self._accumulate(original_norm, decoded_norm, error_norm, dot, zeros)

    def add_row_sums(self, sums: torch.Tensor, cols: int) -> None:
        """Adds a chunk of rows with `cols` columns (at least one) given per-row float32 sums.

        `sums` has shape (rows, 5): the sums of x^2, x_hat^2, (x_hat - x)^2 and x * x_hat, and
        the count of x_hat == 0 (x the original, x_hat the decoded value), as the fused kernels
        compute them.
        """
        rows = sums.shape[0]
        self.rows += rows
        self.values += rows * cols
        norms = sums[:, :3].sqrt()
        zeros = sums[:, 4].to(torch.int64).sum()
        self._accumulate(norms[:, 0], norms[:, 1], norms[:, 2], sums[:, 3], zeros)

    def _accumulate(
        self,
        original_norm: torch.Tensor,
        decoded_norm: torch.Tensor,
        error_norm: torch.Tensor,
        dot: torch.Tensor,
        zeros: torch.Tensor,
    ) -> None:
        self.zeros += zeros
        self.error_sq += _total(error_norm.double().square())
        self.original_sq += _total(original_norm.double().square())
        denominator = original_norm * decoded_norm
        cosine = torch.where(denominator > 0, dot / denominator, torch.zeros_like(dot))
        both_zero = (original_norm == 0) & (decoded_norm == 0)
        cosine = torch.where(both_zero, torch.ones_like(cosine), cosine).clamp_(-1.0, 1.0)
        self.cosine_sum += _total(cosine.double())
        self.cosine_min = torch.minimum(
            torch.as_tensor(self.cosine_min, device=cosine.device), cosine.min()
        )

    def finish(self, scale: torch.Tensor, zero_point: torch.Tensor, kept: int) -> TableStats:
        """Returns the statistics of the whole table, given its qparams and kept-value count."""
        n_values = self.values
        error_sq, original_sq = float(self.error_sq), float(self.original_sq)
        zeros, cosine_sum, cosine_min = (
            int(self.zeros),
            float(self.cosine_sum),
            float(self.cosine_min),
        )
        if original_sq > 0:
            rel_error = math.sqrt(error_sq / original_sq)
        else:
            rel_error = 0.0 if error_sq == 0 else math.inf
        scale = scale.float().cpu()
        zero_point = zero_point.float().cpu()
        has_rows = scale.numel() > 0
        return TableStats(
            values=n_values,
            kept=kept,
            pruned_fraction=(n_values - kept) / n_values if n_values else 0.0,
            zero_fraction=zeros / n_values if n_values else 0.0,
            scale_min=float(scale.min()) if has_rows else 0.0,
            scale_median=float(scale.median()) if has_rows else 0.0,
            scale_max=float(scale.max()) if has_rows else 0.0,
            zero_point_min=float(zero_point.min()) if has_rows else 0.0,
            zero_point_max=float(zero_point.max()) if has_rows else 0.0,
            rel_error=rel_error,
            row_cosine_mean=cosine_sum / self.rows if self.rows else 1.0,
            row_cosine_min=cosine_min if self.rows else 1.0,
        )


# ATen splits one output's reduction across threads once it sums 32768 values or more, and the
# rounding then depends on the thread count. Sums here go through pieces of at most _PIECE
# values, so every output of every reduction is summed by one thread, in a fixed order.
_PIECE = 8192


def _row_sums(values: torch.Tensor) -> torch.Tensor:
    """Returns the sum of each row of a 2-D tensor, the same for any number of threads."""
    rows = values.shape[0]
    while values.shape[1] > _PIECE:
        pad = -values.shape[1] % _PIECE
        if pad:
            values = torch.nn.functional.pad(values, (0, pad))
        values = values.view(rows, values.shape[1] // _PIECE, _PIECE).sum(2)
    return values.sum(1)


def _row_norms(values: torch.Tensor) -> torch.Tensor:
    """Returns the L2 norm of each row of a 2-D tensor, the same for any number of threads."""
    if values.shape[1] <= _PIECE:
        return torch.linalg.vector_norm(values, dim=1)
    return _row_sums(values * values).sqrt()


def _total(values: torch.Tensor) -> torch.Tensor:
    """Returns the sum of all values of a tensor (0-D), the same for any number of threads."""
    return _row_sums(values.reshape(1, -1))[0]
