"""What every open sparq handle shares (`SparqFile`, `ShardedSparqFile`, `SparqFolder`).

A handle is a context manager that closes itself, and answers `tables()` and `metadata()` from
its `info` (a file's, a sharded folder's or a folder's). No torch here.
"""

from __future__ import annotations

from typing import Any, TypeVar

_Handle = TypeVar("_Handle", bound="OpenHandle")


class OpenHandle:
    """The shared part of the open handles: `with`, `tables()`, `metadata()`."""

    info: Any

    def __enter__(self: _Handle) -> _Handle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Closes what the handle holds open; it cannot read after this."""
        raise NotImplementedError

    def tables(self) -> list[str]:
        """Returns the keys of the compressed tables, sorted."""
        return sorted(self.info.tables)

    def metadata(self) -> dict[str, Any]:
        """Returns the sparq metadata (format version, tables, source, extra; a folder's tables
        and each shard's metadata) as data."""
        dictionary: dict[str, Any] = self.info.to_dict()
        return dictionary
