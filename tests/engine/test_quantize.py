"""Per-row float-qparams quantization."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparqcli.engine.quantize import (
    MSE_KERNEL,
    _replayed_walk,
    dequantize,
    greedy_ranges,
    may_decode_past,
    mse_qparams,
    qparams_from_range,
    quantize,
    quantize_levels,
    row_errors,
    row_qparams,
    sequential_errors,
)
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


def test_rows_of_several_widths_stacked_get_each_its_own_widths_codes():
    generator = torch.Generator().manual_seed(3)
    values = torch.randn(64, 19, generator=generator) * 40
    values[0, :4] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0])
    values[2, :2] = torch.tensor([-float("nan"), 3e38])
    scale = torch.rand(64, generator=generator) + 1e-3
    zero_point = torch.randn(64, generator=generator) * 100
    scale[1] = 3e38  # its highest code decodes past float16 (and float32) at some widths
    bits = torch.randint(1, 9, (64,), generator=generator)
    stacked = quantize_levels(values, scale, zero_point, bits)
    one_by_one = torch.cat(
        [
            quantize_levels(values[i : i + 1], scale[i : i + 1], zero_point[i : i + 1], int(b))
            for i, b in enumerate(bits.tolist())
        ]
    )
    assert torch.equal(stacked.view(torch.int32), one_by_one.view(torch.int32))  # NaNs too
    assert int(stacked.nan_to_num(0.0).max()) == 255
    for dtype in (torch.float16, torch.float32):
        past = may_decode_past(scale, zero_point, bits, dtype)
        assert bool(past[1])
        assert torch.equal(
            past,
            torch.cat(
                [
                    may_decode_past(scale[i : i + 1], zero_point[i : i + 1], int(b), dtype)
                    for i, b in enumerate(bits.tolist())
                ]
            ),
        )


@settings(max_examples=80, deadline=None)
@given(
    rows=st.integers(1, 20),
    cols=st.integers(1, 40),
    bits=st.integers(1, 8),
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


@pytest.mark.parametrize("scale_dtype", ["float16", "bfloat16"])
def test_a_zero_point_rounded_off_the_grid_is_refused(scale_dtype: str):
    # Codes follow the stored (rounded) zero point; rounded by more than a level it moves the
    # grid off a row far from 0, and the row would decode to a few clamped values.
    generator = torch.Generator().manual_seed(0)
    table = torch.randn(4, 64, generator=generator)
    table[2] = 100 + 0.01 * torch.randn(64, generator=generator)  # float16: |zp| ~ 5e5 / 2e3
    settings = Quantization(8, scale_dtype)
    message = (
        f"row 2: zero point loses precision in {scale_dtype}: the row's values lie far from 0 "
        "against their spread (use scale_dtype: float32)"
    )
    if scale_dtype == "float16":  # beyond float16's range first
        message = "row 2: zero point does not fit float16 (use scale_dtype: float32)"
    with pytest.raises(TableError, match=f"^{re.escape(message)}$"):
        row_qparams(table, settings)
    low, high = table.amin(dim=1), table.amax(dim=1)
    _, zero_point = qparams_from_range(low, high, settings, check=False)
    assert torch.isinf(zero_point[2]) and torch.isfinite(zero_point[[0, 1, 3]]).all()
    row_qparams(table, Quantization(8))  # float32 holds it


def test_an_off_grid_zero_point_stays_a_candidate_of_the_mse_search():
    # Only min/max's qparams are refused off the grid (the row itself is); a candidate of the
    # search is scored by the error it really gives, so it is kept, finite.
    low, high = torch.tensor([0.0, 600.0]), torch.tensor([1.0, 601.0])
    settings = Quantization(8, "bfloat16")
    kept = qparams_from_range(low, high, settings, check=False, refuse_off_grid=False)
    refused = qparams_from_range(low, high, settings, check=False)
    assert torch.equal(kept[0], refused[0])
    assert torch.isfinite(kept[1]).all() and torch.isinf(refused[1][1])
    assert kept[1][0] == refused[1][0]
    # rows keeping their 4 largest values: the search may pick such ranges, never worse than
    # min/max on any row
    generator = torch.Generator().manual_seed(3)
    table = torch.randn(2000, 64, generator=generator)
    keep = torch.zeros_like(table, dtype=torch.bool)
    keep.scatter_(1, table.topk(4, dim=1).indices, True)
    values = table * keep
    scale, zero_point = mse_qparams(values, Quantization(8, "bfloat16", range="mse"), keep)
    errors = row_errors(values, keep.float(), scale, zero_point, 8)
    minmax = row_errors(values, keep.float(), *row_qparams(values, settings), 8)
    assert bool((errors <= minmax).all())


@pytest.mark.parametrize("scale_dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_accepted_narrow_qparams_decode_within_a_step_and_a_half(scale_dtype: str, bits: int):
    generator = torch.Generator().manual_seed(bits)
    rows = 4000
    spread = torch.rand(rows, 1, generator=generator) * 2 + 1e-3
    offset = (torch.rand(rows, 1, generator=generator) - 0.5) * 10 ** (
        torch.rand(rows, 1, generator=generator) * 4
    )
    table = offset + spread * torch.rand(rows, 32, generator=generator)
    settings = Quantization(bits, scale_dtype)
    scale, zero_point = qparams_from_range(table.amin(1), table.amax(1), settings, check=False)
    accepted = torch.isfinite(zero_point) & torch.isfinite(scale)
    assert 0 < int(accepted.sum()) < rows  # both kinds occur
    decoded = dequantize(quantize(table, scale, zero_point, bits).float(), scale, zero_point)
    error = (decoded - table).abs().amax(dim=1) / scale
    assert float(error[accepted].max()) <= 1.5 + 1e-3


# --- quantization.range: mse ------------------------------------------------------------------


def _rows(kind: str, rows: int, cols: int, seed: int) -> torch.Tensor:
    """Synthetic rows: Gaussian, heavy-tailed (Student t, 3 degrees), or Zipf-law row norms."""
    generator = torch.Generator().manual_seed(seed)
    if kind == "gaussian":
        return torch.randn(rows, cols, generator=generator)
    if kind == "heavy":
        normal = torch.randn(rows, cols, generator=generator)
        chi2 = torch.randn(rows, cols, 3, generator=generator).square().sum(-1)
        return normal / (chi2 / 3).sqrt()
    ranks = torch.arange(1, rows + 1, dtype=torch.float32)
    return torch.randn(rows, cols, generator=generator) / ranks[:, None]


def _errors(table, keep, scale, zero_point, bits):
    """Each row's squared error over its kept values, in float64 from the decoded values."""
    decoded = dequantize(quantize(table, scale, zero_point, bits), scale, zero_point)
    error = (decoded.double() - table.double()).square()
    return (error if keep is None else error * keep).sum(1)


