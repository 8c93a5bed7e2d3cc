"""The awaitable handle of one scheduled checkpoint, and the result it resolves to."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.lowlevel

from ._exceptions import CheckpointError
from ._loops import call_in_loop, call_soon_threadsafe, current_token

logger = logging.getLogger("aiockpt")

_CANCEL_WAIT_S = 10.0  # how long cancel() from another thread waits for the owning loop


@dataclass(frozen=True)
class CheckpointResult:
    """What a finalized checkpoint reports.

    ``value`` is what the request's ``async_fn`` returned in the worker; the ``*_seconds``
    fields time staging (the caller's copy), running (the worker) and the finalize steps.
    """

    call_idx: int
    staged_bytes: int
    stage_seconds: float
    run_seconds: float
    finalize_seconds: float
    value: Any = None


class _Signal:
    """Set once, in the owning event loop's thread; awaited from that loop, or from the
    loop of any other thread, which is woken thread-safely."""

    def __init__(self, owner: int | None) -> None:
        self._owner = owner  # the owning loop's thread (None: not made inside a loop)
        self._event = anyio.Event() if owner is not None else None
        self._lock = threading.Lock()
        self._set = False
        self._wakers: list[Callable[[], object]] = []

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        with self._lock:
            if self._set:
                return
            self._set = True
            wakers, self._wakers = self._wakers, []
        if self._event is not None:
            self._event.set()
        for wake in wakers:
            wake()

    async def wait(self) -> None:
        if self._event is not None and threading.get_ident() == self._owner:
            await self._event.wait()
            return
        token = current_token()
        event = anyio.Event()  # of the waiting loop
        assert token is not None  # awaited, so some loop runs here

        def wake() -> None:
            call_soon_threadsafe(token, event.set)

        with self._lock:
            already = self._set
            if not already:
                self._wakers.append(wake)
        if already:
            await anyio.lowlevel.checkpoint()
            return
        try:
            await event.wait()
        finally:
            with self._lock, contextlib.suppress(ValueError):
                self._wakers.remove(wake)


class _StagedPoint:
    """``await fut.staged``: resolves once the request's tensors are copied."""

    def __init__(self, future: CheckpointFuture) -> None:
        self._future = future

    def done(self) -> bool:
        return self._future._staged.is_set()

    def __await__(self) -> Generator[Any, None, None]:
        return self._future._wait_staged().__await__()


class CheckpointFuture:
    """A scheduled checkpoint. ``await fut`` returns its :class:`CheckpointResult` once it
    is finalized (on every rank), or raises the :class:`CheckpointError` explaining why not.

    Any number of tasks may await it, in any order; cancelling one of them cancels only
    that wait, never the checkpoint. It may also be awaited from the event loop of another
    thread (asyncio, uvloop or trio), which is woken when it is done; :meth:`cancel`,
    :meth:`add_done_callback`, :meth:`done`, :meth:`result` and :meth:`exception` may be
    called from any thread. ``await fut.staged`` resolves as soon as the tensors are
    staged, after which the caller may modify them. A failure seen through the future
    (``await``, ``result()``, ``exception()``, a failed ``await fut.staged``) is observed:
    neither ``finalize()`` nor the queue's exit raises it again. A failed future that is
    garbage-collected unobserved is logged by the ``aiockpt`` logger.
    """

    def __init__(
        self, call_idx: int, canceller: Callable[[CheckpointFuture], bool] | None = None
    ) -> None:
        self.call_idx = call_idx
        self.staged = _StagedPoint(self)
        #: A two-tier manager's save, on rank 0: ``await fut.uploaded`` resolves once the
        #: step is committed in the remote store too (or raises why not). None otherwise.
        self.uploaded: Any = None
        self._canceller = canceller
        self._token = current_token()  # the owning loop
        self._owner = threading.get_ident() if self._token is not None else None
        self._handed_over = _Signal(self._owner)  # the stager thread has taken the request
        self._staged = _Signal(self._owner)
        self._done = _Signal(self._owner)
        self._deferred: Callable[[BaseException], object] | None = None
        self._forget: Callable[[CheckpointFuture], object] | None = None
        self._staging_error: CheckpointError | None = None
        self._result: CheckpointResult | None = None
        self._error: CheckpointError | None = None
        self._callbacks: list[Callable[[CheckpointFuture], object]] = []
        self._observed = False  # someone has seen the outcome (result, exception, await)
        self._cancelled = False

    def done(self) -> bool:
        """True once the checkpoint is finalized, has failed or was cancelled."""
        return self._done.is_set()

    def cancelled(self) -> bool:
        """True if :meth:`cancel` withdrew the request."""
        return self._cancelled

    def cancel(self) -> bool:
        """Withdraw the request if it has not started writing: returns True, nothing is
        written and awaiting the future raises :class:`CheckpointCancelledError`. Returns
        False once the request is being staged or written, or is done. In a distributed job
        cancel the same request on every rank, or on none. From another thread, the
        request is withdrawn in the owning loop, which this call waits for (up to 10 s:
        a loop that has stopped withdraws nothing, and this returns False)."""
        if self.done() or self._canceller is None:
            return False
        if not self._on_owner_thread():
            assert self._token is not None
            # A loop that has ended, or stopped without closing, withdraws nothing.
            answered, withdrawn = call_in_loop(self._token, self.cancel, _CANCEL_WAIT_S)
            return answered and bool(withdrawn)
        return self._canceller(self)

    def _on_owner_thread(self) -> bool:
        return self._owner is None or threading.get_ident() == self._owner

    def result(self) -> CheckpointResult:
        """The result of a finished checkpoint; raises its error if it failed.

        Raises ``RuntimeError`` if it is not finished yet (await the future instead)."""
        if not self.done():
            raise RuntimeError(f"checkpoint call {self.call_idx} is not finished yet")
        self._retrieved()
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result

    def exception(self) -> CheckpointError | None:
        """The error of a failed checkpoint, None if it succeeded (RuntimeError if pending)."""
        if not self.done():
            raise RuntimeError(f"checkpoint call {self.call_idx} is not finished yet")
        self._retrieved()
        return self._error

    def add_done_callback(self, fn: Callable[[CheckpointFuture], object]) -> None:
        """Call ``fn(future)`` in the owning event loop's thread when the future is done
        (soon if it already is: at once when called from that thread). As in asyncio, an
        exception raised by ``fn`` is logged by the ``aiockpt`` logger and affects nothing
        else; a ``KeyboardInterrupt`` or ``SystemExit`` it raises reaches the program when
        the queue closes."""
        with self._done._lock:
            if not self._done.is_set():
                self._callbacks.append(fn)
                return
        if self._on_owner_thread():
            self._run_callback(fn)
            return
        assert self._token is not None
        if not call_soon_threadsafe(self._token, lambda: self._run_callback(fn)):
            self._run_callback(fn)  # the owning loop has ended: here, then

    def __await__(self) -> Generator[Any, None, CheckpointResult]:
        return self._wait().__await__()

    async def _wait(self) -> CheckpointResult:
        await self._done.wait()
        return self.result()

    async def _wait_staged(self) -> None:
        await self._staged.wait()
        if self._staging_error is not None:
            self._retrieved()  # handled here: not raised again by finalize or exit
            raise self._staging_error

    def __repr__(self) -> str:
        state = "pending"
        if self._cancelled:
            state = "cancelled"
        elif self.done():
            state = "failed" if self._error is not None else "finalized"
        elif self.staged.done():
            state = "staged"
        return f"<CheckpointFuture call_idx={self.call_idx} {state}>"

    def __del__(self) -> None:
        error = getattr(self, "_error", None)
        if error is not None and not self._observed:
            with contextlib.suppress(Exception):  # at interpreter exit logging may be gone
                logger.error(
                    "checkpoint call %d failed and its failure was never retrieved "
                    "(await the future, call finalize(), or leave the queue's `async with`)",
                    self.call_idx,
                    exc_info=error,
                )

    # -- the queue's side: called by the queue that made it, in its event loop's thread --

    @property
    def handed_over(self) -> bool:
        """The queue's stager has taken the request: cancelling is up to the engine."""
        return self._handed_over.is_set()

    async def wait_handed_over(self) -> None:
        """Wait until the stager has taken the request (or it was resolved)."""
        await self._handed_over.wait()

    async def wait_settled(self) -> None:
        """Wait until the future is done, without observing its outcome."""
        await self._done.wait()

    def take_failure(self) -> CheckpointError | None:
        """The error of a failed checkpoint that nobody has observed yet, marking it
        observed (so it is reported once); None if it succeeded or was observed."""
        error = None if self._observed else self._error
        self._observed = True
        return error

    def succeeded_result(self) -> CheckpointResult | None:
        """The result of a checkpoint that succeeded, None otherwise; observes nothing."""
        return self._result

    def set_handed_over(self) -> None:
        """Called by the queue: its stager has taken the request."""
        self._handed_over.set()

    def set_staged(self, error: CheckpointError | None = None) -> None:
        """Called by the queue: staging finished (failed with ``error``)."""
        self._staging_error = error
        self._handed_over.set()
        self._staged.set()

    def set_cancelled(self) -> None:
        """Called by the queue: the request was withdrawn (the caller knows: observed)."""
        self._cancelled = True
        self._retrieved()

    def set_outcome(self, result: CheckpointResult | None, error: CheckpointError | None) -> None:
        """Called by the queue: resolve the future (once; later calls change nothing)
        and run its done callbacks."""
        if self.done():
            return
        self._result, self._error = result, error
        if not self._staged.is_set():
            self.set_staged(error)
        self._done.set()  # from here on, add_done_callback runs callbacks itself
        with self._done._lock:
            callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:
            self._run_callback(fn)

    def _retrieved(self) -> None:
        """Its owner has seen the outcome: the queue neither reports nor holds it again."""
        self._observed = True
        forget, self._forget = self._forget, None
        if forget is None:
            return
        if self._on_owner_thread():
            forget(self)
        else:  # the queue's books are the owning loop's: changed there, never from here
            assert self._token is not None
            call_soon_threadsafe(self._token, lambda: forget(self))

    def set_forget(self, fn: Callable[[CheckpointFuture], object]) -> None:
        """Called by the queue: ``fn(self)`` once the outcome is retrieved through the
        future (the queue then lets go of it)."""
        self._forget = fn

    def set_deferred(self, sink: Callable[[BaseException], object]) -> None:
        """Called by the queue: where a ``KeyboardInterrupt`` or ``SystemExit`` raised by
        a done callback goes (the queue raises it once it has closed)."""
        self._deferred = sink

    def _run_callback(self, fn: Callable[[CheckpointFuture], object]) -> None:
        try:
            fn(self)
        except Exception:
            logger.exception("done callback %r of checkpoint call %d raised", fn, self.call_idx)
        except BaseException as exc:  # Ctrl-C or exit in user code: not the queue's death
            if self._deferred is None:
                raise
            self._deferred(exc)  # raises it here if the queue has closed already
            logger.error(
                "done callback %r of checkpoint call %d raised %s: it is raised again when "
                "the queue closes",
                fn,
                self.call_idx,
                type(exc).__name__,
            )
