"""Fused CUDA kernels (Triton) for the engine's passes, bit-identical to its tensor ops.

Each kernel reads a row chunk once and does in registers what the tensor ops do in a dozen
passes over memory: block scores; each row's range of pruned values; quantize, keep the codes
of kept values (compacted in row-major order) and sum the statistics. Every float operation is
the tensor ops' own, in the same order: launches disable FMA contraction, divisions are
correctly rounded (`div_rn`) and rounding is half-to-even, so codes, qparams and masks equal
the CPU's. Used on CUDA when Triton is installed, for whole-block pruning (pipeline.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparqcli.settings import Norm


@triton.jit
def _round_half_even(value):
    # torch.round's half-to-even, from exact steps (libdevice's rint is not interpretable).
    low = tl.floor(value)
    fraction = value - low
    odd = (low - 2.0 * tl.floor(low * 0.5)) != 0.0
    up = (fraction > 0.5) | ((fraction == 0.5) & odd)
    return tl.where(up, low + 1.0, low)


@triton.jit
def _levels(values, inverse_scale, zero_point, quant_max):
    # quantize_levels: round(x * (1/scale) + zero_point), clamped to [0, quant_max].
    scaled = values * inverse_scale + zero_point
    return tl.minimum(tl.maximum(_round_half_even(scaled), 0.0), quant_max)


@triton.jit
def _seen(values, scale, inverse_scale, zero_point, quant_max):
    # The quantize-first sparsifier's view: dequantize(quantize(x)).
    return (_levels(values, inverse_scale, zero_point, quant_max) - zero_point) * scale


@triton.jit
def _block_scores_kernel(
    values_ptr,
    scale_ptr,
    inverse_ptr,
    zero_point_ptr,
    scores_ptr,
    rows,
    cols,
    n_block_rows,
    n_block_cols,
    quant_max,
    BH: tl.constexpr,
    BW: tl.constexpr,
    SEEN: tl.constexpr,
    L1: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    block_row = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)[:, None]
    block_col = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)[None, :]
    valid = (block_row < n_block_rows) & (block_col < n_block_cols)
    total = tl.zeros((BLOCK_R, BLOCK_C), tl.float32)
    for i in tl.static_range(BH):
        row = block_row * BH + i
        row_ok = row < rows
        if SEEN:
            scale = tl.load(scale_ptr + row, mask=row_ok, other=1.0)
            inverse = tl.load(inverse_ptr + row, mask=row_ok, other=1.0)
            zero_point = tl.load(zero_point_ptr + row, mask=row_ok, other=0.0)
        for j in tl.static_range(BW):
            col = block_col * BW + j
            inside = valid & row_ok & (col < cols)
            value = tl.load(values_ptr + row * cols + col, mask=inside, other=0.0)
            if SEEN:
                value = tl.where(inside, _seen(value, scale, inverse, zero_point, quant_max), 0.0)
            norm = tl.abs(value) if L1 else value * value
            # block_scores sums a block's norms in row-major order, padding counting as 0.0
            # (norms are never -0.0, so starting from 0.0 changes no bits).
            total += norm
    height = tl.minimum(rows - block_row * BH, BH)
    width = tl.minimum(cols - block_col * BW, BW)
    score = tl.math.div_rn(total, (height * width).to(tl.float32))
    tl.store(scores_ptr + block_row * n_block_cols + block_col, score, mask=valid)


@triton.jit
def _keep_of(keep_ptr, row, col, inside, n_block_cols, BH: tl.constexpr, BW: tl.constexpr):
    flags = tl.load(keep_ptr + (row // BH) * n_block_cols + col // BW, mask=inside, other=0)
    return (flags != 0) & inside


@triton.jit
def _pruned_range_kernel(
    values_ptr,
    keep_ptr,
    min_ptr,
    max_ptr,
    rows,
    n_block_cols,
    cols: tl.constexpr,
    BH: tl.constexpr,
    BW: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = row < rows
    low = tl.full((BLOCK_R,), float("inf"), tl.float32)
    high = tl.full((BLOCK_R,), float("-inf"), tl.float32)
    for start in range(0, cols, BLOCK_C):
        col = start + tl.arange(0, BLOCK_C)
        inside = row_ok[:, None] & (col < cols)[None, :]
        value = tl.load(values_ptr + row[:, None] * cols + col[None, :], mask=inside, other=0.0)
        keep = _keep_of(keep_ptr, row[:, None], col[None, :], inside, n_block_cols, BH, BW)
        pruned = value * keep.to(tl.float32)  # x * mask, signed zeros and all, as the reference
        low = tl.minimum(low, tl.min(tl.where(inside, pruned, float("inf")), axis=1))
        high = tl.maximum(high, tl.max(tl.where(inside, pruned, float("-inf")), axis=1))
    tl.store(min_ptr + row, low, mask=row_ok)
    tl.store(max_ptr + row, high, mask=row_ok)


@triton.jit
def _quantize_kernel(
    values_ptr,
    keep_ptr,
    scale_ptr,
    inverse_ptr,
    zero_point_ptr,
    offsets_ptr,
    codes_ptr,
    sums_ptr,
    rows,
    n_block_cols,
    quant_max,
    cols: tl.constexpr,
    HAS_KEEP: tl.constexpr,
    SEEN: tl.constexpr,
    BH: tl.constexpr,
    BW: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = row < rows
    scale = tl.load(scale_ptr + row, mask=row_ok, other=1.0)[:, None]
    inverse = tl.load(inverse_ptr + row, mask=row_ok, other=1.0)[:, None]
    zero_point = tl.load(zero_point_ptr + row, mask=row_ok, other=0.0)[:, None]
    position = tl.load(offsets_ptr + row, mask=row_ok, other=0)
    original_sq = tl.zeros((BLOCK_R,), tl.float32)
    decoded_sq = tl.zeros((BLOCK_R,), tl.float32)
    error_sq = tl.zeros((BLOCK_R,), tl.float32)
    dot = tl.zeros((BLOCK_R,), tl.float32)
    zeros = tl.zeros((BLOCK_R,), tl.float32)
    for start in range(0, cols, BLOCK_C):
        col = start + tl.arange(0, BLOCK_C)
        inside = row_ok[:, None] & (col < cols)[None, :]
        value = tl.load(values_ptr + row[:, None] * cols + col[None, :], mask=inside, other=0.0)
        if HAS_KEEP:
            keep = _keep_of(keep_ptr, row[:, None], col[None, :], inside, n_block_cols, BH, BW)
        else:
            keep = inside
        seen = value
        if SEEN:
            seen = _seen(value, scale, inverse, zero_point, quant_max)
        level = _levels(seen, inverse, zero_point, quant_max)
        decoded = tl.where(keep, (level - zero_point) * scale, 0.0)
        kept = keep.to(tl.int32)
        before = tl.cumsum(kept, axis=1) - kept
        tl.store(codes_ptr + position[:, None] + before, level.to(tl.uint8), mask=keep)
        position += tl.sum(kept, axis=1)
        error = decoded - value
        original_sq += tl.sum(value * value, axis=1)
        decoded_sq += tl.sum(decoded * decoded, axis=1)
        error_sq += tl.sum(error * error, axis=1)
        dot += tl.sum(value * decoded, axis=1)
        zeros += tl.sum(tl.where(inside & (decoded == 0.0), 1.0, 0.0), axis=1)
    sums = sums_ptr + row * 5
    tl.store(sums, original_sq, mask=row_ok)
    tl.store(sums + 1, decoded_sq, mask=row_ok)
    tl.store(sums + 2, error_sq, mask=row_ok)
    tl.store(sums + 3, dot, mask=row_ok)
    tl.store(sums + 4, zeros, mask=row_ok)


def _pow2(n: int, cap: int) -> int:
    return min(cap, triton.next_power_of_2(max(1, n)))


def _row_tiles(cols: int) -> tuple[int, int]:
    block_c = _pow2(cols, 1024)
    return max(1, 2048 // block_c), block_c


def block_scores(
    values: torch.Tensor,
    block_shape: tuple[int, int],
    norm: Norm,
    out: torch.Tensor,
    qparams: tuple[torch.Tensor, torch.Tensor, torch.Tensor, int] | None = None,
) -> torch.Tensor:
    """Writes `sparsify.block_scores(value_norms(v))` of a contiguous float32 chunk into `out`.

    `v` is the chunk itself, or with `qparams` = (scale, inverse_scale, zero_point, quant_max)
    its quantize-first view `dequantize(quantize(chunk))`. `block_shape` must be cut to the
    chunk (`fit_blocks`). Returns `out`.
    """
    rows, cols = values.shape
    n_block_rows, n_block_cols = out.shape
    block_c = _pow2(n_block_cols, 256)
    block_r = max(1, 1024 // block_c)
    scale, inverse, zero_point, quant_max = qparams or (values, values, values, 0)
    grid = (triton.cdiv(n_block_rows, block_r), triton.cdiv(n_block_cols, block_c))
    _block_scores_kernel[grid](
        values, scale, inverse, zero_point, out, rows, cols, n_block_rows, n_block_cols,
        float(quant_max), BH=block_shape[0], BW=block_shape[1], SEEN=qparams is not None,
        L1=norm == "L1", BLOCK_R=block_r, BLOCK_C=block_c, enable_fp_fusion=False,
    )  # fmt: skip
    return out


def pruned_range(
    values: torch.Tensor, keep_blocks: torch.Tensor, block_shape: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns each row's min and max of `values * keep` (keep per block, bool), float32.

    A row whose min is a zero may hold the other zero than torch.aminmax's (see quantize).
    """
    rows, cols = values.shape
    low = torch.empty(rows, dtype=torch.float32, device=values.device)
    high = torch.empty_like(low)
    block_r, block_c = _row_tiles(cols)
    _pruned_range_kernel[(triton.cdiv(rows, block_r),)](
        values, keep_blocks.view(torch.uint8), low, high, rows, keep_blocks.shape[1], cols,
        BH=block_shape[0], BW=block_shape[1], BLOCK_R=block_r, BLOCK_C=block_c,
        enable_fp_fusion=False,
    )  # fmt: skip
    return low, high


