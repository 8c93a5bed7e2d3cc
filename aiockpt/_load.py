"""Loading checkpoints back: checked against their metadata, ``weights_only`` by default,
blocking (``load_sync``) or without blocking the event loop (``await load``)."""

from __future__ import annotations

import asyncio
import io
import os
import pickle
from typing import Any

import aiofiles
import anyio
import torch

from ._dist import get_rank, get_world_size
from ._exceptions import CorruptCheckpointError, InvalidRequestError, UnsafeCheckpointError
from ._storage import LocalStorage, Storage, check_bytes, safe_join


def _on_asyncio() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def resolve(path: Any, rank: int | None, storage: Storage) -> tuple[str, dict[str, Any] | None]:
    """The file to read for ``path`` (a file, or a checkpoint directory and a rank), and
    the metadata record to check it against (None for a plain file)."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        return path, None
    files = storage.read_metadata(path)["files"]
    if rank is None:
        if len(files) == get_world_size():
            rank = get_rank()
        elif len(files) == 1:
            rank = 0
        else:
            raise InvalidRequestError(
                f"{path!r} has {len(files)} shards and this job {get_world_size()} rank(s): "
                "pass rank= to choose the shard to load"
            )
    if not 0 <= rank < len(files):
        raise InvalidRequestError(f"{path!r} has no shard for rank {rank} ({len(files)} shards)")
    record = files[rank]
    return safe_join(path, record["name"]), record


def decode(
    path: str,
    data: bytes,
    record: dict[str, Any] | None,
    *,
    verify: bool,
    weights_only: bool,
    map_location: Any,
) -> Any:
    """Check ``data`` against ``record`` (if any), then unpickle it with ``torch.load``."""
    if record is not None and verify:
        check_bytes(path, data, record)
    try:
        return torch.load(io.BytesIO(data), weights_only=weights_only, map_location=map_location)
    except pickle.UnpicklingError as exc:
        if weights_only:
            raise UnsafeCheckpointError(
                f"{path!r} holds pickled objects that weights_only=True refuses to load "
                f"({str(exc).splitlines()[0]}); pass weights_only=False only if you trust "
                "the file",
            ) from exc
        raise CorruptCheckpointError(f"{path!r} cannot be unpickled: {exc}", path=path) from exc
    except (RuntimeError, EOFError, ValueError) as exc:
        raise CorruptCheckpointError(
            f"{path!r} is not a readable checkpoint: {exc}", path=path
        ) from exc


def load_sync(
    path: Any,
    *,
    rank: int | None = None,
    verify: bool = True,
    weights_only: bool = True,
    map_location: Any = "cpu",
    storage: Storage | None = None,
) -> Any:
    """Load a checkpoint file, or this rank's shard of a checkpoint directory.

    A directory must be committed (have its metadata); the shard is checked against the
    recorded size and checksum before it is unpickled (``verify=False`` skips that).
    ``weights_only=True`` refuses files holding arbitrary pickled objects.
    Raises :class:`CheckpointNotFoundError`, :class:`CorruptCheckpointError` (naming the
    file) or :class:`UnsafeCheckpointError`.
    """
    storage = storage if storage is not None else LocalStorage()
    file, record = resolve(path, rank, storage)
    data = storage.read_bytes(file)
    return decode(
        file, data, record, verify=verify, weights_only=weights_only, map_location=map_location
    )


async def load(
    path: Any,
    *,
    rank: int | None = None,
    verify: bool = True,
    weights_only: bool = True,
    map_location: Any = "cpu",
    storage: Storage | None = None,
) -> Any:
    """``load_sync`` without blocking the event loop: the file is read with aiofiles (on
    asyncio; anyio's file API elsewhere) and checked and unpickled in a worker thread."""
    storage = storage if storage is not None else LocalStorage()
    file, record = await anyio.to_thread.run_sync(resolve, path, rank, storage)
    plain = type(storage) is LocalStorage  # a subclass may read differently: ask it
    if plain and _on_asyncio():
        async with aiofiles.open(file, "rb") as f:
            data = await f.read()
    elif plain:  # trio: anyio's threaded file API
        async with await anyio.open_file(file, "rb") as af:
            data = await af.read()
    else:
        data = await anyio.to_thread.run_sync(storage.read_bytes, file)
    return await anyio.to_thread.run_sync(
        lambda: decode(
            file, data, record, verify=verify, weights_only=weights_only, map_location=map_location
        )
    )
