"""load_compressed and the modules with tied tables (format version 2) and bfloat16 scales."""

from __future__ import annotations

import torch
from torch import nn

import sparqcli
from sparqcli.nn import Embedding, load_compressed


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(100, 16)
        self.other = nn.Embedding(100, 16)
        self.head = nn.Linear(16, 100, bias=False)
        self.head.weight = self.emb.weight  # tied output head
        self.other.weight = self.emb.weight  # a second tied embedding


def test_tied_tables_load_into_every_key(tmp_path) -> None:
    torch.manual_seed(0)
    model = Tied()
    path = tmp_path / "tied.pt"
    torch.save(model.state_dict(), path)
    config = sparqcli.Config(min_table_bytes=0, layers=[sparqcli.Rule(match="emb")])
    sparqcli.compress(path, config)
    out = tmp_path / "tied.sparq.safetensors"
    with sparqcli.open(out) as file:
        assert sorted(file.metadata()["tables"]["emb.weight"]["aliases"]) == [
            "head.weight",
            "other.weight",
        ]
    dense = sparqcli.load(out)["emb.weight"]
    fresh = Tied()
    replaced = load_compressed(fresh, out)
    assert replaced == ["emb", "other"]
    ids = torch.tensor([0, 7, 99])
    assert torch.equal(fresh.emb(ids), dense[ids]) and torch.equal(fresh.other(ids), dense[ids])
    assert torch.equal(fresh.head.weight, dense)


def test_bfloat16_scales_serve_exactly(tmp_path) -> None:
    torch.manual_seed(0)
    config = sparqcli.Config(
        min_table_bytes=0,
        quantization=sparqcli.Quantization(bits=4, scale_dtype="bfloat16"),
        layers=[sparqcli.Rule(match="t")],
    )
    path = tmp_path / "bf.sparq.safetensors"
    sparqcli.compress_state_dict({"t": torch.randn(300, 24)}, config).save(path)
    dense = sparqcli.load(path)["t"]
    ids = torch.tensor([0, 1, 150, 299])
    for memory_map in (False, True):
        module = Embedding.from_file(path, "t", memory_map=memory_map)
        assert torch.equal(module(ids), dense[ids])


def test_a_tie_the_file_does_not_record_is_served_decoded(tmp_path) -> None:
    # Hugging Face's save_pretrained drops a tied output head from its files, so the compressed
    # file has no alias for it; the model still ties head.weight to emb.weight. The head gets
    # the decoded table, the embedding the compressed module.
    torch.manual_seed(0)
    model = Tied()
    state = {k: v for k, v in model.state_dict().items() if k == "emb.weight"}
    config = sparqcli.Config(min_table_bytes=0, layers=[sparqcli.Rule(match="emb.weight")])
    out = tmp_path / "untied-file.sparq.safetensors"
    sparqcli.compress_state_dict(state, config).save(out)
    dense = sparqcli.load(out)["emb.weight"]
    fresh = Tied()
    assert load_compressed(fresh, out) == ["emb"]
    ids = torch.tensor([0, 7, 99])
    assert torch.equal(fresh.emb(ids), dense[ids])
    assert torch.equal(fresh.head.weight, dense) and torch.equal(fresh.other.weight, dense)
    # Loading again (a re-compressed file swapped into a serving model) keeps the tie.
    with torch.no_grad():
        fresh.head.weight.zero_()
    assert load_compressed(fresh, out) == ["emb"]
    assert torch.equal(fresh.emb(ids), dense[ids]) and torch.equal(fresh.head.weight, dense)


def test_from_file_serves_an_alias_as_its_table(tmp_path) -> None:
    torch.manual_seed(0)
    path = tmp_path / "tied.pt"
    torch.save(Tied().state_dict(), path)
    sparqcli.compress(path, sparqcli.Config(min_table_bytes=0, layers=[sparqcli.Rule(match="emb")]))
    out = tmp_path / "tied.sparq.safetensors"
    ids = torch.tensor([3, 50])
    through_alias = Embedding.from_file(out, "head.weight")
    assert torch.equal(through_alias(ids), Embedding.from_file(out, "emb.weight")(ids))
