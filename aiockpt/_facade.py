"""The base of the async facades built on one :class:`AsyncCheckpointQueue`: entering,
leaving, serving, ``finalize`` and ``aclose`` are the queue's."""

from __future__ import annotations

from types import TracebackType
from typing import Generic, TypeVar

import anyio
from anyio.abc import TaskStatus
from typing_extensions import Self

from ._async_queue import AsyncCheckpointQueue
from ._futures import CheckpointResult

_T = TypeVar("_T")


class _Reporting(Generic[_T]):
    """A task status that reports ``value`` (the facade) when the queue has started."""

    def __init__(self, status: TaskStatus[_T], value: _T) -> None:
        self._status, self._value = status, value

    def started(self, value: object = None) -> None:
        self._status.started(self._value)


class QueueFacade:
    """Base of the async helpers built on one :class:`AsyncCheckpointQueue` (``queue``):
    entering, leaving, serving, ``finalize`` and ``aclose`` are the queue's."""

    queue: AsyncCheckpointQueue

    async def __aenter__(self) -> Self:
        await self._acquire()
        try:
            await self.queue.__aenter__()
        except BaseException:
            await self._release()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            await self.queue.__aexit__(exc_type, exc, tb)
        finally:
            await self._release()

    async def serve(self, *, task_status: TaskStatus[Self] = anyio.TASK_STATUS_IGNORED) -> None:
        """Run this as a service in a task group the caller owns, as
        :meth:`AsyncCheckpointQueue.serve` runs the queue::

            async with anyio.create_task_group() as tg:
                ckpt = await tg.start(AsyncTorchCheckpoint().serve)
                ...                      # any task of this event loop may use it
                await ckpt.aclose()      # from any task: drains, then serve() returns
        """
        await self._acquire()
        try:
            await self.queue.serve(task_status=_Reporting(task_status, self))
        finally:
            await self._release()

    async def _acquire(self) -> None:
        """What the facade takes before its queue opens (a manager: its directory)."""

    async def _release(self) -> None:
        """What the facade gives back once its queue has closed."""

    async def finalize(self) -> list[CheckpointResult]:
        """Wait for every checkpoint scheduled so far; raise the failures nobody observed."""
        return await self.queue.finalize()

    async def aclose(self) -> None:
        """Wait for every checkpoint, then stop the worker (and give back what the facade
        took: a manager's directory). Idempotent."""
        try:
            await self.queue.aclose()
        finally:
            await self._release()
