"""Resolving a config's rules against the tensors of a checkpoint.

A `match` pattern is tried on a tensor's key (`bags.0.weight`) and on its module name (`bags.0`,
the key without its last dotted component; a key without a dot is its own module name):
`re:REGEX` is a regular expression (re.fullmatch), anything else a case-sensitive glob
(fnmatchcase), so a plain name matches exactly. A `type` rule selects `<module>.weight` of every
module of that class; it needs the module types of a pickled nn.Module.

The first rule that matches a tensor wins it; `exclude` wins over every rule. A glob or regex
rule skips the tables it matches that are smaller than the config's `min_table_bytes` (they stay
dense, and a later rule may still win them); a rule naming an exact key or module name (no
glob characters), or a module type, always selects.

Importing this module does not import torch.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase

from sparqcli.config import RULE_TYPES, Config, ResolvedRule
from sparqcli.dtypes import TensorInfo
from sparqcli.errors import SelectionError
from sparqcli.results import SkippedTable

_CLOSEST = 3
_CLOSEST_CUTOFF = 0.6


@dataclass(frozen=True)
class SelectedTable:
    """A tensor chosen for compression and the rule that won it."""

    key: str
    rule: ResolvedRule
    info: TensorInfo


@dataclass(frozen=True)
class RuleMatch:
    """What one rule matched, each group in checkpoint key order.

    `won`: the tensors it selects; `shadowed`: matched, but an earlier rule won them;
    `excluded`: matched, but `exclude` removed them; `skipped`: matched by a glob or regex,
    but smaller than `min_table_bytes`.
    """

    rule: ResolvedRule
    won: tuple[str, ...]
    shadowed: tuple[str, ...]
    excluded: tuple[str, ...]
    skipped: tuple[str, ...] = ()

    @property
    def lost(self) -> tuple[str, ...]:
        """Returns the keys it matched but did not win (shadowed, excluded or skipped)."""
        return self.shadowed + self.excluded + self.skipped


@dataclass(frozen=True)
class Selection:
    """The tables a config selects, in checkpoint key order, and what every rule matched.

    `skipped` holds the tables a rule matched but left dense because they are small (and no
    later rule won), in key order; `infos` the shape and dtype of every tensor of the checkpoint.
    """

    tables: tuple[SelectedTable, ...]
    matches: tuple[RuleMatch, ...]
    skipped: tuple[SkippedTable, ...] = ()
    infos: Mapping[str, TensorInfo] = field(default_factory=dict)


def module_name(key: str) -> str:
    """Returns the module name of a tensor key: `emb.weight` -> `emb`; `emb` -> `emb`."""
    module, dot, _ = key.rpartition(".")
    return module if dot else key


def pattern_matches(pattern: str, name: str) -> bool:
    """Returns True when the glob or `re:` pattern matches all of `name`."""
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return fnmatchcase(name, pattern)


def exact_pattern(key: str) -> str:
    """Returns a selection pattern that matches the tensor key `key` exactly: the key itself,
    or an escaped regex (`re:`) where the key holds glob characters or starts with `re:`."""
    if key.startswith("re:") or any(char in key for char in "*?[]"):
        return "re:" + re.escape(key)
    return key


def is_exact(pattern: str) -> bool:
    """Returns True for a pattern that names one key or module (no glob characters, no `re:`)."""
    return not pattern.startswith("re:") and not any(char in pattern for char in "*?[")


def select_tables(
    config: Config,
    tensors: Mapping[str, TensorInfo],
    source: str,
    module_types: Mapping[str, str] | None = None,
) -> Selection:
    """Returns the tables that `config` selects among `tensors`, the checkpoint `source`'s.

    `module_types` maps module names to class names (`Embedding`, `EmbeddingBag`); it is known
    only for a pickled nn.Module and is needed by `type` rules.
    A glob or regex rule skips the tables smaller than `config.min_table_bytes`.
    Raises SelectionError, naming `source`, listing the problems in rule order (one per rule:
    a type rule without module types, a rule that matches no tensor, a selected tensor that is
    not a 2-D floating tensor); or when nothing at all is selected.
    """
    keys = list(tensors)
    excluded = {key for key in keys if is_excluded(config, key)}
    winners: dict[str, ResolvedRule] = {}
    small: dict[str, ResolvedRule] = {}  # skipped for their size, by the first rule that did
    matches: list[RuleMatch] = []
    problems: list[str] = []
    for rule in config.resolved_rules:
        if rule.type is not None and module_types is None:
            problems.append(
                f"{rule.label} needs module types; this checkpoint is a state dict "
                "(type rules work only on a pickled nn.Module loaded with {opt:trust_pickle})"
            )
            continue
        matched = [key for key in keys if _rule_matches(rule, key, module_types)]
        if not matched:
            problems.append(f"{rule.label} matches no tensor; {_hint(rule, keys, module_types)}")
            continue
        problem = None
        won: list[str] = []
        shadowed: list[str] = []
        lost_to_exclude: list[str] = []
        too_small: list[str] = []
        threshold = config.min_table_bytes if _skips_small(rule) else 0
        for key in matched:
            if key in excluded:
                lost_to_exclude.append(key)
            elif key in winners:
                shadowed.append(key)
            elif not tensors[key].is_table:
                if tensors[key].nbytes < threshold:
                    # a pattern's small non-table (a LayerNorm bias beside `*embedding*` tables):
                    # below the size a pattern compresses, it is no candidate at all
                    continue
                dense = "" if tensors[key].layout == "strided" else "dense "
                problem = problem or (
                    f"{rule.label} matches {key!r}, which is not a {dense}2-D floating "
                    f"tensor ({tensors[key].describe()})"
                )
            elif tensors[key].nbytes < threshold:
                small.setdefault(key, rule)
                too_small.append(key)
            else:
                winners[key] = rule
                won.append(key)
        if problem is not None:
            problems.append(problem)
        matches.append(
            RuleMatch(rule, tuple(won), tuple(shadowed), tuple(lost_to_exclude), tuple(too_small))
        )
    if len(problems) == 1:
        raise SelectionError(f"{source}: {problems[0]}", path=source)
    if problems:
        listed = "; ".join(f"({n}) {problem}" for n, problem in enumerate(problems, 1))
        raise SelectionError(f"{source}: {len(problems)} rules fail: {listed}", path=source)
    skipped = tuple(
        _skipped(key, tensors[key], small[key], config.min_table_bytes)
        for key in keys
        if key in small and key not in winners
    )
    if not winners:
        hint = ""
        if skipped:
            hint = (
                f"; {len(skipped)} matched table(s) are smaller than min_table_bytes "
                f"({_bytes(config.min_table_bytes)}): "
                f"{', '.join(t.key for t in skipped[:_CLOSEST])}"
                f"{', ...' if len(skipped) > _CLOSEST else ''} (name them exactly, or lower "
                "min_table_bytes)"
            )
        raise SelectionError(f"{source}: the config selects no table{hint}")
    tables = tuple(SelectedTable(key, winners[key], tensors[key]) for key in keys if key in winners)
    return Selection(tables=tables, matches=tuple(matches), skipped=skipped, infos=dict(tensors))


def _skips_small(rule: ResolvedRule) -> bool:
    """Returns True for a rule that leaves small tables dense: a glob or a regex."""
    return rule.match is not None and not is_exact(rule.match)


def _skipped(key: str, info: TensorInfo, rule: ResolvedRule, threshold: int) -> SkippedTable:
    return SkippedTable(
        key=key,
        shape=info.shape,
        dtype=info.dtype,
        bytes=info.nbytes,
        rule=rule.label,
        reason=f"smaller than min_table_bytes ({_bytes(threshold)})",
    )


def _bytes(count: int) -> str:
    """Returns a byte count as written in messages: `64 KiB`, `1 MiB`, `1000 bytes`."""
    for unit, size in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if count and count % size == 0:
            return f"{count // size} {unit}"
    return f"{count} bytes"


def is_excluded(config: Config, key: str) -> bool:
    """Returns whether an `exclude` pattern of `config` matches `key` or its module name."""
    return any(_matches(pattern, key) for pattern in config.exclude)


def _matches(pattern: str, key: str) -> bool:
    return pattern_matches(pattern, key) or pattern_matches(pattern, module_name(key))


def _rule_matches(rule: ResolvedRule, key: str, module_types: Mapping[str, str] | None) -> bool:
    if rule.match is not None:
        return _matches(rule.match, key)
    if module_types is None or rule.type is None:
        return False
    # Unlike module_name(), a bare `weight` belongs to the root module "" here (a pickled
    # nn.Embedding itself has the state dict key `weight`).
    module, _, name = key.rpartition(".")
    return name == "weight" and module_types.get(module) in RULE_TYPES[rule.type]


def _hint(rule: ResolvedRule, keys: list[str], module_types: Mapping[str, str] | None) -> str:
    """Returns what to tell about a rule that matches nothing: the nearest keys or module types."""
    if rule.type is not None:
        present = sorted(set((module_types or {}).values()))
        return f"module types in this checkpoint: {', '.join(present) or 'none'}"
    if not keys:
        return "the checkpoint has no tensors"
    closest = _closest_keys(rule.match or "", keys)
    if closest:
        return f"closest keys: {', '.join(closest)}"
    shown = ", ".join(keys[:_CLOSEST])
    more = ", ..." if len(keys) > _CLOSEST else ""
    return f"no key is close; the checkpoint has {len(keys)} tensors: {shown}{more}"


def _closest_keys(pattern: str, keys: list[str]) -> list[str]:
    """Returns up to 3 keys whose key or module name is most like `pattern`, best first."""
    probe = pattern[3:] if pattern.startswith("re:") else pattern.replace("*", "").replace("?", "")
    matcher = difflib.SequenceMatcher(b=probe)
    scored: list[tuple[float, int, str]] = []
    for position, key in enumerate(keys):
        best = 0.0
        for name in (key, module_name(key)):
            matcher.set_seq1(name)
            best = max(best, matcher.ratio())
        if best >= _CLOSEST_CUTOFF:
            scored.append((-best, position, key))
    return [key for _, _, key in sorted(scored)[:_CLOSEST]]
