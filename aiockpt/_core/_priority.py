"""CPU and I/O priority of a checkpoint worker: set by the worker on itself at start, read
back for any process (Linux ``ioprio_get``/``ioprio_set`` through the C library)."""

from __future__ import annotations

import ctypes
import logging
import os
import platform

logger = logging.getLogger("aiockpt")

# ioprio_set / ioprio_get system call numbers by machine (they are not in the C library).
_SYSCALLS = {"x86_64": (251, 252), "aarch64": (30, 31), "ppc64le": (273, 274)}
_IOPRIO_WHO_PROCESS = 1
_CLASS_SHIFT = 13
_BEST_EFFORT_LEVEL = 4  # the kernel's default level inside the realtime and best-effort classes


def _syscall(index: int, *args: int) -> int | None:
    numbers = _SYSCALLS.get(platform.machine())
    if numbers is None:
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    result = int(libc.syscall(numbers[index], *args))
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return result


def get_io_priority(pid: int = 0) -> tuple[int, int] | None:
    """``(class, level)`` of process ``pid`` (0: this one), None where unsupported."""
    value = _syscall(1, _IOPRIO_WHO_PROCESS, pid)
    return None if value is None else (value >> _CLASS_SHIFT, value & ((1 << _CLASS_SHIFT) - 1))


def set_io_priority(io_class: int, pid: int = 0) -> bool:
    """Set the I/O scheduling class of ``pid`` (0: this process); False where unsupported."""
    level = _BEST_EFFORT_LEVEL if io_class in (1, 2) else 0
    return _syscall(0, _IOPRIO_WHO_PROCESS, pid, (io_class << _CLASS_SHIFT) | level) is not None


def apply_priorities(cpu_priority: int | None, io_priority: int | None) -> None:
    """Lower this process's CPU priority to nice ``cpu_priority`` (never raise it) and set
    its I/O class. Failures are logged: a checkpoint is still worth writing without them."""
    if cpu_priority is not None:
        current = os.nice(0)
        if cpu_priority > current:
            try:
                os.nice(cpu_priority - current)
            except OSError as exc:
                logger.warning(
                    "checkpoint worker %d: cannot set nice %d: %s", os.getpid(), cpu_priority, exc
                )
    if io_priority:
        try:
            if not set_io_priority(io_priority):
                logger.warning(
                    "checkpoint worker %d: io_priority is not supported on %s; unchanged",
                    os.getpid(),
                    platform.machine(),
                )
        except OSError as exc:
            logger.warning(
                "checkpoint worker %d: cannot set I/O class %d: %s", os.getpid(), io_priority, exc
            )
