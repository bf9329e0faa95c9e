"""`load_compressed`: put a sparq file into a model, compressed tables as compressed modules."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from sparqcli.errors import FormatError, UsageError
from sparqcli.nn._format import (
    CompressedFolderInfo,
    find_layout,
    is_sharded_output,
    load_table,
    read_info,
)
from sparqcli.nn.modules import Embedding, EmbeddingBag, _CompressedLookup


def _module_name(key: str) -> str | None:
    if key == "weight":
        return ""
    return key[: -len(".weight")] if key.endswith(".weight") else None


def _read_passthrough(path: str, keys: list[str]) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt", device="cpu") as handle:
            return {key: handle.get_tensor(key) for key in keys}
    except (SafetensorError, OSError, RuntimeError) as error:
        raise FormatError(f"{path}: cannot read tensors ({error})") from None


def _contents(path: str | Path) -> tuple[CompressedFolderInfo, dict[str, str]]:
    """Returns what the sparq file at `path`, or the shards of the sparq folder, hold (merged)
    and the file that holds each table and pass-through tensor."""
    path = Path(path)
    if path.is_dir():
        if is_sharded_output(path):
            raise UsageError(
                f"{path}: a distributed run's output splits tables by rows over its shards; "
                "decompress it, or compress to one file, to serve it"
            )
        files = [str(path / name) for name in find_layout(path).shards]
    else:
        files = [str(path)]
    infos = tuple(read_info(file) for file in files)
    file_of = {key: info.path for info in infos for key in (*info.tables, *info.passthrough)}
    return CompressedFolderInfo(str(path), infos), file_of


def _replacement(
    path: str, key: str, module: nn.Module, device: torch.device | None
) -> _CompressedLookup:
    if isinstance(module, (nn.EmbeddingBag, EmbeddingBag)):
        if getattr(module, "max_norm", None) is not None:
            raise UsageError(
                f"{path}: table '{key}': max_norm is not supported on a compressed table"
            )
        return EmbeddingBag.from_file(
            path,
            key,
            mode=module.mode,
            padding_idx=module.padding_idx,
            include_last_offset=module.include_last_offset,
            device=device,
        )
    if getattr(module, "max_norm", None) is not None:
        raise UsageError(f"{path}: table '{key}': max_norm is not supported on a compressed table")
    return Embedding.from_file(path, key, padding_idx=module.padding_idx, device=device)


def _parameter_names(model: nn.Module) -> dict[int, list[str]]:
    """Returns every name of each parameter of `model` (tied ones have several), by identity."""
    names: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(parameter), []).append(name)
    return names


def _device_of(module: nn.Module) -> torch.device | None:
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return None


def load_compressed(model: nn.Module, path: str | Path, *, strict: bool = True) -> list[str]:
    """Loads the sparq file at `path` (or the sparq folder: what compressing a model folder
    writes, its shards read as one) into `model`; returns the names of the replaced modules.

    Every `nn.Embedding` / `nn.EmbeddingBag` (or compressed module) whose `<module>.weight` is a
    compressed table of the file is replaced by a `sparqcli.nn` module serving that table, on
    the old module's device, keeping its `padding_idx`, `mode` and `include_last_offset`. Every
    other tensor of the file is loaded as `model.load_state_dict` would load it. A table's
    aliases (tied weights, format version 2) are served the same way where they name embedding
    modules too, and are loaded decoded where they do not (an output head tied to the input
    embedding).

    With `strict`, nothing is changed and UsageError is raised (naming the key) when a
    compressed table matches no embedding module or its shape differs from the module's, or
    when the file and the model's other tensors do not match key for key (as
    `load_state_dict(strict=True)`). Without it, such tables and tensors are skipped. Raises
    InputError / FormatError when the file is unreadable or corrupt, UsageError when it holds no
    compressed table or a tensor's shape differs from the model's.
    """
    where = str(path)
    info, file_of = _contents(path)
    if not info.is_sparq:
        raise UsageError(
            f"{where}: holds no compressed table (not sparq's output); compress it with "
            "sparq first, or load it with model.load_state_dict"
        )
    modules = dict(model.named_modules())
    plan: dict[str, tuple[str, nn.Module]] = {}
    unmatched: list[str] = []
    # A table's aliases (tied weights) are served like the table where they are embeddings too,
    # and loaded decoded elsewhere (an output head); so is a table that is not an embedding
    # when one of its aliases is.
    aliases = info.aliases
    tied = {key for key in info.tables if info.tables[key].aliases}
    decoded: dict[str, str] = {}
    named = [(key, key) for key in info.tables] + list(aliases.items())
    for key, source in sorted(named):
        table = info.tables[source]
        name = _module_name(key)
        module = modules.get(name) if name is not None else None
        lookup = isinstance(module, (nn.Embedding, nn.EmbeddingBag, _CompressedLookup))
        if source in tied and not (
            lookup and (module.num_embeddings, module.embedding_dim) == table.shape
        ):
            decoded[key] = source
            continue
        if not lookup:
            if strict:
                raise UsageError(
                    f"{where}: compressed table '{key}' matches no nn.Embedding or "
                    f"nn.EmbeddingBag of the model"
                )
            unmatched.append(key)
            continue
        shape = (module.num_embeddings, module.embedding_dim)
        if shape != table.shape:
            if strict:
                raise UsageError(
                    f"{where}: compressed table '{key}' has shape {list(table.shape)}, "
                    f"the model's module has {list(shape)}"
                )
            unmatched.append(key)
            continue
        plan[name] = (source, module)

    # A parameter the model ties to a replaced module's weight (an output head sharing the
    # input embedding, as Hugging Face models do) is not in a file written from such a model's
    # own files: it is loaded decoded, as an alias would be.
    # A module replaced by an earlier call has no weight: it remembers the keys tied to it.
    names_of = _parameter_names(model)
    tied_to: dict[str, list[str]] = {}
    for name, (source, module) in plan.items():
        weight = getattr(module, "weight", None)
        keys = (
            names_of.get(id(weight), []) if weight is not None else getattr(module, "tied_keys", [])
        )
        for key in keys:
            if _module_name(key) not in plan and key not in info.passthrough:
                decoded.setdefault(key, source)
                tied_to.setdefault(name, []).append(key)

    replaced_prefixes = tuple(f"{name}." if name else "" for name in plan)
    expected = {
        key
        for key in model.state_dict()
        if not (plan and any(key.startswith(prefix) for prefix in replaced_prefixes))
    }
    stored = set(info.passthrough) | set(decoded)
    if strict:
        missing = sorted(expected - stored)
        unexpected = sorted(stored - expected)
        if missing or unexpected:
            parts = []
            if missing:
                parts.append("missing " + ", ".join(f"'{k}'" for k in missing[:5]))
            if unexpected:
                parts.append("unexpected " + ", ".join(f"'{k}'" for k in unexpected[:5]))
            raise UsageError(f"{where}: the file does not match the model: " + "; ".join(parts))
    keys_of_file: dict[str, list[str]] = {}
    for key in sorted(info.passthrough.keys() & expected):
        keys_of_file.setdefault(file_of[key], []).append(key)
    passthrough: dict[str, torch.Tensor] = {}
    for file, keys in keys_of_file.items():
        passthrough.update(_read_passthrough(file, keys))
    for key in sorted(set(decoded) & expected):
        passthrough[key] = load_table(file_of[decoded[key]], decoded[key])
    current = model.state_dict()
    for key, tensor in passthrough.items():
        if tuple(current[key].shape) != tuple(tensor.shape):
            raise UsageError(
                f"{where}: tensor '{key}' has shape {list(tensor.shape)}, the model's has "
                f"{list(current[key].shape)}"
            )

    replacements = {
        name: _replacement(file_of[key], key, module, _device_of(module))
        for name, (key, module) in plan.items()
    }
    model.load_state_dict(passthrough, strict=False)
    for name, new in replacements.items():
        new.tied_keys = tied_to.get(name, [])
        if name == "":
            raise UsageError(f"{where}: the model itself is an embedding; use Embedding.from_file")
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)
    return sorted(replacements)
