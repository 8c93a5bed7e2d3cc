"""Event-loop plumbing shared by the async facade: reaching a loop from another thread,
and running a blocking function in a thread to its end whatever cancels the wait."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import anyio
import anyio.lowlevel

T = TypeVar("T")
_F = TypeVar("_F", bound=Callable[..., Any])


def ki_protected(fn: _F) -> _F:
    """Under trio, Ctrl-C is raised in whatever code runs, unless that code is protected:
    then it is raised in the task at its next checkpoint. The queue's own tasks are
    protected, so Ctrl-C reaches the program's tasks instead, never the poller in the
    middle of reading a reply; so is :func:`run_to_end`, so that Ctrl-C cannot land
    between starting its thread and waiting for it."""
    try:
        from trio.lowlevel import enable_ki_protection
    except ImportError:  # pragma: no cover - trio is not installed
        return fn
    return enable_ki_protection(fn)


def current_token() -> anyio.lowlevel.EventLoopToken | None:
    """The token of the event loop running in this thread, None if none runs."""
    try:
        return anyio.lowlevel.current_token()
    except RuntimeError:
        return None


def call_soon_threadsafe(token: anyio.lowlevel.EventLoopToken, fn: Callable[[], object]) -> bool:
    """Have ``fn()`` run in the event loop of ``token`` without waiting for it; False if
    that loop has ended."""
    native: Any = token.native_token
    try:
        if hasattr(native, "call_soon_threadsafe"):  # asyncio (and uvloop)
            native.call_soon_threadsafe(fn)
        else:  # trio
            native.run_sync_soon(fn)
    except RuntimeError:  # the loop is closed (trio's RunFinishedError is one too)
        return False
    return True


def call_in_loop(
    token: anyio.lowlevel.EventLoopToken, fn: Callable[[], T], timeout: float
) -> tuple[bool, T | None]:
    """Run ``fn()`` in the event loop of ``token`` and wait for it, up to ``timeout``
    seconds: ``(True, its value)``, or ``(False, None)`` if that loop did not run it in
    time (it has ended, stopped, or is blocked). What ``fn`` raised is raised here."""
    answered = threading.Event()
    box: list[tuple[bool, Any]] = []
    turn = threading.Lock()  # either the loop runs fn, or the waiter gives up: not both
    given_up = False

    def on_loop() -> None:
        with turn:
            if given_up:  # the waiter said it did not happen: it must not happen later
                return
            try:
                box.append((True, fn()))
            except BaseException as exc:  # handed to the waiting thread
                box.append((False, exc))
            finally:
                answered.set()

    if not call_soon_threadsafe(token, on_loop):
        return False, None
    if not answered.wait(timeout):
        with turn:
            if not box:
                given_up = True
                return False, None
    ok, value = box[0]
    if not ok:
        raise value
    return True, value


def _cancel_again(token: anyio.lowlevel.EventLoopToken) -> None:
    """Deliver an asyncio cancellation that a wait swallowed at the task's next await."""
    if isinstance(token.native_token, asyncio.AbstractEventLoop):
        task = asyncio.current_task()
        if task is not None:
            task.uncancel()
            task.cancel()


@ki_protected
async def run_to_end(fn: Callable[..., T], *args: Any) -> T:
    """Run ``fn(*args)`` in a thread of its own and wait until it returns.

    The wait is shielded, and asyncio's ``Task.cancel()`` (which passes through shields)
    does not end it either: the caller never goes on while the thread still works on its
    state. Such a cancellation is delivered again, at the task's next await, once the
    thread is done; a ``KeyboardInterrupt`` (trio delivers Ctrl-C through shields) is
    raised once the thread is done. The thread is a daemon: a function that never returns
    (a peer that never answers) cannot hold the interpreter at exit.
    """
    token = anyio.lowlevel.current_token()
    done = anyio.Event()
    box: list[tuple[bool, Any]] = []

    call: list[Any] = [fn, args]  # let go of once run: a traceback keeps this frame

    def work() -> None:
        try:
            box.append((True, call[0](*call[1])))
        except BaseException as exc:  # handed to the waiting task
            box.append((False, exc))
        finally:
            call.clear()
            call_soon_threadsafe(token, done.set)

    thread = threading.Thread(target=work, name="aiockpt-queue", daemon=True)
    thread.start()
    interrupted = False
    signalled: BaseException | None = None
    with anyio.CancelScope(shield=True):
        while not done.is_set():
            try:
                await done.wait()
            except anyio.get_cancelled_exc_class():
                interrupted = True
            except (KeyboardInterrupt, SystemExit) as exc:  # trio's Ctrl-C passes shields
                signalled = signalled or exc
    # The thread's last step was waking us: it ends within microseconds. Joined, no
    # thread of the queue is left behind once the call is over.
    thread.join()
    if signalled is not None:
        raise signalled
    if interrupted:
        _cancel_again(token)
    ok, value = box[0]
    if ok:
        return value  # type: ignore[no-any-return]
    raise value
