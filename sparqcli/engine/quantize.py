"""Per-row affine quantization with float zero points, torch.ao's `float_qparams` scheme.

Per row: `scale = (max - min) / (2**bits - 1)`, replaced by 1.0 when not above float32 eps;
`zero_point = -min / scale`, kept as a float; `q = clamp(round_half_even(x * (1/scale) + zp))`;
decode `(q - zp) * scale`. Every step is the same float32 operation, in the same order, as
`PerChannelMinMaxObserver` and `quantize_per_channel`, so codes and qparams match bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns `(scale, zero_point)` from each row's float32 min and max; see `row_qparams`."""
    # Divided by a tensor, not a Python float: CUDA multiplies by the float's reciprocal instead,
    # which differs from the division (and from the CPU) in the last bit.
    scale = (row_max - row_min) / row_max.new_tensor(float(settings.quant_max))
    scale = torch.where(scale > _FLOAT32_EPS, scale, torch.ones_like(scale))
    _check_finite(scale, "value range overflows float32", first_row)
    narrow = _NARROW_SCALES.get(settings.scale_dtype)
    if narrow is not None:
        scale = _round_up_to(scale, narrow)
        _check_finite(
            scale,
            f"scale does not fit {settings.scale_dtype} (use scale_dtype: float32)",
            first_row,
        )
    zero_point = -1 * row_min / scale
    if narrow is not None:
        zero_point = zero_point.to(narrow).float()
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
