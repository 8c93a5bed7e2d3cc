"""``DCPCheckpoint`` and ``AsyncDCPCheckpoint``: DCP-format saves through the engine,
behind the blocking queue and the async queue."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import Any

import anyio
from typing_extensions import Unpack

from .._async_queue import AsyncCheckpointQueue
from .._dist import CompletionGroup
from .._exceptions import CheckpointError, InvalidRequestError
from .._facade import QueueFacade
from .._futures import CheckpointFuture
from .._options import AsyncDCPQueueKeywords, DCPQueueKeywords
from .._queue import CheckpointQueue
from .._request import AsyncRequest
from .._tracebacks import areleasing, releasing
from ._commit import checked_directory, request_for_plan
from ._plan import SavePlanCache, plan_save


class _DCPOptions:
    """What both facades share: the planner, the planning group, the plan cache, and the
    directories being written."""

    def _set_options(
        self, planner: Any, process_group: Any, thread_count: int, cache_plans: bool
    ) -> None:
        self.planner = planner
        self.process_group = process_group
        self.thread_count = thread_count
        self.plan_cache: SavePlanCache | None = SavePlanCache() if cache_plans else None
        self._writing: dict[str, Any] = {}  # directory -> its save's call index or future

    def _claim(self, checkpoint_id: Any, busy: Callable[[Any], bool]) -> tuple[str, str]:
        """The directory of a new save and its real path, refused while an earlier save
        still writes there: both would write files of the same names, and the first
        commit would describe the second's files. Touches the filesystem."""
        directory = checked_directory(checkpoint_id)
        real = os.path.realpath(directory)
        self._writing = {k: v for k, v in self._writing.items() if busy(v)}
        if real in self._writing:
            raise InvalidRequestError(
                f"a save into {directory!r} is still in flight; finalize it before saving "
                "there again, or save into another directory"
            )
        return directory, real

    def _request(
        self,
        state_dict: dict[str, Any],
        checkpoint_id: Any,
        planner: Any,
        extra: dict[str, Any] | None,
        busy: Callable[[Any], bool],
        completion: CompletionGroup,
    ) -> tuple[AsyncRequest, str]:
        """Claim the directory, plan (collective) and build the request; blocking."""
        directory, real = self._claim(checkpoint_id, busy)
        planned = plan_save(
            state_dict,
            planner if planner is not None else self.planner,
            self.plan_cache,
            self.process_group,
            self.thread_count,
        )
        return request_for_plan(planned, directory, completion, self.thread_count, extra), real


class DCPCheckpoint(_DCPOptions):
    """``torch.distributed.checkpoint.save`` that returns once the tensors are staged; the
    blocking twin of :class:`AsyncDCPCheckpoint`::

        ckpt = DCPCheckpoint()
        ckpt.async_save(state_dict, "ckpt/step100")   # on every rank
        ...
        ckpt.finalize_async_save(blocking=False)        # each step, on every rank
        ckpt.finalize_async_save(blocking=True, terminate=True)

    The checkpoint is DCP's format (``__{rank}_{i}.distcp`` files and ``.metadata``), so
    ``dcp.load`` reads it at any world size. Planning is collective over
    ``process_group`` (default: every rank) with ``planner`` (default
    ``DefaultSavePlanner``); with ``cache_plans`` a save whose state dict has the
    structure of the previous one reuses its plan and runs no collective. Every rank's
    worker writes ``thread_count`` files at a time; rank 0 writes ``.metadata`` once every
    rank's files are durable, in ``finalize_async_save``. ``persistent`` (or NVRx's
    ``persistent_queue``) and the other options are those of :class:`CheckpointQueue`.
    """

    def __init__(
        self,
        persistent: bool = True,
        *,
        persistent_queue: bool | None = None,
        planner: Any = None,
        process_group: Any = None,
        thread_count: int = 1,
        cache_plans: bool = True,
        **queue_options: Unpack[DCPQueueKeywords],
    ) -> None:
        if persistent_queue is not None:
            persistent = persistent_queue
        self._set_options(planner, process_group, thread_count, cache_plans)
        self._queue = CheckpointQueue(persistent, **queue_options)

    @property
    def queue(self) -> CheckpointQueue:
        """The :class:`CheckpointQueue` that runs the saves."""
        return self._queue

    @releasing
    def async_save(
        self,
        state_dict: dict[str, Any],
        checkpoint_id: Any,
        *,
        planner: Any = None,
        extra: dict[str, Any] | None = None,
    ) -> int:
        """Plan (collective) and schedule the save of ``state_dict`` into the directory
        ``checkpoint_id``; returns its call index once the tensors are staged."""
        # A save stays in _writing until it is finalized.
        request, real = self._request(
            state_dict, checkpoint_id, planner, extra, lambda i: True, self._queue.completion
        )
        call_idx = self._queue.schedule_async_request(request, needs_global=True)
        self._writing[real] = call_idx
        return call_idx

    def finalize_async_save(
        self, blocking: bool = False, no_dist: bool = True, terminate: bool = False
    ) -> list[int]:
        """Finalize (commit) finished saves; return their call indices. DCP saves settle
        across all ranks whatever ``no_dist``. ``terminate=True`` then stops the worker.
        Raises the CheckpointError of a failed save (``DistributedCheckpointError`` on
        every rank when any rank failed)."""
        settled: set[int | None] = set()
        try:
            finalized = self._queue.maybe_finalize_async_calls(blocking, no_dist=no_dist)
            settled.update(finalized)
            return finalized
        except CheckpointError as err:
            settled.update((*err.finalized_call_idxs, err.call_idx))
            raise
        finally:
            self._writing = {k: v for k, v in self._writing.items() if v not in settled}
            if terminate:
                self._queue.close(no_dist=no_dist)

    def close(self) -> None:
        """Finalize pending saves and stop the worker. Idempotent."""
        self._queue.close(no_dist=True)


