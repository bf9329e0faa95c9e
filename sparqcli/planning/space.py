"""The candidate space of a plan: the `plan:` section of a config, and the candidates it gives
each table.

Each axis is one setting of `sparsity:` or `quantization:`; its allowed values come from
`sparqcli.settings` (BITS, SCALE_DTYPES, and RANGES/SCOPES where this version has them), and its
values are checked by the same field rules as the sections themselves. An axis whose setting this
version does not have is left out: a new setting appears here by adding one `Axis` line.

    plan:                          # every key optional; default: every allowed value
      bits: [8, 4]
      levels: [0, 0.5, 0.8]        # default 0, 0.1, ..., 0.9
      block_shapes: [[1, 4]]       # default: the base rule's block shape
      scale_dtypes: [float16]      # default float32 and float16 (bfloat16 allowed)
      ranges: [minmax, mse]
      scopes: [table, row]

Importing this module does not import torch.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sparqcli import settings
from sparqcli.settings import FIELD_RULES, Problem, Quantization, Sparsity

DEFAULT_LEVELS: tuple[float, ...] = tuple(round(0.1 * step, 1) for step in range(10))


_SCALE_LABELS = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}
"""How a candidate's label names its scale dtype."""


@dataclass(frozen=True)
class Axis:
    """One candidate axis: the plan key (`bits`), the section and field it sets
    (`quantization`, `bits`), and its default values (None: the base rule's value)."""

    key: str
    section: str
    field: str
    default: Callable[[], tuple[Any, ...]] | None


def _constant(name: str) -> Callable[[], tuple[Any, ...]]:
    return lambda: tuple(getattr(settings, name))


def _axes() -> tuple[Axis, ...]:
    axes = [
        Axis("bits", "quantization", "bits", _constant("BITS")),
        Axis("levels", "sparsity", "level", lambda: DEFAULT_LEVELS),
        Axis("block_shapes", "sparsity", "block_shape", None),
        # float32 and float16 scales by default (bfloat16 on request: it trades accuracy for
        # nothing float16 does not already save).
        Axis("scale_dtypes", "quantization", "scale_dtype", lambda: ("float32", "float16")),
    ]
    # Settings that arrive with issue #13; present only where this version has them.
    if hasattr(settings, "RANGES"):
        axes.append(Axis("ranges", "quantization", "range", _constant("RANGES")))
    if hasattr(settings, "SCOPES"):
        axes.append(Axis("scopes", "sparsity", "scope", _constant("SCOPES")))
    return tuple(axes)


AXES: tuple[Axis, ...] = _axes()
PLAN_KEYS: tuple[str, ...] = tuple(axis.key for axis in AXES)


@dataclass(frozen=True)
class PlanSpace:
    """The `plan:` section of a config: the values each candidate axis may take.

    `axes` maps an axis key (`bits`, `levels`, `block_shapes`, `scale_dtypes`, and where this
    version has them `ranges`, `scopes`) to its allowed values; a missing key means the default
    (every allowed value; levels 0 to 0.9; the base rule's block shape).
    Raises SettingError listing every invalid value.
    """

    axes: Mapping[str, tuple[Any, ...]]

    def __post_init__(self) -> None:
        problems = plan_problems(dict(self.axes), "plan")
        if problems:
            from sparqcli.errors import SettingError

            raise SettingError("; ".join(f"{path}: {message}" for path, message in problems))
        object.__setattr__(
            self, "axes", {key: _normalized_values(key, self.axes[key]) for key in self.axes}
        )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> PlanSpace:
        """Returns the space a `plan:` mapping describes (None: every default)."""
        return cls(dict(data or {}))

    def to_dict(self) -> dict[str, Any]:
        """Returns the section as YAML data (block shapes as lists)."""
        return {
            key: [list(value) if isinstance(value, tuple) else value for value in values]
            for key, values in self.axes.items()
        }

    def values(self, axis: Axis, base: Sparsity | Quantization) -> tuple[Any, ...]:
        """Returns the values `axis` takes over a base rule's section `base`."""
        if axis.key in self.axes:
            return tuple(self.axes[axis.key])
        if axis.default is None:
            return (getattr(base, axis.field),)
        return axis.default()


