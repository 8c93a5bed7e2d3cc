"""What runs inside checkpoint worker processes: a forked child for one request, or the
persistent worker's loop. Both report every request as ``done`` (with the pickled result)
or ``error`` (with the exception's type, message and traceback text), never silently."""

from __future__ import annotations

import contextlib
import gc
import os
import pickle
import queue
import signal
import threading
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.reduction import recv_handle
from typing import Any

from . import _transport

Reply = tuple[Any, ...]


def run_request(
    call_idx: int, fn: Callable[..., Any] | None, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Reply:
    """Run ``fn(*args, **kwargs)`` and describe the outcome as a picklable reply."""
    start = time.perf_counter()
    try:
        result = fn(*args, **kwargs) if fn is not None else None
        payload = pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL)
    except BaseException as exc:
        return (
            "error",
            call_idx,
            time.perf_counter() - start,
            f"{type(exc).__module__}.{type(exc).__qualname__}".removeprefix("builtins."),
            str(exc),
            traceback.format_exc(),
        )
    return ("done", call_idx, time.perf_counter() - start, payload)


def fork_child_main(
    conn: Connection,
    call_idx: int,
    fn: Callable[..., Any] | None,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> None:
    """Entry point of a forked per-request child."""
    # The parent's heap may hold CUDA tensors: the child's GC must never free them.
    gc.disable()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    reply = run_request(call_idx, fn, args, kwargs)
    with contextlib.suppress(OSError):  # the parent is gone; nobody is left to tell
        conn.send(reply)
    conn.close()


def persistent_main(conn: Connection) -> None:
    """Entry point of the persistent worker: serve requests in order until told to stop or
    until the caller's end of the connection closes (the caller exited or died)."""
    # Ctrl-C reaches the whole process group; the caller decides what happens to a save.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    jobs: queue.SimpleQueue[Reply] = queue.SimpleQueue()

    def read() -> None:
        # Drain the connection at all times, so the caller never blocks on a full pipe
        # while this process is busy writing a checkpoint.
        try:
            while True:
                msg = conn.recv()
                if msg[0] == "arena":
                    _transport.map_arena(msg[1], recv_handle(conn), msg[2])
                    continue
                jobs.put(msg)
                if msg[0] == "stop":
                    return
        except (EOFError, OSError):
            jobs.put(("eof",))

    try:
        conn.send(("ready", os.getpid()))
    except OSError:  # the caller is already gone
        return
    threading.Thread(target=read, name="aiockpt-worker-reader", daemon=True).start()
    while True:
        msg = jobs.get()
        kind = msg[0]
        if kind in ("stop", "eof"):
            break
        if kind == "drop":
            _transport.unmap_arena(msg[1])
        elif kind == "run":
            _, call_idx, payload = msg
            reply = _run_payload(call_idx, payload)
            try:
                conn.send(reply)
            except OSError:
                break
    conn.close()


def _run_payload(call_idx: int, payload: bytes) -> Reply:
    try:
        fn, args, kwargs = pickle.loads(payload)
    except BaseException as exc:
        return (
            "error",
            call_idx,
            0.0,
            type(exc).__qualname__,
            f"could not unpickle the request in the worker: {exc}",
            traceback.format_exc(),
        )
    return run_request(call_idx, fn, args, kwargs)
