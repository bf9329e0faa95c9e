"""End-to-end benchmark: `sparq compress` file in, file out, against the torch.ao reference script.

One ROWS x COLS float32 table (`embedding.weight`, seeded N(0, 1) values), level 0.8, block (1, 4),
8 bits, both orders. The input is built once, as `.safetensors` and as `.pt` (same values).

* sparq: the installed `sparq compress` CLI, on the `.pt` and on the `.safetensors` input.
* reference: what a torch.ao user runs: `torch.load` the `.pt`, build the module around the table
  (`nn.Embedding.from_pretrained`, which takes the loaded tensor without a copy), call
  `post_training_sparse_quantize(model, DataNormSparsifier, ...)` and `torch.save` the state dict.

Every run is its own process, started fresh; its wall time is what the user waits for (process
start and `import torch` included), its CPU time (user + system, all threads) is less disturbed
by other load on a shared machine, and its peak RSS is the child's own `ru_maxrss`, read with
`os.wait4`. sparq's own `--report` peak is shown beside it. With `--repeat N` each side runs N
times and the best time and the lowest peak are kept (the same rule for both sides). Ratios are
reference / sparq, all measured in this run; the targets are >= 10x faster (wall time) and
>= 4x less peak memory.

`--wait-quiet SECONDS` waits before each run (up to that long) until other tasks wait for a CPU
under 5 % of the time (Linux pressure stall information): on a shared machine other work slows
sparq's many short parallel regions far more than the reference's few long ones.

    python benchmarks/bench_e2e.py [--rows 2000000] [--cols 128] [--repeat 1]
                                   [--skip-reference] [--wait-quiet 0] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from _measure import (
    CONFIG,
    ORDERS,
    SPARQ,
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

SPEED_TARGET = 10.0
MEMORY_TARGET = 4.0


REFERENCE = """\
import sys
import warnings

warnings.filterwarnings("ignore")
import torch
from torch import nn
from torch.ao.pruning._experimental.data_sparsifier import DataNormSparsifier
from torch.ao.pruning._experimental.data_sparsifier.quantization_utils import (
    post_training_sparse_quantize,
)


class Model(nn.Module):
    def __init__(self, weight):
        super().__init__()
        self.embedding = nn.Embedding.from_pretrained(weight)


source, target, order = sys.argv[1:4]
state = torch.load(source, weights_only=True)
model = Model(state.pop("embedding.weight"))
post_training_sparse_quantize(
    model, DataNormSparsifier, sparsify_first=order == "sparsify-first",
    sparsity_level=0.8, sparse_block_shape=(1, 4), norm="L1",
)
torch.save(model.state_dict(), target)
"""

TO_PT = """\
import sys
import torch
from safetensors.torch import load_file

