"""Per-row affine quantization with float zero points, torch.ao's `float_qparams` scheme.

Per row: `scale = (max - min) / (2**bits - 1)`, replaced by 1.0 when not above float32 eps;
`zero_point = -min / scale`, kept as a float; `q = clamp(round_half_even(x * (1/scale) + zp))`;
decode `(q - zp) * scale`. Every step is the same float32 operation, in the same order, as
`PerChannelMinMaxObserver` and `quantize_per_channel`, so codes and qparams match bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from sparqcli.engine._mse_csrc import SOURCE as MSE_SOURCE
from sparqcli.engine.stats import row_norms
from sparqcli.errors import UnfitSettingsError
from sparqcli.native import Kernel
from sparqcli.settings import Quantization

_FLOAT32_EPS = torch.finfo(torch.float32).eps


def row_qparams(
    values: torch.Tensor, settings: Quantization, first_row: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns `(scale, zero_point)` per row of a float32 (rows, cols) tensor, as float32.

    With `scale_dtype: float16` or `bfloat16` both are rounded to values of that dtype (the scale
    upwards, so every value of the row stays representable). Raises UnfitSettingsError (a
    TableError) when a row's range overflows float32, or does not fit the narrower scale dtype
    asked for; `first_row` numbers rows in messages.
    """
    rows, cols = values.shape
    if cols == 0:
        return values.new_ones(rows), values.new_zeros(rows)
    return qparams_from_range(*row_range(values), settings, first_row)


def row_range(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns each row's min and max of a float32 (rows, cols) tensor, cols > 0, as the
    reference's observer finds them (a zero min carries aminmax's sign): `row_qparams`' range,
    the same for every width and scale dtype."""
    # amin and amax are ~10x faster than aminmax over short rows (see exact_zero_minimums).
    row_min = exact_zero_minimums(values.amin(dim=1), lambda chosen: values[chosen])
    return row_min, values.amax(dim=1)


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
    refuse_off_grid: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns `(scale, zero_point)` from each row's float32 min and max; see `row_qparams`.

    With `check` False nothing is raised: a row that would raise gets non-finite qparams.
    `refuse_off_grid` False keeps a float16/bfloat16 zero point rounded by more than a level
    (a search's candidate, scored by the error it really gives) instead of refusing it.
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
        exact = zero_point
        zero_point = exact.to(narrow).float()
        if check:
            _check_finite(
                zero_point,
                f"zero point does not fit {settings.scale_dtype} (use scale_dtype: float32)",
                first_row,
            )
        if refuse_off_grid:
            # Codes follow the rounded zero point: rounded by more than a level, it shifts the
            # grid off the row's values, and the end beyond it is clamped (a row far from 0
            # against its spread: |zero point| above 2^12 levels in float16, 2^9 in bfloat16).
            zero_point = zero_point.masked_fill((zero_point - exact).abs() > 1, float("inf"))
            if check:  # every zero point was finite before: an infinite one is off the grid
                _check_finite(
                    zero_point,
                    f"zero point loses precision in {settings.scale_dtype}: the row's values lie "
                    "far from 0 against their spread (use scale_dtype: float32)",
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
        raise UnfitSettingsError(f"row {row}: {problem}", row=row)


def may_decode_past(
    scale: torch.Tensor, zero_point: torch.Tensor, bits: int | torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """Returns, per row, whether some code decodes to a value `dtype` cannot hold (±inf once
    rounded to it): decoded values grow with the code, so its lowest and highest codes tell.
    `bits` is the width, or each row's (`quantize_levels`)."""
    if isinstance(bits, int):
        ends = torch.tensor([0.0, float((1 << bits) - 1)], device=scale.device)
        ends = ends.expand(scale.shape[0], 2)
    else:
        top = _top_levels(bits)
        ends = torch.cat([torch.zeros_like(top), top], dim=1)
    decoded = dequantize(ends, scale, zero_point).to(dtype)
    return ~torch.isfinite(decoded).all(dim=1)


