"""Sharded sparq output: a folder of sparq files plus an index, tables split by rows across them.

A distributed run writes one sparq file per rank, `model-0000k-of-0000n.sparq.safetensors`,
holding that rank's rows of every table (as a table of its own: each shard is a valid sparq
file) and the pass-through tensors assigned to it, plus `model.safetensors.index.json`, the
Hugging Face index layout with a `sparq` member (docs/FORMAT.md, "Sharded output"):

    {"metadata": {"total_size": N, "sparq": {"format_version": 1, "tables": {K: {"shape": [R, C],
       "dtype": ..., "kept": ..., "stats": {...}, "row_shards": [{"file": F, "rows": [a, b]}, ...]}},
       ...}},
     "weight_map": {passthrough key: F}}

`ShardedSparqFile` reads such a folder with the `SparqFile` interface (`sparqcli.open`), so
`load`, `load_table`, `inspect` and `decompress` take the folder wherever they take a file.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sparqcli.errors import FormatError, InputError
from sparqcli.format.handle import OpenHandle

if TYPE_CHECKING:
    import torch

    from sparqcli.engine.table import CompressedTable
    from sparqcli.format.reader import CompressedFileInfo, SparqFile

INDEX_NAME = "model.safetensors.index.json"
_SHARD = re.compile(r"model-\d{5}-of-\d{5}\.sparq\.safetensors")


def shard_name(index: int, count: int) -> str:
    """Returns the file name of shard `index` (0-based) of `count`."""
    return f"model-{index + 1:05d}-of-{count:05d}.sparq.safetensors"


def is_sharded_output(path: str | Path) -> bool:
    """Returns True when `path` is a folder holding a sharded sparq index."""
    path = Path(path)
    if not (path.is_dir() and (path / INDEX_NAME).is_file()):
        return False
    try:
        document = json.loads((path / INDEX_NAME).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(document, dict) and "sparq" in (document.get("metadata") or {})


@dataclass(frozen=True)
class RowShard:
    """Rows `start:stop` of a table, stored as a table of their own in `file`."""

    file: str
    start: int
    stop: int


def read_index(folder: Path) -> tuple[dict[str, Any], dict[str, list[RowShard]], dict[str, str]]:
    """Returns the index's sparq document, each table's row shards and the weight map.

    Raises InputError when the index is unreadable, FormatError when it is inconsistent: a
    shard file that is not a plain name of the folder or is missing, row shards that do not
    cover a table's rows in order.
    """
    where = folder / INDEX_NAME
    try:
        document = json.loads(where.read_text())
    except OSError as error:
        raise InputError(f"{where}: cannot read: {error.strerror}") from None
    except ValueError as error:
        raise FormatError(f"{where}: not valid JSON ({error})") from None
    sparq = (document.get("metadata") or {}).get("sparq") if isinstance(document, dict) else None
    weight_map = document.get("weight_map", {}) if isinstance(document, dict) else None
    if not isinstance(sparq, dict) or not isinstance(sparq.get("tables"), dict):
        raise FormatError(f"{where}: no sparq tables in the index metadata")
    if not isinstance(weight_map, dict):
        raise FormatError(f"{where}: weight_map must be a JSON object")
    shards: dict[str, list[RowShard]] = {}
    for key, entry in sparq["tables"].items():
        try:
            rows = int(entry["shape"][0])
            pieces = [
                RowShard(_file(where, folder, piece["file"]), *map(int, piece["rows"]))
                for piece in entry["row_shards"]
            ]
        except (TypeError, KeyError, ValueError, IndexError):
            raise FormatError(f"{where}: table '{key}': malformed entry") from None
        expected = 0
        for piece in pieces:
            if piece.start != expected or piece.stop < piece.start:
                raise FormatError(
                    f"{where}: table '{key}': row shards do not cover its rows in order "
                    f"(rows {piece.start}:{piece.stop} after row {expected})"
                )
            expected = piece.stop
        if expected != rows:
            raise FormatError(f"{where}: table '{key}': row shards end at {expected}, not {rows}")
        shards[key] = pieces
    files = {key: _file(where, folder, name) for key, name in weight_map.items()}
    return sparq, shards, files


def _file(where: Path, folder: Path, name: Any) -> str:
    if not isinstance(name, str) or not _SHARD.fullmatch(name):
        raise FormatError(f"{where}: {name!r} is not a shard file name")
    if not (folder / name).is_file():
        raise InputError(f"{folder / name}: no such file (named by {where.name})")
    return name


class ShardedSparqFile(OpenHandle):
    """A sharded sparq folder, read like one `SparqFile`: a table's rows come from its shards."""

    def __init__(self, path: str | Path, device: torch.device | str = "cpu") -> None:
        from sparqcli.format.reader import SparqFile

        self.path = str(path)
        self.folder = Path(path)
        self.document, self.shards, self.weight_map = read_index(self.folder)
        self.device = device
        names = sorted(
            {p.file for ps in self.shards.values() for p in ps} | set(self.weight_map.values())
        )
        self._files: dict[str, SparqFile] = {}
        try:
            for name in names:
                self._files[name] = SparqFile(self.folder / name, device)
            self.info = self._merged_info()
        except BaseException:
            self.close()
            raise

    def _merged_info(self) -> CompressedFileInfo:
        from sparqcli.format.reader import CompressedFileInfo, SourceInfo

        where = self.folder / INDEX_NAME
        tables = {}
        for key, pieces in self.shards.items():
            infos = []
            for piece in pieces:
                info = self._files[piece.file].info.tables.get(key)
                if info is None or info.shape[0] != piece.stop - piece.start:
                    raise FormatError(
                        f"{self.folder / piece.file}: table '{key}': does not hold rows "
                        f"{piece.start}:{piece.stop} as {where.name} says"
                    )
                infos.append(info)
            entry = self.document["tables"][key]
            tables[key] = replace(
                infos[0],
                shape=(int(entry["shape"][0]), infos[0].shape[1]),
                kept=sum(info.kept for info in infos),
                stats=entry.get("stats"),
                file_bytes=sum(info.file_bytes for info in infos),
            )
        passthrough = {}
        for key, name in self.weight_map.items():
            stored = self._files[name].info.passthrough.get(key)
            if stored is None:
                raise FormatError(f"{self.folder / name}: no tensor '{key}' as {where.name} says")
            passthrough[key] = stored
        source = self.document.get("source")
        return CompressedFileInfo(
            path=self.path,
            is_sparq=True,
            format_version=self.document.get("format_version"),
            sparq_version=self.document.get("sparq_version"),
            source=None if not source else SourceInfo(source["name"], source["sha256"]),
            tables=tables,
            passthrough=passthrough,
            extra=self.document.get("extra") or {},
            file_bytes=sum((self.folder / name).stat().st_size for name in self._files),
        )

    def close(self) -> None:
        """Closes every shard file."""
        for file in self._files.values():
            file.close()

    def keys(self) -> list[str]:
        """Returns the keys of the dense state dict the folder decodes to, sorted."""
        return self.info.dense_keys()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Returns every tensor decoded, keys sorted (what `sparqcli.load` returns); a table's
        aliases are the same tensor object as the table."""
        aliases = self.info.aliases
        decoded = {key: self.get_tensor(key) for key in self.keys() if key not in aliases}
        return {key: decoded[aliases.get(key, key)] for key in self.keys()}

    def get_tensor(self, key: str) -> torch.Tensor:
        """Returns tensor `key` decoded (a table's shards concatenated by rows).

        Raises InputError for an unknown key, FormatError for a corrupt shard.
        """
        import torch

        key = self.info.aliases.get(key, key)
        if key in self.shards:
            pieces = [
                self._files[p.file].get_tensor(key) for p in self.shards[key] if p.stop > p.start
            ]
            return torch.cat(pieces) if len(pieces) != 1 else pieces[0]
        if key in self.weight_map:
            return self._files[self.weight_map[key]].get_tensor(key)
        from sparqcli.format.reader import _unknown_key

        raise _unknown_key(self.path, key, self.keys())

    def get_table(self, key: str) -> CompressedTable:
        """Returns compressed table `key`, its shards' tables joined by rows.

        Raises InputError when `key` is not a compressed table, FormatError for a corrupt shard.
        """
        import torch

        key = self.info.aliases.get(key, key)
        if key not in self.shards:
            from sparqcli.format.reader import _not_a_table

            raise _not_a_table(self.path, key, self.info.passthrough, self.tables())
        pieces = [self._files[p.file].get_table(key) for p in self.shards[key]]
        first = pieces[0]
        masks = [piece.keep_mask for piece in pieces]
        return replace(
            first,
            shape=(sum(piece.rows for piece in pieces), first.cols),
            codes=torch.cat([piece.codes for piece in pieces]),
            scale=torch.cat([piece.scale for piece in pieces]),
            zero_point=torch.cat([piece.zero_point for piece in pieces]),
            keep_mask=None if masks[0] is None else torch.cat(masks),  # type: ignore[arg-type]
        )

    def get_rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Returns rows `start:stop` of tensor `key`, decoded, reading only the shards that hold
        them. Raises IndexError for a range outside the tensor, InputError for an unknown key."""
        import torch

        key = self.info.aliases.get(key, key)
        if key not in self.shards:
            if key in self.weight_map:
                return self._files[self.weight_map[key]].get_rows(key, start, stop)
            from sparqcli.format.reader import _unknown_key

            raise _unknown_key(self.path, key, self.keys())
        rows = self.info.tables[key].shape[0]
        if not (0 <= start <= stop <= rows):
            raise IndexError(f"rows {start}:{stop} of '{key}' are outside its {rows} rows")
        pieces = []
        for piece in self.shards[key]:
            first, last = max(start, piece.start), min(stop, piece.stop)
            if first < last:
                file = self._files[piece.file]
                pieces.append(file.get_rows(key, first - piece.start, last - piece.start))
        if not pieces:
            return self.get_tensor(key)[start:stop]
        return torch.cat(pieces) if len(pieces) != 1 else pieces[0]
