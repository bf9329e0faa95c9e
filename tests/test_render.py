"""Rendering: the summary table at a fixed width (golden), JSON, inspections."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest
from rich.console import Console

from sparqcli.candidates import find_candidates
from sparqcli.config import Config
from sparqcli.dtypes import TensorInfo
from sparqcli.engine.stats import TableStats
from sparqcli.render import (
    PIPED_WIDTH,
    _percent,
    _sig,
    compress_summary,
    human_bytes,
    inspection,
    print_report,
    selection_table,
    shorten,
    shorten_all,
    to_json,
)
from sparqcli.results import (
    CheckpointInspection,
    CompressReport,
    FileReport,
    TableReport,
    TensorEntry,
)
from sparqcli.select import select_tables

CONFIG = Config.from_dict(
    {
        "layers": [
            {"match": "emb.weight"},
            {"match": "bags.*", "quantization": {"bits": 4}, "sparsity": {"level": 0.8}},
        ]
    },
    "cfg.yaml",
)


def _stats(**overrides: float) -> TableStats:
    values = dict(
        values=64000,
        kept=32000,
        pruned_fraction=0.5,
        zero_fraction=0.5012,
        scale_min=0.00123,
        scale_median=0.0156,
        scale_max=0.0312,
        zero_point_min=3.25,
        zero_point_max=251.5,
        rel_error=0.41234,
        row_cosine_mean=0.91234,
        row_cosine_min=0.51234,
    )
    values.update(overrides)
    return TableStats(**values)


def _report(written: bool = True) -> CompressReport:
    tables = [
        TableReport(
            "emb.weight",
            (1000, 64),
            "float32",
            CONFIG.resolved_rules[0],
            "sparsify-first",
            256000,
            40000,
            _stats(),
        ),
        TableReport(
            "bags.0.weight",
            (2000, 32),
            "float32",
            CONFIG.resolved_rules[1],
            "sparsify-first",
            256000,
            12000,
            _stats(pruned_fraction=0.8, zero_fraction=0.8031, rel_error=0.7712),
            gate_failures=[] if written else ["rel_error 0.7712 > max_rel_error 0.5"],
        ),
    ]
    file = FileReport(
        Path("model.pt"),
        Path("model.sparq.safetensors"),
        "sparq",
        520000,
        tables,
        output_bytes=60000 if written else None,
        output_sha256="ab" * 32 if written else None,
        written=written,
        seconds=0.25,
    )
    return CompressReport(
        CONFIG, [file], dry_run=False, device="cpu", seconds=0.3, peak_memory_bytes=300 << 20
    )


def _render(renderable: object, width: int = 150) -> str:
    console = Console(file=io.StringIO(), width=width, color_system=None, legacy_windows=False)
    print_report(console, renderable)
    return console.file.getvalue()


def _lines(text: str) -> str:
    return "\n".join(line.rstrip() for line in text.splitlines()) + "\n"


# --- golden outputs at 80, 100, 150, 200 columns and piped ---------------------------------------

GOLDEN_DIR = Path(__file__).parent / "golden"
WIDTHS = {"80": 80, "100": 100, "150": 150, "200": 200, "piped": PIPED_WIDTH}
BERT_CONFIG = Config.from_dict(
    {
        "layers": [
            {"match": "re:embeddings\\.\\w+_embeddings\\.weight"},
            {
                "match": "sparse_arch.*",
                "quantization": {"bits": 4},
                "sparsity": {"level": 0.8},
                "gates": {"max_rel_error": 0.75},
            },
        ]
    },
    "cfg.yaml",
)
BERT_TENSORS = {
    "embeddings.word_embeddings.weight": TensorInfo((30522, 384), "float32"),
    "embeddings.position_embeddings.weight": TensorInfo((512, 384), "float32"),
    "embeddings.token_type_embeddings.weight": TensorInfo((2, 384), "float32"),
    "embeddings.LayerNorm.weight": TensorInfo((384,), "float32"),
    "encoder.layer.0.attention.self.query.weight": TensorInfo((384, 384), "float32"),
    "encoder.layer.0.attention.self.query.bias": TensorInfo((384,), "float32"),
    "encoder.layer.0.intermediate.dense.weight": TensorInfo((1536, 384), "float32"),
    "encoder.layer.0.output.dense.weight": TensorInfo((384, 1536), "float32"),
    "sparse_arch.embedding_bag_collection.embedding_bags.t_cat_0.weight": TensorInfo(
        (1000000, 64), "float32"
    ),
    "pooler.dense.weight": TensorInfo((384, 384), "float32"),
    "step": TensorInfo((), "int64"),
}
LONG_KEY = "sparse_arch.embedding_bag_collection.embedding_bags.t_cat_0.weight"


def _bert_report(dry_run: bool = False) -> CompressReport:
    """A compress report over BERT_TENSORS (the real selection, made-up statistics)."""
    selection = select_tables(BERT_CONFIG, BERT_TENSORS, "encoder.pt")
    after = [7_800_000, 197_000, 8_450_000]
    stats = [
        _stats(zero_fraction=0.5004, rel_error=0.3874, row_cosine_min=0.8123),
        _stats(zero_fraction=0.5, rel_error=0.2991, row_cosine_min=0.9543),
        _stats(pruned_fraction=0.8, zero_fraction=0.80012, rel_error=0.7712, row_cosine_min=0.0),
    ]
    tables = []
    for index, selected in enumerate(selection.tables):
        table = TableReport(
            selected.key,
            selected.info.shape,
            selected.info.dtype,
            selected.rule,
            "sparsify-first",
            selected.info.nbytes,
        )
        if not dry_run:
            table.bytes_after, table.stats = after[index], stats[index]
            table.gate_failures = selected.rule.gates.failures(
                table.stats.rel_error, table.stats.row_cosine_min, table.bytes_ratio
            )
        tables.append(table)
    file = FileReport(
        Path("encoder.pt"),
        Path("encoder.sparq.safetensors"),
        "sparq",
        sum(info.nbytes for info in BERT_TENSORS.values()),
        tables,
        skipped=list(selection.skipped),
    )
    if not dry_run:
        file.output_bytes, file.written, file.seconds = 21_300_000, True, 3.21
        file.output_sha256 = "cd" * 32
    return CompressReport(BERT_CONFIG, [file], dry_run=dry_run, device="cpu", seconds=3.3)


def _bert_inspection() -> CheckpointInspection:
    found = find_candidates(BERT_TENSORS)
    entries = tuple(TensorEntry(key, info, found[key]) for key, info in BERT_TENSORS.items())
    return CheckpointInspection(Path("encoder.pt"), "torch", entries)


OUTPUTS = {
    "summary": lambda: compress_summary(_bert_report()),
    "summary-wide": lambda: compress_summary(_bert_report(), wide=True),
    "dry-run": lambda: compress_summary(_bert_report(dry_run=True)),
    "inspect": lambda: inspection(_bert_inspection()),
    "validate": lambda: selection_table(
        select_tables(BERT_CONFIG, BERT_TENSORS, "encoder.pt"), "encoder.pt"
    ),
}


@pytest.mark.parametrize("width", list(WIDTHS))
@pytest.mark.parametrize("output", list(OUTPUTS))
def test_golden_at_every_width(output: str, width: str) -> None:
    text = _lines(_render(OUTPUTS[output](), WIDTHS[width]))
    golden = GOLDEN_DIR / f"{output}-{width}.txt"
    if os.environ.get("SPARQ_UPDATE_GOLDEN") == "1":
        golden.parent.mkdir(exist_ok=True)
        golden.write_text(text)
    assert text == golden.read_text()


@pytest.mark.parametrize("width", [80, 100, 150, 200])
@pytest.mark.parametrize("output", ["summary", "dry-run", "inspect", "validate"])
def test_compact_tables_fit_and_keep_one_line_per_table(output: str, width: int) -> None:
    lines = _lines(_render(OUTPUTS[output](), width)).splitlines()
    assert max(len(line) for line in lines) <= width
    rows = {"inspect": len(BERT_TENSORS), "validate": 4}.get(output, 3)
    rule = next(i for i, line in enumerate(lines) if line.startswith("───"))
    body = lines[rule + 1 : rule + 1 + rows]
    for line in body:
        # each row: a key (whole, or both ends around an ellipsis), then its cells, unwrapped
        key = line.split("  ")[0].strip()
        head, _, tail = key.partition("…")
        assert any(
            name == key or (tail and name.startswith(head) and name.endswith(tail))
            for name in BERT_TENSORS
        ), line


@pytest.mark.parametrize("dry_run", [False, True])
def test_a_long_title_breaks_between_input_and_output(dry_run: bool) -> None:
    report = _bert_report(dry_run=dry_run)
    source = Path("checkpoints/2026-11-28/encoder-base-uncased-finetuned-step-120000.pt")
    target = Path("release/encoder-base-uncased-finetuned-step-120000.sparq.safetensors")
    report.files[0].input, report.files[0].output = source, target
    lines = _lines(_render(compress_summary(report), 80)).splitlines()
    tail = " (dry run: nothing written)" if dry_run else ""
    title = [str(source), f"  → {target}"] + (["  (dry run: nothing written)"] if dry_run else [])
    assert lines[: len(title)] == title
    assert max(len(line) for line in lines) <= 80
    assert _render(compress_summary(report), PIPED_WIDTH).splitlines()[0] == (
        f"{source} → {target}{tail}"
    )


def test_notes_break_between_words_on_a_narrow_console() -> None:
    report = _bert_report()
    note = (
        "bert.embeddings.word_embeddings.weight: config.json says the output head is tied to it "
        "(tie_word_embeddings); the head is stored once, as an alias of the compressed table"
    )
    report.files[0].notes.append(note)
    lines = _lines(_render(compress_summary(report), 80)).splitlines()
    at = lines.index(next(line for line in lines if line.startswith("bert.embeddings.word_em")))
    end = next((i for i in range(at + 1, len(lines)) if not lines[i].startswith("  ")), len(lines))
    broken = lines[at:end]
    assert len(broken) == 3
    assert all(len(line) <= 80 for line in lines)
    assert " ".join(line.strip() for line in broken) == note
    assert note in _render(compress_summary(report), PIPED_WIDTH).splitlines()


@pytest.mark.parametrize("output", list(OUTPUTS))
def test_piped_output_has_whole_keys(output: str) -> None:
    text = _render(OUTPUTS[output](), PIPED_WIDTH)
    assert "…" not in text.replace("0…255", "").replace("3.25…252", "")
    assert LONG_KEY in text


def test_shorten_keeps_both_ends() -> None:
    assert shorten("embeddings.word_embeddings.weight", 26) == "embeddings.w…ddings.weight"
    # keys that share their ends keep the first character that tells them apart
    assert shorten_all(
        ["embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight"], 18
    ) == ["embeddings.w…eight", "embeddings.p…eight"]
    assert shorten("emb.weight", 26) == "emb.weight"
    assert len(shorten("embeddings.word_embeddings.weight", 12)) == 12


def test_numbers_have_three_significant_digits() -> None:
    assert [_sig(v) for v in (0.41234, 0.00123, 39.0625, 250.0, 1.0, 0.99987, -0.0, 1.5e-7)] == [
        "0.412",
        "0.00123",
        "39.1",
        "250",
        "1.00",
        "1.00",
        "0",
        "1.50e-07",
    ]
    assert [_percent(v) for v in (0.5, 0.5012, 0.0, 0.99999, 0.000001)] == [
        "50%",
        "50.1%",
        "0%",
        "99.9%",
        "<0.01%",
    ]


def test_failed_gate_says_not_written():
    text = _lines(_render(compress_summary(_report(written=False))))
    assert text.splitlines()[-1] == "not written: 1 gate(s) failed"


def test_the_total_of_several_files_counts_the_written_ones():
    report = _report()
    stopped = _report(written=False).files[0]
    stopped.input = Path("other.pt")
    report.files.append(stopped)
    last = _lines(_render(compress_summary(report))).splitlines()[-1]
    assert last == "all files: 508 KiB → 58.6 KiB in 0.30 s (1 not written, not counted)"
    report.files[1] = _report().files[0]
    last = _lines(_render(compress_summary(report))).splitlines()[-1]
    assert last == "all files: 0.992 MiB → 117 KiB in 0.30 s"


def test_control_characters_in_keys_are_shown_escaped():
    report = _report()
    report.files[0].tables[0].key = "emb\n\x1b[2Jweight"
    report.files[0].notes.append("emb\tweight: a note")
    lines = _lines(_render(compress_summary(report), 200)).splitlines()
    row = next(line for line in lines if line.startswith("emb"))
    assert row.startswith("emb\\n\\x1b[2Jweight ")
    assert "emb\\tweight: a note" in lines
    assert (
        "\x1b" not in "".join(lines)
        and len(lines) == len(_lines(_render(compress_summary(_report()), 200)).splitlines()) + 1
    )


def test_report_json_has_the_facts():
    data = json.loads(to_json(_report().to_dict()))
    assert data["sparq_version"] == "0.1.0"
    assert data["config"]["layers"][1]["quantization"]["bits"] == 4
    file = data["files"][0]
    assert file["output_sha256"] == "ab" * 32
    assert file["ratio"] == 60000 / 520000
    assert file["bits_per_weight"] == 8 * 52000 / 128000
    assert file["tables"][1]["stats"]["rel_error"] == 0.7712
    assert file["tables"][0]["sparsity"] == {
        "level": 0.5,
        "block_shape": [1, 4],
        "zeros_per_block": None,
        "norm": "L1",
        "scope": "table",
    }
    assert file["tables"][0]["quantization"]["range"] == "minmax"
    assert data["peak_memory_bytes"] == 300 << 20
    assert data["gates_passed"] is True


def test_human_bytes():
    assert [human_bytes(n) for n in (0, 1023, 1024, 1536 * 1024, 3 << 30)] == [
        "0 B",
        "1023 B",
        "1.00 KiB",
        "1.50 MiB",
        "3.00 GiB",
    ]
    assert [human_bytes(n) for n in (250 * 1024, 40000, 1023 * 1024, 46_882_000)] == [
        "250 KiB",
        "39.1 KiB",
        "0.999 MiB",
        "44.7 MiB",
    ]
    assert human_bytes(None) == "-"
