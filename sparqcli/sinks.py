"""Writing outputs safely: never over an input, never half a file or half a folder.

Every output is written to a temporary file in the target folder, flushed to disk and renamed
into place, so a reader sees either no file, the previous file, or the complete new one. A folder
output (`atomic_folder`) is built in a temporary folder beside its target and renamed into place
the same way. The temporaries being written are registered here (the one piece of process
state), so that whoever handles a signal can remove them before the process ends:
`discard_partial_outputs()`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from sparqcli.errors import InputError, OutputError, UsageError, first_line

_PARTIAL: dict[Path, Path] = {}
"""The temporaries being written, each with the output it becomes."""


def partial_outputs() -> list[Path]:
    """Returns the outputs being written now (those whose temporary exists), sorted; a file
    written inside a temporary folder is part of that folder's output."""
    temporaries = list(_PARTIAL)
    return sorted(
        {
            output
            for output in _PARTIAL.values()
            if not any(output.is_relative_to(temp) for temp in temporaries)
        }
    )


def discard_partial_outputs() -> list[Path]:
    """Removes every temporary output still being written; returns their paths.

    For a signal handler about to end the process: the outputs stay as they were before.
    """
    removed = sorted(_PARTIAL)
    for temp in removed:
        _remove_quietly(temp)
    return removed


def _exists_without_force(output: Path) -> UsageError:
    """Returns the error for an output that exists before the run, without `force`."""
    return UsageError(f"{output}: already exists; pass {{opt:force}} to replace it", path=output)


def _taken_meanwhile(output: Path) -> OutputError:
    """Returns the error for an output that another job wrote while this one ran."""
    return OutputError(f"{output}: cannot write: it already exists")


def check_output_path(output: Path, inputs: Sequence[Path], force: bool) -> None:
    """Checks that the file `output` may be written. Raises UsageError when it is an input or
    lies inside an input folder, is a folder, or exists (without `force`), or when its folder is
    missing or not writable."""
    _check_not_an_input(output, inputs)
    if output.is_dir():  # even with force: a folder is never replaced by a file
        raise UsageError(f"{output}: is a directory", path=output)
    if output.exists() and not force:
        raise _exists_without_force(output)
    check_parent_folder(output)


def _check_not_an_input(output: Path, inputs: Sequence[Path]) -> None:
    """Raises UsageError when the file `output` is one of `inputs` (the same file by any path),
    or lies inside one that is a folder and would replace a file there or add a checkpoint
    file to it (a shard, an index, a weight file: the folder would read differently). A new
    report or config beside a model's files is fine."""
    target = output.resolve()
    for source in inputs:
        same = output.exists() and source.exists() and os.path.samefile(output, source)
        if same or target == source.resolve():
            raise UsageError(
                f"{output}: is an input; sparq never overwrites its input", path=output
            )
        inside = source.is_dir() and target.is_relative_to(source.resolve())
        checkpoint_file = output.suffix.lower() in (*_WEIGHT_SUFFIXES, ".distcp")
        if inside and (output.exists() or checkpoint_file or output.name == ".metadata"):
            raise UsageError(
                f"{output}: lies inside the input folder {source}; write it elsewhere",
                path=output,
            )


