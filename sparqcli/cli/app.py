"""The Typer app, its error handling, signals and process exit; options shared by commands."""

from __future__ import annotations

import contextlib
import enum
import functools
import logging
import os
import signal
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from sparqcli import __version__
from sparqcli.errors import SparqError, python_spelling

app = typer.Typer(
    name="sparq",
    help="Compress the embedding tables of PyTorch checkpoints: block sparsity + per-row "
    "quantization, bit-exact with torch.ao's post_training_sparse_quantize.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

# How the library's options are written on the command line (errors name options neutrally).
FLAGS = {
    "force": "--force",
    "trust_pickle": "--trust-pickle",
    "key": "--key",
    "output": "-o/--output",
    "out_dir": "--out-dir",
    "device": "--device",
    "output_format": "--format",
    "overrides": "--set",
    "order": "--order",
    "report": "--report",
    "dry_run": "--dry-run",
    "threads": "--threads",
    "budget": "--budget",
    "max_error": "--max-error",
    "row_weights": "--row-weights",
    "plot": "--plot",
    "sample_rows": "--sample-rows",
}


def flag_spelling(option: str, value: str | None) -> str:
    """Returns how the command line writes `option` (with `value`): `--force`, `--format torch-ao`."""
    flag = FLAGS.get(option)
    if flag is None:
        return python_spelling(option, value)
    return flag if value is None else f"{flag} {value}"


TrustPickleOption = Annotated[
    bool,
    typer.Option(
        "--trust-pickle",
        help="Allow unpickling code (whole nn.Module files). Only for files you trust.",
    ),
]
KeyOption = Annotated[
    str | None,
    typer.Option("--key", help="Entry holding the state dict in a nested .pt (e.g. state_dict)."),
]
ForceOption = Annotated[bool, typer.Option("--force", help="Replace existing outputs.")]
QuietOption = Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing on success.")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
SetOption = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        metavar="KEY=VALUE",
        help="Override a config value, e.g. sparsity.level=0.7 (repeatable).",
    ),
]


class OrderChoice(str, enum.Enum):
    sparsify_first = "sparsify-first"
    quantize_first = "quantize-first"


OrderOption = Annotated[
    OrderChoice | None, typer.Option("--order", help="Override the config's order.")
]
PathArgument = Annotated[Path, typer.Argument(show_default=False)]

_state: dict[str, bool] = {"debug": False}
F = TypeVar("F", bound=Callable[..., Any])


def run_command(command: F) -> F:
    """Wraps a command: project errors become `sparq: error: …` on stderr and their exit code."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except SparqError as error:
            if _state["debug"]:
                raise
            print_error(error.render(flag_spelling))
            raise typer.Exit(error.exit_code) from None
        except (typer.Exit, typer.Abort):
            raise
        except BrokenPipeError:  # stdout's reader went away (`sparq plan ... | head`)
            with contextlib.suppress(OSError):  # nothing more reaches it; no flush error
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise typer.Exit(128 + getattr(signal, "SIGPIPE", 13)) from None
        except MemoryError:
            if _state["debug"]:
                raise
            print_error("out of memory")
            raise typer.Exit(1) from None
        except Exception as error:  # a bug: one line here, the traceback with --debug
            if _state["debug"]:
                raise
            detail = " ".join(str(error).split())[:300]
            print_error(
                f"internal error: {type(error).__name__}: {detail} (a bug in sparq; "
                "--debug shows the traceback)"
            )
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


def print_error(message: str) -> None:
    """Prints `sparq: error: message` on stderr."""
    typer.echo(f"sparq: error: {message}", err=True)


def _show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: Any = None,
    line: str | None = None,
) -> None:
    """Prints a warning as one line, `sparq: warning: message`, on stderr (no source location:
    the user ran a command, not the library's code)."""
    typer.echo(f"sparq: warning: {message}", err=True)


class _NoticeHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        # A notice that cannot be written (a closed pipe) must not fail the work it announces.
        with contextlib.suppress(OSError, ValueError):
            typer.echo(f"sparq: {record.getMessage()}", err=True)


_NOTICES = _NoticeHandler()


def show_notices(quiet: bool) -> None:
    """Prints the library's notices (INFO records of the `sparqcli` loggers, such as a compiled
    kernel's first build) as `sparq: message` lines on stderr from now on in this process (a
    command's); none with `quiet`, and under torchrun only from each machine's first rank (the
    ranks of a machine share its kernel cache: one line says it, not one per rank)."""
    from sparqcli.distributed import local_rank, world_size

    logger = logging.getLogger("sparqcli")
    if _NOTICES not in logger.handlers:
        logger.addHandler(_NOTICES)
    other_rank = world_size() > 1 and local_rank() != 0
    logger.setLevel(logging.WARNING if quiet or other_rank else logging.INFO)


def stdout_is_terminal() -> bool:
    """Returns True when stdout is a terminal (tables then fit its width)."""
    return sys.stdout.isatty()


def stdout_console() -> Any:
    """Returns the rich Console for stdout: on a terminal, the terminal's width (COLUMNS when
    set); otherwise unlimited, so that keys are never shortened and a table is never wrapped,
    whatever COLUMNS says (scripts grep the output)."""
    from rich.console import Console

    from sparqcli.render import PIPED_WIDTH

    class StdoutConsole(Console):
        def on_broken_pipe(self) -> None:
            raise BrokenPipeError  # rich would exit 1; run_command ends with SIGPIPE's code

    width = None if stdout_is_terminal() else PIPED_WIDTH
    return StdoutConsole(width=width, soft_wrap=False)


WideOption = Annotated[
    bool,
    typer.Option("--wide", help="Show every statistic (the table is wider than 80 columns)."),
]


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"sparq {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            callback=_version_callback,
            is_eager=True,
            help="Print the version and exit.",
        ),
    ] = False,
    debug: Annotated[
        bool, typer.Option("--debug", help="Show full tracebacks instead of one-line errors.")
    ] = False,
) -> None:
    """sparq: compress embedding tables of PyTorch checkpoints."""
    _state["debug"] = debug or os.environ.get("SPARQ_DEBUG") == "1"


