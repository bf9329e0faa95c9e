"""The command line: exit codes and exact error lines, outputs, options, the installed entry point."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from typer.testing import CliRunner

import sparqcli
from sparqcli.cli import app
from sparqcli.errors import UsageError

runner = CliRunner()


def run(*args: object):
    return runner.invoke(app, [str(arg) for arg in args], catch_exceptions=False)


def error_line(result) -> str:
    assert result.stderr.count("\n") == 1, result.stderr
    assert "Traceback" not in result.output
    return result.stderr.rstrip("\n")


def test_compress_writes_beside_the_input_and_prints_the_table(checkpoint, config):
    result = run("compress", checkpoint, "--config", config)
    assert result.exit_code == 0, result.output
    output = checkpoint.with_name("model.sparq.safetensors")
    assert output.exists()
    assert f"{checkpoint} → {output}" in result.stdout
    assert "emb.weight" in result.stdout and "bags.0.weight" in result.stdout
    assert result.stderr == ""
    loaded = sparqcli.load(output)
    assert set(loaded) == {"emb.weight", "bags.0.weight", "proj.weight", "proj.bias"}
    assert torch.equal(loaded["proj.bias"], torch.load(checkpoint)["proj.bias"])


def test_missing_file(tmp_path, config):
    result = run("compress", tmp_path / "nope.pt", "--config", config)
    assert result.exit_code == 1
    assert error_line(result) == f"sparq: error: {tmp_path / 'nope.pt'}: no such file"


def test_unreadable_file(tmp_path, config):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"this is not a checkpoint")
    result = run("compress", bad, "--config", config)
    assert result.exit_code == 1
    assert error_line(result) == (
        f"sparq: error: {bad}: not a PyTorch checkpoint "
        "(neither torch.save's zip archive nor a pickle)"
    )


def test_unknown_config_key(checkpoint, tmp_path):
    cfg = tmp_path / "typo.yaml"
    cfg.write_text("layers: [{match: emb}]\nsparsity: {levle: 0.5}\n")
    result = run("compress", checkpoint, "--config", cfg)
    assert result.exit_code == 2
    assert (
        error_line(result)
        == f"sparq: error: {cfg}: 1 problem: sparsity.levle: unknown key; did you mean 'level'?"
    )


def test_bad_values_are_all_reported_at_once(checkpoint, tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("layers: [{match: emb, sparsity: {level: 1.5}}]\nquantization: {bits: 9}\n")
    result = run("compress", checkpoint, "--config", cfg)
    assert result.exit_code == 2
    assert error_line(result) == (
        f"sparq: error: {cfg}: 2 problems: quantization.bits: must be an integer from 1 to 8, got 9; "
        "layers[0].sparsity.level: must be a number in [0, 1], got 1.5"
    )


def test_rule_that_matches_nothing(checkpoint, tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("layers: [{match: emb}, {match: 'bagz.*'}]\n")
    result = run("compress", checkpoint, "--config", cfg)
    assert result.exit_code == 2
    assert error_line(result) == (
        f"sparq: error: {checkpoint}: layers[1] (match 'bagz.*') matches no tensor; closest keys: bags.0.weight"
    )


def test_match_that_is_not_a_2d_float_tensor(checkpoint, tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("min_table_bytes: 0\nlayers: [{match: 'proj.*'}]\n")
    result = run("compress", checkpoint, "--config", cfg)
    assert result.exit_code == 2
    assert error_line(result) == (
        f"sparq: error: {checkpoint}: layers[0] (match 'proj.*') matches 'proj.bias', "
        "which is not a 2-D floating tensor (shape [4], float32)"
    )
    # Below min_table_bytes a pattern passes over it (and over the small proj.weight).
    cfg.write_text("layers: [{match: 'proj.*'}]\n")
    assert error_line(run("compress", checkpoint, "--config", cfg)) == (
        f"sparq: error: {checkpoint}: the config selects no table; 1 matched table(s) are "
        "smaller than min_table_bytes (64 KiB): proj.weight (name them exactly, or lower "
        "min_table_bytes)"
    )


def test_pickled_module_needs_trust_pickle(tmp_path):
    path = tmp_path / "module.pt"
    torch.save(nn.Sequential(nn.Embedding(20, 8), nn.Linear(8, 2)), path)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("layers: [{type: embedding}]\n")
    result = run("compress", path, "--config", cfg)
    assert result.exit_code == 2
    assert error_line(result) == (
        f"sparq: error: {path}: refusing to unpickle: loading it would run code "
        "(torch.nn.modules.container.Sequential); pass --trust-pickle only if you trust where the file came from"
    )
    trusted = run("compress", path, "--config", cfg, "--trust-pickle", "--json")
    assert trusted.exit_code == 0, trusted.output
    tables = json.loads(trusted.stdout)["files"][0]["tables"]
    assert [table["key"] for table in tables] == ["0.weight"]


def test_existing_output_needs_force(checkpoint, config):
    output = checkpoint.with_name("model.sparq.safetensors")
    output.write_bytes(b"previous")
    result = run("compress", checkpoint, "--config", config)
    assert result.exit_code == 2
    assert (
        error_line(result) == f"sparq: error: {output}: already exists; pass --force to replace it"
    )
    assert output.read_bytes() == b"previous"
    assert run("compress", checkpoint, "--config", config, "--force").exit_code == 0
    assert output.read_bytes() != b"previous"


def test_output_may_not_be_the_input(checkpoint, config):
    result = run("compress", checkpoint, "--config", config, "-o", checkpoint, "--force")
    assert result.exit_code == 2
    assert (
        error_line(result)
        == f"sparq: error: {checkpoint}: is an input; sparq never overwrites its input"
    )


def test_the_output_name_says_the_format_written(checkpoint, config, tmp_path, state):
    # readers, sparq's own included, tell a file's kind by its name
    for output, extra, message in [
        (
            "out.pt",
            [],
            "the sparq format writes a .safetensors file; end the name with .safetensors",
        ),
        (
            "out.sparq",
            [],
            "the sparq format writes a .safetensors file; end the name with .safetensors",
        ),
        (
            "out.safetensors",
            ["--format", "torch-ao"],
            "the torch-ao format writes a .pt or .pth or .bin or .ckpt file; end the name with .pt",
        ),
    ]:
        result = run("compress", checkpoint, "-c", config, "-o", tmp_path / output, *extra)
        assert result.exit_code == 2
        assert error_line(result) == f"sparq: error: -o/--output {tmp_path / output}: {message}"
        assert not (tmp_path / output).exists()
    folder = tmp_path / "model"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in state.items()}, folder / "model.safetensors")
    result = run("compress", folder, "-c", config, "-o", tmp_path / "m.safetensors")
    assert result.exit_code == 2
    assert error_line(result) == (
        f"sparq: error: -o/--output {tmp_path / 'm.safetensors'}: a model folder is written as a "
        "folder; give a name without the .safetensors suffix"
    )
    assert (
        run(
            "compress", checkpoint, "-c", config, "-o", tmp_path / "a.PT", "--format", "torch-ao"
        ).exit_code
        == 0
    )
    compressed = sparqcli.compress_state_dict(state, sparqcli.Config.from_yaml(config))
    with pytest.raises(UsageError, match=r"x\.pt: the sparq format writes a \.safetensors file"):
        compressed.save(tmp_path / "x.pt")


def test_neither_output_nor_report_may_overwrite_an_input_or_each_other(
    checkpoint, config, tmp_path
):
    original, config_text = checkpoint.read_bytes(), config.read_text()
    output = tmp_path / "out.sparq.safetensors"
    for extra, message in [
        (["-o", output, "--report", checkpoint], f"{checkpoint}: is an input"),
        (["-o", output, "--report", config], f"{config}: is an input"),
        (["-o", config], f"{config}: is an input"),
        (
            ["-o", output, "--report", output],
            f"--report {output}: is where the compressed output goes; write the report elsewhere",
        ),
    ]:
        result = run("compress", checkpoint, "--config", config, *extra, "--force")
        assert result.exit_code == 2
        assert error_line(result).startswith(f"sparq: error: {message}")
    assert checkpoint.read_bytes() == original and config.read_text() == config_text
    assert not output.exists()


def test_failing_gate_exits_3_and_writes_nothing(checkpoint, config):
    result = run("compress", checkpoint, "--config", config, "--set", "gates.max_rel_error=0.01")
    assert result.exit_code == 3
    line = error_line(result)
    assert line.startswith("sparq: error: 2 quality gates failed: ")
    assert f"{checkpoint}: emb.weight: rel_error " in line and "> max_rel_error 0.01" in line
    assert "not written: 2 gate(s) failed" in result.stdout
    assert not checkpoint.with_name("model.sparq.safetensors").exists()


def test_json_report_and_quiet(checkpoint, config, tmp_path):
    report = tmp_path / "report.json"
    result = run("compress", checkpoint, "--config", config, "--json", "--report", report)
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    assert data == json.loads(report.read_text())
    file = data["files"][0]
    output = Path(file["output"])
    assert file["output_sha256"] == __import__("hashlib").sha256(output.read_bytes()).hexdigest()
    assert data["sparq_version"] == sparqcli.__version__
    assert data["config"]["order"] == "sparsify-first"
    assert data["peak_memory_bytes"] > 0
    assert [t["quantization"]["bits"] for t in file["tables"]] == [8, 4]
    quiet = run("compress", checkpoint, "--config", config, "--quiet", "--force")
    assert quiet.exit_code == 0 and quiet.stdout == "" and quiet.stderr == ""


def test_dry_run_writes_nothing(checkpoint, config):
    before = sorted(checkpoint.parent.iterdir())
    result = run("compress", checkpoint, "--config", config, "--dry-run")
    assert result.exit_code == 0
    assert "(dry run: nothing written)" in result.stdout
    assert "layers[1] (match 'bags.*')" in result.stdout
    assert "2 table(s) selected" in result.stdout
    assert sorted(checkpoint.parent.iterdir()) == before
    # not even the report (its path is still checked)
    report = checkpoint.parent / "report.json"
    result = run("compress", checkpoint, "--config", config, "--dry-run", "--report", report)
    assert result.exit_code == 0, result.output
    assert sorted(checkpoint.parent.iterdir()) == before
    missing = checkpoint.parent / "missing" / "report.json"
    result = run("compress", checkpoint, "--config", config, "--dry-run", "--report", missing)
    assert result.exit_code == 2


def test_set_and_order_override_the_config(checkpoint, config):
    result = run(
        "compress",
        checkpoint,
        "--config",
        config,
        "--json",
        "--order",
        "quantize-first",
        "--set",
        "sparsity.level=0.75",
        "--set",
        "layers[1].quantization.bits=2",
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["config"]["order"] == "quantize-first"
    tables = data["files"][0]["tables"]
    assert [t["sparsity"]["level"] for t in tables] == [0.75, 0.75]
    assert [t["quantization"]["bits"] for t in tables] == [8, 2]
    assert [t["order"] for t in tables] == ["quantize-first", "quantize-first"]


def test_a_bad_set_value_is_blamed_on_the_set_option(checkpoint, config):
    result = run("compress", checkpoint, "-c", config, "--set", "quantization.bitz=4")
    assert result.exit_code == 2
    assert error_line(result) == (
        f"sparq: error: {config}: 1 problem: quantization.bitz: unknown key; did you mean "
        "'bits'? (from --set quantization.bitz=4)"
    )


def test_out_dir_with_several_inputs(tmp_path, config, state):
    first, second = tmp_path / "a.pt", tmp_path / "b.safetensors"
    torch.save(state, first)
    from safetensors.torch import save_file

    save_file(state, second)
    out = tmp_path / "out"
    out.mkdir()
    result = run("compress", first, second, "--config", config, "--out-dir", out, "--quiet")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["a.sparq.safetensors", "b.sparq.safetensors"]
    a, b = sparqcli.load(out / "a.sparq.safetensors"), sparqcli.load(out / "b.sparq.safetensors")
    assert all(torch.equal(a[key], b[key]) for key in a)
    two_outputs = run(
        "compress", first, second, "--config", config, "-o", tmp_path / "x.safetensors"
    )
    assert two_outputs.exit_code == 2
    assert (
        error_line(two_outputs)
        == "sparq: error: -o/--output takes one input, got 2; use --out-dir for several"
    )
    for where, what in ((tmp_path / "missing", "no such folder"), (first, "not a folder")):
        result = run("compress", second, "--config", config, "--out-dir", where)
        assert result.exit_code == 2
        assert error_line(result) == f"sparq: error: --out-dir {where}: {what}"


def test_an_unreadable_input_stops_the_run_before_any_output_is_written(tmp_path, config, state):
    first, broken, third = tmp_path / "a.pt", tmp_path / "b.pt", tmp_path / "c.pt"
    torch.save(state, first)
    broken.write_bytes(b"not a checkpoint")
    torch.save(state, third)
    out = tmp_path / "out"
    out.mkdir()
    report = tmp_path / "report.json"
    result = run(
        "compress", first, broken, third, "-c", config, "--out-dir", out, "--report", report
    )
    assert result.exit_code == 1
    assert error_line(result) == (
        f"sparq: error: {broken}: not a PyTorch checkpoint (neither torch.save's zip archive nor "
        "a pickle)"
    )
    assert list(out.iterdir()) == [] and not report.exists()
    # a rule that matches nothing in the last input: exit 2, nothing written either
    renamed = {f"other.{key}": tensor for key, tensor in state.items()}
    torch.save(renamed, third)
    result = run("compress", first, third, "-c", config, "--out-dir", out)
    assert result.exit_code == 2
    assert error_line(result).startswith(
        f"sparq: error: {third}: 2 rules fail: (1) layers[0] (match 'emb') matches no tensor"
    )
    assert list(out.iterdir()) == []


def test_a_table_failing_while_compressed_names_the_outputs_written_before_it(
    tmp_path, config, state
):
    first, second = tmp_path / "a.pt", tmp_path / "b.pt"
    torch.save(state, first)
    state["emb.weight"][3, 1] = float("nan")  # found only when the table is compressed
    torch.save(state, second)
    out = tmp_path / "out"
    out.mkdir()
    result = run("compress", first, second, "-c", config, "--out-dir", out)
    assert result.exit_code == 1
    assert error_line(result) == (
        f"sparq: error: {second}: emb.weight: row 3 holds NaN or Inf values; written before "
        f"this error: {out / 'a.sparq.safetensors'}"
    )
    assert sorted(p.name for p in out.iterdir()) == ["a.sparq.safetensors"]


def test_progress_labels_keep_both_ends_and_room_for_the_bar(monkeypatch):
    from sparqcli.cli.compress import _progress_bars

    monkeypatch.setenv("COLUMNS", "80")
    label = "checkpoints/2026-11-28/a-rather-long-checkpoint-name.pt: model.embed_tokens.weight"
    bars = _progress_bars()
    update = bars.__enter__()
    try:
        update(label, 0.5)
        update(label, 0.75)  # the same task, found by its full label
        [task] = bars.progress.tasks
    finally:
        bars.__exit__(None, None, None)
    assert len(task.description) == 40
    assert task.description == "checkpoints/2026-11….embed_tokens.weight"
    assert task.completed == 0.75


def test_torch_ao_format(checkpoint, config):
    result = run("compress", checkpoint, "--config", config, "--format", "torch-ao", "--quiet")
    assert result.exit_code == 0, result.output
    state = torch.load(checkpoint.with_name("model.torchao.pt"), weights_only=True)
    assert state["emb._packed_params.dtype"] == torch.quint8
    assert state["bags.0._packed_params._packed_weight"].dtype == torch.quint4x2
    assert torch.equal(state["proj.bias"], torch.load(checkpoint)["proj.bias"])


def test_cuda_without_a_gpu_is_a_usage_error(checkpoint, config):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    result = run("compress", checkpoint, "--config", config, "--device", "cuda")
    assert result.exit_code == 2
    assert error_line(result).startswith("sparq: error: --device cuda: no CUDA device is available")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(
    "settings",
    [
        None,
        "sparsity: {level: 0.5, block_shape: [1, 4], scope: row}\n"
        "quantization: {bits: 3, range: mse, scale_dtype: bfloat16}\n",
    ],
    ids=["fixture", "mse-row-3b-bf16"],
)
def test_cuda_writes_the_same_tensors_as_cpu(checkpoint, config, tmp_path, settings):
    from safetensors.torch import load_file

    if settings is not None:
        text = config.read_text()
        for line in text.splitlines(keepends=True):
            if line.startswith(("sparsity:", "quantization:")):
                text = text.replace(line, "")
        config.write_text(settings + text)
    written = {}
    for device in ("cpu", "cuda"):
        out = tmp_path / f"{device}.sparq.safetensors"
        result = run("compress", checkpoint, "--config", config, "--device", device, "-o", out)
        assert result.exit_code == 0, result.output
        written[device] = load_file(out)
    assert written["cpu"].keys() == written["cuda"].keys()
    for key, tensor in written["cpu"].items():
        assert torch.equal(tensor, written["cuda"][key]), key


def test_inspect_plain_and_compressed(checkpoint, config):
    plain = run("inspect", checkpoint, "--json")
    assert plain.exit_code == 0
    tensors = json.loads(plain.stdout)["tensors"]
    assert tensors["emb.weight"] == {
        "shape": [64, 16],
        "dtype": "float32",
        "bytes": 4096,
        "table": True,
        "candidate": True,
        "reasons": ["name"],
        "why": "name says embedding (emb)",
    }
    assert tensors["proj.weight"]["candidate"] is False
    assert json.loads(plain.stdout)["candidates"] == ["emb.weight", "bags.0.weight"]
    assert tensors["proj.bias"]["table"] is False
    run("compress", checkpoint, "--config", config, "--quiet")
    compressed = run("inspect", checkpoint.with_name("model.sparq.safetensors"))
    assert compressed.exit_code == 0
    assert "sparq format 1, 2 compressed table(s)" in compressed.stdout
    as_json = json.loads(
        run("inspect", checkpoint.with_name("model.sparq.safetensors"), "--json").stdout
    )
    assert as_json["tables"]["bags.0.weight"]["bits"] == 4


@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".ckpt"])
def test_decompress_round_trip(checkpoint, config, suffix):
    run("compress", checkpoint, "--config", config, "--quiet")
    compressed = checkpoint.with_name("model.sparq.safetensors")
    output = checkpoint.with_name("dense" + suffix)
    result = run("decompress", compressed, "-o", output)
    assert result.exit_code == 0, result.output
    if suffix != ".safetensors":
        dense = torch.load(output, weights_only=True)
    else:
        from safetensors.torch import load_file

        dense = load_file(output)
    expected = sparqcli.load(compressed)
    assert set(dense) == set(expected)
    assert all(torch.equal(dense[key], expected[key]) for key in expected)
    again = run("decompress", compressed, "-o", output)
    assert again.exit_code == 2
    assert (
        error_line(again) == f"sparq: error: {output}: already exists; pass --force to replace it"
    )


def test_decompress_refuses_a_plain_checkpoint(checkpoint, tmp_path):
    plain = tmp_path / "plain.safetensors"
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2, 2)}, plain)
    result = run("decompress", plain, "-o", tmp_path / "o.pt")
    assert result.exit_code == 2
    assert (
        error_line(result)
        == f"sparq: error: {plain}: not a sparq-compressed file (no sparq metadata); nothing to decompress"
    )


def test_decompress_says_what_is_wrong_with_its_input_first(tmp_path, state):
    existing = tmp_path / "o.safetensors"
    existing.write_bytes(b"")
    missing = tmp_path / "missing.sparq.safetensors"
    result = run("decompress", missing, "-o", existing)
    assert result.exit_code == 1
    assert error_line(result) == f"sparq: error: {missing}: no such file"
    # a torch file is no sparq file, even one that would need a key to read
    two = tmp_path / "two.pt"
    torch.save({"model": state, "ema": {k: v + 1 for k, v in state.items()}}, two)
    result = run("decompress", two, "-o", tmp_path / "d.pt")
    assert result.exit_code == 2
    assert error_line(result) == (
        f"sparq: error: {two}: not a sparq-compressed file (no sparq metadata); nothing to "
        "decompress"
    )


def test_validate_config_and_matches(checkpoint, config, tmp_path):
    result = run("validate", config)
    assert result.exit_code == 0
    assert result.stdout == f"{config}: valid (2 rules, order sparsify-first)\n"
    with_ckpt = run("validate", config, checkpoint)
    assert with_ckpt.exit_code == 0
    assert "2 table(s) selected" in with_ckpt.stdout
    assert "bags.0.weight" in with_ckpt.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 2\nlayers: []\n")
    invalid = run("validate", bad)
    assert invalid.exit_code == 2
    assert error_line(invalid) == (
        f"sparq: error: {bad}: 2 problems: version: must be 1, got 2; layers: must be a non-empty list of rules, got an empty list"
    )


def test_validate_against_a_compressed_file_says_so(checkpoint, config, tmp_path):
    output = tmp_path / "out.sparq.safetensors"
    assert run("compress", checkpoint, "--config", config, "-o", output, "-q").exit_code == 0
    result = run("validate", config, output)
    assert result.exit_code == 2
    assert error_line(result) == (
        f"sparq: error: {output}: is already compressed by sparq; check the config against the "
        "original checkpoint"
    )
    assert result.stdout == ""  # not "valid", then an error


def test_validate_lists_every_failing_rule_and_does_not_say_valid(checkpoint, tmp_path):
    config = tmp_path / "rules.yaml"
    config.write_text('layers:\n  - match: "nope*"\n  - match: "*emb*"\n  - match: proj.bias\n')
    result = run("validate", config, checkpoint)
    assert result.exit_code == 2
    assert result.stdout == ""
    assert error_line(result).startswith(
        f"sparq: error: {checkpoint}: 2 rules fail: (1) layers[0] (match 'nope*') matches no "
        "tensor;"
    )
    assert "; (2) layers[2] (match 'proj.bias') matches 'proj.bias', which is not a 2-D" in (
        result.stderr
    )


def test_version_and_help():
    assert run("--version").stdout == f"sparq {sparqcli.__version__}\n"
    for command in ("compress", "inspect", "decompress", "validate"):
        result = run(command, "--help")
        assert result.exit_code == 0
        assert "Example: sparq " + command in " ".join(result.stdout.split())


def test_installed_entry_point_end_to_end(checkpoint, config):
    sparq = Path(sys.executable).parent / "sparq"
    done = subprocess.run(
        [sparq, "compress", checkpoint, "--config", config, "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["files"][0]["written"] is True
    failed = subprocess.run(
        [sparq, "compress", checkpoint, "--config", config],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert failed.returncode == 2
    assert (
        failed.stderr
        == f"sparq: error: {checkpoint.with_name('model.sparq.safetensors')}: already exists; pass --force to replace it\n"
    )


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["compress", "x.pt"], "Missing option '--config' / '-c'. (see 'sparq compress -h')"),
        (
            ["compres"],
            "No such command 'compres'. Did you mean 'compress', 'decompress'? (see 'sparq -h')",
        ),
        (
            ["compress", "x.pt", "-c", "c.yaml", "--threads", "0"],
            "Invalid value for '--threads': Input should be greater than or equal to 1 "
            "(see 'sparq compress -h')",
        ),
        (["inspect", "x.pt", "--bogus"], "No such option: --bogus (see 'sparq inspect -h')"),
    ],
)
def test_usage_errors_are_one_line_too(args, line):
    done = subprocess.run(
        [sys.executable, "-m", "sparqcli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert done.returncode == 2
    assert done.stderr == f"sparq: error: {line}\n"
    assert done.stdout == ""


def test_help_does_not_import_torch():
    code = "import sys; from sparqcli.cli import app; app(['--help'], standalone_mode=False); print('torch' in sys.modules)"
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        env={**os.environ, "COLUMNS": "100"},
    )
    assert done.stdout.strip().endswith("False")


def test_python_dash_m_is_the_same_command(checkpoint, config):
    done = subprocess.run(
        [sys.executable, "-m", "sparqcli", "compress", checkpoint, "--config", config, "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["files"][0]["output"] == str(
        checkpoint.with_name("model.sparq.safetensors")
    )


def test_debug_shows_the_traceback_and_the_default_does_not(tmp_path, config):
    missing = tmp_path / "nope.pt"
    plain = subprocess.run(
        [sys.executable, "-m", "sparqcli", "compress", missing, "--config", config],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert (plain.returncode, plain.stderr) == (1, f"sparq: error: {missing}: no such file\n")
    debug = subprocess.run(
        [sys.executable, "-m", "sparqcli", "--debug", "compress", missing, "--config", config],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert debug.returncode == 1
    assert "Traceback (most recent call last)" in debug.stderr
    assert debug.stderr.rstrip().endswith(f"sparq.errors.InputError: {missing}: no such file") or (
        debug.stderr.rstrip().endswith(f"sparqcli.errors.InputError: {missing}: no such file")
    )


def test_an_unexpected_exception_is_one_line_and_debug_shows_it(
    tmp_path, checkpoint, config, monkeypatch
):
    import sparqcli

    def broken(*args, **kwargs):
        raise RuntimeError("something\nunforeseen")

    monkeypatch.setattr(sparqcli, "compress", broken)
    out = tmp_path / "out.sparq.safetensors"
    done = runner.invoke(app, ["compress", str(checkpoint), "-c", str(config), "-o", str(out)])
    assert (done.exit_code, done.output) == (
        1,
        "sparq: error: internal error: RuntimeError: something unforeseen (a bug in sparq; "
        "--debug shows the traceback)\n",
    )
    assert not out.exists()
    done = runner.invoke(app, ["--debug", "compress", str(checkpoint), "-c", str(config)])
    assert isinstance(done.exception, RuntimeError)


def test_a_closed_stdout_ends_quietly_with_sigpipes_code(checkpoint, config, tmp_path):
    # `sparq compress ... | head -1`: the reader is gone before the summary is written
    done = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sparqcli",
            "compress",
            checkpoint,
            "-c",
            config,
            "-o",
            tmp_path / "out.sparq.safetensors",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    done.stdout.close()
    stderr = done.stderr.read().decode()
    assert (done.wait(timeout=120), stderr) == (141, "")
    assert (tmp_path / "out.sparq.safetensors").exists()  # written before the summary


def test_progress_bars_draw_on_a_terminal_and_vanish(checkpoint, config):
    import pty

    leader, follower = pty.openpty()
    done = subprocess.run(
        [sys.executable, "-m", "sparqcli", "compress", checkpoint, "--config", config],
        stdout=subprocess.PIPE,
        stderr=follower,
        timeout=120,
        check=False,
        env={**os.environ, "COLUMNS": "100", "TERM": "xterm"},
    )
    os.close(follower)
    drawn = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the terminal's other end is closed: all read
            break
        if not chunk:
            break
        drawn += chunk
    os.close(leader)
    assert done.returncode == 0
    text = drawn.decode(errors="replace")
    assert "model.pt: emb.weight" in text and "100%" in text
    assert "sparq: error" not in text
    assert b"bits/weight over 2 table(s)" in done.stdout  # the summary: stdout, not the terminal


# --- the summary on a terminal (fits its width) and piped (never shortened) -----------------------

LONG_KEY = "sparse_arch.embedding_bag_collection.embedding_bags.t_cat_0.weight"


@pytest.fixture
def long_keys(tmp_path):
    """A checkpoint with a long table key, a table under min_table_bytes and a config for both."""
    generator = torch.Generator().manual_seed(3)
    path = tmp_path / "long.pt"
    torch.save(
        {
            LONG_KEY: torch.randn(2048, 16, generator=generator),
            "embeddings.word_embeddings.weight": torch.randn(1200, 16, generator=generator),
            "embeddings.token_type_embeddings.weight": torch.randn(2, 16, generator=generator),
        },
        path,
    )
    config = tmp_path / "long.yaml"
    config.write_text("layers: [{match: '*embedding*'}]\n")
    return path, config


def _as_terminal(monkeypatch, columns: int) -> None:
    import sys

    monkeypatch.setattr(sys.modules["sparqcli.cli.app"], "stdout_is_terminal", lambda: True)
    monkeypatch.setenv("COLUMNS", str(columns))


def _summary_command(command: str, path: Path, config: Path) -> tuple[object, ...]:
    """The arguments of each command that prints a summary table, for the width tests."""
    return {
        "compress": ("compress", path, "-c", config, "--force"),
        "dry-run": ("compress", path, "-c", config, "--dry-run"),
        "inspect": ("inspect", path),
        "validate": ("validate", config, path),
    }[command]


@pytest.mark.parametrize("columns", [80, 100, 150, 200])
@pytest.mark.parametrize("command", ["compress", "dry-run", "inspect", "validate"])
def test_on_a_terminal_every_line_fits(monkeypatch, long_keys, command, columns):
    path, config = long_keys
    _as_terminal(monkeypatch, columns)
    result = run(*_summary_command(command, path, config))
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    # titles hold file paths, which are never shortened: the tables' lines fit
    table_lines = [line for line in lines if str(path.parent) not in line]
    assert max(len(line) for line in table_lines) <= columns, result.stdout
    if columns == 80 and command != "validate":
        assert LONG_KEY not in result.stdout and "sparse_arc" in result.stdout


@pytest.mark.parametrize("command", ["compress", "dry-run", "inspect", "validate"])
def test_piped_output_is_whole_whatever_columns_says(monkeypatch, long_keys, command):
    path, config = long_keys
    monkeypatch.setenv("COLUMNS", "40")
    result = run(*_summary_command(command, path, config))
    assert result.exit_code == 0, result.output
    assert "…" not in result.stdout.replace("0…255", "")
    rows = [line for line in result.stdout.splitlines() if line.startswith(LONG_KEY)]
    assert len(rows) == 1  # one line per table, the whole key at its start
    if command != "inspect":
        assert (
            "embeddings.token_type_embeddings.weight" in result.stdout
            and "smaller than min_table_bytes (64 KiB)" in result.stdout
        )


def test_wide_shows_every_statistic(long_keys):
    path, config = long_keys
    compact = run("compress", path, "-c", config, "--force").stdout
    wide = run("compress", path, "-c", config, "--force", "--wide").stdout
    for header in ("min / median / max", "zero point", "pruned", "ratio", "dtype"):
        assert header in wide and header not in compact
    report = json.loads(run("compress", path, "-c", config, "--force", "--json").stdout)
    file = report["files"][0]
    assert [t["key"] for t in file["tables"]] == [LONG_KEY, "embeddings.word_embeddings.weight"]
    assert file["skipped_tables"] == [
        {
            "key": "embeddings.token_type_embeddings.weight",
            "shape": [2, 16],
            "dtype": "float32",
            "bytes": 128,
            "rule": "layers[0] (match '*embedding*')",
            "reason": "smaller than min_table_bytes (64 KiB)",
        }
    ]
    assert report["config"]["min_table_bytes"] == 65536


def test_piped_dry_run_and_inspect_exactly(checkpoint, config, monkeypatch):
    monkeypatch.setenv("COLUMNS", "40")  # ignored: stdout is not a terminal
    plan = run("compress", checkpoint, "--config", config, "--dry-run")
    assert plan.stdout == (
        f"{checkpoint} → {checkpoint.with_name('model.sparq.safetensors')} "
        "(dry run: nothing written)\n"
        "table          shape  rule       bits  sparsity  block     bytes\n" + "─" * 64 + "\n"
        "emb.weight     64x16  layers[0]     8       50%    1x4  4.00 KiB\n"
        "bags.0.weight   40x8  layers[1]     4       50%    1x4  1.25 KiB\n"
        "2 table(s) selected, 5.25 KiB of tables\n"
        "rules: layers[0] (match 'emb'), layers[1] (match 'bags.*')\n"
    )
    inspected = run("inspect", checkpoint)
    assert inspected.stdout == (
        f"{checkpoint}: 4 tensors, 2 candidate table(s)\n"
        "key            shape  dtype        size  candidate\n" + "─" * 50 + "\n"
        "emb.weight     64x16  float32  4.00 KiB  name\n"
        "bags.0.weight   40x8  float32  1.25 KiB  name\n"
        "proj.weight     4x24  float32     384 B\n"
        "proj.bias          4  float32      16 B\n"
    )


def test_library_notices_print_as_sparq_lines_unless_quiet(capsys):
    from sparqcli.cli.app import show_notices

    logger = logging.getLogger("sparqcli")
    level = logger.level
    try:
        show_notices(quiet=False)
        logging.getLogger("sparqcli.native").info("compiling the %s kernel", "MSE search")
        show_notices(quiet=True)
        logging.getLogger("sparqcli.native").info("not shown")
    finally:
        logger.setLevel(level)
    assert capsys.readouterr().err == "sparq: compiling the MSE search kernel\n"


@pytest.mark.parametrize(
    ("local_rank", "world_size", "shown"),
    [("0", "4", True), ("1", "4", False), ("3", "4", False), ("1", "1", True)],
)
def test_under_torchrun_only_each_machines_first_rank_prints_notices(
    capsys, monkeypatch, local_rank, world_size, shown
):
    from sparqcli.cli.app import show_notices

    monkeypatch.setenv("LOCAL_RANK", local_rank)
    monkeypatch.setenv("WORLD_SIZE", world_size)
    logger = logging.getLogger("sparqcli")
    level = logger.level
    try:
        show_notices(quiet=False)
        logging.getLogger("sparqcli.native").info("compiling the %s kernel", "MSE search")
    finally:
        logger.setLevel(level)
    err = capsys.readouterr().err
    assert ("sparq: compiling the MSE search kernel\n" in err) is shown


def test_a_missing_kernel_is_one_warning_line_and_the_same_output(tmp_path, checkpoint, config):
    mse = tmp_path / "mse.yaml"
    mse.write_text(config.read_text().replace("bits: 8", "bits: 8, range: mse"))
    assert "range: mse" in mse.read_text()
    not_a_folder = tmp_path / "cache"
    not_a_folder.write_text("")  # the kernel cache cannot be created here: the build fails
    outputs = {}
    for name, env in (("kernel", {}), ("fallback", {"SPARQ_KERNEL_CACHE": str(not_a_folder)})):
        output = tmp_path / f"{name}.sparq.safetensors"
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "sparqcli",
                "compress",
                checkpoint,
                "-c",
                mse,
                "-o",
                output,
                "-q",
            ],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
            env={**os.environ, **env},
        )
        assert done.returncode == 0, done.stderr
        outputs[name] = (output.read_bytes(), done.stderr)
    assert outputs["kernel"][0] == outputs["fallback"][0]
    warning = outputs["fallback"][1]
    assert warning.startswith("sparq: warning: the compiled MSE search kernel is not available (")
    assert warning.endswith(
        "; range: mse searches use tensor ops (same results, much slower). Set SPARQ_MSE_KERNEL=off to silence.\n"
    )
    assert warning.count("\n") == 1
