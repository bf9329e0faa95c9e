"""Compression, the library's entry points: files in and out (`compress`), or a state dict in
memory (`compress_state_dict`). Both read, select, run the engine table by table, gather
statistics and check gates the same way; they print nothing and return what they did.
"""

from __future__ import annotations

import json
import resource
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from sparqcli.config import Config, config_files
from sparqcli.digest import BackgroundSha256, sha256_file
from sparqcli.errors import OutputError, SparqError, TableError, UsageError
from sparqcli.parallel import resolve_threads
from sparqcli.results import CompressReport, FileReport, SkippedTable, TableReport

if TYPE_CHECKING:
    import torch

    from sparqcli.engine.options import EngineOptions
    from sparqcli.engine.reduce import TablePart
    from sparqcli.engine.stats import TableStats
    from sparqcli.engine.table import CompressedTable
    from sparqcli.sources import Checkpoint

OutputFormat = Literal["sparq", "torch-ao"]
OUTPUT_FORMATS: tuple[str, ...] = ("sparq", "torch-ao")
_SUFFIX = {"sparq": ".sparq.safetensors", "torch-ao": ".torchao.pt"}

ProgressCallback = Callable[[str, float], None]
"""Called with a description (`model.pt: emb.weight`) and the fraction of that table done."""


def compress(
    inputs: str | Path | Sequence[str | Path],
    config: Config | str | Path,
    *,
    output: str | Path | None = None,
    out_dir: str | Path | None = None,
    overrides: Sequence[str] = (),
    order: str | None = None,
    output_format: OutputFormat = "sparq",
    dry_run: bool = False,
    force: bool = False,
    device: str = "cpu",
    trust_pickle: bool = False,
    key: str | None = None,
    report_path: str | Path | None = None,
    progress: ProgressCallback | None = None,
    options: EngineOptions | None = None,
    threads: int | None = None,
) -> CompressReport:
    """Compresses the selected tables of each input checkpoint and returns the report.

    `config` is a Config or a YAML path (then `overrides` (`key.path=value`) and `order`
    apply). Each input is written to `output`, into `out_dir`, or beside itself. A dry run
    resolves and checks everything that could fail later and writes nothing. A file whose
    tables fail a quality gate is not written: the report says so (`report.gate_failures`,
    `report.raise_for_gates()`). With `report_path`, the report is also written there as JSON
    (checked before any work; replaced only with `force`; not in a dry run). With several
    inputs, each is opened and its tables selected before the first is compressed, so an
    unreadable input or a rule that matches nothing in one writes nothing; an error while
    compressing (a table with NaN values) stops the run and names the outputs already written
    (they stay). `threads` is how
    many threads compress on the CPU; None: SPARQ_NUM_THREADS, else OMP_NUM_THREADS, else the
    CPUs this process may use (CPU affinity and cgroup quota; see sparqcli.parallel); while a
    table is compressed on the CPU, torch's process-wide thread count is 1 (each worker runs
    torch single-threaded; restored after).
    Raises ConfigError/UsageError/SelectionError/UnsafeInputError (exit 2) for bad usage,
    InputError/TableError/OutputError (exit 1) for bad data or failed I/O.
    """
    started = time.perf_counter()
    sources = input_paths(inputs)
    if output_format not in OUTPUT_FORMATS:
        raise UsageError(
            f"{{opt:output_format}}: must be sparq or torch-ao, got {output_format!r}",
            option="output_format",
        )
    inputs = [*sources, *config_files(config)]  # never overwritten by an output or the report
    config = read_config(config, overrides, order)
    check_device(device)
    thread_count, _ = resolve_threads(threads)
    targets = plan_outputs(
        sources,
        Path(output) if output is not None else None,
        Path(out_dir) if out_dir is not None else None,
        output_format,
    )
    # The sparq format records each input's sha256: hashed from here on, beside torch's import
    # and the engine, instead of after them. (A folder hashes its shards itself.)
    files = [source for source in sources if not is_model_folder(source)]
    digests = BackgroundSha256(files) if output_format == "sparq" and not dry_run else None
    try:
        from sparqcli.engine.options import EngineOptions
        from sparqcli.sinks import check_output_folder, check_output_path, check_report_path

        options = replace(options or EngineOptions.from_environment(), threads=thread_count)
        check_settings(config, output_format)  # beside the hashing started above
        for source, target in zip(sources, targets, strict=True):
            if is_model_folder(source):
                check_output_folder(target, inputs, force)
            else:
                check_output_path(target, inputs, force)
            if output is not None:
                check_output_name(target, output_format, folder=is_model_folder(source))
        if report_path is not None:
            check_report_path(Path(report_path), force, inputs, targets)
        if len(sources) > 1 and not dry_run:
            # Every input is opened and its tables selected (a dry run of each) before the first
            # is compressed: an unreadable input or a rule that matches nothing in it stops the
            # run before any output is written.
            preflight = CompressReport(config, [], True, device, threads=thread_count)
            for source, target in zip(sources, targets, strict=True):
                _compress_input(
                    source,
                    target,
                    config,
                    preflight,
                    key,
                    trust_pickle,
                    output_format,
                    force,
                    None,
                    options,
                    None,
                )
        report = CompressReport(config, [], dry_run, device, threads=thread_count)
        written: list[Path] = []
        for source, target in zip(sources, targets, strict=True):
            try:
                if _compress_input(
                    source,
                    target,
                    config,
                    report,
                    key,
                    trust_pickle,
                    output_format,
                    force,
                    progress,
                    options,
                    digests,
                ):
                    written.append(target)
            except SparqError as error:
                if written:  # the error stops the run, and these outputs stay
                    names = ", ".join(str(path) for path in written)
                    error.append(f"; written before this error: {names}")
                raise
    finally:
        if digests is not None:
            digests.cancel()
    report.seconds = time.perf_counter() - started
    report.peak_memory_bytes = peak_memory_bytes()
    if report_path is not None and not dry_run:  # a dry run writes nothing (its path is checked)
        report.save_json(report_path, force=force)
    return report


