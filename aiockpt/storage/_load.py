"""Loading checkpoints back: checked before anything is unpickled, ``weights_only`` by
default, memory-mapped so that a load costs about the tensors and no copy of the file.

:func:`load` blocks, like ``torch.load``; ``aiockpt.aload`` runs the same function in a
worker thread for async code.
"""

from __future__ import annotations

import io
import numbers
import os
import pickle
import struct
import zipfile
from typing import Any

import torch
import xxhash

from .._exceptions import (
    CorruptCheckpointError,
    InvalidRequestError,
    UnsafeCheckpointError,
)
from .._ranks import get_rank, get_world_size
from ._checksum import read_trailer
from ._files import hash_prefix, local_path, open_dir, open_file, opened
from ._local import check_record, open_record
from ._metadata import read_metadata, safe_join
from ._object import ObjectStorage, object_storage
from ._protocol import Storage
from ._urls import is_url

# torch.save with _use_new_zipfile_serialization=False: a pickle (protocol 2) of its magic
# number 0x1950a86a20f9469cfc6c.
_LEGACY_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"
_ZIP_MAGIC = b"PK\x03\x04"
_UNREADABLE = (
    RuntimeError,
    EOFError,
    ValueError,
    IndexError,
    KeyError,
    TypeError,
    OverflowError,
    struct.error,
    zipfile.BadZipFile,
    OSError,  # torch maps a damaged archive and fails (EINVAL) reading it
)


def choose_rank(path: str, world_size: int, rank: Any) -> int:
    """The shard to load: ``rank`` if given, else this process's rank when the checkpoint
    has one shard per rank of this job, else the only shard."""
    if rank is None:
        if world_size == get_world_size():
            return get_rank()
        if world_size == 1:
            return 0
        raise InvalidRequestError(
            f"{path!r} has {world_size} shards and this job {get_world_size()} rank(s): "
            "pass rank= to choose the shard to load"
        )
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral):
        raise InvalidRequestError(f"rank must be an int, not {rank!r}")
    if not 0 <= int(rank) < world_size:
        raise InvalidRequestError(f"{path!r} has no shard for rank {rank} ({world_size} shards)")
    return int(rank)


def _unpickle(path: str, source: Any, weights_only: bool, map_location: Any) -> Any:
    mmap = isinstance(source, str)  # a file is mapped; bytes from another backend are not
    try:
        return torch.load(source, weights_only=weights_only, map_location=map_location, mmap=mmap)
    except pickle.UnpicklingError as exc:
        # torch's message suggests weights_only=False whatever the cause: keep its reason.
        text = str(exc)
        _, found, rest = text.partition("WeightsUnpickler error:")
        reason = " ".join(rest.split("Check the documentation")[0].split())
        reason = reason if found and reason else " ".join(text.split())[:300]
        if weights_only and "Unsupported global" in reason:
            raise UnsafeCheckpointError(
                f"{path!r} holds pickled objects that weights_only=True refuses to load "
                f"({reason}); pass weights_only=False only if you trust the file",
            ) from exc
        raise CorruptCheckpointError(
            f"{path!r} cannot be unpickled: it is damaged ({reason})", path=path
        ) from exc
    except _UNREADABLE as exc:
        raise CorruptCheckpointError(
            f"{path!r} is not a readable checkpoint: {exc}", path=path
        ) from exc


def _load_fd(fd: int, path: str, record: dict[str, Any] | None, verify: bool, **opts: Any) -> Any:
    """Check the open file (against ``record``, else its own trailer), then map it."""
    size = os.fstat(fd).st_size
    if verify and record is not None:
        check_record(fd, path, record)
    elif verify:
        found = read_trailer(fd, size, path)
        if found is not None and hash_prefix(fd, found[0], path) != found[1]:
            raise CorruptCheckpointError(
                f"{path!r} is corrupt: its xxh3-64 checksum does not match its trailer",
                path=path,
            )
    head = os.pread(fd, 16, 0)
    if head[:4] != _ZIP_MAGIC:
        if head.startswith(_LEGACY_MAGIC):
            raise CorruptCheckpointError(
                f"{path!r} is a torch.save file in the legacy (non-zip) format, which "
                "aiockpt does not read: load it with torch.load, or save it again with "
                "torch.save's default format",
                path=path,
            )
        raise CorruptCheckpointError(
            f"{path!r} is not a torch.save file (no zip header): it is damaged, or not a "
            "checkpoint",
            path=path,
        )
    # Through the descriptor, not the name: torch maps exactly the file that was checked.
    return _unpickle(path, f"/proc/self/fd/{fd}", **opts)


def _load_local(path: str, rank: Any, verify: bool, nofollow: bool, **opts: Any) -> Any:
    if not nofollow and not os.path.isdir(path):  # a file (the caller's path: links resolve)
        with opened(open_file(path, follow=True)) as fd:
            return _load_fd(fd, path, None, verify, **opts)
    if nofollow:
        parent, name = os.path.split(os.path.abspath(path))
        with opened(open_dir(parent)) as pfd:
            dfd = open_dir(path, dir_fd=pfd, name=name)
    else:
        dfd = open_dir(path)
    with opened(dfd):
        meta = read_metadata(path, dir_fd=dfd)
        record = meta["files"][choose_rank(path, meta["world_size"], rank)]
        file, fd = open_record(path, dfd, record)
    with opened(fd):
        return _load_fd(fd, file, record, verify, **opts)


def load(
    path: Any,
    *,
    rank: int | None = None,
    verify: bool = True,
    weights_only: bool = True,
    map_location: Any = "cpu",
    storage: Storage | None = None,
    storage_options: dict[str, Any] | None = None,
) -> Any:
    """Load a checkpoint file, or this rank's shard of a checkpoint directory, checked
    first; the public :func:`aiockpt.load` documents the arguments and errors."""
    path = os.fspath(path)
    if storage is None and is_url(path):
        storage = object_storage(path, storage_options)
        path = path.rstrip("/")
    return load_path(
        path,
        rank,
        verify,
        storage,
        nofollow=False,
        weights_only=weights_only,
        map_location=map_location,
    )


def load_path(
    path: str,
    rank: Any = None,
    verify: bool = True,
    storage: Storage | None = None,
    *,
    nofollow: bool,
    weights_only: bool = True,
    map_location: Any = "cpu",
) -> Any:
    """``load``; ``nofollow=True`` also refuses a link as ``path`` itself (for a step
    directory found by listing a directory that others may write to)."""
    opts = {"weights_only": weights_only, "map_location": map_location}
    if storage is None or storage.is_local:
        local_path(path)
        return _load_local(path, rank, verify, nofollow, **opts)
    # Another backend: its bytes, checked against the metadata, unpickled from memory.
    meta = storage.read_metadata(path)
    record = meta["files"][choose_rank(path, meta["world_size"], rank)]
    file = safe_join(path, record["name"])
    if isinstance(storage, ObjectStorage):  # refuses more bytes than recorded, unread
        data = storage.read_bytes(file, record["nbytes"])
    else:
        data = storage.read_bytes(file)
    if verify and (
        len(data) != record["nbytes"] or xxhash.xxh3_64_hexdigest(data) != record["xxh3_64"]
    ):
        raise CorruptCheckpointError(
            f"{file!r} does not match the size and checksum its metadata records", path=file
        )
    return _unpickle(file, io.BytesIO(data), **opts)
