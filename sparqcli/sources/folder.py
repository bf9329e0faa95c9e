"""Model folders: a set of shard files with an index, read as one checkpoint.

The Hugging Face layout (`find_layout`): `model.safetensors`, or shards
`model-0000k-of-0000n.safetensors` listed by `model.safetensors.index.json`
(`{"metadata": {"total_size": N}, "weight_map": {key: shard}}`); older folders hold
`pytorch_model.bin`, or `.bin` shards with `pytorch_model.bin.index.json`. Every other file of the
folder (config, tokenizer, README, ...) is a side file, carried over by whoever writes a folder.

`ShardedCheckpoint` is the general part: shard files, each opened as a file checkpoint of its own,
and a map from each key to the shard that holds it. Its keys are the union over the shards; row
reads go to the shard holding the key. Safetensors shards stay open (a header each); a torch shard
is held in memory, so only the one read last is kept.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sparqcli.dtypes import TensorInfo
from sparqcli.errors import InputError
from sparqcli.sources import Checkpoint

if TYPE_CHECKING:
    import torch

SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_INDEX = "pytorch_model.bin.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
TORCH_SINGLE = "pytorch_model.bin"
_SHARD_NAME = {
    "safetensors": re.compile(r"model-\d+-of-\d+\.safetensors"),
    "torch": re.compile(r"pytorch_model-\d+-of-\d+\.bin"),
}
_SINGLE = {"safetensors": SAFETENSORS_SINGLE, "torch": TORCH_SINGLE}
_INDEX = {"safetensors": SAFETENSORS_INDEX, "torch": TORCH_INDEX}


@dataclass(frozen=True)
class FolderLayout:
    """Which files of a model folder hold the checkpoint, and which are side files.

    `kind` is `safetensors` or `torch`; `shards` the shard file names in order; `index` the index
    file's name (None for a single unindexed file); `weight_map` and `index_metadata` the index's
    contents; `side_files` every other file or folder (relative names, sorted), to be copied;
    `other_weights` the weight files of the layout not used (the `.bin` files of a folder that also
    has safetensors weights: the same tensors again), neither read nor copied.
    """

    folder: Path
    kind: str
    shards: tuple[str, ...]
    index: str | None
    weight_map: dict[str, str] = field(default_factory=dict)
    index_metadata: dict[str, Any] = field(default_factory=dict)
    side_files: tuple[str, ...] = ()
    other_weights: tuple[str, ...] = ()


def is_model_folder(path: Path) -> bool:
    """Returns True when `path` is a folder holding a model in a layout sparq reads."""
    return path.is_dir() and any(
        (path / name).exists()
        for name in (SAFETENSORS_INDEX, SAFETENSORS_SINGLE, TORCH_INDEX, TORCH_SINGLE)
    )


def find_layout(folder: Path) -> FolderLayout:
    """Returns the layout of the model folder `folder`.

    Safetensors weights are used when present, else `.bin` ones. Raises InputError, naming the
    file, when the folder holds no weights, an index is not valid JSON or names a missing file or
    a path outside the folder, or a shard file is missing from the index.
    """
    try:
        names = sorted(entry.name for entry in folder.iterdir())
    except OSError as error:
        raise InputError(f"{folder}: cannot read: {error.strerror}", path=folder) from None
    kinds = [
        kind
        for kind in ("safetensors", "torch")
        if _INDEX[kind] in names
        or _SINGLE[kind] in names
        or any(_SHARD_NAME[kind].fullmatch(name) for name in names)
    ]
    if not kinds:
        if any(name.endswith(".distcp") for name in names):
            raise InputError(
                f"{folder}: a DCP checkpoint without its .metadata file (torch.distributed."
                "checkpoint writes it last; the save may not have finished)",
                path=folder,
            )
        raise InputError(
            f"{folder}: is a directory, not a checkpoint or a model folder (no "
            f"{SAFETENSORS_SINGLE}, {SAFETENSORS_INDEX}, {TORCH_SINGLE} or {TORCH_INDEX})",
            path=folder,
        )
    kind = kinds[0]
    index_name = _INDEX[kind]
    shard_files = [name for name in names if _SHARD_NAME[kind].fullmatch(name)]
    weight_map: dict[str, str] = {}
    metadata: dict[str, Any] = {}
    if index_name in names:
        weight_map, metadata = read_index(folder / index_name)
        shards = sorted(set(weight_map.values()))
        for shard in shards:
            if not (folder / shard).is_file():
                raise InputError(
                    f"{folder / index_name}: names shard '{shard}', which does not exist",
                    path=folder / index_name,
                )
        for name in shard_files:
            if name not in shards:
                raise InputError(
                    f"{folder / name}: shard is not listed in {index_name}", path=folder / name
                )
        index: str | None = index_name
    elif shard_files:
        raise InputError(
            f"{folder / shard_files[0]}: shard without an index ({index_name} is missing)",
            path=folder / shard_files[0],
        )
    else:
        shards = [_SINGLE[kind]]
        index = None
    weights = {*shards, *([index] if index else [])}
    other: list[str] = []
    if kind == "safetensors":
        other = [
            name
            for name in names
            if name in (TORCH_INDEX, TORCH_SINGLE) or _SHARD_NAME["torch"].fullmatch(name)
        ]
    side = [name for name in names if name not in weights and name not in other]
    return FolderLayout(
        folder=folder,
        kind=kind,
        shards=tuple(shards),
        index=index,
        weight_map=weight_map,
        index_metadata=metadata,
        side_files=tuple(side),
        other_weights=tuple(other),
    )


def read_index(path: Path) -> tuple[dict[str, str], dict[str, Any]]:
    """Returns the `weight_map` and `metadata` of the index file at `path`.

    Raises InputError when it is not valid JSON, lacks a `weight_map` of key -> file name, or
    names a file outside its folder.
    """
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise InputError(f"{path}: cannot read: {error.strerror}", path=path) from None
    except (ValueError, RecursionError) as error:
        raise InputError(f"{path}: not valid JSON ({error})", path=path) from None
    weight_map = document.get("weight_map") if isinstance(document, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(key, str) and isinstance(value, str) for key, value in weight_map.items()
    ):
        raise InputError(
            f"{path}: must be a JSON object with a 'weight_map' of tensor key -> file name",
            path=path,
        )
    for key, name in weight_map.items():
        if "/" in name or "\\" in name or name in ("", ".", ".."):
            raise InputError(
                f"{path}: tensor '{key}' maps to {name!r}, not a file name in the folder",
                path=path,
            )
    metadata = document.get("metadata")
    return dict(weight_map), dict(metadata) if isinstance(metadata, dict) else {}


class ShardedCheckpoint(Checkpoint):
    """A checkpoint stored as several files: its keys are the union of the shards' keys.

    `shards` are the shard files in order; `open_shard` opens one as a file checkpoint;
    `weight_map` (optional) is what the index says holds each key, checked against the shards.
    `layout` is the folder's layout when it is a model folder.
    """

    def __init__(
        self,
        path: Path,
        shards: Sequence[Path],
        open_shard: Callable[[Path], Checkpoint],
        *,
        weight_map: Mapping[str, str] | None = None,
        index: Path | None = None,
        layout: FolderLayout | None = None,
    ) -> None:
        self._open_shard = open_shard
        self._open: dict[Path, Checkpoint] = {}
        self.shards = tuple(shards)
        self.layout = layout
        tensors: dict[str, TensorInfo] = {}
        owner: dict[str, Path] = {}
        self.shard_keys: dict[Path, tuple[str, ...]] = {}
        self._storage_groups: list[tuple[str, ...]] = []
        sparq = False
        for shard in self.shards:
            checkpoint = self._shard(shard)
            sparq = sparq or checkpoint.is_sparq
            for key, info in checkpoint.tensors.items():
                if key in owner:
                    raise InputError(
                        f"{shard}: tensor '{key}' is also in {owner[key].name}", path=shard
                    )
                owner[key] = shard
                tensors[key] = info
            self.shard_keys[shard] = tuple(checkpoint.tensors)
            self._storage_groups += checkpoint.storage_groups()
        for key, name in (weight_map or {}).items():
            where = index if index is not None else path
            if key not in owner:
                raise InputError(
                    f"{where}: maps tensor '{key}' to {name}, which does not hold it", path=where
                )
            if owner[key].name != name:
                raise InputError(
                    f"{where}: maps tensor '{key}' to {name}, but {owner[key].name} holds it",
                    path=where,
                )
        super().__init__(path, "folder", tensors)
        self._owner = owner
        self._sparq = sparq

    @property
    def is_sparq(self) -> bool:
        """Returns True when a shard is a compressed sparq file."""
        return self._sparq

    def shard_of(self, key: str) -> Path:
        """Returns the shard file that holds tensor `key`."""
        return self._owner[key]

    def shard(self, shard: Path) -> Checkpoint:
        """Returns shard file `shard` opened as a checkpoint (held, or opened again)."""
        return self._shard(shard)

    def _shard(self, shard: Path) -> Checkpoint:
        checkpoint = self._open.get(shard)
        if checkpoint is None:
            checkpoint = self._open_shard(shard)
            if checkpoint.in_memory:
                # A torch shard is held whole in memory: keep only the one read last.
                for held in [path for path, ckpt in self._open.items() if ckpt.in_memory]:
                    del self._open[held]
            self._open[shard] = checkpoint
        return checkpoint

    def release(self) -> None:
        """Drops the shards held in memory (they are opened again when read)."""
        for held in [path for path, ckpt in self._open.items() if ckpt.in_memory]:
            del self._open[held]

    def read_rows(
        self, key: str, start: int, stop: int, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Returns rows `start:stop` of tensor `key`, read from the shard that holds it."""
        return self._shard(self._owner[key]).read_rows(key, start, stop, out)

    def tensor(self, key: str) -> torch.Tensor:
        """Returns the whole tensor `key`, read from the shard that holds it."""
        return self._shard(self._owner[key]).tensor(key)

    def storage_groups(self) -> list[tuple[str, ...]]:
        """Returns the groups of keys that share storage inside one shard."""
        return list(self._storage_groups)


def open_folder(folder: Path, *, trust_pickle: bool = False) -> ShardedCheckpoint:
    """Returns the model folder `folder` opened as one checkpoint (see `find_layout`).

    Raises InputError for a folder that is not a model folder, an inconsistent index, a key in
    two shards, or an unreadable shard; UnsafeInputError for a `.bin` shard that needs code to
    load without `trust_pickle`.
    """
    from sparqcli.sources import check_keys, open_checkpoint

    layout = find_layout(folder)

    def open_shard(path: Path) -> Checkpoint:
        checkpoint = open_checkpoint(path, trust_pickle=trust_pickle)
        if checkpoint.container_key is not None or checkpoint.format == "module":
            raise InputError(f"{path}: a shard must be a flat state dict", path=path)
        return checkpoint

    checkpoint = ShardedCheckpoint(
        folder,
        [folder / name for name in layout.shards],
        open_shard,
        weight_map=layout.weight_map,
        index=folder / layout.index if layout.index else None,
        layout=layout,
    )
    checkpoint.release()
    check_keys(checkpoint)
    return checkpoint
