"""CUDA benchmark: engine throughput on the GPU, and `sparq compress --device cuda` end to end.

Needs a CUDA device; without one it prints "no CUDA device; skipped" and exits 0.

1. Engine: a ROWS x COLS float32 table (default 128,256 x 4,096, 2 GiB: a Llama-3 token
   embedding) already on the GPU, level 0.8, block (1, 4), 8 bits, both orders. One warm-up run,
   then REPEAT timed runs between `torch.cuda.synchronize()` calls; throughput is GB (1e9 bytes)
   of float32 input per second, with the peak GPU memory the runs allocated.
2. End to end: the same table as a `.safetensors` file, `sparq compress --device cuda` and
   `--device cpu` (the installed CLI, each in a fresh process: wall time with start-up, and the
   child's peak host RSS via `os.wait4`).

    python benchmarks/bench_cuda.py [--rows 128256] [--cols 4096] [--repeat 3] [--chunk-rows N]
                                    [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _measure import (
    CONFIG,
    ORDERS,
    SPARQ,
    TABLE_KEY,
    check_disk,
    exit_cleanly_on_sigterm,
    gib,
    machine,
    run_command,
    size,
)


def bench_engine(table: torch.Tensor, repeat: int, chunk_rows: int | None) -> None:
    """Prints the engine's time, throughput and peak GPU memory on `table`, both orders.

    With the fused kernels (when Triton is installed) and each selection method on the GPU, and
    with tensor ops alone.
    """
    from sparqcli.engine.options import EngineOptions
    from sparqcli.engine.pipeline import compress_table
    from sparqcli.settings import Quantization, Sparsity

    sparsity, quantization = Sparsity(0.8, (1, 4)), Quantization(8)
    table_bytes = table.numel() * table.element_size()
    header = ["order".ljust(15), "kernels".ljust(12), "selection".ljust(10)]
    header += ["seconds".rjust(8), "GB/s".rjust(7), "peak GPU memory".rjust(16)]
    print(" ".join(header))
    for order in ORDERS:
        for fused, selection in [(True, "sort"), (True, "topk"), (False, "sort")]:
            options = EngineOptions(fused_kernels=fused, cuda_selection=selection)
            run = (table, order, sparsity, quantization)
            compress_table(*run, chunk_rows=chunk_rows, options=options)  # warm-up
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            start = time.perf_counter()
            for _ in range(repeat):
                compress_table(*run, chunk_rows=chunk_rows, options=options)
            torch.cuda.synchronize()
            seconds = (time.perf_counter() - start) / repeat
            peak = torch.cuda.max_memory_allocated() - base
            kernels = "fused" if fused else "tensor ops"
            print(
                f"{order:<15} {kernels:<12} {selection:<10} {seconds:>8.3f} "
                f"{table_bytes / seconds / 1e9:>7.2f} {size(peak):>16}  (beyond the table)",
                flush=True,
            )


def bench_selection(table: torch.Tensor) -> None:
    """Prints the time of each way to find the pruning threshold among the table's block scores."""
    from sparqcli.engine.sparsify import (
        block_scores,
        kth_smallest,
        kth_smallest_sorted,
        kth_smallest_topk,
    )

    scores = block_scores(table.abs(), (1, 4))
    k = round(0.8 * scores.numel())
    methods = {
        "sort (kth_smallest_sorted)": lambda: kth_smallest_sorted(scores, k),
        "topk (kth_smallest_topk)": lambda: kth_smallest_topk(scores, k),
        "radix histogram (kth_smallest)": lambda: kth_smallest(lambda: [scores], k),
        "torch.kthvalue": lambda: (float(torch.kthvalue(scores.view(-1), k).values), 0),
    }
    print(f"{'method':<32} {'ms':>8}  ({scores.numel():,} block scores, k = {k:,})")
    answers = set()
    for name, method in methods.items():
        method()  # warm-up
        torch.cuda.synchronize()
        start = time.perf_counter()
        value, _ = method()
        torch.cuda.synchronize()
        answers.add(value)
        print(f"{name:<32} {(time.perf_counter() - start) * 1e3:>8.1f}", flush=True)
    if len(answers) != 1:
        sys.exit(f"selection methods disagree: {sorted(answers)}")