def check_parent_folder(output: Path) -> None:
    """Raises UsageError when the folder that would hold `output` is missing or not writable."""
    folder = output.parent
    if not folder.is_dir():
        raise UsageError(f"{output}: cannot write: folder {folder} does not exist", path=output)
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"{output}: cannot write: folder {folder} is not writable", path=output)


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Holds SIGINT and SIGTERM in this thread for the block; they arrive right after it."""
    held = {signal.SIGINT, signal.SIGTERM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def check_report_path(
    path: Path, force: bool, inputs: Sequence[Path] = (), outputs: Sequence[Path] = ()
) -> None:
    """Checks that a report may be written to `path`. Raises UsageError when it is an input or
    lies inside an input folder, is one of the `outputs` or lies inside one, exists (without
    `force`), its folder does not, or the folder is not writable."""
    if not path.parent.is_dir():
        raise UsageError(
            f"{{opt:report}} {path}: folder {path.parent} does not exist",
            path=path,
            option="report",
        )
    target = path.resolve()
    for output in outputs:
        if target.is_relative_to(output.resolve()):  # the output itself, or inside it
            raise UsageError(
                f"{{opt:report}} {path}: is where the compressed output goes; write the report "
                "elsewhere",
                path=path,
                option="report",
            )
    check_output_path(path, inputs, force)


@contextlib.contextmanager
def atomic_output(path: str | Path, *, replace: bool = True) -> Iterator[Path]:
    """Yields a temporary path beside `path`; on success it is synced and renamed to `path`.

    Without `replace`, a file that appeared at `path` meanwhile (another job's) is kept and the
    write fails: the new file is linked in only where nothing is. On any failure, or an
    interrupt, the temporary file is removed and `path` is untouched. Raises OutputError when
    the folder is not writable, the write fails or (without `replace`) `path` exists.
    """
    path = Path(path)
    folder = path.parent
    if not folder.is_dir():
        raise OutputError(f"{path}: cannot write: folder {folder} does not exist")

    def make() -> Path:
        handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
        os.close(handle)
        return Path(name)

    with _temporary(path, make, lambda temp: _finish(temp, path, replace)) as temp:
        yield temp


@contextlib.contextmanager
def _temporary(
    path: Path, make: Callable[[], Path], finish: Callable[[Path], None]
) -> Iterator[Path]:
    """Yields the temporary file or folder `make()` creates beside `path`, registered for
    `discard_partial_outputs` before a signal can arrive; `finish(temp)` puts it in place.

    On any failure, or an interrupt, the temporary is removed. Raises OutputError naming `path`
    (not the temporary) when it cannot be made or a write fails.
    """
    try:
        with _signals_held():  # a temporary exists only once it is registered
            temp = make()
            _PARTIAL[temp] = path
    except OSError as error:
        raise OutputError(f"{path}: cannot write: {error.strerror}") from None
    try:
        yield temp
        finish(temp)
    except OSError as error:
        _remove_quietly(temp)
        raise OutputError(f"{path}: cannot write: {error.strerror or error}") from None
    except OutputError as error:
        # Writers name the file they were given; the user knows the output by its own name.
        _remove_quietly(temp)
        raise OutputError(str(error).replace(str(temp), str(path))) from None
    except BaseException:
        _remove_quietly(temp)
        raise
    finally:
        _PARTIAL.pop(temp, None)


def _finish(temp: Path, path: Path, replace: bool) -> None:
    os.chmod(temp, 0o666 & ~_umask())
    with open(temp, "rb+") as file:
        os.fsync(file.fileno())
    if replace:
        os.replace(temp, path)
    else:
        _link_new(temp, path)
    with contextlib.suppress(OSError):
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


def _link_new(temp: Path, path: Path) -> None:
    """Puts the file `temp` at `path` only where nothing is there (a hard link fails on an
    existing name, where a rename would replace it), then removes `temp`. Raises OutputError
    when `path` exists."""
    try:
        os.link(temp, path)
    except FileExistsError:
        raise _taken_meanwhile(path) from None
    except OSError:  # a file system without hard links: check, then rename
        if path.exists() or path.is_symlink():
            raise _taken_meanwhile(path) from None
        os.replace(temp, path)
        return
    _remove_quietly(temp)


def _umask() -> int:
    """Returns the process's umask (reading it sets it: it is set back at once)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _folder_beside(path: Path, suffix: str) -> Path:
    """Returns a new, hidden folder (mode 0o700) beside `path`, named after it, ending in
    `suffix`."""
    return Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent))


