"""The format's constants and size rules: what a table stores and how many bytes it takes.

Importing this module does not import torch.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, Literal

from sparqcli.dtypes import BY_NAME
from sparqcli.engine.blocks import block_grid

if TYPE_CHECKING:
    from sparqcli.engine.table import CompressedTable

FORMAT_VERSION = 2
"""The newest format version this sparq reads and writes."""
ALIASES_VERSION = 2
"""The first version whose tables may list aliases; a file without aliases is written as 1."""
METADATA_KEY = "sparq"
PARTS: tuple[str, ...] = ("codes", "scale", "zero_point", "mask")
MASK_KINDS: tuple[str, ...] = ("block", "value", "none")
MaskKind = Literal["block", "value", "none"]


def check_bits(bits: int) -> None:
    """Raises ValueError unless `bits` is a code width the format stores."""
    if not isinstance(bits, int) or isinstance(bits, bool) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an integer from 1 to 8, got {bits!r}")


def packed_size(n_codes: int, bits: int) -> int:
    """Returns the bytes `n_codes` codes of `bits` bits take packed: ceil(n_codes * bits / 8).

    Raises ValueError for bits outside 1..8 or a negative count.
    """
    check_bits(bits)
    if n_codes < 0:
        raise ValueError(f"n_codes must not be negative, got {n_codes}")
    return (n_codes * bits + 7) // 8


def mask_values(kind: MaskKind, shape: tuple[int, int], block_shape: tuple[int, int]) -> int:
    """Returns the number of mask bits a table of `shape` stores for a mask of `kind`."""
    if kind == "none":
        return 0
    if kind == "value":
        return shape[0] * shape[1]
    block_rows, block_cols = block_grid(shape, block_shape)
    return block_rows * block_cols


def mask_kind(table: CompressedTable) -> MaskKind:
    """Returns the kind of keep-mask `table` stores: block, value or none."""
    if table.keep_mask is None:
        return "none"
    return "block" if table.mask_per_block else "value"


def part_sizes(
    shape: tuple[int, int], kept: int, bits: int, mask: MaskKind, block_shape: tuple[int, int]
) -> dict[str, int]:
    """Returns the element count of each stored tensor of a table (all 1-D), keyed by part."""
    sizes = {
        "codes": packed_size(kept, bits),
        "scale": shape[0],
        "zero_point": shape[0],
    }
    if mask != "none":
        sizes["mask"] = (mask_values(mask, shape, block_shape) + 7) // 8
    return sizes


def file_bytes(sizes: Mapping[str, int], scale_dtype: str) -> int:
    """Returns the bytes of a table's stored tensors, given `part_sizes` and its scale dtype."""
    scale_bytes = BY_NAME[scale_dtype].itemsize
    return sum(
        count * (scale_bytes if part in ("scale", "zero_point") else 1)
        for part, count in sizes.items()
    )


def table_file_bytes(table: CompressedTable) -> int:
    """Returns the bytes `table`'s tensors take in a sparq file (codes, scale, zero point, mask).

    That is ceil(kept * bits / 8) + 2 * rows * (4, or 2 for float16 scales) + ceil(mask bits / 8),
    not counting the file header.
    """
    sizes = part_sizes(
        table.shape,
        int(table.codes.numel()),
        table.quantization.bits,
        mask_kind(table),
        table.sparsity.block_shape,
    )
    return file_bytes(sizes, table.quantization.scale_dtype)


def reserved_owner(key: str, tables: Mapping[str, Any], *, itself: bool = True) -> str | None:
    """Returns the table whose namespace (`K` or `K.*`) holds `key`, or None.

    With `itself` False, `key` does not count as its own owner (for table keys).
    """
    for index, char in enumerate(key):
        if char == "." and key[:index] in tables:
            return key[:index]
    return key if itself and key in tables else None


def checkpoint_collision(
    keys: Iterable[str], tables: Mapping[str, Any], aliases: Iterable[str]
) -> str | None:
    """Returns why a sparq file cannot hold a checkpoint of `keys` whose `tables` are compressed
    and whose `aliases` (other keys of tied tables) are stored as references, or None: the
    `key_collision` of every other key and the aliases."""
    alias_keys = set(aliases)
    passthrough = [key for key in keys if key not in tables and key not in alias_keys]
    return key_collision([*passthrough, *sorted(alias_keys)], tables)


def key_collision(passthrough: Iterable[str], tables: Mapping[str, Any]) -> str | None:
    """Returns why a sparq file cannot hold these keys, or None.

    A compressed table `K` owns `K` and every `K.*` key; no pass-through tensor and no other
    table may lie there.
    """
    for key, is_table in [(k, False) for k in passthrough] + [(k, True) for k in tables]:
        owner = reserved_owner(key, tables, itself=not is_table)
        if owner is not None:
            return (
                f"key '{key}' collides with compressed table '{owner}' "
                f"(keys '{owner}' and '{owner}.*' are reserved for its parts)"
            )
    return None
