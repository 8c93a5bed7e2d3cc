"""CheckpointQueue with real worker processes: order, errors, crashes, staging, closing."""

from __future__ import annotations

import os
import pickle
import signal
import threading
from functools import partial
from pathlib import Path

import pytest
import torch
from ckpt_helpers import (
    exit_hard,
    kill_self,
    make_gate,
    open_gate,
    raise_value_error,
    read_pid,
    report_pid,
    wait_then_write,
    write_value,
)

from aiockpt import (
    AsyncRequest,
    CheckpointError,
    CheckpointQueue,
    FinalizeError,
    InvalidRequestError,
    QueueClosedError,
    StagingError,
    WorkerCrashedError,
    WorkerError,
)

BOTH = pytest.mark.parametrize("persistent", [False, True], ids=["fork", "persistent"])


def load(path: Path) -> object:
    with open(path, "rb") as f:
        return pickle.load(f)


@BOTH
def test_finalize_fifo_order_and_indices(tmp_path: Path, persistent: bool) -> None:
    order: list[int] = []
    gates = [make_gate(str(tmp_path), f"gate{i}") for i in range(3)]
    with CheckpointQueue(persistent=persistent) as queue:
        idxs = []
        for i in range(3):
            req = AsyncRequest(
                wait_then_write,
                (i, gates[i], str(tmp_path / f"out{i}")),
                [partial(order.append, i)],
            )
            idxs.append(queue.schedule_async_request(req))
        assert idxs == [0, 1, 2]
        assert queue.maybe_finalize_async_calls(blocking=False) == []
        assert queue.get_num_unfinalized_calls() == 3
        # Release the gates last-first: calls 1 and 2 still wait for call 0 (forked
        # children run in scheduling order, as the persistent worker serves them).
        open_gate(gates[2])
        open_gate(gates[1])
        assert queue.maybe_finalize_async_calls(blocking=False) == []
        assert not (tmp_path / "out2").exists()
        open_gate(gates[0])
        assert queue.maybe_finalize_async_calls(blocking=True) == [0, 1, 2]
        assert order == [0, 1, 2]
        assert queue.get_num_unfinalized_calls() == 0
        assert [torch.load(tmp_path / f"out{i}") for i in range(3)] == [0, 1, 2]


@BOTH
def test_non_blocking_poll_then_finalize(tmp_path: Path, persistent: bool) -> None:
    gate = make_gate(str(tmp_path), "gate")
    with CheckpointQueue(persistent=persistent) as queue:
        queue.schedule_async_request(
            AsyncRequest(wait_then_write, ({"a": 1}, gate, str(tmp_path / "o")), [])
        )
        for _ in range(3):
            assert queue.maybe_finalize_async_calls(blocking=False) == []
        open_gate(gate)
        engine = queue._engine
        engine.wait_local(engine.active[0], None)
        assert queue.maybe_finalize_async_calls(blocking=False) == [0]
        assert queue.maybe_finalize_async_calls(blocking=False) == []


@BOTH
def test_mutation_after_schedule_does_not_leak(tmp_path: Path, persistent: bool) -> None:
    gate = make_gate(str(tmp_path), "gate")
    weights = torch.arange(1000, dtype=torch.float32)
    sd = {"w": weights, "nested": [torch.ones(3, 4)], "step": 7}
    with CheckpointQueue(persistent=persistent) as queue:
        queue.schedule_async_request(
            AsyncRequest(wait_then_write, (sd, gate, str(tmp_path / "ck.pt")), [])
        )
        weights.mul_(-1)  # the worker has not even started writing yet
        sd["nested"][0].zero_()
        open_gate(gate)
        assert queue.maybe_finalize_async_calls(blocking=True) == [0]
    saved = torch.load(tmp_path / "ck.pt", weights_only=True)
    assert torch.equal(saved["w"], torch.arange(1000, dtype=torch.float32))
    assert torch.equal(saved["nested"][0], torch.ones(3, 4))
    assert saved["step"] == 7


