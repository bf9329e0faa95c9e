"""Module behaviour: storage, state dict, device moves, repr, padding, bad inputs."""

from __future__ import annotations

import copy
import io
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sparqcli.errors import FormatError, InputError
from sparqcli.format import read_info
from sparqcli.nn import Embedding, EmbeddingBag
from tests.nn.conftest import make_table, write_tables


def test_holds_compressed_storage_only(tmp_path: Path) -> None:
    table = make_table(1000, 64, level=0.8, bits=4)
    path = write_tables(tmp_path / "t.sparq.safetensors", {"emb.weight": table})
    module = EmbeddingBag.from_file(path, "emb.weight")
    file_bytes = read_info(path).tables["emb.weight"].file_bytes
    assert module.nbytes <= file_bytes + 8 * 1000
    assert module.row_index.numel() * 8 <= 8 * 1000
    assert all(buffer.numel() < 1000 * 64 for buffer in module.buffers())
    assert sorted(module.state_dict()) == [
        "_extra_state",
        "codes",
        "mask",
        "scale",
        "zero_point",
    ]


def test_no_mask_no_index() -> None:
    module = Embedding.from_table(make_table(50, 8, level=0.0))
    assert module.mask is None
    assert module.row_index.numel() == 0
    assert "mask" not in module.state_dict()


