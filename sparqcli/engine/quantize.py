"""Per-row affine quantization with float zero points, torch.ao's `float_qparams` scheme.

Per row: `scale = (max - min) / (2**bits - 1)`, replaced by 1.0 when not above float32 eps;
`zero_point = -min / scale`, kept as a float; `q = clamp(round_half_even(x * (1/scale) + zp))`;
decode `(q - zp) * scale`. Every step is the same float32 operation, in the same order, as
`PerChannelMinMaxObserver` and `quantize_per_channel`, so codes and qparams match bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from sparqcli.engine.stats import row_norms, row_sums
from sparqcli.errors import TableError
from sparqcli.settings import Quantization

_FLOAT32_EPS = torch.finfo(torch.float32).eps


def row_qparams(
    values: torch.Tensor, settings: Quantization, first_row: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns `(scale, zero_point)` per row of a float32 (rows, cols) tensor, as float32.

    With `scale_dtype: float16` or `bfloat16` both are rounded to values of that dtype (the scale
    upwards, so every value of the row stays representable). Raises TableError when a row's range
    overflows float32, or does not fit the narrower scale dtype asked for; `first_row` numbers
    rows in messages.
    """
    rows, cols = values.shape
    if cols == 0:
        return values.new_ones(rows), values.new_zeros(rows)
    # amin and amax are ~10x faster than aminmax over short rows (see exact_zero_minimums).
    row_min = exact_zero_minimums(values.amin(dim=1), lambda chosen: values[chosen])
    return qparams_from_range(row_min, values.amax(dim=1), settings, first_row)