def _compress_input(
    source: Path,
    target: Path,
    config: Config,
    report: CompressReport,
    key: str | None,
    trust_pickle: bool,
    output_format: OutputFormat,
    force: bool,
    progress: ProgressCallback | None,
    options: EngineOptions,
    digests: BackgroundSha256 | None,
) -> bool:
    """Compresses one input of `compress` into `target`, adding its results to `report`;
    returns whether `target` was written (not in a dry run, nor when a gate failed)."""
    from sparqcli.sources import open_checkpoint

    if is_model_folder(source):
        if key is not None:
            raise UsageError(
                f"{source}: {{opt:key}} applies to .pt files; a model folder's shards are flat",
                path=source,
            )
        _compress_folder(
            source, target, config, report, trust_pickle, output_format, force, progress, options
        )
        return not report.dry_run and not report.folders[-1].gate_failures
    file_started = time.perf_counter()
    checkpoint = open_checkpoint(source, key=key, trust_pickle=trust_pickle)
    if checkpoint.is_sparq:
        raise UsageError(
            f"{source}: is already compressed by sparq; compress the original checkpoint",
            path=source,
        )
    file = _plan(
        checkpoint, config, output_format, target, input_size(source), torch_ao_possible=True
    )
    from sparqcli.folder_compression import tied_head_notes

    # A model file inside its Hugging Face folder: config.json may say the head is tied.
    for note, table in tied_head_notes(source.parent, file.tables):
        if output_format == "torch-ao" and not table.aliases:
            note = (
                f"{table.key}: config.json ties the word embeddings (tie_word_embeddings: true); "
                "torch-ao output converts this embedding only, and the output head keeps its "
                "dense weights, as in torch.ao's converted model"
            )
        file.notes.append(note)
    report.files.append(file)
    if report.dry_run:
        return False
    tables = _compress_tables(checkpoint, file, report.device, progress, options)
    if not file.gate_failures:
        _write(checkpoint, file, tables, digests, replace=force)
    file.seconds = time.perf_counter() - file_started
    return not file.gate_failures


