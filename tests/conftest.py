"""Shared fixtures and helpers: tiny checkpoints and configs built in tmp_path, the CLI runner
and its outcome checks, and the torch.ao oracle's import."""

from __future__ import annotations

import hashlib
import importlib
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

import sparqcli
from sparqcli.cli import app


def import_oracle(name: str) -> ModuleType:
    """Returns torch.ao module `name`, the test oracle. Missing, it fails the run in CI
    (`CI` set: parity would otherwise pass untested) and skips the module elsewhere."""
    try:
        return importlib.import_module(name)
    except ImportError:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"the torch.ao oracle {name} is not importable", allow_module_level=True)


def make_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Returns a small recommender-like state dict: two tables and a projection."""
    generator = torch.Generator().manual_seed(seed)
    return {
        "emb.weight": torch.randn(64, 16, generator=generator),
        "bags.0.weight": torch.randn(40, 8, generator=generator),
        "proj.weight": torch.randn(4, 24, generator=generator),
        "proj.bias": torch.randn(4, generator=generator),
    }


@pytest.fixture(scope="session", autouse=True)
def _mse_kernel_built_first() -> None:
    # Built (or found in the cache) before any test: a first build inside a CLI test would add
    # its "sparq: compiling the ... kernel" notice to that test's output.
    from sparqcli.engine.quantize import MSE_KERNEL

    MSE_KERNEL.load()


@pytest.fixture
def state() -> dict[str, torch.Tensor]:
    return make_state()


@pytest.fixture
def checkpoint(tmp_path: Path, state: dict[str, torch.Tensor]) -> Path:
    path = tmp_path / "model.pt"
    torch.save(state, path)
    return path


CONFIG_TEXT = """\
version: 1
order: sparsify-first
sparsity: {level: 0.5, block_shape: [1, 4]}
quantization: {bits: 8}
min_table_bytes: 0               # the fixture's tables are tiny; compress them all the same
layers:
  - match: emb
  - match: "bags.*"
    quantization: {bits: 4}
"""


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(CONFIG_TEXT)
    return path


# --- the command line, as the reliability, fuzz and signal tests drive it --------------------

SPARQ = Path(sys.executable).with_name("sparq")
runner = CliRunner()

CONFIG = """\
version: 1
sparsity: {level: 0.5, block_shape: [1, 4]}
quantization: {bits: 8}
layers:
  - match: emb
"""


# --- shared helpers ---------------------------------------------------------------------------


def invoke(*args: object) -> Any:
    """Runs the CLI in-process; exceptions that escape the error mapping land in `.exception`."""
    return runner.invoke(app, [str(arg) for arg in args])


def assert_one_line_error(result: Any, codes: tuple[int, ...] = (1, 2)) -> str:
    """Asserts a clean failure: an exit code in `codes`, one `sparq: error: ` line, no traceback."""
    escaped = result.exception is not None and not isinstance(result.exception, SystemExit)
    assert not escaped, f"escaped the error mapping: {result.exception!r}"
    assert result.exit_code in codes, (result.exit_code, result.output)
    assert "Traceback" not in result.output
    stderr = result.stderr
    assert stderr.startswith("sparq: error: ") and stderr.count("\n") == 1, repr(stderr)
    return stderr.rstrip("\n")


def check_outcome(result: Any, command: str, output: Path | None = None) -> None:
    """Asserts exit 0 with a valid output, or a clean one-line failure (exit 1 or 2).

    `command` is the sparq subcommand run; `output` is the file it was asked to write.
    """
    escaped = result.exception is not None and not isinstance(result.exception, SystemExit)
    assert not escaped, f"escaped the error mapping: {result.exception!r}"
    assert "Traceback" not in result.output
    if result.exit_code != 0:
        assert_one_line_error(result)
        if output is not None:
            assert not output.exists(), f"{output} written by a failed run"
            assert not list(output.parent.glob(f".{output.name}.*.tmp")), "temporary file left"
        return
    assert result.stderr == "", repr(result.stderr)
    if command == "compress":
        assert output is not None and output.exists()
        loaded = sparqcli.load(output)
        assert loaded, "empty output"
        for value in loaded.values():
            assert isinstance(value, torch.Tensor)
    elif command == "decompress":
        assert output is not None and output.exists()
        with safe_open(str(output), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118
                handle.get_tensor(key)
    elif command in ("inspect", "validate"):
        assert result.stdout.strip()


def make_table_state(rows: int = 64, cols: int = 16, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "emb.weight": torch.randn(rows, cols, generator=generator),
        "proj.weight": torch.randn(4, 8, generator=generator),
        "proj.bias": torch.randn(4, generator=generator),
        "step": torch.tensor(3),
    }


def write_inputs(folder: Path) -> dict[str, Path]:
    """Writes one valid file of each kind into `folder`: config, .pt (zip and legacy),
    .safetensors and a compressed sparq file."""
    folder.mkdir(parents=True, exist_ok=True)
    state = make_table_state()
    paths = {
        "config": folder / "cfg.yaml",
        "pt": folder / "model.pt",
        "legacy": folder / "legacy.pt",
        "safetensors": folder / "model.safetensors",
        "sparq": folder / "model.sparq.safetensors",
    }
    paths["config"].write_text(CONFIG)
    torch.save(state, paths["pt"])
    torch.save(state, paths["legacy"], _use_new_zipfile_serialization=False)
    save_file(state, str(paths["safetensors"]))
    result = invoke("compress", paths["pt"], "--config", paths["config"], "-q")
    assert result.exit_code == 0, result.output
    return paths


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
