"""What runs inside checkpoint worker processes: a forked child for one request, or the
persistent worker's loop. Both report every request as :class:`Done` (with the pickled
result) or :class:`Failed` (the exception's type, message and traceback), never silently."""

from __future__ import annotations

import contextlib
import gc
import multiprocessing.util
import os
import pickle
import queue
import signal
import sys
import threading
import time
import traceback
import types
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.reduction import recv_handle
from typing import Any

from .._staging import _views
from . import _transport
from ._messages import Done, DropArena, Failed, LayOut, MapArena, Ready, Reply, Run, Started, Stop
from ._priority import apply_priorities
from ._process import readable


def _failure(call_idx: int, seconds: float, exc: BaseException, prefix: str = "") -> Failed:
    name = f"{type(exc).__module__}.{type(exc).__qualname__}".removeprefix("builtins.")
    return Failed(call_idx, seconds, name, f"{prefix}{exc}", traceback.format_exc())


def _ignore_job_signals() -> None:
    """Ctrl-C reaches the whole process group, and a scheduler's early warning (SLURM's
    ``--signal=USR1@120``) every process of the job: the caller decides what happens to a
    save, so the worker ignores them and goes on writing. (SIGTERM stays: it is how the
    caller stops a worker.)"""
    for sig in (signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_IGN)


def run_request(
    call_idx: int, fn: Callable[..., Any] | None, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Reply:
    """Run ``fn(*args, **kwargs)`` and describe the outcome as a picklable reply."""
    start = time.perf_counter()
    try:
        result = fn(*args, **kwargs) if fn is not None else None
        payload = pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL)
    except BaseException as exc:
        return _failure(call_idx, time.perf_counter() - start, exc)
    return Done(call_idx, time.perf_counter() - start, payload)


def fork_child_main(
    conn: Connection,
    call_idx: int,
    fn: Callable[..., Any] | None,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    cpu_priority: int | None = None,
    io_priority: int | None = None,
    after: tuple[int, ...] = (),
    started: Any = None,
) -> None:
    """Entry point of a forked per-request child. ``after`` holds pidfds of the children
    forked before this one: their requests run first (see ``ForkOrder``); ``started`` is
    set to the time this request starts."""
    # The parent's heap may hold CUDA tensors: the child's GC must never free them.
    gc.disable()
    _ignore_job_signals()
    apply_priorities(cpu_priority, io_priority)
    waiting = list(after)
    while waiting:  # each pidfd is readable once its child has exited
        try:
            done = readable(waiting, None)
        except InterruptedError:
            continue
        waiting = [fd for fd in waiting if fd not in done]
    if started is not None:
        started.value = time.monotonic()
        with contextlib.suppress(OSError):  # wake the parent: the deadline starts now
            conn.send(Started(call_idx))
    reply = run_request(call_idx, fn, args, kwargs)
    with contextlib.suppress(OSError):  # the parent is gone; nobody is left to tell
        conn.send(reply)
    conn.close()
    # Done: exit now. Threads the function left running (not joined) are not waited for:
    # the next save waits for this process to exit, and its deadline is not theirs. What
    # multiprocessing flushes at a child's exit is flushed (a Queue's buffered messages),
    # and the standard streams.
    with contextlib.suppress(Exception):
        multiprocessing.util._run_finalizers()  # type: ignore[attr-defined]
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(0)


_EOF = object()  # the caller's end closed, or reading from it failed


def persistent_main(
    conn: Connection, cpu_priority: int | None = None, io_priority: int | None = None
) -> None:
    """Entry point of the persistent worker: serve requests in order until told to stop or
    until the caller's end of the connection closes (the caller exited or died)."""
    _ignore_job_signals()
    apply_priorities(cpu_priority, io_priority)
    jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()

    def read() -> None:
        # Drain the connection at all times, so the caller never blocks on a full pipe
        # while this process is busy writing a checkpoint.
        try:
            while True:
                msg = conn.recv()
                if isinstance(msg, MapArena):
                    _transport.map_arena(msg.arena_id, recv_handle(conn), msg.nbytes)
                    continue
                if isinstance(msg, LayOut):
                    _transport.lay_out(msg.arena_id, msg.plan)
                    continue
                jobs.put(msg)
                if isinstance(msg, Stop):
                    return
        except (EOFError, OSError):
            jobs.put(_EOF)
        except BaseException:
            # Anything else would leave the worker waiting forever: say why, then stop so
            # that the caller sees the worker die and fails what was in flight.
            traceback.print_exc(file=sys.stderr)
            jobs.put(_EOF)

    try:
        conn.send(Ready(os.getpid()))
    except OSError:  # the caller is already gone
        return
    threading.Thread(target=read, name="aiockpt-worker-reader", daemon=True).start()
    while True:
        msg = jobs.get()
        if msg is _EOF or isinstance(msg, Stop):
            break
        if isinstance(msg, DropArena):
            _transport.unmap_arena(msg.arena_id)
        elif isinstance(msg, Run):
            try:
                conn.send(Started(msg.call_idx))
                reply, fn = _run_payload(msg.call_idx, msg.payload)
                conn.send(reply)
            except OSError:
                break
            # aiockpt's own writers leave the views they were given as they were.
            _transport.restore_views(check=not _ours(fn))
    conn.close()


def _run_payload(call_idx: int, payload: bytes) -> tuple[Reply, Any]:
    try:
        fn, args, kwargs = _transport.loads(payload)
    except BaseException as exc:
        return _failure(call_idx, 0.0, exc, "could not unpickle the request in the worker: "), None
    # The views' pickling is known in advance only while nothing but aiockpt's own code
    # touches them: a user's function may change them before it saves them.
    with _views.trusting(_ours(fn)):
        return run_request(call_idx, fn, args, kwargs), fn


def _ours(fn: Any) -> bool:
    """Whether ``fn`` is one of aiockpt's own writers: a plain function of the package, or
    a method of one of its own objects (not of a subclass), as :func:`wrap_for_async`
    wraps it or not; never a user's function or override."""
    while type(fn).__module__.startswith("aiockpt.") and hasattr(fn, "__wrapped__"):
        fn = fn.__wrapped__  # wrap_for_async's wrapper
    if isinstance(fn, types.MethodType):
        owner = type(fn.__self__)
        if not (owner.__module__ or "").startswith("aiockpt."):
            return False
        fn = fn.__func__
    module = getattr(fn, "__module__", None) or ""
    return isinstance(fn, types.FunctionType) and module.startswith("aiockpt.")
