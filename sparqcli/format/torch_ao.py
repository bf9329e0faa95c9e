"""The torch-ao output format: the state dict torch.ao's converted model has.

torch.ao itself is imported by nothing here: the reference's quantized tensors are built with
torch core functions.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch

from sparqcli.engine.table import CompressedTable
from sparqcli.errors import OutputError, UsageError
from sparqcli.format.packing import pack_codes

if TYPE_CHECKING:
    from sparqcli.engine.stats import TableStats


def _module_prefix(key: str) -> str:
    if key == "weight":
        return ""
    if key.endswith(".weight"):
        return key[: -len("weight")]
    raise UsageError(
        f"table '{key}': {{opt:output_format=torch-ao}} needs a module weight key ending in "
        "'.weight'",
        table=key,
    )


def _quint4x2_per_channel(
    key: str, codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor
) -> torch.Tensor:
    """Returns a per-channel float-qparams quint4x2 tensor whose int_repr packs `codes`."""
    rows, cols = codes.shape
    packed = pack_codes(codes, 4)
    quantized = torch._empty_per_channel_affine_quantized(
        [rows, cols], scales=scale, zero_points=zero_point, axis=0, dtype=torch.quint4x2
    )
    storage = quantized.untyped_storage()
    if storage.nbytes() != packed.numel():
        raise OutputError(
            f"table '{key}': this torch stores quint4x2 in {storage.nbytes()} bytes, "
            f"expected {packed.numel()}; cannot write torch-ao 4-bit output"
        )
    if packed.numel():
        storage.copy_(packed.untyped_storage())
    return quantized


def torch_ao_keys(key: str) -> tuple[str, str]:
    """Returns the keys table `key` (`<module>.weight`) becomes: the packed weight and its dtype.

    Raises UsageError for a key not ending in `.weight`.
    """
    prefix = _module_prefix(key)
    return f"{prefix}_packed_params._packed_weight", f"{prefix}_packed_params.dtype"


def torch_ao_problem(subject: str, bits: int, cols: int | None = None) -> str | None:
    """Returns why the torch-ao format cannot hold a table, as `subject: reason`, or None.

    torch.ao's embeddings are 8-bit (quint8) or 4-bit (quint4x2), the latter with an even
    number of columns (`cols` None: not known yet). `subject` names the table
    (`table 'emb.weight'`) or the setting (`layers[0].quantization.bits`).
    """
    option = "{opt:output_format=torch-ao}"
    if bits not in (8, 4):
        return (
            f"{subject}: {option} supports 8 and 4 bits; torch.ao has no {bits}-bit embedding "
            "(use the sparq format)"
        )
    if bits == 4 and cols is not None and cols % 2:
        return (
            f"{subject}: {option} at 4 bits needs an even number of columns, got {cols} "
            "(torch.ao's quint4x2 embeddings mis-pack odd widths)"
        )
    return None


def check_torch_ao_table(key: str, shape: tuple[int, ...], bits: int) -> None:
    """Checks that table `key` of `shape` at `bits` can be written in the torch-ao format.

    Run before any compression work, so that a run never fails at write time. Raises
    UsageError for widths other than 8 and 4 (torch.ao has no other embedding), 4 bits with an
    odd number of columns (torch.ao mis-packs those) or a key not ending in `.weight`.
    """
    problem = torch_ao_problem(f"table '{key}'", bits, shape[1])
    if problem is not None:
        raise UsageError(problem, table=key)
    _module_prefix(key)


def torch_ao_state_dict(
    tables: Mapping[str, CompressedTable], passthrough: Mapping[str, torch.Tensor]
) -> dict[str, Any]:
    """Returns the state dict torch.ao's converted model has, for `--format torch-ao`.

    Each table `<module>.weight` becomes `<module>._packed_params._packed_weight` (a per-channel
    float-qparams quantized tensor, axis 0: torch.quint8 at 8 bits, torch.quint4x2 at 4 bits,
    int_repr = the dense codes, pruned values holding the code of 0.0) and
    `<module>._packed_params.dtype`. Pass-through tensors are returned unchanged. The result is
    dense and decodes pruned values to `(round(zp) - zp) * scale`, as the reference does.
    Raises UsageError for a 2-bit table, a 4-bit table with an odd number of columns (torch.ao
    mis-packs those) or a key not ending in `.weight`; OutputError when a produced key collides
    with a pass-through key.
    """
    state: dict[str, Any] = dict(passthrough)
    for key, table in tables.items():
        bits = table.quantization.bits
        check_torch_ao_table(key, table.shape, bits)
        names = torch_ao_keys(key)
        for name in (key, *names):
            if name in state:
                raise OutputError(
                    f"table '{key}': torch-ao key '{name}' collides with a tensor of the checkpoint"
                )
        codes = table.dense_codes().cpu()
        scale = table.scale.float().cpu().contiguous()
        zero_point = table.zero_point.float().cpu().contiguous()
        if bits == 8:
            weight = torch._make_per_channel_quantized_tensor(codes, scale, zero_point, 0)
            dtype = torch.quint8
        else:
            weight = _quint4x2_per_channel(key, codes, scale, zero_point)
            dtype = torch.quint4x2
        state[names[0]] = weight
        state[names[1]] = dtype
    return state


_STATS_CHUNK_VALUES = 1 << 20
"""Values `torch_ao_stats` decodes at a time."""


def torch_ao_stats(
    table: CompressedTable,
    read_rows: Callable[[int, int], torch.Tensor],
    kept: int,
) -> TableStats:
    """Returns the statistics of `table` as the torch-ao output decodes it: pruned values hold the
    code of 0.0 and decode to `(round(zp) - zp) * scale`, not to exactly 0.0 as the sparq format
    decodes them. `read_rows(start, stop)` gives the original rows; `kept` is the kept-value
    count (the sparsity's, unchanged)."""
    from sparqcli.engine.quantize import dequantize
    from sparqcli.engine.stats import StatsAccumulator

    rows, cols = table.shape
    codes = table.dense_codes().cpu()
    scale = table.scale.float().cpu()
    zero_point = table.zero_point.float().cpu()
    accumulator = StatsAccumulator(rows, cols, torch.device("cpu"))
    step = max(1, _STATS_CHUNK_VALUES // max(1, cols))
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        original = read_rows(start, stop).to("cpu", torch.float32)
        decoded = dequantize(codes[start:stop], scale[start:stop], zero_point[start:stop])
        accumulator.add(start, original, decoded)
    return accumulator.finish(scale, zero_point, kept)
