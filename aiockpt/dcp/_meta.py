"""A DCP checkpoint's ``.metadata`` and checksum sidecar, read without trusting them:
``.metadata`` is checked against its recorded checksum, unpickled with an unpickler that
builds only DCP's metadata classes, and then checked to describe a checkpoint (the types
DCP's planners use, a file slice for every chunk); the sidecar is bounded, flat JSON."""

from __future__ import annotations

import io
import json
import os
import pickle
import reprlib
from typing import Any

import torch
import xxhash
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)

from .._exceptions import CheckpointNotFoundError, CorruptCheckpointError, UnsafeCheckpointError
from ..storage._files import open_file, opened, read_at_most
from ..storage._metadata import safe_join
from ._commit import CHECKSUMS, METADATA, SIDECAR_FORMAT

# .metadata is small; anything much larger was not written by DCP.
METADATA_LIMIT = 256 * 2**20

# Everything a DCP ``.metadata`` pickle may name: its dataclasses and the torch and stdlib
# types inside them. Any other global (os.system, builtins.eval, ...) is refused.
_METADATA_CLASSES = (
    "Metadata",
    "MetadataIndex",
    "StorageMeta",
    "ChunkStorageMetadata",
    "TensorProperties",
    "TensorStorageMetadata",
    "BytesStorageMetadata",
    "_MEM_FORMAT_ENCODING",
)
_ALLOWED: frozenset[tuple[str, str]] = frozenset(
    [("torch.distributed.checkpoint.metadata", name) for name in _METADATA_CLASSES]
    + [
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("torch", "Size"),
        ("torch.serialization", "_get_layout"),  # a name-to-layout lookup, nothing else
        ("collections", "OrderedDict"),
        ("pathlib", "PosixPath"),
        ("pathlib", "PurePosixPath"),
        ("pathlib", "WindowsPath"),
        ("pathlib", "PureWindowsPath"),
    ]
)
_TORCH_VALUES = frozenset(
    name for name in dir(torch) if isinstance(getattr(torch, name), torch.dtype | torch.layout)
)
_short = reprlib.Repr()  # a bounded repr: a deeply nested record prints as [[[...]]]
_short.maxlevel, _short.maxstring, _short.maxother = 3, 60, 60


class ForbiddenGlobalError(pickle.UnpicklingError):
    """The pickle names a global that is not a DCP metadata class."""


