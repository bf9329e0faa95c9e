"""What the library's calls return: typed results that are also plain data (`to_dict()`).

`compress` returns a `CompressReport` (one `FileReport` per input, one `TableReport` per table);
`inspect` returns a `CheckpointInspection` or a `CompressedFileInfo`; `decompress` a
`DecompressResult`. Presentation (tables, JSON text) is the renderer's business.

Importing this module does not import torch.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sparqcli import __version__
from sparqcli.errors import GateError

if TYPE_CHECKING:
    from sparqcli.candidates import Candidacy
    from sparqcli.config import Config, ResolvedRule
    from sparqcli.dtypes import TensorInfo
    from sparqcli.engine.stats import TableStats


@dataclass
class TableReport:
    """One compressed (or, in a dry run, planned) table, and its gate results."""

    key: str
    shape: tuple[int, ...]
    dtype: str
    rule: ResolvedRule
    order: str
    bytes_before: int
    bytes_after: int | None = None
    stats: TableStats | None = None
    gate_failures: list[str] = field(default_factory=list)
    aliases: list[str] = field(default_factory=list)
    """The other keys that held the same values (tied weights), stored once with this table."""

    @property
    def bytes_ratio(self) -> float | None:
        """Returns compressed bytes / original bytes, None before compression."""
        if self.bytes_after is None or not self.bytes_before:
            return None
        return self.bytes_after / self.bytes_before

    def to_dict(self) -> dict[str, Any]:
        """Returns the table's facts as JSON-able data."""
        return {
            "key": self.key,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "rule": self.rule.label,
            "order": self.order,
            "sparsity": self.rule.sparsity.to_dict(),
            "quantization": self.rule.quantization.to_dict(),
            "bytes_before": self.bytes_before,
            "bytes_after": self.bytes_after,
            "stats": self.stats.to_dict() if self.stats is not None else None,
            "gates": self.rule.gates.to_dict(),
            "gate_failures": self.gate_failures,
            "aliases": self.aliases,
        }


@dataclass(frozen=True)
class SkippedTable:
    """A table a rule matched but left dense, and why (`under min_table_bytes (64.0 KiB)`)."""

    key: str
    shape: tuple[int, ...]
    dtype: str
    bytes: int
    rule: str
    reason: str

    def to_dict(self) -> dict[str, Any]:
        """Returns the skipped table as JSON-able data."""
        return {
            "key": self.key,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "bytes": self.bytes,
            "rule": self.rule,
            "reason": self.reason,
        }


@dataclass
class FileReport:
    """One input (a checkpoint file, or a state dict: `input` None) and what became of it."""

    input: Path | None
    output: Path | None
    format: str
    input_bytes: int
    tables: list[TableReport]
    output_bytes: int | None = None
    output_sha256: str | None = None
    written: bool = False
    seconds: float = 0.0
    dropped: list[str] = field(default_factory=list)
    skipped: list[SkippedTable] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    """Facts the summary tells besides the numbers (e.g. a tied output head that changes too)."""

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

    @property
    def table_bytes_after(self) -> int:
        """Returns the bytes the compressed tables take (0 before compression)."""
        return sum(table.bytes_after or 0 for table in self.tables)

    def to_dict(self) -> dict[str, Any]:
        """Returns the file's facts as JSON-able data."""
        values = self.table_values
        return {
            "input": None if self.input is None else str(self.input),
            "output": None if self.output is None else str(self.output),
            "format": self.format,
            "written": self.written,
            "input_bytes": self.input_bytes,
            "output_bytes": self.output_bytes,
            "output_sha256": self.output_sha256,
            "ratio": self.output_bytes / self.input_bytes
            if self.output_bytes is not None and self.input_bytes
            else None,
            "bits_per_weight": 8 * self.table_bytes_after / values
            if values and self.table_bytes_after
            else None,
            "seconds": round(self.seconds, 3),
            "dropped_entries": self.dropped,
            "gates_passed": not self.gate_failures,
            "tables": [table.to_dict() for table in self.tables],
            "skipped_tables": [table.to_dict() for table in self.skipped],
            "notes": self.notes,
        }


@dataclass
class FolderReport:
    """One model folder in, one folder out: its shards (each a `FileReport`, also listed in
    `CompressReport.files`), the side files copied, and the folder's totals.

    `input_bytes` counts every file read or copied; `output_bytes` every file of the output
    folder. `left_out` names the input's files not carried over (the same weights in another
    layout). The folder is written whole or not at all (`written`).
    """

    input: Path
    output: Path
    shards: list[FileReport]
    index: str | None
    copied: list[str]
    left_out: list[str]
    input_bytes: int
    output_bytes: int | None = None
    written: bool = False
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def gate_failures(self) -> list[str]:
        """Returns every failed gate of every shard's tables, as `key: what failed` lines."""
        return [failure for shard in self.shards for failure in shard.gate_failures]

    @property
    def tables(self) -> list[TableReport]:
        """Returns the tables of every shard."""
        return [table for shard in self.shards for table in shard.tables]

    def to_dict(self) -> dict[str, Any]:
        """Returns the folder's facts and totals as JSON-able data (shards by output name)."""
        values = sum(math.prod(table.shape) for table in self.tables)
        table_bytes = sum(table.bytes_after or 0 for table in self.tables)
        return {
            "input": str(self.input),
            "output": str(self.output),
            "written": self.written,
            "shards": [shard.input.name for shard in self.shards if shard.input is not None],
            "index": self.index,
            "copied": self.copied,
            "left_out": self.left_out,
            "tables": len(self.tables),
            "input_bytes": self.input_bytes,
            "output_bytes": self.output_bytes,
            "ratio": self.output_bytes / self.input_bytes
            if self.output_bytes is not None and self.input_bytes
            else None,
            "bits_per_weight": 8 * table_bytes / values if values and table_bytes else None,
            "seconds": round(self.seconds, 3),
            "gates_passed": not self.gate_failures,
            "notes": self.notes,
        }


