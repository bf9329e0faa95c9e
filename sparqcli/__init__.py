"""sparq: compress the embedding tables of PyTorch checkpoints, and serve them.

Block-norm sparsification and per-row float-qparams quantization, in either order, bit-exact
with torch.ao's `post_training_sparse_quantize`, written to a compact safetensors file.

    import sparqcli
    config = sparqcli.Config(
        sparsity=sparqcli.Sparsity(level=0.6),
        quantization=sparqcli.Quantization(bits=4),
        layers=[sparqcli.Rule(match="tables.*")],
    )
    result = sparqcli.compress_state_dict(model.state_dict(), config)
    result.save("model.sparq.safetensors")
    with sparqcli.open("model.sparq.safetensors") as file:
        rows = file.get_rows("tables.0.weight", 0, 10)

Wherever a checkpoint is accepted, a Hugging Face model folder (shards + index) is too:
`compress` writes a folder of sparq shards, which `open`, `load`, `inspect` and `decompress` read.

Names are loaded on first use, so `import sparqcli` and `sparq --help` do not import torch.
Errors are `sparqcli.errors.SparqError` and its subclasses.
"""

from __future__ import annotations

import importlib
import warnings
from typing import TYPE_CHECKING, Any

# torch warns on first use when numpy is absent; sparq never needs numpy.
warnings.filterwarnings("ignore", message="Failed to initialize NumPy", category=UserWarning)

__version__ = "0.1.0"

# public name -> (module, attribute)
_EXPORTS: dict[str, tuple[str, str]] = {
    "Config": ("sparqcli.config", "Config"),
    "Rule": ("sparqcli.config", "Rule"),
    "Sparsity": ("sparqcli.settings", "Sparsity"),
    "Quantization": ("sparqcli.settings", "Quantization"),
    "Gates": ("sparqcli.settings", "Gates"),
    "compress": ("sparqcli.compression", "compress"),
    "compress_state_dict": ("sparqcli.compression", "compress_state_dict"),
    "compress_distributed": ("sparqcli.distributed.runner", "compress_distributed"),
    "world_size": ("sparqcli.distributed", "world_size"),
    "CompressedStateDict": ("sparqcli.compression", "CompressedStateDict"),
    "CompressReport": ("sparqcli.results", "CompressReport"),
    "open": ("sparqcli.format.reader", "open_file"),
    "SparqFile": ("sparqcli.format.reader", "SparqFile"),
    "SparqFolder": ("sparqcli.format.folder", "SparqFolder"),
    "load": ("sparqcli.format.reader", "load"),
    "load_table": ("sparqcli.format.reader", "load_table"),
    "CompressedTable": ("sparqcli.engine.table", "CompressedTable"),
    "inspect": ("sparqcli.inspection", "inspect"),
    "decompress": ("sparqcli.inspection", "decompress"),
    "selection": ("sparqcli.inspection", "selection"),
    "suggest_config": ("sparqcli.inspection", "suggest_config"),
    "discard_partial_outputs": ("sparqcli.sinks", "discard_partial_outputs"),
    "plan": ("sparqcli.planning.run", "plan"),
    "PlanResult": ("sparqcli.planning.result", "PlanResult"),
    "PlanSpace": ("sparqcli.planning.space", "PlanSpace"),
}

__all__ = [
    "CompressReport",
    "CompressedStateDict",
    "CompressedTable",
    "Config",
    "Gates",
    "PlanResult",
    "PlanSpace",
    "Quantization",
    "Rule",
    "SparqFile",
    "SparqFolder",
    "Sparsity",
    "__version__",
    "compress",
    "compress_distributed",
    "compress_state_dict",
    "decompress",
    "discard_partial_outputs",
    "inspect",
    "load",
    "load_table",
    "open",
    "plan",
    "selection",
    "suggest_config",
    "world_size",
]

if TYPE_CHECKING:
    from sparqcli.compression import CompressedStateDict, compress, compress_state_dict
    from sparqcli.config import Config, Rule
    from sparqcli.distributed import world_size
    from sparqcli.distributed.runner import compress_distributed
    from sparqcli.engine.table import CompressedTable
    from sparqcli.format.folder import SparqFolder
    from sparqcli.format.reader import SparqFile, load, load_table
    from sparqcli.format.reader import open_file as open
    from sparqcli.inspection import decompress, inspect, selection, suggest_config
    from sparqcli.planning.result import PlanResult
    from sparqcli.planning.run import plan
    from sparqcli.planning.space import PlanSpace
    from sparqcli.results import CompressReport
    from sparqcli.settings import Gates, Quantization, Sparsity
    from sparqcli.sinks import discard_partial_outputs


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        module, attribute = _EXPORTS[name]
        return getattr(importlib.import_module(module), attribute)
    raise AttributeError(f"module 'sparqcli' has no attribute {name!r}")
