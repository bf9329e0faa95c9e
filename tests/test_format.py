"""The sparq file format: bit packing, round trips, sizes, validation of corrupt files, torch-ao."""

from __future__ import annotations

import io
import json
import random
import struct
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from torch import nn

import sparqcli
from sparqcli.engine.pipeline import compress_table
from sparqcli.engine.table import CompressedTable
from sparqcli.errors import FormatError, InputError, OutputError, UsageError
from sparqcli.format import (
    SourceInfo,
    load,
    load_table,
    pack_bits,
    pack_codes,
    packed_size,
    read_info,
    read_table,
    save_safetensors,
    table_file_bytes,
    torch_ao_state_dict,
    unpack_bits,
    unpack_codes,
    write_compressed,
)
from sparqcli.settings import Quantization, Sparsity
from tests.conftest import import_oracle

KEY = "emb.weight"


def _compress(
    table: torch.Tensor,
    *,
    order: str = "sparsify-first",
    level: float = 0.5,
    block_shape: tuple[int, int] = (1, 4),
    zeros: int | None = None,
    bits: int = 8,
    scale_dtype: str = "float32",
) -> CompressedTable:
    compressed, _ = compress_table(
        table,
        order,
        Sparsity(level, block_shape, zeros),
        Quantization(bits, scale_dtype),
    )
    return compressed


def _random_table(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))


