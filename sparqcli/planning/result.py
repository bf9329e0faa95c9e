"""What `sparqcli.plan` returns: the chosen settings per table, the model's frontier, the uniform
settings, and the plan as an ordinary config (`PlanResult.config`, `PlanResult.to_yaml()`).

Importing this module does not import torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sparqcli import __version__

if TYPE_CHECKING:
    from sparqcli.config import Config, ResolvedRule
    from sparqcli.planning.measure import Option


def error_text(error: float) -> str:
    """Returns an error as plans print it: 4 decimals from 0.01 up (`0.2163`), else 4
    significant digits (`0.001265`, `5.402e-06`), so a small E keeps the digits that compare."""
    return f"{error:.4f}" if error >= 0.01 or error == 0 else f"{error:.4g}"


@dataclass
class TablePlan:
    """One table of a plan: its measured options, its frontier and the chosen option.

    `weight` is the table's weight in the model's error (its number of values, or with row
    weights `cols * sum(row weights)`); `frontier` holds the indices of the non-dominated options
    by bytes ascending; `chosen` indexes `options`.
    """

    key: str
    source: str
    shape: tuple[int, int]
    dtype: str
    rule: ResolvedRule
    bytes_before: int
    weight: float
    options: list[Option]
    frontier: list[int]
    chosen: int
    sampled_rows: int | None = None

    @property
    def option(self) -> Option:
        """Returns the chosen option."""
        return self.options[self.chosen]

    @property
    def cheaper(self) -> Option | None:
        """Returns the next option of the frontier with fewer bytes (None: the chosen is the cheapest)."""
        return self._neighbour(-1)

    @property
    def dearer(self) -> Option | None:
        """Returns the next option of the frontier with less error (None: the chosen is the best)."""
        return self._neighbour(+1)

    def _neighbour(self, step: int) -> Option | None:
        ordered = sorted(self.frontier, key=lambda i: self.options[i].bytes)
        if self.chosen in ordered:
            position = ordered.index(self.chosen) + step
        else:  # not on the frontier (should not happen): nearest by bytes
            sizes = [self.options[i].bytes for i in ordered]
            position = sum(s <= self.option.bytes for s in sizes) - (1 if step < 0 else 0)
        if 0 <= position < len(ordered):
            return self.options[ordered[position]]
        return None

    @property
    def refused(self) -> list[Option]:
        """Returns the options the engine refuses on this table (never chosen)."""
        return [option for option in self.options if option.refused is not None]

    def to_dict(self) -> dict[str, Any]:
        """Returns the table's plan as JSON-able data."""
        cheaper, dearer = self.cheaper, self.dearer
        refused = self.refused
        return {
            "key": self.key,
            "source": self.source,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "rule": self.rule.label,
            "bytes_before": self.bytes_before,
            "weight": self.weight,
            "sampled_rows": self.sampled_rows,
            "chosen": self.option.to_dict(),
            "cheaper": cheaper.to_dict() if cheaper is not None else None,
            "dearer": dearer.to_dict() if dearer is not None else None,
            "frontier": [self.options[i].to_dict() for i in self.frontier],
            "refused": {
                "count": len(refused),
                "first": {"settings": refused[0].candidate.label, "reason": refused[0].refused},
            }
            if refused
            else None,
        }


@dataclass(frozen=True)
class ModelPoint:
    """A point of the model's trade-off: total bytes, the error E, and a label; `exact` when
    every table's error is measured on the whole table (else estimated on samples)."""

    label: str
    bytes: int
    error: float
    exact: bool = False

    def to_dict(self) -> dict[str, Any]:
        """Returns the point as JSON-able data."""
        return {"label": self.label, "bytes": self.bytes, "error": self.error, "exact": self.exact}


