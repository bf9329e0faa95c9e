"""Rendering: the summary table at a fixed width (golden), JSON, inspections."""

from __future__ import annotations

import io
import json
from pathlib import Path

from rich.console import Console

from sparqcli.compress import CompressReport, FileReport, TableReport
from sparqcli.config import parse_config
from sparqcli.engine.stats import TableStats
from sparqcli.report import compress_summary, human_bytes, to_json

CONFIG = parse_config(
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
            CONFIG.layers[0],
            "sparsify-first",
            256000,
            40000,
            _stats(),
        ),
        TableReport(
            "bags.0.weight",
            (2000, 32),
            "float32",
            CONFIG.layers[1],
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
    console.print(renderable)
    return console.file.getvalue()


GOLDEN = """\
model.pt → model.sparq.safetensors

                                              sparsity                       scale   zero point   rel. L2        row cosine                  bytes
 table             shape   bits   order   target→zeros          min / median / max        range     error        mean / min         before → after
 ─────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────────
 emb.weight      1000x64      8    S→Q       50%→50.1%   0.00123 / 0.0156 / 0.0312    3.2…251.5    0.4123   0.9123 / 0.5123   250.0 KiB → 39.1 KiB
 bags.0.weight   2000x32      4    S→Q       80%→80.3%   0.00123 / 0.0156 / 0.0312    3.2…251.5    0.7712   0.9123 / 0.5123   250.0 KiB → 11.7 KiB

file 507.8 KiB → 58.6 KiB (0.115x), 3.25 bits/weight over 2 table(s), 0.25 s
"""


def _lines(text: str) -> str:
    return "\n".join(line.rstrip() for line in text.splitlines()) + "\n"


def test_summary_table_golden():
    assert _lines(_render(compress_summary(_report()))) == GOLDEN


def test_failed_gate_says_not_written():
    text = _lines(_render(compress_summary(_report(written=False))))
    assert text.splitlines()[-1] == "not written: 1 gate(s) failed"


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
    assert file["tables"][1]["quantization"]["range"] == "minmax"
    assert data["peak_memory_bytes"] == 300 << 20
    assert data["gates_passed"] is True


def test_human_bytes():
    assert [human_bytes(n) for n in (0, 1023, 1024, 1536 * 1024, 3 << 30)] == [
        "0 B",
        "1023 B",
        "1.0 KiB",
        "1.5 MiB",
        "3.0 GiB",
    ]
    assert human_bytes(None) == "-"