@BOTH
def test_worker_exception_reaches_caller(tmp_path: Path, persistent: bool) -> None:
    ran: list[str] = []
    with CheckpointQueue(persistent=persistent) as queue:
        queue.schedule_async_request(
            AsyncRequest(raise_value_error, ({}, "disk says no"), [partial(ran.append, "bad")])
        )
        with pytest.raises(WorkerError) as info:
            queue.maybe_finalize_async_calls(blocking=True)
        err = info.value
        assert err.call_idx == 0 and err.rank == 0
        assert err.exc_type == "ValueError" and err.exc_message == "disk says no"
        assert "raise_value_error" in err.worker_traceback
        assert "raise ValueError(message)" in err.worker_traceback
        assert "call 0" in str(err) and "ValueError: disk says no" in str(err)
        assert ran == []  # finalize steps of the failed request did not run
        # The queue keeps working.
        queue.schedule_async_request(
            AsyncRequest(write_value, ("fine", str(tmp_path / "ok")), [partial(ran.append, "ok")])
        )
        assert queue.maybe_finalize_async_calls(blocking=True) == [1]
        assert ran == ["ok"] and load(tmp_path / "ok") == "fine"


@BOTH
@pytest.mark.parametrize("how", ["sigkill", "os_exit"])
def test_dead_worker_is_an_error_and_next_request_succeeds(
    tmp_path: Path, persistent: bool, how: str
) -> None:
    fn, args, exitcode = (
        (kill_self, ({},), -signal.SIGKILL) if how == "sigkill" else (exit_hard, ({}, 3), 3)
    )
    ran: list[int] = []
    with CheckpointQueue(persistent=persistent) as queue:
        queue.schedule_async_request(AsyncRequest(fn, args, [partial(ran.append, 0)]))
        with pytest.raises(WorkerCrashedError) as info:
            queue.maybe_finalize_async_calls(blocking=True)
        assert info.value.exitcode == exitcode and info.value.call_idx == 0
        expected = "SIGKILL" if how == "sigkill" else "exited with code 3"
        assert expected in str(info.value)
        assert ran == []
        queue.schedule_async_request(
            AsyncRequest(write_value, ("after", str(tmp_path / "after")), [partial(ran.append, 1)])
        )
        assert queue.maybe_finalize_async_calls(blocking=True) == [1]
        assert ran == [1] and load(tmp_path / "after") == "after"
        if persistent:
            assert queue._engine._persistent_caller is not None
            assert queue._engine._persistent_caller.starts == 2


@BOTH
def test_worker_killed_from_outside_while_writing(tmp_path: Path, persistent: bool) -> None:
    gate = make_gate(str(tmp_path), "gate")
    pid_file = tmp_path / "pid"
    with CheckpointQueue(persistent=persistent) as queue:
        queue.schedule_async_request(AsyncRequest(report_pid, ({}, gate, str(pid_file)), []))
        queue.schedule_async_request(AsyncRequest(write_value, (1, str(tmp_path / "second")), []))
        # The worker publishes its pid, then parks on the gate: kill it there.
        os.kill(read_pid(str(pid_file)), signal.SIGKILL)
        with pytest.raises(WorkerCrashedError) as info:
            queue.maybe_finalize_async_calls(blocking=True)
        assert info.value.call_idx == 0 and "SIGKILL while writing it" in str(info.value)
        # The second request had not started (persistent: it was queued on the same
        # worker, and goes to a new one): it is written.
        assert queue.maybe_finalize_async_calls(blocking=True) == [1]
        assert (tmp_path / "second").exists()