def _stored(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Returns every stored tensor and the metadata of a safetensors file, as written."""
    with safe_open(str(path), framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}, handle.metadata() or {}  # noqa: SIM118


def _rewrite(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    path.unlink()
    save_safetensors(path, tensors, metadata)


def _document(metadata: dict[str, str]) -> dict:
    return json.loads(metadata["sparq"])


def _as_bytes(tensor: torch.Tensor) -> bytes:
    flat = tensor.contiguous().reshape(-1)
    return bytes(flat.view(torch.uint8).tolist()) if flat.numel() else b""


# --- bit packing ------------------------------------------------------------------------------


def test_bit_order_is_pinned_by_literal_bytes():
    codes = torch.tensor([1, 2, 3], dtype=torch.uint8)
    assert pack_codes(codes, 8).tolist() == [1, 2, 3]
    assert pack_codes(codes, 4).tolist() == [0x21, 0x03]
    assert pack_codes(torch.tensor([1, 2, 3, 0, 1], dtype=torch.uint8), 2).tolist() == [0x39, 0x01]
    mask = torch.tensor([1, 0, 1, 1, 0, 0, 0, 0, 1], dtype=torch.bool)
    assert pack_bits(mask).tolist() == [0x0D, 0x01]


def test_four_bit_packing_is_torch_quint4x2s():
    values = _random_table(6, 10, seed=3)
    quantized = torch.quantize_per_channel(
        values, torch.full((6,), 0.3), torch.full((6,), 7.0), 0, torch.quint4x2
    )
    codes = torch.clamp(torch.round(values / 0.3 + 7.0), 0, 15).to(torch.uint8)
    assert torch.equal(pack_codes(codes, 4), quantized.int_repr().reshape(-1))


def _packed_by_the_spec(codes: list[int], bits: int) -> bytes:
    """FORMAT.md's rule, bit by bit: code i's bit k is stream bit i * bits + k, LSB first."""
    stream = [(code >> k) & 1 for code in codes for k in range(bits)]
    stream += [0] * (-len(stream) % 8)
    return bytes(sum(stream[8 * j + t] << t for t in range(8)) for j in range(len(stream) // 8))


@pytest.mark.parametrize(
    ("bits", "codes", "packed"),
    [
        (4, [1, 2, 3], [0x21, 0x03]),
        (2, [1, 2, 3, 0, 1], [0x39, 0x01]),
        (3, [5, 3, 6], [0x9D, 0x01]),  # the third code straddles bytes 0 and 1
        (5, [31, 1, 2], [0x3F, 0x08]),
        (1, [1, 0, 1, 1, 0, 0, 0, 0, 1], [0x0D, 0x01]),
    ],
)
def test_format_md_packing_examples(bits, codes, packed):
    tensor = torch.tensor(codes, dtype=torch.uint8)
    assert pack_codes(tensor, bits).tolist() == packed
    assert list(_packed_by_the_spec(codes, bits)) == packed
    assert unpack_codes(torch.tensor(packed, dtype=torch.uint8), bits, len(codes)).tolist() == codes


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [0, 1, 2, 3, 5, 7, 8, 9, 15, 16, 17, 1001])
def test_codes_round_trip(bits, n):
    generator = torch.Generator().manual_seed(n)
    codes = torch.randint(0, 1 << bits, (n,), dtype=torch.uint8, generator=generator)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.numel() == packed_size(n, bits) == -(-n * bits // 8)
    assert torch.equal(unpack_codes(packed, bits, n), codes)
    assert bytes(packed.tolist()) == _packed_by_the_spec(codes.tolist(), bits)


@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 63, 64, 65, 1001])
def test_bits_round_trip(n):
    mask = torch.rand(n, generator=torch.Generator().manual_seed(n)) < 0.3
    packed = pack_bits(mask)
    assert packed.numel() == (n + 7) // 8
    assert torch.equal(unpack_bits(packed, n), mask)
    if n % 8:
        assert int(packed[-1]) >> (n % 8) == 0


def test_packing_is_vectorized_for_large_inputs():
    codes = torch.randint(0, 4, (10_000_003,), dtype=torch.uint8)
    assert torch.equal(unpack_codes(pack_codes(codes, 2), 2, codes.numel()), codes)
    mask = codes > 1
    assert torch.equal(unpack_bits(pack_bits(mask), mask.numel()), mask)
    # Straddling widths pack 2^20 groups of 8 codes per step: cross a step boundary.
    codes = torch.randint(0, 8, (10_000_003,), dtype=torch.uint8)
    packed = pack_codes(codes, 3)
    assert packed.numel() == packed_size(codes.numel(), 3)
    assert torch.equal(unpack_codes(packed, 3, codes.numel()), codes)
    head = codes[:8003].tolist()
    assert bytes(packed[: packed_size(8003, 3)].tolist())[:-1] == _packed_by_the_spec(head, 3)[:-1]


def test_packing_rejects_bad_arguments():
    with pytest.raises(ValueError, match="below 16"):
        pack_codes(torch.tensor([16], dtype=torch.uint8), 4)
    with pytest.raises(ValueError, match="bits must be an integer from 1 to 8, got 9"):
        pack_codes(torch.tensor([1], dtype=torch.uint8), 9)
    with pytest.raises(ValueError, match="bits must be an integer from 1 to 8, got 0"):
        packed_size(3, 0)
    with pytest.raises(ValueError, match="must be uint8"):
        pack_codes(torch.tensor([1]), 8)
    with pytest.raises(ValueError, match="must be 2 uint8 bytes"):
        unpack_codes(torch.zeros(3, dtype=torch.uint8), 4, 4)
    with pytest.raises(ValueError, match="must be 1 uint8 bytes"):
        unpack_bits(torch.zeros(2, dtype=torch.uint8), 8)


# --- round trips ------------------------------------------------------------------------------


@st.composite
def _cases(draw):
    bh, bw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    return {
        "rows": draw(st.sampled_from([0, 1, 2, 7, 13, 33])),
        "cols": draw(st.sampled_from([0, 1, 3, 8, 17])),
        "dtype": draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16])),
        "order": draw(st.sampled_from(["sparsify-first", "quantize-first"])),
        "level": draw(st.sampled_from([0.0, 0.3, 0.5, 0.8, 1.0])),
        "block_shape": (bh, bw),
        "zeros": draw(st.one_of(st.none(), st.integers(0, bh * bw))),
        "norm": draw(st.sampled_from(["L1", "L2"])),
        "bits": draw(st.integers(1, 8)),
        "scale_dtype": draw(st.sampled_from(["float32", "float16"])),
        "range": draw(st.sampled_from(["minmax", "mse"])),
        "scope": draw(st.sampled_from(["table", "row"])),
        "seed": draw(st.integers(0, 2**16)),
    }


def _passthrough() -> dict[str, torch.Tensor]:
    base = torch.arange(12, dtype=torch.int64)
    return {
        "step": torch.tensor(7, dtype=torch.int64),
        "ids": base,
        "ids_view": base[3:9],
        "ids_again": base,
        "ids_t": base.view(3, 4).t(),
        "norm.weight": torch.tensor([1.5, float("nan"), -0.0, 3.0]).to(torch.bfloat16),
        "empty": torch.zeros(0, 5),
        "flags": torch.tensor([True, False]),
    }


@settings(max_examples=30, deadline=None)
@given(case=_cases())
def test_load_of_written_file_equals_engine_decode(case, tmp_path_factory):
    table = _random_table(case["rows"], case["cols"], case["seed"]).mul(3).to(case["dtype"])
    compressed, stats = compress_table(
        table,
        case["order"],
        Sparsity(case["level"], case["block_shape"], case["zeros"], case["norm"], case["scope"]),
        Quantization(case["bits"], case["scale_dtype"], case["range"]),
    )
    path = tmp_path_factory.mktemp("rt") / "model.sparq.safetensors"
    passthrough = _passthrough()
    write_compressed(path, passthrough, {KEY: compressed}, {KEY: stats})
    state = load(path)
    assert sorted(state) == sorted([KEY, *passthrough])
    decoded = state[KEY]
    expected = compressed.decode()
    assert decoded.dtype == case["dtype"] == expected.dtype
    assert decoded.shape == table.shape
    assert torch.equal(decoded, expected)
    assert torch.equal(load_table(path, KEY), expected)
    for key, tensor in passthrough.items():
        assert state[key].dtype == tensor.dtype
        assert state[key].shape == tensor.shape
        assert _as_bytes(state[key]) == _as_bytes(tensor)
    back = read_table(path, KEY)
    assert torch.equal(back.codes, compressed.codes)
    assert torch.equal(back.scale, compressed.scale)
    assert torch.equal(back.zero_point, compressed.zero_point)
    assert (back.keep_mask is None) == (compressed.keep_mask is None)
    if compressed.keep_mask is not None:
        assert torch.equal(back.keep_mask, compressed.keep_mask)
    info = read_info(path).tables[KEY]
    assert info.kept == compressed.codes.numel()
    assert info.file_bytes == table_file_bytes(compressed)
    assert info.quantization == compressed.quantization
    assert info.sparsity == compressed.sparsity


def test_output_is_byte_reproducible_and_has_no_paths(tmp_path):
    compressed, stats = compress_table(
        _random_table(50, 9), "sparsify-first", Sparsity(0.5), Quantization(4)
    )
    passthrough = {"b": torch.ones(3), "a": torch.arange(4)}
    first, second = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    source = SourceInfo(str(tmp_path / "model.pt"), "ab" * 32)
    write_compressed(first, passthrough, {KEY: compressed}, {KEY: stats}, source, {"epoch": 3})
    reordered = dict(reversed(passthrough.items()))
    write_compressed(second, reordered, {KEY: compressed}, {KEY: stats}, source, {"epoch": 3})
    assert first.read_bytes() == second.read_bytes()
    _, metadata = _stored(first)
    assert list(metadata) == ["sparq"]
    text = metadata["sparq"]
    assert str(tmp_path) not in text
    document = json.loads(text)
    assert text == json.dumps(document, sort_keys=True, separators=(",", ":"))
    assert document["format_version"] == 1
    assert document["sparq_version"] == sparqcli.__version__
    assert document["source"] == {"name": "model.pt", "sha256": "ab" * 32}
    assert document["extra"] == {"epoch": 3}
    entry = document["tables"][KEY]
    assert entry == {
        "shape": [50, 9],
        "dtype": "float32",
        "bits": 4,
        "order": "sparsify-first",
        "sparsity": {
            "level": 0.5,
            "block_shape": [1, 4],
            "zeros_per_block": None,
            "norm": "L1",
            "scope": "table",
        },
        "quantization": {"bits": 4, "scale_dtype": "float32", "range": "minmax"},
        "mask": "block",
        "kept": int(compressed.codes.numel()),
        "stats": stats.to_dict(),
    }
    info = read_info(first)
    assert info.is_sparq
    assert info.extra == {"epoch": 3}
    assert info.source == SourceInfo("model.pt", "ab" * 32)
    assert sorted(info.passthrough) == ["a", "b"]
    as_dict = info.to_dict()
    assert as_dict["tables"][KEY]["file_bytes"] == table_file_bytes(compressed)
    json.dumps(as_dict)


def test_plain_safetensors_file_is_not_sparq(tmp_path):
    path = tmp_path / "plain.safetensors"
    save_safetensors(path, {"w": torch.ones(2, 2)}, None)
    info = read_info(path)
    assert not info.is_sparq
    assert info.tables == {}
    assert info.format_version is None
    assert info.passthrough["w"].shape == (2, 2)
    assert info.passthrough["w"].dtype == "float32"
    assert torch.equal(load(path)["w"], torch.ones(2, 2))


def test_load_table_reads_one_tensor_and_names_close_keys(tmp_path):
    path = tmp_path / "m.sparq.safetensors"
    compressed = _compress(_random_table(20, 8))
    write_compressed(path, {"emb.bias": torch.ones(8)}, {KEY: compressed})
    assert torch.equal(load_table(path, "emb.bias"), torch.ones(8))
    with pytest.raises(InputError) as error:
        load_table(path, "emb.wieght")
    assert str(error.value) == f"{path}: no tensor 'emb.wieght'; did you mean 'emb.weight'?"
    with pytest.raises(InputError) as error:
        load_table(path, "zzz")
    assert str(error.value) == f"{path}: no tensor 'zzz'; it holds 'emb.bias', 'emb.weight'"
    with pytest.raises(InputError) as error:
        read_table(path, "emb.bias")
    assert str(error.value) == (
        f"{path}: 'emb.bias' is not a compressed table (it is stored as it was); get_tensor "
        "reads it"
    )


def test_decompress_writes_the_decoded_state(tmp_path):
    path = tmp_path / "m.sparq.safetensors"
    compressed = _compress(_random_table(20, 8), bits=2)
    write_compressed(path, {"x": torch.arange(3)}, {KEY: compressed})
    for name in ("dense.safetensors", "dense.pt"):
        out = tmp_path / name
        assert sparqcli.decompress(path, out).tensors == 2
        state = load(out) if name.endswith(".safetensors") else torch.load(out, weights_only=True)
        assert torch.equal(state[KEY], compressed.decode())
        assert torch.equal(state["x"], torch.arange(3))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tables_write_and_load_on_cuda(tmp_path):
    table = _random_table(500, 24)
    on_cpu = _compress(table, bits=4, block_shape=(2, 3), zeros=4)
    on_gpu = _compress(table.cuda(), bits=4, block_shape=(2, 3), zeros=4)
    path = tmp_path / "gpu.safetensors"
    write_compressed(path, {"x": torch.arange(3).cuda()}, {KEY: on_gpu})
    state = load(path, device="cuda")
    assert state[KEY].device.type == "cuda"
    assert torch.equal(state[KEY].cpu(), on_cpu.decode())
    assert torch.equal(load_table(path, KEY, device="cuda").cpu(), on_cpu.decode())
    assert torch.equal(state["x"].cpu(), torch.arange(3))


# --- writing errors ---------------------------------------------------------------------------


@pytest.mark.parametrize("clash", ["emb.weight.codes", "emb.weight.mask", "emb.weight"])
def test_keys_colliding_with_a_table_are_refused(tmp_path, clash):
    path = tmp_path / "out.safetensors"
    compressed = _compress(_random_table(8, 8))
    with pytest.raises(OutputError) as error:
        write_compressed(path, {clash: torch.ones(1)}, {KEY: compressed})
    assert str(error.value) == (
        f"{path}: cannot write: key '{clash}' collides with compressed table 'emb.weight' "
        f"(keys 'emb.weight' and 'emb.weight.*' are reserved for its parts)"
    )
    assert not path.exists()


def test_a_failed_write_is_one_line_naming_the_path(tmp_path):
    path = tmp_path / "missing" / "out.safetensors"
    with pytest.raises(OutputError) as error:
        write_compressed(path, {"x": torch.ones(1)}, {KEY: _compress(_random_table(4, 4))})
    message = str(error.value)
    assert message.startswith(f"{path}: cannot write: ")
    assert "\n" not in message
    with pytest.raises(OutputError, match="not JSON-able"):
        write_compressed(tmp_path / "x.safetensors", {}, {}, extra={"bad": object()})
    with pytest.raises(OutputError, match="cannot write 'q': not a tensor"):
        write_compressed(tmp_path / "y.safetensors", {"q": 3}, {})  # type: ignore[dict-item]


# --- sizes ------------------------------------------------------------------------------------


def test_sparsity_shrinks_the_file(tmp_path):
    table = _random_table(100_000, 128)
    dense_bytes = table.numel() * 4
    sparse = tmp_path / "sparse.safetensors"
    write_compressed(sparse, {}, {KEY: _compress(table, level=0.8, block_shape=(1, 4))})
    assert sparse.stat().st_size <= 0.075 * dense_bytes
    plain = tmp_path / "plain.safetensors"
    unpruned = _compress(table, level=0.0)
    assert unpruned.keep_mask is None
    write_compressed(plain, {}, {KEY: unpruned})
    header = 8 + struct.unpack("<Q", plain.read_bytes()[:8])[0]
    assert plain.stat().st_size - header == table.numel() + 100_000 * 8
    assert header < 4096


@pytest.mark.parametrize(
    ("bits", "level", "block_shape", "zeros", "scale_dtype", "mask"),
    [
        (8, 0.5, (1, 4), None, "float32", "block"),
        (4, 0.5, (2, 3), None, "float16", "block"),
        (2, 0.7, (3, 2), 4, "float32", "value"),
        (4, 0.3, (1, 1), None, "float32", "block"),
        (2, 0.0, (1, 4), None, "float16", "none"),
        (8, 0.5, (2, 2), 0, "float32", "none"),
    ],
)
def test_size_formula_is_exact(tmp_path, bits, level, block_shape, zeros, scale_dtype, mask):
    compressed = _compress(
        _random_table(101, 37),
        level=level,
        block_shape=block_shape,
        zeros=zeros,
        bits=bits,
        scale_dtype=scale_dtype,
    )
    path = tmp_path / "m.safetensors"
    write_compressed(path, {"other": torch.ones(5)}, {KEY: compressed})
    tensors, _ = _stored(path)
    parts = {k: v for k, v in tensors.items() if k.startswith(KEY + ".")}
    assert sorted(parts) == sorted(
        f"{KEY}.{p}"
        for p in ("codes", "scale", "zero_point", "mask")
        if p != "mask" or mask != "none"
    )
    assert read_info(path).tables[KEY].mask == mask
    stored_bytes = sum(t.numel() * t.element_size() for t in parts.values())
    assert table_file_bytes(compressed) == stored_bytes == read_info(path).tables[KEY].file_bytes
    kept = int(compressed.codes.numel())
    scale_bytes = 2 if scale_dtype == "float16" else 4
    mask_bits = 0 if compressed.keep_mask is None else compressed.keep_mask.numel()
    assert stored_bytes == -(-kept * bits // 8) + 2 * 101 * scale_bytes + -(-mask_bits // 8)
    assert parts[f"{KEY}.scale"].dtype == getattr(torch, scale_dtype)


# --- corrupt files ----------------------------------------------------------------------------


@pytest.fixture
def good_file(tmp_path: Path) -> tuple[Path, CompressedTable]:
    path = tmp_path / "model.sparq.safetensors"
    compressed = _compress(_random_table(31, 10, seed=5), level=0.5, block_shape=(1, 1), bits=4)
    write_compressed(path, {"other": torch.ones(3)}, {KEY: compressed})
    return path, compressed


def _invalid_safetensors(path: Path) -> str:
    return f"{path}: not a valid safetensors file ("


@pytest.mark.parametrize(
    "damage",
    [
        lambda data: data[: len(data) - 7],
        lambda data: data[:30],
        lambda data: data[:5],
        lambda data: b"",
        lambda data: bytes(random.Random(1).randrange(256) for _ in range(4096)),
        lambda data: data[:8] + b"[" + data[9:],
        lambda data: data[:9] + bytes([data[9] ^ 0xFF]) + data[10:],
        lambda data: struct.pack("<Q", 2**62) + data[8:],
        lambda data: struct.pack("<Q", 99_999_999) + data[8:],
        lambda data: data + b"\0" * 16,
    ],
    ids=[
        "truncated",
        "cut-in-header",
        "shorter-than-length",
        "zero-length",
        "random-bytes",
        "header-not-an-object",
        "flipped-header-byte",
        "huge-header-length",
        "just-under-limit-header-length",
        "trailing-bytes",
    ],
)
def test_invalid_containers_are_one_line_format_errors(good_file, damage):
    path, _ = good_file
    path.write_bytes(damage(path.read_bytes()))
    for read in (read_info, load, lambda p: load_table(p, KEY), lambda p: read_table(p, KEY)):
        with pytest.raises(FormatError) as error:
            read(path)
        message = str(error.value)
        assert message.startswith(_invalid_safetensors(path)), message
        assert message.endswith(")")
        assert "\n" not in message


def test_missing_file_and_directory_are_input_errors(tmp_path):
    with pytest.raises(InputError) as error:
        load(tmp_path / "nope.safetensors")
    assert str(error.value) == f"{tmp_path / 'nope.safetensors'}: no such file"
    with pytest.raises(InputError) as error:
        read_info(tmp_path)
    assert str(error.value) == f"{tmp_path}: is a directory, not a file"


def _damage_tensors(path: Path, change) -> None:
    tensors, metadata = _stored(path)
    change(tensors)
    _rewrite(path, tensors, metadata)


def _damage_document(path: Path, change) -> None:
    tensors, metadata = _stored(path)
    document = _document(metadata)
    change(document)
    _rewrite(path, tensors, {"sparq": json.dumps(document)})


def _expect(path: Path, message: str, *, header_only: bool = True) -> None:
    readers = [load, lambda p: load_table(p, KEY), lambda p: read_table(p, KEY)]
    if header_only:
        readers.append(read_info)
    for read in readers:
        with pytest.raises(FormatError) as error:
            read(path)
        assert str(error.value) == message


def test_removed_tensor(good_file):
    path, _ = good_file
    _damage_tensors(path, lambda t: t.pop(f"{KEY}.mask"))
    _expect(path, f"{path}: table '{KEY}': missing tensor '{KEY}.mask'")


def test_resized_tensor(good_file):
    path, _ = good_file
    tensors, _ = _stored(path)
    size = tensors[f"{KEY}.codes"].numel()

    def shorten(t):
        t[f"{KEY}.codes"] = t[f"{KEY}.codes"][:-1].clone()

    _damage_tensors(path, shorten)
    _expect(
        path,
        f"{path}: table '{KEY}': tensor '{KEY}.codes' has shape [{size - 1}], expected [{size}]",
    )


def test_retyped_tensor(good_file):
    path, _ = good_file

    def widen(t):
        t[f"{KEY}.scale"] = t[f"{KEY}.scale"].double()

    _damage_tensors(path, widen)
    _expect(
        path, f"{path}: table '{KEY}': tensor '{KEY}.scale' has dtype float64, expected float32"
    )


def test_stray_table_key(good_file):
    path, _ = good_file

    def add(t):
        t[f"{KEY}.extra"] = torch.ones(1)

    _damage_tensors(path, add)
    _expect(path, f"{path}: table '{KEY}': unexpected tensor '{KEY}.extra'")


def test_mask_popcount_disagreeing_with_kept(good_file):
    path, compressed = good_file
    kept = int(compressed.codes.numel())

    def drop_one(t):
        mask = t[f"{KEY}.mask"].clone()
        bits = unpack_bits(mask, 310)
        first_kept = int(bits.nonzero()[0, 0])
        mask[first_kept // 8] ^= 1 << (first_kept % 8)
        t[f"{KEY}.mask"] = mask

    _damage_tensors(path, drop_one)
    assert read_info(path).tables[KEY].kept == kept
    _expect(
        path,
        f"{path}: table '{KEY}': mask keeps {kept - 1} values but the metadata says kept {kept}",
        header_only=False,
    )


def test_nonzero_padding_bits(good_file):
    path, compressed = good_file
    assert compressed.codes.numel() % 2

    def pad(t):
        codes = t[f"{KEY}.codes"].clone()
        codes[-1] |= 0xF0
        t[f"{KEY}.codes"] = codes

    _damage_tensors(path, pad)
    _expect(
        path,
        f"{path}: table '{KEY}': tensor '{KEY}.codes' has nonzero padding bits",
        header_only=False,
    )


def test_metadata_lying_about_the_shape(good_file):
    path, _ = good_file
    _damage_document(path, lambda d: d["tables"][KEY].update(shape=[32, 10]))
    _expect(path, f"{path}: table '{KEY}': tensor '{KEY}.scale' has shape [31], expected [32]")


def test_metadata_lying_about_kept(good_file):
    path, compressed = good_file
    kept = int(compressed.codes.numel())
    _damage_document(path, lambda d: d["tables"][KEY].update(kept=kept + 2))
    _expect(
        path,
        f"{path}: table '{KEY}': tensor '{KEY}.codes' has shape [{-(-kept // 2)}], "
        f"expected [{-(-(kept + 2) // 2)}]",
    )


def test_metadata_with_bad_settings(good_file):
    path, _ = good_file
    _damage_document(path, lambda d: d["tables"][KEY]["sparsity"].update(level=1.5))
    _expect(path, f"{path}: table '{KEY}': sparsity.level: must be a number in [0, 1], got 1.5")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"dtype": "int8"},
            'dtype must be one of float32, float16, bfloat16, float64, got "int8"',
        ),
        ({"bits": 8}, "bits 8 disagrees with quantization.bits 4"),
        ({"mask": "none"}, "kept is 155 but there is no mask, so all 310 values are kept"),
        ({"order": "random"}, 'order must be one of sparsify-first, quantize-first, got "random"'),
        ({"kept": -1}, "kept must be an integer in [0, 310], got -1"),
        ({"shape": [31]}, "shape must be two non-negative integers, got [31]"),
        (
            {"quantization": {"bits": 9, "scale_dtype": "float32"}},
            "quantization.bits: must be an integer from 1 to 8, got 9",
        ),
        (
            {"quantization": {"bits": 4, "scale_dtype": "float32", "range": "best"}},
            "quantization.range: must be one of minmax, mse, got 'best'",
        ),
        (
            {
                "sparsity": {
                    "level": 0.5,
                    "block_shape": [1, 1],
                    "zeros_per_block": None,
                    "norm": "L1",
                    "scope": "column",
                }
            },
            "sparsity.scope: must be one of table, row, got 'column'",
        ),
    ],
)
def test_metadata_lying_about_a_table(good_file, change, message):
    path, _ = good_file
    _damage_document(path, lambda d: d["tables"][KEY].update(change))
    _expect(path, f"{path}: table '{KEY}': {message}")


def test_files_without_range_and_scope_read_as_the_defaults(good_file):
    # Files written before `range` and `scope` existed decode as they always did.
    path, compressed = good_file

    def drop(document):
        del document["tables"][KEY]["quantization"]["range"]
        del document["tables"][KEY]["sparsity"]["scope"]

    _damage_document(path, drop)
    info = read_info(path).tables[KEY]
    assert (info.quantization.range, info.sparsity.scope) == ("minmax", "table")
    assert torch.equal(load_table(path, KEY), compressed.decode())


@pytest.mark.parametrize("bits", [3, 5, 6, 7, 1])
def test_new_widths_and_options_are_recorded_and_read_back(tmp_path, bits):
    table = _random_table(40, 13, seed=bits)
    compressed, stats = compress_table(
        table,
        "quantize-first",
        Sparsity(0.5, (2, 3), scope="row"),
        Quantization(bits, "float16", range="mse"),
    )
    path = tmp_path / "model.sparq.safetensors"
    write_compressed(path, {}, {KEY: compressed}, {KEY: stats})
    _, metadata = _stored(path)
    entry = json.loads(metadata["sparq"])["tables"][KEY]
    assert entry["bits"] == bits
    assert entry["quantization"] == {"bits": bits, "scale_dtype": "float16", "range": "mse"}
    assert entry["sparsity"]["scope"] == "row"
    info = read_info(path)
    assert info.format_version == 1
    assert info.tables[KEY].to_dict()["quantization"]["range"] == "mse"
    back = read_table(path, KEY)
    assert torch.equal(back.codes, compressed.codes)
    assert int(back.codes.max()) < 1 << bits
    assert torch.equal(load_table(path, KEY), compressed.decode())


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"tables": []}, "metadata 'sparq': 'tables' must be a JSON object, got []"),
        (
            {"format_version": "1"},
            "metadata 'sparq': format_version must be a positive integer, got \"1\"",
        ),
        ({"extra": 3}, "metadata 'sparq': 'extra' must be a JSON object, got 3"),
    ],
)
def test_metadata_lying_about_the_file(good_file, change, message):
    path, _ = good_file
    _damage_document(path, lambda d: d.update(change))
    _expect(path, f"{path}: {message}")


def test_metadata_missing_a_field(good_file):
    path, _ = good_file
    _damage_document(path, lambda d: d["tables"][KEY].pop("kept"))
    _expect(path, f"{path}: table '{KEY}': metadata lacks kept")


def test_metadata_that_is_not_json(good_file):
    path, _ = good_file
    tensors, _ = _stored(path)
    _rewrite(path, tensors, {"sparq": "{not json"})
    with pytest.raises(FormatError) as error:
        read_info(path)
    assert str(error.value).startswith(f"{path}: metadata 'sparq' is not valid JSON (")


def test_newer_format_version_is_refused(good_file):
    path, _ = good_file
    _damage_document(path, lambda d: d.update(format_version=3))
    _expect(path, f"{path}: format version 3 is newer than this sparq supports (2); upgrade sparq")


def test_header_claiming_huge_sizes_does_not_allocate(tmp_path):
    path = tmp_path / "huge.safetensors"
    header = json.dumps({"x": {"dtype": "F32", "shape": [2**40], "data_offsets": [0, 2**42]}})
    path.write_bytes(struct.pack("<Q", len(header)) + header.encode() + b"\0" * 64)
    with pytest.raises(FormatError) as error:
        read_info(path)
    assert str(error.value).startswith(_invalid_safetensors(path))


# --- torch-ao ---------------------------------------------------------------------------------


def _reference_model(
    table: torch.Tensor,
    module: type[nn.Module],
    *,
    bits: int,
    order: str,
    level: float,
    block_shape: tuple[int, int],
    monkeypatch: pytest.MonkeyPatch,
) -> nn.Module:
    """Returns a two-module model with `table` in an embedding, converted by the reference."""
    ao_quant = import_oracle("torch.ao.quantization")
    data_sparsifier = import_oracle("torch.ao.pruning._experimental.data_sparsifier")
    utils = import_oracle("torch.ao.pruning._experimental.data_sparsifier.quantization_utils")
    model = nn.Sequential(module(*table.shape), nn.Linear(3, 2))
    with torch.no_grad():
        model[0].weight.copy_(table)
    with monkeypatch.context() as patch:
        if bits == 4:
            # The reference hard-codes the 8-bit qconfig and reads it at call time.
            patch.setattr(
                ao_quant,
                "float_qparams_weight_only_qconfig",
                ao_quant.float_qparams_weight_only_qconfig_4bit,
            )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            utils.post_training_sparse_quantize(
                model,
                data_sparsifier.DataNormSparsifier,
                sparsify_first=order == "sparsify-first",
                sparsity_level=level,
                sparse_block_shape=block_shape,
                zeros_per_block=block_shape[0] * block_shape[1],
                norm="L1",
            )
    return model


def _assert_same_state(ours: dict, reference: dict) -> None:
    assert sorted(ours) == sorted(reference)
    for key, expected in reference.items():
        actual = ours[key]
        if isinstance(expected, torch.dtype):
            assert actual == expected, key
        elif expected.is_quantized:
            assert actual.dtype == expected.dtype
            assert actual.qscheme() == expected.qscheme() == torch.per_channel_affine_float_qparams
            assert actual.shape == expected.shape
            assert torch.equal(actual.int_repr(), expected.int_repr())
            assert torch.equal(actual.q_per_channel_scales(), expected.q_per_channel_scales())
            assert torch.equal(
                actual.q_per_channel_zero_points(), expected.q_per_channel_zero_points()
            )
            assert actual.q_per_channel_axis() == expected.q_per_channel_axis() == 0
        else:
            assert torch.equal(actual, expected), key


@pytest.mark.filterwarnings("ignore:TypedStorage is deprecated")
@pytest.mark.parametrize(
    ("bits", "order", "module"),
    [
        (8, "sparsify-first", nn.Embedding),
        (8, "quantize-first", nn.EmbeddingBag),
        (4, "sparsify-first", nn.EmbeddingBag),
        (4, "quantize-first", nn.EmbeddingBag),
    ],
)
def test_torch_ao_state_dict_equals_the_references(bits, order, module, monkeypatch, tmp_path):
    table = _random_table(301, 16, seed=bits)
    settings_ = {"bits": bits, "order": order, "level": 0.5, "block_shape": (1, 4)}
    reference = _reference_model(table, module, monkeypatch=monkeypatch, **settings_)
    compressed = _compress(table, order=order, level=0.5, block_shape=(1, 4), bits=bits)
    linear = reference[1]
    passthrough = {"1.weight": linear.weight.detach(), "1.bias": linear.bias.detach()}
    ours = torch_ao_state_dict({"0.weight": compressed}, passthrough)
    assert ours["0._packed_params.dtype"] == (torch.quint8 if bits == 8 else torch.quint4x2)
    _assert_same_state(ours, reference.state_dict())

    path = tmp_path / "model.pt"
    torch.save(ours, path)
    loaded = torch.load(path, weights_only=True)
    _assert_same_state(loaded, reference.state_dict())

    other = _reference_model(
        _random_table(301, 16, seed=99), module, monkeypatch=monkeypatch, **settings_
    )
    other.load_state_dict(loaded)
    _assert_same_state(other.state_dict(), reference.state_dict())
    if bits == 8:
        indices = torch.arange(301)
        expected = (
            compressed.dense_codes().float() - compressed.zero_point[:, None]
        ) * compressed.scale[:, None]
        result = other[0](indices) if module is nn.Embedding else other[0](indices, indices)
        assert torch.allclose(result, expected, atol=1e-5)


def test_torch_ao_four_bit_embedding_says_quint4x2_where_the_reference_says_quint8(monkeypatch):
    # torch.ao's Embedding.from_float builds its module with the default dtype (quint8) even for
    # a 4-bit qconfig, so the reference's `_packed_params.dtype` disagrees with its own weight.
    # sparq writes the weight's true dtype; the weight itself is the reference's.
    table = _random_table(64, 8, seed=4)
    # Keep the model alive: its state dict's qparams are views into the packed weight.
    model = _reference_model(
        table,
        nn.Embedding,
        bits=4,
        order="sparsify-first",
        level=0.5,
        block_shape=(1, 4),
        monkeypatch=monkeypatch,
    )
    reference = model.state_dict()
    ours = torch_ao_state_dict({"0.weight": _compress(table, bits=4)}, {})
    assert ours["0._packed_params.dtype"] == torch.quint4x2
    weight = "0._packed_params._packed_weight"
    _assert_same_state({weight: ours[weight]}, {weight: reference[weight]})


def test_torch_ao_state_dict_refusals():
    compressed = _compress(_random_table(10, 8), bits=2)
    with pytest.raises(UsageError) as error:
        torch_ao_state_dict({"emb.weight": compressed}, {})
    assert str(error.value) == (
        "table 'emb.weight': output_format='torch-ao' supports 8 and 4 bits; torch.ao has no "
        "2-bit embedding (use the sparq format)"
    )
    odd = _compress(_random_table(10, 7), bits=4)
    with pytest.raises(UsageError) as error:
        torch_ao_state_dict({"emb.weight": odd}, {})
    assert str(error.value) == (
        "table 'emb.weight': output_format='torch-ao' at 4 bits needs an even number of columns, got 7 "
        "(torch.ao's quint4x2 embeddings mis-pack odd widths)"
    )
    eight = _compress(_random_table(10, 8))
    with pytest.raises(UsageError, match=r"needs a module weight key ending in '\.weight'"):
        torch_ao_state_dict({"emb.table": eight}, {})
    with pytest.raises(OutputError) as error:
        torch_ao_state_dict({"emb.weight": eight}, {"emb._packed_params.dtype": torch.ones(1)})
    assert str(error.value) == (
        "table 'emb.weight': torch-ao key 'emb._packed_params.dtype' collides with a tensor of "
        "the checkpoint"
    )
    state = torch_ao_state_dict({"weight": eight}, {})
    assert sorted(state) == ["_packed_params._packed_weight", "_packed_params.dtype"]


def test_torch_ao_output_survives_weights_only_load():
    compressed = _compress(_random_table(40, 6), bits=4)
    buffer = io.BytesIO()
    torch.save(torch_ao_state_dict({"e.weight": compressed}, {"n": torch.ones(2)}), buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    weight = loaded["e._packed_params._packed_weight"]
    assert weight.dtype == torch.quint4x2
    assert torch.equal(weight.int_repr(), pack_codes(compressed.dense_codes(), 4))
    assert loaded["e._packed_params.dtype"] == torch.quint4x2
