"""The one table of tensor dtypes: torch's name, safetensors' code, item size; and `TensorInfo`.

Importing this module does not import torch (`torch_dtype` imports it when called).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class DType:
    """A tensor dtype as sparq knows it: torch's name (`float32`), safetensors' code (`F32`)."""

    name: str
    safetensors: str
    itemsize: int
    floating: bool = False


DTYPES: tuple[DType, ...] = (
    DType("float32", "F32", 4, floating=True),
    DType("float16", "F16", 2, floating=True),
    DType("bfloat16", "BF16", 2, floating=True),
    DType("float64", "F64", 8, floating=True),
    DType("int64", "I64", 8),
    DType("int32", "I32", 4),
    DType("int16", "I16", 2),
    DType("int8", "I8", 1),
    DType("uint64", "U64", 8),
    DType("uint32", "U32", 4),
    DType("uint16", "U16", 2),
    DType("uint8", "U8", 1),
    DType("bool", "BOOL", 1),
    DType("float8_e4m3fn", "F8_E4M3", 1),
    DType("float8_e5m2", "F8_E5M2", 1),
    DType("float8_e4m3fnuz", "F8_E4M3FNUZ", 1),
    DType("float8_e5m2fnuz", "F8_E5M2FNUZ", 1),
    DType("float8_e8m0fnu", "F8_E8M0", 1),
    DType("complex64", "C64", 8),
)
BY_NAME: dict[str, DType] = {dtype.name: dtype for dtype in DTYPES}
BY_SAFETENSORS: dict[str, DType] = {dtype.safetensors: dtype for dtype in DTYPES}
# The dtypes a table may have (2-D floating tensors; computed in float32, decoded back).
TABLE_DTYPES: tuple[str, ...] = tuple(dtype.name for dtype in DTYPES if dtype.floating)


def dtype_name(dtype: torch.dtype) -> str:
    """Returns torch's name of `dtype` without the `torch.` prefix (`float32`)."""
    return str(dtype).removeprefix("torch.")


def torch_dtype(name: str) -> torch.dtype:
    """Returns the torch dtype called `name` (`float32`). Raises KeyError for an unknown name."""
    import torch

    if name not in BY_NAME:
        raise KeyError(name)
    return getattr(torch, name)


@dataclass(frozen=True)
class TensorInfo:
    """A stored tensor's shape and dtype name (`float32`, `int64`), without its data."""

    shape: tuple[int, ...]
    dtype: str

    @property
    def is_table(self) -> bool:
        """Returns True for a 2-D floating tensor, the only kind sparq compresses."""
        return len(self.shape) == 2 and self.dtype in TABLE_DTYPES

    @property
    def nbytes(self) -> int:
        """Returns the bytes of the tensor's data."""
        return math.prod(self.shape) * BY_NAME[self.dtype].itemsize

    def describe(self) -> str:
        """Returns the shape and dtype as messages show them, e.g. `shape [10], float32`."""
        return f"shape [{', '.join(str(side) for side in self.shape)}], {self.dtype}"
