"""Watching a worker process: how its death is seen, how it is stopped, and how its reply
or its death becomes a request's :class:`LocalOutcome`."""

from __future__ import annotations

import contextlib
import os
import pickle
import select
import signal
import time
from multiprocessing.process import BaseProcess
from typing import Any

from .._exceptions import WorkerCrashedError, WorkerError
from .._request import LocalOutcome
from ._messages import Done, Reply

# How long a worker that closed its connection gets to exit before it counts as dead.
EXIT_GRACE_S = 1.0
# How long a stopped worker gets to exit on its own before it is killed.
STOP_GRACE_S = 10.0


def stop_process(process: BaseProcess, grace: float, sigterm_timeout: float = 0.0) -> None:
    """Wait up to ``grace`` seconds for ``process`` to exit, then send it SIGTERM, give it
    ``sigterm_timeout`` seconds more, then SIGKILL it; reap it either way."""
    _wait_exit(process, grace)
    if process.is_alive() and sigterm_timeout > 0:
        process.terminate()
        if process.pid is not None:  # a stopped process (SIGSTOP, a debugger) must wake
            with contextlib.suppress(OSError):  # to act on SIGTERM: it would cost the wait
                os.kill(process.pid, signal.SIGCONT)
        _wait_exit(process, sigterm_timeout)
    if process.is_alive():
        process.kill()
        process.join()


def _wait_exit(process: BaseProcess, timeout: float) -> None:
    """Wait up to ``timeout`` for ``process`` to exit, on a pidfd where there is one:
    ``join`` waits on a pipe that a grandchild it started may keep open long after."""
    fd = None
    if hasattr(os, "pidfd_open") and process.pid is not None and timeout > 0:
        with contextlib.suppress(OSError):
            fd = os.pidfd_open(process.pid)
    if fd is None:
        process.join(timeout)
        return
    try:
        readable([fd], timeout)
    finally:
        os.close(fd)
    process.join(0)


def readable(fds: list[int] | tuple[int, ...], timeout: float | None) -> list[int]:
    """Which of ``fds`` are readable, waiting up to ``timeout`` seconds (None: until one
    is). ``poll``, not ``select``: descriptors past 1024 are fine."""
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)
    wait = None if timeout is None else max(0, int(timeout * 1000))
    return [fd for fd, _ in poller.poll(wait)]


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
    a result stays pickled (``payload``) until :func:`resolve` reads it."""
    call_idx = reply.call_idx
    if isinstance(reply, Done):
        return LocalOutcome(call_idx, payload=reply.payload, run_seconds=reply.seconds)
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


def resolve(outcome: LocalOutcome, rank: int) -> LocalOutcome:
    """``outcome`` with its result unpickled; a result that cannot be unpickled here is
    that call's failure."""
    if outcome.payload is None:
        return outcome
    call_idx = outcome.call_idx
    try:
        result = pickle.loads(outcome.payload)
    except BaseException as exc:  # Ctrl-C or exit raised by the result's own code too:
        # that call fails, typed; the reply is already consumed, so raising would lose it.
        error = WorkerError(
            f"checkpoint call {call_idx} on rank {rank} finished in the worker, but its "
            f"result could not be unpickled in the caller: {type(exc).__name__}: {exc}. "
            "Return plain values (or None) from the checkpoint function",
            call_idx=call_idx,
            rank=rank,
            exc_type=type(exc).__name__,
            exc_message=str(exc),
        )
        error.__cause__ = exc  # the async queue re-raises a KeyboardInterrupt once drained
        return LocalOutcome(call_idx, error=error, run_seconds=outcome.run_seconds)
    return LocalOutcome(call_idx, result=result, run_seconds=outcome.run_seconds)


START_HINT = (
    " The worker died before it finished starting: its stderr says why. A worker started "
    "with spawn or forkserver imports your main module, so code that starts training must "
    "sit under `if __name__ == '__main__':`."
)


def crash_outcome(
    call_idx: int, rank: int, exitcode: int | None, started: bool, hint: str = ""
) -> LocalOutcome:
    """The outcome of a request whose worker died (while running it, or before it)."""
    what = "while writing it" if started else "before it started it"
    error = WorkerCrashedError(
        f"the checkpoint worker of call {call_idx} on rank {rank} {_describe_exit(exitcode)} "
        f"{what}; the checkpoint was not written. The next request starts a fresh worker."
        f"{hint}",
        call_idx=call_idx,
        rank=rank,
        exitcode=exitcode,
    )
    return LocalOutcome(call_idx, error=error)
