"""Shared helpers for the benchmarks: run a snippet in a fresh process, read its time and peak RSS."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

# The table and settings every file-based benchmark compresses: level 0.8, block (1, 4), 8 bits.
TABLE_KEY = "embedding.weight"
ORDERS = ("sparsify-first", "quantize-first")
CONFIG = f"""\
version: 1
sparsity:
  level: 0.8
  block_shape: [1, 4]
quantization:
  bits: 8
layers:
  - match: "{TABLE_KEY}"
"""

# The sparq command line as this interpreter runs it (also without the console script installed).
SPARQ = [sys.executable, "-m", "sparqcli"]

# Appended to every measured snippet: the child prints one JSON line with its peak RSS.
_FOOTER = """
import json as _json, resource as _resource
print("SPARQ_BENCH " + _json.dumps({"seconds": _seconds, "peak_rss": _resource.getrusage(_resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def run_measured(code: str, *, env: dict[str, str] | None = None) -> dict[str, float]:
    """Returns {"seconds", "peak_rss"} reported by `code` run in a new Python process.

    `code` must set the variable `_seconds` to the time of the measured part.
    Raises RuntimeError with the child's stderr when it fails.
    """
    script = textwrap.dedent(code) + _FOOTER
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"benchmark child failed ({done.returncode}):\n{done.stderr[-4000:]}")
    for line in done.stdout.splitlines():
        if line.startswith("SPARQ_BENCH "):
            return json.loads(line.removeprefix("SPARQ_BENCH "))
    raise RuntimeError(f"benchmark child printed no result:\n{done.stdout[-2000:]}")


def gib(n_bytes: float) -> str:
    """Returns `n_bytes` formatted in GiB with two decimals."""
    return f"{n_bytes / 2**30:.2f} GiB"


def size(n_bytes: float) -> str:
    """Returns `n_bytes` in MiB below 1 GiB, else in GiB (two decimals)."""
    return f"{n_bytes / 2**20:.1f} MiB" if n_bytes < 2**30 else gib(n_bytes)


def run_command(argv: list[str], *, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Runs `argv` as a child process; returns its wall time, CPU time, peak RSS and output.

    The child is reaped with `os.wait4`, whose rusage is that one child's own (the process and
    any children it waited for), so measurements of successive children never mix. The wall
    time covers everything the user waits for: process start, imports, the work, the exit; the
    CPU time (user + system, all threads) is less disturbed by other load on the machine.
    Returns {"seconds", "cpu_seconds", "peak_rss", "returncode", "stdout", "stderr"}.
    """
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        child = subprocess.Popen(argv, stdout=out, stderr=err, env=env)
        _, status, usage = os.wait4(child.pid, 0)
        seconds = time.perf_counter() - start
        child.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return {
            "seconds": seconds,
            "cpu_seconds": usage.ru_utime + usage.ru_stime,
            "peak_rss": usage.ru_maxrss * 1024,
            "returncode": child.returncode,
            "stdout": out.read().decode(errors="replace"),
            "stderr": err.read().decode(errors="replace"),
        }


def write_random_safetensors(
    path: Path, key: str, rows: int, cols: int, *, seed: int = 0, chunk_rows: int = 1 << 16
) -> int:
    """Writes a `rows x cols` float32 table of seeded N(0, 1) values as a one-tensor safetensors file.

    The header is written by hand (the format is 8 bytes of little-endian header length, the JSON
    header padded with spaces to a multiple of 8, then the raw data), and the data one chunk of
    rows at a time, so memory stays at one chunk whatever the table's size. The values depend
    only on `seed` and `chunk_rows`. Returns the file's size in bytes.
    """
    import torch

    data_bytes = rows * cols * 4
    header = json.dumps(
        {key: {"dtype": "F32", "shape": [rows, cols], "data_offsets": [0, data_bytes]}},
        separators=(",", ":"),
    ).encode()
    header += b" " * (-len(header) % 8)
    generator = torch.Generator().manual_seed(seed)
    with open(path, "wb") as file:
        file.write(struct.pack("<Q", len(header)) + header)
        for start in range(0, rows, chunk_rows):
            chunk = torch.randn(min(chunk_rows, rows - start), cols, generator=generator)
            file.write(chunk.numpy().tobytes())
    return path.stat().st_size


def exit_cleanly_on_sigterm() -> None:
    """Makes SIGTERM raise SystemExit, so temporary folders (gigabytes) are removed on `kill`."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def check_disk(folder: Path, needed: int) -> None:
    """Exits with a message when `folder`'s file system has less than `needed` bytes free."""
    free = shutil.disk_usage(folder).free
    if free < needed:
        sys.exit(f"{folder}: {gib(free)} free, the benchmark needs {gib(needed)}; use --workdir")


def machine() -> str:
    """Returns one line describing this machine and software: CPUs, memory, torch, Python."""
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as info:
        names = [line.split(":", 1)[1].strip() for line in info if line.startswith("model name")]
        cpu = names[0] if names else cpu
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return (
        f"{os.cpu_count()} CPUs ({cpu}), {gib(memory)} RAM, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), Python {platform.python_version()}; {load()}"
    )


def cpu_pressure() -> float | None:
    """Returns the share (%) of the last 10 s some task waited for a CPU, or None if unknown."""
    try:
        with open("/proc/pressure/cpu") as psi:
            return float(psi.readline().split()[1].split("=")[1])
    except (OSError, ValueError, IndexError):
        return None


def wait_for_quiet(max_seconds: float, threshold: float = 5.0) -> None:
    """Waits (at most `max_seconds`) until other tasks wait for a CPU under `threshold` % of the time.

    On a shared machine other processes' bursts slow sparq's many short parallel regions far
    more than they slow the reference's few long ones; this keeps both sides' runs to quiet
    moments. Does nothing where Linux pressure stall information is not available.
    """
    deadline = time.monotonic() + max_seconds
    while time.monotonic() < deadline:
        pressure = cpu_pressure()
        if pressure is None or pressure < threshold:
            return
        time.sleep(2)


def load() -> str:
    """Returns the machine's load averages, to show how busy it was around the measurements."""
    one, five, fifteen = os.getloadavg()
    text = f"load average {one:.2f} {five:.2f} {fifteen:.2f} (1/5/15 min)"
    # Linux pressure stall information: the share of time some task waited for a CPU.
    with contextlib.suppress(OSError, ValueError, IndexError), open("/proc/pressure/cpu") as psi:
        fields = dict(item.split("=") for item in psi.readline().split()[1:])
        text += f", CPU pressure {fields['avg10']}% / {fields['avg60']}% (10 s / 60 s)"
    return text
