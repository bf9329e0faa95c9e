"""Reading checkpoints and writing outputs safely.

Inputs: `.safetensors` (header validated by the safetensors library, tensors read in row chunks
with positioned reads, so a table much larger than memory streams through), and `.pt`/`.pth`/
`.bin` through `torch.load(weights_only=True)`, which never runs code from the file. A pickled
whole `nn.Module` is unpickled only when the caller trusts it (`trust_pickle`).

Outputs: written to a temporary file in the target folder, flushed to disk and renamed into
place, so a reader sees either no file, the previous file, or the complete new one.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import io
import json
import math
import os
import pickle
import pickletools
import struct
import tempfile
import threading
import warnings
import zipfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sparqcli.errors import InputError, OutputError, UnsafeInputError, UsageError, first_line
from sparqcli.select import TensorInfo
from sparqcli.threads import signals_deferred, wait_until

SAFETENSORS_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
# Keys under which training scripts commonly nest the model's state dict.
NESTED_STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "weights")
SPARQ_METADATA_KEY = "sparq"
_MAX_HEADER_BYTES = 100 << 20

_SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


def dtype_name(dtype: torch.dtype) -> str:
    """Returns torch's name of `dtype` without the `torch.` prefix (`float32`)."""
    return str(dtype).removeprefix("torch.")


