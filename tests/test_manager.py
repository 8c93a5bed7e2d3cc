"""Checkpoint managers: steps, retention, restore, and faults that must not lose data."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy
import pytest
import torch
from ckpt_helpers import (
    StallingStorage,
    TinyDiskStorage,
    listing,
    make_gate,
    open_gate,
    read_pid,
)

from aiockpt import (
    AsyncCheckpointManager,
    CheckpointManager,
    CheckpointNotFoundError,
    FinalizeError,
    InvalidRequestError,
    LocalStorage,
    QueueClosedError,
    StagingError,
    TorchCheckpoint,
    WorkerCrashedError,
    WorkerError,
    aload,
    load,
    verify,
)
from aiockpt._exceptions import DirectoryLockedError, StorageError


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
        # The worker publishes its pid from inside the write, then parks on the gate.
        os.kill(read_pid(str(pid_file)), signal.SIGKILL)
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
    foreign = step_dir / ".shard-00000-of-00001.pt.tmp-otherhost-12-0badcafe"
    foreign.write_bytes(b"another host's write: cannot tell if it is over")
    with CheckpointManager(tmp_path) as mgr:
        mgr.save(3, sd(3))
        assert not stale.exists()
        mgr.poll(blocking=True)
    assert listing(step_dir) == [foreign.name, "metadata.json", "shard-00000-of-00001.pt"]


LINGERING_WRITER = """
import os, sys
from aiockpt.storage._atomic import write_atomic
def stall(f):
    f.write(b"x" * 1000)
    print("writing", flush=True)
    os.read(0, 1)  # stalls until told to go on (or killed)