def _top_levels(bits: torch.Tensor) -> torch.Tensor:
    """Returns each row's largest code, 2^bits - 1, as a float32 (rows, 1) column."""
    return ((1 << bits) - 1).to(torch.float32)[:, None]


def decodes_past_message(row: int, dtype: torch.dtype) -> str:
    """Returns why a table is refused whose row `row` decodes to ±inf in its `dtype`."""
    name = str(dtype).removeprefix("torch.")
    hint = (
        "range minmax with float32 scales keeps it finite"
        if dtype in (torch.float16, torch.bfloat16)
        else "scale the table down"
    )
    return (
        f"row {row} decodes to inf in {name}: its values come within a quantization step of "
        f"{name}'s largest ({torch.finfo(dtype).max:g}); {hint}"
    )


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
    bits: int | torch.Tensor,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Returns the codes of a float32 (rows, cols) tensor as float32 whole numbers.

    The same numbers `quantize` returns, without the slow float-to-uint8 conversion; written
    into `out` (float32, the shape of `values`; may be `values` itself) when given. `bits` is
    the width, or each row's (an integer tensor of `rows`: rows of several widths stacked give
    each row the codes of its own width).
    """
    inverse_scale = 1.0 / scale
    scaled = torch.mul(values, inverse_scale[:, None], out=out)
    scaled += zero_point[:, None]
    if isinstance(bits, int):
        return scaled.round_().clamp_(0, (1 << bits) - 1)
    # clamp(x, 0, top) is min(max(x, 0), top), NaN kept as it is: the same two steps with a top
    # per row (a clamp by a tensor would write every NaN as one bit pattern)
    levels = scaled.round_().clamp_(min=0)
    top = _top_levels(bits)
    return torch.where(levels > top, top, levels, out=levels)


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
# Hui and Neuhoff 2001). One of the starting ranges of `mse_qparams`.
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
# The pattern moves that end `mse_qparams`' search: each end of the best range so far moved out
# and in by these fractions of its step, largest first. Measured trade-offs: docs/DECISIONS.md.
MSE_PATTERN_STEPS: tuple[float, ...] = (2.0, 1.0, 0.5, 0.25)
# torch.choose_qparams_optimized's arguments as FBGEMM's row-wise prepack calls it.
GREEDY_BINS = 200
GREEDY_RATIO = 0.16

_NARROW_CODES = {"float32": 0, "float16": 1, "bfloat16": 2}

MSE_KERNEL = Kernel(
    prefix="sparq_mse",
    source=MSE_SOURCE,
    title="MSE search",
    what="range: mse searches",
    switch="SPARQ_MSE_KERNEL",
    openmp=True,
)


def mse_qparams(
    values: torch.Tensor,
    settings: Quantization,
    keep: torch.Tensor | None = None,
    first_row: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns per-row `(scale, zero_point)` minimising the squared error of the kept values.

    `values` is a float32 (rows, cols) tensor as `row_qparams` sees it: pruned positions already
    hold zeros. `keep` (bool, that shape; None: every value) marks the values whose error
    counts: pruned values decode to 0.0 whatever the qparams.

    The qparams follow the format's rule from a range [lo, hi] (`qparams_from_range`: scale
    (hi - lo) / (2**bits - 1), zero point -lo / scale, both rounded as `scale_dtype` says), so
    only the range differs from min/max. Per row, the candidates are, in this order: the
    min/max qparams (exactly `row_qparams`'); the kept values' min and max; the row's mean -+
    the Gaussian-optimal half-width; the min or the max with the mean of the other values; the
    range `torch.choose_qparams_optimized` picks for the kept values (replayed exactly); then
    pattern moves of either end of the best range so far by `MSE_PATTERN_STEPS` of its step.
    Each is scored by `sequential_errors` with its stored (rounded) qparams; a row keeps its
    smallest error, the earliest candidate on ties. So no row is worse than with min/max or with
    torch's greedy search. Deterministic, and the same with the compiled kernel (`MSE_KERNEL`)
    as with its tensor-op fallback, on any device and thread count. Raises TableError where
    `row_qparams` does.
    """
    rows, cols = values.shape
    if rows == 0 or cols == 0:
        return row_qparams(values, settings, first_row)
    device = values.device
    values = values.detach().float().cpu().contiguous()
    keep = None if keep is None else keep.cpu().contiguous()
    all_low, all_high = values.amin(dim=1), values.amax(dim=1)
    # Exactly row_qparams (amin, amax, the observer's zero), from the reductions computed here.
    row_min = exact_zero_minimums(all_low.clone(), lambda chosen: values[chosen])
    scale, zero_point = qparams_from_range(row_min, all_high, settings, first_row)
    module = MSE_KERNEL.load()
    if module is not None:
        empty = torch.empty(0, dtype=torch.bool)
        scale, zero_point = module.mse_search(
            values,
            empty if keep is None else keep,
            all_low,
            all_high,
            scale,
            zero_point,
            settings.bits,
            _NARROW_CODES[settings.scale_dtype],
            list(MSE_PATTERN_STEPS),
            _GAUSSIAN_HALF_WIDTH[settings.bits],
        )
    else:
        minmax = torch.stack([all_low, all_high], dim=1)
        starts = torch.cat([minmax, _start_ranges(values, keep, settings.bits)], dim=1)
        scale, zero_point = _search(values, keep, starts, scale, zero_point, settings)
    return scale.to(device), zero_point.to(device)


