"""Every wait for a persistent worker has a bound: sending to a worker that does not read
never blocks the caller, a request the worker never started goes to a new worker, and
exit gives up on a stuck worker at its save deadline."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch
from ckpt_helpers import live_workers as _workers
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


@pytest.mark.parametrize("persistent", [False, True], ids=["fork", "persistent"])
def test_an_abort_drops_a_save_waiting_for_a_staging_buffer(
    tmp_path: Path, persistent: bool
) -> None:
    # B waits for the only staging buffer, which A's worker holds; an abort then drops
    # both. Before, B was staged into a fresh buffer after the abort and written, by a
    # worker nobody stopped.
    import threading

    from aiockpt import AsyncRequest, CheckpointQueue, QueueClosedError

    gate = make_gate(str(tmp_path), "gate")
    queue = CheckpointQueue(persistent=persistent, max_staging_copies=1)
    state = {"w": torch.ones(1024)}
    queue.schedule_async_request(
        AsyncRequest(wait_then_write, (state, gate, str(tmp_path / "a.pt")), [])
    )
    raised: list[BaseException] = []

    def schedule_b() -> None:
        try:
            queue.schedule_async_request(
                AsyncRequest(write_value, (state, str(tmp_path / "b.pt")), [])
            )
        except BaseException as exc:
            raised.append(exc)

    thread = threading.Thread(target=schedule_b)
    thread.start()
    deadline = time.monotonic() + 60
    while queue._engine.call_idx < 1:  # B has its index: it waits for the buffer now
        assert time.monotonic() < deadline
        time.sleep(0.005)
    queue.close(abort=True)
    thread.join(60)
    assert not thread.is_alive()
    [error] = raised
    assert isinstance(error, QueueClosedError)
    assert "aborted while call 1 was being scheduled" in str(error)
    open(gate, "w").close()
    queue.close()
    assert [" ".join(p.cmdline()) for p in _workers()] == []
    assert not (tmp_path / "b.pt").exists() and not (tmp_path / "a.pt").exists()


@pytest.mark.parametrize("persistent", [False, True], ids=["fork", "persistent"])
def test_an_abort_ends_a_close_that_waits_in_another_thread(
    tmp_path: Path, persistent: bool
) -> None:
    # close() waits (no save deadline) for a save that never ends; an abort from another
    # thread stops the worker and that close returns. Before, the abort did nothing once
    # a close had begun.
    import threading

    from aiockpt import AsyncRequest, CheckpointQueue

    gate = make_gate(str(tmp_path), "gate")  # never opened
    queue = CheckpointQueue(persistent=persistent, save_timeout=None)
    queue.schedule_async_request(
        AsyncRequest(wait_then_write, ({"w": torch.ones(4)}, gate, str(tmp_path / "a.pt")), [])
    )
    closer = threading.Thread(target=queue.close)
    closer.start()
    deadline = time.monotonic() + 60
    while not queue._engine.closed:  # the close has begun
        assert time.monotonic() < deadline
        time.sleep(0.005)
    queue.close(abort=True)
    closer.join(60)
    assert not closer.is_alive()
    assert queue.get_num_unfinalized_calls() == 0
    assert not (tmp_path / "a.pt").exists()


def test_a_forked_save_that_leaves_a_thread_running_does_not_hold_the_next(
    tmp_path: Path,
) -> None:
    # A's function returns but leaves a non-daemon thread running for a minute; B waits
    # for A's process to exit. A forked child now exits once it has replied. Before, B
    # waited the whole minute, with no deadline.
    from ckpt_helpers import save_then_linger

    from aiockpt import AsyncRequest, CheckpointQueue

    with CheckpointQueue(persistent=False, save_timeout=30) as queue:
        queue.schedule_async_request(
            AsyncRequest(save_then_linger, ({"a": 1}, 60.0, str(tmp_path / "a.pt")), [])
        )
        queue.schedule_async_request(
            AsyncRequest(write_value, ({"b": 2}, str(tmp_path / "b.pt")), [])
        )
        started = time.monotonic()
        assert queue.maybe_finalize_async_calls(blocking=True) == [0, 1]
        assert time.monotonic() - started < 30  # not the lingering thread's minute
    assert torch.load(tmp_path / "a.pt") == {"a": 1}
    assert _workers() == []


def test_a_forked_save_killed_at_a_close_before_it_began_says_so(tmp_path: Path) -> None:
    # A outlives the close's deadline; B waits for A and never begins. Both are killed at
    # the deadline: B's error says it did not start. Before, it said it "did not finish".
    from ckpt_helpers import sleep_then_save

    from aiockpt import AsyncRequest, CheckpointQueue, SaveTimeoutError

    queue = CheckpointQueue(persistent=False, save_timeout=2.0, max_staging_copies=2)
    a, b = str(tmp_path / "a.pt"), str(tmp_path / "b.pt")
    queue.schedule_async_request(AsyncRequest(sleep_then_save, ({"a": 1}, 60.0, a), []))
    queue.schedule_async_request(AsyncRequest(sleep_then_save, ({"b": 2}, 0.1, b), []))
    caller = queue._engine._running[0].caller
    deadline = time.monotonic() + 60
    while caller.running_since(0) is None:  # A has begun; B waits for it
        assert time.monotonic() < deadline
        time.sleep(0.005)
    errors = []
    engine = queue._engine
    engine.refuse_new()  # close()'s own steps, keeping every error (close raises the first)
    try:
        while engine.active:
            try:
                queue.maybe_finalize_async_calls(blocking=True)
            except SaveTimeoutError as err:
                errors.append(err)
    finally:
        engine.stop_workers()
    assert [e.call_idx for e in errors] == [0, 1]
    assert "did not finish within save_timeout=2.0s" in str(errors[0])
    assert "did not start within save_timeout=2.0s of closing the queue" in str(errors[1])
    assert "waiting for an earlier save" in str(errors[1])
    assert not os.path.exists(b)


def test_what_a_forked_save_sends_through_a_multiprocessing_queue_arrives(
    tmp_path: Path,
) -> None:
    # The child exits at once after its reply, but flushes what multiprocessing flushes
    # at a child's exit. Before, a Queue's message was cut off (lost, or half-written so
    # that the reader hung).
    import multiprocessing

    import ckpt_helpers

    from aiockpt import AsyncRequest, CheckpointQueue

    ckpt_helpers.REPORTS = multiprocessing.get_context("fork").Queue()
    try:
        with CheckpointQueue(persistent=False) as queue:
            for i in range(3):
                path = str(tmp_path / f"{i}.pt")
                request = AsyncRequest(ckpt_helpers.save_and_report, ({"i": i}, path), [])
                queue.schedule_async_request(request)
                queue.maybe_finalize_async_calls(blocking=True)
                assert ckpt_helpers.REPORTS.get(timeout=30) == ("saved", path, b"x" * 200_000)
    finally:
        ckpt_helpers.REPORTS.close()
        ckpt_helpers.REPORTS = None
