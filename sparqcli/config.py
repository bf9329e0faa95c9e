"""Config files: YAML in, frozen typed dataclasses out, with every problem reported at once.

A problem is one line, `dotted.path: message` (`layers[2].sparsity.level: must be a number in
[0, 1], got 1.5`); all of them are raised together as one `ConfigError`.

Importing this module does not import torch.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, TypeVar

import yaml

from sparqcli.engine.settings import (
    ORDERS,
    Order,
    QuantizationSettings,
    SparsitySettings,
    quantization_problems,
    sparsity_problems,
)
from sparqcli.errors import ConfigError, InputError

CONFIG_VERSION = 1
MAX_CONFIG_BYTES = 1 << 20

# What each `type:` value of a rule selects: the nn.Module class names it stands for.
RULE_TYPES: dict[str, frozenset[str]] = {
    "embedding": frozenset({"Embedding", "EmbeddingBag"}),
    "Embedding": frozenset({"Embedding"}),
    "EmbeddingBag": frozenset({"EmbeddingBag"}),
}

_TOP_KEYS = ("version", "order", "sparsity", "quantization", "layers", "exclude", "gates")
_RULE_KEYS = ("match", "type", "sparsity", "quantization", "gates")
_SPARSITY_KEYS = tuple(f.name for f in fields(SparsitySettings))
_QUANTIZATION_KEYS = tuple(f.name for f in fields(QuantizationSettings))
_GATE_KEYS = ("max_rel_error", "min_row_cosine", "max_bytes_ratio")
# A section field written one level too high (`bits: 4` beside `layers`) is suggested in place.
_SECTION_FIELDS = {
    **{key: "sparsity" for key in _SPARSITY_KEYS},
    **{key: "quantization" for key in _QUANTIZATION_KEYS},
    **{key: "gates" for key in _GATE_KEYS},
}


@dataclass(frozen=True)
class Gates:
    """Quality gates of a table; None disables a gate.

    `max_rel_error`: relative L2 error of the table; `min_row_cosine`: the smallest row cosine
    similarity; `max_bytes_ratio`: compressed bytes / original bytes.
    """

    max_rel_error: float | None = None
    min_row_cosine: float | None = None
    max_bytes_ratio: float | None = None


@dataclass(frozen=True)
class LayerRule:
    """One entry of `layers`, with its settings resolved (top-level defaults + its overrides).

    Exactly one of `match` (a pattern) and `type` (a key of RULE_TYPES) is set; `index` is the
    rule's position in `layers`.
    """

    match: str | None
    type: str | None
    sparsity: SparsitySettings
    quantization: QuantizationSettings
    gates: Gates
    index: int

    @property
    def label(self) -> str:
        """Returns the rule as messages name it, e.g. `layers[1] (match 'sparse.bags.*')`."""
        if self.match is not None:
            return f"layers[{self.index}] (match {self.match!r})"
        return f"layers[{self.index}] (type {self.type!r})"


@dataclass(frozen=True)
class Config:
    """A validated config. `source` names where it came from (the file path)."""

    version: int
    order: Order
    sparsity: SparsitySettings
    quantization: QuantizationSettings
    layers: tuple[LayerRule, ...]
    exclude: tuple[str, ...]
    gates: Gates
    source: str


def load_config(
    path: str | Path, overrides: Sequence[str] = (), order: str | None = None
) -> Config:
    """Returns the config in the YAML file `path`, after `--set KEY=VALUE` overrides and `--order`.

    An override's KEY is a dotted path into the file's mapping (`sparsity.level`,
    `layers[1].quantization.bits`); its VALUE is read as YAML (`0.7`, `[2, 2]`, `null`).
    Raises InputError when the file is missing or unreadable, and ConfigError listing every
    problem of the file, the overrides and the resulting config.
    """
    source = str(path)
    data = _read_yaml(Path(path), source)
    if not isinstance(data, Mapping):
        raise ConfigError(source, [_top_level_problem(data)])
    data = dict(data)
    problems: list[str] = []
    for override in overrides:
        _apply_override(data, override, problems)
    if order is not None:
        data["order"] = order
    config = _Validator(problems).config(data, source)
    if problems or config is None:
        raise ConfigError(source, problems)
    return config


def parse_config(data: object, source: str) -> Config:
    """Returns the config described by `data`, an already parsed YAML document.

    Raises ConfigError listing every problem, each with its dotted path.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(source, [_top_level_problem(data)])
    problems: list[str] = []
    config = _Validator(problems).config(data, source)
    if problems or config is None:
        raise ConfigError(source, problems)
    return config