@dataclass
class PlanResult:
    """A plan: the settings chosen for every table, and what they give.

    `mode` is `budget` (bytes <= `target` x the tables' bytes, least error) or `max_error`
    (error <= `target`, fewest bytes). `bytes` is exact (the format's formula); `error` is the
    model's error E = sqrt(sum_t W_t e_t^2 / sum_t W_t), weighted by rows when `weighted`;
    `rel_error` is the same without row weights (what `sparq compress`'s tables give).
    `frontier` is the model's error-vs-bytes frontier, `uniform` every setting given to all
    tables alike, `best_uniform` the best of those that meet the target (None: none does).
    """

    inputs: list[Path]
    base: Config
    mode: str
    target: float
    tables: list[TablePlan]
    frontier: list[ModelPoint]
    uniform: list[ModelPoint]
    best_uniform: ModelPoint | None
    weighted: bool = False
    verified: bool = False
    seconds: float = 0.0
    config: Config | None = field(default=None, repr=False)

    @property
    def bytes_before(self) -> int:
        """Returns the selected tables' original bytes."""
        return sum(table.bytes_before for table in self.tables)

    @property
    def bytes(self) -> int:
        """Returns the planned tables' compressed bytes (exact)."""
        return sum(table.option.bytes for table in self.tables)

    @property
    def ratio(self) -> float:
        """Returns planned bytes / original bytes."""
        return self.bytes / self.bytes_before if self.bytes_before else 0.0

    @property
    def error(self) -> float:
        """Returns the model's error E (row-weighted when the plan has row weights)."""
        return model_error(
            [(t.weight, t.option.weighted_error) for t in self.tables],
        )

    @property
    def rel_error(self) -> float:
        """Returns the model's error without row weights: sqrt(sum n_t e_t^2 / sum n_t)."""
        return model_error(
            [(math.prod(t.shape), t.option.rel_error) for t in self.tables],
        )

    def to_yaml(self) -> str:
        """Returns the plan as a sparq config, with a header comment on what it predicts."""
        if self.config is None:
            raise ValueError("this plan has no config")
        names = ", ".join(str(path) for path in self.inputs)
        goal = (
            f"budget {self.target:g}x of {self.bytes_before:,} table bytes"
            if self.mode == "budget"
            else f"error target E <= {self.target:g}"
        )
        lines = [
            f"# sparq plan for {names} (base config {self.base.source}), sparq {__version__}",
            f"# {goal}",
            f"# predicted: {self.bytes:,} bytes of tables ({self.ratio:.4f}x), "
            f"error E {error_text(self.error)}"
            + (
                f" (row-weighted; unweighted {error_text(self.rel_error)})" if self.weighted else ""
            ),
            "# E = sqrt(sum_t n_t * e_t^2 / sum_t n_t), e_t = ||W_hat - W|| / ||W|| of table t.",
        ]
        if self.best_uniform is not None:
            best = self.best_uniform
            lines.append(
                f"# best uniform setting ({best.label}): {best.bytes:,} bytes, "
                f"error E {error_text(best.error)}"
            )
        for table in self.tables:
            option = table.option
            lines.append(
                f"#   {table.key}: {option.candidate.label}, {option.bytes:,} bytes, "
                f"rel. error {error_text(option.rel_error)}"
            )
        return "\n".join(lines) + "\n" + self.config.to_yaml()

    def save(self, path: str | Path, *, force: bool = False) -> Path:
        """Writes the plan's YAML to `path`, atomically; returns `path`.

        Raises UsageError when `path` exists and `force` is not set, or its folder is missing or
        not writable; OutputError when writing fails.
        """
        from sparqcli.sinks import atomic_output, check_output_path

        path = Path(path)
        check_output_path(path, list(self.inputs), force)
        text = self.to_yaml()
        with atomic_output(path, replace=force) as temp:
            temp.write_text(text)
        return path

    def to_dict(self) -> dict[str, Any]:
        """Returns the plan as JSON-able data (what `sparq plan --json` prints)."""
        return {
            "sparq_version": __version__,
            "inputs": [str(path) for path in self.inputs],
            "base_config": self.base.source,
            "mode": self.mode,
            "target": self.target,
            "bytes_before": self.bytes_before,
            "bytes": self.bytes,
            "ratio": self.ratio,
            "error": self.error,
            "rel_error": self.rel_error,
            "weighted": self.weighted,
            "verified": self.verified,
            "best_uniform": self.best_uniform.to_dict() if self.best_uniform else None,
            "tables": [table.to_dict() for table in self.tables],
            "frontier": [point.to_dict() for point in self.frontier],
            "uniform": [point.to_dict() for point in self.uniform],
            "config": self.config.to_dict() if self.config is not None else None,
            "seconds": round(self.seconds, 3),
        }


def model_error(tables: list[tuple[float, float]]) -> float:
    """Returns sqrt(sum w * e^2 / sum w) over (weight, error) pairs (0.0 for no weight)."""
    total = sum(weight for weight, _ in tables)
    if total <= 0:
        return 0.0
    return math.sqrt(sum(weight * error * error for weight, error in tables) / total)
