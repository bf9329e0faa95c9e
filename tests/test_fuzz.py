"""Fuzzing: mutated checkpoints, compressed files and configs through the CLI's error mapping.

Valid files of each kind are mutated (bit flips, truncations, insertions, deletions and
overwrites, biased towards the header; for safetensors files also edits of header JSON values,
the sparq metadata included; for configs also edits of YAML values) and run through `compress`,
`inspect`, `decompress` and `validate`. Each run must exit 0 with a valid output (the mutation
left a valid file), or 1/2 with exactly one `sparq: error: ` line on stderr: no traceback, no
escaped exception, no hang (a watchdog kills the run after 60 s), no memory blow-up (the
address space is capped while fuzzing).

SPARQ_FUZZ_EXAMPLES sets the total number of examples across file kinds (default 150,
seeded and derandomized, ~10 s); e.g. SPARQ_FUZZ_EXAMPLES=2000 for a long run, with
SPARQ_FUZZ_COLLECT=failures.jsonl to record every failure instead of stopping at the first.
SPARQ_FUZZ_SEED (default 0) picks another deterministic sequence of examples.
"""

from __future__ import annotations

import atexit
import faulthandler
import json
import os
import re
import resource
import shutil
import struct
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from tests.conftest import check_outcome, invoke, write_inputs

FUZZ_EXAMPLES = int(os.environ.get("SPARQ_FUZZ_EXAMPLES", "150"))
_SEED = int(os.environ.get("SPARQ_FUZZ_SEED", "0"))
_SHARES = {"pt": 0.2, "legacy": 0.1, "safetensors": 0.25, "sparq": 0.3, "config": 0.15}
# Set to a file name, failures are appended there as JSON lines and the run goes on.
_COLLECT = os.environ.get("SPARQ_FUZZ_COLLECT")
_WATCHDOG_SECONDS = 60
_EXTRA_ADDRESS_SPACE = 4 << 30

_FOLDER = Path(tempfile.mkdtemp(prefix="sparq-fuzz-"))
atexit.register(shutil.rmtree, _FOLDER, ignore_errors=True)
_INPUTS = write_inputs(_FOLDER / "valid")
_VALID = {kind: path.read_bytes() for kind, path in _INPUTS.items()}


def _examples(kind: str) -> int:
    return max(1, round(FUZZ_EXAMPLES * _SHARES[kind]))