write_atomic(sys.argv[1], stall)
"""


def test_a_lingering_writer_of_an_earlier_attempt_never_replaces_the_commit(
    tmp_path: Path,
) -> None:
    # A writer of an earlier attempt at step 3 is still alive (a worker of a job that was
    # restarted, stalled on a hung filesystem). The save does not wait for it, and when it
    # finishes, its rename lands on a name the commit does not record.
    step_dir = tmp_path / "step-000000000003"
    step_dir.mkdir()
    old_name = step_dir / "shard-00000-of-00001.0123456789abcdef.pt"
    proc = subprocess.Popen(
        [sys.executable, "-c", LINGERING_WRITER, str(old_name)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"writing\n"
        with CheckpointManager(tmp_path, persistent=False) as mgr:
            mgr.save(3, sd(3))
            mgr.poll(blocking=True)
            assert mgr.committed_steps() == [3]
        assert proc.stdin is not None
        proc.stdin.write(b"x")  # the old writer wakes and renames its file into place
        proc.stdin.close()
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
        proc.wait(timeout=60)
        assert proc.stdout is not None
        proc.stdout.close()
    assert old_name.read_bytes() == b"x" * 1000  # landed beside the commit...
    [record] = json.loads((step_dir / "metadata.json").read_text())["files"]
    assert record["name"] != old_name.name  # ...under a name it does not record
    verify(str(step_dir))
    assert torch.equal(load(str(step_dir))["w"], sd(3)["w"])


# -- saves go forward; rollback goes back ------------------------------------------------------


def test_saving_below_a_committed_step_is_refused_until_a_rollback(tmp_path: Path) -> None:
    with CheckpointManager(tmp_path, keep_last=1, persistent=False) as mgr:
        mgr.save(10, sd(10))
        mgr.poll(blocking=True)
        for step in (5, 10):
            with pytest.raises(InvalidRequestError, match=r"step 10 is already committed") as e:
                mgr.save(step, sd(step))
            assert "rollback(" in str(e.value)
        assert mgr.committed_steps() == [10] and not (tmp_path / "step-000000000005").exists()
        with pytest.raises(
            InvalidRequestError,
            match=r"to step 4: it is not a committed step \(committed: \[10\]\)\. No committed "
            r"step is below it, so every checkpoint would go; or pass force=True",
        ):
            mgr.rollback(4)  # the advice never deletes every checkpoint by itself
        assert mgr.committed_steps() == [10]
        assert mgr.rollback(4, force=True) == [10]
        assert mgr.committed_steps() == [] and mgr.latest_step() is None
        mgr.save(5, sd(5))
        mgr.poll(blocking=True)
        assert mgr.committed_steps() == [5]  # the save just committed survived retention
        assert mgr.restore()["step"] == 5


def test_rollback_to_a_step_retention_pruned_names_the_steps_that_exist(tmp_path: Path) -> None:
    with CheckpointManager(tmp_path, keep_last=2, persistent=False) as mgr:
        for step in (100, 149, 150, 151):
            mgr.save(step, sd(step))
            mgr.poll(blocking=True)
        assert mgr.committed_steps() == [150, 151]  # 100 and 149 were pruned
        with pytest.raises(InvalidRequestError, match=r"committed step below 120") as e:
            mgr.save(120, sd(120))
        assert "rollback(149)" not in str(e.value)
        with pytest.raises(
            InvalidRequestError,
            match=r"to step 149: it is not a committed step \(committed: \[150, 151\]\)",
        ):
            mgr.rollback(149)
        with pytest.raises(InvalidRequestError, match=r"Roll back to step 151, the newest"):
            mgr.rollback(160)
        assert mgr.committed_steps() == [150, 151]  # nothing was deleted
        assert mgr.rollback(150) == [151]
        assert mgr.committed_steps() == [150] and mgr.restore()["step"] == 150


def test_pending_steps_block_lower_and_equal_saves(tmp_path: Path) -> None:
    with CheckpointManager(tmp_path, persistent=False) as mgr:
        mgr.save(3, sd(3))
        for step in (2, 3):
            with pytest.raises(InvalidRequestError, match="being saved"):
                mgr.save(step, sd(step))
        with pytest.raises(InvalidRequestError, match="while steps \\[3\\] are being saved"):
            mgr.rollback(0)
        mgr.save(4, sd(4))
        assert mgr.poll(blocking=True) == [0, 1]
        assert mgr.committed_steps() == [3, 4]


def test_a_failed_save_can_be_retried_under_the_same_step(tmp_path: Path) -> None:
    with CheckpointManager(tmp_path, storage=TinyDiskStorage(limit=20_000)) as mgr:
        mgr.save(1, {"big": torch.ones(100_000)})
        with pytest.raises(WorkerError, match="File too large"):
            mgr.poll(blocking=True)
        mgr.save(1, {"small": torch.ones(10)})
        mgr.poll(blocking=True)
        assert mgr.committed_steps() == [1]


def test_steps_past_10_to_the_12_and_numpy_steps(tmp_path: Path) -> None:
    big = [999_999_999_999, 10**12, 2**40 * 10**3, 2**63 - 1]
    with CheckpointManager(tmp_path, persistent=False) as mgr:
        mgr.save(numpy.int64(7), sd(7))
        for step in big:
            mgr.save(step, sd(1))
        mgr.poll(blocking=True)
        assert mgr.committed_steps() == [7, *big]
        assert mgr.latest_step() == 2**63 - 1
        assert isinstance(mgr.committed_steps()[0], int)
        with pytest.raises(InvalidRequestError, match="int64"):
            mgr.save(2**63, sd(0))
        with pytest.raises(InvalidRequestError, match="non-negative int"):
            mgr.save(numpy.float64(8.0), sd(0))  # type: ignore[arg-type]
    (tmp_path / "step-0000000000001").mkdir()  # not the name step 1 has: not a step
    with CheckpointManager(tmp_path) as again:
        assert again.committed_steps() == [7, *big]
        assert again.restore(step=10**12)["step"] == 1


def test_extra_is_checked_at_the_call(tmp_path: Path) -> None:
    with CheckpointManager(tmp_path, persistent=False) as mgr:
        with pytest.raises(InvalidRequestError, match="JSON values only"):
            mgr.save(1, sd(1), {"when": object()})
        with pytest.raises(InvalidRequestError, match="JSON values only"):
            mgr.save(1, sd(1), {"loss": float("nan")})
        with pytest.raises(InvalidRequestError, match=r'extra\["step"\] is reserved'):
            mgr.save(1, sd(1), {"step": 7})
        assert sorted(os.listdir(tmp_path)) == [".aiockpt.lock"]  # nothing was written
        mgr.save(1, sd(1), {"loss": 0.25})
        mgr.poll(blocking=True)
    meta = json.loads((tmp_path / "step-000000000001" / "metadata.json").read_text())
    assert meta["extra"] == {"loss": 0.25, "step": 1}


# -- one writer per directory ----------------------------------------------------------------


HOLD_MANAGER = """
import sys
from aiockpt import CheckpointManager
mgr = CheckpointManager(sys.argv[1], persistent=False)
print("holding", flush=True)
sys.stdin.read()
"""


def test_a_second_manager_is_refused_while_another_process_holds_the_directory(
    tmp_path: Path,
) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD_MANAGER, str(tmp_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"holding\n"
        with pytest.raises(DirectoryLockedError) as info:
            CheckpointManager(tmp_path)
        assert info.value.holder == f"pid {proc.pid} on host {socket.gethostname()}"
        assert f"pid {proc.pid} on host" in str(info.value)
        proc.kill()  # a dead holder releases the lock
    finally:
        proc.wait(timeout=60)
        for pipe in (proc.stdin, proc.stdout):
            assert pipe is not None
            pipe.close()
    with CheckpointManager(tmp_path, persistent=False) as mgr:
        with pytest.raises(DirectoryLockedError, match="in use by another checkpoint manager"):
            CheckpointManager(tmp_path)  # one manager per directory within a process too
        mgr.save(1, sd(1))
        mgr.poll(blocking=True)
    with CheckpointManager(tmp_path) as after_close:
        assert after_close.latest_step() == 1


def test_read_only_directory_is_a_typed_error(tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    with unwritable(ro):
        with pytest.raises(StorageError, match="lock file") as info:
            CheckpointManager(ro)
        assert isinstance(info.value.__cause__, OSError)
        with pytest.raises(StorageError, match="cannot create checkpoint directory"):
            CheckpointManager(ro / "sub")


# -- durability and deletion order ------------------------------------------------------------


def fsynced_paths(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record the path of every descriptor this process fsyncs (the call still happens)."""
    seen: list[str] = []
    real = os.fsync

    def recording(fd: Any) -> None:
        seen.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", recording)
    return seen


