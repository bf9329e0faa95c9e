"""Config loading: the shipped configs, every problem with its exact message, --set and --order."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from sparqcli.config import Config, ResolvedRule, Rule
from sparqcli.errors import ConfigError, InputError, SettingError
from sparqcli.settings import Gates, Quantization, Sparsity

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))


def write(tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def problems_of(data: object) -> list[str]:
    with pytest.raises(ConfigError) as info:
        Config.from_dict(data, "cfg.yaml")
    return info.value.problems


def message_of(path: Path, *overrides: str, order: str | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        Config.from_yaml(path, overrides, order=order)
    return str(info.value)


def test_the_configs_folder_is_not_empty() -> None:
    assert [path.name for path in CONFIGS] == [
        "default.yaml",
        "recommender.yaml",
        "token-embedding.yaml",
    ]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda path: path.name)
def test_every_shipped_config_loads(path: Path) -> None:
    config = Config.from_yaml(path)
    assert config.source == str(path)
    assert config.layers
    assert Config.from_dict((config).to_dict(), str(path)) == config
    assert Config.from_dict(config.to_dict(), str(path)).to_dict() == config.to_dict()


def test_minimal_config_takes_the_defaults() -> None:
    config = Config.from_dict({"layers": [{"match": "*emb*"}]}, "cfg.yaml")
    assert config == Config(layers=[Rule(match="*emb*")])
    assert config.source == "cfg.yaml"
    assert config.resolved_rules == (
        ResolvedRule(
            index=0,
            match="*emb*",
            type=None,
            sparsity=Sparsity(),
            quantization=Quantization(),
            gates=Gates(),
        ),
    )


def test_a_config_built_in_python_equals_the_same_yaml(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
order: quantize-first
sparsity: {level: 0.6, block_shape: [1, 4]}
quantization: {bits: 4}
layers:
  - match: "tables.*"
  - match: "bags.*"
    sparsity: {level: 0.8}
    gates: {min_row_cosine: null}
""",
    )
    built = Config(
        order="quantize-first",
        sparsity=Sparsity(level=0.6, block_shape=(1, 4)),
        quantization=Quantization(bits=4),
        layers=[
            Rule(match="tables.*"),
            Rule(match="bags.*", sparsity={"level": 0.8}, gates={"min_row_cosine": None}),
        ],
    )
    loaded = Config.from_yaml(path)
    assert loaded == built
    assert loaded.resolved_rules == built.resolved_rules
    again = Config.from_yaml(write(tmp_path, built.to_yaml(), "again.yaml"))
    assert again == built
    # equality compares what the rules resolve to; the YAML keeps each rule's own overrides
    assert again.to_dict() == loaded.to_dict() == built.to_dict()


def test_a_rule_dataclass_replaces_the_whole_section() -> None:
    config = Config(
        sparsity=Sparsity(level=0.3, block_shape=(2, 2), norm="L2"),
        layers=[
            Rule(match="a", sparsity=Sparsity(level=0.9)),
            Rule(match="b", sparsity={"level": 0.9}),
        ],
    )
    whole, merged = config.resolved_rules
    assert whole.sparsity == Sparsity(level=0.9)
    assert merged.sparsity == Sparsity(level=0.9, block_shape=(2, 2), norm="L2")


def test_a_config_built_in_python_lists_every_problem_with_its_path() -> None:
    with pytest.raises(ConfigError) as info:
        Config(
            order="backwards",  # type: ignore[arg-type]
            layers=[
                Rule(match="a", sparsity={"level": 2, "blocks": [1, 4]}),
                Rule(quantization={"bits": 9}),
            ],
        )
    assert info.value.problems == [
        "order: must be one of sparsify-first, quantize-first, got 'backwards'",
        "layers[0].sparsity.blocks: unknown key; did you mean 'block_shape'?",
        "layers[0].sparsity.level: must be a number in [0, 1], got 2",
        "layers[1]: needs 'match' or 'type'",
        "layers[1].quantization.bits: must be an integer from 1 to 8, got 9",
    ]
    with pytest.raises(ConfigError, match=r"^<config>: 1 problem: layers: must be a non-empty"):
        Config(layers=[])


