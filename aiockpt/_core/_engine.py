"""The engine: requests staged, started, reported, settled and finalized in FIFO order.

Both facades drive this one object: the blocking ``CheckpointQueue`` and the async
``AsyncCheckpointQueue``. It imports no asyncio. Each request's life is a :class:`Call`
(``_calls.py``); the engine is the only writer of its state.

One reader of worker replies: whichever thread holds the engine's lock while no other
thread is blocked on the workers reads what is there; a thread that must wait becomes *the*
reader and blocks on every running call's connection and process sentinel (plus a wake-up
pipe, so a newly scheduled call joins the wait). Whoever reads news notifies the others, and
writes to the *news* pipe that an event loop can watch (:meth:`wait_handles`).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import wait
from typing import Any

from .._dist import CompletionGroup, settle
from .._exceptions import (
    CheckpointError,
    FinalizeError,
    InvalidRequestError,
    QueueClosedError,
    SaveTimeoutError,
    StagingError,
)
from .._options import QueueOptions
from .._ranks import get_rank, is_distributed
from .._request import AsyncRequest, LocalOutcome
from .._staging._arena import StagedArgs, StagingBuffers
from .._staging._tree import gc_paused
from ._callers import AsyncCaller
from ._calls import Call, CallState, describe_target
from ._fork import ForkOrder, TemporalAsyncCaller
from ._persistent import PersistentAsyncCaller
from ._process import resolve

logger = logging.getLogger("aiockpt")

# Engines not stopped yet, held strongly: a queue dropped with saves pending still has
# them waited for and reported at exit.
_live_engines: set[CallsEngine] = set()


class ResultFinalizer:
    """Base of finalize steps that receive what ``async_fn`` returned on this rank and the
    request's call index (the plain ones take no argument, as in the reference)."""

    def __call__(self, result: Any, call_idx: int) -> None:
        raise NotImplementedError


@dataclass
class Settled:
    """A request whose fate is known on every rank: ``error`` is None if it succeeded."""

    call: Call
    error: CheckpointError | None
    settled_at: float


# How long an abort waits for a schedule in progress to see it (copying tensors, or in a
# user's preload_fn): past it, the abort goes on and that schedule fails on its own.
_ABORT_SCHEDULE_WAIT_S = 5.0


def _pipe() -> tuple[int, int]:
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC) if hasattr(os, "pipe2") else os.pipe()
    os.set_blocking(r, False)
    os.set_blocking(w, False)
    return r, w


def _ping(fd: int) -> None:
    if fd < 0:  # closed with the engine
        return
    with contextlib.suppress(BlockingIOError, OSError):  # full: a wake-up is pending anyway
        os.write(fd, b"\0")


def _drain(fd: int) -> None:
    if fd < 0:
        return
    with contextlib.suppress(BlockingIOError, OSError):
        while os.read(fd, 4096):
            pass


