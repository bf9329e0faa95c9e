"""The compiled kernel's build, cache and fallback."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from sparqcli.nn import Embedding, KernelWarning, _kernel
from tests.nn.conftest import make_table


def test_failed_build_warns_once_and_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_kernel.LOOKUP_KERNEL, "_module", [])
    monkeypatch.setenv(_kernel.ENV_SWITCH, "on")

    def broken() -> None:
        raise RuntimeError("Error building extension\nc++: command not found")

    monkeypatch.setattr(_kernel.LOOKUP_KERNEL, "_build", broken)
    table = make_table(20, 8, level=0.5)
    module = Embedding.from_table(table)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = module(torch.arange(20))
        second = module(torch.arange(20))
    messages = [str(w.message) for w in caught if issubclass(w.category, KernelWarning)]
    assert len(messages) == 1
    assert "c++: command not found" in messages[0] and "\n" not in messages[0]
    assert torch.equal(first, table.decode()) and torch.equal(second, first)


def test_switch_off_is_silent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_kernel.LOOKUP_KERNEL, "_module", [])
    monkeypatch.setenv(_kernel.ENV_SWITCH, "off")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _kernel.kernel() is None


def test_cache_folder_and_name(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(_kernel.ENV_CACHE, str(tmp_path))
    assert _kernel.cache_dir() == tmp_path
    monkeypatch.delenv(_kernel.ENV_CACHE)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert _kernel.cache_dir() == tmp_path / "xdg" / "sparq" / "kernels"
    name = _kernel.LOOKUP_KERNEL.build_name()
    assert name.startswith("sparq_nn_") and name == _kernel.LOOKUP_KERNEL.build_name()


def test_importing_sparqcli_stays_torch_free() -> None:
    code = "import sys, sparqcli; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
