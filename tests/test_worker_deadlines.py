"""Every wait for a persistent worker has a bound: sending to a worker that does not read
never blocks the caller, a request the worker never started goes to a new worker, and
exit gives up on a stuck worker at its save deadline."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch
from ckpt_helpers import make_gate, wait_then_write, write_value

import aiockpt._core._persistent as persistent_module
from aiockpt import (
    AsyncRequest,
    CheckpointQueue,
    SaveTimeoutError,
    TorchCheckpoint,
    WorkerCrashedError,
)
from aiockpt._core._process import stop_process

pytestmark = pytest.mark.timeout(90)

# About 600 kB of staging layout: more than a socket buffer holds.
_MANY = 20_000


def _many_tensors() -> dict[str, torch.Tensor]:
    return {f"t{i}": torch.full((4,), float(i)) for i in range(_MANY)}


def _worker_pid(ckpt: TorchCheckpoint) -> int:
    caller = ckpt.queue._engine._persistent_caller
    assert caller is not None and caller.wait_ready(60)
    assert caller.process is not None and caller.process.pid is not None
    return caller.process.pid


def test_a_worker_that_does_not_read_never_blocks_scheduling(tmp_path: Path) -> None:
    ckpt = TorchCheckpoint(save_timeout=20.0, max_staging_copies=2)
    try:
        state = _many_tensors()
        ckpt.async_save(state, str(tmp_path / "warm.pt"))
        assert ckpt.finalize_async_save(blocking=True) == [0]
        os.kill(_worker_pid(ckpt), signal.SIGSTOP)  # frozen: it reads nothing any more
        # Each save's layout is new to the worker and larger than the connection buffers:
        # sent by a thread, it cannot block the caller.
        ckpt.async_save(_many_tensors(), str(tmp_path / "a.pt"))
        ckpt.async_save({"x": _many_tensors()}, str(tmp_path / "b.pt"))
        with pytest.raises(SaveTimeoutError, match=r"call 1 .* save_timeout=20.0s"):
            ckpt.finalize_async_save(blocking=True)
        with pytest.raises(WorkerCrashedError, match=r"call 2 on rank 0 was killed .* before it"):
            ckpt.finalize_async_save(blocking=True)
        ckpt.async_save({"w": torch.full((4,), 7.0)}, str(tmp_path / "c.pt"))  # a fresh worker
        assert ckpt.finalize_async_save(blocking=True) == [3]
        assert torch.load(tmp_path / "c.pt", weights_only=True)["w"].eq(7).all()
    finally:
        ckpt.close(abort=True)


def test_a_request_the_worker_never_started_goes_to_a_new_worker(tmp_path: Path) -> None:
    ckpt = TorchCheckpoint()
    try:
        pid = _worker_pid(ckpt)
        os.kill(pid, signal.SIGSTOP)
        ckpt.async_save({"w": torch.arange(10.0)}, str(tmp_path / "a.pt"))  # never read
        os.kill(pid, signal.SIGKILL)
        assert ckpt.finalize_async_save(blocking=True) == [0]
        assert torch.equal(torch.load(tmp_path / "a.pt")["w"], torch.arange(10.0))
        assert ckpt.queue._engine._persistent_caller.starts == 2
    finally:
        ckpt.close(abort=True)


def test_a_save_right_after_the_idle_worker_died_succeeds(tmp_path: Path) -> None:
    ckpt = TorchCheckpoint()
    try:
        for i in range(3):
            os.kill(_worker_pid(ckpt), signal.SIGKILL)  # dead, or about to be, when we send
            ckpt.async_save({"w": torch.full((4,), float(i))}, str(tmp_path / f"{i}.pt"))
            assert ckpt.finalize_async_save(blocking=True) == [i]
            assert torch.load(tmp_path / f"{i}.pt")["w"].eq(i).all()
    finally:
        ckpt.close(abort=True)


def test_a_killed_worker_fails_what_it_had_started_and_reruns_what_it_had_not(
    tmp_path: Path,
) -> None:
    gate = make_gate(str(tmp_path), "never-opened")
    with CheckpointQueue(persistent=True) as queue:
        queue.schedule_async_request(
            AsyncRequest(wait_then_write, (1, gate, str(tmp_path / "a")), [])
        )
        queue.schedule_async_request(AsyncRequest(write_value, (2, str(tmp_path / "b")), []))
        caller = queue._engine._persistent_caller
        assert caller is not None and caller.wait_ready(60)
        while 0 in caller._unstarted:  # the worker has taken call 0 (and waits on the gate)
            caller.collect()
        assert caller.process is not None
        os.kill(caller.process.pid, signal.SIGKILL)  # dies, not killed by the queue
        with pytest.raises(
            WorkerCrashedError,
            match="call 0 on rank 0 was killed by signal SIGKILL while writing it",
        ):
            queue.maybe_finalize_async_calls(blocking=True)
        assert queue.maybe_finalize_async_calls(blocking=True) == [1]
        assert (tmp_path / "b").exists() and not (tmp_path / "a").exists()


_STUCK_AT_EXIT = """
import sys
sys.path.insert(0, {tests!r})
from ckpt_helpers import wait_then_write
from aiockpt import AsyncRequest, CheckpointQueue

