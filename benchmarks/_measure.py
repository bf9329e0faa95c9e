"""Shared helpers for the benchmarks: run a snippet in a fresh process, read its time and peak RSS."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

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
