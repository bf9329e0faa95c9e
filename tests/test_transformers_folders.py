"""Tiny randomly initialised transformers models: save_pretrained folders through sparq and back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import sparqcli
from sparqcli.cli import app

transformers = pytest.importorskip("transformers")

runner = CliRunner()
CONFIG = "version: 1\nmin_table_bytes: 0\nsparsity: {level: 0.5}\nquantization: {bits: 4}\nlayers:\n  - match: '*embed_tokens*'\n"


def run(*args: object):
    return runner.invoke(app, [str(arg) for arg in args], catch_exceptions=False)


def save_llama(path: Path, *, tied: bool, shard: str | None) -> None:
    config = transformers.LlamaConfig(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tied,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        model.model.embed_tokens.weight[-3:] = 0.0  # vocabulary padding
    if shard is None:
        model.save_pretrained(path)
    else:
        model.save_pretrained(path, max_shard_size=shard)


def load_model(path: Path) -> torch.nn.Module:
    model, info = transformers.AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model


@pytest.mark.parametrize("tied", [True, False])
def test_sharded_llama_round_trip_matches_the_single_file_path(tmp_path: Path, tied: bool) -> None:
    config = tmp_path / "cfg.yaml"
    config.write_text(CONFIG)
    sharded, single = tmp_path / "sharded", tmp_path / "single"
    save_llama(sharded, tied=tied, shard="60KB")
    save_llama(single, tied=tied, shard=None)
    assert len(list(sharded.glob("model-*.safetensors"))) > 1
    assert (single / "model.safetensors").exists()

    done = run("compress", sharded, "--config", config, "--report", tmp_path / "r.json")
    assert done.exit_code == 0, done.output
    assert ("the output head is this table, so it changes too" in done.output) is tied
    assert "model.embed_tokens.weight: 3 all-zero row(s)" in done.output
    out = tmp_path / "sharded-sparq"
    assert (out / "config.json").read_bytes() == (sharded / "config.json").read_bytes()
    assert run("inspect", out).exit_code == 0
    done = run("decompress", out, "-o", tmp_path / "dense")
    assert done.exit_code == 0, done.output

    # The single-file path: the same weights as one model.safetensors.
    done = run(
        "compress",
        single / "model.safetensors",
        "--config",
        config,
        "-o",
        tmp_path / "one.sparq.safetensors",
    )
    assert done.exit_code == 0, done.output
    assert ("the output head is this table, so it changes too" in done.output) is tied
    assert (
        run(
            "decompress", tmp_path / "one.sparq.safetensors", "-o", tmp_path / "one.safetensors"
        ).exit_code
        == 0
    )

    model = load_model(tmp_path / "dense")
    single_state = sparqcli.load(tmp_path / "one.safetensors")
    state = model.state_dict()
    for key, value in single_state.items():
        assert torch.equal(state[key], value), key
    original = load_model(sharded).state_dict()
    embed = "model.embed_tokens.weight"
    assert not torch.equal(state[embed], original[embed])
    assert torch.equal(state["model.norm.weight"], original["model.norm.weight"])
    assert (model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()) is tied
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["folders"][0]["written"] and report["folders"][0]["copied"] == [
        "config.json",
        "generation_config.json",
    ]


@pytest.mark.parametrize("tied", [True, False])
def test_a_compressed_sharded_folder_serves_in_the_model(tmp_path: Path, tied: bool) -> None:
    # load_compressed reads a sparq folder's shards as one; a tied head (absent from the
    # files) gets the decoded table, so the logits are the decompressed model's.
    from sparqcli.nn import Embedding, load_compressed

    config = tmp_path / "cfg.yaml"
    config.write_text(CONFIG)
    folder = tmp_path / "llama"
    save_llama(folder, tied=tied, shard="60KB")
    assert run("compress", folder, "--config", config).exit_code == 0
    out = tmp_path / "llama-sparq"
    assert len(list(out.glob("model-*.safetensors"))) > 1
    assert run("decompress", out, "-o", tmp_path / "dense").exit_code == 0
    dense = load_model(tmp_path / "dense")
    served = load_model(folder)
    assert load_compressed(served, out) == ["model.embed_tokens"]
    assert isinstance(served.model.embed_tokens, Embedding)
    ids = torch.tensor([[1, 5, 300, 319]])
    with torch.no_grad():
        assert torch.equal(served(ids).logits, dense(ids).logits)
