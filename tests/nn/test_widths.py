"""The kernel and the fallback at every code width 1..8 (the format's continuous LSB-first
packing), built by hand: the engine may not offer every width yet."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sparqcli.format import pack_bits
from sparqcli.nn import Embedding, EmbeddingBag
from sparqcli.nn._storage import Layout


def _pack(codes: list[int], bits: int) -> torch.Tensor:
    """Packs codes continuously, LSB first (docs/FORMAT.md, "Code packing")."""
    value = 0
    for index, code in enumerate(codes):
        value |= code << (index * bits)
    n_bytes = (len(codes) * bits + 7) // 8
    return torch.tensor(list(value.to_bytes(n_bytes, "little")), dtype=torch.uint8)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize(
    ("mask", "block_shape"), [("none", (1, 1)), ("block", (2, 3)), ("value", (1, 1))]
)
def test_every_width(backend: str, bits: int, mask: str, block_shape: tuple[int, int]) -> None:
    rows, cols = 23, 11
    generator = torch.Generator().manual_seed(bits)
    if mask == "block":
        grid = (-(-rows // block_shape[0]), -(-cols // block_shape[1]))
        blocks = torch.rand(grid, generator=generator) < 0.6
        keep = blocks.repeat_interleave(block_shape[0], 0).repeat_interleave(block_shape[1], 1)
        keep = keep[:rows, :cols]
        packed_mask = pack_bits(blocks)
    elif mask == "value":
        keep = torch.rand(rows, cols, generator=generator) < 0.6
        packed_mask = pack_bits(keep)
    else:
        keep = torch.ones(rows, cols, dtype=torch.bool)
        packed_mask = torch.zeros(0, dtype=torch.uint8)
    kept = int(keep.sum())
    codes = torch.randint(0, 1 << bits, (kept,), generator=generator)
    scale = torch.rand(rows, generator=generator) + 0.01
    zero_point = torch.rand(rows, generator=generator) * (1 << bits)
    layout = Layout(
        rows=rows,
        cols=cols,
        dtype=torch.float32,
        bits=bits,
        mask=mask,  # type: ignore[arg-type]
        block_shape=block_shape,
        kept=kept,
        level=0.4,
        order="sparsify-first",
    )
    tensors = {
        "codes": _pack(codes.tolist(), bits),
        "scale": scale,
        "zero_point": zero_point,
        "mask": packed_mask,
    }
    dense_codes = torch.zeros(rows, cols)
    dense_codes[keep] = codes.float()
    decoded = torch.where(keep, (dense_codes - zero_point[:, None]) * scale[:, None], 0.0)

    embedding = Embedding(layout, tensors, padding_idx=None, device=None, source="test")
    indices = torch.randint(0, rows, (40,), generator=generator)
    assert torch.equal(embedding(indices), F.embedding(indices, decoded))
    bag = EmbeddingBag(layout, tensors, mode="max")
    offsets = torch.tensor([0, 5, 5, 17])
    assert torch.equal(
        bag(indices, offsets), F.embedding_bag(indices, decoded, offsets, mode="max")
    )
    summed = EmbeddingBag(layout, tensors, mode="sum")
    assert torch.equal(
        summed(indices, offsets), F.embedding_bag(indices, decoded, offsets, mode="sum")
    )
