"""The asyncio-native facade: awaitable per-request futures and an event-loop poller.

Runs on any anyio backend (asyncio, uvloop, trio). The queue's life is one async context
manager whose two tasks run in a task group of their own, each in a shielded scope that
only the queue cancels, so a cancel scope of the caller never stops them:

- the *stager* hands each request, in scheduling order, to a thread of the queue's private
  limiter, which copies its tensors and starts it in the worker (``engine.schedule``);
- the *poller* sleeps on the readiness of the engine's file descriptors (worker
  connections, process sentinels, a wake-up pipe), collects replies without blocking and
  settles requests oldest first, resolving their futures on the loop. Only the distributed
  reduction and the finalize steps run in a thread, shielded once started.

Idle, no thread works for the queue and nothing ticks.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import math
import signal
import threading
import time
from collections import deque
from collections.abc import AsyncGenerator, Callable
from contextlib import asynccontextmanager
from types import TracebackType
from typing import Any

import anyio
import anyio.from_thread
import anyio.lowlevel
from anyio import AsyncContextManagerMixin, open_signal_receiver
from anyio.abc import TaskStatus
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from typing_extensions import Self, Unpack

from ._core._calls import Call
from ._core._engine import CallsEngine
from ._dist import CompletionGroup
from ._exceptions import (
    CheckpointCancelledError,
    CheckpointError,
    CheckpointErrorGroup,
    CloseTimeoutError,
    InvalidRequestError,
    QueueBrokenError,
    QueueClosedError,
    QueueMisuseError,
    StagingError,
)
from ._futures import CheckpointFuture, CheckpointResult
from ._loops import call_in_loop, ki_protected, run_to_end
from ._options import QueueKeywords, QueueOptions, build_options
from ._ranks import is_distributed
from ._request import AsyncRequest
from ._staging._arena import ready_event
from ._staging._tree import iter_tensors, path_of
from ._tracebacks import areleasing, detached, drop_locals

logger = logging.getLogger("aiockpt")


# request, its future, needs_global, the CUDA event its copy waits for (None without
# CUDA), and the check that no tensor changed since scheduling (lazy staging only)
# What the stager receives: the future, whether it settles across ranks, the CUDA event.
# The request itself (and its change check) waits in ``_to_stage`` by call index, so that
# a request withdrawn before its turn lets go of the caller's tensors at once.
_Staging = tuple[CheckpointFuture, bool, Any]
_FAILURES_KEPT = 1000  # failures() lists the latest ones
_LOOP_CHECK_WAIT_S = 5.0  # how long a lazy copy's check waits for the event loop
_NOT_OPEN = "the queue is not open: use `async with AsyncCheckpointQueue() as queue:`"


class _State(enum.IntEnum):
    """The queue's life, in order; closing moves forward one state at a time and can be
    resumed from any of them (an interrupted close is completed by the next one)::

        NEW ──► OPENING ──► OPEN ──► DRAINING ──► STOPPING ──► CLOSED
         └─────────────────────────────────────────────────────►┘  (closed before opened)

    OPENING: the worker is being started; ``aclose()`` waits for it, then closes.
    DRAINING: refuses new work, waits (up to the timeout) for the requests in flight.
    STOPPING: the tasks are cancelled and the worker is stopped (killed first if it must
    be: see ``_must_kill``). CLOSED: the worker is stopped.
    """

    NEW = 0
    OPENING = 1
    OPEN = 2
    DRAINING = 3
    STOPPING = 4
    CLOSED = 5


class AsyncCheckpointQueue(AsyncContextManagerMixin):
    """Schedules :class:`AsyncRequest` objects and resolves a future for each.

    Use it as an async context manager::

        async with AsyncCheckpointQueue() as queue:
            fut = await queue.schedule(request)   # returns once the tensors are staged
            ...
            result = await fut                     # finalized (on every rank)

    Args:
        persistent: one long-lived worker process (True, the default) or a forked process
            per request.
        no_dist: settle each request locally even inside a torch.distributed job.
        max_pending: how many requests may be in flight (scheduled, not resolved) before
            ``schedule`` waits for one to finish (None: bounded only by the staging
            buffers).
        options: a whole :class:`QueueOptions` instead of keywords (then pass none).
        **keywords: the other fields of :class:`QueueOptions`, as for
            :class:`CheckpointQueue` (``save_timeout``, ``start_timeout``, ``timeout``...).

    Leaving the ``async with`` (or ``aclose()``) waits for every request, up to
    ``timeout`` (then gives up on the rest with :class:`CloseTimeoutError` and stops the
    worker), runs their finalize steps, stops the worker, and raises every failure that
    nobody observed, as a :class:`CheckpointErrorGroup`. If the block itself raised (or
    was cancelled), that exception propagates, with the failures attached as notes and
    logged at ERROR. See ``docs/concepts/async.md``.
    """

    def __init__(
        self,
        persistent: bool = True,
        *,
        no_dist: bool = False,
        max_pending: int | None = None,
        options: QueueOptions | None = None,
        **keywords: Unpack[QueueKeywords],
    ) -> None:
        if max_pending is not None and max_pending < 1:
            raise InvalidRequestError(f"max_pending must be at least 1 or None, not {max_pending}")
        self.options = build_options(persistent, options, keywords)
        self.persistent = self.options.persistent
        self.no_dist = no_dist
        self.max_pending = max_pending
        self._room = anyio.Semaphore(max_pending) if max_pending else None
        self._timeout = self.options.timeout.total_seconds()
        self._engine: CallsEngine | None = None
        self._state = _State.NEW
        self._thread: int | None = None
        self._next_idx = 0
        self._futures: dict[int, CheckpointFuture] = {}  # scheduled, not resolved
        # Not yet covered by finalize() or the exit, nor retrieved through the future.
        self._unreported: dict[int, CheckpointFuture] = {}
        self._broken: QueueBrokenError | None = None  # a task died: no new work
        self._stage_send: MemoryObjectSendStream[_Staging] | None = None
        self._stage_receive: MemoryObjectReceiveStream[_Staging] | None = None
        self._task_scopes: list[anyio.CancelScope] = []
        self._tasks_left = 0
        self._queued_for_staging = 0  # sent to the stager, not yet staged (or skipped)
        # Requests (and their change checks) waiting for the stager, by call index.
        self._to_stage: dict[int, tuple[AsyncRequest, Callable[[], None] | None]] = {}
        self._finalizing: int | None = None  # the call whose finalize steps are running
        self._given_up: list[int] = []  # calls whose worker did not answer by the timeout
        self._reported_never_closed = False
        self._force: str | None = None  # the close was interrupted twice: stop waiting
        self._deferred: BaseException | None = None  # Ctrl-C/exit raised by user code
        self._interrupts = 0  # Ctrl-C (or exit) that reached the close
        self._signalled: KeyboardInterrupt | None = None  # Ctrl-C taken while draining
        # The latest failures, kept after close (their frames' locals dropped).
        self._failures: deque[CheckpointError] = deque(maxlen=_FAILURES_KEPT)
        self._owner: Any = None  # the asyncio task that opened the queue
        self._served: anyio.Event | None = None  # set once a served queue has closed
        self.polls = 0  # settle attempts made by the poller (one per request when healthy)

    @property
    def completion(self) -> CompletionGroup:
        """The group this queue's requests settle over (while it is open): a finalize
        step that must agree across ranks (a commit) reduces over it."""
        return self.engine.completion

    @property
    def engine(self) -> CallsEngine:
        """The engine behind the queue, while it is open (:class:`QueueMisuseError`
        otherwise). Internal: its interface may change."""
        if self._engine is None:
            raise QueueMisuseError(_NOT_OPEN)
        return self._engine

    def _is_closed(self) -> bool:
        return self._state is _State.CLOSED

    @property
    def _must_kill(self) -> bool:
        """Stop the worker with SIGKILL, not by asking: a task died, or a worker did not
        answer by the timeout (it may never answer)."""
        return self._broken is not None or bool(self._given_up)

    # -- life cycle ---------------------------------------------------------------------

    @asynccontextmanager
    async def __asynccontextmanager__(self) -> AsyncGenerator[Self]:
        if self._state is not _State.NEW:
            raise QueueMisuseError("an AsyncCheckpointQueue can be entered only once")
        await self._open()
        body_exc: BaseException | None = None
        close_exc: BaseException | None = None  # raised after the task group, ungrouped
        entered = self._entered_task = anyio.get_current_task().id
        left_elsewhere = False
        try:
            async with anyio.create_task_group() as tg:
                self._start_tasks(tg)
                try:
                    yield self
                except GeneratorExit:  # never left: the event loop is closing the block
                    if not self._is_closed():  # not closed by aclose() either
                        self._abandon()
                    raise
                except BaseException as exc:  # cancellation included: re-raised below
                    body_exc = exc
                left_elsewhere = anyio.get_current_task().id != entered
                close_exc = await self._close_inside()
                if body_exc is not None:
                    self._report_beside(body_exc)
        except BaseException as exc:
            if exc is not body_exc:
                self._report_beside(exc)
            if left_elsewhere and isinstance(exc, RuntimeError):
                raise QueueMisuseError(
                    "the queue's `async with` was left in another task than the one that "
                    "entered it: the queue was drained and closed, but the task group it "
                    "opened belongs to the entering task. To open and close the queue from "
                    "different tasks, run it as a service: `queue = await "
                    "tg.start(AsyncCheckpointQueue().serve)`, then `await queue.aclose()` "
                    "from any task"
                ) from exc
            raise
        if close_exc is not None:
            self._report_beside(close_exc)
            raise close_exc
        if body_exc is not None:
            if self._deferred is not None:  # Ctrl-C or exit from user code comes first
                deferred, self._deferred = self._deferred, None
                raise deferred from body_exc
            raise body_exc
        await self._after_close()

    async def serve(self, *, task_status: TaskStatus[Self] = anyio.TASK_STATUS_IGNORED) -> None:
        """Run the queue as a service in a task group the caller owns::

            async with anyio.create_task_group() as tg:
                queue = await tg.start(AsyncCheckpointQueue().serve)
                ...                      # any task of this event loop may use it
                await queue.aclose()     # from any task: drains, then serve() returns

        ``serve`` opens the queue, reports it through ``task_status`` and returns once
        :meth:`aclose` (from any task of the same loop) has closed it. Cancelling the task
        group closes it too: in-flight requests are drained first (shielded, up to the
        queue's timeout). The failures nobody observed are raised by ``aclose()``, and
        remain readable from :meth:`failures`.
        """
        if self._state is not _State.NEW:
            raise QueueMisuseError("an AsyncCheckpointQueue can be opened only once")
        await self._open()
        self._served = anyio.Event()
        ended: BaseException | None = None
        try:
            async with anyio.create_task_group() as tg:
                self._start_tasks(tg)
                task_status.started(self)
                try:
                    await self._served.wait()
                    self._stop_now()  # no-op unless the close in aclose() raised half-way
                except BaseException as exc:  # cancelled (or the loop ends): close here
                    ended = await self._close_inside() or exc
                    if self._deferred is not None:  # Ctrl-C or exit from user code first
                        deferred, self._deferred = self._deferred, None
                        deferred.__context__ = ended
                        ended = deferred
                    self._report_beside(ended)  # kept in failures() as well
        finally:
            self._served.set()
        if ended is not None:
            raise ended

    async def _close_inside(self) -> BaseException | None:
        """Close from inside the queue's task group; return what the close raised (Ctrl-C
        under trio, or a failure), for the caller to raise once the group has ended, so
        that it is not wrapped in an exception group. Whatever happened, the tasks and the
        worker are stopped, so the group can end."""
        try:
            await self._shutdown()
        except BaseException as exc:
            return exc
        finally:
            self._stop_now()
        return None

    def _start_tasks(self, tg: anyio.abc.TaskGroup) -> None:
        send, receive = anyio.create_memory_object_stream[_Staging](math.inf)
        self._stage_send, self._stage_receive = send, receive
        tg.start_soon(self._run_task, 0, "stager", self._stager)
        tg.start_soon(self._run_task, 1, "poller", self._poller)
        self._state = _State.OPEN
        self._opened.set()

    async def _after_close(self) -> None:
        """What the close owes the caller once it is done: a cancellation that came
        meanwhile, a ``KeyboardInterrupt``/``SystemExit`` raised by user code, and the
        failures nobody observed."""
        await self._deliver_cancellation()
        if self._deferred is not None:
            deferred, self._deferred = self._deferred, None
            self._report_beside(deferred)
            raise deferred
        self._raise_unreported()

    def _stop_now(self) -> None:
        """The close could not finish (it raised): stop the tasks and the worker at once,
        so that nothing waits for them."""
        for scope in self._task_scopes:
            scope.cancel()
        if self._state is _State.CLOSED or self._engine is None:
            return
        self._give_up("because closing raised before it finished")
        self._state = _State.CLOSED
        self._engine.kill_worker()
        self._engine.stop_workers()

    async def _deliver_cancellation(self) -> None:
        """Closing is shielded: a cancellation that came meanwhile is delivered now, with
        the failures nobody observed attached to it."""
        try:
            # A real checkpoint: an asyncio cancellation re-armed by a thread wait
            # (run_to_end) must be raised here, inside the caller's timeout, not later.
            await anyio.lowlevel.checkpoint()
        except BaseException as exc:
            self._report_beside(exc)
            raise

    async def _open(self) -> None:
        self._state = _State.OPENING
        self._opened = anyio.Event()  # set once OPEN, or CLOSED by a failed open
        try:
            await self._open_steps()
        except BaseException:
            self._opened.set()
            raise

    async def _open_steps(self) -> None:
        self._thread = threading.get_ident()
        self._token = anyio.lowlevel.current_token()
        if isinstance(self._token.native_token, asyncio.AbstractEventLoop):
            self._owner = asyncio.current_task()
        self._close_lock = anyio.Lock()
        self._tasks_done = anyio.Event()
        self._wakeup = anyio.Event()
        self._task_scopes = [anyio.CancelScope(shield=True), anyio.CancelScope(shield=True)]
        self._tasks_left = 2
        # Shielded: a caller cancelled half-way must not leave a worker process behind, and
        # creating the completion group is collective (every rank enters in program order).
        with anyio.CancelScope(shield=True):
            try:
                # Sets self._engine in the thread: a Ctrl-C raised once the thread is done
                # (trio) must not drop a running worker.
                await self._in_thread(self._make_engine)
                if is_distributed():
                    await self._in_thread(self.engine.completion.group)
            except BaseException:
                if self._engine is not None:
                    await self._in_thread(self._engine.stop_workers)
                self._state = _State.CLOSED
                raise
        try:
            # A real checkpoint: an asyncio Task.cancel() that came while the engine was
            # made (re-armed by run_to_end) is raised here, not at the block's first await.
            await anyio.lowlevel.checkpoint()
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self._in_thread(self.engine.stop_workers)
            self._state = _State.CLOSED
            raise

    # anyio marks it final; the one addition: a block that aclose() already left (an
    # `async with` whose body closed the queue) has nothing left to do when it ends.
    async def __aexit__(  # type: ignore[misc]
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        if getattr(self, "_left_by_aclose", False):
            self._left_by_aclose = False
            return None
        return await super().__aexit__(exc_type, exc, tb)

    def _make_engine(self) -> None:
        self._engine = engine = CallsEngine(self.options)
        engine.warm_up()  # the worker imports torch now, not at the first save

    async def aclose(self) -> None:
        """Wait for every request (up to the queue's timeout), finalize it, stop the worker,
        and raise the failures nobody observed (a :class:`CheckpointErrorGroup`).
        Idempotent; completes a close that was interrupted."""
        if self._state is _State.NEW:
            self._state = _State.CLOSED
            return
        self._check_thread()
        if self._state is _State.OPENING:  # another task opens it: close it once open
            with anyio.CancelScope(shield=True):
                await self._opened.wait()
            if self._is_closed():  # the open failed, and said so there
                return
        if (
            getattr(self, "_AsyncContextManagerMixin__cm", None) is not None
            and getattr(self, "_entered_task", None) == anyio.get_current_task().id
        ):
            # Entered with __aenter__() and closed here, in the same task: leave the block
            # (its task group belongs to this task), which closes the queue; the block's
            # own exit then has nothing left to do.
            self._left_by_aclose = True
            await super().__aexit__(None, None, None)
            return
        try:
            await self._shutdown()
        finally:
            self._served_done()  # serve() returns
        await self._after_close()

    async def _shutdown(self) -> None:
        # A shield stops anyio's cancellation, not asyncio's own Task.cancel() (a second
        # Ctrl-C, an outer asyncio timeout): finish the close all the same, then let the
        # cancellation through. Each step below can be resumed.
        # KeyboardInterrupt and SystemExit (trio delivers Ctrl-C through shields) are
        # treated the same way; a second one stops waiting for the requests in flight.
        interrupted: BaseException | None = None
        while True:
            try:
                await self._shutdown_steps()
                break
            except anyio.get_cancelled_exc_class() as exc:
                interrupted = interrupted or exc
            except (KeyboardInterrupt, SystemExit) as exc:
                self._interrupted(exc)
                interrupted = exc
        if self._signalled is not None and not isinstance(
            interrupted, (KeyboardInterrupt, SystemExit)
        ):
            interrupted = self._signalled  # Ctrl-C caught while draining in another task
        self._signalled = None
        if interrupted is not None:
            raise interrupted

    def _interrupted(self, exc: BaseException) -> None:
        """A Ctrl-C (or exit) reached the close: the first waits for the requests in
        flight, a second gives up on them."""
        if self._interrupts and self._force is None:
            self._force = type(exc).__name__
        elif not self._interrupts and self._futures:
            logger.warning(
                "%s while closing the checkpoint queue: waiting up to %gs for %d checkpoint(s) "
                "in flight; interrupt again to give up on them",
                type(exc).__name__,
                self._timeout,
                len(self._futures),
            )
        self._interrupts += 1

    async def _drain(self) -> None:
        """Wait for the requests in flight, up to the timeout or a second interrupt."""
        with anyio.move_on_after(self._timeout):
            async with anyio.create_task_group() as tg:
                if _catches_sigint_here(self._token):
                    tg.start_soon(self._receive_interrupts, tg.cancel_scope)
                while self._futures and self._force is None:
                    await next(iter(self._futures.values())).wait_settled()
                tg.cancel_scope.cancel()

    async def _receive_interrupts(self, scope: anyio.CancelScope) -> None:
        # trio raises Ctrl-C in its main task: when this close runs in another one (a
        # served queue, a queue owned by a child task), that task cannot stop waiting
        # here. While draining, this close takes Ctrl-C itself, and raises it once done.
        with open_signal_receiver(signal.SIGINT) as signals:
            async for _ in signals:
                self._signalled = KeyboardInterrupt()
                self._interrupted(self._signalled)
                if self._force is not None:
                    scope.cancel()
                    return

    async def _shutdown_steps(self) -> None:
        # Shielded throughout: closing is what a cancelled caller needs most.
        with anyio.CancelScope(shield=True):
            async with self._close_lock:
                if self._state is _State.CLOSED:
                    return
                if self._state < _State.DRAINING:
                    self._state = _State.DRAINING
                    if self._stage_send is not None:
                        self._stage_send.close()
                    if self._engine is not None:
                        self._engine.closing()
                if self._state is _State.DRAINING:
                    await self._drain()
                    if self._force is not None:
                        self._give_up(f"because it was interrupted by a second {self._force}")
                    else:
                        self._give_up(f"after {self._timeout:g}s: its worker did not answer")
                    self._state = _State.STOPPING
                for scope in self._task_scopes:
                    scope.cancel()
                if self._must_kill:  # the stager may wait for a buffer the worker holds
                    await self._in_thread(self.engine.kill_worker)
                await self._tasks_done.wait()
                if self._must_kill:  # a late schedule may have started a new worker
                    await self._in_thread(self.engine.kill_worker)
                await self._in_thread(self.engine.stop_workers)
                if self._stage_receive is not None:
                    self._stage_receive.close()
                self._state = _State.CLOSED

    def _abandon(self) -> None:
        """The event loop is ending with the queue open: say so, report what failed, and
        stop the worker at once (nothing can be awaited any more)."""
        self._report_never_closed()
        self._break("closing", RuntimeError("the event loop ended with the queue open"))
        self._served_done()
        self._report_beside(GeneratorExit())
        stopped = self._state is _State.CLOSED
        self._state = _State.CLOSED
        if self._engine is not None and not stopped:
            self._engine.kill_worker()
            self._engine.stop_workers()

    def _served_done(self) -> None:
        if self._served is not None:
            self._served.set()

    def _report_never_closed(self) -> None:
        if not self._reported_never_closed:
            self._reported_never_closed = True
            logger.error(
                "an AsyncCheckpointQueue was still open when its event loop ended: %d "
                "checkpoint(s) in flight were not finalized and its worker was stopped. Use "
                "`async with AsyncCheckpointQueue() as queue:` or `await queue.aclose()`",
                len(self._futures),
            )

    def _give_up(self, why: str) -> None:
        for fut in list(self._futures.values()):
            if fut.call_idx == self._finalizing:
                # Its worker answered and its finalize steps are running in a thread that
                # cannot be interrupted: let it settle with its true outcome.
                continue
            self._given_up.append(fut.call_idx)
            self._resolve(
                fut,
                None,
                CloseTimeoutError(
                    f"closing the queue gave up on checkpoint call {fut.call_idx} {why}. The "
                    "worker was stopped and the checkpoint was not finalized (its files may "
                    "be incomplete; the previous committed checkpoint is intact); raise the "
                    "queue's timeout if saves legitimately take longer",
                    call_idx=fut.call_idx,
                ),
            )

    def failures(self) -> list[CheckpointError]:
        """The failures of this queue's requests (the latest 1000), in the order they
        failed, whether or not someone observed them; readable after the queue has closed
        (say, when a cancel scope swallowed the exception that carried them). Their
        tracebacks print, but the frames' local variables are dropped, so that no state
        dict stays referenced through them. They are copies of the errors the futures
        raise (same class, message, attributes and traceback), kept apart so that raising
        those again never ties a caller's frame to this list."""
        return list(self._failures)

    def _take_unreported(self) -> list[CheckpointError]:
        failures = [fut.take_failure() for fut in self._unreported.values()]
        self._unreported = {}
        return [error for error in failures if error is not None]

    def _raise_unreported(self) -> None:
        errors = self._take_unreported()
        if errors:
            raise _group(errors)

    def _report_beside(self, exc: BaseException) -> None:
        """The block raised ``exc`` (or was cancelled): it propagates unchanged; the
        failures nobody observed are attached to it as notes and logged with tracebacks."""
        for error in self._take_unreported():
            note = f"checkpoint call {error.call_idx} also failed: {type(error).__name__}: "
            note += str(error).splitlines()[0] if str(error) else ""
            if hasattr(exc, "add_note"):
                exc.add_note(note)
            logger.error(
                "checkpoint call %s failed while the queue's block exited with %s",
                error.call_idx,
                type(exc).__name__,
                exc_info=error,
            )

    def _check_thread(self) -> None:
        if self._thread is not None and threading.get_ident() != self._thread:
            raise QueueMisuseError(
                "this AsyncCheckpointQueue belongs to the event loop of another thread; "
                "schedule and await its checkpoints from that loop"
            )

    def _check_open(self) -> None:
        self._check_thread()
        if self._broken is not None:
            raise QueueBrokenError(self._broken.message) from self._broken.__cause__
        if self._state in (_State.NEW, _State.OPENING):
            raise QueueMisuseError(_NOT_OPEN)
        if self._state is not _State.OPEN:
            raise QueueClosedError("the queue is closed")

    def __del__(self) -> None:
        if getattr(self, "_state", None) in (_State.OPEN, _State.DRAINING, _State.STOPPING):
            with contextlib.suppress(Exception):  # at interpreter exit logging may be gone
                self._report_never_closed()

    # -- scheduling ---------------------------------------------------------------------

    @areleasing
    async def schedule(
        self,
        request: AsyncRequest,
        *,
        wait_for_staging: bool = True,
        needs_global: bool = False,
        on_scheduled: Callable[[CheckpointFuture], object] | None = None,
    ) -> CheckpointFuture:
        """Schedule ``request``; return its future.

        With ``wait_for_staging=True`` (the default) this returns once every tensor of the
        request is copied to host buffers, and raises at once if staging failed. With
        ``False`` it returns as soon as a stager thread has taken the request: the copy is
        running (or waiting for a free staging buffer) while the caller computes; ``await
        fut.staged`` before modifying the tensors (e.g. before ``optimizer.step()``).
        With ``max_pending`` it first waits until fewer requests are in flight.
        ``needs_global=True`` settles it across all ranks even if the queue has ``no_dist``.

        Cancelled while waiting for room, nothing is scheduled. Cancelled later, the
        request still runs: its result or failure comes from ``finalize()`` or the exit.
        ``on_scheduled(future)`` is called as soon as the request has its future, before
        this returns or can be cancelled: what must follow every scheduled request (say,
        releasing a resource once it settles) can rely on it.
        """
        self._check_open()
        if not isinstance(request, AsyncRequest):
            raise InvalidRequestError(f"expected an AsyncRequest, got {type(request).__name__}")
        request.validate()
        if self._room is not None:
            await self._room.acquire()
            try:
                self._check_open()
            except BaseException:
                self._room.release()
                raise
        fut = CheckpointFuture(self._next_idx, self._cancel)
        fut.set_deferred(self._defer)
        self._next_idx += 1
        self._futures[fut.call_idx] = fut
        # A future whose outcome its owner has seen is not reported again: forget it.
        self._unreported[fut.call_idx] = fut
        fut.set_forget(self._forget)
        if on_scheduled is not None:
            try:
                on_scheduled(fut)
            except BaseException:
                self._withdraw(fut, "its on_scheduled callback raised")
                raise
        assert self._stage_send is not None
        stager_idle = self._queued_for_staging == 0
        self._queued_for_staging += 1
        # The copy runs in the stager's thread, on another CUDA stream: order it after the
        # kernels this thread has queued so far.
        # Staged lazily, the tensors may be changed before the copy is done: remember their
        # versions now, and refuse a snapshot that would mix old and new values.
        unchanged = None if wait_for_staging else _unchanged_since_now(request, fut.call_idx)
        self._to_stage[fut.call_idx] = (request, unchanged)
        self._stage_send.send_nowait((fut, needs_global, ready_event()))
        if stager_idle or wait_for_staging:
            # The copy starts now, before the caller's next synchronous step. Behind
            # another request's staging it could not start anyway: a lazy caller goes on.
            await fut.wait_handed_over()
        if wait_for_staging:
            await fut.staged  # a staging failure raised here counts as observed
        return fut

    def _cancel(self, fut: CheckpointFuture) -> bool:
        if fut.handed_over and not (fut.staged.done() and self.engine.cancel(fut.call_idx)):
            return False  # being staged, or started in the worker
        self._withdraw(fut, "it was cancelled before it started writing")
        return True

    def _withdraw(self, fut: CheckpointFuture, why: str) -> None:
        """Resolve a request that never reached a worker (nothing was written)."""
        fut.set_cancelled()
        self._resolve(
            fut,
            None,
            CheckpointCancelledError(
                f"checkpoint call {fut.call_idx} was withdrawn: {why}; nothing was written",
                call_idx=fut.call_idx,
            ),
        )

    async def finalize(self) -> list[CheckpointResult]:
        """Wait until every request scheduled before this call is finalized; return the
        results of those that succeeded, in scheduling order, but for those whose outcome
        was already retrieved through their future (``await fut``, ``result()``), which
        the queue no longer holds. If any failed and nobody
        observed it yet, raise them all as a :class:`CheckpointErrorGroup` once every one
        has settled. Cancelled, it loses nothing: a later ``finalize()`` or the exit
        reports what it would have."""
        self._check_thread()
        if self._state in (_State.NEW, _State.OPENING):
            raise QueueMisuseError(_NOT_OPEN)
        if self._state is not _State.OPEN:
            raise QueueClosedError("the queue is closed")
        batch = list(self._unreported.values())
        for fut in batch:
            await fut.wait_settled()
        for fut in batch:
            self._unreported.pop(fut.call_idx, None)
        errors = [error for error in (fut.take_failure() for fut in batch) if error is not None]
        if errors:
            raise _group(errors)
        return [r for r in (fut.succeeded_result() for fut in batch) if r is not None]

    def pending(self) -> int:
        """How many scheduled requests are not resolved yet."""
        return len(self._futures)

    # The blocking API belongs to CheckpointQueue; mixing the two would race the poller.
    def schedule_async_request(self, *args: object, **kwargs: object) -> int:
        """Not available here: raises :class:`QueueMisuseError` (use ``await schedule``)."""
        raise QueueMisuseError(
            "AsyncCheckpointQueue is driven by its event-loop poller: use `await "
            "queue.schedule(request)`, or use CheckpointQueue for a blocking loop"
        )

    def maybe_finalize_async_calls(self, *args: object, **kwargs: object) -> list[int]:
        """Not available here: raises :class:`QueueMisuseError` (use ``await finalize``)."""
        raise QueueMisuseError(
            "AsyncCheckpointQueue finalizes in its event-loop poller: `await "
            "queue.finalize()` or await the request's future; use CheckpointQueue for "
            "maybe_finalize_async_calls"
        )

    # -- the two tasks ------------------------------------------------------------------

    @ki_protected
    async def _run_task(self, index: int, name: str, fn: Any) -> None:
        try:
            while True:
                scope = self._task_scopes[index]
                try:
                    with scope:  # shielded: only the queue's own close cancels it
                        await fn()
                    return
                except anyio.get_cancelled_exc_class():
                    # asyncio's Task.cancel() passes shields: asyncio.run() cancels every
                    # task once main() returns, the task owning the queue too, whose close
                    # will drain. While that owner lives, go on.
                    if self._state >= _State.STOPPING or not self._owner_alive():
                        raise
                    _uncancel()
                    self._task_scopes[index] = anyio.CancelScope(shield=True)
        except Exception as exc:
            self._break(name, exc)
        except BaseException as exc:  # cancelled from outside: the event loop is ending
            if self._state is _State.OPEN:
                self._report_never_closed()
            self._break(name, exc)
            raise
        finally:
            self._tasks_left -= 1
            if not self._tasks_left:
                self._tasks_done.set()

    def _owner_alive(self) -> bool:
        return self._owner is not None and not self._owner.done()

    def _break(self, name: str, exc: BaseException) -> None:
        """A task died: fail every pending future and refuse new work, saying why."""
        what = f"the {name} task of the AsyncCheckpointQueue died ({type(exc).__name__}: {exc})"
        if self._broken is None:
            self._broken = QueueBrokenError(
                f"{what}; the queue takes no new work: leave `async with` and open a new queue"
            )
            self._broken.__cause__ = exc
        for fut in list(self._futures.values()):
            error = QueueBrokenError(
                f"checkpoint call {fut.call_idx} failed because {what}; it was not finalized",
                call_idx=fut.call_idx,
            )
            error.__cause__ = exc
            self._resolve(fut, None, error)
        self._wakeup.set()

    async def _stager(self) -> None:
        receive = self._stage_receive
        assert receive is not None
        while True:
            try:
                item: _Staging | None = await receive.receive()
            except (anyio.EndOfStream, anyio.ClosedResourceError):
                return
            try:
                assert item is not None
                await self._stage_one(*item)
            finally:
                item = None  # the caller's state dict is not held until the next save
                self._queued_for_staging -= 1

    async def _stage_one(self, fut: CheckpointFuture, glob: bool, event: Any) -> None:
        waiting = self._to_stage.pop(fut.call_idx, None)
        if fut.done() or waiting is None:  # cancelled, or failed, before its turn came
            return
        request, unchanged = waiting
        del waiting
        try:
            call = await self._in_thread(self._stage, request, fut, glob, event, unchanged)
        except CheckpointError as err:
            del request, unchanged  # the error's traceback keeps this frame: not the state
            error = err
        except Exception as exc:  # never leave a future hanging
            del request, unchanged
            error = StagingError(
                f"staging call {fut.call_idx} failed: {type(exc).__name__}: {exc}",
                call_idx=fut.call_idx,
            )
            error.__cause__ = exc
        else:
            if call is not None:
                fut.set_staged()
                self._wakeup.set()
            return
        self._resolve(fut, None, error)
        # The failed call still takes part in the completion check, where the other ranks
        # learn of it: the poller must run it even if nothing else is pending.
        self._wakeup.set()

    def _stage(
        self,
        request: AsyncRequest,
        fut: CheckpointFuture,
        glob: bool,
        event: Any,
        unchanged: Callable[[], None] | None,
    ) -> Call | None:
        """In a stager thread: take the request (unless cancelled meanwhile), then copy it
        and start it in the worker."""
        if not anyio.from_thread.run_sync(self._take, fut, token=self._token):
            return None
        check = None
        if unchanged is not None:
            token = self._token

            def check() -> None:
                # On the loop's thread: an in-place change the loop issued before now has
                # finished there, so its version count is final. A loop that does not
                # answer (blocked, or ending) is not waited for: checked from here then.
                answered, _ = call_in_loop(token, unchanged, _LOOP_CHECK_WAIT_S)
                if not answered:
                    unchanged()

        return self.engine.schedule(request, fut.call_idx, glob, event, check)

    def _take(self, fut: CheckpointFuture) -> bool:
        if fut.done():
            return False
        fut.set_handed_over()  # from here on, fut.cancel() is up to the engine
        return True

    async def _poller(self) -> None:
        engine = self.engine
        while True:
            self._wakeup = anyio.Event()
            # In a thread: reading a reply unpickles the worker's result, whose own code
            # (a slow or hostile __reduce__) must never run on the event loop.
            await self._in_thread(engine.collect)
            while engine.active and engine.front_ready():
                if not await self._settle_front(engine):
                    break
            if engine.active:
                await self._wait_for_news(engine.wait_handles(), engine.next_deadline())
            else:
                await self._wakeup.wait()

    async def _wait_for_news(self, handles: list[int], deadline: float | None) -> None:
        """Sleep until a handle is readable, the stager woke us, or the deadline passed."""
        wakeup = self._wakeup
        with anyio.move_on_after(math.inf if deadline is None else max(deadline, 0.0)):
            async with anyio.create_task_group() as tg:
                for fd in handles:
                    tg.start_soon(_readable, fd, tg.cancel_scope)
                tg.start_soon(_woken, wakeup, tg.cancel_scope)

    async def _settle_front(self, engine: CallsEngine) -> bool:
        """Settle the oldest request, whose local outcome is known; False if it was not."""
        self.polls += 1
        call = engine.active[0]
        # Shielded: a reduction once issued must complete on every rank, and a successful
        # save is committed (its finalize steps run to the end) even while closing.
        with anyio.CancelScope(shield=True):
            if is_distributed() and (call.needs_global or not self.no_dist):
                settled = await self._in_thread(engine.settle_front, True, self.no_dist)
            else:
                settled = engine.settle_front(True, self.no_dist)
            if settled is None:
                return False
            fut = self._futures.get(settled.call.call_idx)  # None: withdrawn or given up
            if settled.error is not None:
                # A call that failed while it was scheduled is resolved by its stager, once
                # that has let go of the request (so the caller's state is not held).
                if fut is not None and not settled.call.error_raised:
                    self._resolve(fut, None, settled.error)
                if isinstance(settled.error.__cause__, KeyboardInterrupt | SystemExit):
                    self._defer(settled.error.__cause__)  # raised when the queue closes
                return True
            start = time.perf_counter()
            self._finalizing = settled.call.call_idx
            try:
                if settled.call.finalize_fns:
                    await self._in_thread(engine.finalize, settled)
                else:
                    engine.finalize(settled)  # nothing to run: only the state moves
            except CheckpointError as err:
                if fut is not None:
                    self._resolve(fut, None, err)
                return True
            except (anyio.get_cancelled_exc_class(), asyncio.CancelledError):
                # From the step itself, in its thread (a cancellation of this task is
                # delivered again by run_to_end, never raised from it): that call failed.
                if fut is not None and isinstance(settled.call.error, CheckpointError):
                    self._resolve(fut, None, settled.call.error)
                return True
            except BaseException as exc:  # Ctrl-C, exit (...) in a finalize step: that call
                self._defer(exc)
                if fut is not None and isinstance(settled.call.error, CheckpointError):
                    self._resolve(fut, None, settled.call.error)
                return True
            finally:
                self._finalizing = None
        if fut is not None:
            outcome = settled.call.outcome
            result = CheckpointResult(
                call_idx=call.call_idx,
                staged_bytes=call.staged_bytes,
                stage_seconds=call.stage_seconds,
                run_seconds=outcome.run_seconds if outcome is not None else 0.0,
                finalize_seconds=time.perf_counter() - start,
                value=outcome.result if outcome is not None else None,
            )
            self._resolve(fut, result, None)
        return True

    async def _in_thread(self, fn: Any, *args: Any) -> Any:
        return await run_to_end(fn, *args)

    def _resolve(
        self, fut: CheckpointFuture, result: CheckpointResult | None, error: CheckpointError | None
    ) -> None:
        if self._futures.pop(fut.call_idx, None) is not None and self._room is not None:
            self._room.release()
        self._to_stage.pop(fut.call_idx, None)  # not staged yet: its tensors are let go of
        if error is not None and not fut.done():
            drop_locals(error)  # a traceback's frames would hold the caller's tensors
            # A copy: raising the error again (fut.result()) adds the raiser's frames.
            self._failures.append(detached(error))
        fut.set_outcome(result, error)

    def _forget(self, fut: CheckpointFuture) -> None:
        """Its owner has retrieved the outcome through the future: not reported again, and
        not held."""
        self._unreported.pop(fut.call_idx, None)

    def _defer(self, exc: BaseException) -> None:
        """User code (a done callback, a finalize step) raised ``KeyboardInterrupt``,
        ``SystemExit`` or another ``BaseException``: that call failed, the others go on,
        and the exception is raised when the queue closes (at once if it has closed)."""
        if self._state is _State.CLOSED:
            raise exc
        if self._deferred is None:
            self._deferred = exc


def _unchanged_since_now(request: AsyncRequest, call_idx: int) -> Callable[[], None]:
    """A check, run once the tensors are copied, that none was modified in place since
    now (a tensor's ``_version`` counts its in-place changes)."""
    args = [request.async_fn_args]
    versions = [(t, t._version) for t in iter_tensors((args[0], request.async_fn_kwargs))]

    def check() -> None:
        for tensor, version in versions:
            if tensor._version != version:
                where = path_of(args[0], tensor) or "a tensor"
                # The error's traceback keeps this closure: it must not keep the tensors.
                versions.clear()
                args.clear()
                del tensor
                raise StagingError(
                    f"checkpoint call {call_idx}: the tensor at {where} was modified in place "
                    "while it was being staged (wait_for_staging=False), so the copy could "
                    "mix old and new values; nothing was written. Await `fut.staged` before "
                    "changing the tensors (e.g. before optimizer.step())",
                    call_idx=call_idx,
                )

    return check


def _catches_sigint_here(token: anyio.lowlevel.EventLoopToken) -> bool:
    """Under trio, in the main thread, the close may take Ctrl-C itself (asyncio's own
    handling of Ctrl-C is left alone: it cancels the main task, then raises)."""
    return (
        type(token.native_token).__module__.startswith("trio")
        and threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGINT) is not signal.SIG_IGN
    )


def _uncancel() -> None:
    """Take back an asyncio cancellation this task has absorbed."""
    task = asyncio.current_task()
    if task is not None:
        task.uncancel()


async def _readable(fd: int, scope: anyio.CancelScope) -> None:
    # Closed or replaced under us: look again.
    with contextlib.suppress(
        OSError, ValueError, anyio.ClosedResourceError, anyio.BusyResourceError
    ):
        await anyio.wait_readable(fd)
    scope.cancel()


async def _woken(event: anyio.Event, scope: anyio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


def _group(errors: list[CheckpointError]) -> CheckpointErrorGroup:
    calls = ", ".join(str(e.call_idx) for e in errors)
    noun = "checkpoint" if len(errors) == 1 else "checkpoints"
    return CheckpointErrorGroup(f"{len(errors)} {noun} failed (call {calls})", errors)
