"""The library entry point: `compress(...)` reads, selects, compresses, checks gates, writes.

The CLI calls it exactly as a Python user would; it prints nothing and returns a report.
"""

from __future__ import annotations

import json
import math
import resource
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from sparqcli import __version__
from sparqcli.config import (
    Config,
    Gates,
    LayerRule,
    config_to_dict,
    load_config,
    quantization_to_dict,
    sparsity_to_dict,
)
from sparqcli.digest import BackgroundSha256, sha256_file
from sparqcli.errors import GateError, TableError, UsageError
from sparqcli.parallel import resolve_threads
from sparqcli.threads import import_torch

if TYPE_CHECKING:
    import torch

    from sparqcli.checkpoint import Checkpoint
    from sparqcli.engine.stats import TableStats
    from sparqcli.engine.table import CompressedTable

OutputFormat = Literal["sparq", "torch-ao"]
OUTPUT_FORMATS: tuple[str, ...] = ("sparq", "torch-ao")
_SUFFIX = {"sparq": ".sparq.safetensors", "torch-ao": ".torchao.pt"}

ProgressCallback = Callable[[str, float], None]
"""Called with a description (`model.pt: emb.weight`) and the fraction of that table done."""


@dataclass
class TableReport:
    """One compressed (or, in a dry run, planned) table."""

    key: str
    shape: tuple[int, ...]
    dtype: str
    rule: LayerRule
    order: str
    bytes_before: int
    bytes_after: int | None = None
    stats: TableStats | None = None
    gate_failures: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Returns the table's facts as JSON-able data."""
        return {
            "key": self.key,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "rule": self.rule.label,
            "order": self.order,
            "sparsity": sparsity_to_dict(self.rule.sparsity),
            "quantization": quantization_to_dict(self.rule.quantization),
            "bytes_before": self.bytes_before,
            "bytes_after": self.bytes_after,
            "stats": self.stats.to_dict() if self.stats is not None else None,
            "gate_failures": self.gate_failures,
        }


@dataclass
class FileReport:
    """One input checkpoint and what became of it."""

    input: Path
    output: Path
    format: str
    input_bytes: int
    tables: list[TableReport]
    output_bytes: int | None = None
    output_sha256: str | None = None
    written: bool = False
    seconds: float = 0.0
    dropped: list[str] = field(default_factory=list)

    @property
    def gate_failures(self) -> list[str]:
        """Returns every failed gate of every table, as `key: what failed` lines."""
        return [
            f"{table.key}: {failure}" for table in self.tables for failure in table.gate_failures
        ]

    @property
    def table_values(self) -> int:
        """Returns the number of values in the compressed tables."""
        return sum(math.prod(table.shape) for table in self.tables)

    def to_dict(self) -> dict[str, Any]:
        """Returns the file's facts as JSON-able data."""
        table_bytes_after = sum(t.bytes_after or 0 for t in self.tables)
        values = self.table_values
        return {
            "input": str(self.input),
            "output": str(self.output),
            "format": self.format,
            "written": self.written,
            "input_bytes": self.input_bytes,
            "output_bytes": self.output_bytes,
            "output_sha256": self.output_sha256,
            "ratio": self.output_bytes / self.input_bytes
            if self.output_bytes is not None and self.input_bytes
            else None,
            "bits_per_weight": 8 * table_bytes_after / values
            if values and self.output_bytes
            else None,
            "seconds": round(self.seconds, 3),
            "dropped_entries": self.dropped,
            "tables": [table.to_dict() for table in self.tables],
        }