def config_to_dict(config: Config) -> dict[str, Any]:
    """Returns the resolved config as plain JSON-able data.

    Every rule carries its resolved settings; `parse_config` of the result gives `config` back.
    `source` is left out: it is not part of the file.
    """
    return {
        "version": config.version,
        "order": config.order,
        "sparsity": sparsity_to_dict(config.sparsity),
        "quantization": quantization_to_dict(config.quantization),
        "layers": [
            {
                ("match" if rule.match is not None else "type"): (
                    rule.match if rule.match is not None else rule.type
                ),
                "sparsity": sparsity_to_dict(rule.sparsity),
                "quantization": quantization_to_dict(rule.quantization),
                "gates": _gates_dict(rule.gates),
            }
            for rule in config.layers
        ],
        "exclude": list(config.exclude),
        "gates": _gates_dict(config.gates),
    }


def sparsity_to_dict(settings: SparsitySettings) -> dict[str, Any]:
    """Returns sparsity settings as JSON-able data (block_shape as a list)."""
    return {
        "level": settings.level,
        "block_shape": list(settings.block_shape),
        "zeros_per_block": settings.zeros_per_block,
        "norm": settings.norm,
        "scope": settings.scope,
    }


def quantization_to_dict(settings: QuantizationSettings) -> dict[str, Any]:
    """Returns quantization settings as JSON-able data."""
    return {"bits": settings.bits, "scale_dtype": settings.scale_dtype, "range": settings.range}


def _gates_dict(gates: Gates) -> dict[str, float | None]:
    return {key: getattr(gates, key) for key in _GATE_KEYS}


# ---------------------------------------------------------------------------------------------
# Reading YAML


class _RefusedYAML(yaml.MarkedYAMLError):
    """A YAML construct that sparq configs do not allow (aliases, duplicate keys)."""


