"""Configs: the YAML file's structure as typed, frozen dataclasses, and their validation.

`Config`, `Rule` (and the sections `Sparsity`, `Quantization`, `Gates` from `sparqcli.settings`)
mirror the YAML one to one, with the YAML's defaults, so a config built in Python and the same
YAML file are equal. Both are validated by one function over the raw mapping, which returns
every problem at once as `dotted.path: message` lines (`layers[2].sparsity.level: must be a
number in [0, 1], got 1.5`), raised together as one `ConfigError`.

A rule's sections override the top-level ones: a mapping overrides the keys it names (as in
YAML; an explicit null disables a gate), a dataclass replaces the whole section.
`Config.resolved_rules` holds every rule with its settings resolved.

Importing this module does not import torch.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sparqcli.errors import ConfigError, InputError
from sparqcli.overrides import apply_overrides, credit_override, override_key
from sparqcli.planning.space import PLAN_KEYS, PlanSpace, plan_problems
from sparqcli.settings import (
    DEFAULT_MIN_TABLE_BYTES,
    FIELD_RULES,
    ORDERS,
    SECTION_KEYS,
    SECTION_RULES,
    Gates,
    Order,
    Quantization,
    Sparsity,
    min_table_bytes_problem,
)

CONFIG_VERSION = 1
MAX_CONFIG_BYTES = 1 << 20

# What each `type:` value of a rule selects: the nn.Module class names it stands for.
RULE_TYPES: dict[str, frozenset[str]] = {
    "embedding": frozenset({"Embedding", "EmbeddingBag"}),
    "Embedding": frozenset({"Embedding"}),
    "EmbeddingBag": frozenset({"EmbeddingBag"}),
}

SECTIONS: dict[str, type[Sparsity] | type[Quantization] | type[Gates]] = {
    "sparsity": Sparsity,
    "quantization": Quantization,
    "gates": Gates,
}
_TOP_KEYS = (
    "version",
    "order",
    "sparsity",
    "quantization",
    "layers",
    "exclude",
    "min_table_bytes",
    "gates",
    "plan",
)
_RULE_KEYS = ("match", "type", "sparsity", "quantization", "gates")
# A section field written one level too high (`bits: 4` beside `layers`) is suggested in place.
_SECTION_FIELDS = {key: section for section, keys in SECTION_KEYS.items() for key in keys}

Section = Sparsity | Quantization | Gates
SectionOverride = Mapping[str, Any] | Section | None


@dataclass(frozen=True)
class Rule:
    """One entry of `layers:` — which tensors (`match` pattern or module `type`) and how.

    `sparsity`, `quantization` and `gates` override the config's sections for the tensors this
    rule wins: a mapping overrides the keys it names (`{"level": 0.8}`; `{"min_row_cosine":
    None}` disables that gate), a `Sparsity`/`Quantization`/`Gates` replaces the whole section.
    A Rule is validated as part of its Config.
    """

    match: str | None = None
    type: str | None = None
    sparsity: Mapping[str, Any] | Sparsity | None = None
    quantization: Mapping[str, Any] | Quantization | None = None
    gates: Mapping[str, Any] | Gates | None = None

    def to_dict(self) -> dict[str, Any]:
        """Returns the rule as its YAML mapping (only what it sets)."""
        data: dict[str, Any] = {}
        if self.match is not None:
            data["match"] = self.match
        if self.type is not None:
            data["type"] = self.type
        for name in SECTIONS:
            value = getattr(self, name)
            if value is not None:
                data[name] = _section_dict(value)
        return data


@dataclass(frozen=True)
class ResolvedRule:
    """A rule with its settings resolved (the config's sections + the rule's overrides).

    `index` is the rule's position in `layers`.
    """

    index: int
    match: str | None
    type: str | None
    sparsity: Sparsity
    quantization: Quantization
    gates: Gates

    @property
    def label(self) -> str:
        """Returns the rule as messages name it, e.g. `layers[1] (match 'sparse.bags.*')`."""
        if self.match is not None:
            return f"layers[{self.index}] (match '{self.match}')"  # as written: no escapes
        return f"layers[{self.index}] (type '{self.type}')"


@dataclass(frozen=True, kw_only=True)
class Config:
    """A validated config: what to compress (`layers`, `exclude`) and how.

    `min_table_bytes`: a glob or regex rule skips (leaves dense) the tables it matches that are
    smaller than this many bytes; a rule naming an exact key or module, or a module type,
    always selects. 0 skips nothing.

    Equal to the same YAML loaded with `Config.from_yaml`: configs compare by what their rules
    resolve to (`resolved_rules`), so a rule's section given as a mapping or as a dataclass
    compares equal where both give the same settings. `source` names where it came from (a
    file path; not compared). Raises ConfigError listing every problem.
    """

    layers: Sequence[Rule] = field(compare=False)
    version: int = CONFIG_VERSION
    order: Order = "sparsify-first"
    sparsity: Sparsity = field(default_factory=Sparsity)
    quantization: Quantization = field(default_factory=Quantization)
    exclude: Sequence[str] = ()
    min_table_bytes: int = DEFAULT_MIN_TABLE_BYTES
    gates: Gates = field(default_factory=Gates)
    plan: PlanSpace | None = None
    source: str = field(default="<config>", compare=False)
    resolved_rules: tuple[ResolvedRule, ...] = field(init=False, repr=False, default=())

    def __post_init__(self) -> None:
        if not isinstance(self.layers, (str, bytes, Mapping)) and isinstance(
            self.layers, Iterable
        ):  # a list, a tuple, a generator: the rules, kept (a string is not a list of rules)
            object.__setattr__(self, "layers", tuple(self.layers))
        if isinstance(self.exclude, (list, tuple)):
            object.__setattr__(self, "exclude", tuple(self.exclude))
        problems = _Validator().problems_of(self.to_dict())
        if problems:
            raise ConfigError(self.source, problems)
        # a rule given as its YAML mapping becomes a Rule, as from_dict makes it
        rules = tuple(
            rule if isinstance(rule, Rule) else _rule_from_mapping(rule) for rule in self.layers
        )
        object.__setattr__(self, "layers", rules)
        for name, section in SECTIONS.items():
            value = getattr(self, name)
            if not isinstance(value, section):
                object.__setattr__(self, name, section(**_section_dict(value)))
        if self.plan is not None and not isinstance(self.plan, PlanSpace):
            object.__setattr__(self, "plan", PlanSpace.from_dict(self.plan))
        object.__setattr__(self, "resolved_rules", tuple(self._resolve()))

    @classmethod
    def from_yaml(
        cls, path: str | Path, overrides: Sequence[str] = (), order: str | None = None
    ) -> Config:
        """Returns the config in the YAML file `path`, after `KEY=VALUE` overrides and `order`.

        An override's KEY is a dotted path into the file's mapping (`sparsity.level`,
        `layers[1].quantization.bits`); its VALUE is read as YAML (`0.7`, `[2, 2]`, `null`).
        Raises InputError when the file is missing or unreadable, and ConfigError listing every
        problem of the file, the overrides and the resulting config.
        """
        source = str(path)
        if isinstance(overrides, str):  # one override, not a sequence of its characters
            overrides = [overrides]
        data = _read_yaml(Path(path), source)
        if not isinstance(data, Mapping):
            raise ConfigError(source, [_top_level_problem(data)])
        data = dict(data)
        problems = apply_overrides(data, overrides, _load_yaml)
        if order is not None:
            data["order"] = order
        try:
            return cls.from_dict(data, source, problems)
        except ConfigError as error:
            # `order` replaces whatever an override set there
            credit = [o for o in overrides if order is None or override_key(o) != "order"]
            if not credit:
                raise
            credited = [credit_override(line, credit) for line in error.problem_templates]
            raise ConfigError(source, credited) from None

    @classmethod
    def from_dict(
        cls, data: object, source: str = "<config>", problems: Sequence[str] = ()
    ) -> Config:
        """Returns the config described by `data`, a parsed YAML document (plain data).

        Raises ConfigError listing every problem (`problems` found before come first).
        """
        if not isinstance(data, Mapping):
            raise ConfigError(source, [*problems, _top_level_problem(data)])
        found = [*problems, *_Validator().problems_of(data)]
        if found:
            raise ConfigError(source, found)
        layers = tuple(_rule_from_mapping(rule) for rule in data["layers"])
        return cls(
            layers=layers,
            version=data.get("version", CONFIG_VERSION),
            order=data.get("order", "sparsify-first"),
            exclude=tuple(data.get("exclude") or ()),
            min_table_bytes=data.get("min_table_bytes", DEFAULT_MIN_TABLE_BYTES),
            plan=PlanSpace.from_dict(data["plan"]) if data.get("plan") is not None else None,
            source=source,
            **{name: section(**(data.get(name) or {})) for name, section in SECTIONS.items()},
        )

    def to_dict(self) -> dict[str, Any]:
        """Returns the config as its YAML mapping: `Config.from_dict` of it gives it back.

        The `plan:` section (candidates for `sparq plan`) is there only when the config has one.
        """
        data = {
            "version": self.version,
            "order": self.order,
            **{name: _section_dict(getattr(self, name)) for name in ("sparsity", "quantization")},
            "layers": [rule.to_dict() if isinstance(rule, Rule) else rule for rule in self.layers]
            if isinstance(self.layers, tuple)
            else self.layers,
            "exclude": list(self.exclude)
            if isinstance(self.exclude, (list, tuple))
            else self.exclude,
            "min_table_bytes": self.min_table_bytes,
            "gates": _section_dict(self.gates),
        }
        if self.plan is not None:
            data["plan"] = (
                self.plan.to_dict() if isinstance(self.plan, PlanSpace) else dict(self.plan)
            )
        return data

    def to_yaml(self) -> str:
        """Returns the config as YAML text that `Config.from_yaml` reads back to an equal config."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)

    def _resolve(self) -> list[ResolvedRule]:
        resolved = []
        for index, rule in enumerate(self.layers):
            sections = {
                name: _resolved_section(SECTIONS[name], getattr(self, name), getattr(rule, name))
                for name in SECTIONS
            }
            resolved.append(ResolvedRule(index, rule.match, rule.type, **sections))
        return resolved


