"""The `sparq` command line: a thin Typer layer over the library.

Each command parses its options, calls the library, renders the result, and turns the
project's errors into one line on stderr and an exit code, in one place (`_reporting_errors`):
0 done; 1 runtime failure; 2 usage or config error; 3 a quality gate failed.
torch is imported only inside commands, so `sparq --help` and `--version` answer fast.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import math
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from sparqcli import __version__
from sparqcli.errors import GateError, SparqError, UsageError
from sparqcli.threads import import_torch

app = typer.Typer(
    name="sparq",
    help="Compress the embedding tables of PyTorch checkpoints: block sparsity + per-row "
    "quantization, bit-exact with torch.ao's post_training_sparse_quantize.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


class OrderChoice(str, enum.Enum):
    sparsify_first = "sparsify-first"
    quantize_first = "quantize-first"


class FormatChoice(str, enum.Enum):
    sparq = "sparq"
    torch_ao = "torch-ao"


class DeviceChoice(str, enum.Enum):
    cpu = "cpu"
    cuda = "cuda"


# Options shared by several commands, declared once.
OrderOption = Annotated[
    OrderChoice | None, typer.Option("--order", help="Override the config's order.")
]
SetOption = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        metavar="KEY=VALUE",
        help="Override a config value, e.g. sparsity.level=0.7 (repeatable).",
    ),
]
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


class _Terminated(BaseException):
    """Raised in the main thread on SIGTERM, so cleanup (temporary files) runs as for Ctrl-C."""


_state: dict[str, bool] = {"debug": False}
F = TypeVar("F", bound=Callable[..., Any])


def _reporting_errors(command: F) -> F:
    """Wraps a command: project errors become `sparq: error: …` on stderr and their exit code."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except SparqError as error:
            if _state["debug"]:
                raise
            _print_error(str(error))
            raise typer.Exit(error.exit_code) from None
        except KeyboardInterrupt:
            _print_error("interrupted")
            raise typer.Exit(130) from None
        except _Terminated:
            _print_error("terminated")
            raise typer.Exit(143) from None

    return wrapper  # type: ignore[return-value]


def _print_error(message: str) -> None:
    typer.echo(f"sparq: error: {message}", err=True)


def _stdout_console() -> Any:
    from rich.console import Console

    width = None if sys.stdout.isatty() else int(os.environ.get("COLUMNS", "160"))
    return Console(width=width, soft_wrap=False)


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


