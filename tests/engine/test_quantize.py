"""Per-row float-qparams quantization."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparqcli.engine.quantize import dequantize, quantize, row_qparams
from sparqcli.errors import TableError
from sparqcli.settings import Quantization
from tests.conftest import import_oracle

torch_ao = import_oracle("torch.ao.quantization")


@pytest.mark.parametrize(("bits", "dtype"), [(8, torch.quint8), (4, torch.quint4x2)])
def test_matches_quantize_per_channel(bits, dtype):
    table = (
        torch.randn(2000, 64, generator=torch.Generator().manual_seed(bits))
        * torch.rand(2000, 1)
        * 10
    )
    observer = torch_ao.PerChannelMinMaxObserver(
        ch_axis=0, dtype=dtype, qscheme=torch.per_channel_affine_float_qparams
    )
    observer(table)
    expected_scale, expected_zero_point = observer.calculate_qparams()
    scale, zero_point = row_qparams(table, Quantization(bits))
    assert torch.equal(scale, expected_scale.float())
    assert torch.equal(zero_point, expected_zero_point)
    reference = torch.quantize_per_channel(
        table, expected_scale.double(), expected_zero_point, 0, dtype
    )
    codes = quantize(table, scale, zero_point, bits)
    expected_codes = reference.int_repr().reshape(-1)
    if bits == 4:
        expected_codes = torch.stack([expected_codes & 15, expected_codes >> 4], 1).reshape(-1)
    assert torch.equal(codes.reshape(-1), expected_codes)
    assert torch.equal(dequantize(codes, scale, zero_point), torch.dequantize(reference))


def test_zero_row_minimums_keep_the_observers_sign():
    # Rows of positive values and zeros of both signs: which zero is the minimum decides the
    # sign of the zero point, and it must be the one torch.ao's observer (aminmax) picks.
    generator = torch.Generator().manual_seed(3)
    table = torch.rand(500, 37, generator=generator)
    zeros = torch.rand(500, 37, generator=generator) < 0.3
    negative = torch.rand(500, 37, generator=generator) < 0.5
    table[zeros] = 0.0
    table[zeros & negative] = -0.0
    observer = torch_ao.PerChannelMinMaxObserver(
        ch_axis=0, dtype=torch.quint8, qscheme=torch.per_channel_affine_float_qparams
    )
    observer(table)
    _, expected_zero_point = observer.calculate_qparams()
    _, zero_point = row_qparams(table, Quantization(8))
    assert torch.equal(zero_point.view(torch.int32), expected_zero_point.view(torch.int32))
    assert zero_point.signbit().any() and not zero_point.signbit().all()


def test_constant_rows_use_scale_one():
    scale, zero_point = row_qparams(torch.tensor([[3.0, 3.0], [0.0, 0.0]]), Quantization(8))
    assert scale.tolist() == [1.0, 1.0]
    assert zero_point.tolist() == [-3.0, 0.0]


@settings(max_examples=80, deadline=None)
@given(
    rows=st.integers(1, 20),
    cols=st.integers(1, 40),
    bits=st.sampled_from([8, 4, 2]),
    scale_dtype=st.sampled_from(["float32", "float16"]),
    magnitude=st.floats(1e-3, 1e3),
    seed=st.integers(0, 2**16),
)
def test_codes_in_range_and_values_within_half_a_step(
    rows, cols, bits, scale_dtype, magnitude, seed
):
    table = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * magnitude
    scale, zero_point = row_qparams(table, Quantization(bits, scale_dtype))
    codes = quantize(table, scale, zero_point, bits)
    assert int(codes.max()) <= (1 << bits) - 1
    error = (dequantize(codes, scale, zero_point) - table).abs()
    # float16 zero points are rounded: up to 1/16 of a step more with codes near 255.
    slack = (
        0.5 if scale_dtype == "float32" else 0.5 + float((zero_point.abs() * 2**-11).max()) + 1e-3
    )
    assert torch.all(error <= scale[:, None] * slack * (1 + 1e-5) + 1e-6 * magnitude)


def test_float16_qparams_are_float16_values_and_the_scale_rounds_up():
    table = torch.randn(50, 10, generator=torch.Generator().manual_seed(0))
    exact, _ = row_qparams(table, Quantization(8))
    scale, zero_point = row_qparams(table, Quantization(8, "float16"))
    assert torch.equal(scale, scale.half().float())
    assert torch.equal(zero_point, zero_point.half().float())
    assert torch.all(scale >= exact)


def test_float16_overflow_names_the_row():
    table = torch.zeros(3, 2)
    table[2] = torch.tensor([0.0, 1e8])
    with pytest.raises(
        TableError, match=r"^row 2: scale does not fit float16 \(use scale_dtype: float32\)$"
    ):
        row_qparams(table, Quantization(8, "float16"))
