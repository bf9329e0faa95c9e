"""Scaling benchmark: `sparq compress` time and peak memory as the table grows.

ROWS x 128 float32 tables (seeded N(0, 1) values, `.safetensors` input) at 1M, 2M, 4M and 8M rows
(0.48 to 3.8 GiB), level 0.8, block (1, 4), 8 bits. Each size is written, compressed by the
installed `sparq` CLI in a fresh process (wall time and the child's peak RSS via `os.wait4`),
and deleted before the next. Time should grow linearly with the table (constant seconds per
GiB after the fixed start-up); peak memory far slower than the table: the table streams through
in row chunks and only the compressed result (~0.12 bytes per table byte here) stays in memory.

The start-up baseline is the peak RSS and time of a process that only imports what
`sparq compress` imports (torch included); "above start-up" subtracts it, and s/GiB is
(time - start-up time) per GiB of table, for wall time and for CPU time (user + system, all
threads; less disturbed by other load on a shared machine). With `--repeat N` each size runs N
times and the best time and lowest peak are kept.

    python benchmarks/bench_scaling.py [--rows 1000000 2000000 4000000 8000000] [--cols 128]
                                       [--order sparsify-first] [--repeat 1] [--wait-quiet 0]
                                       [--workdir DIR]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _measure import (
    CONFIG,
    TABLE_KEY,
    check_disk,
    exit_cleanly_on_sigterm,
    gib,
    load,
    machine,
    run_command,
    size,
    wait_for_quiet,
    write_random_safetensors,
)

IMPORTS = "import torch, safetensors, sparqcli.cli, sparqcli.compression, sparqcli.format"


def best_of(repeat: int, wait_quiet: float, argv: list[str]) -> dict[str, float]:
    """Runs `argv` `repeat` times; returns the least wall time, CPU time and peak RSS.

    Before each run, waits up to `wait_quiet` seconds for the CPUs to be free of other work.
    """
    runs = []
    for _ in range(repeat):
        wait_for_quiet(wait_quiet)
        result = run_command(argv)
        if result["returncode"] != 0:
            sys.exit(
                f"failed ({result['returncode']}): {' '.join(argv)}\n{result['stderr'][-3000:]}"
            )
        runs.append(result)
    return {name: min(run[name] for run in runs) for name in ("seconds", "cpu_seconds", "peak_rss")}


def main() -> None:
    """Runs sparq at each size and prints time, peak RSS and peak bytes per table byte."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--rows", type=int, nargs="+", default=[1_000_000, 2_000_000, 4_000_000, 8_000_000]
    )
    parser.add_argument("--cols", type=int, default=128)
    parser.add_argument(
        "--order", choices=("sparsify-first", "quantize-first"), default="sparsify-first"
    )
    parser.add_argument("--repeat", type=int, default=1, help="runs per size; best kept")
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=0,
        metavar="SECONDS",
        help="before each run, wait up to this long for the CPUs to be free of other work",
    )
    parser.add_argument("--workdir", type=Path, default=None, help="folder for the temp files")
    args = parser.parse_args()
    exit_cleanly_on_sigterm()
    sparq = str(Path(sys.executable).parent / "sparq")
    print(
        f"scaling: ROWS x {args.cols} float32, safetensors input, {args.order}, "
        "level 0.8, block (1, 4), 8 bits"
    )
    print(machine())
    baseline = best_of(args.repeat, args.wait_quiet, [sys.executable, "-c", IMPORTS])
    print(
        f"start-up (imports only): {baseline['seconds']:.2f} s wall, "
        f"{baseline['cpu_seconds']:.2f} s CPU, peak RSS {size(baseline['peak_rss'])}"
    )
    header = (
        f"{'rows':>11} {'table':>9} {'wall s':>7} {'s/GiB':>6} {'CPU s':>7} {'s/GiB':>6} "
        f"{'peak RSS':>10} {'above start-up':>14} {'peak/table':>10} {'above/table':>11} "
        f"{'output':>10}"
    )
    print(header)
    print("-" * len(header))
    with tempfile.TemporaryDirectory(prefix="sparq-scaling-", dir=args.workdir) as temp:
        folder = Path(temp)
        config = folder / "config.yaml"
        config.write_text(CONFIG)
        for rows in args.rows:
            table_bytes = rows * args.cols * 4
            check_disk(folder, table_bytes + table_bytes // 4 + (256 << 20))
            source = folder / f"table-{rows}.safetensors"
            target = folder / f"table-{rows}.sparq.safetensors"
            try:
                write_random_safetensors(source, TABLE_KEY, rows, args.cols, seed=0)
                argv = [sparq, "compress", str(source), "--config", str(config)]
                argv += ["--order", args.order, "-o", str(target), "--force", "--quiet"]
                result = best_of(args.repeat, args.wait_quiet, argv)
                seconds, cpu, peak = result["seconds"], result["cpu_seconds"], result["peak_rss"]
                above = peak - baseline["peak_rss"]
                per_gib = (seconds - baseline["seconds"]) / (table_bytes / 2**30)
                cpu_per_gib = (cpu - baseline["cpu_seconds"]) / (table_bytes / 2**30)
                print(
                    f"{rows:>11,} {gib(table_bytes):>9} {seconds:>7.2f} {per_gib:>6.2f} "
                    f"{cpu:>7.2f} {cpu_per_gib:>6.2f} "
                    f"{size(peak):>10} {size(above):>14} {peak / table_bytes:>9.3f}x "
                    f"{above / table_bytes:>10.3f}x {size(target.stat().st_size):>10}",
                    flush=True,
                )
            finally:
                source.unlink(missing_ok=True)
                target.unlink(missing_ok=True)
    print(f"after the runs: {load()}")


if __name__ == "__main__":
    main()
