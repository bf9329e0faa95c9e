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
    from pathlib import Path

    from sparqcli.format.reader import CompressedFileInfo
    from sparqcli.planning.measure import Option
    from sparqcli.planning.result import PlanResult
    from sparqcli.results import CompressReport, FileReport
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


# ---------------------------------------------------------------------------------------------
# Plans (`sparq plan`)

PLOT_SUFFIXES = (".png", ".svg")
PLOT_INSTALL = "pip install 'sparqcli[plot]' (or: pip install matplotlib)"


def _option_cell(option: Option | None, weighted: bool) -> str:
    if option is None:
        return "-"
    error = option.weighted_error if weighted else option.rel_error
    return f"{option.candidate.label}\n{human_bytes(option.bytes)}, {error:.4f}"


def plan_summary(result: PlanResult, frontier_points: int = 12) -> Group:
    """Returns what `sparq plan` prints: the tables' choices, the totals, the model's frontier."""
    weighted = result.weighted
    table = _new_table()
    for name, justify in [
        ("table", "left"),
        ("shape", "right"),
        ("chosen", "left"),
        ("bytes\nbefore → after", "right"),
        ("weighted\nerror" if weighted else "rel. L2\nerror", "right"),
        ("next cheaper\nbytes, error", "left"),
        ("next dearer\nbytes, error", "left"),
    ]:
        table.add_column(name, justify=justify, overflow="fold")  # type: ignore[arg-type]
    for row in result.tables:
        option = row.option
        table.add_row(
            row.key,
            _shape(row.shape),
            option.candidate.label + ("" if option.exact else " *"),
            f"{human_bytes(row.bytes_before)} → {human_bytes(option.bytes)}",
            f"{(option.weighted_error if weighted else option.rel_error):.4f}",
            _option_cell(row.cheaper, weighted),
            _option_cell(row.dearer, weighted),
        )
    goal = (
        f"budget {result.target:g}x" if result.mode == "budget" else f"error E ≤ {result.target:g}"
    )
    title = f"{', '.join(str(p) for p in result.inputs)}: plan for {goal}"
    parts: list[Any] = [_titled(title, table), Text(plan_totals(result))]
    sampled = [f"{row.key} ({row.sampled_rows} rows)" for row in result.tables if row.sampled_rows]
    if sampled:
        parts.append(
            Text(
                "errors of the other options estimated on row samples: " + ", ".join(sampled),
                style="dim",
            )
        )
    parts.append(_frontier_table(result, frontier_points))
    return Group(*parts)


def plan_totals(result: PlanResult) -> str:
    """Returns the plan's totals and how it compares with the best uniform setting, one line each."""
    kind = "row-weighted error E" if result.weighted else "error E"
    how = "measured on the whole tables" if result.verified else "estimated"
    lines = [
        f"plan: {result.bytes:,} bytes of {result.bytes_before:,} ({result.ratio:.4f}x), "
        f"{kind} {result.error:.4f} ({how})"
    ]
    best = result.best_uniform
    if best is None:
        lines.append("no uniform setting meets the target")
    else:
        if result.mode == "budget":
            gain = 1 - result.error / best.error if best.error else 0.0
            compare = f"the plan has {gain:.1%} less error"
        else:
            gain = 1 - result.bytes / best.bytes if best.bytes else 0.0
            compare = f"the plan takes {gain:.1%} fewer bytes"
        lines.append(
            f"best uniform setting: {best.label}: {best.bytes:,} bytes "
            f"({best.bytes / result.bytes_before:.4f}x), {kind} {best.error:.4f}; {compare}"
        )
    return "\n".join(lines)


