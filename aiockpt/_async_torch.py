"""``AsyncTorchCheckpoint``: the async twin of ``TorchCheckpoint``."""

from __future__ import annotations

from typing import Any

import anyio
from typing_extensions import Unpack

from ._async_queue import AsyncCheckpointQueue
from ._facade import QueueFacade
from ._futures import CheckpointFuture
from ._options import AsyncQueueFacadeKeywords
from ._request import AsyncRequest
from ._sharded import sharded_request
from ._torch_ckpt import checked_path, save_file_async
from ._tracebacks import areleasing


class AsyncTorchCheckpoint(QueueFacade):
    """``torch.save`` in the background, awaited; the async twin of
    :class:`TorchCheckpoint`::

        async with AsyncTorchCheckpoint() as ckpt:
            fut = await ckpt.save(model.state_dict(), "step100.pt")
            ...
            await fut              # on disk (or raises CheckpointError)

    Options are those of :class:`AsyncCheckpointQueue` (persistent worker by default).
    ``save`` schedules and is awaited; :meth:`TorchCheckpoint.save` (NVRx's) writes
    synchronously.
    """

    def __init__(
        self, persistent: bool = True, **queue_options: Unpack[AsyncQueueFacadeKeywords]
    ) -> None:
        self.queue = AsyncCheckpointQueue(persistent, **queue_options)

    @areleasing
    async def save(
        self, state_dict: Any, path: Any, *, wait_for_staging: bool = True, **torch_save_kwargs: Any
    ) -> CheckpointFuture:
        """Schedule ``torch.save(state_dict, path, **torch_save_kwargs)`` in the worker.

        Args:
            state_dict: what to save; its tensors are staged, other values pickled.
            path: the file to write (atomically: the old file or the new one); its
                directory must exist.
            wait_for_staging: return once the tensors are staged (True, the default), or
                at once with the copy running (False): then ``await fut.staged`` before
                changing them (see :meth:`AsyncCheckpointQueue.schedule`).
            **torch_save_kwargs: ``torch.save``'s keyword arguments.

        Returns:
            The save's future: ``await fut`` returns its :class:`CheckpointResult` once
            the file is durable, or raises its :class:`CheckpointError`.

        Raises:
            InvalidRequestError: the path's directory does not exist (nothing scheduled).
            StagingError: copying a tensor failed (with ``wait_for_staging=True``).
            QueueMisuseError: used outside its ``async with`` block (or from another
                thread).
            QueueClosedError: the checkpoint was closed.
            QueueBrokenError: an earlier failure left the queue unusable.

        Example:
            ```python
            async with AsyncTorchCheckpoint() as ckpt:
                fut = await ckpt.save(model.state_dict(), "step100.pt")
                ...
                result = await fut
            ```
        """
        # Checking the path touches the filesystem: in a thread, never on the loop.
        target = await anyio.to_thread.run_sync(checked_path, path)
        request = AsyncRequest(save_file_async, (state_dict, target), [], torch_save_kwargs)
        return await self.queue.schedule(request, wait_for_staging=wait_for_staging)

    @areleasing
    async def save_sharded(
        self,
        state_dict: Any,
        directory: Any,
        extra: dict[str, Any] | None = None,
        *,
        wait_for_staging: bool = True,
    ) -> CheckpointFuture:
        """Schedule this rank's part of a sharded checkpoint in ``directory`` (on every
        rank). The future resolves once every rank's file is durable and rank 0 has
        written ``metadata.json``; if any rank failed, no metadata is written."""
        request = await anyio.to_thread.run_sync(
            sharded_request, state_dict, directory, extra, self.queue.completion
        )
        return await self.queue.schedule(
            request, wait_for_staging=wait_for_staging, needs_global=True
        )