@dataclass(frozen=True)
class Candidate:
    """One setting a table may get: its sparsity and quantization sections, complete."""

    sparsity: Sparsity
    quantization: Quantization

    @functools.cached_property
    def prunes(self) -> bool:
        """Returns True when the settings ask for any pruning."""
        return self.sparsity.level > 0 and self.sparsity.effective_zeros_per_block > 0

    @functools.cached_property
    def uniform_key(self) -> tuple[Any, ...]:
        """Returns the candidate's axis values: equal for the same setting on every table."""
        return tuple(_axis_value(self, axis) for axis in AXES)

    @property
    def label(self) -> str:
        """Returns a short name, e.g. `4b L0.5 1x4 f16` (`8b dense f32` without pruning)."""
        parts = [f"{self.quantization.bits}b"]
        if self.prunes:
            rows, cols = self.sparsity.block_shape
            parts += [f"L{self.sparsity.level:g}", f"{rows}x{cols}"]
            scope = getattr(self.sparsity, "scope", None)
            if scope not in (None, "table"):
                parts.append(f"per-{scope}")
        else:
            parts.append("dense")
        value_range = getattr(self.quantization, "range", None)
        if value_range not in (None, "minmax"):
            parts.append(str(value_range))
        parts.append(_SCALE_LABELS[self.quantization.scale_dtype])
        return " ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        """Returns the settings as the YAML sections `sparsity:` and `quantization:`."""
        return {"sparsity": self.sparsity.to_dict(), "quantization": self.quantization.to_dict()}


def _hashable(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def _axis_value(candidate: Candidate, axis: Axis) -> Any:
    if not candidate.prunes and axis.section == "sparsity":
        return None  # without pruning, block shape and scope change nothing
    return getattr(getattr(candidate, axis.section), axis.field)


def candidates(space: PlanSpace, sparsity: Sparsity, quantization: Quantization) -> list[Candidate]:
    """Returns every distinct candidate of `space` over a base rule's sections, in axis order.

    Candidates without pruning differ only in their quantization (their block shape and scope
    are the base rule's). The other fields (norm, zeros_per_block, ...) stay the base rule's.
    """
    bases = {"sparsity": sparsity, "quantization": quantization}
    choices = [space.values(axis, bases[axis.section]) for axis in AXES]
    base_fields = {"sparsity": sparsity.to_dict(), "quantization": quantization.to_dict()}
    # Each section's settings are made (and checked) once per distinct combination of its axes.
    made: dict[tuple[Any, ...], Sparsity | Quantization] = {}

    def section(name: str, values: dict[str, Any]) -> Any:
        key = (name, *(_hashable(value) for value in values.values()))
        if key not in made:
            made[key] = (Sparsity if name == "sparsity" else Quantization)(**values)
        return made[key]

    found: dict[tuple[Any, ...], Candidate] = {}
    for combination in itertools.product(*choices):
        fields = {name: dict(values) for name, values in base_fields.items()}
        for axis, value in zip(AXES, combination, strict=True):
            fields[axis.section][axis.field] = value
        candidate = Candidate(
            section("sparsity", fields["sparsity"]), section("quantization", fields["quantization"])
        )
        if not candidate.prunes:
            no_pruning = {**fields["sparsity"]}
            for axis in AXES:
                if axis.section == "sparsity" and axis.field != "level":
                    no_pruning[axis.field] = getattr(sparsity, axis.field)
            candidate = Candidate(section("sparsity", no_pruning), candidate.quantization)
        found.setdefault(candidate.uniform_key, candidate)
    return list(found.values())


# ---------------------------------------------------------------------------------------------
# Validation of the raw `plan:` mapping (used by PlanSpace and by the config loader)


def plan_problems(values: Mapping[str, Any], path: str) -> list[Problem]:
    """Returns every problem of a raw `plan:` mapping as (dotted path, message) pairs."""
    problems: list[Problem] = []
    by_key = {axis.key: axis for axis in AXES}
    for key, items in values.items():
        axis = by_key.get(key)
        if axis is None:
            problems.append(
                (f"{path}.{key}", f"unknown key; expected one of {', '.join(PLAN_KEYS)}")
            )
            continue
        if isinstance(items, tuple):
            items = list(items)
        if not isinstance(items, list) or not items:
            problems.append((f"{path}.{key}", f"must be a non-empty list, got {items!r}"))
            continue
        rule = FIELD_RULES[axis.section]
        seen: list[Any] = []
        for index, item in enumerate(items):
            value = list(item) if isinstance(item, tuple) else item
            message = rule(axis.field, value)
            if message is not None:
                problems.append((f"{path}.{key}[{index}]", message))
            elif value in seen:
                problems.append((f"{path}.{key}[{index}]", f"repeats {value!r}"))
            else:
                seen.append(value)
    return problems


def _normalized_values(key: str, values: Sequence[Any]) -> tuple[Any, ...]:
    if key == "block_shapes":
        return tuple(tuple(value) for value in values)
    if key == "levels":
        return tuple(float(value) for value in values)
    return tuple(values)
