"""Distributed benchmark: one table compressed by 1 and by 2 ranks on this machine (gloo on
127.0.0.1, one thread per rank), and the cost of the one global step's collectives.

A ROWS x COLS float32 table (seeded N(0, 1), `.safetensors` input, level 0.8, block (1, 4),
8 bits) is compressed by `compress_distributed` in each rank, started as torchrun starts them
(RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT; OMP_NUM_THREADS=1 and torch.set_num_threads(1)).
Printed per run: the slowest rank's time inside `compress_distributed` (open, both passes, the
collectives, the write, the exchange of figures; not process start or import), seconds per GiB
of table, CPU seconds per GiB of a rank's share (user + system: less disturbed by other load
on a shared machine), bytes read per rank, bytes exchanged per rank per table (what `report.ranks` holds),
and the time of the collectives alone: one table's threshold step (an all_reduce of 2^15 and
one of 2^16 int64 counts, plus an all_gather of one count, each after the status exchange),
measured 20 times after the run. The outputs are checked to decode bit for bit alike.

    python benchmarks/bench_distributed.py [--rows 2000000] [--cols 128] [--ranks 1 2]
                                           [--wait-quiet 0] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
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
    size,
    wait_for_quiet,
    write_random_safetensors,
)

from sparqcli.distributed import free_local_port, local_rank_environments

ROOT = Path(__file__).resolve().parent.parent

RANK_SCRIPT = """
import json, resource, sys, time, torch
torch.set_num_threads(1)
def cpu():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime
import sparqcli
from sparqcli.distributed.group import ProcessGroup
group = ProcessGroup.from_environment(timeout_s=600)
source, config, output, result = sys.argv[1:5]
cpu_start = cpu()
report = sparqcli.compress_distributed(source, config, output=output, group=group)
cpu_seconds = group.exchange_json(cpu() - cpu_start)
counts_high = torch.zeros(1 << 15, dtype=torch.int64)
counts_low = torch.zeros(1 << 16, dtype=torch.int64)
times = []
for _ in range(20):
    start = time.perf_counter()
    group.sum_counts(counts_high)
    group.sum_counts(counts_low)
    group.gather_count(1)
    times.append(time.perf_counter() - start)
if group.rank == 0:
    with open(result, "w") as file:
        json.dump({"ranks": report.ranks, "cpu": cpu_seconds, "step_seconds": sorted(times)[len(times) // 2]}, file)
group.close()
"""


def run(ranks: int, source: Path, config: Path, output: Path, result: Path) -> dict:
    """Runs one compression with `ranks` ranks; returns rank 0's result plus the wall time."""
    procs = []
    started = time.perf_counter()
    for rank_env in local_rank_environments(ranks, free_local_port()):
        env = {**os.environ, "PYTHONPATH": str(ROOT), **rank_env, "OMP_NUM_THREADS": "1"}
        argv = [sys.executable, "-c", RANK_SCRIPT, str(source), str(config), str(output)]
        procs.append(subprocess.Popen([*argv, str(result)], env=env, stderr=subprocess.PIPE))
    for proc in procs:
        _, err = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"rank failed ({proc.returncode}):\n{err.decode()[-3000:]}")
    data = json.loads(result.read_text())
    data["wall"] = time.perf_counter() - started
    return data


def main() -> None:
    """Runs the benchmark and prints its table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--cols", type=int, default=128)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--wait-quiet", type=float, default=0.0)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    exit_cleanly_on_sigterm()
    import torch

    import sparqcli

    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="sparq-bench-dist-") as tmp:
        folder = Path(tmp)
        table_bytes = args.rows * args.cols * 4
        check_disk(folder, 3 * table_bytes)
        source = folder / "table.safetensors"
        write_random_safetensors(source, TABLE_KEY, args.rows, args.cols)
        config = folder / "config.yaml"
        config.write_text(CONFIG)
        print(f"{machine()}; {load()}")
        print(
            f"table {args.rows:,} x {args.cols} float32 ({gib(table_bytes)}), level 0.8, "
            "block (1, 4), 8 bits; gloo on 127.0.0.1, one thread per rank"
        )
        print(
            f"{'ranks':>5} {'slowest rank s':>14} {'s/GiB':>7} {'CPU s/GiB/rank':>14} "
            f"{'wall s':>7} {'read/rank':>10} {'exchanged/rank/table':>21} {'step ms':>8}"
        )
        decoded = None
        for index, ranks in enumerate(args.ranks):
            wait_for_quiet(args.wait_quiet)
            output = folder / f"out-{index}"
            data = run(ranks, source, config, output, folder / f"result-{ranks}.json")
            slowest = max(item["seconds"] for item in data["ranks"])
            read = max(item["bytes_read"] for item in data["ranks"])
            exchanged = max(item["bytes_exchanged"] for item in data["ranks"])
            rank_gib = table_bytes / 2**30 / ranks
            cpu_rate = max(data["cpu"]) / rank_gib
            print(
                f"{ranks:>5} {slowest:>14.2f} {slowest / (table_bytes / 2**30):>7.2f} "
                f"{cpu_rate:>14.2f} {data['wall']:>7.2f} {size(read):>10} {size(exchanged):>21} "
                f"{data['step_seconds'] * 1000:>8.2f}"
            )
            table = sparqcli.load_table(output, TABLE_KEY)
            if decoded is None:
                decoded = table
            elif not torch.equal(decoded, table):
                raise SystemExit(f"{ranks} ranks decode differently from {args.ranks[0]}")
        print("outputs decode bit for bit alike")


if __name__ == "__main__":
    main()
