"""Compression settings as typed, frozen, self-validating dataclasses: `Sparsity`,
`Quantization` and `Gates`, the sections of a config file one to one.

The rules live here once, as functions over raw values (`sparsity_problems(values, path)` and
friends) that return every problem as a `(dotted path, message)` pair. The constructors use
them (and raise `SettingError` naming every problem); the YAML loader uses them on the raw
mapping, so a file and a Python call get the same messages.

Importing this module does not import torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Literal

from sparqcli.errors import SettingError

Norm = Literal["L1", "L2"]
Order = Literal["sparsify-first", "quantize-first"]
ScaleDtype = Literal["float32", "float16", "bfloat16"]
Range = Literal["minmax", "mse"]
Scope = Literal["table", "row"]

NORMS: tuple[str, ...] = ("L1", "L2")
ORDERS: tuple[str, ...] = ("sparsify-first", "quantize-first")
BITS: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7, 8)
SCALE_DTYPES: tuple[str, ...] = ("float32", "float16", "bfloat16")
RANGES: tuple[str, ...] = ("minmax", "mse")
SCOPES: tuple[str, ...] = ("table", "row")
# The fields whose value is one of a fixed set of names.
_SPARSITY_CHOICES = {"norm": NORMS, "scope": SCOPES}
_QUANTIZATION_CHOICES = {"scale_dtype": SCALE_DTYPES, "range": RANGES}
DEFAULT_MIN_TABLE_BYTES = 64 * 1024
"""Glob and regex rules skip tables smaller than this (`min_table_bytes`); exact keys do not."""

Problem = tuple[str, str]
"""One problem: the dotted path of the offending value and what is wrong with it."""


def join_problems(problems: list[Problem]) -> list[str]:
    """Returns each problem as one `path: message` line."""
    return [f"{path}: {message}" for path, message in problems]


def _raise_problems(problems: list[Problem]) -> None:
    if problems:
        raise SettingError("; ".join(join_problems(problems)))


@dataclass(frozen=True)
class Sparsity:
    """Block-norm sparsity (`DataNormSparsifier`), the `sparsity:` section of a config.

    `level` is the fraction of blocks pruned; `zeros_per_block` values are zeroed inside a pruned
    block (None: all of them); `norm` ranks the blocks by the mean |x| (L1) or x^2 (L2) of their
    values. `scope` says where blocks are ranked: `table` (the reference) prunes the
    `round(level * n_blocks)` lowest-scoring blocks of the whole table; `row` prunes
    `round(level * n_block_cols)` blocks in every block row, so no row is emptied unless level
    is 1. Raises SettingError listing every invalid field.
    """

    level: float = 0.5
    block_shape: tuple[int, int] = (1, 4)
    zeros_per_block: int | None = None
    norm: Norm = "L1"
    scope: Scope = "table"

    def __post_init__(self) -> None:
        if isinstance(self.block_shape, list):
            object.__setattr__(self, "block_shape", tuple(self.block_shape))
        _raise_problems(sparsity_problems(_values(self), "sparsity"))
        object.__setattr__(self, "level", float(self.level))

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

    def to_dict(self) -> dict[str, Any]:
        """Returns the settings as JSON/YAML-able data (block_shape as a list)."""
        return {
            "level": self.level,
            "block_shape": list(self.block_shape),
            "zeros_per_block": self.zeros_per_block,
            "norm": self.norm,
            "scope": self.scope,
        }


@dataclass(frozen=True)
class Quantization:
    """Per-row affine quantization with float zero points (torch.ao's float_qparams scheme),
    the `quantization:` section of a config.

    `bits` is 1 to 8 (8, 4 and 2 are torch.ao's widths). `range` picks each row's [lo, hi]:
    `minmax` (the reference) takes the row's min and max; `mse` the range that minimises the
    squared error of the row's kept values (engine/quantize.py, `mse_qparams`).
    Raises SettingError listing every invalid field.
    """

    bits: int = 8
    scale_dtype: ScaleDtype = "float32"
    range: Range = "minmax"

    def __post_init__(self) -> None:
        _raise_problems(quantization_problems(_values(self), "quantization"))

    @property
    def quant_max(self) -> int:
        """Returns the largest code, 2**bits - 1."""
        return (1 << self.bits) - 1

    def to_dict(self) -> dict[str, Any]:
        """Returns the settings as JSON/YAML-able data."""
        return {"bits": self.bits, "scale_dtype": self.scale_dtype, "range": self.range}


@dataclass(frozen=True)
class Gates:
    """Quality gates of a table, the `gates:` section of a config; None disables a gate.

    `max_rel_error`: relative L2 error of the table; `min_row_cosine`: the smallest row cosine
    similarity; `max_bytes_ratio`: compressed bytes / original bytes.
    Raises SettingError listing every invalid gate.
    """

    max_rel_error: float | None = None
    min_row_cosine: float | None = None
    max_bytes_ratio: float | None = None

    def __post_init__(self) -> None:
        _raise_problems(gates_problems(_values(self), "gates"))
        for name, value in _values(self).items():
            if value is not None:
                object.__setattr__(self, name, float(value))

    def to_dict(self) -> dict[str, float | None]:
        """Returns the gates as JSON/YAML-able data (null: disabled)."""
        return _values(self)

    def failures(
        self, rel_error: float, row_cosine_min: float, bytes_ratio: float | None
    ) -> list[str]:
        """Returns one line per gate the measured values fail (empty when all pass). A value
        that is NaN (not measurable) fails its gate."""
        failed = []
        if self.max_rel_error is not None and not rel_error <= self.max_rel_error:
            failed.append(
                f"rel_error {_measured(rel_error)} > max_rel_error {self.max_rel_error:g}"
            )
        if self.min_row_cosine is not None and not row_cosine_min >= self.min_row_cosine:
            failed.append(
                f"row_cosine_min {_measured(row_cosine_min)} < min_row_cosine "
                f"{self.min_row_cosine:g}"
            )
        ratio_gate = self.max_bytes_ratio
        if ratio_gate is not None and bytes_ratio is not None and bytes_ratio > ratio_gate:
            failed.append(f"bytes_ratio {bytes_ratio:.4g} > max_bytes_ratio {ratio_gate:g}")
        return failed


def _measured(value: float) -> str:
    """Returns a measured statistic as gate failures show it (`nan (not measurable)`)."""
    return f"{value:.4g}" if not math.isnan(value) else "nan (not measurable)"


SECTION_KEYS: dict[str, tuple[str, ...]] = {
    "sparsity": tuple(f.name for f in fields(Sparsity)),
    "quantization": tuple(f.name for f in fields(Quantization)),
    "gates": tuple(f.name for f in fields(Gates)),
}


def _values(settings: Sparsity | Quantization | Gates) -> dict[str, Any]:
    return {f.name: getattr(settings, f.name) for f in fields(settings)}


# ---------------------------------------------------------------------------------------------
# The rules, over raw values (what a YAML file or a Python call gave)


def is_number(value: object) -> bool:
    """Returns True for an int or float that is not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def finite_number(value: object) -> float | None:
    """Returns `value` as a float when it is a number (not a bool) that a float holds finitely,
    else None (an int past float's range included)."""
    if not is_number(value):
        return None
    try:
        number = float(value)  # type: ignore[arg-type]
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def show_value(value: object) -> str:
    """Returns `value` as a message shows it: lists in brackets, an int of hundreds of digits
    by its length."""
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(repr(v) for v in value) + "]"
    if isinstance(value, int) and abs(value) > 10**30:  # an int of hundreds of digits
        kind = "a negative integer" if value < 0 else "an integer"
        return f"{kind} of {len(str(abs(value)))} digits"
    return repr(value)


def _block_shape_ok(shape: object) -> bool:
    return (
        isinstance(shape, (tuple, list))
        and len(shape) == 2
        and all(_is_int(side) and side >= 1 for side in shape)
    )


def _choice_problem(value: object, allowed: tuple[str, ...]) -> str | None:
    """Returns what is wrong with a value that must be one of `allowed`, or None."""
    return None if value in allowed else f"must be one of {', '.join(allowed)}, got {value!r}"


def sparsity_field_problem(name: str, value: object) -> str | None:
    """Returns what is wrong with one sparsity field's value on its own, or None."""
    if name == "level":
        level = finite_number(value)
        if level is None or not 0.0 <= level <= 1.0:
            return f"must be a number in [0, 1], got {show_value(value)}"
    elif name == "block_shape":
        if not _block_shape_ok(value):
            return f"must be two positive integers [rows, columns], got {show_value(value)}"
    elif name == "zeros_per_block":
        if value is not None and not _is_int(value):
            return f"must be an integer or null, got {show_value(value)}"
        if value is not None and value < 0:  # type: ignore[operator]
            return f"must not be negative, got {show_value(value)}"
    elif name in _SPARSITY_CHOICES:
        return _choice_problem(value, _SPARSITY_CHOICES[name])
    return None


def sparsity_problems(values: Mapping[str, Any], path: str) -> list[Problem]:
    """Returns every problem of a complete set of sparsity values, as (path, message) pairs.

    Besides each field on its own, `zeros_per_block` must fit the block shape.
    """
    problems = _field_problems(values, path, sparsity_field_problem)
    if not problems:
        shape, zeros = values["block_shape"], values["zeros_per_block"]
        size = shape[0] * shape[1]
        if zeros is not None and zeros > size:
            problems.append(
                (
                    f"{path}.zeros_per_block",
                    f"must be in [0, {size}] for block shape {show_value(shape)}, got {zeros}",
                )
            )
    return problems


def quantization_field_problem(name: str, value: object) -> str | None:
    """Returns what is wrong with one quantization field's value, or None."""
    if name == "bits" and (not _is_int(value) or value not in BITS):
        return f"must be an integer from {BITS[0]} to {BITS[-1]}, got {show_value(value)}"
    if name in _QUANTIZATION_CHOICES:
        return _choice_problem(value, _QUANTIZATION_CHOICES[name])
    return None


def quantization_problems(values: Mapping[str, Any], path: str) -> list[Problem]:
    """Returns every problem of a complete set of quantization values."""
    return _field_problems(values, path, quantization_field_problem)


def gate_field_problem(name: str, value: object) -> str | None:
    """Returns what is wrong with one gate's value, or None (null disables the gate)."""
    if value is None:
        return None
    number = finite_number(value)
    if name == "max_rel_error" and not (number is not None and number >= 0):
        return f"must be a number >= 0, got {show_value(value)}"
    if name == "min_row_cosine" and not (number is not None and -1 <= number <= 1):
        return f"must be a number in [-1, 1], got {show_value(value)}"
    if name == "max_bytes_ratio" and not (number is not None and number > 0):
        return f"must be a number > 0, got {show_value(value)}"
    return None


def gates_problems(values: Mapping[str, Any], path: str) -> list[Problem]:
    """Returns every problem of a set of gates."""
    return _field_problems(values, path, gate_field_problem)


def min_table_bytes_problem(value: object) -> str | None:
    """Returns what is wrong with a `min_table_bytes` value (a byte count), or None."""
    if not _is_int(value) or value < 0:  # type: ignore[operator]
        return f"must be an integer >= 0 (bytes; 0 skips no table), got {show_value(value)}"
    return None


FIELD_RULES = {
    "sparsity": sparsity_field_problem,
    "quantization": quantization_field_problem,
    "gates": gate_field_problem,
}
SECTION_RULES = {
    "sparsity": sparsity_problems,
    "quantization": quantization_problems,
    "gates": gates_problems,
}


def _field_problems(values: Mapping[str, Any], path: str, rule: Any) -> list[Problem]:
    problems = []
    for name, value in values.items():
        message = rule(name, value)
        if message is not None:
            problems.append((f"{path}.{name}", message))
    return problems