@dataclass
class CompressReport:
    """Everything one `compress` call did. A file that failed a gate was not written."""

    config: Config
    files: list[FileReport]
    dry_run: bool
    device: str
    seconds: float = 0.0
    peak_memory_bytes: int = 0
    threads: int | None = None
    """The CPU threads the engine computed with."""
    folders: list[FolderReport] = field(default_factory=list)
    """The model folders among the inputs; their shards are in `files` too."""
    rank: int = 0
    """The rank that made this report in a distributed run (0 otherwise)."""
    ranks: list[dict[str, Any]] | None = None
    """A distributed run's per-rank figures: seconds, bytes read, bytes exchanged, its file."""

    @property
    def gate_failures(self) -> list[str]:
        """Returns every failed gate, as `file: key: what failed` lines."""
        return [f"{file.input}: {failure}" for file in self.files for failure in file.gate_failures]

    @property
    def gates_passed(self) -> bool:
        """Returns True when every table passed its gates (always True in a dry run)."""
        return not self.gate_failures

    def raise_for_gates(self) -> None:
        """Raises GateError (carrying this report) when a quality gate failed."""
        failures = self.gate_failures
        if failures:
            count = len(failures)
            raise GateError(
                f"{count} quality gate{'s' if count != 1 else ''} failed: " + "; ".join(failures),
                self,
            )

    def save_json(self, path: str | Path, *, force: bool = False) -> None:
        """Writes the report as JSON to `path`, atomically.

        Raises UsageError when `path` exists and `force` is not set, OutputError when it
        cannot be written.
        """
        from sparqcli.sinks import atomic_output, check_report_path

        inputs = [file.input for file in self.files if file.input is not None]
        outputs = [file.output for file in self.files if file.output is not None]
        check_report_path(Path(path), force, inputs, outputs)
        with atomic_output(path, replace=force) as temp:
            temp.write_text(to_json(self.to_dict()) + "\n")

    def to_dict(self) -> dict[str, Any]:
        """Returns the report as JSON-able data (what the CLI's --report and --json write)."""
        return {
            "sparq_version": __version__,
            "dry_run": self.dry_run,
            "device": self.device,
            "threads": self.threads,
            "config": self.config.to_dict(),
            "files": [file.to_dict() for file in self.files],
            "folders": [folder.to_dict() for folder in self.folders],
            "seconds": round(self.seconds, 3),
            "peak_memory_bytes": self.peak_memory_bytes,
            "gates_passed": self.gates_passed,
            **({"ranks": self.ranks} if self.ranks is not None else {}),
        }


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of an inspected checkpoint: its shape, dtype, bytes, whether it is a table
    sparq can compress (a 2-D floating tensor), and whether it is a candidate embedding table
    and why (`candidate`; see `sparqcli.candidates`). Without `candidate`, it is found from the
    key and shape alone (no module types)."""

    key: str
    info: TensorInfo
    candidate: Candidacy = None  # type: ignore[assignment]  # filled in by __post_init__

    def __post_init__(self) -> None:
        if self.candidate is None:
            from sparqcli.candidates import candidacy

            object.__setattr__(self, "candidate", candidacy(self.key, self.info))

    def to_dict(self) -> dict[str, Any]:
        """Returns the entry as JSON-able data."""
        return {
            "shape": list(self.info.shape),
            "dtype": self.info.dtype,
            "bytes": self.info.nbytes,
            "table": self.info.is_table,
            **self.candidate.to_dict(),
        }


@dataclass(frozen=True)
class CheckpointInspection:
    """A plain checkpoint as `inspect` sees it: every tensor, in the file's key order."""

    path: Path
    format: str
    tensors: tuple[TensorEntry, ...]

    @property
    def candidates(self) -> tuple[TensorEntry, ...]:
        """Returns the candidate embedding tables, in key order."""
        return tuple(entry for entry in self.tensors if entry.candidate.is_candidate)

    def to_dict(self) -> dict[str, Any]:
        """Returns the inspection as JSON-able data."""
        return {
            "file": str(self.path),
            "compressed": False,
            "format": self.format,
            "tensors": {entry.key: entry.to_dict() for entry in self.tensors},
            "candidates": [entry.key for entry in self.candidates],
        }


@dataclass(frozen=True)
class DecompressResult:
    """What `decompress` wrote: the dense output, its tensor count and size."""

    source: Path
    output: Path
    tensors: int
    output_bytes: int

    def to_dict(self) -> dict[str, Any]:
        """Returns the result as JSON-able data."""
        return {
            "source": str(self.source),
            "output": str(self.output),
            "tensors": self.tensors,
            "output_bytes": self.output_bytes,
        }


def to_json(data: Any) -> str:
    """Returns `data` as indented, key-sorted, strict JSON text (non-finite numbers: null)."""
    return json.dumps(_finite(data), indent=2, sort_keys=True, allow_nan=False)


def _finite(data: Any) -> Any:
    if isinstance(data, float) and not math.isfinite(data):
        return None
    if isinstance(data, Mapping):
        return {key: _finite(value) for key, value in data.items()}
    if isinstance(data, (list, tuple)):
        return [_finite(value) for value in data]
    return data
