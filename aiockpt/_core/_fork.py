"""The fork caller: one child process per request, which sees the staged tensors without
any transfer."""

from __future__ import annotations

import contextlib
import gc
import multiprocessing as mp
import os
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from .._dist import CompletionGroup
from .._exceptions import InvalidRequestError
from .._options import WorkerSettings
from .._request import LocalOutcome
from .._staging._arena import StagingBuffers
from . import _worker
from ._callers import AsyncCaller, live_callers
from ._process import (
    EXIT_GRACE_S,
    STOP_GRACE_S,
    DeathWatch,
    crash_outcome,
    outcome_from_reply,
    stop_process,
)


class ForkOrder:
    """Makes forked children run their requests one after another, in the order they were
    forked, as the persistent worker does: with two staging copies, two children may live
    at once, and the later one waits for the earlier one to exit before it starts, so that
    two saves to one path are renamed in the order they were scheduled.

    It holds a pidfd of the last child forked; the next child inherits it through the
    fork and waits until it is readable (that child has exited). A pidfd names one
    process, so a reused pid cannot be mistaken for it. Where pidfds are missing, children
    are not ordered."""

    def __init__(self) -> None:
        self._last: int | None = None
        self.last_caller: TemporalAsyncCaller | None = None  # the caller of that child
        self._lock = threading.Lock()

    def predecessor(self) -> int | None:
        """The pidfd the next child waits for (kept open by this object)."""
        return self._last

    def forked(self, pid: int | None, caller: TemporalAsyncCaller | None = None) -> None:
        """A child was forked (by ``caller``): the next one waits for it."""
        with self._lock:
            old, self._last = self._last, None
            self.last_caller = None
            if old is not None:
                os.close(old)
            if pid is not None and hasattr(os, "pidfd_open"):
                with contextlib.suppress(OSError):
                    self._last = os.pidfd_open(pid)
                    self.last_caller = caller

    def close(self) -> None:
        self.forked(None)