class _ConfigLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that refuses aliases (no alias bombs) and duplicate mapping keys."""

    def compose_node(self, parent: yaml.Node | None, index: object) -> yaml.Node | None:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise _RefusedYAML(
                problem=f"YAML aliases (*{event.anchor}) are not allowed; write the value out",
                problem_mark=event.start_mark,
            )
        return super().compose_node(parent, index)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[tuple[str, str]] = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode):
                identity = (key_node.tag, key_node.value)
                if identity in seen:
                    raise _RefusedYAML(
                        problem=f"duplicate key {key_node.value!r}",
                        problem_mark=key_node.start_mark,
                    )
                seen.add(identity)
        return super().construct_mapping(node, deep=deep)


def _load_yaml(text: str) -> object:
    """Returns the YAML document `text`; raises ValueError with a one-line reason."""
    try:
        return yaml.load(text, Loader=_ConfigLoader)  # a SafeLoader: builds plain data only
    except RecursionError:
        raise ValueError("invalid YAML: nested too deeply") from None
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark
        where = "" if mark is None else f"line {mark.line + 1}, column {mark.column + 1}"
        if isinstance(err, _RefusedYAML):
            raise ValueError(f"{where}: {err.problem}") from None
        raise ValueError(f"invalid YAML at {where}: {err.problem or err.context}") from None
    except yaml.YAMLError as err:
        raise ValueError("invalid YAML: " + " ".join(str(err).split())) from None


def _read_yaml(path: Path, source: str) -> object:
    """Returns the parsed YAML document in `path`.

    Raises InputError when the file cannot be read and ConfigError when it is too large, not
    UTF-8 or not valid YAML.
    """
    try:
        with path.open("rb") as file:
            raw = file.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise InputError(f"{source}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"{source}: is a directory, not a config file") from None
    except PermissionError:
        raise InputError(f"{source}: permission denied") from None
    except OSError as err:
        raise InputError(f"{source}: cannot read: {err.strerror or err}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(source, ["file is larger than 1 MiB; a config is a few lines of YAML"])
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(
            source, [f"not UTF-8 text (invalid byte at offset {err.start})"]
        ) from None
    try:
        return _load_yaml(text)
    except ValueError as err:
        raise ConfigError(source, [str(err)]) from None


def _top_level_problem(data: object) -> str:
    if data is None:
        return "top level: must be a mapping, got an empty document"
    return f"top level: must be a mapping, got {_kind(data)}"


# ---------------------------------------------------------------------------------------------
# --set overrides

_KEY_PATH = re.compile(r"[A-Za-z_][\w-]*(\[\d+\])*(\.[A-Za-z_][\w-]*(\[\d+\])*)*")
_KEY_STEP = re.compile(r"([A-Za-z_][\w-]*)|\[(\d+)\]")


def _apply_override(data: dict[Any, Any], override: str, problems: list[str]) -> None:
    """Sets one `KEY=VALUE` override into `data`, or appends why it cannot to `problems`."""
    key, sep, text = override.partition("=")
    key = key.strip()
    if not sep or not key:
        problems.append(f"--set {override}: expected KEY=VALUE")
        return
    if not _KEY_PATH.fullmatch(key):
        problems.append(
            f"--set {key}: invalid key; write a dotted path such as sparsity.level "
            "or layers[1].quantization.bits"
        )
        return
    try:
        value = _load_yaml(text)
    except ValueError as err:
        problems.append(f"--set {key}: cannot read value {text!r}: {err}")
        return
    steps: list[str | int] = [
        name if name else int(index) for name, index in _KEY_STEP.findall(key)
    ]
    container: Any = data
    for position, step in enumerate(steps):
        here = _steps_text(steps[:position])
        last = position == len(steps) - 1
        if isinstance(step, str):
            if not isinstance(container, dict):
                problems.append(f"--set {key}: {here} is not a mapping")
                return
            if last:
                container[step] = value
            else:
                # The override may create sections the file leaves out (`gates.max_rel_error`).
                if container.get(step) is None:
                    container[step] = {}
                container = container[step]
        else:
            if not isinstance(container, list):
                problems.append(f"--set {key}: {here} is not a list")
                return
            if step >= len(container):
                count = len(container)
                problems.append(
                    f"--set {key}: {here} has {count} entr{'y' if count == 1 else 'ies'}"
                )
                return
            if last:
                container[step] = value
            else:
                if container[step] is None:
                    container[step] = {}
                container = container[step]


def _steps_text(steps: Sequence[str | int]) -> str:
    text = ""
    for step in steps:
        text += f"[{step}]" if isinstance(step, int) else (f".{step}" if text else step)
    return text


# ---------------------------------------------------------------------------------------------
# Validation

_Settings = TypeVar("_Settings", SparsitySettings, QuantizationSettings)


class _Validator:
    """Walks a raw config mapping, appending `path: message` problems to `problems`.

    Each method returns the validated value, or None when it has problems (already recorded).
    """

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems

    def add(self, path: str, message: str) -> None:
        self.problems.append(f"{path}: {message}")

    def mapping(
        self, value: object, path: str, allowed: Sequence[str], nullable: bool = True
    ) -> dict[str, Any] | None:
        """Returns the known keys of the mapping `value` ({} for null); reports unknown keys."""
        if value is None and nullable:
            return {}
        if not isinstance(value, Mapping):
            self.add(path, f"must be a mapping, got {_kind(value)}")
            return None
        known: dict[str, Any] = {}
        for key, item in value.items():
            if key in allowed:
                known[key] = item
            else:
                self.add(_join(path, str(key)), _unknown_key(key, allowed))
        return known

    def config(self, data: Mapping[Any, Any], source: str) -> Config | None:
        """Returns the Config of the top-level mapping `data`."""
        raw = self.mapping(data, "top level", _TOP_KEYS, nullable=False)
        if raw is None:
            return None
        version = raw.get("version", CONFIG_VERSION)
        if type(version) is not int or version != CONFIG_VERSION:
            self.add("version", f"must be {CONFIG_VERSION}, got {version!r}")
        order = raw.get("order", "sparsify-first")
        if order not in ORDERS:
            self.add("order", f"must be one of {', '.join(ORDERS)}, got {order!r}")

        sparsity_raw = self.mapping(raw.get("sparsity"), "sparsity", _SPARSITY_KEYS)
        sparsity = self.settings(SparsitySettings(), sparsity_raw or {}, "sparsity")
        quantization_raw = self.mapping(raw.get("quantization"), "quantization", _QUANTIZATION_KEYS)
        quantization = self.settings(QuantizationSettings(), quantization_raw or {}, "quantization")
        gates_raw = self.mapping(raw.get("gates"), "gates", _GATE_KEYS)
        gates = self.gates(Gates(), gates_raw or {}, "gates")
        exclude = self.patterns(raw.get("exclude"), "exclude")

        # Rules are resolved over the top-level defaults with their faulty fields reset, so that
        # a top-level problem is reported once, not again for every rule.
        base_sparsity = sparsity or _salvage(SparsitySettings, sparsity_raw or {})
        base_quantization = quantization or _salvage(QuantizationSettings, quantization_raw or {})
        base_gates = gates or self.salvage_gates(gates_raw or {})
        layers = self.layers(raw, base_sparsity, base_quantization, base_gates)

        if (
            sparsity is None
            or quantization is None
            or gates is None
            or exclude is None
            or layers is None
            or self.problems
        ):
            return None
        return Config(
            version=version,
            order=order,
            sparsity=sparsity,
            quantization=quantization,
            layers=layers,
            exclude=exclude,
            gates=gates,
            source=source,
        )

    def layers(
        self,
        raw: Mapping[str, Any],
        sparsity: SparsitySettings,
        quantization: QuantizationSettings,
        gates: Gates,
    ) -> tuple[LayerRule, ...] | None:
        """Returns the rules of `raw["layers"]`, resolved over the given defaults."""
        if "layers" not in raw:
            self.add("layers", "required, a non-empty list of rules")
            return None
        value = raw["layers"]
        if not isinstance(value, list) or not value:
            got = "an empty list" if isinstance(value, list) else _kind(value)
            self.add("layers", f"must be a non-empty list of rules, got {got}")
            return None
        rules = [
            self.rule(item, index, sparsity, quantization, gates)
            for index, item in enumerate(value)
        ]
        if any(rule is None for rule in rules):
            return None
        return tuple(rule for rule in rules if rule is not None)

    def rule(
        self,
        value: object,
        index: int,
        sparsity: SparsitySettings,
        quantization: QuantizationSettings,
        gates: Gates,
    ) -> LayerRule | None:
        """Returns `layers[index]` with its overrides merged over the defaults."""
        path = f"layers[{index}]"
        if not isinstance(value, Mapping):
            self.add(path, f"must be a mapping with 'match' or 'type', got {_kind(value)}")
            return None
        before = len(self.problems)
        raw = self.mapping(value, path, _RULE_KEYS, nullable=False) or {}
        match = raw.get("match")
        rule_type = raw.get("type")
        if "match" in raw and "type" in raw:
            self.add(path, "has both 'match' and 'type'; use one per rule")
        elif "match" in raw:
            problem = _pattern_problem(match)
            if problem:
                self.add(f"{path}.match", problem)
        elif "type" in raw:
            if not isinstance(rule_type, str) or rule_type not in RULE_TYPES:
                self.add(
                    f"{path}.type", f"must be one of {', '.join(RULE_TYPES)}, got {rule_type!r}"
                )
        else:
            self.add(path, "needs 'match' or 'type'")

        sparsity_raw = self.mapping(raw.get("sparsity"), f"{path}.sparsity", _SPARSITY_KEYS)
        resolved_sparsity = self.settings(sparsity, sparsity_raw or {}, f"{path}.sparsity")
        quantization_raw = self.mapping(
            raw.get("quantization"), f"{path}.quantization", _QUANTIZATION_KEYS
        )
        resolved_quantization = self.settings(
            quantization, quantization_raw or {}, f"{path}.quantization"
        )
        gates_raw = self.mapping(raw.get("gates"), f"{path}.gates", _GATE_KEYS)
        resolved_gates = self.gates(gates, gates_raw or {}, f"{path}.gates")
        if (
            len(self.problems) > before
            or resolved_sparsity is None
            or resolved_quantization is None
            or resolved_gates is None
        ):
            return None
        return LayerRule(
            match=match if "match" in raw else None,
            type=rule_type if "type" in raw else None,
            sparsity=resolved_sparsity,
            quantization=resolved_quantization,
            gates=resolved_gates,
            index=index,
        )

    def settings(self, base: _Settings, raw: Mapping[str, Any], path: str) -> _Settings | None:
        """Returns `base` with the fields of `raw` replaced, or None after recording problems."""
        values = _merged(base, raw)
        found = _settings_problems(_unchecked(type(base), values), path)
        if found:
            self.problems.extend(found)
            return None
        return _build(type(base), values)

    def gates(self, base: Gates, raw: Mapping[str, Any], path: str) -> Gates | None:
        """Returns `base` with the gates of `raw` replaced (null disables a gate), or None."""
        before = len(self.problems)
        for key, value in raw.items():
            problem = _gate_problem(key, value)
            if problem:
                self.add(f"{path}.{key}", problem)
        if len(self.problems) > before:
            return None
        values = {key: getattr(base, key) for key in _GATE_KEYS}
        values.update({key: None if v is None else float(v) for key, v in raw.items()})
        return Gates(**values)

    @staticmethod
    def salvage_gates(raw: Mapping[str, Any]) -> Gates:
        """Returns the valid gates of `raw`; faulty ones are left unset."""
        return Gates(
            **{
                key: None if value is None else float(value)
                for key, value in raw.items()
                if _gate_problem(key, value) is None
            }
        )

    def patterns(self, value: object, path: str) -> tuple[str, ...] | None:
        """Returns the list of patterns `value` (null: none)."""
        if value is None:
            return ()
        if not isinstance(value, list):
            self.add(path, f"must be a list of patterns, got {_kind(value)}")
            return None
        before = len(self.problems)
        for index, item in enumerate(value):
            problem = _pattern_problem(item)
            if problem:
                self.add(f"{path}[{index}]", problem)
        if len(self.problems) > before:
            return None
        return tuple(value)


def _merged(base: _Settings, raw: Mapping[str, Any]) -> dict[str, Any]:
    """Returns the fields of `base` with those of `raw` replacing them (block_shape as a tuple)."""
    values = {f.name: getattr(base, f.name) for f in fields(base)}
    values.update(raw)
    if isinstance(values.get("block_shape"), list):
        values["block_shape"] = tuple(values["block_shape"])
    return values


def _build(cls: type[_Settings], values: Mapping[str, Any]) -> _Settings:
    """Returns `cls(**values)` for values known to be valid, with `level` as a float."""
    if "level" in values:
        values = {**values, "level": float(values["level"])}
    return cls(**values)


def _unchecked(cls: type[_Settings], values: Mapping[str, Any]) -> _Settings:
    """Returns an instance of the frozen settings class `cls` without running its validation.

    Only for handing raw values to `sparsity_problems`/`quantization_problems`, which list every
    problem where the constructor raises on the first.
    """
    instance = object.__new__(cls)
    for name, value in values.items():
        object.__setattr__(instance, name, value)
    return instance


def _settings_problems(settings: SparsitySettings | QuantizationSettings, path: str) -> list[str]:
    if isinstance(settings, SparsitySettings):
        return sparsity_problems(settings, path)
    return quantization_problems(settings, path)


def _salvage(cls: type[_Settings], raw: Mapping[str, Any]) -> _Settings:
    """Returns `cls` built from the defaults and `raw`, with every faulty field left at default."""
    default = cls()
    values = _merged(default, raw)
    # Resetting one field can expose another (zeros_per_block against a reset block_shape).
    for _ in range(len(values)):
        found = _settings_problems(_unchecked(cls, values), "x")
        if not found:
            return _build(cls, values)
        faulty = {problem.split(":", 1)[0].removeprefix("x.") for problem in found}
        values = {
            name: getattr(default, name) if name in faulty else value
            for name, value in values.items()
        }
    return default


def _gate_problem(key: str, value: object) -> str | None:
    """Returns what is wrong with the gate `key: value`, or None (null disables the gate)."""
    if value is None:
        return None
    number = (
        float(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool)
        else math.nan
    )
    finite = math.isfinite(number)
    if key == "max_rel_error" and not (finite and number >= 0):
        return f"must be a number >= 0, got {value!r}"
    if key == "min_row_cosine" and not (finite and -1 <= number <= 1):
        return f"must be a number in [-1, 1], got {value!r}"
    if key == "max_bytes_ratio" and not (finite and number > 0):
        return f"must be a number > 0, got {value!r}"
    return None


def _pattern_problem(value: object) -> str | None:
    """Returns what is wrong with a match/exclude pattern, or None."""
    if not isinstance(value, str) or not value:
        return f"must be a non-empty string (a glob, a name or re:REGEX), got {value!r}"
    if value.startswith("re:"):
        if value == "re:":
            return "empty regular expression after 're:'"
        try:
            re.compile(value[3:])
        except re.error as err:
            return f"invalid regular expression {value[3:]!r}: {err}"
    return None


def _unknown_key(key: object, allowed: Sequence[str]) -> str:
    if isinstance(key, str):
        close = difflib.get_close_matches(key, allowed, n=1)
        if close:
            return f"unknown key; did you mean {close[0]!r}?"
        section = _SECTION_FIELDS.get(key)
        if section is not None and section in allowed:
            return f"unknown key; did you mean '{section}.{key}'?"
    return f"unknown key; expected one of {', '.join(allowed)}"


def _join(path: str, key: str) -> str:
    return key if path == "top level" else f"{path}.{key}"


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _kind(value: object) -> str:
    """Returns the YAML name of the type of `value`, as messages say it (`got list`)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, Mapping):
        return "mapping"
    for kind, name in ((list, "list"), (str, "string"), (int, "integer"), (float, "number")):
        if isinstance(value, kind):
            return name
    return type(value).__name__
