"""A sparq folder: the sparq files of a compressed model folder, read as one.

`sparq compress` turns a model folder into a folder of the same layout whose shards are sparq
files, with a `model.safetensors.index.json` whose `weight_map` lists every stored tensor.
`SparqFolder` opens every shard (headers only) and answers for the folder as `SparqFile` does
for one file: a key (a table, an alias, a pass-through tensor) is read from the shard that
holds it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sparqcli.errors import FormatError
from sparqcli.format.handle import OpenHandle
from sparqcli.format.reader import CompressedFileInfo, SparqFile, TableInfo, _unknown_key


@dataclass(frozen=True)
class CompressedFolderInfo:
    """What a folder of sparq shards holds: each shard's `CompressedFileInfo`, merged.

    `files` are in shard order; `tables`, `passthrough` and `aliases` are the union over them;
    `file_bytes` counts the shard files.
    """

    path: str
    files: tuple[CompressedFileInfo, ...]

    @property
    def is_sparq(self) -> bool:
        """Returns True when a shard is a sparq file."""
        return any(file.is_sparq for file in self.files)

    @property
    def tables(self) -> dict[str, TableInfo]:
        """Returns every compressed table of every shard."""
        return {key: table for file in self.files for key, table in file.tables.items()}

    @property
    def passthrough(self) -> dict[str, Any]:
        """Returns every pass-through tensor of every shard."""
        return {key: info for file in self.files for key, info in file.passthrough.items()}

    @property
    def aliases(self) -> dict[str, str]:
        """Returns each alias key and the table it decodes as."""
        return {alias: key for file in self.files for alias, key in file.aliases.items()}

    @property
    def file_bytes(self) -> int:
        """Returns the bytes of the shard files."""
        return sum(file.file_bytes for file in self.files)

    def dense_keys(self) -> list[str]:
        """Returns the keys of the dense state dict the folder decodes to, sorted."""
        return sorted(key for file in self.files for key in file.dense_keys())

    def to_dict(self) -> dict[str, Any]:
        """Returns the folder's tables and tensors as a sparq file's `to_dict` does, plus each
        shard's own (`shards`, by file name)."""
        shards = {Path(file.path).name: file.to_dict() for file in self.files}
        versions = [file.format_version for file in self.files if file.format_version]
        return {
            "file": self.path,
            "folder": True,
            "compressed": self.is_sparq,
            "file_bytes": self.file_bytes,
            "format_version": max(versions) if versions else None,
            "sparq_version": next((f.sparq_version for f in self.files if f.sparq_version), None),
            "tables": {
                key: shard["tables"][key] for shard in shards.values() for key in shard["tables"]
            },
            "passthrough": {
                key: value
                for shard in shards.values()
                for key, value in shard["passthrough"].items()
            },
            "shards": shards,
        }


class SparqFolder(OpenHandle):
    """An open folder of sparq shards, with `SparqFile`'s methods over the whole folder.

    Use it as a context manager, or call `close()`.
    """

    def __init__(self, path: str | Path, device: torch.device | str = "cpu") -> None:
        from sparqcli.sources.folder import find_layout

        self.path = str(path)
        self.device = torch.device(device)
        layout = find_layout(Path(path))
        self._files: list[SparqFile] = []
        self._owner: dict[str, SparqFile] = {}
        try:
            for name in layout.shards:
                file = SparqFile(Path(path) / name, device)
                self._files.append(file)
                names = file.keys()
                for key in names:
                    if key in self._owner:
                        raise FormatError(
                            f"{file.path}: tensor '{key}' is also in "
                            f"{Path(self._owner[key].path).name}"
                        )
                    self._owner[key] = file
        except BaseException:
            self.close()
            raise
        self.info = CompressedFolderInfo(self.path, tuple(file.info for file in self._files))

    def close(self) -> None:
        """Closes every shard."""
        for file in self._files:
            file.close()

    def keys(self) -> list[str]:
        """Returns the keys of the dense state dict the folder decodes to, sorted."""
        return sorted(self._owner)

    def _file(self, key: str) -> SparqFile:
        file = self._owner.get(key)
        if file is None:
            raise _unknown_key(self.path, key, self.keys())
        return file

    def get_tensor(self, key: str) -> torch.Tensor:
        """Returns tensor `key` decoded, from the shard that holds it (see SparqFile)."""
        return self._file(key).get_tensor(key)

    def get_table(self, key: str) -> Any:
        """Returns compressed table `key`, from the shard that holds it (see SparqFile)."""
        return self._file(key).get_table(key)

    def get_rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Returns rows `start:stop` of tensor `key`, decoded (see SparqFile)."""
        return self._file(key).get_rows(key, start, stop)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Returns the dense state dict of every shard, keys sorted (aliases as in SparqFile)."""
        state: dict[str, torch.Tensor] = {}
        for file in self._files:
            state.update(file.state_dict())
        return {key: state[key] for key in sorted(state)}

    def shard_files(self) -> list[SparqFile]:
        """Returns the open shards, in order."""
        return list(self._files)