class TemporalAsyncCaller(AsyncCaller):
    """Forks one child process per request (the reference's default caller).

    Fork is what makes this caller cheap: the child sees the staged tensors without any
    transfer. The child disables its garbage collector so it never frees the parent's CUDA
    tensors, and it never touches CUDA. Prefer :class:`PersistentAsyncCaller` in programs
    that run threads which may hold locks at the moment of the fork.
    """

    def __init__(
        self,
        completion: CompletionGroup | None = None,
        settings: WorkerSettings | None = None,
        order: ForkOrder | None = None,
    ) -> None:
        super().__init__(completion, settings)
        self._order = order
        self.process: BaseProcess | None = None
        self._watch: DeathWatch | None = None
        self._conn: Connection | None = None
        self._call_idx: int | None = None
        self._reported = False
        self._eof_at: float | None = None  # the child closed its pipe without a reply
        self._news: list[LocalOutcome] = []
        self.start_time: float | None = None
        self.ended_at: float | None = None  # when its child was seen to have exited
        self._after: TemporalAsyncCaller | None = None  # whose child ours waits for
        self._after_ended = 0.0  # when that child exited (once known)

    def run(
        self,
        call_idx: int,
        fn: Callable[..., Any] | None,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        buffers: StagingBuffers | None,
    ) -> None:
        with self._lock:
            if self._call_idx is not None:
                raise InvalidRequestError(
                    "a TemporalAsyncCaller runs one request; create a new caller per request"
                )
            self._call_idx = call_idx
            self.start_time = time.monotonic()
            if fn is None:
                self.ended_at = self.start_time
                self._reported = True
                self._news.append(LocalOutcome(call_idx))
                return
            ctx = mp.get_context("fork")
            reader, writer = ctx.Pipe(duplex=False)
            process = ctx.Process(
                target=_worker.fork_child_main,
                args=(
                    writer,
                    call_idx,
                    fn,
                    args,
                    kwargs,
                    self.settings.cpu_priority,
                    self.settings.io_priority,
                    self._order.predecessor() if self._order is not None else None,
                ),
                name=f"aiockpt-save-{call_idx}",
            )
            gc_was_enabled = gc.isenabled()
            gc.disable()
            try:
                process.start()
            except BaseException:
                reader.close()
                self._call_idx = None  # never started: nothing in flight, nothing to report
                raise
            finally:
                if gc_was_enabled:
                    gc.enable()
                writer.close()
            if self._order is not None:
                self._after = self._order.last_caller if self._order.predecessor() else None
                self._order.forked(process.pid, self)
            # The child has its own copy of the arguments: do not keep the staged views.
            process._args = ()  # type: ignore[attr-defined]
            self.process, self._conn, self._watch = process, reader, DeathWatch(process)
            live_callers.add(self)

    def in_flight(self) -> list[int]:
        return [self._call_idx] if self._call_idx is not None and not self._reported else []

    def running_since(self, call_idx: int) -> float | None:
        """When its request began: when the child was forked, or, if it waited for the
        child before it, when that one exited (None while it still waits: the earlier
        child's own deadline bounds that wait)."""
        if call_idx != self._call_idx or self.start_time is None:
            return None
        after = self._after
        if after is not None:
            if after.ended_at is None:
                return None
            # Let go of it: callers must not chain each other for the queue's lifetime.
            self._after, self._after_ended = None, after.ended_at
        return max(self.start_time, self._after_ended)

    def wait_objects(self) -> list[Any]:
        with self._lock:
            if self._reported or self._watch is None:
                return []
            objects: list[Any] = [self._watch.wait_object()]
            if self._conn is not None and self._eof_at is None:
                objects.append(self._conn)
            return objects

    def deadline(self) -> float | None:
        if self._reported or self._watch is None:
            return None
        if self._eof_at is not None:
            return self._eof_at + EXIT_GRACE_S
        return self._watch.deadline()

    def collect(self) -> list[LocalOutcome]:
        with self._lock:
            news, self._news = self._news, []
            process, conn = self.process, self._conn
            if process is None or self._call_idx is None:
                return news
            if not self._reported and conn is not None and self._eof_at is None:
                try:
                    if conn.poll():
                        news.append(outcome_from_reply(conn.recv(), self.rank))
                        self._reported = True
                except (EOFError, OSError):
                    self._eof_at = time.monotonic()
            exited = process.exitcode is not None
            if exited and self.ended_at is None:
                self.ended_at = time.monotonic()
            if not self._reported:
                overdue = (
                    self._eof_at is not None and time.monotonic() >= self._eof_at + EXIT_GRACE_S
                )
                if exited or overdue:
                    if not exited:  # closed its pipe but did not exit: count it as dead
                        stop_process(process, 0.0)
                    news.append(crash_outcome(self._call_idx, self.rank, process.exitcode, True))
                    self._reported = True
                    exited = True
            if self._reported and exited:
                self._release_process()
            return news

    def _release_process(self) -> None:
        if self._watch is not None:
            self._watch.close()
            self._watch = None
        if self._conn is not None:
            self._conn.close()
        if self.process is not None:
            self.process.join(0)
            if self.process.exitcode is not None:
                self.process.close()
        if self.ended_at is None:
            self.ended_at = time.monotonic()
        self._conn, self.process, self._after = None, None, None
        live_callers.discard(self)

    def kill(self) -> None:
        with self._lock:
            if self.process is not None and not self._reported:
                self.process.kill()

    def shutdown(self, grace: float = STOP_GRACE_S) -> list[LocalOutcome]:
        with self._lock:
            news: list[LocalOutcome] = []
            if self.process is None:
                return news
            stop_process(self.process, grace, self.settings.sigterm_timeout)
            if not self._reported and self._call_idx is not None:
                news.append(crash_outcome(self._call_idx, self.rank, self.process.exitcode, True))
                self._reported = True
            self._release_process()
            return news