def test_settings_validate_themselves() -> None:
    with pytest.raises(SettingError) as info:
        Quantization(bits=8.0)  # type: ignore[arg-type]
    assert str(info.value) == "quantization.bits: must be an integer from 1 to 8, got 8.0"
    with pytest.raises(SettingError) as info:
        Gates(max_rel_error=-1, min_row_cosine=2)
    assert str(info.value) == (
        "gates.max_rel_error: must be a number >= 0, got -1; "
        "gates.min_row_cosine: must be a number in [-1, 1], got 2"
    )
    with pytest.raises(SettingError, match=r"^sparsity.zeros_per_block: must be in \[0, 4\]"):
        Sparsity(zeros_per_block=5)
    assert Sparsity(level=1).level == 1.0 and isinstance(Sparsity(level=1).level, float)
    assert Sparsity(block_shape=[2, 2]).block_shape == (2, 2)  # type: ignore[arg-type]
    assert Gates(max_rel_error=1).max_rel_error == 1.0


def test_a_rule_gate_set_to_null_disables_the_top_level_gate() -> None:
    config = Config.from_dict(
        {
            "gates": {"min_row_cosine": 0.99, "max_rel_error": 0.5},
            "layers": [{"match": "a", "gates": {"min_row_cosine": None}}, {"match": "b"}],
        }
    )
    disabled, inherited = config.resolved_rules
    assert disabled.gates == Gates(max_rel_error=0.5)
    assert inherited.gates == Gates(min_row_cosine=0.99, max_rel_error=0.5)


def test_rules_merge_their_overrides_field_by_field() -> None:
    config = Config.from_dict(
        {
            "order": "quantize-first",
            "sparsity": {"level": 0.5, "block_shape": [2, 4], "norm": "L2"},
            "quantization": {"bits": 8, "scale_dtype": "float16"},
            "gates": {"max_rel_error": 0.5, "min_row_cosine": 0.9},
            "layers": [
                {"match": "*embedding*"},
                {
                    "match": "sparse.bags.*",
                    "sparsity": {"level": 0.8, "zeros_per_block": 6},
                    "quantization": {"bits": 4},
                    "gates": {"max_rel_error": 0.2, "min_row_cosine": None},
                },
                {"type": "EmbeddingBag"},
            ],
            "exclude": ["*position_embeddings*"],
        },
        "cfg.yaml",
    )
    first, second, third = config.resolved_rules
    assert first.sparsity == Sparsity(level=0.5, block_shape=(2, 4), norm="L2")
    assert second.sparsity == Sparsity(level=0.8, block_shape=(2, 4), zeros_per_block=6, norm="L2")
    assert second.quantization == Quantization(bits=4, scale_dtype="float16")
    assert second.gates == Gates(max_rel_error=0.2, min_row_cosine=None)
    assert first.gates == third.gates == Gates(max_rel_error=0.5, min_row_cosine=0.9)
    assert (third.match, third.type, third.index) == (None, "EmbeddingBag", 2)
    assert third.label == "layers[2] (type 'EmbeddingBag')"
    assert second.label == "layers[1] (match 'sparse.bags.*')"
    assert config.exclude == ("*position_embeddings*",)
    assert config.order == "quantize-first"
    assert isinstance(first.sparsity.level, float)


def test_config_to_dict_is_the_yaml_mapping() -> None:
    config = Config.from_dict(
        {
            "layers": [{"match": "re:emb", "quantization": {"bits": 2}}],
            "gates": {"max_rel_error": 1},
        },
        "cfg.yaml",
    )
    data = config.to_dict()
    assert json.loads(json.dumps(data)) == data
    assert data == {
        "version": 1,
        "order": "sparsify-first",
        "sparsity": {
            "level": 0.5,
            "block_shape": [1, 4],
            "zeros_per_block": None,
            "norm": "L1",
            "scope": "table",
        },
        "quantization": {"bits": 8, "scale_dtype": "float32", "range": "minmax"},
        "layers": [{"match": "re:emb", "quantization": {"bits": 2}}],
        "exclude": [],
        "min_table_bytes": 65536,
        "gates": {"max_rel_error": 1.0, "min_row_cosine": None, "max_bytes_ratio": None},
    }


# --- problems, each with its exact message -------------------------------------------------------


def test_unknown_key_suggests_the_closest() -> None:
    assert problems_of({"layers": [{"match": "x"}], "sparsity": {"levle": 0.5}}) == [
        "sparsity.levle: unknown key; did you mean 'level'?"
    ]