class CompressedStateDict:
    """The result of `compress_state_dict`: compressed tables and everything else, in memory.

    `tables` maps each compressed key to its `CompressedTable`; `aliases` maps a table's key to
    the other keys that held the same values (tied weights: stored once); `passthrough` holds the
    other tensors unchanged; `report` holds each table's settings, statistics and gate results.
    """

    def __init__(
        self,
        tables: dict[str, CompressedTable],
        passthrough: dict[str, torch.Tensor],
        report: FileReport,
    ) -> None:
        self.tables = tables
        self.passthrough = passthrough
        self.report = report
        self.aliases = {table.key: tuple(table.aliases) for table in report.tables if table.aliases}

    def decode(self) -> dict[str, torch.Tensor]:
        """Returns the dense state dict (keys sorted): tables decoded to their original dtype,
        pruned values exactly 0.0, an alias the same tensor as its table — the same tensors
        `sparqcli.load` gives for the saved file."""
        state = {key: table.decode() for key, table in self.tables.items()}
        for key, names in self.aliases.items():
            state.update({name: state[key] for name in names})
        state.update(self.passthrough)
        return {key: state[key] for key in sorted(state)}

    def save(self, path: str | Path, *, force: bool = False) -> Path:
        """Writes the tables and tensors as a sparq file at `path`, atomically; returns `path`.

        Raises UsageError when `path` exists and `force` is not set, or its folder is missing or
        not writable; OutputError when writing fails.
        """
        from sparqcli.format.writer import write_compressed
        from sparqcli.sinks import atomic_output, check_output_path

        path = Path(path)
        check_output_name(path, "sparq")
        check_output_path(path, [], force)
        stats = {table.key: table.stats for table in self.report.tables if table.stats}
        with atomic_output(path, replace=force) as temp:
            write_compressed(temp, self.passthrough, self.tables, stats, aliases=self.aliases)
        return path


def compress_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    config: Config,
    *,
    device: str = "cpu",
    progress: ProgressCallback | None = None,
    options: EngineOptions | None = None,
    threads: int | None = None,
) -> CompressedStateDict:
    """Returns the tables of `state_dict` that `config` selects, compressed, with the rest.

    Decoding the result gives exactly what `compress` writes for the same tensors and config.
    Tables that fail a gate are still returned; their failures are in `result.report`.
    `threads` as for `compress`.
    Raises SelectionError/UsageError (exit 2) for a config that does not fit the state dict,
    TableError (exit 1) for a table that cannot be compressed (NaN/Inf).
    """
    import torch

    from sparqcli.engine.options import EngineOptions
    from sparqcli.sources.torch_file import StateDictCheckpoint

    if not isinstance(config, Config):
        raise UsageError(f"config: must be a sparqcli.Config, got {type(config).__name__}")
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise UsageError(f"state dict entry '{key}' is not a tensor ({type(value).__name__})")
        if value.is_meta:
            raise UsageError(
                f"state dict entry '{key}' is a meta tensor: it holds no values (load the "
                "model's weights first)"
            )
    check_device(device)
    checkpoint = StateDictCheckpoint(None, "state_dict", state_dict)
    input_bytes = sum(info.nbytes for info in checkpoint.tensors.values())
    file = _plan(checkpoint, config, "sparq", None, input_bytes)
    options = options or EngineOptions.from_environment()
    options = replace(options, threads=resolve_threads(threads)[0])
    tables = _compress_tables(checkpoint, file, device, progress, options)
    tied = {alias for table in file.tables for alias in table.aliases}
    passthrough = {
        key: value for key, value in state_dict.items() if key not in tables and key not in tied
    }
    return CompressedStateDict(tables, passthrough, file)


