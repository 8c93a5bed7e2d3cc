"""The fault matrix: for each caller (fork, persistent) and each facade (blocking, async),
one fault injected into one save between two good ones.

Every cell checks the same four things: the error the user sees (type and message), that
nothing hangs (each test is bounded by its timeout), that the previously committed
checkpoint is intact and is still the latest, and that the next save works.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import threading
from pathlib import Path
from typing import Any

import anyio
import pytest
import torch
from ckpt_helpers import (
    FaultyStorage,
    StallingStorage,
    TinyDiskStorage,
    make_gate,
    open_gate,
    read_pid,
)

from aiockpt import (
    AsyncCheckpointManager,
    CheckpointError,
    CheckpointManager,
    FinalizeError,
    QueueClosedError,
    StagingError,
    WorkerCrashedError,
    WorkerError,
)
from aiockpt._staging._arena import StagingBuffers

# fault -> (error type, text the message must contain)
FAULTS: dict[str, tuple[type[CheckpointError], str]] = {
    "raise": (WorkerError, "Input/output error (injected)"),
    "kill_before": (WorkerCrashedError, "SIGKILL"),
    "kill_during": (WorkerCrashedError, "SIGKILL"),
    "kill_after": (WorkerCrashedError, "SIGKILL"),
    "exit0": (WorkerCrashedError, "exited with code 0"),
    "dir_removed": (WorkerError, "No such file or directory"),
    "commit_raises": (FinalizeError, "No space left on device (injected, metadata)"),
    "disk_full": (WorkerError, "File too large"),
    "staging": (StagingError, "device lost (injected)"),
}
CALLERS = pytest.mark.parametrize("persistent", [False, True], ids=["fork", "persistent"])
pytestmark = pytest.mark.timeout(90)


def state(step: int) -> dict[str, Any]:
    return {"w": torch.full((2048,), float(step)), "step": torch.tensor(step)}


class Switchable(FaultyStorage):
    """A storage whose fault the test turns on for one save (``disk_full`` included)."""

    def __init__(self) -> None:
        super().__init__("none")
        self.disk = TinyDiskStorage(4096)

    def write_file(self, state_dict: Any, path: str) -> dict[str, Any]:
        if self.fault == "disk_full":
            return self.disk.write_file(state_dict, path)
        return super().write_file(state_dict, path)


def _arm(fault: str, storage: Switchable, monkeypatch: pytest.MonkeyPatch) -> None:
    if fault != "staging":
        storage.fault = fault
        return

    def broken(self: StagingBuffers, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("device lost (injected)")

    monkeypatch.setattr(StagingBuffers, "stage", broken)


def _disarm(storage: Switchable, monkeypatch: pytest.MonkeyPatch) -> None:
    storage.fault = "none"
    monkeypatch.undo()


def _check_previous_intact(restored: Any) -> None:
    assert torch.equal(restored["w"], state(1)["w"]) and int(restored["step"]) == 1


@CALLERS
@pytest.mark.parametrize("fault", list(FAULTS))
def test_blocking_facade(
    tmp_path: Path, persistent: bool, fault: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    error_type, text = FAULTS[fault]
    storage = Switchable()
    with CheckpointManager(tmp_path, storage=storage, persistent=persistent) as mgr:
        mgr.save(1, state(1))
        mgr.poll(blocking=True)
        _arm(fault, storage, monkeypatch)
        with pytest.raises(error_type, match=re.escape(text)) as info:
            mgr.save(2, state(2))
            mgr.poll(blocking=True)
        _disarm(storage, monkeypatch)
        assert info.value.call_idx == 1
        assert mgr.latest_step() == 1 and mgr.committed_steps() == [1]
        _check_previous_intact(mgr.restore())
        mgr.save(3, state(3))
        mgr.poll(blocking=True)
        assert mgr.committed_steps() == [1, 3]
        assert int(mgr.restore()["step"]) == 3


@CALLERS
@pytest.mark.parametrize("fault", list(FAULTS))
@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
@pytest.mark.anyio
async def test_async_facade(
    tmp_path: Path,
    persistent: bool,
    fault: str,
    anyio_backend: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    error_type, text = FAULTS[fault]
    storage = Switchable()
    async with AsyncCheckpointManager(tmp_path, storage=storage, persistent=persistent) as mgr:
        await (await mgr.save(1, state(1)))
        _arm(fault, storage, monkeypatch)
        with pytest.raises(error_type, match=re.escape(text)) as info:
            fut = await mgr.save(2, state(2))
            await fut
        _disarm(storage, monkeypatch)
        assert info.value.call_idx == 1
        assert await mgr.alatest_step() == 1
        _check_previous_intact(await mgr.restore())
        await (await mgr.save(3, state(3)))
        assert await mgr.acommitted_steps() == [1, 3]
        assert int((await mgr.restore())["step"]) == 3


@CALLERS
def test_ctrl_c_while_a_save_is_in_flight(tmp_path: Path, persistent: bool) -> None:
    """Ctrl-C reaches the training process (and its worker, which ignores it) while the loop
    waits for a save: the KeyboardInterrupt propagates, the save is not lost, and a later
    poll commits it."""
    gate = make_gate(str(tmp_path), "gate")
    pid_file = str(tmp_path / "pid")
    storage = StallingStorage(gate, pid_file)
    main = threading.get_ident()
    with CheckpointManager(tmp_path / "ck", storage=storage, persistent=persistent) as mgr:
        mgr.save(1, state(1))

        waiting = threading.Event()

        def press_ctrl_c() -> None:
            worker = read_pid(pid_file)  # the worker is inside the write
            waiting.wait(60)  # the main thread is inside pytest.raises: Ctrl-C lands there
            os.kill(worker, signal.SIGINT)
            signal.pthread_kill(main, signal.SIGINT)

        presser = threading.Thread(target=press_ctrl_c)
        presser.start()
        with pytest.raises(KeyboardInterrupt):
            waiting.set()
            mgr.poll(blocking=True)
        presser.join()
        assert mgr.latest_step() is None
        open_gate(gate)
        assert mgr.poll(blocking=True) == [0]
        assert mgr.latest_step() == 1


@CALLERS
def test_close_while_in_flight_commits_then_refuses(tmp_path: Path, persistent: bool) -> None:
    gate = make_gate(str(tmp_path), "gate")
    pid_file = str(tmp_path / "pid")
    mgr = CheckpointManager(
        tmp_path / "ck", storage=StallingStorage(gate, pid_file), persistent=persistent
    )
    mgr.save(1, state(1))
    opener = threading.Thread(target=lambda: (read_pid(pid_file), open_gate(gate)))
    opener.start()
    mgr.close()  # waits for the save, commits it, stops the worker
    opener.join()
    assert mgr.latest_step() == 1
    with pytest.raises(QueueClosedError, match="closed"):
        mgr.save(2, state(2))


@CALLERS
@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
@pytest.mark.anyio
async def test_aclose_while_in_flight_commits(
    tmp_path: Path, persistent: bool, anyio_backend: str
) -> None:
    gate = make_gate(str(tmp_path), "gate")
    pid_file = str(tmp_path / "pid")
    mgr = AsyncCheckpointManager(
        tmp_path / "ck", storage=StallingStorage(gate, pid_file), persistent=persistent
    )
    async with mgr:
        fut = await mgr.save(1, state(1))
        await anyio.to_thread.run_sync(read_pid, pid_file)
        open_gate(gate)
    assert fut.done() and fut.result().call_idx == 0
    assert mgr.latest_step() == 1


RESTART_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
import torch
from ckpt_helpers import StallingStorage, read_pid
from aiockpt import CheckpointManager

if __name__ == "__main__":
    mgr = CheckpointManager({directory!r}, storage=StallingStorage({gate!r}, {pid!r}),
                            persistent={persistent})
    mgr.save(1, {{"w": torch.full((64,), 1.0)}})
    print("worker", read_pid({pid!r}), flush=True)  # step 1's write is parked on the gate
    sys.stdin.read()  # until the test kills this process
"""


