"""`.safetensors` inputs: the header validated by the safetensors library, rows read in place.

Tensors are read with positioned reads (`preadv`) straight into the caller's buffers, not a
memory map: pages of a mapped file count towards resident memory, so mapping a 4 GiB input
would make a 2 GiB bound impossible.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import struct
from pathlib import Path
from typing import Any

import torch

from sparqcli.dtypes import BY_SAFETENSORS, TensorInfo, torch_dtype
from sparqcli.errors import InputError, first_line
from sparqcli.sources import Checkpoint

_MAX_HEADER_BYTES = 100 << 20


class SafetensorsCheckpoint(Checkpoint):
    """A `.safetensors` file: tensors located by their byte offsets, read on demand."""

    def __init__(
        self,
        path: Path,
        tensors: dict[str, TensorInfo],
        offsets: dict[str, int],
        metadata: dict[str, str],
    ) -> None:
        super().__init__(path, "safetensors", tensors, metadata=metadata)
        self.file = path
        self._offsets = offsets

    @classmethod
    def open(cls, path: Path) -> SafetensorsCheckpoint:
        """Returns the checkpoint of the safetensors file `path`, reading its header only.

        Raises InputError when it is not a valid safetensors file or holds an unknown dtype.
        """
        header = read_safetensors_header(path)
        metadata = header.pop("__metadata__", None) or {}
        data_start = 8 + _header_length(path)
        tensors: dict[str, TensorInfo] = {}
        offsets: dict[str, int] = {}
        for name, entry in sorted(header.items()):
            tensors[name] = TensorInfo(tuple(entry["shape"]), BY_SAFETENSORS[entry["dtype"]].name)
            offsets[name] = data_start + entry["data_offsets"][0]
        return cls(path, tensors, offsets, metadata)

    def read_rows(
        self, key: str, start: int, stop: int, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Returns rows `start:stop` of tensor `key`, read into `out` when given.

        Raises InputError when the file is short or unreadable, ValueError for an `out` that is
        not a contiguous CPU tensor of the tensor's dtype.
        """
        info = self.tensors[key]
        rows = rows_buffer(info, start, stop, out)
        if rows.numel():
            offset = self._offsets[key] + start * math.prod(info.shape[1:]) * rows.element_size()
            _pread_into(self.file, offset, rows)
        return rows

    def tensor(self, key: str) -> torch.Tensor:
        """Returns the whole tensor `key`. Raises InputError when unreadable."""
        info = self.tensors[key]
        if info.shape:
            return self.read_rows(key, 0, info.shape[0])
        value = torch.empty((), dtype=torch_dtype(info.dtype))
        _pread_into(self.file, self._offsets[key], value)
        return value


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """Returns the JSON header of a safetensors file, validated by the safetensors library.

    Raises InputError when the file is not a valid safetensors file.
    """
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt"):
            pass
    except (SafetensorError, OSError, ValueError) as error:
        raise InputError(f"{path}: not a valid safetensors file ({first_line(error)})") from None
    length = _header_length(path)
    try:
        header = json.loads(_pread(path, 8, length))
    except ValueError as error:
        raise InputError(f"{path}: not a valid safetensors file ({first_line(error)})") from None
    for name, entry in header.items():
        if name != "__metadata__" and entry.get("dtype") not in BY_SAFETENSORS:
            raise InputError(f"{path}: tensor '{name}' has unsupported dtype {entry.get('dtype')}")
    return header


def _header_length(path: Path) -> int:
    raw = _pread(path, 0, 8)
    if len(raw) < 8:
        raise InputError(f"{path}: not a valid safetensors file (shorter than its header)")
    (length,) = struct.unpack("<Q", raw)
    if length > _MAX_HEADER_BYTES:
        raise InputError(f"{path}: not a valid safetensors file (header claims {length} bytes)")
    return length


def _pread(path: Path, offset: int, size: int) -> bytearray:
    """Returns `size` bytes of `path` from `offset`. Raises InputError when short or unreadable."""
    buffer = bytearray(size)
    _pread_view(path, offset, memoryview(buffer))
    return buffer


def rows_buffer(info: TensorInfo, start: int, stop: int, out: torch.Tensor | None) -> torch.Tensor:
    """Returns the tensor that rows `start:stop` of a tensor described by `info` are read into:
    the front of `out` viewed in their shape, or a new one. Raises ValueError for an `out` that
    is not a contiguous CPU tensor of the tensor's dtype."""
    shape = (stop - start, *info.shape[1:])
    dtype = torch_dtype(info.dtype)
    if out is None:
        return torch.empty(shape, dtype=dtype)
    if not (out.dtype == dtype and out.is_contiguous() and out.device.type == "cpu"):
        raise ValueError(f"out must be a contiguous CPU {info.dtype} tensor")
    return out.view(-1)[: math.prod(shape)].view(shape)


def _pread_into(path: Path, offset: int, target: torch.Tensor) -> None:
    """Fills the contiguous CPU tensor `target` with the bytes of `path` from `offset`."""
    size = target.numel() * target.element_size()
    _pread_view(path, offset, memoryview((ctypes.c_char * size).from_address(target.data_ptr())))


def _pread_view(path: Path, offset: int, view: memoryview) -> None:
    view = view.cast("B")
    size = len(view)
    try:
        with open(path, "rb", buffering=0) as file:
            done = 0
            while done < size:
                count = os.preadv(file.fileno(), [view[done:]], offset + done)
                if count == 0:
                    raise InputError(
                        f"{path}: truncated (expected {size} bytes at offset {offset})"
                    )
                done += count
    except OSError as error:
        raise InputError(f"{path}: cannot read: {error.strerror}") from None
