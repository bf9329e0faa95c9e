"""`KEY=VALUE` overrides of a config's raw mapping (the CLI's `--set`).

KEY is a dotted path into the mapping (`sparsity.level`, `layers[1].quantization.bits`); VALUE
is read as YAML (`0.7`, `[2, 2]`, `null`), except that one starting with `*` is a string (a
glob such as `*emb*`, which YAML would read as an alias). Problems are returned as config
problem lines, so they are reported together with the config's own; a problem of the config at
a key an override set names that override (`credit_override`).

Importing this module does not import torch.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

_KEY_PATH = re.compile(r"[A-Za-z_][\w-]*(\[\d+\])*(\.[A-Za-z_][\w-]*(\[\d+\])*)*")
_KEY_STEP = re.compile(r"([A-Za-z_][\w-]*)|\[(\d+)\]")
_OPTION = "{opt:overrides}"


def apply_overrides(
    data: dict[Any, Any], overrides: Sequence[str], read_value: Callable[[str], object]
) -> list[str]:
    """Sets each `KEY=VALUE` of `overrides` into `data` (in place); returns the problems found.

    `read_value` parses a VALUE (YAML) and raises ValueError with a one-line reason.
    """
    problems: list[str] = []
    for override in overrides:
        problem = _apply(data, override, read_value)
        if problem is not None:
            problems.append(problem)
    return problems


def override_key(override: str) -> str:
    """Returns the KEY of a `KEY=VALUE` override ('' for none)."""
    return override.partition("=")[0].strip()


def credit_override(problem: str, overrides: Sequence[str]) -> str:
    """Returns config problem line `problem` naming the override that set its key, if one did:
    a problem at `sparsity.level` after `sparsity.level=2` is the override's, not the file's.
    The last override of a key wins, as when they are applied."""
    path = problem.partition(":")[0]
    for override in reversed(overrides):
        key = override_key(override)
        if key and (path == key or path.startswith((f"{key}.", f"{key}["))):
            return f"{problem} (from {_OPTION} {override.strip()})"
    return problem


def _apply(data: dict[Any, Any], override: str, read_value: Callable[[str], object]) -> str | None:
    key = override_key(override)
    _, sep, text = override.partition("=")
    if not sep or not key:
        return f"{_OPTION} {override}: expected KEY=VALUE"
    if not _KEY_PATH.fullmatch(key):
        return (
            f"{_OPTION} {key}: invalid key; write a dotted path such as sparsity.level "
            "or layers[1].quantization.bits"
        )
    if text.strip().startswith("*"):
        # YAML would read `*emb*` as an alias, which configs refuse: a glob is meant
        value: object = text.strip()
    else:
        try:
            value = read_value(text)
        except ValueError as err:
            return f"{_OPTION} {key}: cannot read value {text!r}: {err}"
    steps: list[str | int] = [
        name if name else int(index) for name, index in _KEY_STEP.findall(key)
    ]
    container: Any = data
    for position, step in enumerate(steps):
        here = _steps_text(steps[:position])
        last = position == len(steps) - 1
        if isinstance(step, str):
            if not isinstance(container, dict):
                return f"{_OPTION} {key}: {here} is not a mapping"
        elif not isinstance(container, list):
            return f"{_OPTION} {key}: {here} is not a list"
        elif step >= len(container):
            count = len(container)
            return f"{_OPTION} {key}: {here} has {count} entr{'y' if count == 1 else 'ies'}"
        if last:
            container[step] = value
            return None
        # An override may create the sections a file leaves out (`gates.max_rel_error`).
        if (isinstance(step, str) and container.get(step) is None) or (
            isinstance(step, int) and container[step] is None
        ):
            container[step] = {}
        container = container[step]
    return None


def _steps_text(steps: Sequence[str | int]) -> str:
    text = ""
    for step in steps:
        text += f"[{step}]" if isinstance(step, int) else (f".{step}" if text else step)
    return text
