"""`CompressedTable`: one compressed embedding table, everything needed to decode it."""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property

import torch

from sparqcli.engine.quantize import dequantize, quantize
from sparqcli.engine.sparsify import expand_blocks, fit_blocks
from sparqcli.settings import Order, Quantization, Sparsity


@dataclass(frozen=True, eq=False)
class CompressedTable:
    """A compressed 2-D table.

    `codes` holds the uint8 codes of the kept values only, in row-major order (one code per byte;
    packing is the file format's business). `scale` and `zero_point` hold one float32 per row.
    `keep_mask` is None when nothing is pruned; otherwise a bool mask per block, shape
    `(n_block_rows, n_block_cols)`, when `mask_per_block` (whole blocks pruned), else per value,
    shape `shape`. Kept values decode to `(q - zero_point) * scale`, pruned ones to exactly 0.0.
    """

    shape: tuple[int, int]
    dtype: torch.dtype
    order: Order
    sparsity: Sparsity
    quantization: Quantization
    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor
    keep_mask: torch.Tensor | None
    mask_per_block: bool

    @property
    def rows(self) -> int:
        """Returns the number of rows."""
        return self.shape[0]

    @property
    def cols(self) -> int:
        """Returns the number of columns."""
        return self.shape[1]

    def value_keep_mask(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Returns the per-value bool keep-mask of rows `start:stop` (all True if nothing pruned)."""
        stop = self.rows if stop is None else stop
        shape = (stop - start, self.cols)
        if self.keep_mask is None:
            return torch.ones(shape, dtype=torch.bool, device=self.codes.device)
        if not self.mask_per_block:
            return self.keep_mask[start:stop]
        bh = self.sparsity.block_shape[0]
        if start % bh:
            raise ValueError(f"row chunks must start at a multiple of the block height {bh}")
        blocks = self.keep_mask[start // bh : -(-stop // bh)]
        return expand_blocks(blocks, self.sparsity.block_shape, shape)

    def kept_per_row(self) -> torch.Tensor:
        """Returns the number of kept values in each row (int64)."""
        if self.keep_mask is None:
            return torch.full((self.rows,), self.cols, dtype=torch.int64, device=self.codes.device)
        if not self.mask_per_block:
            return _count_per_row(self.keep_mask)
        bh, bw = fit_blocks(self.shape, self.sparsity.block_shape)
        widths = torch.full((self.keep_mask.shape[1],), bw, dtype=torch.int64)
        if widths.numel():
            widths[-1] = self.cols - (widths.numel() - 1) * bw
        per_block_row = _count_per_row(self.keep_mask, widths.to(self.keep_mask.device))
        return per_block_row.repeat_interleave(bh)[: self.rows]

    def kept_count(self) -> int:
        """Returns the number of kept values (the number of codes a consistent table holds)."""
        if self.keep_mask is None:
            return self.rows * self.cols
        count = int(torch.count_nonzero(self.keep_mask))
        if not self.mask_per_block or count == 0:
            return count
        # Block (i, j) holds heights[i] * widths[j] values; only the last block row and column
        # can be short, so the total follows from four counts (inclusion-exclusion).
        bh, bw = fit_blocks(self.shape, self.sparsity.block_shape)
        short_rows = bh - (self.rows - (self.keep_mask.shape[0] - 1) * bh)
        short_cols = bw - (self.cols - (self.keep_mask.shape[1] - 1) * bw)
        last_row = int(torch.count_nonzero(self.keep_mask[-1]))
        last_col = int(torch.count_nonzero(self.keep_mask[:, -1]))
        corner = int(self.keep_mask[-1, -1])
        return (
            count * bh * bw
            - short_rows * bw * last_row
            - short_cols * bh * last_col
            + short_rows * short_cols * corner
        )

    def decode(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Returns rows `start:stop` decoded to the original dtype; pruned values are exactly 0.0."""
        stop = self.rows if stop is None else stop
        keep = self.value_keep_mask(start, stop)
        offsets = self._code_offsets
        codes = self.codes[int(offsets[start]) : int(offsets[stop])]
        dense_codes = torch.zeros(keep.shape, dtype=torch.uint8, device=codes.device)
        dense_codes.masked_scatter_(keep, codes)
        values = dequantize(dense_codes, self.scale[start:stop], self.zero_point[start:stop])
        values.masked_fill_(~keep, 0.0)
        return values.to(self.dtype)

    def dense_codes(self) -> torch.Tensor:
        """Returns the (rows, cols) codes torch.ao stores: pruned values hold the code of 0.0."""
        keep = self.value_keep_mask()
        zero_codes = quantize(
            torch.zeros((self.rows, 1), device=self.codes.device),
            self.scale,
            self.zero_point,
            self.quantization.bits,
        )
        dense = zero_codes.expand(self.rows, self.cols).clone()
        dense.masked_scatter_(keep, self.codes)
        return dense

    def code_offsets(self) -> torch.Tensor:
        """Returns where each row's codes start, and the total: int64 of length rows + 1 (CPU)."""
        return self._code_offsets

    def to(self, device: torch.device | str) -> CompressedTable:
        """Returns the table with its tensors on `device` (itself when they are there already)."""
        device = torch.device(device)
        if self.codes.device == device:
            return self
        return replace(
            self,
            codes=self.codes.to(device),
            scale=self.scale.to(device),
            zero_point=self.zero_point.to(device),
            keep_mask=None if self.keep_mask is None else self.keep_mask.to(device),
        )

    @cached_property
    def _code_offsets(self) -> torch.Tensor:
        counts = self.kept_per_row().cpu()
        return torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(counts, 0)])


# Mask entries counted per step: a bool reduction goes through an int64 copy of its input (8 bytes
# per entry), so a whole table's mask is counted a slice of rows at a time.
_COUNT_CHUNK_VALUES = 1 << 22


def _count_per_row(mask: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Returns the number of True entries in each row of a 2-D bool mask, as int64.

    With `weights`, an entry in column j counts `weights[j]`. Works a slice of rows at a time.
    """
    rows, cols = mask.shape
    step = max(1, _COUNT_CHUNK_VALUES // max(1, cols))
    counts = torch.empty(rows, dtype=torch.int64, device=mask.device)
    for start in range(0, rows, step):
        part = mask[start : start + step].to(torch.int64)
        if weights is not None:
            part *= weights
        counts[start : start + step] = part.sum(dim=1)
    return counts