def test_state_dict_round_trip(backend: str, tmp_path: Path) -> None:
    table = make_table(200, 24, level=0.7, bits=2, scale_dtype="float16")
    path = write_tables(tmp_path / "t.sparq.safetensors", {"emb.weight": table})
    source = EmbeddingBag.from_file(path, "emb.weight", mode="sum")
    buffer = io.BytesIO()
    torch.save(source.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert state["scale"].dtype == torch.float16
    target = EmbeddingBag.from_file(path, "emb.weight", mode="sum")
    target.codes.zero_()
    target.load_state_dict(state)
    indices = torch.randint(0, 200, (30, 4))
    assert torch.equal(target(indices), F.embedding_bag(indices, table.decode(), mode="sum"))


def test_load_state_dict_rebuilds_the_index(backend: str) -> None:
    first = make_table(64, 16, level=0.8, seed=1)
    second = make_table(64, 16, level=0.8, seed=2)
    module = Embedding.from_table(first)
    other = Embedding.from_table(second)
    if other.mask.shape != module.mask.shape or other.codes.shape != module.codes.shape:
        pytest.skip("tables of different kept counts")
    module.load_state_dict(other.state_dict())
    indices = torch.arange(64)
    assert torch.equal(module(indices), second.decode())


def test_load_state_dict_of_another_size_fails() -> None:
    module = Embedding.from_table(make_table(64, 16, level=0.5))
    other = Embedding.from_table(make_table(64, 16, level=0.8))
    with pytest.raises(RuntimeError, match="size mismatch"):
        module.load_state_dict(other.state_dict())


def test_load_state_dict_refuses_a_layout_that_does_not_fit(backend: str) -> None:
    table = make_table(1000, 16, level=0.0)
    module = Embedding.from_table(table)
    state = module.state_dict()
    indices = torch.tensor([0, 999])
    for change, message in [
        (
            {"cols": 65536, "kept": 65536000},
            r"size mismatch for _extra_state: copying a table of 1000 x 65536",
        ),
        ({"kept": 10**9}, r"_extra_state: layout keeps 1000000000 of 16000 values"),
        ({"bits": 4}, r"tensor 'codes' holds 16000 values; the layout \(1000 x 16, bits=4"),
        ({"bits": 9}, r"_extra_state: bits must be an integer from 1 to 8, got 9"),
        ({"mask": "block"}, r"layout with mask 'block' does not fit this module's storage"),
        ({"dtype": "int8"}, r"_extra_state: not a sparqcli.nn layout: KeyError\('int8'\)"),
    ]:
        tampered = {**state, "_extra_state": {**state["_extra_state"], **change}}
        with pytest.raises(RuntimeError, match=message):
            module.load_state_dict(tampered)
        assert module.embedding_dim == 16 and module.layout.bits == 8
        assert torch.equal(module(indices), table.decode()[[0, 999]])
    # A table of another shape whose buffers have the same sizes is refused too.
    narrow = Embedding.from_table(make_table(100, 16, level=0.0, bits=8))
    wide = Embedding.from_table(make_table(100, 32, level=0.0, bits=4))
    assert narrow.codes.shape == wide.codes.shape
    with pytest.raises(RuntimeError, match="copying a table of 100 x 32, the shape in current"):
        narrow.load_state_dict(wide.state_dict())
    assert narrow.embedding_dim == 16
    # A table of the same shape at another width is refused whole, strict or not: torch would
    # refuse its codes but still adopt its layout.
    four = make_table(100, 16, level=0.0, bits=4)
    module = Embedding.from_table(four)
    for strict in (True, False):
        with pytest.raises(RuntimeError, match=r"size mismatch for codes: copying a param"):
            module.load_state_dict(narrow.state_dict(), strict=strict)
        assert module.layout.bits == 4
        assert torch.equal(module(torch.tensor([0, 99])), four.decode()[[0, 99]])


def test_load_state_dict_checks_every_shape_before_copying(backend: str) -> None:
    first, second = make_table(30, 16, level=0.5, seed=1), make_table(30, 16, level=0.5, seed=2)
    module, other = EmbeddingBag.from_table(first, mode="sum"), EmbeddingBag.from_table(second)
    if other.codes.shape != module.codes.shape:
        pytest.skip("tables of different kept counts")
    for name in ("scale", "zero_point"):
        state = other.state_dict()
        state[name] = state[name].view(30, 1)
        with pytest.raises(RuntimeError, match=rf"size mismatch for {name}: copying a param"):
            module.load_state_dict(state)
        assert torch.equal(module.decoded_weight(), first.decode())


def test_copies_and_pickles_after_a_lookup(backend: str) -> None:
    first, second = make_table(50, 8, seed=1), make_table(50, 8, seed=2)
    bag = EmbeddingBag.from_table(first, mode="sum")
    other = EmbeddingBag.from_table(second, mode="sum")
    if other.codes.shape != bag.codes.shape or other.mask.shape != bag.mask.shape:
        pytest.skip("tables of different kept counts")
    indices, offsets = torch.arange(10), torch.tensor([0, 5])
    before = bag(indices, offsets)
    copied = copy.deepcopy(bag)
    bag.load_state_dict(other.state_dict())
    assert torch.equal(copied(indices, offsets), before)
    assert torch.equal(bag(indices, offsets), other(indices, offsets))
    buffer = io.BytesIO()
    torch.save(copied, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert torch.equal(loaded(indices, offsets), before)


def test_to_moves_but_never_converts(backend: str) -> None:
    table = make_table(30, 8, scale_dtype="float32")
    module = Embedding.from_table(table)
    module.half()
    module.to(torch.float64)
    assert module.scale.dtype == torch.float32
    indices = torch.arange(30)
    out = module(indices)
    assert out.dtype == torch.float32
    assert torch.equal(out, table.decode())


def test_repr_is_readable() -> None:
    module = EmbeddingBag.from_table(make_table(100, 16, level=0.5, bits=4), mode="sum")
    text = repr(module)
    assert text.startswith("EmbeddingBag(100, 16, bits=4, block mask (1, 4), kept=50.0%")
    assert "bytes=" in text and "mode='sum'" in text


def test_embedding_returns_the_padding_row(backend: str) -> None:
    table = make_table(10, 4, level=0.0)
    module = Embedding.from_table(table, padding_idx=2)
    assert torch.equal(module(torch.tensor([2])), table.decode()[2:3])
    assert module.padding_idx == 2
    assert Embedding.from_table(table, padding_idx=-1).padding_idx == 9


def test_bag_padding_and_empty_bags(backend: str) -> None:
    table = make_table(10, 4, level=0.0)
    decoded = table.decode()
    module = EmbeddingBag.from_table(table, mode="mean", padding_idx=3)
    indices = torch.tensor([3, 3, 1, 3, 5])
    offsets = torch.tensor([0, 2, 2, 5])
    got = module(indices, offsets)
    assert torch.equal(got[0], torch.zeros(4))  # only padding
    assert torch.equal(got[1], torch.zeros(4))  # empty
    torch.testing.assert_close(got[2], (decoded[1] + decoded[5]) / 2)
    assert torch.equal(got[3], torch.zeros(4))  # empty last bag


@pytest.mark.parametrize("bad", [10, -1, 1 << 40])
def test_out_of_range_index_is_an_index_error(backend: str, bad: int) -> None:
    table = make_table(10, 4, level=0.5)
    indices = torch.tensor([1, bad, 2])
    with pytest.raises(IndexError, match=f"index {bad} at position 1 is out of range"):
        Embedding.from_table(table)(indices)
    with pytest.raises(IndexError, match=f"index {bad}"):
        EmbeddingBag.from_table(table)(indices, torch.tensor([0]))


def test_bad_inputs_raise_as_torch(backend: str) -> None:
    table = make_table(10, 4)
    bag = EmbeddingBag.from_table(table, mode="mean")
    with pytest.raises(ValueError, match="offsets has to be None"):
        bag(torch.zeros(2, 2, dtype=torch.long), torch.tensor([0]))
    with pytest.raises(ValueError, match="offsets has to be a 1-D"):
        bag(torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="1-D or 2-D"):
        bag(torch.zeros(2, 2, 2, dtype=torch.long))
    with pytest.raises(NotImplementedError, match="per_sample_weights"):
        bag(torch.zeros(2, dtype=torch.long), torch.tensor([0]), torch.ones(2))
    with pytest.raises(TypeError, match="int32 or int64"):
        bag(torch.zeros(2), torch.tensor([0]))
    with pytest.raises(RuntimeError, match=r"offsets\[0\] has to be 0"):
        bag(torch.zeros(2, dtype=torch.long), torch.tensor([1]))
    with pytest.raises(ValueError, match="mode"):
        EmbeddingBag.from_table(table, mode="median")
    with pytest.raises(ValueError, match="padding_idx"):
        Embedding.from_table(table, padding_idx=10)
    summing = EmbeddingBag.from_table(table, mode="sum")
    with pytest.raises(ValueError, match="shape of input"):
        summing(torch.zeros(2, dtype=torch.long), torch.tensor([0]), torch.ones(3))


def test_offsets_must_not_decrease_or_overrun(backend: str) -> None:
    table = make_table(10, 4)
    bag = EmbeddingBag.from_table(table, mode="sum")
    indices = torch.zeros(3, dtype=torch.long)
    with pytest.raises(
        RuntimeError,
        match=r"^offsets must be non-decreasing, but offsets\[2\] = 1 < offsets\[1\] = 2",
    ):
        bag(indices, torch.tensor([0, 2, 1]))
    with pytest.raises(
        RuntimeError, match=r"^offsets\[1\] = 5 can not be greater than input's length 3"
    ):
        bag(indices, torch.tensor([0, 5]))
    with pytest.raises(RuntimeError, match=r"^offsets must be non-decreasing"):
        bag(indices, torch.tensor([0, -1]))
    with pytest.raises(RuntimeError, match=r"^offsets\[0\] has to be 0"):
        bag(indices, torch.tensor([1, 2]))
    last = EmbeddingBag.from_table(table, mode="sum", include_last_offset=True)
    with pytest.raises(RuntimeError, match="number of offsets should be at least 1"):
        last(indices, torch.zeros(0, dtype=torch.long))
    with pytest.raises(RuntimeError, match="at least 1"):
        F.embedding_bag(
            indices, table.decode(), torch.zeros(0, dtype=torch.long), include_last_offset=True
        )


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_no_bags_over_some_indices_give_no_rows(
    backend: str, mode: str, dtype: torch.dtype
) -> None:
    # One offset with include_last_offset is zero bags: torch's own op crashes the process on
    # it with a non-empty input (float64, or mode max), the module returns (0, cols).
    table = make_table(30, 16, level=0.5, dtype=dtype)
    bag = EmbeddingBag.from_table(table, mode=mode, include_last_offset=True)
    out = bag(torch.tensor([1, 2, 3]), torch.tensor([0]))
    assert out.shape == (0, 16) and out.dtype == dtype
    weights = torch.ones(3, dtype=torch.float32)
    if mode == "sum":
        assert bag(torch.tensor([1, 2, 3]), torch.tensor([0]), weights).shape == (0, 16)


def test_per_sample_weights_get_their_gradient(backend: str) -> None:
    table = make_table(30, 8, level=0.5)
    decoded = table.decode()
    bag = EmbeddingBag.from_table(table, mode="sum")
    indices, offsets = torch.tensor([1, 4, 4, 29, 7]), torch.tensor([0, 2])
    weights = torch.rand(5, requires_grad=True)
    expected_weights = weights.detach().clone().requires_grad_(True)
    out = bag(indices, offsets, weights)
    expected = F.embedding_bag(
        indices, decoded, offsets, mode="sum", per_sample_weights=expected_weights
    )
    assert out.requires_grad
    torch.testing.assert_close(out, expected)
    upstream = torch.randn_like(out)
    out.backward(upstream)
    expected.backward(upstream)
    torch.testing.assert_close(weights.grad, expected_weights.grad)
    with torch.no_grad():
        assert not bag(indices, offsets, weights).requires_grad


def test_unknown_key_and_corrupt_file(tmp_path: Path) -> None:
    path = write_tables(tmp_path / "t.sparq.safetensors", {"emb.weight": make_table()})
    with pytest.raises(InputError, match=r"did you mean 'emb\.weight'"):
        Embedding.from_file(path, "emb.weights")
    with pytest.raises(InputError, match="no such file"):
        Embedding.from_file(tmp_path / "missing.safetensors", "emb.weight")
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a safetensors file")
    with pytest.raises(FormatError):
        Embedding.from_file(broken, "emb.weight")


def test_state_dict_scales_are_checked() -> None:
    module = Embedding.from_table(make_table(64, 16, level=0.5))
    state = module.state_dict()
    assert state["scale"].is_contiguous() and state["scale"].shape == (64,)
    with pytest.raises(
        RuntimeError, match=r"size mismatch for scale: copying a param with shape \[10\]"
    ):
        module.load_state_dict({**state, "scale": state["scale"][:10]})
    with pytest.raises(RuntimeError, match="dtype mismatch for zero_point"):
        module.load_state_dict({**state, "zero_point": state["zero_point"].half()})
    with pytest.raises(RuntimeError, match="Missing key"):
        module.load_state_dict({k: v for k, v in state.items() if k != "scale"})


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_indices_past_the_last_offset_are_in_no_bag(backend: str, mode: str) -> None:
    # torch's max takes them into the last bag and its mean divides by them; its sum stops at
    # the last offset, as both of sparq's paths do in every mode.
    table = make_table(10, 4, level=0.0)
    decoded = table.decode()
    bag = EmbeddingBag.from_table(table, mode=mode, include_last_offset=True)
    indices, offsets = torch.arange(10), torch.tensor([0, 2, 5, 7])
    expected = F.embedding_bag(indices[:7], decoded, offsets, mode=mode, include_last_offset=True)
    assert torch.allclose(bag(indices, offsets), expected, rtol=1e-6, atol=0)
    if mode == "sum":
        weights = torch.rand(10)
        expected = F.embedding_bag(
            indices[:7], decoded, offsets, mode="sum", per_sample_weights=weights[:7],
            include_last_offset=True,
        )  # fmt: skip
        assert torch.allclose(bag(indices, offsets, weights), expected, rtol=1e-5, atol=0)


def test_a_trace_records_lookups_that_serve_other_indices(backend: str) -> None:
    table = make_table(100, 16, level=0.5)
    decoded = table.decode()
    bag = EmbeddingBag.from_table(table, mode="sum")
    embedding = Embedding.from_table(table)
    offsets = torch.arange(0, 40, 4)
    generator = torch.Generator().manual_seed(3)
    traced_indices = torch.randint(0, 100, (40,), generator=generator)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced_bag = torch.jit.trace(bag, (traced_indices, offsets), check_trace=False)
        traced_embedding = torch.jit.trace(embedding, (traced_indices,), check_trace=False)
    for indices in (traced_indices, torch.randint(0, 100, (40,), generator=generator)):
        assert torch.equal(traced_embedding(indices), F.embedding(indices, decoded))
        assert torch.allclose(
            traced_bag(indices, offsets),
            F.embedding_bag(indices, decoded, offsets, mode="sum"),
            rtol=1e-5,
            atol=1e-6,
        )


def test_assigned_views_are_stored_contiguous(backend: str) -> None:
    table = make_table(100, 16, level=0.5)
    bag = EmbeddingBag.from_table(table, mode="sum")
    indices, offsets = torch.tensor([1, 2, 3, 50]), torch.tensor([0, 2])
    expected = bag(indices, offsets)
    state = bag.state_dict()
    state["codes"] = torch.stack([state["codes"], state["codes"]], 1)[:, 0]
    assert not state["codes"].is_contiguous()
    bag.load_state_dict(state, assign=True)
    assert bag.codes.is_contiguous()
    assert torch.equal(bag(indices, offsets), expected)
