"""Module-level checkpoint functions for tests: picklable, so the persistent worker can run them."""

from __future__ import annotations

import os
import pickle
import signal
from typing import Any

import torch


def write_value(state: Any, path: str) -> str:
    """Pickle ``state`` to ``path``; returns the path."""
    with open(path, "wb") as f:
        pickle.dump(state, f)
    return path


def wait_then_write(state: Any, gate: str, path: str) -> str:
    """Block until the test writes to the FIFO ``gate``, then save ``state`` to ``path``."""
    with open(gate) as f:
        f.read()
    torch.save(state, path)
    return path


def raise_value_error(state: Any, message: str) -> None:
    raise ValueError(message)


def exit_hard(state: Any, code: int) -> None:
    os._exit(code)


def kill_self(state: Any) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def report_pid(state: Any, gate: str, pid_path: str) -> None:
    """Write this worker's pid, then block on the FIFO ``gate`` (to be killed meanwhile)."""
    with open(pid_path, "w") as f:
        f.write(str(os.getpid()))
    with open(gate) as f:
        f.read()


def gc_enabled(state: Any) -> bool:
    import gc

    return gc.isenabled()


def make_gate(directory: str, name: str) -> str:
    path = os.path.join(directory, name)
    os.mkfifo(path)
    return path


def open_gate(path: str) -> None:
    """Release a worker blocked in ``wait_then_write``/``report_pid`` on this FIFO."""
    fd = os.open(path, os.O_WRONLY)
    os.write(fd, b"go")
    os.close(fd)


from aiockpt import LocalStorage  # noqa: E402
from aiockpt._storage import save_file, write_atomic  # noqa: E402


class TinyDiskStorage(LocalStorage):
    """A disk that fills up after ``limit`` bytes per file (RLIMIT_FSIZE in the worker)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit

    def write_file(self, state_dict: Any, path: str) -> dict[str, Any]:
        import resource

        old = resource.getrlimit(resource.RLIMIT_FSIZE)
        previous_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (self.limit, old[1]))
        try:
            return save_file(state_dict, path)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, old)
            signal.signal(signal.SIGXFSZ, previous_handler)


class StallingStorage(LocalStorage):
    """Writes half of the file, records the worker's pid, then blocks on a FIFO: a test
    kills the worker there, mid-write."""

    def __init__(self, gate: str, pid_path: str) -> None:
        self.gate = gate
        self.pid_path = pid_path

    def write_file(self, state_dict: Any, path: str) -> dict[str, Any]:
        def half_then_stall(f: Any) -> None:
            f.write(b"\0" * 100_000)
            with open(self.pid_path, "w") as p:
                p.write(str(os.getpid()))
            with open(self.gate) as g:
                g.read()

        return write_atomic(path, half_then_stall)


class Opaque:
    """Not a tensor, not a plain container: weights_only loading refuses it."""

    def __init__(self, value: int) -> None:
        self.value = value
