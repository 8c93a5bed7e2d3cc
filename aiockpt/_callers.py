"""Callers: the processes that run requests, and the non-blocking "is it done?" question.

``TemporalAsyncCaller`` forks one child per request; ``PersistentAsyncCaller`` keeps one
worker (started with spawn or forkserver) that serves requests in order across saves. Both
report each request as a :class:`LocalOutcome`; a worker that dies is reported as a
:class:`WorkerCrashedError`, seen through a pidfd of the worker process (so a helper process that
inherited the connection cannot hide the death) as well as through its connection.

The engine drives a caller through a narrow protocol: ``run`` starts a request,
``wait_objects`` are what to wait on for news, ``collect`` reads the news without blocking,
``kill`` and ``shutdown`` stop the worker. The reference's own methods
(``schedule_async_call``, ``is_current_async_call_done``, ``close``) sit on top of it.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import multiprocessing as mp
import os
import pickle
import signal
import threading
import time
import weakref
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from multiprocessing.reduction import send_handle
from typing import Any

from . import _transport, _worker
from ._dist import CompletionGroup, get_rank, is_distributed, settle
from ._exceptions import InvalidRequestError, WorkerCrashedError, WorkerError
from ._messages import Done, DropArena, Failed, LayOut, MapArena, Ready, Reply, Run, Stop
from ._options import WorkerSettings
from ._request import AsyncRequest, LocalOutcome
from ._staging import StagingBuffers

# How long a worker that closed its connection gets to exit before it counts as dead.
EXIT_GRACE_S = 1.0
# How long a stopped worker gets to exit on its own before it is killed.
STOP_GRACE_S = 10.0

_live_callers: weakref.WeakSet[AsyncCaller] = weakref.WeakSet()


def _close_live_callers() -> None:
    # Runs before multiprocessing's own exit handler (registered earlier, so run later):
    # lets workers finish the checkpoints they are writing, then stops them.
    for caller in list(_live_callers):
        with contextlib.suppress(Exception):
            caller.close()


atexit.register(_close_live_callers)


def stop_process(process: BaseProcess, grace: float, sigterm_timeout: float = 0.0) -> None:
    """Wait up to ``grace`` seconds for ``process`` to exit, then send it SIGTERM, give it
    ``sigterm_timeout`` seconds more, then SIGKILL it; reap it either way."""
    process.join(grace)
    if process.is_alive() and sigterm_timeout > 0:
        process.terminate()
        process.join(sigterm_timeout)
    if process.is_alive():
        process.kill()
        process.join()


# Without pidfds, how often a running worker's liveness is checked (waitpid) at the least.
LIVENESS_POLL_S = 0.5


class DeathWatch:
    """What becomes ready when a child process dies, whatever it passed on to its own
    children: a pidfd where the kernel has them. (``Process.sentinel`` is a pipe that a
    grandchild inherits, so it stays open while the grandchild lives.) Without pidfds,
    :meth:`deadline` asks for a ``waitpid`` check every :data:`LIVENESS_POLL_S` seconds."""

    def __init__(self, process: BaseProcess) -> None:
        self.process = process
        self.fd: int | None = None
        if hasattr(os, "pidfd_open") and process.pid is not None:
            with contextlib.suppress(OSError):
                self.fd = os.pidfd_open(process.pid)

    def wait_object(self) -> Any:
        return self.fd if self.fd is not None else self.process.sentinel

    def deadline(self) -> float | None:
        return None if self.fd is not None else time.monotonic() + LIVENESS_POLL_S

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _describe_exit(exitcode: int | None) -> str:
    if exitcode is None:
        return "stopped answering"
    if exitcode < 0:
        try:
            return f"was killed by signal {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"was killed by signal {-exitcode}"
    return f"exited with code {exitcode}"


def outcome_from_reply(reply: Reply, rank: int) -> LocalOutcome:
    """Turn a worker's :class:`Done`/:class:`Failed` reply into a :class:`LocalOutcome`;
    a result that cannot be unpickled here is that call's failure."""
    call_idx = reply.call_idx
    if isinstance(reply, Done):
        try:
            result = pickle.loads(reply.payload)
        except Exception as exc:
            return LocalOutcome(
                call_idx,
                error=WorkerError(
                    f"checkpoint call {call_idx} on rank {rank} finished in the worker, but its "
                    f"result could not be unpickled in the caller: {type(exc).__name__}: {exc}. "
                    "Return plain values (or None) from the checkpoint function",
                    call_idx=call_idx,
                    rank=rank,
                    exc_type=type(exc).__name__,
                    exc_message=str(exc),
                ),
                run_seconds=reply.seconds,
            )
        return LocalOutcome(call_idx, result=result, run_seconds=reply.seconds)
    error = WorkerError(
        f"checkpoint call {call_idx} failed on rank {rank} in the worker process: "
        f"{reply.exc_type}: {reply.exc_message}\n--- worker traceback ---\n"
        f"{reply.traceback.rstrip()}",
        call_idx=call_idx,
        rank=rank,
        exc_type=reply.exc_type,
        exc_message=reply.exc_message,
        worker_traceback=reply.traceback,
    )
    return LocalOutcome(call_idx, error=error, run_seconds=reply.seconds)


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
                self.outcomes[outcome.call_idx] = outcome
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
            self.poll(call_idx, None)
        for outcome in self.shutdown():
            self.outcomes[outcome.call_idx] = outcome