def _frontier_table(result: PlanResult, count: int) -> Group:
    points = result.frontier
    if len(points) > count:
        step = (len(points) - 1) / (count - 1)
        points = [points[round(i * step)] for i in range(count)]
    rows = [(p.bytes, p.error, "") for p in points]
    rows.append((result.bytes, result.error, "◀ plan"))
    if result.best_uniform is not None:
        best = result.best_uniform
        rows.append((best.bytes, best.error, f"◀ best uniform setting ({best.label})"))
    table = _new_table()
    for name in ("bytes", "ratio", "error E", ""):
        table.add_column(name, justify="right" if name else "left")
    for size, error, mark in sorted(rows, key=lambda row: (row[0], row[2] == "")):
        table.add_row(
            f"{size:,}",
            f"{size / result.bytes_before:.4f}x" if result.bytes_before else "-",
            f"{error:.4f}",
            mark,
            style="bold" if mark else None,
        )
    return _titled(
        "the model's frontier (convex hull of the per-table choices), the plan and the best "
        "uniform setting:",
        table,
    )


def check_plot_path(path: Path) -> None:
    """Checks that a plan plot can be written to `path`.

    Raises UsageError for a suffix other than .png/.svg, or when matplotlib is not installed.
    """
    from sparqcli.errors import UsageError

    if path.suffix.lower() not in PLOT_SUFFIXES:
        raise UsageError(
            f"{{opt:plot}} {path}: must end in .png or .svg, got '{path.suffix}'",
            path=path,
            option="plot",
        )
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UsageError(
            f"{{opt:plot}} needs matplotlib, which is not installed: {PLOT_INSTALL}",
            option="plot",
        ) from None


def plan_plot(result: PlanResult, path: Path) -> Path:
    """Draws the model's error-vs-bytes frontier, the uniform settings and the plan to `path`
    (PNG or SVG, by its suffix), atomically; returns `path`.

    Raises UsageError (see `check_plot_path`), OutputError when the file cannot be written.
    """
    check_plot_path(path)
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from sparqcli.sinks import atomic_output

    before = result.bytes_before or 1
    kind = "row-weighted error E" if result.weighted else "error E (relative L2)"
    with matplotlib.rc_context({"svg.hashsalt": "sparq", "svg.fonttype": "none"}):
        figure = Figure(figsize=(7, 4.5), dpi=100)
        FigureCanvasAgg(figure)
        axes = figure.add_subplot()
        frontier = result.frontier
        axes.plot(
            [p.bytes / before for p in frontier],
            [p.error for p in frontier],
            "-",
            color="tab:blue",
            linewidth=1.5,
            label="model frontier (per-table settings)",
        )
        if result.uniform:
            axes.scatter(
                [p.bytes / before for p in result.uniform],
                [p.error for p in result.uniform],
                s=12,
                color="0.6",
                label="uniform settings",
                zorder=2,
            )
        best = result.best_uniform
        if best is not None:
            axes.scatter(
                [best.bytes / before],
                [best.error],
                s=70,
                facecolors="none",
                edgecolors="black",
                label=f"best uniform: {best.label}",
                zorder=3,
            )
        axes.scatter(
            [result.ratio],
            [result.error],
            marker="*",
            s=160,
            color="tab:red",
            label=f"plan: {result.ratio:.3f}x, E {result.error:.3f}",
            zorder=4,
        )
        if result.mode == "budget":
            axes.axvline(result.target, color="tab:red", linestyle=":", linewidth=1)
        else:
            axes.axhline(result.target, color="tab:red", linestyle=":", linewidth=1)
        axes.set_xscale("log")
        axes.set_xlabel("compressed bytes / original bytes (tables)")
        axes.set_ylabel(kind)
        axes.grid(True, which="both", linewidth=0.3)
        axes.legend(fontsize=8)
        names = ", ".join(p.name for p in result.inputs)
        axes.set_title(f"sparq plan: {names}", fontsize=10)
        figure.tight_layout()
        suffix = path.suffix.lower()[1:]
        metadata = {"Date": None} if suffix == "svg" else {"Software": None}
        with atomic_output(path) as temp:
            figure.savefig(temp, format=suffix, metadata=metadata)
    return path