@settings(max_examples=60, deadline=None)
@given(
    kind=st.sampled_from(["gaussian", "heavy", "zipf"]),
    rows=st.integers(1, 30),
    cols=st.integers(1, 70),
    bits=st.integers(1, 8),
    scale_dtype=st.sampled_from(["float32", "float16"]),
    pruned=st.sampled_from([0.0, 0.3, 0.9]),
    magnitude=st.sampled_from([1e-3, 1.0, 300.0]),
    seed=st.integers(0, 2**16),
)
def test_mse_is_never_worse_than_minmax_on_any_row(
    kind, rows, cols, bits, scale_dtype, pruned, magnitude, seed
):
    table = _rows(kind, rows, cols, seed) * magnitude
    keep = None
    if pruned:
        keep = torch.rand(rows, cols, generator=torch.Generator().manual_seed(seed + 1)) >= pruned
        table = table * keep  # pruned values are zeros, as the min/max rule sees them
    settings_ = Quantization(bits, scale_dtype, range="mse")
    minmax = row_qparams(table, settings_)
    scale, zero_point = mse_qparams(table, settings_, keep)
    # The search's own measure (float32, the pipeline's decode): never larger, by construction.
    assert torch.all(
        sequential_errors(table, keep, scale, zero_point, bits)
        <= sequential_errors(table, keep, *minmax, bits)
    )
    # Measured independently in float64: the same up to float32 rounding of the error sums.
    ours, theirs = (
        _errors(table, keep, scale, zero_point, bits),
        _errors(table, keep, *minmax, bits),
    )
    assert torch.all(ours <= theirs * (1 + 1e-5) + 1e-30)
    # Stored qparams: float16 values where asked, codes in range, scales positive.
    if scale_dtype == "float16":
        assert torch.equal(scale, scale.half().float())
        assert torch.equal(zero_point, zero_point.half().float())
    assert torch.all(scale > 0) and torch.isfinite(zero_point).all()
    codes = quantize(table, scale, zero_point, bits)
    assert int(codes.max()) <= (1 << bits) - 1


