"""Module-level checkpoint functions for tests: picklable, so the persistent worker can run them."""

from __future__ import annotations

import os
import pickle
import re
import signal
import threading
import time
from typing import Any

import torch


def write_value(state: Any, path: str) -> str:
    """Pickle ``state`` to ``path``; returns the path."""
    with open(path, "wb") as f:
        pickle.dump(state, f)
    return path


# A worker parked on a gate gives up after this long, so that a failing test (which never
# opens its gates) cannot keep the queue's close() waiting beyond the test's own timeout.
GATE_TIMEOUT_S = 60.0


def wait_gate(gate: str, timeout: float = GATE_TIMEOUT_S) -> None:
    """Block until the test opens ``gate``; raise TimeoutError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(gate):
        if time.monotonic() > deadline:
            raise TimeoutError(f"gate {gate} was never opened")
        time.sleep(0.005)


def wait_then_write(state: Any, gate: str, path: str) -> str:
    """Block until the test opens ``gate``, then save ``state`` to ``path``."""
    wait_gate(gate)
    torch.save(state, path)
    return path


def raise_value_error(state: Any, message: str) -> None:
    raise ValueError(message)


def exit_hard(state: Any, code: int) -> None:
    os._exit(code)


def kill_self(state: Any) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def report_pid(state: Any, gate: str, pid_path: str) -> None:
    """Write this worker's pid, then block on ``gate`` (to be killed meanwhile)."""
    write_pid(pid_path)
    wait_gate(gate)


def gc_enabled(state: Any) -> bool:
    import gc

    return gc.isenabled()