class TemporalAsyncCaller(AsyncCaller):
    """Forks one child process per request (the reference's default caller).

    Fork is what makes this caller cheap: the child sees the staged tensors without any
    transfer. The child disables its garbage collector so it never frees the parent's CUDA
    tensors, and it never touches CUDA. Prefer :class:`PersistentAsyncCaller` in programs
    that run threads which may hold locks at the moment of the fork.
    """

    def __init__(
        self, completion: CompletionGroup | None = None, settings: WorkerSettings | None = None
    ) -> None:
        super().__init__(completion, settings)
        self.process: BaseProcess | None = None
        self._watch: DeathWatch | None = None
        self._conn: Connection | None = None
        self._call_idx: int | None = None
        self._reported = False
        self._eof_at: float | None = None  # the child closed its pipe without a reply
        self._news: list[LocalOutcome] = []
        self.start_time: float | None = None

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
            # The child has its own copy of the arguments: do not keep the staged views.
            process._args = ()  # type: ignore[attr-defined]
            self.process, self._conn, self._watch = process, reader, DeathWatch(process)
            _live_callers.add(self)

    def in_flight(self) -> list[int]:
        return [self._call_idx] if self._call_idx is not None and not self._reported else []

    def running_since(self, call_idx: int) -> float | None:
        return self.start_time if call_idx == self._call_idx else None

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
        self._conn, self.process = None, None
        _live_callers.discard(self)

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