@dataclass
class CompressReport:
    """Everything one `compress` call did."""

    config: Config
    files: list[FileReport]
    dry_run: bool
    device: str
    seconds: float = 0.0
    peak_memory_bytes: int = 0
    threads: int | None = None

    @property
    def gate_failures(self) -> list[str]:
        """Returns every failed gate, as `file: key: what failed` lines."""
        return [f"{file.input}: {failure}" for file in self.files for failure in file.gate_failures]

    def to_dict(self) -> dict[str, Any]:
        """Returns the report as JSON-able data (what `--report` and `--json` write)."""
        return {
            "sparq_version": __version__,
            "dry_run": self.dry_run,
            "device": self.device,
            "threads": self.threads,
            "config": config_to_dict(self.config),
            "files": [file.to_dict() for file in self.files],
            "seconds": round(self.seconds, 3),
            "peak_memory_bytes": self.peak_memory_bytes,
            "gates_passed": not self.gate_failures,
        }


def plan_outputs(
    inputs: Sequence[Path], output: Path | None, out_dir: Path | None, output_format: str
) -> list[Path]:
    """Returns the output path of each input. Raises UsageError for a conflicting plan."""
    if output is not None and out_dir is not None:
        raise UsageError("-o/--output and --out-dir exclude each other")
    if output is not None and len(inputs) != 1:
        raise UsageError(
            f"-o/--output takes one input, got {len(inputs)}; use --out-dir for several"
        )
    if output is not None:
        return [output]
    suffix = _SUFFIX[output_format]
    outputs = []
    for source in inputs:
        stem = source.name.removesuffix(source.suffix)
        outputs.append((out_dir if out_dir is not None else source.parent) / (stem + suffix))
    seen: dict[Path, Path] = {}
    for source, target in zip(inputs, outputs, strict=True):
        if target in seen:
            raise UsageError(f"{seen[target]} and {source} would both be written to {target}")
        seen[target] = source
    return outputs


def check_device(device: str) -> None:
    """Checks that `device` is usable. Raises UsageError for an unknown or absent device."""
    if device not in ("cpu", "cuda"):
        raise UsageError(f"--device: must be cpu or cuda, got {device!r}")
    if device == "cuda":
        import_torch()
        import torch

        if not torch.cuda.is_available():
            build = "with" if torch.version.cuda else "without"
            raise UsageError(
                f"--device cuda: no CUDA device is available (this torch {torch.__version__} was built {build} CUDA)"
            )


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
    progress: ProgressCallback | None = None,
    threads: int | None = None,
) -> CompressReport:
    """Compresses the selected tables of each input checkpoint and returns the report.

    `config` is a loaded Config or a YAML path (then `overrides` (`key.path=value`) and `order`
    apply). Each input is written to `output`, into `out_dir`, or beside itself. A dry run
    resolves and checks everything and writes nothing. `threads` is how many threads compress
    on the CPU; None: SPARQ_NUM_THREADS, else OMP_NUM_THREADS, else the CPUs this process may
    use (see sparqcli.parallel); while a table is compressed on the CPU, torch's process-wide
    thread count is 1 (each of those threads runs torch single-threaded; restored after).
    Raises ConfigError/UsageError/SelectionError/UnsafeInputError (exit 2) for bad usage,
    InputError/TableError/OutputError (exit 1) for bad data or failed I/O, and GateError
    (exit 3, carrying the report) when a quality gate fails; a file that fails a gate is not
    written.
    """
    started = time.perf_counter()
    sources = [Path(inputs)] if isinstance(inputs, (str, Path)) else [Path(p) for p in inputs]
    if not sources:
        raise UsageError("no input checkpoint given")
    if output_format not in OUTPUT_FORMATS:
        raise UsageError(f"--format: must be sparq or torch-ao, got {output_format!r}")
    if isinstance(config, (str, Path)):
        config = load_config(config, overrides, order)
    elif overrides or order:
        raise UsageError("overrides and order apply to a config path, not a loaded Config")
    check_device(device)
    thread_count, _ = resolve_threads(threads)
    # The sparq format records each input's sha256: hashed from here on, beside torch's import
    # and the engine, instead of after them.
    digests = BackgroundSha256(sources) if output_format == "sparq" and not dry_run else None
    try:
        targets = plan_outputs(
            sources,
            Path(output) if output is not None else None,
            Path(out_dir) if out_dir is not None else None,
            output_format,
        )
        import_torch()  # beside the hashing started above
        from sparqcli.checkpoint import check_output_path

        if out_dir is not None and not Path(out_dir).is_dir():
            raise UsageError(f"--out-dir {out_dir}: no such folder")
        for target in targets:
            check_output_path(target, sources, force)
        report = CompressReport(config, [], dry_run, device, threads=thread_count)
        for source, target in zip(sources, targets, strict=True):
            report.files.append(
                _compress_file(
                    source,
                    target,
                    config,
                    output_format,
                    dry_run,
                    device,
                    trust_pickle,
                    key,
                    progress,
                    digests,
                    thread_count,
                )
            )
    finally:
        if digests is not None:
            digests.cancel()
    report.seconds = time.perf_counter() - started
    report.peak_memory_bytes = peak_memory_bytes()
    if report.gate_failures:
        count = len(report.gate_failures)
        raise GateError(
            f"{count} quality gate{'s' if count != 1 else ''} failed: "
            + "; ".join(report.gate_failures),
            report,
        )
    return report


