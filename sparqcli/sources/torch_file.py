"""`.pt`/`.pth`/`.bin`/`.ckpt` inputs: `torch.load(weights_only=True)` behind a pickle guard.

`torch.load(weights_only=True)` never runs code from the file. When it refuses one, the pickle's
opcodes are scanned (without running anything) to name the global it would need; a pickled
whole `nn.Module` is unpickled only when the caller trusts it (`trust_pickle`), and then its
module types are known. Zip records that would inflate far beyond their stored size are refused
before torch inflates them in memory. The state dict may be nested (`state_dict`, `model`, ...);
everything else in the file is kept for `rebuild`.
"""

from __future__ import annotations

import io
import pickle
import pickletools
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from sparqcli.dtypes import BY_NAME, TensorInfo, dtype_name
from sparqcli.errors import InputError, UnsafeInputError, UsageError, first_line
from sparqcli.sources import Checkpoint

# Keys under which training scripts commonly nest the model's state dict.
NESTED_STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "weights")


class StateDictCheckpoint(Checkpoint):
    """A state dict held in memory: read from a torch file, or handed over by a caller.

    `raw` is the whole object the file held (for `rebuild`), None for a module or a caller's
    state dict.
    """

    def __init__(
        self,
        path: Path | None,
        format: str,
        state: Mapping[str, torch.Tensor],
        *,
        raw: Any = None,
        container_key: str | None = None,
        extra: dict[str, Any] | None = None,
        module_types: dict[str, str] | None = None,
    ) -> None:
        tensors = {name: _tensor_info(path, name, value) for name, value in state.items()}
        super().__init__(
            path,
            format,
            tensors,
            container_key=container_key,
            extra=extra,
            module_types=module_types,
        )
        self._state = state
        self._raw = raw

    def read_rows(
        self, key: str, start: int, stop: int, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Returns rows `start:stop` of tensor `key` as they are held, detached from autograd
        (parameters require a gradient; `out` is not used)."""
        return self._state[key][start:stop].detach()

    def tensor(self, key: str) -> torch.Tensor:
        """Returns tensor `key` as it is held, detached from autograd."""
        return self._state[key].detach()

    def storage_groups(self) -> list[tuple[str, ...]]:
        """Returns groups (2 or more keys, in key order) of tensors that are the same view of
        one storage: same storage, offset, shape, strides and dtype (tied weights)."""
        groups: dict[tuple[Any, ...], list[str]] = {}
        for key, value in self._state.items():
            if value.numel() == 0 or value.is_quantized or value.layout != torch.strided:
                continue
            where = (
                value.device,
                value.untyped_storage().data_ptr(),
                value.storage_offset(),
                tuple(value.shape),
                value.stride(),
                value.dtype,
            )
            groups.setdefault(where, []).append(key)
        return [tuple(keys) for keys in groups.values() if len(keys) > 1]

    def rebuild(self, state: dict[str, Any]) -> Any:
        """Returns the file's object with its state dict's tensors replaced by `state`.

        Every other entry, top-level or inside the state dict, is carried over unchanged.
        """
        if self._raw is None or not isinstance(self._raw, Mapping):
            return state
        if self.container_key is None:
            kept = {k: v for k, v in self._raw.items() if not isinstance(v, torch.Tensor)}
            return {**state, **kept}
        outer = dict(self._raw)
        node = outer
        parts = self.container_key.split(".")
        for part in parts[:-1]:
            node[part] = dict(node[part])
            node = node[part]
        inner = node[parts[-1]]
        kept = {k: v for k, v in inner.items() if not isinstance(v, torch.Tensor)}
        node[parts[-1]] = {**state, **kept}
        return outer


def _tensor_info(path: Path | None, name: str, value: torch.Tensor) -> TensorInfo:
    """Returns the shape, dtype and layout of tensor `name`. Raises InputError for a dtype that
    sparq does not know."""
    dtype = dtype_name(value.dtype)
    if dtype not in BY_NAME:
        where = path if path is not None else "state dict"
        raise InputError(f"{where}: tensor '{name}' has unsupported dtype {dtype}", path=path)
    return TensorInfo(tuple(value.shape), dtype, str(value.layout).removeprefix("torch."))


def open_torch_file(path: Path, key: str | None, trust_pickle: bool) -> StateDictCheckpoint:
    """Returns the state dict checkpoint of a torch file (see the module's docstring).

    Raises InputError for an unreadable or corrupt file, UnsafeInputError for a pickle that
    needs code without `trust_pickle`, UsageError for a `key` that is not there.
    """
    is_zip = _check_file_kind(path)
    loaded = _torch_load(path, trust_pickle, is_zip)
    if isinstance(loaded, torch.nn.Module):
        module_types = {name: type(module).__name__ for name, module in loaded.named_modules()}
        container_key, state, extra = _find_state_dict(path, loaded.state_dict(), key)
        return StateDictCheckpoint(
            path,
            "module",
            state,
            container_key=container_key,
            extra=extra,
            module_types=module_types,
        )
    container_key, state, extra = _find_state_dict(path, loaded, key)
    return StateDictCheckpoint(
        path, "torch", state, raw=loaded, container_key=container_key, extra=extra
    )


def _torch_load(path: Path, trust_pickle: bool, is_zip: bool) -> Any:
    try:
        # torch warns on stderr about pickle protocols and deprecations; errors say enough.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if trust_pickle:
                return torch.load(path, map_location="cpu", weights_only=False)
            return torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as error:
        # The weights-only unpickler names a GLOBAL it refuses; it stops on other opcodes
        # (FRAME of protocol 4) before it sees one, so the pickle itself is scanned too.
        unsafe = [] if trust_pickle else _unsafe_globals(path)
        if trust_pickle or ("GLOBAL" not in str(error) and not unsafe):
            raise InputError(
                f"{path}: not a readable PyTorch checkpoint ({first_line(error)})"
            ) from None
        needed = _needed_global(str(error)) or f" ({unsafe[0]})"
        raise UnsafeInputError(
            f"{path}: refusing to unpickle: loading it would run code{needed}; "
            "pass {opt:trust_pickle} only if you trust where the file came from",
            path=path,
        ) from None
    except Exception as error:  # a corrupt file makes torch's loaders raise almost anything
        raise InputError(
            f"{path}: not a readable PyTorch checkpoint ({first_line(error)})"
        ) from None


_MAX_PICKLE_SCAN_BYTES = 64 << 20
_STRING_OPCODES = frozenset(
    {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING", "BINSTRING"}
    | {"SHORT_BINSTRING"}
)


def _unsafe_globals(path: Path) -> list[str]:
    """Returns the globals a pickle (.pt zip or raw) names that weights-only loading refuses.

    Reads the pickle's opcodes without running anything; a name it cannot resolve counts as
    unsafe. Returns [] when the file is not a readable pickle at all.
    """
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                names = [n for n in archive.namelist() if n.endswith("data.pkl")]
                if not names:
                    return []
                with archive.open(names[0]) as member:
                    data = member.read(_MAX_PICKLE_SCAN_BYTES)
        else:
            with open(path, "rb") as file:
                data = file.read(_MAX_PICKLE_SCAN_BYTES)
    except Exception:
        return []
    try:
        from torch._weights_only_unpickler import _get_allowed_globals

        allowed = set(_get_allowed_globals())
    except Exception:
        allowed = set()
    allowed |= {
        f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', '')}"
        for obj in torch.serialization.get_safe_globals()
        if not isinstance(obj, tuple)
    }
    found: list[str] = []
    stream = io.BytesIO(data)
    while stream.tell() < len(data):  # a legacy .pt holds several pickles in a row
        strings: list[object] = []  # what string pushes (and memo gets) put on the stack
        memo: dict[int, object] = {}
        top: object = None  # the string on top of the stack, None when it is something else
        try:
            for opcode, arg, _ in pickletools.genops(stream):
                name = opcode.name
                pushed: object = None
                if name in _STRING_OPCODES:
                    pushed = arg
                    strings.append(arg)
                elif name == "MEMOIZE":
                    memo[len(memo)] = top
                    pushed = top
                elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
                    memo[int(arg)] = top
                    pushed = top
                elif name in ("GET", "BINGET", "LONG_BINGET"):
                    pushed = memo.get(int(arg))
                    strings.append(pushed)
                elif name in ("GLOBAL", "INST"):
                    found.append(str(arg).replace(" ", "."))
                elif name == "STACK_GLOBAL":
                    parts = strings[-2:]
                    ok = len(parts) == 2 and all(isinstance(part, str) for part in parts)
                    found.append(".".join(map(str, parts)) if ok else "an unresolved global")
                top = pushed
        except Exception:
            break
    return [name for name in found if name not in allowed]


def _check_file_kind(path: Path) -> bool:
    """Returns True when the file at `path` is a zip archive (torch.save's format, its records
    checked by `_check_zip_records`), False for a pickle (before torch 1.6) or a tar archive
    (before 0.4). Raises InputError for anything else, named for what it is: torch.load's own
    message is about its weights-only loader."""
    try:
        with open(path, "rb") as file:
            head = file.read(262)
    except OSError as error:
        raise InputError(f"{path}: cannot read: {error.strerror}", path=path) from None
    if head.startswith(b"PK\x03\x04"):
        _check_zip_records(path)
        return True
    if head.startswith(b"\x80") or head[257:262] == b"ustar":
        return False
    if head[8:9] == b"{":
        raise InputError(
            f"{path}: is a safetensors file, not a PyTorch checkpoint; name it .safetensors",
            path=path,
        )
    raise InputError(
        f"{path}: not a PyTorch checkpoint (neither torch.save's zip archive nor a pickle)",
        path=path,
    )


# torch.save stores zip records uncompressed; torch.load inflates a compressed one whole in
# memory, so a small file could claim (and expand to) gigabytes.
_MAX_ZIP_EXPANSION = 8


def _check_zip_records(path: Path) -> None:
    """Raises InputError when the .pt zip at `path` is damaged (truncated: no central
    directory) or a record inflates far beyond its size."""
    try:
        with zipfile.ZipFile(path) as archive:
            records = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError):
        raise InputError(
            f"{path}: not a readable PyTorch checkpoint (a truncated or damaged zip archive)",
            path=path,
        ) from None
    for record in records:
        limit = _MAX_ZIP_EXPANSION * record.compress_size + (1 << 20)
        if record.compress_type != zipfile.ZIP_STORED and record.file_size > limit:
            raise InputError(
                f"{path}: not a readable PyTorch checkpoint (record '{record.filename}' "
                f"inflates {record.compress_size} bytes to {record.file_size}; refusing a zip bomb)"
            )


def _needed_global(message: str) -> str:
    for marker in ("Unsupported global: GLOBAL ", "GLOBAL "):
        if marker in message:
            name = message.split(marker, 1)[1].split()[0].rstrip(".,")
            return f" ({name})"
    return ""


def _is_tensor_dict(value: Any) -> bool:
    return isinstance(value, Mapping) and any(isinstance(v, torch.Tensor) for v in value.values())


def _same_model(value: Any, state: Mapping[str, Any]) -> bool:
    """Returns whether `value` is another state dict of the model `state` holds (an EMA or
    averaged copy): most of the model's floating tensors under the same names and shapes, or all
    of their shapes under other names. Not the same dict saved twice, masks (bool), nor
    flattened fragments (DeepSpeed's frozen parameters)."""
    if value is state or not _is_tensor_dict(value):
        return False

    def floating(mapping: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        return {
            name: tensor
            for name, tensor in mapping.items()
            if isinstance(tensor, torch.Tensor) and tensor.is_floating_point()
        }

    mine, theirs = floating(state), floating(value)
    if not mine or not theirs:
        return False
    same = sum(1 for name, t in theirs.items() if name in mine and mine[name].shape == t.shape)
    if 2 * same > len(mine):
        return True
    return sorted(tuple(t.shape) for t in theirs.values()) == sorted(
        tuple(t.shape) for t in mine.values()
    )


def _find_state_dict(
    path: Path, loaded: Any, key: str | None
) -> tuple[str | None, dict[str, torch.Tensor], dict[str, Any]]:
    if not isinstance(loaded, Mapping):
        raise InputError(f"{path}: holds a {type(loaded).__name__}, not a state dict")
    if key is not None:
        node: Any = loaded
        for part in key.split("."):
            if not isinstance(node, Mapping) or part not in node:
                raise UsageError(
                    f"{path}: {{opt:key}} {key!r} not found; top-level keys: {_key_list(loaded)}",
                    path=path,
                )
            node = node[part]
        if not _is_tensor_dict(node):
            raise UsageError(
                f"{path}: {{opt:key}} {key!r} does not hold a state dict of tensors", path=path
            )
        container_key = key
    elif all(isinstance(v, torch.Tensor) for v in loaded.values()) and loaded:
        return None, dict(loaded), {}
    else:
        found = [name for name in NESTED_STATE_DICT_KEYS if _is_tensor_dict(loaded.get(name))]
        if not found:
            if _is_tensor_dict(loaded):
                container_key = None
                node = loaded
            else:
                raise InputError(
                    f"{path}: no state dict found (top-level keys: {_key_list(loaded)}); pass {{opt:key=NAME}}",
                    path=path,
                )
        else:
            # {"model": ..., "ema": ...}: which copy is meant cannot be guessed, and the other
            # would be carried over uncompressed
            holding = [found[0]] + [
                str(name)
                for name, value in loaded.items()
                if name != found[0] and _same_model(value, loaded[found[0]])
            ]
            if len(holding) > 1:
                raise UsageError(
                    f"{path}: holds several state dicts ({', '.join(holding)}); "
                    "pass {opt:key=NAME} to choose one",
                    path=path,
                )
            container_key = found[0]
            node = loaded[container_key]
    state = {name: value for name, value in node.items() if isinstance(value, torch.Tensor)}
    if container_key is None:
        extra = {name: value for name, value in node.items() if not isinstance(value, torch.Tensor)}
    else:
        top = key.split(".")[0] if key else container_key
        extra = {name: value for name, value in loaded.items() if name != top}
        extra.update(
            {name: value for name, value in node.items() if not isinstance(value, torch.Tensor)}
        )
    return container_key, state, extra


def _key_list(mapping: Mapping[str, Any]) -> str:
    names = [str(name) for name in mapping]
    shown = ", ".join(names[:8])
    return shown + (f", … ({len(names)} in all)" if len(names) > 8 else "") if names else "none"