def test_failing_finalize_step_is_reported_and_later_steps_skipped(tmp_path: Path) -> None:
    ran: list[str] = []

    def boom() -> None:
        raise OSError("metadata disk full")

    with CheckpointQueue(persistent=False) as queue:
        queue.schedule_async_request(
            AsyncRequest(write_value, (1, str(tmp_path / "a")), [boom, partial(ran.append, "x")])
        )
        with pytest.raises(FinalizeError, match="metadata disk full") as info:
            queue.maybe_finalize_async_calls(blocking=True)
        assert isinstance(info.value.__cause__, OSError)
        assert ran == []
        assert queue.get_num_unfinalized_calls() == 0


def test_error_lists_requests_finalized_before_it(tmp_path: Path) -> None:
    with CheckpointQueue(persistent=True) as queue:
        queue.schedule_async_request(AsyncRequest(write_value, (1, str(tmp_path / "a")), []))
        queue.schedule_async_request(AsyncRequest(raise_value_error, ({}, "x"), []))
        queue.schedule_async_request(AsyncRequest(write_value, (3, str(tmp_path / "c")), []))
        with pytest.raises(WorkerError) as info:
            queue.maybe_finalize_async_calls(blocking=True)
        assert info.value.call_idx == 1 and info.value.finalized_call_idxs == [0]
        assert queue.maybe_finalize_async_calls(blocking=True) == [2]


def test_noop_request_still_runs_finalize_steps() -> None:
    ran: list[int] = []
    with CheckpointQueue(persistent=False) as queue:
        queue.schedule_async_request(AsyncRequest(None, (), [partial(ran.append, 1)]))
        assert queue.maybe_finalize_async_calls(blocking=False) == [0]
    assert ran == [1]


@BOTH
def test_preload_fn_result_replaces_the_state_dict_argument(
    tmp_path: Path, persistent: bool
) -> None:
    source = {"t": torch.full((4,), 2.0)}
    with CheckpointQueue(persistent=persistent) as queue:
        req = AsyncRequest(
            write_value,
            ("placeholder", str(tmp_path / "pre")),
            [],
            preload_fn=partial(dict, source),
            preload_arg_index=0,
        )
        queue.schedule_async_request(req)
        source["t"].fill_(-1)
        queue.maybe_finalize_async_calls(blocking=True)
    assert torch.equal(load(tmp_path / "pre")["t"], torch.full((4,), 2.0))  # type: ignore[index]


def test_no_dist_false_without_process_group_is_a_world_of_one(tmp_path: Path) -> None:
    with CheckpointQueue(persistent=False) as queue:
        queue.schedule_async_request(AsyncRequest(write_value, (1, str(tmp_path / "a")), []))
        assert queue.maybe_finalize_async_calls(blocking=True, no_dist=False) == [0]


def test_bad_input_is_rejected_at_the_call(tmp_path: Path) -> None:
    with CheckpointQueue(persistent=True) as queue:
        with pytest.raises(InvalidRequestError, match="not callable"):
            queue.schedule_async_request(AsyncRequest("not a function", (), []))  # type: ignore[arg-type]
        with pytest.raises(InvalidRequestError, match="picklable"):
            queue.schedule_async_request(
                AsyncRequest(write_value, ({"fn": lambda: 1}, str(tmp_path / "x")), [])
            )

        def bad_preload() -> None:
            raise RuntimeError("device lost")

        with pytest.raises(StagingError, match=r"preload_fn of call 1 .* device lost"):
            queue.schedule_async_request(
                AsyncRequest(write_value, (1, None), [], preload_fn=bad_preload)
            )
        with pytest.raises(InvalidRequestError, match=r"async_fn_args\[1\]"):
            queue.schedule_async_request(AsyncRequest(write_value, (1,), [], preload_fn=dict))
        assert queue.get_num_unfinalized_calls() == 0
        # Still usable. Requests rejected before staging use no index; the two that failed
        # while scheduling did (calls 0 and 1), so every rank numbers its requests alike.
        idx = queue.schedule_async_request(AsyncRequest(write_value, (5, str(tmp_path / "y")), []))
        assert idx == 2
        assert queue.maybe_finalize_async_calls(blocking=True) == [2]
    with pytest.raises(ValueError, match="start_method"):
        CheckpointQueue(persistent=True, start_method="fork")