def peak_memory_bytes() -> int:
    """Returns this process's peak resident memory so far, in bytes."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _compress_file(
    source: Path,
    target: Path,
    config: Config,
    output_format: str,
    dry_run: bool,
    device: str,
    trust_pickle: bool,
    key: str | None,
    progress: ProgressCallback | None,
    digests: BackgroundSha256 | None,
    threads: int,
) -> FileReport:
    from sparqcli.checkpoint import open_checkpoint
    from sparqcli.select import select_tables

    started = time.perf_counter()
    checkpoint = open_checkpoint(source, key=key, trust_pickle=trust_pickle)
    if checkpoint.is_sparq:
        raise UsageError(
            f"{source}: is already compressed by sparq; compress the original checkpoint"
        )
    selection = select_tables(config, checkpoint.tensors, str(source), checkpoint.module_types)
    tables = [
        TableReport(
            key=selected.key,
            shape=selected.info.shape,
            dtype=selected.info.dtype,
            rule=selected.rule,
            order=config.order,
            bytes_before=_tensor_bytes(selected.info.shape, selected.info.dtype),
        )
        for selected in selection.tables
    ]
    report = FileReport(source, target, output_format, source.stat().st_size, tables)
    if dry_run:
        return report
    compressed: dict[str, CompressedTable] = {}
    stats: dict[str, TableStats] = {}
    for table in tables:
        compressed[table.key], stats[table.key] = _compress_one(
            checkpoint, table, config, device, progress, threads
        )
        table.stats = stats[table.key]
        table.bytes_after = _table_bytes_after(compressed[table.key], output_format)
        table.gate_failures = gate_failures(table, _merged_gates(config.gates, table.rule.gates))
    report.seconds = time.perf_counter() - started
    if report.gate_failures:
        return report
    _write(checkpoint, report, compressed, stats, digests)
    report.seconds = time.perf_counter() - started
    return report


def _compress_one(
    checkpoint: Checkpoint,
    table: TableReport,
    config: Config,
    device: str,
    progress: ProgressCallback | None,
    threads: int,
) -> tuple[CompressedTable, TableStats]:
    from sparqcli.engine.pipeline import compress_rows

    rows, cols = table.shape
    label = f"{checkpoint.path.name}: {table.key}"
    name = f"{checkpoint.path}: {table.key}"
    try:
        with checkpoint.row_reader(table.key, for_gpu=device == "cuda") as read_rows:
            result, stats = compress_rows(
                read_rows,
                (rows, cols),
                _torch_dtype(table.dtype),
                config.order,
                table.rule.sparsity,
                table.rule.quantization,
                device=device,
                name=name,
                progress=(lambda done: progress(label, done)) if progress is not None else None,
                threads=threads,
            )
    except TableError as error:
        # Some engine errors name only the row (`row 3: value range overflows float32`).
        message = str(error)
        raise TableError(message if message.startswith(name) else f"{name}: {message}") from None
    return _to_cpu(result), stats


def _to_cpu(table: CompressedTable) -> CompressedTable:
    if table.codes.device.type == "cpu":
        return table
    from dataclasses import replace

    return replace(
        table,
        codes=table.codes.cpu(),
        scale=table.scale.cpu(),
        zero_point=table.zero_point.cpu(),
        keep_mask=table.keep_mask.cpu() if table.keep_mask is not None else None,
    )


def _torch_dtype(name: str) -> torch.dtype:
    import torch

    return getattr(torch, name)


_DTYPE_BYTES = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2}


def _tensor_bytes(shape: tuple[int, ...], dtype: str) -> int:
    return math.prod(shape) * _DTYPE_BYTES.get(dtype, 4)


def _table_bytes_after(table: CompressedTable, output_format: str) -> int:
    from sparqcli.format import table_file_bytes

    if output_format == "sparq":
        return table_file_bytes(table)
    # torch-ao: dense codes (two per byte at 4 bits) plus float32 scales and zero points.
    values = table.rows * table.cols
    return (values * table.quantization.bits + 7) // 8 + table.rows * 8


def _merged_gates(defaults: Gates, rule: Gates) -> Gates:
    return Gates(
        max_rel_error=rule.max_rel_error
        if rule.max_rel_error is not None
        else defaults.max_rel_error,
        min_row_cosine=rule.min_row_cosine
        if rule.min_row_cosine is not None
        else defaults.min_row_cosine,
        max_bytes_ratio=rule.max_bytes_ratio
        if rule.max_bytes_ratio is not None
        else defaults.max_bytes_ratio,
    )


def gate_failures(table: TableReport, gates: Gates) -> list[str]:
    """Returns one line per gate that `table`'s statistics fail (empty when all pass)."""
    failures = []
    stats = table.stats
    if stats is None:
        return failures
    if gates.max_rel_error is not None and stats.rel_error > gates.max_rel_error:
        failures.append(f"rel_error {stats.rel_error:.4g} > max_rel_error {gates.max_rel_error:g}")
    if gates.min_row_cosine is not None and stats.row_cosine_min < gates.min_row_cosine:
        failures.append(
            f"row_cosine_min {stats.row_cosine_min:.4g} < min_row_cosine {gates.min_row_cosine:g}"
        )
    if gates.max_bytes_ratio is not None and table.bytes_after is not None and table.bytes_before:
        ratio = table.bytes_after / table.bytes_before
        if ratio > gates.max_bytes_ratio:
            failures.append(f"bytes_ratio {ratio:.4g} > max_bytes_ratio {gates.max_bytes_ratio:g}")
    return failures


def _write(
    checkpoint: Checkpoint,
    report: FileReport,
    compressed: dict[str, CompressedTable],
    stats: dict[str, TableStats],
    digests: BackgroundSha256 | None,
) -> None:
    # `digests` hashes every input whenever the format is sparq (the only one that records it).
    from sparqcli.checkpoint import atomic_output

    passthrough = {
        key: checkpoint.tensor(key) for key in checkpoint.tensors if key not in compressed
    }
    with atomic_output(report.output) as temp:
        if report.format == "sparq":
            from sparqcli.format import SourceInfo, write_compressed

            extra, report.dropped = _json_extras(checkpoint)
            source = SourceInfo(checkpoint.path.name, digests.result(report.input))
            write_compressed(temp, passthrough, compressed, stats, source, extra)
        else:
            from sparqcli.checkpoint import save_torch_file
            from sparqcli.format import torch_ao_state_dict

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch's quantized-dtype deprecation notices
                state = torch_ao_state_dict(compressed, passthrough)
                save_torch_file(checkpoint.rebuild(state), temp)
    report.written = True
    report.output_bytes = report.output.stat().st_size
    report.output_sha256 = sha256_file(report.output)


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