@CALLERS
def test_training_process_killed_mid_save_then_restart_restores_the_previous_step(
    tmp_path: Path, persistent: bool
) -> None:
    import subprocess
    import sys

    import psutil

    directory = tmp_path / "ck"
    with CheckpointManager(directory, persistent=persistent) as mgr:
        mgr.save(0, state(0))
        mgr.poll(blocking=True)
    gate, pid = str(tmp_path / "gate"), str(tmp_path / "pid")
    script = RESTART_SCRIPT.format(
        tests=str(Path(__file__).parent),
        directory=str(directory),
        gate=gate,
        pid=pid,
        persistent=persistent,
    )
    trainer = subprocess.Popen(
        [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert trainer.stdout is not None
        worker = int(trainer.stdout.readline().split()[1])
        trainer.kill()  # SIGKILL the training process mid-save
        trainer.wait(30)
        # Its worker lingers; let it finish the write it was in, with nobody to commit it.
        open_gate(gate)
        with contextlib.suppress(psutil.NoSuchProcess):
            psutil.Process(worker).wait(60)
    finally:
        if trainer.poll() is None:
            trainer.kill()
        open_gate(gate)
    # The restart: step 0 is the latest, step 1 was never committed, and saving it works.
    with CheckpointManager(directory, persistent=persistent) as mgr:
        assert mgr.latest_step() == 0 and mgr.committed_steps() == [0]
        assert int(mgr.restore()["step"]) == 0
        mgr.save(1, state(1))
        mgr.poll(blocking=True)
        assert mgr.committed_steps() == [0, 1]
        assert int(mgr.restore()["step"]) == 1


class _Numbers(torch.utils.data.Dataset[torch.Tensor]):
    def __len__(self) -> int:
        return 10_000

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.full((256,), float(i))


def test_fork_per_save_while_other_threads_hold_locks(tmp_path: Path) -> None:
    """Threads that run torch ops, log and iterate a DataLoader with worker processes are
    busy at every fork; the forked writer must never deadlock on a lock one of them held
    (a deadlock would surface as SaveTimeoutError, not as a hang)."""
    import logging

    stop = threading.Event()
    log = logging.getLogger("aiockpt.test.busy")

    def matmuls() -> None:
        a = torch.randn(128, 128)
        while not stop.is_set():
            a = (a @ a).tanh()

    def chatter() -> None:
        while not stop.is_set():
            log.debug("step")

    def loader() -> None:
        data = torch.utils.data.DataLoader(
            _Numbers(), batch_size=64, num_workers=2, pin_memory=True
        )
        while not stop.is_set():
            for _ in data:
                if stop.is_set():
                    break

    threads = [threading.Thread(target=f, daemon=True) for f in (matmuls, matmuls, chatter, loader)]
    for t in threads:
        t.start()
    try:
        with CheckpointManager(tmp_path, persistent=False, save_timeout=60) as mgr:
            for step in range(1, 21):
                mgr.save(step, state(step))
                mgr.poll(blocking=step % 5 == 0)
            mgr.poll(blocking=True)
            assert mgr.committed_steps() == list(range(1, 21))
    finally:
        stop.set()
        for t in threads:
            t.join(60)