def _start_ranges(values: torch.Tensor, keep: torch.Tensor | None, bits: int) -> torch.Tensor:
    """Returns the starting ranges of `mse_qparams` after min/max's, as (rows, 2 * K) float32:
    low, high, ... (the compiled kernel's `start_ranges`, bit for bit).

    The kept values' own min and max (when `keep` is given; 0 for a row that keeps none), the
    mean -+ the Gaussian-optimal half-width, the min with the mean of the other values, and the
    mean of the others with the max. Sums run in float64 over the kept values in column order.
    """
    low, high = _kept_ends(values, keep)
    if keep is None:
        count = torch.full((values.shape[0],), float(values.shape[1]), dtype=torch.float64)
        kept = values.double()
    else:
        count = keep.sum(dim=1).double()
        low, high = low.masked_fill(count == 0, 0.0), high.masked_fill(count == 0, 0.0)
        kept = torch.where(keep, values, torch.zeros((), dtype=values.dtype)).double()
    total, squares = _sums_in_column_order(kept), _sums_in_column_order(kept * kept)
    divisor = count.clamp(min=1.0)  # a row that keeps nothing: sums of 0
    mean = total / divisor
    # sum(x^2)/n - mean^2: cancels for rows far from zero, which then start poorly (nothing worse).
    variance = squares / divisor - mean * mean
    half_width = _GAUSSIAN_HALF_WIDTH[bits] * variance.clamp(min=0.0).sqrt()
    others = (count - 1).clamp(min=1.0)
    ranges = [low, high] if keep is not None else []
    ranges += [
        mean - half_width,
        mean + half_width,
        low,
        (total - low.double()) / others,
        (total - high.double()) / others,
        high,
    ]
    return torch.stack([part.float() for part in ranges], dim=1)


