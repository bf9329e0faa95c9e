"""Serving benchmark: sparqcli.nn.EmbeddingBag against torch fp32 and FBGEMM's quantized bags.

A ROWS x COLS float32 table (seeded N(0, 1)), BAGS bags of LENGTH uniformly random indices,
mode sum, on the CPU. Compared, all in this process on the same indices:

* torch fp32 `F.embedding_bag` on the dense table;
* FBGEMM int8: `torch.ops.quantized.embedding_bag_byte_rowwise_offsets` on
  `embedding_bag_byte_prepack` (rows of codes + float scale and bias), from torch's CPU build;
* FBGEMM int4: `embedding_bag_4bit_rowwise_offsets` on `embedding_bag_4bit_prepack`;
* sparq, level 0.8, block (1, 4), 8 bits and level 0, 4 bits: `sparqcli.nn.EmbeddingBag`.

Rounds of all methods are interleaved (each round times every method in turn, --calls batches
each) so that other load on the machine hits them alike; with --wait-quiet each round first waits for a quiet CPU.
Prints the median lookups/s, the ratio to fp32 and to FBGEMM at the same width, the median
latency of one bag of LENGTH lookups, and the bytes each holds.

    python benchmarks/bench_serving.py [--rows 1000000] [--cols 128] [--bags 4096] [--length 32]
                                       [--rounds 11] [--calls 5] [--wait-quiet 60]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _measure import machine, size, wait_for_quiet


def _time(call: Callable[[], object], repeat: int = 1) -> float:
    start = time.perf_counter()
    for _ in range(repeat):
        call()
    return (time.perf_counter() - start) / repeat


def main() -> None:
    """Runs the benchmark and prints one line per method."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--cols", type=int, default=128)
    parser.add_argument("--bags", type=int, default=4096)
    parser.add_argument("--length", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--calls", type=int, default=5, help="batches timed per method and round")
    parser.add_argument("--latency-calls", type=int, default=300)
    parser.add_argument(
        "--wait-quiet", type=float, default=0.0, help="seconds to wait for a quiet CPU per round"
    )
    args = parser.parse_args()

    import torch
    import torch.nn.functional as F

    from sparqcli.engine.pipeline import compress_table
    from sparqcli.nn import EmbeddingBag, kernel_available
    from sparqcli.nn._storage import in_huge_pages
    from sparqcli.settings import Quantization, Sparsity

    print(machine())
    print(
        f"serving: {args.rows:,} x {args.cols} float32, {args.bags} bags x {args.length} "
        f"indices, mode sum, {args.rounds} rounds (medians)"
    )
    generator = torch.Generator().manual_seed(0)
    table = torch.randn(args.rows, args.cols, generator=generator)
    n = args.bags * args.length
    indices = torch.randint(0, args.rows, (n,), generator=generator)
    offsets = torch.arange(0, n, args.length)
    one_bag, one_offset = indices[: args.length], offsets[:1]

    int8 = torch.ops.quantized.embedding_bag_byte_prepack(table)
    int4 = torch.ops.quantized.embedding_bag_4bit_prepack(table)
    # sparq keeps its large buffers in transparent huge pages; the same for the baselines, so
    # that the comparison is not one of page sizes (printed as separate rows).
    table_thp = in_huge_pages(table).view(table.shape)
    int8_thp = in_huge_pages(int8).view(int8.shape)
    int4_thp = in_huge_pages(int4).view(int4.shape)
    sparq = {}
    for name, level, bits in (("sparq 0.8 (1,4) 8-bit", 0.8, 8), ("sparq 0.0 4-bit", 0.0, 4)):
        compressed, _ = compress_table(
            table, "sparsify-first", Sparsity(level, (1, 4)), Quantization(bits)
        )
        sparq[name] = EmbeddingBag.from_table(compressed, mode="sum")
        del compressed
    if not kernel_available():
        print("note: the compiled kernel is not available; sparq runs on tensor ops")

    def fbgemm(
        op: Callable[..., torch.Tensor], packed: torch.Tensor
    ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        return lambda i, o: op(packed, i, o, False, 0, False, None, None, False)

    methods: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
        "torch fp32 F.embedding_bag": lambda i, o: F.embedding_bag(i, table, o, mode="sum"),
        "FBGEMM int8 (byte rowwise)": fbgemm(
            torch.ops.quantized.embedding_bag_byte_rowwise_offsets, int8
        ),
        "FBGEMM int4 (4bit rowwise)": fbgemm(
            torch.ops.quantized.embedding_bag_4bit_rowwise_offsets, int4
        ),
        "torch fp32, huge pages": lambda i, o: F.embedding_bag(i, table_thp, o, mode="sum"),
        "FBGEMM int8, huge pages": fbgemm(
            torch.ops.quantized.embedding_bag_byte_rowwise_offsets, int8_thp
        ),
        "FBGEMM int4, huge pages": fbgemm(
            torch.ops.quantized.embedding_bag_4bit_rowwise_offsets, int4_thp
        ),
        **{name: module for name, module in sparq.items()},
    }
    held = {
        "torch fp32 F.embedding_bag": table.numel() * 4,
        "FBGEMM int8 (byte rowwise)": int8.numel(),
        "FBGEMM int4 (4bit rowwise)": int4.numel(),
        "torch fp32, huge pages": table.numel() * 4,
        "FBGEMM int8, huge pages": int8.numel(),
        "FBGEMM int4, huge pages": int4.numel(),
        **{name: module.nbytes for name, module in sparq.items()},
    }
    for call in methods.values():  # warm up (and build the kernel)
        call(indices, offsets)
        call(one_bag, one_offset)

    throughput: dict[str, list[float]] = {name: [] for name in methods}
    latency: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(args.rounds):
        if args.wait_quiet:
            wait_for_quiet(args.wait_quiet)
        for name, call in methods.items():
            throughput[name].append(n / _time(lambda call=call: call(indices, offsets), args.calls))
            latency[name].append(
                _time(lambda call=call: call(one_bag, one_offset), args.latency_calls)
            )

    rate = {name: statistics.median(values) for name, values in throughput.items()}
    delay = {name: statistics.median(values) for name, values in latency.items()}
    fp32 = "torch fp32 F.embedding_bag"
    peer = {
        "sparq 0.8 (1,4) 8-bit": "FBGEMM int8 (byte rowwise)",
        "sparq 0.0 4-bit": "FBGEMM int4 (4bit rowwise)",
    }
    print(
        f"{'method':<28} {'M lookups/s':>11} {'vs fp32':>8} {'vs FBGEMM':>9} "
        f"{'1-bag us':>8} {'vs fp32':>8} {'bytes':>10} {'vs FBGEMM':>9}"
    )
    for name in methods:
        versus = f"{rate[name] / rate[peer[name]]:.2f}x" if name in peer else "-"
        bytes_versus = f"{held[name] / held[peer[name]]:.2f}x" if name in peer else "-"
        print(
            f"{name:<28} {rate[name] / 1e6:>11.1f} {rate[name] / rate[fp32]:>7.2f}x "
            f"{versus:>9} {delay[name] * 1e6:>8.1f} {delay[name] / delay[fp32]:>7.2f}x "
            f"{size(held[name]):>10} {bytes_versus:>9}"
        )
    for name, (base, quantized) in {
        "sparq 0.8 (1,4) 8-bit": ("torch fp32, huge pages", "FBGEMM int8, huge pages"),
        "sparq 0.0 4-bit": ("torch fp32, huge pages", "FBGEMM int4, huge pages"),
    }.items():
        print(
            f"{name} against huge-page baselines: {rate[name] / rate[base]:.2f}x fp32, "
            f"{rate[name] / rate[quantized]:.2f}x {quantized.split(',')[0]}"
        )
    spread = {name: (min(values) / 1e6, max(values) / 1e6) for name, values in throughput.items()}
    print(
        "throughput range over rounds (M/s): "
        + "; ".join(f"{name}: {lo:.0f}-{hi:.0f}" for name, (lo, hi) in spread.items())
    )
    print(machine().split("; ", 1)[1])


if __name__ == "__main__":
    main()
