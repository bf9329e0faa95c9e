"""Compressing a model folder: shards in, a folder of sparq shards out, the rest copied.

The selection (and its aliases) is resolved over the whole folder, then the shards are
compressed and written one at a time into a temporary folder beside the target, so memory stays
bounded as for one file: each shard `S` becomes a sparq file of the same name (a `.bin` shard
becomes the safetensors name Hugging Face gives it: `pytorch_model-00001-of-00002.bin` ->
`model-00001-of-00002.safetensors`); the index is rewritten so that its `weight_map` covers every
stored tensor and `total_size` counts their bytes; every other file is copied byte for byte. The
folder is renamed into place once whole; a failed gate leaves nothing.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sparqcli.config import Config
from sparqcli.errors import UsageError
from sparqcli.results import FileReport, FolderReport, TableReport

if TYPE_CHECKING:
    from sparqcli.compression import ProgressCallback
    from sparqcli.engine.options import EngineOptions
    from sparqcli.sources.folder import ShardedCheckpoint

FOLDER_SUFFIX = "-sparq"
INDEX_NAME = "model.safetensors.index.json"


def output_shard_name(name: str) -> str:
    """Returns the name a shard's sparq (or dense) file takes in an output folder.

    Safetensors shards keep their name; `.bin` ones take the safetensors name Hugging Face gives
    the same shard (`pytorch_model.bin` -> `model.safetensors`).
    """
    if name.endswith(".bin"):
        return name.removeprefix("pytorch_").removesuffix(".bin") + ".safetensors"
    return name


def plan_folder(
    checkpoint: ShardedCheckpoint,
    config: Config,
    target: Path,
) -> FolderReport:
    """Returns the planned folder: each shard's tables, after every check that could fail at
    write time. Raises SelectionError/UsageError for a config that does not fit, OutputError for
    keys that collide."""
    from sparqcli.compression import check_plan, plan_tables

    layout = checkpoint.layout
    if layout is None:
        raise ValueError("a folder to compress needs its layout")
    tables, skipped = plan_tables(checkpoint, config)
    check_plan(checkpoint.tensors, tables, "sparq", target)
    names = [output_shard_name(name) for name in layout.shards]
    clash = sorted(set(names) & set(layout.side_files))
    if clash:
        raise UsageError(
            f"{checkpoint.path}: shard output {clash[0]} would overwrite a file of the folder",
            path=checkpoint.path,
        )
    shards: list[FileReport] = []
    for shard in checkpoint.shards:
        mine = [table for table in tables if checkpoint.shard_of(table.key) == shard]
        too_small = [table for table in skipped if checkpoint.shard_of(table.key) == shard]
        size = shard.stat().st_size
        output = target / output_shard_name(shard.name)
        shards.append(FileReport(shard, output, "sparq", size, mine, skipped=too_small))
    copied = list(layout.side_files)
    input_bytes = sum(file.input_bytes for file in shards)
    input_bytes += sum(_size(layout.folder / name) for name in copied)
    if layout.index:
        input_bytes += _size(layout.folder / layout.index)
    report = FolderReport(
        input=checkpoint.path or layout.folder,
        output=target,
        shards=shards,
        index=INDEX_NAME if layout.index else None,
        copied=copied,
        left_out=list(layout.other_weights),
        input_bytes=input_bytes,
    )
    for note, table in tied_head_notes(layout.folder, tables):
        for shard in shards:
            if any(mine is table for mine in shard.tables):
                shard.notes.append(note)
        report.notes.append(note)
    if layout.other_weights:
        report.notes.append(
            f"not carried over: {', '.join(layout.other_weights)} (the same weights in the "
            "PyTorch layout; the safetensors shards were compressed)"
        )
    return report


def write_folder(
    checkpoint: ShardedCheckpoint,
    report: FolderReport,
    *,
    device: str,
    progress: ProgressCallback | None,
    options: EngineOptions,
    force: bool,
) -> None:
    """Compresses every shard of `report` and writes the output folder (whole or not at all).

    Fills in each shard's statistics and gate results and the folder's sizes. When a gate fails
    nothing is written (the report says so). Raises TableError for a table that cannot be
    compressed, InputError for an unreadable shard, OutputError when the folder cannot be written.
    """
    from sparqcli.compression import _compress_tables
    from sparqcli.digest import BackgroundSha256, sha256_file
    from sparqcli.format.writer import SourceInfo, write_compressed
    from sparqcli.sinks import atomic_folder, copy_side_file
    from sparqcli.sources.safetensors_file import read_safetensors_header

    started = time.perf_counter()
    layout = checkpoint.layout
    if layout is None:
        raise ValueError("a folder to write needs its layout")
    skipped = {alias for table in report.tables for alias in table.aliases}
    digests = BackgroundSha256(list(checkpoint.shards))
    weight_map: dict[str, str] = {}
    total_size = 0
    try:
        with atomic_folder(report.output, replace=force) as temp:
            for shard, file in zip(checkpoint.shards, report.shards, strict=True):
                shard_started = time.perf_counter()
                opened = checkpoint.shard(shard)
                compressed = _compress_tables(opened, file, device, progress, options)
                if report.gate_failures:
                    # Nothing will be written; the other shards are still measured.
                    file.seconds = time.perf_counter() - shard_started
                    checkpoint.release()
                    continue
                passthrough = {
                    key: opened.tensor(key)
                    for key in checkpoint.shard_keys[shard]
                    if key not in compressed and key not in skipped
                }
                name = output_shard_name(shard.name)
                if not passthrough and not compressed:
                    # Every tensor of the shard is stored elsewhere (an alias): no file, as
                    # the index could not list it.
                    file.output = None
                    file.notes.append(
                        f"{shard.name}: every tensor is an alias of a table stored in another "
                        "shard; no file written for it"
                    )
                    checkpoint.release()
                    continue
                stats = {table.key: table.stats for table in file.tables if table.stats}
                aliases = {table.key: table.aliases for table in file.tables if table.aliases}
                source = SourceInfo(shard.name, digests.result(shard))
                write_compressed(temp / name, passthrough, compressed, stats, source, {}, aliases)
                del passthrough, compressed
                checkpoint.release()
                header = read_safetensors_header(temp / name)
                header.pop("__metadata__", None)
                for key, entry in header.items():
                    weight_map[key] = name
                    total_size += entry["data_offsets"][1] - entry["data_offsets"][0]
                file.output_bytes = (temp / name).stat().st_size
                file.seconds = time.perf_counter() - shard_started
            if report.gate_failures:
                raise _NothingWritten
            if layout.index is not None:
                write_index(temp / INDEX_NAME, weight_map, total_size, layout.index_metadata)
            for name in layout.side_files:
                copy_side_file(layout.folder / name, temp / name)
    except _NothingWritten:
        report.seconds = time.perf_counter() - started
        return
    finally:
        digests.cancel()
    for file in report.shards:
        if file.output is not None:
            file.written = True
            file.output_sha256 = sha256_file(file.output)
    report.written = True
    report.output_bytes = _size(report.output)
    report.seconds = time.perf_counter() - started


class _NothingWritten(Exception):
    """A gate failed: the temporary folder is discarded."""


def write_index(
    path: Path, weight_map: Mapping[str, str], total_size: int, metadata: Mapping[str, Any]
) -> None:
    """Writes a Hugging Face index file: `metadata` (its `total_size` replaced) and the
    `weight_map`, keys sorted, as `save_pretrained` does. Raises OSError when it cannot."""
    document = {
        "metadata": {**metadata, "total_size": total_size},
        "weight_map": dict(sorted(weight_map.items())),
    }
    path.write_text(json.dumps(document, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _size(path: Path) -> int:
    """Returns the bytes of a file, or of every file under a folder (links followed)."""
    if path.is_dir():
        return sum(_size(child) for child in path.iterdir())
    try:
        return path.stat().st_size
    except OSError:
        return 0


# Module names of input embeddings in Hugging Face models (the key's last module).
_INPUT_EMBEDDINGS = (
    "embed_tokens",
    "word_embeddings",
    "wte",
    "shared",
    "embed_in",
    "tok_embeddings",
)


def tied_head_notes(folder: Path, tables: list[TableReport]) -> list[tuple[str, TableReport]]:
    """Returns a note for each compressed table that is the input embedding of a model whose
    `config.json` (in `folder`) says `tie_word_embeddings: true`: the output head is the same
    tensor, so it changes too (transformers leaves `lm_head.weight` out of a tied model's files)."""
    config = _model_config(folder / "config.json")
    if config is None or _without_head(config):
        return []
    sections = [config, *(v for v in config.values() if isinstance(v, dict))]
    tied = [section for section in sections if section.get("tie_word_embeddings") is True]
    if not tied:
        return []
    vocab = {section.get("vocab_size") for section in sections} - {None}
    notes: list[tuple[str, TableReport]] = []
    for table in tables:
        module = table.key.removesuffix(".weight").rpartition(".")[2]
        if module not in _INPUT_EMBEDDINGS:
            continue
        if vocab and table.shape[0] not in vocab:
            continue
        notes.append(
            (
                f"{table.key}: config.json ties the word embeddings (tie_word_embeddings: true); "
                "the output head is this table, so it changes too",
                table,
            )
        )
    return notes


def _without_head(config: dict[str, Any]) -> bool:
    """Returns True when `architectures` names only base models (`BertModel`, `LlamaModel`):
    they have no output head, whatever `tie_word_embeddings` says (its default is true)."""
    names = config.get("architectures")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        return False
    return all(n.endswith("Model") and "Head" not in n and "For" not in n for n in names)


def _model_config(path: Path) -> dict[str, Any] | None:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    return config if isinstance(config, dict) else None
