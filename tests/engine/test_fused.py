"""The fused Triton kernels (engine/fused.py) through Triton's CPU interpreter, without a GPU.

CI has no GPU, so this is where the kernels and the pipeline's fused path (`_fused_chunk`)
run on every change: their codes, qparams and masks must equal the tensor ops' bit for bit.
On a machine with CUDA the `cuda` tests run the compiled kernels instead.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

from sparqcli.engine.options import EngineOptions
from sparqcli.engine.pipeline import compress_rows, compress_table
from sparqcli.settings import Quantization, Sparsity

if torch.cuda.is_available():
    pytest.skip("a CUDA device is present: the cuda tests run the kernels", allow_module_level=True)
# Triton reads TRITON_INTERPRET when a kernel is defined (its own at `import triton`, the
# engine's at `import sparqcli.engine.fused`) and while one runs (`_interpreter`). Unset
# between (as it was), so that the other tests' default options stay on tensor ops.
if "triton" in sys.modules:
    pytest.skip("triton was imported before: its kernels are compiled", allow_module_level=True)
_before = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"
try:
    pytest.importorskip("triton")
    import sparqcli.engine.fused  # noqa: F401
finally:
    if _before is None:
        del os.environ["TRITON_INTERPRET"]
    else:
        os.environ["TRITON_INTERPRET"] = _before

# The interpreter computes masked-off lanes too (0/0 there); their results are never stored.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

INTERPRETED = EngineOptions(interpret_kernels=True)
TENSOR_OPS = EngineOptions(fused_kernels=False)


@pytest.fixture(autouse=True)
def _interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _same(expected, actual) -> None:
    assert torch.equal(expected.codes, actual.codes)
    assert torch.equal(expected.scale, actual.scale)  # the same dtype; -0.0 vs 0.0 below
    assert torch.equal(expected.scale.view(torch.uint8), actual.scale.view(torch.uint8))
    assert torch.equal(expected.zero_point.view(torch.uint8), actual.zero_point.view(torch.uint8))
    if expected.keep_mask is None:
        assert actual.keep_mask is None
    else:
        assert torch.equal(expected.keep_mask, actual.keep_mask)


def _table(rows: int, cols: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    table = torch.randn(rows, cols, generator=generator)
    table *= torch.rand(rows, 1, generator=generator) * 3
    table[3] = 0.0
    table[7, : cols // 2] = table[7, : cols // 2].abs()  # a row whose minimum is a kept zero
    table[7, cols // 2 :] = 0.0
    return table


@pytest.mark.parametrize("order", ["sparsify-first", "quantize-first"])
@pytest.mark.parametrize(
    ("level", "block_shape", "norm", "scope", "bits", "scale_dtype"),
    [
        (0.6, (1, 4), "L1", "table", 8, "float32"),
        (0.0, (1, 4), "L1", "table", 4, "float32"),
        (0.8, (1, 1), "L2", "table", 2, "float16"),
        (0.5, (2, 3), "L2", "table", 5, "bfloat16"),
        (0.5, (4, 1), "L1", "row", 1, "float32"),
        (0.7, (2, 2), "L1", "row", 7, "float16"),
    ],
)
def test_interpreted_kernels_match_tensor_ops(
    order, level, block_shape, norm, scope, bits, scale_dtype
):
    table = _table(203, 37, seed=bits)
    settings = (
        Sparsity(level, block_shape, norm=norm, scope=scope),
        Quantization(bits, scale_dtype),
    )
    expected, expected_stats = compress_table(table, order, *settings, options=TENSOR_OPS)
    actual, actual_stats = compress_table(table, order, *settings, options=INTERPRETED)
    _same(expected, actual)
    assert actual_stats.kept == expected_stats.kept
    assert actual_stats.zero_fraction == expected_stats.zero_fraction
    assert actual_stats.rel_error == pytest.approx(expected_stats.rel_error, rel=1e-5)


@pytest.mark.parametrize("order", ["sparsify-first", "quantize-first"])
def test_interpreted_kernels_stream_chunks_with_recomputed_scores(order):
    table = _table(301, 20, seed=11)
    settings = (Sparsity(0.6, (1, 4)), Quantization(8))
    expected, _ = compress_table(table, order, *settings, options=TENSOR_OPS)
    actual, _ = compress_rows(
        lambda start, stop: table[start:stop],
        tuple(table.shape),
        table.dtype,
        order,
        *settings,
        chunk_rows=64,
        score_budget_bytes=0,
        options=INTERPRETED,
    )
    _same(expected, actual)