def test_frozen_request_refuses_new_finalize_fns() -> None:
    req = AsyncRequest(None, (), [])
    req.add_finalize_fn(print)
    assert len(req.finalize_fns) == 1
    with pytest.raises(RuntimeError, match="frozen"):
        req.freeze().add_finalize_fn(print)


def test_execute_sync_runs_everything_in_order(tmp_path: Path) -> None:
    events: list[str] = []

    def preload() -> str:
        events.append("preload")
        return "staged"

    req = AsyncRequest(
        write_value,
        (None, str(tmp_path / "s")),
        [partial(events.append, "finalize")],
        preload_fn=preload,
        preload_arg_index=0,
    )
    assert req.execute_sync() == str(tmp_path / "s")
    assert events == ["preload", "finalize"]
    assert load(tmp_path / "s") == "staged"


@BOTH
def test_close_is_idempotent_and_finalizes_pending(tmp_path: Path, persistent: bool) -> None:
    ran: list[int] = []
    queue = CheckpointQueue(persistent=persistent)
    queue.schedule_async_request(
        AsyncRequest(write_value, (1, str(tmp_path / "a")), [partial(ran.append, 0)])
    )
    queue.close()
    assert ran == [0] and load(tmp_path / "a") == 1
    queue.close()
    assert queue._engine._persistent_caller is None or (
        queue._engine._persistent_caller.process is None
    )


def test_close_raises_the_first_failure_after_stopping_the_worker(tmp_path: Path) -> None:
    queue = CheckpointQueue(persistent=True)
    queue.schedule_async_request(AsyncRequest(raise_value_error, ({}, "late"), []))
    queue.schedule_async_request(AsyncRequest(write_value, (2, str(tmp_path / "b")), []))
    with pytest.raises(WorkerError, match="late"):
        queue.close()
    assert load(tmp_path / "b") == 2
    assert queue._engine.closed
    queue.close()  # already closed: nothing more to say


def test_warm_save_reuses_staging_buffers(tmp_path: Path) -> None:
    sd = {"a": torch.randn(256, 256), "b": torch.randn(1000).to(torch.bfloat16)}
    with CheckpointQueue(persistent=True) as queue:
        buffers = queue.staging_buffers
        for i in range(3):
            sd["a"].add_(1)
            queue.schedule_async_request(
                AsyncRequest(wait_then_write, (sd, "/dev/null", str(tmp_path / f"{i}.pt")), [])
            )
            assert buffers.allocations == 1
            queue.maybe_finalize_async_calls(blocking=True)
            saved = torch.load(tmp_path / f"{i}.pt", weights_only=True)
            assert torch.equal(saved["a"], sd["a"]) and torch.equal(saved["b"], sd["b"])
        first_ptr = buffers.arenas[0].base_ptr
        # A larger layout replaces the single arena rather than adding a second copy.
        sd["c"] = torch.zeros(100_000)
        queue.schedule_async_request(
            AsyncRequest(wait_then_write, (sd, "/dev/null", str(tmp_path / "big.pt")), [])
        )
        queue.maybe_finalize_async_calls(blocking=True)
        assert buffers.allocations == 2 and len(buffers.arenas) == 1
        assert buffers.arenas[0].base_ptr != first_ptr
        assert torch.equal(torch.load(tmp_path / "big.pt", weights_only=True)["c"], sd["c"])


