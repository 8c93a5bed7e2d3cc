"""Checkpoint managers: steps, retention, restore, and faults that must not lose data."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from ckpt_helpers import StallingStorage, TinyDiskStorage, make_gate

from aiockpt import (
    AsyncCheckpointManager,
    CheckpointManager,
    CheckpointNotFoundError,
    InvalidRequestError,
    WorkerCrashedError,
    WorkerError,
    verify,
)


def sd(step: int) -> dict[str, Any]:
    return {"w": torch.full((4096,), float(step)), "step": step}


@contextlib.contextmanager
def unwritable(path: Path) -> Iterator[None]:
    """Make ``path`` refuse new files, even to root (immutable attribute)."""
    if os.geteuid() != 0:
        path.chmod(0o500)
        try:
            yield
        finally:
            path.chmod(0o700)
        return
    if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0:
        pytest.skip("cannot make a directory unwritable for root here (no chattr +i)")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


def test_blocking_manager_saves_prunes_and_restores(tmp_path: Path) -> None:
    with CheckpointManager(tmp_path, keep_last=2) as mgr:
        assert mgr.latest_step() is None
        with pytest.raises(CheckpointNotFoundError, match="no committed checkpoint"):
            mgr.restore()
        for step in range(1, 6):
            state = sd(step)
            mgr.save(step, state)
            state["w"].fill_(-1)  # staged already: does not reach the checkpoint
            mgr.poll(blocking=True)
        assert mgr.committed_steps() == [4, 5] and mgr.latest_step() == 5
        assert torch.equal(mgr.restore()["w"], torch.full((4096,), 5.0))
        assert mgr.restore(step=4)["step"] == 4
        with pytest.raises(CheckpointNotFoundError, match="step 2"):
            mgr.restore(step=2)
        with pytest.raises(InvalidRequestError, match="already committed"):
            mgr.save(5, sd(5))
        for bad in ("../x", -1, 1.5, True):
            with pytest.raises(InvalidRequestError, match="non-negative int"):
                mgr.save(bad, sd(0))  # type: ignore[arg-type]
    assert sorted(os.listdir(tmp_path)) == [
        ".aiockpt.lock",
        "step-000000000004",
        "step-000000000005",
    ]
    verify(str(tmp_path / "step-000000000005"))


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_async_manager(tmp_path: Path, anyio_backend: str) -> None:
    async with AsyncCheckpointManager(tmp_path, keep_last=1) as mgr:
        futs = [await mgr.save(step, sd(step), {"loss": 0.5}) for step in (10, 20)]
        results = [await f for f in futs]
        assert [r.call_idx for r in results] == [0, 1]
        assert mgr.committed_steps() == [20]
        state = await mgr.restore()
        assert state["step"] == 20 and torch.equal(state["w"], torch.full((4096,), 20.0))


def test_unwritable_directory_fails_and_keeps_the_previous(tmp_path: Path) -> None:
    with CheckpointManager(tmp_path, persistent=False) as mgr:
        mgr.save(1, sd(1))
        mgr.poll(blocking=True)
        step2 = tmp_path / "step-000000000002"
        step2.mkdir()
        with unwritable(step2):
            mgr.save(2, sd(2))
            with pytest.raises(WorkerError, match=r"Operation not permitted|Permission denied"):
                mgr.poll(blocking=True)
        assert mgr.latest_step() == 1
        assert mgr.restore()["step"] == 1


def test_full_disk_fails_and_keeps_the_previous(tmp_path: Path) -> None:
    with CheckpointManager(tmp_path, storage=TinyDiskStorage(limit=20_000)) as mgr:
        mgr.save(1, {"small": torch.ones(10)})
        mgr.poll(blocking=True)
        mgr.save(2, {"big": torch.ones(100_000)})  # 400 kB > 20 kB
        with pytest.raises(WorkerError, match="File too large") as info:
            mgr.poll(blocking=True)
        assert info.value.exc_type == "OSError" and info.value.call_idx == 1
        assert "File too large" in info.value.exc_message
        assert mgr.latest_step() == 1 and mgr.committed_steps() == [1]
        assert torch.equal(mgr.restore()["small"], torch.ones(10))
        verify(str(tmp_path / "step-000000000001"))
        leftovers = os.listdir(tmp_path / "step-000000000002")
        assert leftovers == []  # the failed write removed its temporary file


def test_worker_killed_mid_write_leaves_no_committed_checkpoint(tmp_path: Path) -> None:
    gate = make_gate(str(tmp_path), "gate")
    pid_file = tmp_path / "pid"
    ckdir = tmp_path / "ckpts"
    with CheckpointManager(ckdir, storage=StallingStorage(gate, str(pid_file))) as stalling:
        stalling.save(1, sd(1))
        fd = os.open(gate, os.O_WRONLY)  # returns once the worker is inside the write
        os.kill(int(pid_file.read_text()), signal.SIGKILL)
        os.close(fd)
        with pytest.raises(WorkerCrashedError, match="SIGKILL"):
            stalling.poll(blocking=True)
        assert stalling.latest_step() is None
        step1 = ckdir / "step-000000000001"
        temps = [n for n in os.listdir(step1) if ".tmp-" in n]
        assert len(temps) == 1 and "metadata.json" not in os.listdir(step1)
    with CheckpointManager(ckdir) as mgr:
        with pytest.raises(CheckpointNotFoundError):
            mgr.restore()
        mgr.save(2, sd(2))
        mgr.poll(blocking=True)
        assert mgr.committed_steps() == [2]
        # The next commit removed the interrupted step and its temporary file.
        assert sorted(os.listdir(ckdir)) == [".aiockpt.lock", "step-000000000002"]


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait(timeout=60)
    return proc.pid


def test_retrying_a_step_cleans_its_temporary_files(tmp_path: Path) -> None:
    step_dir = tmp_path / "step-000000000003"
    step_dir.mkdir()
    host = socket.gethostname()
    stale = step_dir / f".shard-00000-of-00001.pt.tmp-{host}-{dead_pid()}-deadbeef"
    stale.write_bytes(b"half a checkpoint")
    live = step_dir / f".shard-00000-of-00001.pt.tmp-{host}-{os.getpid()}-0badcafe"
    live.write_bytes(b"a write still running in this process")
    with CheckpointManager(tmp_path) as mgr:
        mgr.save(3, sd(3))
        assert not stale.exists()
        mgr.poll(blocking=True)
    assert sorted(os.listdir(step_dir)) == [live.name, "metadata.json", "shard-00000-of-00001.pt"]
