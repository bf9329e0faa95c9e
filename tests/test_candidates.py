"""Candidate tables by evidence (module type, name, shape), `inspect`'s reasons, and the starter
config of `inspect --suggest-config`; on a BERT-shaped checkpoint built with transformers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

import sparqcli
from sparqcli.candidates import candidacy, find_candidates
from sparqcli.cli import app
from sparqcli.config import Config
from sparqcli.dtypes import TensorInfo
from sparqcli.errors import UsageError

runner = CliRunner()


def run(*args: object):
    return runner.invoke(app, [str(arg) for arg in args], catch_exceptions=False)


def reasons(key: str, shape: tuple[int, ...], dtype: str = "float32") -> tuple[str, ...]:
    found = candidacy(key, TensorInfo(shape, dtype))
    return found.reasons if found.is_candidate else ()


@pytest.mark.parametrize(
    ("key", "shape", "expected"),
    [
        ("bert.embeddings.word_embeddings.weight", (30522, 768), ("name", "shape")),
        ("bert.embeddings.token_type_embeddings.weight", (2, 768), ("name",)),
        ("model.embed_tokens.weight", (32000, 4096), ("name", "shape")),
        ("transformer.wte.weight", (50257, 768), ("name", "shape")),
        ("transformer.wpe.weight", (1024, 768), ("name",)),
        ("tok_embeddings.weight", (32000, 4096), ("name", "shape")),
        ("emb_l.3.weight", (100, 16), ("name",)),
        ("sparse_arch.embedding_bag_collection.embedding_bags.t_cat_0.weight", (10, 4), ("name",)),
        ("user_lookup.weight", (500, 8), ("name",)),
        ("item_table", (500, 8), ("name",)),
        ("ids.weight", (100000, 64), ("shape",)),
        # attention and MLP weights, heads and norms are not candidates, whatever their shape
        ("encoder.layer.0.attention.self.query.weight", (768, 768), ()),
        ("encoder.layer.0.intermediate.dense.weight", (3072, 768), ()),
        ("model.layers.0.mlp.up_proj.weight", (11008, 4096), ()),
        ("lm_head.weight", (50257, 768), ()),
        ("proj.weight", (100000, 64), ()),
        ("w", (64, 64), ()),
        # only 2-D floating tensors are tables
        ("embeddings.position_ids", (1, 512), ()),
        ("embeddings.LayerNorm.weight", (768,), ()),
        ("emb.codes", (100, 16), ()),
    ],
)
def test_candidates_by_name_and_shape(key: str, shape: tuple[int, ...], expected: tuple) -> None:
    dtype = "int64" if key.endswith(("position_ids", "codes")) else "float32"
    assert reasons(key, shape, dtype) == expected


def test_module_types_decide_when_known() -> None:
    tensors = {
        "token.weight": TensorInfo((10, 4), "float32"),  # nothing in its name or shape
        "bags.0.weight": TensorInfo((10, 4), "float32"),
        "embedding_proj.weight": TensorInfo((100000, 4), "float32"),  # name and shape, a Linear
    }
    types = {
        "": "Model",
        "token": "Embedding",
        "bags.0": "EmbeddingBag",
        "embedding_proj": "Linear",
    }
    found = find_candidates(tensors, types)
    assert {key: c.reasons for key, c in found.items() if c.is_candidate} == {
        "token.weight": ("type",),
        "bags.0.weight": ("type",),
    }
    assert found["token.weight"].why == "module token is an Embedding"
    assert found["embedding_proj.weight"].why == "module embedding_proj is a Linear"


def test_a_pickled_module_inspected_by_type(tmp_path: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 2))
    path = tmp_path / "module.pt"
    torch.save(model, path)
    inspection = sparqcli.inspect(path, trust_pickle=True)
    assert [(e.key, e.candidate.reasons) for e in inspection.candidates] == [
        ("0.weight", ("type",))
    ]


# --- a BERT-shaped sentence encoder, built with transformers ---------------------------------------


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer BERT (30522 x 128 vocabulary) saved with save_pretrained; returns the
    folder (model.safetensors inside) beside which `bert.pt` holds its torch.save'd state dict."""
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("bert") / "bert"
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=30522,
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=512,
    )
    transformers.BertModel(config).save_pretrained(folder)
    state = transformers.BertModel.from_pretrained(folder).state_dict()
    torch.save(state, folder.with_suffix(".pt"))
    return folder


EMBEDDINGS = [
    "embeddings.word_embeddings.weight",
    "embeddings.position_embeddings.weight",
    "embeddings.token_type_embeddings.weight",
]


