"""Serves the compressed example: loads it into its model with sparqcli.nn.load_compressed and
prints a few lookups from the compressed modules next to the same lookups on the dense tables.

    python examples/serve_example.py build/example.pt build/example.sparq.safetensors

The dense model is the original checkpoint; the compressed model decodes only the rows it looks
up, from the file's packed codes, scales, zero points and keep-mask (pruned values are 0.0), and
gives the same results as the dense tables `sparqcli.load` decodes.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from make_example import ExampleModel

import sparqcli
from sparqcli.nn import load_compressed


def main() -> None:
    """Loads both models and prints the lookups side by side."""
    dense_path = Path(sys.argv[1] if len(sys.argv) > 1 else "build/example.pt")
    compressed_path = Path(sys.argv[2] if len(sys.argv) > 2 else "build/example.sparq.safetensors")
    dense = ExampleModel()
    dense.load_state_dict(torch.load(dense_path, weights_only=True))
    decoded = ExampleModel()  # the dense tables sparqcli.load decodes: what serving must equal
    decoded.load_state_dict(sparqcli.load(compressed_path))
    served = ExampleModel()
    replaced = load_compressed(served, compressed_path)
    print(f"load_compressed replaced {', '.join(replaced)}:")
    for name in replaced:
        module = served.get_submodule(name)
        dense_bytes = dense.get_submodule(name).weight.numel() * 4
        print(f"  {name}: {module}  ({module.nbytes / dense_bytes:.2f}x the dense bytes)")

    tokens = torch.tensor([[3, 14, 159], [2, 653, 589]])
    ids = torch.tensor([7, 42, 1999, 5, 5, 300])
    offsets = torch.tensor([0, 3])
    with torch.no_grad():
        lookups = [
            ("token_embedding(tokens)[0, 0, :4]", lambda m: m.token_embedding(tokens)[0, 0, :4]),
            ("bags[0](ids, offsets)[1, :4]  (sum)", lambda m: m.bags[0](ids, offsets)[1, :4]),
            (
                "bags[1](ids % 500, offsets)[0, :4]  (mean)",
                lambda m: m.bags[1](ids % 500, offsets)[0, :4],
            ),
        ]
        for label, lookup in lookups:
            same = torch.allclose(lookup(served), lookup(decoded), rtol=1e-5, atol=1e-6)
            pruned = "; these 4 columns are a pruned block" if not lookup(served).any() else ""
            print(f"{label}")
            print(f"  dense      {_show(lookup(dense))}")
            print(
                f"  compressed {_show(lookup(served))}  (matches the decoded table: {same}{pruned})"
            )


def _show(values: torch.Tensor) -> str:
    return "[" + ", ".join(f"{float(v):+.4f}" for v in values) + "]"


if __name__ == "__main__":
    main()
