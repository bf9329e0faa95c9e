"""Builds the bundled example checkpoint: a tiny recommender-style model with one token
embedding (nn.Embedding), two EmbeddingBag tables and a projection layer.

    python examples/make_example.py build/example.pt

Weights are drawn from a fixed seed, so the file (and its compression) is the same every time.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn


class ExampleModel(nn.Module):
    """Token embedding + two bags of sparse features + a projection."""

    def __init__(self) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(1000, 64)
        self.bags = nn.ModuleList([nn.EmbeddingBag(2000, 32, mode="sum"), nn.EmbeddingBag(500, 16)])
        self.proj = nn.Linear(64 + 32 + 16, 8)


def main() -> None:
    """Writes the example state dict to the path given on the command line."""
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "build/example.pt")
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = ExampleModel()
    with torch.no_grad():
        # Real tables have rows of different scale (frequent ids train longer).
        for table in (model.token_embedding.weight, model.bags[0].weight, model.bags[1].weight):
            table.mul_(torch.rand(table.shape[0], 1) * 2 + 0.1)
    torch.save(model.state_dict(), target)
    print(f"wrote {target}: {sum(p.numel() for p in model.state_dict().values()):,} values")


if __name__ == "__main__":
    main()
