"""`EngineOptions`: how the engine computes (never what it computes: results are identical).

Passed to the engine explicitly; the engine reads no environment and no module switches.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

CudaSelection = Literal["topk", "sort", "radix"]


@dataclass(frozen=True)
class EngineOptions:
    """Engine switches.

    `fused_kernels`: run the fused Triton kernels where they can run (CUDA with Triton
    installed); False forces plain tensor ops. `interpret_kernels`: run the fused kernels on
    CPU tensors too, through Triton's interpreter (slow; how they are checked without a GPU —
    Triton itself needs `TRITON_INTERPRET=1` in the environment). `cuda_selection`: how a CUDA
    device selects the pruning threshold among scores it holds: `topk`, `sort` or the `radix`
    histogram passes used on CPU (all give the same value). `threads` (CPU): that many chunk
    workers, each with one torch thread (`engine/workers.py`); None leaves torch's own threads
    to parallelize each operation. Results are the same bytes for any count.
    """

    fused_kernels: bool = True
    interpret_kernels: bool = False
    cuda_selection: CudaSelection = "topk"
    threads: int | None = None

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] = os.environ) -> EngineOptions:
        """Returns the default options, with `interpret_kernels` on when TRITON_INTERPRET=1."""
        return cls(interpret_kernels=environ.get("TRITON_INTERPRET") == "1")


DEFAULT_OPTIONS = EngineOptions()
