"""Reading DCP checkpoints safely: ``.metadata`` is checked against its checksum and
unpickled with an unpickler that builds only DCP's metadata classes; data files are checked
before their bytes are used; object items are loaded with ``weights_only=True``."""

from __future__ import annotations

import copy
import io
import json
import os
import pickle
import warnings
from typing import Any

import torch
import torch.distributed as dist
import xxhash
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import FileSystemReader, _StorageInfo
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner, ReadItem
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load
from torch.futures import Future

from .._exceptions import (
    CheckpointError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    InvalidRequestError,
    UnsafeCheckpointError,
)
from ..storage._files import open_file, opened, read_at_most
from ..storage._local import check_record
from ..storage._metadata import safe_join
from ._commit import CHECKSUMS, METADATA, SIDECAR_FORMAT

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


class MetadataUnpickler(pickle.Unpickler):
    """Builds DCP metadata and nothing else."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED or (module == "torch" and name in _TORCH_VALUES):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not a DCP metadata class")


def unpickle_metadata(data: bytes, path: str) -> Metadata:
    """``.metadata``'s object, refusing any pickle that names another global."""
    try:
        meta = MetadataUnpickler(io.BytesIO(data)).load()
    except pickle.UnpicklingError as exc:
        raise UnsafeCheckpointError(
            f"refusing to load {path!r}: {exc}. A DCP .metadata holds only DCP's metadata "
            "classes; this one would run other code when unpickled. Do not load this "
            "checkpoint with torch.distributed.checkpoint.load either"
        ) from exc
    except Exception as exc:
        raise CorruptCheckpointError(
            f"{path!r} is not a readable DCP metadata pickle: {type(exc).__name__}: {exc}",
            path=path,
        ) from exc
    if not isinstance(meta, Metadata):
        raise CorruptCheckpointError(
            f"{path!r} holds a {type(meta).__name__}, not DCP Metadata", path=path
        )
    directory = os.path.dirname(path)
    storage = meta.storage_data if isinstance(meta.storage_data, dict) else None
    if storage is None:
        raise CorruptCheckpointError(f"{path!r} records no storage for its items", path=path)
    for info in storage.values():
        if not isinstance(info, _StorageInfo):
            raise CorruptCheckpointError(
                f"{path!r} records storage of type {type(info).__name__}, not file slices",
                path=path,
            )
        safe_join(directory, info.relative_path)  # no reading outside the checkpoint
    return meta


def read_checksums(directory: str) -> dict[str, Any] | None:
    """The checksum sidecar of a checkpoint aiockpt wrote; None for one written by
    ``dcp.save`` (it has none)."""
    path = os.path.join(directory, CHECKSUMS)
    try:
        with opened(open_file(path)) as fd:
            sidecar = json.loads(read_at_most(fd, METADATA_LIMIT, path))
    except (FileNotFoundError, CheckpointNotFoundError):
        return None
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
    if not isinstance(sidecar.get("world_size"), int) or isinstance(sidecar["world_size"], bool):
        raise CorruptCheckpointError(f"{path!r} records no world size", path=path)
    return sidecar


