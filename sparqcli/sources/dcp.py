"""`torch.distributed.checkpoint` (DCP) folders: `.metadata` plus `__<rank>_<n>.distcp` files.

The `.metadata` file is a plain pickle of DCP's `Metadata`: each tensor's size, dtype and chunks
(offsets and sizes; row-wise sharding as TorchRec and DTensor `Shard(0)` write it, table-wise,
column-wise), and `storage_data`, which maps each chunk to a byte range of a `.distcp` file.
It is unpickled with an allowlist of DCP's metadata classes, `torch.Size`, dtypes and paths;
anything else is refused (UnsafeInputError) unless the caller trusts the pickle.

Each chunk's byte range holds a `torch.save` archive (an uncompressed zip). Its `data.pkl` is read
with a second allowlist (a tensor rebuilt from one storage, nothing else), which locates the raw
bytes of the chunk's storage inside the range; rows are then read from there with positioned reads,
so any row range of a table is assembled from the chunks it touches (a range may straddle chunk
boundaries; column-wise chunks are stitched side by side) without loading whole chunks.
"""

from __future__ import annotations

import io
import itertools
import math
import os
import pickle
import struct
import warnings
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sparqcli.dtypes import BY_NAME, TensorInfo, dtype_name, torch_dtype
from sparqcli.errors import InputError, UnsafeInputError, first_line
from sparqcli.sources import DCP_METADATA_FILE as METADATA_FILE
from sparqcli.sources import Checkpoint
from sparqcli.sources.safetensors_file import _pread, _pread_into, rows_buffer

_METADATA_MODULE = "torch.distributed.checkpoint.metadata"
_METADATA_CLASSES = frozenset(
    {
        "Metadata",
        "TensorStorageMetadata",
        "ChunkStorageMetadata",
        "TensorProperties",
        "BytesStorageMetadata",
        "StorageMeta",
        "MetadataIndex",
        "_MEM_FORMAT_ENCODING",
    }
)
_PATH_CLASSES = frozenset({"PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath", "Path"})
_ZIP_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")


class _Record:
    """Stands in for a DCP metadata class: keeps the state the pickle gives it as attributes.

    The DCP classes are plain data; standing in for them means nothing of torch.distributed is
    imported or run while reading a file (and importing torch.distributed.checkpoint costs ~1 s).
    """

    def __init__(self, *args: Any) -> None:
        self.args = args

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], dict):
            state = {**(state[0] or {}), **state[1]}  # (dict state, slot state)
        if isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self.state = state


class _TensorProperties(_Record):
    """TensorProperties pickles its fields as a tuple: dtype, layout, requires_grad, ..."""

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and state:
            self.dtype = state[0]
        else:
            super().__setstate__(state)


_STAND_INS: dict[str, type] = {
    name: type(name, (_TensorProperties if name == "TensorProperties" else _Record,), {})
    for name in (*_METADATA_CLASSES, "_StorageInfo")
}


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP metadata: its own classes (as stand-ins), torch.Size, dtypes, layouts,
    paths; nothing else."""

    def find_class(self, module: str, name: str) -> Any:
        if (module == _METADATA_MODULE and name in _METADATA_CLASSES) or (
            module == "torch.distributed.checkpoint.filesystem" and name == "_StorageInfo"
        ):
            return _STAND_INS[name]
        allowed = (
            (module == "torch" and name == "Size")
            or (module == "torch.serialization" and name == "_get_layout")
            or (module == "collections" and name == "OrderedDict")
            or (module.split(".")[0] == "pathlib" and name in _PATH_CLASSES)
        )
        if module == "torch" and not allowed:
            value = getattr(torch, name, None)
            allowed = isinstance(value, (torch.dtype, torch.layout, torch.memory_format))
        if not allowed:
            raise _Refused(f"{module}.{name}")
        return super().find_class(module, name)


class _Refused(Exception):
    """A pickle asked for a global outside the allowlist."""


@dataclass(frozen=True)
class _Chunk:
    """One stored chunk of a tensor: where it sits in the tensor and where its bytes are."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    file: Path
    start: int  # the chunk's byte range in `file`
    length: int


