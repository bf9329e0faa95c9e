"""Writing outputs safely: atomic renames, failures that leave nothing, output path checks."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sparqcli.errors import OutputError, UsageError
from sparqcli.sinks import atomic_output, check_output_path


def test_atomic_output_renames_on_success_and_cleans_up_on_failure(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"previous")
    with pytest.raises(RuntimeError), atomic_output(target) as temp:
        temp.write_bytes(b"half")
        raise RuntimeError("boom")
    assert target.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]
    with atomic_output(target) as temp:
        temp.write_bytes(b"new")
    assert target.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]
    assert oct(target.stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def test_without_replace_a_file_that_appeared_meanwhile_is_kept(tmp_path, monkeypatch):
    # Another job wrote the output after this one checked the path: a rename would replace it.
    target = tmp_path / "out.bin"
    with (
        pytest.raises(OutputError, match=r"^.*out\.bin: cannot write: it already exists$"),
        atomic_output(target, replace=False) as temp,
    ):
        temp.write_bytes(b"mine")
        target.write_bytes(b"theirs")
    assert target.read_bytes() == b"theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]
    fresh = tmp_path / "fresh.bin"
    with atomic_output(fresh, replace=False) as temp:
        temp.write_bytes(b"mine")
    assert fresh.read_bytes() == b"mine" and fresh.stat().st_nlink == 1
    assert oct(fresh.stat().st_mode & 0o777) == oct(0o666 & ~_umask())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh.bin", "out.bin"]
    # Where the file system has no hard links: checked, then renamed.
    monkeypatch.setattr(os, "link", _no_links)
    other = tmp_path / "other.bin"
    with atomic_output(other, replace=False) as temp:
        temp.write_bytes(b"mine")
    assert other.read_bytes() == b"mine"
    with pytest.raises(OutputError, match="already exists"), atomic_output(other, replace=False):
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh.bin", "other.bin", "out.bin"]


def _no_links(source: object, target: object) -> None:
    raise PermissionError(1, "Operation not permitted")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_atomic_output_write_failure_is_an_output_error(tmp_path):
    target = tmp_path / "out.bin"
    with (
        pytest.raises(OutputError, match=r"out\.bin: cannot write: No space left on device$"),
        atomic_output(target),
    ):
        raise OSError(28, "No space left on device")
    assert list(tmp_path.iterdir()) == []
    with (
        pytest.raises(OutputError, match=r"cannot write: folder .*missing does not exist$"),
        atomic_output(tmp_path / "missing" / "x"),
    ):
        pass


def test_output_path_checks(tmp_path):
    source = tmp_path / "model.pt"
    source.write_bytes(b"x")
    with pytest.raises(
        UsageError, match=r"model\.pt: is an input; sparq never overwrites its input$"
    ):
        check_output_path(source, [source], force=True)
    existing = tmp_path / "out.safetensors"
    existing.write_bytes(b"x")
    with pytest.raises(
        UsageError, match=r"out\.safetensors: already exists; pass force=True to replace it$"
    ):
        check_output_path(existing, [source], force=False)
    check_output_path(existing, [source], force=True)


@pytest.mark.parametrize("name", [".", "..", "sub/.."])
def test_an_output_folder_needs_a_name(tmp_path, monkeypatch, name):
    from sparqcli.sinks import check_output_folder

    (tmp_path / "sub").mkdir()
    (tmp_path / "model.safetensors").write_bytes(b"")
    monkeypatch.chdir(tmp_path / "sub")
    with pytest.raises(UsageError, match=r": name the output folder \(the current or a parent"):
        check_output_folder(Path(name), [], force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors", "sub"]


def test_outputs_inside_an_input_folder(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"x")
    # a report or a config beside the model's files replaces nothing
    check_output_path(folder / "report.json", [folder], force=False)
    # replacing an input's file (even with force), or adding a checkpoint file, is refused
    for name in ("model.safetensors", "new.sparq.safetensors", "x.pt", ".metadata"):
        with pytest.raises(UsageError, match=f"{name}: lies inside the input folder"):
            check_output_path(folder / name, [folder], force=True)


def test_partial_outputs_name_what_the_user_asked_for(tmp_path):
    from sparqcli.sinks import atomic_folder, atomic_output, partial_outputs

    with (
        atomic_folder(tmp_path / "out") as temp,
        atomic_output(temp / "shard.safetensors"),
        atomic_output(tmp_path / "report.json"),
    ):
        assert partial_outputs() == [tmp_path / "out", tmp_path / "report.json"]
    assert partial_outputs() == []


def test_a_new_partial_folder_is_registered_from_the_moment_it_exists(tmp_path, monkeypatch):
    # A distributed run's rank 0 makes the output's folder before the other ranks hear of it:
    # an interrupt in between must find it registered (and remove it).
    from sparqcli import sinks

    made = []
    real = sinks.tempfile.mkdtemp

    def mkdtemp(**options: object) -> str:
        made.append(real(**options))
        assert sinks._PARTIAL == {}  # not yet: registered with signals held, right after
        return made[-1]

    monkeypatch.setattr(sinks.tempfile, "mkdtemp", mkdtemp)
    output = tmp_path / "model.sparq"
    with sinks.new_partial_folder(output) as folder:
        assert [str(folder)] == made and {folder: output} == sinks._PARTIAL
        assert oct(folder.stat().st_mode & 0o777) == oct(0o777 & ~_umask())
        assert folder.parent == tmp_path and folder.name.startswith(".model.sparq.")
        assert sinks.discard_partial_outputs() == [folder]
    assert sinks._PARTIAL == {} and not folder.exists()
