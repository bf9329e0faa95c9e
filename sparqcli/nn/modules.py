"""`Embedding` and `EmbeddingBag` that answer lookups from a table's compressed storage.

Each module holds the table exactly as the sparq file stores it (bit-packed codes, per-row scale
and zero point, bit-packed keep-mask) plus a small row index, never a dense table. Lookups decode
only the rows they touch: on CPU in a compiled gather-decode-reduce kernel (`_kernel.py`), else
(no compiler, CUDA tensors, `SPARQ_NN_KERNEL=off`) with tensor ops that decode the touched rows
and hand them to `F.embedding` / `F.embedding_bag`. Results equal those functions over the
decoded table.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sparqcli.errors import FormatError
from sparqcli.nn import _kernel
from sparqcli.nn._format import CompressedTable
from sparqcli.nn._storage import (
    Layout,
    build_index,
    check_packed,
    gather_rows,
    in_huge_pages,
    layout_from_state,
    pack_table,
    read_packed,
)

_MODES = {"sum": 0, "mean": 1, "max": 2}
_INDEX_DTYPES = (torch.int32, torch.int64)


class _CompressedLookup(nn.Module):
    """Shared storage, state dict, device moves and repr of the two modules."""

    codes: torch.Tensor
    qparams: torch.Tensor
    row_index: torch.Tensor

    @classmethod
    def _of_file(cls, path: str | Path, key: str, memory_map: bool, **options: Any) -> Any:
        """Returns the module serving table `key` of the file at `path` (see `from_file`)."""
        layout, tensors = read_packed(path, key, memory_map=memory_map)
        return cls(
            layout,
            tensors,
            source=f"{path}: table '{key}'",
            huge_pages=not memory_map,
            **options,
        )

    @classmethod
    def _of_table(cls, table: CompressedTable, **options: Any) -> Any:
        """Returns the module serving an in-memory compressed table (see `from_table`)."""
        if not isinstance(table, CompressedTable):
            raise TypeError(
                f"from_table takes a CompressedTable (what sparq's engine returns), got "
                f"{type(table).__name__}; torch.nn.{cls.__name__}.from_pretrained serves a dense "
                "tensor"
            )
        layout, tensors = pack_table(table)
        return cls(layout, tensors, source="table", **options)

    def __init__(
        self,
        layout: Layout,
        tensors: dict[str, torch.Tensor],
        *,
        padding_idx: int | None,
        device: torch.device | str | None,
        source: str,
        huge_pages: bool = True,
    ) -> None:
        super().__init__()
        check_packed(source, layout, tensors)
        on_cpu = device is None or torch.device(device).type == "cpu"
        if huge_pages and on_cpu:
            tensors = {**tensors, "codes": in_huge_pages(tensors["codes"])}
            tensors["mask"] = in_huge_pages(tensors["mask"])
        self.layout = layout
        self.padding_idx = _padding(padding_idx, layout.rows)
        self.register_buffer("codes", tensors["codes"].reshape(-1))
        # Scales and zero points interleaved, (rows, 2): one cache line per looked-up row instead
        # of two. state_dict() still holds them as the file's `scale` and `zero_point`.
        qparams = torch.stack([tensors["scale"].reshape(-1), tensors["zero_point"].reshape(-1)], 1)
        if huge_pages and on_cpu:
            qparams = in_huge_pages(qparams).view(qparams.shape)
        self.register_buffer("qparams", qparams, persistent=False)
        mask = tensors["mask"].reshape(-1)
        self.register_buffer("mask", mask if layout.mask != "none" else None)
        self.register_buffer("row_index", build_index(source, layout, mask), persistent=False)
        self.tied_keys: list[str] = []
        """Keys of the model's parameters that `load_compressed` found tied to the module this
        one replaced (loaded with the decoded table), so that loading again keeps them."""
        if device is not None:
            self.to(device)

    # --- shape, like torch's modules -----------------------------------------------------

    @property
    def scale(self) -> torch.Tensor:
        """Returns the per-row scales as stored (float32 or float16; a view, rows long)."""
        return self.qparams[:, 0]

    @property
    def zero_point(self) -> torch.Tensor:
        """Returns the per-row zero points as stored (a view, rows long)."""
        return self.qparams[:, 1]

    @property
    def num_embeddings(self) -> int:
        """Returns the number of rows of the table."""
        return self.layout.rows

    @property
    def embedding_dim(self) -> int:
        """Returns the number of columns of the table."""
        return self.layout.cols

    @property
    def dtype(self) -> torch.dtype:
        """Returns the table's original dtype (the dtype of every lookup's result)."""
        return self.layout.dtype

    @property
    def nbytes(self) -> int:
        """Returns the bytes the module holds: codes, scales, zero points, mask and row index."""
        return sum(buffer.numel() * buffer.element_size() for buffer in self.buffers())

    def decoded_weight(self) -> torch.Tensor:
        """Returns the whole table decoded (dense, original dtype): for checks, not for serving."""
        rows = torch.arange(self.layout.rows, device=self.codes.device)
        return gather_rows(self.layout, self._tensors(), self.row_index, rows)

    def extra_repr(self) -> str:
        """Returns the shape, settings and bytes shown by repr()."""
        text = f"{self.layout.rows}, {self.layout.cols}, {self.layout.describe()}"
        dtype = str(self.layout.dtype).removeprefix("torch.")
        text += f", dtype={dtype}, bytes={self.nbytes:,}"
        if self.padding_idx is not None:
            text += f", padding_idx={self.padding_idx}"
        return text

    # --- state dict and device moves -----------------------------------------------------

    def get_extra_state(self) -> dict[str, Any]:
        """Returns the layout (everything needed to read the stored tensors) for state_dict()."""
        layout = self.layout
        return {
            "rows": layout.rows,
            "cols": layout.cols,
            "dtype": str(layout.dtype).removeprefix("torch."),
            "bits": layout.bits,
            "mask": layout.mask,
            "block_shape": list(layout.block_shape),
            "kept": layout.kept,
            "level": layout.level,
            "order": layout.order,
        }

    def set_extra_state(self, state: Any) -> None:
        """Adopts the layout saved by get_extra_state; returns None.

        Raises ValueError when `state` is not such a layout or does not fit this module's
        storage (load_state_dict checks the layout and the buffers together before this).
        """
        layout = layout_from_state(state)
        misfit = self._storage_misfit(layout)
        if misfit is not None:
            raise ValueError(misfit)
        self.layout = layout

    def _save_to_state_dict(
        self, destination: dict[str, Any], prefix: str, keep_vars: bool
    ) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "scale"] = self.scale.detach().clone()
        destination[prefix + "zero_point"] = self.zero_point.detach().clone()

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # The incoming layout and buffers are checked together first: a module is never left
        # holding buffers its layout does not describe (a lookup would read out of bounds).
        checked = self._check_incoming(state_dict, prefix)
        if isinstance(checked, str):
            error_msgs.append(checked)
            return
        errors_before = len(error_msgs)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        for column, name in enumerate(("scale", "zero_point")):
            key = prefix + name
            if key in unexpected_keys:
                unexpected_keys.remove(key)
            if key in state_dict:
                with torch.no_grad():
                    self.qparams[:, column].copy_(state_dict[key])
            elif strict:
                missing_keys.append(key)
        if len(error_msgs) == errors_before:
            # load_state_dict(assign=True) keeps the given tensors: the kernel reads them as
            # flat arrays, so views come back as contiguous copies.
            for name, buffer in self._buffers.items():
                if buffer is not None and not buffer.is_contiguous():
                    self._buffers[name] = buffer.contiguous()
            self.row_index = checked.to(self.codes.device)
            self._forget_cache()

    def _storage_misfit(self, layout: Layout) -> str | None:
        """Returns why this module's buffers cannot hold a table of `layout` (a mask where it
        has none, or none where it has one), else None."""
        if (layout.mask == "none") != (self.mask is None):
            return f"layout with mask '{layout.mask}' does not fit this module's storage"
        return None

    def _check_incoming(self, state_dict: dict[str, Any], prefix: str) -> torch.Tensor | str:
        """Returns the row index of the table that loading `state_dict` would give (its layout,
        codes, mask, scales and zero points, each from `state_dict` where it has them), or the
        error message when they do not make one table of this module's shape."""
        where = prefix.rstrip(".") or "state dict"
        layout = self.layout
        state_key = prefix + "_extra_state"
        if state_key in state_dict:
            try:
                layout = layout_from_state(state_dict[state_key])
            except ValueError as error:
                return f"{state_key}: {error}"
        if (layout.rows, layout.cols) != (self.layout.rows, self.layout.cols):
            return (
                f"size mismatch for {state_key}: copying a table of {layout.rows} x {layout.cols}, "
                f"the shape in current model is {self.layout.rows} x {self.layout.cols}."
            )
        misfit = self._storage_misfit(layout)
        if misfit is not None:
            return f"{state_key}: {misfit}"
        tensors = self._tensors()
        for name in tensors:
            value = state_dict.get(prefix + name)
            if value is None or (name == "mask" and self.mask is None):
                continue
            if not isinstance(value, torch.Tensor):
                return f"{prefix}{name}: expected a tensor, got {type(value).__name__}"
            # torch's own size check, made before anything is copied (torch would copy the
            # layout even when it refuses a buffer)
            if value.shape != tensors[name].shape:
                return (
                    f"size mismatch for {prefix}{name}: copying a param with shape "
                    f"{list(value.shape)}, the shape in current model is "
                    f"{list(tensors[name].shape)}."
                )
            tensors[name] = value.reshape(-1)
        for name in ("scale", "zero_point"):
            if tensors[name].dtype != self.qparams.dtype:
                return (
                    f"dtype mismatch for {prefix}{name}: {tensors[name].dtype}, the stored "
                    f"scales are {self.qparams.dtype}"
                )
        try:
            check_packed(where, layout, tensors)
            return build_index(where, layout, tensors["mask"].cpu())
        except FormatError as error:
            return str(error)

    def _apply(self, fn: Any, recurse: bool = True) -> _CompressedLookup:
        # Device moves only: .half() / .to(dtype) must not re-round the stored scales. Results
        # always come back in the table's original dtype.
        for name, buffer in self._buffers.items():
            if buffer is None:
                continue
            moved = fn(buffer)
            if moved.dtype != buffer.dtype:
                moved = buffer.to(moved.device)
            self._buffers[name] = moved
        self._forget_cache()
        return self

    # --- lookups -------------------------------------------------------------------------

    def _tensors(self) -> dict[str, torch.Tensor]:
        mask = self.mask if self.mask is not None else self.codes.new_zeros(0)
        return {
            "codes": self.codes,
            "scale": self.scale,
            "zero_point": self.zero_point,
            "mask": mask,
        }

    def __getstate__(self) -> dict[str, Any]:
        # Without the cached kernel call: it is bound to this module's buffers (a deep copy
        # would serve the original's) and cannot be pickled.
        state = super().__getstate__()
        state.pop("_args", None)
        state.pop("_call", None)
        return state

    def _forget_cache(self) -> None:
        self.__dict__.pop("_args", None)
        self.__dict__.pop("_call", None)

    def _fast_call(self, name: str) -> Any:
        """Returns the kernel's entry `name` with this module's storage bound, or None.

        None when the kernel does not serve this module (not on CPU, float64, no kernel) or
        a `torch.jit.trace` is recording.
        Cached until the buffers change; a closure call keeps the per-lookup Python work small.
        """
        if torch.jit.is_tracing():
            # A trace records tensor ops only: the kernel's writes would be lost (the traced
            # graph would return its uninitialised output), the fallback's ops are recorded.
            return None
        call = self.__dict__.get("_call")
        if call is None:
            args = self._kernel_args()
            compiled = _kernel.kernel() if args[-1] else None
            if compiled is None:
                call = False
            else:
                entry = getattr(compiled, name)
                storage = args[:-1]

                def call(*rest: Any) -> torch.Tensor:
                    return entry(*storage, *rest)

            self.__dict__["_call"] = call
        return call or None

    def _kernel_args(self) -> tuple[Any, ...]:
        args = self.__dict__.get("_args")
        if args is None:
            args = self.__dict__["_args"] = self._make_kernel_args()
        return args

    def _make_kernel_args(self) -> tuple[Any, ...]:
        # The storage, geometry and whether the kernel can serve it (CPU, not float64), cached
        # until the buffers change (device move, load_state_dict).
        tensors = self._tensors()
        servable = self.codes.device.type == "cpu" and self.layout.dtype != torch.float64
        return (
            tensors["codes"],
            tensors["scale"],
            tensors["zero_point"],
            tensors["mask"],
            self.row_index,
            self.layout.geometry(),
            servable,
        )

    def _check_indices(self, indices: torch.Tensor, name: str = "input") -> None:
        if not isinstance(indices, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(indices).__name__}")
        if indices.dtype not in _INDEX_DTYPES:
            raise TypeError(
                f"{name} must hold int32 or int64 indices, got {str(indices.dtype).removeprefix('torch.')}"
            )
        if indices.device.type == "cpu" and self._kernel_args()[-1]:
            return
        if indices.device != self.codes.device:
            raise ValueError(
                f"{name} is on {indices.device} but the table is on {self.codes.device}"
            )

    def _check_range(self, flat: torch.Tensor) -> None:
        if flat.numel() == 0:
            return
        bad = (flat < 0) | (flat >= self.layout.rows)
        if bool(bad.any()):
            position = int(bad.nonzero()[0, 0])
            raise IndexError(
                f"index {int(flat[position])} at position {position} is out of range for a "
                f"table of {self.layout.rows} rows"
            )

    def _subset(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (unique rows, inverse, decoded unique rows + one zero row) for the fallback."""
        self._check_range(flat)
        unique, inverse = torch.unique(flat.long(), return_inverse=True)
        decoded = gather_rows(self.layout, self._tensors(), self.row_index, unique)
        table = torch.cat([decoded, decoded.new_zeros(1, self.layout.cols)])
        return unique, inverse, table


def _padding(padding_idx: int | None, rows: int) -> int | None:
    """Returns padding_idx normalised as torch does (negative counts from the end)."""
    if padding_idx is None:
        return None
    if isinstance(padding_idx, bool) or not isinstance(padding_idx, int):
        raise TypeError(f"padding_idx must be an int or None, got {padding_idx!r}")
    if not -rows <= padding_idx < rows:
        raise ValueError(f"padding_idx must be within num_embeddings ({rows}), got {padding_idx}")
    return padding_idx + rows if padding_idx < 0 else padding_idx


class Embedding(_CompressedLookup):
    """`nn.Embedding` over a compressed table: `module(input)` for any shape of int32/int64
    indices returns `input.shape + (embedding_dim,)` rows in the table's original dtype, equal
    bit for bit to `F.embedding` over the decoded table. `padding_idx` is kept for parity with
    torch (the padding row is returned as stored; it only matters for gradients, which a
    compressed table does not have)."""

    @classmethod
    def from_file(
        cls,
        path: str | Path,
        key: str,
        *,
        padding_idx: int | None = None,
        device: torch.device | str | None = None,
        memory_map: bool = False,
    ) -> Embedding:
        """Returns the module serving compressed table `key` of the sparq file at `path`.

        With `memory_map`, the codes and mask stay in the file's pages (loaded on use).
        Raises InputError when the file is unreadable or holds no such table, FormatError when
        it is corrupt, ValueError for a `padding_idx` outside the table.
        """
        return cls._of_file(path, key, memory_map, padding_idx=padding_idx, device=device)

    @classmethod
    def from_table(
        cls,
        table: CompressedTable,
        *,
        padding_idx: int | None = None,
        device: torch.device | str | None = None,
    ) -> Embedding:
        """Returns the module serving an in-memory compressed table (the engine's result).

        Raises TypeError for what is not a CompressedTable, ValueError when the table is
        inconsistent or `padding_idx` is outside it.
        """
        return cls._of_table(table, padding_idx=padding_idx, device=device)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """Returns the rows at `input` (any shape), shape `input.shape + (embedding_dim,)`.

        Raises IndexError naming the first index outside [0, num_embeddings), TypeError for
        indices that are not int32/int64, ValueError for indices on another device.
        """
        call = self._fast_call("embedding_forward")
        if (
            call is None
            or not isinstance(input, torch.Tensor)
            or not input.is_cpu
            or input.dtype not in _INDEX_DTYPES
        ):
            self._check_indices(input)  # raises unless the fallback can serve `input`
            call = call if input.is_cpu else None
        if call is not None:
            out = call(input).view(*input.shape, self.layout.cols)
            return out if self.layout.dtype == torch.float32 else out.to(self.layout.dtype)
        flat = input.reshape(-1)
        _, inverse, table = self._subset(flat)
        return F.embedding(inverse, table).view(*input.shape, self.layout.cols)


class EmbeddingBag(_CompressedLookup):
    """`nn.EmbeddingBag` over a compressed table: sums, means or maxima of bags of rows.

    `module(input, offsets=None, per_sample_weights=None)` as `F.embedding_bag`: 1-D input with
    offsets (bag starts; with `include_last_offset` also the end) or 2-D input (one bag per row).
    Results equal `F.embedding_bag` over the decoded table: `max` bit for bit, `sum` and `mean`
    within float32 rounding of the summation order. Entries equal to `padding_idx` are skipped
    (`mean` divides by the others); empty bags give zeros. With `include_last_offset`, indices
    past the last offset are in no bag (torch's own `max` and `mean` count them in the last).
    """

    def __init__(
        self,
        layout: Layout,
        tensors: dict[str, torch.Tensor],
        *,
        mode: str = "mean",
        padding_idx: int | None = None,
        include_last_offset: bool = False,
        device: torch.device | str | None = None,
        source: str = "table",
        huge_pages: bool = True,
    ) -> None:
        if mode not in _MODES:
            raise ValueError(f"mode must be 'sum', 'mean' or 'max', got {mode!r}")
        super().__init__(
            layout,
            tensors,
            padding_idx=padding_idx,
            device=device,
            source=source,
            huge_pages=huge_pages,
        )
        self.mode = mode
        self.include_last_offset = bool(include_last_offset)

    @classmethod
    def from_file(
        cls,
        path: str | Path,
        key: str,
        *,
        mode: str = "mean",
        padding_idx: int | None = None,
        include_last_offset: bool = False,
        device: torch.device | str | None = None,
        memory_map: bool = False,
    ) -> EmbeddingBag:
        """Returns the bag module serving compressed table `key` of the sparq file at `path`.

        With `memory_map`, the codes and mask stay in the file's pages (loaded on use).
        Raises InputError when the file is unreadable or holds no such table, FormatError when
        it is corrupt, ValueError for an unknown `mode` or a `padding_idx` outside the table.
        """
        return cls._of_file(
            path,
            key,
            memory_map,
            mode=mode,
            padding_idx=padding_idx,
            include_last_offset=include_last_offset,
            device=device,
        )

    @classmethod
    def from_table(
        cls,
        table: CompressedTable,
        *,
        mode: str = "mean",
        padding_idx: int | None = None,
        include_last_offset: bool = False,
        device: torch.device | str | None = None,
    ) -> EmbeddingBag:
        """Returns the bag module serving an in-memory compressed table (the engine's result).

        Raises TypeError for what is not a CompressedTable, ValueError when the table is
        inconsistent, `mode` unknown or `padding_idx` outside the table.
        """
        return cls._of_table(
            table,
            mode=mode,
            padding_idx=padding_idx,
            include_last_offset=include_last_offset,
            device=device,
        )

    def extra_repr(self) -> str:
        """Returns the shape, settings, mode and bytes shown by repr()."""
        text = super().extra_repr() + f", mode={self.mode!r}"
        if self.include_last_offset:
            text += ", include_last_offset=True"
        return text

    def forward(
        self,
        input: torch.Tensor,
        offsets: torch.Tensor | None = None,
        per_sample_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Returns one reduced row per bag, shape (bags, embedding_dim), in the table's dtype.

        Raises IndexError naming the first index outside [0, num_embeddings); ValueError for
        inputs that are not 1-D with 1-D offsets or 2-D without, or weights of another shape;
        NotImplementedError for per_sample_weights with a mode other than 'sum' (as torch);
        RuntimeError for offsets that do not start at 0, decrease or pass the input's end, or
        none with include_last_offset. Weights that require a gradient get it (tensor ops).
        """
        call = self._fast_call("embedding_bag_forward")
        if (
            call is not None
            and isinstance(input, torch.Tensor)
            and isinstance(offsets, torch.Tensor)
            and per_sample_weights is None
            and input.dim() == 1
            and input.is_cpu
            and offsets.is_cpu
            and input.dtype in _INDEX_DTYPES
            and offsets.dtype in _INDEX_DTYPES
            and offsets.dim() == 1
            and (offsets.numel() > 0 or not self.include_last_offset)
        ):
            padding = -1 if self.padding_idx is None else self.padding_idx
            out = call(
                input, offsets, _NO_WEIGHTS, _MODES[self.mode], padding, self.include_last_offset
            )
            return out if self.layout.dtype == torch.float32 else out.to(self.layout.dtype)
        self._check_indices(input)
        include_last_offset = self.include_last_offset
        if input.dim() == 2:
            if offsets is not None:
                raise ValueError("if input is 2-D, offsets has to be None")
            bags, length = input.shape
            offsets = torch.arange(0, bags * length, length, dtype=input.dtype, device=input.device)
            include_last_offset = False
            input = input.reshape(-1)
            if per_sample_weights is not None:
                per_sample_weights = per_sample_weights.reshape(-1)
        elif input.dim() == 1:
            if offsets is None or offsets.dim() != 1:
                raise ValueError("offsets has to be a 1-D tensor when input is 1-D")
            self._check_indices(offsets, "offsets")
            if include_last_offset and offsets.numel() == 0:
                raise RuntimeError("include_last_offset: number of offsets should be at least 1")
        else:
            raise ValueError(f"input has to be 1-D or 2-D, got {input.dim()}-D")
        if per_sample_weights is not None:
            if self.mode != "sum":
                raise NotImplementedError(
                    f"per_sample_weights is only supported for mode='sum' (got mode={self.mode!r})"
                )
            if per_sample_weights.shape != input.shape:
                raise ValueError(
                    f"per_sample_weights must have the shape of input {list(input.shape)}, "
                    f"got {list(per_sample_weights.shape)}"
                )
        # Weights that need a gradient go through the tensor ops, which autograd follows.
        weights_need_grad = (
            per_sample_weights is not None
            and per_sample_weights.requires_grad
            and torch.is_grad_enabled()
        )
        if call is not None and input.is_cpu and offsets.is_cpu and not weights_need_grad:
            weights = per_sample_weights if per_sample_weights is not None else _NO_WEIGHTS
            if not weights.is_cpu:
                raise ValueError("per_sample_weights must be on the CPU like the table")
            out = call(
                input,
                offsets,
                weights,
                _MODES[self.mode],
                -1 if self.padding_idx is None else self.padding_idx,
                include_last_offset,
            )
            return out if self.layout.dtype == torch.float32 else out.to(self.layout.dtype)
        _check_offsets(offsets, input.numel())
        if offsets.numel() == int(include_last_offset):  # no bags (torch's op crashes on them)
            return self.qparams.new_zeros((0, self.layout.cols), dtype=self.layout.dtype)
        if include_last_offset and int(offsets[-1]) < input.numel():
            # The last bag ends at the last offset, as in the kernel and torch's `sum`; torch's
            # `max` would also take the indices past it, and its `mean` divide by them.
            end = int(offsets[-1])
            input = input[:end]
            if per_sample_weights is not None:
                per_sample_weights = per_sample_weights[:end]
        unique, inverse, table = self._subset(input)
        padding = None
        if self.padding_idx is not None:
            hit = (unique == self.padding_idx).nonzero()
            padding = int(hit[0, 0]) if hit.numel() else None
        if per_sample_weights is not None:
            per_sample_weights = per_sample_weights.to(table.dtype)
        return F.embedding_bag(
            inverse.view(-1),
            table,
            offsets.long(),
            mode=self.mode,
            per_sample_weights=per_sample_weights,
            include_last_offset=include_last_offset,
            padding_idx=padding,
        )


_NO_WEIGHTS = torch.zeros(0)


def _check_offsets(offsets: torch.Tensor, length: int) -> None:
    """Raises RuntimeError, as the kernel does, for offsets that do not start at 0, decrease or
    pass the input's `length` (torch's tensor ops would read out of bounds)."""
    if offsets.numel() == 0:
        return
    values = offsets.long()
    first = int(values[0])
    if first != 0:
        raise RuntimeError(
            "offsets[0] has to be 0, i.e., the first sequence in the mini-batch has to start "
            f"from position 0. However, got {first}"
        )
    decreasing = torch.cat([values.new_zeros(1, dtype=torch.bool), values[1:] < values[:-1]])
    bad = (decreasing | (values > length)).nonzero()
    if bad.numel():
        at = int(bad[0, 0])
        if bool(decreasing[at]):
            raise RuntimeError(
                f"offsets must be non-decreasing, but offsets[{at}] = {int(values[at])} < "
                f"offsets[{at - 1}] = {int(values[at - 1])}"
            )
        raise RuntimeError(
            f"offsets[{at}] = {int(values[at])} can not be greater than input's length {length}"
        )
