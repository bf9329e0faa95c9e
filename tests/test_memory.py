"""Memory bound (slow): a 4 GiB float32 table compresses in under 2 GiB of peak RSS.

An 8,000,000 x 128 float32 table (`.safetensors`, written here one chunk of rows at a time, so
the test process never holds it), level 0.8, block (1, 4), 8 bits, compressed by the installed
`sparq compress` CLI in a child process. The bound is checked twice: on the `peak_memory_bytes`
of sparq's own `--report`, and on the child's `ru_maxrss` as the kernel counts it (`os.wait4`).
Then a few row ranges of the output are decoded and checked against the input.

Run with `make test-slow` (about a minute; needs ~4.2 GiB free in the temp folder).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sparqcli.format import read_info, read_table
from sparqcli.sources import open_checkpoint

pytestmark = pytest.mark.slow

ROWS, COLS = 8_000_000, 128
KEY = "embedding.weight"
LIMIT_BYTES = 2 << 30
CONFIG = """\
version: 1
order: sparsify-first
sparsity: {level: 0.8, block_shape: [1, 4]}
quantization: {bits: 8}
layers:
  - match: "embedding.weight"
"""


def write_table(path: Path, rows: int, cols: int, chunk_rows: int = 1 << 16) -> None:
    """Writes a seeded N(0, 1) float32 table as a one-tensor safetensors file, chunk by chunk.

    The safetensors layout: 8-byte little-endian header length, the JSON header (padded with
    spaces to a multiple of 8), then the raw little-endian data.
    """
    header = json.dumps(
        {KEY: {"dtype": "F32", "shape": [rows, cols], "data_offsets": [0, rows * cols * 4]}}
    ).encode()
    header += b" " * (-len(header) % 8)
    generator = torch.Generator().manual_seed(0)
    with open(path, "wb") as file:
        file.write(struct.pack("<Q", len(header)) + header)
        for start in range(0, rows, chunk_rows):
            chunk = torch.randn(min(chunk_rows, rows - start), cols, generator=generator)
            file.write(chunk.numpy().tobytes())


def run_sparq(args: list[str], stderr_path: Path) -> tuple[int, int, str]:
    """Runs the installed `sparq` CLI; returns its exit code, peak RSS in bytes and stderr."""
    sparq = Path(sys.executable).parent / "sparq"
    with open(os.devnull, "wb") as null, open(stderr_path, "wb") as errors:
        child = subprocess.Popen([str(sparq), *args], stdout=null, stderr=errors)
        # wait4's rusage is this one child's own, not the maximum over every child so far.
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
    return child.returncode, usage.ru_maxrss * 1024, stderr_path.read_text(errors="replace")


def test_a_4_gib_table_compresses_in_under_2_gib(tmp_path: Path) -> None:
    table_bytes = ROWS * COLS * 4
    if shutil.disk_usage(tmp_path).free < table_bytes + (512 << 20):
        pytest.skip(f"needs {table_bytes + (512 << 20)} bytes free in {tmp_path}")
    source = tmp_path / "big.safetensors"
    target = tmp_path / "big.sparq.safetensors"
    report_path = tmp_path / "report.json"
    config = tmp_path / "config.yaml"
    config.write_text(CONFIG)
    write_table(source, ROWS, COLS)

    code, child_peak, stderr = run_sparq(
        [
            "compress",
            str(source),
            "--config",
            str(config),
            "-o",
            str(target),
            "--report",
            str(report_path),
            "--quiet",
        ],
        tmp_path / "stderr.txt",
    )

    assert code == 0, stderr
    report = json.loads(report_path.read_text())
    assert report["peak_memory_bytes"] < LIMIT_BYTES, report["peak_memory_bytes"]
    assert child_peak < LIMIT_BYTES, child_peak
    # The child's own count and the kernel's agree (both are its ru_maxrss).
    assert abs(child_peak - report["peak_memory_bytes"]) < 64 << 20

    info = read_info(target).tables[KEY]
    assert info.shape == (ROWS, COLS)
    assert info.kept == ROWS * COLS // 5  # every (1, 4) block is whole: exactly 80 % pruned
    table = read_table(target, KEY)  # compressed form: ~0.6 GiB unpacked, never the dense table
    original = open_checkpoint(source)
    scores = {"kept": [], "pruned": []}
    for start in (0, 3_999_000, ROWS - 1000):
        stop = start + 1000
        rows = original.read_rows(KEY, start, stop)
        decoded = table.decode(start, stop)
        keep = table.value_keep_mask(start, stop)
        assert decoded.shape == rows.shape and decoded.dtype == torch.float32
        assert torch.all(decoded[~keep] == 0)
        # Kept values are within half a quantization step of the original.
        half_step = table.scale[start:stop, None].expand_as(rows) / 2
        assert torch.all((decoded - rows).abs()[keep] <= half_step[keep] * 1.001)
        # Block scores as DataNormSparsifier computes them (avg_pool2d: summed in order, / 4).
        norms = rows.abs().view(1000, COLS // 4, 4)
        block_means = (norms[..., 0] + norms[..., 1] + norms[..., 2] + norms[..., 3]) / 4
        block_kept = keep.view(1000, COLS // 4, 4)[..., 0]
        scores["kept"].append(block_means[block_kept])
        scores["pruned"].append(block_means[~block_kept])
    # One global threshold: every pruned block scores at most what every kept block scores.
    kept_scores, pruned_scores = torch.cat(scores["kept"]), torch.cat(scores["pruned"])
    assert pruned_scores.max() <= kept_scores.min()
    assert 0.75 < pruned_scores.numel() / (pruned_scores.numel() + kept_scores.numel()) < 0.85
