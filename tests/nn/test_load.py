"""load_compressed: a model's embedding modules replaced by compressed ones."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

import sparqcli
from sparqcli.compression import compress
from sparqcli.errors import UsageError
from sparqcli.nn import Embedding, EmbeddingBag, load_compressed

CONFIG = """\
version: 1
min_table_bytes: 0                 # the test tables are tiny
sparsity: {level: 0.6, block_shape: [1, 4]}
quantization: {bits: 8}
layers:
  - match: tokens
  - match: "bags.*"
    quantization: {bits: 4}
"""


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tokens = nn.Embedding(50, 12, padding_idx=0)
        self.bags = nn.ModuleList(
            [nn.EmbeddingBag(80, 8, mode="sum"), nn.EmbeddingBag(30, 6, mode="max")]
        )
        self.proj = nn.Linear(12 + 8 + 6, 3)

    def forward(self, tokens: torch.Tensor, ids: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        parts = [self.tokens(tokens).mean(1), self.bags[0](ids), self.bags[1](other)]
        return self.proj(torch.cat(parts, 1))


@pytest.fixture
def compressed(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    checkpoint = tmp_path / "model.pt"
    torch.save(Model().state_dict(), checkpoint)
    config = tmp_path / "cfg.yaml"
    config.write_text(CONFIG)
    output = tmp_path / "model.sparq.safetensors"
    compress([checkpoint], config=config, output=output)
    return output


def _inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return (
        torch.randint(0, 50, (4, 5), generator=generator),
        torch.randint(0, 80, (4, 3), generator=generator),
        torch.randint(0, 30, (4, 2), generator=generator),
    )


def test_load_compressed_replaces_both_kinds(backend: str, compressed: Path) -> None:
    model = Model()
    replaced = load_compressed(model, compressed)
    assert replaced == ["bags.0", "bags.1", "tokens"]
    assert isinstance(model.tokens, Embedding) and model.tokens.padding_idx == 0
    assert isinstance(model.bags[0], EmbeddingBag) and model.bags[0].mode == "sum"
    assert model.bags[1].mode == "max"
    dense = Model()
    dense.load_state_dict(sparqcli.load(compressed))
    with torch.no_grad():
        torch.testing.assert_close(model(*_inputs()), dense(*_inputs()), rtol=1e-5, atol=1e-6)
    tokens = _inputs()[0]
    assert torch.equal(model.tokens(tokens), F.embedding(tokens, dense.tokens.weight))
    assert model.bags[0].nbytes < dense.bags[0].weight.numel() * 4 / 3


def test_model_state_dict_stays_compressed(compressed: Path) -> None:
    model = Model()
    load_compressed(model, compressed)
    state = model.state_dict()
    assert "tokens.codes" in state and "tokens.weight" not in state
    again = Model()
    load_compressed(again, compressed)
    again.load_state_dict(state)


def _write_variant(
    path: Path, source: Path, drop: str | None = None, rename: str | None = None
) -> None:
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(source), framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
        metadata = handle.metadata()
    if drop:
        tensors.pop(drop)
    if rename:
        document = json.loads(metadata["sparq"])
        document["tables"]["other.weight"] = document["tables"].pop(rename)
        for part in ("codes", "scale", "zero_point", "mask"):
            if f"{rename}.{part}" in tensors:
                tensors[f"other.weight.{part}"] = tensors.pop(f"{rename}.{part}")
        metadata = {"sparq": json.dumps(document, sort_keys=True, separators=(",", ":"))}
    save_file(tensors, str(path), metadata=metadata)


def test_strict_errors_name_the_key(compressed: Path, tmp_path: Path) -> None:
    class Smaller(Model):
        def __init__(self) -> None:
            super().__init__()
            self.tokens = nn.Embedding(49, 12)

    model = Smaller()
    with pytest.raises(UsageError, match=r"'tokens\.weight' has shape \[50, 12\]"):
        load_compressed(model, compressed)
    assert isinstance(model.tokens, nn.Embedding) and not isinstance(model.tokens, Embedding)
    assert load_compressed(model, compressed, strict=False) == ["bags.0", "bags.1"]

    renamed = tmp_path / "renamed.sparq.safetensors"
    _write_variant(renamed, compressed, rename="bags.1.weight")
    with pytest.raises(UsageError, match=r"'other\.weight' matches no nn\.Embedding"):
        load_compressed(Model(), renamed)

    missing = tmp_path / "missing.sparq.safetensors"
    _write_variant(missing, compressed, drop="proj.bias")
    with pytest.raises(UsageError, match=r"missing 'proj\.bias'"):
        load_compressed(Model(), missing)
    assert load_compressed(Model(), missing, strict=False) == ["bags.0", "bags.1", "tokens"]

    dense = tmp_path / "dense.safetensors"  # the original, not sparq's output
    save_file(Model().state_dict(), str(dense))
    with pytest.raises(
        UsageError, match=r"dense\.safetensors: holds no compressed table \(not sparq"
    ):
        load_compressed(Model(), dense, strict=False)
