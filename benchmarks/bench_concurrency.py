"""Sharing the machine: k `sparq compress` jobs at once against the same k jobs in a row.

One ROWS x COLS float32 `.safetensors` table (seeded N(0, 1) values), level 0.8, block (1, 4),
8 bits, sparsify-first; every job compresses it to its own output. For each sparq source tree
(this one, and with `--baseline DIR` another, e.g. a checkout of the previous version):

* `alone`: one job on an otherwise idle machine;
* `pinned`: one job under `taskset -c 0` (one CPU: its affinity, so sparq's default thread count
  drops to 1);
* for k in `--jobs` (default 1 2 4): the k jobs in a row (total wall time), then the k jobs
  started at once (total wall time until the last one ends, and the slowest job's own time),
  then one `sparq compress` call given k inputs (hard links to the table, so k files).

`at once / in a row` and `one call / in a row` are the numbers that matter: 1.0 means sharing the machine costs nothing
in total; below 1 (ideally about 1/CPUs) means the jobs use CPU time the others leave idle. The
target (issue #11): at most 1.0 for every k, at most 0.6 for 4 jobs on 2 CPUs, and a lone job no
slower than the baseline's (at most 1.05x). Every group of runs is repeated `--repeat` times and
the median is shown; the rounds alternate between the trees, so slow moments of a shared
machine hit both. Every `-o` output is hashed: jobs at once and in a row, on every tree, must
give the same bytes (the one-call outputs record their own input's name, so they differ).

Other work on the machine disturbs exactly what this measures. `--wait-quiet SECONDS` waits
before each group (up to that long) until other tasks waited for a CPU under 5 % of the last
10 s (Linux pressure stall information); the load and CPU pressure are printed before and after
each round, and the table says how many groups started on a machine that was not quiet.

    python benchmarks/bench_concurrency.py [--rows 1000000] [--cols 128] [--jobs 1 2 4]
                                           [--repeat 3] [--wait-quiet 60] [--baseline DIR]
                                           [--workdir DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
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
    cpu_pressure,
    exit_cleanly_on_sigterm,
    gib,
    load,
    machine,
    wait_for_quiet,
    write_random_safetensors,
)

HERE = Path(__file__).resolve().parents[1]
QUIET_PRESSURE = 5.0


class Tree:
    """A sparq source tree, run as `python -m sparqcli` with that tree first on the path."""

    def __init__(self, name: str, root: Path) -> None:
        self.name = name
        self.root = root
        if not (root / "sparqcli" / "__init__.py").is_file():
            sys.exit(f"{root}: not a sparq source tree (no sparqcli/__init__.py)")
        self.env = {**os.environ, "PYTHONPATH": str(root)}
        for variable in ("SPARQ_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            self.env.pop(variable, None)  # every tree chooses its own default

    def argv(self, source: Path, config: Path, output: Path, pinned: bool = False) -> list[str]:
        """Returns the command line compressing `source` into `output`."""
        command = [sys.executable, "-m", "sparqcli", "compress", str(source)]
        command += ["--config", str(config), "-o", str(output), "--force", "--quiet"]
        return (["taskset", "-c", "0"] if pinned else []) + command

    def argv_files(self, sources: list[Path], config: Path, out_dir: Path) -> list[str]:
        """Returns the one command line compressing every one of `sources` into `out_dir`."""
        command = [sys.executable, "-m", "sparqcli", "compress", *map(str, sources)]
        return [*command, "--config", str(config), "--out-dir", str(out_dir), "--force", "--quiet"]


def run_at_once(argvs: list[list[str]], env: dict[str, str]) -> dict[str, float]:
    """Starts every command at once; returns the total wall time and the slowest job's.

    Each child is reaped with `os.wait4`, so its own CPU time is known too. Exits with the
    child's stderr when one fails.
    """
    started = time.perf_counter()
    children = {}
    for argv in argvs:
        child = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        children[child.pid] = child
    ended: dict[int, float] = {}
    cpu = 0.0
    failed = None
    while len(ended) < len(children):
        pid, status, usage = os.wait4(-1, 0)
        if pid not in children:
            continue
        ended[pid] = time.perf_counter() - started
        cpu += usage.ru_utime + usage.ru_stime
        if os.waitstatus_to_exitcode(status) != 0:
            failed = children[pid]
    if failed is not None:
        stderr = failed.stderr.read().decode(errors="replace") if failed.stderr else ""
        sys.exit(f"failed: {' '.join(failed.args)}\n{stderr[-3000:]}")
    for child in children.values():
        if child.stderr:
            child.stderr.close()
    return {"total": max(ended.values()), "slowest": max(ended.values()), "cpu": cpu}


def run_in_a_row(argvs: list[list[str]], env: dict[str, str]) -> dict[str, float]:
    """Runs the commands one after the other; returns the total wall time and the slowest's."""
    times, cpu = [], 0.0
    for argv in argvs:
        result = run_at_once([argv], env)
        times.append(result["total"])
        cpu += result["cpu"]
    return {"total": sum(times), "slowest": max(times), "cpu": cpu}