if __name__ == "__main__":
    queue = CheckpointQueue(persistent={persistent}, save_timeout=2.0)
    queue.schedule_async_request(AsyncRequest(wait_then_write, (1, {gate!r}, {out!r}), []))
    print("PIDS", *[c.pid for c in __import__("multiprocessing").active_children()], flush=True)
"""


@pytest.mark.parametrize("persistent", [False, True], ids=["fork", "persistent"])
def test_exit_gives_up_on_a_stuck_worker_at_its_save_deadline(
    tmp_path: Path, persistent: bool
) -> None:
    script = tmp_path / "stuck_at_exit.py"
    script.write_text(
        _STUCK_AT_EXIT.format(
            tests=str(Path(__file__).parent),
            persistent=persistent,
            gate=str(tmp_path / "never-opened"),
            out=str(tmp_path / "out"),
        )
    )
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert re.search(r"call 0 .* did not finish within (save_timeout=)?2.0s", done.stderr), (
        done.stderr
    )
    pids = [
        int(p)
        for line in done.stdout.splitlines()
        if line.startswith("PIDS")
        for p in line.split()[1:]
    ]
    assert pids and not [
        p
        for p in pids
        if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
    ]
    assert not (tmp_path / "out").exists()


def test_close_waits_for_a_worker_that_never_became_ready_no_longer_than_save_timeout(
    tmp_path: Path,
) -> None:
    ckpt = TorchCheckpoint(start_method="spawn", save_timeout=2.0, start_timeout=600.0)
    caller = ckpt.queue._engine._persistent_caller
    assert caller is not None
    caller.start()
    assert caller.process is not None and caller.process.pid is not None
    os.kill(caller.process.pid, signal.SIGSTOP)  # stuck in its import: never ready
    try:
        ckpt.async_save({"w": torch.ones(3)}, str(tmp_path / "a.pt"))
        # Not start_timeout (600 s): the close's own bound ends the wait.
        with pytest.raises(
            SaveTimeoutError,
            match=r"call 0 .* did not start within save_timeout=2.0s of closing the queue: "
            r"its worker was still starting",
        ):
            ckpt.close()
    finally:
        ckpt.close(abort=True)
    assert not (tmp_path / "a.pt").exists()


def test_a_stopped_idle_worker_is_woken_to_take_its_sigterm_at_close(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    exits: list[int | None] = []

    def stop_and_record(process: Any, grace: float, sigterm_timeout: float = 0.0) -> None:
        stop_process(process, grace, sigterm_timeout)
        exits.append(process.exitcode)

    monkeypatch.setattr(persistent_module, "stop_process", stop_and_record)
    ckpt = TorchCheckpoint(sigterm_timeout=20.0)
    os.kill(_worker_pid(ckpt), signal.SIGSTOP)  # a debugger, or a job control stop
    ckpt.close()
    # SIGTERM (then SIGCONT) ended it; a worker left stopped would have needed SIGKILL.
    assert exits[0] == -signal.SIGTERM


_FORKSERVER_AT_CONSTRUCTION = """
from multiprocessing import forkserver
from aiockpt import TorchCheckpoint

if __name__ == "__main__":
    assert getattr(forkserver._forkserver, "_forkserver_pid", None) is None
    ckpt = TorchCheckpoint()
    print("RUNNING", forkserver._forkserver._forkserver_pid is not None, flush=True)
    ckpt.close()
"""


def test_the_forkserver_starts_importing_torch_when_the_checkpoint_is_made(
    tmp_path: Path,
) -> None:
    # The first save would otherwise wait for the forkserver's import of torch (seconds).
    script = tmp_path / "construct.py"
    script.write_text(_FORKSERVER_AT_CONSTRUCTION)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "RUNNING True" in done.stdout
