"""Quality per byte: min/max against MSE row ranges at every width, and what MSE ranges cost.

Three synthetic float32 tables of ROWS x COLS (seeded): Gaussian rows; heavy-tailed rows
(Student t, 3 degrees of freedom); Gaussian rows whose norms follow a Zipf law (row r scaled
by 1 / r, like the token embeddings of a vocabulary sorted by frequency). Each is compressed
in memory (`compress_table`, sparsify-first, no pruning) with `range: minmax` and
`range: mse` at 1 to 8 bits; printed per table: bits per weight (codes and float32 qparams,
the file's bytes), relative L2 error and mean row cosine of each range, and the change of
the error.

Then the time: a TIME_ROWS x 128 Gaussian table, 4 and 8 bits (`--time-bits`), at level 0 (quantization only) and
level 0.5 (block (1, 4)), minmax and mse interleaved, REPEAT times each, in this process; the
medians of wall and CPU time, and mse / minmax. With `--threads N`, torch uses N threads.

    python benchmarks/bench_quality.py [--rows 20000] [--cols 384] [--time-rows 262144]
                                       [--repeat 5] [--threads N] [--skip-time] [--skip-quality]
                                       [--time-bits 4 8]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from sparqcli.engine.pipeline import compress_table
from sparqcli.format import table_file_bytes
from sparqcli.settings import Quantization, Sparsity

KINDS = ("gaussian", "heavy-tailed", "zipf-norms")


def make_table(kind: str, rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """Returns a seeded float32 table of one of `KINDS`. Raises ValueError for another kind."""
    generator = torch.Generator().manual_seed(seed)
    normal = torch.randn(rows, cols, generator=generator)
    if kind == "gaussian":
        return normal
    if kind == "heavy-tailed":
        chi2 = torch.randn(rows, cols, 3, generator=generator).square().sum(-1)
        return normal / (chi2 / 3).sqrt()
    if kind == "zipf-norms":
        return normal / torch.arange(1, rows + 1, dtype=torch.float32)[:, None]
    raise ValueError(f"unknown kind {kind!r}")


def quality(table: torch.Tensor, bits: int, value_range: str) -> tuple[float, float, float]:
    """Returns (bits per weight, relative L2 error, mean row cosine) of one compression."""
    compressed, stats = compress_table(
        table,
        "sparsify-first",
        Sparsity(level=0.0),
        Quantization(bits, range=value_range),
    )
    return 8 * table_file_bytes(compressed) / table.numel(), stats.rel_error, stats.row_cosine_mean


def print_quality(rows: int, cols: int) -> None:
    """Prints the quality table of every kind at every width."""
    print(f"quality: {rows:,} x {cols} float32 per kind, no pruning, float32 qparams")
    print(
        f"{'table':<13} {'bits':>4} {'bits/w':>7} {'minmax err':>10} {'mse err':>8} "
        f"{'change':>7} {'minmax cos':>10} {'mse cos':>8}"
    )
    for kind in KINDS:
        table = make_table(kind, rows, cols)
        for bits in range(1, 9):
            size, minmax_error, minmax_cosine = quality(table, bits, "minmax")
            _, mse_error, mse_cosine = quality(table, bits, "mse")
            print(
                f"{kind:<13} {bits:>4} {size:>7.3f} {minmax_error:>10.4f} {mse_error:>8.4f} "
                f"{mse_error / minmax_error - 1:>+7.1%} {minmax_cosine:>10.5f} {mse_cosine:>8.5f}",
                flush=True,
            )


def print_time(rows: int, repeat: int, widths: list[int]) -> None:
    """Prints the median time of minmax and mse compression, interleaved, and their ratio."""
    table = make_table("gaussian", rows, 128)
    print(
        f"time: {rows:,} x 128 float32, sparsify-first, {torch.get_num_threads()} "
        f"thread(s), median of {repeat} interleaved runs"
    )
    print(
        f"{'bits':>4} {'level':>5} {'minmax s':>8} {'mse s':>7} {'ratio':>6} "
        f"{'minmax cpu s':>12} {'mse cpu s':>9} {'cpu ratio':>9}"
    )
    for bits in widths:
        _print_times(table, bits, repeat)


def _print_times(table: torch.Tensor, bits: int, repeat: int) -> None:
    # Builds or loads the compiled search before anything is timed.
    compress_table(
        table[:64], "sparsify-first", Sparsity(0.0, (1, 4)), Quantization(4, range="mse")
    )
    for level in (0.0, 0.5):
        sparsity = Sparsity(level, (1, 4))
        runs: dict[str, list[tuple[float, float]]] = {"minmax": [], "mse": []}
        for _ in range(repeat):
            for value_range in runs:
                wall, cpu = time.perf_counter(), time.process_time()
                compress_table(
                    table, "sparsify-first", sparsity, Quantization(bits, range=value_range)
                )
                runs[value_range].append((time.perf_counter() - wall, time.process_time() - cpu))
        wall = {key: statistics.median(run[0] for run in value) for key, value in runs.items()}
        cpu = {key: statistics.median(run[1] for run in value) for key, value in runs.items()}
        print(
            f"{bits:>4} {level:>5} {wall['minmax']:>8.3f} {wall['mse']:>7.3f} "
            f"{wall['mse'] / wall['minmax']:>5.2f}x {cpu['minmax']:>12.3f} {cpu['mse']:>9.3f} "
            f"{cpu['mse'] / cpu['minmax']:>8.2f}x",
            flush=True,
        )


def main() -> None:
    """Parses the arguments and prints the quality table, then the time table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--cols", type=int, default=384)
    parser.add_argument("--time-rows", type=int, default=262_144)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--skip-time", action="store_true")
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--time-bits", type=int, nargs="+", default=[4, 8])
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if not args.skip_quality:
        print_quality(args.rows, args.cols)
        print()
    if not args.skip_time:
        print_time(args.time_rows, args.repeat, args.time_bits)


if __name__ == "__main__":
    main()
