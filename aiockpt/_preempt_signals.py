"""The signal side of preemption (see ``_preempt``): handlers that record the signal and
chain the ones installed before them, and the watchdog that ends the process at the
deadline if the last save has not finished by then.

A handler does as little as possible: it runs between two bytecodes of the main thread,
which may hold any lock (logging's, a stream's), so it records the time and returns;
everything else (logging, agreeing, saving) happens at the loop's next question.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import select
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import FrameType
from typing import Any

from ._exceptions import InvalidRequestError, QueueMisuseError
from ._ranks import get_rank

logger = logging.getLogger("aiockpt")

Handler = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None


@dataclass(frozen=True)
class Received:
    """A signal as the handler recorded it: its number, ``time.monotonic()`` and
    ``time.time()`` when it was handled."""

    signum: int
    monotonic: float
    wall: float

    @property
    def name(self) -> str:
        return signal_name(self.signum)


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def checked_signals(signals: Sequence[int]) -> tuple[int, ...]:
    """``signals`` as a tuple of catchable signal numbers (else InvalidRequestError)."""
    out: list[int] = []
    for sig in signals:
        if isinstance(sig, bool) or not isinstance(sig, int):
            raise InvalidRequestError(f"signals must be signal numbers, not {sig!r}")
        if sig in (signal.SIGKILL, signal.SIGSTOP) or sig not in signal.valid_signals():
            raise InvalidRequestError(f"{signal_name(sig)} cannot be caught")
        if sig not in out:
            out.append(int(sig))
    if not out:
        raise InvalidRequestError("signals must name at least one signal (e.g. SIGTERM)")
    return tuple(out)


def raises_in_loop(handler: Handler) -> bool:
    """Whether ``handler`` is Python's SIGINT handler or an event loop's (asyncio's
    ``Runner``, trio's): they raise ``KeyboardInterrupt`` (or cancel) mid-step."""
    while isinstance(handler, functools.partial):
        handler = handler.func
    if handler is signal.default_int_handler:
        return True
    module = getattr(handler, "__module__", None) or ""
    return module.split(".")[0] in ("asyncio", "trio", "anyio")


class SignalCatcher:
    """Installs a handler for each of ``signals`` that records the first signal (and
    counts the later ones), then calls the handler that was there before (``chain``;
    ``SIG_DFL`` and ``SIG_IGN`` are not actions to take, and Python's or an event loop's
    SIGINT handler, which would raise ``KeyboardInterrupt`` mid-step, is not chained
    either). Once ``final`` is set (the last save has begun), signals are only counted,
    in ``during_final``. Once restored, a handler of ours left installed (put back by
    someone else) does what the handler found before it would: calls it, or re-delivers
    the signal to ``SIG_DFL``."""

    def __init__(self, signals: Sequence[int], chain: bool = True) -> None:
        self.signals = checked_signals(signals)
        self.chain = chain
        self.first: Received | None = None
        self.during_final: list[int] = []  # signals received during the last save
        self.final = False
        self._previous: dict[int, Handler] = {}
        self._found: dict[int, Handler] = {}  # what install() found, kept after restore()
        self._chained: set[int] = set()  # signals the handler found has seen
        self.closed = False
        self._pid = os.getpid()

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            raise QueueMisuseError(
                "a Preemption installs signal handlers, which Python allows only in the main "
                "thread: create and enter it there"
            )
        self._pid = os.getpid()
        try:
            for sig in self.signals:
                self._previous[sig] = self._found[sig] = signal.signal(sig, self._handle)
        except BaseException:
            self.restore()
            raise

    def restore(self) -> None:
        """Put back the handlers found at :meth:`install` (where ours is still there)."""
        previous, self._previous = self._previous, {}
        self.closed = True
        for sig, handler in previous.items():
            if signal.getsignal(sig) == self._handle:
                signal.signal(sig, handler if handler is not None else signal.SIG_DFL)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if os.getpid() != self._pid:
            # A forked worker inherited this handler: do what the signal does by default.
            with contextlib.suppress(Exception):
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)
            os._exit(128 + signum)
        if self.closed:
            self._fall_back(signum, frame)
            return
        if self.final:  # the last save has begun: nothing interrupts it
            self.during_final.append(signum)
            return
        if self.first is None:
            self.first = Received(signum, time.monotonic(), time.time())
        if not self.chain:
            return
        previous = self._previous.get(signum)
        if callable(previous) and not (signum == signal.SIGINT and raises_in_loop(previous)):
            self._chained.add(signum)
            previous(signum, frame)

    def unforwarded(self) -> int | None:
        """The first signal received, unless the handler found before has seen it."""
        first = self.first
        return None if first is None or first.signum in self._chained else first.signum

    def _fall_back(self, signum: int, frame: FrameType | None) -> None:
        previous = self._found.get(signum, signal.SIG_DFL)
        if callable(previous):
            previous(signum, frame)
        elif previous != signal.SIG_IGN:  # the default action (for SIGTERM: the end)
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)


