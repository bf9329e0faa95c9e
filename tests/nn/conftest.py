"""Fixtures for sparqcli.nn: both lookup backends, and small compressed tables and files."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from sparqcli.engine.pipeline import compress_table
from sparqcli.engine.table import CompressedTable
from sparqcli.format import write_compressed
from sparqcli.nn import _kernel
from sparqcli.settings import Quantization, Sparsity

HAS_COMPILER = shutil.which("c++") is not None and shutil.which("ninja") is not None


@pytest.fixture(params=["kernel", "torch"])
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Runs a test with the compiled kernel and with the tensor-op fallback."""
    if request.param == "kernel":
        if not HAS_COMPILER or not _kernel.LOOKUP_KERNEL.enabled():
            pytest.skip("no C++ compiler / ninja, or SPARQ_NN_KERNEL=off")
        if _kernel.kernel() is None:
            pytest.fail("the kernel did not build on a machine with a compiler")
    else:
        monkeypatch.setattr(_kernel.LOOKUP_KERNEL, "_module", [None])
    yield request.param


def make_table(
    rows: int = 40,
    cols: int = 12,
    *,
    level: float = 0.5,
    block_shape: tuple[int, int] = (1, 4),
    zeros_per_block: int | None = None,
    bits: int = 8,
    scale_dtype: str = "float32",
    order: str = "sparsify-first",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> CompressedTable:
    """Returns a compressed table of seeded N(0, 1) values (rows scaled differently)."""
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(rows, cols, generator=generator)
    values *= torch.rand(rows, 1, generator=generator) * 2 + 0.1
    table, _ = compress_table(
        values.to(dtype),
        order,  # type: ignore[arg-type]
        Sparsity(level, block_shape, zeros_per_block),
        Quantization(bits, scale_dtype),  # type: ignore[arg-type]
    )
    return table


def write_tables(
    path: Path, tables: dict[str, CompressedTable], **passthrough: torch.Tensor
) -> Path:
    """Writes `tables` (and pass-through tensors) as a sparq file at `path`; returns `path`."""
    write_compressed(path, passthrough, tables)
    return path