def test_new_step_directory_and_commit_are_durable_in_the_parent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = fsynced_paths(monkeypatch)
    storage = LocalStorage()
    step = tmp_path / "step-000000000001"
    storage.makedirs(str(step))
    assert seen == [str(tmp_path)]
    record = storage.write_file({"w": torch.ones(2)}, str(step / "shard-00000-of-00001.pt"))
    seen.clear()
    storage.commit(str(step), [record], {"step": 1})
    assert seen[-2:] == [str(step), str(tmp_path)]  # metadata's directory, then the parent


def test_deleting_a_step_uncommits_it_before_removing_its_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with CheckpointManager(tmp_path, persistent=False) as mgr:
        mgr.save(1, sd(1))
        mgr.poll(blocking=True)

        def killed(path: Any, *args: Any, **kwargs: Any) -> None:
            raise KeyboardInterrupt("killed while deleting")  # the process dies here

        monkeypatch.setattr(shutil, "rmtree", killed)
        with pytest.raises(KeyboardInterrupt):
            mgr.rollback(0, force=True)
        monkeypatch.undo()
        step1 = tmp_path / "step-000000000001"
        assert listing(step1) == ["shard-00000-of-00001.pt"]  # no longer committed
        assert mgr.committed_steps() == []


# -- the async manager keeps filesystem calls off the event loop ------------------------------

_loop_fs_calls: list[tuple[str, object]] = []
_watch: dict[str, Any] = {}


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if not _watch or threading.get_ident() != _watch["thread"]:
        return
    if event in ("open", "os.listdir", "os.scandir", "os.mkdir", "os.remove", "os.rename"):
        target = args[0] if args else None
        listing_fd = isinstance(target, int) and event in ("os.listdir", "os.scandir")
        if listing_fd or str(target).startswith(_watch["root"]):
            _loop_fs_calls.append((event, target))


sys.addaudithook(_audit)


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_async_manager_makes_no_filesystem_call_on_the_loop(
    tmp_path: Path, anyio_backend: str
) -> None:
    stale_dir = tmp_path / "step-000000000002"
    stale_dir.mkdir()
    (stale_dir / ".shard-00000-of-00001.pt.tmp-otherhost-1-deadbeef").write_bytes(b"x")
    async with AsyncCheckpointManager(tmp_path, keep_last=1) as mgr:
        _loop_fs_calls.clear()
        _watch.update(thread=threading.get_ident(), root=str(tmp_path))
        try:
            fut = await mgr.save(2, sd(2))
            await fut
            fut = await mgr.save(3, sd(3))
            await fut
            assert await mgr.alatest_step() == 3
            assert await mgr.acommitted_steps() == [3]
            assert (await mgr.restore())["step"] == 3
            assert (await aload(tmp_path / "step-000000000003"))["step"] == 3
            assert await mgr.rollback(0, force=True) == [3]
        finally:
            _watch.clear()
        assert _loop_fs_calls == []
        assert mgr.latest_step() is None and mgr.committed_steps() == []


