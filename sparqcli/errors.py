"""The project's exceptions. Each carries the process exit code the CLI turns it into.

Exit codes: 0 done; 1 runtime failure (unreadable or corrupt input, I/O, bad data);
2 usage or config error; 3 a quality gate failed.
"""

from __future__ import annotations


class SparqError(Exception):
    """Base class of every error sparq raises on purpose; `str(err)` is the one-line message."""

    exit_code: int = 1


class UsageError(SparqError):
    """The command, an option or a setting is wrong (exit 2)."""

    exit_code = 2


class SettingError(UsageError):
    """A compression setting has an invalid value (exit 2)."""


class ConfigError(UsageError):
    """A config file has one or more problems; all of them are listed (exit 2)."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = list(problems)
        count = len(self.problems)
        head = f"{source}: {count} problem{'s' if count != 1 else ''}"
        super().__init__(head + ": " + "; ".join(self.problems))


class SelectionError(UsageError):
    """A selection rule matches nothing, or matches a tensor that is not a table (exit 2)."""


class UnsafeInputError(UsageError):
    """Reading the input would run code from it (a pickle) and --trust-pickle was not given (exit 2)."""


class InputError(SparqError):
    """An input file is missing, unreadable or corrupt (exit 1)."""


class FormatError(InputError):
    """A compressed sparq file is corrupt, inconsistent or of an unknown format version (exit 1)."""


class TableError(SparqError):
    """A selected table cannot be compressed as it is: NaN/Inf values, wrong rank or dtype (exit 1)."""


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
