"""DCP folders as input: chunk layouts, row ranges across chunks, the metadata allowlist, faults."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import sparqcli
from sparqcli.errors import InputError, UnsafeInputError
from sparqcli.sources import open_checkpoint
from tests.conftest import assert_one_line_error, invoke
from tests.dcp_writer import row_cuts, save_dcp

ROWS, COLS = 23, 6


@pytest.fixture
def full() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    return {
        "emb.weight": torch.randn(ROWS, COLS, generator=generator),
        "bags.0.weight": torch.randn(9, 8, generator=generator).to(torch.bfloat16),
        "ids": torch.arange(7),
        "scale": torch.tensor(1.5),
    }


LAYOUTS = {
    "row-wise": row_cuts(ROWS, COLS, [5, 6, 14]),
    "column-wise": [(0, ROWS, 0, 2), (0, ROWS, 2, 6)],
    "grid": [(0, 10, 0, 3), (0, 10, 3, 6), (10, 23, 0, 4), (10, 23, 4, 6)],
    "whole": [(0, ROWS, 0, COLS)],
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("file_per_item", [False, True])
def test_any_row_range_is_assembled_from_the_chunks(tmp_path, full, layout, file_per_item):
    folder = save_dcp(
        tmp_path / "ckpt", full, {"emb.weight": LAYOUTS[layout]}, file_per_item=file_per_item
    )
    checkpoint = open_checkpoint(folder)
    assert checkpoint.format == "dcp"
    assert checkpoint.tensors["emb.weight"].shape == (ROWS, COLS)
    assert checkpoint.tensors["bags.0.weight"].dtype == "bfloat16"
    table = full["emb.weight"]
    for start in range(ROWS + 1):
        for stop in (start, start + 1, start + 7, ROWS):
            stop = min(stop, ROWS)
            assert torch.equal(checkpoint.read_rows("emb.weight", start, stop), table[start:stop])
    buffer = torch.full((40 * COLS,), float("nan"))
    assert torch.equal(checkpoint.read_rows("emb.weight", 4, 15, out=buffer), table[4:15])
    for key, value in full.items():
        assert torch.equal(checkpoint.tensor(key), value)


def test_non_tensor_entries_are_kept_as_extra(tmp_path, full):
    folder = save_dcp(tmp_path / "ckpt", {**full, "step": 12, "names": ["a", "b"]})
    assert open_checkpoint(folder).extra == {"step": 12, "names": ["a", "b"]}
    trusted = open_checkpoint(folder, trust_pickle=True)  # DCP's own classes, not stand-ins
    assert trusted.tensors == open_checkpoint(folder).tensors
    assert torch.equal(trusted.tensor("emb.weight"), full["emb.weight"])


def _compressed(path: Path, config: Path, out: Path) -> dict[str, torch.Tensor]:
    result = invoke("compress", path, "--config", config, "-o", out, "--quiet")
    assert result.exit_code == 0, result.output
    return sparqcli.load(out)


@pytest.mark.parametrize("layout", ["row-wise", "grid"])
@pytest.mark.parametrize("order", ["sparsify-first", "quantize-first"])
def test_compressing_a_dcp_folder_equals_compressing_its_tensors(tmp_path, full, layout, order):
    config = tmp_path / "cfg.yaml"
    config.write_text(
        f"version: 1\norder: {order}\nsparsity: {{level: 0.6, block_shape: [2, 4]}}\n"
        "quantization: {bits: 4}\nlayers:\n  - match: emb\n  - match: 'bags.*'\n"
    )
    folder = save_dcp(tmp_path / "ckpt", full, {"emb.weight": LAYOUTS[layout]})
    single = tmp_path / "model.safetensors"
    save_file(full, single)
    from_dcp = _compressed(folder, config, tmp_path / "a.sparq.safetensors")
    from_file = _compressed(single, config, tmp_path / "b.sparq.safetensors")
    assert from_dcp.keys() == from_file.keys()
    for key in from_file:
        assert torch.equal(from_dcp[key], from_file[key]), key
    info = sparqcli.inspect(folder)
    assert {entry.key for entry in info.tensors} == set(full)
    result = invoke("validate", config, folder)
    assert result.exit_code == 0, result.output


class _Hostile:
    def __reduce__(self):
        return (os.system, ("touch hacked",))


def test_a_hostile_metadata_pickle_is_refused_before_anything_runs(tmp_path, full, config):
    folder = save_dcp(tmp_path / "ckpt", full)
    (folder / ".metadata").write_bytes(pickle.dumps({"x": _Hostile()}))
    with pytest.raises(UnsafeInputError, match=r"(posix|os)\.system"):
        open_checkpoint(folder)
    out = tmp_path / "out.sparq.safetensors"
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        result = invoke("compress", folder, "--config", config, "-o", out)
    finally:
        os.chdir(cwd)
    message = assert_one_line_error(result, (2,))
    assert ".metadata" in message and "--trust-pickle" in message
    assert not out.exists() and not (tmp_path / "hacked").exists()


def test_corrupt_metadata_and_truncated_chunks_name_the_file(tmp_path, full, config):
    folder = save_dcp(tmp_path / "ckpt", full, {"emb.weight": LAYOUTS["row-wise"]})
    data = folder / "__0_0.distcp"
    size = data.stat().st_size
    os.truncate(data, size - 100)
    with pytest.raises(InputError, match=r"__0_0\.distcp: truncated"):
        open_checkpoint(folder)
    out = tmp_path / "out.sparq.safetensors"
    result = invoke("compress", folder, "--config", config, "-o", out)
    assert "__0_0.distcp: truncated" in assert_one_line_error(result, (1,))
    assert not out.exists()
    (folder / ".metadata").write_bytes(b"\x80\x04garbage")
    with pytest.raises(InputError, match=r"\.metadata: not valid DCP metadata"):
        open_checkpoint(folder)
    (folder / ".metadata").unlink()
    with pytest.raises(InputError, match=r"ckpt: a DCP checkpoint without its \.metadata file"):
        open_checkpoint(folder)


def test_a_chunk_whose_bytes_are_not_a_tensor_archive_is_refused(tmp_path, full):
    folder = save_dcp(tmp_path / "ckpt", full, {"emb.weight": LAYOUTS["row-wise"]})
    data = folder / "__0_0.distcp"
    data.write_bytes(b"\0" * data.stat().st_size)
    checkpoint = open_checkpoint(folder)
    with pytest.raises(InputError, match=r"__0_0\.distcp: tensor 'emb.weight' chunk at"):
        checkpoint.read_rows("emb.weight", 0, 3)


def test_no_output_or_report_lands_inside_the_input_folder(tmp_path, full, config):
    folder = save_dcp(tmp_path / "ckpt", full)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    shard = sorted(p for p in folder.iterdir() if p.suffix == ".distcp")[0]
    for target in (shard, folder / ".metadata", folder / "new.sparq.safetensors"):
        result = invoke("compress", folder, "--config", config, "-o", target, "--force")
        assert assert_one_line_error(result, (2,)) == (
            f"sparq: error: {target}: lies inside the input folder {folder}; write it elsewhere"
        )
    result = invoke(
        "compress", folder, "--config", config, "-o", tmp_path / "out.sparq.safetensors",
        "--report", folder / ".metadata", "--force",
    )  # fmt: skip
    assert "lies inside the input folder" in assert_one_line_error(result, (2,))
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert not (tmp_path / "out.sparq.safetensors").exists()