def _compress_folder(
    source: Path,
    target: Path,
    config: Config,
    report: CompressReport,
    trust_pickle: bool,
    output_format: str,
    force: bool,
    progress: ProgressCallback | None,
    options: EngineOptions,
) -> None:
    """Compresses the model folder `source` into the folder `target`; adds it to `report`."""
    from sparqcli.folder_compression import plan_folder, write_folder
    from sparqcli.sources.folder import open_folder

    if output_format != "sparq":
        raise UsageError(
            f"{source}: {{opt:output_format=torch-ao}} writes one .pt file; a model folder is "
            "compressed to the sparq format",
            path=source,
        )
    checkpoint = open_folder(source, trust_pickle=trust_pickle)
    if checkpoint.is_sparq:
        raise UsageError(
            f"{source}: is already compressed by sparq; compress the original checkpoint",
            path=source,
        )
    folder = plan_folder(checkpoint, config, target)
    report.folders.append(folder)
    report.files.extend(folder.shards)
    if not report.dry_run:
        write_folder(
            checkpoint,
            folder,
            device=report.device,
            progress=progress,
            options=options,
            force=force,
        )


def input_paths(inputs: object) -> list[Path]:
    """Returns the checkpoint paths `inputs` names (a path, or a sequence of them). Raises
    UsageError for none, and for what is not a path (a state dict in memory is compressed by
    `compress_state_dict`)."""
    if isinstance(inputs, Mapping):
        raise UsageError(
            "inputs: a state dict in memory, not a checkpoint path; compress it with "
            "sparqcli.compress_state_dict"
        )
    items = [inputs] if isinstance(inputs, (str, Path)) else inputs
    try:
        sources = [Path(item) for item in items]  # type: ignore[union-attr]
    except TypeError:
        raise UsageError(
            f"inputs: must be a checkpoint path or a list of them, got {type(inputs).__name__}"
        ) from None
    if not sources:
        raise UsageError("no input checkpoint given")
    return sources


def read_config(
    config: Config | str | Path, overrides: Sequence[str] = (), order: str | None = None
) -> Config:
    """Returns `config` as a Config: read from its YAML path (with `overrides` and `order`), or
    as given. Raises what `Config.from_yaml` raises, and UsageError for anything else, or for
    overrides given with a loaded Config."""
    if isinstance(config, (str, Path)):
        return Config.from_yaml(config, overrides, order)
    if not isinstance(config, Config):
        raise UsageError(f"config: must be a Config or a YAML path, got {type(config).__name__}")
    if overrides or order:
        raise UsageError("overrides and order apply to a config path, not a loaded Config")
    return config


def plan_outputs(
    inputs: Sequence[Path], output: Path | None, out_dir: Path | None, output_format: str
) -> list[Path]:
    """Returns the output path of each input (a folder for a model folder). Raises UsageError
    for a conflicting plan."""
    if output is not None and out_dir is not None:
        raise UsageError("{opt:output} and {opt:out_dir} exclude each other", option="output")
    if output is not None and len(inputs) != 1:
        raise UsageError(
            f"{{opt:output}} takes one input, got {len(inputs)}; use {{opt:out_dir}} for several",
            option="output",
        )
    if output is not None:
        return [output]
    suffix = _SUFFIX[output_format]
    outputs = []
    for source in inputs:
        if is_model_folder(source):
            from sparqcli.folder_compression import FOLDER_SUFFIX

            # A model folder gives a folder `<name>-sparq` (`.` is named by its real name).
            folder = source if source.name not in ("", ".", "..") else source.resolve()
            parent = out_dir if out_dir is not None else folder.parent
            outputs.append(parent / (folder.name + FOLDER_SUFFIX))
        else:
            name = source.resolve().name if source.name in ("", ".", "..") else source.name
            stem = name if source.is_dir() else name.removesuffix(source.suffix)
            outputs.append((out_dir if out_dir is not None else source.parent) / (stem + suffix))
    seen: dict[Path, Path] = {}
    for source, target in zip(inputs, outputs, strict=True):
        if target in seen:
            raise UsageError(
                f"{seen[target]} and {source} would both be written to {target}", path=target
            )
        seen[target] = source
    if out_dir is not None and not out_dir.is_dir():
        what = "not a folder" if out_dir.exists() else "no such folder"
        raise UsageError(f"{{opt:out_dir}} {out_dir}: {what}", path=out_dir)
    return outputs


