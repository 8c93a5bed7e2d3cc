"""Callers: the processes that run requests, and the non-blocking "is it done?" question.

:class:`AsyncCaller` is the protocol the engine drives: ``run`` starts a request,
``wait_objects`` are what to wait on for news, ``collect`` reads the news without blocking,
``kill`` and ``shutdown`` stop the worker. The reference's own methods
(``schedule_async_call``, ``is_current_async_call_done``, ``close``) sit on top of it.
Two callers implement it: ``TemporalAsyncCaller`` (``_fork``) forks one child per request;
``PersistentAsyncCaller`` (``_persistent``) keeps one worker that serves requests in order
across saves. A worker that dies is reported as a :class:`WorkerCrashedError` (``_process``).
"""

from __future__ import annotations

import atexit
import contextlib
import threading
import time
import weakref
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable
from multiprocessing.connection import wait
from typing import Any

from .._dist import CompletionGroup, settle
from .._exceptions import InvalidRequestError
from .._options import WorkerSettings
from .._ranks import get_rank, is_distributed
from .._request import AsyncRequest, LocalOutcome
from .._staging._arena import StagingBuffers
from ._process import STOP_GRACE_S, resolve

live_callers: weakref.WeakSet[AsyncCaller] = weakref.WeakSet()


def _close_live_callers() -> None:
    # Runs before multiprocessing's own exit handler (registered earlier, so run later):
    # lets workers finish the checkpoints they are writing, then stops them.
    for caller in list(live_callers):
        with contextlib.suppress(Exception):
            caller.close()


atexit.register(_close_live_callers)


class AsyncCaller(ABC):
    """Runs requests in another process and answers whether each one is done."""

    def __init__(
        self, completion: CompletionGroup | None = None, settings: WorkerSettings | None = None
    ) -> None:
        self.rank: int = get_rank()
        self.completion = completion if completion is not None else CompletionGroup()
        self.settings = settings if settings is not None else WorkerSettings()
        self._lock = threading.Lock()  # this caller's process and connection
        # The reference's standalone use: outcomes read but not yet acknowledged.
        self.outcomes: dict[int, LocalOutcome] = {}
        self._current: deque[int] = deque()  # scheduled, not yet acknowledged, in order

    # -- the engine's protocol ----------------------------------------------------------

    @abstractmethod
    def run(
        self,
        call_idx: int,
        fn: Callable[..., Any] | None,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        buffers: StagingBuffers | None,
    ) -> None:
        """Start ``fn(*args, **kwargs)`` as ``call_idx`` in the worker; returns at once."""

    @abstractmethod
    def wait_objects(self) -> list[Any]:
        """What ``multiprocessing.connection.wait`` sees ready when there is news."""

    @abstractmethod
    def collect(self) -> list[LocalOutcome]:
        """The outcomes that arrived since the last call; never blocks on the worker."""

    @abstractmethod
    def in_flight(self) -> list[int]:
        """Calls the worker still owes a report about, oldest first."""

    def deadline(self) -> float | None:
        """A ``time.monotonic()`` instant by which ``collect`` must run again, if any."""
        return None

    @abstractmethod
    def running_since(self, call_idx: int) -> float | None:
        """When the worker began ``call_idx`` (``time.monotonic()``), None while it waits
        for the worker to start or to finish the calls before it."""

    @abstractmethod
    def kill(self) -> None:
        """SIGKILL the worker now; ``collect`` then reports its calls as crashed."""

    @abstractmethod
    def shutdown(self, grace: float = STOP_GRACE_S) -> list[LocalOutcome]:
        """Stop the worker (killed after ``grace`` seconds); returns the outcomes of calls
        still in flight (crashed). Idempotent."""

    # -- the reference's API ------------------------------------------------------------

    def schedule_async_call(
        self, async_req: AsyncRequest, buffers: StagingBuffers | None = None
    ) -> None:
        """Start ``async_req`` (its ``call_idx`` set) in the worker; returns at once.

        ``preload_fn`` runs here if the request still has one. ``buffers`` are the staging
        buffers the request's tensors were copied to, if any.
        """
        args = async_req.prepared_args()
        self.run(
            async_req.call_idx, async_req.async_fn, args, async_req.async_fn_kwargs or {}, buffers
        )
        self._current.append(async_req.call_idx)

    def poll(self, call_idx: int, timeout: float | None = 0.0) -> LocalOutcome | None:
        """This rank's outcome of ``call_idx``: None while it runs. ``timeout=0`` never
        blocks; ``None`` waits until the worker reports or dies."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            for outcome in self.collect():
                self.outcomes[outcome.call_idx] = resolve(outcome, self.rank)
            if call_idx in self.outcomes:
                return self.outcomes[call_idx]
            if call_idx not in self.in_flight():
                raise InvalidRequestError(f"call {call_idx} was never scheduled on this caller")
            now = time.monotonic()
            limits = [t - now for t in (deadline, self.deadline()) if t is not None]
            left = max(0.0, min(limits)) if limits else None
            if deadline is not None and deadline <= now:
                return None
            objects = self.wait_objects()
            if objects:
                wait(objects, left)

    def acknowledge(self, call_idx: int) -> None:
        """Forget ``call_idx``: its outcome has been consumed."""
        self.outcomes.pop(call_idx, None)
        with contextlib.suppress(ValueError):
            self._current.remove(call_idx)

    def is_current_async_call_done(
        self, blocking: bool = False, no_dist: bool = False, finalize_timeout: float | None = None
    ) -> bool:
        """Whether the oldest request of this caller is done on all ranks (the reference's
        question). Unlike the reference, a failed request raises its CheckpointError.
        ``finalize_timeout`` bounds how long ``blocking=True`` waits for this worker.

        With ``no_dist=False`` in a distributed job, every rank must call this in lockstep.
        """
        if not self._current:
            return True
        call_idx = self._current[0]
        if blocking and finalize_timeout is not None:
            blocking = self.poll(call_idx, finalize_timeout) is not None
        done, error = settle(
            call_idx,
            lambda timeout: self.poll(call_idx, timeout),
            blocking,
            not no_dist and is_distributed(),
            self.completion,
        )
        if not done:
            return False
        self.acknowledge(call_idx)
        if error is not None:
            raise error
        return True

    def _time_left(self, call_idx: int) -> float | None:
        """How long ``close`` (at exit too) waits for ``call_idx``: until its save deadline
        (``save_timeout`` from when it started; a call that has not started yet gets that
        long from now, besides the worker's start deadline)."""
        limit = self.settings.save_timeout
        if limit is None:
            return None
        now = time.monotonic()
        since = self.running_since(call_idx)
        return max(0.0, (since if since is not None else now) + limit - now)

    def _debug_is_async_process_running(self) -> bool:
        """Whether this caller's worker process is alive (NVRx's name, for its unit tests
        of in-process restarts): False before it started and once it was stopped or
        aborted."""
        process = getattr(self, "process", None)
        return process is not None and bool(process.is_alive())

    def close(self, abort: bool = False) -> None:
        """Wait for the requests in flight, then stop the worker. Idempotent.

        ``abort=True`` does not wait: the worker gets SIGTERM (SIGKILL after the
        ``sigterm_timeout``) and the requests in flight are dropped, never reported.
        """
        if abort:
            self.shutdown(0.0)
            self.outcomes.clear()
            self._current.clear()
            return
        for call_idx in self.in_flight():
            if self.poll(call_idx, self._time_left(call_idx)) is None:
                self.kill()  # past its save_timeout: like the engine, do not wait more
                break
        for outcome in self.shutdown():
            self.outcomes[outcome.call_idx] = outcome
