"""The pipeline against torch.ao itself: codes, scales, zero points and keep-masks bit for bit."""

from __future__ import annotations

import itertools
import zlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from sparqcli.engine.pipeline import compress_rows, compress_table
from sparqcli.engine.quantize import dequantize, mse_qparams, quantize, row_qparams
from sparqcli.engine.sparsify import block_grid, block_scores, blocks_to_prune, value_norms
from sparqcli.errors import SettingError, TableError
from sparqcli.settings import Quantization, Sparsity
from tests.reference import run_reference

BLOCK_SHAPES = [(1, 1), (1, 4), (2, 2), (4, 1), (2, 3)]
LEVELS = [0.0, 0.3, 0.5, 0.8, 1.0]
ORDERS = ["sparsify-first", "quantize-first"]


def _cases() -> list[tuple]:
    cases = []
    for index, (order, bits, block_shape, level) in enumerate(
        itertools.product(ORDERS, (8, 4), BLOCK_SHAPES, LEVELS)
    ):
        norm = ("L1", "L2")[index % 2]
        module = (nn.Embedding, nn.EmbeddingBag)[(index // 2) % 2]
        block_size = block_shape[0] * block_shape[1]
        zeros = None if index % 3 or block_size == 1 else block_size - 1
        # torch.ao's quint4x2 re-quantization mangles odd widths: 4-bit quantize-first uses 38.
        shape = (1001, 38) if bits == 4 and order == "quantize-first" else (1001, 37)
        case_id = f"{order}-{bits}b-{block_shape}-{level}-{norm}-{module.__name__}-z{zeros}"
        cases.append(
            pytest.param(order, bits, block_shape, level, norm, module, zeros, shape, id=case_id)
        )
    return cases


@pytest.mark.parametrize(
    ("order", "bits", "block_shape", "level", "norm", "module", "zeros", "shape"), _cases()
)
def test_matches_torch_ao_bit_for_bit(
    order, bits, block_shape, level, norm, module, zeros, shape, monkeypatch, request
):
    seed = zlib.crc32(request.node.callspec.id.encode())
    table = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    reference = run_reference(
        table,
        sparsify_first=order == "sparsify-first",
        bits=bits,
        level=level,
        block_shape=block_shape,
        zeros_per_block=zeros,
        norm=norm,
        module=module,
        monkeypatch=monkeypatch,
    )
    compressed, _ = compress_table(
        table,
        order,
        Sparsity(level, block_shape, zeros, norm),
        Quantization(bits),
        chunk_rows=64,
    )
    assert torch.equal(compressed.scale.double(), reference.scale.double())
    assert torch.equal(
        compressed.zero_point.view(torch.int32), reference.zero_point.view(torch.int32)
    )
    _assert_matches_up_to_ties(compressed, reference, table, order, block_shape, bits, norm)


def _assert_matches_up_to_ties(compressed, reference, table, order, block_shape, bits, norm):
    """Asserts sparq's keep-mask and codes equal torch.ao's, up to the blocks that tie."""
    keep = compressed.value_keep_mask()
    if order == "quantize-first" and block_shape == (1, 1):
        # A row of a dequantized table holds at most 2**bits distinct values, so single-value
        # blocks tie; the reference's unstable sort then picks arbitrarily among the blocks that
        # tie at the threshold. Everywhere else the masks, and so the codes, must agree.
        differ = keep != reference.keep_mask
        assert int(keep.sum()) == int(reference.keep_mask.sum())
        if differ.any():
            scale, zero_point = compressed.scale, compressed.zero_point
            seen = dequantize(quantize(table, scale, zero_point, bits), scale, zero_point)
            scores = value_norms(seen, norm)
            assert torch.all(scores[differ] == scores[differ][0])
            assert torch.all(scores[~keep] <= scores[differ][0])
        assert torch.equal(compressed.dense_codes()[~differ], reference.codes[~differ])
    else:
        assert torch.equal(keep, reference.keep_mask)
        assert torch.equal(compressed.dense_codes(), reference.codes)


def _with_reference(table, order, sparsity, monkeypatch, chunk_rows=None):
    """Returns sparq's and torch.ao's results for `table` at 8 bits."""
    reference = run_reference(
        table,
        sparsify_first=order == "sparsify-first",
        bits=8,
        level=sparsity.level,
        block_shape=sparsity.block_shape,
        zeros_per_block=sparsity.zeros_per_block,
        monkeypatch=monkeypatch,
    )
    compressed, _ = compress_table(table, order, sparsity, Quantization(8), chunk_rows=chunk_rows)
    return compressed, reference


def _assert_same_bits(compressed, reference) -> None:
    assert torch.equal(
        compressed.zero_point.view(torch.int32), reference.zero_point.view(torch.int32)
    )
    assert torch.equal(compressed.value_keep_mask(), reference.keep_mask)
    assert torch.equal(compressed.dense_codes(), reference.codes)


@pytest.mark.parametrize("block_shape", BLOCK_SHAPES)
@pytest.mark.parametrize("order", ORDERS)
def test_blocks_that_tile_the_table_match_torch_ao(order, block_shape, monkeypatch):
    # 1000 x 36 is tiled by every block shape, so whole chunks take the block-mask fast path.
    table = torch.randn(1000, 36, generator=torch.Generator().manual_seed(sum(block_shape)))
    sparsity = Sparsity(0.7, block_shape)
    compressed, reference = _with_reference(table, order, sparsity, monkeypatch, chunk_rows=96)
    assert torch.equal(compressed.scale.double(), reference.scale.double())
    if order == "sparsify-first" or block_shape != (1, 1):
        _assert_same_bits(compressed, reference)
    else:  # quantize-first with (1, 1) blocks ties by construction
        _assert_matches_up_to_ties(compressed, reference, table, order, block_shape, 8, "L1")


@pytest.mark.parametrize("order", ORDERS)
def test_signed_zero_row_minimums_match_torch_ao(order, monkeypatch):
    # Rows whose kept values are all positive: the pruned ones become -0.0 (negative values
    # times the mask) or +0.0, so the row minimum is a zero whose sign is the zero point's.
    generator = torch.Generator().manual_seed(8)
    table = torch.rand(300, 32, generator=generator) + 1.0
    tiny = (torch.rand(300, 8, generator=generator) - 0.5) * 1e-3
    table.view(300, 8, 4)[:, :, 0::2] = tiny[:, :, None]
    table.view(300, 8, 4)[:, 1::2] = tiny.view(300, 8, 1)[:, 1::2]
    compressed, reference = _with_reference(table, order, Sparsity(0.4, (1, 4)), monkeypatch)
    _assert_same_bits(compressed, reference)


@pytest.mark.parametrize("zeros", [0, 1, 2, 5, 6])
@pytest.mark.parametrize("order", ORDERS)
def test_zeros_per_block_matches_torch_ao(zeros, order, monkeypatch):
    table = torch.randn(203, 41, generator=torch.Generator().manual_seed(zeros))
    compressed, reference = _with_reference(table, order, Sparsity(0.5, (2, 3), zeros), monkeypatch)
    _assert_same_bits(compressed, reference)


def test_larger_table_matches_torch_ao(monkeypatch):
    table = torch.randn(4000, 25, generator=torch.Generator().manual_seed(7)) * 3 + 1
    for order in ORDERS:
        compressed, reference = _with_reference(table, order, Sparsity(0.8, (1, 4)), monkeypatch)
        _assert_same_bits(compressed, reference)


@pytest.mark.parametrize("order", ORDERS)
def test_chunking_and_score_streaming_do_not_change_the_result(order):
    table = torch.randn(999, 33, generator=torch.Generator().manual_seed(3))
    settings = (Sparsity(0.6, (3, 2), 4), Quantization(4))
    whole, whole_stats = compress_table(table, order, *settings, chunk_rows=10_000)
    streamed, streamed_stats = compress_rows(
        lambda start, stop: table[start:stop],
        (999, 33),
        table.dtype,
        order,
        *settings,
        chunk_rows=7,
        score_budget_bytes=0,
    )
    assert torch.equal(whole.codes, streamed.codes)
    assert torch.equal(whole.keep_mask, streamed.keep_mask)
    assert torch.equal(whole.scale, streamed.scale)
    assert torch.equal(whole.zero_point, streamed.zero_point)
    assert whole_stats.kept == streamed_stats.kept


def test_pruned_values_decode_to_exact_zero_unlike_the_reference(monkeypatch):
    table = torch.randn(500, 32, generator=torch.Generator().manual_seed(11))
    compressed, stats = compress_table(
        table, "quantize-first", Sparsity(0.8, (1, 4)), Quantization(8)
    )
    decoded = compressed.decode()
    keep = compressed.value_keep_mask()
    assert torch.all(decoded[~keep] == 0.0)
    assert stats.zero_fraction >= stats.pruned_fraction == pytest.approx(0.8, abs=1e-3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_low_precision_tables_compute_in_float32_and_decode_to_their_dtype(dtype):
    table = torch.randn(100, 16, generator=torch.Generator().manual_seed(1)).to(dtype)
    compressed, _ = compress_table(table, "sparsify-first", Sparsity(0.5), Quantization(8))
    as_float32, _ = compress_table(table.float(), "sparsify-first", Sparsity(0.5), Quantization(8))
    assert torch.equal(compressed.codes, as_float32.codes)
    assert compressed.decode().dtype == dtype
    assert torch.equal(compressed.decode(), as_float32.decode().to(dtype))


def test_runs_are_deterministic_with_ties():
    # Every block ties: the documented rule prunes the lowest block indices first.
    table = torch.ones(10, 8)
    compressed, _ = compress_table(table, "sparsify-first", Sparsity(0.25, (1, 4)), Quantization(8))
    expected = torch.ones(10, 2, dtype=torch.bool)
    expected.view(-1)[:5] = False
    assert torch.equal(compressed.keep_mask, expected)


def test_nothing_pruned_stores_no_mask():
    table = torch.randn(10, 8)
    for sparsity in (
        Sparsity(0.0),
        Sparsity(0.5, (1, 4), 0),
        Sparsity(0.01),
    ):
        compressed, stats = compress_table(table, "sparsify-first", sparsity, Quantization(8))
        assert compressed.keep_mask is None
        assert stats.kept == 80


@pytest.mark.parametrize("shape", [(0, 8), (8, 0), (0, 0), (1, 1), (1, 9), (9, 1)])
@pytest.mark.parametrize("order", ORDERS)
def test_degenerate_shapes_round_trip(shape, order):
    table = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    compressed, stats = compress_table(table, order, Sparsity(0.5, (2, 2)), Quantization(4))
    decoded = compressed.decode()
    assert decoded.shape == table.shape
    assert stats.values == table.numel()
    keep = compressed.value_keep_mask()
    assert torch.all(decoded[~keep] == 0)


def test_constant_rows_decode_exactly():
    table = torch.full((4, 6), 2.5)
    table[1] = -7.0
    compressed, stats = compress_table(table, "sparsify-first", Sparsity(0.0), Quantization(8))
    assert torch.equal(compressed.decode(), table)
    assert stats.rel_error == 0.0
    assert stats.row_cosine_min == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("level", [0.5, 1.0])
@pytest.mark.parametrize("magnitude", [1e-44, 1e-30, 1e-21, 1.0, 1e19, 2e37])
def test_statistics_hold_for_tiny_and_huge_values(magnitude, level):
    # float32 squares of values below ~1e-19 vanish and above ~1e19 overflow, and row norms
    # above float32's largest or below its smallest normal do not fit float32 (or only as
    # subnormals): the statistics must still be the decoded table's, measured here in float64.
    table = torch.randn(40, 128, generator=torch.Generator().manual_seed(8))
    if magnitude > 1e30:  # values from 2e37 to 1e38: row norms ~4.5e38
        table = table.abs().clamp(max=4.0) + 1.0
    table *= magnitude
    table[3] = 0.0
    compressed, stats = compress_table(table, "sparsify-first", Sparsity(level), Quantization(4))
    original, decoded = table.double(), compressed.decode().double()
    expected = float((decoded - original).norm() / original.norm())
    assert stats.rel_error == pytest.approx(expected, rel=1e-5)
    norms = original.norm(dim=1) * decoded.norm(dim=1)
    cosines = (original * decoded).sum(dim=1) / norms.where(norms > 0, torch.ones(()))
    cosines[3] = 1.0  # zero in both forms
    assert stats.row_cosine_min == pytest.approx(float(cosines.min()), abs=1e-5)
    assert stats.row_cosine_mean == pytest.approx(float(cosines.mean()), abs=1e-5)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_values_name_the_first_bad_row(bad):
    table = torch.randn(50, 4)
    table[17, 2] = bad
    table[30, 1] = bad
    with pytest.raises(TableError, match=r"^emb\.weight: row 17 holds NaN or Inf values$"):
        compress_table(
            table,
            "sparsify-first",
            Sparsity(0.0),
            Quantization(8),
            name="emb.weight",
        )


@pytest.mark.parametrize("order", ["sparsify-first", "quantize-first"])
def test_float64_values_beyond_float32_are_named_as_such(order):
    table = torch.randn(50, 4, dtype=torch.float64)
    table[17, 2] = -1e300
    message = (
        r"^emb\.weight: row 17 holds a value beyond float32's range \(1e\+300\); sparq computes in "
        r"float32, so scale the table down$"
    )
    with pytest.raises(TableError, match=message):
        compress_table(table, order, Sparsity(0.0), Quantization(8), name="emb.weight")
    table[17, 1] = float("nan")  # NaN or Inf first, whatever else the row holds
    with pytest.raises(TableError, match=r"^emb\.weight: row 17 holds NaN or Inf values$"):
        compress_table(table, order, Sparsity(0.0), Quantization(8), name="emb.weight")


def test_huge_finite_values_are_not_mistaken_for_inf():
    table = torch.full((3, 4), 3e38)
    table[:, 0] = 1.0
    compressed, _ = compress_table(table, "sparsify-first", Sparsity(0.0), Quantization(8))
    assert torch.isfinite(compressed.decode()).all()


def test_values_that_would_decode_to_inf_are_refused():
    # Scales rounded up to float16 reach past 65504 by more than half a float16 step: the top
    # code would decode to inf once rounded to the table's dtype.
    table = torch.randn(5000, 4, generator=torch.Generator().manual_seed(3)).half() * 1000
    table[4321] = torch.tensor([65504.0, -65504.0, 1000.0, -2000.0])
    with pytest.raises(
        TableError,
        match=r"^emb: row 4321 decodes to inf in float16: its values come within a quantization "
        r"step of float16's largest \(65504\); range minmax with float32 scales keeps it finite$",
    ):
        compress_table(
            table, "sparsify-first", Sparsity(0.0), Quantization(8, "float16"), name="emb"
        )
    compressed, _ = compress_table(table, "sparsify-first", Sparsity(0.0), Quantization(8))
    assert torch.isfinite(compressed.decode()).all()


def test_value_range_overflow_is_an_error():
    table = torch.tensor([[-3e38, 3e38]])
    with pytest.raises(TableError, match=r"^row 0: value range overflows float32$"):
        compress_table(table, "sparsify-first", Sparsity(0.0), Quantization(8))


@pytest.mark.parametrize(
    ("table", "message"),
    [
        (torch.zeros(3, 4, 5), r"^t: must be a 2-D table, got shape \[3, 4, 5\]$"),
        (torch.zeros(4), r"^t: must be a 2-D table, got shape \[4\]$"),
        (torch.zeros(3, 4, dtype=torch.int64), r"^t: must be a floating table, got dtype int64$"),
    ],
)
def test_tables_that_are_not_2d_float_are_refused(table, message):
    with pytest.raises(TableError, match=message):
        compress_table(table, "sparsify-first", Sparsity(), Quantization(), name="t")


def test_unknown_order_is_a_setting_error():
    with pytest.raises(
        SettingError, match=r"^order: must be sparsify-first or quantize-first, got 'both'$"
    ):
        compress_table(torch.zeros(2, 2), "both", Sparsity(), Quantization())


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _raw_bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.cpu().view({4: torch.int32, 2: torch.int16}[tensor.element_size()])


def _streamed_to_cuda(table, order, settings, score_budget_bytes):
    """Compresses `table` on CUDA from host chunks of 300 rows; returns the CompressedTable."""
    compressed, _ = compress_rows(
        lambda start, stop: table[start:stop],
        tuple(table.shape),
        table.dtype,
        order,
        *settings,
        device="cuda",
        chunk_rows=300,
        score_budget_bytes=score_budget_bytes,
    )
    return compressed


def _assert_same_result(cpu, gpu) -> None:
    assert gpu.codes.device.type == "cuda"
    assert torch.equal(cpu.codes, gpu.codes.cpu())
    assert cpu.scale.dtype == gpu.scale.dtype
    assert torch.equal(_raw_bits(cpu.scale), _raw_bits(gpu.scale))
    assert torch.equal(_raw_bits(cpu.zero_point), _raw_bits(gpu.zero_point))
    if cpu.keep_mask is None:
        assert gpu.keep_mask is None
    else:
        assert torch.equal(cpu.keep_mask, gpu.keep_mask.cpu())


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("shape", [(5000, 64), (1001, 37)])
@pytest.mark.parametrize(
    ("block_shape", "zeros", "bits"),
    [((1, 4), None, 8), ((1, 1), None, 8), ((2, 3), 4, 4), ((4, 1), None, 2), ((2, 2), 0, 8)],
)
@pytest.mark.parametrize("order", ORDERS)
def test_cuda_matches_cpu(order, block_shape, zeros, bits, shape):
    table = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    settings = (Sparsity(0.8, block_shape, zeros), Quantization(bits))
    cpu, cpu_stats = compress_table(table, order, *settings)
    gpu, gpu_stats = compress_table(table.cuda(), order, *settings)
    _assert_same_result(cpu, gpu)
    assert gpu_stats.kept == cpu_stats.kept
    assert gpu_stats.zero_fraction == cpu_stats.zero_fraction
    assert gpu_stats.rel_error == pytest.approx(cpu_stats.rel_error, rel=1e-5)
    assert gpu_stats.row_cosine_min == pytest.approx(cpu_stats.row_cosine_min, abs=1e-5)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize(
    ("bits", "scale_dtype", "range_", "scope", "block_shape", "zeros"),
    [
        (1, "float32", "minmax", "row", (1, 4), None),
        (2, "bfloat16", "mse", "row", (1, 4), None),
        (3, "float16", "mse", "table", (1, 4), None),
        (4, "float32", "mse", "table", (2, 3), 4),
        (5, "bfloat16", "minmax", "table", (1, 1), None),
        (6, "float32", "mse", "row", (2, 2), 0),
        (7, "float16", "minmax", "row", (2, 3), 4),
        (8, "float16", "mse", "row", (4, 1), None),
    ],
)
@pytest.mark.parametrize("order", ORDERS)
def test_cuda_matches_cpu_for_every_width_range_scope_and_scale_dtype(
    order, bits, scale_dtype, range_, scope, block_shape, zeros
):
    table = torch.randn(1001, 37, generator=torch.Generator().manual_seed(bits))
    table *= torch.rand(1001, 1, generator=torch.Generator().manual_seed(9)) * 3
    table[5] = 0.0
    settings = (
        Sparsity(0.6, block_shape, zeros, scope=scope),
        Quantization(bits, scale_dtype, range_),
    )
    cpu, cpu_stats = compress_table(table, order, *settings)
    gpu, gpu_stats = compress_table(table.cuda(), order, *settings)
    _assert_same_result(cpu, gpu)
    assert gpu_stats.kept == cpu_stats.kept
    assert gpu_stats.rel_error == pytest.approx(cpu_stats.rel_error, rel=1e-5)
    _assert_same_result(cpu, _streamed_to_cuda(table, order, settings, score_budget_bytes=0))


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("order", ORDERS)
def test_cuda_streams_chunks_from_the_host_like_the_cpu(order):
    # Chunks read on the host and moved to the GPU, scores recomputed instead of held (the
    # radix selection on the GPU), half-precision input and signed-zero row minimums.
    table = torch.randn(2003, 48, generator=torch.Generator().manual_seed(6)).half()
    table[::7, :24] = table[::7, :24].abs()
    table[::7, 24:] = 0.0
    settings = (Sparsity(0.6, (1, 4)), Quantization(8))
    cpu, _ = compress_table(table, order, *settings)
    for budget in (0, 1 << 30):
        _assert_same_result(cpu, _streamed_to_cuda(table, order, settings, budget))


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 30),
    cols=st.integers(1, 30),
    block_shape=st.tuples(st.integers(1, 4), st.integers(1, 4)),
    level=st.floats(0, 1),
    zeros=st.one_of(st.none(), st.integers(0, 16)),
    bits=st.integers(1, 8),
    order=st.sampled_from(ORDERS),
    scope=st.sampled_from(["table", "row"]),
    value_range=st.sampled_from(["minmax", "mse"]),
    seed=st.integers(0, 2**16),
)
def test_pruned_values_are_zero_and_kept_values_within_half_a_step(
    rows, cols, block_shape, level, zeros, bits, order, scope, value_range, seed
):
    if zeros is not None:
        zeros = min(zeros, block_shape[0] * block_shape[1])
    table = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    compressed, stats = compress_table(
        table,
        order,
        Sparsity(level, block_shape, zeros, scope=scope),
        Quantization(bits, range=value_range),
        chunk_rows=block_shape[0],
    )
    keep = compressed.value_keep_mask()
    decoded = compressed.decode()
    assert torch.all(decoded[~keep] == 0.0)
    assert all(code <= (1 << bits) - 1 for code in compressed.codes.tolist())
    assert compressed.codes.numel() == int(keep.sum()) == stats.kept == compressed.kept_count()
    assert torch.equal(compressed.kept_per_row(), keep.sum(1))
    if order == "sparsify-first" and value_range == "mse":
        # The qparams are the MSE search's over the kept values of the pruned rows.
        expected = mse_qparams(table * keep, compressed.quantization, keep)
        assert torch.equal(compressed.scale, expected[0])
        assert torch.equal(compressed.zero_point, expected[1])
    elif order == "sparsify-first":
        step = compressed.scale[:, None].expand_as(table)
        assert torch.all((decoded - table)[keep].abs() <= step[keep] * 0.5 * (1 + 1e-5) + 1e-7)
    else:
        # quantize-first: kept values are the round trip of the first quantization.
        scale, zero_point = compressed.scale, compressed.zero_point
        first = dequantize(quantize(table, scale, zero_point, bits), scale, zero_point)
        assert torch.equal(decoded[keep], first[keep])


def test_decode_by_row_chunks_equals_whole_decode():
    table = torch.randn(101, 13, generator=torch.Generator().manual_seed(4))
    for settings_ in (Sparsity(0.7, (3, 2)), Sparsity(0.7, (3, 2), 3)):
        compressed, _ = compress_table(table, "sparsify-first", settings_, Quantization(4))
        whole = compressed.decode()
        pieces = torch.cat(
            [compressed.decode(start, min(start + 9, 101)) for start in range(0, 101, 9)]
        )
        assert torch.equal(whole, pieces)


@pytest.mark.parametrize("order", ORDERS)
def test_zero_fraction_counts_kept_values_that_decode_to_zero(order):
    # Rows with a zero minimum have zero point 0, so kept zeros decode to 0.0; rows with a
    # denormal minimum have a tiny zero point; the rest decode every kept value to a non-zero.
    generator = torch.Generator().manual_seed(12)
    table = torch.randn(400, 24, generator=generator)
    table[::3] = table[::3].abs()
    table[::3, ::5] = 0.0
    table[1::3, 0] = -1e-45
    table[1::3, 1:] = table[1::3, 1:].abs()
    for level in (0.0, 0.5):
        compressed, stats = compress_table(
            table, order, Sparsity(level, (1, 4)), Quantization(8), chunk_rows=50
        )
        assert stats.zero_fraction == int((compressed.decode() == 0).sum()) / table.numel()
        assert stats.zero_fraction > stats.pruned_fraction


# --- the opt-in options: scope row, range mse, every width -------------------------------------


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize(("block_shape", "level"), [((1, 4), 0.5), ((2, 3), 0.7), ((3, 1), 0.25)])
def test_row_scope_prunes_exact_counts_in_every_block_row(order, block_shape, level):
    table = torch.randn(301, 29, generator=torch.Generator().manual_seed(4))
    table[:40] *= 0.01  # rows of small norms: a table-wide ranking would empty them
    compressed, _ = compress_table(
        table, order, Sparsity(level, block_shape, scope="row"), Quantization(4)
    )
    n_block_rows, n_block_cols = block_grid(table.shape, block_shape)
    per_row = blocks_to_prune(level, n_block_cols)
    pruned = ~compressed.keep_mask
    assert pruned.shape == (n_block_rows, n_block_cols)
    assert torch.all(pruned.sum(1) == per_row)
    kept = compressed.kept_per_row()
    assert int(kept.min()) > 0
    # The pruned blocks are each block row's lowest scores, ties to the lower column.
    seen = table
    if order == "quantize-first":
        scale, zero_point = row_qparams(table, compressed.quantization)
        seen = dequantize(quantize(table, scale, zero_point, 4), scale, zero_point)
    scores = block_scores(value_norms(seen, "L1"), block_shape)
    for scores_row, pruned_row in zip(scores.tolist(), pruned.tolist(), strict=True):
        ranked = sorted(range(n_block_cols), key=lambda j: (scores_row[j], j))
        assert sorted(ranked[:per_row]) == [j for j, p in enumerate(pruned_row) if p]


def test_row_scope_at_level_one_empties_every_row_and_table_scope_empties_small_rows():
    table = torch.randn(200, 16, generator=torch.Generator().manual_seed(5))
    table[:50] *= 0.01
    settings = Quantization(8)
    by_table, _ = compress_table(table, "sparsify-first", Sparsity(0.5), settings)
    by_row, _ = compress_table(table, "sparsify-first", Sparsity(0.5, scope="row"), settings)
    assert int((by_table.kept_per_row() == 0).sum()) >= 50
    assert torch.all(by_row.kept_per_row() == 8)
    everything, _ = compress_table(table, "sparsify-first", Sparsity(1.0, scope="row"), settings)
    assert everything.codes.numel() == 0 and torch.all(everything.decode() == 0)


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize(("scope", "value_range"), [("row", "minmax"), ("table", "mse")])
def test_new_options_do_not_depend_on_chunking(order, scope, value_range):
    table = torch.randn(999, 33, generator=torch.Generator().manual_seed(3))
    settings = (
        Sparsity(0.6, (3, 2), 4, scope=scope),
        Quantization(3, range=value_range),
    )
    whole, whole_stats = compress_table(table, order, *settings, chunk_rows=10_000)
    streamed, streamed_stats = compress_rows(
        lambda start, stop: table[start:stop],
        (999, 33),
        table.dtype,
        order,
        *settings,
        chunk_rows=7,
        score_budget_bytes=0,
    )
    for part in ("codes", "keep_mask", "scale", "zero_point"):
        assert torch.equal(getattr(whole, part), getattr(streamed, part))
    assert whole_stats == streamed_stats


@pytest.mark.parametrize("order", ORDERS)
def test_mse_lowers_the_table_error_in_both_orders(order):
    table = torch.randn(400, 64, generator=torch.Generator().manual_seed(8))
    sparsity = Sparsity(0.3, (1, 4))
    _, minmax = compress_table(table, order, sparsity, Quantization(2))
    compressed, mse = compress_table(table, order, sparsity, Quantization(2, range="mse"))
    assert mse.rel_error < minmax.rel_error * 0.9
    if order == "quantize-first":
        # quantize-first keeps the qparams it chose on the whole rows before pruning
        expected = mse_qparams(table, compressed.quantization)
        assert torch.equal(compressed.scale, expected[0])
        assert torch.equal(compressed.zero_point, expected[1])


def test_defaults_are_unchanged_by_the_new_options(monkeypatch):
    # scope: table and range: minmax are the reference: spelled out, they give the same bits.
    table = torch.randn(300, 20, generator=torch.Generator().manual_seed(9))
    plain, _ = compress_table(table, "sparsify-first", Sparsity(0.5), Quantization(4))
    explicit, _ = compress_table(
        table,
        "sparsify-first",
        Sparsity(0.5, scope="table"),
        Quantization(4, range="minmax"),
    )
    for part in ("codes", "keep_mask", "scale", "zero_point"):
        assert torch.equal(getattr(plain, part), getattr(explicit, part))