def write_pid(pid_path: str) -> None:
    """Publish this process's pid atomically (a reader never sees a partial file)."""
    with open(pid_path + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.rename(pid_path + ".tmp", pid_path)


def read_pid(pid_path: str, timeout: float = GATE_TIMEOUT_S) -> int:
    """The pid a worker published with ``write_pid`` (waits for it, bounded)."""
    wait_gate(pid_path, timeout)
    with open(pid_path) as f:
        return int(f.read())


def make_gate(directory: str, name: str) -> str:
    """A closed gate: a path that does not exist yet."""
    return os.path.join(directory, name)


def open_gate(path: str) -> None:
    """Release a worker blocked in ``wait_gate`` on ``path``."""
    with open(path, "w"):
        pass


from aiockpt import LocalStorage  # noqa: E402

_ATTEMPT = re.compile(r"\.[0-9a-f]{16}(\.pt|\.distcp)$")


def plain(name: str) -> str:
    """A data file's name without its save attempt's token (``shard-00000-of-00001.pt``,
    ``__0_0.distcp``); the token's shape is checked, other names are returned as they are."""
    return _ATTEMPT.sub(r"\1", name)


def listing(directory: Any) -> list[str]:
    """The sorted names in ``directory``, data files without their attempt's token."""
    return sorted(plain(name) for name in os.listdir(directory))


def data_file(directory: Any, name: str) -> Any:
    """The one file in ``directory`` whose name without its attempt's token is ``name``."""
    from pathlib import Path

    [found] = [p for p in Path(directory).iterdir() if plain(p.name) == name]
    return found


def fix_attempts(module: Any) -> str:
    """Make every later save attempt planned in ``module`` (``aiockpt._sharded`` or
    ``aiockpt.dcp._plan``) use one known token, to plant a fault under its name."""
    import types

    token = "0" * 16
    module.secrets = types.SimpleNamespace(token_hex=lambda nbytes: token[: 2 * nbytes])
    return token


from aiockpt.storage._atomic import write_atomic  # noqa: E402
from aiockpt.storage._local import save_file  # noqa: E402


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


class HalvingStorage(LocalStorage):
    """Stores floating-point tensors as float16, changing them in place before it writes
    (a backend of the user's that compresses)."""

    def write_file(self, state_dict: Any, path: str) -> dict[str, Any]:
        for value in state_dict.values():
            if value.is_floating_point():
                value.data = value.data.half()
        return super().write_file(state_dict, path)


class TrimmingStorage(LocalStorage):
    """Keeps the first half of each 1-D tensor, resizing it in place before it writes."""

    def write_file(self, state_dict: Any, path: str) -> dict[str, Any]:
        for value in state_dict.values():
            value.resize_(value.numel() // 2)
        return super().write_file(state_dict, path)


class StallingStorage(LocalStorage):
    """Writes half of the file, records the worker's pid, then blocks on a FIFO: a test
    kills the worker there, mid-write."""

    def __init__(self, gate: str, pid_path: str) -> None:
        self.gate = gate
        self.pid_path = pid_path

    def write_file(self, state_dict: Any, path: str) -> dict[str, Any]:
        def half_then_stall(f: Any) -> None:
            f.write(b"\0" * 100_000)
            write_pid(self.pid_path)
            wait_gate(self.gate)

        return write_atomic(path, half_then_stall)


class Opaque:
    """Not a tensor, not a plain container: weights_only loading refuses it."""

    def __init__(self, value: int) -> None:
        self.value = value


def crash_leaving_grandchild(state: Any, gate: str, pid_path: str) -> None:
    """Fork a helper that inherits the worker's connection and parks on ``gate``, then die:
    the worker's death must be seen although its connection stays open in the helper."""
    pid = os.fork()
    if pid == 0:
        try:
            write_pid(pid_path)
            wait_gate(gate)
        finally:
            os._exit(0)
    os.kill(os.getpid(), signal.SIGKILL)


def _refuse_to_load() -> None:
    raise ImportError("this result's class is not importable here")


class FailsToLoad:
    """Pickles fine in the worker; unpickling it in the caller raises."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (_refuse_to_load, ())


def return_unloadable(state: Any) -> FailsToLoad:
    return FailsToLoad()


import dataclasses  # noqa: E402
from collections import OrderedDict  # noqa: E402
from typing import NamedTuple  # noqa: E402


@dataclasses.dataclass
class TrainState:
    weights: Any
    step: int


class Pair(NamedTuple):
    first: Any
    second: Any


class Ordered(OrderedDict):  # type: ignore[type-arg]
    """An OrderedDict subclass, as some optimizers keep their state."""


def raise_disk_full(state: Any) -> None:
    raise OSError(28, "No space left on device")


class FaultyStorage(LocalStorage):
    """Local storage with one fault injected in the worker's write, or in rank 0's commit.

    ``fault`` is one of: ``raise`` (the write raises), ``kill_before`` / ``kill_during`` /
    ``kill_after`` (the worker SIGKILLs itself before, half-way through or after writing),
    ``exit0`` (the worker exits with status 0 without reporting), ``dir_removed`` (the step
    directory disappears before the write), ``commit_raises`` (the metadata write fails).
    """

    def __init__(self, fault: str) -> None:
        self.fault = fault

    def write_file(self, state_dict: Any, path: str) -> dict[str, Any]:
        import shutil

        fault = self.fault
        if fault == "raise":
            raise OSError(5, "Input/output error (injected)")
        if fault == "kill_before":
            os.kill(os.getpid(), signal.SIGKILL)
        if fault == "exit0":
            os._exit(0)
        if fault == "dir_removed":
            shutil.rmtree(os.path.dirname(path))
        if fault == "kill_during":

            def half_then_die(f: Any) -> None:
                f.write(b"\0" * 100_000)
                f.flush()
                os.kill(os.getpid(), signal.SIGKILL)

            return write_atomic(path, half_then_die)
        record = super().write_file(state_dict, path)
        if fault == "kill_after":
            os.kill(os.getpid(), signal.SIGKILL)
        return record

    def commit(self, directory: str, files: list[dict[str, Any]], extra: dict[str, Any]) -> None:
        if self.fault == "commit_raises":
            raise OSError(28, "No space left on device (injected, metadata)")
        super().commit(directory, files, extra)


def save_with_fsync_spy(state: Any, path: str, log_path: str) -> dict[str, Any]:
    """``save_file`` in the worker with ``os.fsync`` and ``os.replace`` recorded: the log
    lists ``("fsync", what the descriptor names)`` and ``("replace", src, dst)`` in order."""
    import json

    events: list[list[str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(["fsync", os.readlink(f"/proc/self/fd/{fd}")])
        real_fsync(fd)

    def replace(src: Any, dst: Any) -> None:
        real_replace(src, dst)
        events.append(["replace", os.path.abspath(src), os.path.abspath(dst)])

    os.fsync, os.replace = fsync, replace  # type: ignore[assignment]
    try:
        record = save_file(state, path)
    finally:
        os.fsync, os.replace = real_fsync, real_replace  # type: ignore[assignment]
    with open(log_path, "w") as f:
        json.dump(events, f)
    return record


def tamper_then_save(state: Any, path: str) -> str:
    """Save ``state`` after changing its tensor objects the way a careless checkpoint
    function might: ``.data`` replaced by a bfloat16 copy, ``requires_grad_()``."""
    state["a"].data = state["a"].data.to(torch.bfloat16)
    state["b"].requires_grad_()
    state["b"].note = "set by the worker"
    torch.save(state, path)
    return path


def torch_save(state: Any, path: str) -> str:
    torch.save(state, path)
    return path


def mark_then_save(state: Any, marker: str, path: str) -> str:
    """Create ``marker`` (the request started), then save ``state`` to ``path``."""
    open_gate(marker)
    torch.save(state, path)
    return path


def move_then_save(state: Any, path: str) -> str:
    """Save ``state`` after moving its tensors' storages to fresh shared memory, as
    handing them to another process through torch.multiprocessing does."""
    for v in state.values():
        v.untyped_storage().share_memory_()
    torch.save(state, path)
    return path


def grad_and_hook_then_save(state: Any, path: str) -> str:
    """Save ``state`` after giving its tensors a ``.grad`` and a backward hook."""
    for v in state.values():
        v.grad = torch.full_like(v, 7.0)
        v.requires_grad_(True)
        v.register_hook(lambda g: g)
        v.requires_grad_(False)
    torch.save(state, path)
    return path


def report_grad_then_save(state: Any, path: str) -> str:
    """Save ``state``; write to ``path + ".seen"`` each tensor's ``(grad, has hooks)``
    as this request received it."""
    seen = {
        k: (v.grad, bool(v._backward_hooks) or v._post_accumulate_grad_hooks is not None)
        for k, v in state.items()
    }
    with open(path + ".seen", "wb") as f:
        pickle.dump(seen, f)
    torch.save(state, path)
    return path


def post_hook_then_save(state: Any, path: str) -> str:
    """Save ``state`` after giving its tensors a post-accumulate-grad hook."""
    for v in state.values():
        v.requires_grad_(True)
        v.register_post_accumulate_grad_hook(lambda p: None)
        v.requires_grad_(False)
    torch.save(state, path)
    return path


def alias_then_save(state: Any, path: str) -> str:
    """Save ``state`` after pointing each tensor at a new storage object over the same
    bytes (the tensors no longer share the storage they shared)."""
    for v in state.values():
        alias = torch.frombuffer(
            (__import__("ctypes").c_char * v.untyped_storage().nbytes()).from_address(
                v.untyped_storage().data_ptr()
            ),
            dtype=torch.uint8,
        ).untyped_storage()
        v.set_(alias, v.storage_offset(), v.size(), v.stride())
    torch.save(state, path)
    return path


def _thread_loading_it() -> int:
    return __import__("threading").get_ident()


class LoadedWhere:
    """Unpickles as the id of the thread that unpickles it."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (_thread_loading_it, ())


def return_loaded_where(state: Any) -> LoadedWhere:
    return LoadedWhere()


UNPICKLING = threading.Event()  # in the caller: a HeldUntilReleased is being unpickled
RELEASE = threading.Event()  # lets that unpickle finish


def _held_until_released() -> bool:
    UNPICKLING.set()
    return RELEASE.wait(10)


class HeldUntilReleased:
    """Unpickles as True once :data:`RELEASE` is set (False if nobody sets it in 10 s)."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (_held_until_released, ())


def return_held_until_released(state: Any) -> HeldUntilReleased:
    return HeldUntilReleased()


REPORTS: Any = None  # a multiprocessing queue a test sets, read in the test process


def save_and_report(state: Any, path: str) -> str:
    """Save, then report through :data:`REPORTS` (200 kB: more than a pipe holds at once,
    so a feeder thread is still writing it when the function returns)."""
    torch.save(state, path)
    REPORTS.put(("saved", path, b"x" * 200_000))
    return path


def save_then_linger(state: Any, seconds: float, path: str) -> str:
    """Save, then return, leaving a non-daemon thread (an uploader that was not joined)
    that keeps running for ``seconds``."""
    torch.save(state, path)
    threading.Thread(target=time.sleep, args=(seconds,), daemon=False).start()
    return path


def sleep_then_save(state: Any, seconds: float, path: str) -> str:
    """Take ``seconds`` (a slow disk), then save ``state`` to ``path``."""
    time.sleep(seconds)
    torch.save(state, path)
    return path


_KEPT: list[Any] = []


def keep_then_save(state: Any, path: str) -> str:
    """Save ``state``, keeping a reference to its tensor past the request (a careless
    cache): the next request may change it."""
    _KEPT.append(state["w"])
    torch.save(state, path)
    return path


def change_kept_then_save(state: Any, path: str) -> str:
    """Change the tensor an earlier request kept, then save ``state``."""
    for kept in _KEPT:
        kept.data = torch.zeros_like(kept)
    _KEPT.clear()
    torch.save(state, path)
    return path


def _interrupt() -> None:
    raise KeyboardInterrupt("raised while the result was unpickled")


class Interrupting:
    """Unpickles by raising KeyboardInterrupt (a result's own code, in the caller)."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (_interrupt, ())


def return_interrupting(state: Any) -> Interrupting:
    return Interrupting()


def mark_then_wait_then_write(state: Any, gate: str, path: str, marker: str) -> str:
    """Create ``marker`` (the request started), wait for ``gate``, then save ``state``."""
    open_gate(marker)
    return wait_then_write(state, gate, path)


def live_workers() -> list[Any]:
    """This process's live descendants (psutil processes) but multiprocessing's
    forkserver and resource tracker, which serve the whole session, and the S3 server a
    test module keeps for its tests (s3_server.py): what a test must not leave behind."""
    import psutil

    found = []
    for child in psutil.Process().children(recursive=True):
        try:
            cmd = " ".join(child.cmdline())
            if "resource_tracker" in cmd or "forkserver" in cmd or "moto.server" in cmd:
                continue
            if child.status() == psutil.STATUS_ZOMBIE:
                continue
        except psutil.Error:
            continue
        found.append(child)
    return found