@pytest.mark.parametrize("name", ["bert.pt", "bert/model.safetensors"])
def test_bert_embedding_tables_are_the_only_candidates(bert: Path, name: str) -> None:
    path = bert.parent / name
    inspection = sparqcli.inspect(path)
    assert sorted(e.key for e in inspection.candidates) == sorted(EMBEDDINGS)
    assert len(inspection.tensors) > 30
    data = json.loads(run("inspect", path, "--json").stdout)
    assert sorted(data["candidates"]) == sorted(EMBEDDINGS)
    word = data["tensors"]["embeddings.word_embeddings.weight"]
    assert (word["candidate"], word["reasons"]) == (True, ["name", "shape"])
    query = data["tensors"]["encoder.layer.0.attention.self.query.weight"]
    assert (query["table"], query["candidate"]) == (True, False)
    assert query["why"] == "name says projection (attention, query, self)"


def test_suggest_config_leaves_gpt2_positions_dense(tmp_path: Path) -> None:
    checkpoint = tmp_path / "gpt2.pt"
    generator = torch.Generator().manual_seed(0)
    torch.save(
        {
            "transformer.wte.weight": torch.randn(2000, 64, generator=generator),
            "transformer.wpe.weight": torch.randn(1024, 64, generator=generator),
            "transformer.h.0.attn.c_attn.weight": torch.randn(64, 192, generator=generator),
            "lm_head.weight": torch.randn(2000, 64, generator=generator),
        },
        checkpoint,
    )
    target = tmp_path / "starter.yaml"
    assert run("inspect", checkpoint, "--suggest-config", target).exit_code == 0
    text = target.read_text()
    assert "#   transformer.wpe.weight: 1024x64 float32, 256 KiB" in text
    assert "transformer.wpe.weight" not in [rule.match for rule in Config.from_yaml(target).layers]
    assert "transformer.wte.weight" in [rule.match for rule in Config.from_yaml(target).layers]
    # and the shipped default config keeps it dense too
    default = Path(__file__).parent.parent / "configs" / "default.yaml"
    plan = sparqcli.compress(checkpoint, default, dry_run=True)
    assert [table.key for table in plan.files[0].tables] == ["transformer.wte.weight"]


def test_suggest_config_selects_the_candidates(bert: Path, tmp_path: Path) -> None:
    checkpoint = bert.with_suffix(".pt")
    target = tmp_path / "starter.yaml"
    result = run("inspect", checkpoint, "--suggest-config", target)
    assert result.exit_code == 0, result.output
    assert result.stderr == (
        f"{target}: starter config selecting 1 table; check it with: "
        f"sparq validate {target} {checkpoint}\n"
    )
    text = target.read_text()
    assert text.startswith("# sparq starter config for bert.pt")
    assert "#   embeddings.token_type_embeddings.weight: 2x128 float32, 1.00 KiB" in text
    # position embeddings stay dense, as configs/default.yaml keeps them
    assert "#   embeddings.position_embeddings.weight: 512x128 float32, 256 KiB" in text
    config = Config.from_yaml(target)
    assert config == Config.from_dict(yaml.safe_load(text))
    assert [rule.match for rule in config.layers] == EMBEDDINGS[:1]
    plan = sparqcli.compress(checkpoint, target, dry_run=True)
    assert [table.key for table in plan.files[0].tables] == EMBEDDINGS[:1]
    # never replaced without --force; the output is written atomically
    again = run("inspect", checkpoint, "--suggest-config", target)
    assert again.exit_code == 2
    assert again.stderr == f"sparq: error: {target}: already exists; pass --force to replace it\n"
    assert run("inspect", checkpoint, "--suggest-config", target, "--force").exit_code == 0
    assert [p.name for p in tmp_path.iterdir()] == ["starter.yaml"]


def test_suggest_config_names_keys_with_glob_characters_exactly(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "w.safetensors"
    generator = torch.Generator().manual_seed(0)
    tables = {
        key: torch.randn(2000, 32, generator=generator) for key in ("emb[0].weight", "emb0.weight")
    }
    save_file(tables, str(path))
    target = tmp_path / "starter.yaml"
    sparqcli.suggest_config(path, target)
    assert [rule.match for rule in Config.from_yaml(target).layers] == [
        "emb0.weight",
        r"re:emb\[0\]\.weight",
    ]
    plan = sparqcli.compress(path, target, dry_run=True)
    chosen = {table.key: table.rule.index for table in plan.files[0].tables}
    assert chosen == {"emb0.weight": 0, "emb[0].weight": 1}


def test_suggest_config_without_candidates(tmp_path: Path) -> None:
    path = tmp_path / "mlp.pt"
    torch.save({"fc.weight": torch.zeros(4, 4)}, path)
    with pytest.raises(UsageError, match=r"mlp\.pt: no candidate embedding table"):
        sparqcli.suggest_config(path, tmp_path / "x.yaml")
    assert not (tmp_path / "x.yaml").exists()


def test_a_tensor_entry_finds_its_candidacy_from_key_and_shape() -> None:
    from sparqcli.results import TensorEntry

    entry = TensorEntry("model.embed_tokens.weight", TensorInfo((32000, 64), "float32"))
    assert entry.candidate.reasons == ("name", "shape")
    assert entry.to_dict()["why"] == "name says embedding (embed); shape 32000 rows x 64 columns"
