"""Reading inputs: one `Checkpoint` interface over every input layout.

A Checkpoint lists its tensors (`TensorInfo`: shape and dtype, no data) and reads them, whole
or a range of rows at a time — the one primitive the engine needs. Two kinds sit behind it:

* `SafetensorsCheckpoint` (`sources/safetensors_file.py`): the header validated by the
  safetensors library, rows read with positioned reads, so a table larger than memory streams;
* `DcpCheckpoint` (`sources/dcp.py`): a `torch.distributed.checkpoint` folder, its `.metadata`
  unpickled with an allowlist, rows assembled from the chunks of its `.distcp` files;
* `StateDictCheckpoint` (`sources/torch_file.py`): a state dict in memory, from a `.pt`/
  `.pth`/`.bin`/`.ckpt` file read by `torch.load(weights_only=True)` (a pickled whole
  `nn.Module` only when trusted), or handed over by a Python caller;
* `ShardedCheckpoint` (`sources/folder.py`): a model folder, several file checkpoints and an
  index; each key is read from the shard that holds it.

Tensors that hold the same values (aliases, e.g. tied embeddings) are found by
`sources/aliases.py`: storage shared in memory is known from `storage_groups()`, byte-identical
stored tensors are hashed.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sparqcli.dtypes import TensorInfo
from sparqcli.errors import InputError, UsageError
from sparqcli.format.spec import METADATA_KEY

if TYPE_CHECKING:
    import torch

    from sparqcli.sources.rows import RowReader

SAFETENSORS_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
DCP_METADATA_FILE = ".metadata"
"""The file that makes a folder a torch.distributed.checkpoint (DCP) checkpoint."""
# Module paths are a few dozen characters. Longer keys are refused: rules are regular
# expressions, and a crafted megabyte-long key could keep one busy for hours.
MAX_KEY_CHARS = 1024


class Checkpoint(ABC):
    """An opened input: its tensors' shapes and dtypes, and a way to read them.

    `path` is the file (None for a state dict handed over in memory); `format` is
    `safetensors`, `torch`, `module` or `state_dict`; `container_key` names the entry of the
    file that holds the state dict (None: the file is the state dict); `extra` holds the file's
    other entries; `module_types` maps module names to class names, only for a trusted pickled
    `nn.Module`; `metadata` is a safetensors file's string metadata.
    """

    in_memory = False
    """True when the tensors are held in memory (rows are returned as views, not read)."""

    def __init__(
        self,
        path: Path | None,
        format: str,
        tensors: dict[str, TensorInfo],
        *,
        container_key: str | None = None,
        extra: dict[str, Any] | None = None,
        module_types: dict[str, str] | None = None,
        metadata: dict[str, str] | None = None,
    ) -> None:
        self.path = path
        self.format = format
        self.tensors = tensors
        self.container_key = container_key
        self.extra = extra or {}
        self.module_types = module_types
        self.metadata = metadata or {}

    @property
    def name(self) -> str:
        """Returns how messages name this input: its path, or `state dict`."""
        return str(self.path) if self.path is not None else "state dict"

    @property
    def is_sparq(self) -> bool:
        """Returns True when the input is a compressed sparq file."""
        return METADATA_KEY in self.metadata

    @abstractmethod
    def read_rows(
        self, key: str, start: int, stop: int, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Returns rows `start:stop` of tensor `key`. Raises InputError when unreadable.

        A file's rows are read into the start of `out` when given (a contiguous CPU tensor of
        the tensor's dtype, large enough) and a view of it is returned; rows held in memory are
        returned as they are.
        """

    @abstractmethod
    def tensor(self, key: str) -> torch.Tensor:
        """Returns the whole tensor `key` (on the CPU). Raises InputError when unreadable."""

    def row_reader(self, key: str, for_gpu: bool = False) -> RowReader:
        """Returns a `RowReader` of tensor `key`: `reader(start, stop)` returns those rows.

        `for_gpu`: the rows go to a GPU, so buffers are page-locked and the next range is read
        ahead (see RowReader).
        """
        from sparqcli.sources.rows import RowReader

        return RowReader(self, key, pin_memory=for_gpu, read_ahead=for_gpu)

    def storage_groups(self) -> list[tuple[str, ...]]:
        """Returns groups (2 or more keys, in key order) of tensors known to hold the same bytes
        without reading them: views of one storage. None known by default."""
        return []

    def rebuild(self, state: dict[str, Any]) -> Any:
        """Returns the input's object with its state dict's tensors replaced by `state`."""
        return state

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Returns every tensor of the checkpoint, read whole."""
        return {key: self.tensor(key) for key in self.tensors}


def open_checkpoint(
    path: str | Path, *, key: str | None = None, trust_pickle: bool = False
) -> Checkpoint:
    """Returns the opened checkpoint at `path` (.safetensors, .pt, .pth, .bin, .ckpt), or a model
    folder (shards and an index, see `sources/folder.py`).

    `key` names the entry holding the state dict in a nested checkpoint (dotted for deeper
    nesting); without it the usual names are tried. Raises InputError for a missing, unreadable
    or corrupt file or an over-long tensor key, UnsafeInputError for a pickle that needs code to
    load without `trust_pickle`, UsageError for an unknown extension or a `key` that is not there.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file", path=path)
    if path.is_dir():
        if is_dcp_folder(path):
            from sparqcli.sources.dcp import DcpCheckpoint

            if key is not None:
                raise UsageError(
                    f"{path}: {{opt:key}} applies to .pt files; a DCP folder is flat", path=path
                )
            checkpoint = DcpCheckpoint.open(path, trust_pickle)
            check_keys(checkpoint)
            return checkpoint
        if key is not None:
            raise UsageError(
                f"{path}: {{opt:key}} applies to .pt files; a model folder's shards are flat",
                path=path,
            )
        from sparqcli.sources.folder import open_folder

        return open_folder(path, trust_pickle=trust_pickle)
    if not os.access(path, os.R_OK):
        raise InputError(f"{path}: permission denied", path=path)
    suffix = path.suffix.lower()
    checkpoint: Checkpoint
    if suffix in SAFETENSORS_SUFFIXES:
        if key is not None:
            raise UsageError(
                f"{path}: {{opt:key}} applies to .pt files; a .safetensors file is flat", path=path
            )
        from sparqcli.sources.safetensors_file import SafetensorsCheckpoint

        checkpoint = SafetensorsCheckpoint.open(path)
    elif suffix in TORCH_SUFFIXES:
        from sparqcli.sources.torch_file import open_torch_file

        checkpoint = open_torch_file(path, key, trust_pickle)
    else:
        raise UsageError(
            f"{path}: unknown checkpoint type '{path.suffix}'; expected .safetensors, .pt, "
            ".pth, .bin or .ckpt",
            path=path,
        )
    check_keys(checkpoint)
    return checkpoint


def is_dcp_folder(path: Path) -> bool:
    """Returns True when `path` is a folder holding a DCP `.metadata` file."""
    return path.is_dir() and (path / DCP_METADATA_FILE).is_file()


def check_keys(checkpoint: Checkpoint) -> None:
    """Raises InputError when a tensor key of `checkpoint` is longer than MAX_KEY_CHARS."""
    for key in checkpoint.tensors:
        if len(key) > MAX_KEY_CHARS:
            raise InputError(
                f"{checkpoint.name}: tensor key {key[:40]!r}… is {len(key)} characters long "
                f"(at most {MAX_KEY_CHARS}); not a model checkpoint",
                path=checkpoint.path,
            )
