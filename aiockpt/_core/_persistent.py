"""The persistent caller: one worker process (spawn or forkserver) that lives across
requests, is sent each staged request without copying its tensors, and serves them in
order."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import time
from collections import deque
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.context import BaseContext
from multiprocessing.process import BaseProcess
from typing import Any

from .._dist import CompletionGroup
from .._exceptions import InvalidRequestError
from .._options import WorkerSettings
from .._request import LocalOutcome
from .._staging._arena import StagingBuffers
from . import _transport, _worker
from ._callers import AsyncCaller, live_callers
from ._messages import Done, DropArena, Failed, LayOut, MapArena, Ready, Run, Started, Stop
from ._process import (
    EXIT_GRACE_S,
    START_HINT,
    STOP_GRACE_S,
    DeathWatch,
    crash_outcome,
    outcome_from_reply,
    stop_process,
)
from ._sender import Sender

# What the forkserver imports once, so that each worker forked from it starts in tens of
# milliseconds instead of importing torch again (about 2 s of CPU).
_PRELOAD = ("torch", "aiockpt._core._worker")
_SENDER_STOP_S = 5.0  # how long a dead worker's sender may take to notice


def worker_context(start_method: str) -> BaseContext:
    """The multiprocessing context a persistent worker starts in. With ``"forkserver"``,
    torch and the worker module are added to the forkserver's preload list (the modules
    the program already asked for are kept) if the forkserver has not started yet."""
    ctx = mp.get_context(start_method)
    if start_method == "forkserver":
        from multiprocessing import forkserver

        server = getattr(forkserver, "_forkserver", None)
        running = getattr(server, "_forkserver_pid", None) is not None
        current = list(getattr(server, "_preload_modules", None) or ["__main__"])
        wanted = current + [m for m in _PRELOAD if m not in current]
        if not running and wanted != current:
            ctx.set_forkserver_preload(wanted)
    return ctx


def _start_forkserver() -> None:
    """Start the forkserver now (it returns at once; the server imports torch on its own),
    so that by the first save its import is done: the first worker start waits for it."""
    from multiprocessing import forkserver

    worker_context("forkserver")
    with contextlib.suppress(Exception):  # the first start will say what is wrong
        forkserver.ensure_running()


class PersistentAsyncCaller(AsyncCaller):
    """One long-lived worker process that serves requests in order.

    The worker is started (``start_method``: ``"forkserver"``, torch preloaded, or
    ``"spawn"``) on the first
    request, or by :meth:`start`, and lives across saves, so no save pays for a fork.
    Requests and their results cross a socket; staged tensors cross as references into
    shared staging buffers. The request's function and arguments must be picklable
    (module-level functions). If the worker dies, every request in flight fails and the
    next request starts a new worker.
    """

    def __init__(
        self,
        start_method: str = "forkserver",
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
        if start_method == "forkserver":
            _start_forkserver()
        self.process: BaseProcess | None = None
        self._watch: DeathWatch | None = None
        self._conn: Connection | None = None
        self._sender: Sender | None = None  # sends to the worker, never blocking the caller
        self._inflight: deque[int] = deque()
        # Sent but not started by the worker: resent to a new worker if this one dies.
        self._unstarted: dict[int, tuple[bytes, StagingBuffers | None]] = {}
        self._resent: set[int] = set()
        self._killed = False  # kill() was asked for: what was in flight fails
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
        if (
            self._conn is not None
            and self.process is not None
            and self.process.exitcode is not None
        ):
            # Died since we last looked: what it had not started goes to the next worker
            # (which resending starts).
            self._worker_gone(resend=True)
        if self._conn is not None:
            return self._conn
        ctx = worker_context(self.start_method)
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
        assert process.pid is not None
        self._sender = Sender(parent_end, process.pid)
        self._layouts, self._killed = {}, False
        self._watch = DeathWatch(process)
        self._ready, self._eof_at = False, None
        self.starts += 1
        live_callers.add(self)
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
            self._send_run(call_idx, payload, buffers)
            self._inflight.append(call_idx)

    def _send_run(self, call_idx: int, payload: bytes, buffers: StagingBuffers | None) -> None:
        self._ensure_worker()
        sender = self._sender
        assert sender is not None
        self._sync_arenas(sender, buffers)
        sender.send(Run(call_idx, payload))  # queued: a worker that does not read blocks no one
        self._unstarted[call_idx] = (payload, buffers)
        if not self._inflight:
            self._head_since = time.monotonic()

    def _sync_arenas(self, sender: Sender, buffers: StagingBuffers | None) -> None:
        live = {a.id: a for a in buffers.arenas} if buffers is not None else {}
        for arena_id in self._mapped - live.keys():
            sender.send(DropArena(arena_id))
            self._mapped.discard(arena_id)
            self._layouts.pop(arena_id, None)
        for arena_id, arena in live.items():
            if arena_id not in self._mapped:
                sender.send(MapArena(arena_id, arena.nbytes))
                sender.send_fd(arena.fd)
                self._mapped.add(arena_id)
            plan, version = arena.plan, arena.layout_version
            if plan is not None and self._layouts.get(arena_id) != version:
                sender.send(LayOut(arena_id, version, plan))
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
        elif isinstance(msg, Started):
            self._unstarted.pop(msg.call_idx, None)
        elif isinstance(msg, Done | Failed):
            self._unstarted.pop(msg.call_idx, None)
            self._resent.discard(msg.call_idx)
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
                    self._worker_gone(start_overdue, resend=not start_overdue)
            news, self._news = self._news, []
            return news

    def _worker_gone(self, start_overdue: bool = False, resend: bool = False) -> None:
        """The worker died (or stopped answering): the requests it had started failed;
        with ``resend``, those it had not started go to a new worker (once each), unless
        the worker was killed on purpose."""
        exitcode = None
        if self.process is not None:
            stop_process(self.process, 0.0 if self._eof_at is None else EXIT_GRACE_S)
            exitcode = self.process.exitcode
        again: list[tuple[int, bytes, StagingBuffers | None]] = []
        if resend and not self._killed:
            for call_idx in self._inflight:
                if call_idx in self._unstarted and call_idx not in self._resent:
                    again.append((call_idx, *self._unstarted[call_idx]))
        self._disconnect()
        resent = {call_idx for call_idx, _, _ in again}
        self._crashed([c for c in self._inflight if c not in resent], exitcode, start_overdue)
        self._inflight = deque(a[0] for a in again)
        self._unstarted = {}
        for call_idx, payload, buffers in again:
            self._resent.add(call_idx)
            self._send_run(call_idx, payload, buffers)
        if again:
            self._head_since = time.monotonic()

    def _crashed(self, calls: list[int], exitcode: int | None, start_overdue: bool) -> None:
        hint = "" if self._ready else START_HINT
        if start_overdue:
            hint = (
                f" The worker was not ready within start_timeout={self.settings.start_timeout}s"
                " and was killed: its import may hang (a lock, a network filesystem, your "
                "main module doing work at import; a spawned worker imports it)."
            )
        for call_idx in calls:
            started = call_idx not in self._unstarted
            self._news.append(crash_outcome(call_idx, self.rank, exitcode, started, hint))

    def _disconnect(self) -> None:
        """Forget the (stopped) worker: its sender, connection and process."""
        if self._watch is not None:
            self._watch.close()
        # The worker is dead, so a send in progress fails at once; the connection is
        # closed only once no thread writes to it (its descriptor could be reused).
        stopped = self._sender is None or self._sender.stop(_SENDER_STOP_S)
        if self._conn is not None and stopped:
            self._conn.close()
        if self.process is not None:
            self.process.close()
        self.process, self._conn, self._mapped, self._eof_at = None, None, set(), None
        self._watch, self._sender = None, None
        live_callers.discard(self)

    def kill(self) -> None:
        """Kill the worker at once (SIGKILL); its requests in flight fail."""
        with self._lock:
            if self.process is not None:
                self._killed = True
                self.process.kill()

    def shutdown(self, grace: float = STOP_GRACE_S) -> list[LocalOutcome]:
        with self._lock:
            if self.process is not None and self._sender is not None:
                self._sender.send(Stop())
                stop_process(
                    self.process,
                    grace if not self._inflight else 0.0,
                    self.settings.sigterm_timeout,
                )
            if self.process is not None:
                self._worker_gone()
            news, self._news = self._news, []
            return news