def quantize_and_keep(
    values: torch.Tensor,
    keep_blocks: torch.Tensor | None,
    block_shape: tuple[int, int],
    qparams: tuple[torch.Tensor, torch.Tensor, torch.Tensor, int],
    offsets: torch.Tensor,
    codes: torch.Tensor,
    seen: bool,
) -> torch.Tensor:
    """Quantizes a chunk and writes the uint8 codes of its kept values into `codes`.

    Row r's kept codes go to `codes[offsets[r]:]` in column order. With `seen` the chunk is
    first taken to its quantize-first view. Returns per-row float32 sums, shape (rows, 5): x^2,
    x_hat^2, (x_hat - x)^2, x * x_hat and the count of x_hat == 0, where x_hat is the decoded
    value (0.0 where pruned).
    """
    rows, cols = values.shape
    scale, inverse, zero_point, quant_max = qparams
    sums = torch.empty((rows, 5), dtype=torch.float32, device=values.device)
    keep = keep_blocks.view(torch.uint8) if keep_blocks is not None else values
    n_block_cols = keep_blocks.shape[1] if keep_blocks is not None else 1
    block_r, block_c = _row_tiles(cols)
    _quantize_kernel[(triton.cdiv(rows, block_r),)](
        values, keep, scale, inverse, zero_point, offsets, codes, sums, rows, n_block_cols,
        float(quant_max), cols, HAS_KEEP=keep_blocks is not None, SEEN=seen,
        BH=block_shape[0], BW=block_shape[1], BLOCK_R=block_r, BLOCK_C=block_c,
        enable_fp_fusion=False,
    )  # fmt: skip
    return sums
