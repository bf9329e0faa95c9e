"""Block geometry: how blocks of `block_shape` cover a table. Pure integers, no torch."""

from __future__ import annotations


def block_grid(shape: tuple[int, int], block_shape: tuple[int, int]) -> tuple[int, int]:
    """Returns the number of block rows and block columns covering a table of `shape`."""
    rows, cols = shape
    bh, bw = block_shape
    return -(-rows // bh), -(-cols // bw)


def fit_blocks(shape: tuple[int, int], block_shape: tuple[int, int]) -> tuple[int, int]:
    """Returns `block_shape` cut down to `shape` (each side at least 1).

    The cut blocks cover `shape` exactly as the given ones do (same grid, same values in each
    block), so a block larger than the table does not pad the table to the block's size.
    """
    return max(1, min(block_shape[0], shape[0])), max(1, min(block_shape[1], shape[1]))
