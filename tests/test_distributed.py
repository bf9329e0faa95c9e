"""Distributed runs (gloo on 127.0.0.1): N ranks give the one-process result bit for bit, on DCP
and safetensors inputs, both orders; errors on one rank stop every rank, leaving nothing."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import sparqcli
from sparqcli.distributed import free_local_port, local_rank_environments
from tests.dcp_writer import row_cuts, save_dcp

ROOT = Path(__file__).resolve().parent.parent
CONFIG = """\
version: 1
order: {order}
sparsity: {{level: 0.6, block_shape: [3, 4]}}
quantization: {{bits: 4}}
layers:
  - match: emb
  - match: "bags.*"
    sparsity: {{block_shape: [2, 2], zeros_per_block: 3}}
    quantization: {{bits: 8}}
  - match: ties
    sparsity: {{level: 0.5, block_shape: [2, 3]}}
"""


def _state() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(5)
    ties = torch.randint(0, 3, (31, 12), generator=generator).float()
    ties[8:24] = 1.0  # many blocks score exactly the threshold, on every rank
    emb = torch.randn(101, 13, generator=generator)
    return {
        "emb.weight": emb,  # partial blocks both ways
        "head.weight": emb.clone(),  # tied to emb.weight (the same bytes): stored once
        "bags.0.weight": torch.randn(40, 9, generator=generator).to(torch.bfloat16),
        "ties.weight": ties,
        "proj.weight": torch.randn(6, 5, generator=generator),
        "proj.bias": torch.randn(6, generator=generator),
    }


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """A DCP folder (row chunks that cut through blocks, column-wise chunks) and the same
    tensors as one .safetensors file, plus a config per order."""
    folder = tmp_path_factory.mktemp("inputs")
    state = _state()
    layouts = {
        "emb.weight": row_cuts(101, 13, [5, 14, 60]),  # block height 3: chunks cut blocks
        "bags.0.weight": [(0, 40, 0, 4), (0, 40, 4, 9)],
        "ties.weight": row_cuts(31, 12, [7, 16]),
    }
    paths = {"dcp": save_dcp(folder / "ckpt", state, layouts, file_per_item=True)}
    save_file(state, folder / "model.safetensors")
    paths["safetensors"] = folder / "model.safetensors"
    for order in ("sparsify-first", "quantize-first"):
        (folder / f"{order}.yaml").write_text(CONFIG.format(order=order))
        paths[order] = folder / f"{order}.yaml"
    return paths


def _launch(ranks: int, args: list[str], timeout: float = 120) -> list[subprocess.CompletedProcess]:
    """Runs `python ARGS` as `ranks` ranks, as torchrun would start them; returns each result."""
    procs = []
    for rank_env in local_rank_environments(ranks, free_local_port()):
        env = {**os.environ, "PYTHONPATH": str(ROOT), **rank_env, "OMP_NUM_THREADS": "1"}
        procs.append(
            subprocess.Popen(
                [sys.executable, *args],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                cwd=ROOT,
            )
        )
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=timeout)
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return results


def _single(inputs: dict[str, Path], kind: str, order: str, tmp: Path) -> dict[str, torch.Tensor]:
    out = tmp / f"single-{kind}-{order}.sparq.safetensors"
    sparqcli.compress(inputs[kind], inputs[order], output=out)
    return sparqcli.load(out)


def _assert_same(folder: Path, expected: dict[str, torch.Tensor]) -> None:
    got = sparqcli.load(folder)
    assert got.keys() == expected.keys()
    for key in expected:
        assert got[key].dtype == expected[key].dtype, key
        assert torch.equal(got[key], expected[key]), key
    # A tied key is its table, stored once (not a dense copy), as in one process.
    assert got["head.weight"] is got["emb.weight"]
    assert "head.weight" not in sparqcli.inspect(folder).passthrough


def _jobs(inputs: dict[str, Path], tmp: Path, ranks: int) -> list[dict[str, str]]:
    return [
        {
            "input": str(inputs[kind]),
            "config": str(inputs[order]),
            "output": str(tmp / f"out-{ranks}-{kind}-{order}"),
            "report": str(tmp / f"report-{ranks}-{kind}-{order}.json"),
        }
        for kind in ("dcp", "safetensors")
        for order in ("sparsify-first", "quantize-first")
    ]


def test_one_rank_equals_one_process(inputs, tmp_path):
    import torch.distributed as dist

    from sparqcli.distributed.group import ProcessGroup

    store = tempfile.mktemp(prefix="sparq-store-")
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    try:
        for job in _jobs(inputs, tmp_path, 1):
            report = sparqcli.compress_distributed(
                job["input"], job["config"], output=job["output"], group=ProcessGroup(0, 1)
            )
            assert report.files[0].written and report.ranks[0]["bytes_exchanged"] == 0
            kind = "dcp" if job["input"] == str(inputs["dcp"]) else "safetensors"
            order = Path(job["config"]).stem
            _assert_same(Path(job["output"]), _single(inputs, kind, order, tmp_path))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("ranks", [2, 3])
def test_n_ranks_equal_one_process_bit_for_bit(inputs, tmp_path, ranks):
    jobs = _jobs(inputs, tmp_path, ranks)
    results = _launch(ranks, ["-m", "tests.distributed_worker", json.dumps(jobs)])
    for result in results:
        assert result.returncode == 0, result.stderr
    for job in jobs:
        kind = "dcp" if job["input"] == str(inputs["dcp"]) else "safetensors"
        order = Path(job["config"]).stem
        single = tmp_path / f"single-{kind}-{order}.sparq.safetensors"
        sparqcli.compress(inputs[kind], inputs[order], output=single)
        if job is jobs[0]:
            single_first = single
        _assert_same(Path(job["output"]), sparqcli.load(single))
        files = sorted(path.name for path in Path(job["output"]).iterdir())
        assert files == [
            *(f"model-{k:05d}-of-{ranks:05d}.sparq.safetensors" for k in range(1, ranks + 1)),
            "model.safetensors.index.json",
        ]
        report = json.loads(Path(job["report"]).read_text())
        assert [item["rank"] for item in report["ranks"]] == list(range(ranks))
        assert all(
            item["bytes_exchanged"] > 0 and item["bytes_read"] > 0 for item in report["ranks"]
        )
        expected = json.loads(json.dumps(sparqcli.inspect(single).to_dict()["tables"]))
        got = sparqcli.inspect(Path(job["output"])).to_dict()["tables"]
        for key, table in expected.items():
            assert got[key]["kept"] == table["kept"]
            for name in ("scale_min", "scale_median", "scale_max", "kept", "row_cosine_min"):
                assert got[key]["stats"][name] == table["stats"][name], (key, name)
            assert got[key]["stats"]["rel_error"] == pytest.approx(table["stats"]["rel_error"])
    _check_reading(Path(jobs[0]["output"]), single_first, tmp_path)


def _check_reading(folder: Path, single: Path, tmp: Path) -> None:
    """The folder reads like the one-process file: rows across shards, tables, decompress;
    and a tampered index is refused."""
    from sparqcli.errors import FormatError

    with sparqcli.open(folder) as sharded, sparqcli.open(single) as whole:
        assert sharded.keys() == whole.keys()
        for key in whole.tables():
            rows = whole.info.tables[key].shape[0]
            for start, stop in ((0, rows), (1, rows - 1), (rows // 2 - 3, rows // 2 + 4)):
                assert torch.equal(
                    sharded.get_rows(key, start, stop), whole.get_rows(key, start, stop)
                )
            assert torch.equal(sharded.get_table(key).decode(), whole.get_table(key).decode())
        assert torch.equal(
            sharded.get_rows("proj.weight", 1, 3), whole.get_rows("proj.weight", 1, 3)
        )
    dense = tmp / "dense.safetensors"
    sparqcli.decompress(folder, dense)
    assert sparqcli.load(dense).keys() == sparqcli.load(single).keys()
    from sparqcli.errors import UsageError
    from sparqcli.nn import load_compressed

    with pytest.raises(UsageError, match="splits tables by rows over its shards; decompress it"):
        load_compressed(torch.nn.Module(), folder)
    index = folder / "model.safetensors.index.json"
    document = json.loads(index.read_text())
    shards = document["metadata"]["sparq"]["tables"]["emb.weight"]["row_shards"]
    shards[1]["rows"][0] += 3  # a gap
    index.write_text(json.dumps(document))
    with pytest.raises(FormatError, match="row shards do not cover its rows"):
        sparqcli.load(folder)


def test_torchrun_runs_the_cli(inputs, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "sparqcli",
            "compress",
            str(inputs["dcp"]),
            "--config",
            str(inputs["sparsify-first"]),
            "-o",
            str(out),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("→ " + str(out)) == 1  # one summary, from rank 0
    _assert_same(out, _single(inputs, "dcp", "sparsify-first", tmp_path))


def _cli(ranks: int, *args: object) -> list[subprocess.CompletedProcess]:
    return _launch(ranks, ["-m", "sparqcli", *(str(arg) for arg in args)])


def _assert_all_failed(results, code: int, needle: str) -> None:
    for result in results:
        assert result.returncode == code, (result.returncode, result.stderr)
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("sparq: error: "), result.stderr
        assert needle in lines[0], lines[0]


def test_an_error_on_one_rank_stops_every_rank_and_leaves_nothing(inputs, tmp_path):
    state = _state()
    state["emb.weight"][90, 3] = float("nan")  # only the last rank reads row 90
    bad = tmp_path / "bad.safetensors"
    save_file(state, bad)
    out = tmp_path / "out"
    results = _cli(2, "compress", bad, "--config", inputs["sparsify-first"], "-o", out)
    _assert_all_failed(results, 1, "emb.weight: row 90 holds NaN or Inf values")
    assert "rank 1: " in results[0].stderr and "rank 1" not in results[1].stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == ["bad.safetensors"]


def test_ranks_never_replace_a_folder_of_other_files(inputs, tmp_path):
    def compress_to(source, output, *extra):
        return _cli(
            2, "compress", source, "--config", inputs["sparsify-first"], "-o", output, *extra
        )

    documents = tmp_path / "documents"
    documents.mkdir()
    (documents / "mine.txt").write_text("mine")
    _assert_all_failed(
        compress_to(inputs["safetensors"], documents, "--force"), 2, "holds no model files"
    )
    assert (documents / "mine.txt").read_text() == "mine"
    missing = tmp_path / "missing" / "out"
    _assert_all_failed(compress_to(inputs["safetensors"], missing), 2, "does not exist")
    # a folder that holds the input is never replaced either (it used to be, input and all)
    holder = tmp_path / "holder"
    holder.mkdir()
    source = holder / "model.safetensors"
    source.write_bytes(inputs["safetensors"].read_bytes())
    _assert_all_failed(
        compress_to(source, holder, "--force"),
        2,
        "is or holds an input; sparq never overwrites its input",
    )
    assert source.read_bytes() == inputs["safetensors"].read_bytes()


class _Hostile:
    def __reduce__(self):
        return (os.system, ("touch hacked",))


def test_a_hostile_metadata_stops_every_rank_before_anything_runs(inputs, tmp_path):
    import shutil

    folder = tmp_path / "ckpt"
    shutil.copytree(inputs["dcp"], folder)
    (folder / ".metadata").write_bytes(pickle.dumps({"x": _Hostile()}))
    out = tmp_path / "out"
    results = _cli(2, "compress", folder, "--config", inputs["sparsify-first"], "-o", out)
    _assert_all_failed(results, 2, "--trust-pickle")
    assert not out.exists() and not (ROOT / "hacked").exists()
    assert [path.name for path in tmp_path.iterdir()] == ["ckpt"]


def test_a_truncated_shard_stops_every_rank(inputs, tmp_path):
    import shutil

    folder = tmp_path / "ckpt"
    shutil.copytree(inputs["dcp"], folder)
    victim = max(folder.glob("*.distcp"), key=lambda path: path.stat().st_size)
    os.truncate(victim, victim.stat().st_size - 1)
    out = tmp_path / "out"
    results = _cli(2, "compress", folder, "--config", inputs["sparsify-first"], "-o", out)
    _assert_all_failed(results, 1, f"{victim.name}: truncated")
    assert [path.name for path in tmp_path.iterdir()] == ["ckpt"]


def test_a_rank_that_dies_does_not_leave_the_others_hanging(inputs, tmp_path):
    jobs = [{**_jobs(inputs, tmp_path, 2)[0], "die_on_rank": 1}]
    results = _launch(2, ["-m", "tests.distributed_worker", json.dumps(jobs)], timeout=60)
    assert results[1].returncode == 9
    assert results[0].returncode == 1
    assert "lost the other ranks" in results[0].stderr
    assert not Path(jobs[0]["output"]).exists()
    assert not list(tmp_path.glob(".out-*"))


def test_a_model_folder_is_refused_under_torchrun(inputs, tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    save_file(_state(), folder / "model.safetensors")
    out = tmp_path / "out"
    results = _cli(2, "compress", folder, "--config", inputs["sparsify-first"], "-o", out)
    _assert_all_failed(results, 2, f"{folder}: a model folder is compressed in one process")
    assert not out.exists()