torch.save(load_file(sys.argv[1]), sys.argv[2])
"""


def run_checked(argv: list[str]) -> dict[str, Any]:
    """Runs `argv` measured (see _measure.run_command); exits with its stderr when it fails."""
    result = run_command(argv)
    if result["returncode"] != 0:
        sys.exit(f"failed ({result['returncode']}): {' '.join(argv)}\n{result['stderr'][-3000:]}")
    return result


def best_run(
    argv: list[str], repeat: int, wait_quiet: float, report: Path | None = None
) -> dict[str, Any]:
    """Runs `argv` `repeat` times; returns the least of each measure (and of sparq's report).

    Before each run, waits up to `wait_quiet` seconds for the CPUs to be free of other work.
    """
    runs = []
    for _ in range(repeat):
        wait_for_quiet(wait_quiet)
        result = run_checked(argv)
        if report is not None:
            result["report_peak"] = json.loads(report.read_text())["peak_memory_bytes"]
        runs.append(result)
    names = ["seconds", "cpu_seconds", "peak_rss"] + (["report_peak"] if report else [])
    return {name: min(run[name] for run in runs) for name in names}


def build_inputs(folder: Path, rows: int, cols: int) -> tuple[Path, Path]:
    """Writes the table as `table.safetensors` and `table.pt` in `folder`; returns both paths."""
    safetensors_path = folder / "table.safetensors"
    pt_path = folder / "table.pt"
    write_random_safetensors(safetensors_path, TABLE_KEY, rows, cols, seed=0)
    run_checked([sys.executable, "-c", TO_PT, str(safetensors_path), str(pt_path)])
    return pt_path, safetensors_path


def main() -> None:
    """Builds the input, runs every side in its own process, prints the table and the ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--cols", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=1, help="runs per side; best kept")
    parser.add_argument("--skip-reference", action="store_true")
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
    table_bytes = args.rows * args.cols * 4
    print(
        f"end to end: {args.rows:,} x {args.cols} float32 ({gib(table_bytes)}), "
        "level 0.8, block (1, 4), 8 bits"
    )
    print(machine())
    with tempfile.TemporaryDirectory(prefix="sparq-bench-", dir=args.workdir) as temp:
        folder = Path(temp)
        # Two inputs, the reference's dense output and the small sparq outputs.
        check_disk(folder, 3 * table_bytes + (256 << 20))
        pt_path, safetensors_path = build_inputs(folder, args.rows, args.cols)
        config = folder / "config.yaml"
        config.write_text(CONFIG)
        reference_script = folder / "reference.py"
        reference_script.write_text(REFERENCE)
        report = folder / "report.json"

        header = (
            f"{'order':<15} {'run':<20} {'wall s':>7} {'CPU s':>7} {'peak RSS':>9} {'RSS/table':>9} "
            f"{'sparq report':>12} {'output':>10}"
        )
        print(header)
        print("-" * len(header))
        results: dict[tuple[str, str], dict[str, Any]] = {}
        for order in ORDERS:
            runs: list[tuple[str, list[str], Path, Path | None]] = []
            if not args.skip_reference:
                out = folder / f"reference-{order}.pt"
                argv = [sys.executable, str(reference_script), str(pt_path), str(out), order]
                runs.append(("reference .pt", argv, out, None))
            for source in (pt_path, safetensors_path):
                out = folder / f"sparq-{order}{source.suffix}.sparq.safetensors"
                argv = [*SPARQ, "compress", str(source), "--config", str(config), "--order", order]
                argv += ["-o", str(out), "--force", "--quiet", "--report", str(report)]
                runs.append((f"sparq {source.suffix}", argv, out, report))
            for name, argv, out, report_path in runs:
                result = best_run(argv, args.repeat, args.wait_quiet, report_path)
                results[order, name] = result
                reported = gib(result["report_peak"]) if "report_peak" in result else ""
                print(
                    f"{order:<15} {name:<20} {result['seconds']:>7.2f} {result['cpu_seconds']:>7.2f} "
                    f"{gib(result['peak_rss']):>9} {result['peak_rss'] / table_bytes:>8.2f}x "
                    f"{reported:>12} {size(out.stat().st_size):>10}",
                    flush=True,
                )
                out.unlink()
        print(f"after the runs: {load()}")
        if args.skip_reference:
            return
        print()
        print(
            f"reference / sparq, measured above (targets: >= {SPEED_TARGET:g}x faster, "
            f">= {MEMORY_TARGET:g}x less peak memory)"
        )
        print(f"{'order':<15} {'sparq input':<12} {'wall':>6} {'CPU':>6} {'memory':>7}  targets")
        for order in ORDERS:
            reference = results[order, "reference .pt"]
            for suffix in (".pt", ".safetensors"):
                mine = results[order, f"sparq {suffix}"]
                speed = reference["seconds"] / mine["seconds"]
                cpu = reference["cpu_seconds"] / mine["cpu_seconds"]
                memory = reference["peak_rss"] / mine["peak_rss"]
                verdict = ", ".join(
                    [
                        "speed met" if speed >= SPEED_TARGET else "speed MISSED",
                        "memory met" if memory >= MEMORY_TARGET else "memory MISSED",
                    ]
                )
                print(
                    f"{order:<15} {suffix:<12} {speed:>5.1f}x {cpu:>5.1f}x {memory:>6.1f}x  {verdict}"
                )


if __name__ == "__main__":
    main()