def exact_zero_minimums(
    row_min: torch.Tensor, rows_of: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """Returns `row_min` with each zero replaced by the zero torch.aminmax picks for its row.

    Where a row's min is a zero, amin (or a kernel's min) may return the other zero than
    aminmax (the reference's observer) does, and the zero's sign becomes the zero point's. Those
    rows, `rows_of(bool row mask)`, take the CPU aminmax's answer, on any device, so CUDA results
    equal CPU ones. (The max's sign never reaches the scale.) Modifies and returns `row_min`.
    """
    zero_min = row_min == 0
    if bool(zero_min.any()):
        exact_min = torch.aminmax(rows_of(zero_min).cpu(), dim=1).min
        row_min[zero_min] = exact_min.to(row_min.device)
    return row_min


def qparams_from_range(
    row_min: torch.Tensor,
    row_max: torch.Tensor,
    settings: Quantization,
    first_row: int = 0,
    *,
    check: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns `(scale, zero_point)` from each row's float32 min and max; see `row_qparams`.

    With `check` False nothing is raised: a row that would raise gets non-finite qparams.
    """
    # Divided by a tensor, not a Python float: CUDA multiplies by the float's reciprocal instead,
    # which differs from the division (and from the CPU) in the last bit.
    scale = (row_max - row_min) / row_max.new_tensor(float(settings.quant_max))
    scale = torch.where(scale > _FLOAT32_EPS, scale, torch.ones_like(scale))
    if check:
        _check_finite(scale, "value range overflows float32", first_row)
    narrow = _NARROW_SCALES.get(settings.scale_dtype)
    if narrow is not None:
        scale = _round_up_to(scale, narrow)
        if check:
            _check_finite(
                scale,
                f"scale does not fit {settings.scale_dtype} (use scale_dtype: float32)",
                first_row,
            )
    zero_point = -1 * row_min / scale
    if narrow is not None:
        zero_point = zero_point.to(narrow).float()
        if check:
            _check_finite(
                zero_point,
                f"zero point does not fit {settings.scale_dtype} (use scale_dtype: float32)",
                first_row,
            )
    return scale, zero_point


# Scale dtypes narrower than float32: scales and zero points are rounded to their values.
_NARROW_SCALES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def _round_up_to(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Returns float32 `scale` rounded up to the nearest value of `dtype`, as float32."""
    narrow = scale.to(dtype)
    too_small = narrow.float() < scale
    narrow = torch.where(
        too_small, torch.nextafter(narrow, torch.full_like(narrow, float("inf"))), narrow
    )
    return narrow.float()


def _check_finite(values: torch.Tensor, problem: str, first_row: int) -> None:
    bad = ~torch.isfinite(values)
    if bool(bad.any()):
        row = first_row + int(bad.nonzero()[0, 0].item())
        raise TableError(f"row {row}: {problem}")


def may_decode_to_zero(zero_point: torch.Tensor) -> torch.Tensor:
    """Returns, per row, whether some code can decode to exactly 0.0 under `zero_point`.

    `(q - zp) * scale` is 0.0 only when q == zp, or when the product underflows. A scale is at
    least 2^-24 (float32 eps, or a float16 rounded up), and q is a whole number, so for a zero
    point that is not whole |q - zp| is at least |zp| (q = 0) or a float32 spacing (2^-24 or
    more): the product underflows only for |zp| < 2^-100. Rows outside both cases decode every
    kept value to a non-zero.
    """
    return (zero_point == zero_point.round()) | (zero_point.abs() < 2.0**-100)


def quantize(
    values: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int
) -> torch.Tensor:
    """Returns the uint8 codes of a float32 (rows, cols) tensor under per-row `scale`/`zero_point`."""
    return quantize_levels(values, scale, zero_point, bits).to(torch.uint8)


def quantize_levels(
    values: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    bits: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Returns the codes of a float32 (rows, cols) tensor as float32 whole numbers.

    The same numbers `quantize` returns, without the slow float-to-uint8 conversion; written
    into `out` (float32, the shape of `values`; may be `values` itself) when given.
    """
    inverse_scale = 1.0 / scale
    scaled = torch.mul(values, inverse_scale[:, None], out=out)
    scaled += zero_point[:, None]
    return scaled.round_().clamp_(0, (1 << bits) - 1)


def dequantize(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Returns the float32 values `(codes - zero_point) * scale` of (rows, cols) codes.

    `codes` may be uint8 or float32 levels (`quantize_levels`); the result is written into `out`
    (float32, may be `codes` itself when that is float32) when given.
    """
    decoded = torch.sub(codes, zero_point[:, None], out=out)
    return decoded.mul_(scale[:, None])


# Half-width, in standard deviations, of the uniform quantizer with 2**bits levels that
# minimises the squared error of a Gaussian: (2**bits - 1) / 2 times its optimal step (Max 1960;
# Hui and Neuhoff 2001). `mse_qparams` starts its search around it.
_GAUSSIAN_HALF_WIDTH = {
    1: 0.798,
    2: 1.494,
    3: 2.051,
    4: 2.514,
    5: 2.916,
    6: 3.279,
    7: 3.613,
    8: 3.927,
}
# The search of `mse_qparams` (its breadth, so its cost). Starting ranges: mean -+ factor *
# the Gaussian half-width; for rows with a lone outlier, [min, mean of the others] and [mean of
# the others, max] (the outlier gets a level of its own). Then Lloyd steps from min/max and from
# the best so far; pattern moves of either end of the best range by these fractions of its
# step; a last Lloyd step. Measured trade-offs: docs/DECISIONS.md.
MSE_START_FACTORS: tuple[float, ...] = (1.0,)
MSE_MINMAX_LLOYD_STEPS = 1
MSE_LLOYD_STEPS = 2
MSE_PATTERN_STEPS: tuple[float, ...] = (0.5,)
MSE_FINAL_LLOYD_STEPS = 1


def mse_qparams(
    values: torch.Tensor,
    settings: Quantization,
    keep: torch.Tensor | None = None,
    first_row: int = 0,
    work: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns per-row `(scale, zero_point)` minimising the squared error of the kept values.

    `values` is a float32 (rows, cols) tensor as `row_qparams` sees it: pruned positions already
    hold zeros. `keep` (bool, that shape; None: every value) marks the values whose error
    counts: pruned values decode to 0.0 whatever the qparams. `work`, when given, is two float32
    tensors with at least as many elements as `values`, used for temporaries.

    The qparams follow the format's rule from a range [lo, hi] (`qparams_from_range`: scale
    (hi - lo) / (2**bits - 1), zero point -lo / scale, both rounded as `scale_dtype` says), so
    only the range differs from min/max. Batched over rows, the candidates are: the min/max
    qparams (exactly `row_qparams`'); the kept values' min and max; ranges from the row's mean,
    standard deviation and the Gaussian-optimal half-width (`MSE_START_FACTORS`); the min or
    the max with the mean of the other values; `MSE_MINMAX_LLOYD_STEPS` Lloyd steps from
    min/max and `MSE_LLOYD_STEPS` from the best so far (codes fixed, scale and offset
    refitted by least squares, codes recomputed); pattern moves of either end of the best range
    by `MSE_PATTERN_STEPS` of its step; `MSE_FINAL_LLOYD_STEPS` more Lloyd steps. A range may
    reach past the values' min or max. Every candidate is evaluated with its stored (rounded)
    qparams by `row_errors` (qparams that overflow float16 count as infinitely bad); each row keeps its smallest error, the earliest candidate on ties,
    so no row is worse than with min/max and equal rows keep min/max's qparams. Deterministic,
    the same for any thread count. Raises TableError where `row_qparams` does.
    """
    rows, cols = values.shape
    if rows == 0 or cols == 0:
        return row_qparams(values, settings, first_row)
    all_low, all_high = values.amin(dim=1), values.amax(dim=1)
    # Exactly row_qparams (amin, amax, the observer's zero), from the reductions computed here.
    row_min = exact_zero_minimums(all_low.clone(), lambda chosen: values[chosen])
    scale, zero_point = qparams_from_range(row_min, all_high, settings, first_row)
    if work is None:
        work = (torch.empty_like(values), torch.empty_like(values))
    levels, spare = (buffer.reshape(-1)[: values.numel()].view(values.shape) for buffer in work)
    bits, quant_max = settings.bits, float(settings.quant_max)
    weights = None if keep is None else keep.to(values.dtype)
    if keep is None:
        count = torch.full((rows,), float(cols), dtype=torch.float64, device=values.device)
        low, high = all_low, all_high
    else:
        count = row_sums(weights).double()
        empty = count == 0
        low = values.masked_fill(~keep, float("inf")).amin(dim=1).masked_fill_(empty, 0.0)
        high = values.masked_fill(~keep, float("-inf")).amax(dim=1).masked_fill_(empty, 0.0)
    count = count.clamp(min=1.0)
    total = row_sums(values).double()
    mean = total / count
    # sum(x^2)/n - mean^2: cancels for rows far from zero, which then start poorly (nothing worse).
    variance = row_norms(values).double().square() / count - mean.square()
    half_width = _GAUSSIAN_HALF_WIDTH[bits] * variance.clamp(min=0.0).sqrt()
    search = _Search(values, weights, settings, levels)
    search.add(all_low, all_high, scale, zero_point)
    if keep is not None:
        search.consider(low, high)
    for factor in MSE_START_FACTORS:
        search.consider(mean - factor * half_width, mean + factor * half_width)
    others = (count - 1).clamp(min=1.0)
    search.consider(low, (total - low.double()) / others)
    search.consider((total - high.double()) / others, high)

    def lloyd(steps: int, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        for _ in range(steps):
            quantize_levels(values, scale, zero_point, bits, out=levels)
            weighted = levels if weights is None else torch.mul(levels, weights, out=spare)
            sum_q = row_sums(weighted).double()
            sum_qq = row_norms(weighted).double().square()
            sum_qx = row_sums(torch.mul(levels, values, out=spare)).double()
            var_q = sum_qq - sum_q * sum_q / count
            step = (sum_qx - sum_q * total / count) / var_q
            offset = (total - step * sum_q) / count
            fitted = (var_q > 0) & (step > 0) & torch.isfinite(step) & torch.isfinite(offset)
            old_low = -zero_point.double() * scale.double()
            scale, zero_point = search.consider(
                torch.where(fitted, offset, old_low),
                torch.where(fitted, offset + quant_max * step, old_low + quant_max * scale),
            )

    # From min/max too: rows whose best range keeps outliers at both ends lie near it.
    lloyd(MSE_MINMAX_LLOYD_STEPS, scale, zero_point)
    lloyd(MSE_LLOYD_STEPS, *search.best()[2:])
    for fraction in MSE_PATTERN_STEPS:
        lo, hi = search.best()[:2]
        move = (hi - lo) * (fraction / quant_max)
        for new_lo, new_hi in ((lo - move, hi), (lo + move, hi), (lo, hi - move), (lo, hi + move)):
            search.consider(new_lo, new_hi)
    lloyd(MSE_FINAL_LLOYD_STEPS, *search.best()[2:])
    return search.best()[2:]


class _Search:
    """The candidate ranges of `mse_qparams`: each one's range, stored qparams and row errors."""

    def __init__(
        self,
        values: torch.Tensor,
        weights: torch.Tensor | None,
        settings: Quantization,
        work: torch.Tensor,
    ) -> None:
        self.values, self.weights, self.settings, self.work = values, weights, settings, work
        self.candidates: list[tuple[torch.Tensor, ...]] = []
        self._best: tuple[torch.Tensor, ...] | None = None

    def add(
        self, low: torch.Tensor, high: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor
    ) -> None:
        """Evaluates the qparams `scale`, `zero_point` (made from [low, high]) and keeps them."""
        error = row_errors(
            self.values, self.weights, scale, zero_point, self.settings.bits, self.work
        )
        # qparams that do not fit (non-finite, NaN errors) are never chosen
        error = error.nan_to_num_(nan=float("inf"))
        self.candidates.append((low, high, scale, zero_point, error))
        self._best = None

    def consider(self, low: torch.Tensor, high: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Adds the range [low, high] (high raised to low if below); returns its qparams.

        A range may reach past the values' min or max: that can align a level with the bulk
        of a row whose ends are outliers.
        """
        low = low.float()
        high = torch.maximum(high.float(), low)
        scale, zero_point = qparams_from_range(low, high, self.settings, check=False)
        self.add(low, high, scale, zero_point)
        return scale, zero_point

    def best(self) -> tuple[torch.Tensor, ...]:
        """Returns each row's best `(low, high, scale, zero_point)` so far (earliest on ties)."""
        if self._best is None:
            # (rows, candidates): argmin along contiguous rows is ~30x faster than along dim 0
            stacked = [torch.stack(part, dim=1) for part in zip(*self.candidates, strict=True)]
            chosen = stacked[-1].argmin(dim=1, keepdim=True)  # the first of equal minimums
            best = tuple(part.gather(1, chosen)[:, 0] for part in stacked)
            self._best = best[:4]
            # Only the best survives: later checkpoints choose among it and newer candidates.
            self.candidates = [best]
        return self._best


def row_errors(
    values: torch.Tensor,
    weights: torch.Tensor | None,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    bits: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Returns each row's L2 norm of `(decode(quantize(values)) - values) * weights` (float32).

    The codes and decoded values are the pipeline's own (`quantize_levels`, `dequantize`);
    `weights` (0/1 float32, or None for all ones) masks the values that count; `out` (float32,
    the shape of `values`) holds the temporaries when given. Rows whose qparams are not finite
    get NaN. The same for any thread count.
    """
    levels = quantize_levels(values, scale, zero_point, bits, out=out)
    error = dequantize(levels, scale, zero_point, out=levels).sub_(values)
    if weights is not None:
        error *= weights
    return row_norms(error)
