"""The project's exceptions. Each carries the process exit code the CLI turns it into.

Exit codes: 0 done; 1 runtime failure (unreadable or corrupt input, I/O, bad data);
2 usage or config error; 3 a quality gate failed.

An error names what it is about in structured fields (`path`, `table`, `row`, `option`), and its
message names options without committing to a spelling: `{opt:force}` in a message template is
written `force=True` for Python callers (`str(error)`) and `--force` by the CLI
(`error.render(flag_spelling)`). Library code never writes a command-line flag itself.
"""

from __future__ import annotations

import re
from collections.abc import Callable

_OPTION = re.compile(r"\{opt:(\w+)(?:=([^}]*))?\}")

# Options that are switches: Python callers pass them as `name=True`.
_SWITCHES = frozenset({"force", "trust_pickle", "dry_run"})
_PYTHON_NAMES = {"overrides": "override"}


def python_spelling(option: str, value: str | None) -> str:
    """Returns how a Python caller writes `option` (with `value`): `force=True`, `device`."""
    if value is not None:
        return f"{option}={value!r}"
    if option in _SWITCHES:
        return f"{option}=True"
    return _PYTHON_NAMES.get(option, option)


def render_options(template: str, spell: Callable[[str, str | None], str]) -> str:
    """Returns `template` with every `{opt:name}` / `{opt:name=value}` written by `spell`."""
    return _OPTION.sub(lambda match: spell(match.group(1), match.group(2)), template)


class SparqError(Exception):
    """Base class of every error sparq raises on purpose; `str(err)` is the one-line message.

    `path`, `table`, `row` and `option` say what the error is about, where known.
    """

    exit_code: int = 1

    def __init__(
        self,
        message: str,
        *,
        path: object = None,
        table: str | None = None,
        row: int | None = None,
        option: str | None = None,
    ) -> None:
        self.template = message
        self.path = None if path is None else str(path)
        self.table = table
        self.row = row
        found = _OPTION.search(message)
        self.option = option if option is not None else (found.group(1) if found else None)
        super().__init__(self.render(python_spelling))

    def render(self, spell: Callable[[str, str | None], str]) -> str:
        """Returns the message with its options written by `spell(option, value)`."""
        return render_options(self.template, spell)

    def append(self, text: str) -> None:
        """Adds `text` (a template, like the message's) to the end of the message."""
        self.template += text
        self.args = (self.render(python_spelling),)


class UsageError(SparqError):
    """The command, an option or a setting is wrong (exit 2)."""

    exit_code = 2


class SettingError(UsageError):
    """A compression setting has an invalid value (exit 2)."""


class ConfigError(UsageError):
    """A config has one or more problems; all of them are listed (exit 2).

    `problems` holds one `path: message` line each (rendered for Python callers).
    """

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problem_templates = list(problems)
        count = len(problems)
        head = f"{source}: {count} problem{'s' if count != 1 else ''}"
        super().__init__(head + ": " + "; ".join(problems), path=source)
        self.problems = [render_options(p, python_spelling) for p in problems]


class SelectionError(UsageError):
    """A selection rule matches nothing, or matches a tensor that is not a table (exit 2)."""


class UnsafeInputError(UsageError):
    """Reading the input would run code from it (a pickle) and trust was not given (exit 2)."""


class InputError(SparqError):
    """An input file is missing, unreadable or corrupt (exit 1)."""


class FormatError(InputError):
    """A compressed sparq file is corrupt, inconsistent or of an unknown format version (exit 1)."""


class TableError(SparqError):
    """A selected table cannot be compressed as it is: NaN/Inf values, wrong rank or dtype (exit 1)."""


class UnfitSettingsError(TableError):
    """A table cannot be stored with the settings asked for: a row's scale or zero point does not
    fit its dtype, or a row would decode to ±inf in the table's dtype (exit 1). `row` names it.
    Other settings may fit, so the planner drops these instead of stopping."""


class OutputError(SparqError):
    """An output cannot be written (exit 1); nothing is left behind."""


class GateError(SparqError):
    """A quality gate failed; the failing file was not written (exit 3).

    `report` is the CompressReport of the run, so callers can still show what was measured.
    """

    exit_code = 3

    def __init__(self, message: str, report: object = None) -> None:
        super().__init__(message)
        self.report = report


def first_line(error: BaseException, limit: int = 200) -> str:
    """Returns the first line of an exception's message (its type name when empty), cut to `limit`."""
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0][:limit]
