"""The engine: requests in flight, staged, started, settled and finalized in FIFO order.

Both facades drive this one object: the blocking ``AsyncCallsQueue`` and the asyncio
``AsyncCheckpointQueue``. It imports no asyncio. Waiting happens outside its lock (on the
worker's connection or process sentinel), so one thread may wait for a request while
another schedules the next.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass
from datetime import timedelta
from multiprocessing.connection import wait
from typing import Any

from ._callers import AsyncCaller, PersistentAsyncCaller, TemporalAsyncCaller
from ._dist import DEFAULT_TIMEOUT, CompletionGroup, get_rank, is_distributed, settle
from ._exceptions import (
    CheckpointError,
    FinalizeError,
    InvalidRequestError,
    QueueClosedError,
    StagingError,
)
from ._request import AsyncRequest, LocalOutcome
from ._staging import StagedArgs, StagingBuffers


class ResultFinalizer:
    """Base of finalize steps that receive what ``async_fn`` returned on this rank and the
    request's call index (the plain ones take no argument, as in the reference)."""

    def __call__(self, result: Any, call_idx: int) -> None:
        raise NotImplementedError


@dataclass
class ActiveCall:
    """A scheduled request, from staging until it is settled."""

    call_idx: int
    caller: AsyncCaller
    request: AsyncRequest
    staged_bytes: int
    stage_seconds: float
    scheduled_at: float
    outcome: LocalOutcome | None = None
    needs_global: bool = False  # settle across ranks even when the caller says no_dist


@dataclass
class Settled:
    """A request whose fate is known on every rank: ``error`` is None if it succeeded."""

    call: ActiveCall
    error: CheckpointError | None
    settled_at: float


