"""`inspect` and `decompress`: what a file holds, and a compressed file back to dense tensors."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sparqcli.errors import InputError, UsageError
from sparqcli.results import CheckpointInspection, DecompressResult, TensorEntry

if TYPE_CHECKING:
    from sparqcli.config import Config
    from sparqcli.format.reader import CompressedFileInfo
    from sparqcli.select import Selection

DENSE_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")


def inspect(
    path: str | Path, *, key: str | None = None, trust_pickle: bool = False
) -> CheckpointInspection | CompressedFileInfo:
    """Returns what the file or model folder at `path` holds.

    A compressed sparq file gives its `CompressedFileInfo` (tables, settings, statistics, bytes),
    a folder of sparq shards a `CompressedFolderInfo` (the same, merged, and per shard); any other
    checkpoint a `CheckpointInspection` (every tensor; the candidate embedding tables marked,
    with the evidence: module type, name or shape). `key` and
    `trust_pickle` are as for `compress`. Raises what opening a checkpoint raises (InputError,
    UnsafeInputError, UsageError) and FormatError for a corrupt sparq file.
    """
    from sparqcli.candidates import find_candidates
    from sparqcli.format.reader import read_info
    from sparqcli.format.sharded import is_sharded_output
    from sparqcli.sources import open_checkpoint

    path = Path(path)
    if is_sharded_output(path):
        from sparqcli.format.sharded import ShardedSparqFile

        with ShardedSparqFile(path) as folder:
            return folder.info
    checkpoint = open_checkpoint(path, key=key, trust_pickle=trust_pickle)
    if checkpoint.is_sparq and path.is_dir():
        from sparqcli.format.folder import SparqFolder

        with SparqFolder(path) as folder:
            return folder.info
    if checkpoint.is_sparq:
        return read_info(path)
    found = find_candidates(checkpoint.tensors, checkpoint.module_types)
    entries = tuple(
        TensorEntry(name, info, found[name]) for name, info in checkpoint.tensors.items()
    )
    return CheckpointInspection(path, checkpoint.format, entries)


def decompress(src: str | Path, dst: str | Path, *, force: bool = False) -> DecompressResult:
    """Decodes the sparq file `src` and writes the dense state dict to `dst`, atomically.

    `dst` ending in `.safetensors` is written with safetensors, `.pt`/`.pth`/`.bin` with
    torch.save; original keys, shapes and dtypes. A folder of sparq shards made from a model
    folder is written to the folder `dst` in the same layout (see `decompress_folder`); the
    row-sharded folder of a distributed run to one dense file. Raises UsageError for another
    suffix, an existing `dst` without `force`, or a `src` that is not a sparq file;
    InputError/FormatError for an unreadable or corrupt `src`; OutputError when `dst` cannot be
    written.
    """
    from sparqcli.format.reader import load
    from sparqcli.format.sharded import is_sharded_output
    from sparqcli.format.writer import save_safetensors
    from sparqcli.sinks import atomic_output, check_output_path, write_torch
    from sparqcli.sources import open_checkpoint

    src, dst = Path(src), Path(dst)
    if not src.exists():  # before anything about the output
        raise InputError(f"{src}: no such file", path=src)
    if src.is_dir() and not is_sharded_output(src):
        if dst.suffix.lower() in DENSE_SUFFIXES:
            raise UsageError(
                f"{dst}: a folder decompresses to a folder; name a folder, not a file", path=dst
            )
        return decompress_folder(src, dst, force=force)
    if dst.suffix.lower() not in DENSE_SUFFIXES:
        raise UsageError(
            f"{dst}: output must end in .safetensors, .pt, .pth, .bin or .ckpt", path=dst
        )
    check_output_path(dst, [src], force)
    # sparq files are safetensors: a torch file is not one, whatever it holds
    if not is_sharded_output(src) and (
        src.suffix.lower() != ".safetensors" or not open_checkpoint(src).is_sparq
    ):
        raise UsageError(
            f"{src}: not a sparq-compressed file (no sparq metadata); nothing to decompress",
            path=src,
        )
    state = load(src)
    if dst.suffix.lower() == ".safetensors":
        with atomic_output(dst, replace=force) as temp:
            save_safetensors(temp, state, None)
    else:
        write_torch(dst, state, replace=force)
    return DecompressResult(src, dst, len(state), dst.stat().st_size)


def selection(
    config: Config | str | Path,
    path: str | Path,
    *,
    key: str | None = None,
    trust_pickle: bool = False,
) -> Selection:
    """Returns what each rule of `config` (a Config or a YAML path) matches in the checkpoint
    (or model folder) at `path`;
    each group of aliases (tied tables) is one selected table.

    Raises what opening the checkpoint raises; UsageError for a file sparq already compressed;
    SelectionError for a rule that matches nothing, a selected tensor that is not a table, or an
    alias excluded while another key of its group is selected.
    """
    from sparqcli.aliasing import select_with_aliases
    from sparqcli.compression import read_config
    from sparqcli.sources import open_checkpoint

    config = read_config(config)
    checkpoint = open_checkpoint(path, key=key, trust_pickle=trust_pickle)
    if checkpoint.is_sparq:  # its tensors are codes and scales, which no rule should select
        raise UsageError(
            f"{path}: is already compressed by sparq; check the config against the original "
            "checkpoint",
            path=Path(path),
        )
    return select_with_aliases(config, checkpoint, str(path))[0]


@dataclass(frozen=True)
class SuggestedConfig:
    """What `suggest_config` wrote: the starter config, its YAML text (with comments), where it
    was written, and the inspection it was built from."""

    config: Config
    text: str
    output: Path
    inspection: CheckpointInspection


def suggest_config(
    path: str | Path,
    output: str | Path,
    *,
    force: bool = False,
    key: str | None = None,
    trust_pickle: bool = False,
) -> SuggestedConfig:
    """Writes to `output`, atomically, a starter config selecting the candidate embedding
    tables of the checkpoint at `path`, each by its exact key, with comments saying why.

    Candidates smaller than the default `min_table_bytes`, and position embeddings, are listed
    in a comment and left out (unless every candidate is such). Raises UsageError for a
    compressed input, a checkpoint without candidates, or an existing `output` without
    `force`; what opening the checkpoint raises; OutputError when `output` cannot be written.
    """
    from sparqcli.sinks import atomic_output, check_output_path

    path, output = Path(path), Path(output)
    check_output_path(output, [path], force)
    found = inspect(path, key=key, trust_pickle=trust_pickle)
    if not isinstance(found, CheckpointInspection):
        raise UsageError(
            f"{path}: is already compressed by sparq; suggest a config for the original checkpoint",
            path=path,
        )
    config, text = starter_config(found)
    with atomic_output(output, replace=force) as temp:
        temp.write_text(text)
    return SuggestedConfig(config, text, output, found)


def starter_config(inspection: CheckpointInspection) -> tuple[Config, str]:
    """Returns the starter config for an inspected checkpoint and its YAML text with comments.

    Raises UsageError when the checkpoint has no candidate table.
    """
    import yaml

    from sparqcli.candidates import is_position_embedding
    from sparqcli.config import Config, Rule
    from sparqcli.select import exact_pattern
    from sparqcli.settings import DEFAULT_MIN_TABLE_BYTES

    candidates = inspection.candidates
    if not candidates:
        raise UsageError(
            f"{inspection.path}: no candidate embedding table (no module type, name or shape "
            "says embedding); write the rules by hand (`layers: [{match: KEY}]`)",
            path=inspection.path,
        )
    large = [entry for entry in candidates if entry.info.nbytes >= DEFAULT_MIN_TABLE_BYTES]
    chosen = large or list(candidates)
    small = [entry for entry in candidates if entry not in chosen]
    positional = [entry for entry in chosen if is_position_embedding(entry.key)]
    if len(positional) < len(chosen):  # kept dense, unless they are all there is
        chosen = [entry for entry in chosen if entry not in positional]
    else:
        positional = []
    config = Config(
        layers=[Rule(match=exact_pattern(entry.key)) for entry in chosen],
        source=str(inspection.path),
    )
    data = config.to_dict()

    def block(name: str) -> str:
        lines = [f"{name}:"]
        for field, value in data[name].items():
            line = f"  {field}: {json.dumps(value)}"
            note = _FIELD_NOTES.get(field)
            lines.append(f"{line:<32} # {note}" if note else line)
        return "\n".join(lines)

    lines = [
        f"# sparq starter config for {inspection.path.name}, written by",
        "# `sparq inspect --suggest-config`: its candidate embedding tables, found by evidence",
        "# (module type, name, shape), each selected by its exact key. Check, then compress:",
        "#",
        f"#   sparq validate CONFIG {inspection.path.name}",
        f"#   sparq compress {inspection.path.name} --config CONFIG --dry-run",
        f"version: {config.version}",
        f"order: {config.order}            # or quantize-first",
        "",
        "# Defaults for every selected table (the reference's defaults): half of the 1x4 blocks",
        "# pruned, 8-bit codes per row.",
        block("sparsity").rstrip(),
        block("quantization").rstrip(),
        "",
        f"{'min_table_bytes: ' + str(config.min_table_bytes):<32} # glob/regex rules skip smaller "
        "tables",
        "",
        "layers:",
    ]
    for entry, rule in zip(chosen, config.layers, strict=True):
        info = entry.info
        lines.append(
            f"  # {'x'.join(map(str, info.shape))} {info.dtype}, {_size(info.nbytes)}: "
            f"{entry.candidate.why}"
        )
        lines.append(f"  - match: {json.dumps(rule.match)}")
    for title, left_dense in (
        (
            "# Position embeddings, left dense: small and sensitive (configs/default.yaml "
            "excludes\n# them too; add a rule to compress one):",
            positional,
        ),
        (
            "# Candidates smaller than min_table_bytes, left dense (add a rule to compress one):",
            small,
        ),
    ):
        if left_dense:
            lines += ["", *title.split("\n")]
            lines += [
                f"#   {entry.key}: {'x'.join(map(str, entry.info.shape))} {entry.info.dtype}, "
                f"{_size(entry.info.nbytes)}"
                for entry in left_dense
            ]
    lines += [
        "",
        "# Quality gates (a failing table: exit 3, nothing written), off until you set them:",
        "# gates:",
        "#   max_rel_error: 0.5          # relative L2 error of a table",
        "#   min_row_cosine: 0.9         # worst row's cosine similarity",
        "",
    ]
    text = "\n".join(lines)
    if Config.from_dict(yaml.safe_load(text), config.source) != config:
        raise RuntimeError("the starter config's YAML does not read back to its config")
    return config, text


_FIELD_NOTES = {
    "level": "fraction of blocks pruned, 0..1 (0: no pruning)",
    "block_shape": "[rows, columns]",
    "zeros_per_block": "null: every value of a pruned block",
    "norm": "blocks ranked by mean |x| (L1) or x^2 (L2)",
    "bits": "bits per code",
    "scale_dtype": "float32 | float16 | bfloat16 (per-row scale and zero point)",
}


def _size(count: int) -> str:
    from sparqcli.render import human_bytes

    return human_bytes(count)


def decompress_folder(src: Path, dst: Path, *, force: bool = False) -> DecompressResult:
    """Decodes the folder of sparq shards `src` into the dense model folder `dst`, atomically.

    Each shard becomes a dense safetensors file of the same name (metadata `format: pt`, as
    `save_pretrained` writes), the index is rewritten for the dense keys, every other file is
    copied: `transformers`' `from_pretrained` loads `dst` as it loaded the original folder.
    Shards are decoded one at a time. Raises UsageError for a `dst` that exists without `force`
    or is an input, or a `src` without sparq shards; InputError/FormatError for an unreadable or
    corrupt shard; OutputError when `dst` cannot be written.
    """
    from sparqcli.folder_compression import INDEX_NAME, write_index
    from sparqcli.format.folder import SparqFolder
    from sparqcli.format.writer import save_safetensors
    from sparqcli.sinks import atomic_folder, check_output_folder, copy_side_file
    from sparqcli.sources.folder import find_layout

    check_output_folder(dst, [src], force)
    layout = find_layout(src)
    tensors = 0
    with SparqFolder(src) as folder:
        if not folder.info.is_sparq:
            raise UsageError(
                f"{src}: no sparq-compressed shard (no sparq metadata); nothing to decompress",
                path=src,
            )
        weight_map: dict[str, str] = {}
        total_size = 0
        with atomic_folder(dst, replace=force) as temp:
            for file in folder.shard_files():
                name = Path(file.path).name
                state = file.state_dict()
                save_safetensors(temp / name, state, {"format": "pt"})
                for key, value in state.items():
                    weight_map[key] = name
                    total_size += value.numel() * value.element_size()
                tensors += len(state)
                del state
            if layout.index is not None:
                write_index(temp / INDEX_NAME, weight_map, total_size, layout.index_metadata)
            for name in layout.side_files:
                copy_side_file(src / name, temp / name)
    size = sum(path.stat().st_size for path in dst.rglob("*") if path.is_file())
    return DecompressResult(src, dst, tensors, size)