def test_busy_buffer_is_not_overwritten(tmp_path: Path) -> None:
    """With one staging copy, a second save waits for the first worker instead of
    overwriting the bytes it is still writing."""
    gate = make_gate(str(tmp_path), "gate")
    sd = {"w": torch.full((10_000,), 1.0)}
    with CheckpointQueue(persistent=True, max_staging_copies=1) as queue:
        queue.schedule_async_request(
            AsyncRequest(wait_then_write, (sd, gate, str(tmp_path / "first.pt")), [])
        )
        sd["w"].fill_(2.0)
        second = threading.Thread(
            target=queue.schedule_async_request,
            args=(AsyncRequest(wait_then_write, (sd, "/dev/null", str(tmp_path / "2.pt")), []),),
        )
        second.start()
        second.join(0.5)
        assert second.is_alive(), "the second save must wait for the only staging buffer"
        open_gate(gate)
        second.join()
        assert queue.maybe_finalize_async_calls(blocking=True) == [0, 1]
    assert torch.equal(torch.load(tmp_path / "first.pt")["w"], torch.full((10_000,), 1.0))
    assert torch.equal(torch.load(tmp_path / "2.pt")["w"], torch.full((10_000,), 2.0))


def test_two_staging_copies_let_two_saves_overlap(tmp_path: Path) -> None:
    gates = [make_gate(str(tmp_path), f"g{i}") for i in range(2)]
    sd = {"w": torch.zeros(1000)}
    with CheckpointQueue(persistent=False, max_staging_copies=2) as queue:
        for i in range(2):
            sd["w"].fill_(i)
            queue.schedule_async_request(
                AsyncRequest(wait_then_write, (sd, gates[i], str(tmp_path / f"{i}.pt")), [])
            )
        assert queue.staging_buffers.allocations == 2
        for gate in gates:
            open_gate(gate)
        assert queue.maybe_finalize_async_calls(blocking=True) == [0, 1]
    for i in range(2):
        assert torch.equal(torch.load(tmp_path / f"{i}.pt")["w"], torch.full((1000,), float(i)))


def test_tied_tensors_stay_tied_and_odd_tensors_survive(tmp_path: Path) -> None:
    shared = torch.randn(8, 8)
    sd = {
        "emb": shared,
        "head": shared,
        "t": torch.randn(4, 6).t(),  # non-contiguous
        "empty": torch.empty(0, 3),
        "scalar": torch.tensor(3.5),
        "sparse": torch.eye(3).to_sparse(),
        "flags": torch.tensor([True, False]),
    }
    with CheckpointQueue(persistent=True) as queue:
        queue.schedule_async_request(
            AsyncRequest(wait_then_write, (sd, "/dev/null", str(tmp_path / "odd.pt")), [])
        )
        queue.maybe_finalize_async_calls(blocking=True)
    out = torch.load(tmp_path / "odd.pt", weights_only=True)
    assert out["emb"].data_ptr() == out["head"].data_ptr()
    for key in ("emb", "t", "empty", "scalar", "flags"):
        assert torch.equal(out[key], sd[key]), key
    assert torch.equal(out["sparse"].to_dense(), torch.eye(3))


def test_nothing_leaks_across_many_saves(tmp_path: Path) -> None:
    sd = {"w": torch.randn(1000)}

    def cycle(saves: int) -> None:
        for persistent in (False, True):
            with CheckpointQueue(persistent=persistent) as queue:
                for i in range(saves):
                    queue.schedule_async_request(
                        AsyncRequest(write_value, (sd, str(tmp_path / f"{persistent}{i}")), [])
                    )
                    queue.maybe_finalize_async_calls(blocking=True)

    # The first worker start opens multiprocessing's own long-lived helpers (the resource
    # tracker's pipe): count only what later queues leave behind.
    cycle(1)
    fds_before = len(os.listdir("/proc/self/fd"))
    threads_before = set(threading.enumerate())
    for persistent in (False, True):
        queue = CheckpointQueue(persistent=persistent)
        for i in range(5):
            queue.schedule_async_request(
                AsyncRequest(write_value, (sd, str(tmp_path / f"{persistent}{i}")), [])
            )
            queue.maybe_finalize_async_calls(blocking=True)
        queue.close()
    assert len(os.listdir("/proc/self/fd")) == fds_before
    # No thread started since is alive (one that was there may have ended meanwhile).
    assert set(threading.enumerate()) - threads_before == set()


