"""The compiled lookup kernel (`_csrc.py`): built at first use through `sparqcli.native`.

`kernel()` returns the loaded extension, or None when it cannot be used; then the modules fall
back to tensor ops (`_storage.gather_rows`), with the same results. Builds are cached per user
(`sparqcli.native.cache_dir`) under a hash of the source, flags, torch and Python versions. It
is compiled with `-fopenmp` on Linux: `at::parallel_for` is an OpenMP pragma in torch's headers,
and without the flag it runs on one thread; the extension then links `libgomp.so.1`, the soname
torch has already loaded, so both share torch's OpenMP runtime and thread count.

`SPARQ_NN_KERNEL=off` (or `0`, `torch`) skips the build and uses tensor ops, silently.
"""

from __future__ import annotations

from types import ModuleType

from sparqcli.native import ENV_CACHE, Kernel, KernelWarning, cache_dir
from sparqcli.nn._csrc import SOURCE

__all__ = ["ENV_CACHE", "ENV_SWITCH", "LOOKUP_KERNEL", "KernelWarning", "cache_dir", "kernel"]

ENV_SWITCH = "SPARQ_NN_KERNEL"

LOOKUP_KERNEL = Kernel(
    prefix="sparq_nn",
    source=SOURCE,
    title="lookup",
    what="sparqcli.nn lookups",
    switch=ENV_SWITCH,
    functions=("embedding_bag_forward", "embedding_forward"),
    openmp=True,
)


def kernel() -> ModuleType | None:
    """Returns the compiled lookup kernel, building it on first use; None when unavailable
    (one KernelWarning then, none with `SPARQ_NN_KERNEL=off`). Never raises."""
    return LOOKUP_KERNEL.load()