def config_files(config: Config | str | Path) -> list[Path]:
    """Returns the YAML file `config` is read from (empty for a Config object): an input that
    no output may overwrite."""
    return [Path(config)] if isinstance(config, (str, Path)) else []


def _section_dict(value: object) -> Any:
    """Returns a section (dataclass or mapping) as plain YAML data; anything else unchanged."""
    if isinstance(value, (Sparsity, Quantization, Gates)):
        return value.to_dict()
    if isinstance(value, Mapping):
        return {key: list(item) if isinstance(item, tuple) else item for key, item in value.items()}
    return value


def _rule_from_mapping(rule: Mapping[str, Any]) -> Rule:
    """Returns the Rule a validated `layers:` entry describes."""
    return Rule(
        match=rule.get("match"),
        type=rule.get("type"),
        **{name: _normalized(rule.get(name)) for name in SECTIONS},
    )


def _normalized(value: object) -> Any:
    """Returns a rule's raw section override as stored on a Rule (block shapes as tuples)."""
    if isinstance(value, Mapping):
        return {key: tuple(item) if isinstance(item, list) else item for key, item in value.items()}
    return value


def _resolved_section(cls: type[Section], base: Section, override: SectionOverride) -> Section:
    if override is None:
        return base
    if isinstance(override, cls):
        return override
    return cls(**{**base.to_dict(), **_section_dict(override)})


