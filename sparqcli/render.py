"""Presentation: compression reports, inspections and rule matches as text tables and JSON.

Nothing here computes; every number comes from the result objects it is given.

Every table is laid out for the width it is printed at, and never wrapped: one line per table
(or tensor), no cell broken inside a token. When the columns do not fit, the key column (and
then any other shortenable column) is shortened in the middle with an ellipsis that keeps both
ends (`embeddings.wor…ings.weight`); when even that does not fit, lines run past the width
rather than wrap. Printed to a pipe (`PIPED_WIDTH`), nothing is shortened: whole keys, one line
per table, whatever the terminal's width, so scripts can grep the output.

Columns are data: a `Column` names its header, how to get its cell from a row and whether it
shows only under `--wide`; adding a statistic or a setting is one entry in a column list.
Numbers are shown with 3 significant digits and their unit.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar

from rich.cells import cell_len
from rich.console import Console, ConsoleOptions, Group, RenderResult
from rich.text import Text

from sparqcli.planning.result import error_text
from sparqcli.results import CheckpointInspection
from sparqcli.results import to_json as to_json  # the one JSON writer, for the CLI

if TYPE_CHECKING:
    from pathlib import Path

    from sparqcli.format.reader import CompressedFileInfo
    from sparqcli.planning.measure import Option
    from sparqcli.planning.result import PlanResult
    from sparqcli.results import CompressReport, FileReport, FolderReport, SkippedTable, TableReport
    from sparqcli.select import Selection

PIPED_WIDTH = 1 << 16
"""The console width for output that is not a terminal: wide enough that nothing is shortened."""

_ORDER_LABEL = {"sparsify-first": "S→Q", "quantize-first": "Q→S"}
_GAP = "  "  # between two columns
_ELLIPSIS = "…"
_KEY_MIN = 12  # a key column is never shortened below this many cells
_OTHER_MIN = 9  # nor any other shortenable column (a rule label) below this
_MIN_TAIL = 4  # a shortened key keeps at least this much of its end

T = TypeVar("T")
Justify = Literal["left", "right"]


# ---------------------------------------------------------------------------------------------
# Numbers


def human_bytes(count: float | None) -> str:
    """Returns a byte count in binary units with 3 significant digits (`1.50 MiB`, `424 B`);
    whole bytes below 1 KiB; `-` for None."""
    if count is None:
        return "-"
    value = float(count)
    if abs(value) < 1024:
        return f"{value:.0f} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if abs(float(f"{value:.3g}")) < 1000 or unit == "TiB":
            return f"{_sig(value)} {unit}"
    raise AssertionError("unreachable")  # pragma: no cover


def _sig(value: float | None) -> str:
    """Returns `value` with 3 significant digits (`0.412`, `39.1`, `250`, `1.00`); `-` when it
    is None or not finite; scientific notation below 0.001 and from a million up."""
    if value is None or not math.isfinite(value):
        return "-"
    value = float(f"{value:.3g}") + 0.0  # rounded; no negative zero
    if value == 0:
        return "0"
    magnitude = math.floor(math.log10(abs(value)))
    if magnitude < -3 or magnitude >= 6:
        return f"{value:.2e}"
    return f"{value:.{max(0, 2 - magnitude)}f}"


def _percent(fraction: float | None) -> str:
    """Returns a fraction as a percentage with up to 3 significant digits (`50%`, `50.1%`)."""
    if fraction is None or not math.isfinite(fraction):
        return "-"
    value = fraction * 100
    if value == 0:
        return "0%"
    if 0 < value < 0.01:
        return "<0.01%"
    text = f"{value:.3g}"
    if text == "100" and value < 100:
        text = "99.9"
    return f"{text}%"


def _shape(shape: Sequence[int]) -> str:
    return "x".join(str(side) for side in shape) if shape else "scalar"


def _is_number(value: object) -> bool:
    """Returns True for an int or float (a file's statistic may be null: not finite)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def shorten(text: str, width: int) -> str:
    """Returns `text` cut to `width` cells in the middle, keeping both ends around an ellipsis
    (`embeddings.wor…ings.weight`); `text` itself when it fits."""
    if cell_len(text) <= width:
        return text
    if width <= 1:
        return _ELLIPSIS[:width]
    tail = width // 2
    head = width - 1 - tail
    return text[:head] + _ELLIPSIS + text[len(text) - tail :]


def shorten_all(texts: Sequence[str], width: int) -> list[str]:
    """Returns each of `texts` shortened to `width` cells with a middle ellipsis, the ellipsis
    moved off the middle where that keeps keys apart: of the splits (head, tail) tried from the
    middle outwards, each text gets the first whose head and tail no other text shares
    (`embeddings.w…eight`, `embeddings.p…eight` rather than two `embeddi…s.weight`); a text
    that no split tells apart gets the middle one."""
    long = [i for i, text in enumerate(texts) if cell_len(text) > width]
    result = list(texts)
    if not long:
        return result
    if width < 2 * _MIN_TAIL + 1:
        return [shorten(text, width) for text in texts]
    middle = width // 2
    tails = sorted(range(_MIN_TAIL, width - _MIN_TAIL), key=lambda t: (abs(t - middle), -t))
    pending = set(long)
    for tail in tails:
        if not pending:
            break
        head = width - 1 - tail
        pairs: dict[tuple[str, str], int] = {}
        for text in texts:
            pair = (text[:head], text[-tail:])
            pairs[pair] = pairs.get(pair, 0) + 1
        for index in sorted(pending):
            text = texts[index]
            if pairs[(text[:head], text[-tail:])] == 1:
                result[index] = text[:head] + _ELLIPSIS + text[len(text) - tail :]
                pending.discard(index)
    for index in pending:
        result[index] = shorten(texts[index], width)
    return result


# ---------------------------------------------------------------------------------------------
# Tables that fit their width


Cell = str | tuple[str, ...]
"""A cell: text, or parts joined by the column's separator, each part aligned within the column
(so the arrows of `250 KiB → 39.1 KiB` line up from row to row)."""


def _bits_label(quantization: Mapping[str, Any]) -> str:
    """Returns a bits cell: `4`, or `4 mse` for MSE ranges."""
    value_range = quantization.get("range", "minmax")
    return str(quantization["bits"]) + ("" if value_range == "minmax" else f" {value_range}")


def _level_label(sparsity: Mapping[str, Any]) -> str:
    """Returns a sparsity-level cell: `50%`, or `50%/row` when blocks are ranked per row."""
    scope = sparsity.get("scope", "table")
    return _percent(sparsity["level"]) + ("" if scope == "table" else f"/{scope}")


@dataclass(frozen=True)
class Column(Generic[T]):
    """One column of a table: its header (`\\n` for two lines), how a row gives its cell,
    its alignment, the separator between a cell's parts, whether only `--wide` shows it, and
    whether it may be shortened in the middle (keys, rule labels) to fit the width."""

    header: str
    cell: Callable[[T], Cell]
    justify: Justify = "right"
    separator: str = ""
    wide: bool = False
    shorten: bool = False


def _columns(columns: Sequence[Column[T]], wide: bool) -> list[Column[T]]:
    return [column for column in columns if wide or not column.wide]


class FitTable:
    """A rich renderable: a title, a table laid out for the console width, and lines after it.

    A title given as pieces (input, `→ output`) is broken between them where it is wider than
    the console, as the lines after the table are. `rows` are (cells, style) pairs: a style
    colours the row's first cell (a failed gate).
    `after` holds lines printed below the table (totals, skipped tables); each is a list of
    clauses, put on one line when they fit and broken between clauses when they do not, or a
    function of the width giving the line.
    """

    def __init__(
        self,
        title: str | Sequence[str],
        columns: Sequence[Column[Any]],
        rows: Sequence[tuple[Sequence[Cell], str]],
        after: Sequence[Sequence[str] | Text | Callable[[int], str]] = (),
    ) -> None:
        self.title = title
        self.columns = list(columns)
        self.rows = list(rows)
        self.after = list(after)

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield from self.lines(options.max_width)

    def lines(self, width: int) -> list[Text]:
        """Returns the rendered lines for a console `width` cells wide."""
        pieces = [self.title] if isinstance(self.title, str) else list(self.title)
        lines = [_line(text) for text in _clauses([p for p in pieces if p], width, " ")]
        if self.rows:
            lines.extend(_table_lines(self.columns, self.rows, width))
        for clauses in self.after:
            if isinstance(clauses, Text):
                lines.append(clauses)
            elif callable(clauses):
                lines.append(_line(clauses(width)))
            else:
                lines.extend(_line(text) for text in _clauses(clauses, width))
        return lines


def _line(text: str, style: str = "") -> Text:
    return Text(_printable(text), style=style, no_wrap=True, overflow="ignore", end="\n")


# Control characters in a key or a path (a newline, a terminal escape) are shown escaped: they
# would break a row or drive the terminal.
_ESCAPES = {
    **{code: f"\\x{code:02x}" for code in (*range(32), 127)},
    ord("\n"): "\\n",
    ord("\r"): "\\r",
    ord("\t"): "\\t",
}


def _printable(text: str) -> str:
    """Returns `text` with its control characters escaped (`\\n`, `\\x1b`)."""
    return text.translate(_ESCAPES)


class _Prose:
    """Lines of prose (notes, totals) broken between words to the console's width, lines after
    a break indented by two spaces; a word (a path) is never broken. Piped, each stays whole."""

    def __init__(self, text: str, style: str = "") -> None:
        self.text = text
        self.style = style

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        for line in self.text.split("\n"):
            words = line.lstrip(" ")
            if not words:
                yield _line(line, self.style)
                continue
            indent = line[: len(line) - len(words)]
            width = options.max_width - len(indent)
            for part in _clauses(words.split(" "), width, " "):
                yield _line(indent + part, self.style)


def _clauses(clauses: Sequence[str], width: int, separator: str = ", ") -> list[str]:
    """Returns `clauses` joined by `separator` on as few lines as fit `width` (a broken line
    ends with the separator's mark, `,`); lines after the first are indented by two spaces. A
    clause is never broken."""
    lines: list[str] = []
    current = ""
    for clause in clauses:
        candidate = f"{current}{separator}{clause}" if current else clause
        if current and cell_len(candidate) > width:
            lines.append(current + separator.rstrip())
            current = "  " + clause
        else:
            current = candidate
    if current:
        lines.append(current)
    return lines


def _parts(cell: Cell) -> tuple[str, ...]:
    return (cell,) if isinstance(cell, str) else cell


def _table_lines(
    columns: Sequence[Column[Any]], rows: Sequence[tuple[Sequence[Cell], str]], width: int
) -> list[Text]:
    # Each column: the widths of its cells' parts (aligned part by part), then its width.
    part_widths: list[list[int]] = []
    widths: list[int] = []
    for index, column in enumerate(columns):
        parts = [_parts(cells[index]) for cells, _ in rows]
        count = max(len(p) for p in parts)
        sizes = [
            max((cell_len(p[i]) for p in parts if len(p) > i), default=0) for i in range(count)
        ]
        part_widths.append(sizes)
        content = sum(sizes) + cell_len(column.separator) * (count - 1)
        header = max(cell_len(line) for line in column.header.split("\n"))
        widths.append(max(content, header))
    # Shorten the shortenable columns, the key (the first) last, until the table fits.
    excess = sum(widths) + len(_GAP) * (len(widths) - 1) - width
    order = [i for i, c in enumerate(columns) if c.shorten and i] + [0] * columns[0].shorten
    for index in order:
        column = columns[index]
        if excess <= 0:
            break
        floor = _KEY_MIN if index == 0 else _OTHER_MIN
        header = max(cell_len(line) for line in column.header.split("\n"))
        cut = min(excess, widths[index] - max(floor, header))
        if cut > 0:
            widths[index] -= cut
            excess -= cut
    header_rows = max(column.header.count("\n") + 1 for column in columns)
    lines: list[Text] = []
    for level in range(header_rows):
        texts = []
        for column, size in zip(columns, widths, strict=True):
            header_lines = column.header.split("\n")
            header_lines = [""] * (header_rows - len(header_lines)) + header_lines
            texts.append(_justify(header_lines[level], size, column.justify))
        lines.append(_line(_GAP.join(texts).rstrip(), "bold"))
    lines.append(_line("─" * (sum(widths) + len(_GAP) * (len(widths) - 1))))
    shortened = {
        index: shorten_all([str(cells[index]) for cells, _ in rows], widths[index])
        for index, column in enumerate(columns)
        if column.shorten
    }
    for number, (cells, style) in enumerate(rows):
        line = Text(no_wrap=True, overflow="ignore", end="\n")
        for index, (column, size) in enumerate(zip(columns, widths, strict=True)):
            parts = _parts(cells[index])
            if len(parts) == 1:
                text = shortened[index][number] if index in shortened else parts[0]
            else:
                text = column.separator.join(
                    _justify(part, part_size, column.justify)
                    for part, part_size in zip(parts, part_widths[index], strict=False)
                )
            if index:
                line.append(_GAP)
            line.append(_justify(text, size, column.justify), style=style if index == 0 else "")
        line.rstrip()
        lines.append(line)
    return lines


def _justify(text: str, width: int, justify: Justify) -> str:
    pad = max(0, width - cell_len(text))
    return text + " " * pad if justify == "left" else " " * pad + text


def print_report(console: Console, renderable: Any) -> None:
    """Prints `renderable`; lines wider than the console run past it instead of wrapping."""
    console.print(renderable, crop=False)


# ---------------------------------------------------------------------------------------------
# compress: the summary, and the dry-run plan


def _stat(name: str) -> Callable[[TableReport], str]:
    return lambda row: _sig(getattr(row.stats, name))


SUMMARY_COLUMNS: list[Column[TableReport]] = [
    Column("table", lambda row: row.key, "left", shorten=True),
    Column("shape", lambda row: _shape(row.shape)),
    Column("dtype", lambda row: row.dtype, "left", wide=True),
    Column("order", lambda row: _ORDER_LABEL.get(row.order, row.order), "left", wide=True),
    Column("bits", lambda row: _bits_label(row.rule.quantization.to_dict())),
    Column(
        "sparsity\n→ zeros",
        lambda row: (_level_label(row.rule.sparsity.to_dict()), _percent(row.stats.zero_fraction)),
        separator="→",
    ),
    Column("pruned", lambda row: _percent(row.stats.pruned_fraction), wide=True),
    Column(
        "scale\nmin / median / max",
        lambda row: (
            _sig(row.stats.scale_min),
            _sig(row.stats.scale_median),
            _sig(row.stats.scale_max),
        ),
        separator=" / ",
        wide=True,
    ),
    Column(
        "zero point\nrange",
        lambda row: (_sig(row.stats.zero_point_min), _sig(row.stats.zero_point_max)),
        separator="…",
        wide=True,
    ),
    Column("rel.\nerror", _stat("rel_error")),
    Column("mean\ncosine", _stat("row_cosine_mean"), wide=True),
    Column("worst\ncosine", _stat("row_cosine_min")),
    Column(
        "bytes\nbefore→after",
        lambda row: (human_bytes(row.bytes_before), human_bytes(row.bytes_after)),
        separator="→",
    ),
    Column("ratio", lambda row: f"{_sig(row.bytes_ratio)}x", wide=True),
]
"""The summary's columns, in order; `wide` ones only under `--wide` (JSON always has all)."""

PLAN_COLUMNS: list[Column[TableReport]] = [
    Column("table", lambda row: row.key, "left", shorten=True),
    Column("shape", lambda row: _shape(row.shape)),
    Column("dtype", lambda row: row.dtype, "left", wide=True),
    Column("rule", lambda row: f"layers[{row.rule.index}]", "left"),
    Column("order", lambda row: row.order, "left", wide=True),
    Column("bits", lambda row: _bits_label(row.rule.quantization.to_dict())),
    Column("scales", lambda row: row.rule.quantization.scale_dtype, "left", wide=True),
    Column("sparsity", lambda row: _level_label(row.rule.sparsity.to_dict())),
    Column("block", lambda row: _shape(row.rule.sparsity.block_shape)),
    Column(
        "zeros/block",
        lambda row: (
            "all"
            if row.rule.sparsity.zeros_per_block is None
            else str(row.rule.sparsity.zeros_per_block)
        ),
        wide=True,
    ),
    Column("norm", lambda row: row.rule.sparsity.norm, "left", wide=True),
    Column("bytes", lambda row: human_bytes(row.bytes_before)),
]
"""The dry-run plan's columns (the settings each table will get)."""


def compress_summary(report: CompressReport, *, wide: bool = False) -> Group:
    """Returns the summary of a compress run (or the plan of a dry run): one table per file,
    its totals and the tables it skipped. `wide` shows every statistic."""
    parts: list[Any] = []
    # A folder's totals follow its last shard.
    last_shard = {id(folder.shards[-1]): folder for folder in report.folders if folder.shards}
    for file in report.files:
        if file.tables:
            parts.append(_plan_table(file, wide) if report.dry_run else _file_table(file, wide))
        elif file.output is None:  # a shard of a folder that held only aliases
            parts.append(_Prose(f"{file.input}: no shard written"))
        else:  # a shard of a folder with no selected table
            line = f"{file.input} → {file.output}: no table selected here"
            if file.written:
                line += (
                    f"; file {human_bytes(file.input_bytes)} → {human_bytes(file.output_bytes)}, "
                    f"tensors passed through, {file.seconds:.2f} s"
                )
            parts.append(_Prose(line))
        parts.extend(_Prose(note) for note in _table_notes(file))
        if id(file) in last_shard:
            parts.append(_folder_totals(last_shard[id(file)], report.dry_run))
    outputs = len(report.files) - sum(len(f.shards) - 1 for f in report.folders if f.shards)
    if outputs > 1 and not report.dry_run:
        in_folders = {id(shard) for folder in report.folders for shard in folder.shards}
        singles = [f for f in report.files if id(f) not in in_folders]
        # the outputs written (a file a gate stopped has no output to weigh against its input)
        written = [f for f in (*singles, *report.folders) if f.written]
        before = sum(f.input_bytes for f in written)
        after = sum(f.output_bytes or 0 for f in written)
        unwritten = len(singles) + len(report.folders) - len(written)
        total = f"all files: {human_bytes(before)} → {human_bytes(after)} in {report.seconds:.2f} s"
        if unwritten:
            total += f" ({unwritten} not written, not counted)"
        parts.append(_Prose(total))
    return Group(*parts)


def _rows(
    columns: Sequence[Column[T]], items: Iterable[T], style: Callable[[T], str] = lambda _: ""
) -> list[tuple[list[Cell], str]]:
    return [
        ([_printable_cell(column.cell(item)) for column in columns], style(item)) for item in items
    ]


def _printable_cell(cell: Cell) -> Cell:
    return _printable(cell) if isinstance(cell, str) else tuple(_printable(p) for p in cell)


def _file_table(file: FileReport, wide: bool) -> FitTable:
    columns = _columns(SUMMARY_COLUMNS, wide)
    tables = [row for row in file.tables if row.stats is not None]
    rows = _rows(columns, tables, lambda row: "bold red" if row.gate_failures else "")
    return FitTable(
        [str(file.input), f"→ {file.output}"],
        columns,
        rows,
        [_file_totals(file), *_skipped_lines(file.skipped)],
    )


def _plan_table(file: FileReport, wide: bool) -> FitTable:
    columns = _columns(PLAN_COLUMNS, wide)
    total = human_bytes(sum(t.bytes_before for t in file.tables))
    return FitTable(
        [str(file.input), f"→ {file.output}", "(dry run: nothing written)"],
        columns,
        _rows(columns, file.tables),
        [
            [f"{len(file.tables)} table(s) selected", f"{total} of tables"],
            _rule_legend(file),
            *_skipped_lines(file.skipped),
        ],
    )


def _rule_legend(file: FileReport) -> list[str]:
    """Returns the rules the plan's tables use, as clauses: `layers[1] (match 'bags.*')`."""
    labels = {table.rule.index: table.rule.label for table in file.tables}
    return [
        "rules: " + labels[index] if n == 0 else labels[index]
        for n, index in enumerate(sorted(labels))
    ]


def _file_totals(file: FileReport) -> Sequence[str] | Text:
    if not file.written:
        failed = len(file.gate_failures)
        return Text(
            f"not written: {failed} gate(s) failed"
            if failed
            else "not written: its folder failed a gate",
            style="bold red",
            no_wrap=True,
            overflow="ignore",
        )
    facts = file.to_dict()
    clauses = [
        f"file {human_bytes(file.input_bytes)} → {human_bytes(file.output_bytes)} "
        f"({_sig(facts['ratio'])}x)",
        f"{_sig(facts['bits_per_weight'])} bits/weight over {len(file.tables)} table(s)",
        f"{file.seconds:.2f} s",
    ]
    if file.dropped:
        clauses.append(f"entries not kept: {', '.join(file.dropped)}")
    return clauses


def _skipped_lines(skipped: Sequence[SkippedTable]) -> list[Callable[[int], str]]:
    """Returns one line per skipped table, `skipped KEY (SIZE): why`, the key shortened (keys
    kept apart) when the line is wider than the console."""

    def line(index: int) -> Callable[[int], str]:
        table = skipped[index]

        def fit(width: int) -> str:
            rest = f" ({human_bytes(table.bytes)}): {table.reason}"
            room = max(_KEY_MIN, width - cell_len("skipped ") - cell_len(rest))
            key = shorten_all([t.key for t in skipped], room)[index]
            return f"skipped {key}{rest}"

        return fit

    return [line(index) for index in range(len(skipped))]


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
            lines.append(
                f"{table.key}: {stats.zero_rows} all-zero row(s) ({_percent(share)} of rows)"
            )
    return lines + list(file.notes)


def _folder_totals(folder: FolderReport, dry_run: bool) -> _Prose:
    tables = len(folder.tables)
    head = (
        f"folder {folder.input} → {folder.output}: {len(folder.shards)} shard(s), {tables} table(s)"
    )
    notes = "".join(f"\n{note}" for note in folder.notes if note not in _shard_notes(folder))
    if dry_run:
        return _Prose(
            f"{head}, {len(folder.copied)} file(s) to copy (dry run: nothing written){notes}"
        )
    if not folder.written:
        return _Prose(
            f"{head}: not written, {len(folder.gate_failures)} gate(s) failed{notes}",
            style="bold red",
        )
    facts = folder.to_dict()
    bits = facts["bits_per_weight"]
    return _Prose(
        f"{head}, {len(folder.copied)} file(s) copied: {human_bytes(folder.input_bytes)} → "
        f"{human_bytes(folder.output_bytes)} ({facts['ratio']:.3f}x)"
        + (f", {bits:.2f} bits/weight over its tables" if bits is not None else "")
        + f", {folder.seconds:.2f} s{notes}"
    )


def _shard_notes(folder: FolderReport) -> set[str]:
    return {note for shard in folder.shards for note in shard.notes}


# ---------------------------------------------------------------------------------------------
# inspect


CHECKPOINT_COLUMNS: list[Column[Any]] = [
    Column("key", lambda entry: entry.key, "left", shorten=True),
    Column("shape", lambda entry: _shape(entry.info.shape)),
    Column("dtype", lambda entry: entry.info.dtype, "left"),
    Column("size", lambda entry: human_bytes(entry.info.nbytes)),
    Column(
        "candidate",
        lambda entry: "+".join(entry.candidate.reasons) if entry.candidate.is_candidate else "",
        "left",
    ),
    Column("why", lambda entry: entry.candidate.why, "left", wide=True, shorten=True),
]
"""The columns of a plain checkpoint's inspection; `candidate` says by which evidence
(type, name, shape) a tensor is a candidate table."""


def checkpoint_table(inspection: CheckpointInspection, *, wide: bool = False) -> FitTable:
    """Returns the inspection of a plain checkpoint: every tensor, candidates marked with why."""
    candidates = sum(1 for entry in inspection.tensors if entry.candidate.is_candidate)
    title = [
        f"{inspection.path}:",
        f"{len(inspection.tensors)} tensors,",
        f"{candidates} candidate table(s)",
    ]
    columns = _columns(CHECKPOINT_COLUMNS, wide)
    return FitTable(title, columns, _rows(columns, inspection.tensors))


def _file_stat(entry: dict[str, Any], name: str) -> float | None:
    value = (entry.get("stats") or {}).get(name)
    return float(value) if _is_number(value) else None


COMPRESSED_COLUMNS: list[Column[tuple[str, dict[str, Any]]]] = [
    Column("table", lambda item: item[0], "left", shorten=True),
    Column("shape", lambda item: _shape(item[1]["shape"])),
    Column("dtype", lambda item: item[1]["dtype"], "left", wide=True),
    Column(
        "order",
        lambda item: _ORDER_LABEL.get(item[1]["order"], item[1]["order"]),
        "left",
        wide=True,
    ),
    Column("bits", lambda item: _bits_label(item[1]["quantization"])),
    Column(
        "sparsity\n→ pruned",
        lambda item: (
            _level_label(item[1]["sparsity"]),
            _percent(_file_stat(item[1], "pruned_fraction")),
        ),
        separator="→",
    ),
    Column("block", lambda item: _shape(item[1]["sparsity"]["block_shape"]), wide=True),
    Column("rel.\nerror", lambda item: _sig(_file_stat(item[1], "rel_error"))),
    Column("worst\ncosine", lambda item: _sig(_file_stat(item[1], "row_cosine_min")), wide=True),
    Column("bytes", lambda item: human_bytes(item[1].get("file_bytes"))),
]
"""The columns of a compressed file's inspection."""


def compressed_table(file: CompressedFileInfo, *, wide: bool = False) -> FitTable:
    """Returns the inspection of a compressed file: its tables with settings, sparsity and bytes."""
    info = file.to_dict()
    tables = info["tables"]
    title = [
        f"{file.path}:",
        f"sparq format {info['format_version']},",
        f"{len(tables)} compressed table(s),",
        human_bytes(file.file_bytes),
    ]
    columns = _columns(COMPRESSED_COLUMNS, wide)
    return FitTable(title, columns, _rows(columns, tables.items()))


def inspection(
    result: CheckpointInspection | CompressedFileInfo, *, wide: bool = False
) -> FitTable:
    """Returns what `sparq inspect` prints for either kind of file."""
    if isinstance(result, CheckpointInspection):
        return checkpoint_table(result, wide=wide)
    return compressed_table(result, wide=wide)


# ---------------------------------------------------------------------------------------------
# validate


SELECTION_COLUMNS: list[Column[tuple[str, str, str, str]]] = [
    Column("key", lambda item: item[0], "left", shorten=True),
    Column("rule", lambda item: item[1], "left"),
    Column("size", lambda item: item[2]),
    Column("outcome", lambda item: item[3], "left"),
]
"""The columns of `validate`'s matches: one line per (rule, matched tensor)."""


def selection_table(selection: Selection, source: str) -> FitTable:
    """Returns, for `sparq validate CFG CKPT`, each rule and the tensors it matches: one line
    per match, saying whether the rule selects it, or why not; the rules spelled out below."""
    sizes = {key: info.nbytes for key, info in selection.infos.items()}
    items: list[tuple[str, str, str, str]] = []
    for match in selection.matches:
        outcomes = (
            [(key, "selected") for key in match.won]
            + [(key, "earlier rule wins") for key in match.shadowed]
            + [(key, "excluded") for key in match.excluded]
            + [(key, "skipped: < min_table_bytes") for key in match.skipped]
        )
        label = f"layers[{match.rule.index}]"
        items.extend((key, label, human_bytes(sizes.get(key)), what) for key, what in outcomes)
    title = [f"{source}:", f"{len(selection.tables)} table(s) selected"]
    if selection.skipped:
        title[-1] += f", {len(selection.skipped)} skipped"
    legend = [
        "rules: " + match.rule.label if n == 0 else match.rule.label
        for n, match in enumerate(selection.matches)
    ]
    return FitTable(
        title,
        SELECTION_COLUMNS,
        _rows(SELECTION_COLUMNS, items),
        [legend, *_skipped_lines(selection.skipped)],
    )


# ---------------------------------------------------------------------------------------------
# Plans (`sparq plan`)

PLOT_SUFFIXES = (".png", ".svg")
PLOT_INSTALL = "pip install 'sparqcli[plot]' (or: pip install matplotlib)"


def _option_cell(option: Option | None, weighted: bool) -> str:
    if option is None:
        return "-"
    error = option.weighted_error if weighted else option.rel_error
    return f"{option.candidate.label}: {human_bytes(option.bytes)}, {_sig(error)}"


def _plan_columns(weighted: bool) -> list[Column[Any]]:
    def error(option: Option) -> float:
        return option.weighted_error if weighted else option.rel_error

    return [
        Column("table", lambda row: row.key, "left", shorten=True),
        Column("shape", lambda row: _shape(row.shape)),
        Column(
            "chosen",
            lambda row: row.option.candidate.label + ("" if row.option.exact else " *"),
            "left",
        ),
        Column(
            "bytes\nbefore→after",
            lambda row: (human_bytes(row.bytes_before), human_bytes(row.option.bytes)),
            separator="→",
        ),
        Column(
            "weighted\nerror" if weighted else "rel.\nerror", lambda row: _sig(error(row.option))
        ),
        Column("next cheaper", lambda row: _option_cell(row.cheaper, weighted), "left", wide=True),
        Column("next dearer", lambda row: _option_cell(row.dearer, weighted), "left", wide=True),
    ]


def plan_summary(result: PlanResult, frontier_points: int = 12, *, wide: bool = False) -> Group:
    """Returns what `sparq plan` prints: the tables' choices, the totals, the model's frontier.
    `wide` adds each table's next cheaper and next dearer option."""
    columns = _columns(_plan_columns(result.weighted), wide)
    goal = (
        f"budget {result.target:g}x" if result.mode == "budget" else f"error E ≤ {result.target:g}"
    )
    title = [f"{', '.join(str(p) for p in result.inputs)}:", f"plan for {goal}"]
    after: list[Any] = list(_plan_total_clauses(result))
    sampled = [f"{row.key} ({row.sampled_rows} rows)" for row in result.tables if row.sampled_rows]
    if sampled:
        after.append(["errors of the other options estimated on row samples", *sampled])
    if len({str(table.source) for table in result.tables}) > 1:
        after.append(
            [
                "the plan names tables of several files: `sparq compress` checks every rule "
                "against each input, so use it for these files only as one model folder"
            ]
        )
    for table in result.tables:
        if table.option.rel_error >= 1.0:
            after.append(
                [
                    f"{table.key}: relative error {error_text(table.option.rel_error)} with the "
                    "chosen setting, no better than decoding the table to zeros"
                ]
            )
        if table.refused:
            first = table.refused[0]
            after.append(
                [
                    f"{table.key}: the engine refuses {len(table.refused)} of "
                    f"{len(table.options)} settings (never chosen), "
                    f"first {first.candidate.label}: {first.refused}"
                ]
            )
    return Group(
        FitTable(title, columns, _rows(columns, result.tables), after),
        _frontier_table(result, frontier_points),
    )


def _compared(gain: float, better: str, worse: str) -> str:
    """Returns how the plan compares with the best uniform setting: `the plan has 8.0% less
    error`, or, where an estimate puts the uniform setting ahead, `... 1.8% more error`."""
    verb = "takes" if "bytes" in better else "has"
    return f"the plan {verb} {abs(gain):.1%} {better if gain >= 0 else worse}"


def plan_totals(result: PlanResult) -> str:
    """Returns the plan's totals and how it compares with the best uniform setting, one line each."""
    return "\n".join(", ".join(clauses) for clauses in _plan_total_clauses(result))


def _plan_total_clauses(result: PlanResult) -> list[list[str]]:
    """Returns the lines of `plan_totals`, each as the clauses a narrow console breaks it at."""
    kind = "row-weighted error E" if result.weighted else "error E"
    how = "measured on the whole tables" if result.verified else "estimated"
    lines = [
        [
            f"plan: {result.bytes:,} bytes of {result.bytes_before:,} ({result.ratio:.4f}x)",
            f"{kind} {error_text(result.error)} ({how})",
        ]
    ]
    best = result.best_uniform
    if best is None:
        lines.append(["no uniform setting meets the target"])
    else:
        if (best.bytes, best.error) == (result.bytes, result.error):
            compare = "the plan gives the same bytes and error"
        elif result.mode == "budget":
            gain = 1 - result.error / best.error if best.error else 0.0
            compare = _compared(gain, "less error", "more error")
        else:
            gain = 1 - result.bytes / best.bytes if best.bytes else 0.0
            compare = _compared(gain, "fewer bytes", "more bytes")
        # a uniform setting's error is the samples' estimate unless every table measured it
        estimated = " (estimated)" if result.verified and not best.exact else ""
        lines.append(
            [
                f"best uniform setting: {best.label}: {best.bytes:,} bytes "
                f"({best.bytes / result.bytes_before:.4f}x)",
                f"{kind} {error_text(best.error)}{estimated}; {compare}",
            ]
        )
    return lines


FRONTIER_COLUMNS: list[Column[tuple[int, float, float | None, str]]] = [
    Column("bytes", lambda item: f"{item[0]:,}"),
    Column("ratio", lambda item: "-" if item[2] is None else f"{item[2]:.4f}x"),
    Column("error E", lambda item: error_text(item[1])),
    Column("", lambda item: item[3], "left"),
]
"""The columns of the model's frontier under a plan."""


def _frontier_table(result: PlanResult, count: int) -> FitTable:
    points = result.frontier
    if len(points) > count:
        step = (len(points) - 1) / (count - 1)
        points = [points[round(i * step)] for i in range(count)]
    marks = [(p.bytes, p.error, "") for p in points]
    marks.append((result.bytes, result.error, "◀ plan"))
    if result.best_uniform is not None:
        best = result.best_uniform
        marks.append((best.bytes, best.error, f"◀ best uniform setting ({best.label})"))
    before = result.bytes_before
    items = [
        (size, error, size / before if before else None, mark)
        for size, error, mark in sorted(marks, key=lambda row: (row[0], row[2] == ""))
    ]
    rows = _rows(FRONTIER_COLUMNS, items, lambda item: "bold" if item[3] else "")
    return FitTable(
        [
            "the model's frontier",
            "(convex hull of the per-table choices),",
            "the plan and the best uniform setting:",
        ],
        FRONTIER_COLUMNS,
        rows,
    )


def check_plot_path(
    path: Path, inputs: Sequence[Path] = (), force: bool = False, plan_path: Path | None = None
) -> None:
    """Checks that a plan plot can be written to `path` (not over `inputs` or the plan's own
    `plan_path`, nor over an existing file unless `force`).

    Raises UsageError for a suffix other than .png/.svg, an existing file, the plan's path, or
    when matplotlib is not installed.
    """
    from pathlib import Path

    from sparqcli.errors import UsageError
    from sparqcli.sinks import check_output_path

    if plan_path is not None and Path(path).resolve() == Path(plan_path).resolve():
        raise UsageError(
            f"{{opt:plot}} {path}: is where the plan goes; draw the plot elsewhere",
            path=path,
            option="plot",
        )
    check_output_path(path, [Path(p) for p in inputs], force)
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


def plan_plot(result: PlanResult, path: Path, force: bool = False) -> Path:
    """Draws the model's error-vs-bytes frontier, the uniform settings and the plan to `path`
    (PNG or SVG, by its suffix), atomically, replacing an existing file only with `force`;
    returns `path`.

    Raises UsageError (see `check_plot_path`), OutputError when the file cannot be written.
    """
    check_plot_path(path, force=force)
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
            label=f"plan: {result.ratio:.3f}x, E {error_text(result.error)}",
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
        with atomic_output(path, replace=force) as temp:
            figure.savefig(temp, format=suffix, metadata=metadata)
    return path
