"""Reading checkpoints: safetensors, .pt (flat, nested, legacy), pickled modules, bad files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from sparqcli.errors import InputError, UnsafeInputError, UsageError
from sparqcli.sources import open_checkpoint


@pytest.fixture
def state() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "emb.weight": torch.randn(37, 5, generator=generator),
        "half.weight": torch.randn(4, 3, generator=generator).to(torch.bfloat16),
        "ids": torch.arange(6),
        "scalar": torch.tensor(2.5),
    }


def test_safetensors_rows_are_read_exactly(tmp_path, state):
    path = tmp_path / "model.safetensors"
    save_file(state, path)
    checkpoint = open_checkpoint(path)
    assert checkpoint.format == "safetensors"
    assert list(checkpoint.tensors) == sorted(state)  # safetensors stores keys sorted
    assert checkpoint.tensors["emb.weight"].shape == (37, 5)
    assert checkpoint.tensors["half.weight"].dtype == "bfloat16"
    assert torch.equal(checkpoint.read_rows("emb.weight", 10, 17), state["emb.weight"][10:17])
    for key, tensor in state.items():
        assert torch.equal(checkpoint.tensor(key), tensor)
        assert checkpoint.tensor(key).dtype == tensor.dtype


def test_flat_pt_state_dict(tmp_path, state):
    path = tmp_path / "model.pt"
    torch.save(state, path)
    checkpoint = open_checkpoint(path)
    assert checkpoint.container_key is None
    assert set(checkpoint.tensors) == set(state)
    assert torch.equal(checkpoint.read_rows("emb.weight", 3, 9), state["emb.weight"][3:9])


def test_nested_state_dict_is_found_and_other_entries_kept(tmp_path, state):
    path = tmp_path / "train.pt"
    torch.save({"epoch": 7, "state_dict": state, "optimizer": {"lr": 0.1}}, path)
    checkpoint = open_checkpoint(path)
    assert checkpoint.container_key == "state_dict"
    assert checkpoint.extra == {"epoch": 7, "optimizer": {"lr": 0.1}}
    rebuilt = checkpoint.rebuild({"new": torch.zeros(1)})
    assert set(rebuilt) == {"epoch", "state_dict", "optimizer"}
    assert set(rebuilt["state_dict"]) == {"new"}


def test_explicit_key_and_missing_key(tmp_path, state):
    path = tmp_path / "train.pt"
    torch.save({"ema": {"weights": state}, "step": 3}, path)
    assert open_checkpoint(path, key="ema.weights").container_key == "ema.weights"
    with pytest.raises(
        UsageError, match=r"^.*train\.pt: key 'ema\.nope' not found; top-level keys: ema, step$"
    ):
        open_checkpoint(path, key="ema.nope")


def test_several_state_dicts_need_a_key(tmp_path, state):
    path = tmp_path / "train.pt"
    ema = {name: tensor + 1 for name, tensor in state.items()}
    torch.save({"model": state, "ema": ema, "optimizer": {"state": {}}, "step": 3}, path)
    with pytest.raises(
        UsageError,
        match=r"train\.pt: holds several state dicts \(model, ema\); pass key='NAME' to choose one$",
    ):
        open_checkpoint(path)
    checkpoint = open_checkpoint(path, key="ema")
    assert checkpoint.container_key == "ema"
    assert torch.equal(checkpoint.tensor("emb.weight"), ema["emb.weight"])
    assert set(checkpoint.extra) == {"model", "optimizer", "step"}
    # an averaged copy under other names (same shapes) is another copy too; other tensors are not
    renamed = {f"module.{name}": tensor for name, tensor in state.items()}
    torch.save({"state_dict": state, "swa": renamed, "optimizer": {"step": torch.ones(1)}}, path)
    with pytest.raises(UsageError, match=r"several state dicts \(state_dict, swa\)"):
        open_checkpoint(path)
    # one model beside other tensors is no ambiguity: the same dict saved twice, pruning masks,
    # DeepSpeed's flattened fragments of frozen parameters, an optimizer's step
    masks = {name: torch.ones_like(tensor, dtype=torch.bool) for name, tensor in state.items()}
    fragments = {"emb.weight": state["emb.weight"].flatten()[:10]}
    for others in (
        {"model": state},
        {"masks": masks},
        {"frozen_param_fragments": fragments},
        {"optimizer": {"step": torch.ones(1)}},
    ):
        torch.save({"state_dict": state, **others}, path)
        assert open_checkpoint(path).container_key == "state_dict"


def test_no_state_dict_found(tmp_path):
    path = tmp_path / "odd.pt"
    torch.save({"a": 1, "b": [1, 2]}, path)
    with pytest.raises(
        InputError,
        match=r"odd\.pt: no state dict found \(top-level keys: a, b\); pass key='NAME'$",
    ):
        open_checkpoint(path)


def test_pickled_module_needs_trust(tmp_path):
    path = tmp_path / "module.pt"
    torch.save(nn.Sequential(nn.Embedding(10, 4), nn.EmbeddingBag(6, 2)), path)
    with pytest.raises(
        UnsafeInputError,
        match=r"module\.pt: refusing to unpickle: loading it would run code .*pass trust_pickle=True only if",
    ):
        open_checkpoint(path)
    checkpoint = open_checkpoint(path, trust_pickle=True)
    assert checkpoint.format == "module"
    assert checkpoint.module_types == {"": "Sequential", "0": "Embedding", "1": "EmbeddingBag"}
    assert set(checkpoint.tensors) == {"0.weight", "1.weight"}


class _Hostile:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


def test_hostile_pickle_never_runs(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(2, 2), "x": _Hostile(marker)}, path)
    with pytest.raises(UnsafeInputError, match="pass trust_pickle=True"):
        open_checkpoint(path)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.pt", b"", r"empty\.pt: not a PyTorch checkpoint \(neither torch\.save's zip"),
        ("junk.pt", b"\x00junk" * 100, r"junk\.pt: not a PyTorch checkpoint \(neither"),
        ("junk2.pt", b"\x80\x02junk" * 9, r"junk2\.pt: not a readable PyTorch checkpoint \("),
        ("empty.safetensors", b"", r"empty\.safetensors: not a valid safetensors file"),
        ("junk.safetensors", b"\xff" * 64, r"junk\.safetensors: not a valid safetensors file"),
    ],
)
def test_corrupt_files_are_input_errors(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(InputError, match=message):
        open_checkpoint(path)


def test_damaged_and_misnamed_torch_files_are_named(tmp_path):
    whole = tmp_path / "whole.pt"
    torch.save({"w": torch.zeros(64, 4)}, whole)
    data = whole.read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(
        InputError,
        match=r"truncated\.pt: not a readable PyTorch checkpoint \(a truncated or damaged zip",
    ):
        open_checkpoint(truncated)
    misnamed = tmp_path / "misnamed.pt"
    save_file({"w": torch.zeros(2, 2)}, str(misnamed))
    with pytest.raises(
        InputError, match=r"misnamed\.pt: is a safetensors file, not a PyTorch checkpoint; name"
    ):
        open_checkpoint(misnamed)
    legacy = tmp_path / "legacy.pt"  # torch.save before 1.6: a pickle, still readable
    torch.save({"w": torch.ones(2, 2)}, legacy, _use_new_zipfile_serialization=False)
    assert torch.equal(open_checkpoint(legacy).tensor("w"), torch.ones(2, 2))


def test_missing_unknown_and_directory(tmp_path):
    with pytest.raises(InputError, match=r"nope\.pt: no such file$"):
        open_checkpoint(tmp_path / "nope.pt")
    (tmp_path / "model.onnx").write_bytes(b"x")
    with pytest.raises(UsageError, match=r"unknown checkpoint type '\.onnx'"):
        open_checkpoint(tmp_path / "model.onnx")
    (tmp_path / "dir.pt").mkdir()
    with pytest.raises(
        InputError, match=r"dir\.pt: is a directory, not a checkpoint or a model folder \(no model"
    ):
        open_checkpoint(tmp_path / "dir.pt")


def test_torch_only_dtypes_and_layouts_are_listed_not_taken_for_tables(tmp_path):
    # torch.ao's packed embeddings (quint8, quint4x2 at half a byte per value), complex128 and
    # a sparse table are listed with their sizes; none of them is a table sparq compresses.
    channels = (torch.ones(6, dtype=torch.float64), torch.zeros(6, dtype=torch.float64), 0)
    state = {
        "q8": torch.quantize_per_tensor(torch.zeros(6, 10), 0.1, 0, torch.quint8),
        "q4": torch.quantize_per_channel(torch.zeros(6, 10), *channels, torch.quint4x2),
        "cx": torch.zeros(3, dtype=torch.complex128),
        "sparse.weight": torch.eye(40, 8).to_sparse(),
        "emb.weight": torch.randn(40, 8),
    }
    path = tmp_path / "mixed.pt"
    torch.save(state, path)
    tensors = open_checkpoint(path).tensors
    assert (tensors["q8"].dtype, tensors["q8"].nbytes) == ("quint8", 60)
    assert (tensors["q4"].dtype, tensors["q4"].nbytes) == ("quint4x2", 30)
    assert (tensors["cx"].dtype, tensors["cx"].nbytes) == ("complex128", 48)
    assert tensors["sparse.weight"].layout == "sparse_coo"
    assert tensors["sparse.weight"].describe() == "shape [40, 8], float32, sparse_coo"
    assert [k for k, info in tensors.items() if info.is_table] == ["emb.weight"]


def test_a_dtype_sparq_does_not_know_is_an_input_error(tmp_path):
    path = tmp_path / "f4.pt"
    packed = torch.zeros(4, dtype=torch.uint8).view(torch.float4_e2m1fn_x2)
    torch.save({"emb.weight": torch.randn(10, 4), "f4": packed}, path)
    with pytest.raises(
        InputError, match=r"f4\.pt: tensor 'f4' has unsupported dtype float4_e2m1fn_x2$"
    ):
        open_checkpoint(path)
