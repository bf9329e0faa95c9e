"""Reliability and security, through the command line's error mapping.

Hostile pickles never run; corrupt inputs and configs give one `sparq: error: ` line and exit 1
or 2 (no traceback, no hang, no memory blow-up); NaN/Inf and degenerate tables; write failures
leave nothing behind; outputs are byte-reproducible (runs, folders, thread counts); compressing
a compressed file or selecting nothing is refused.

The helpers shared with test_fuzz.py and test_signals.py (`invoke`, `check_outcome`,
`write_inputs`, ...) live in conftest.py.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import pickle
import random
import shutil
import struct
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import sparqcli
from sparqcli.engine.pipeline import compress_table
from sparqcli.errors import OutputError, TableError, UsageError
from sparqcli.settings import Quantization, Sparsity
from tests.conftest import (
    CONFIG,
    SPARQ,
    assert_one_line_error,
    check_outcome,
    invoke,
    make_table_state,
    sha256,
    write_inputs,
)


def run_sparq(
    *args: object, timeout: float = 120, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Runs the installed `sparq` console script."""
    return subprocess.run(
        [str(SPARQ), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


_DRIVER = """
import json, resource, sys, time
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
from typer.testing import CliRunner
from sparqcli.cli import app
runner = CliRunner()
results = []
for args in json.loads(sys.stdin.read()):
    started = time.perf_counter()
    result = runner.invoke(app, args)
    escaped = result.exception is not None and not isinstance(result.exception, SystemExit)
    results.append({"args": args, "exit_code": result.exit_code, "stderr": result.stderr,
                    "output": result.output, "escaped": repr(result.exception) if escaped else None,
                    "seconds": time.perf_counter() - started})
print(json.dumps(results))
"""


def run_guarded(
    commands: list[list[str]], memory_bytes: int = 3 << 30, timeout: float = 180
) -> list[dict[str, Any]]:
    """Runs CLI commands in one subprocess whose address space is capped at `memory_bytes`.

    A header that makes sparq allocate what it claims fails there (MemoryError or a clean
    error) instead of taking the machine down; the timeout catches hangs.
    """
    done = subprocess.run(
        [sys.executable, "-c", _DRIVER, str(memory_bytes)],
        input=json.dumps(commands),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def assert_guarded_failure(result: dict[str, Any], codes: tuple[int, ...] = (1, 2)) -> str:
    assert result["escaped"] is None, result
    assert result["exit_code"] in codes, result
    assert "Traceback" not in result["output"], result
    stderr = result["stderr"]
    assert stderr.startswith("sparq: error: ") and stderr.count("\n") == 1, result
    return stderr.rstrip("\n")


# --- hostile pickles --------------------------------------------------------------------------


class _Payload:
    """Unpickling this creates the marker file: what a hostile checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _hostile_files(folder: Path, marker: Path) -> list[Path]:
    table = torch.randn(16, 8)
    payload = _Payload(marker)
    files = []

    def add(name: str, write) -> None:
        path = folder / name
        write(path)
        files.append(path)

    add("zip.pt", lambda p: torch.save({"emb.weight": table, "x": payload}, p))
    add(
        "legacy.pth",
        lambda p: torch.save(
            {"emb.weight": table, "x": payload}, p, _use_new_zipfile_serialization=False
        ),
    )
    # Protocol 4 starts with FRAME, where torch's weights-only unpickler stops before it ever
    # sees the GLOBAL: the refusal must not depend on what that unpickler reports.
    add(
        "protocol4.pt",
        lambda p: torch.save({"emb.weight": table, "x": payload}, p, pickle_protocol=4),
    )
    add("nested.ckpt", lambda p: torch.save({"state_dict": {"emb.weight": table}, "x": payload}, p))
    add("top_level.bin", lambda p: torch.save(payload, p))
    for protocol in (2, 5):
        add(
            f"raw{protocol}.pt",
            lambda p, protocol=protocol: p.write_bytes(pickle.dumps({"x": payload}, protocol)),
        )
    return files


@pytest.fixture
def hostile(tmp_path: Path) -> tuple[list[Path], Path, Path]:
    marker = tmp_path / "marker"
    folder = tmp_path / "in"
    folder.mkdir()
    config = tmp_path / "cfg.yaml"
    config.write_text(CONFIG)
    return _hostile_files(folder, marker), marker, config


def test_hostile_pickles_are_refused_by_every_command_and_never_run(hostile, tmp_path):
    files, marker, config = hostile
    out = tmp_path / "out"
    out.mkdir()
    for path in files:
        commands = [
            ("compress", path, "--config", config, "-o", out / "x.sparq.safetensors"),
            ("inspect", path),
            ("inspect", path, "--json"),
            ("decompress", path, "-o", out / "x.safetensors"),
            ("validate", config, path),
        ]
        for command in commands:
            result = invoke(*command)
            line = assert_one_line_error(result, codes=(2,))
            if command[0] == "decompress":  # a torch file is no sparq file: never even opened
                assert line == (
                    f"sparq: error: {path}: not a sparq-compressed file (no sparq metadata); "
                    "nothing to decompress"
                )
            else:
                assert line.startswith(f"sparq: error: {path}: refusing to unpickle"), line
                assert "would run code" in line and "--trust-pickle" in line, line
            assert not marker.exists(), f"{command}: the pickle ran"
    assert list(out.iterdir()) == []


def test_installed_sparq_refuses_a_hostile_pickle(hostile, tmp_path):
    files, marker, config = hostile
    path = next(p for p in files if p.name == "protocol4.pt")
    done = run_sparq("compress", path, "--config", config, "-o", tmp_path / "x.sparq.safetensors")
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith(f"sparq: error: {path}: refusing to unpickle")
    assert "--trust-pickle" in done.stderr and "Traceback" not in done.stderr
    assert not marker.exists()
    assert not (tmp_path / "x.sparq.safetensors").exists()


def test_the_payload_is_live_with_trust_pickle(hostile):
    """The fixture's pickles really run code when trusted, so the refusals above mean something."""
    files, marker, _ = hostile
    result = invoke("inspect", next(p for p in files if p.name == "zip.pt"), "--trust-pickle")
    assert result.exit_code == 0, result.output
    assert marker.exists()


def test_a_pickle_named_safetensors_is_not_unpickled(hostile, tmp_path):
    files, marker, config = hostile
    disguised = tmp_path / "evil.safetensors"
    shutil.copy(files[0], disguised)
    for command in (("inspect", disguised), ("compress", disguised, "--config", config)):
        assert_one_line_error(invoke(*command), codes=(1,))
    assert not marker.exists()


# --- corrupt inputs ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_inputs(tmp_path_factory.mktemp("inputs"))


def _mutations(data: bytes) -> dict[str, bytes]:
    rng = random.Random(len(data))
    flipped_header = bytearray(data)
    flipped_header[3] ^= 0x40  # the header length of a safetensors file; the zip/pickle magic
    flipped_body = bytearray(data)
    flipped_body[len(data) * 2 // 3] ^= 0x10
    return {
        "empty": b"",
        "eight-bytes": data[:8],
        "half": data[: len(data) // 2],
        "last-byte-missing": data[:-1],
        "random": bytes(rng.randrange(256) for _ in range(4096)),
        "header-flip": bytes(flipped_header),
        "body-flip": bytes(flipped_body),
        "inserted": data[:40] + b"\x00\xff" * 8 + data[40:],
    }


@pytest.mark.parametrize("kind", ["pt", "legacy", "safetensors", "sparq"])
def test_corrupt_files_fail_cleanly(inputs, kind, tmp_path):
    source = inputs[kind]
    for name, data in _mutations(source.read_bytes()).items():
        path = tmp_path / f"{name}{''.join(source.suffixes)}"
        path.write_bytes(data)
        out = tmp_path / "out.sparq.safetensors"
        dense = tmp_path / "dense.safetensors"
        for command, output in (
            (("compress", path, "--config", inputs["config"], "-o", out), out),
            (("inspect", path), None),
            (("decompress", path, "-o", dense), dense),
        ):
            started = time.perf_counter()
            result = invoke(*command)
            assert time.perf_counter() - started < 30, f"{name}: {command[0]} took too long"
            check_outcome(result, command[0], output)
            if name in ("empty", "eight-bytes", "half", "last-byte-missing", "random"):
                assert result.exit_code in (1, 2), (name, command[0], result.output)
            for written in (out, dense):
                written.unlink(missing_ok=True)
        path.unlink()


@pytest.mark.parametrize(
    ("kind", "suffix"),
    [
        ("pt", ".safetensors"),
        ("safetensors", ".pt"),
        ("sparq", ".bin"),
        ("legacy", ".safetensors"),
        ("pt", ".npz"),
        ("safetensors", ""),
    ],
)
def test_wrong_extension(inputs, kind, suffix, tmp_path):
    path = tmp_path / f"renamed{suffix}"
    shutil.copy(inputs[kind], path)
    for command in (
        ("compress", path, "--config", inputs["config"], "-o", tmp_path / "o.sparq.safetensors"),
        ("inspect", path),
    ):
        line = assert_one_line_error(invoke(*command))
        assert str(path) in line
    assert not (tmp_path / "o.sparq.safetensors").exists()


def _safetensors_bytes(header: dict[str, Any], data: bytes, pad: bool = True) -> bytes:
    text = json.dumps(header).encode()
    if pad:
        text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data


def _huge_claims(folder: Path, sparq_file: Path) -> list[Path]:
    """Files whose headers claim sizes far beyond the file (or the machine)."""
    files: dict[str, bytes] = {
        "length-2^63.safetensors": struct.pack("<Q", 1 << 63) + b"{}",
        "length-90MB.safetensors": struct.pack("<Q", 90 << 20) + b'{"a": 1}',
        "shape.safetensors": _safetensors_bytes(
            {"emb.weight": {"dtype": "F32", "shape": [1 << 31, 1 << 31], "data_offsets": [0, 64]}},
            bytes(64),
        ),
        "offsets.safetensors": _safetensors_bytes(
            {
                "emb.weight": {
                    "dtype": "F32",
                    "shape": [1 << 20, 1 << 20],
                    "data_offsets": [0, 4 << 40],
                }
            },
            bytes(64),
        ),
        "negative.safetensors": _safetensors_bytes(
            {"emb.weight": {"dtype": "F32", "shape": [-1, 16], "data_offsets": [0, 64]}},
            bytes(64),
        ),
    }
    # sparq metadata claiming a huge table, a huge kept count and huge blocks.
    with safe_open(str(sparq_file), framework="pt") as handle:
        stored = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
        metadata = handle.metadata()
    document = json.loads(metadata["sparq"])
    for name, change in {
        "sparq-shape": {"shape": [1 << 40, 1 << 40]},
        "sparq-kept": {"kept": 1 << 62},
        "sparq-blocks": {
            "sparsity": {
                **document["tables"]["emb.weight"]["sparsity"],
                "block_shape": [1 << 62, 1 << 62],
            }
        },
        "sparq-block-rows": {
            "sparsity": {
                **document["tables"]["emb.weight"]["sparsity"],
                "block_shape": [1 << 40, 4],
            }
        },
    }.items():
        changed = json.loads(metadata["sparq"])
        changed["tables"]["emb.weight"].update(change)
        path = folder / f"{name}.sparq.safetensors"
        from sparqcli.format import save_safetensors

        save_safetensors(path, stored, {"sparq": json.dumps(changed)})
        files[path.name] = path.read_bytes()
    # A legacy .pt whose storage record claims 1 TiB.
    legacy = io.BytesIO()
    torch.save({"emb.weight": torch.zeros(64, 16)}, legacy, _use_new_zipfile_serialization=False)
    data = bytearray(legacy.getvalue())
    at = data.rfind(struct.pack("<q", 64 * 16))
    data[at : at + 8] = struct.pack("<q", 1 << 40)
    files["storage-1TiB.pt"] = bytes(data)
    paths = []
    for name, data in files.items():
        path = folder / name
        path.write_bytes(data)
        paths.append(path)
    return paths


def test_headers_claiming_huge_sizes_fail_without_allocating(inputs, tmp_path):
    paths = _huge_claims(tmp_path, inputs["sparq"])
    commands = []
    for path in paths:
        commands.append(["inspect", str(path)])
        commands.append(
            [
                "compress",
                str(path),
                "--config",
                str(inputs["config"]),
                "-o",
                str(tmp_path / "o.sparq.safetensors"),
                "--force",
            ]
        )
        commands.append(["decompress", str(path), "-o", str(tmp_path / "d.safetensors"), "--force"])
    for result in run_guarded(commands):
        path = Path(result["args"][1])
        assert result["seconds"] < 30, result
        if path.name.startswith("sparq-") and result["args"][0] == "compress":
            line = assert_guarded_failure(result, codes=(2,))
            assert "already compressed" in line
            continue
        line = assert_guarded_failure(result)
        assert str(path) in line, line


def test_sparq_metadata_claiming_other_blocks_is_checked_against_the_stored_mask(inputs, tmp_path):
    """The mask is validated before anything is expanded to the claimed block shape.

    (Valid files with blocks larger than the table decode: see
    test_block_shapes_larger_than_the_table_do_not_blow_up_memory.)
    """
    for path in _huge_claims(tmp_path, inputs["sparq"]):
        if path.name.startswith(("sparq-blocks", "sparq-block-rows")):
            result = invoke("decompress", path, "-o", tmp_path / "d.safetensors")
            line = assert_one_line_error(result, codes=(1,))
            assert "tensor 'emb.weight.mask' has shape [32], expected [1]" in line


# --- configs ----------------------------------------------------------------------------------


def _alias_bomb(levels: int = 9) -> str:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    for level in range(1, levels):
        refs = ", ".join([f"*a{level - 1}"] * 9)
        lines.append(f"a{level}: &a{level} [{refs}]")
    lines.append(f"layers: *a{levels - 1}")
    return "\n".join(lines) + "\n"


CONFIG_CASES = {
    "list": ("- match: emb\n", "top level: must be a mapping, got list"),
    "scalar": ("42\n", "top level: must be a mapping, got integer"),
    "string": ("emb\n", "top level: must be a mapping, got string"),
    "empty": ("", "top level: must be a mapping, got an empty document"),
    "comment-only": ("# nothing\n", "top level: must be a mapping, got an empty document"),
    "wrong-types": (
        "version: '1'\norder: 3\nsparsity: {level: abc, block_shape: 7, norm: 5}\n"
        "quantization: {bits: '8', scale_dtype: 1}\nlayers: 5\nexclude: {a: 1}\ngates: [1]\n",
        "version: must be 1, got '1'",
    ),
    "wrong-rule-types": (
        "version: 1\nlayers:\n  - match: 5\n  - 7\n  - {}\n  - {match: emb, sparsity: [1, 2]}\n",
        "layers[0].match: must be a non-empty string",
    ),
    "bool-bits": ("version: 1\nquantization: {bits: true}\nlayers: [{match: emb}]\n", "bits"),
    "nan-level": ("version: 1\nsparsity: {level: .nan}\nlayers: [{match: emb}]\n", "level"),
    "alias-bomb": (_alias_bomb(), "YAML aliases"),
    "merge-key": (
        "base: &b {level: 0.5}\nversion: 1\nsparsity: {<<: *b}\nlayers: [{match: emb}]\n",
        "YAML aliases",
    ),
    "anchor-and-alias": (
        "version: 1\nsparsity: &s {level: 0.5}\nlayers: [{match: emb, sparsity: *s}]\n",
        "YAML aliases",
    ),
    "deep-lists": ("a: " + "[" * 50000 + "]" * 50000 + "\n", "nested too deeply"),
    "deep-maps": ("a: " + "{b: " * 20000 + "1" + "}" * 20000 + "\n", "nested too deeply"),
    "python-tag": (
        "!!python/object/apply:os.system ['true']\n",
        "could not determine a constructor",
    ),
    "binary": ("\x00\x01\x02", "invalid YAML"),
    "two-documents": ("version: 1\nlayers: [{match: emb}]\n---\nx: 1\n", "another document"),
    "duplicate-key": ("version: 1\nversion: 1\nlayers: [{match: emb}]\n", "duplicate key"),
    "too-large": ("# " + "x" * (1 << 20) + "\n", "larger than 1 MiB"),
}


@pytest.mark.parametrize("name", sorted(CONFIG_CASES))
def test_bad_configs_are_one_line_usage_errors(inputs, name, tmp_path):
    text, expected = CONFIG_CASES[name]
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    out = tmp_path / "o.sparq.safetensors"
    for command in (
        ("compress", inputs["pt"], "--config", config, "-o", out),
        ("validate", config, inputs["pt"]),
    ):
        started = time.perf_counter()
        result = invoke(*command)
        assert time.perf_counter() - started < 10
        line = assert_one_line_error(result, codes=(2,))
        assert line.startswith(f"sparq: error: {config}: "), line
        assert expected in line, line
    assert not out.exists()


def test_non_utf8_and_unreadable_configs(inputs, tmp_path):
    config = tmp_path / "latin1.yaml"
    config.write_bytes("version: 1\nlayers: [{match: 'é'}]\n".encode("latin-1"))
    line = assert_one_line_error(invoke("validate", config), codes=(2,))
    assert "not UTF-8" in line
    line = assert_one_line_error(invoke("validate", tmp_path), codes=(1,))
    assert str(tmp_path) in line


def test_block_shapes_larger_than_the_table_do_not_blow_up_memory(inputs, tmp_path):
    """A block of 10^8 columns once padded the table to 10^8 columns (25 GB for 64 rows).

    A block larger than the table is the table's side: the result equals that block shape's.
    """
    cases = [([1, 100_000_000], (1, 16), 0.5), ([100_000_000, 1], (64, 1), 0.5)]
    cases.append(([10**30, 10**30], (64, 16), 0.8))
    commands = []
    for index, (shape, _, level) in enumerate(cases):
        config = tmp_path / f"c{index}.yaml"
        config.write_text(
            f"version: 1\nsparsity: {{level: {level}, block_shape: {shape}, zeros_per_block: 3}}\n"
            "layers: [{match: emb}]\n"
        )
        out = tmp_path / f"o{index}.sparq.safetensors"
        commands.append(
            ["compress", str(inputs["pt"]), "--config", str(config), "-o", str(out), "-q"]
        )
        commands.append(["decompress", str(out), "-o", str(tmp_path / f"d{index}.safetensors")])
    for result in run_guarded(commands, memory_bytes=3 << 30):
        assert result["escaped"] is None and result["exit_code"] == 0, result
    original = torch.load(inputs["pt"])["emb.weight"]
    for index, (_, same_as, level) in enumerate(cases):
        table = sparqcli.load(tmp_path / f"o{index}.sparq.safetensors")["emb.weight"]
        expected, _ = compress_table(
            original, "sparsify-first", Sparsity(level, same_as, 3), Quantization(8)
        )
        assert torch.equal(table, expected.decode())
        assert 0 < float((table == 0).float().mean()) < 1


# --- bad values -------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("order", ["sparsify-first", "quantize-first"])
def test_nan_and_inf_name_the_table_and_the_first_bad_row(tmp_path, bad, dtype, order):
    state = make_table_state()
    table = state["emb.weight"].to(dtype)
    table[37, 5] = bad
    table[50, 0] = bad
    state["emb.weight"] = table
    pt = tmp_path / "model.pt"
    torch.save(state, pt)
    st = tmp_path / "model.safetensors"
    save_file(state, str(st))
    config = tmp_path / "cfg.yaml"
    config.write_text(CONFIG)
    for source in (pt, st):
        out = tmp_path / "o.sparq.safetensors"
        result = invoke("compress", source, "--config", config, "--order", order, "-o", out)
        line = assert_one_line_error(result, codes=(1,))
        assert line == f"sparq: error: {source}: emb.weight: row 37 holds NaN or Inf values"
        assert not out.exists()
        assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_nan_past_the_first_row_chunk_is_found_at_its_row(tmp_path):
    table = torch.randn(600_000, 4, generator=torch.Generator().manual_seed(1))
    table[550_001, 2] = float("nan")
    source = tmp_path / "big.safetensors"
    save_file({"emb.weight": table}, str(source))
    config = tmp_path / "cfg.yaml"
    config.write_text(CONFIG)
    line = assert_one_line_error(invoke("compress", source, "--config", config), codes=(1,))
    assert line.endswith("emb.weight: row 550001 holds NaN or Inf values")


def test_nan_in_a_table_that_is_not_selected_is_carried_over(tmp_path):
    state = make_table_state()
    state["proj.weight"][1, 1] = float("nan")
    source = tmp_path / "model.pt"
    torch.save(state, source)
    config = tmp_path / "cfg.yaml"
    config.write_text(CONFIG)
    out = tmp_path / "o.sparq.safetensors"
    result = invoke("compress", source, "--config", config, "-o", out, "-q")
    assert result.exit_code == 0, result.output
    loaded = sparqcli.load(out)["proj.weight"]
    assert torch.isnan(loaded[1, 1]) and torch.equal(
        loaded.nan_to_num(), state["proj.weight"].nan_to_num()
    )


EDGE_SHAPES = [(0, 8), (8, 0), (0, 0), (1, 8), (8, 1), (1, 1), (1, 5), (5, 3), (3, 1024)]


@pytest.mark.parametrize("shape", EDGE_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_degenerate_tables_round_trip_to_the_engine_decode(tmp_path, shape):
    generator = torch.Generator().manual_seed(sum(shape))
    table = torch.randn(*shape, generator=generator)
    source = tmp_path / "model.pt"
    torch.save({"emb.weight": table, "other": torch.ones(2)}, source)
    out = tmp_path / "o.sparq.safetensors"
    config = tmp_path / "cfg.yaml"
    variants = ((0.0, (1, 4), 8), (0.5, (1, 4), 4), (0.6, (2, 2), 2), (0.5, (4, 1), 8))
    for order in ("sparsify-first", "quantize-first"):
        for level, block, bits in variants:
            config.write_text(
                f"version: 1\norder: {order}\nsparsity: {{level: {level}, block_shape: "
                f"[{block[0]}, {block[1]}]}}\nquantization: {{bits: {bits}}}\n"
                "layers: [{match: emb}]\n"
            )
            result = invoke("compress", source, "--config", config, "-o", out, "--force", "-q")
            assert result.exit_code == 0, (order, bits, level, result.output)
            expected, _ = compress_table(table, order, Sparsity(level, block), Quantization(bits))
            loaded = sparqcli.load(out)
            assert loaded["emb.weight"].shape == table.shape
            assert loaded["emb.weight"].dtype == table.dtype
            assert torch.equal(loaded["emb.weight"], expected.decode())
            assert torch.equal(loaded["other"], torch.ones(2))
            if bits != 2:
                ao = tmp_path / "o.torchao.pt"
                ao.unlink(missing_ok=True)
                result = invoke(
                    "compress", source, "--config", config, "-o", ao, "-q", "--format", "torch-ao"
                )
                check_outcome(result, "torch-ao", ao)
                if result.exit_code == 0 and bits == 8:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        weight = torch.load(ao)["emb._packed_params._packed_weight"]
                    assert torch.equal(weight.int_repr(), expected.dense_codes())
    assert invoke("inspect", out).exit_code == 0
    dense = tmp_path / "dense.safetensors"
    assert invoke("decompress", out, "-o", dense, "-q").exit_code == 0
    with safe_open(str(dense), framework="pt") as handle:
        assert handle.get_tensor("emb.weight").shape == table.shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_constant_rows_decode_exactly(tmp_path, dtype):
    values = (
        [0.0, 3.3, -2.5, 7.0, 1e-3, -1e4]
        if dtype != torch.float32
        else [0.0, 3.3, -1e30, 1e-30, 7.0]
    )
    table = torch.tensor([[value] * 12 for value in values]).to(dtype)
    source = tmp_path / "model.pt"
    torch.save({"emb.weight": table}, source)
    out = tmp_path / "o.sparq.safetensors"
    config = tmp_path / "cfg.yaml"
    for order in ("sparsify-first", "quantize-first"):
        for bits in (8, 4, 2):
            for level in (0.0, 0.5):
                config.write_text(
                    f"version: 1\norder: {order}\nsparsity: {{level: {level}}}\n"
                    f"quantization: {{bits: {bits}}}\nlayers: [{{match: emb}}]\n"
                )
                result = invoke("compress", source, "--config", config, "-o", out, "--force", "-q")
                assert result.exit_code == 0, result.output
                loaded = sparqcli.load(out)["emb.weight"]
                expected, _ = compress_table(table, order, Sparsity(level), Quantization(bits))
                assert torch.equal(loaded, expected.decode())
                if level == 0.0:
                    assert torch.equal(loaded, table), (order, bits)


# --- write failures ---------------------------------------------------------------------------


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def test_output_whose_parent_is_a_file(inputs, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    out = blocker / "o.sparq.safetensors"
    # checked before any work: a usage error (exit 2), like a missing report folder
    line = assert_one_line_error(
        invoke("compress", inputs["pt"], "--config", inputs["config"], "-o", out), codes=(2,)
    )
    assert line == f"sparq: error: {out}: cannot write: folder {blocker} does not exist"
    line = assert_one_line_error(
        invoke("decompress", inputs["sparq"], "-o", blocker / "d.safetensors"), codes=(2,)
    )
    assert str(blocker / "d.safetensors") in line
    report = blocker / "r.json"
    line = assert_one_line_error(
        invoke(
            "compress",
            inputs["pt"],
            "--config",
            inputs["config"],
            "-o",
            tmp_path / "o.sparq.safetensors",
            "--report",
            report,
        )
    )
    assert str(report) in line
    assert blocker.read_text() == "not a folder"


def test_an_output_folder_that_is_not_writable_is_refused_before_any_work(
    inputs, tmp_path, monkeypatch
):
    # a read-only file system, say (root ignores permission bits, so access() is faked here)
    import sparqcli.sinks

    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(
        sparqcli.sinks.os,
        "access",
        lambda path, mode: False if Path(path) == locked else real_access(path, mode),
    )
    out = tmp_path / "o.sparq.safetensors"
    for args, target in (
        (["-o", locked / "o.sparq.safetensors"], locked / "o.sparq.safetensors"),
        (["-o", out, "--report", locked / "r.json"], locked / "r.json"),
    ):
        line = assert_one_line_error(
            invoke("compress", inputs["pt"], "--config", inputs["config"], *args), codes=(2,)
        )
        assert line == f"sparq: error: {target}: cannot write: folder {locked} is not writable"
    assert not out.exists() and _leftovers(locked) == []


def test_a_folder_given_as_the_output_file_is_named_even_with_force(inputs, tmp_path):
    folder = tmp_path / "existing"
    folder.mkdir()
    for extra in ([], ["--force"]):
        line = assert_one_line_error(
            invoke("compress", inputs["pt"], "--config", inputs["config"], "-o", folder, *extra),
            codes=(2,),
        )
        assert line == f"sparq: error: {folder}: is a directory"


def _disk_full_writers(patch: pytest.MonkeyPatch) -> None:
    """Makes the file writers write a little, then fail as on a full disk."""
    import safetensors

    def serialize_file(tensors: Any, filename: str, metadata: Any = None) -> None:
        Path(filename).write_bytes(b"x" * 100)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def save(obj: Any, file: Any, *args: Any, **kwargs: Any) -> None:
        file.write(b"x" * 100)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    patch.setattr(safetensors, "serialize_file", serialize_file)
    patch.setattr(torch, "save", save)


@pytest.mark.parametrize(
    ("failure", "code"),
    [("replace", errno.EXDEV), ("fsync", errno.EIO), ("disk-full", errno.ENOSPC)],
)
def test_write_errors_leave_nothing_behind(inputs, tmp_path, monkeypatch, failure, code):
    """Failures simulated in-process (the tmpfs tests below need mount): exit 1, the output's
    path and the reason in the message, no output and no temporary file."""
    folder = tmp_path / "out"
    folder.mkdir()

    def failing(*args: Any, **kwargs: Any) -> None:
        raise OSError(code, os.strerror(code))

    config = inputs["config"]
    for command, output in (
        (("compress", inputs["pt"], "--config", config, "-o", folder / "o.sparq.safetensors"),
         folder / "o.sparq.safetensors"),
        (("compress", inputs["pt"], "--config", config, "--format", "torch-ao", "--out-dir", folder),
         folder / "model.torchao.pt"),
        (("decompress", inputs["sparq"], "-o", folder / "d.pt"), folder / "d.pt"),
        (("decompress", inputs["sparq"], "-o", folder / "d.safetensors"), folder / "d.safetensors"),
    ):  # fmt: skip
        with monkeypatch.context() as patch:
            if failure == "disk-full":
                _disk_full_writers(patch)
            else:
                patch.setattr(os, failure, failing)
                if failure == "replace":  # an output put where nothing is: a hard link
                    patch.setattr(os, "link", failing)
            result = invoke(*command)
        line = assert_one_line_error(result, codes=(1,))
        assert line.startswith(f"sparq: error: {output}: cannot write: "), line
        assert os.strerror(code) in line, line
        assert _leftovers(folder) == []


def _mount_tmpfs(folder: Path, options: str) -> None:
    folder.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")


@pytest.fixture
def tmpfs(tmp_path: Path):
    mounted: list[Path] = []

    def mount(name: str, options: str) -> Path:
        folder = tmp_path / name
        _mount_tmpfs(folder, options)
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", str(folder)], capture_output=True)


def _big_input(folder: Path) -> Path:
    """A checkpoint whose level-0 output (~130 KB) does not fit a 96 KB tmpfs."""
    source = folder / "big.pt"
    torch.save(
        {"emb.weight": torch.randn(2000, 64, generator=torch.Generator().manual_seed(2))}, source
    )
    return source


def test_full_disk(tmp_path, tmpfs):
    source = _big_input(tmp_path)
    config = tmp_path / "cfg.yaml"
    config.write_text(CONFIG)
    full = tmpfs("full", "size=96k")
    out = full / "big.sparq.safetensors"
    # A small previous output fits; the new, larger one does not and must not replace it.
    result = invoke(
        "compress",
        source,
        "--config",
        config,
        "-o",
        out,
        "-q",
        "--set",
        "sparsity.level=0.97",
        "--set",
        "quantization.bits=2",
    )
    assert result.exit_code == 0, result.output
    previous = out.read_bytes()
    for command, output in (
        (
            (
                "compress",
                source,
                "--config",
                config,
                "-o",
                out,
                "--force",
                "--set",
                "sparsity.level=0",
            ),
            out,
        ),
        (
            ("compress", source, "--config", config, "--out-dir", full, "--format", "torch-ao"),
            full / "big.torchao.pt",
        ),
        (("decompress", out, "-o", full / "dense.safetensors"), full / "dense.safetensors"),
        (("decompress", out, "-o", full / "dense.pt"), full / "dense.pt"),
    ):
        line = assert_one_line_error(invoke(*command), codes=(1,))
        assert str(output) in line and "No space left on device" in line, line
        assert _leftovers(full) == ["big.sparq.safetensors"]
        assert out.read_bytes() == previous


def test_full_disk_with_the_installed_sparq(tmp_path, tmpfs):
    source = _big_input(tmp_path)
    config = tmp_path / "cfg.yaml"
    config.write_text(CONFIG)
    full = tmpfs("full", "size=64k")
    done = run_sparq(
        "compress", source, "--config", config, "--out-dir", full, "--set", "sparsity.level=0"
    )
    assert done.returncode == 1, done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert str(full / "big.sparq.safetensors") in done.stderr
    assert _leftovers(full) == []


def test_read_only_folder(inputs, tmp_path, tmpfs):
    read_only = tmpfs("ro", "ro,size=64k")
    for command, output in (
        (
            ("compress", inputs["pt"], "--config", inputs["config"], "--out-dir", read_only),
            read_only / "model.sparq.safetensors",
        ),
        (
            ("decompress", inputs["sparq"], "-o", read_only / "d.safetensors"),
            read_only / "d.safetensors",
        ),
    ):
        # refused before any work (exit 2), as a folder that does not exist is
        line = assert_one_line_error(invoke(*command), codes=(2,))
        assert line == f"sparq: error: {output}: cannot write: folder {read_only} is not writable"
    assert _leftovers(read_only) == []


def test_report_on_a_full_disk_leaves_no_temporary_file(inputs, tmp_path, tmpfs):
    full = tmpfs("tiny", "size=64k")
    descriptor = os.open(full / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        while os.write(descriptor, b"x" * 4096):
            pass
    except OSError as error:
        assert error.errno == errno.ENOSPC
    finally:
        os.close(descriptor)
    report = full / "report.json"
    out = tmp_path / "o.sparq.safetensors"
    result = invoke(
        "compress", inputs["pt"], "--config", inputs["config"], "-o", out, "--report", report, "-q"
    )
    line = assert_one_line_error(result, codes=(1,))
    assert str(report) in line
    assert [name for name in _leftovers(full) if name != "filler"] == []


# --- reproducible outputs ---------------------------------------------------------------------


def test_same_input_and_config_give_the_same_bytes(inputs, tmp_path):
    """.pt and .safetensors inputs, both orders, sparq and torch-ao outputs: compressed twice,
    from other folders (other absolute paths) and a moment later, the bytes are the same."""
    cases = [
        (kind, order, output_format)
        for kind in ("pt", "safetensors")
        for order in ("sparsify-first", "quantize-first")
        for output_format in ("sparq", "torch-ao")
    ]
    digests: dict[tuple[str, str, str], set[str]] = {case: set() for case in cases}
    for run in range(2):
        if run:
            time.sleep(1.1)  # a timestamp in a file would now differ
        for index, (kind, order, output_format) in enumerate(cases):
            folder = tmp_path / f"run{run}" / ("deeper" * run) / str(index)
            folder.mkdir(parents=True)
            source = folder / inputs[kind].name
            shutil.copy(inputs[kind], source)
            result = invoke(
                "compress", source, "--config", inputs["config"], "--order", order,
                "--format", output_format, "-q",
            )  # fmt: skip
            assert result.exit_code == 0, result.output
            [output] = [p for p in folder.iterdir() if p != source]
            data = output.read_bytes()
            assert str(tmp_path).encode() not in data
            digests[(kind, order, output_format)].add(hashlib.sha256(data).hexdigest())
    for case, found in digests.items():
        assert len(found) == 1, case


def _engine_results(table: torch.Tensor, threads: int) -> dict[str, Any]:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        results = {}
        for order in ("sparsify-first", "quantize-first"):
            compressed, stats = compress_table(table, order, Sparsity(0.5, (1, 4)), Quantization(4))
            results[order] = (compressed, stats.to_dict())
        return results
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("shape", [(40_000, 8), (2, 70_000)], ids=["many-rows", "wide-rows"])
def test_engine_results_do_not_depend_on_the_thread_count(shape):
    """Sums over 32768+ values used to be split across threads (different rel_error bits)."""
    table = torch.randn(*shape, generator=torch.Generator().manual_seed(3)) * 2
    one, two = _engine_results(table, 1), _engine_results(table, 2)
    for order in one:
        (a, stats_a), (b, stats_b) = one[order], two[order]
        assert stats_a == stats_b, order
        for part in ("codes", "scale", "zero_point", "keep_mask"):
            assert torch.equal(getattr(a, part), getattr(b, part)), (order, part)


def test_installed_sparq_gives_the_same_bytes_with_one_and_two_threads(tmp_path):
    source = tmp_path / "wide.safetensors"
    save_file(
        {"emb.weight": torch.randn(40_000, 8, generator=torch.Generator().manual_seed(4))},
        str(source),
    )
    config = tmp_path / "cfg.yaml"
    config.write_text(CONFIG)
    digests = []
    for threads in ("1", "2"):
        out = tmp_path / f"t{threads}.sparq.safetensors"
        env = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
        done = run_sparq("compress", source, "--config", config, "-o", out, "-q", env=env)
        assert done.returncode == 0, done.stderr
        digests.append(sha256(out))
    assert digests[0] == digests[1]


@pytest.mark.parametrize("order", ["sparsify-first", "quantize-first"])
@pytest.mark.parametrize(
    "sparsity",
    [
        Sparsity(0.6, (1, 4)),
        Sparsity(0.5, (2, 3), zeros_per_block=4),
        Sparsity(0.7, (1, 1), norm="L2"),
        Sparsity(0.0, (1, 4)),
    ],
    ids=["1x4", "2x3-partial", "1x1-L2", "no-pruning"],
)
@pytest.mark.parametrize("held", [True, False], ids=["scores-held", "scores-recomputed"])
def test_engine_results_do_not_depend_on_the_chunk_workers(order, sparsity, held):
    """Many chunks, many tied scores (values on a 1/4 grid), a zero row; 1, 2, 3 and 5 chunk
    workers and torch's own threads all give the same codes, qparams, mask and statistics."""
    from sparqcli.engine.pipeline import compress_rows

    table = (torch.randn(3001, 37, generator=torch.Generator().manual_seed(5)) * 4).round() / 4
    table[5] = 0.0
    results = []
    for threads in (None, 1, 2, 3, 5):
        compressed, stats = compress_rows(
            lambda start, stop: table[start:stop],
            (3001, 37),
            torch.float32,
            order,
            sparsity,
            Quantization(4),
            chunk_rows=64,
            score_budget_bytes=None if held else 0,
            threads=threads,
        )
        results.append((compressed, stats.to_dict()))
    (first, first_stats), *others = results
    for compressed, stats in others:
        assert stats == first_stats
        for part in ("codes", "scale", "zero_point", "keep_mask"):
            a, b = getattr(first, part), getattr(compressed, part)
            assert (a is None and b is None) or torch.equal(a, b), part


def test_chunk_workers_raise_the_first_bad_row_in_table_order():
    from sparqcli.engine.pipeline import compress_rows

    table = torch.randn(5000, 8, generator=torch.Generator().manual_seed(6))
    table[4321, 1] = float("inf")
    table[1234, 7] = float("nan")  # the first in row order, in a later task than some others
    for order in ("sparsify-first", "quantize-first"):
        for level in (0.0, 0.5):
            with pytest.raises(TableError, match=r"^t: row 1234 holds NaN or Inf values$"):
                compress_rows(
                    lambda start, stop: table[start:stop],
                    (5000, 8),
                    torch.float32,
                    order,
                    Sparsity(level, (1, 4)),
                    Quantization(8),
                    chunk_rows=16,
                    threads=4,
                    name="t",
                )


def _concurrency_input(tmp_path: Path) -> tuple[Path, Path]:
    source = tmp_path / "many-chunks.safetensors"
    table = torch.randn(70_000, 16, generator=torch.Generator().manual_seed(7))
    table[100:200] = table[100:200].round()  # tied block scores
    save_file({"emb.weight": table}, str(source))
    config = tmp_path / "cfg.yaml"
    config.write_text(CONFIG)
    return source, config


def test_installed_sparq_gives_the_same_bytes_with_any_thread_count(tmp_path):
    source, config = _concurrency_input(tmp_path)
    runs = {
        "--threads 1": (["--threads", "1"], {}),
        "--threads 2": (["--threads", "2"], {}),
        "--threads 5": (["--threads", "5"], {}),
        "SPARQ_NUM_THREADS=3": ([], {"SPARQ_NUM_THREADS": "3"}),
        "OMP_NUM_THREADS=1": ([], {"OMP_NUM_THREADS": "1"}),
        "taskset -c 0": ([], {}),
    }
    digests = {}
    for index, (name, (options, env)) in enumerate(runs.items()):
        out = tmp_path / f"run{index}.sparq.safetensors"
        report = tmp_path / f"run{index}.json"
        args = ["compress", source, "--config", config, "-o", out, "-q", "--report", report]
        if name.startswith("taskset"):
            if shutil.which("taskset") is None:
                continue
            done = subprocess.run(
                ["taskset", "-c", "0", str(SPARQ), *map(str, args)],
                capture_output=True,
                text=True,
                timeout=120,
            )
        else:
            done = run_sparq(*args, *options, env=env)
        assert done.returncode == 0, (name, done.stderr)
        digests[name] = sha256(out)
        threads = json.loads(report.read_text())["threads"]
        expected = {"--threads 5": 5, "SPARQ_NUM_THREADS=3": 3, "taskset -c 0": 1}
        assert threads == expected.get(name, threads), name
    assert len(set(digests.values())) == 1, digests


def test_concurrent_runs_give_the_same_bytes(tmp_path):
    """Four jobs at once on this machine's CPUs (each with its default thread count)."""
    source, config = _concurrency_input(tmp_path)
    outputs = [tmp_path / f"job{index}.sparq.safetensors" for index in range(4)]
    jobs = [
        subprocess.Popen(
            [str(SPARQ), "compress", str(source), "--config", str(config), "-o", str(out), "-q"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for out in outputs
    ]
    for job in jobs:
        _, stderr = job.communicate(timeout=300)
        assert job.returncode == 0, stderr
    serial = tmp_path / "serial.sparq.safetensors"
    done = run_sparq("compress", source, "--config", config, "-o", serial, "-q", "--threads", "1")
    assert done.returncode == 0, done.stderr
    assert {sha256(out) for out in outputs} == {sha256(serial)}


def test_bad_thread_counts_are_one_line_usage_errors(inputs, tmp_path):
    args = ["compress", inputs["safetensors"], "--config", inputs["config"], "-o", tmp_path / "o"]
    result = invoke(*args, "--threads", "0")
    assert result.exit_code == 2
    assert "--threads" in result.output
    done = run_sparq(*args, env={"SPARQ_NUM_THREADS": "lots"})
    assert done.returncode == 2
    assert done.stderr.strip() == (
        "sparq: error: SPARQ_NUM_THREADS: must be a positive integer, got 'lots'"
    )
    from sparqcli.compression import compress

    with pytest.raises(UsageError, match=r"^threads: must be a positive integer, got 0$"):
        compress(inputs["safetensors"], inputs["config"], threads=0, dry_run=True)


# --- no silent drift --------------------------------------------------------------------------


def test_compressing_a_compressed_file_is_refused(inputs, tmp_path):
    copy = tmp_path / "again.safetensors"  # the name does not matter: the metadata does
    shutil.copy(inputs["sparq"], copy)
    for source in (inputs["sparq"], copy):
        result = invoke(
            "compress", source, "--config", inputs["config"], "-o", tmp_path / "x.sparq.safetensors"
        )
        line = assert_one_line_error(result, codes=(2,))
        assert (
            line
            == f"sparq: error: {source}: is already compressed by sparq; compress the original checkpoint"
        )
        result = invoke("compress", source, "--config", inputs["config"], "--dry-run")
        assert_one_line_error(result, codes=(2,))
    assert not (tmp_path / "x.sparq.safetensors").exists()


def test_compressing_a_torch_ao_output_is_refused(inputs, tmp_path):
    result = invoke(
        "compress",
        inputs["pt"],
        "--config",
        inputs["config"],
        "--format",
        "torch-ao",
        "--out-dir",
        tmp_path,
        "-q",
    )
    assert result.exit_code == 0, result.output
    quantized = tmp_path / "model.torchao.pt"
    config = tmp_path / "all.yaml"
    config.write_text("version: 1\nmin_table_bytes: 0\nlayers: [{match: 're:.*emb.*'}]\n")
    line = assert_one_line_error(invoke("compress", quantized, "--config", config), codes=(2,))
    assert "not a 2-D floating tensor" in line and "quint8" in line
    # inspect lists its packed tables (it raised KeyError: 'quint8' before)
    result = invoke("inspect", quantized)
    assert result.exit_code == 0, result.output
    assert "quint8" in result.output and "Traceback" not in result.output


def test_a_tensor_a_sparq_file_cannot_hold_is_refused_before_any_work(tmp_path):
    model = tmp_path / "model.pt"
    torch.save(
        {"emb.weight": torch.randn(300, 64), "phase": torch.zeros(3, dtype=torch.complex128)}, model
    )
    config = tmp_path / "emb.yaml"
    config.write_text("version: 1\nmin_table_bytes: 0\nlayers: [{match: emb.weight}]\n")
    out = tmp_path / "model.sparq.safetensors"
    for extra in (["--dry-run"], []):
        line = assert_one_line_error(
            invoke("compress", model, "--config", config, "-o", out, *extra), codes=(2,)
        )
        assert line == (
            f"sparq: error: {out}: cannot write tensor 'phase' (shape [3], complex128) in a sparq "
            "file: safetensors holds dense tensors of standard dtypes; write the torch-ao format "
            "(.pt) or leave the tensor out of the checkpoint"
        )
    assert not out.exists()
    torch_ao = tmp_path / "model.torchao.pt"
    result = invoke("compress", model, "--config", config, "--format", "torch-ao", "-o", torch_ao)
    assert result.exit_code == 0, result.output
    assert torch.load(torch_ao, weights_only=True)["phase"].dtype == torch.complex128
    # in memory nothing is written: the result is made, its save says what it cannot write
    state = torch.load(model, weights_only=True)
    result = sparqcli.compress_state_dict(state, sparqcli.Config.from_yaml(config))
    assert torch.equal(result.decode()["phase"], state["phase"])
    with pytest.raises(OutputError, match="cannot write"):
        result.save(tmp_path / "memory.sparq.safetensors")
    assert not (tmp_path / "memory.sparq.safetensors").exists()


def test_a_sparse_table_is_named_not_compressed(tmp_path):
    model = tmp_path / "sparse.pt"
    torch.save({"emb.weight": torch.eye(300, 64).to_sparse()}, model)
    config = tmp_path / "emb.yaml"
    config.write_text("version: 1\nlayers: [{match: emb.weight}]\n")
    line = assert_one_line_error(invoke("compress", model, "--config", config), codes=(2,))
    assert line == (
        f"sparq: error: {model}: layers[0] (match 'emb.weight') matches 'emb.weight', which is "
        "not a dense 2-D floating tensor (shape [300, 64], float32, sparse_coo)"
    )


@pytest.mark.parametrize(
    ("config_text", "expected"),
    [
        ("version: 1\nlayers: [{match: emb}]\nexclude: ['emb*']\n", "the config selects no table"),
        ("version: 1\nlayers: [{match: nothing_here}]\n", "matches no tensor"),
        ("version: 1\nlayers: [{match: 're:^$|x{0}zzz'}]\n", "matches no tensor"),
    ],
)
def test_a_config_that_selects_nothing_is_an_error(inputs, tmp_path, config_text, expected):
    config = tmp_path / "none.yaml"
    config.write_text(config_text)
    for extra in ((), ("--dry-run",)):
        result = invoke("compress", inputs["pt"], "--config", config, "--out-dir", tmp_path, *extra)
        line = assert_one_line_error(result, codes=(2,))
        assert expected in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["none.yaml"]


def _with_table_entry(sparq_file: Path, path: Path, **change: Any) -> Path:
    from sparqcli.format import save_safetensors

    with safe_open(str(sparq_file), framework="pt") as handle:
        stored = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
        document = json.loads(handle.metadata()["sparq"])
    document["tables"]["emb.weight"].update(change)
    save_safetensors(path, stored, {"sparq": json.dumps(document)})
    return path


@pytest.mark.parametrize("value", ["", [1], {"a": 1}, True])
def test_a_statistic_that_is_not_a_number_is_a_format_error(inputs, tmp_path, value):
    """Found by fuzzing: `"rel_error": ""` in the metadata crashed `sparq inspect`."""
    stats = {"pruned_fraction": 0.5, "rel_error": value}
    path = _with_table_entry(inputs["sparq"], tmp_path / "s.sparq.safetensors", stats=stats)
    for command in (("inspect", path), ("inspect", path, "--json")):
        line = assert_one_line_error(invoke(*command), codes=(1,))
        assert "stats.rel_error must be a number or null" in line


def test_null_statistics_are_shown_as_dashes(inputs, tmp_path):
    stats = {"pruned_fraction": None, "rel_error": None}
    path = _with_table_entry(inputs["sparq"], tmp_path / "s.sparq.safetensors", stats=stats)
    result = invoke("inspect", path)
    assert result.exit_code == 0, result.output
    assert "emb.weight" in result.stdout


def test_a_zip_bomb_checkpoint_is_refused_before_inflating(inputs, tmp_path):
    """A .pt zip whose pickle record inflates 1000x used to be inflated whole in memory."""
    import zipfile

    source = zipfile.ZipFile(inputs["pt"])
    bomb = tmp_path / "bomb.pt"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as out:
        for record in source.infolist():
            data = source.read(record.filename)
            if record.filename.endswith("data.pkl"):
                with out.open(record.filename, "w", force_zip64=True) as member:
                    member.write(data)
                    zeros = bytes(1 << 20)
                    for _ in range(256):
                        member.write(zeros)
            else:
                out.writestr(record.filename, data)
    assert bomb.stat().st_size < 2 << 20
    for command in (("inspect", bomb), ("compress", bomb, "--config", inputs["config"])):
        line = assert_one_line_error(invoke(*command), codes=(1,))
        assert "refusing a zip bomb" in line


def test_a_megabyte_long_key_is_refused_instead_of_backtracking_for_hours(tmp_path):
    """The shipped default rule is a regex; against a crafted 1 MB key it ran for hours."""
    config = Path(__file__).parent.parent / "configs" / "default.yaml"
    long_key = "emb" * 340_000 + ".1.weight"
    for name, state in (
        ("long.safetensors", {long_key: torch.zeros(2, 2)}),
        ("long.pt", {"emb.weight": torch.zeros(2, 2), long_key: torch.zeros(2, 2)}),
    ):
        path = tmp_path / name
        if name.endswith(".pt"):
            torch.save(state, path)
        else:
            save_file(state, str(path))
        for command in (("compress", path, "--config", config), ("inspect", path)):
            started = time.perf_counter()
            line = assert_one_line_error(invoke(*command), codes=(1,))
            assert time.perf_counter() - started < 10
            assert "characters long (at most 1024)" in line and len(line) < 300
    fine = tmp_path / "fine.safetensors"
    # 64 KiB: the default rule's min_table_bytes would leave a smaller table dense
    save_file({"emb" * 300 + ".weight": torch.ones(4096, 4)}, str(fine))
    assert invoke("compress", fine, "--config", config, "-q").exit_code == 0


@pytest.mark.parametrize("value", [{}, [], ["float32"], None, 7])
def test_a_table_dtype_that_is_not_a_string_is_a_format_error(inputs, tmp_path, value):
    """Found by fuzzing: `"dtype": {}` in the metadata raised TypeError (unhashable)."""
    path = _with_table_entry(inputs["sparq"], tmp_path / "d.sparq.safetensors", dtype=value)
    dense = tmp_path / "dense.safetensors"
    for command in (
        ("inspect", path),
        ("inspect", path, "--json"),
        ("decompress", path, "-o", dense),
    ):
        line = assert_one_line_error(invoke(*command), codes=(1,))
        assert "dtype must be one of float32" in line
    assert not dense.exists()


@pytest.mark.parametrize(
    ("row", "scale_dtype", "expected"),
    [
        ([3e38, -3e38, 1.0, 2.0], "float32", "row 5: value range overflows float32"),
        ([1e9, -1e9, 1.0, 2.0], "float16", "row 5: scale does not fit float16"),
    ],
)
def test_finite_values_whose_range_cannot_be_stored_name_file_table_and_row(
    tmp_path, row, scale_dtype, expected
):
    """Never a file of inf/NaN scales: the range of row 5 overflows what the scale can hold."""
    table = torch.randn(8, 4, generator=torch.Generator().manual_seed(5))
    table[5] = torch.tensor(row)
    source = tmp_path / "model.pt"
    torch.save({"emb.weight": table}, source)
    config = tmp_path / "cfg.yaml"
    config.write_text(CONFIG)
    out = tmp_path / "o.sparq.safetensors"
    for order in ("sparsify-first", "quantize-first"):
        result = invoke(
            "compress", source, "--config", config, "-o", out, "--order", order,
            "--set", f"quantization.scale_dtype={scale_dtype}",
        )  # fmt: skip
        line = assert_one_line_error(result, codes=(1,))
        assert line.startswith(f"sparq: error: {source}: emb.weight: {expected}"), line
        assert not out.exists()
