"""Presentation: compression reports, inspections and rule matches as rich tables and JSON.

Nothing here computes; every number comes from the report objects it is given.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from rich import box
from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

if TYPE_CHECKING:
    from sparqcli.compress import CompressReport, FileReport
    from sparqcli.select import Selection, TensorInfo

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
    for file in report.files:
        parts.append(_file_table(file) if not report.dry_run else _plan_table(file))
        parts.append(_file_totals(file, report.dry_run))
    if len(report.files) > 1 and not report.dry_run:
        before = sum(f.input_bytes for f in report.files)
        after = sum(f.output_bytes or 0 for f in report.files)
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
            _bits_label(row.rule.quantization.bits, row.rule.quantization.range),
            _ORDER_LABEL.get(row.order, row.order),
            f"{row.rule.sparsity.level:.0%}{_scope_label(row.rule.sparsity.scope)}"
            f"→{stats.zero_fraction:.1%}",
            f"{_number(stats.scale_min)} / {_number(stats.scale_median)} / {_number(stats.scale_max)}",
            f"{stats.zero_point_min + 0.0:.1f}…{stats.zero_point_max + 0.0:.1f}",
            f"{stats.rel_error:.4f}",
            f"{stats.row_cosine_mean:.4f} / {stats.row_cosine_min:.4f}",
            f"{human_bytes(row.bytes_before)} → {human_bytes(row.bytes_after)}",
        )
    return _titled(f"{file.input} → {file.output}", table)


def _bits_label(bits: int, value_range: str) -> str:
    """Returns the summary's bits cell: `4`, or `4 mse` for MSE ranges."""
    return str(bits) if value_range == "minmax" else f"{bits} {value_range}"


def _scope_label(scope: str) -> str:
    """Returns what the summary's sparsity cell adds for the ranking scope: `/row` or nothing."""
    return "" if scope == "table" else f"/{scope}"


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
        "scope",
        "bits",
        "range",
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
            sparsity.scope,
            str(quantization.bits),
            quantization.range,
            quantization.scale_dtype,
        )
    return _titled(f"{file.input} → {file.output} (dry run: nothing written)", table)


def _file_totals(file: FileReport, dry_run: bool) -> Text:
    if dry_run:
        return Text(
            f"{len(file.tables)} table(s) selected; {human_bytes(sum(t.bytes_before for t in file.tables))} of tables"
        )
    facts = file.to_dict()
    if not file.written:
        return Text(f"not written: {len(file.gate_failures)} gate(s) failed", style="bold red")
    line = (
        f"file {human_bytes(file.input_bytes)} → {human_bytes(file.output_bytes)} "
        f"({facts['ratio']:.3f}x), {facts['bits_per_weight']:.2f} bits/weight over "
        f"{len(file.tables)} table(s), {file.seconds:.2f} s"
    )
    if file.dropped:
        line += f"; entries not kept: {', '.join(file.dropped)}"
    return Text(line)


def print_report(console: Console, renderable: Any) -> None:
    """Prints `renderable`; long title lines run past the console width instead of wrapping."""
    console.print(renderable, crop=False)


def to_json(data: Any) -> str:
    """Returns `data` as indented, key-sorted JSON text."""
    return json.dumps(data, indent=2, sort_keys=True, allow_nan=True)


def checkpoint_table(
    path: str, tensors: Mapping[str, TensorInfo], sizes: Mapping[str, int]
) -> Group:
    """Returns the inspection of a plain checkpoint: every tensor, candidates marked."""
    title = f"{path}: {len(tensors)} tensors"
    table = _new_table()
    for name, justify in [
        ("key", "left"),
        ("shape", "right"),
        ("dtype", "left"),
        ("size", "right"),
        ("table?", "center"),
    ]:
        table.add_column(name, justify=justify, overflow="fold")  # type: ignore[arg-type]
    for key, info in tensors.items():
        table.add_row(
            key,
            _shape(info.shape),
            info.dtype,
            human_bytes(sizes[key]),
            "✓" if info.is_table else "",
        )
    return _titled(title, table)


def compressed_table(path: str, info: Mapping[str, Any], file_bytes: int) -> Group:
    """Returns the inspection of a compressed file: its tables with settings, sparsity and bytes."""
    tables = info["tables"]
    title = f"{path}: sparq format {info['format_version']}, {len(tables)} compressed table(s), {human_bytes(file_bytes)}"
    table = _new_table()
    for name in (
        "table",
        "shape",
        "dtype",
        "bits",
        "range",
        "order",
        "level",
        "block",
        "scope",
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
            str(entry["quantization"].get("range", "minmax")),
            _ORDER_LABEL.get(entry["order"], entry["order"]),
            f"{sparsity['level']:g}",
            _shape(sparsity["block_shape"]),
            str(sparsity.get("scope", "table")),
            f"{stats['pruned_fraction']:.1%}" if _is_number(stats.get("pruned_fraction")) else "-",
            f"{stats['rel_error']:.4f}" if _is_number(stats.get("rel_error")) else "-",
            human_bytes(entry.get("file_bytes")),
        )
    return _titled(title, table)


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