def _check_sidecar_record(record: Any, path: str) -> None:
    if not (
        isinstance(record, dict)
        and isinstance(record.get("name"), str)
        and isinstance(record.get("nbytes"), int)
        and not isinstance(record["nbytes"], bool)
        and record["nbytes"] >= 0
        and isinstance(record.get("xxh3_64"), str)
    ):
        raise CorruptCheckpointError(
            f"{path!r} holds a malformed file record {str(record)[:100]!r} (a name, a size "
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


# .metadata is small; anything much larger was not written by DCP.
METADATA_LIMIT = 256 * 2**20


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


def _check_file(path: str, record: dict[str, Any]) -> None:
    """Check a data file against its record: a regular file (never followed through a
    link), read in chunks, no more than its recorded size."""
    try:
        with opened(open_file(path)) as fd:
            check_record(fd, path, record)
    except (FileNotFoundError, CheckpointNotFoundError):
        raise CorruptCheckpointError(f"{path!r} is missing", path=path) from None


def verify_dcp(directory: str) -> list[str]:
    """Check ``.metadata`` and every data file of the DCP checkpoint in ``directory``
    against the checksum sidecar; returns the paths checked."""
    read_dcp_metadata(directory, require_checksums=True)
    sidecar = read_checksums(directory)
    assert sidecar is not None
    checked = [os.path.join(directory, METADATA)]
    for record in sidecar["files"]:
        path = safe_join(directory, record["name"])
        _check_file(path, record)
        checked.append(path)
    return checked


class CheckedFileSystemReader(FileSystemReader):
    """DCP's file reader with the metadata read safely and each data file checked against
    the sidecar (when there is one) before any of its bytes is used."""

    def __init__(self, path: str, require_checksums: bool = False) -> None:
        super().__init__(path)
        self.directory = path
        self.require_checksums = require_checksums
        self.records: dict[str, dict[str, Any]] | None = None

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if kwargs.get("rank") is not None:  # only global metadata: aiockpt writes that
            raise CheckpointNotFoundError(f"{self.directory!r} has no rank-local metadata")
        meta = read_dcp_metadata(self.directory, self.require_checksums)
        sidecar = read_checksums(self.directory)
        self.records = {r["name"]: r for r in sidecar["files"]} if sidecar is not None else None
        if meta.storage_meta is None:
            meta.storage_meta = StorageMeta()
        meta.storage_meta.load_id = self.load_id
        return meta

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        if self.records is not None:
            names = {self.storage_data[item.storage_index].relative_path for item in plan.items}
            for name in sorted(names):
                path = safe_join(self.directory, name)
                record = self.records.get(name)
                if record is None:
                    raise CorruptCheckpointError(
                        f"{path!r} is read by .metadata but has no checksum in {CHECKSUMS}",
                        path=path,
                    )
                _check_file(path, record)
        return super().read_data(plan, planner)


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner, loading non-tensor items with ``weights_only=True``."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as exc:
            raise UnsafeCheckpointError(
                f"refusing to unpickle item {read_item.dest_index.fqn!r}: {exc}"
            ) from exc
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def _typed_failure(exc: CheckpointException, directory: str) -> CheckpointError:
    """DCP's ``CheckpointException`` (a ``BaseException``) as a CheckpointError: a typed
    one raised on some rank as is; otherwise what failed where, as ``InvalidRequestError``
    (the state dict does not fit the checkpoint) or ``CorruptCheckpointError`` (reading)."""
    inners = []
    for rank, failure in sorted(exc.failures.items()):
        inner = failure[0] if isinstance(failure, tuple) else failure
        if isinstance(inner, CheckpointError):
            err = copy.copy(inner)  # CheckpointError copies (and pickles) with its fields
            err.message = f"rank {rank}: {inner.message} (loading {directory!r})"
            err.args = (err.message,)
            err.rank = rank
            return err
        inners.append((rank, inner))
    if not inners:
        return CorruptCheckpointError(f"loading {directory!r} failed: {exc}", path=directory)
    rank, inner = inners[0]
    what = f"loading {directory!r} failed on rank {rank}: {type(inner).__name__}: {inner}"
    if isinstance(inner, OSError):
        return CorruptCheckpointError(f"{what}; the checkpoint cannot be read", path=directory)
    return InvalidRequestError(
        f"{what}; the state dict to load into must have the checkpoint's keys, shapes and "
        "dtypes (load a subset with a planner that allows partial loads)",
        rank=rank,
    )


def load(
    state_dict: dict[str, Any],
    checkpoint_id: str | os.PathLike[str],
    *,
    planner: LoadPlanner | None = None,
    process_group: Any = None,
    require_checksums: bool = False,
) -> None:
    """Load a DCP checkpoint into ``state_dict`` in place, like ``dcp.load``, at any world
    size: each rank reads the chunks its tensors (DTensor shards, plain tensors) need.

    Unlike ``dcp.load``, ``.metadata`` is checked against its recorded xxh3 checksum and
    unpickled with an allow-list of DCP's metadata classes, each data file is checked
    before use, and objects are loaded with ``weights_only=True``. Checkpoints written by
    ``dcp.save`` have no checksums: they load unchecked unless ``require_checksums``.
    Collective over ``process_group`` (default: every rank). Raises
    :class:`UnsafeCheckpointError`, :class:`CorruptCheckpointError` or
    :class:`CheckpointNotFoundError`.
    """
    directory = os.fspath(checkpoint_id)
    reader = CheckedFileSystemReader(directory, require_checksums)
    reader.read_metadata()  # typed errors here, on this rank, before any collective
    no_dist = not (dist.is_available() and dist.is_initialized())
    try:
        with warnings.catch_warnings():
            if no_dist:  # one process is what the caller has: DCP's warning says nothing
                warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
            dcp_load(
                state_dict,
                storage_reader=reader,
                planner=planner if planner is not None else SafeLoadPlanner(),
                process_group=process_group,
                no_dist=no_dist,
            )
    except CheckpointException as exc:
        raise _typed_failure(exc, directory) from exc