def test_checkpoint_error_is_the_base_of_every_failure() -> None:
    for cls in (WorkerError, WorkerCrashedError, FinalizeError, StagingError, QueueClosedError):
        assert issubclass(cls, CheckpointError)
    assert issubclass(InvalidRequestError, ValueError)


@BOTH
def test_callers_answer_the_reference_question_directly(tmp_path: Path, persistent: bool) -> None:
    from aiockpt import PersistentAsyncCaller, TemporalAsyncCaller

    def make() -> PersistentAsyncCaller | TemporalAsyncCaller:
        return PersistentAsyncCaller() if persistent else TemporalAsyncCaller()

    caller = make()
    caller.schedule_async_call(AsyncRequest(write_value, (5, str(tmp_path / "c")), [], call_idx=0))
    assert caller.is_current_async_call_done(blocking=True) is True
    assert load(tmp_path / "c") == 5
    assert caller.is_current_async_call_done(blocking=False) is True  # nothing left
    caller.close()
    failing = make()
    failing.schedule_async_call(AsyncRequest(raise_value_error, ({}, "direct"), [], call_idx=1))
    with pytest.raises(WorkerError, match="direct"):
        failing.is_current_async_call_done(blocking=True)
    failing.close()


_FORKSERVER_SCRIPT = """
import json, multiprocessing as mp, multiprocessing.forkserver as fs, os
import psutil
from aiockpt import AsyncRequest, CheckpointQueue

if __name__ == "__main__":
    mp.set_forkserver_preload(["json"])  # the program's own wish, kept
    queue = CheckpointQueue()
    queue.schedule_async_request(AsyncRequest(os.getpid, (), []))
    queue.maybe_finalize_async_calls(blocking=True)
    worker = queue._engine._persistent_caller.process.pid
    server = fs._forkserver._forkserver_pid
    out = {
        "preload": fs._forkserver._preload_modules,
        "worker_parent_is_server": psutil.Process(worker).ppid() == server,
        "server_has_torch": any("torch" in m.path for m in psutil.Process(server).memory_maps()),
    }
    queue.close()
    print(json.dumps(out))
"""


def test_the_default_worker_is_forked_from_a_forkserver_that_has_torch(tmp_path: Path) -> None:
    import json
    import subprocess
    import sys

    script = tmp_path / "forkserver_worker.py"
    script.write_text(_FORKSERVER_SCRIPT)
    out = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120, check=True
    )
    found = json.loads(out.stdout.strip().splitlines()[-1])
    assert found == {
        "preload": ["json", "torch", "aiockpt._core._worker"],
        "worker_parent_is_server": True,
        "server_has_torch": True,
    }


@pytest.mark.parametrize("persistent", [False, True], ids=["fork", "persistent"])
def test_a_closed_queue_leaves_no_copy_thread_after_a_large_save(
    tmp_path: Path, persistent: bool
) -> None:
    before = {t.ident for t in threading.enumerate()}
    big = torch.arange(12 << 20, dtype=torch.float32)  # 48 MiB: copied by two threads
    with CheckpointQueue(persistent=persistent) as queue:
        queue.schedule_async_request(AsyncRequest(write_value, (big, str(tmp_path / "a")), []))
        assert queue.maybe_finalize_async_calls(blocking=True) == [0]
        helpers = [t.name for t in threading.enumerate() if t.name.startswith("aiockpt-copy")]
        assert helpers  # the large copy did use a helper
    left = [t.name for t in threading.enumerate() if t.ident not in before and t.is_alive()]
    assert left == []
    with open(tmp_path / "a", "rb") as f:
        assert torch.equal(pickle.load(f), big)