@dataclass
class Checkpoint:
    """An opened input checkpoint: its tensors' shapes and dtypes, and a way to read them.

    `container_key` names the entry of the file that holds the state dict (None: the file is
    the state dict); `extra` holds the file's other top-level entries. `module_types` maps module
    names to class names, only for a trusted pickled `nn.Module`.
    """

    path: Path
    format: str
    tensors: dict[str, TensorInfo]
    container_key: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    module_types: dict[str, str] | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    _state: Mapping[str, torch.Tensor] | None = None
    _offsets: dict[str, int] = field(default_factory=dict)
    _raw: Any = None

    @property
    def is_sparq(self) -> bool:
        """Returns True when the file is a compressed sparq checkpoint."""
        return SPARQ_METADATA_KEY in self.metadata

    def row_reader(self, key: str, for_gpu: bool = False) -> RowReader:
        """Returns a `RowReader` of tensor `key`: `reader(start, stop)` returns those rows.

        `for_gpu`: the rows go to a GPU, so the buffers are page-locked and the next range is
        read ahead (see RowReader).
        """
        return RowReader(self, key, pin_memory=for_gpu, read_ahead=for_gpu)

    def tensor(self, key: str) -> torch.Tensor:
        """Returns the whole tensor `key` (on the CPU). Raises InputError when unreadable."""
        info = self.tensors[key]
        return self.read_rows(key, 0, info.shape[0]) if info.shape else self._read_all(key)

    def read_rows(
        self, key: str, start: int, stop: int, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Returns rows `start:stop` of tensor `key`. Raises InputError when unreadable.

        A file's rows are read into the start of `out` when given (a contiguous CPU tensor of
        the tensor's dtype, large enough), and a view of it is returned; rows of a checkpoint
        held in memory are returned as they are.
        """
        if self._state is not None:
            return self._state[key][start:stop]
        info = self.tensors[key]
        shape = (stop - start, *info.shape[1:])
        dtype = _torch_dtype(info.dtype)
        if out is None:
            out = torch.empty(shape, dtype=dtype)
        elif not (out.dtype == dtype and out.is_contiguous() and out.device.type == "cpu"):
            raise ValueError(f"out must be a contiguous CPU {info.dtype} tensor")
        rows = out.view(-1)[: math.prod(shape)].view(shape)
        if rows.numel():
            offset = self._offsets[key] + start * math.prod(info.shape[1:]) * out.element_size()
            _pread_into(self.path, offset, rows)
        return rows

    def _read_all(self, key: str) -> torch.Tensor:
        if self._state is not None:
            return self._state[key]
        value = torch.empty((), dtype=_torch_dtype(self.tensors[key].dtype))
        _pread_into(self.path, self._offsets[key], value)
        return value

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

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Returns every tensor of the checkpoint, read whole."""
        return {key: self.tensor(key) for key in self.tensors}


def open_checkpoint(
    path: str | Path, *, key: str | None = None, trust_pickle: bool = False
) -> Checkpoint:
    """Returns the opened checkpoint at `path` (.safetensors, .pt, .pth, .bin, .ckpt).

    `key` names the entry holding the state dict in a nested checkpoint (dotted for deeper
    nesting); without it the usual names are tried. Raises InputError for a missing, unreadable
    or corrupt file, UnsafeInputError for a pickle that needs code to load without
    `trust_pickle`, UsageError for an unknown extension or a `key` that is not there.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if path.is_dir():
        raise InputError(f"{path}: is a directory, not a checkpoint")
    if not os.access(path, os.R_OK):
        raise InputError(f"{path}: permission denied")
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        if key is not None:
            raise UsageError(f"{path}: --key applies to .pt files; a .safetensors file is flat")
        return _checked_keys(_open_safetensors(path))
    if suffix in TORCH_SUFFIXES:
        return _checked_keys(_open_torch(path, key, trust_pickle))
    raise UsageError(
        f"{path}: unknown checkpoint type '{path.suffix}'; expected .safetensors, .pt, .pth, .bin or .ckpt"
    )


# Module paths are a few dozen characters. Longer keys are refused: rules are regular
# expressions, and a crafted megabyte-long key could keep one busy for hours.
MAX_KEY_CHARS = 1024


def _checked_keys(checkpoint: Checkpoint) -> Checkpoint:
    """Returns `checkpoint`. Raises InputError when a tensor key is longer than MAX_KEY_CHARS."""
    for key in checkpoint.tensors:
        if len(key) > MAX_KEY_CHARS:
            raise InputError(
                f"{checkpoint.path}: tensor key {key[:40]!r}… is {len(key)} characters long "
                f"(at most {MAX_KEY_CHARS}); not a model checkpoint"
            )
    return checkpoint


def _open_safetensors(path: Path) -> Checkpoint:
    header = read_safetensors_header(path)
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + _header_length(path)
    tensors: dict[str, TensorInfo] = {}
    offsets: dict[str, int] = {}
    for name, entry in sorted(header.items()):
        tensors[name] = TensorInfo(
            tuple(entry["shape"]), dtype_name(_SAFETENSORS_DTYPES[entry["dtype"]])
        )
        offsets[name] = data_start + entry["data_offsets"][0]
    return Checkpoint(path, "safetensors", tensors, metadata=metadata, _offsets=offsets)


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """Returns the JSON header of a safetensors file, validated by the safetensors library.

    Raises InputError when the file is not a valid safetensors file.
    """
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt"):
            pass
    except (SafetensorError, OSError, ValueError) as error:
        raise InputError(f"{path}: not a valid safetensors file ({first_line(error)})") from None
    length = _header_length(path)
    try:
        header = json.loads(_pread(path, 8, length))
    except ValueError as error:
        raise InputError(f"{path}: not a valid safetensors file ({first_line(error)})") from None
    for name, entry in header.items():
        if name != "__metadata__" and entry.get("dtype") not in _SAFETENSORS_DTYPES:
            raise InputError(f"{path}: tensor '{name}' has unsupported dtype {entry.get('dtype')}")
    return header


def _header_length(path: Path) -> int:
    raw = _pread(path, 0, 8)
    if len(raw) < 8:
        raise InputError(f"{path}: not a valid safetensors file (shorter than its header)")
    (length,) = struct.unpack("<Q", raw)
    if length > _MAX_HEADER_BYTES:
        raise InputError(f"{path}: not a valid safetensors file (header claims {length} bytes)")
    return length


class RowReader:
    """Reads row ranges of one tensor of a checkpoint into reused host buffers.

    The rows a call returns stay valid until the next call: a caller must be done with a chunk
    before it asks for the next (the engine is). Without `read_ahead` each thread reads into its
    own buffer, so several threads may read at once (the engine's chunk workers do); the rows
    stay valid until the same thread's next call. With `read_ahead`, while the caller works on one
    range, a background thread reads the next range of the same size into a second buffer
    (positioned reads release the GIL), so a sequential pass seldom waits for the disk or the
    page cache. That pays when the CPU is otherwise idle, as it is while a GPU computes; beside
    torch's CPU threads it costs more than it saves (measured: 2.6 -> 3.1 s on 2 cores). With
    `pin_memory` the buffers are page-locked, so copies to a GPU run at full speed; each call
    first waits for the GPU's pending copies from them. A checkpoint held in memory returns its
    own rows. Use as a context manager, or call `close()`.
    """

    def __init__(
        self, checkpoint: Checkpoint, key: str, pin_memory: bool = False, read_ahead: bool = False
    ) -> None:
        info = checkpoint.tensors[key]
        self._checkpoint = checkpoint
        self._key = key
        self._pin_memory = pin_memory
        self._read_ahead = read_ahead
        self._rows = info.shape[0] if info.shape else 0
        self._row_values = math.prod(info.shape[1:])
        self._dtype = _torch_dtype(info.dtype)
        self._buffers: list[torch.Tensor | None] = [None, None]
        self._current = 0  # the buffer holding the rows last returned
        self._ahead: tuple[int, int, concurrent.futures.Future[torch.Tensor]] | None = None
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._own = threading.local()  # without read-ahead: .buffer, one per thread

    def __call__(self, start: int, stop: int) -> torch.Tensor:
        """Returns rows `start:stop`. Raises InputError when they cannot be read."""
        if self._checkpoint._state is not None:
            return self._checkpoint._state[self._key][start:stop]
        if not (self._read_ahead or self._pin_memory):
            buffer = getattr(self._own, "buffer", None)
            if buffer is None or buffer.numel() < (stop - start) * self._row_values:
                buffer = self._own.buffer = self._new_buffer(start, stop)
            return self._checkpoint.read_rows(self._key, start, stop, out=buffer)
        if self._pin_memory:
            torch.cuda.current_stream().synchronize()
        ahead, self._ahead = self._ahead, None
        spare = 1 - self._current
        if ahead is not None:
            future = ahead[2]
            wait_until(lambda timeout: not concurrent.futures.wait([future], timeout).not_done)
        if ahead is not None and ahead[:2] == (start, stop):
            rows = ahead[2].result()
        else:
            if ahead is not None:  # a guess that missed: it finished, its buffer is free
                with contextlib.suppress(InputError):
                    ahead[2].result()
            rows = self._read(start, stop, spare)
        self._current = spare
        following = (stop, min(self._rows, 2 * stop - start))
        if self._read_ahead and following[0] < following[1]:
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(1, "sparq-read-ahead")
            with signals_deferred():  # the pool may start its thread here
                future = self._pool.submit(self._read, *following, 1 - spare)
            self._ahead = (*following, future)
        return rows

    def _read(self, start: int, stop: int, index: int) -> torch.Tensor:
        buffer = self._buffers[index]
        if buffer is None or buffer.numel() < (stop - start) * self._row_values:
            buffer = self._buffers[index] = self._new_buffer(start, stop)
        return self._checkpoint.read_rows(self._key, start, stop, out=buffer)

    def _new_buffer(self, start: int, stop: int) -> torch.Tensor:
        return torch.empty(
            (stop - start) * self._row_values, dtype=self._dtype, pin_memory=self._pin_memory
        )

    def close(self) -> None:
        """Waits for a pending read-ahead and stops the background thread."""
        if self._pool is not None:
            with signals_deferred():
                self._pool.shutdown(wait=True)
            self._pool = None
        self._ahead = None

    def __enter__(self) -> RowReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _pread(path: Path, offset: int, size: int) -> bytearray:
    """Returns `size` bytes of `path` from `offset`. Raises InputError when short or unreadable."""
    buffer = bytearray(size)
    _pread_view(path, offset, memoryview(buffer))
    return buffer


def _pread_into(path: Path, offset: int, target: torch.Tensor) -> None:
    """Fills the contiguous CPU tensor `target` with the bytes of `path` from `offset`."""
    size = target.numel() * target.element_size()
    _pread_view(path, offset, memoryview((ctypes.c_char * size).from_address(target.data_ptr())))


def _pread_view(path: Path, offset: int, view: memoryview) -> None:
    view = view.cast("B")
    size = len(view)
    try:
        with open(path, "rb", buffering=0) as file:
            done = 0
            while done < size:
                count = os.preadv(file.fileno(), [view[done:]], offset + done)
                if count == 0:
                    raise InputError(
                        f"{path}: truncated (expected {size} bytes at offset {offset})"
                    )
                done += count
    except OSError as error:
        raise InputError(f"{path}: cannot read: {error.strerror}") from None


def _torch_dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


def _open_torch(path: Path, key: str | None, trust_pickle: bool) -> Checkpoint:
    _check_zip_records(path)
    loaded = _torch_load(path, trust_pickle)
    module_types = None
    if isinstance(loaded, torch.nn.Module):
        module_types = {name: type(module).__name__ for name, module in loaded.named_modules()}
        loaded = loaded.state_dict()
    raw = loaded
    container_key, state, extra = _find_state_dict(path, loaded, key)
    tensors = {
        name: TensorInfo(tuple(value.shape), dtype_name(value.dtype))
        for name, value in state.items()
    }
    return Checkpoint(
        path,
        "module" if module_types is not None else "torch",
        tensors,
        container_key=container_key,
        extra=extra,
        module_types=module_types,
        _state=state,
        _raw=None if module_types is not None else raw,
    )


def _torch_load(path: Path, trust_pickle: bool) -> Any:
    try:
        # torch warns on stderr about pickle protocols and deprecations; errors say enough.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if trust_pickle:
                return torch.load(path, map_location="cpu", weights_only=False)
            return torch.load(path, map_location="cpu", weights_only=True, mmap=_is_zip(path))
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
            "pass --trust-pickle only if you trust where the file came from"
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


def _is_zip(path: Path) -> bool:
    return zipfile.is_zipfile(path)


# torch.save stores zip records uncompressed; torch.load inflates a compressed one whole in
# memory, so a small file could claim (and expand to) gigabytes.
_MAX_ZIP_EXPANSION = 8


def _check_zip_records(path: Path) -> None:
    """Raises InputError when a record of the .pt zip at `path` inflates far beyond its size."""
    try:
        with zipfile.ZipFile(path) as archive:
            records = archive.infolist()
    except Exception:
        return  # not a zip, or a broken one: torch.load says what is wrong
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
                    f"{path}: --key {key!r} not found; top-level keys: {_key_list(loaded)}"
                )
            node = node[part]
        if not _is_tensor_dict(node):
            raise UsageError(f"{path}: --key {key!r} does not hold a state dict of tensors")
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
                    f"{path}: no state dict found (top-level keys: {_key_list(loaded)}); name it with --key"
                )
        else:
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


def check_output_path(output: Path, inputs: list[Path], force: bool) -> None:
    """Checks that `output` may be written. Raises UsageError when it is an input or exists."""
    for source in inputs:
        if output.exists() and source.exists() and os.path.samefile(output, source):
            raise UsageError(f"{output}: is an input; sparq never overwrites its input")
        if output.resolve() == source.resolve():
            raise UsageError(f"{output}: is an input; sparq never overwrites its input")
    if output.exists() and not force:
        raise UsageError(f"{output}: already exists; pass --force to replace it")
    if output.exists() and output.is_dir():
        raise UsageError(f"{output}: is a directory")


@contextlib.contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """Yields a temporary path beside `path`; on success it is synced and renamed to `path`.

    On any failure, or an interrupt, the temporary file is removed and `path` is untouched.
    Raises OutputError when the folder is not writable or the write fails.
    """
    path = Path(path)
    folder = path.parent
    if not folder.is_dir():
        raise OutputError(f"{path}: cannot write: folder {folder} does not exist")
    try:
        handle, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    except OSError as error:
        raise OutputError(f"{path}: cannot write: {error.strerror}") from None
    temp = Path(temp_name)
    try:
        os.close(handle)
        yield temp
        _finish(temp, path)
    except OSError as error:
        _remove_quietly(temp)
        raise OutputError(f"{path}: cannot write: {error.strerror or error}") from None
    except OutputError as error:
        # Writers name the file they were given; the user knows the output by its own name.
        _remove_quietly(temp)
        raise OutputError(str(error).replace(str(temp), str(path))) from None
    except BaseException:
        _remove_quietly(temp)
        raise


def _finish(temp: Path, path: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(temp, 0o666 & ~umask)
    with open(temp, "rb+") as file:
        os.fsync(file.fileno())
    os.replace(temp, path)
    with contextlib.suppress(OSError):
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


def _remove_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()


def write_torch(path: Path, obj: Any, write: Callable[[Any, Path], None] | None = None) -> None:
    """Writes `obj` with torch.save to `path` atomically. Raises OutputError on failure."""
    with atomic_output(path) as temp:
        (write or save_torch_file)(obj, temp)


def save_torch_file(obj: Any, path: Path) -> None:
    """Writes `obj` with torch.save to exactly `path`; the same object gives the same bytes."""
    # Through a file object: torch.save(obj, path) names the zip's inner folder after the
    # (random) temporary file name, so the same object would give different bytes.
    with open(path, "wb") as file:
        sink = _Sink(file)
        try:
            torch.save(obj, sink)
        except RuntimeError as error:
            # torch's zip writer turns a failed write (a full disk) into a RuntimeError.
            if sink.error is not None:
                raise sink.error from None
            raise OutputError(f"{path}: cannot write: {first_line(error)}") from None


class _Sink:
    """A binary file for torch.save that keeps the OSError of a failed write."""

    def __init__(self, file: Any) -> None:
        self.file = file
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return self.file.write(data)
        except OSError as error:
            self.error = error
            raise

    def flush(self) -> None:
        self.file.flush()