def test_mse_is_deterministic_and_chunking_independent():
    table = _rows("heavy", 300, 50, 7)
    settings_ = Quantization(3, range="mse")
    whole = mse_qparams(table, settings_)
    again = mse_qparams(table.clone(), settings_)
    pieces = [mse_qparams(table[i : i + 64], settings_) for i in range(0, 300, 64)]
    for index in range(2):
        assert torch.equal(whole[index], again[index])
        assert torch.equal(whole[index], torch.cat([piece[index] for piece in pieces]))


@pytest.mark.parametrize("pruned", [False, True])
def test_the_kernel_gives_the_same_qparams_on_any_number_of_threads(pruned):
    # 2,003 rows x 40: the kernel splits them over torch's threads (at least 2^15 values each),
    # and the last group of 8 rows is partial.
    table = _rows("zipf", 2003, 40, 11)
    keep = torch.rand(table.shape, generator=torch.Generator().manual_seed(12)) >= 0.4
    keep = keep if pruned else None
    values = table if keep is None else table * keep
    found = {}
    before = torch.get_num_threads()
    with _mse_kernel(True):
        try:
            for threads in (1, 2, 3):
                torch.set_num_threads(threads)
                found[threads] = mse_qparams(values, Quantization(4, range="mse"), keep)
        finally:
            torch.set_num_threads(before)
    for threads in (2, 3):
        assert torch.equal(_bits(found[threads][0]), _bits(found[1][0]))
        assert torch.equal(_bits(found[threads][1]), _bits(found[1][1]))


def _greedy_oracle(table, keep, bits):
    """Per row, the range torch.choose_qparams_optimized picks for the kept values (0, 0 for none)."""
    low, high = torch.zeros(table.shape[0]), torch.zeros(table.shape[0])
    for row in range(table.shape[0]):
        kept = table[row] if keep is None else table[row][keep[row]]
        if kept.numel():
            high_, low_ = torch.choose_qparams_optimized(
                kept.contiguous(), kept.numel(), 200, 0.16, bits
            )
            low[row], high[row] = low_[0], high_[0]
    return low, high


@contextmanager
def _mse_kernel(enabled: bool) -> Iterator[None]:
    """Runs the block with the compiled MSE kernel, or with its tensor-op fallback."""
    saved = os.environ.get(MSE_KERNEL.switch)
    os.environ[MSE_KERNEL.switch] = "on" if enabled else "off"
    MSE_KERNEL.reset()
    try:
        if enabled and MSE_KERNEL.load() is None:
            pytest.skip("the MSE kernel cannot be built here")
        yield
    finally:
        if saved is None:
            del os.environ[MSE_KERNEL.switch]
        else:
            os.environ[MSE_KERNEL.switch] = saved
        MSE_KERNEL.reset()


def _bits(tensor):
    return tensor.contiguous().view(torch.int32)


_TABLES = {
    "kind": st.sampled_from(["gaussian", "heavy", "zipf"]),
    "rows": st.integers(1, 20),
    "cols": st.integers(1, 70),
    "bits": st.integers(1, 8),
    "pruned": st.sampled_from([0.0, 0.3, 0.9]),
    # 1e5 overflows float16: torch's loss turns NaN, and the replay must follow it there too
    "magnitude": st.sampled_from([1e-6, 1.0, 300.0, 1e5]),
    "seed": st.integers(0, 2**16),
}