def sha256(path: Path) -> str:
    """Returns the hex sha256 of a file."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main() -> None:
    """Builds the input, runs every group per tree and round, prints the medians and ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--cols", type=int, default=128)
    parser.add_argument("--jobs", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--repeat", type=int, default=3, help="rounds; medians are shown")
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=60,
        metavar="SECONDS",
        help="before each group, wait up to this long for the CPUs to be free of other work",
    )
    parser.add_argument(
        "--baseline",
        type=Path,
        default=None,
        metavar="DIR",
        help="another sparq source tree to compare with, e.g. a checkout of the previous version",
    )
    parser.add_argument("--workdir", type=Path, default=None, help="folder for the temp files")
    args = parser.parse_args()
    exit_cleanly_on_sigterm()
    if shutil.which("taskset") is None:
        sys.exit("taskset is needed (util-linux)")
    trees = [Tree("this", HERE)]
    if args.baseline is not None:
        trees.append(Tree("baseline", args.baseline.resolve()))
    table_bytes = args.rows * args.cols * 4
    cpus = len(os.sched_getaffinity(0))
    print(
        f"concurrency: {args.rows:,} x {args.cols} float32 ({gib(table_bytes)}), level 0.8, "
        f"block (1, 4), 8 bits, sparsify-first; {cpus} CPUs in this process's affinity"
    )
    print(machine())
    for tree in trees:
        print(f"tree {tree.name}: {tree.root}")
    max_jobs = max(args.jobs)
    with tempfile.TemporaryDirectory(prefix="sparq-bench-", dir=args.workdir) as temp:
        folder = Path(temp)
        check_disk(folder, table_bytes + max_jobs * table_bytes // 8 + (64 << 20))
        source = folder / "table.safetensors"
        write_random_safetensors(source, TABLE_KEY, args.rows, args.cols, seed=0)
        config = folder / "config.yaml"
        config.write_text(CONFIG)
        outputs = [folder / f"out{j}.sparq.safetensors" for j in range(max_jobs)]
        links = [folder / f"table{j}.safetensors" for j in range(max_jobs)]
        for link in links:
            os.link(source, link)
        out_dir = folder / "out"
        out_dir.mkdir()
        groups = ["alone", "pinned"] + [
            f"{how} {k}" for k in args.jobs for how in ("in a row", "at once", "one call")
        ]
        results: dict[tuple[str, str], list[dict[str, float]]] = {}
        not_quiet = 0
        digests: dict[str, set[str]] = {tree.name: set() for tree in trees}
        for round_number in range(args.repeat):
            print(f"round {round_number + 1}/{args.repeat}: before, {load()}", flush=True)
            for tree in trees:
                for group in groups:
                    wait_for_quiet(args.wait_quiet, QUIET_PRESSURE)
                    pressure = cpu_pressure()
                    not_quiet += pressure is not None and pressure >= QUIET_PRESSURE
                    if group in ("alone", "pinned"):
                        argvs = [tree.argv(source, config, outputs[0], group == "pinned")]
                        result = run_at_once(argvs, tree.env)
                    elif group.startswith("one call"):
                        k = int(group.rsplit(" ", 1)[1])
                        argv = tree.argv_files(links[:k], config, out_dir)
                        result = run_at_once([argv], tree.env)  # outputs name their input
                    else:
                        how, k = group.rsplit(" ", 1)
                        argvs = [tree.argv(source, config, outputs[j]) for j in range(int(k))]
                        runner = run_at_once if how == "at once" else run_in_a_row
                        result = runner(argvs, tree.env)
                        digests[tree.name].update(sha256(outputs[j]) for j in range(int(k)))
                    results.setdefault((tree.name, group), []).append(result)
                    shown = "?" if pressure is None else f"{pressure:.0f}%"
                    print(
                        f"  {tree.name:<9} {group:<12} {result['total']:7.2f} s "
                        f"(CPU pressure before: {shown})",
                        flush=True,
                    )
            print(f"round {round_number + 1}/{args.repeat}: after, {load()}", flush=True)
        groups_run = args.repeat * len(trees) * len(groups)
        print()
        _print_table(trees, groups, results, args.jobs, cpus)
        print()
        print(
            f"{not_quiet} of {groups_run} groups started while other tasks waited for a CPU "
            f">= {QUIET_PRESSURE:g} % of the time (--wait-quiet {args.wait_quiet:g} s); "
            f"after the runs: {load()}"
        )
        for tree in trees:
            found = len(digests[tree.name])
            same = "yes" if found == 1 else f"NO ({found} different outputs)"
            print(f"tree {tree.name}: every output the same bytes (at once, in a row): {same}")
        if len(trees) == 2:
            agree = digests["this"] == digests["baseline"]
            print(f"both trees wrote the same bytes: {'yes' if agree else 'no'}")


def _median(runs: list[dict[str, float]], key: str) -> float:
    return statistics.median(run[key] for run in runs)


def _print_table(
    trees: list[Tree],
    groups: list[str],
    results: dict[tuple[str, str], list[dict[str, float]]],
    jobs: list[int],
    cpus: int,
) -> None:
    """Prints the medians per tree and group, then the ratios with their targets."""
    header = (
        f"{'tree':<9} {'run':<12} {'wall s':>7} {'slowest s':>9} {'CPU s':>7}  (median of rounds)"
    )
    print(header)
    print("-" * len(header))
    for tree in trees:
        for group in groups:
            runs = results[tree.name, group]
            print(
                f"{tree.name:<9} {group:<12} {_median(runs, 'total'):>7.2f} "
                f"{_median(runs, 'slowest'):>9.2f} {_median(runs, 'cpu'):>7.2f}"
            )
    print()
    print("ratios, medians of this run (wall time)")
    for tree in trees:
        for k in jobs:
            at_once = _median(results[tree.name, f"at once {k}"], "total")
            in_a_row = _median(results[tree.name, f"in a row {k}"], "total")
            ratio = at_once / in_a_row
            target = 0.6 if k >= 2 * cpus else 1.0
            verdict = "" if k == 1 else ("met" if ratio <= target else "MISSED")
            goal = f"(target <= {target:g})" if k > 1 else "(no target: one job)"
            print(f"{tree.name:<9} {k} at once / {k} in a row   {ratio:5.2f}  {goal} {verdict}")
            one_call = _median(results[tree.name, f"one call {k}"], "total")
            verdict = "met" if one_call <= in_a_row else "MISSED"
            print(
                f"{tree.name:<9} one call, {k} files / {k} in a row {one_call / in_a_row:5.2f}  "
                f"(target <= 1) {verdict}"
            )
        alone = _median(results[tree.name, "alone"], "total")
        pinned = _median(results[tree.name, "pinned"], "total")
        print(f"{tree.name:<9} pinned to 1 CPU / alone    {pinned / alone:5.2f}")
    if len(trees) == 2:
        this = _median(results["this", "alone"], "total")
        base = _median(results["baseline", "alone"], "total")
        verdict = "met" if this / base <= 1.05 else "MISSED"
        print(f"this / baseline, alone          {this / base:5.2f}  (target <= 1.05) {verdict}")
        for group in groups[1:]:
            this = _median(results["this", group], "total")
            base = _median(results["baseline", group], "total")
            print(f"this / baseline, {group:<14} {this / base:5.2f}")


if __name__ == "__main__":
    main()
