"""The public Python API (`sparqcli.*`), and the five v1 bugs, each through Python and the CLI."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

import sparqcli
from sparqcli.cli import app
from sparqcli.engine.stats import StatsAccumulator
from sparqcli.errors import GateError, SettingError, UsageError
from sparqcli.nn import Embedding

runner = CliRunner()


def run(*args: object):
    return runner.invoke(app, [str(arg) for arg in args], catch_exceptions=False)


PYTHON_CONFIG = sparqcli.Config(
    sparsity=sparqcli.Sparsity(level=0.5, block_shape=(1, 4)),
    min_table_bytes=0,  # the same config as conftest's CONFIG_TEXT
    layers=[
        sparqcli.Rule(match="emb"),
        sparqcli.Rule(match="bags.*", quantization={"bits": 4}),
    ],
)


def test_the_public_names_are_exported_and_import_no_torch() -> None:
    code = (
        "import sys, sparqcli; sparqcli.Config; sparqcli.Sparsity; sparqcli.Rule; "
        "print('torch' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"
    for name in sparqcli.__all__:
        assert getattr(sparqcli, name) is not None
    assert callable(sparqcli.compress) and callable(sparqcli.open)


def test_compress_state_dict_decodes_to_what_the_cli_writes(tmp_path, checkpoint, config, state):
    assert sparqcli.Config.from_yaml(config) == PYTHON_CONFIG
    result = sparqcli.compress_state_dict(state, PYTHON_CONFIG)
    assert sorted(result.tables) == ["bags.0.weight", "emb.weight"]
    assert [table.key for table in result.report.tables] == ["emb.weight", "bags.0.weight"]
    assert result.report.tables[1].rule.quantization.bits == 4
    assert result.report.gate_failures == []
    done = run("compress", checkpoint, "--config", config, "-o", tmp_path / "cli.sparq.safetensors")
    assert done.exit_code == 0, done.output
    from_cli = sparqcli.load(tmp_path / "cli.sparq.safetensors")
    decoded = result.decode()
    assert list(decoded) == sorted(state)
    assert all(torch.equal(decoded[key], from_cli[key]) for key in state)
    saved = result.save(tmp_path / "py.sparq.safetensors")
    from_python = sparqcli.load(saved)
    assert all(torch.equal(from_python[key], from_cli[key]) for key in state)
    with pytest.raises(UsageError, match=r"already exists; pass force=True to replace it$"):
        result.save(saved)
    result.save(saved, force=True)


def test_compress_state_dict_refuses_what_is_not_a_tensor(state) -> None:
    with pytest.raises(UsageError, match=r"^state dict entry 'step' is not a tensor \(int\)$"):
        sparqcli.compress_state_dict({**state, "step": 3}, PYTHON_CONFIG)  # type: ignore[dict-item]
    meta = {**state, "emb.weight": torch.empty(64, 32, device="meta")}
    with pytest.raises(UsageError, match=r"^state dict entry 'emb.weight' is a meta tensor: "):
        sparqcli.compress_state_dict(meta, PYTHON_CONFIG)


def test_parameters_that_require_a_gradient_compress_as_their_values(tmp_path, state) -> None:
    # A model's parameters, handed over or saved as they are, hold the same values as the
    # state dict: the engine must not trip on their autograd flag.
    parameters = {key: torch.nn.Parameter(value.clone()) for key, value in state.items()}
    expected = sparqcli.compress_state_dict(state, PYTHON_CONFIG).decode()
    decoded = sparqcli.compress_state_dict(parameters, PYTHON_CONFIG).decode()
    assert all(torch.equal(decoded[key], expected[key]) for key in state)
    torch.save(parameters, tmp_path / "params.pt")
    report = sparqcli.compress(
        tmp_path / "params.pt", PYTHON_CONFIG, output=tmp_path / "p.sparq.safetensors"
    )
    assert report.gate_failures == []
    loaded = sparqcli.load(tmp_path / "p.sparq.safetensors")
    assert all(torch.equal(loaded[key], expected[key]) for key in state)
    from sparqcli.engine.pipeline import compress_table

    table, _ = compress_table(
        parameters["emb.weight"], "sparsify-first", sparqcli.Sparsity(), sparqcli.Quantization()
    )
    assert not table.codes.requires_grad


def test_open_is_a_handle_like_safe_open(tmp_path, state) -> None:
    path = sparqcli.compress_state_dict(state, PYTHON_CONFIG).save(tmp_path / "m.sparq.safetensors")
    dense = sparqcli.load(path)
    with sparqcli.open(path) as file:
        assert file.keys() == sorted(state)
        assert file.tables() == ["bags.0.weight", "emb.weight"]
        assert file.metadata()["tables"]["emb.weight"]["quantization"]["bits"] == 8
        assert torch.equal(file.get_tensor("proj.bias"), state["proj.bias"])
        table = file.get_table("bags.0.weight")
        assert torch.equal(table.decode(), dense["bags.0.weight"])
        for start, stop in [(0, 64), (5, 6), (13, 40), (63, 64), (7, 7)]:
            assert torch.equal(
                file.get_rows("emb.weight", start, stop), dense["emb.weight"][start:stop]
            )
        assert torch.equal(file.get_rows("proj.weight", 1, 3), state["proj.weight"][1:3])
        with pytest.raises(
            IndexError, match=r"^rows 60:70 of 'emb.weight' are outside its 64 rows$"
        ):
            file.get_rows("emb.weight", 60, 70)
        with pytest.raises(
            sparqcli.errors.InputError,
            match=r"no tensor 'emb'; it holds 'bags.0.weight', 'emb.weight'",
        ):
            file.get_tensor("emb")


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("block_shape", [(1, 4), (3, 2)])
def test_get_rows_reads_any_range_of_any_packing(tmp_path, bits, block_shape) -> None:
    table = torch.randn(37, 7, generator=torch.Generator().manual_seed(bits))
    config = sparqcli.Config(
        sparsity=sparqcli.Sparsity(level=0.6, block_shape=block_shape),
        quantization=sparqcli.Quantization(bits=bits),
        layers=[sparqcli.Rule(match="t")],
    )
    path = sparqcli.compress_state_dict({"t": table}, config).save(tmp_path / "t.sparq.safetensors")
    with sparqcli.open(path) as file:
        whole = file.get_tensor("t")
        for start in range(0, 37, 5):
            for stop in (start, start + 1, min(37, start + 9), 37):
                assert torch.equal(file.get_rows("t", start, stop), whole[start:stop])


def test_a_closed_handle_and_an_absent_device_are_usage_errors(tmp_path, state) -> None:
    path = sparqcli.compress_state_dict(state, PYTHON_CONFIG).save(tmp_path / "m.sparq.safetensors")
    file = sparqcli.open(path)
    file.close()
    closed = rf"^{path}: the file is closed; open it again to read from it$"
    for read in (
        lambda: file.get_tensor("emb.weight"),
        lambda: file.get_tensor("proj.bias"),
        lambda: file.get_table("emb.weight"),
        lambda: file.get_rows("emb.weight", 0, 2),
        lambda: file.get_rows("proj.weight", 0, 2),
    ):
        with pytest.raises(UsageError, match=closed):
            read()
    assert file.keys() == sorted(state)  # the header stays known
    for device, message in [
        ("bogus", r"^device: 'bogus' is not a device \(cpu, cuda, cuda:N\)$"),
        ("meta", r"^device: must be cpu or cuda, got 'meta'$"),
    ]:
        with pytest.raises(UsageError, match=message):
            sparqcli.open(path, device=device)
        with pytest.raises(UsageError, match=message):
            sparqcli.load(path, device=device)
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match=r"^device 'cuda': this machine has no CUDA device$"):
            sparqcli.open(path, device="cuda")


def test_library_calls_given_the_wrong_kind_of_argument_say_so(
    tmp_path, state, config, checkpoint
) -> None:
    assert sparqcli.selection(config, checkpoint) == sparqcli.selection(
        sparqcli.Config.from_yaml(config), checkpoint
    )
    with pytest.raises(
        UsageError, match=r"^inputs: a state dict in memory, not a checkpoint path; "
    ):
        sparqcli.compress(state, PYTHON_CONFIG)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match=r"^inputs: must be a checkpoint path or a list of them"):
        sparqcli.plan(3, PYTHON_CONFIG, budget=0.1)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match=r"sample_rows: must be a positive integer, got 2.5$"):
        sparqcli.plan(tmp_path / "m.pt", PYTHON_CONFIG, budget=0.1, sample_rows=2.5)  # type: ignore[arg-type]
    # one override given as a string is one override
    one = sparqcli.Config.from_yaml(config, "sparsity.level=0.7")
    assert one == sparqcli.Config.from_yaml(config, ["sparsity.level=0.7"])
    assert one.sparsity.level == 0.7
    compressed = sparqcli.compress_state_dict(state, PYTHON_CONFIG)
    with pytest.raises(TypeError, match=r"^from_table takes a CompressedTable .* got Tensor; "):
        Embedding.from_table(state["emb.weight"])  # type: ignore[arg-type]
    path = compressed.save(tmp_path / "m.sparq.safetensors")
    with (
        sparqcli.open(path) as file,
        pytest.raises(
            sparqcli.errors.InputError,
            match=r"'proj.weight' is not a compressed table \(it is stored as it was\); get_tensor",
        ),
    ):
        file.get_table("proj.weight")
    with sparqcli.open(path) as file:
        with pytest.raises(TypeError, match=r"integer start and stop, got 0.0:2.5$"):
            file.get_rows("emb.weight", 0.0, 2.5)  # type: ignore[arg-type]
        with pytest.raises(sparqcli.errors.InputError, match=r"keys are strings, got int 3$"):
            file.get_tensor(3)  # type: ignore[arg-type]


def test_inspect_and_decompress_return_typed_results(tmp_path, checkpoint, state) -> None:
    inspection = sparqcli.inspect(checkpoint)
    assert [entry.key for entry in inspection.tensors] == list(state)
    assert inspection.to_dict()["tensors"]["emb.weight"] == {
        "shape": [64, 16],
        "dtype": "float32",
        "bytes": 4096,
        "table": True,
        "candidate": True,
        "reasons": ["name"],
        "why": "name says embedding (emb)",
    }
    path = sparqcli.compress_state_dict(state, PYTHON_CONFIG).save(tmp_path / "m.sparq.safetensors")
    info = sparqcli.inspect(path)
    assert info.is_sparq and sorted(info.tables) == ["bags.0.weight", "emb.weight"]
    assert info.file_bytes == path.stat().st_size
    result = sparqcli.decompress(path, tmp_path / "dense.safetensors")
    assert (result.tensors, result.output_bytes) == (
        4,
        (tmp_path / "dense.safetensors").stat().st_size,
    )
    with pytest.raises(UsageError, match=r"dense.safetensors: already exists; pass force=True"):
        sparqcli.decompress(path, tmp_path / "dense.safetensors")


# --- the five bugs of issue #10 -----------------------------------------------------------------

GATED = """\
sparsity: {level: 0.8}
quantization: {bits: 2}
gates: {min_row_cosine: 0.99}
layers:
  - match: emb
    gates: {min_row_cosine: null}
