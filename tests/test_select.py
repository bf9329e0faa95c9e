"""Selection: which rule wins which tensor, and the exact message of every selection error."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from sparqcli.config import Config
from sparqcli.errors import SelectionError
from sparqcli.select import (
    RuleMatch,
    Selection,
    TensorInfo,
    module_name,
    pattern_matches,
    select_tables,
)

CONFIGS = Path(__file__).resolve().parent.parent / "configs"

# The demo checkpoint's keys, in its order.
DEMO = {
    "token_embedding.weight": TensorInfo((1000, 64), "float32"),
    "bags.0.weight": TensorInfo((2000, 32), "float32"),
    "bags.1.weight": TensorInfo((500, 16), "float32"),
    "proj.weight": TensorInfo((8, 64), "float32"),
    "proj.bias": TensorInfo((8,), "float32"),
}
DEMO_TYPES = {
    "": "Demo",
    "token_embedding": "Embedding",
    "bags": "ModuleList",
    "bags.0": "EmbeddingBag",
    "bags.1": "EmbeddingBag",
    "proj": "Linear",
}


def select(
    layers: list[dict[str, Any]],
    tensors: Mapping[str, TensorInfo] = DEMO,
    exclude: tuple[str, ...] = (),
    module_types: Mapping[str, str] | None = None,
    min_table_bytes: int = 0,
) -> Selection:
    config = Config.from_dict(
        {"layers": layers, "exclude": list(exclude), "min_table_bytes": min_table_bytes},
        "cfg.yaml",
    )
    return select_tables(config, tensors, "model.pt", module_types)


def keys(selection: Selection) -> list[str]:
    return [table.key for table in selection.tables]


def error(*args: Any, **kwargs: Any) -> str:
    with pytest.raises(SelectionError) as info:
        select(*args, **kwargs)
    assert info.value.exit_code == 2
    return str(info.value)


def test_module_name() -> None:
    assert module_name("emb.weight") == "emb"
    assert module_name("a.b.0.weight") == "a.b.0"
    assert module_name("emb") == "emb"


@pytest.mark.parametrize(
    ("pattern", "name", "expected"),
    [
        ("*embedding*", "token_embedding.weight", True),
        ("bags.*", "bags.0.weight", True),
        ("Bags.*", "bags.0.weight", False),
        ("bags.?", "bags.0", True),
        ("emb", "emb", True),
        ("emb", "emb.weight", False),
        ("re:bags\\.\\d+", "bags.12", True),
        ("re:bags", "bags.0", False),
        ("re:.*emb.*", "token_embedding", True),
    ],
)
def test_pattern_matches(pattern: str, name: str, expected: bool) -> None:
    assert pattern_matches(pattern, name) is expected


def test_glob_on_module_name_and_on_key() -> None:
    assert keys(select([{"match": "*embedding"}])) == ["token_embedding.weight"]
    assert keys(select([{"match": "*embedding.weight"}])) == ["token_embedding.weight"]
    assert keys(select([{"match": "bags.*"}])) == ["bags.0.weight", "bags.1.weight"]


def test_regex_is_a_full_match() -> None:
    assert keys(select([{"match": "re:bags\\.[01]"}])) == ["bags.0.weight", "bags.1.weight"]
    assert keys(select([{"match": "re:bags\\.1\\.weight"}])) == ["bags.1.weight"]


def test_exact_name_matches_the_module_or_the_key() -> None:
    assert keys(select([{"match": "bags.1"}])) == ["bags.1.weight"]
    assert keys(select([{"match": "bags.0.weight"}])) == ["bags.0.weight"]


def test_module_name_match_takes_every_tensor_of_the_module() -> None:
    assert error([{"match": "proj"}]) == (
        "model.pt: layers[0] (match 'proj') matches 'proj.bias', which is not a 2-D floating "
        "tensor (shape [8], float32)"
    )


def test_tables_come_in_checkpoint_order_and_the_first_rule_wins() -> None:
    selection = select(
        [{"match": "bags.1", "quantization": {"bits": 4}}, {"match": "re:.*(emb|bags).*\\.weight"}]
    )
    assert keys(selection) == ["token_embedding.weight", "bags.0.weight", "bags.1.weight"]
    rules = [table.rule.index for table in selection.tables]
    assert rules == [1, 1, 0]
    assert selection.tables[2].rule.quantization.bits == 4
    assert selection.tables[0].info == DEMO["token_embedding.weight"]
    first, second = selection.matches
    assert first == RuleMatch(rule=first.rule, won=("bags.1.weight",), shadowed=(), excluded=())
    assert second.won == ("token_embedding.weight", "bags.0.weight")
    assert second.shadowed == ("bags.1.weight",)
    assert second.lost == ("bags.1.weight",)


def test_exclude_wins_over_rules() -> None:
    selection = select([{"match": "bags.*"}, {"match": "*emb*"}], exclude=("re:bags\\.0",))
    assert keys(selection) == ["token_embedding.weight", "bags.1.weight"]
    assert selection.matches[0].won == ("bags.1.weight",)
    assert selection.matches[0].excluded == ("bags.0.weight",)
    assert selection.matches[0].lost == ("bags.0.weight",)


def test_exclude_removes_a_non_table_match() -> None:
    assert keys(select([{"match": "proj"}], exclude=("*.bias",))) == ["proj.weight"]


def test_rule_matching_nothing_names_the_closest_keys() -> None:
    tensors = {
        "dense.weight": TensorInfo((4, 4), "float32"),
        "sparse.bags.0.weight": TensorInfo((10, 4), "float32"),
        "sparse.bags.1.weight": TensorInfo((10, 4), "float32"),
    }
    assert error([{"match": "sparse.bags.*"}, {"match": "sparse.bagz.*"}], tensors) == (
        "model.pt: layers[1] (match 'sparse.bagz.*') matches no tensor; "
        "closest keys: sparse.bags.0.weight, sparse.bags.1.weight"
    )


def test_rule_matching_nothing_close() -> None:
    assert error([{"match": "re:xyz"}]) == (
        "model.pt: layers[0] (match 're:xyz') matches no tensor; no key is close; the checkpoint "
        "has 5 tensors: token_embedding.weight, bags.0.weight, bags.1.weight, ..."
    )
    assert error([{"match": "x"}], {}) == (
        "model.pt: layers[0] (match 'x') matches no tensor; the checkpoint has no tensors"
    )


def test_closest_keys_are_at_most_three_best_first() -> None:
    tensors = {f"embedding_{c}.weight": TensorInfo((4, 4), "float32") for c in "abcd"}
    tensors["proj.weight"] = TensorInfo((4, 4), "float32")
    tensors["embeddings.weight"] = TensorInfo((4, 4), "float32")
    # Ties keep checkpoint order; proj.weight is not close enough to be named.
    assert error([{"match": "embedings"}], tensors) == (
        "model.pt: layers[0] (match 'embedings') matches no tensor; "
        "closest keys: embeddings.weight, embedding_a.weight, embedding_b.weight"
    )


def test_a_rule_whose_matches_are_all_taken_is_not_an_error() -> None:
    selection = select([{"match": "*emb*"}, {"match": "token_embedding"}])
    assert selection.matches[1].won == ()
    assert selection.matches[1].shadowed == ("token_embedding.weight",)


def test_non_2d_match() -> None:
    assert error([{"match": "*"}]) == (
        "model.pt: layers[0] (match '*') matches 'proj.bias', which is not a 2-D floating tensor "
        "(shape [8], float32)"
    )
    scalar = {"step": TensorInfo((), "float32")}
    assert error([{"match": "step"}], scalar) == (
        "model.pt: layers[0] (match 'step') matches 'step', which is not a 2-D floating tensor "
        "(shape [], float32)"
    )


def test_int_tensor_match() -> None:
    tensors = {
        "embeddings.word_embeddings.weight": TensorInfo((100, 8), "float32"),
        "embeddings.position_ids": TensorInfo((1, 512), "int64"),
    }
    assert error([{"match": "*embeddings*"}], tensors) == (
        "model.pt: layers[0] (match '*embeddings*') matches 'embeddings.position_ids', which is "
        "not a 2-D floating tensor (shape [1, 512], int64)"
    )


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "float64"])
def test_floating_dtypes(dtype: str) -> None:
    assert keys(select([{"match": "t"}], {"t.weight": TensorInfo((3, 4), dtype)})) == ["t.weight"]


def test_type_rules_with_module_types() -> None:
    selection = select([{"type": "EmbeddingBag"}, {"type": "embedding"}], module_types=DEMO_TYPES)
    assert [(t.key, t.rule.index) for t in selection.tables] == [
        ("token_embedding.weight", 1),
        ("bags.0.weight", 0),
        ("bags.1.weight", 0),
    ]
    only = select([{"type": "Embedding"}], module_types=DEMO_TYPES)
    assert keys(only) == ["token_embedding.weight"]


def test_type_rule_on_a_pickled_embedding_itself() -> None:
    tensors = {"weight": TensorInfo((10, 4), "float32")}
    selection = select([{"type": "embedding"}], tensors, module_types={"": "Embedding"})
    assert keys(selection) == ["weight"]


def test_type_rule_without_module_types() -> None:
    assert error([{"match": "bags.*"}, {"type": "embedding"}]) == (
        "model.pt: layers[1] (type 'embedding') needs module types; this checkpoint is a state "
        "dict (type rules work only on a pickled nn.Module loaded with trust_pickle=True)"
    )


def test_type_rule_matching_nothing() -> None:
    types = {"": "Demo", "token_embedding": "Embedding", "proj": "Linear"}
    assert error([{"type": "EmbeddingBag"}], module_types=types) == (
        "model.pt: layers[0] (type 'EmbeddingBag') matches no tensor; "
        "module types in this checkpoint: Demo, Embedding, Linear"
    )


def test_nothing_selected() -> None:
    assert error([{"match": "*emb*"}], exclude=("token_*",)) == (
        "model.pt: the config selects no table"
    )


def test_every_failing_rule_is_listed_in_rule_order() -> None:
    assert error([{"match": "proj"}, {"match": "*emb*"}, {"match": "nothing"}]) == (
        "model.pt: 2 rules fail: (1) layers[0] (match 'proj') matches 'proj.bias', which is not "
        "a 2-D floating tensor (shape [8], float32); (2) layers[2] (match 'nothing') matches no "
        "tensor; no key is close; the checkpoint has 5 tensors: token_embedding.weight, "
        "bags.0.weight, bags.1.weight, ..."
    )
    # one failing rule: its message alone
    assert error([{"match": "*emb*"}, {"match": "nothing"}]).startswith(
        "model.pt: layers[1] (match 'nothing') matches no tensor;"
    )


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        # bags.1 (500 x 16, 31.2 KiB) is under the default min_table_bytes: left dense
        ("default.yaml", ["token_embedding.weight", "bags.0.weight"]),
        ("recommender.yaml", ["token_embedding.weight", "bags.0.weight"]),
        ("token-embedding.yaml", ["token_embedding.weight"]),
    ],
)
def test_shipped_configs_on_the_demo_checkpoint(name: str, expected: list[str]) -> None:
    selection = select_tables(Config.from_yaml(CONFIGS / name), DEMO, "model.pt")
    assert keys(selection) == expected
    skipped = [table.key for table in selection.skipped]
    assert skipped == ([] if name == "token-embedding.yaml" else ["bags.1.weight"])


HF_KEYS = {
    "bert.embeddings.word_embeddings.weight": TensorInfo((30522, 768), "float32"),
    "bert.embeddings.position_embeddings.weight": TensorInfo((512, 768), "float32"),
    "bert.embeddings.token_type_embeddings.weight": TensorInfo((2, 768), "float32"),
    "bert.embeddings.LayerNorm.weight": TensorInfo((768,), "float32"),
    "bert.embeddings.LayerNorm.bias": TensorInfo((768,), "float32"),
    "bert.embeddings.position_ids": TensorInfo((1, 512), "int64"),
    "bert.encoder.layer.0.attention.self.query.weight": TensorInfo((768, 768), "float32"),
}


def test_shipped_configs_on_a_bert_checkpoint() -> None:
    default = select_tables(Config.from_yaml(CONFIGS / "default.yaml"), HF_KEYS, "bert.bin")
    # the 2 x 768 token-type table (6 KiB) is under min_table_bytes: skipped, and said so
    assert keys(default) == ["bert.embeddings.word_embeddings.weight"]
    assert [(t.key, t.bytes, t.reason) for t in default.skipped] == [
        (
            "bert.embeddings.token_type_embeddings.weight",
            6144,
            "smaller than min_table_bytes (64 KiB)",
        )
    ]
    token = select_tables(Config.from_yaml(CONFIGS / "token-embedding.yaml"), HF_KEYS, "bert.bin")
    assert keys(token) == ["bert.embeddings.word_embeddings.weight"]


def test_token_config_on_llama_and_gpt2_names() -> None:
    config = Config.from_yaml(CONFIGS / "token-embedding.yaml")
    for key in ("model.embed_tokens.weight", "transformer.wte.weight"):
        tensors = {
            key: TensorInfo((32000, 64), "bfloat16"),
            "lm_head.weight": TensorInfo((32000, 64), "bfloat16"),
        }
        assert keys(select_tables(config, tensors, "m.safetensors")) == [key]


def test_recommender_config_on_torchrec_names() -> None:
    tensors = {
        "sparse_arch.embedding_bag_collection.embedding_bags.t_cat_0.weight": TensorInfo(
            (100000, 128), "float32"
        ),
        "sparse_arch.embedding_bag_collection.embedding_bags.t_cat_1.weight": TensorInfo(
            (5000, 128), "float32"
        ),
        "dense_arch.model._mlp.0._linear.weight": TensorInfo((512, 13), "float32"),
        "dense_arch.model._mlp.0._linear.bias": TensorInfo((512,), "float32"),
    }
    config = Config.from_yaml(CONFIGS / "recommender.yaml")
    assert keys(select_tables(config, tensors, "dlrm.pt")) == list(tensors)[:2]


# --- tiny tables: globs and regexes skip them, exact keys do not ----------------------------------


def test_glob_and_regex_rules_skip_tables_under_min_table_bytes() -> None:
    threshold = 64 * 1024
    for pattern in ("bags.*", "re:bags\\.\\d\\.weight"):
        selection = select([{"match": pattern}], min_table_bytes=threshold)
        assert keys(selection) == ["bags.0.weight"]  # 250 KiB; bags.1 is 31.2 KiB
        assert [(t.key, t.rule) for t in selection.skipped] == [
            ("bags.1.weight", f"layers[0] (match '{pattern}')")
        ]
        assert selection.matches[0].skipped == ("bags.1.weight",)


def test_an_exact_key_always_selects_and_a_later_rule_can_win_a_skipped_table() -> None:
    assert keys(select([{"match": "bags.1.weight"}], min_table_bytes=1 << 20)) == ["bags.1.weight"]
    assert keys(select([{"match": "bags.1"}], min_table_bytes=1 << 20)) == ["bags.1.weight"]
    selection = select([{"match": "bags.*"}, {"match": "bags.1"}], min_table_bytes=64 * 1024)
    assert keys(selection) == ["bags.0.weight", "bags.1.weight"]
    assert selection.skipped == ()
    assert selection.matches[0].skipped == ("bags.1.weight",)


def test_a_config_whose_tables_are_all_small_says_so() -> None:
    assert error([{"match": "bags.*"}], min_table_bytes=1 << 20) == (
        "model.pt: the config selects no table; 2 matched table(s) are smaller than "
        "min_table_bytes (1 MiB): bags.0.weight, bags.1.weight (name them exactly, or lower "
        "min_table_bytes)"
    )


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (-1, "min_table_bytes: must be an integer >= 0 (bytes; 0 skips no table), got -1"),
        (1.5, "min_table_bytes: must be an integer >= 0 (bytes; 0 skips no table), got 1.5"),
        (
            "64KiB",
            "min_table_bytes: must be an integer >= 0 (bytes; 0 skips no table), got '64KiB'",
        ),
        (None, "min_table_bytes: must be an integer >= 0 (bytes; 0 skips no table), got None"),
    ],
)
def test_min_table_bytes_is_validated(value: object, message: str) -> None:
    from sparqcli.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        Config.from_dict({"layers": [{"match": "x"}], "min_table_bytes": value}, "cfg.yaml")
    assert info.value.problems == [message]
    with pytest.raises(ConfigError):
        Config(layers=[], min_table_bytes=-1)


def test_a_pattern_passes_over_small_tensors_that_are_not_tables() -> None:
    # The README's `*embedding*` on a BERT checkpoint also matches embeddings.LayerNorm.bias.
    bert = {
        "embeddings.word_embeddings.weight": TensorInfo((30522, 64), "float32"),
        "embeddings.LayerNorm.bias": TensorInfo((64,), "float32"),
        "embeddings.position_ids": TensorInfo((1, 512), "int64"),
    }
    found = select([{"match": "*embedding*"}], bert, min_table_bytes=65536)
    assert keys(found) == ["embeddings.word_embeddings.weight"]
    # A large one, or any named exactly (or with no size floor), is still an error.
    big = {**bert, "embeddings.LayerNorm.bias": TensorInfo((40000,), "float32")}
    assert "matches 'embeddings.LayerNorm.bias', which is not a 2-D floating tensor" in error(
        [{"match": "*embedding*"}], big, min_table_bytes=65536
    )
    assert "which is not a 2-D floating tensor" in error([{"match": "*embedding*"}], bert)
    assert "which is not a 2-D floating tensor" in error(
        [{"match": "embeddings.LayerNorm.bias"}], bert, min_table_bytes=65536
    )


def test_rules_show_patterns_as_written() -> None:
    message = error([{"match": r"re:.*\.nothing"}])
    assert r"layers[0] (match 're:.*\.nothing') matches no tensor" in message
