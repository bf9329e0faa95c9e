"""Presentation: compression reports, inspections and rule matches as rich tables and JSON.

Nothing here computes; every number comes from the result objects it is given.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from rich import box
from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from sparqcli.results import CheckpointInspection
from sparqcli.results import to_json as to_json  # the one JSON writer, for the CLI

if TYPE_CHECKING:
    from sparqcli.format.reader import CompressedFileInfo
    from sparqcli.results import CompressReport, FileReport, FolderReport
    from sparqcli.select import Selection

_ORDER_LABEL = {"sparsify-first": "S→Q", "quantize-first": "Q→S"}


def human_bytes(count: float | None) -> str:
    """Returns a byte count in binary units (`1.5 MiB`); `-` for None."""
    if count is None:
        return "-"
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def _shape(shape: Sequence[int]) -> str:
    return "x".join(str(side) for side in shape) if shape else "scalar"


def _number(value: float) -> str:
    return f"{value:.3g}"


def compress_summary(report: CompressReport) -> Group:
    """Returns the summary of a compress run: one table per file, then its totals."""
    parts: list[Any] = []
    # A folder's totals follow its last shard.
    last_shard = {id(folder.shards[-1]): folder for folder in report.folders if folder.shards}
    for file in report.files:
        if file.tables:
            parts.append(_file_table(file) if not report.dry_run else _plan_table(file))
        elif file.output is None:  # a shard of a folder that held only aliases
            parts.append(Text(f"{file.input}: no shard written"))
        else:  # a shard of a folder with no selected table
            parts.append(Text(f"{file.input} → {file.output}: no table selected here"))
        totals = _file_totals(file, report.dry_run)
        if totals is not None:
            parts.append(totals)
        parts.extend(Text(note) for note in _table_notes(file))
        if id(file) in last_shard:
            parts.append(_folder_totals(last_shard[id(file)], report.dry_run))
    outputs = len(report.files) - sum(len(f.shards) - 1 for f in report.folders if f.shards)
    if outputs > 1 and not report.dry_run:
        in_folders = {id(shard) for folder in report.folders for shard in folder.shards}
        singles = [f for f in report.files if id(f) not in in_folders]
        before = sum(f.input_bytes for f in singles) + sum(f.input_bytes for f in report.folders)
        after = sum(f.output_bytes or 0 for f in singles)
        after += sum(f.output_bytes or 0 for f in report.folders)
        parts.append(
            Text(
                f"all files: {human_bytes(before)} → {human_bytes(after)} in {report.seconds:.2f} s"
            )
        )
    return Group(*parts)


def _titled(title: str, table: Table) -> Group:
    """Returns `title` on its own line above `table` (a table title would wrap to its width)."""
    return Group(Text(title, no_wrap=True, overflow="ignore"), table)


def _new_table() -> Table:
    return Table(box=box.SIMPLE_HEAD, pad_edge=False)


def _file_table(file: FileReport) -> Group:
    table = _new_table()
    for name, justify in [
        ("table", "left"),
        ("shape", "right"),
        ("bits", "right"),
        ("order", "center"),
        ("sparsity\ntarget→zeros", "right"),
        ("scale\nmin / median / max", "right"),
        ("zero point\nrange", "right"),
        ("rel. L2\nerror", "right"),
        ("row cosine\nmean / min", "right"),
        ("bytes\nbefore → after", "right"),
    ]:
        table.add_column(name, justify=justify, overflow="fold")  # type: ignore[arg-type]
    for row in file.tables:
        stats = row.stats
        if stats is None:
            continue
        failed = bool(row.gate_failures)
        table.add_row(
            Text(row.key, style="bold red" if failed else ""),
            _shape(row.shape),
            str(row.rule.quantization.bits),
            _ORDER_LABEL.get(row.order, row.order),
            f"{row.rule.sparsity.level:.0%}→{stats.zero_fraction:.1%}",
            f"{_number(stats.scale_min)} / {_number(stats.scale_median)} / {_number(stats.scale_max)}",
            f"{stats.zero_point_min + 0.0:.1f}…{stats.zero_point_max + 0.0:.1f}",
            f"{stats.rel_error:.4f}",
            f"{stats.row_cosine_mean:.4f} / {stats.row_cosine_min:.4f}",
            f"{human_bytes(row.bytes_before)} → {human_bytes(row.bytes_after)}",
        )
    return _titled(f"{file.input} → {file.output}", table)


def _plan_table(file: FileReport) -> Group:
    table = _new_table()
    for name in (
        "table",
        "shape",
        "dtype",
        "rule",
        "order",
        "level",
        "block",
        "zeros/block",
        "norm",
        "bits",
        "scales",
    ):
        table.add_column(name, overflow="fold")
    for row in file.tables:
        sparsity, quantization = row.rule.sparsity, row.rule.quantization
        table.add_row(
            row.key,
            _shape(row.shape),
            row.dtype,
            row.rule.label,
            row.order,
            f"{sparsity.level:g}",
            _shape(sparsity.block_shape),
            "all" if sparsity.zeros_per_block is None else str(sparsity.zeros_per_block),
            sparsity.norm,
            str(quantization.bits),
            quantization.scale_dtype,
        )
    return _titled(f"{file.input} → {file.output} (dry run: nothing written)", table)


def _file_totals(file: FileReport, dry_run: bool) -> Text | None:
    if dry_run:
        return Text(
            f"{len(file.tables)} table(s) selected; {human_bytes(sum(t.bytes_before for t in file.tables))} of tables"
        )
    facts = file.to_dict()
    if not file.written:
        if not file.gate_failures and file.output is None:
            return None  # its note says why
        if not file.gate_failures:
            return Text("not written: its folder failed a gate", style="bold red")
        return Text(f"not written: {len(file.gate_failures)} gate(s) failed", style="bold red")
    if not file.tables:
        return Text(
            f"file {human_bytes(file.input_bytes)} → {human_bytes(file.output_bytes)}, "
            f"tensors passed through, {file.seconds:.2f} s"
        )
    line = (
        f"file {human_bytes(file.input_bytes)} → {human_bytes(file.output_bytes)} "
        f"({facts['ratio']:.3f}x), {facts['bits_per_weight']:.2f} bits/weight over "
        f"{len(file.tables)} table(s), {file.seconds:.2f} s"
    )
    if file.dropped:
        line += f"; entries not kept: {', '.join(file.dropped)}"
    return Text(line)


def _table_notes(file: FileReport) -> list[str]:
    """Returns the lines told under a file's totals: aliases, all-zero rows, the file's notes."""
    lines = []
    for table in file.tables:
        if table.aliases:
            lines.append(
                f"{table.key}: the same values as {', '.join(table.aliases)} (tied); "
                "compressed and stored once, all decode to the same tensor"
            )
        stats = table.stats
        if stats is not None and stats.zero_rows:
            share = stats.zero_rows / table.shape[0] if table.shape[0] else 0.0
            lines.append(f"{table.key}: {stats.zero_rows} all-zero row(s) ({share:.1%} of rows)")
    return lines + list(file.notes)


def _folder_totals(folder: FolderReport, dry_run: bool) -> Text:
    tables = len(folder.tables)
    head = (
        f"folder {folder.input} → {folder.output}: {len(folder.shards)} shard(s), {tables} table(s)"
    )
    notes = "".join(f"\n{note}" for note in folder.notes if note not in _shard_notes(folder))
    if dry_run:
        return Text(
            f"{head}, {len(folder.copied)} file(s) to copy (dry run: nothing written){notes}"
        )
    if not folder.written:
        return Text(
            f"{head}: not written, {len(folder.gate_failures)} gate(s) failed{notes}",
            style="bold red",
        )
    facts = folder.to_dict()
    bits = facts["bits_per_weight"]
    return Text(
        f"{head}, {len(folder.copied)} file(s) copied: {human_bytes(folder.input_bytes)} → "
        f"{human_bytes(folder.output_bytes)} ({facts['ratio']:.3f}x)"
        + (f", {bits:.2f} bits/weight over its tables" if bits is not None else "")
        + f", {folder.seconds:.2f} s{notes}"
    )


def _shard_notes(folder: FolderReport) -> set[str]:
    return {note for shard in folder.shards for note in shard.notes}


def print_report(console: Console, renderable: Any) -> None:
    """Prints `renderable`; long title lines run past the console width instead of wrapping."""
    console.print(renderable, crop=False)


def checkpoint_table(inspection: CheckpointInspection) -> Group:
    """Returns the inspection of a plain checkpoint: every tensor, candidates marked."""
    title = f"{inspection.path}: {len(inspection.tensors)} tensors"
    table = _new_table()
    for name, justify in [
        ("key", "left"),
        ("shape", "right"),
        ("dtype", "left"),
        ("size", "right"),
        ("table?", "center"),
    ]:
        table.add_column(name, justify=justify, overflow="fold")  # type: ignore[arg-type]
    for entry in inspection.tensors:
        info = entry.info
        table.add_row(
            entry.key,
            _shape(info.shape),
            info.dtype,
            human_bytes(info.nbytes),
            "✓" if info.is_table else "",
        )
    return _titled(title, table)


def compressed_table(file: CompressedFileInfo) -> Group:
    """Returns the inspection of a compressed file: its tables with settings, sparsity and bytes."""
    info = file.to_dict()
    tables = info["tables"]
    title = (
        f"{file.path}: sparq format {info['format_version']}, {len(tables)} compressed "
        f"table(s), {human_bytes(file.file_bytes)}"
    )
    table = _new_table()
    for name in (
        "table",
        "shape",
        "dtype",
        "bits",
        "order",
        "level",
        "block",
        "pruned",
        "rel. error",
        "bytes",
    ):
        table.add_column(name, overflow="fold")
    for key, entry in tables.items():
        stats = entry.get("stats") or {}
        sparsity = entry["sparsity"]
        table.add_row(
            key,
            _shape(entry["shape"]),
            entry["dtype"],
            str(entry["bits"]),
            _ORDER_LABEL.get(entry["order"], entry["order"]),
            f"{sparsity['level']:g}",
            _shape(sparsity["block_shape"]),
            f"{stats['pruned_fraction']:.1%}" if _is_number(stats.get("pruned_fraction")) else "-",
            f"{stats['rel_error']:.4f}" if _is_number(stats.get("rel_error")) else "-",
            human_bytes(entry.get("file_bytes")),
        )
    return _titled(title, table)


def inspection(result: CheckpointInspection | CompressedFileInfo) -> Group:
    """Returns what `sparq inspect` prints for either kind of file."""
    if isinstance(result, CheckpointInspection):
        return checkpoint_table(result)
    return compressed_table(result)


def selection_table(selection: Selection, source: str) -> Group:
    """Returns, for `sparq validate CFG CKPT`, each rule and the tensors it matches."""
    title = f"{source}: {len(selection.tables)} table(s) selected"
    table = _new_table()
    table.add_column("rule", overflow="fold")
    table.add_column("selects", overflow="fold")
    table.add_column("matched, not selected", overflow="fold")
    for match in selection.matches:
        lost = [f"{key} (earlier rule)" for key in match.shadowed] + [
            f"{key} (excluded)" for key in match.excluded
        ]
        table.add_row(match.rule.label, "\n".join(match.won) or "-", "\n".join(lost) or "-")
    return _titled(title, table)


def _is_number(value: object) -> bool:
    """Returns True for an int or float (a file's statistic may be null: not finite)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)
