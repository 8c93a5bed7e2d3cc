"""Callers: the processes that run requests, and the non-blocking "is it done?" question.

``TemporalAsyncCaller`` forks one child per request; ``PersistentAsyncCaller`` keeps one
worker (started with spawn or forkserver) that serves requests in order across saves. Both
report each request as a :class:`LocalOutcome`; a worker that dies is reported as a
:class:`WorkerCrashedError` as soon as its end of the connection closes, never as success.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import multiprocessing as mp
import pickle
import signal
import time
import weakref
from abc import ABC, abstractmethod
from collections import deque
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from multiprocessing.reduction import send_handle
from typing import Any

from . import _transport, _worker
from ._dist import CompletionGroup, get_rank, is_distributed, settle
from ._exceptions import InvalidRequestError, WorkerCrashedError, WorkerError
from ._request import AsyncRequest, LocalOutcome
from ._staging import StagingBuffers

# How long a worker that closed its connection gets to exit before it counts as hung.
_EXIT_GRACE_S = 1.0

_live_callers: weakref.WeakSet[AsyncCaller] = weakref.WeakSet()


def _close_live_callers() -> None:
    # Runs before multiprocessing's own exit handler (registered earlier, so run later):
    # lets workers finish the checkpoints they are writing, then stops them.
    for caller in list(_live_callers):
        with contextlib.suppress(Exception):
            caller.close()


atexit.register(_close_live_callers)


def _describe_exit(exitcode: int | None) -> str:
    if exitcode is None:
        return "stopped answering"
    if exitcode < 0:
        try:
            return f"was killed by signal {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"was killed by signal {-exitcode}"
    return f"exited with code {exitcode}"


def outcome_from_reply(reply: tuple[Any, ...], rank: int) -> LocalOutcome:
    """Turn a worker's ``done``/``error`` reply into a :class:`LocalOutcome`."""
    kind, call_idx, seconds = reply[0], reply[1], reply[2]
    if kind == "done":
        return LocalOutcome(call_idx, result=pickle.loads(reply[3]), run_seconds=seconds)
    exc_type, exc_message, tb = reply[3], reply[4], reply[5]
    error = WorkerError(
        f"checkpoint call {call_idx} failed on rank {rank} in the worker process: "
        f"{exc_type}: {exc_message}\n--- worker traceback ---\n{tb.rstrip()}",
        call_idx=call_idx,
        rank=rank,
        exc_type=exc_type,
        exc_message=exc_message,
        worker_traceback=tb,
    )
    return LocalOutcome(call_idx, error=error, run_seconds=seconds)


_START_HINT = (
    " The worker died before it finished starting: its stderr says why. A worker started "
    "with spawn or forkserver imports your main module, so code that starts training must "
    "sit under `if __name__ == '__main__':`."
)


def crash_outcome(
    call_idx: int, rank: int, exitcode: int | None, started: bool, hint: str = ""
) -> LocalOutcome:
    """The outcome of a request whose worker died (while running it, or before it)."""
    what = "while writing it" if started else "before it started (it was queued behind another)"
    error = WorkerCrashedError(
        f"the checkpoint worker of call {call_idx} on rank {rank} {_describe_exit(exitcode)} "
        f"{what}; the checkpoint was not written. The next request starts a fresh worker."
        f"{hint}",
        call_idx=call_idx,
        rank=rank,
        exitcode=exitcode,
    )
    return LocalOutcome(call_idx, error=error)


