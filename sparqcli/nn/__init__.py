"""Serve embedding lookups straight from sparq's compressed storage.

    from sparqcli.nn import Embedding, EmbeddingBag, load_compressed

    bag = EmbeddingBag.from_file("model.sparq.safetensors", "bags.0.weight", mode="sum")
    out = bag(indices, offsets)             # as F.embedding_bag over the decoded table

    replaced = load_compressed(model, "model.sparq.safetensors")   # swap modules in a model

The modules hold the file's packed codes, scales, zero points and keep-mask plus a row index
(under 8 bytes per row), never a dense table. See docs/SERVING.md.
"""

from __future__ import annotations

from sparqcli.nn._kernel import KernelWarning
from sparqcli.nn._load import load_compressed
from sparqcli.nn.modules import Embedding, EmbeddingBag

__all__ = ["Embedding", "EmbeddingBag", "KernelWarning", "kernel_available", "load_compressed"]


def kernel_available() -> bool:
    """Returns True when the compiled CPU kernel is in use (building it on first call).

    False when `SPARQ_NN_KERNEL=off` or the build failed (then one KernelWarning was issued).
    """
    from sparqcli.nn._kernel import kernel

    return kernel() is not None