class Watchdog:
    """Calls ``on_expire()`` in a thread of its own at a ``time.monotonic()`` deadline,
    unless disarmed first. ``on_expire`` is expected to end the process."""

    def __init__(self, on_expire: Callable[[], None]) -> None:
        self._on_expire = on_expire
        self._cond = threading.Condition()
        self._deadline: float | None = None
        self._disarmed = False
        self._thread: threading.Thread | None = None

    @property
    def deadline(self) -> float | None:
        return self._deadline

    def arm(self, deadline: float) -> None:
        """Fire at ``deadline`` (an earlier one than already armed replaces it)."""
        with self._cond:
            if self._disarmed:
                return
            if self._deadline is not None and self._deadline <= deadline:
                return
            self._deadline = deadline
            self._cond.notify_all()
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="aiockpt-preemption-deadline", daemon=True
                )
                self._thread.start()

    def disarm(self) -> None:
        with self._cond:
            self._disarmed = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def _run(self) -> None:
        with self._cond:
            while not self._disarmed:
                assert self._deadline is not None
                left = self._deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            if self._disarmed:
                return
        self._on_expire()


KILLED_WAIT_S = 2.0  # how long the watchdog waits for the workers it killed to be gone


def wait_gone(pids: list[int], timeout: float) -> None:
    """Wait (bounded) until every process of ``pids`` has exited: its descriptors (a
    forked worker inherits the directory's lock) are released by then."""
    fds = []
    for pid in pids:
        with contextlib.suppress(OSError):  # gone already
            fds.append(os.pidfd_open(pid))
    try:
        deadline = time.monotonic() + timeout
        poller = select.poll()
        for fd in fds:
            poller.register(fd, select.POLLIN)
        waiting = set(fds)
        while waiting and time.monotonic() < deadline:
            for fd, _ in poller.poll(max(0, int((deadline - time.monotonic()) * 1000))):
                poller.unregister(fd)  # it has exited: readable from now on
                waiting.discard(fd)
    finally:
        for fd in fds:
            os.close(fd)


def end_at_deadline(manager: Any, grace: float, final_step: int | None, exit_code: int) -> None:
    """The deadline passed (in the watchdog's thread): say what is left, stop the
    worker mid-write (the previous checkpoint is untouched by it) and exit."""
    try:
        latest: Any = manager.latest_step()
    except Exception as exc:  # the log line matters more than this detail
        latest = f"unknown ({exc})"
    if final_step is not None:
        what = f"the last save (step {final_step}) finished"
    else:
        what = "the ranks agreed on a step to save (is `preempted` asked each step?)"
    logger.error(
        "preemption (rank %d): the deadline (%.1fs after the signal) passed before %s: "
        "the newest committed checkpoint is step %s and is intact; stopping the "
        "checkpoint worker and exiting with status %d",
        get_rank(),
        grace,
        what,
        latest,
        exit_code,
    )
    engine = getattr(getattr(manager, "queue", None), "_engine", None)
    if engine is not None:
        with contextlib.suppress(Exception):
            pids = engine.worker_pids()
            engine.kill_worker()
            wait_gone(pids, KILLED_WAIT_S)  # none outlives this process, or its lock
    for handler in logging.getLogger().handlers + logger.handlers:
        with contextlib.suppress(Exception):
            handler.flush()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(exit_code)