def _search(
    values: torch.Tensor,
    keep: torch.Tensor | None,
    starts: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    settings: Quantization,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The search of `mse_qparams` on tensor ops: the compiled kernel's numbers, bit for bit."""
    bits, quant_max = settings.bits, float(settings.quant_max)
    best_low, best_high = starts[:, 0].clone(), starts[:, 1].clone()
    best_scale, best_zero_point = scale.clone(), zero_point.clone()
    best_error = sequential_errors(values, keep, scale, zero_point, bits)

    def consider(low: torch.Tensor, high: torch.Tensor) -> None:
        high = torch.maximum(high, low)
        scale, zero_point = qparams_from_range(
            low, high, settings, check=False, refuse_off_grid=False
        )
        error = sequential_errors(values, keep, scale, zero_point, bits)
        better = error < best_error
        for best, new in (
            (best_error, error),
            (best_scale, scale),
            (best_zero_point, zero_point),
            (best_low, low),
            (best_high, high),
        ):
            best.copy_(torch.where(better, new, best))

    for index in range(1, starts.shape[1] // 2):
        consider(starts[:, 2 * index], starts[:, 2 * index + 1])
    consider(*greedy_ranges(values, keep, bits))
    for fraction in MSE_PATTERN_STEPS:
        low, high = best_low.clone(), best_high.clone()
        move = (high - low) * (fraction / quant_max)
        for new_low, new_high in (
            (low - move, high),
            (low + move, high),
            (low, high - move),
            (low, high + move),
        ):
            consider(new_low, new_high)
    return best_scale, best_zero_point


def sequential_errors(
    values: torch.Tensor,
    keep: torch.Tensor | None,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    bits: int,
) -> torch.Tensor:
    """Returns each row's squared error over its kept values, summed in column order (float32).

    The codes and decoded values are the pipeline's own (`quantize_levels`, `dequantize`); the
    sum runs column by column, as the compiled kernel's does, so both give the same numbers.
    Rows whose qparams are not finite, or whose error is NaN, get +inf.
    """
    levels = quantize_levels(values, scale, zero_point, bits)
    error = dequantize(levels, scale, zero_point, out=levels).sub_(values)
    error = error * error
    if keep is not None:
        error = torch.where(keep, error, torch.zeros((), dtype=error.dtype))
    total = _sums_in_column_order(error)
    fits = torch.isfinite(scale) & torch.isfinite(zero_point) & ~torch.isnan(total)
    return torch.where(fits, total, torch.full_like(total, float("inf")))


def _sums_in_column_order(terms: torch.Tensor) -> torch.Tensor:
    """Returns each row's sum of `terms` (rows, cols), in their dtype, added one column after
    the other: the sequential order of torch's loss and of the compiled kernel, which a
    reduction would not keep."""
    total = torch.zeros(terms.shape[0], dtype=terms.dtype)
    for column in terms.t():
        total = total + column
    return total


def greedy_ranges(
    values: torch.Tensor, keep: torch.Tensor | None, bits: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns per row the range `(low, high)` `torch.choose_qparams_optimized` picks for its
    kept values (200 bins, ratio 0.16: FBGEMM's row-wise prepack), and (0, 0) where nothing is
    kept. Uses the compiled kernel's exact replay where it is available.

    Where a step of the walk is too small to move an end (a range of a few float spacings),
    torch's walk never ends; there the walk stops at the first move that changes nothing (its
    answer can no longer change), in the kernel and in `_replayed_walk` alike.
    """
    module = MSE_KERNEL.load()
    if module is not None:
        empty = torch.empty(0, dtype=torch.bool)
        low, high = module.greedy_ranges(values, empty if keep is None else keep, bits)
        return low, high
    low, high = torch.zeros(values.shape[0]), torch.zeros(values.shape[0])
    kept_any = torch.ones(values.shape[0], dtype=torch.bool) if keep is None else keep.any(dim=1)
    narrow = _narrow_walks(values, keep)  # False where nothing is kept (ends +-inf)
    for row in (~narrow & kept_any).nonzero().flatten().tolist():
        kept = values[row] if keep is None else values[row][keep[row]]
        high_, low_ = torch.choose_qparams_optimized(
            kept.contiguous(), kept.numel(), GREEDY_BINS, GREEDY_RATIO, bits
        )
        low[row], high[row] = low_[0], high_[0]
    if bool(narrow.any()):
        rows = narrow.nonzero().flatten()
        low[rows], high[rows] = _replayed_walk(
            values[rows], None if keep is None else keep[rows], bits
        )
    return low, high


def _kept_ends(
    values: torch.Tensor, keep: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns each row's min and max kept value, the first of equal ones in column order (as
    std::min_element and std::max_element pick them: the sign of a zero); +-inf where none."""
    if keep is None:
        keep = torch.ones_like(values, dtype=torch.bool)
    ends = []
    for fill, reduce in ((float("inf"), torch.amin), (float("-inf"), torch.amax)):
        filled = torch.where(keep, values, torch.tensor(fill))
        end = reduce(filled, dim=1)
        first = (filled == end[:, None]).to(torch.uint8).argmax(dim=1)
        ends.append(filled.gather(1, first[:, None])[:, 0])
    return ends[0], ends[1]


def _walk_steps(low: torch.Tensor, high: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns the walk's step (range / 200) and its length limit (168 steps), float32."""
    step = (high - low) / torch.tensor(float(GREEDY_BINS))
    min_bins = int(GREEDY_BINS * (1.0 - float(torch.tensor(GREEDY_RATIO))))
    return step, torch.tensor(float(min_bins)) * step


def _narrow_walks(values: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """Returns, per row, whether the walk's step may be too small to move an end: at most 8
    half float32 spacings of the larger end (every other row's moves all change their end)."""
    low, high = _kept_ends(values, keep)
    step, _ = _walk_steps(low, high)
    larger = torch.maximum(low.abs(), high.abs())
    return ~(step > larger * 2.0**-21) & torch.isfinite(larger)


def _replayed_walk(
    values: torch.Tensor, keep: torch.Tensor | None, bits: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.choose_qparams_optimized's walk with tensor ops, every row at once (its loss: the
    low end rounded to float16, the scale through float16, a sequential float32 sum of the kept
    values' squared errors, its square root), stopping a row at a move that changes nothing.
    Returns (low, high) per row; rows must keep some value. The compiled kernel's numbers."""
    quant_max = torch.tensor(float((1 << bits) - 1))
    kept = torch.ones_like(values, dtype=torch.bool) if keep is None else keep
    zero, one = torch.tensor(0.0), torch.tensor(1.0)

    def loss(low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        low = low.half().float()
        span = high - low
        scale = torch.where(span == 0, one, (span / quant_max).half().float())
        inverse = torch.where(scale == 0, one, one / scale)
        levels = torch.round((values - low[:, None]) * inverse[:, None])
        levels = torch.where(quant_max < levels, quant_max, levels)  # std::min(q, qmax)
        levels = torch.where(levels > zero, levels, zero)  # std::max(0.0f, q)
        error = values - (levels * scale[:, None] + low[:, None])
        return _sums_in_column_order(torch.where(kept, error * error, zero)).sqrt()

    cur_min, cur_max = _kept_ends(values, keep)
    step, limit = _walk_steps(cur_min, cur_max)
    best_low, best_high = cur_min.clone(), cur_max.clone()
    cur_loss = loss(cur_min, cur_max)
    best_loss = cur_loss.clone()
    walking = torch.ones(values.shape[0], dtype=torch.bool)
    while True:
        active = walking & (cur_min + limit < cur_max)
        if not bool(active.any()):
            return best_low, best_high
        left_min, right_max = cur_min + step, cur_max - step
        loss1, loss2 = loss(left_min, cur_max), loss(cur_min, right_max)
        better = active & (cur_loss < loss1) & (cur_loss < loss2) & (cur_loss < best_loss)
        best_loss = torch.where(better, cur_loss, best_loss)
        best_low = torch.where(better, cur_min, best_low)
        best_high = torch.where(better, cur_max, best_high)
        left = active & (loss1 < loss2)
        right = active & ~(loss1 < loss2)
        walking &= ~((left & (left_min == cur_min)) | (right & (right_max == cur_max)))
        cur_min = torch.where(left, left_min, cur_min)
        cur_max = torch.where(right, right_max, cur_max)
        cur_loss = torch.where(left, loss1, torch.where(right, loss2, cur_loss))


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
