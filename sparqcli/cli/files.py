"""`sparq inspect` and `sparq decompress`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sparqcli.cli.app import (
    ForceOption,
    JsonOption,
    KeyOption,
    QuietOption,
    TrustPickleOption,
    WideOption,
    app,
    run_command,
    stdout_console,
)


@app.command("inspect")
@run_command
def inspect_command(
    file: Annotated[
        Path,
        typer.Argument(
            metavar="FILE",
            help="A checkpoint, a compressed sparq file, or a model folder.",
            show_default=False,
        ),
    ],
    as_json: JsonOption = False,
    wide: WideOption = False,
    suggest_config: Annotated[
        Path | None,
        typer.Option(
            "--suggest-config",
            metavar="FILE.yaml",
            help="Write a starter config that selects the candidate tables, with comments.",
        ),
    ] = None,
    force: ForceOption = False,
    trust_pickle: TrustPickleOption = False,
    key: KeyOption = None,
) -> None:
    """Show a checkpoint's tensors (candidate tables marked, and why), or a compressed file's tables.

    Example: sparq inspect model.pt --suggest-config model.yaml
    """
    import sparqcli
    from sparqcli import render

    if suggest_config is not None:
        written = sparqcli.suggest_config(
            file, suggest_config, force=force, key=key, trust_pickle=trust_pickle
        )
        count = len(written.config.layers)
        typer.echo(
            f"{suggest_config}: starter config selecting {count} table"
            f"{'s' if count != 1 else ''}; check it with: sparq validate {suggest_config} {file}",
            err=True,
        )
        inspection = written.inspection
    else:
        inspection = sparqcli.inspect(file, key=key, trust_pickle=trust_pickle)
    if as_json:
        typer.echo(render.to_json(inspection.to_dict()))
    else:
        render.print_report(stdout_console(), render.inspection(inspection, wide=wide))


@app.command("decompress")
@run_command
def decompress_command(
    file: Annotated[
        Path,
        typer.Argument(
            metavar="FILE", help="A compressed sparq file or folder.", show_default=False
        ),
    ],
    output: Annotated[
        Path,
        typer.Option(
            "--output",
            "-o",
            metavar="OUT",
            help="Dense output: .safetensors or .pt; a folder for a folder.",
            show_default=False,
        ),
    ],
    force: ForceOption = False,
    quiet: QuietOption = False,
) -> None:
    """Decode a compressed file back to a dense checkpoint with the original keys and dtypes.

    Example: sparq decompress model.sparq.safetensors -o model.dense.safetensors
    """
    import sparqcli

    result = sparqcli.decompress(file, output, force=force)
    if not quiet:
        typer.echo(f"{file} → {output}: {result.tensors} tensors, {result.output_bytes} bytes")
