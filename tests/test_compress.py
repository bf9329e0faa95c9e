"""The library entry point `compress()`: reports, inputs of every kind, gates, outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import sparqcli
from sparqcli.compression import compress, plan_outputs
from sparqcli.config import Config
from sparqcli.engine.pipeline import compress_table
from sparqcli.errors import GateError, UsageError


def test_report_and_output_match_the_engine(checkpoint, config, state):
    report = compress(checkpoint, config)
    file = report.files[0]
    assert file.written and file.output == checkpoint.with_name("model.sparq.safetensors")
    assert [table.key for table in file.tables] == ["emb.weight", "bags.0.weight"]
    loaded = sparqcli.load(file.output)
    rules = Config.from_yaml(config).resolved_rules
    for table, rule in zip(file.tables, rules, strict=True):
        expected, stats = compress_table(
            state[table.key], "sparsify-first", rule.sparsity, rule.quantization
        )
        assert torch.equal(loaded[table.key], expected.decode())
        assert table.stats == stats
        assert table.bytes_before == state[table.key].numel() * 4
    assert torch.equal(sparqcli.load_table(file.output, "proj.weight"), state["proj.weight"])
    assert file.output_bytes == file.output.stat().st_size
    assert report.peak_memory_bytes > 0


def test_an_output_another_job_wrote_meanwhile_is_kept_without_force(
    checkpoint, config, monkeypatch
):
    # The path is checked before any work; a job writing the same path finished first.
    from sparqcli import compression
    from sparqcli.errors import OutputError

    output = checkpoint.with_name("out.sparq.safetensors")
    report_path = checkpoint.with_name("report.json")
    real = compression._compress_tables

    def meanwhile(*args, **kwargs):
        output.write_bytes(b"the other job's output")
        return real(*args, **kwargs)

    monkeypatch.setattr(compression, "_compress_tables", meanwhile)
    with pytest.raises(
        OutputError, match=r"out\.sparq\.safetensors: cannot write: it already exists$"
    ):
        compress(checkpoint, config, output=output, report_path=report_path)
    assert output.read_bytes() == b"the other job's output"
    assert sorted(p.name for p in checkpoint.parent.iterdir()) == [
        "cfg.yaml", "model.pt", "out.sparq.safetensors",
    ]  # fmt: skip
    output.unlink()
    real_save = compression.CompressReport.save_json

    def report_meanwhile(self, path, **kwargs):
        Path(path).write_text("the other job's report")
        return real_save(self, path, **kwargs)

    monkeypatch.setattr(compression, "_compress_tables", real)
    monkeypatch.setattr(compression.CompressReport, "save_json", report_meanwhile)
    with pytest.raises(UsageError, match=r"report\.json: already exists"):
        compress(checkpoint, config, output=output, report_path=report_path)
    assert report_path.read_text() == "the other job's report"
    compress(checkpoint, config, output=output, report_path=report_path, force=True)
    assert json.loads(report_path.read_text())["files"][0]["output"] == str(output)


def test_safetensors_and_pt_inputs_give_the_same_tables(tmp_path, config, state):
    torch.save(state, tmp_path / "a.pt")
    save_file(state, tmp_path / "b.safetensors")
    compress([tmp_path / "a.pt", tmp_path / "b.safetensors"], config)
    a = sparqcli.load(tmp_path / "a.sparq.safetensors")
    b = sparqcli.load(tmp_path / "b.sparq.safetensors")
    assert set(a) == set(b) and all(torch.equal(a[key], b[key]) for key in a)


def test_nested_checkpoint_keeps_its_other_entries(tmp_path, config, state):
    path = tmp_path / "train.pt"
    torch.save({"epoch": 12, "state_dict": state, "optimizer": {"step": torch.tensor(5)}}, path)
    report = compress(path, config)
    assert report.files[0].dropped == ["optimizer"]
    with safe_open(report.files[0].output, "pt") as handle:
        metadata = json.loads(handle.metadata()["sparq"])
    assert metadata["extra"] == {"container_key": "state_dict", "entries": {"epoch": 12}}
    torch_ao = compress(path, config, output_format="torch-ao")
    rebuilt = torch.load(torch_ao.files[0].output, weights_only=True)
    assert rebuilt["epoch"] == 12
    assert torch.equal(rebuilt["optimizer"]["step"], torch.tensor(5))
    assert "emb._packed_params._packed_weight" in rebuilt["state_dict"]
    assert torch.equal(rebuilt["state_dict"]["proj.bias"], state["proj.bias"])


def test_gate_failure_is_data_on_the_report_and_writes_nothing(checkpoint, config):
    report = compress(checkpoint, config, overrides=["layers[1].gates.max_bytes_ratio=0.01"])
    assert not report.gates_passed
    assert report.files[0].tables[1].gate_failures
    with pytest.raises(GateError) as caught:
        report.raise_for_gates()
    assert caught.value.report is report
    assert report.gate_failures == [
        f"{checkpoint}: bags.0.weight: bytes_ratio {report.files[0].tables[1].bytes_after / 1280:.4g} > max_bytes_ratio 0.01"
    ]
    assert str(caught.value) == "1 quality gate failed: " + report.gate_failures[0]
    assert caught.value.exit_code == 3
    assert not report.files[0].written
    assert not checkpoint.with_name("model.sparq.safetensors").exists()


def test_compressed_input_is_refused(checkpoint, config):
    output = compress(checkpoint, config).files[0].output
    with pytest.raises(
        UsageError, match=r"is already compressed by sparq; compress the original checkpoint$"
    ):
        compress(output, config, output=output.with_name("again.sparq.safetensors"))


def test_a_loaded_config_is_accepted_and_overrides_then_refused(checkpoint, config):
    loaded = Config.from_yaml(config)
    assert compress(checkpoint, loaded, dry_run=True).files[0].tables[0].stats is None
    with pytest.raises(
        UsageError, match=r"^overrides and order apply to a config path, not a loaded Config$"
    ):
        compress(checkpoint, loaded, order="quantize-first")


def test_plan_outputs():
    inputs = [Path("a/model.pt"), Path("b/model.safetensors")]
    assert plan_outputs(inputs, None, None, "sparq") == [
        Path("a/model.sparq.safetensors"),
        Path("b/model.sparq.safetensors"),
    ]
    assert plan_outputs(inputs[:1], None, None, "torch-ao") == [Path("a/model.torchao.pt")]
    with pytest.raises(
        UsageError,
        match=r"^a/model\.pt and b/model\.safetensors would both be written to out/model\.sparq\.safetensors$",
    ):
        plan_outputs(inputs, None, Path("out"), "sparq")
    with pytest.raises(UsageError, match=r"^output and out_dir exclude each other$"):
        plan_outputs(inputs[:1], Path("x"), Path("out"), "sparq")


def test_torch_ao_widths_are_refused_before_any_work(tmp_path, checkpoint, config):
    output = tmp_path / "out.torchao.pt"
    with pytest.raises(UsageError) as error:
        compress(
            checkpoint,
            config,
            overrides=["layers[0].quantization.bits=3"],
            output=output,
            output_format="torch-ao",
        )
    assert str(error.value) == (
        "layers[0].quantization.bits: output_format='torch-ao' supports 8 and 4 bits; torch.ao "
        "has no 3-bit embedding (use the sparq format)"
    )
    assert not output.exists()


@pytest.mark.parametrize("order", ["sparsify-first", "quantize-first"])
def test_torch_ao_figures_and_gates_are_those_of_the_file_written(
    tmp_path, checkpoint, config, state, order
):
    output = tmp_path / "out.torchao.pt"
    report = compress(checkpoint, config, output=output, output_format="torch-ao", order=order)
    written = torch.load(output, weights_only=True)
    for table in report.files[0].tables:
        module = table.key.removesuffix("weight")
        decoded = written[f"{module}_packed_params._packed_weight"].dequantize()
        original = state[table.key].float()
        # what torch.ao's dequantize gives: pruned values decode to (round(zp) - zp) * scale
        rel_error = float((decoded - original).double().norm() / original.double().norm())
        assert table.stats.rel_error == pytest.approx(rel_error, rel=1e-6)
        cosine = torch.nn.functional.cosine_similarity(decoded.double(), original.double(), dim=1)
        assert table.stats.row_cosine_min == pytest.approx(float(cosine.min()), abs=1e-6)
        zeros = float((decoded == 0).double().mean())
        assert table.stats.zero_fraction == pytest.approx(zeros)
        assert table.stats.zero_fraction < table.stats.pruned_fraction  # not sparq's exact zeros
    # a gate between the sparq decode's error and the file's: the file's decides
    sparq = compress(checkpoint, config, output=tmp_path / "s.safetensors", order=order)
    first = report.files[0].tables[0]
    assert sparq.files[0].tables[0].stats.rel_error < first.stats.rel_error
    between = (sparq.files[0].tables[0].stats.rel_error + first.stats.rel_error) / 2
    gated = compress(
        checkpoint,
        config,
        output=tmp_path / "gated.torchao.pt",
        output_format="torch-ao",
        order=order,
        overrides=[f"layers[0].gates.max_rel_error={between}"],
        force=True,
    )
    assert gated.files[0].tables[0].gate_failures
    assert not (tmp_path / "gated.torchao.pt").exists()


def test_torch_ao_keeps_an_unselected_tied_head_dense(tmp_path):
    generator = torch.Generator().manual_seed(0)
    table = torch.randn(64, 8, generator=generator)
    path = tmp_path / "lm.pt"
    torch.save({"embed.weight": table, "head.weight": table, "norm.weight": torch.ones(8)}, path)
    output = tmp_path / "lm.torchao.pt"
    base = {"quantization": {"bits": 8}, "min_table_bytes": 0}
    report = compress(
        path,
        Config.from_dict({**base, "layers": [{"match": "embed.weight"}]}),
        output=output,
        output_format="torch-ao",
    )
    assert report.files[0].tables[0].aliases == []  # torch.ao converts only the embedding
    written = torch.load(output, weights_only=True)
    assert "embed._packed_params._packed_weight" in written
    assert "head._packed_params._packed_weight" not in written
    assert torch.equal(written["head.weight"], table)
    # the sparq format stores the tied head once, with the table
    sparq = compress(path, Config.from_dict({**base, "layers": [{"match": "embed.weight"}]}))
    assert sparq.files[0].tables[0].aliases == ["head.weight"]
    # a head the rules select too is converted like the table
    both = compress(
        path,
        Config.from_dict({**base, "layers": [{"match": "*.weight"}], "exclude": ["norm*"]}),
        output=output,
        output_format="torch-ao",
        force=True,
    )
    assert both.files[0].tables[0].aliases == ["head.weight"]
    written = torch.load(output, weights_only=True)
    assert "head._packed_params._packed_weight" in written and "head.weight" not in written
    # a rule that matches the head but skips it for its size does not select it
    small = compress(
        path,
        Config.from_dict(
            {
                "quantization": {"bits": 8},
                "min_table_bytes": 1 << 20,
                "layers": [{"match": "embed.weight"}, {"match": "*head*"}],
            }
        ),
        output=output,
        output_format="torch-ao",
        force=True,
    )
    assert small.files[0].tables[0].aliases == []
    assert torch.equal(torch.load(output, weights_only=True)["head.weight"], table)


def test_new_options_run_and_are_reported(checkpoint, config, state):
    report = compress(
        checkpoint,
        config,
        overrides=["quantization.range=mse", "sparsity.scope=row", "quantization.bits=3"],
    )
    data = report.to_dict()["files"][0]["tables"][0]
    assert data["quantization"]["range"] == "mse"
    assert data["quantization"]["bits"] == 3
    assert data["sparsity"]["scope"] == "row"
    info = sparqcli.format.read_info(report.files[0].output)
    table = info.tables[report.files[0].tables[0].key]
    assert (table.quantization.range, table.sparsity.scope) == ("mse", "row")
