"""The `sparq` command line: a thin Typer layer over the library.

Each command parses its options, calls `sparqcli`'s public API, renders the result with
`sparqcli.render`, and lets the project's errors through to `app.run_command`, which turns
them into one line on stderr and an exit code: 0 done; 1 runtime failure; 2 usage or config
error; 3 a quality gate failed. torch is imported only inside commands, so `sparq --help` and
`--version` answer fast.
"""

from __future__ import annotations

from sparqcli.cli import compress, files, plan, validate  # noqa: F401  (registers the commands)
from sparqcli.cli.app import app, main

__all__ = ["app", "main"]
