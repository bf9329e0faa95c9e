"""Compiled kernels: the build, its cache name, the switch and the one warning on failure."""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
import time
import warnings

import pytest

from sparqcli import native
from sparqcli.native import Kernel, KernelWarning, cache_dir


def test_a_kernel_that_cannot_build_warns_once_and_returns_none(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARQ_KERNEL_CACHE", str(tmp_path))
    broken = Kernel(
        "sparq_broken", "#error this source does not compile\n", "broken", "tests", "SPARQ_X"
    )
    with pytest.warns(
        KernelWarning,
        match=r"^the compiled broken kernel is not available \(.*\); tests use tensor ops",
    ):
        assert broken.load() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert broken.load() is None  # no second build, no second warning


def test_the_switch_turns_a_kernel_off_silently(monkeypatch):
    monkeypatch.setenv("SPARQ_X", "off")
    kernel = Kernel("sparq_never", "int main() {}\n", "never", "tests", "SPARQ_X")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert kernel.load() is None
    assert not kernel.enabled()


def test_build_names_follow_the_source_and_the_cache_follows_the_environment(monkeypatch):
    first = Kernel("sparq_a", "int f() { return 1; }\n", "a", "tests", "SPARQ_X")
    second = Kernel("sparq_a", "int f() { return 2; }\n", "a", "tests", "SPARQ_X")
    assert first.build_name() != second.build_name()
    assert first.build_name() == Kernel("sparq_a", first.source, "b", "x", "Y").build_name()
    assert first.build_name().startswith("sparq_a_")
    monkeypatch.setenv("SPARQ_KERNEL_CACHE", "/some/where")
    assert str(cache_dir()) == "/some/where"
    monkeypatch.delenv("SPARQ_KERNEL_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", "/xdg")
    assert str(cache_dir()) == "/xdg/sparq/kernels"


def test_threads_asking_at_once_build_once(monkeypatch):
    kernel = Kernel("sparq_once", "int f();\n", "once", "tests", "SPARQ_X")
    builds = []
    started = threading.Barrier(4)

    def build() -> str:
        builds.append(1)
        time.sleep(0.2)  # the others arrive while this one builds
        return "module"

    monkeypatch.setattr(kernel, "_build", build)

    def ask(results: list[object]) -> None:
        started.wait()
        results.append(kernel.load())

    results: list[object] = []
    threads = [threading.Thread(target=ask, args=(results,)) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert builds == [1] and results == ["module"] * 4


def test_a_build_that_compiles_is_announced_once_cached_builds_are_not(
    tmp_path, monkeypatch, caplog
):
    from torch.utils import cpp_extension

    monkeypatch.setenv("SPARQ_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setattr(cpp_extension, "load_inline", lambda **options: "module")
    with caplog.at_level(logging.INFO, logger="sparqcli.native"):
        kernel = Kernel("sparq_new", "int f();\n", "test", "tests", "SPARQ_X")
        assert kernel.load() == "module"
        assert caplog.messages == [
            f"compiling the test kernel: first use, up to a minute; cached in {tmp_path} "
            "for later runs"
        ]
        name = kernel.build_name()
        (tmp_path / name / f"{name}.so").write_bytes(b"")  # what the build leaves behind
        monkeypatch.setattr(native, "_import_built", lambda name, library: "imported")
        assert Kernel("sparq_new", "int f();\n", "test", "tests", "SPARQ_X").load() == "imported"
        assert len(caplog.messages) == 1


def test_a_build_killed_while_it_held_the_locks_does_not_block_later_ones(tmp_path, monkeypatch):
    # A killed build leaves torch's lock file (load_inline would wait for it forever); its
    # flock dies with it.
    from torch.utils import cpp_extension

    monkeypatch.setenv("SPARQ_KERNEL_CACHE", str(tmp_path))
    kernel = Kernel("sparq_killed", "int f();\n", "test", "tests", "SPARQ_X")
    folder = tmp_path / kernel.build_name()
    folder.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD_LOCK, str(folder)], stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
    (folder / "lock").write_text("")  # torch's FileBaton, left behind
    holder.kill()
    holder.wait()
    seen = []

    def load_inline(**options: object) -> str:
        seen.append((folder / "lock").exists())
        return "module"

    monkeypatch.setattr(cpp_extension, "load_inline", load_inline)
    started = time.monotonic()
    assert kernel.load() == "module"
    assert seen == [False] and time.monotonic() - started < 10
    assert (folder / "built").exists()
    # Once marked, the library is imported without load_inline (and its lock).
    (folder / f"{kernel.build_name()}.so").write_bytes(b"")
    monkeypatch.setattr(native, "_import_built", lambda name, library: "imported")
    assert Kernel("sparq_killed", "int f();\n", "test", "tests", "SPARQ_X").load() == "imported"
    assert seen == [False]


_HOLD_LOCK = """
import sys, time
from pathlib import Path
from sparqcli.native import _build_lock
with _build_lock(Path(sys.argv[1])):
    print("locked", flush=True)
    time.sleep(60)
"""
