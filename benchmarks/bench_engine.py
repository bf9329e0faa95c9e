"""Engine benchmark: sparq's engine against torch.ao's post_training_sparse_quantize.

A ROWS x COLS float32 table, level 0.8, block (1, 4), 8 bits, both orders. Each run happens in a
fresh process, so peak RSS is the process's own; the table is built with the same seed in both.
Prints wall time and peak RSS of each, and the ratios reference / sparq measured in this run.

    python benchmarks/bench_engine.py [--rows 1000000] [--cols 128] [--skip-reference]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _measure import gib, run_measured

_MAKE_TABLE = """
import time, warnings
warnings.filterwarnings("ignore")
import torch
torch.manual_seed(0)
table = torch.randn({rows}, {cols})
"""

_SPARQ = (
    _MAKE_TABLE
    + """
from sparqcli.engine.pipeline import compress_table
from sparqcli.settings import Quantization, Sparsity
start = time.perf_counter()
compressed, stats = compress_table(
    table, "{order}", Sparsity(0.8, (1, 4)), Quantization(8)
)
_seconds = time.perf_counter() - start
"""
)

_REFERENCE = (
    _MAKE_TABLE
    + """
from torch import nn
from torch.ao.pruning._experimental.data_sparsifier import DataNormSparsifier
from torch.ao.pruning._experimental.data_sparsifier.quantization_utils import (
    post_training_sparse_quantize,
)
model = nn.Sequential(nn.Embedding({rows}, {cols}))
with torch.no_grad():
    model[0].weight.copy_(table)
del table
start = time.perf_counter()
post_training_sparse_quantize(
    model, DataNormSparsifier, sparsify_first={sparsify_first},
    sparsity_level=0.8, sparse_block_shape=(1, 4), norm="L1",
)
_seconds = time.perf_counter() - start
"""
)


def main() -> None:
    """Runs the benchmark and prints one line per order."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--cols", type=int, default=128)
    parser.add_argument("--skip-reference", action="store_true")
    args = parser.parse_args()
    table_bytes = args.rows * args.cols * 4
    print(
        f"engine: {args.rows:,} x {args.cols} float32 ({gib(table_bytes)}), level 0.8, block (1, 4), 8 bits"
    )
    header = f"{'order':<15} {'sparq s':>8} {'sparq RSS':>10} {'RSS/table':>9} {'ref s':>7} {'ref RSS':>9} {'speed-up':>8} {'RSS ratio':>9}"
    print(header)
    for order in ("sparsify-first", "quantize-first"):
        mine = run_measured(_SPARQ.format(rows=args.rows, cols=args.cols, order=order))
        line = (
            f"{order:<15} {mine['seconds']:>8.2f} {gib(mine['peak_rss']):>10} "
            f"{mine['peak_rss'] / table_bytes:>8.2f}x"
        )
        if not args.skip_reference:
            ref = run_measured(
                _REFERENCE.format(
                    rows=args.rows, cols=args.cols, sparsify_first=order == "sparsify-first"
                )
            )
            line += (
                f" {ref['seconds']:>7.2f} {gib(ref['peak_rss']):>9}"
                f" {ref['seconds'] / mine['seconds']:>7.1f}x {ref['peak_rss'] / mine['peak_rss']:>8.1f}x"
            )
        print(line, flush=True)


if __name__ == "__main__":
    main()
