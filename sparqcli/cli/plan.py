"""`sparq plan`: choose every table's settings for a byte budget or an error target."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from sparqcli.cli.app import (
    ForceOption,
    KeyOption,
    QuietOption,
    SetOption,
    TrustPickleOption,
    WideOption,
    app,
    run_command,
    show_notices,
    stdout_console,
)


@app.command("plan")
@run_command
def plan_command(
    checkpoints: Annotated[
        list[Path],
        typer.Argument(
            metavar="CKPT...",
            help=(
                "Checkpoints to plan for, their tables together (one budget). The plan names "
                "every table, so compress several files with it only as one model folder; "
                "plan separate files one by one."
            ),
            show_default=False,
        ),
    ],
    config: Annotated[
        Path,
        typer.Option(
            "--config",
            "-c",
            metavar="BASE.yaml",
            help="Base config: its rules select the tables; a plan: section narrows the candidates.",
            show_default=False,
        ),
    ],
    output: Annotated[
        Path,
        typer.Option(
            "--output",
            "-o",
            metavar="PLAN.yaml",
            help="Where to write the plan (a sparq config).",
            show_default=False,
        ),
    ],
    budget: Annotated[
        float | None,
        typer.Option(
            "--budget",
            metavar="R",
            help="Compressed bytes <= R x the tables' bytes; least error.",
        ),
    ] = None,
    max_error: Annotated[
        float | None,
        typer.Option("--max-error", metavar="E", help="Model error E <= this; fewest bytes."),
    ] = None,
    plot: Annotated[
        Path | None,
        typer.Option(
            "--plot",
            metavar="FILE.png|FILE.svg",
            help="Draw the error-vs-bytes frontier (matplotlib).",
        ),
    ] = None,
    row_weights: Annotated[
        Path | None,
        typer.Option(
            "--row-weights",
            metavar="FILE.safetensors",
            help="One non-negative weight per row of each table (e.g. access counts).",
        ),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the plan as JSON instead of the tables.")
    ] = False,
    overrides: SetOption = None,
    sample_rows: Annotated[
        int | None,
        typer.Option(
            "--sample-rows",
            metavar="N",
            help="Estimate errors on about N rows of tables larger than 2N rows (default: automatic).",
        ),
    ] = None,
    force: ForceOption = False,
    quiet: QuietOption = False,
    wide: WideOption = False,
    trust_pickle: TrustPickleOption = False,
    key: KeyOption = None,
) -> None:
    """Choose every table's bits and sparsity for a byte budget or an error target.

    Example: sparq plan model.pt --config configs/default.yaml --budget 0.1 -o plan.yaml
    """
    import sparqcli
    from sparqcli import render
    from sparqcli.cli.compress import _no_progress, _progress_bars

    if plot is not None:
        from sparqcli.planning.run import plan_inputs

        inputs = plan_inputs(checkpoints, config, row_weights)
        render.check_plot_path(plot, inputs=inputs, force=force, plan_path=output)
    show_notices(quiet)
    show_progress = not (quiet or as_json) and sys.stderr.isatty()
    with _progress_bars() if show_progress else _no_progress() as progress:
        result = sparqcli.plan(
            checkpoints,
            config,
            budget=budget,
            max_error=max_error,
            row_weights=row_weights,
            output=output,
            force=force,
            overrides=overrides or (),
            trust_pickle=trust_pickle,
            key=key,
            sample_rows=sample_rows,
            progress=progress,
        )
    if plot is not None:
        render.plan_plot(result, plot, force=force)
    if as_json:
        typer.echo(render.to_json(result.to_dict()))
    elif not quiet:
        render.print_report(stdout_console(), render.plan_summary(result, wide=wide))
        typer.echo(f"wrote {output}" + (f" and {plot}" if plot is not None else ""))