def check_output_name(output: Path, output_format: str, *, folder: bool = False) -> None:
    """Checks that `output`'s name says what is written there: a `.safetensors` file for the
    sparq format, a torch file (`.pt`, `.pth`, `.bin`, `.ckpt`) for torch-ao, and no such suffix
    for a folder (`folder`: the input is a model folder). Raises UsageError otherwise (readers,
    sparq's included, tell the kind by the name)."""
    from sparqcli.sources import TORCH_SUFFIXES

    suffix = output.suffix.lower()
    if folder:
        if suffix in (".safetensors", *TORCH_SUFFIXES):
            raise UsageError(
                f"{{opt:output}} {output}: a model folder is written as a folder; give a name "
                f"without the {suffix} suffix",
                path=output,
                option="output",
            )
        return
    wanted = (".safetensors",) if output_format == "sparq" else TORCH_SUFFIXES
    if suffix not in wanted:
        names = " or ".join(wanted)
        raise UsageError(
            f"{{opt:output}} {output}: the {output_format} format writes a {names} file; "
            f"end the name with {wanted[0]}",
            path=output,
            option="output",
        )


def check_device(device: str) -> None:
    """Checks that `device` is usable. Raises UsageError for an unknown or absent device."""
    if device not in ("cpu", "cuda"):
        raise UsageError(f"{{opt:device}}: must be cpu or cuda, got {device!r}", option="device")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            build = "with" if torch.version.cuda else "without"
            raise UsageError(
                "{opt:device=cuda}: no CUDA device is available "
                f"(this torch {torch.__version__} was built {build} CUDA)"
            )


def check_settings(config: Config, output_format: str) -> None:
    """Checks, before any file is read, that every rule's settings fit the output format.

    Raises UsageError for a width the torch-ao format cannot hold (it stores 8 and 4 bits).
    """
    from sparqcli.format.torch_ao import torch_ao_problem

    if output_format != "torch-ao":
        return
    for rule in config.resolved_rules:
        problem = torch_ao_problem(
            f"layers[{rule.index}].quantization.bits", rule.quantization.bits
        )
        if problem is not None:
            raise UsageError(problem)


def is_model_folder(source: Path) -> bool:
    """Returns True for a folder compressed into a folder (a Hugging Face model folder); a DCP
    checkpoint folder is one checkpoint, compressed into one file."""
    from sparqcli.sources import is_dcp_folder

    return source.is_dir() and not is_dcp_folder(source)


def input_size(source: Path) -> int:
    """Returns the bytes of an input: a file's size, or the sum over a folder's files."""
    if source.is_dir():
        return sum(entry.stat().st_size for entry in source.iterdir() if entry.is_file())
    return source.stat().st_size


