"""Model folders (Hugging Face layout) in and out: shards + index, side files, atomic folders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

import sparqcli
from sparqcli.cli import app
from sparqcli.errors import InputError, UsageError

huggingface_hub = pytest.importorskip("huggingface_hub")

runner = CliRunner()

CONFIG = sparqcli.Config(
    min_table_bytes=0,
    sparsity=sparqcli.Sparsity(level=0.5, block_shape=(1, 4)),
    quantization=sparqcli.Quantization(bits=4),
    layers=[sparqcli.Rule(match="*emb*"), sparqcli.Rule(match="bags.*")],
)


def run(*args: object):
    return runner.invoke(app, [str(arg) for arg in args], catch_exceptions=False)


def make_state() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    return {
        "emb.weight": torch.randn(200, 16, generator=generator),
        "bags.0.weight": torch.randn(120, 8, generator=generator),
        "bags.1.weight": torch.randn(90, 8, generator=generator),
        "proj.weight": torch.randn(8, 16, generator=generator),
        "proj.bias": torch.randn(8, generator=generator),
    }


SIDE_FILES = {
    "config.json": b'{"model_type": "toy", "vocab_size": 200}\n',
    "tokenizer.json": b'{"version": "1.0"}',
    "README.md": "# toy — ünïcode\n".encode(),
}


def make_folder(path: Path, state: dict[str, torch.Tensor], *, safe: bool = True) -> Path:
    path.mkdir()
    huggingface_hub.save_torch_state_dict(
        state, path, max_shard_size="8KB", safe_serialization=safe
    )
    for name, data in SIDE_FILES.items():
        (path / name).write_bytes(data)
    (path / "1_Pooling").mkdir()
    (path / "1_Pooling" / "config.json").write_bytes(b"{}")
    return path


def stored_keys(path: Path) -> dict[str, int]:
    """Returns each stored tensor key of a safetensors file and its byte count."""
    with safe_open(str(path), "pt") as handle:
        return {key: handle.get_tensor(key).nbytes for key in handle.keys()}  # noqa: SIM118


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return make_folder(tmp_path / "toy", make_state())


def test_a_sharded_folder_compresses_to_a_mirrored_folder(tmp_path: Path, folder: Path) -> None:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    report = sparqcli.compress(folder, CONFIG)
    out = tmp_path / "toy-sparq"
    assert report.folders[0].output == out and report.folders[0].written
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in folder.iterdir())
    for name, data in SIDE_FILES.items():
        assert (out / name).read_bytes() == data
    assert (out / "1_Pooling" / "config.json").read_bytes() == b"{}"
    new_index = json.loads((out / "model.safetensors.index.json").read_text())
    stored = {
        key: (shard, size) for shard in shards for key, size in stored_keys(out / shard).items()
    }
    assert new_index["weight_map"] == {key: shard for key, (shard, _) in stored.items()}
    assert new_index["metadata"]["total_size"] == sum(size for _, size in stored.values())
    assert "emb.weight.codes" in new_index["weight_map"]
    # Every shard is covered by the report, with folder totals.
    assert [file.input.name for file in report.files] == shards
    facts = report.to_dict()["folders"][0]
    assert facts["tables"] == 3 and facts["written"] and facts["output_bytes"] > 0
    assert facts["output_bytes"] == sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    # The folder decodes to what the single-file path gives.
    single = tmp_path / "single.safetensors"
    save_file(make_state(), single)
    sparqcli.compress(single, CONFIG)
    assert_same(sparqcli.load(out), sparqcli.load(tmp_path / "single.sparq.safetensors"))


def assert_same(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> None:
    assert sorted(first) == sorted(second)
    for key in first:
        assert first[key].dtype == second[key].dtype, key
        assert torch.equal(first[key], second[key]), key


def test_bin_shards_compress_to_safetensors_shards(tmp_path: Path) -> None:
    folder = make_folder(tmp_path / "old", make_state(), safe=False)
    assert (folder / "pytorch_model.bin.index.json").exists()
    sparqcli.compress(folder, CONFIG, output=tmp_path / "out")
    out = tmp_path / "out"
    names = sorted(p.name for p in out.iterdir())
    assert "model.safetensors.index.json" in names and "pytorch_model.bin.index.json" not in names
    assert all(not name.endswith(".bin") for name in names)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert all(shard.startswith("model-") for shard in index["weight_map"].values())
    single = tmp_path / "single.pt"
    torch.save(make_state(), single)
    sparqcli.compress(single, CONFIG)
    assert_same(sparqcli.load(out), sparqcli.load(tmp_path / "single.sparq.safetensors"))


def test_folder_inspect_open_and_decompress(tmp_path: Path, folder: Path) -> None:
    plain = sparqcli.inspect(folder)
    assert plain.format == "folder" and len(plain.tensors) == 5
    sparqcli.compress(folder, CONFIG)
    out = tmp_path / "toy-sparq"
    info = sparqcli.inspect(out)
    assert sorted(info.tables) == ["bags.0.weight", "bags.1.weight", "emb.weight"]
    assert info.to_dict()["format_version"] == 1
    with sparqcli.open(out) as opened:
        assert opened.keys() == sorted(make_state())
        rows = opened.get_rows("emb.weight", 3, 9)
        assert torch.equal(rows, opened.get_tensor("emb.weight")[3:9])
        assert torch.equal(opened.get_tensor("proj.bias"), make_state()["proj.bias"])
    done = run("inspect", out, "--json")
    assert done.exit_code == 0 and "emb.weight" in json.loads(done.output)["tables"]
    done = run("decompress", out, "-o", tmp_path / "dense")
    assert done.exit_code == 0, done.output
    dense = tmp_path / "dense"
    assert sorted(p.name for p in dense.iterdir()) == sorted(p.name for p in folder.iterdir())
    index = json.loads((dense / "model.safetensors.index.json").read_text())
    assert sorted(index["weight_map"]) == sorted(make_state())
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in make_state().values())
    assert_same(sparqcli.load(dense), sparqcli.load(out))


def test_cli_compress_folder_summary_covers_every_shard(tmp_path: Path, folder: Path) -> None:
    done = run(
        "compress", folder, "--config", config_file(tmp_path), "--report", tmp_path / "r.json"
    )
    assert done.exit_code == 0, done.output
    assert done.output.count("toy-sparq/model-") >= 2
    assert "folder " in done.output and "file(s) copied" in done.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert len(report["folders"]) == 1 and len(report["files"]) >= 2
    done = run("validate", config_file(tmp_path), folder)
    assert done.exit_code == 0, done.output


def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(
        "version: 1\nmin_table_bytes: 0\nsparsity: {level: 0.5}\nquantization: {bits: 4}\n"
        "layers:\n  - match: '*emb*'\n  - match: 'bags.*'\n"
    )
    return path


def test_folder_output_is_atomic_and_needs_force(tmp_path: Path, folder: Path) -> None:
    out = tmp_path / "toy-sparq"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(UsageError, match="already exists; pass"):
        sparqcli.compress(folder, CONFIG)
    assert (out / "old.txt").exists()
    # a folder of other files is never replaced, even with force (-o ~/Documents --force)
    with pytest.raises(
        UsageError, match=r"holds no model files .*sparq replaces only a model folder"
    ):
        sparqcli.compress(folder, CONFIG, force=True)
    assert (out / "old.txt").exists()
    (out / "package.json").write_text("{}")  # a JSON file alone does not make a model folder
    with pytest.raises(UsageError, match=r"holds no model files"):
        sparqcli.compress(folder, CONFIG, force=True)
    # a folder output needs its own folder, checked before any work (exit 2, as for files)
    with pytest.raises(UsageError, match=r"cannot write: folder .*missing does not exist$"):
        sparqcli.compress(folder, CONFIG, output=tmp_path / "missing" / "out")
    (out / "config.json").write_text("{}")  # nor does a config.json (many projects have one)
    with pytest.raises(UsageError, match=r"holds no model files"):
        sparqcli.compress(folder, CONFIG, force=True)
    (out / "model.safetensors").write_bytes(b"")  # a model folder (an earlier output, say)
    sparqcli.compress(folder, CONFIG, force=True)
    assert not (out / "old.txt").exists() and (out / "config.json").exists()
    # A failing gate leaves no folder at all.
    strict = sparqcli.Config(
        min_table_bytes=0,
        layers=[sparqcli.Rule(match="*emb*", gates={"max_rel_error": 1e-9})],
        quantization=sparqcli.Quantization(bits=2),
    )
    report = sparqcli.compress(folder, strict, output=tmp_path / "gated")
    assert report.gate_failures and not report.folders[0].written
    assert not (tmp_path / "gated").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    # Never over, inside, or around the input.
    for target in (folder, folder / "sub", tmp_path):
        with pytest.raises(UsageError, match="input"):
            sparqcli.compress(folder, CONFIG, output=target, force=True)
    assert (folder / "config.json").exists()


def test_interrupted_folder_leaves_nothing(tmp_path: Path) -> None:
    from sparqcli.sinks import atomic_folder

    with pytest.raises(KeyboardInterrupt), atomic_folder(tmp_path / "out") as temp:
        (temp / "a.txt").write_text("x")
        removed = sparqcli.discard_partial_outputs()
        assert removed == [temp] and not temp.exists()
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_broken_folders_are_named_errors(tmp_path: Path) -> None:
    state = make_state()
    folder = make_folder(tmp_path / "a", state)
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = sorted(set(index["weight_map"].values()))[0]

    index["weight_map"]["ghost.weight"] = "model-00009-of-00009.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(InputError, match=r"index.json: names shard 'model-00009-of-00009"):
        sparqcli.inspect(folder)

    del index["weight_map"]["ghost.weight"]
    moved = {key: file for key, file in index["weight_map"].items() if file != shard}
    index_path.write_text(json.dumps({"metadata": {}, "weight_map": moved}))
    with pytest.raises(InputError, match=rf"{shard}: shard is not listed in"):
        sparqcli.inspect(folder)

    index_path.write_text(json.dumps(index))
    other = sorted(set(index["weight_map"].values()))[1]
    key = next(k for k, f in index["weight_map"].items() if f == shard)
    with safe_open(str(folder / other), "pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    save_file({**tensors, key: state[key]}, folder / other)
    with pytest.raises(InputError, match=rf"tensor '{key}' is also in"):
        sparqcli.inspect(folder)

    index_path.unlink()
    with pytest.raises(InputError, match="shard without an index"):
        sparqcli.inspect(folder)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="not a checkpoint or a model folder"):
        sparqcli.compress(empty, CONFIG)
    index_path.write_text('{"weight_map": {"x": "../escape.safetensors"}}')
    with pytest.raises(InputError, match="not a file name in the folder"):
        sparqcli.inspect(folder)


def test_a_tied_pt_stores_its_table_once(tmp_path: Path) -> None:
    state = make_state()
    state["head.weight"] = state["emb.weight"]  # tied: one storage
    path = tmp_path / "tied.pt"
    torch.save(state, path)
    report = sparqcli.compress(path, CONFIG, report_path=tmp_path / "r.json")
    out = tmp_path / "tied.sparq.safetensors"
    keys = stored_keys(out)
    assert "head.weight" not in keys and not any(k.startswith("head.") for k in keys)
    table = report.files[0].tables[0]
    assert table.key == "emb.weight" and table.aliases == ["head.weight"]
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["files"][0]["tables"][0]["aliases"] == ["head.weight"]
    loaded = sparqcli.load(out)
    assert loaded["head.weight"] is loaded["emb.weight"]
    with sparqcli.open(out) as opened:
        assert opened.metadata()["format_version"] == 2
        assert opened.metadata()["tables"]["emb.weight"]["aliases"] == ["head.weight"]
        assert torch.equal(opened.get_rows("head.weight", 0, 4), loaded["emb.weight"][:4])
    # The untied twin is bigger by one table, and the summary says why.
    done = run(
        "compress", path, "--config", config_file(tmp_path), "-o", tmp_path / "c.safetensors"
    )
    assert done.exit_code == 0 and "head.weight (tied)" in done.output
    done = run("decompress", out, "-o", tmp_path / "dense.pt")
    dense = torch.load(tmp_path / "dense.pt", weights_only=True)
    assert torch.equal(dense["head.weight"], dense["emb.weight"])


def test_selecting_or_excluding_one_alias(tmp_path: Path) -> None:
    state = make_state()
    state["head.weight"] = state["emb.weight"]
    only_head = sparqcli.Config(min_table_bytes=0, layers=[sparqcli.Rule(match="head")])
    result = sparqcli.compress_state_dict(state, only_head)
    assert list(result.tables) == ["head.weight"] and result.aliases == {
        "head.weight": ("emb.weight",)
    }
    decoded = result.decode()
    assert decoded["emb.weight"] is decoded["head.weight"]
    excluding = sparqcli.Config(
        min_table_bytes=0, layers=[sparqcli.Rule(match="*emb*")], exclude=["head"]
    )
    with pytest.raises(UsageError, match=r"'head\.weight' is excluded.*'emb\.weight'"):
        sparqcli.compress_state_dict(state, excluding)
    path = tmp_path / "tied.pt"
    torch.save(state, path)
    with pytest.raises(UsageError, match=r"'head\.weight' is excluded.*'emb\.weight'"):
        sparqcli.selection(excluding, path)
    different = sparqcli.Config(
        min_table_bytes=0,
        layers=[sparqcli.Rule(match="emb"), sparqcli.Rule(match="head", quantization={"bits": 2})],
    )
    with pytest.raises(UsageError, match="different settings"):
        sparqcli.compress_state_dict(state, different)


def test_byte_identical_safetensors_tables_are_aliases(tmp_path: Path) -> None:
    state = make_state()
    state["head.weight"] = state["emb.weight"].clone()
    state["other.weight"] = state["emb.weight"].clone()
    state["other.weight"][-1, -1] += 1  # same shape, same first rows, not equal
    path = tmp_path / "dup.safetensors"
    save_file(state, path)
    report = sparqcli.compress(path, CONFIG)
    tables = {table.key: table.aliases for table in report.files[0].tables}
    assert tables["emb.weight"] == ["head.weight"] and "other.weight" not in tables
    loaded = sparqcli.load(tmp_path / "dup.sparq.safetensors")
    assert torch.equal(loaded["head.weight"], loaded["emb.weight"])
    assert torch.equal(loaded["other.weight"], state["other.weight"])


def test_all_zero_rows_are_counted(tmp_path: Path) -> None:
    state = make_state()
    state["emb.weight"][[0, 5, 7]] = 0.0
    path = tmp_path / "pad.pt"
    torch.save(state, path)
    report = sparqcli.compress(path, CONFIG)
    stats = report.files[0].tables[0].stats
    assert (
        stats.zero_rows == 3
        and report.to_dict()["files"][0]["tables"][0]["stats"]["zero_rows"] == 3
    )
    assert report.files[0].tables[1].stats.zero_rows == 0
    done = run(
        "compress", path, "--config", config_file(tmp_path), "-o", tmp_path / "x.safetensors"
    )
    assert "emb.weight: 3 all-zero row(s) (1.5% of rows)" in done.output


def test_bfloat16_scales(tmp_path: Path) -> None:
    state = make_state()
    config = sparqcli.Config(
        min_table_bytes=0,
        sparsity=sparqcli.Sparsity(level=0.0),
        quantization=sparqcli.Quantization(bits=8, scale_dtype="bfloat16"),
        layers=[sparqcli.Rule(match="emb")],
    )
    result = sparqcli.compress_state_dict(state, config)
    table = result.tables["emb.weight"]
    for values in (table.scale, table.zero_point):
        assert torch.equal(values.bfloat16().float(), values)
    # Rounded up: every row's range fits its 255 steps.
    source = state["emb.weight"]
    assert bool(((source.amax(1) - source.amin(1)) <= table.scale * 255).all())
    assert bool((table.scale < (source.amax(1) - source.amin(1)) / 255 * 1.01).all())
    saved = result.save(tmp_path / "bf.sparq.safetensors")
    with safe_open(str(saved), "pt") as handle:
        assert handle.get_slice("emb.weight.scale").get_dtype() == "BF16"
    assert torch.equal(sparqcli.load(saved)["emb.weight"], result.decode()["emb.weight"])
    assert result.report.tables[0].stats.rel_error < 0.6


def test_an_alias_in_another_shard_is_stored_once(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(1)
    emb = torch.randn(200, 16, generator=generator)
    state = {
        "emb.weight": emb,
        "mid.weight": torch.randn(150, 16, generator=generator),
        "head.weight": emb.clone(),
    }
    folder = tmp_path / "xs"
    folder.mkdir()
    huggingface_hub.save_torch_state_dict(state, folder, max_shard_size="13KB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    assert index["emb.weight"] != index["head.weight"]
    report = sparqcli.compress(
        folder, sparqcli.Config(min_table_bytes=0, layers=[sparqcli.Rule(match="emb")])
    )
    assert report.folders[0].tables[0].aliases == ["head.weight"]
    out = tmp_path / "xs-sparq"
    weight_map = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert sorted(set(weight_map.values())) == sorted(p.name for p in out.glob("model-*"))
    assert index["head.weight"] not in weight_map.values()
    loaded = sparqcli.load(out)
    assert sorted(loaded) == sorted(state) and loaded["head.weight"] is loaded["emb.weight"]
    sparqcli.decompress(out, tmp_path / "dense")
    dense = sparqcli.load(tmp_path / "dense")
    assert torch.equal(dense["head.weight"], loaded["emb.weight"])
    with pytest.raises(UsageError, match="a folder decompresses to a folder"):
        sparqcli.decompress(out, tmp_path / "x.safetensors")
    with pytest.raises(UsageError, match=r"applies to \.pt files"):
        sparqcli.compress(folder, CONFIG, key="model", force=True)


def test_dry_run_of_a_folder_plans_every_shard_and_writes_nothing(
    tmp_path: Path, folder: Path
) -> None:
    done = run("compress", folder, "--config", config_file(tmp_path), "--dry-run")
    assert done.exit_code == 0, done.output
    assert "dry run: nothing written" in done.output and "file(s) to copy" in done.output
    assert not (tmp_path / "toy-sparq").exists()
    report = sparqcli.compress(folder, CONFIG, dry_run=True)
    assert report.folders[0].to_dict()["written"] is False
    assert sum(len(file.tables) for file in report.files) == 3


MEMORY_SCRIPT = """
import sys, sparqcli
config = sparqcli.Config(min_table_bytes=0, layers=[sparqcli.Rule(match="tables.*")])
print(sparqcli.compress(sys.argv[1], config).peak_memory_bytes)
"""


@pytest.mark.slow
def test_a_folder_compresses_in_the_memory_of_one_shard(tmp_path: Path) -> None:
    """Four 64 MiB tables in four shards take no more peak memory than one of them alone."""
    import subprocess
    import sys

    generator = torch.Generator().manual_seed(0)
    state = {f"tables.{i}.weight": torch.randn(131072, 128, generator=generator) for i in range(4)}
    folder = tmp_path / "big"
    folder.mkdir()
    huggingface_hub.save_torch_state_dict(state, folder, max_shard_size="70MB")
    assert len(list(folder.glob("model-*.safetensors"))) == 4
    save_file({"tables.0.weight": state["tables.0.weight"]}, tmp_path / "one.safetensors")
    del state

    def peak(path: Path) -> int:
        done = subprocess.run(
            [sys.executable, "-c", MEMORY_SCRIPT, str(path)],
            capture_output=True,
            text=True,
            check=True,
        )
        return int(done.stdout.split()[-1])

    one, whole = peak(tmp_path / "one.safetensors"), peak(folder)
    assert whole < one * 1.15 + (16 << 20), (one, whole)


@pytest.mark.parametrize(
    ("architectures", "noted"),
    [
        (["BertModel"], False),
        (["BertForMaskedLM"], True),
        (["GPT2LMHeadModel"], True),
        (["GPT2DoubleHeadsModel"], True),
        (None, True),
    ],
)
def test_the_tied_head_note_needs_a_model_with_a_head(
    tmp_path: Path, architectures: list[str] | None, noted: bool
) -> None:
    # tie_word_embeddings defaults to true in transformers' configs, heads or not
    folder = tmp_path / "model"
    folder.mkdir()
    model_config: dict = {"tie_word_embeddings": True, "vocab_size": 300}
    if architectures is not None:
        model_config["architectures"] = architectures
    (folder / "config.json").write_text(json.dumps(model_config))
    save_file(
        {"embeddings.word_embeddings.weight": torch.randn(300, 64)}, folder / "model.safetensors"
    )
    config_one = sparqcli.Config(min_table_bytes=0, layers=[sparqcli.Rule(match="*emb*")])
    report = sparqcli.compress(folder / "model.safetensors", config_one, dry_run=True)
    notes = report.files[0].notes
    assert any("the output head is this table" in note for note in notes) is noted


def test_the_tied_head_note_says_torch_ao_keeps_the_head_dense(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(
        json.dumps({"tie_word_embeddings": True, "vocab_size": 300, "architectures": ["X"]})
    )
    torch.save({"embeddings.word_embeddings.weight": torch.randn(300, 64)}, folder / "model.pt")
    config_one = sparqcli.Config(min_table_bytes=0, layers=[sparqcli.Rule(match="*emb*")])
    report = sparqcli.compress(
        folder / "model.pt", config_one, dry_run=True, output_format="torch-ao"
    )
    assert report.files[0].notes == [
        "embeddings.word_embeddings.weight: config.json ties the word embeddings "
        "(tie_word_embeddings: true); torch-ao output converts this embedding only, and the "
        "output head keeps its dense weights, as in torch.ao's converted model"
    ]


def test_a_tensor_the_shards_cannot_hold_is_refused_without_a_torch_ao_hint(tmp_path: Path) -> None:
    # a model folder is written in the sparq format only: the only way out is leaving it out
    folder = tmp_path / "bins"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    torch.save(
        {"emb.weight": torch.randn(300, 16), "phase": torch.zeros(2, dtype=torch.complex128)},
        folder / "pytorch_model.bin",
    )
    with pytest.raises(UsageError) as caught:
        sparqcli.compress(
            folder, sparqcli.Config(min_table_bytes=0, layers=[sparqcli.Rule(match="emb.weight")])
        )
    assert str(caught.value).endswith(
        "cannot write tensor 'phase' (shape [2], complex128) in a sparq file: safetensors holds "
        "dense tensors of standard dtypes; leave the tensor out of the checkpoint"
    )
    assert not (tmp_path / "bins-sparq").exists()


def test_an_unreadable_side_file_is_named_as_the_input(tmp_path: Path, folder: Path) -> None:
    (folder / "tokenizer.model").symlink_to(tmp_path / "gone")  # a dangling link
    with pytest.raises(InputError, match=r"tokenizer\.model: cannot read: No such file"):
        sparqcli.compress(folder, CONFIG)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["toy"]