class CallsEngine:
    """Schedules requests on callers and settles them, oldest first."""

    def __init__(
        self,
        options: QueueOptions,
        *,
        caller_factory: Callable[[], AsyncCaller] | None = None,
        completion: CompletionGroup | None = None,
        persistent_caller: PersistentAsyncCaller | None = None,
    ) -> None:
        self.options = options
        opts = self.options
        self.persistent = opts.persistent
        self.buffers = StagingBuffers(
            opts.max_staging_copies, opts.pin_memory, opts.single_threaded_staging
        )
        self.completion = (
            completion
            if completion is not None
            else CompletionGroup(opts.process_group, opts.timeout)
        )
        self.active: deque[Call] = deque()  # not settled yet, oldest first
        self._running: dict[int, Call] = {}  # sent, not reported yet
        self._early: dict[int, LocalOutcome] = {}  # reported before its call registered
        self._callers: list[AsyncCaller] = []  # callers that may still have news
        self.call_idx = -1
        self.closed = False
        self.aborted = False
        self._cancelled: set[int] = set()
        self._closing_since: float | None = None  # when refuse_new was first called
        self._lock = threading.Lock()  # engine state only; each caller locks its own process
        self._changed = threading.Condition(self._lock)
        self._reading = False  # a thread is blocked on the workers' connections
        self._unpickling = 0  # threads unpickling results they collected (lock released)
        self._schedule_lock = threading.Lock()  # one schedule at a time, in call order
        # Guards call_idx and _cancelled only: cancel() never waits for a staging copy
        # (which may wait for a buffer, or for the event loop) to finish.
        self._index_lock = threading.Lock()
        self._wake_r, self._wake_w = _pipe()  # wakes the blocked reader: a new call to watch
        self._news_r, self._news_w = _pipe()  # tells an event loop: something changed
        self._persistent_caller: PersistentAsyncCaller | None = None
        # Makes the caller of each request (tests pass in-process fakes); by default a
        # fork per request or the one persistent worker.
        self._caller_factory = caller_factory
        self._fork_order = ForkOrder()  # forked children run in scheduling order
        if opts.persistent and caller_factory is None:
            # Started at the first request or by warm_up()/reserve(), never here: a queue
            # built at module level is built again when a spawned worker imports the main
            # module, and a process must not be started while that import runs.
            self._persistent_caller = persistent_caller or PersistentAsyncCaller(
                opts.start_method, self.completion, opts.worker_settings()
            )
        _live_engines.add(self)

    def _caller(self) -> AsyncCaller:
        if self._caller_factory is not None:
            return self._caller_factory()
        if self._persistent_caller is not None:
            return self._persistent_caller
        return TemporalAsyncCaller(
            self.completion, self.options.worker_settings(), self._fork_order
        )

    def next_caller(self) -> AsyncCaller:
        """The caller the next request would run on (the persistent one, or a new fork
        caller that has not forked)."""
        return self._caller()

    def adopt_worker(self, caller: PersistentAsyncCaller) -> bool:
        """Serve this persistent engine's requests with ``caller`` (a worker started ahead,
        see ``CheckpointQueue.warmup_persistent_caller``) if its own has not started and
        the start methods match; returns whether it did."""
        with self._lock:
            own = self._persistent_caller
            if own is None or own.process is not None or own.starts or self.closed:
                return False
            if caller.start_method != own.start_method:
                return False
            caller.completion = self.completion
            self._persistent_caller = caller
            return True

    def warm_up(self) -> None:
        """Start the persistent worker now (it imports torch in the background), so the
        first save does not wait for it. A no-op for a fork-per-request queue."""
        self.check_open()
        if self._persistent_caller is not None:
            self._persistent_caller.start()

    def check_open(self) -> None:
        if self.closed:
            raise QueueClosedError("the checkpoint queue is closed; create a new one")

    # -- scheduling ---------------------------------------------------------------------

    def reserve(self, args: tuple[Any, ...], kwargs: dict[str, Any] | None = None) -> None:
        """Allocate staging memory for a request with these arguments ahead of its first
        save (and let the persistent worker finish starting), so that save is a warm one."""
        self.check_open()
        self.buffers.reserve(tuple(args), dict(kwargs or {}))
        if self._persistent_caller is not None:
            self._persistent_caller.wait_ready(60.0)

    def schedule(
        self,
        request: AsyncRequest,
        call_idx: int | None = None,
        needs_global: bool = False,
        ready_event: Any = None,
        before_start: Callable[[], None] | None = None,
    ) -> Call:
        """Stage the request's tensors and start it; returns once staging is done.

        ``call_idx`` is the index to give the request (a facade that hands out indices
        before staging reserves them); by default the next one. The index is consumed even
        if staging fails, so that every rank numbers its requests alike. ``needs_global``
        requests (a sharded checkpoint whose metadata commits it) always settle across all
        ranks. ``ready_event`` is a CUDA event the staging copy waits for (recorded on the
        caller's stream when staging runs in another thread). ``before_start()`` is called
        once the tensors are copied, before the worker is given the request: raising a
        :class:`CheckpointError` there fails the call with nothing written.
        """
        self.check_open()
        if not isinstance(request, AsyncRequest):
            raise InvalidRequestError(f"expected an AsyncRequest, got {type(request).__name__}")
        request.validate()
        with self._schedule_lock:
            self.check_open()
            with self._index_lock:
                if call_idx is None:
                    call_idx = self.call_idx + 1
                elif call_idx <= self.call_idx:
                    raise InvalidRequestError(f"call index {call_idx} was already used")
                cancelled = call_idx in self._cancelled
                self._cancelled.discard(call_idx)
                self.call_idx = call_idx
            if cancelled:
                raise InvalidRequestError(f"call {call_idx} was cancelled before it started")
            call = Call(
                call_idx,
                list(request.finalize_fns),
                describe_target(request.async_fn, tuple(request.async_fn_args)),
                needs_global,
                self.buffers.release,
            )
            with self._lock:
                self.active.append(call)
            caller: AsyncCaller | None = None
            start = time.perf_counter()
            try:
                # Staging creates a few objects per tensor: with 100k tensors the collector
                # would walk the whole state dict several times over.
                with gc_paused():
                    staged = self._stage(call, request, ready_event)
                    if before_start is not None:
                        before_start()
                    self._check_not_aborted(call_idx)
                    caller = self._caller()
                    caller.run(call_idx, request.async_fn, staged.args, staged.kwargs, self.buffers)
            except BaseException as exc:
                error = self._schedule_failed(call, caller, exc, start)
                if isinstance(exc, Exception) and error is not exc:
                    raise error from exc  # e.g. the worker could not be started: typed
                raise
            with self._lock:
                call.sent(caller, time.perf_counter() - start, staged.nbytes)
                self._register_running(call, caller)
                _ping(self._wake_w)  # under the lock: the pipes close under it too
                _ping(self._news_w)
            return call

    def _check_not_aborted(self, call_idx: int) -> None:
        if self.aborted:
            raise QueueClosedError(
                f"the checkpoint queue was aborted while call {call_idx} was being scheduled; "
                "it was dropped and nothing was written",
                call_idx=call_idx,
                rank=get_rank(),
            )

    def refuse_new(self) -> None:
        """Refuse every later ``schedule`` (a close is starting); waits for a schedule in
        progress to register its call, so the close sees it."""
        with self._schedule_lock:
            self.closed = True
        self.closing()

    def closing(self) -> None:
        """A close has begun: from now on a call still waiting for its worker to start is
        given ``save_timeout`` from this moment (see :meth:`_since`)."""
        with self._lock:
            if self._closing_since is None:
                self._closing_since = time.monotonic()
                _ping(self._news_w)  # a waiting reader recomputes its deadline
                _ping(self._wake_w)

    def _since(self, call: Call) -> float | None:
        """When ``call``'s save deadline started: when its worker began it, or, for a call
        still waiting for its worker (one that is starting) while the queue closes, when
        the close began, so that a close never waits more than ``save_timeout``."""
        since: float | None = call.caller.running_since(call.call_idx)
        if since is None and self._closing_since is not None:
            return self._closing_since
        return since

    def _schedule_failed(
        self, call: Call, caller: AsyncCaller | None, exc: BaseException, start: float
    ) -> CheckpointError:
        if isinstance(exc, CheckpointError):
            error = exc
        elif isinstance(exc, Exception):
            error = StagingError(
                f"starting the worker for call {call.call_idx} on rank {get_rank()} failed: "
                f"{type(exc).__name__}: {exc}; nothing was written. Check the machine's "
                "process and memory limits, then save again",
                call_idx=call.call_idx,
                rank=get_rank(),
            )
        else:
            error = StagingError(
                f"scheduling call {call.call_idx} on rank {get_rank()} was interrupted by "
                f"{type(exc).__name__}",
                call_idx=call.call_idx,
                rank=get_rank(),
            )
        with self._lock:
            if caller is not None and (
                call.call_idx in caller.in_flight() or call.call_idx in self._early
            ):
                # Interrupted after the worker got it: it runs, and reads its buffers.
                call.sent(caller, time.perf_counter() - start, 0)
                self._register_running(call, caller)
            call.failed(error)
            call.error_raised = True  # raised to the caller of schedule right now
            _ping(self._news_w)
        return error

    def _stage(self, call: Call, request: AsyncRequest, ready_event: Any) -> StagedArgs:
        rank, call_idx = get_rank(), call.call_idx
        try:
            args = request.prepared_args()
        except Exception as exc:
            raise StagingError(
                f"preload_fn of call {call_idx} on rank {rank} raised "
                f"{type(exc).__name__}: {exc}; nothing was written",
                call_idx=call_idx,
                rank=rank,
            ) from exc
        kwargs = dict(request.async_fn_kwargs or {})
        try:
            plan = self.buffers.plan(args, kwargs)
            if not self.buffers.has_free(plan.nbytes):
                # Every staging copy is still read by a worker: wait for one to report
                # (or for an abort, which drops this request too).
                self.wait_until(lambda: self.aborted or self.buffers.has_free(plan.nbytes), None)
            self._check_not_aborted(call_idx)
            if ready_event is not None:
                import torch

                torch.cuda.current_stream(ready_event.device).wait_event(ready_event)
            return self.buffers.stage(call_idx, args, kwargs, plan, not self.persistent)
        except CheckpointError:
            raise
        except Exception as exc:
            raise StagingError(
                f"copying the tensors of call {call_idx} on rank {rank} to host staging "
                f"buffers failed: {type(exc).__name__}: {exc}; nothing was written",
                call_idx=call_idx,
                rank=rank,
            ) from exc

    def cancel(self, call_idx: int) -> bool:
        """Withdraw ``call_idx`` if it has not been scheduled yet (True); False once it
        has started (its worker may be writing)."""
        with self._index_lock:
            if call_idx > self.call_idx:
                self._cancelled.add(call_idx)
                return True
            return False

    # -- reading the workers ------------------------------------------------------------

    def _register_running(self, call: Call, caller: AsyncCaller) -> None:
        """Under the lock, once ``caller.run`` returned: the call now awaits its report,
        unless the report was read already (a fast worker answers before this)."""
        if caller not in self._callers:
            self._callers.append(caller)
        early = self._early.pop(call.call_idx, None)
        if early is None:
            self._running[call.call_idx] = call
        else:
            call.reported(early)
            self._changed.notify_all()
            _ping(self._news_w)

    def _collect_locked(self) -> bool:
        """Read every worker's news (never blocks on a worker); True if any call was
        reported. Results are unpickled with the lock released (see :meth:`_resolve`)."""
        news = False
        unread: list[tuple[Call | None, LocalOutcome]] = []
        for caller in list(self._callers):
            for outcome in caller.collect():
                call = self._running.pop(outcome.call_idx, None)
                if call is not None and call.timed_out:
                    outcome = self._timeout_outcome(call)
                elif outcome.payload is not None or call is None:
                    unread.append((call, outcome))
                    continue
                call.reported(outcome)
                news = True
            if not caller.in_flight() and getattr(caller, "process", None) is None:
                self._callers.remove(caller)
        if unread:
            news = self._resolve(unread) or news
        self._enforce_deadlines()
        if news:
            self._changed.notify_all()
            _ping(self._news_w)
        return news

    def _resolve(self, unread: list[tuple[Call | None, LocalOutcome]]) -> bool:
        """Unpickle the results in ``unread`` with the lock released (a result's own code
        may be slow, and the event loop takes this lock), then report them. Meanwhile
        ``_unpickling`` keeps other threads from collecting, so reports stay in order."""
        self._unpickling += 1
        self._lock.release()
        try:
            resolved = [(call, resolve(outcome, get_rank())) for call, outcome in unread]
        finally:
            self._lock.acquire()
            self._unpickling -= 1
            self._changed.notify_all()
        news = False
        for call, outcome in resolved:
            if call is None:  # not registered when it was read: maybe it is by now
                call = self._running.pop(outcome.call_idx, None)
            if call is None:  # its schedule has not registered it yet: keep it for then
                self._early[outcome.call_idx] = outcome
                continue
            call.reported(self._timeout_outcome(call) if call.timed_out else outcome)
            news = True
        return news

    def _busy(self) -> bool:
        """Whether another thread is collecting (blocked reading, or unpickling)."""
        return self._reading or self._unpickling > 0

    def _timeout_outcome(self, call: Call, within: str = "") -> LocalOutcome:
        within = within or f"save_timeout={self.options.save_timeout}s"
        if call.timed_out_unstarted:
            what = (
                f"did not start within {within} of closing the queue: its worker was still "
                "starting (importing), or waiting for an earlier save, and was killed; the "
                "checkpoint was not written. Check what the worker waits for (start_timeout "
                "bounds a start)"
            )
        else:
            what = (
                f"did not finish within {within}; its worker was killed and the checkpoint "
                "was not written. Check the storage; the next request starts a fresh worker"
            )
        return LocalOutcome(
            call.call_idx,
            error=SaveTimeoutError(
                f"checkpoint call {call.call_idx} ({call.target}) on rank {get_rank()} {what}",
                call_idx=call.call_idx,
                rank=get_rank(),
            ),
        )

    def _enforce_deadlines(self) -> None:
        limit = self.options.save_timeout
        if limit is None:
            return
        now = time.monotonic()
        for call in self._running.values():
            since = self._since(call)
            if not call.timed_out and since is not None and now >= since + limit:
                call.timed_out = True
                # Looked at now: once its worker is killed, a forked child waiting for
                # an earlier one may look as if it had begun.
                call.timed_out_unstarted = call.caller.running_since(call.call_idx) is None
                call.caller.kill()

    def _next_deadline_locked(self) -> float | None:
        instants = [d for c in self._callers if (d := c.deadline()) is not None]
        limit = self.options.save_timeout
        if limit is not None:
            for call in self._running.values():
                since = self._since(call)
                if since is not None and not call.timed_out:
                    instants.append(since + limit)
        return min(instants) if instants else None

    def next_deadline(self) -> float | None:
        """Seconds until :meth:`collect` must run to apply a deadline (None: no deadline)."""
        with self._lock:
            instant = self._next_deadline_locked()
        return None if instant is None else max(0.0, instant - time.monotonic())

    def collect(self) -> None:
        """Read every worker reply available now, without blocking (a no-op while another
        thread is blocked reading: that thread collects and notifies)."""
        with self._lock:
            _drain(self._news_r)
            if not self._busy():
                self._collect_locked()

    def wait_handles(self) -> list[int]:
        """File descriptors that become readable when there may be news: the running
        calls' connections and process sentinels, and the engine's news pipe."""
        with self._lock:
            objects = [o for c in self._callers for o in c.wait_objects()]
        return [self._news_r, *(o if isinstance(o, int) else o.fileno() for o in objects)]

    def wait_until(self, done: Callable[[], bool], timeout: float | None) -> bool:
        """Block until ``done()`` (checked under the engine's lock) or ``timeout``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._changed:
            # Looked at before collecting: a caller whose answer is known (the event loop
            # settling a call) must not read, and unpickle, other calls' replies.
            if done():
                return True
            while True:
                if not self._busy():
                    self._collect_locked()
                if done():
                    return True
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                if self._busy():  # another thread reads: it notifies when news comes
                    self._changed.wait(left)
                else:
                    self._read_news(left)

    def _read_news(self, timeout: float | None) -> None:
        """Called with the lock held: be the one reader of the workers, blocked without
        the lock until news, a wake-up, a caller's deadline or ``timeout``; then take the
        lock back and wake the threads waiting for news."""
        objects: list[Any] = [self._wake_r] if self._wake_r >= 0 else []
        objects += [o for c in self._callers for o in c.wait_objects()]
        due = self._next_deadline_locked()
        if due is not None:
            to_due = max(0.0, due - time.monotonic())
            timeout = to_due if timeout is None else min(timeout, to_due)
        self._reading = True
        self._lock.release()
        try:
            wait(objects, timeout)
            _drain(self._wake_r)
        except (OSError, ValueError):  # a connection closed under us: look again
            pass
        finally:
            self._lock.acquire()
            self._reading = False
            self._changed.notify_all()

    def wait_local(self, call: Call, timeout: float | None) -> LocalOutcome | None:
        """This rank's outcome of ``call``, waiting up to ``timeout`` seconds (None: until
        the worker reports or dies)."""
        if timeout == 0:
            with self._lock:
                if call.local_outcome() is None and not self._busy():
                    self._collect_locked()
                return call.local_outcome()
        self.wait_until(lambda: call.local_outcome() is not None, timeout)
        return call.local_outcome()

    poll_local = wait_local

    # -- global completion and finalization ---------------------------------------------

    def front_ready(self) -> bool:
        """Whether the oldest unsettled call has this rank's outcome."""
        with self._lock:
            return bool(self.active) and self.active[0].local_outcome() is not None

    def settle_front(self, blocking: bool, no_dist: bool) -> Settled | None:
        """Decide the oldest request's fate on all ranks, or None if it is still running.

        In a distributed job (unless ``no_dist``) this issues the completion reduction,
        so every rank must call it the same number of times; ``blocking=True`` waits for
        the local worker first and then reduces once. An error of the check itself fails
        the request (its lease stays with it until its worker reports); an interrupt
        leaves it in place.
        """
        with self._lock:
            if not self.active:
                return None
            call = self.active[0]
        distributed = (not no_dist or call.needs_global) and is_distributed()
        try:
            done, error = settle(
                call.call_idx,
                lambda timeout: self.wait_local(call, timeout),
                blocking,
                distributed,
                self.completion,
            )
        except CheckpointError as exc:  # the ranks could not agree: the request failed
            done, error = True, exc
        if not done:
            return None
        with self._lock:
            if not self.active or self.active[0] is not call:
                return None  # another thread settled it meanwhile: its result is theirs
            self.active.popleft()
            if error is None:
                call.settled()
            else:
                call.failed(error)
        return Settled(call, error, time.time())

    def finalize(self, settled: Settled) -> None:
        """Run the finalize steps of a successful request, in order."""
        call = settled.call
        result = call.outcome.result if call.outcome is not None else None
        for fn in call.finalize_fns:
            try:
                if isinstance(fn, ResultFinalizer):
                    fn(result, call.call_idx)
                else:
                    fn()
            except Exception as exc:
                name = getattr(fn, "__qualname__", None) or type(fn).__qualname__
                error = FinalizeError(
                    f"finalize step {name} of checkpoint call {call.call_idx} "
                    f"({call.target}) on rank {get_rank()} raised {type(exc).__name__}: {exc}; "
                    "the steps after it did not run",
                    call_idx=call.call_idx,
                    rank=get_rank(),
                )
                with self._lock:
                    call.failed(error)
                raise error from exc
            except BaseException as exc:  # Ctrl-C in a finalize step: fail it, say so
                name = getattr(fn, "__qualname__", None) or type(fn).__qualname__
                error = FinalizeError(
                    f"finalize step {name} of checkpoint call {call.call_idx} "
                    f"({call.target}) on rank {get_rank()} was interrupted by "
                    f"{type(exc).__name__}; the steps after it did not run, so the checkpoint "
                    "may not be committed",
                    call_idx=call.call_idx,
                    rank=get_rank(),
                )
                with self._lock:
                    call.failed(error)
                logger.error("%s", error)
                raise
        with self._lock:
            call.finalized()

    # -- shutting down ------------------------------------------------------------------

    def running(self) -> list[Call]:
        """Calls whose worker has not reported yet, oldest first."""
        with self._lock:
            return sorted(self._running.values(), key=lambda c: c.call_idx)

    def stop_workers(self, timeout: float | None = None) -> list[Call]:
        """Wait up to ``timeout`` seconds (None: the save deadline, if any) for running
        calls, then stop every worker (killing those still running) and free the staging
        buffers. Returns the calls that were still running and were killed. Idempotent."""
        with self._lock:
            self.closed = True
        if timeout is None:
            timeout = self.options.save_timeout
        self.wait_until(lambda: not self._running, timeout)
        killed = self.running()
        for call in killed:  # before their workers are stopped (see _enforce_deadlines)
            call.timed_out_unstarted = call.caller.running_since(call.call_idx) is None
        with self._lock:
            callers = list(self._callers)
            if self._persistent_caller is not None and self._persistent_caller not in callers:
                callers.append(self._persistent_caller)
        for caller in callers:
            caller.shutdown(0.0 if caller.in_flight() else 10.0)
        with self._lock:
            self._collect_locked()
            for caller in callers:
                for call in [c for c in self._running.values() if c.caller is caller]:
                    self._running.pop(call.call_idx)
                    call.reported(self._timeout_outcome(call, f"{timeout}s of closing the queue"))
            self._callers.clear()
        self.buffers.close()
        self._fork_order.close()
        self._close_pipes()
        _live_engines.discard(self)
        return killed

    def abort(self) -> list[int]:
        """Stop every worker at once (SIGTERM, then SIGKILL after ``sigterm_timeout``) and
        drop every request not finalized yet: none of them is finalized, raised or reported
        later. Returns the dropped call indices. The engine is closed afterwards."""
        with self._lock:
            if self.aborted:
                return []
            self.closed = self.aborted = True
            self._changed.notify_all()
            if self._wake_w >= 0:
                _ping(self._wake_w)  # a schedule waiting for a staging buffer gives up
        # A schedule in progress drops its request on seeing the abort (it may be copying
        # tensors, or in a user's preload_fn: waited for a little only).
        if self._schedule_lock.acquire(timeout=_ABORT_SCHEDULE_WAIT_S):
            self._schedule_lock.release()
        with self._lock:
            dropped = [call.call_idx for call in self.active]
            callers = list(self._callers)
            if self._persistent_caller is not None and self._persistent_caller not in callers:
                callers.append(self._persistent_caller)
        for caller in callers:
            caller.shutdown(0.0)
        with self._lock:
            self._collect_locked()
            for call in list(self._running.values()):
                call.reported(self._timeout_outcome(call, "the abort"))
            self._running.clear()
            self._callers.clear()
            self.active.clear()
        self.buffers.close()
        self._fork_order.close()
        self._close_pipes()
        _live_engines.discard(self)
        if dropped:
            logger.warning(
                "checkpoint queue aborted: calls %s dropped, their checkpoints not written",
                dropped,
            )
        return dropped

    def kill_worker(self) -> None:
        """Kill every worker process now (a close that gave up, tests, emergencies): the
        persistent worker and any forked one; their requests fail as crashed."""
        with self._lock:
            callers = list(self._callers)
        if self._persistent_caller is not None and self._persistent_caller not in callers:
            callers.append(self._persistent_caller)
        for caller in callers:
            caller.kill()

    def worker_pids(self) -> list[int]:
        """The pids of the worker processes (the persistent one, forked ones not reaped
        yet): what a process about to exit waits for, once it has killed them."""
        with self._lock:
            callers = list(self._callers)
        if self._persistent_caller is not None and self._persistent_caller not in callers:
            callers.append(self._persistent_caller)
        pids = []
        for caller in callers:
            with contextlib.suppress(ValueError):  # closed meanwhile
                pid = getattr(getattr(caller, "process", None), "pid", None)
                if pid is not None:
                    pids.append(pid)
        return pids

    def report_unfinished(self) -> None:
        """Log, through the ``aiockpt`` logger, every request that was never finalized:
        failures at ERROR with their error, unfinalized successes at WARNING."""
        with self._lock:
            calls = list(self.active)
        for call in calls:
            if call.error_raised:
                continue
            outcome = call.local_outcome()
            if outcome is not None and outcome.error is not None:
                logger.error(
                    "checkpoint call %d (%s) failed and was never finalized: %s",
                    call.call_idx,
                    call.target,
                    outcome.error,
                )
            elif call.state is not CallState.FINALIZED:
                logger.warning(
                    "checkpoint call %d (%s) was %s but never finalized: its finalize steps "
                    "did not run. Finalize (maybe_finalize_async_calls(blocking=True), "
                    "close(), or await queue.finalize()) before the program exits",
                    call.call_idx,
                    call.target,
                    "written" if outcome is not None else "still running at exit",
                )

    def _close_pipes(self) -> None:
        with self._lock:
            for name in ("_wake_r", "_wake_w", "_news_r", "_news_w"):
                fd = getattr(self, name, -1)
                if fd >= 0:
                    setattr(self, name, -1)
                    with contextlib.suppress(OSError):
                        os.close(fd)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self._close_pipes()


def _report_at_exit() -> None:
    # Registered after the callers' own exit handler, so it runs first: it waits for the
    # running saves (bounded by their deadline), then says what never got finalized.
    for engine in list(_live_engines):
        with contextlib.suppress(Exception):
            if engine.closed:
                continue
            engine.stop_workers()
            engine.report_unfinished()


atexit.register(_report_at_exit)
