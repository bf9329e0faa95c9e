"""Aliases in a selection: tables that hold the same values under several keys are one table.

Tied weights (an input embedding shared with the output head) are stored under two keys; sparq
compresses them once and stores them once, the other keys recorded as the table's aliases.
Selecting one key of a group selects the group (with the first selected key's rule); excluding a
key while another of its group is selected, or selecting two keys of a group with different
settings, is an error naming both.

Importing this module does not import torch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from sparqcli.config import Config
from sparqcli.errors import SelectionError
from sparqcli.select import Selection, is_excluded, select_tables

if TYPE_CHECKING:
    from sparqcli.sources import Checkpoint


def select_with_aliases(
    config: Config, checkpoint: Checkpoint, source: str
) -> tuple[Selection, dict[str, tuple[str, ...]]]:
    """Returns the tables `config` selects in `checkpoint` (named `source` in messages), each
    alias group as one table, and the aliases (`apply_aliases`).

    Raises SelectionError for a selection problem (`select_tables`, `apply_aliases`), InputError
    when a tensor compared for aliases cannot be read.
    """
    from sparqcli.sources.aliases import find_aliases

    selection = select_tables(config, checkpoint.tensors, source, checkpoint.module_types)
    groups = find_aliases(checkpoint, [table.key for table in selection.tables])
    return apply_aliases(selection, groups, config, source)


def apply_aliases(
    selection: Selection, groups: Sequence[Sequence[str]], config: Config, source: str
) -> tuple[Selection, dict[str, tuple[str, ...]]]:
    """Returns the selection with every alias group reduced to one table, and the aliases.

    `groups` are the checkpoint's groups of identical tables (`sources.aliases.find_aliases`),
    each in key order. The table kept is the group's first selected key; the result maps it to
    the group's other keys. Raises SelectionError, naming `source` and both keys, when a key is
    excluded while another of its group is selected, or when two keys of a group are selected by
    rules with different settings.
    """
    selected = {table.key: table for table in selection.tables}
    aliases: dict[str, tuple[str, ...]] = {}
    dropped: set[str] = set()
    for group in groups:
        chosen = [key for key in group if key in selected]
        if not chosen:
            continue
        primary = selected[chosen[0]]
        for key in group:
            if key in selected:
                continue
            if is_excluded(config, key):
                raise SelectionError(
                    f"{source}: '{key}' is excluded, but it holds the same values as selected "
                    f"table '{primary.key}' (tied weights, stored once); exclude both or neither",
                    path=source,
                )
        for key in chosen[1:]:
            rule = selected[key].rule
            if _settings(rule) != _settings(primary.rule):
                raise SelectionError(
                    f"{source}: '{primary.key}' ({primary.rule.label}) and '{key}' "
                    f"({rule.label}) hold the same values (tied weights, stored once) but are "
                    "selected with different settings; give them the same rule",
                    path=source,
                )
        aliases[primary.key] = tuple(key for key in group if key != primary.key)
        dropped.update(aliases[primary.key])
    tables = tuple(table for table in selection.tables if table.key not in dropped)
    return replace(selection, tables=tables), aliases


def _settings(rule: object) -> tuple[object, ...]:
    return (rule.sparsity, rule.quantization, rule.gates)  # type: ignore[attr-defined]


def alias_keys(aliases: Mapping[str, Sequence[str]]) -> set[str]:
    """Returns every alias key (not the tables' own keys) of an alias map."""
    return {key for keys in aliases.values() for key in keys}