def _table(kind, rows, cols, pruned, magnitude, seed):
    table = _rows(kind, rows, cols, seed) * magnitude
    table[0, : cols // 2] = 0.0  # zeros and equal values: ties in min, max and the walk
    if pruned:
        keep = torch.rand(rows, cols, generator=torch.Generator().manual_seed(seed + 1)) >= pruned
        return table * keep, keep
    return table, None


@settings(max_examples=40, deadline=None)
@given(**_TABLES)
def test_the_kernel_replays_choose_qparams_optimized_bit_for_bit(
    kind, rows, cols, bits, pruned, magnitude, seed
):
    table, keep = _table(kind, rows, cols, pruned, magnitude, seed)
    with _mse_kernel(True):
        low, high = greedy_ranges(table, keep, bits)
    oracle_low, oracle_high = _greedy_oracle(table, keep, bits)
    assert torch.equal(_bits(low), _bits(oracle_low))
    assert torch.equal(_bits(high), _bits(oracle_high))


@settings(max_examples=30, deadline=None)
@given(**_TABLES)
def test_the_tensor_op_walk_replays_choose_qparams_optimized_bit_for_bit(
    kind, rows, cols, bits, pruned, magnitude, seed
):
    table, keep = _table(kind, rows, cols, pruned, magnitude, seed)
    some = torch.ones(rows, dtype=torch.bool) if keep is None else keep.any(dim=1)
    table, keep = table[some], None if keep is None else keep[some]
    low, high = _replayed_walk(table, keep, bits)
    oracle_low, oracle_high = _greedy_oracle(table, keep, bits)
    assert torch.equal(_bits(low), _bits(oracle_low))
    assert torch.equal(_bits(high), _bits(oracle_high))


@pytest.mark.parametrize("byte", [2, 255])
def test_a_keep_mask_holding_other_bytes_than_one_counts_them_as_kept(byte):
    # A bool tensor viewed from uint8 may hold any non-zero byte: the kernel packs by it
    # (it once added the byte itself, writing past its buffer).
    table = torch.linspace(-1, 1, 1024).reshape(16, 64).contiguous()
    ones = torch.zeros(16, 64, dtype=torch.uint8)
    ones[:, ::3] = 1
    other = ones * byte
    settings_ = Quantization(4, range="mse")
    with _mse_kernel(True):
        expected = greedy_ranges(table, ones.view(torch.bool), 4)
        found = greedy_ranges(table, other.view(torch.bool), 4)
        expected_qparams = mse_qparams(table, settings_, ones.view(torch.bool))
        found_qparams = mse_qparams(table, settings_, other.view(torch.bool))
    for a, b in zip((*expected, *expected_qparams), (*found, *found_qparams), strict=True):
        assert torch.equal(_bits(a), _bits(b))


@pytest.mark.parametrize("pruned", [False, True])
def test_zero_ends_keep_the_sign_of_the_first_zero_as_torch_does(pruned):
    # Rows whose min (or max) is a zero held as both +0.0 and -0.0: std::min_element keeps the
    # first of equal values, so the sign of torch's end is that of the first zero; 9 rows put
    # one of them in a second row group, past the eight lanes of the first.
    orders = ([0.0, -0.0], [-0.0, 0.0])
    rows = [[*zeros, 0.5, 1.0, 0.25, 2.0] for zeros in orders]  # min a zero
    rows += [[*zeros, -0.5, -1.0, -0.25, -2.0] for zeros in orders]  # max a zero
    table = torch.tensor((rows * 3)[:9])
    keep = torch.ones(table.shape, dtype=torch.bool)
    if pruned:  # a pruned value before the zeros: the kernel packs the kept ones first
        table = torch.cat([torch.full((9, 1), -0.0), table], dim=1)
        keep = torch.cat([torch.zeros(9, 1, dtype=torch.bool), keep], dim=1)
    for bits in (2, 4, 8):
        with _mse_kernel(True):
            low, high = greedy_ranges(table, keep if pruned else None, bits)
        oracle_low, oracle_high = _greedy_oracle(table, keep if pruned else None, bits)
        assert torch.equal(_bits(low), _bits(oracle_low))
        assert torch.equal(_bits(high), _bits(oracle_high))


_NARROW_ROWS = """
import torch
from sparqcli.engine.quantize import greedy_ranges, mse_qparams
from sparqcli.settings import Quantization
generator = torch.Generator().manual_seed(0)
centres = torch.tensor([1000.0, 10.0, -3.0, 1e-3, 65000.0, -1.5e6])[:, None]
table = centres + centres.abs() * 2.0**-22 * torch.randint(-8, 9, (6, 37), generator=generator)
table = torch.cat([table, torch.tensor([[1000.0, 999.998] + [1000.0] * 35])])
keep = torch.rand(table.shape, generator=generator) > 0.3
keep[:, 0] = True
for bits in range(1, 9):
    for k in (None, keep):
        low, high = greedy_ranges(table, k, bits)
        print(bits, low.view(torch.int32).tolist(), high.view(torch.int32).tolist())
        scale, zero_point = mse_qparams(table, Quantization(bits, range="mse"), k)
        print(scale.view(torch.int32).tolist(), zero_point.view(torch.int32).tolist())
"""


def test_rows_too_narrow_for_the_walk_end_and_both_paths_agree():
    # A step below half a float spacing cannot move an end: torch's walk never returns there.
    # Run in child processes, so that a regression fails on the timeout instead of hanging.
    outputs = {}
    for switch in ("on", "off"):
        done = subprocess.run(
            [sys.executable, "-c", _NARROW_ROWS],
            capture_output=True,
            text=True,
            timeout=240,
            check=False,
            env={**os.environ, MSE_KERNEL.switch: switch},
        )
        assert done.returncode == 0, done.stderr
        outputs[switch] = done.stdout
    assert outputs["on"] == outputs["off"]
    assert outputs["on"].count("\n") == 32


@settings(max_examples=25, deadline=None)
@given(scale_dtype=st.sampled_from(["float32", "float16", "bfloat16"]), **_TABLES)
def test_the_kernel_and_the_tensor_ops_choose_the_same_qparams(
    kind, rows, cols, bits, pruned, magnitude, seed, scale_dtype
):
    table, keep = _table(kind, rows, cols, pruned, magnitude, seed)
    settings_ = Quantization(bits, scale_dtype, range="mse")
    try:
        with _mse_kernel(True):
            kernel = mse_qparams(table, settings_, keep)
        with _mse_kernel(False):
            fallback = mse_qparams(table, settings_, keep)
    except TableError:  # a range that does not fit the scale dtype: refused either way
        return
    assert torch.equal(_bits(kernel[0]), _bits(fallback[0]))
    assert torch.equal(_bits(kernel[1]), _bits(fallback[1]))


@pytest.mark.parametrize("kind", ["gaussian", "heavy", "zipf"])
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("pruned", [0.0, 0.5])
def test_mse_is_never_worse_than_choose_qparams_optimized_on_any_row(kind, bits, pruned):
    table, keep = _table(kind, 200, 128, pruned, 1.0, bits)
    settings_ = Quantization(bits, range="mse")
    scale, zero_point = mse_qparams(table, settings_, keep)
    greedy = qparams_from_range(*_greedy_oracle(table, keep, bits), settings_)
    # The search's own measure: never larger, by construction.
    ours = sequential_errors(table, keep, scale, zero_point, bits)
    assert torch.all(ours <= sequential_errors(table, keep, *greedy, bits))
    # Measured independently in float64: the same up to float32 rounding of the sums.
    assert torch.all(
        _errors(table, keep, scale, zero_point, bits)
        <= _errors(table, keep, *greedy, bits) * (1 + 1e-6)
    )


def test_mse_beats_choose_qparams_optimized_where_its_walk_is_short():
    # It shrinks [min, max] by at most 16 %: at 1-2 bits that stays near min/max.
    table, _ = _table("gaussian", 300, 384, 0.0, 1.0, 4)
    for bits, most in ((1, 0.3), (2, 0.65), (4, 0.99)):
        settings_ = Quantization(bits, range="mse")
        ours = row_errors(table, None, *mse_qparams(table, settings_), bits)
        greedy = qparams_from_range(*_greedy_oracle(table, None, bits), settings_)
        assert float(ours.norm() / row_errors(table, None, *greedy, bits).norm()) <= most


@pytest.mark.parametrize(("bits", "gain"), [(2, 0.35), (4, 0.09)])
def test_mse_cuts_the_error_of_gaussian_rows(bits, gain):
    table = _rows("gaussian", 500, 384, 3)
    minmax = row_errors(table, None, *row_qparams(table, Quantization(bits)), bits)
    scale, zero_point = mse_qparams(table, Quantization(bits, range="mse"))
    ours = row_errors(table, None, scale, zero_point, bits)
    assert float(ours.norm() / minmax.norm()) <= 1 - gain


def test_mse_on_empty_and_constant_rows():
    settings_ = Quantization(4, range="mse")
    empty = torch.zeros(0, 5)
    assert [t.numel() for t in mse_qparams(empty, settings_)] == [0, 0]
    table = torch.tensor([[3.0, 3.0, 3.0], [0.0, 0.0, 0.0], [1.0, 0.0, 5.0]])
    keep = torch.tensor([[True, True, True], [True, True, True], [False, False, False]])
    scale, zero_point = mse_qparams(table * keep, settings_, keep)
    decoded = dequantize(quantize(table * keep, scale, zero_point, 4), scale, zero_point)
    assert torch.equal(decoded[:2], table[:2])
    assert torch.isfinite(scale).all() and torch.isfinite(zero_point).all()


def test_the_kernels_float16_rounding_is_torchs():
    with _mse_kernel(True):
        module = MSE_KERNEL.load()
        generator = torch.Generator().manual_seed(0)
        patterns = torch.randint(-(2**31), 2**31 - 1, (2_000_000,), generator=generator)
        edges = torch.tensor(
            [0.0, 65504.0, 65519.99, 65520.0, 1e30, float("inf"), 2.0**-14, 2.0**-24,
             2.0**-25, 3 * 2.0**-26, 2.0**-14 * 0.9999, 1.0 + 2.0**-11, 1.0 + 3 * 2.0**-11]
        )  # fmt: skip
        for values in (patterns.to(torch.int32).view(torch.float32), edges, -edges):
            rounded, expected = module.round_to_float16(values), values.half().float()
            number = ~torch.isnan(expected)
            assert torch.equal(_bits(rounded[number]), _bits(expected[number]))
            assert torch.isnan(rounded[~number]).all()


@pytest.mark.parametrize("bits", [1, 4, 8])
@pytest.mark.parametrize(
    ("scale_dtype", "narrow"), [("float32", 0), ("float16", 1), ("bfloat16", 2)]
)
def test_the_kernels_qparams_are_qparams_from_range(bits, scale_dtype, narrow):
    # Eight rows at a time, float16 and bfloat16 rounded (scales upwards) in vector lanes.
    with _mse_kernel(True):
        module = MSE_KERNEL.load()
    generator = torch.Generator().manual_seed(bits)
    patterns = torch.randint(-(2**31), 2**31 - 1, (200_000,), generator=generator)
    spread = torch.randn(200_000, generator=generator)
    spread *= torch.exp(torch.randn(200_000, generator=generator) * 8)
    edges = torch.tensor(
        [0.0, -0.0, 1e-40, 2.0**-24, 2.0**-25, 2.0**-14, 65504.0, 65519.0, 65520.0, 1e5,
         3.3e38, -3.3e38, float("inf"), -float("inf"), float("nan"), 1.0, -1.0]
    )  # fmt: skip
    low = torch.cat([patterns.to(torch.int32).view(torch.float32), spread, edges.repeat(17)])
    high = torch.cat(
        [low[:200_000].flip(0), spread.flip(0) + spread.abs() * 3, edges.repeat_interleave(17)]
    )
    high = torch.where(torch.isnan(low), low, torch.maximum(high, low))
    settings_ = Quantization(bits, scale_dtype)
    expected = qparams_from_range(low, high, settings_, check=False, refuse_off_grid=False)
    for found, wanted in zip(module.range_qparams(low, high, bits, narrow), expected, strict=True):
        number = ~torch.isnan(wanted)
        assert torch.equal(_bits(found[number]), _bits(wanted[number]))
        assert torch.isnan(found[~number]).all()


@pytest.mark.parametrize("kind", ["gaussian", "heavy", "zipf"])
@pytest.mark.parametrize("bits", [5, 6, 7, 8])
def test_the_replay_ends_early_only_where_the_walk_cannot_change_its_answer(kind, bits):
    # From 6 bits the replay stops a row's walk once the clamped tails alone cost more than its
    # best loss: many rows, with and without pruning, against torch's whole walk.
    table, keep = _table(kind, 1500, 96, 0.3 if bits % 2 else 0.0, 1.0, bits)
    with _mse_kernel(True):
        low, high = greedy_ranges(table, keep, bits)
    oracle_low, oracle_high = _greedy_oracle(table, keep, bits)
    assert torch.equal(_bits(low), _bits(oracle_low))
    assert torch.equal(_bits(high), _bits(oracle_high))
