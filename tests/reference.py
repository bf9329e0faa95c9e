"""torch.ao's post_training_sparse_quantize as the test oracle (missing: fails in CI, skips elsewhere)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from tests.conftest import import_oracle

ao_quant = import_oracle("torch.ao.quantization")
data_sparsifier = import_oracle("torch.ao.pruning._experimental.data_sparsifier")
quantization_utils = import_oracle(
    "torch.ao.pruning._experimental.data_sparsifier.quantization_utils"
)


@dataclass
class ReferenceResult:
    """What the reference produced for one table: dense codes, qparams and its keep-mask."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor
    keep_mask: torch.Tensor
    state_dict: dict


def unpack_quint4x2(packed: torch.Tensor, n_values: int) -> torch.Tensor:
    """Returns the 4-bit codes of a quint4x2 int_repr, first code in the low nibble."""
    flat = packed.reshape(-1)
    return torch.stack([flat & 15, flat >> 4], dim=1).reshape(-1)[:n_values]


def sparsifier_keep_mask(
    data: torch.Tensor,
    level: float,
    block_shape: tuple[int, int],
    zeros_per_block: int | None,
    norm: str,
) -> torch.Tensor:
    """Returns the bool keep-mask DataNormSparsifier computes for `data`."""
    zeros = block_shape[0] * block_shape[1] if zeros_per_block is None else zeros_per_block
    sparsifier = data_sparsifier.DataNormSparsifier(
        sparsity_level=level, sparse_block_shape=block_shape, zeros_per_block=zeros, norm=norm
    )
    sparsifier.add_data("table", data.clone())
    sparsifier.step()
    return sparsifier.get_mask("table").bool()


def run_reference(
    table: torch.Tensor,
    *,
    sparsify_first: bool,
    bits: int,
    level: float,
    block_shape: tuple[int, int],
    zeros_per_block: int | None = None,
    norm: str = "L1",
    module: type[nn.Module] = nn.Embedding,
    monkeypatch: pytest.MonkeyPatch,
) -> ReferenceResult:
    """Runs post_training_sparse_quantize on a one-table model and returns its result."""
    rows, cols = table.shape
    model = nn.Sequential(module(rows, cols))
    with torch.no_grad():
        model[0].weight.copy_(table)
    if bits == 4:
        # The reference hard-codes the 8-bit qconfig and reads it at call time.
        monkeypatch.setattr(
            ao_quant,
            "float_qparams_weight_only_qconfig",
            ao_quant.float_qparams_weight_only_qconfig_4bit,
        )
    zeros = block_shape[0] * block_shape[1] if zeros_per_block is None else zeros_per_block
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantization_utils.post_training_sparse_quantize(
            model,
            data_sparsifier.DataNormSparsifier,
            sparsify_first=sparsify_first,
            sparsity_level=level,
            sparse_block_shape=block_shape,
            zeros_per_block=zeros,
            norm=norm,
        )
        weight = model[0].weight()
        # clone: these views do not keep the quantized tensor's storage alive
        scale = weight.q_per_channel_scales().clone()
        zero_point = weight.q_per_channel_zero_points().clone()
        if bits == 4:
            codes = unpack_quint4x2(weight.int_repr(), rows * cols).view(rows, cols)
        else:
            codes = weight.int_repr()
        if sparsify_first:
            sparsified = table
        else:
            dtype = torch.quint8 if bits == 8 else torch.quint4x2
            sparsified = torch.dequantize(
                torch.quantize_per_channel(table, scale, zero_point, 0, dtype)
            )
        keep = sparsifier_keep_mask(sparsified, level, block_shape, zeros_per_block, norm)
    return ReferenceResult(codes, scale, zero_point, keep, model.state_dict())
