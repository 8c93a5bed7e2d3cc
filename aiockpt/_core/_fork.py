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
from ._messages import Started
from ._process import (
    EXIT_GRACE_S,
    STOP_GRACE_S,
    DeathWatch,
    crash_outcome,
    outcome_from_reply,
    readable,
    stop_process,
)


class ForkOrder:
    """Makes forked children run their requests one after another, in the order they were
    forked, as the persistent worker does: with several staging copies, several children
    may live at once, and each waits for every child forked before it to exit before it
    starts, so that saves to one path are renamed in the order they were scheduled (even
    when a child in the middle is killed).

    It holds a pidfd of each child that may still run; a new child inherits them through
    the fork and waits until all are readable (those children have exited). A pidfd names
    one process, so a reused pid cannot be mistaken for it. Where pidfds are missing,
    children are not ordered."""

    def __init__(self) -> None:
        self._live: list[int] = []
        self._lock = threading.Lock()

    def predecessors(self) -> tuple[int, ...]:
        """The pidfds the next child waits for (kept open by this object); those of
        children that have exited are closed first."""
        with self._lock:
            if self._live:
                done = readable(self._live, 0)
                for fd in done:
                    os.close(fd)
                self._live = [fd for fd in self._live if fd not in done]
            return tuple(self._live)

    def forked(self, pid: int | None) -> None:
        """A child was forked: the next ones wait for it."""
        if pid is None or not hasattr(os, "pidfd_open"):
            return
        with self._lock, contextlib.suppress(OSError):
            self._live.append(os.pidfd_open(pid))

    def close(self) -> None:
        with self._lock:
            for fd in self._live:
                os.close(fd)
            self._live = []


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
        # Written by the child (CLOCK_MONOTONIC, shared by every process) when its request
        # starts, after it waited for the children before it: its deadline counts from then.
        self._started: Any = None
        # Duplicates of the pidfds of the children ours waits for, and when they were all
        # seen to have exited: a child that does not start then (stopped, say) is given
        # its save_timeout from that moment.
        self._waits_for: list[int] = []
        self._free_since: float | None = None

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
            self.start_time = time.monotonic()
            if fn is None:
                self._call_idx = call_idx
                self._reported = True
                self._news.append(LocalOutcome(call_idx))
                return
            # Nothing is in flight until the child exists: a failure before the fork (out
            # of descriptors, say) leaves no call that nobody will ever report.
            ctx = mp.get_context("fork")
            started = self._started = ctx.RawValue("d", 0.0)
            before = self._order.predecessors() if self._order is not None else ()
            reader, writer = ctx.Pipe(duplex=False)
            self._call_idx = call_idx
            process = ctx.Process(  # (made before the fork: cannot fail afterwards)
                target=_worker.fork_child_main,
                args=(
                    writer,
                    call_idx,
                    fn,
                    args,
                    kwargs,
                    self.settings.cpu_priority,
                    self.settings.io_priority,
                    before,
                    started,
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
                self._waits_for = [os.dup(fd) for fd in before]
                self._order.forked(process.pid)
            # The child has its own copy of the arguments: do not keep the staged views.
            process._args = ()  # type: ignore[attr-defined]
            self.process, self._conn, self._watch = process, reader, DeathWatch(process)
            live_callers.add(self)

    def in_flight(self) -> list[int]:
        return [self._call_idx] if self._call_idx is not None and not self._reported else []

    def running_since(self, call_idx: int) -> float | None:
        """When its request began in the child, after it waited for the children forked
        before it; or, if it has not begun, when those had all exited (a child stopped or
        stuck before starting still gets its deadline). None while it rightly waits:
        those children's own deadlines bound that."""
        if call_idx != self._call_idx or self.start_time is None:
            return None
        if self._started is None:  # nothing was forked (no function)
            return self.start_time
        began = float(self._started.value)
        if began > 0:
            return began
        return self._predecessors_done()

    def _predecessors_done(self) -> float | None:
        if self._free_since is None and self._pending_predecessors():
            return None
        return self._free_since

    def _pending_predecessors(self) -> list[int]:
        """The pidfds of the children before it that still run; once there are none,
        records when that was first seen (``_free_since``)."""
        done = readable(self._waits_for, 0) if self._waits_for else []
        pending = [fd for fd in self._waits_for if fd not in done]
        if not pending and self._free_since is None:
            self._free_since = time.monotonic()
        return pending

    def _began(self) -> bool:
        """Whether the child got past waiting for the children before it."""
        return self._started is None or float(self._started.value) > 0

    def wait_objects(self) -> list[Any]:
        with self._lock:
            if self._reported or self._watch is None:
                return []
            objects: list[Any] = [self._watch.wait_object()]
            if self._conn is not None and self._eof_at is None:
                objects.append(self._conn)
            if self._free_since is None and not self._began():
                # The children before it: their exit arms this child's deadline. Only
                # those still running: an exited one is always readable (a busy loop).
                objects.extend(self._pending_predecessors())
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
            # Looked at before the pipe is read: a child writes its reply before it exits,
            # so one seen to have exited has its reply (if any) in the pipe by now.
            exited = process.exitcode is not None
            if not self._reported and conn is not None and self._eof_at is None:
                try:
                    while conn.poll():
                        reply = conn.recv()
                        if isinstance(reply, Started):  # it waited, and begins now
                            continue
                        news.append(outcome_from_reply(reply, self.rank))
                        self._reported = True
                        break
                except (EOFError, OSError):
                    self._eof_at = time.monotonic()
            if not self._reported:
                overdue = (
                    self._eof_at is not None and time.monotonic() >= self._eof_at + EXIT_GRACE_S
                )
                if exited or overdue:
                    if not exited:  # closed its pipe but did not exit: count it as dead
                        stop_process(process, 0.0)
                    news.append(
                        crash_outcome(self._call_idx, self.rank, process.exitcode, self._began())
                    )
                    self._reported = True
                    exited = True
            if self._reported and (exited or process.exitcode is not None):
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
        self._conn, self.process = None, None
        for fd in self._waits_for:
            os.close(fd)
        self._waits_for = []
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
                news.append(
                    crash_outcome(self._call_idx, self.rank, self.process.exitcode, self._began())
                )
                self._reported = True
            self._release_process()
            return news
