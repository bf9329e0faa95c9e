"""Aliases: tables of a checkpoint that hold the same bytes under several keys (tied weights).

A `.pt` saved from a model with tied embeddings stores both keys over one storage
(`Checkpoint.storage_groups`, known without reading). Safetensors cannot share storage, so a
checkpoint that stores both keys with equal values is found by hashing: only tables whose shape
and dtype equal another table's are candidates, and each is first hashed over its first rows, so
tables that differ early cost one small read.
"""

from __future__ import annotations

import ctypes
import hashlib
from collections.abc import Iterable

import torch

from sparqcli.sources import Checkpoint

_PREFIX_BYTES = 1 << 20
_CHUNK_BYTES = 1 << 24


def find_aliases(checkpoint: Checkpoint, keys: Iterable[str]) -> list[tuple[str, ...]]:
    """Returns the groups of tables that hold the same bytes as one of `keys` (and each other).

    Each group has two or more keys, in the checkpoint's key order; groups are in the order of
    their first key. Only 2-D floating tensors are considered. Raises InputError when a candidate
    cannot be read.
    """
    keys = set(keys)
    order = {key: position for position, key in enumerate(checkpoint.tensors)}
    parent: dict[str, str] = {}

    def root(key: str) -> str:
        while parent.get(key, key) != key:
            key = parent[key]
        return key

    def join(first: str, second: str) -> None:
        a, b = sorted((root(first), root(second)), key=order.__getitem__)
        if a != b:
            parent[b] = a

    tables = {key: info for key, info in checkpoint.tensors.items() if info.is_table}
    for group in checkpoint.storage_groups():
        members = [key for key in group if key in tables]
        for key in members[1:]:
            join(members[0], key)
    wanted = {root(key) for key in keys if key in tables}
    buckets: dict[object, list[str]] = {}
    for key, info in tables.items():
        if root(key) == key:
            buckets.setdefault((info.shape, info.dtype), []).append(key)
    for bucket in buckets.values():
        if len(bucket) < 2 or not wanted.intersection(bucket):
            continue
        by_prefix: dict[bytes, list[str]] = {}
        for key in bucket:
            by_prefix.setdefault(_digest(checkpoint, key, prefix=True), []).append(key)
        for same_prefix in by_prefix.values():
            if len(same_prefix) < 2:
                continue
            by_digest: dict[bytes, list[str]] = {}
            for key in same_prefix:
                by_digest.setdefault(_digest(checkpoint, key, prefix=False), []).append(key)
            for same in by_digest.values():
                for key in same[1:]:
                    join(same[0], key)
    groups: dict[str, list[str]] = {}
    for key in tables:
        groups.setdefault(root(key), []).append(key)
    found = [tuple(group) for group in groups.values() if len(group) > 1]
    return [group for group in found if keys.intersection(group)]


def _digest(checkpoint: Checkpoint, key: str, *, prefix: bool) -> bytes:
    """Returns the BLAKE2b digest of tensor `key`'s bytes (only its first rows with `prefix`)."""
    info = checkpoint.tensors[key]
    rows = info.shape[0]
    row_bytes = max(1, info.nbytes // rows) if rows else 1
    limit = rows if not prefix else min(rows, max(1, _PREFIX_BYTES // row_bytes))
    step = max(1, _CHUNK_BYTES // row_bytes)
    digest = hashlib.blake2b(digest_size=32)
    with checkpoint.row_reader(key) as read:
        for start in range(0, limit, step):
            chunk = read(start, min(limit, start + step))
            _update(digest, chunk)
    return digest.digest()


def _update(digest: hashlib._Hash, values: torch.Tensor) -> None:
    """Feeds the bytes of `values` (row-major) to `digest`."""
    values = values.detach().cpu().contiguous()
    size = values.numel() * values.element_size()
    if size:
        digest.update((ctypes.c_char * size).from_address(values.data_ptr()))