class CallsEngine:
    """Schedules requests on callers and settles them, oldest first."""

    def __init__(
        self,
        persistent: bool = True,
        *,
        start_method: str = "spawn",
        max_staging_copies: int = 1,
        pin_memory: bool | None = None,
        process_group: Any = None,
        timeout: timedelta = DEFAULT_TIMEOUT,
        single_threaded_staging: bool = False,
    ) -> None:
        self.persistent = persistent
        self.start_method = start_method
        self.buffers = StagingBuffers(max_staging_copies, pin_memory, single_threaded_staging)
        self.completion = CompletionGroup(process_group, timeout)
        self.active: deque[ActiveCall] = deque()
        self.call_idx = -1
        self.closed = False
        self._lock = threading.Lock()  # engine state and every caller's connection
        self._changed = threading.Condition(self._lock)  # news from a worker was collected
        self._reading = False  # a thread is blocked on the workers' pipes
        self._schedule_lock = threading.Lock()  # one schedule at a time, in call order
        self._persistent_caller: PersistentAsyncCaller | None = None
        if persistent:
            # Started now, so that the first save does not wait for the worker to import torch.
            self._persistent_caller = PersistentAsyncCaller(start_method, self.completion)
            self._persistent_caller.start()

    def _caller(self) -> AsyncCaller:
        if self._persistent_caller is not None:
            return self._persistent_caller
        return TemporalAsyncCaller(self.completion)

    def check_open(self) -> None:
        if self.closed:
            raise QueueClosedError("the checkpoint queue is closed; create a new one")

    # -- scheduling ---------------------------------------------------------------------

    def schedule(
        self, request: AsyncRequest, call_idx: int | None = None, needs_global: bool = False
    ) -> ActiveCall:
        """Stage the request's tensors and start it; returns once staging is done.

        ``call_idx`` is the index to give the request (a facade that hands out indices
        before staging reserves them); by default the next one. ``needs_global`` requests
        (a sharded checkpoint whose metadata commits it) always settle across all ranks.
        Schedules run one at a time; the copy runs without the engine's lock, so another
        thread can settle earlier requests meanwhile.
        """
        self.check_open()
        if not isinstance(request, AsyncRequest):
            raise InvalidRequestError(f"expected an AsyncRequest, got {type(request).__name__}")
        request.validate()
        with self._schedule_lock:
            self.check_open()
            if call_idx is None:
                call_idx = self.call_idx + 1
            elif call_idx <= self.call_idx:
                raise InvalidRequestError(f"call index {call_idx} was already used")
            start = time.perf_counter()
            staged = self._stage(call_idx, request)
            stage_seconds = time.perf_counter() - start
            to_run = request._replace(
                async_fn_args=staged.args,
                async_fn_kwargs=staged.kwargs,
                preload_fn=None,
                finalize_fns=[],
                is_frozen=True,
                call_idx=call_idx,
            )
            with self._lock:
                caller = self._caller()
                try:
                    caller.schedule_async_call(to_run, self.buffers)
                except BaseException:
                    self.buffers.release(call_idx)
                    raise
                self.call_idx = call_idx
                call = ActiveCall(
                    call_idx,
                    caller,
                    request.freeze(),
                    staged.nbytes,
                    stage_seconds,
                    time.time(),
                    needs_global=needs_global,
                )
                self.active.append(call)
                self._changed.notify_all()  # a reader may now wait on this call's worker too
            return call

    def _stage(self, call_idx: int, request: AsyncRequest) -> StagedArgs:
        rank = get_rank()
        try:
            args = request.prepared_args()
        except Exception as exc:
            raise StagingError(
                f"preload_fn of call {call_idx} on rank {rank} raised "
                f"{type(exc).__name__}: {exc}; nothing was scheduled",
                call_idx=call_idx,
                rank=rank,
            ) from exc
        kwargs = dict(request.async_fn_kwargs)
        _, nbytes = self.buffers.plan(args, kwargs)
        while not self.buffers.has_free(nbytes):
            # Every staging copy is still read by a worker: wait for the oldest to finish.
            with self._lock:
                holder = next(c for c in self.active if c.outcome is None)
            self.wait_local(holder, None)
        try:
            return self.buffers.stage(call_idx, args, kwargs)
        except Exception as exc:
            raise StagingError(
                f"copying the tensors of call {call_idx} on rank {rank} to host staging "
                f"buffers failed: {type(exc).__name__}: {exc}; nothing was scheduled",
                call_idx=call_idx,
                rank=rank,
            ) from exc

    # -- local completion ---------------------------------------------------------------

    def _poll_locked(self, call: ActiveCall) -> LocalOutcome | None:
        if call.outcome is None:
            call.outcome = call.caller.poll(call.call_idx, 0.0)
            if call.outcome is not None:
                self.buffers.release(call.call_idx)
        return call.outcome

    def poll_local(self, call: ActiveCall) -> LocalOutcome | None:
        """This rank's outcome of ``call``, without blocking."""
        with self._lock:
            return self._poll_locked(call)

    def wait_local(self, call: ActiveCall, timeout: float | None) -> LocalOutcome | None:
        """Wait up to ``timeout`` seconds (None: until the worker reports or dies).

        Several threads may wait at once (the poller, a schedule waiting for a staging
        buffer): one of them, the reader, blocks on every unfinished request's pipe and
        process sentinel; it wakes the others whenever something arrived, so none of them
        can sleep on a pipe whose news another thread already consumed.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._changed:
            while True:
                outcome = self._poll_locked(call)
                left = None if deadline is None else deadline - time.monotonic()
                if outcome is not None or (left is not None and left <= 0):
                    return outcome
                if self._reading:
                    self._changed.wait(left)
                    continue
                objects = list(
                    {
                        id(o): o
                        for c in self.active
                        if c.outcome is None
                        for o in c.caller.wait_objects()
                    }.values()
                )
                self._reading = True
                self._lock.release()
                try:
                    if objects:
                        wait(objects, left)
                except (OSError, ValueError):  # a pipe closed under us: poll again
                    pass
                finally:
                    self._lock.acquire()
                    self._reading = False
                    self._changed.notify_all()

    # -- global completion and finalization ---------------------------------------------

    def settle_front(self, blocking: bool, no_dist: bool) -> Settled | None:
        """Decide the oldest request's fate on all ranks, or None if it is still running.

        In a distributed job (unless ``no_dist``) this issues the completion reduction,
        so every rank must call it the same number of times; ``blocking=True`` waits for
        the local worker first and then reduces once.
        """
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
            self.active.popleft()
            call.caller.acknowledge(call.call_idx)
        return Settled(call, error, time.time())

    @staticmethod
    def finalize(settled: Settled) -> None:
        """Run the finalize steps of a successful request, in order."""
        call = settled.call
        result = call.outcome.result if call.outcome is not None else None
        for fn in call.request.finalize_fns:
            try:
                if isinstance(fn, ResultFinalizer):
                    fn(result, call.call_idx)
                else:
                    fn()
            except Exception as exc:
                name = getattr(fn, "__qualname__", repr(fn))
                raise FinalizeError(
                    f"finalize step {name} of checkpoint call {call.call_idx} on rank "
                    f"{get_rank()} raised {type(exc).__name__}: {exc}; the steps after it "
                    "did not run",
                    call_idx=call.call_idx,
                    rank=get_rank(),
                ) from exc

    def stop_workers(self) -> None:
        """Stop the worker processes and free the staging buffers (after settling)."""
        with self._lock:
            self.closed = True
            for call in self.active:
                call.caller.close()
            if self._persistent_caller is not None:
                self._persistent_caller.close()
            self.buffers.close()

    def kill_worker(self) -> None:
        """Kill the persistent worker (tests and emergencies); its requests fail."""
        with self._lock:
            if self._persistent_caller is not None:
                self._persistent_caller.kill()

    # -- readiness interface for an event-loop poller (begin) ----------------------------
    # A minimal stand-in for the engine's non-blocking interface (wait_handles, collect,
    # next_deadline, front_ready, cancel), built on the methods above. A caller is polled
    # only when that cannot block: a forked child once its sentinel says it has exited
    # (its reply comes first, so reading it then never waits in ``join``).

    def wait_handles(self) -> list[int]:
        """File descriptors that become readable when a call in flight may have news: the
        worker connections and process sentinels, and a wake-up pipe written whenever
        another thread collected news or a call was scheduled. Never blocks."""
        fds = {self._wakeup_fds()[0]}
        with self._lock:
            for call in self.active:
                if call.outcome is None:
                    fds.update(self._caller_fds(call.caller))
        return sorted(fds)

    def collect(self) -> None:
        """Read every worker reply available now, without blocking."""
        read_fd = self._wakeup_fds()[0]
        with contextlib.suppress(OSError):
            while os.read(read_fd, 4096):
                pass
        with self._lock:
            if self._reading:  # another thread reads the replies; it writes the pipe after
                return
            for call in list(self.active):
                if call.outcome is None and self._may_poll(call.caller):
                    self._poll_locked(call)

    def next_deadline(self) -> float | None:
        """Seconds until a per-save deadline needs ``collect()``; this engine has none."""
        return None

    def front_ready(self) -> bool:
        """The oldest unsettled call has its local outcome (settling it will not wait for
        this rank's worker)."""
        with self._lock:
            return bool(self.active) and self.active[0].outcome is not None

    def cancel(self, call_idx: int) -> bool:
        """Withdraw a call that has not started writing. A request this engine has sent to
        a worker always runs, so this returns False."""
        return False

    class _WakingCondition(threading.Condition):
        """The engine's condition, also writing the wake-up pipe on every notification."""

        _wakeup_fd: int

        def notify_all(self) -> None:
            super().notify_all()
            with contextlib.suppress(OSError):
                os.write(self._wakeup_fd, b"\0")

    def _wakeup_fds(self) -> tuple[int, int]:
        with self._lock:
            fds: tuple[int, int] | None = getattr(self, "_wakeup_pipe", None)
            if fds is None:
                read_fd, write_fd = os.pipe()
                os.set_blocking(read_fd, False)
                os.set_blocking(write_fd, False)
                fds = self._wakeup_pipe = (read_fd, write_fd)
                weakref.finalize(self, self._close_fds, fds)
                # Same object, same waiters: only notify_all changes.
                self._changed.__class__ = CallsEngine._WakingCondition
                self._changed._wakeup_fd = write_fd  # type: ignore[attr-defined]
            return fds

    @staticmethod
    def _close_fds(fds: tuple[int, ...]) -> None:
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)

    @staticmethod
    def _caller_fds(caller: AsyncCaller) -> list[int]:
        process = getattr(caller, "process", None)
        try:
            sentinel = [process.sentinel] if process is not None else []
        except ValueError:  # a closed process has no sentinel
            sentinel = []
        if isinstance(caller, TemporalAsyncCaller):
            return sentinel  # the child exits right after replying
        return [o if isinstance(o, int) else o.fileno() for o in caller.wait_objects()] + sentinel

    @staticmethod
    def _may_poll(caller: AsyncCaller) -> bool:
        process = getattr(caller, "process", None)
        if isinstance(caller, TemporalAsyncCaller) and process is not None:
            return bool(wait([process.sentinel], 0))
        return True

    # -- readiness interface for an event-loop poller (end) ------------------------------
