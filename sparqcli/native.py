"""Compiled C++ kernels: built at first use, cached per user, with one warning when unavailable.

A `Kernel` names a C++ source; `Kernel.load()` returns the loaded extension module, or None when
it cannot be used, and then callers run their tensor-op fallback, with the same results. The
build runs `torch.utils.cpp_extension.load_inline` (needs a C++ compiler and ninja) into
`$SPARQ_KERNEL_CACHE`, else `$XDG_CACHE_HOME/sparq/kernels`, else `~/.cache/sparq/kernels`, in a
folder named by a hash of the source, the flags, torch's version and the Python ABI, so a cache
shared by machines or versions never loads a stale build. One process builds at a time (an
`flock` the system drops when its holder dies); a finished build is marked, and later runs
import its library directly. The sources compile for the x86-64
baseline with AVX2 clones picked at run time, so a build is valid on any x86-64 CPU.

Each kernel has an environment switch (`off`, `0`, `false`, `no` or `torch` skip the build and
use tensor ops, silently). A build that has to compile (nothing cached yet) is announced first
as an INFO record of the `sparqcli.native` logger: the CLI prints it, a library caller sees it
where its logging shows INFO.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import sys
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

ENV_CACHE = "SPARQ_KERNEL_CACHE"
_OFF_VALUES = ("0", "off", "false", "no", "torch")
FLAGS = ("-O3", "-ffp-contract=off", "-fno-math-errno")
logger = logging.getLogger(__name__)


class KernelWarning(UserWarning):
    """A compiled kernel is not available; the work runs on (slower) tensor ops."""


def cache_dir() -> Path:
    """Returns the folder that holds compiled kernels (not created here)."""
    configured = os.environ.get(ENV_CACHE)
    if configured:
        return Path(configured)
    xdg = os.environ.get("XDG_CACHE_HOME")
    root = Path(xdg) if xdg else Path.home() / ".cache"
    return root / "sparq" / "kernels"


@dataclass
class Kernel:
    """One C++ extension: `prefix` names its builds, `source` is its code, `title` names it in
    the warning, `what` says there what falls back, `switch` is the environment variable that
    turns it off.

    `functions` lists the functions to bind (None: the source has its own PYBIND11_MODULE);
    `openmp` compiles and links with -fopenmp on Linux (for `at::parallel_for`).
    """

    prefix: str
    source: str
    title: str
    what: str
    switch: str
    functions: tuple[str, ...] | None = None
    openmp: bool = False
    _module: list[ModuleType | None] = field(default_factory=list, repr=False)
    # The engine's worker threads may all ask at once: one builds, the others wait for it.
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def flags(self) -> list[str]:
        """Returns the compiler flags."""
        openmp = ["-fopenmp"] if self.openmp and sys.platform.startswith("linux") else []
        return [*FLAGS, *openmp]

    def build_name(self) -> str:
        """Returns the extension's name: a hash of everything its binary depends on."""
        import torch

        digest = hashlib.sha256()
        flags = " ".join(self.flags())
        for part in (self.source, flags, torch.__version__, sys.version, platform.machine()):
            digest.update(part.encode())
            digest.update(b"\0")
        return f"{self.prefix}_{digest.hexdigest()[:16]}"

    def enabled(self) -> bool:
        """Returns False when the kernel's environment switch asks for tensor ops."""
        return os.environ.get(self.switch, "").strip().lower() not in _OFF_VALUES

    def load(self) -> ModuleType | None:
        """Returns the compiled module, building it on first use; None when unavailable.

        Never raises: a failed build warns once (KernelWarning, one line with the reason) and
        every later call returns None without retrying in this process. The switch is read at
        the first call.
        """
        if self._module:
            return self._module[0]
        with self._lock:
            if not self._module:
                self._module.append(self._load_once())
        return self._module[0]

    def _load_once(self) -> ModuleType | None:
        module: ModuleType | None = None
        if self.enabled():
            try:
                module = self._build()
            except Exception as error:  # any build failure: compiler, ninja, headers, linker
                reason = str(error).strip().splitlines()
                text = reason[-1] if reason else type(error).__name__
                warnings.warn(
                    f"the compiled {self.title} kernel is not available ({text[:200]}); "
                    f"{self.what} use tensor ops (same results, much slower). "
                    f"Set {self.switch}=off to silence.",
                    KernelWarning,
                    stacklevel=4,
                )
        return module

    def reset(self) -> None:
        """Forgets the loaded module, so that the next `load` looks again (for tests)."""
        self._module.clear()

    def _build(self) -> ModuleType:
        name = self.build_name()
        folder = cache_dir() / name
        folder.mkdir(parents=True, exist_ok=True)
        built = folder / _BUILT_MARK
        library = folder / f"{name}.so"
        if built.exists() and library.exists():
            return _import_built(name, library)
        with _build_lock(folder):
            if built.exists() and library.exists():  # built by another process meanwhile
                return _import_built(name, library)
            # torch's own lock file, left by a build that was killed (only builders holding the
            # lock above create it): load_inline would wait for it forever.
            (folder / "lock").unlink(missing_ok=True)
            logger.info(
                "compiling the %s kernel: first use, up to a minute; cached in %s for later runs",
                self.title,
                folder.parent,
            )
            module = self._compile(name, folder)
            built.touch()
            return module

    def _compile(self, name: str, folder: Path) -> ModuleType:
        from torch.utils import cpp_extension

        flags = self.flags()
        return cpp_extension.load_inline(
            name=name,
            cpp_sources=[self.source],
            functions=list(self.functions) if self.functions is not None else None,
            extra_cflags=flags,
            extra_ldflags=[flag for flag in flags if flag == "-fopenmp"],
            build_directory=str(folder),
            verbose=False,
        )


_BUILT_MARK = "built"
"""Written into a kernel's folder once its build has loaded: later runs import the library
directly, without torch's build lock (a file that a killed build leaves behind)."""


def _import_built(name: str, library: Path) -> ModuleType:
    """Returns the extension `name`, imported from its built `library`."""
    import importlib.util

    import torch  # noqa: F401  (the library links against torch's, loaded first)

    spec = importlib.util.spec_from_file_location(name, library)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {library}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextmanager
def _build_lock(folder: Path) -> Iterator[None]:
    """Holds an exclusive lock on `folder` while one process builds there (others wait). An
    advisory `flock`, which the system releases when its holder dies, however it dies."""
    try:
        import fcntl
    except ImportError:  # not POSIX: torch's own lock file is the only guard
        yield
        return
    with open(folder / "build.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
