"""Which tensors of a checkpoint are embedding tables: candidates found by evidence.

With module types (a pickled `nn.Module`, loaded with trust_pickle) the types decide: the
`weight` of an `Embedding` or `EmbeddingBag` is a candidate, nothing else is. Otherwise a 2-D
floating tensor is a candidate when its name says so — a component of its module name is an
embedding word (`embed`, `embeddings`, `emb_l`, `wte`, `wpe`, `tok_embeddings`, `lookup`,
`bags`, `tables`, ...) — or when its shape does: many more rows than columns (a vocabulary or
id table), unless its name says it is a projection (attention, MLP, output head).
Each tensor gets a `Candidacy`: whether it is a candidate, by which evidence (`type`, `name`,
`shape`) and a one-line why.

Importing this module does not import torch.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sparqcli.dtypes import TensorInfo

EMBEDDING_TYPES = frozenset({"Embedding", "EmbeddingBag"})
"""Module classes whose `weight` is an embedding table."""
POSITION_EMBEDDING_PATTERNS: tuple[str, ...] = (
    "*position_embedding*",
    "*embed_positions*",
    "*wpe*",
)
"""Learned position embeddings (BERT and CLIP, BART and OPT, GPT-2): candidates, but small and
sensitive, so `configs/default.yaml` excludes them and starter configs leave them dense."""

EMBEDDING_WORDS = frozenset(
    {
        "emb",
        "embs",
        "embed",
        "embeds",
        "embedding",
        "embeddings",
        "embedder",
        "wte",
        "wpe",
        "lookup",
        "lookups",
        "bag",
        "bags",
        "table",
        "tables",
    }
)
"""Words of a module name that say "embedding" (a module name's components split on `_`)."""

PROJECTION_WORDS = frozenset(
    {
        "attention",
        "attn",
        "self",
        "query",
        "key",
        "value",
        "q",
        "k",
        "v",
        "o",
        "qkv",
        "proj",
        "mlp",
        "ffn",
        "fc",
        "fc1",
        "fc2",
        "dense",
        "intermediate",
        "output",
        "linear",
        "gate",
        "up",
        "down",
        "head",
        "lm",
        "classifier",
        "decoder",
        "conv",
        "norm",
        "layernorm",
    }
)
"""Words that say "not an embedding": attention and MLP projections, heads, norms."""

MIN_ROWS_PER_COLUMN = 6
"""Shape evidence: at least this many rows per column (a 32000 x 4096 vocabulary; MLP weights
have 4 or fewer)."""
MIN_SHAPE_ROWS = 1024
"""Shape evidence needs at least this many rows (a 64 x 2 weight is not a lookup table)."""


@dataclass(frozen=True)
class Candidacy:
    """Whether a tensor is a candidate table, by which evidence (`type`, `name`, `shape`, in
    that order) and why, in one line."""

    is_candidate: bool
    reasons: tuple[str, ...] = ()
    why: str = ""

    def to_dict(self) -> dict[str, Any]:
        """Returns the candidacy as JSON-able data."""
        return {"candidate": self.is_candidate, "reasons": list(self.reasons), "why": self.why}


NOT_A_TABLE = Candidacy(False, (), "not a 2-D floating tensor")


def is_position_embedding(key: str) -> bool:
    """Returns True when `key` matches `POSITION_EMBEDDING_PATTERNS`."""
    return any(fnmatch.fnmatchcase(key, pattern) for pattern in POSITION_EMBEDDING_PATTERNS)


def module_words(module: str) -> frozenset[str]:
    """Returns the words of a module name, lower case: its components split on `_`, digits
    and camelCase (`bert.embeddings.word_embeddings` -> bert, embeddings, word)."""
    parts = re.split(r"[._\d]+|(?<=[a-z])(?=[A-Z])", module)
    return frozenset(part.lower() for part in parts if part)


def module_and_name(key: str) -> tuple[str, str]:
    """Returns a tensor key's module name and parameter name: `emb.weight` -> (`emb`, `weight`);
    a key without a dot belongs to the root module ``""``."""
    module, _, name = key.rpartition(".")
    return module, name


def candidacy(
    key: str, info: TensorInfo, module_types: Mapping[str, str] | None = None
) -> Candidacy:
    """Returns whether the tensor `key` (shape and dtype `info`) is a candidate embedding table,
    and why. `module_types` (module name -> class name) is known only for a pickled module."""
    if not info.is_table:
        return NOT_A_TABLE
    module, name = module_and_name(key)
    if module_types is not None:
        module_type = module_types.get(module)
        if module_type in EMBEDDING_TYPES and name == "weight":
            return Candidacy(True, ("type",), f"module {module or '(root)'} is {_a(module_type)}")
        if module_type is None:
            return Candidacy(False, (), "not a parameter of a known module")
        return Candidacy(False, (), f"module {module or '(root)'} is {_a(module_type)}")
    words = module_words(module or key)
    said = sorted(words & EMBEDDING_WORDS)
    rows, cols = info.shape
    reasons: list[str] = []
    why: list[str] = []
    if said:
        reasons.append("name")
        why.append(f"name says embedding ({', '.join(said)})")
    projection = sorted(words & PROJECTION_WORDS)
    tall = rows >= MIN_SHAPE_ROWS and rows >= MIN_ROWS_PER_COLUMN * cols
    if tall and (said or not projection):
        reasons.append("shape")
        why.append(f"shape {rows} rows x {cols} columns")
    if reasons:
        return Candidacy(True, tuple(reasons), "; ".join(why))
    if projection:
        return Candidacy(False, (), f"name says projection ({', '.join(projection)})")
    return Candidacy(False, (), f"neither its name nor its shape ({rows} x {cols}) says embedding")


def _a(name: str) -> str:
    return f"an {name}" if name[:1] in "AEIOU" else f"a {name}"


def find_candidates(
    tensors: Mapping[str, TensorInfo], module_types: Mapping[str, str] | None = None
) -> dict[str, Candidacy]:
    """Returns the candidacy of every tensor, in the checkpoint's key order."""
    return {key: candidacy(key, info, module_types) for key, info in tensors.items()}
