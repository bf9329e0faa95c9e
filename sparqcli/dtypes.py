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
    """A tensor dtype as sparq knows it: torch's name (`float32`), safetensors' code (`F32`;
    None where safetensors cannot hold it), bits per value."""

    name: str
    safetensors: str | None
    bits: int
    floating: bool = False

    @property
    def itemsize(self) -> int:
        """Returns the bytes of one value (dtypes of whole bytes)."""
        return self.bits // 8


DTYPES: tuple[DType, ...] = (
    DType("float32", "F32", 32, floating=True),
    DType("float16", "F16", 16, floating=True),
    DType("bfloat16", "BF16", 16, floating=True),
    DType("float64", "F64", 64, floating=True),
    DType("int64", "I64", 64),
    DType("int32", "I32", 32),
    DType("int16", "I16", 16),
    DType("int8", "I8", 8),
    DType("uint64", "U64", 64),
    DType("uint32", "U32", 32),
    DType("uint16", "U16", 16),
    DType("uint8", "U8", 8),
    DType("bool", "BOOL", 8),
    DType("float8_e4m3fn", "F8_E4M3", 8),
    DType("float8_e5m2", "F8_E5M2", 8),
    DType("float8_e4m3fnuz", "F8_E4M3FNUZ", 8),
    DType("float8_e5m2fnuz", "F8_E5M2FNUZ", 8),
    DType("float8_e8m0fnu", "F8_E8M0", 8),
    DType("complex64", "C64", 64),
    # torch only (in .pt files, e.g. torch.ao's quantized embeddings): listed, passed through
    DType("complex128", None, 128),
    DType("quint8", None, 8),
    DType("qint8", None, 8),
    DType("qint32", None, 32),
    DType("quint4x2", None, 4),
    DType("quint2x4", None, 2),
)
BY_NAME: dict[str, DType] = {dtype.name: dtype for dtype in DTYPES}
BY_SAFETENSORS: dict[str, DType] = {
    dtype.safetensors: dtype for dtype in DTYPES if dtype.safetensors is not None
}
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
    layout: str = "strided"
    """torch's layout name: `strided` (dense), or `sparse_coo`, `sparse_csr`, ..."""

    @property
    def is_table(self) -> bool:
        """Returns True for a dense 2-D floating tensor, the only kind sparq compresses."""
        return len(self.shape) == 2 and self.dtype in TABLE_DTYPES and self.layout == "strided"

    @property
    def nbytes(self) -> int:
        """Returns the bytes of the tensor's values held densely (sub-byte dtypes packed)."""
        return -(-math.prod(self.shape) * BY_NAME[self.dtype].bits // 8)

    def describe(self) -> str:
        """Returns the shape and dtype as messages show them, e.g. `shape [10], float32` (and
        the layout where it is not dense: `shape [10, 4], float32, sparse_coo`)."""
        text = f"shape [{', '.join(str(side) for side in self.shape)}], {self.dtype}"
        return text if self.layout == "strided" else f"{text}, {self.layout}"
