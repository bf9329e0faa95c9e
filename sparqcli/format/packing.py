"""Codes and keep-masks to and from bytes (docs/FORMAT.md, "Code packing" and "Keep-mask")."""

from __future__ import annotations

import torch

from sparqcli.format.spec import check_bits, packed_size


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Returns uint8 codes (any shape, read row-major) packed continuously, LSB first, 1-D uint8.

    Code i occupies bits i * bits .. i * bits + bits - 1 of the stream, bit k of the stream
    being bit k % 8 of byte k // 8; at 3, 5, 6 and 7 bits a code can straddle two bytes. The
    first code of a byte takes its lowest bits (4 bits: the low nibble, as torch.quint4x2); the
    last byte is zero-padded. Raises ValueError for non-uint8 codes, bits outside 1..8, or a
    code that does not fit `bits`.
    """
    check_bits(bits)
    if codes.dtype != torch.uint8:
        raise ValueError(f"codes must be uint8, got {codes.dtype}")
    flat = codes.reshape(-1)
    if bits == 8:
        return flat.contiguous()
    if flat.numel() and int(flat.max()) >> bits:
        raise ValueError(f"codes must be below {1 << bits} for {bits} bits")
    if 8 % bits:
        return _pack_groups(flat, bits)
    per_byte = 8 // bits
    pad = -flat.numel() % per_byte
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    slots = flat.view(-1, per_byte)
    packed = slots[:, 0].clone()
    for slot in range(1, per_byte):
        packed |= slots[:, slot] << (slot * bits)
    return packed


def unpack_codes(packed: torch.Tensor, bits: int, n_codes: int) -> torch.Tensor:
    """Returns the first `n_codes` codes of a packed 1-D uint8 stream, one per byte (1-D uint8).

    Raises ValueError when `packed` is not uint8 or its length is not `packed_size(n_codes, bits)`.
    """
    expected = packed_size(n_codes, bits)
    if packed.dtype != torch.uint8 or packed.numel() != expected:
        raise ValueError(
            f"packed codes must be {expected} uint8 bytes, got {packed.numel()} {packed.dtype}"
        )
    flat = packed.reshape(-1)
    if bits == 8:
        return flat
    if 8 % bits:
        return _unpack_groups(flat, bits, n_codes)
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=flat.device)
    codes = (flat[:, None] >> shifts) & ((1 << bits) - 1)
    return codes.reshape(-1)[:n_codes]


# Codes packed per group of 8 (8 * bits bits, a whole number of bytes) at a time, so that the
# int64 temporaries stay bounded whatever the number of codes.
_GROUPS_PER_STEP = 1 << 20


def _pack_groups(flat: torch.Tensor, bits: int) -> torch.Tensor:
    """Returns 1-D uint8 codes packed at a width that does not divide 8 (3, 5, 6, 7 bits).

    Every 8 codes fill exactly `bits` bytes: they are gathered into one int64 (code k at bit
    k * bits) whose low `bits` bytes, least significant first, are the packed bytes.
    """
    n_codes = flat.numel()
    pad = -n_codes % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    groups = flat.view(-1, 8)
    out = torch.empty((groups.shape[0], bits), dtype=torch.uint8, device=flat.device)
    for start in range(0, groups.shape[0], _GROUPS_PER_STEP):
        part = groups[start : start + _GROUPS_PER_STEP].to(torch.int64)
        word = part[:, 0].clone()
        for k in range(1, 8):
            word |= part[:, k] << (k * bits)
        for j in range(bits):
            out[start : start + _GROUPS_PER_STEP, j] = (word >> (8 * j)) & 0xFF
    return out.reshape(-1)[: packed_size(n_codes, bits)]


def _unpack_groups(flat: torch.Tensor, bits: int, n_codes: int) -> torch.Tensor:
    """Returns the first `n_codes` codes of bytes packed by `_pack_groups`, 1-D uint8."""
    pad = -flat.numel() % bits
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    groups = flat.view(-1, bits)
    out = torch.empty((groups.shape[0], 8), dtype=torch.uint8, device=flat.device)
    mask = (1 << bits) - 1
    for start in range(0, groups.shape[0], _GROUPS_PER_STEP):
        part = groups[start : start + _GROUPS_PER_STEP].to(torch.int64)
        word = part[:, 0].clone()
        for j in range(1, bits):
            word |= part[:, j] << (8 * j)
        for k in range(8):
            out[start : start + _GROUPS_PER_STEP, k] = (word >> (k * bits)) & mask
    return out.reshape(-1)[:n_codes]


def unpack_code_range(
    packed: torch.Tensor, bit_offset: int, n_codes: int, bits: int
) -> torch.Tensor:
    """Returns `n_codes` codes of `bits` bits starting `bit_offset` bits into `packed` (uint8).

    For a slice of a packed code stream: codes may start anywhere inside its first byte.
    """
    if bits == 8 and bit_offset == 0:
        return packed.reshape(-1)[:n_codes]
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    stream = ((packed.reshape(-1)[:, None] >> shifts) & 1).reshape(-1)
    codes_bits = stream[bit_offset : bit_offset + n_codes * bits].view(n_codes, bits)
    weights = 1 << torch.arange(bits, dtype=torch.int32, device=packed.device)
    return (codes_bits.to(torch.int32) * weights).sum(dim=1).to(torch.uint8)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Returns a bool mask (any shape, read row-major) packed LSB-first, 1-D uint8.

    Bit i of byte j is element 8*j + i; the last byte is zero-padded.
    """
    flat = mask.reshape(-1)
    # A bool is one byte holding 0 or 1: viewing it as uint8 spares a copy of the whole mask.
    flat = flat.view(torch.uint8) if flat.dtype == torch.bool else flat.to(torch.uint8)
    pad = -flat.numel() % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    slots = flat.view(-1, 8)
    packed = slots[:, 0].clone()
    for bit in range(1, 8):
        packed |= slots[:, bit] << bit
    return packed


def unpack_bits(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Returns the first `n` bits of an LSB-first packed 1-D uint8 tensor as a 1-D bool tensor.

    Raises ValueError when `packed` is not uint8 or holds other than ceil(n / 8) bytes.
    """
    expected = (n + 7) // 8
    if packed.dtype != torch.uint8 or packed.numel() != expected or n < 0:
        raise ValueError(
            f"packed bits must be {expected} uint8 bytes, got {packed.numel()} {packed.dtype}"
        )
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bits = (packed.reshape(-1)[:, None] >> shifts) & 1
    return bits.reshape(-1)[:n].bool()


def padding_is_zero(packed: torch.Tensor, used_bits: int) -> bool:
    """Returns True when the bits of `packed` past the first `used_bits` are all zero."""
    tail = used_bits % 8
    if tail == 0 or packed.numel() == 0:
        return True
    return int(packed[-1]) >> tail == 0