def test_unknown_key_at_every_level() -> None:
    assert problems_of(
        {
            "layer": [],
            "bits": 4,
            "gates": {"max_rel_eror": 0.1},
            "layers": [{"match": "x", "quantisation": {"bits": 4}, "gates": {"threshold": 0.9}}],
        }
    ) == [
        "layer: unknown key; did you mean 'layers'?",
        "bits: unknown key; did you mean 'quantization.bits'?",
        "gates.max_rel_eror: unknown key; did you mean 'max_rel_error'?",
        "layers[0].quantisation: unknown key; did you mean 'quantization'?",
        "layers[0].gates.threshold: unknown key; "
        "expected one of max_rel_error, min_row_cosine, max_bytes_ratio",
    ]


def test_bad_value() -> None:
    assert problems_of({"layers": [{"match": "x", "sparsity": {"level": 1.5}}]}) == [
        "layers[0].sparsity.level: must be a number in [0, 1], got 1.5"
    ]


def test_wrong_types() -> None:
    assert problems_of(
        {
            "sparsity": {"level": "high", "block_shape": "1x4", "zeros_per_block": 1.5},
            "quantization": {"bits": 8.0},
            "layers": [{"match": "x"}],
        }
    ) == [
        "sparsity.level: must be a number in [0, 1], got 'high'",
        "sparsity.block_shape: must be two positive integers [rows, columns], got '1x4'",
        "sparsity.zeros_per_block: must be an integer or null, got 1.5",
        "quantization.bits: must be an integer from 1 to 8, got 8.0",
    ]


def test_booleans_are_not_numbers() -> None:
    assert problems_of(
        {
            "version": True,
            "sparsity": {"level": True, "block_shape": [True, 4]},
            "quantization": {"bits": True},
            "gates": {"max_rel_error": False},
            "layers": [{"match": "x"}],
        }
    ) == [
        "version: must be 1, got True",
        "sparsity.level: must be a number in [0, 1], got True",
        "sparsity.block_shape: must be two positive integers [rows, columns], got [True, 4]",
        "quantization.bits: must be an integer from 1 to 8, got True",
        "gates.max_rel_error: must be a number >= 0, got False",
    ]


def test_gate_ranges() -> None:
    assert problems_of(
        {
            "gates": {"max_rel_error": -0.1, "min_row_cosine": 1.5, "max_bytes_ratio": 0},
            "layers": [{"match": "x", "gates": {"max_rel_error": float("nan")}}],
        }
    ) == [
        "gates.max_rel_error: must be a number >= 0, got -0.1",
        "gates.min_row_cosine: must be a number in [-1, 1], got 1.5",
        "gates.max_bytes_ratio: must be a number > 0, got 0",
        "layers[0].gates.max_rel_error: must be a number >= 0, got nan",
    ]