def _remove_quietly(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
        return
    with contextlib.suppress(OSError):
        path.unlink()


def check_output_folder(output: Path, inputs: list[Path], force: bool) -> None:
    """Checks that the folder `output` may be written.

    Raises UsageError when it is an input, holds one or lies inside one (replacing it could
    remove the input), when it exists without `force`, or when it exists and is not a folder
    or holds no model files (a folder of other files is never replaced).
    """
    if output.name in ("", ".", ".."):  # a folder is renamed into place: it needs a name
        raise UsageError(
            f"{output}: name the output folder (the current or a parent folder cannot be replaced)",
            path=output,
        )
    target = output.resolve()
    for source in inputs:
        origin = source.resolve()
        if target == origin or origin.is_relative_to(target):
            raise UsageError(
                f"{output}: is or holds an input; sparq never overwrites its input", path=output
            )
        if target.is_relative_to(origin):
            raise UsageError(
                f"{output}: lies inside the input folder {source}; write it elsewhere",
                path=output,
            )
    if output.exists() or output.is_symlink():
        if not force:
            raise _exists_without_force(output)
        if not output.is_dir() or output.is_symlink():
            raise UsageError(f"{output}: exists and is not a folder", path=output)
        check_replaceable_folder(output)
    check_parent_folder(output)


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def check_replaceable_folder(folder: Path) -> None:
    """Raises UsageError unless the existing `folder` is empty or a model folder (an index or
    weight files at its top level): a folder of other files is never replaced. A config.json
    alone does not make one (many projects have one)."""
    entries = list(folder.iterdir())
    model = not entries or any(
        entry.is_file()
        and (entry.name.endswith(".index.json") or entry.suffix.lower() in _WEIGHT_SUFFIXES)
        for entry in entries
    )
    if not model:
        raise UsageError(
            f"{folder}: holds no model files (no index, safetensors or torch files); sparq "
            "replaces only a model folder: remove it or choose another",
            path=folder,
        )


@contextlib.contextmanager
def atomic_folder(path: str | Path, *, replace: bool = False) -> Iterator[Path]:
    """Yields a new temporary folder beside `path`; on success it is renamed to `path`.

    Whatever the caller writes in it appears at `path` all at once, its files synced first. With
    `replace`, a folder already at `path` is replaced (moved aside, the new one renamed in, the
    old one removed); without it, an existing `path` is an OutputError. On any failure, or an
    interrupt, the temporary folder is removed and `path` is untouched. Raises OutputError when
    the parent folder is not writable or a write fails.
    """
    path = Path(path)
    parent = path.parent
    if not parent.is_dir():
        raise OutputError(f"{path}: cannot write: folder {parent} does not exist")

    def make() -> Path:
        return _folder_beside(path, ".tmp")

    with _temporary(path, make, lambda temp: _finish_folder(temp, path, replace)) as temp:
        yield temp


def _finish_folder(temp: Path, path: Path, replace: bool) -> None:
    umask = _umask()
    for folder, _, names in os.walk(temp):
        for name in names:
            file_path = os.path.join(folder, name)
            os.chmod(file_path, 0o666 & ~umask)  # writers may create files private (0600)
            with open(file_path, "rb") as file:
                os.fsync(file.fileno())
    os.chmod(temp, 0o777 & ~umask)
    old: Path | None = None
    if path.exists() or path.is_symlink():
        if not replace:
            raise _taken_meanwhile(path)
        # Not registered as partial: a signal between the two renames must not remove it.
        old = _folder_beside(path, ".old")
        os.replace(path, old / path.name)
    try:
        os.rename(temp, path)
    except OSError:
        if old is not None:  # put the previous folder back
            os.replace(old / path.name, path)
            _remove_quietly(old)
        raise
    if old is not None:
        _remove_quietly(old)
    with contextlib.suppress(OSError):
        handle = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(handle)
        finally:
            os.close(handle)


def copy_side_file(source: Path, target: Path) -> None:
    """Copies the file or folder `source` to `target` byte for byte (links followed).

    Raises InputError naming the file of `source` that cannot be read (or, in a folder, copied),
    OSError when `target` cannot be written.
    """
    try:
        if source.is_dir():
            shutil.copytree(source, target, symlinks=False)
        else:
            shutil.copyfile(source, target)
    except shutil.Error as error:  # a folder's copy: (source file, target file, why) each
        name, _, why = error.args[0][0]
        if os.access(name, os.R_OK):  # readable: writing the copy failed
            raise OSError(why) from None
        raise InputError(f"{name}: cannot read: {why}", path=source) from None
    except OSError as error:
        failed = Path(error.filename) if error.filename is not None else None
        if failed is not None and (failed == source or failed.is_relative_to(source)):
            raise InputError(
                f"{failed}: cannot read: {error.strerror or error}", path=source
            ) from None
        raise


@contextlib.contextmanager
def partial_folder(path: Path, output: Path) -> Iterator[Path]:
    """Registers the temporary folder `path` (already made), which becomes `output`, while the
    block runs, so that `discard_partial_outputs` (a signal handler) removes it. Removing it on
    other failures is the caller's business (a distributed run removes it once every rank has
    stopped writing)."""
    _PARTIAL[path] = output
    try:
        yield path
    finally:
        _PARTIAL.pop(path, None)


@contextlib.contextmanager
def new_partial_folder(output: Path) -> Iterator[Path]:
    """Makes a temporary folder beside `output` (which it becomes) and registers it, from the
    moment it exists, for `discard_partial_outputs` while the block runs; its mode is the one
    the umask gives a folder. Removing it on other failures is the caller's business."""
    with _signals_held():
        path = _folder_beside(output, ".tmp")
        _PARTIAL[path] = output
    try:
        os.chmod(path, 0o777 & ~_umask())  # mkdtemp's 0o700 is for secrets
        yield path
    finally:
        _PARTIAL.pop(path, None)


def replace_folder(temp: Path, path: Path) -> None:
    """Renames the complete folder `temp` to `path`, replacing an existing folder `path`.

    A folder cannot be swapped atomically: the old one is first renamed aside, then removed
    once the new one is in place. Raises OutputError when a rename fails.
    """
    old = None
    try:
        if path.exists():
            if not path.is_dir():
                raise OutputError(f"{path}: exists and is not a folder")
            old = _folder_beside(path, ".old")
            os.replace(path, old / "previous")
        os.replace(temp, path)
    except OSError as error:
        if old is not None and not path.exists() and (old / "previous").exists():
            os.replace(old / "previous", path)
        raise OutputError(f"{path}: cannot write: {error.strerror or error}") from None
    finally:
        if old is not None:
            _remove_quietly(old)


def write_torch(
    path: Path,
    obj: Any,
    write: Callable[[Any, Path], None] | None = None,
    *,
    replace: bool = True,
) -> None:
    """Writes `obj` with torch.save to `path` atomically (without `replace`, only where no file
    is: see `atomic_output`). Raises OutputError on failure."""
    with atomic_output(path, replace=replace) as temp:
        (write or save_torch_file)(obj, temp)


def save_torch_file(obj: Any, path: Path) -> None:
    """Writes `obj` with torch.save to exactly `path`; the same object gives the same bytes."""
    import torch

    # Through a file object: torch.save(obj, path) names the zip's inner folder after the
    # (random) temporary file name, so the same object would give different bytes.
    with open(path, "wb") as file:
        sink = _Sink(file)
        try:
            torch.save(obj, sink)
        except RuntimeError as error:
            # torch's zip writer turns a failed write (a full disk) into a RuntimeError.
            if sink.error is not None:
                raise sink.error from None
            raise OutputError(f"{path}: cannot write: {first_line(error)}") from None


class _Sink:
    """A binary file for torch.save that keeps the OSError of a failed write."""

    def __init__(self, file: Any) -> None:
        self.file = file
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return self.file.write(data)
        except OSError as error:
            self.error = error
            raise

    def flush(self) -> None:
        self.file.flush()
