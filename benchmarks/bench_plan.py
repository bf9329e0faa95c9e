"""Planning cost: `sparqcli.plan` against one `sparqcli.compress` of the same model.

A seeded mixed model: a ROWS x 64 token-like table (Zipf row norms, 5 % near-zero rows), a
ROWS/10 x 30 heavy-tailed table (partial 1x4 edge blocks) and a ROWS/10 x 48 low-rank table;
base config: every `*.weight`, default candidates (608 per table). Both run in this process
(torch imported once), each `--repeat` times; the best CPU time (user + system, all threads) of
each is kept, as it is less disturbed by other load on a shared machine than wall time. Prints
the ratio plan / compress (the target is <= 10), the plan's bytes and E, the best uniform
setting's, and the machine's load (load average, `/proc/pressure/cpu`) before and after.

Then the same two as a user runs them, `sparq compress` and `sparq plan` as commands (process
start, `import torch`, reading the checkpoint, writing the output included), best of `--repeat`
wall and CPU times each: on a small model most of either command is what both share.

    python benchmarks/bench_plan.py [--rows 200000] [--budget 0.1] [--repeat 2]
                                    [--order sparsify-first|quantize-first]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
from _measure import SPARQ, run_command

import sparqcli

BASE = """\
version: 1
order: {order}
sparsity: {level: 0.5, block_shape: [1, 4]}
quantization: {bits: 8}
layers:
  - match: "*.weight"
"""
TARGET = 10.0


def build(path: Path, rows: int) -> None:
    """Writes the mixed model to `path`."""
    generator = torch.Generator().manual_seed(0)
    token = torch.randn(rows, 64, generator=generator)
    norms = torch.arange(1, rows + 1, dtype=torch.float32) ** -0.5
    token *= norms[torch.randperm(rows, generator=generator)][:, None]
    token[torch.randperm(rows, generator=generator)[: rows // 20]] *= 1e-3
    small = max(1, rows // 10)
    heavy = torch.randn(small, 30, generator=generator) / (
        torch.rand(small, 30, generator=generator) + 0.05
    )
    low_rank = torch.randn(small, 8, generator=generator) @ torch.randn(8, 48, generator=generator)
    torch.save({"tok.weight": token, "heavy.weight": heavy, "lowrank.weight": low_rank}, path)


def machine_load() -> str:
    """Returns the load average and, where Linux has it, the CPU pressure (avg10 of `some`)."""
    load = f"load {os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else "load ?"
    try:
        pressure = Path("/proc/pressure/cpu").read_text().split()[1].split("=")[1]
        return f"{load}, cpu pressure {pressure} %"
    except (OSError, IndexError):
        return load


def cpu_seconds(run: object) -> float:
    """Returns the CPU time `run()` takes."""
    started = time.process_time()
    run()  # type: ignore[operator]
    return time.process_time() - started


def main() -> None:
    """Runs the benchmark and prints the result."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--budget", type=float, default=0.1)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument(
        "--order", choices=["sparsify-first", "quantize-first"], default="sparsify-first"
    )
    args = parser.parse_args()
    load_before = machine_load()
    with tempfile.TemporaryDirectory() as folder:
        model, base = Path(folder) / "model.pt", Path(folder) / "base.yaml"
        build(model, args.rows)
        base.write_text(BASE.replace("{order}", args.order))
        out = Path(folder) / "out.sparq.safetensors"

        def compress() -> None:
            sparqcli.compress(model, base, output=out, force=True)

        result = None

        def plan() -> None:
            nonlocal result
            result = sparqcli.plan(model, base, budget=args.budget)

        compress()  # warm-up: imports, page cache
        compress_times = [cpu_seconds(compress) for _ in range(args.repeat)]
        plan_times = [cpu_seconds(plan) for _ in range(args.repeat)]
        commands = {
            "compress": [*SPARQ, "compress", str(model), "-c", str(base), "-o", str(out)],
            "plan": [
                *SPARQ,
                "plan",
                str(model),
                "-c",
                str(base),
                "--budget",
                str(args.budget),
                "-o",
                str(Path(folder) / "plan.yaml"),
            ],
        }
        as_commands: dict[str, list[dict]] = {name: [] for name in commands}
        for _ in range(args.repeat):
            for name, argv in commands.items():
                done = run_command([*argv, "--force", "--quiet"])
                if done["returncode"] != 0:
                    raise SystemExit(f"sparq {name} failed:\n{done['stderr'][-2000:]}")
                as_commands[name].append(done)
    ratio = min(plan_times) / min(compress_times)
    print(
        f"model: {args.rows} x 64 + 2 x {max(1, args.rows // 10)} rows, budget {args.budget}, {args.order}"
    )
    print(f"machine: {load_before} before, {machine_load()} after")
    print(f"compress CPU s: {', '.join(f'{t:.2f}' for t in compress_times)}")
    print(f"plan CPU s:     {', '.join(f'{t:.2f}' for t in plan_times)}")
    print(f"plan / compress: {ratio:.1f}x (target <= {TARGET:g}x)")
    wall = {name: min(run["seconds"] for run in runs) for name, runs in as_commands.items()}
    cpu = {name: min(run["cpu_seconds"] for run in runs) for name, runs in as_commands.items()}
    print(
        f"as commands (best of {args.repeat}): compress {wall['compress']:.2f} s wall, "
        f"{cpu['compress']:.2f} s CPU; plan {wall['plan']:.2f} s wall, {cpu['plan']:.2f} s CPU; "
        f"plan / compress {wall['plan'] / wall['compress']:.1f}x wall, "
        f"{cpu['plan'] / cpu['compress']:.1f}x CPU"
    )
    assert result is not None
    print(f"plan: {result.bytes:,} bytes ({result.ratio:.4f}x), E {result.error:.4f}")
    if result.best_uniform is not None:
        best = result.best_uniform
        print(f"best uniform {best.label}: {best.bytes:,} bytes, E {best.error:.4f}")


if __name__ == "__main__":
    main()