def peak_memory_bytes() -> int:
    """Returns this process's peak resident memory so far, in bytes."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _plan(
    checkpoint: Checkpoint,
    config: Config,
    output_format: str,
    target: Path | None,
    input_bytes: int,
    torch_ao_possible: bool = False,
) -> FileReport:
    """Returns the planned file: its selected tables, after every check that could fail at
    write time (so that a dry run fails where the real run would, before any work; none for an
    in-memory result, `target` None, whose `save` says what it cannot write).
    `torch_ao_possible`: whether the torch-ao format could be written instead (a torch file)."""
    # torch.ao converts the embeddings it is given: a tied alias no rule selects (a model's
    # output head) keeps its dense weight, as in the reference's state dict
    tables, skipped = plan_tables(
        checkpoint, config, selected_aliases_only=output_format == "torch-ao"
    )
    if target is not None:
        check_plan(checkpoint.tensors, tables, output_format, target, torch_ao_possible)
    return FileReport(checkpoint.path, target, output_format, input_bytes, tables, skipped=skipped)


def plan_tables(
    checkpoint: Checkpoint, config: Config, *, selected_aliases_only: bool = False
) -> tuple[list[TableReport], list[SkippedTable]]:
    """Returns the tables `config` selects in `checkpoint`, each alias group as one table, and
    the tables its glob and regex rules skipped as too small. With `selected_aliases_only`, a
    table's aliases are only the keys that rules select themselves (the others stay tensors of
    their own).

    Raises SelectionError for a selection problem (see `select_tables` and `apply_aliases`),
    InputError when a tensor compared for aliases cannot be read.
    """
    from sparqcli.aliasing import select_with_aliases

    selection, aliases = select_with_aliases(config, checkpoint, checkpoint.name)
    if selected_aliases_only:
        won = {key for match in selection.matches for key in match.won}
        aliases = {table: tuple(k for k in keys if k in won) for table, keys in aliases.items()}
    tables = [
        TableReport(
            key=selected.key,
            shape=selected.info.shape,
            dtype=selected.info.dtype,
            rule=selected.rule,
            order=config.order,
            bytes_before=selected.info.nbytes,
            aliases=list(aliases.get(selected.key, ())),
        )
        for selected in selection.tables
    ]
    return tables, list(selection.skipped)


def check_plan(
    tensors: Mapping[str, Any],
    tables: list[TableReport],
    output_format: str,
    target: Path | None,
    torch_ao_possible: bool = False,
) -> None:
    """Checks that the planned `tables` (and the other keys of `tensors`) can be written in
    `output_format`. Raises OutputError for a key collision, UsageError for a table the torch-ao
    format cannot hold or a tensor a sparq file cannot (a quantized, complex128 or sparse one;
    the message names the torch-ao format where `torch_ao_possible`)."""
    from sparqcli.dtypes import BY_NAME
    from sparqcli.format.spec import checkpoint_collision

    table_keys = {table.key: table for table in tables}
    alias_keys = {alias for table in tables for alias in table.aliases}
    passthrough = [key for key in tensors if key not in table_keys and key not in alias_keys]
    if output_format == "torch-ao":
        from sparqcli.format.torch_ao import check_torch_ao_table, torch_ao_keys

        for table in tables:
            for key in (table.key, *table.aliases):
                check_torch_ao_table(key, table.shape, table.rule.quantization.bits)
            for name in (n for key in (table.key, *table.aliases) for n in torch_ao_keys(key)):
                if name in tensors:
                    raise OutputError(
                        f"{target}: cannot write: torch-ao key '{name}' of table '{table.key}' "
                        "collides with a tensor of the checkpoint",
                        path=target,
                        table=table.key,
                    )
    else:
        collision = checkpoint_collision(tensors, table_keys, alias_keys)
        if collision is not None:
            raise OutputError(f"{target}: cannot write: {collision}", path=target)
        for key in passthrough:
            info = tensors[key]
            if BY_NAME[info.dtype].safetensors is None or info.layout != "strided":
                way_out = "write the torch-ao format (.pt) or " if torch_ao_possible else ""
                raise UsageError(
                    f"{target}: cannot write tensor '{key}' ({info.describe()}) in a sparq file: "
                    f"safetensors holds dense tensors of standard dtypes; {way_out}leave the "
                    "tensor out of the checkpoint",
                    path=target,
                )


def _compress_tables(
    checkpoint: Checkpoint,
    file: FileReport,
    device: str,
    progress: ProgressCallback | None,
    options: EngineOptions,
) -> dict[str, CompressedTable]:
    """Compresses every table `file` plans; fills in its statistics, bytes and gate results."""
    from sparqcli.format.spec import table_file_bytes

    compressed: dict[str, CompressedTable] = {}
    for table in file.tables:
        rows, cols = table.shape
        result, stats = compress_planned_table(checkpoint, table, device, progress, options)
        compressed[table.key] = result.to("cpu")
        if file.format == "torch-ao":  # its figures, and gates, are those of the file written
            from sparqcli.format.torch_ao import torch_ao_stats

            with checkpoint.row_reader(table.key) as reader:
                stats = torch_ao_stats(compressed[table.key], reader, stats.kept)
        table.stats = stats
        table.bytes_after = (
            table_file_bytes(result)
            if file.format == "sparq"
            else (rows * cols * result.quantization.bits + 7) // 8 + rows * 8
        )
        table.gate_failures = table.rule.gates.failures(
            stats.rel_error, stats.row_cosine_min, table.bytes_ratio
        )
    return compressed


def compress_planned_table(
    checkpoint: Checkpoint,
    table: TableReport,
    device: str,
    progress: ProgressCallback | None,
    options: EngineOptions,
    *,
    part: TablePart | None = None,
    count_read: Callable[[int], None] | None = None,
) -> tuple[CompressedTable, TableStats]:
    """Returns planned `table` of `checkpoint` compressed by the engine, and its statistics.

    With `part`, only that part's rows (see `engine.compress_rows`); `count_read` is told the
    bytes of every row range read. Raises TableError naming the input and the table.
    """
    from sparqcli.dtypes import torch_dtype
    from sparqcli.engine.pipeline import compress_rows

    label = f"{Path(checkpoint.name).name}: {table.key}"
    name = f"{checkpoint.name}: {table.key}"
    try:
        with checkpoint.row_reader(table.key, for_gpu=device.startswith("cuda")) as reader:
            read_rows = reader if count_read is None else _counted(reader, count_read)
            return compress_rows(
                read_rows,
                (table.shape[0], table.shape[1]),
                torch_dtype(table.dtype),
                table.order,  # type: ignore[arg-type]
                table.rule.sparsity,
                table.rule.quantization,
                device=device,
                name=name,
                progress=_table_progress(progress, label),
                options=options,
                part=part,
            )
    except TableError as error:
        # Some engine errors name only the row (`row 3: value range overflows float32`).
        message = str(error)
        if not message.startswith(name):
            message = f"{name}: {message}"
        raise type(error)(message, path=checkpoint.path, table=table.key, row=error.row) from None


def _counted(
    read_rows: Callable[[int, int], torch.Tensor], count: Callable[[int], None]
) -> Callable[[int, int], torch.Tensor]:
    def read(start: int, stop: int) -> torch.Tensor:
        rows = read_rows(start, stop)
        count(rows.numel() * rows.element_size())
        return rows

    return read


def _table_progress(
    progress: ProgressCallback | None, label: str
) -> Callable[[float], None] | None:
    if progress is None:
        return None
    return lambda done: progress(label, done)


def _write(
    checkpoint: Checkpoint,
    file: FileReport,
    compressed: dict[str, CompressedTable],
    digests: BackgroundSha256 | None,
    *,
    replace: bool,
) -> None:
    from sparqcli.sinks import atomic_output

    if file.output is None or checkpoint.path is None or file.input is None:
        raise ValueError("a file report to write needs an input and an output path")
    aliases = {table.key: table.aliases for table in file.tables if table.aliases}
    skipped = {alias for names in aliases.values() for alias in names}
    passthrough = {
        key: checkpoint.tensor(key)
        for key in checkpoint.tensors
        if key not in compressed and key not in skipped
    }
    with atomic_output(file.output, replace=replace) as temp:
        if file.format == "sparq":
            from sparqcli.format.writer import SourceInfo, write_compressed

            if digests is None:
                raise ValueError("the sparq format records the input's sha256")
            extra, file.dropped = _json_extras(checkpoint)
            source = SourceInfo(checkpoint.path.name, digests.result(file.input))
            stats = {table.key: table.stats for table in file.tables if table.stats}
            write_compressed(temp, passthrough, compressed, stats, source, extra, aliases)
        else:
            from sparqcli.format.torch_ao import torch_ao_state_dict
            from sparqcli.sinks import save_torch_file

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch's quantized-dtype deprecation notices
                tied = {alias: compressed[key] for key, names in aliases.items() for alias in names}
                state = torch_ao_state_dict({**compressed, **tied}, passthrough)
                save_torch_file(checkpoint.rebuild(state), temp)
    file.written = True
    file.output_bytes = file.output.stat().st_size
    file.output_sha256 = sha256_file(file.output)


def _json_extras(checkpoint: Checkpoint) -> tuple[dict[str, Any], list[str]]:
    """Returns the checkpoint's extra entries that JSON can hold, and the names of the others."""
    kept: dict[str, Any] = {}
    dropped: list[str] = []
    for name, value in checkpoint.extra.items():
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError):
            dropped.append(str(name))
        else:
            kept[str(name)] = value
    if checkpoint.container_key is not None:
        kept = {"container_key": checkpoint.container_key, "entries": kept}
    elif kept:
        kept = {"entries": kept}
    return kept, dropped