"""


def test_bug1_a_rule_gate_set_to_null_disables_the_top_level_gate(tmp_path, checkpoint) -> None:
    config = tmp_path / "gated.yaml"
    config.write_text(GATED)
    report = sparqcli.compress(checkpoint, config, output=tmp_path / "a.sparq.safetensors")
    assert report.gates_passed and report.files[0].written
    assert report.files[0].tables[0].stats.row_cosine_min < 0.99
    done = run("compress", checkpoint, "--config", config, "-o", tmp_path / "b.sparq.safetensors")
    assert done.exit_code == 0, done.output
    # Without the rule's null, the same top-level gate fails: exit 3, nothing written.
    config.write_text(GATED.replace("    gates: {min_row_cosine: null}\n", ""))
    done = run("compress", checkpoint, "--config", config, "-o", tmp_path / "c.sparq.safetensors")
    assert done.exit_code == 3
    assert not (tmp_path / "c.sparq.safetensors").exists()


def test_bug2_a_dry_run_fails_where_the_real_run_would(tmp_path) -> None:
    source = tmp_path / "odd.safetensors"
    save_file({"emb.weight": torch.randn(10, 7)}, str(source))
    config = tmp_path / "cfg.yaml"
    config.write_text("quantization: {bits: 4}\nlayers: [{match: emb}]\n")
    expected = (
        "sparq: error: table 'emb.weight': --format torch-ao at 4 bits needs an even number of "
        "columns, got 7 (torch.ao's quint4x2 embeddings mis-pack odd widths)\n"
    )
    for extra in (["--dry-run"], []):
        done = run("compress", source, "--config", config, "--format", "torch-ao", *extra)
        assert (done.exit_code, done.stderr) == (2, expected)
    assert not (tmp_path / "odd.torchao.pt").exists()
    with pytest.raises(UsageError, match=r"output_format='torch-ao' at 4 bits needs an even"):
        sparqcli.compress(source, config, output_format="torch-ao", dry_run=True)


def test_bug2_key_collisions_are_found_before_any_work(tmp_path) -> None:
    source = tmp_path / "clash.safetensors"
    save_file({"emb.weight": torch.randn(8, 4), "emb.weight.codes": torch.ones(2)}, str(source))
    config = tmp_path / "cfg.yaml"
    config.write_text("layers: [{match: emb}]\n")
    done = run("compress", source, "--config", config, "--dry-run")
    assert done.exit_code == 1
    assert done.stderr == (
        f"sparq: error: {tmp_path / 'clash.sparq.safetensors'}: cannot write: key "
        "'emb.weight.codes' collides with compressed table 'emb.weight' (keys 'emb.weight' and "
        "'emb.weight.*' are reserved for its parts)\n"
    )


def test_bug3_settings_and_gates_validate_themselves() -> None:
    with pytest.raises(
        SettingError, match=r"^quantization.bits: must be an integer from 1 to 8, got 8.0$"
    ):
        sparqcli.Quantization(bits=8.0)  # type: ignore[arg-type]
    with pytest.raises(SettingError, match=r"^gates.max_rel_error: must be a number >= 0, got -1$"):
        sparqcli.Gates(max_rel_error=-1)


def test_bug4_json_never_holds_nan_or_infinity(tmp_path, monkeypatch) -> None:
    source = tmp_path / "huge.safetensors"
    # Values near float32's largest: float32 sums overflow, the CPU's float64 ones do not.
    save_file({"emb.weight": torch.full((16, 8), 3e38)}, str(source))
    config = tmp_path / "cfg.yaml"
    config.write_text("layers: [{match: emb}]\n")
    report = sparqcli.compress(source, config, output=tmp_path / "z.sparq.safetensors")
    assert report.files[0].tables[0].stats.rel_error == pytest.approx(0.5**0.5)
    # A statistic that is not finite (a CUDA run sums in float32) is null in JSON.
    monkeypatch.setattr(StatsAccumulator, "_squares", lambda self: (math.inf, math.inf))
    report = sparqcli.compress(source, config, output=tmp_path / "x.sparq.safetensors")
    assert math.isnan(report.files[0].tables[0].stats.rel_error)
    done = run(
        "compress", source, "--config", config, "-o", tmp_path / "y.sparq.safetensors", "--json",
        "--report", tmp_path / "report.json",
    )  # fmt: skip
    assert done.exit_code == 0, done.output

    def strict(text: str) -> object:
        return json.loads(text, parse_constant=lambda name: pytest.fail(f"JSON holds {name}"))

    data = strict(done.stdout)
    assert data["files"][0]["tables"][0]["stats"]["rel_error"] is None
    assert strict((tmp_path / "report.json").read_text()) == data


def test_bug5_library_errors_speak_python_and_the_cli_speaks_flags(tmp_path, checkpoint, config):
    output = tmp_path / "out.sparq.safetensors"
    output.write_bytes(b"x")
    with pytest.raises(UsageError) as caught:
        sparqcli.compress(checkpoint, config, output=output)
    assert str(caught.value) == f"{output}: already exists; pass force=True to replace it"
    assert (caught.value.path, caught.value.option) == (str(output), "force")
    done = run("compress", checkpoint, "--config", config, "-o", output)
    assert done.stderr == f"sparq: error: {output}: already exists; pass --force to replace it\n"
    with pytest.raises(UsageError) as caught:
        sparqcli.compress(checkpoint, config, device="tpu")
    assert str(caught.value) == "device: must be cpu or cuda, got 'tpu'"
    with pytest.raises(UsageError) as caught:
        sparqcli.compress([checkpoint, checkpoint], config, output=output)
    assert str(caught.value) == "output takes one input, got 2; use out_dir for several"
    done = run("compress", checkpoint, checkpoint, "--config", config, "-o", output)
    assert done.stderr == (
        "sparq: error: -o/--output takes one input, got 2; use --out-dir for several\n"
    )


def test_a_failed_gate_is_on_the_report_and_the_cli_exits_3(tmp_path, checkpoint, config):
    report = sparqcli.compress(
        checkpoint, config, overrides=["gates.max_rel_error=0.0001"], dry_run=False
    )
    assert not report.gates_passed and not report.files[0].written
    with pytest.raises(GateError) as caught:
        report.raise_for_gates()
    assert caught.value.exit_code == 3