def test_several_problems_at_once(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
version: 2
order: sparse-first
sparsity:
  levle: 0.5
  norm: L3
quantization: {bits: 9}
layers:
  - match: "*emb*"
    sparsity: {level: 1.5}
  - {}
exclude: "*pos*"
""",
    )
    problems = [
        "version: must be 1, got 2",
        "order: must be one of sparsify-first, quantize-first, got 'sparse-first'",
        "sparsity.levle: unknown key; did you mean 'level'?",
        "sparsity.norm: must be one of L1, L2, got 'L3'",
        "quantization.bits: must be an integer from 1 to 8, got 9",
        "exclude: must be a list of patterns, got string",
        "layers[0].sparsity.level: must be a number in [0, 1], got 1.5",
        "layers[1]: needs 'match' or 'type'",
    ]
    with pytest.raises(ConfigError) as info:
        Config.from_yaml(path)
    assert info.value.problems == problems
    assert info.value.source == str(path)
    assert str(info.value) == f"{path}: 8 problems: " + "; ".join(problems)
    assert info.value.exit_code == 2


def test_a_top_level_problem_is_not_repeated_for_every_rule() -> None:
    assert problems_of(
        {
            "sparsity": {"level": 2, "block_shape": [0, 4], "zeros_per_block": 3},
            "layers": [{"match": "a"}, {"match": "b", "sparsity": {"zeros_per_block": 5}}],
        }
    ) == [
        "sparsity.level: must be a number in [0, 1], got 2",
        "sparsity.block_shape: must be two positive integers [rows, columns], got [0, 4]",
        "layers[1].sparsity.zeros_per_block: must be in [0, 4] for block shape [1, 4], got 5",
    ]


def test_a_rule_override_is_checked_against_the_merged_settings() -> None:
    assert problems_of(
        {
            "sparsity": {"zeros_per_block": 3},
            "layers": [{"match": "a", "sparsity": {"block_shape": [1, 2]}}],
        }
    ) == ["layers[0].sparsity.zeros_per_block: must be in [0, 2] for block shape [1, 2], got 3"]


def test_missing_layers() -> None:
    assert problems_of({"sparsity": {"level": 0.5}}) == [
        "layers: required, a non-empty list of rules"
    ]


def test_empty_or_wrong_layers() -> None:
    assert problems_of({"layers": []}) == [
        "layers: must be a non-empty list of rules, got an empty list"
    ]
    assert problems_of({"layers": {"match": "x"}}) == [
        "layers: must be a non-empty list of rules, got mapping"
    ]
    assert problems_of({"layers": ["*emb*"]}) == [
        "layers[0]: must be a mapping with 'match' or 'type', got string"
    ]


def test_rule_with_both_match_and_type() -> None:
    assert problems_of({"layers": [{"match": "x", "type": "embedding"}]}) == [
        "layers[0]: has both 'match' and 'type'; use one per rule"
    ]


def test_rule_type_must_be_known() -> None:
    assert problems_of({"layers": [{"type": "Linear"}]}) == [
        "layers[0].type: must be one of embedding, Embedding, EmbeddingBag, got 'Linear'"
    ]


def test_bad_regex() -> None:
    assert problems_of({"layers": [{"match": "re:emb("}], "exclude": ["re:", ""]}) == [
        "exclude[0]: empty regular expression after 're:'",
        "exclude[1]: must be a non-empty string (a glob, a name or re:REGEX), got ''",
        "layers[0].match: invalid regular expression 'emb(': "
        "missing ), unterminated subpattern at position 3",
    ]


def test_sections_must_be_mappings_but_may_be_null() -> None:
    assert problems_of({"sparsity": [0.5], "layers": [{"match": "x", "gates": 0.5}]}) == [
        "sparsity: must be a mapping, got list",
        "layers[0].gates: must be a mapping, got number",
    ]
    config = Config.from_dict(
        {"sparsity": None, "gates": None, "exclude": None, "layers": [{"match": "x"}]}, "c"
    )
    assert config.sparsity == Sparsity()
    assert config.exclude == ()


def test_yaml_not_a_mapping(tmp_path: Path) -> None:
    assert message_of(write(tmp_path, "- match: x\n")) == (
        f"{tmp_path / 'cfg.yaml'}: 1 problem: top level: must be a mapping, got list"
    )
    assert message_of(write(tmp_path, "# nothing\n")) == (
        f"{tmp_path / 'cfg.yaml'}: 1 problem: top level: must be a mapping, got an empty document"
    )
    assert problems_of("layers") == ["top level: must be a mapping, got string"]


def test_yaml_syntax_error_is_one_line_with_its_position(tmp_path: Path) -> None:
    path = write(tmp_path, "layers:\n  - match: [x\nexclude: []\n")
    assert message_of(path) == (
        f"{path}: 1 problem: invalid YAML at line 3, column 8: expected ',' or ']', but got ':'"
    )


def test_yaml_aliases_are_refused(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "base: &base {level: 0.8}\nlayers:\n  - match: x\n    sparsity: *base\n",
    )
    assert message_of(path) == (
        f"{path}: 1 problem: line 4, column 15: "
        "YAML aliases (*base) are not allowed; write the value out"
    )


def test_yaml_bomb_is_refused_quickly(tmp_path: Path) -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 10)]
    path = write(tmp_path, "\n".join(lines) + "\nlayers: [{match: x}]\n")
    assert message_of(path) == (
        f"{path}: 1 problem: line 2, column 10: "
        "YAML aliases (*a0) are not allowed; write the value out"
    )


def test_yaml_duplicate_keys_are_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "layers: [{match: x}]\nsparsity: {level: 0.1}\nsparsity: {level: 0.9}\n")
    assert message_of(path) == f"{path}: 1 problem: line 3, column 1: duplicate key 'sparsity'"


def test_deeply_nested_yaml(tmp_path: Path) -> None:
    path = write(tmp_path, "layers: " + "[" * 5000)
    assert message_of(path) == f"{path}: 1 problem: invalid YAML: nested too deeply"


def test_large_file_is_refused_before_parsing(tmp_path: Path) -> None:
    path = write(tmp_path, "layers: [{match: x}]\n" + "#" * (1 << 20))
    assert message_of(path) == (
        f"{path}: 1 problem: file is larger than 1 MiB; a config is a few lines of YAML"
    )


def test_non_utf8_file(tmp_path: Path) -> None:
    path = tmp_path / "cfg.yaml"
    path.write_bytes(b"layers: [{match: \xff}]\n")
    assert message_of(path) == f"{path}: 1 problem: not UTF-8 text (invalid byte at offset 17)"


def test_missing_and_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(InputError) as info:
        Config.from_yaml(tmp_path / "nope.yaml")
    assert str(info.value) == f"{tmp_path / 'nope.yaml'}: no such file"
    assert info.value.exit_code == 1
    with pytest.raises(InputError) as info:
        Config.from_yaml(tmp_path)
    assert str(info.value) == f"{tmp_path}: is a directory, not a config file"


# --- --set and --order ------------------------------------------------------------------------

BASE = """\
sparsity: {level: 0.5}
layers:
  - match: "*emb*"
  - match: "bags.*"
    sparsity: {level: 0.8}
"""


def test_set_overrides(tmp_path: Path) -> None:
    config = Config.from_yaml(
        write(tmp_path, BASE),
        [
            "sparsity.level=0.7",
            "sparsity.block_shape=[2, 2]",
            "quantization.bits=4",
            "layers[1].sparsity.level=0.9",
            "layers[0].gates.max_rel_error=0.3",
            "gates.max_bytes_ratio=0.5",
            "sparsity.zeros_per_block = 2",
            "exclude=['*pos*']",
        ],
    )
    first, second = config.resolved_rules
    assert config.sparsity == Sparsity(level=0.7, block_shape=(2, 2), zeros_per_block=2)
    assert first.sparsity == config.sparsity
    assert second.sparsity == Sparsity(level=0.9, block_shape=(2, 2), zeros_per_block=2)
    assert first.quantization.bits == second.quantization.bits == 4
    assert first.gates == Gates(max_rel_error=0.3, max_bytes_ratio=0.5)
    assert second.gates == Gates(max_bytes_ratio=0.5)
    assert config.exclude == ("*pos*",)


def test_set_null_and_string_values(tmp_path: Path) -> None:
    config = Config.from_yaml(
        write(tmp_path, BASE + "gates: {max_rel_error: 0.5}\n"),
        ["gates.max_rel_error=null", "sparsity.norm=L2", "layers[0].match=token_*"],
    )
    assert config.gates == Gates()
    assert config.sparsity.norm == "L2"
    assert config.layers[0].match == "token_*"


def test_set_problems_are_reported_with_the_config_problems(tmp_path: Path) -> None:
    path = write(tmp_path, BASE)
    problems = [
        "override foo: expected KEY=VALUE",
        "override layers[2].sparsity.level: layers has 2 entries",
        "override sparsity.level.x: sparsity.level is not a mapping",
        "override layers.x: layers is not a mapping",
        "override sparsity[0]: sparsity is not a list",
        "override a..b: invalid key; write a dotted path such as sparsity.level "
        "or layers[1].quantization.bits",
        "override sparsity.block_shape: cannot read value '[1, 2': "
        "invalid YAML at line 1, column 6: expected ',' or ']', but got '<stream end>'",
        "sparsity.levle: unknown key; did you mean 'level'? (from override sparsity.levle=0.3)",
        "quantization.bits: must be an integer from 1 to 8, got 0 (from override "
        "quantization.bits=0)",
    ]
    with pytest.raises(ConfigError) as info:
        Config.from_yaml(
            path,
            [
                "foo",
                "layers[2].sparsity.level=0.9",
                "sparsity.level.x=1",
                "layers.x=1",
                "sparsity[0]=1",
                "a..b=1",
                "sparsity.block_shape=[1, 2",
                "sparsity.levle=0.3",
                "quantization.bits=0",
            ],
        )
    assert info.value.problems == problems


def test_set_problems_name_the_override_not_only_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, BASE + "quantization: {scale_dtype: float64}\n")
    assert message_of(
        path, "quantization.bits=3", "quantization.bits=9", "layers[1].sparsity={level: 7}"
    ) == (
        f"{path}: 3 problems: "
        "quantization.scale_dtype: must be one of float32, float16, bfloat16, got 'float64'; "
        "quantization.bits: must be an integer from 1 to 8, got 9 (from override "
        "quantization.bits=9); "
        "layers[1].sparsity.level: must be a number in [0, 1], got 7 (from override "
        "layers[1].sparsity={level: 7})"
    )


def test_numbers_with_an_exponent_and_no_point_are_numbers(tmp_path: Path) -> None:
    # PyYAML alone reads `1e-1` as the string '1e-1' (YAML 1.1); a quoted one stays a string.
    path = write(
        tmp_path,
        'sparsity: {level: 5e-1}\ngates: {max_rel_error: 1E-2}\nlayers: [{match: "*"}, {match: x}]\n',
    )
    config = Config.from_yaml(path, ["layers[1].sparsity.level=+9e-1"])
    assert config.sparsity.level == 0.5
    assert config.gates.max_rel_error == 0.01
    assert config.resolved_rules[1].sparsity.level == 0.9
    assert message_of(path, "sparsity.level='5e-1'") == (
        f"{path}: 1 problem: sparsity.level: must be a number in [0, 1], got '5e-1' "
        "(from override sparsity.level='5e-1')"
    )


def test_set_takes_a_value_starting_with_a_star_as_a_glob(tmp_path: Path) -> None:
    # YAML reads `*emb*` as an alias (refused in configs); on the command line a glob is meant
    config = Config.from_yaml(write(tmp_path, BASE), ["layers[0].match= *tok*"])
    assert config.layers[0].match == "*tok*"
    assert message_of(write(tmp_path, BASE), "sparsity.level=*x") == (
        f"{tmp_path / 'cfg.yaml'}: 1 problem: sparsity.level: must be a number in [0, 1], got "
        "'*x' (from override sparsity.level=*x)"
    )
    # aliases in a value elsewhere are still refused
    assert message_of(write(tmp_path, BASE), "exclude=[*x]").endswith(
        "YAML aliases (*x) are not allowed; write the value out"
    )


def test_order_override(tmp_path: Path) -> None:
    path = write(tmp_path, "order: sparsify-first\n" + BASE)
    assert Config.from_yaml(path).order == "sparsify-first"
    assert Config.from_yaml(path, order="quantize-first").order == "quantize-first"
    assert message_of(path, "order=quantize-first", order="both") == (
        f"{path}: 1 problem: order: must be one of sparsify-first, quantize-first, got 'both'"
    )


def test_importing_config_and_select_does_not_import_torch() -> None:
    code = "import sys, sparqcli.config, sparqcli.select; print('torch' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "False"


def _roundtrip(data: dict[str, Any]) -> Config:
    return Config.from_dict((Config.from_dict(data, "c")).to_dict(), "c")


def test_roundtrip_keeps_type_rules() -> None:
    data: dict[str, Any] = {"layers": [{"type": "embedding", "gates": {"max_bytes_ratio": 0.4}}]}
    assert _roundtrip(data) == Config.from_dict(data, "c")


# Each shipped config, run on a small checkpoint shaped like the models it is written for.
SHIPPED_MODELS = {
    "default.yaml": {"token_embedding.weight": (1000, 32), "bags.0.weight": (600, 32)},
    "recommender.yaml": {"sparse.bags.0.weight": (2000, 16), "sparse.emb_user.weight": (2500, 8)},
    "token-embedding.yaml": {"embeddings.word_embeddings.weight": (1000, 32)},
}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda path: path.name)
def test_every_shipped_config_runs(path: Path, tmp_path: Path) -> None:
    import torch

    import sparqcli

    generator = torch.Generator().manual_seed(0)
    state = {
        key: torch.randn(*shape, generator=generator)
        for key, shape in SHIPPED_MODELS[path.name].items()
    }
    state["head.weight"] = torch.randn(4, 32, generator=generator)
    checkpoint = tmp_path / "model.pt"
    torch.save(state, checkpoint)
    report = sparqcli.compress(checkpoint, path)
    tables = report.files[0].tables
    assert sorted(table.key for table in tables) == sorted(SHIPPED_MODELS[path.name])
    assert all(table.stats is not None and table.bytes_after for table in tables)
    assert report.files[0].written == report.gates_passed


def test_range_scope_and_every_width() -> None:
    config = Config.from_dict(
        {
            "sparsity": {"scope": "row"},
            "quantization": {"bits": 3, "range": "mse"},
            "layers": [{"match": "x"}, {"match": "y", "quantization": {"bits": 1}}],
        },
        "cfg.yaml",
    )
    first, second = config.resolved_rules
    assert (first.sparsity.scope, first.quantization.range, first.quantization.bits) == (
        "row",
        "mse",
        3,
    )
    assert (second.quantization.range, second.quantization.bits) == ("mse", 1)
    assert problems_of(
        {
            "sparsity": {"scope": "rows"},
            "quantization": {"range": "MSE", "bits": 9, "rnage": "mse"},
            "layers": [{"match": "x", "quantization": {"bits": 2.5}, "sparsity": {"scope": 1}}],
        }
    ) == [
        "sparsity.scope: must be one of table, row, got 'rows'",
        "quantization.rnage: unknown key; did you mean 'range'?",
        "quantization.range: must be one of minmax, mse, got 'MSE'",
        "quantization.bits: must be an integer from 1 to 8, got 9",
        "layers[0].sparsity.scope: must be one of table, row, got 1",
        "layers[0].quantization.bits: must be an integer from 1 to 8, got 2.5",
    ]


def test_a_statistic_that_is_not_a_number_fails_its_gate():
    gates = Gates(max_rel_error=0.1, min_row_cosine=0.9, max_bytes_ratio=0.5)
    nan = float("nan")
    assert gates.failures(nan, nan, 0.2) == [
        "rel_error nan (not measurable) > max_rel_error 0.1",
        "row_cosine_min nan (not measurable) < min_row_cosine 0.9",
    ]
    assert gates.failures(0.05, 0.95, 0.2) == []
    assert Gates().failures(nan, nan, None) == []  # no gate, nothing to fail


def test_rules_given_as_mappings_or_dataclasses_compare_as_their_yaml(tmp_path) -> None:
    as_python = Config(layers=[Rule(match="a", sparsity={"block_shape": [2, 2]})])
    as_yaml = Config.from_dict({"layers": [{"match": "a", "sparsity": {"block_shape": [2, 2]}}]})
    assert as_python == as_yaml
    assert Config(layers=[{"match": "a", "quantization": {"bits": 4}}]) == Config(
        layers=[Rule(match="a", quantization={"bits": 4})]
    )
    with_dataclass = Config(layers=[Rule(match="a", sparsity=Sparsity(level=0.3))])
    path = tmp_path / "c.yaml"
    path.write_text(with_dataclass.to_yaml())
    assert Config.from_yaml(path) == with_dataclass
    assert Config(layers=[Rule(match="a")]) != Config(layers=[Rule(match="b")])
    assert Config(layers=[Rule(match="a")]) != Config(
        layers=[Rule(match="a", sparsity={"level": 0.9})]
    )


def test_integers_past_float_range_are_config_problems() -> None:
    huge = 10**400
    with pytest.raises(SettingError, match=r"level: must be a number in \[0, 1\], got an integer"):
        Sparsity(level=huge)
    with pytest.raises(SettingError, match=r"max_rel_error: must be a number >= 0, got an integer"):
        Gates(max_rel_error=huge)
    with pytest.raises(ConfigError) as found:
        Config.from_dict(
            {
                "layers": [{"match": "a", "quantization": {"bits": huge}}],
                "sparsity": {"zeros_per_block": -huge},
                "gates": {"min_row_cosine": -huge},
            }
        )
    assert found.value.problems == [
        "sparsity.zeros_per_block: must not be negative, got a negative integer of 401 digits",
        "gates.min_row_cosine: must be a number in [-1, 1], got a negative integer of 401 digits",
        "layers[0].quantization.bits: must be an integer from 1 to 8, got an integer of 401 digits",
    ]


def test_layers_must_be_a_list_of_rules_and_any_iterable_of_rules_is_kept() -> None:
    for layers, got in [("ab", "string"), ({"match": "a"}, "mapping"), (3, "integer")]:
        with pytest.raises(ConfigError) as found:
            Config(layers=layers)  # type: ignore[arg-type]
        assert found.value.problems == [f"layers: must be a non-empty list of rules, got {got}"]
    from_generator = Config(layers=(Rule(match=key) for key in ("x", "y")))
    assert from_generator == Config(layers=[Rule(match="x"), Rule(match="y")])
    assert [rule.match for rule in from_generator.resolved_rules] == ["x", "y"]
