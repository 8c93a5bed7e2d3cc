"""The asyncio-native facade: awaitable per-request futures and an event-loop poller.

Runs on any anyio backend (asyncio, uvloop, trio). Two tasks per queue drive the same
engine as the blocking queue: the *stager* copies each request's tensors in a worker
thread, in scheduling order, and the *poller* settles requests oldest first in a worker
thread (waiting on the worker's pipe, plus the distributed reduction), then resolves their
futures on the loop. Nothing blocking ever runs on the event loop; idle, both tasks sleep
on an event.
"""

from __future__ import annotations

import math
import threading
import time
from datetime import timedelta
from types import TracebackType
from typing import Any

import anyio
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from typing_extensions import Self

from ._dist import DEFAULT_TIMEOUT, is_distributed
from ._engine import CallsEngine
from ._exceptions import CheckpointError, InvalidRequestError, QueueClosedError, StagingError
from ._futures import CheckpointFuture, CheckpointResult
from ._request import AsyncRequest

_Staging = tuple[AsyncRequest, CheckpointFuture, bool]


class AsyncCheckpointQueue:
    """Schedules :class:`AsyncRequest` objects and resolves a future for each.

    Use it as an async context manager::

        async with AsyncCheckpointQueue() as queue:
            fut = await queue.schedule(request)   # returns once the tensors are staged
            ...
            result = await fut                     # finalized (on every rank)

    Takes the options of :class:`AsyncCallsQueue`, plus ``no_dist``: settle each request
    locally even inside a torch.distributed job, and ``single_threaded_staging`` (default
    True): copy host tensors on one core, leaving the others to the event loop and the
    training step; ``False`` uses torch's intra-op threads, a faster copy that can starve
    the loop on a machine with few cores. Leaving the ``async with`` (or
    ``aclose()``) waits for every request, runs their finalize steps, stops the worker,
    and raises the first failure that no one observed through its future or ``finalize()``.
    """

    def __init__(
        self,
        persistent: bool = True,
        *,
        start_method: str = "spawn",
        max_staging_copies: int = 1,
        pin_memory: bool | None = None,
        process_group: Any = None,
        timeout: timedelta = DEFAULT_TIMEOUT,
        no_dist: bool = False,
        single_threaded_staging: bool = True,
    ) -> None:
        self._options: dict[str, Any] = dict(
            start_method=start_method,
            max_staging_copies=max_staging_copies,
            pin_memory=pin_memory,
            process_group=process_group,
            timeout=timeout,
            single_threaded_staging=single_threaded_staging,
        )
        self.persistent = persistent
        self.no_dist = no_dist
        self._engine: CallsEngine | None = None
        self._state = "new"
        self._thread: int | None = None
        self._next_idx = 0
        self._futures: dict[int, CheckpointFuture] = {}  # scheduled, not resolved
        self._unreported: list[CheckpointFuture] = []  # not yet covered by finalize()
        self._task_group: TaskGroup | None = None
        self._stage_send: MemoryObjectSendStream[_Staging] | None = None
        self._wakeup: anyio.Event | None = None  # created by the poller, on the loop
        self.polls = 0  # settle attempts made by the poller (one per request when healthy)

    @property
    def engine(self) -> CallsEngine:
        if self._engine is None:
            raise QueueClosedError(
                "the queue is not open: use `async with AsyncCheckpointQueue() as queue:`"
            )
        return self._engine

    # -- life cycle ---------------------------------------------------------------------

    async def __aenter__(self) -> AsyncCheckpointQueue:
        if self._state != "new":
            raise QueueClosedError("an AsyncCheckpointQueue can be entered only once")
        self._thread = threading.get_ident()
        # Starting the worker process takes a moment: not on the event loop.
        engine = await anyio.to_thread.run_sync(
            lambda: CallsEngine(self.persistent, **self._options)
        )
        self._engine = engine
        if is_distributed():
            # Creating the completion group is collective: do it here, where every rank
            # enters the queue in program order, not later in the poller's thread.
            try:
                await anyio.to_thread.run_sync(engine.completion.group)
            except BaseException:
                await anyio.to_thread.run_sync(engine.stop_workers)
                self._state = "closed"
                raise
        send, receive = anyio.create_memory_object_stream[_Staging](math.inf)
        self._stage_send = send
        self._task_group = anyio.create_task_group()
        await self._task_group.__aenter__()
        self._task_group.start_soon(self._stager, receive, name="aiockpt-stager")
        self._task_group.start_soon(self._poller, name="aiockpt-poller")
        self._state = "open"
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._close(raise_unobserved=exc is None)

    async def aclose(self) -> None:
        """Wait for every request, finalize it, stop the worker. Idempotent."""
        await self._close(raise_unobserved=True)

    async def _close(self, raise_unobserved: bool) -> None:
        if self._state in ("closing", "closed"):
            return
        if self._state == "new":
            self._state = "closed"
            return
        self._check_thread()
        self._state = "closing"
        try:
            # Shielded: a cancelled caller must not lose checkpoints that are in flight.
            with anyio.CancelScope(shield=True):
                for fut in list(self._futures.values()):
                    await fut._done.wait()
        finally:
            assert self._task_group is not None and self._stage_send is not None
            self._stage_send.close()
            self._task_group.cancel_scope.cancel()
            await self._task_group.__aexit__(None, None, None)
            await anyio.to_thread.run_sync(self.engine.stop_workers)
            self._state = "closed"
        if raise_unobserved:
            for fut in self._unreported:
                if fut._error is not None and not fut._observed:
                    fut._observed = True
                    raise fut._error

    def _check_thread(self) -> None:
        if self._thread is not None and threading.get_ident() != self._thread:
            raise QueueClosedError(
                "this AsyncCheckpointQueue belongs to the event loop of another thread; "
                "schedule and await its checkpoints from that loop"
            )

    def _check_open(self) -> None:
        self._check_thread()
        if self._state != "open":
            raise QueueClosedError(
                "the queue is closed"
                if self._state != "new"
                else "the queue is not open: use `async with AsyncCheckpointQueue() as queue:`"
            )

    # -- scheduling ---------------------------------------------------------------------

    async def schedule(
        self, request: AsyncRequest, *, wait_for_staging: bool = True, needs_global: bool = False
    ) -> CheckpointFuture:
        """Schedule ``request``; return its future.

        With ``wait_for_staging=True`` (the default) this returns once every tensor of the
        request is copied to host buffers, and raises at once if staging failed. With
        ``False`` it returns immediately and stages in the background, in scheduling order;
        ``await fut.staged`` before modifying the tensors (e.g. before ``optimizer.step()``).
        ``needs_global=True`` settles it across all ranks even if the queue has ``no_dist``.
        """
        self._check_open()
        if not isinstance(request, AsyncRequest):
            raise InvalidRequestError(f"expected an AsyncRequest, got {type(request).__name__}")
        request.validate()
        fut = CheckpointFuture(self._next_idx)
        self._next_idx += 1
        self._futures[fut.call_idx] = fut
        self._unreported.append(fut)
        assert self._stage_send is not None
        self._stage_send.send_nowait((request, fut, needs_global))
        if wait_for_staging:
            try:
                await fut.staged
            except CheckpointError:
                fut._observed = True
                raise
        return fut

    async def finalize(self) -> list[CheckpointResult]:
        """Wait until every request scheduled so far is finalized; return their results in
        scheduling order. If any failed, raise the first failure once all have settled."""
        self._check_open()
        batch, self._unreported = self._unreported, []
        for fut in batch:
            await fut._done.wait()
        failed = [fut for fut in batch if fut._error is not None]
        for fut in failed:
            fut._observed = True
        if failed:
            raise failed[0]._error  # type: ignore[misc]
        return [fut.result() for fut in batch]

    def pending(self) -> int:
        """How many scheduled requests are not resolved yet."""
        return len(self._futures)

    # The blocking API belongs to AsyncCallsQueue; mixing the two would race the poller.
    def schedule_async_request(self, *args: object, **kwargs: object) -> int:
        """Not available here: raises :class:`QueueClosedError` (use ``await schedule``)."""
        raise QueueClosedError(
            "AsyncCheckpointQueue is driven by its event-loop poller: use `await "
            "queue.schedule(request)`, or use AsyncCallsQueue for a blocking loop"
        )

    def maybe_finalize_async_calls(self, *args: object, **kwargs: object) -> list[int]:
        """Not available here: raises :class:`QueueClosedError` (use ``await finalize``)."""
        raise QueueClosedError(
            "AsyncCheckpointQueue finalizes in its event-loop poller: `await "
            "queue.finalize()` or await the request's future; use AsyncCallsQueue for "
            "maybe_finalize_async_calls"
        )

    # -- the two tasks ------------------------------------------------------------------

    async def _stager(self, receive: MemoryObjectReceiveStream[_Staging]) -> None:
        engine = self.engine
        async with receive:
            async for request, fut, needs_global in receive:
                try:
                    await anyio.to_thread.run_sync(
                        engine.schedule, request, fut.call_idx, needs_global
                    )
                except CheckpointError as err:
                    self._resolve(fut, None, err)
                    continue
                except Exception as exc:  # defensive: never leave a future hanging
                    wrapped = StagingError(
                        f"staging call {fut.call_idx} failed: {type(exc).__name__}: {exc}",
                        call_idx=fut.call_idx,
                    )
                    wrapped.__cause__ = exc
                    self._resolve(fut, None, wrapped)
                    continue
                fut._set_staged()
                self._wake()

    def _wake(self) -> None:
        if self._wakeup is not None:
            self._wakeup.set()

    async def _poller(self) -> None:
        engine = self.engine
        while True:
            if not engine.active:
                self._wakeup = anyio.Event()
                await self._wakeup.wait()
                continue
            self.polls += 1
            # Blocks in a worker thread: waits for this rank's worker, then (distributed)
            # one reduction that every rank issues for this same request.
            settled = await anyio.to_thread.run_sync(engine.settle_front, True, self.no_dist)
            if settled is None:
                continue
            call = settled.call
            fut = self._futures.get(call.call_idx)
            if fut is None:  # resolved already: its scheduling failed
                continue
            if settled.error is not None:
                self._resolve(fut, None, settled.error)
                continue
            start = time.perf_counter()
            try:
                await anyio.to_thread.run_sync(engine.finalize, settled)
            except CheckpointError as err:
                self._resolve(fut, None, err)
                continue
            outcome = call.outcome
            result = CheckpointResult(
                call_idx=call.call_idx,
                staged_bytes=call.staged_bytes,
                stage_seconds=call.stage_seconds,
                run_seconds=outcome.run_seconds if outcome is not None else 0.0,
                finalize_seconds=time.perf_counter() - start,
                value=outcome.result if outcome is not None else None,
            )
            self._resolve(fut, result, None)

    def _resolve(
        self, fut: CheckpointFuture, result: CheckpointResult | None, error: CheckpointError | None
    ) -> None:
        self._futures.pop(fut.call_idx, None)
        fut._resolve(result, error)


class QueueFacade:
    """Base of the async helpers built on one :class:`AsyncCheckpointQueue` (``queue``):
    entering, leaving, ``finalize`` and ``aclose`` are the queue's."""

    queue: AsyncCheckpointQueue

    async def __aenter__(self) -> Self:
        await self.queue.__aenter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.queue.__aexit__(exc_type, exc, tb)

    async def finalize(self) -> list[CheckpointResult]:
        """Wait for every checkpoint scheduled so far; raise the first failure."""
        return await self.queue.finalize()

    async def aclose(self) -> None:
        """Wait for every checkpoint, then stop the worker. Idempotent."""
        await self.queue.aclose()