def test_a_sharded_save_into_a_committed_directory_is_refused(tmp_path: Path) -> None:
    ck = tmp_path / "ck"
    ckpt = TorchCheckpoint(persistent=False)
    try:
        ckpt.async_save_sharded({"w": torch.ones(4)}, ck, {"tag": "first"})
        ckpt.finalize_async_save(blocking=True)
        before = {n: (ck / n).read_bytes() for n in os.listdir(ck)}
        with pytest.raises(InvalidRequestError, match="already holds a committed checkpoint"):
            ckpt.async_save_sharded({"w": torch.zeros(4)}, ck)
        assert {n: (ck / n).read_bytes() for n in os.listdir(ck)} == before
        assert torch.equal(load(ck)["w"], torch.ones(4))
    finally:
        ckpt.close()


def test_a_newer_step_committed_meanwhile_blocks_the_commit(tmp_path: Path) -> None:
    gate = make_gate(str(tmp_path), "gate")
    ckdir = tmp_path / "ckpts"
    storage = StallingStorage(gate, str(tmp_path / "pid"))
    with CheckpointManager(ckdir, storage=storage, persistent=False) as mgr:
        mgr.save(5, sd(5))
        read_pid(str(tmp_path / "pid"))  # the worker is inside the write of step 5
        # Step 9 appears, committed (restored from a backup by hand, say).
        committed = ckdir / "step-000000000009"
        committed.mkdir()
        record = LocalStorage().write_file(sd(9), str(committed / "shard-00000-of-00001.pt"))
        LocalStorage().commit(str(committed), [record], {"step": 9})
        open_gate(gate)
        with pytest.raises(FinalizeError, match="step 9 is committed there already"):
            mgr.poll(blocking=True)
        assert mgr.committed_steps() == [9]
        assert mgr.restore()["step"] == 9


@pytest.mark.anyio
async def test_rollback_needs_an_open_manager(tmp_path: Path) -> None:
    with CheckpointManager(tmp_path, persistent=False) as mgr:
        mgr.save(1, sd(1))
        mgr.poll(blocking=True)
    with pytest.raises(QueueClosedError, match="not open"):
        mgr.rollback(0)
    unopened = AsyncCheckpointManager(tmp_path)
    with pytest.raises(QueueClosedError, match="not open"):
        await unopened.rollback(0)
    assert unopened.committed_steps() == [1]


def test_a_step_that_cannot_be_deleted_fails_rollback_with_a_typed_error(tmp_path: Path) -> None:
    with CheckpointManager(tmp_path, persistent=False) as mgr:
        mgr.save(1, sd(1))
        mgr.poll(blocking=True)
        step1 = tmp_path / "step-000000000001"
        with unwritable(step1), pytest.raises(StorageError, match="cannot delete checkpoint"):
            mgr.rollback(0, force=True)
        assert mgr.committed_steps() == [1]  # nothing was un-committed
        assert mgr.rollback(0, force=True) == [1]


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_a_save_that_fails_to_stage_releases_its_step(
    tmp_path: Path, anyio_backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from aiockpt._staging._arena import StagingBuffers

    real_stage = StagingBuffers.stage

    def fail_once(self: StagingBuffers, *args: object, **kwargs: object) -> object:
        monkeypatch.setattr(StagingBuffers, "stage", real_stage)
        raise RuntimeError("device lost while copying")

    monkeypatch.setattr(StagingBuffers, "stage", fail_once)
    async with AsyncCheckpointManager(tmp_path) as mgr:
        with pytest.raises(StagingError, match="device lost"):
            await mgr.save(1, sd(1))
        await (await mgr.save(1, sd(1)))  # the same step again: nothing holds it
        assert await mgr.acommitted_steps() == [1]
        assert await mgr.rollback(0, force=True) == [1]  # and nothing is left pending