# ---------------------------------------------------------------------------------------------
# Validation: every problem of a raw mapping, in the order the file reads


class _Validator:
    """Walks a raw config mapping and collects `path: message` problems."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def add(self, path: str, message: str) -> None:
        self.problems.append(f"{path}: {message}")

    def problems_of(self, data: Mapping[Any, Any]) -> list[str]:
        """Returns every problem of the top-level mapping `data`."""
        raw = self.mapping(data, "top level", _TOP_KEYS, nullable=False)
        if raw is None:
            return self.problems
        version = raw.get("version", CONFIG_VERSION)
        if type(version) is not int or version != CONFIG_VERSION:
            self.add("version", f"must be {CONFIG_VERSION}, got {version!r}")
        order = raw.get("order", "sparsify-first")
        if order not in ORDERS:
            self.add("order", f"must be one of {', '.join(ORDERS)}, got {order!r}")
        # Each rule is checked over the valid part of the top-level sections, so that a
        # top-level problem is reported once, not again for every rule.
        bases = {name: self.section(raw.get(name), name, name) for name in SECTIONS}
        self.patterns(raw.get("exclude"), "exclude")
        if "min_table_bytes" in raw:
            problem = min_table_bytes_problem(raw["min_table_bytes"])
            if problem:
                self.add("min_table_bytes", problem)
        self.layers(raw, bases)
        self.plan(raw.get("plan"))
        return self.problems

    def mapping(
        self, value: object, path: str, allowed: Sequence[str], nullable: bool = True
    ) -> dict[str, Any] | None:
        """Returns the known keys of the mapping `value` ({} for null); reports unknown keys."""
        if value is None and nullable:
            return {}
        if isinstance(value, (Sparsity, Quantization, Gates)):
            return value.to_dict()
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

    def section(
        self, value: object, name: str, path: str, base: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """Checks one section (over `base`, the values it overrides); returns its valid values.

        The result holds every field: the section's valid values over `base` (or the
        defaults), so that rules are checked against what is valid of the top level.
        """
        defaults = SECTIONS[name]().to_dict()
        raw = self.mapping(value, path, SECTION_KEYS[name])
        merged = dict(base if base is not None else defaults)
        if raw is None:
            return merged
        field_rule = FIELD_RULES[name]
        valid = True
        for key, item in raw.items():
            message = field_rule(key, item)
            if message is None:
                merged[key] = item
            else:
                valid = False
                self.add(f"{path}.{key}", message)
        if valid:
            for problem_path, message in SECTION_RULES[name](merged, name):
                field_name = problem_path.rsplit(".", 1)[1]
                self.add(f"{path}.{field_name}", message)
                merged[field_name] = defaults[field_name]
        return merged

    def layers(self, raw: Mapping[str, Any], bases: Mapping[str, Mapping[str, Any]]) -> None:
        """Checks `raw["layers"]`, each rule over the top-level sections' valid values."""
        if "layers" not in raw:
            self.add("layers", "required, a non-empty list of rules")
            return
        value = raw["layers"]
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list) or not value:
            got = "an empty list" if isinstance(value, list) else _kind(value)
            self.add("layers", f"must be a non-empty list of rules, got {got}")
            return
        for index, item in enumerate(value):
            self.rule(item.to_dict() if isinstance(item, Rule) else item, index, bases)

    def rule(self, value: object, index: int, bases: Mapping[str, Mapping[str, Any]]) -> None:
        """Checks `layers[index]`, its overrides merged over the top-level sections."""
        path = f"layers[{index}]"
        if not isinstance(value, Mapping):
            self.add(path, f"must be a mapping with 'match' or 'type', got {_kind(value)}")
            return
        raw = self.mapping(value, path, _RULE_KEYS, nullable=False) or {}
        if "match" in raw and "type" in raw:
            self.add(path, "has both 'match' and 'type'; use one per rule")
        elif "match" in raw:
            problem = _pattern_problem(raw["match"])
            if problem:
                self.add(f"{path}.match", problem)
        elif "type" in raw:
            rule_type = raw["type"]
            if not isinstance(rule_type, str) or rule_type not in RULE_TYPES:
                self.add(
                    f"{path}.type", f"must be one of {', '.join(RULE_TYPES)}, got {rule_type!r}"
                )
        else:
            self.add(path, "needs 'match' or 'type'")
        for name in SECTIONS:
            self.section(raw.get(name), name, f"{path}.{name}", bases[name])

    def plan(self, value: object) -> None:
        """Checks the `plan:` section (null: every default candidate)."""
        if isinstance(value, PlanSpace):
            value = value.to_dict()
        raw = self.mapping(value, "plan", PLAN_KEYS)
        for path, message in plan_problems(raw or {}, "plan"):
            self.add(path, message)

    def patterns(self, value: object, path: str) -> None:
        """Checks a list of patterns (null: none)."""
        if value is None:
            return
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            self.add(path, f"must be a list of patterns, got {_kind(value)}")
            return
        for index, item in enumerate(value):
            problem = _pattern_problem(item)
            if problem:
                self.add(f"{path}[{index}]", problem)


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


def _top_level_problem(data: object) -> str:
    if data is None:
        return "top level: must be a mapping, got an empty document"
    return f"top level: must be a mapping, got {_kind(data)}"


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


# YAML 1.1 (PyYAML) reads a number with an exponent but no point, `1e-3`, as a string; YAML 1.2
# and every other reader take it as a float, and so do sparq's configs.
_ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


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
