"""`inspect` and `decompress`: what a file holds, and a compressed file back to dense tensors."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from sparqcli.errors import UsageError
from sparqcli.results import CheckpointInspection, DecompressResult, TensorEntry

if TYPE_CHECKING:
    from sparqcli.config import Config
    from sparqcli.select import Selection

DENSE_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


def inspect(
    path: str | Path, *, key: str | None = None, trust_pickle: bool = False
) -> CheckpointInspection | CompressedFileInfo:  # noqa: F821
    """Returns what the file at `path` holds.

    A compressed sparq file gives its `CompressedFileInfo` (tables, settings, statistics, bytes);
    any other checkpoint a `CheckpointInspection` (every tensor, tables marked). `key` and
    `trust_pickle` are as for `compress`. Raises what opening a checkpoint raises (InputError,
    UnsafeInputError, UsageError) and FormatError for a corrupt sparq file.
    """
    from sparqcli.format.reader import read_info
    from sparqcli.format.sharded import is_sharded_output
    from sparqcli.sources import open_checkpoint

    path = Path(path)
    if is_sharded_output(path):
        from sparqcli.format.sharded import ShardedSparqFile

        with ShardedSparqFile(path) as folder:
            return folder.info
    checkpoint = open_checkpoint(path, key=key, trust_pickle=trust_pickle)
    if checkpoint.is_sparq:
        return read_info(path)
    entries = tuple(TensorEntry(name, info) for name, info in checkpoint.tensors.items())
    return CheckpointInspection(path, checkpoint.format, entries)


def decompress(src: str | Path, dst: str | Path, *, force: bool = False) -> DecompressResult:
    """Decodes the sparq file `src` and writes the dense state dict to `dst`, atomically.

    `dst` ending in `.safetensors` is written with safetensors, `.pt`/`.pth`/`.bin` with
    torch.save; original keys, shapes and dtypes. Raises UsageError for another suffix, an
    existing `dst` without `force`, or a `src` that is not a sparq file; InputError/FormatError
    for an unreadable or corrupt `src`; OutputError when `dst` cannot be written.
    """
    from sparqcli.format.reader import load
    from sparqcli.format.writer import save_safetensors
    from sparqcli.sinks import atomic_output, check_output_path, write_torch
    from sparqcli.sources import open_checkpoint

    src, dst = Path(src), Path(dst)
    if dst.suffix.lower() not in DENSE_SUFFIXES:
        raise UsageError(f"{dst}: output must end in .safetensors, .pt, .pth or .bin", path=dst)
    check_output_path(dst, [src], force)
    from sparqcli.format.sharded import is_sharded_output

    if not is_sharded_output(src) and not open_checkpoint(src).is_sparq:
        raise UsageError(
            f"{src}: not a sparq-compressed file (no sparq metadata); nothing to decompress",
            path=src,
        )
    state = load(src)
    if dst.suffix.lower() == ".safetensors":
        with atomic_output(dst) as temp:
            save_safetensors(temp, state, None)
    else:
        write_torch(dst, state)
    return DecompressResult(src, dst, len(state), dst.stat().st_size)


def selection(
    config: Config, path: str | Path, *, key: str | None = None, trust_pickle: bool = False
) -> Selection:
    """Returns what each rule of `config` matches in the checkpoint at `path`.

    Raises what opening the checkpoint raises, and SelectionError for a rule that matches
    nothing or a selected tensor that is not a table.
    """
    from sparqcli.select import select_tables
    from sparqcli.sources import open_checkpoint

    checkpoint = open_checkpoint(path, key=key, trust_pickle=trust_pickle)
    return select_tables(config, checkpoint.tensors, str(path), checkpoint.module_types)