@app.command("compress")
@_reporting_errors
def compress_command(
    checkpoints: Annotated[
        list[Path],
        typer.Argument(
            metavar="CKPT...",
            help="Checkpoints to compress (.pt, .pth, .bin, .safetensors).",
            show_default=False,
        ),
    ],
    config: Annotated[
        Path,
        typer.Option(
            "--config",
            "-c",
            metavar="CFG",
            help="YAML config: which tables, which settings.",
            show_default=False,
        ),
    ],
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", metavar="OUT", help="Output file (one input only)."),
    ] = None,
    out_dir: Annotated[
        Path | None, typer.Option("--out-dir", metavar="DIR", help="Write each output into DIR.")
    ] = None,
    order: OrderOption = None,
    overrides: SetOption = None,
    output_format: Annotated[
        FormatChoice,
        typer.Option(
            "--format",
            help="sparq: compact safetensors; torch-ao: the reference's quantized state dict (.pt).",
        ),
    ] = FormatChoice.sparq,
    report: Annotated[
        Path | None,
        typer.Option("--report", metavar="FILE.json", help="Also write the report as JSON."),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the report as JSON instead of the table.")
    ] = False,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run", help="Resolve and check everything, print the plan, write nothing."
        ),
    ] = False,
    force: ForceOption = False,
    quiet: QuietOption = False,
    device: Annotated[
        DeviceChoice, typer.Option("--device", help="Where the engine runs.")
    ] = DeviceChoice.cpu,
    trust_pickle: TrustPickleOption = False,
    key: KeyOption = None,
    threads: Annotated[
        int | None,
        typer.Option(
            "--threads",
            metavar="N",
            min=1,
            help="Threads to compress with. Default: $SPARQ_NUM_THREADS, else $OMP_NUM_THREADS, "
            "else the CPUs this process may use (CPU affinity, cgroup CPU quota).",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Compress the embedding tables of checkpoints.

    Example: sparq compress model.pt --config configs/default.yaml -o model.sparq.safetensors
    """
    from sparqcli.compress import compress

    kwargs: dict[str, Any] = dict(
        output=output,
        out_dir=out_dir,
        overrides=overrides or (),
        order=order.value if order else None,
        output_format=output_format.value,
        dry_run=dry_run,
        force=force,
        device=device.value,
        trust_pickle=trust_pickle,
        key=key,
        threads=threads,
    )
    if report is not None:
        _check_report_path(report, force)
    show_progress = not (quiet or as_json) and sys.stderr.isatty()
    try:
        if show_progress:
            with _progress_bars() as progress:
                result = compress(checkpoints, config, progress=progress, **kwargs)
        else:
            result = compress(checkpoints, config, **kwargs)
    except GateError as error:
        if error.report is not None:
            _emit(error.report, report, as_json, quiet)
        raise
    _emit(result, report, as_json, quiet)


def _check_report_path(report: Path, force: bool) -> None:
    if report.exists() and not force:
        raise UsageError(f"{report}: already exists; pass --force to replace it")
    if not report.parent.is_dir():
        raise UsageError(f"--report {report}: folder {report.parent} does not exist")


def _emit(result: Any, report: Path | None, as_json: bool, quiet: bool) -> None:
    from sparqcli import report as render

    data = result.to_dict()
    if report is not None:
        from sparqcli.checkpoint import atomic_output

        with atomic_output(report) as temp:
            temp.write_text(render.to_json(data) + "\n")
    if as_json:
        typer.echo(render.to_json(data))
    elif not quiet:
        render.print_report(_stdout_console(), render.compress_summary(result))


class _progress_bars:
    """A context manager giving a `(label, fraction)` callback that drives rich progress bars on stderr."""

    def __enter__(self) -> Callable[[str, float], None]:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            Progress,
            TaskProgressColumn,
            TextColumn,
            TimeElapsedColumn,
        )

        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TaskProgressColumn(),
            TimeElapsedColumn(),
            console=Console(stderr=True),
            transient=True,
        )
        self.progress.start()
        self.tasks: dict[str, Any] = {}

        def update(label: str, fraction: float) -> None:
            if label not in self.tasks:
                self.tasks[label] = self.progress.add_task(label, total=1.0)
            self.progress.update(self.tasks[label], completed=fraction)

        return update

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()


@app.command("inspect")
@_reporting_errors
def inspect_command(
    file: Annotated[
        Path,
        typer.Argument(
            metavar="FILE", help="A checkpoint or a compressed sparq file.", show_default=False
        ),
    ],
    as_json: JsonOption = False,
    trust_pickle: TrustPickleOption = False,
    key: KeyOption = None,
) -> None:
    """Show a checkpoint's tensors (candidate tables marked), or a compressed file's tables.

    Example: sparq inspect model.sparq.safetensors
    """
    import_torch()
    from sparqcli import report as render
    from sparqcli.checkpoint import open_checkpoint

    checkpoint = open_checkpoint(file, key=key, trust_pickle=trust_pickle)
    if checkpoint.is_sparq:
        from sparqcli.format import read_info

        info = read_info(file).to_dict()
        if as_json:
            typer.echo(render.to_json({"file": str(file), "compressed": True, **info}))
        else:
            render.print_report(
                _stdout_console(), render.compressed_table(str(file), info, file.stat().st_size)
            )
        return
    sizes = {name: _size(info.shape, info.dtype) for name, info in checkpoint.tensors.items()}
    if as_json:
        tensors = {
            name: {
                "shape": list(info.shape),
                "dtype": info.dtype,
                "bytes": sizes[name],
                "table": info.is_table,
            }
            for name, info in checkpoint.tensors.items()
        }
        typer.echo(
            render.to_json(
                {
                    "file": str(file),
                    "compressed": False,
                    "format": checkpoint.format,
                    "tensors": tensors,
                }
            )
        )
    else:
        render.print_report(
            _stdout_console(), render.checkpoint_table(str(file), checkpoint.tensors, sizes)
        )


def _size(shape: tuple[int, ...], dtype: str) -> int:
    import torch

    return math.prod(shape) * torch.empty((), dtype=getattr(torch, dtype)).element_size()


@app.command("decompress")
@_reporting_errors
def decompress_command(
    file: Annotated[
        Path, typer.Argument(metavar="FILE", help="A compressed sparq file.", show_default=False)
    ],
    output: Annotated[
        Path,
        typer.Option(
            "--output",
            "-o",
            metavar="OUT",
            help="Dense output: .safetensors or .pt.",
            show_default=False,
        ),
    ],
    force: ForceOption = False,
    quiet: QuietOption = False,
) -> None:
    """Decode a compressed file back to a dense checkpoint with the original keys and dtypes.

    Example: sparq decompress model.sparq.safetensors -o model.dense.safetensors
    """
    import_torch()
    from sparqcli.checkpoint import check_output_path, open_checkpoint
    from sparqcli.format import write_dense

    if output.suffix.lower() not in (".safetensors", ".pt", ".pth", ".bin"):
        raise UsageError(f"{output}: output must end in .safetensors, .pt, .pth or .bin")
    check_output_path(output, [file], force)
    checkpoint = open_checkpoint(file)
    if not checkpoint.is_sparq:
        raise UsageError(
            f"{file}: not a sparq-compressed file (no sparq metadata); nothing to decompress"
        )
    count = write_dense(file, output)
    if not quiet:
        typer.echo(f"{file} → {output}: {count} tensors, {output.stat().st_size} bytes")


@app.command("validate")
@_reporting_errors
def validate_command(
    config: Annotated[
        Path, typer.Argument(metavar="CFG", help="YAML config to check.", show_default=False)
    ],
    checkpoint: Annotated[
        Path | None,
        typer.Argument(
            metavar="[CKPT]",
            help="Also show what each rule matches in this checkpoint.",
            show_default=False,
        ),
    ] = None,
    overrides: SetOption = None,
    order: OrderOption = None,
    trust_pickle: TrustPickleOption = False,
    key: KeyOption = None,
) -> None:
    """Check a config and list every problem at once; with CKPT, show each rule's matches.

    Example: sparq validate configs/default.yaml model.pt
    """
    from sparqcli.config import load_config

    loaded = load_config(config, overrides or (), order.value if order else None)
    rules = len(loaded.layers)
    typer.echo(f"{config}: valid ({rules} rule{'s' if rules != 1 else ''}, order {loaded.order})")
    if checkpoint is None:
        return
    import_torch()
    from sparqcli import report as render
    from sparqcli.checkpoint import open_checkpoint
    from sparqcli.select import select_tables

    opened = open_checkpoint(checkpoint, key=key, trust_pickle=trust_pickle)
    selection = select_tables(loaded, opened.tensors, str(checkpoint), opened.module_types)
    render.print_report(_stdout_console(), render.selection_table(selection, str(checkpoint)))


def main() -> None:
    """Runs the `sparq` command line (the console script's entry point)."""

    def terminate(signum: int, frame: object) -> None:
        raise _Terminated()

    signal.signal(signal.SIGTERM, terminate)
    try:
        app(prog_name="sparq")
        code: int | str | None = 0
    except SystemExit as done:
        code = done.code
    except _Terminated:  # after the command returned: its outputs are complete
        _print_error("terminated")
        code = 143
    finally:
        # The command is over (outputs complete or removed); a signal from here on ends the
        # process plainly instead of printing a traceback.
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _exit_without_teardown(code)


def _exit_without_teardown(code: int | str | None) -> None:
    """Ends the process with SystemExit's `code`, skipping the interpreter's teardown.

    Unloading torch takes ~0.4 s at interpreter exit, a tenth of a 1 GiB compression. Every file
    is closed (and renamed into place) by now, so only the standard streams need flushing.
    """
    if isinstance(code, str):
        print(code, file=sys.stderr)
        code = 1
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe, a closed stream
            stream.flush()
    os._exit(code or 0)


if __name__ == "__main__":
    main()