class AsyncCaller(ABC):
    """Runs requests in another process and answers whether each one is done."""

    def __init__(self, completion: CompletionGroup | None = None) -> None:
        self.rank: int = get_rank()
        self.completion = completion if completion is not None else CompletionGroup()
        self.outcomes: dict[int, LocalOutcome] = {}
        self._current: deque[int] = deque()  # scheduled, not yet acknowledged, in order

    @abstractmethod
    def schedule_async_call(
        self, async_req: AsyncRequest, buffers: StagingBuffers | None = None
    ) -> None:
        """Start ``async_req`` (its ``call_idx`` set) in the worker; returns at once.

        ``preload_fn`` runs here if the request still has one. ``buffers`` are the staging
        buffers the request's tensors were copied to, if any.
        """

    @abstractmethod
    def _collect(self, timeout: float | None) -> None:
        """Read what the worker reported, waiting up to ``timeout`` seconds for news."""

    @abstractmethod
    def in_flight(self, call_idx: int) -> bool:
        """Whether the worker still owes a report about ``call_idx``."""

    @abstractmethod
    def wait_objects(self) -> list[Any]:
        """Objects that ``multiprocessing.connection.wait`` sees ready when there is news."""

    @abstractmethod
    def close(self) -> None:
        """Wait for the requests in flight, then stop the worker. Idempotent."""

    def poll(self, call_idx: int, timeout: float | None = 0.0) -> LocalOutcome | None:
        """This rank's outcome of ``call_idx``: None while it runs. ``timeout=0`` never
        blocks; ``None`` waits until the worker reports or dies."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while call_idx not in self.outcomes:
            if not self.in_flight(call_idx):
                raise InvalidRequestError(f"call {call_idx} was never scheduled on this caller")
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            self._collect(left)
            if left == 0.0 and call_idx not in self.outcomes:
                return None
        return self.outcomes[call_idx]

    def acknowledge(self, call_idx: int) -> None:
        """Forget ``call_idx``: its outcome has been consumed."""
        self.outcomes.pop(call_idx, None)
        with contextlib.suppress(ValueError):
            self._current.remove(call_idx)

    def is_current_async_call_done(self, blocking: bool = False, no_dist: bool = False) -> bool:
        """Whether the oldest request of this caller is done on all ranks (the reference's
        question). Unlike the reference, a failed request raises its CheckpointError.

        With ``no_dist=False`` in a distributed job, every rank must call this in lockstep.
        """
        if not self._current:
            return True
        call_idx = self._current[0]
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


class TemporalAsyncCaller(AsyncCaller):
    """Forks one child process per request (the reference's default caller).

    Fork is what makes this caller cheap: the child sees the staged tensors without any
    transfer. The child disables its garbage collector so it never frees the parent's CUDA
    tensors, and it never touches CUDA. Prefer :class:`PersistentAsyncCaller` in programs
    that run threads which may hold locks at the moment of the fork.
    """

    def __init__(self, completion: CompletionGroup | None = None) -> None:
        super().__init__(completion)
        self.process: BaseProcess | None = None
        self._conn: Connection | None = None
        self._call_idx: int | None = None
        self.start_time: float | None = None

    def schedule_async_call(
        self, async_req: AsyncRequest, buffers: StagingBuffers | None = None
    ) -> None:
        if self._call_idx is not None:
            raise InvalidRequestError(
                "a TemporalAsyncCaller runs one request; create a new caller per request"
            )
        args = async_req.prepared_args()
        call_idx = async_req.call_idx
        self._call_idx = call_idx
        self._current.append(call_idx)
        self.start_time = time.monotonic()
        if async_req.async_fn is None:
            self.outcomes[call_idx] = LocalOutcome(call_idx)
            return
        ctx = mp.get_context("fork")
        reader, writer = ctx.Pipe(duplex=False)
        process = ctx.Process(
            target=_worker.fork_child_main,
            args=(writer, call_idx, async_req.async_fn, args, async_req.async_fn_kwargs),
            name=f"aiockpt-save-{call_idx}",
        )
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            process.start()
        finally:
            if gc_was_enabled:
                gc.enable()
            writer.close()
        self.process, self._conn = process, reader
        _live_callers.add(self)

    def in_flight(self, call_idx: int) -> bool:
        return call_idx == self._call_idx and self.process is not None

    def wait_objects(self) -> list[Any]:
        if self._conn is None or self.process is None:
            return []
        return [self._conn, self.process.sentinel]

    def _collect(self, timeout: float | None) -> None:
        if self._conn is None or self.process is None or self._call_idx is None:
            return
        if not wait(self.wait_objects(), timeout):
            return
        reply = None
        if self._conn.poll():
            with contextlib.suppress(EOFError, OSError):
                reply = self._conn.recv()
        self.process.join(_EXIT_GRACE_S if reply is None else None)
        if self.process.is_alive():  # closed its pipe but did not exit: count it as dead
            self.process.kill()
            self.process.join()
        if reply is not None:
            outcome = outcome_from_reply(reply, self.rank)
        else:
            outcome = crash_outcome(self._call_idx, self.rank, self.process.exitcode, True)
        self.outcomes[self._call_idx] = outcome
        self._release_process()

    def _release_process(self) -> None:
        if self._conn is not None:
            self._conn.close()
        if self.process is not None:
            self.process.close()
        self._conn, self.process = None, None
        _live_callers.discard(self)

    def close(self) -> None:
        if self._call_idx is not None and self.process is not None:
            self.poll(self._call_idx, None)


class PersistentAsyncCaller(AsyncCaller):
    """One long-lived worker process that serves requests in order.

    The worker is started (``start_method``: ``"spawn"`` or ``"forkserver"``) on the first
    request and lives across saves, so no save pays for a fork. Requests and their results
    cross a socket; staged tensors cross as references into shared staging buffers. The
    request's function and arguments must be picklable (module-level functions). If the
    worker dies, every request in flight fails and the next request starts a new worker.
    """

    def __init__(
        self, start_method: str = "spawn", completion: CompletionGroup | None = None
    ) -> None:
        if start_method not in ("spawn", "forkserver"):
            raise InvalidRequestError(
                f"start_method must be 'spawn' or 'forkserver', not {start_method!r}; "
                "use TemporalAsyncCaller for fork"
            )
        super().__init__(completion)
        self.start_method = start_method
        self.process: BaseProcess | None = None
        self._conn: Connection | None = None
        self._inflight: deque[int] = deque()
        self._mapped: set[int] = set()
        self._ready = False  # the current worker has said hello
        self.starts = 0  # workers started so far

    def start(self) -> None:
        """Start the worker now rather than at the first request (it imports torch)."""
        self._ensure_worker()

    def _ensure_worker(self) -> Connection:
        if self._conn is not None and self.process is not None and self.process.is_alive():
            return self._conn
        if self._conn is not None:
            self._worker_died()
        ctx = mp.get_context(self.start_method)
        parent_end, child_end = ctx.Pipe(duplex=True)
        process = ctx.Process(  # type: ignore[attr-defined]
            target=_worker.persistent_main, args=(child_end,), name="aiockpt-worker"
        )
        process.start()
        # Our copy of the child's end must go, or a dead worker would never read as EOF.
        child_end.close()
        self.process, self._conn, self._mapped = process, parent_end, set()
        self._ready = False
        self.starts += 1
        _live_callers.add(self)
        return parent_end

    def schedule_async_call(
        self, async_req: AsyncRequest, buffers: StagingBuffers | None = None
    ) -> None:
        args = async_req.prepared_args()
        call_idx = async_req.call_idx
        try:
            payload = _transport.dumps(
                (async_req.async_fn, args, async_req.async_fn_kwargs), buffers
            )
        except Exception as exc:
            raise InvalidRequestError(
                f"call {call_idx} cannot be sent to the persistent worker: {exc}. Its function "
                "and arguments must be picklable (a module-level function, not a lambda or "
                "closure); or use persistent=False to fork instead",
                call_idx=call_idx,
                rank=self.rank,
            ) from exc
        for attempt in (1, 2):
            conn = self._ensure_worker()
            try:
                self._sync_arenas(conn, buffers)
                conn.send(("run", call_idx, payload))
                break
            except OSError:  # the worker died since we last looked: start a fresh one
                self._worker_died()
                if attempt == 2:
                    raise
        self._inflight.append(call_idx)
        self._current.append(call_idx)

    def _sync_arenas(self, conn: Connection, buffers: StagingBuffers | None) -> None:
        live = {a.id: a for a in buffers.arenas} if buffers is not None else {}
        for arena_id in self._mapped - live.keys():
            conn.send(("drop", arena_id))
            self._mapped.discard(arena_id)
        assert self.process is not None and self.process.pid is not None
        for arena_id, arena in live.items():
            if arena_id not in self._mapped:
                conn.send(("arena", arena_id, arena.nbytes))
                send_handle(conn, arena.fd, self.process.pid)
                self._mapped.add(arena_id)

    def in_flight(self, call_idx: int) -> bool:
        return call_idx in self._inflight

    def wait_objects(self) -> list[Any]:
        return [self._conn] if self._conn is not None and self._inflight else []

    def _collect(self, timeout: float | None) -> None:
        conn = self._conn
        if conn is None or not self._inflight:
            return
        if not wait([conn], timeout):
            return
        try:
            while conn.poll():
                reply = conn.recv()
                if reply[0] == "ready":
                    self._ready = True
                elif reply[0] in ("done", "error"):
                    self._inflight.remove(reply[1])
                    self.outcomes[reply[1]] = outcome_from_reply(reply, self.rank)
        except (EOFError, OSError):
            self._worker_died()

    def _worker_died(self) -> None:
        """The worker's end closed: every request in flight failed; forget the worker."""
        exitcode = None
        if self.process is not None:
            self.process.join(_EXIT_GRACE_S)
            if self.process.is_alive():
                self.process.kill()
                self.process.join()
            exitcode = self.process.exitcode
        hint = "" if self._ready else _START_HINT
        for position, call_idx in enumerate(self._inflight):
            self.outcomes[call_idx] = crash_outcome(
                call_idx, self.rank, exitcode, position == 0, hint
            )
        self._inflight.clear()
        if self._conn is not None:
            self._conn.close()
        if self.process is not None:
            self.process.close()
        self.process, self._conn, self._mapped = None, None, set()
        _live_callers.discard(self)

    def close(self) -> None:
        while self._inflight:
            self._collect(None)
        if self.process is None or self._conn is None:
            return
        with contextlib.suppress(OSError):
            self._conn.send(("stop",))
        self.process.join(10.0)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self._conn.close()
        self.process.close()
        self.process, self._conn = None, None
        _live_callers.discard(self)

    def kill(self) -> None:
        """Kill the worker at once (SIGKILL), failing the requests in flight."""
        if self.process is not None:
            self.process.kill()
            self._worker_died()