def _settings(kind: str) -> Any:
    """Returns the decorator giving a fuzz test its examples: derandomized, or seeded."""
    configured = settings(
        max_examples=_examples(kind),
        derandomize=_SEED == 0,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    return configured if _SEED == 0 else lambda test: seed(_SEED)(configured(test))


# --- mutations --------------------------------------------------------------------------------


def _position(size: int) -> st.SearchStrategy[int]:
    """A byte position, half the time inside the first 512 bytes (headers live there)."""
    return st.one_of(st.integers(0, min(size, 512)), st.integers(0, size))


def _byte_ops(size: int) -> st.SearchStrategy[tuple]:
    small = st.binary(min_size=1, max_size=16)
    return st.one_of(
        st.tuples(st.just("flip"), _position(size), st.integers(0, 7)),
        st.tuples(st.just("truncate"), _position(size)),
        st.tuples(st.just("insert"), _position(size), small),
        st.tuples(st.just("overwrite"), _position(size), small),
        st.tuples(st.just("delete"), _position(size), st.integers(1, 64)),
    )


def _apply(data: bytes, op: tuple) -> bytes:
    buffer = bytearray(data)
    kind = op[0]
    if kind == "flip":
        if buffer:
            buffer[op[1] % len(buffer)] ^= 1 << op[2]
    elif kind == "truncate":
        del buffer[op[1] :]
    elif kind == "insert":
        buffer[op[1] : op[1]] = op[2]
    elif kind == "overwrite":
        buffer[op[1] : op[1] + len(op[2])] = op[2]
    elif kind == "delete":
        del buffer[op[1] : op[1] + op[2]]
    return bytes(buffer)


# Values a hostile or broken header could hold: huge, negative, wrong types.
_JSON_VALUES = st.one_of(
    st.sampled_from([0, 1, -1, 2**31, 2**32 + 1, 2**40, 2**62, 2**63 - 1, 2**64, -(2**63)]),
    st.integers(-(10**30), 10**30),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from(["", "F32", "U8", "F16", "I64", "block", "value", "none", "L2"]),
    st.sampled_from(["quantize-first", "sparsify-first", "float16", "bfloat16", "x" * 300]),
    st.none(),
    st.booleans(),
    st.lists(st.integers(-3, 2**40), max_size=4),
    st.just({}),
)


def _leaves(value: Any, path: tuple = ()) -> Iterator[tuple]:
    if isinstance(value, dict):
        for key in sorted(value):
            yield from _leaves(value[key], (*path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _leaves(item, (*path, index))
    yield path


def _replace(value: Any, path: tuple, new: Any) -> Any:
    if not path:
        return new
    copy = dict(value) if isinstance(value, dict) else list(value)
    copy[path[0]] = _replace(value[path[0]], path[1:], new)
    return copy


def _split_safetensors(data: bytes) -> tuple[dict[str, Any], bytes]:
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    metadata = header.get("__metadata__") or {}
    if "sparq" in metadata:  # the sparq document is JSON inside a JSON string
        header["__metadata__"] = {**metadata, "sparq": json.loads(metadata["sparq"])}
    return header, data[8 + length :]


def _join_safetensors(header: dict[str, Any], body: bytes) -> bytes:
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    if isinstance(metadata, dict) and isinstance(metadata.get("sparq"), (dict, list)):
        header = {**header, "__metadata__": {**metadata, "sparq": json.dumps(metadata["sparq"])}}
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + body


@st.composite
def mutated_safetensors(draw: st.DrawFn, kind: str) -> bytes:
    data = _VALID[kind]
    if draw(st.booleans()):
        header, body = _split_safetensors(data)
        for _ in range(draw(st.integers(1, 3))):
            leaves = list(_leaves(header))
            path = draw(st.sampled_from(leaves))
            header = _replace(header, path, draw(_JSON_VALUES))
        data = _join_safetensors(header, body)
    for op in draw(st.lists(_byte_ops(len(data)), max_size=3)):
        data = _apply(data, op)
    return data


@st.composite
def mutated_bytes(draw: st.DrawFn, kind: str) -> bytes:
    data = _VALID[kind]
    for op in draw(st.lists(_byte_ops(len(data)), min_size=1, max_size=4)):
        data = _apply(data, op)
    return data


_YAML_VALUES = st.one_of(
    _JSON_VALUES,
    st.sampled_from(
        ["re:(", "re:.*", "*", "emb", "[1, 4]", "{level: 2}", "&a [1]", "*a", ".nan", "!!binary x"]
    ),
    st.text(max_size=20),
)

_CONFIG = {
    "version": 1,
    "order": "quantize-first",
    "sparsity": {"level": 0.5, "block_shape": [2, 4], "zeros_per_block": 3, "norm": "L2"},
    "quantization": {"bits": 4, "scale_dtype": "float16"},
    "layers": [
        {"match": "re:.*emb.*", "sparsity": {"level": 0.7}},
        {"match": "proj.weight", "quantization": {"bits": 8}},
    ],
    "exclude": ["*position*"],
}


@st.composite
def mutated_configs(draw: st.DrawFn) -> bytes:
    config = _CONFIG
    if draw(st.booleans()):
        for _ in range(draw(st.integers(1, 3))):
            path = draw(st.sampled_from(list(_leaves(config))))
            config = _replace(config, path, draw(_YAML_VALUES))
    data = yaml.safe_dump(config, sort_keys=False).encode()
    for op in draw(st.lists(_byte_ops(len(data)), max_size=3)):
        data = _apply(data, op)
    return data


# --- running ----------------------------------------------------------------------------------


@contextmanager
def _guarded() -> Iterator[None]:
    """Caps the address space and arms a watchdog for one example."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    status = Path("/proc/self/status").read_text()
    size = int(re.search(r"VmSize:\s+(\d+) kB", status).group(1)) * 1024
    limit = size + _EXTRA_ADDRESS_SPACE
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    faulthandler.dump_traceback_later(_WATCHDOG_SECONDS, exit=True)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _run_all(case: Path, commands: list[tuple[str, tuple, Path | None]]) -> None:
    with _guarded():
        for command, args, output in commands:
            if output is not None:
                output.unlink(missing_ok=True)
            result = invoke(command, *args)
            try:
                check_outcome(result, command, output)
            except AssertionError as error:
                failure = (
                    f"sparq {command} {' '.join(map(str, args))}: {error}\n"
                    f"exit {result.exit_code}, stderr {result.stderr!r}"
                )
                if not _COLLECT:
                    raise AssertionError(failure) from None
                # A long run records every failure (with the file) instead of stopping.
                with open(_COLLECT, "a") as log:
                    log.write(json.dumps({"failure": failure, "case": case.read_bytes().hex()}))
                    log.write("\n")
    if _COLLECT:
        with open(_COLLECT, "a") as log:
            log.write(json.dumps({"example": case.name, "commands": len(commands)}) + "\n")
    case.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def work() -> Path:
    folder = _FOLDER / "work"
    folder.mkdir(exist_ok=True)
    return folder


def _checkpoint_commands(case: Path, work: Path) -> list[tuple[str, tuple, Path | None]]:
    out = work / "out.sparq.safetensors"
    return [
        ("compress", (case, "--config", _INPUTS["config"], "-o", out, "-q"), out),
        ("inspect", (case,), None),
        ("validate", (_INPUTS["config"], case), None),
    ]


@pytest.mark.parametrize("kind", ["pt", "legacy"])
def test_fuzz_torch_checkpoints(kind, work):
    @_settings(kind)
    @given(data=mutated_bytes(kind))
    def run(data: bytes) -> None:
        case = work / f"case{_INPUTS[kind].suffix}"
        case.write_bytes(data)
        _run_all(case, _checkpoint_commands(case, work))

    run()


def test_fuzz_safetensors_checkpoints(work):
    @_settings("safetensors")
    @given(data=mutated_safetensors("safetensors"))
    def run(data: bytes) -> None:
        case = work / "case.safetensors"
        case.write_bytes(data)
        _run_all(case, _checkpoint_commands(case, work))

    run()


def test_fuzz_compressed_files(work):
    @_settings("sparq")
    @given(data=mutated_safetensors("sparq"))
    def run(data: bytes) -> None:
        case = work / "case.sparq.safetensors"
        case.write_bytes(data)
        dense = work / "dense.safetensors"
        out = work / "again.sparq.safetensors"
        _run_all(
            case,
            [
                ("inspect", (case,), None),
                ("inspect", (case, "--json"), None),
                ("decompress", (case, "-o", dense, "-q"), dense),
                ("compress", (case, "--config", _INPUTS["config"], "-o", out, "-q"), out),
            ],
        )

    run()


def test_fuzz_configs(work):
    @_settings("config")
    @given(data=mutated_configs())
    def run(data: bytes) -> None:
        case = work / "case.yaml"
        case.write_bytes(data)
        out = work / "out.sparq.safetensors"
        _run_all(
            case,
            [
                ("compress", (_INPUTS["pt"], "--config", case, "-o", out, "-q"), out),
                ("validate", (case, _INPUTS["pt"]), None),
                ("validate", (case,), None),
            ],
        )

    run()
