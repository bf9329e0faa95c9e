"""Shared fixtures: tiny checkpoints and configs built in tmp_path."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


def make_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Returns a small recommender-like state dict: two tables and a projection."""
    generator = torch.Generator().manual_seed(seed)
    return {
        "emb.weight": torch.randn(64, 16, generator=generator),
        "bags.0.weight": torch.randn(40, 8, generator=generator),
        "proj.weight": torch.randn(4, 24, generator=generator),
        "proj.bias": torch.randn(4, generator=generator),
    }


@pytest.fixture
def state() -> dict[str, torch.Tensor]:
    return make_state()


@pytest.fixture
def checkpoint(tmp_path: Path, state: dict[str, torch.Tensor]) -> Path:
    path = tmp_path / "model.pt"
    torch.save(state, path)
    return path


CONFIG_TEXT = """\
version: 1
order: sparsify-first
sparsity: {level: 0.5, block_shape: [1, 4]}
quantization: {bits: 8}
min_table_bytes: 0               # the fixture's tables are tiny; compress them all the same
layers:
  - match: emb
  - match: "bags.*"
    quantization: {bits: 4}
"""


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(CONFIG_TEXT)
    return path
