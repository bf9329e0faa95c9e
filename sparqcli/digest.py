"""SHA-256 digests of input and output files, optionally computed in a background thread.

No torch here: compress() starts hashing its inputs before torch is imported, so the digest of a
large checkpoint is computed on a core that the (single-threaded) import leaves idle.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Sequence
from pathlib import Path

from sparqcli.errors import InputError

_BLOCK_BYTES = 1 << 22


def sha256_file(path: str | Path, cancelled: threading.Event | None = None) -> str:
    """Returns the hex sha256 of the file at `path` (of a DCP folder: of its `.metadata`).

    Raises InputError when it is unreadable, or when `cancelled` is set before the end.
    """
    digest = hashlib.sha256()
    path = Path(path)
    if path.is_dir() and (path / ".metadata").is_file():
        path = path / ".metadata"  # a DCP folder is named by its metadata (a unique save id)
    try:
        with open(path, "rb") as file:
            for block in iter(lambda: file.read(_BLOCK_BYTES), b""):
                if cancelled is not None and cancelled.is_set():
                    raise InputError(f"{path}: hashing cancelled")
                digest.update(block)
    except OSError as error:
        raise InputError(f"{path}: cannot read: {error.strerror}") from None
    return digest.hexdigest()


class BackgroundSha256:
    """The sha256 of each of `paths`, computed in order by one daemon thread.

    hashlib releases the GIL while it hashes, so the work overlaps the caller's. `cancel()`
    stops it at the next block; being a daemon, the thread never holds up the process's exit.
    """

    def __init__(self, paths: Sequence[Path]) -> None:
        self._paths = list(paths)
        self._cancelled = threading.Event()
        self._results: dict[Path, str | InputError] = {}
        self._done = {path: threading.Event() for path in self._paths}
        self._thread = threading.Thread(target=self._run, name="sparq-sha256", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        for path in self._paths:
            try:
                self._results[path] = sha256_file(path, self._cancelled)
            except InputError as error:
                self._results[path] = error
            self._done[path].set()

    def result(self, path: Path) -> str:
        """Returns the hex digest of `path` (one of `paths`), waiting for it.

        Raises InputError when the file was unreadable or the hashing was cancelled.
        """
        self._done[path].wait()
        result = self._results[path]
        if isinstance(result, InputError):
            raise result
        return result

    def cancel(self) -> None:
        """Stops the hashing at its next block; `result()` of an unfinished file then raises."""
        self._cancelled.set()
