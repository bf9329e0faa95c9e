"""Every shipped config passes its own gates on representative synthetic tables of its kind.

The tables stand in for what each config is for: token embeddings (rows whose norms follow a
Zipf law, a tenth of them near-zero like unused or rare tokens, Gaussian and heavy-tailed rows),
recommender tables (Zipf row norms: frequent ids train longer; several widths), and mixed models
for the default config. The numbers each config's comments quote come from these tables.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import sparqcli
from sparqcli.config import Config

CONFIGS = Path(__file__).parent.parent / "configs"


def zipf_rows(
    rows: int, cols: int, seed: int, exponent: float, near_zero: int = 0, heavy: float = 0.0
) -> torch.Tensor:
    """Returns rows with norms ~ rank^-exponent (shuffled), `near_zero` of them scaled by 1e-3.

    `heavy` > 0 draws Student-t values with that many degrees of freedom instead of Gaussian.
    """
    generator = torch.Generator().manual_seed(seed)
    if heavy:
        chi = torch.randn(rows, cols, int(heavy), generator=generator).square().sum(-1)
        table = torch.randn(rows, cols, generator=generator) / (chi / heavy).sqrt()
    else:
        table = torch.randn(rows, cols, generator=generator)
    norms = torch.arange(1, rows + 1, dtype=torch.float32) ** -exponent
    table *= norms[torch.randperm(rows, generator=generator)][:, None]
    if near_zero:
        table[torch.randperm(rows, generator=generator)[:near_zero]] *= 1e-3
    return table


def token_embedding(seed: int, heavy: float = 0.0) -> dict[str, torch.Tensor]:
    return {
        "model.embed_tokens.weight": zipf_rows(20000, 32, seed, 0.3, near_zero=2000, heavy=heavy)
    }


def recommender(seed: int) -> dict[str, torch.Tensor]:
    return {
        "emb_l.0.weight": zipf_rows(8000, 64, seed, 1.0),
        "emb_l.1.weight": zipf_rows(8000, 32, seed + 1, 1.0),
        "emb_l.2.weight": zipf_rows(4000, 16, seed + 2, 1.0),
    }


def mixed(seed: int) -> dict[str, torch.Tensor]:
    return {
        "token_embedding.weight": zipf_rows(4000, 64, seed, 0.3, near_zero=400),
        "bags.0.weight": zipf_rows(8000, 32, seed + 1, 1.0),
        "bags.1.weight": torch.randn(500, 16, generator=torch.Generator().manual_seed(seed)),
        "proj.weight": torch.randn(8, 112, generator=torch.Generator().manual_seed(seed)),
    }


KINDS = {
    "token-embedding.yaml": [token_embedding(0), token_embedding(1, heavy=3.0)],
    "recommender.yaml": [recommender(0)],
    "default.yaml": [mixed(0), token_embedding(2), recommender(3)],
}


def test_every_shipped_config_has_representative_tables() -> None:
    assert sorted(path.name for path in CONFIGS.glob("*.yaml")) == sorted(KINDS)


@pytest.mark.parametrize("name", sorted(KINDS))
def test_shipped_config_passes_its_own_gates(name: str) -> None:
    config = Config.from_yaml(CONFIGS / name)
    for state in KINDS[name]:
        result = sparqcli.compress_state_dict(state, config)
        assert result.report.tables, name
        assert result.report.gate_failures == [], name


def test_old_token_embedding_settings_empty_rare_rows() -> None:
    """The evidence for token-embedding.yaml's `level: 0`: 15 % global pruning empties the
    near-zero rows (row cosine 0), which its own min_row_cosine gate refuses."""
    config = Config.from_yaml(CONFIGS / "token-embedding.yaml", ["sparsity.level=0.15"])
    result = sparqcli.compress_state_dict(token_embedding(0), config)
    [table] = result.report.tables
    assert table.stats is not None and table.stats.row_cosine_min == 0.0
    assert table.gate_failures == ["row_cosine_min 0 < min_row_cosine 0.9"]


def test_the_default_config_excludes_the_position_embeddings_starter_configs_leave_dense():
    from sparqcli.candidates import POSITION_EMBEDDING_PATTERNS

    default = Config.from_yaml(CONFIGS / "default.yaml")
    assert tuple(default.exclude) == POSITION_EMBEDDING_PATTERNS