@dataclass(frozen=True)
class _Storage:
    """Where a chunk's tensor data lies: the absolute file offset of element (0, 0, ...)."""

    offset: int
    contiguous: bool


class DcpCheckpoint(Checkpoint):
    """A DCP folder: tensors assembled from chunks of `.distcp` files, read row range by row range.

    `extra` holds the non-tensor entries (DCP stores them as pickled bytes; loaded with
    `weights_only`, those that will not load are listed as not kept).
    """

    def __init__(
        self,
        path: Path,
        tensors: dict[str, TensorInfo],
        chunks: dict[str, list[_Chunk]],
        extra: dict[str, Any],
    ) -> None:
        super().__init__(path, "dcp", tensors, extra=extra)
        self._chunks = chunks
        self._storage: dict[_Chunk, _Storage] = {}

    @classmethod
    def open(cls, folder: Path, trust_pickle: bool = False) -> DcpCheckpoint:
        """Returns the checkpoint of the DCP folder `folder`, reading its metadata only.

        Raises UnsafeInputError when `.metadata` needs a class outside the allowlist and
        `trust_pickle` is not set, InputError when the metadata is corrupt, names a missing or
        short `.distcp` file, or its chunks do not tile a tensor.
        """
        meta_path = folder / METADATA_FILE
        metadata = _load_metadata(meta_path, trust_pickle)
        entries = getattr(metadata, "state_dict_metadata", None)
        storage = getattr(metadata, "storage_data", None)
        if not isinstance(entries, dict) or not isinstance(storage, dict):
            raise InputError(f"{meta_path}: not DCP metadata (no state_dict_metadata)")
        located: dict[tuple[str, tuple[int, ...] | None], Any] = {}
        for index, info in storage.items():
            offset = getattr(index, "offset", None)
            located[(index.fqn, tuple(offset) if offset is not None else None)] = info
        sizes: dict[Path, int] = {}
        tensors: dict[str, TensorInfo] = {}
        chunks: dict[str, list[_Chunk]] = {}
        extra: dict[str, Any] = {}
        for key, entry in entries.items():
            if not isinstance(key, str):
                raise InputError(f"{meta_path}: a tensor key is not a string")
            kind = type(entry).__name__
            if kind == "BytesStorageMetadata":
                info = located.get((key, None))
                if info is not None:
                    extra[key] = _load_bytes(folder, info, meta_path, sizes)
                continue
            if kind != "TensorStorageMetadata":
                raise InputError(f"{meta_path}: entry '{key}' has unknown kind {kind}")
            shape = tuple(int(side) for side in entry.size)
            name = dtype_name(entry.properties.dtype)
            if name not in BY_NAME:
                raise InputError(f"{meta_path}: tensor '{key}' has unsupported dtype {name}")
            tensors[key] = TensorInfo(shape, name)
            pieces = []
            for chunk in entry.chunks:
                offsets = tuple(int(v) for v in chunk.offsets)
                info = located.get((key, offsets))
                if info is None:
                    raise InputError(
                        f"{meta_path}: tensor '{key}': no storage for its chunk at {list(offsets)}"
                    )
                pieces.append(
                    _Chunk(
                        offsets,
                        tuple(int(v) for v in chunk.sizes),
                        _data_file(folder, info, meta_path, sizes),
                        int(info.offset),
                        int(info.length),
                    )
                )
            _check_tiling(meta_path, key, shape, pieces)
            chunks[key] = sorted(pieces, key=lambda piece: piece.offsets)
        return cls(folder, tensors, chunks, extra)

    def read_rows(
        self, key: str, start: int, stop: int, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Returns rows `start:stop` of tensor `key` (along its first dimension), read into `out`
        when given. Raises InputError when a `.distcp` file is short, unreadable or corrupt."""
        info = self.tensors[key]
        rows = rows_buffer(info, start, stop, out)
        for chunk in self._chunks[key]:
            first, last = max(start, chunk.offsets[0]), min(stop, chunk.offsets[0] + chunk.sizes[0])
            if first >= last:
                continue
            self._read_chunk_rows(
                key,
                chunk,
                first - chunk.offsets[0],
                last - chunk.offsets[0],
                rows[first - start : last - start],
            )
        return rows

    def tensor(self, key: str) -> torch.Tensor:
        """Returns the whole tensor `key`. Raises InputError when unreadable."""
        info = self.tensors[key]
        if info.shape:
            return self.read_rows(key, 0, info.shape[0])
        value = torch.empty((), dtype=torch_dtype(info.dtype))
        for chunk in self._chunks[key]:
            self._read_chunk_rows(key, chunk, 0, 1, value)
        return value

    def _read_chunk_rows(
        self, key: str, chunk: _Chunk, first: int, last: int, target: torch.Tensor
    ) -> None:
        """Reads rows first:last of `chunk` into `target` (those rows of the tensor, all columns)."""
        storage = self._storage.get(chunk)
        if storage is None:
            storage = _locate_storage(chunk, key, torch_dtype(self.tensors[key].dtype))
            self._storage[chunk] = storage
        trailing = tuple(
            slice(offset, offset + size)
            for offset, size in zip(chunk.offsets[1:], chunk.sizes[1:], strict=True)
        )
        whole_rows = chunk.sizes[1:] == tuple(target.shape[1:])
        if not storage.contiguous:  # rare: load the chunk whole (weights_only) and copy
            target[(slice(None), *trailing)] = _load_chunk(chunk, key)[first:last]
            return
        row_bytes = math.prod(chunk.sizes[1:]) * target.element_size()
        offset = storage.offset + first * row_bytes
        if whole_rows:
            _pread_into(chunk.file, offset, target)
            return
        piece = torch.empty((last - first, *chunk.sizes[1:]), dtype=target.dtype)
        _pread_into(chunk.file, offset, piece)
        target[(slice(None), *trailing)] = piece


def _load_metadata(path: Path, trust_pickle: bool) -> Any:
    """Returns the unpickled `.metadata`. Raises UnsafeInputError / InputError."""
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise InputError(f"{path}: cannot read: {error.strerror}") from None
    try:
        if trust_pickle:
            import torch.distributed.checkpoint  # noqa: F401  (the classes the pickle names)

            return pickle.loads(raw)
        return _MetadataUnpickler(io.BytesIO(raw)).load()
    except _Refused as refused:
        raise UnsafeInputError(
            f"{path}: DCP metadata needs '{refused}', which is not a DCP metadata class; "
            "pass {opt:trust_pickle} only if you trust this file",
            path=path,
        ) from None
    except (
        pickle.UnpicklingError,
        EOFError,
        ImportError,
        AttributeError,
        TypeError,
        ValueError,
        IndexError,
        KeyError,
    ) as error:
        raise InputError(f"{path}: not valid DCP metadata ({first_line(error)})") from None


def _data_file(folder: Path, info: Any, meta_path: Path, sizes: dict[Path, int]) -> Path:
    """Returns the `.distcp` file of a storage entry, checked to hold its byte range."""
    relative = getattr(info, "relative_path", None)
    if (
        not isinstance(relative, str)
        or Path(relative).name != relative
        or relative in ("", ".", "..")
    ):
        raise InputError(f"{meta_path}: storage path {relative!r} is not a file of the folder")
    if getattr(info, "transform_descriptors", None):
        raise InputError(
            f"{folder / relative}: stored with transforms {list(info.transform_descriptors)} "
            "(not supported)"
        )
    file = folder / relative
    if file not in sizes:
        try:
            sizes[file] = file.stat().st_size
        except OSError:
            raise InputError(f"{file}: no such file (named by {meta_path})") from None
    offset, length = int(info.offset), int(info.length)
    if offset < 0 or length < 0 or offset + length > sizes[file]:
        raise InputError(
            f"{file}: truncated (holds {sizes[file]} bytes; {meta_path.name} places data up to "
            f"byte {offset + length})",
            path=file,
        )
    return file


def _check_tiling(meta_path: Path, key: str, shape: tuple[int, ...], chunks: list[_Chunk]) -> None:
    """Raises InputError unless the chunks lie inside `shape` and cover it exactly once."""
    for chunk in chunks:
        if (
            len(chunk.offsets) != len(shape)
            or len(chunk.sizes) != len(shape)
            or any(
                o < 0 or s < 0 or o + s > side
                for o, s, side in zip(chunk.offsets, chunk.sizes, shape, strict=True)
            )
        ):
            raise InputError(
                f"{meta_path}: tensor '{key}': chunk at {list(chunk.offsets)} of size "
                f"{list(chunk.sizes)} lies outside its shape {list(shape)}"
            )
    if sum(math.prod(chunk.sizes) for chunk in chunks) != math.prod(shape):
        raise InputError(f"{meta_path}: tensor '{key}': its chunks do not cover it exactly once")
    if len(shape) >= 1 and len(chunks) > 1:
        # Every band of rows between chunk boundaries must be tiled exactly by the chunks over it.
        edges = sorted({c.offsets[0] for c in chunks} | {c.offsets[0] + c.sizes[0] for c in chunks})
        for top, bottom in itertools.pairwise(edges):
            band = [
                c for c in chunks if c.offsets[0] <= top and c.offsets[0] + c.sizes[0] >= bottom
            ]
            if sum(math.prod(c.sizes[1:]) for c in band) != math.prod(shape[1:]):
                raise InputError(
                    f"{meta_path}: tensor '{key}': its chunks do not cover rows {top}:{bottom} "
                    "exactly once"
                )


class _ChunkUnpickler(pickle.Unpickler):
    """Reads a `torch.save` archive's data.pkl for one tensor over one storage, nothing else."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _TensorRecord
        if module == "collections" and name == "OrderedDict":
            return OrderedDict
        if module == "torch" and name.endswith("Storage"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # TypedStorage's deprecation notice
                dtype = getattr(getattr(torch, name, None), "dtype", None)
            if isinstance(dtype, torch.dtype):
                return dtype
        raise _Refused(f"{module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError("unexpected persistent id")
        _, dtype, key, _location, numel = pid
        return (dtype, str(key), int(numel))


class _TensorRecord:
    """What `_rebuild_tensor_v2` was called with: storage, offset, size, stride."""

    def __init__(self, storage: Any, offset: int, size: Any, stride: Any, *_rest: Any) -> None:
        self.storage = storage
        self.offset = int(offset)
        self.size = tuple(int(v) for v in size)
        self.stride = tuple(int(v) for v in stride)


class _Window(io.RawIOBase):
    """A read-only seekable view of bytes start:start+length of a file."""

    def __init__(self, path: Path, start: int, length: int) -> None:
        self._file = open(path, "rb")  # noqa: SIM115  (closed by close())
        self._start, self._length, self._pos = start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, pos: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self._length}[whence]
        self._pos = max(0, base + pos)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def readinto(self, buffer: Any) -> int:
        size = max(0, min(len(buffer), self._length - self._pos))
        data = os.pread(self._file.fileno(), size, self._start + self._pos)
        buffer[: len(data)] = data
        self._pos += len(data)
        return len(data)

    def close(self) -> None:
        self._file.close()
        super().close()


def _locate_storage(chunk: _Chunk, key: str, dtype: torch.dtype) -> _Storage:
    """Returns where the chunk's tensor data lies in its file, from the archive's records.

    Raises InputError when the byte range is not a `torch.save` archive of one tensor of the
    chunk's size and dtype.
    """
    where = f"{chunk.file}: tensor '{key}' chunk at {list(chunk.offsets)}"
    window = _Window(chunk.file, chunk.start, chunk.length)
    try:
        archive = zipfile.ZipFile(window)
        names = archive.namelist()
        pkl = next((n for n in names if n.endswith("/data.pkl") or n == "data.pkl"), None)
        if pkl is None:
            raise InputError(f"{where}: not a torch archive (no data.pkl)")
        prefix = pkl[: -len("data.pkl")]
        order = f"{prefix}byteorder"
        if order in names and archive.read(order) != b"little":
            raise InputError(f"{where}: big-endian data is not supported")
        record = _ChunkUnpickler(io.BytesIO(archive.read(pkl))).load()
        if not isinstance(record, _TensorRecord):
            raise InputError(f"{where}: does not hold a tensor")
        stored_dtype, storage_key, numel = record.storage
        if stored_dtype != dtype or record.size != chunk.sizes:
            raise InputError(
                f"{where}: holds {dtype_name(stored_dtype)} {list(record.size)}, the metadata "
                f"says {dtype_name(dtype)} {list(chunk.sizes)}"
            )
        entry = archive.getinfo(f"{prefix}data/{storage_key}")
        itemsize = torch.empty((), dtype=dtype).element_size()
        if entry.compress_type != zipfile.ZIP_STORED or entry.file_size != numel * itemsize:
            raise InputError(f"{where}: storage record is compressed or of the wrong size")
        header = _ZIP_LOCAL_HEADER.unpack(
            bytes(_pread(chunk.file, chunk.start + entry.header_offset, _ZIP_LOCAL_HEADER.size))
        )
        data = chunk.start + entry.header_offset + _ZIP_LOCAL_HEADER.size + header[9] + header[10]
        contiguous = _is_contiguous(record.size, record.stride)
        extent = record.offset + math.prod(record.size)
        if extent > numel or data + numel * itemsize > chunk.start + chunk.length:
            raise InputError(f"{where}: storage is shorter than the tensor")
        return _Storage(data + record.offset * itemsize, contiguous)
    except _Refused as refused:
        raise InputError(f"{where}: chunk pickle needs '{refused}'; not a plain tensor") from None
    except (
        zipfile.BadZipFile,
        KeyError,
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
    ) as error:
        raise InputError(f"{where}: corrupt chunk ({first_line(error)})") from None
    finally:
        window.close()


def _is_contiguous(size: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    expected = 1
    for side, step in zip(reversed(size), reversed(stride), strict=True):
        if side != 1 and step != expected:
            return False
        expected *= side
    return True


def _load_chunk(chunk: _Chunk, key: str) -> torch.Tensor:
    """Returns the chunk's tensor loaded whole with `torch.load(weights_only=True)`."""
    window = _Window(chunk.file, chunk.start, chunk.length)
    try:
        return torch.load(io.BufferedReader(window), map_location="cpu", weights_only=True)
    except Exception as error:
        raise InputError(
            f"{chunk.file}: tensor '{key}': corrupt chunk ({first_line(error)})"
        ) from None
    finally:
        window.close()


class _NotKept:
    """A non-tensor entry that would not load with `weights_only` (listed as not kept)."""

    def __repr__(self) -> str:
        return "<not loadable with weights_only>"


def _load_bytes(folder: Path, info: Any, meta_path: Path, sizes: dict[Path, int]) -> Any:
    """Returns a non-tensor entry (DCP stores it with torch.save), loaded with weights_only."""
    file = _data_file(folder, info, meta_path, sizes)
    raw = bytes(_pread(file, int(info.offset), int(info.length)))
    try:
        return torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception:
        return _NotKept()