class MetadataUnpickler(pickle.Unpickler):
    """Builds DCP metadata and nothing else."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED or (module == "torch" and name in _TORCH_VALUES):
            return super().find_class(module, name)
        raise ForbiddenGlobalError(f"{module}.{name} is not a DCP metadata class")


def unpickle_metadata(data: bytes, path: str) -> Metadata:
    """``.metadata``'s object, refusing any pickle that names another global
    (:class:`UnsafeCheckpointError`) and any that is not a whole DCP checkpoint's metadata
    (:class:`CorruptCheckpointError`: damaged bytes, wrong types, a chunk with no file)."""
    try:
        meta = MetadataUnpickler(io.BytesIO(data)).load()
    except ForbiddenGlobalError as exc:
        raise UnsafeCheckpointError(
            f"refusing to load {path!r}: {exc}. A DCP .metadata holds only DCP's metadata "
            "classes; this one would run other code when unpickled. Do not load this "
            "checkpoint with torch.distributed.checkpoint.load either"
        ) from exc
    except Exception as exc:  # truncated, garbled: what a damaged pickle raises varies
        raise CorruptCheckpointError(
            f"{path!r} is not a readable DCP metadata pickle: {type(exc).__name__}: {exc}",
            path=path,
        ) from exc
    if not isinstance(meta, Metadata):
        raise CorruptCheckpointError(
            f"{path!r} is not valid DCP metadata: it holds a {type(meta).__name__}, not "
            "DCP Metadata",
            path=path,
        )
    why = _invalid(meta, os.path.dirname(path))
    if why is not None:
        raise CorruptCheckpointError(f"{path!r} is not valid DCP metadata: {why}", path=path)
    return meta


def _kind(value: object) -> str:
    return type(value).__name__


def _invalid(meta: Metadata, directory: str) -> str | None:
    """What is wrong with ``meta`` (None: nothing), in the terms DCP's load relies on:
    its items, the file slice of every chunk, its storage_meta."""
    items, storage = meta.state_dict_metadata, meta.storage_data
    if meta.storage_meta is not None and not isinstance(meta.storage_meta, StorageMeta):
        return f"storage_meta is a {_kind(meta.storage_meta)}, not StorageMeta or None"
    if not isinstance(items, dict):
        return f"state_dict_metadata is a {_kind(items)}, not a dict of items"
    if not isinstance(storage, dict):
        return f"storage_data is a {_kind(storage)}, not a dict of file slices"
    for key, info in storage.items():
        if not isinstance(key, MetadataIndex) or not isinstance(info, _StorageInfo):
            return f"records storage of type {_kind(info)} under a {_kind(key)}, not file slices"
        safe_join(directory, info.relative_path)  # no reading outside the checkpoint
        if not all(_count(n) for n in (info.offset, info.length)):
            return f"the file slice of {key.fqn!r} is at {info.offset!r}+{info.length!r}"
    for fqn, item in items.items():
        why = _invalid_item(fqn, item, storage)
        if why is not None:
            return why
    return None


def _invalid_item(fqn: object, item: object, storage: dict[Any, Any]) -> str | None:
    if not isinstance(fqn, str):
        return f"an item is named by a {_kind(fqn)}, not a str"
    if isinstance(item, BytesStorageMetadata):
        return None if MetadataIndex(fqn) in storage else f"item {fqn!r} has no file slice"
    if not isinstance(item, TensorStorageMetadata):
        return f"item {fqn!r} is a {_kind(item)}, not tensor or bytes metadata"
    if not isinstance(item.properties, TensorProperties) or not _counts(item.size):
        return f"tensor {fqn!r} has no size or properties"
    if not isinstance(item.chunks, list):
        return f"the chunks of tensor {fqn!r} are a {_kind(item.chunks)}, not a list"
    for chunk in item.chunks:
        if not (
            isinstance(chunk, ChunkStorageMetadata)
            and _counts(chunk.offsets)
            and _counts(chunk.sizes)
            and len(chunk.offsets) == len(chunk.sizes) == len(item.size)
        ):
            return f"tensor {fqn!r} has a malformed chunk {_short.repr(chunk)}"
        if MetadataIndex(fqn, chunk.offsets) not in storage:
            return f"chunk {list(chunk.offsets)} of tensor {fqn!r} has no file slice"
    return None


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _counts(value: object) -> bool:
    """A shape or an offset: a torch.Size (a tuple), or a list, of counts."""
    return isinstance(value, tuple | list) and all(_count(v) for v in value)


def read_checksums(directory: str) -> dict[str, Any] | None:
    """The checksum sidecar of a checkpoint aiockpt wrote; None for one written by
    ``dcp.save`` (it has none)."""
    path = os.path.join(directory, CHECKSUMS)
    try:
        with opened(open_file(path)) as fd:
            data = read_at_most(fd, METADATA_LIMIT, path)
    except (FileNotFoundError, CheckpointNotFoundError):
        return None
    try:
        sidecar = json.loads(data)
    except RecursionError:
        raise CorruptCheckpointError(
            f"{path!r} is not valid JSON: it is nested too deeply", path=path
        ) from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise CorruptCheckpointError(f"{path!r} is not valid JSON: {exc}", path=path) from exc
    if (
        not isinstance(sidecar, dict)
        or sidecar.get("format") != SIDECAR_FORMAT
        or not isinstance(sidecar.get("files"), list)
        or not isinstance(sidecar.get("metadata"), dict)
    ):
        raise CorruptCheckpointError(f"{path!r} is not an aiockpt checksum file", path=path)
    for record in [sidecar["metadata"], *sidecar["files"]]:
        _check_sidecar_record(record, path)
        safe_join(directory, record["name"])
    world_size = sidecar.get("world_size")
    if not isinstance(world_size, int) or isinstance(world_size, bool):
        raise CorruptCheckpointError(f"{path!r} records no world size", path=path)
    if world_size < 1:
        raise CorruptCheckpointError(f"{path!r} records a world size of {world_size}", path=path)
    if not isinstance(sidecar.get("extra", {}), dict):
        raise CorruptCheckpointError(f'{path!r}: its "extra" is not an object', path=path)
    return sidecar


def _check_sidecar_record(record: Any, path: str) -> None:
    if not (
        isinstance(record, dict)
        and isinstance(record.get("name"), str)
        and _count(record.get("nbytes"))
        and isinstance(record.get("xxh3_64"), str)
    ):
        raise CorruptCheckpointError(
            f"{path!r} holds a malformed file record {_short.repr(record)} (a name, a size "
            "and an xxh3_64 checksum each); the checkpoint cannot be checked",
            path=path,
        )


def read_dcp_metadata(directory: str, require_checksums: bool = False) -> Metadata:
    """The checked, safely unpickled ``.metadata`` of the checkpoint in ``directory``."""
    path = os.path.join(directory, METADATA)
    try:
        with opened(open_file(path)) as fd:
            data = read_at_most(fd, METADATA_LIMIT, path)
    except (FileNotFoundError, CheckpointNotFoundError):
        raise CheckpointNotFoundError(
            f"{directory!r} holds no committed DCP checkpoint (no {METADATA}): its save "
            "failed, was interrupted or is still running"
        ) from None
    sidecar = read_checksums(directory)
    if sidecar is not None:
        check_bytes(path, data, sidecar["metadata"])
    elif require_checksums:
        raise CorruptCheckpointError(
            f"{directory!r} has no {CHECKSUMS}: it was not written by aiockpt, or the file "
            "was removed; pass require_checksums=False to load it unchecked",
            path=os.path.join(directory, CHECKSUMS),
        )
    return unpickle_metadata(data, path)


def check_bytes(path: str, data: bytes, record: dict[str, Any]) -> None:
    """Raise :class:`CorruptCheckpointError` unless ``data`` matches ``record``."""
    if len(data) != record.get("nbytes"):
        raise CorruptCheckpointError(
            f"{path!r} has {len(data)} bytes, its checksums record {record.get('nbytes')}: "
            "the file is truncated or was replaced",
            path=path,
        )
    digest = xxhash.xxh3_64(data).hexdigest()
    if digest != record.get("xxh3_64"):
        raise CorruptCheckpointError(
            f"{path!r} is corrupt: its xxh3-64 checksum is {digest}, its checksums record "
            f"{record.get('xxh3_64')}",
            path=path,
        )
