"""Typed, validated compression settings shared by the engine, the config loader and the file format.

Importing this module does not import torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from sparqcli.errors import SettingError

Norm = Literal["L1", "L2"]
Order = Literal["sparsify-first", "quantize-first"]
ScaleDtype = Literal["float32", "float16"]
Range = Literal["minmax", "mse"]
Scope = Literal["table", "row"]

NORMS: tuple[str, ...] = ("L1", "L2")
ORDERS: tuple[str, ...] = ("sparsify-first", "quantize-first")
BITS: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7, 8)
SCALE_DTYPES: tuple[str, ...] = ("float32", "float16")
RANGES: tuple[str, ...] = ("minmax", "mse")
SCOPES: tuple[str, ...] = ("table", "row")


@dataclass(frozen=True)
class SparsitySettings:
    """`DataNormSparsifier` settings.

    `level` is the fraction of blocks pruned; `zeros_per_block` values are zeroed inside a pruned
    block (None: all of them). `scope` says where blocks are ranked: `table` (the reference)
    prunes the `round(level * n_blocks)` lowest-scoring blocks of the whole table; `row` prunes
    `round(level * n_block_cols)` blocks in every block row, so no row is emptied unless level
    is 1.
    """

    level: float = 0.5
    block_shape: tuple[int, int] = (1, 4)
    zeros_per_block: int | None = None
    norm: Norm = "L1"
    scope: Scope = "table"

    def __post_init__(self) -> None:
        problems = sparsity_problems(self)
        if problems:
            raise SettingError(problems[0])

    @property
    def block_size(self) -> int:
        """Returns the number of values in one block."""
        return self.block_shape[0] * self.block_shape[1]

    @property
    def effective_zeros_per_block(self) -> int:
        """Returns `zeros_per_block`, with None resolved to the whole block."""
        return self.block_size if self.zeros_per_block is None else self.zeros_per_block

    @property
    def prunes_whole_blocks(self) -> bool:
        """Returns True when a pruned block loses every one of its values."""
        return self.effective_zeros_per_block == self.block_size


@dataclass(frozen=True)
class QuantizationSettings:
    """Per-row affine quantization with float zero points (torch.ao's float_qparams scheme).

    `bits` is 1 to 8 (8, 4 and 2 are torch.ao's widths). `range` picks each row's [lo, hi]:
    `minmax` (the reference) takes the row's min and max; `mse` the range that minimises the
    squared error of the row's kept values (engine/quantize.py, `mse_qparams`).
    """

    bits: int = 8
    scale_dtype: ScaleDtype = "float32"
    range: Range = "minmax"

    def __post_init__(self) -> None:
        problems = quantization_problems(self)
        if problems:
            raise SettingError(problems[0])

    @property
    def quant_max(self) -> int:
        """Returns the largest code, 2**bits - 1."""
        return (1 << self.bits) - 1


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def sparsity_problems(settings: SparsitySettings, path: str = "sparsity") -> list[str]:
    """Returns every problem with `settings` as `path.field: message` lines (empty when valid)."""
    problems: list[str] = []
    level = settings.level
    if not _is_number(level) or not math.isfinite(level) or not 0.0 <= level <= 1.0:
        problems.append(f"{path}.level: must be a number in [0, 1], got {level!r}")
    shape = settings.block_shape
    shape_ok = (
        isinstance(shape, tuple)
        and len(shape) == 2
        and all(isinstance(side, int) and not isinstance(side, bool) for side in shape)
    )
    if not shape_ok or min(shape) < 1:
        problems.append(
            f"{path}.block_shape: must be two positive integers [rows, columns], got {_show(shape)}"
        )
    zeros = settings.zeros_per_block
    if zeros is not None:
        if not isinstance(zeros, int) or isinstance(zeros, bool):
            problems.append(f"{path}.zeros_per_block: must be an integer or null, got {zeros!r}")
        elif shape_ok and min(shape) >= 1 and not 0 <= zeros <= shape[0] * shape[1]:
            problems.append(
                f"{path}.zeros_per_block: must be in [0, {shape[0] * shape[1]}] for block shape "
                f"{_show(shape)}, got {zeros}"
            )
        elif zeros < 0:
            problems.append(f"{path}.zeros_per_block: must not be negative, got {zeros}")
    if settings.norm not in NORMS:
        problems.append(f"{path}.norm: must be one of L1, L2, got {settings.norm!r}")
    if settings.scope not in SCOPES:
        problems.append(f"{path}.scope: must be one of table, row, got {settings.scope!r}")
    return problems


def quantization_problems(settings: QuantizationSettings, path: str = "quantization") -> list[str]:
    """Returns every problem with `settings` as `path.field: message` lines (empty when valid)."""
    problems: list[str] = []
    bits = settings.bits
    if not isinstance(bits, int) or isinstance(bits, bool) or bits not in BITS:
        problems.append(f"{path}.bits: must be an integer from 1 to 8, got {bits!r}")
    if settings.scale_dtype not in SCALE_DTYPES:
        problems.append(
            f"{path}.scale_dtype: must be one of float32, float16, got {settings.scale_dtype!r}"
        )
    if settings.range not in RANGES:
        problems.append(f"{path}.range: must be one of minmax, mse, got {settings.range!r}")
    return problems


def _show(value: object) -> str:
    if isinstance(value, tuple):
        return "[" + ", ".join(repr(v) for v in value) + "]"
    return repr(value)