_SIGNAL_EXITS = {signal.SIGINT: ("interrupted", 130), signal.SIGTERM: ("terminated", 143)}


def _end_on_signal(signum: int, frame: object) -> None:
    """Ends the process on SIGINT/SIGTERM: partial outputs removed, one line naming the
    outputs it leaves unwritten, 128 + signum.

    Nothing is raised into whatever was running (torch's import, a thread's lock, a kernel), so
    no traceback and no half-released lock; outputs are renamed into place only when complete,
    so removing the temporary files leaves every output as it was or complete.
    """
    from sparqcli.sinks import discard_partial_outputs, partial_outputs

    unwritten = partial_outputs()
    discard_partial_outputs()
    word, code = _SIGNAL_EXITS[signal.Signals(signum)]
    if unwritten:
        names = ", ".join(str(path) for path in unwritten)
        word += f"; {names} {'was' if len(unwritten) == 1 else 'were'} not written"
    if sys.stderr.isatty():
        sys.stderr.write("\x1b[?25h")  # a progress bar may have hidden the cursor
    with contextlib.suppress(OSError, ValueError):
        sys.stdout.flush()
        sys.stderr.write(
            f"\nsparq: error: {word}\n" if sys.stderr.isatty() else f"sparq: error: {word}\n"
        )
        sys.stderr.flush()
    os._exit(code)


def main() -> None:
    """Runs the `sparq` command line (the console script's entry point)."""
    for signum in _SIGNAL_EXITS:
        signal.signal(signum, _end_on_signal)
    warnings.showwarning = _show_warning
    code: int | str | None
    try:
        result = app(prog_name="sparq", standalone_mode=False)
        code = result if isinstance(result, int) else 0  # an int: typer.Exit's code
    except typer.TyperException as error:  # bad arguments, before any command runs
        code = _usage_error(error)
    except typer.Abort:
        typer.echo("sparq: error: aborted", err=True)
        code = 1
    except SystemExit as done:
        code = done.code
    _exit(code)


def _usage_error(error: typer.TyperException) -> int:
    """Prints a command-line usage error (a missing option, an unknown command) as one
    `sparq: error:` line naming the help to read; returns its exit code (2)."""
    format_message = getattr(error, "format_message", None)
    message = " ".join((format_message() if callable(format_message) else str(error)).split())
    if message:  # empty: the help was printed instead (a command given no arguments)
        context = getattr(error, "ctx", None)
        hint = f" (see '{context.command_path} -h')" if context is not None else ""
        typer.echo(f"sparq: error: {message}{hint}", err=True)
    return int(getattr(error, "exit_code", 2))


def _exit(code: int | str | None) -> None:
    """Ends the process with SystemExit's `code`.

    Skips the interpreter's teardown (`os._exit` after flushing the streams): unloading torch
    takes ~0.4 s, and every file is closed and renamed into place by now. SPARQ_FULL_EXIT=1
    exits normally instead (for tools that need atexit handlers or coverage data).
    """
    if isinstance(code, str):
        print(code, file=sys.stderr)
        code = 1
    if os.environ.get("SPARQ_FULL_EXIT") == "1":
        sys.exit(code or 0)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe, a closed stream
            stream.flush()
    os._exit(code or 0)
