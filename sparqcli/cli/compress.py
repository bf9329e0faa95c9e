"""`sparq compress`: checkpoints in, compressed files out, the summary on stdout."""

from __future__ import annotations

import enum
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from sparqcli.cli.app import (
    ForceOption,
    KeyOption,
    OrderOption,
    QuietOption,
    SetOption,
    TrustPickleOption,
    WideOption,
    app,
    run_command,
    show_notices,
    stdout_console,
)


class FormatChoice(str, enum.Enum):
    sparq = "sparq"
    torch_ao = "torch-ao"


class DeviceChoice(str, enum.Enum):
    cpu = "cpu"
    cuda = "cuda"


@app.command("compress")
@run_command
def compress_command(
    checkpoints: Annotated[
        list[Path],
        typer.Argument(
            metavar="CKPT...",
            help="Checkpoints to compress (.pt, .pth, .bin, .safetensors, a model folder or a "
            "DCP folder).",
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
        typer.Option(
            "--output",
            "-o",
            metavar="OUT",
            help="Output file, or folder for a model folder (one input only).",
        ),
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
    wide: WideOption = False,
    force: ForceOption = False,
    quiet: QuietOption = False,
    device: Annotated[
        DeviceChoice, typer.Option("--device", help="Where the engine runs.")
    ] = DeviceChoice.cpu,
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
    trust_pickle: TrustPickleOption = False,
    key: KeyOption = None,
) -> None:
    """Compress the embedding tables of checkpoints.

    Example: sparq compress model.pt --config configs/default.yaml -o model.sparq.safetensors
    """
    import sparqcli
    from sparqcli import render

    show_notices(quiet)
    show_progress = not (quiet or as_json) and sys.stderr.isatty()
    if sparqcli.world_size() > 1:  # started by torchrun: one run over every rank
        _check_distributed(checkpoints, output, out_dir, output_format, dry_run)
        result = sparqcli.compress_distributed(
            checkpoints[0],
            config,
            output=output,  # type: ignore[arg-type]
            overrides=overrides or (),
            order=order.value if order else None,
            force=force,
            trust_pickle=trust_pickle,
            key=key,
            report_path=report,
            device=device.value,
        )
        if result.rank == 0:  # one summary, from rank 0
            if as_json:
                typer.echo(render.to_json(result.to_dict()))
            elif not quiet:
                render.print_report(stdout_console(), render.compress_summary(result))
        result.raise_for_gates()
        return
    with _progress_bars() if show_progress else _no_progress() as progress:
        result = sparqcli.compress(
            checkpoints,
            config,
            output=output,
            out_dir=out_dir,
            overrides=overrides or (),
            order=order.value if order else None,
            output_format=output_format.value,  # type: ignore[arg-type]
            dry_run=dry_run,
            force=force,
            device=device.value,
            trust_pickle=trust_pickle,
            key=key,
            report_path=report,
            progress=progress,
            threads=threads,
        )
    if as_json:
        typer.echo(render.to_json(result.to_dict()))
    elif not quiet:
        render.print_report(stdout_console(), render.compress_summary(result, wide=wide))
    result.raise_for_gates()


def _check_distributed(
    checkpoints: list[Path],
    output: Path | None,
    out_dir: Path | None,
    output_format: FormatChoice,
    dry_run: bool,
) -> None:
    """Raises UsageError for options a torchrun run does not take."""
    from sparqcli.errors import UsageError

    if len(checkpoints) != 1:
        raise UsageError(f"under torchrun, compress takes one input, got {len(checkpoints)}")
    if output is None or out_dir is not None:
        raise UsageError("under torchrun, name the output folder with {opt:output}")
    if output_format is not FormatChoice.sparq:
        raise UsageError("under torchrun, the output format is sparq (a folder of shards)")
    if dry_run:
        raise UsageError("{opt:dry_run} runs in one process; leave out torchrun")


class _no_progress:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


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

        from sparqcli.render import shorten

        console = Console(stderr=True)
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TaskProgressColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=True,
        )
        self.progress.start()
        self.tasks: dict[str, Any] = {}
        # a long "file: table" label keeps both ends and leaves room for the bar, the percentage
        # and the time (about 40 columns)
        room = max(20, console.width - 40)

        def update(label: str, fraction: float) -> None:
            if label not in self.tasks:
                self.tasks[label] = self.progress.add_task(shorten(label, room), total=1.0)
            self.progress.update(self.tasks[label], completed=fraction)

        return update

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()