class PersistentAsyncCaller(AsyncCaller):
    """One long-lived worker process that serves requests in order.

    The worker is started (``start_method``: ``"spawn"`` or ``"forkserver"``) on the first
    request, or by :meth:`start`, and lives across saves, so no save pays for a fork.
    Requests and their results cross a socket; staged tensors cross as references into
    shared staging buffers. The request's function and arguments must be picklable
    (module-level functions). If the worker dies, every request in flight fails and the
    next request starts a new worker.
    """

    def __init__(
        self,
        start_method: str = "spawn",
        completion: CompletionGroup | None = None,
        settings: WorkerSettings | None = None,
    ) -> None:
        if start_method not in ("spawn", "forkserver"):
            raise InvalidRequestError(
                f"start_method must be 'spawn' or 'forkserver', not {start_method!r}; "
                "use TemporalAsyncCaller for fork"
            )
        super().__init__(completion, settings)
        self.start_method = start_method
        self.process: BaseProcess | None = None
        self._watch: DeathWatch | None = None
        self._conn: Connection | None = None
        self._inflight: deque[int] = deque()
        self._mapped: set[int] = set()
        self._layouts: dict[int, int] = {}  # arena id -> layout version the worker has
        self._ready = False  # the current worker has said hello
        self._head_since: float | None = None  # when the oldest call in flight began
        self._eof_at: float | None = None
        self._news: list[LocalOutcome] = []
        self.starts = 0  # workers started so far

    def start(self) -> None:
        """Start the worker now rather than at the first request (it imports torch)."""
        with self._lock:
            self._ensure_worker()

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Start the worker if needed and wait until it has imported what it needs;
        returns whether it is ready. Call before the first save to keep it fast."""
        with self._lock:
            conn = self._ensure_worker()
            deadline = None if timeout is None else time.monotonic() + timeout
            while not self._ready:
                left = None if deadline is None else deadline - time.monotonic()
                if (left is not None and left <= 0) or not conn.poll(left):
                    return False
                self._read_one(conn)
                if self._conn is None:
                    return False
            return True

    def _ensure_worker(self) -> Connection:
        if self._conn is not None and self.process is not None and self.process.exitcode is None:
            return self._conn
        if self._conn is not None:
            self._worker_gone()
        ctx = mp.get_context(self.start_method)
        parent_end, child_end = ctx.Pipe(duplex=True)
        process = ctx.Process(  # type: ignore[attr-defined]
            target=_worker.persistent_main,
            args=(child_end, self.settings.cpu_priority, self.settings.io_priority),
            name="aiockpt-worker",
        )
        try:
            process.start()
        except BaseException:
            parent_end.close()
            raise
        finally:
            # Our copy of the child's end must go, or a dead worker would never read as EOF.
            child_end.close()
        self.process, self._conn, self._mapped = process, parent_end, set()
        self._layouts = {}
        self._watch = DeathWatch(process)
        self._ready, self._eof_at = False, None
        self.starts += 1
        _live_callers.add(self)
        return parent_end

    def run(
        self,
        call_idx: int,
        fn: Callable[..., Any] | None,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        buffers: StagingBuffers | None,
    ) -> None:
        try:
            payload = _transport.dumps((fn, args, kwargs), buffers)
        except Exception as exc:
            raise InvalidRequestError(
                f"call {call_idx} cannot be sent to the persistent worker: {exc}. Its function "
                "and arguments must be picklable (a module-level function, not a lambda or "
                "closure); or use persistent=False to fork instead",
                call_idx=call_idx,
                rank=self.rank,
            ) from exc
        with self._lock:
            for attempt in (1, 2):
                conn = self._ensure_worker()
                try:
                    self._sync_arenas(conn, buffers)
                    conn.send(Run(call_idx, payload))
                    if not self._inflight:
                        self._head_since = time.monotonic()
                    break
                except OSError:  # the worker died since we last looked: start a fresh one
                    self._worker_gone()
                    if attempt == 2:
                        raise
            self._inflight.append(call_idx)

    def _sync_arenas(self, conn: Connection, buffers: StagingBuffers | None) -> None:
        live = {a.id: a for a in buffers.arenas} if buffers is not None else {}
        for arena_id in self._mapped - live.keys():
            conn.send(DropArena(arena_id))
            self._mapped.discard(arena_id)
            self._layouts.pop(arena_id, None)
        assert self.process is not None and self.process.pid is not None
        for arena_id, arena in live.items():
            if arena_id not in self._mapped:
                conn.send(MapArena(arena_id, arena.nbytes))
                send_handle(conn, arena.fd, self.process.pid)
                self._mapped.add(arena_id)
            plan, version = arena.plan, arena.layout_version
            if plan is not None and self._layouts.get(arena_id) != version:
                conn.send(LayOut(arena_id, version, plan))
                self._layouts[arena_id] = version

    def in_flight(self) -> list[int]:
        return list(self._inflight)

    def running_since(self, call_idx: int) -> float | None:
        if self._inflight and self._inflight[0] == call_idx and self._ready:
            return self._head_since
        return None

    def wait_objects(self) -> list[Any]:
        with self._lock:
            if self._watch is None or not self._inflight:
                return []
            objects: list[Any] = [self._watch.wait_object()]
            if self._conn is not None and self._eof_at is None:
                objects.append(self._conn)
            return objects

    def _start_deadline(self) -> float | None:
        """While a request waits for the worker to be ready: when the wait ends."""
        if self._ready or not self._inflight or self._head_since is None:
            return None
        return self._head_since + self.settings.start_timeout

    def deadline(self) -> float | None:
        if self._eof_at is not None:
            return self._eof_at + EXIT_GRACE_S
        instants = [d for d in (self._start_deadline(),) if d is not None]
        if self._watch is not None and self._inflight and (d := self._watch.deadline()) is not None:
            instants.append(d)
        return min(instants) if instants else None

    def _read_one(self, conn: Connection) -> None:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            self._eof_at = time.monotonic()
            return
        if isinstance(msg, Ready):
            self._ready = True
            self._head_since = time.monotonic()
        elif isinstance(msg, Done | Failed):
            with contextlib.suppress(ValueError):
                self._inflight.remove(msg.call_idx)
            self._head_since = time.monotonic()  # the worker moves on to the next call
            self._news.append(outcome_from_reply(msg, self.rank))

    def collect(self) -> list[LocalOutcome]:
        with self._lock:
            conn, process = self._conn, self.process
            if conn is not None and process is not None:
                while self._eof_at is None and conn.poll():
                    self._read_one(conn)
                now = time.monotonic()
                overdue = self._eof_at is not None and now >= self._eof_at + EXIT_GRACE_S
                start_by = self._start_deadline()
                start_overdue = start_by is not None and now >= start_by
                if process.exitcode is not None or overdue or start_overdue:
                    self._worker_gone(start_overdue)
            news, self._news = self._news, []
            return news

    def _worker_gone(self, start_overdue: bool = False) -> None:
        """The worker died (or stopped answering): every request in flight failed."""
        exitcode = None
        if self.process is not None:
            stop_process(self.process, 0.0 if self._eof_at is None else EXIT_GRACE_S)
            exitcode = self.process.exitcode
        hint = "" if self._ready else _START_HINT
        if start_overdue:
            hint = (
                f" The worker was not ready within start_timeout={self.settings.start_timeout}s"
                " and was killed: its import may hang (a lock, a network filesystem, your "
                "main module doing work at import; a spawned worker imports it)."
            )
        for position, call_idx in enumerate(self._inflight):
            self._news.append(crash_outcome(call_idx, self.rank, exitcode, position == 0, hint))
        self._inflight.clear()
        if self._watch is not None:
            self._watch.close()
        if self._conn is not None:
            self._conn.close()
        if self.process is not None:
            self.process.close()
        self.process, self._conn, self._mapped, self._eof_at = None, None, set(), None
        self._watch = None
        _live_callers.discard(self)

    def kill(self) -> None:
        """Kill the worker at once (SIGKILL); its requests in flight fail."""
        with self._lock:
            if self.process is not None:
                self.process.kill()

    def shutdown(self, grace: float = STOP_GRACE_S) -> list[LocalOutcome]:
        with self._lock:
            if self.process is not None and self._conn is not None:
                with contextlib.suppress(OSError):
                    self._conn.send(Stop())
                stop_process(
                    self.process,
                    grace if not self._inflight else 0.0,
                    self.settings.sigterm_timeout,
                )
            if self.process is not None:
                self._worker_gone()
            news, self._news = self._news, []
            return news
