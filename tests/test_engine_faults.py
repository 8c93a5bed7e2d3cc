"""The engine under faults: a failed completion check, a crash hidden by a helper process,
a lost wake-up, a result that cannot be unpickled, a stuck worker, what is reported at
exit, and what staging keeps (and no longer keeps) of the caller's tensors."""

from __future__ import annotations

import gc
import os
import pickle
import signal
import subprocess
import sys
import threading
import weakref
from collections import OrderedDict
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch
from ckpt_helpers import (
    Ordered,
    Pair,
    TrainState,
    crash_leaving_grandchild,
    make_gate,
    open_gate,
    raise_value_error,
    read_pid,
    return_unloadable,
    wait_then_write,
    write_value,
)

import aiockpt._core._engine as engine_module
from aiockpt import (
    AsyncRequest,
    CheckpointQueue,
    DistributedCheckpointError,
    InvalidRequestError,
    SaveTimeoutError,
    StagingError,
    TorchCheckpoint,
    WorkerCrashedError,
    WorkerError,
)
from aiockpt._core._messages import MapArena

BOTH = pytest.mark.parametrize("persistent", [False, True], ids=["fork", "persistent"])


def _disagreeing_reduce(*args: Any, **kwargs: Any) -> Any:
    raise DistributedCheckpointError("ranks are completing different requests", call_idx=0)


