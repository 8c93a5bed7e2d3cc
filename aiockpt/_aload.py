"""Loading from async code: :func:`aload` runs the blocking :func:`load` in a worker thread
(any anyio backend), and :func:`load` warns when it is called on a running event loop."""

from __future__ import annotations

import asyncio
import sys
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

import anyio

from .storage import _load
from .storage._protocol import Storage

T = TypeVar("T")


async def in_thread(fn: Callable[[], T]) -> T:
    """Run ``fn`` in a worker thread of its own: never a token of anyio's default limiter,
    which the checkpoint queue's tasks use."""
    return await anyio.to_thread.run_sync(fn, limiter=anyio.CapacityLimiter(1))


def _on_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
        return True
    except RuntimeError:
        pass
    trio = sys.modules.get("trio")
    if trio is None:
        return False
    try:
        trio.lowlevel.current_trio_token()
        return True
    except RuntimeError:
        return False


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
    """Load a checkpoint file, or this rank's shard of a checkpoint directory.

    A directory must be committed (have its metadata); the shard is checked against the
    recorded size and checksum before it is unpickled, a single file against its checksum
    trailer if it has one (``verify=False`` skips both). The file is then memory-mapped
    (``torch.load(mmap=True)``): tensors are read from the page cache as they are used.
    ``weights_only=True`` refuses files holding arbitrary pickled objects.

    Called on a running event loop it warns (``DeprecationWarning``: it blocks the loop;
    ``await aiockpt.aload(...)`` does not) and loads all the same.

    Raises :class:`CheckpointNotFoundError` (no such path, never committed, missing shard),
    :class:`CorruptCheckpointError` (damaged bytes or metadata, naming the file),
    :class:`UntrustedEntryError` (a link, FIFO or device inside the checkpoint),
    :class:`UnsafeCheckpointError`, or :class:`InvalidRequestError` (a bad ``rank``).

    Args:
        path: a file, or a committed checkpoint directory (a manager's step directory, a
            sharded checkpoint).
        rank: which shard of a directory to load (default: this process's rank, or 0
            outside a distributed job).
        verify: check sizes and checksums before unpickling.
        weights_only: unpickle only tensors and plain containers (``torch.load``'s).
        map_location: ``torch.load``'s.
        storage: the :class:`Storage` the checkpoint lives in (default: local files, or
            an :class:`~aiockpt.storage.ObjectStorage` for a URL such as
            ``s3://bucket/run/step-000000001000``).
        storage_options: for a URL, the object store's options (endpoint, credentials...;
            see :class:`~aiockpt.storage.ObjectStorage`); the environment's otherwise.

    Returns:
        The loaded object, as ``torch.load`` returns it.

    Example:
        ```python
        state = aiockpt.load("ckpts/step-000000001000")
        model.load_state_dict(state["model"])
        ```
    """
    if _on_event_loop():
        warnings.warn(
            "aiockpt.load blocks until the checkpoint is read, like torch.load (it was "
            "awaitable before this release): in async code use `await aiockpt.aload(...)`, "
            "which keeps the event loop running",
            DeprecationWarning,
            stacklevel=2,
        )
    return _load.load(
        path,
        rank=rank,
        verify=verify,
        weights_only=weights_only,
        map_location=map_location,
        storage=storage,
        storage_options=storage_options,
    )


async def aload(
    path: Any,
    *,
    rank: int | None = None,
    verify: bool = True,
    weights_only: bool = True,
    map_location: Any = "cpu",
    storage: Storage | None = None,
    storage_options: dict[str, Any] | None = None,
) -> Any:
    """:func:`aiockpt.load` in a worker thread, so the event loop keeps running (asyncio,
    uvloop or trio); the same code path, the same arguments, and it raises what
    :func:`aiockpt.load` raises.

    Example:
        ```python
        state = await aiockpt.aload("ckpts/step-000000001000")
        ```
    """
    return await in_thread(
        lambda: _load.load(
            path,
            rank=rank,
            verify=verify,
            weights_only=weights_only,
            map_location=map_location,
            storage=storage,
            storage_options=storage_options,
        )
    )


def load_sync(path: Any, **options: Any) -> Any:
    """Deprecated: the name :func:`aiockpt.load` has now (it blocks, like ``torch.load``);
    ``aiockpt.load_sync`` warns when it is looked up."""
    return _load.load(path, **options)