class AsyncDCPCheckpoint(_DCPOptions, QueueFacade):
    """DCP-format saves, awaited::

        async with AsyncDCPCheckpoint() as ckpt:
            fut = await ckpt.save(state_dict, "ckpt/step100", wait_for_staging=False)
            ...                      # forward/backward overlap the copy
            await fut.staged         # before optimizer.step()
            await fut                # committed on every rank (or raises)

    Options as :class:`DCPCheckpoint`, and those of :class:`AsyncCheckpointQueue`.
    """

    def __init__(
        self,
        persistent: bool = True,
        *,
        planner: Any = None,
        process_group: Any = None,
        thread_count: int = 1,
        cache_plans: bool = True,
        **queue_options: Unpack[AsyncDCPQueueKeywords],
    ) -> None:
        self._set_options(planner, process_group, thread_count, cache_plans)
        self.queue = AsyncCheckpointQueue(persistent, **queue_options)
        self._planning: anyio.Lock | None = None

    @areleasing
    async def save(
        self,
        state_dict: dict[str, Any],
        checkpoint_id: Any,
        *,
        wait_for_staging: bool = True,
        planner: Any = None,
        extra: dict[str, Any] | None = None,
    ) -> CheckpointFuture:
        """Plan the save of ``state_dict`` into ``checkpoint_id`` (collective, off the
        event loop) and schedule it; see :meth:`AsyncCheckpointQueue.schedule` for
        ``wait_for_staging``. The future resolves once ``.metadata`` is committed."""
        if self._planning is None:
            self._planning = anyio.Lock()
        # Saves started by concurrent tasks plan one at a time, in the order they were
        # called (the planner and the plan cache are shared; planning is collective),
        # and are scheduled in that order.
        async with self._planning:
            # Every filesystem call and the planning run off the event loop.
            request, real = await anyio.to_thread.run_sync(
                self._request,
                state_dict,
                checkpoint_id,
                planner,
                extra,
                lambda fut: not fut.done(),
                self.queue.completion,
            )
            # Tracked as soon as it exists: a save cancelled while it stages still runs,
            # and a second save into its directory must still be refused meanwhile.
            return await self.queue.schedule(
                request,
                wait_for_staging=wait_for_staging,
                needs_global=True,
                on_scheduled=lambda fut: self._writing.__setitem__(real, fut),
            )


class DCPAsyncCheckpoint(DCPCheckpoint):
    """Deprecated: :class:`DCPCheckpoint` is its name now (inside aiockpt, ``Async`` means
    awaitable). Takes ``persistent_queue`` first, as it did."""

    def __init__(
        self,
        persistent_queue: bool = True,
        *,
        planner: Any = None,
        process_group: Any = None,
        thread_count: int = 1,
        cache_plans: bool = True,
        **queue_options: Unpack[DCPQueueKeywords],
    ) -> None:
        warnings.warn(
            "aiockpt.dcp.DCPAsyncCheckpoint is deprecated: use aiockpt.dcp.DCPCheckpoint "
            "(the same class; in aiockpt, Async means awaitable)",
            DeprecationWarning,
            stacklevel=2,
        )
        super().__init__(
            persistent_queue,
            planner=planner,
            process_group=process_group,
            thread_count=thread_count,
            cache_plans=cache_plans,
            **queue_options,
        )
