"""The compiled lookup kernel: built at first use, cached per user, with one warning on failure.

`kernel()` returns the loaded extension, or None when it cannot be used; then the modules fall
back to tensor ops (`_fallback.py`), with the same results. The build runs
`torch.utils.cpp_extension.load_inline` (needs a C++ compiler and ninja) into
`$SPARQ_KERNEL_CACHE`, else `$XDG_CACHE_HOME/sparq/kernels`, else `~/.cache/sparq/kernels`, in a
folder named by a hash of the source, torch's version and the Python ABI, so a cache shared by
machines or versions never loads a stale build. The code is compiled for the x86-64 baseline
with an AVX2 clone picked at run time, so the build is valid on any x86-64 CPU.

`SPARQ_NN_KERNEL=off` (or `0`, `torch`) skips the build and uses tensor ops, silently.
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
import warnings
from pathlib import Path
from types import ModuleType

import torch

from sparqcli.nn._csrc import SOURCE

ENV_SWITCH = "SPARQ_NN_KERNEL"
ENV_CACHE = "SPARQ_KERNEL_CACHE"
_OFF_VALUES = ("0", "off", "false", "no", "torch")
_FLAGS = ["-O3", "-ffp-contract=off", "-fno-math-errno"]
# at::parallel_for is an OpenMP pragma inside torch's headers: without -fopenmp the extension
# runs it on one thread. The extension then links libgomp.so.1, the soname torch already loaded,
# so both share torch's OpenMP runtime and thread count.
_OPENMP = ["-fopenmp"] if sys.platform.startswith("linux") else []

_state: dict[str, ModuleType | None] = {}


class KernelWarning(UserWarning):
    """The compiled lookup kernel is not available; lookups run on (slower) tensor ops."""


def cache_dir() -> Path:
    """Returns the folder that holds compiled kernels (not created here)."""
    configured = os.environ.get(ENV_CACHE)
    if configured:
        return Path(configured)
    xdg = os.environ.get("XDG_CACHE_HOME")
    root = Path(xdg) if xdg else Path.home() / ".cache"
    return root / "sparq" / "kernels"


def build_name() -> str:
    """Returns the extension's name: a hash of everything its binary depends on."""
    digest = hashlib.sha256()
    flags = " ".join(_FLAGS + _OPENMP)
    for part in (SOURCE, flags, torch.__version__, sys.version, platform.machine()):
        digest.update(part.encode())
        digest.update(b"\0")
    return f"sparq_nn_{digest.hexdigest()[:16]}"


def enabled() -> bool:
    """Returns False when `SPARQ_NN_KERNEL` asks for the tensor-op fallback."""
    return os.environ.get(ENV_SWITCH, "").strip().lower() not in _OFF_VALUES


def kernel() -> ModuleType | None:
    """Returns the compiled kernel module, building it on first use; None when unavailable.

    Never raises: a failed build warns once (KernelWarning, one line with the reason) and every
    later call returns None without retrying in this process. `SPARQ_NN_KERNEL` is read at the
    first call.
    """
    if "module" in _state:
        return _state["module"]
    module: ModuleType | None = None
    if not enabled():
        _state["module"] = None
        return None
    try:
        module = _build()
    except Exception as error:  # any build failure: compiler, ninja, headers, linker
        reason = str(error).strip().splitlines()
        text = reason[-1] if reason else type(error).__name__
        warnings.warn(
            f"sparqcli.nn: the compiled lookup kernel is not available ({text[:200]}); "
            f"lookups use tensor ops (correct, much slower). Set {ENV_SWITCH}=off to silence.",
            KernelWarning,
            stacklevel=3,
        )
    _state["module"] = module
    return module


def _build() -> ModuleType:
    from torch.utils import cpp_extension

    name = build_name()
    folder = cache_dir() / name
    folder.mkdir(parents=True, exist_ok=True)
    return cpp_extension.load_inline(
        name=name,
        cpp_sources=[SOURCE],
        functions=["embedding_bag_forward", "embedding_forward"],
        extra_cflags=_FLAGS + _OPENMP,
        extra_ldflags=_OPENMP,
        build_directory=str(folder),
        verbose=False,
    )
