"""`sparq validate`: every problem of a config; with a checkpoint, what each rule matches."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sparqcli.cli.app import (
    KeyOption,
    OrderOption,
    SetOption,
    TrustPickleOption,
    app,
    run_command,
    stdout_console,
)


@app.command("validate")
@run_command
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
    import sparqcli
    from sparqcli import render

    loaded = sparqcli.Config.from_yaml(config, overrides or (), order.value if order else None)
    # against a checkpoint, "valid" only once its rules select (else just the error)
    selection = (
        None
        if checkpoint is None
        else sparqcli.selection(loaded, checkpoint, key=key, trust_pickle=trust_pickle)
    )
    rules = len(loaded.layers)
    typer.echo(f"{config}: valid ({rules} rule{'s' if rules != 1 else ''}, order {loaded.order})")
    if selection is not None:
        render.print_report(stdout_console(), render.selection_table(selection, str(checkpoint)))