def test_a_failed_completion_check_keeps_the_lease_and_the_queue(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = make_gate(str(tmp_path), "gate")
    sd = {"w": torch.arange(1000.0)}
    with CheckpointQueue(persistent=True) as queue:
        engine = queue._engine
        queue.schedule_async_request(
            AsyncRequest(wait_then_write, (sd, gate, str(tmp_path / "a")), []), needs_global=True
        )
        # The completion check itself fails while the worker still writes call 0.
        monkeypatch.setattr(engine_module, "is_distributed", lambda: True)
        monkeypatch.setattr(engine.completion, "reduce", _disagreeing_reduce)
        with pytest.raises(DistributedCheckpointError, match="different requests"):
            queue.maybe_finalize_async_calls(blocking=False)
        monkeypatch.undo()
        # Call 0 failed, but its worker still reads the staging copy: the lease stays.
        assert engine.buffers.leased() == [0]
        assert queue.get_num_unfinalized_calls() == 0
        open_gate(gate)
        # The next save waits for that lease, then runs normally (no StopIteration).
        idx = queue.schedule_async_request(AsyncRequest(write_value, (sd, str(tmp_path / "b")), []))
        assert idx == 1
        assert queue.maybe_finalize_async_calls(blocking=True) == [1]
        assert engine.buffers.leased() == []


def test_a_raising_poll_leaves_the_call_in_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with CheckpointQueue(persistent=True) as queue:
        queue.schedule_async_request(AsyncRequest(write_value, (1, str(tmp_path / "a")), []))
        caller = queue._engine._persistent_caller
        assert caller is not None
        real = caller.collect
        calls = {"n": 0}

        def flaky() -> Any:
            calls["n"] += 1
            if calls["n"] == 1:
                raise OSError("transient read error")
            return real()

        monkeypatch.setattr(caller, "collect", flaky)
        with pytest.raises(OSError, match="transient"):
            queue.maybe_finalize_async_calls(blocking=True)
        assert queue.get_num_unfinalized_calls() == 1
        assert queue.maybe_finalize_async_calls(blocking=True) == [0]


def test_an_interrupt_while_scheduling_uses_the_index_and_breaks_nothing(tmp_path: Path) -> None:
    def interrupted() -> Any:
        raise KeyboardInterrupt

    with CheckpointQueue(persistent=False) as queue:
        with pytest.raises(KeyboardInterrupt):
            queue.schedule_async_request(
                AsyncRequest(write_value, (None, str(tmp_path / "x")), [], preload_fn=interrupted)
            )
        assert queue._engine.buffers.leased() == []
        idx = queue.schedule_async_request(AsyncRequest(write_value, (2, str(tmp_path / "y")), []))
        assert idx == 1
        assert queue.maybe_finalize_async_calls(blocking=True) == [1]
        assert not (tmp_path / "x").exists()


@BOTH
def test_a_crash_is_seen_although_a_helper_process_holds_the_connection(
    tmp_path: Path, persistent: bool
) -> None:
    gate = make_gate(str(tmp_path), "gate")
    pid_file = str(tmp_path / "helper.pid")
    try:
        with CheckpointQueue(persistent=persistent) as queue:
            queue.schedule_async_request(
                AsyncRequest(crash_leaving_grandchild, ({}, gate, pid_file), [])
            )
            helper = read_pid(pid_file)
            with pytest.raises(WorkerCrashedError, match="SIGKILL") as info:
                queue.maybe_finalize_async_calls(blocking=True)
            assert info.value.call_idx == 0
            # Seen while the helper, which holds the connection open, is still alive.
            assert psutil.pid_exists(helper) and psutil.Process(helper).status() != "zombie"
            idx = queue.schedule_async_request(
                AsyncRequest(write_value, (3, str(tmp_path / "n")), [])
            )
            assert queue.maybe_finalize_async_calls(blocking=True) == [idx]
    finally:
        open_gate(gate)


def test_a_waiter_is_woken_when_another_thread_reads_its_reply(tmp_path: Path) -> None:
    gate = make_gate(str(tmp_path), "gate")
    with CheckpointQueue(persistent=True) as queue:
        engine = queue._engine
        queue.schedule_async_request(
            AsyncRequest(wait_then_write, (1, gate, str(tmp_path / "a")), [])
        )
        call = engine.active[0]
        woke = threading.Event()

        def waiter() -> None:
            engine.wait_local(call, None)
            woke.set()

        thread = threading.Thread(target=waiter, daemon=True)
        thread.start()
        open_gate(gate)
        # This thread polls without blocking meanwhile; whoever reads the reply, the
        # blocked waiter must learn of it.
        while engine.wait_local(call, 0) is None:
            engine.collect()
        assert woke.wait(30), "the waiting thread slept through a reply another thread read"
        thread.join(5)
        assert queue.maybe_finalize_async_calls(blocking=False) == [0]


@BOTH
def test_a_result_the_caller_cannot_unpickle_is_that_calls_failure(
    tmp_path: Path, persistent: bool
) -> None:
    with CheckpointQueue(persistent=persistent) as queue:
        queue.schedule_async_request(AsyncRequest(return_unloadable, ({},), []))
        with pytest.raises(WorkerError, match="could not be unpickled in the caller") as info:
            queue.maybe_finalize_async_calls(blocking=True)
        assert info.value.call_idx == 0 and "not importable here" in str(info.value)
        idx = queue.schedule_async_request(AsyncRequest(write_value, (1, str(tmp_path / "n")), []))
        assert queue.maybe_finalize_async_calls(blocking=True) == [idx]


@BOTH
def test_a_stuck_worker_is_killed_at_the_save_deadline(tmp_path: Path, persistent: bool) -> None:
    gate = make_gate(str(tmp_path), "never-opened")
    with CheckpointQueue(persistent=persistent, save_timeout=2.0) as queue:
        queue.schedule_async_request(
            AsyncRequest(wait_then_write, (1, gate, str(tmp_path / "a")), [])
        )
        with pytest.raises(SaveTimeoutError, match=r"call 0 .* save_timeout=2.0s") as info:
            queue.maybe_finalize_async_calls(blocking=True)
        assert isinstance(info.value, WorkerCrashedError)
        assert not (tmp_path / "a").exists()
        idx = queue.schedule_async_request(AsyncRequest(write_value, (1, str(tmp_path / "b")), []))
        assert queue.maybe_finalize_async_calls(blocking=True) == [idx]


def test_close_is_bounded_by_the_save_deadline(tmp_path: Path) -> None:
    gate = make_gate(str(tmp_path), "never-opened")
    queue = CheckpointQueue(persistent=True, save_timeout=1.0)
    queue.schedule_async_request(AsyncRequest(wait_then_write, (1, gate, str(tmp_path / "a")), []))
    with pytest.raises(SaveTimeoutError, match="call 0"):
        queue.close()
    assert queue._engine.closed


def test_the_persistent_workers_reader_failing_is_a_crash_not_a_hang(tmp_path: Path) -> None:
    with CheckpointQueue(persistent=True) as queue:
        caller = queue._engine._persistent_caller
        assert caller is not None
        caller.wait_ready(60)
        assert caller._conn is not None
        # An arena announcement with no descriptor after it: the worker's reader fails.
        caller._conn.send(MapArena(999, 4096))
        caller._conn.send("not a descriptor")
        queue.schedule_async_request(AsyncRequest(write_value, (1, str(tmp_path / "a")), []))
        # The worker stopped before it took call 0: a new worker writes it.
        assert queue.maybe_finalize_async_calls(blocking=True) == [0]
        assert caller.starts == 2 and (tmp_path / "a").exists()
        idx = queue.schedule_async_request(AsyncRequest(write_value, (2, str(tmp_path / "b")), []))
        assert queue.maybe_finalize_async_calls(blocking=True) == [idx]


EXIT_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
import torch
from ckpt_helpers import raise_disk_full, write_value
from aiockpt import CheckpointQueue, AsyncRequest

queue = CheckpointQueue(persistent={persistent})
queue.schedule_async_request(AsyncRequest(raise_disk_full, ({{}},), []))
queue.schedule_async_request(AsyncRequest(write_value, ({{"w": torch.ones(2)}}, {path!r}), []))
del queue
print("body done")
"""


@BOTH
def test_saves_never_finalized_are_reported_at_exit(tmp_path: Path, persistent: bool) -> None:
    path = str(tmp_path / "unfinalized.pt")
    script = EXIT_SCRIPT.format(tests=str(Path(__file__).parent), persistent=persistent, path=path)
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert proc.stdout.strip() == "body done"
    assert "checkpoint call 0 (function raise_disk_full) failed and was never finalized" in (
        proc.stderr
    )
    assert "No space left on device" in proc.stderr
    assert f"checkpoint call 1 ({path!r}) was written but never finalized" in proc.stderr
    assert os.path.exists(path)


@BOTH
def test_the_callers_tensors_are_not_held_after_staging(tmp_path: Path, persistent: bool) -> None:
    gate = make_gate(str(tmp_path), "gate")
    with CheckpointQueue(persistent=persistent) as queue:
        sd = {"w": torch.arange(10_000.0)}
        ref = weakref.ref(sd["w"])
        queue.schedule_async_request(
            AsyncRequest(wait_then_write, (sd, gate, str(tmp_path / "a")), [])
        )
        del sd
        gc.collect()
        assert ref() is None, "the queue kept the caller's tensor alive after staging"
        open_gate(gate)
        assert queue.maybe_finalize_async_calls(blocking=True) == [0]
    assert torch.equal(torch.load(tmp_path / "a")["w"], torch.arange(10_000.0))


def test_tied_weights_and_overlapping_views_keep_their_sharing(tmp_path: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Embedding(50, 16), torch.nn.Linear(16, 50, bias=False))
    model[1].weight = model[0].weight  # tied, as language models do
    base = torch.arange(10.0)
    sd = {"model": model.state_dict(), "a": base[0:6], "b": base[4:10], "t": base.view(2, 5).t()}
    assert sd["model"]["0.weight"] is not sd["model"]["1.weight"]  # distinct tensor objects
    ckpt = TorchCheckpoint(persistent=True)
    try:
        ckpt.async_save(sd, str(tmp_path / "ours.pt"))
        ckpt.finalize_async_save(blocking=True)
    finally:
        ckpt.close()
    torch.save(sd, tmp_path / "torch.pt")
    ours = torch.load(tmp_path / "ours.pt", weights_only=True)
    theirs = torch.load(tmp_path / "torch.pt", weights_only=True)
    w0, w1 = ours["model"]["0.weight"], ours["model"]["1.weight"]
    assert w0.data_ptr() == w1.data_ptr() and torch.equal(w0, model[0].weight)
    storages = {ours[k].untyped_storage().data_ptr() for k in ("a", "b", "t")}
    assert len(storages) == 1  # the overlapping views still share one storage
    for key in ("a", "b", "t"):
        assert torch.equal(ours[key], sd[key]) and ours[key].stride() == sd[key].stride()
    ours["a"][5] = -1.0
    assert ours["b"][1] == -1.0  # and they overlap where they did
    size_ours = os.path.getsize(tmp_path / "ours.pt")
    size_theirs = os.path.getsize(tmp_path / "torch.pt")
    assert size_ours < size_theirs * 1.1, (size_ours, size_theirs)
    assert {k: v.shape for k, v in theirs["model"].items()} == {
        k: v.shape for k, v in ours["model"].items()
    }


@BOTH
def test_tensors_in_dataclasses_namedtuples_and_dict_subclasses_are_staged(
    tmp_path: Path, persistent: bool
) -> None:
    state = {
        "ts": TrainState(torch.zeros(3), step=7),
        "pair": Pair(torch.zeros(2), torch.ones(2)),
        "ordered": Ordered(m=torch.zeros(4)),
    }
    gate = make_gate(str(tmp_path), "gate")
    with CheckpointQueue(persistent=persistent) as queue:
        queue.schedule_async_request(
            AsyncRequest(wait_then_write, (state, gate, str(tmp_path / "s.pt")), [])
        )
        # Staged: changing the originals now does not change what is written.
        state["ts"].weights.fill_(9)
        state["pair"].first.fill_(9)
        state["ordered"]["m"].fill_(9)
        open_gate(gate)
        queue.maybe_finalize_async_calls(blocking=True)
    out = torch.load(tmp_path / "s.pt", weights_only=False)
    assert isinstance(out["ts"], TrainState) and out["ts"].step == 7
    assert torch.equal(out["ts"].weights, torch.zeros(3))
    assert isinstance(out["pair"], Pair) and torch.equal(out["pair"].first, torch.zeros(2))
    assert type(out["ordered"]) is Ordered and torch.equal(out["ordered"]["m"], torch.zeros(4))
    assert isinstance(out["ordered"], OrderedDict)


def test_zero_size_tensors_do_not_wait_for_a_leased_buffer(tmp_path: Path) -> None:
    gate = make_gate(str(tmp_path), "gate")
    with CheckpointQueue(persistent=True, max_staging_copies=1) as queue:
        queue.schedule_async_request(
            AsyncRequest(wait_then_write, ({"w": torch.ones(100)}, gate, str(tmp_path / "a")), [])
        )
        # The only buffer is leased to call 0; a request with nothing to copy needs none.
        idx = queue.schedule_async_request(
            AsyncRequest(write_value, ({"e": torch.empty(0, 4)}, str(tmp_path / "b")), [])
        )
        assert idx == 1 and queue._engine.buffers.leased() == [0]
        open_gate(gate)
        assert queue.maybe_finalize_async_calls(blocking=True) == [0, 1]


def test_meta_and_nested_tensors_are_staged_or_refused_with_a_typed_error(tmp_path: Path) -> None:
    with CheckpointQueue(persistent=False) as queue:
        queue.schedule_async_request(
            AsyncRequest(
                write_value, ({"m": torch.empty(3, 2, device="meta")}, str(tmp_path / "m")), []
            )
        )
        assert queue.maybe_finalize_async_calls(blocking=True) == [0]
        nested = torch.nested.nested_tensor([torch.ones(2), torch.ones(3)])
        try:
            queue.schedule_async_request(
                AsyncRequest(write_value, ({"n": nested}, str(tmp_path / "n")), [])
            )
        except StagingError as err:
            assert "call 1" in str(err)
        else:
            queue.maybe_finalize_async_calls(blocking=True)
            with open(tmp_path / "n", "rb") as f:
                out = pickle.load(f)
            assert [t.tolist() for t in out["n"].unbind()] == [[1.0, 1.0], [1.0, 1.0, 1.0]]
    with open(tmp_path / "m", "rb") as f:
        meta = pickle.load(f)["m"]
    assert meta.device.type == "meta" and meta.shape == (3, 2)


def test_a_failed_allocation_leaks_no_descriptor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with CheckpointQueue(persistent=False) as queue:
        before = len(os.listdir("/proc/self/fd"))

        def no_memory(*args: Any) -> None:
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(os, "posix_fallocate", no_memory)
        with pytest.raises(StagingError, match="No space left"):
            queue.schedule_async_request(
                AsyncRequest(write_value, ({"w": torch.ones(1000)}, str(tmp_path / "a")), [])
            )
        assert len(os.listdir("/proc/self/fd")) == before
        monkeypatch.undo()
        idx = queue.schedule_async_request(
            AsyncRequest(write_value, ({"w": torch.ones(1000)}, str(tmp_path / "b")), [])
        )
        assert queue.maybe_finalize_async_calls(blocking=True) == [idx]


def test_a_growing_state_gets_headroom_and_reuses_it(tmp_path: Path) -> None:
    with CheckpointQueue(persistent=False) as queue:
        buffers = queue._engine.buffers
        for i, n in enumerate((1000, 1001, 1002, 1003)):
            queue.schedule_async_request(
                AsyncRequest(write_value, ({"w": torch.ones(n * 256)}, str(tmp_path / f"{i}")), [])
            )
            queue.maybe_finalize_async_calls(blocking=True)
        # One allocation for the first size, one growth with headroom for the next three.
        assert buffers.allocations == 2


def test_reserve_makes_the_first_save_allocate_nothing(tmp_path: Path) -> None:
    sd = {"w": torch.ones(4096), "b": torch.zeros(16)}
    with CheckpointQueue(persistent=True) as queue:
        queue.reserve(sd)
        assert queue._engine.buffers.allocations == 1
        caller = queue._engine._persistent_caller
        assert caller is not None and caller._ready
        queue.schedule_async_request(AsyncRequest(write_value, (sd, str(tmp_path / "a")), []))
        assert queue._engine.buffers.allocations == 1
        assert queue.maybe_finalize_async_calls(blocking=True) == [0]


def test_failing_ranks_messages_are_all_in_the_distributed_error() -> None:
    from aiockpt._dist import remote_failure

    err = remote_failure(3, (1, 2), None, {1: "disk full on node1", 2: "worker killed"})
    assert err.failed_ranks == (1, 2)
    assert err.rank_errors == {1: "disk full on node1", 2: "worker killed"}
    assert "rank 1: disk full on node1" in str(err) and "rank 2: worker killed" in str(err)


def test_misuse_and_closed_are_different_errors() -> None:
    from aiockpt import QueueClosedError, QueueMisuseError, QueueOptions
    from aiockpt._core._engine import CallsEngine

    assert not issubclass(QueueMisuseError, QueueClosedError)
    assert issubclass(QueueMisuseError, RuntimeError)
    engine = CallsEngine(QueueOptions(persistent=False))
    engine.stop_workers()
    with pytest.raises(QueueClosedError):
        engine.schedule(AsyncRequest(None, (), []))
    with pytest.raises(InvalidRequestError, match="save_timeout"):
        CheckpointQueue(persistent=False, save_timeout=0)


_ = (raise_value_error, signal)


@BOTH
def test_a_file_its_rename_and_its_directory_are_durable_before_the_save_resolves(
    tmp_path: Path, persistent: bool
) -> None:
    import json

    from ckpt_helpers import save_with_fsync_spy

    target = str(tmp_path / "model.pt")
    log = str(tmp_path / "fsync.json")
    with CheckpointQueue(persistent=persistent) as queue:
        queue.schedule_async_request(
            AsyncRequest(save_with_fsync_spy, ({"w": torch.ones(8)}, target, log), [])
        )
        assert queue.maybe_finalize_async_calls(blocking=True) == [0]
        with open(log) as f:
            events = json.load(f)
    renames = [e for e in events if e[0] == "replace" and e[2] == target]
    assert len(renames) == 1, events
    temp = renames[0][1]
    at = events.index(renames[0])
    # The file's bytes reached the disk before its name did...
    assert ["fsync", temp] in events[:at], events
    # ...and the directory entry of the new name afterwards.
    assert ["fsync", str(tmp_path)] in events[at + 1 :], events


def test_a_fork_that_fails_is_a_typed_error_and_breaks_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    queue = CheckpointQueue(persistent=False)

    def no_fork() -> int:
        raise OSError(errno.EAGAIN, "Resource temporarily unavailable")

    monkeypatch.setattr(os, "fork", no_fork)
    with pytest.raises(StagingError, match="starting the worker for call 0") as info:
        queue.schedule_async_request(AsyncRequest(write_value, ({"w": torch.ones(8)}, "x"), []))
    assert isinstance(info.value.__cause__, BlockingIOError)
    monkeypatch.undo()
    assert queue._engine.buffers.leased() == [] and queue._engine.running() == []
    idx = queue.schedule_async_request(AsyncRequest(write_value, (1, str(tmp_path / "b")), []))
    assert queue.maybe_finalize_async_calls(blocking=True) == [idx]
    queue.close()  # returns: nothing is left waiting for a child that never existed


@pytest.mark.parametrize("start_method", ["forkserver", "spawn"])
def test_a_worker_that_cannot_be_restarted_is_a_typed_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, start_method: str
) -> None:
    import errno
    import multiprocessing.forkserver
    import multiprocessing.util

    with CheckpointQueue(persistent=True, start_method=start_method) as queue:
        queue.schedule_async_request(AsyncRequest(write_value, (1, str(tmp_path / "a")), []))
        queue.maybe_finalize_async_calls(blocking=True)
        caller = queue._engine._persistent_caller
        assert caller is not None and caller.process is not None
        queue._engine.kill_worker()
        caller.process.join(30)  # dead for sure: the next request must start a new one

        def no_spawn(*args: Any, **kwargs: Any) -> int:
            raise OSError(errno.EAGAIN, "Resource temporarily unavailable")

        # How each start method makes a process: the forkserver (running by now) forks it.
        if start_method == "spawn":
            monkeypatch.setattr(multiprocessing.util, "spawnv_passfds", no_spawn)
        else:
            monkeypatch.setattr(multiprocessing.forkserver, "connect_to_new_process", no_spawn)
        with pytest.raises(StagingError, match="starting the worker for call 1"):
            queue.schedule_async_request(AsyncRequest(write_value, (2, str(tmp_path / "b")), []))
        monkeypatch.undo()
        idx = queue.schedule_async_request(AsyncRequest(write_value, (3, str(tmp_path / "c")), []))
        assert queue.maybe_finalize_async_calls(blocking=True) == [idx]


def test_two_threads_finalizing_raise_each_failure_once_in_order(tmp_path: Path) -> None:
    raised: list[int] = []
    finalized: list[int] = []
    stray: list[BaseException] = []
    with CheckpointQueue(persistent=True) as queue:
        stop = threading.Event()

        def poll_without_blocking() -> None:
            while not stop.is_set():
                try:
                    finalized.extend(queue.maybe_finalize_async_calls(blocking=False))
                except WorkerError as err:
                    assert err.call_idx is not None
                    raised.append(err.call_idx)
                except BaseException as exc:
                    stray.append(exc)

        poller = threading.Thread(target=poll_without_blocking)
        poller.start()
        try:
            for i in range(12):
                fn = raise_value_error if i % 2 else write_value
                arg = "disk on fire" if i % 2 else str(tmp_path / f"ok{i}")
                queue.schedule_async_request(AsyncRequest(fn, ({}, arg), []))
                try:
                    finalized.extend(queue.maybe_finalize_async_calls(blocking=True))
                except WorkerError as err:
                    assert err.call_idx is not None
                    raised.append(err.call_idx)
        finally:
            stop.set()
            poller.join(30)
    assert stray == []
    assert sorted(raised) == list(range(1, 12, 2))  # each failure exactly once
    assert sorted(finalized) == list(range(0, 12, 2)) and len(finalized) == 6


def test_close_racing_a_schedule_finalizes_it(tmp_path: Path) -> None:
    started, release = threading.Event(), threading.Event()
    steps: list[str] = []

    def slow_preload() -> Any:
        started.set()
        assert release.wait(30)
        return {"w": torch.ones(16)}

    queue = CheckpointQueue(persistent=True)
    result: dict[str, Any] = {}

    def schedule() -> None:
        request = AsyncRequest(
            write_value,
            (None, str(tmp_path / "late")),
            [lambda: steps.append("finalized")],
            preload_fn=slow_preload,
            preload_arg_index=0,
        )
        result["idx"] = queue.schedule_async_request(request)

    scheduler = threading.Thread(target=schedule)
    scheduler.start()
    assert started.wait(30)  # the schedule is past its open-check, staging
    closer = threading.Thread(target=queue.close)
    closer.start()
    release.set()
    scheduler.join(30)
    closer.join(60)
    assert not closer.is_alive() and result["idx"] == 0
    assert steps == ["finalized"]  # the close saw the late request and finalized it
    assert (tmp_path / "late").exists()
    caller = queue._engine._persistent_caller
    assert caller is None or caller.process is None  # no worker left behind


def test_ctrl_c_in_a_finalize_step_fails_that_request_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ran: list[str] = []

    def commit() -> None:
        ran.append("commit")
        raise KeyboardInterrupt

    with CheckpointQueue(persistent=False) as queue:
        queue.schedule_async_request(
            AsyncRequest(write_value, (1, str(tmp_path / "k")), [commit, lambda: ran.append("x")])
        )
        with caplog.at_level("ERROR", logger="aiockpt"), pytest.raises(KeyboardInterrupt):
            queue.maybe_finalize_async_calls(blocking=True)
        assert ran == ["commit"]
        assert "finalize step" in caplog.text and "interrupted by KeyboardInterrupt" in caplog.text
        assert "may not be committed" in caplog.text
        assert queue.get_num_unfinalized_calls() == 0


@BOTH
def test_parameters_and_requires_grad_are_saved_as_torch_save_keeps_them(
    tmp_path: Path, persistent: bool
) -> None:
    model = torch.nn.Linear(4, 3)
    sd = model.state_dict(keep_vars=True)
    sd["leaf"] = torch.ones(2, requires_grad=True)
    ckpt = TorchCheckpoint(persistent=persistent)
    try:
        ckpt.async_save(sd, str(tmp_path / "ours.pt"))
        ckpt.finalize_async_save(blocking=True)
    finally:
        ckpt.close()
    torch.save(sd, tmp_path / "theirs.pt")
    ours = torch.load(tmp_path / "ours.pt", weights_only=True)
    theirs = torch.load(tmp_path / "theirs.pt", weights_only=True)
    for key in ("weight", "bias", "leaf"):
        assert type(ours[key]) is type(theirs[key]), key
        assert ours[key].requires_grad == theirs[key].requires_grad, key
        assert torch.equal(ours[key].detach(), sd[key].detach())


def test_a_reply_read_before_its_call_registered_is_not_lost(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fast worker can answer before ``schedule`` has registered the call; another
    thread (the event loop's poller, a waiting stager) may read that answer meanwhile."""
    from multiprocessing.connection import wait

    with CheckpointQueue(persistent=True) as queue:
        engine = queue._engine
        queue.schedule_async_request(AsyncRequest(write_value, (0, str(tmp_path / "a")), []))
        assert queue.maybe_finalize_async_calls(blocking=True) == [0]
        caller = engine._persistent_caller
        assert caller is not None
        real_run = caller.run

        def run_then_someone_reads(*args: Any) -> None:
            real_run(*args)
            assert caller._conn is not None
            assert wait([caller._conn], 30)  # the worker answered already...
            engine.collect()  # ...and another thread read it before registration

        monkeypatch.setattr(caller, "run", run_then_someone_reads)
        idx = queue.schedule_async_request(AsyncRequest(write_value, (1, str(tmp_path / "b")), []))
        monkeypatch.undo()
        assert queue.maybe_finalize_async_calls(blocking=True, finalize_timeout=30) == [idx]


_STUCK_START = """
import sys, threading
if __name__ == "__mp_main__":  # the spawned worker imports this module: it never finishes
    threading.Event().wait()
from aiockpt import CheckpointQueue, AsyncRequest, CheckpointError

def main():
    queue = CheckpointQueue(persistent=True, start_timeout=2.0)
    queue.schedule_async_request(AsyncRequest(print, ("never printed",), []))
    try:
        queue.maybe_finalize_async_calls(blocking=True)
        print("RESULT no error")
    except CheckpointError as err:
        print("RESULT", type(err).__name__, err)
    queue.close()
    print("ALIVE", [p.pid for p in __import__("multiprocessing").active_children()])

if __name__ == "__main__":
    main()
"""


def test_a_persistent_worker_that_never_starts_fails_the_save_at_its_deadline(
    tmp_path: Path,
) -> None:
    """start_timeout bounds a worker stuck before it is ready (its import hangs)."""
    script = tmp_path / "stuck_start.py"
    script.write_text(_STUCK_START)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=90)
    lines = [line for line in done.stdout.splitlines() if line.startswith(("RESULT", "ALIVE"))]
    assert done.returncode == 0, done.stderr
    assert lines[0].startswith("RESULT WorkerCrashedError the checkpoint worker of call 0"), lines
    assert "not ready within start_timeout=2.0s and was killed" in lines[0]
    assert lines[1] == "ALIVE []"  # the stuck worker was killed, not left behind