def profile_engine(table: torch.Tensor) -> None:
    """Prints the CUDA kernels that take the most time in one run of each order."""
    from torch.profiler import ProfilerActivity, profile

    from sparqcli.engine.pipeline import compress_table
    from sparqcli.settings import Quantization, Sparsity

    for order in ORDERS:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as run:
            compress_table(table, order, Sparsity(0.8, (1, 4)), Quantization(8))
            torch.cuda.synchronize()
        print(f"\n{order}: top CUDA kernels")
        print(run.key_averages().table(sort_by="self_cuda_time_total", row_limit=18))


def bench_e2e(table: torch.Tensor, folder: Path) -> None:
    """Writes `table` to a safetensors file and prints `sparq compress` on cuda and cpu."""
    from safetensors.torch import save_file

    table_bytes = table.numel() * table.element_size()
    check_disk(folder, table_bytes + (512 << 20))
    source = folder / "table.safetensors"
    save_file({TABLE_KEY: table.cpu()}, str(source))
    config = folder / "config.yaml"
    config.write_text(CONFIG)
    startup = run_command([sys.executable, "-c", "import torch; torch.zeros(1, device='cuda')"])
    print(
        f"python + import torch + CUDA init alone: {startup['seconds']:.2f} s, "
        f"peak RSS {size(startup['peak_rss'])}"
    )
    report = folder / "report.json"
    print(
        f"{'order':<15} {'device':<7} {'wall s':>7} {'GB/s':>7} {'compress s':>10} {'peak RSS':>10}"
    )
    for order in ORDERS:
        for device in ("cuda", "cpu"):
            target = folder / f"out-{order}-{device}.sparq.safetensors"
            argv = [*SPARQ, "compress", str(source), "--config", str(config), "--order", order]
            argv += ["--device", device, "-o", str(target), "--force", "--quiet"]
            argv += ["--report", str(report)]
            result = run_command(argv)
            if result["returncode"] != 0:
                sys.exit(f"sparq failed ({result['returncode']}):\n{result['stderr'][-3000:]}")
            seconds = json.loads(report.read_text())["seconds"]
            print(
                f"{order:<15} {device:<7} {result['seconds']:>7.2f} "
                f"{table_bytes / result['seconds'] / 1e9:>7.2f} {seconds:>10.2f} "
                f"{size(result['peak_rss']):>10}",
                flush=True,
            )


def main() -> None:
    """Runs both parts when a CUDA device is present; otherwise says it skipped."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=128_256)
    parser.add_argument("--cols", type=int, default=4_096)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--chunk-rows", type=int, default=None, help="engine row chunk")
    parser.add_argument("--workdir", type=Path, default=None, help="folder for the temp file")
    parser.add_argument("--profile", action="store_true", help="also print the top CUDA kernels")
    parser.add_argument("--skip-e2e", action="store_true", help="only the engine parts")
    args = parser.parse_args()
    exit_cleanly_on_sigterm()
    if not torch.cuda.is_available():
        print("no CUDA device; skipped")
        return
    print(machine())
    print(f"GPU: {torch.cuda.get_device_name()}")
    generator = torch.Generator(device="cuda").manual_seed(0)
    table = torch.randn(args.rows, args.cols, device="cuda", generator=generator)
    table_bytes = table.numel() * table.element_size()
    print(
        f"{args.rows:,} x {args.cols:,} float32 ({gib(table_bytes)}), level 0.8, block (1, 4), "
        "8 bits"
    )
    print("\nengine, table already on the GPU:")
    bench_engine(table, args.repeat, args.chunk_rows)
    print("\nselecting the pruning threshold on the GPU:")
    bench_selection(table)
    if args.profile:
        profile_engine(table)
    if args.skip_e2e:
        return
    print("\nend to end from a .safetensors file (sparq CLI, fresh process per run):")
    with tempfile.TemporaryDirectory(prefix="sparq-cuda-", dir=args.workdir) as temp:
        host_table = table.cpu()
        del table
        torch.cuda.empty_cache()
        bench_e2e(host_table, Path(temp))


if __name__ == "__main__":
    main()
