"""Per-row affine quantization with float zero points, torch.ao's `float_qparams` scheme.

Per row: `scale = (max - min) / (2**bits - 1)`, replaced by 1.0 when not above float32 eps;
`zero_point = -min / scale`, kept as a float; `q = clamp(round_half_even(x * (1/scale) + zp))`;
decode `(q - zp) * scale`. Every step is the same float32 operation, in the same order, as
`PerChannelMinMaxObserver` and `quantize_per_channel`, so codes and qparams match bit for bit.
"""

from __future__ import annotations

import torch

from sparqcli.engine.settings import QuantizationSettings
from sparqcli.errors import TableError

_FLOAT32_EPS = torch.finfo(torch.float32).eps


def row_qparams(
    values: torch.Tensor, settings: QuantizationSettings, first_row: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns `(scale, zero_point)` per row of a float32 (rows, cols) tensor, as float32.

    With `scale_dtype: float16` both are rounded to float16 values (the scale upwards, so every
    value of the row stays representable). Raises TableError when a row's range overflows
    float32, or does not fit float16 when that is asked for; `first_row` numbers rows in messages.
    """
    rows, cols = values.shape
    if cols == 0:
        return values.new_ones(rows), values.new_zeros(rows)
    row_min, row_max = torch.aminmax(values, dim=1)
    scale = (row_max - row_min) / float(settings.quant_max)
    scale = torch.where(scale > _FLOAT32_EPS, scale, torch.ones_like(scale))
    _check_finite(scale, "value range overflows float32", first_row)
    if settings.scale_dtype == "float16":
        scale = _round_up_to_half(scale)
        _check_finite(scale, "scale does not fit float16 (use scale_dtype: float32)", first_row)
    zero_point = -1 * row_min / scale
    if settings.scale_dtype == "float16":
        zero_point = zero_point.half().float()
        _check_finite(
            zero_point, "zero point does not fit float16 (use scale_dtype: float32)", first_row
        )
    return scale, zero_point


def _round_up_to_half(scale: torch.Tensor) -> torch.Tensor:
    half = scale.half()
    too_small = half.float() < scale
    half = torch.where(too_small, torch.nextafter(half, torch.full_like(half, float("inf"))), half)
    return half.float()


def _check_finite(values: torch.Tensor, problem: str, first_row: int) -> None:
    bad = ~torch.isfinite(values)
    if bool(bad.any()):
        row = first_row + int(bad.nonzero()[0, 0].item())
        raise TableError(f"row {row}: {problem}")


def quantize(
    values: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int
) -> torch.Tensor:
    """Returns the uint8 codes of a float32 (rows, cols) tensor under per-row `scale`/`zero_point`."""
    inverse_scale = 1.0 / scale
    scaled = values * inverse_scale[:, None]
    scaled += zero_point[:, None]
    return scaled.round_().clamp_(0, (1 << bits) - 1).to(torch.uint8)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """Returns the float32 values `(codes - zero_point) * scale` of (rows, cols) uint8 codes."""
    decoded = codes.to(torch.float32) - zero_point[:, None]
    return decoded.mul_(scale[:, None])
