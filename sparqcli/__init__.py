"""sparq: compress the embedding tables of PyTorch checkpoints.

Block-norm sparsification and per-row float-qparams quantization, in either order, bit-exact
with torch.ao's `post_training_sparse_quantize`, written to a compact safetensors file.

The heavy parts (torch) are imported lazily, so `import sparqcli` and `sparq --help` are fast.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

# torch warns on first use when numpy is absent; sparq never needs numpy.
warnings.filterwarnings("ignore", message="Failed to initialize NumPy", category=UserWarning)

__version__ = "0.1.0"

__all__ = ["__version__", "compress", "load", "load_table"]

if TYPE_CHECKING:
    from sparqcli.compress import compress
    from sparqcli.format import load, load_table


def __getattr__(name: str) -> Any:
    if name == "compress":
        from sparqcli.compress import compress

        return compress
    if name in ("load", "load_table"):
        from sparqcli import format as _format

        return getattr(_format, name)
    raise AttributeError(f"module 'sparqcli' has no attribute {name!r}")
