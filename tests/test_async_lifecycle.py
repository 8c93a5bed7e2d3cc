"""AsyncCheckpointQueue under cancellation and failure: no hang, no lost error, its own tasks.

Every test is bounded; gates a test opens no further are released in teardown, so a
failing test cannot leave a worker blocked on its FIFO.
"""

from __future__ import annotations

import gc
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import pytest
import torch
from async_backends import BACKENDS
from ckpt_helpers import (
    open_gate,
    raise_value_error,
    read_pid,
    report_pid,
    wait_then_write,
    write_value,
)

from aiockpt import (
    AsyncCheckpointQueue,
    AsyncRequest,
    CheckpointCancelledError,
    CheckpointError,
    CheckpointErrorGroup,
    CheckpointFuture,
    CloseTimeoutError,
    FinalizeError,
    QueueBrokenError,
    QueueClosedError,
    StagingError,
    WorkerCrashedError,
    WorkerError,
)
from aiockpt._futures import CheckpointFuture as _Future


@pytest.fixture(params=BACKENDS)
def anyio_backend(request: pytest.FixtureRequest) -> Any:
    return request.param


pytestmark = [pytest.mark.anyio, pytest.mark.timeout(90)]


def gated(state: Any, gate: str, path: Path, finalize: list[Any] | None = None) -> AsyncRequest:
    return AsyncRequest(wait_then_write, (state, gate, str(path)), finalize or [])


def saved(path: Path) -> Any:
    return torch.load(path, weights_only=True)


# -- cancel scopes around and inside the block ------------------------------------------


@pytest.mark.parametrize("where", ["scope-around", "task-group-around", "scope-inside"])
async def test_cancelling_the_callers_scope_finishes_saves_then_reraises(
    tmp_path: Path, gate: str, where: str
) -> None:
    """A cancelled scope around the block: the save still finishes, is committed (its
    finalize step runs), the worker stops, and the cancellation reaches the scope."""
    steps: list[str] = []
    seen: dict[str, Any] = {}

    async def body(queue: AsyncCheckpointQueue, scope: anyio.CancelScope) -> None:
        seen["fut"] = await queue.schedule(
            gated({"x": torch.ones(4)}, gate, tmp_path / "a.pt", [partial(steps.append, "fin")])
        )
        scope.cancel()
        await anyio.sleep_forever()

    async def user() -> None:
        if where == "scope-around":
            with anyio.CancelScope() as scope:
                async with AsyncCheckpointQueue() as queue:
                    seen["queue"] = queue
                    await body(queue, scope)
            seen["caught"] = scope.cancelled_caught
        elif where == "task-group-around":
            async with anyio.create_task_group() as tg, AsyncCheckpointQueue() as queue:
                seen["queue"] = queue
                await body(queue, tg.cancel_scope)
            seen["caught"] = tg.cancel_scope.cancel_called
        else:
            async with AsyncCheckpointQueue() as queue:
                seen["queue"] = queue
                with anyio.CancelScope() as inner:
                    await body(queue, inner)
                seen["caught"] = inner.cancelled_caught
                assert not seen["fut"].done()  # the inner scope cancelled the caller only
                await anyio.to_thread.run_sync(open_gate, gate)
                seen["result"] = await seen["fut"]

    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            tg.start_soon(user)
            if where != "scope-inside":
                await anyio.to_thread.run_sync(open_gate, gate)
    fut: CheckpointFuture = seen["fut"]
    assert seen["caught"] is True
    assert fut.result().call_idx == 0 and steps == ["fin"]
    assert torch.equal(saved(tmp_path / "a.pt")["x"], torch.ones(4))
    with pytest.raises(QueueClosedError, match="closed"):
        await seen["queue"].schedule(AsyncRequest(write_value, (1, str(tmp_path / "n")), []))


async def test_exit_gives_up_on_a_silent_worker_after_the_timeout(
    tmp_path: Path, gate: str
) -> None:
    from datetime import timedelta

    with anyio.fail_after(60):
        with pytest.raises(CheckpointErrorGroup) as info:
            async with AsyncCheckpointQueue(timeout=timedelta(seconds=1)) as queue:
                fut = await queue.schedule(gated({"x": torch.ones(2)}, gate, tmp_path / "h.pt"))
    [error] = info.value.exceptions
    assert isinstance(error, CloseTimeoutError) and error.call_idx == 0
    assert "gave up on checkpoint call 0 after 1s" in str(error)
    assert "worker was stopped" in str(error)
    assert fut.exception() is error
    assert queue.engine._persistent_caller is not None
    assert queue.engine._persistent_caller.process is None  # stopped (no process leaks)
    assert not (tmp_path / "h.pt").exists()


async def test_cancelled_exit_with_a_silent_worker_is_bounded_and_logs_it(
    tmp_path: Path, gate: str, caplog: pytest.LogCaptureFixture
) -> None:
    from datetime import timedelta

    with anyio.fail_after(60):
        with anyio.CancelScope() as scope:
            async with AsyncCheckpointQueue(timeout=timedelta(seconds=1)) as queue:
                await queue.schedule(gated({"x": torch.ones(2)}, gate, tmp_path / "h.pt"))
                scope.cancel()
                await anyio.sleep_forever()
    assert scope.cancelled_caught
    records = [r for r in caplog.records if r.name == "aiockpt" and r.levelno == logging.ERROR]
    assert len(records) == 1 and records[0].exc_info is not None
    assert isinstance(records[0].exc_info[1], CloseTimeoutError)
    assert "checkpoint call 0 failed while the queue's block exited with" in records[0].message


async def test_a_second_cancellation_during_the_exit_still_stops_the_worker(
    tmp_path: Path, gate: str
) -> None:
    """The body ends normally; while the exit waits for the save, the caller's scope is
    cancelled. The save still completes, the worker is stopped, and aclose() is a no-op."""
    seen: dict[str, Any] = {}
    leaving = anyio.Event()

    async def user(outer: anyio.CancelScope) -> None:
        with outer:
            async with AsyncCheckpointQueue() as queue:
                seen["queue"] = queue
                seen["fut"] = await queue.schedule(
                    gated({"x": torch.ones(2)}, gate, tmp_path / "s.pt")
                )
                leaving.set()
        seen["caught"] = outer.cancelled_caught

    with anyio.fail_after(60):
        outer = anyio.CancelScope()
        async with anyio.create_task_group() as tg:
            tg.start_soon(user, outer)
            await leaving.wait()
            await anyio.wait_all_tasks_blocked()  # the exit is waiting for the save
            outer.cancel()
            await anyio.wait_all_tasks_blocked()
            assert not seen["fut"].done()
            await anyio.to_thread.run_sync(open_gate, gate)
    queue: AsyncCheckpointQueue = seen["queue"]
    assert seen["caught"] is True and seen["fut"].result().call_idx == 0
    assert queue.engine._persistent_caller is not None
    assert queue.engine._persistent_caller.process is None
    assert queue.pending() == 0
    await queue.aclose()  # already complete: returns at once
    with pytest.raises(QueueClosedError, match="closed"):
        await queue.finalize()


# -- callbacks and dead tasks -----------------------------------------------------------


async def test_a_raising_done_callback_is_logged_and_affects_nothing_else(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[int] = []

    def bad(fut: CheckpointFuture) -> None:
        raise ValueError(f"callback broke on {fut.call_idx}")

    with anyio.fail_after(60):
        async with AsyncCheckpointQueue() as queue:
            first = await queue.schedule(AsyncRequest(write_value, (1, str(tmp_path / "1")), []))
            first.add_done_callback(bad)
            first.add_done_callback(lambda f: calls.append(f.call_idx))
            second = await queue.schedule(AsyncRequest(write_value, (2, str(tmp_path / "2")), []))
            assert (await second).call_idx == 1 and (await first).call_idx == 0
            first.add_done_callback(bad)  # already done: called at once, logged too
    assert calls == [0]
    errors = [r for r in caplog.records if r.name == "aiockpt" and r.levelno == logging.ERROR]
    assert [r.getMessage().split(" of ")[1] for r in errors] == [
        "checkpoint call 0 raised",
        "checkpoint call 0 raised",
    ]
    assert all(r.exc_info and "callback broke on 0" in str(r.exc_info[1]) for r in errors)


async def test_a_dead_poller_fails_pending_futures_and_refuses_new_work(
    tmp_path: Path, gate: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken() -> None:
        raise RuntimeError("collect broke")

    with anyio.fail_after(60):
        async with AsyncCheckpointQueue() as queue:
            monkeypatch.setattr(queue.engine, "collect", broken)
            fut = await queue.schedule(
                gated({"x": torch.ones(2)}, gate, tmp_path / "p.pt"), wait_for_staging=False
            )
            with pytest.raises(QueueBrokenError) as info:
                await fut
            assert str(info.value) == (
                "checkpoint call 0 failed because the poller task of the "
                "AsyncCheckpointQueue died (RuntimeError: collect broke); it was not finalized"
            )
            assert isinstance(info.value.__cause__, RuntimeError)
            with pytest.raises(QueueBrokenError, match="open a new queue"):
                await queue.schedule(AsyncRequest(write_value, (1, str(tmp_path / "n")), []))
    assert queue.engine._persistent_caller is not None
    assert queue.engine._persistent_caller.process is None


# -- every failure reaches the user exactly once ----------------------------------------


async def test_a_cancelled_finalize_loses_no_failure(tmp_path: Path, gate: str) -> None:
    with anyio.fail_after(60):
        async with AsyncCheckpointQueue() as queue:
            await queue.schedule(gated({"x": torch.ones(2)}, gate, tmp_path / "a.pt"))
            await queue.schedule(AsyncRequest(raise_value_error, ({}, "disk full"), []))
            with anyio.CancelScope() as scope:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(queue.finalize)
                    await anyio.wait_all_tasks_blocked()
                    scope.cancel()
            await anyio.to_thread.run_sync(open_gate, gate)
            with pytest.raises(CheckpointErrorGroup) as info:
                await queue.finalize()
            [error] = info.value.exceptions
            assert isinstance(error, WorkerError) and error.call_idx == 1
            assert await queue.finalize() == []  # reported once


async def test_every_failure_is_raised_by_finalize_and_at_exit(tmp_path: Path) -> None:
    with anyio.fail_after(60):
        async with AsyncCheckpointQueue() as queue:
            for i, fn in enumerate([raise_value_error, write_value, raise_value_error]):
                args = ({}, f"fail {i}") if fn is raise_value_error else (i, str(tmp_path / "ok"))
                await queue.schedule(AsyncRequest(fn, args, []))
            with pytest.raises(
                CheckpointErrorGroup, match=r"2 checkpoints failed \(call 0, 2\)"
            ) as info:
                await queue.finalize()
            assert [(e.call_idx, type(e)) for e in info.value.exceptions] == [
                (0, WorkerError),
                (2, WorkerError),
            ]
            assert isinstance(info.value, CheckpointError)
        with pytest.raises(CheckpointErrorGroup) as at_exit:
            async with AsyncCheckpointQueue() as queue:
                for i in range(2):
                    await queue.schedule(AsyncRequest(raise_value_error, ({}, f"late {i}"), []))
    assert [str(e).split(": ")[-1].splitlines()[0] for e in at_exit.value.exceptions] == [
        "late 0",
        "late 1",
    ]


async def test_the_bodys_exception_propagates_with_save_failures_noted_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with anyio.fail_after(60):
        with pytest.raises(KeyError, match="body failed") as info:
            async with AsyncCheckpointQueue() as queue:
                await queue.schedule(AsyncRequest(raise_value_error, ({}, "no space"), []))
                raise KeyError("body failed")
    notes = getattr(info.value, "__notes__", [])
    assert len(notes) == 1 and notes[0].startswith("checkpoint call 0 also failed: WorkerError:")
    records = [r for r in caplog.records if r.name == "aiockpt" and r.levelno == logging.ERROR]
    assert len(records) == 1 and records[0].exc_info is not None
    assert isinstance(records[0].exc_info[1], WorkerError)
    assert "exited with KeyError" in records[0].getMessage()


async def test_a_staging_failure_handled_at_staged_is_not_raised_again() -> None:
    def broken() -> None:
        raise RuntimeError("cuda lost")

    with anyio.fail_after(60):
        async with AsyncCheckpointQueue() as queue:
            fut = await queue.schedule(
                AsyncRequest(write_value, (1, None), [], preload_fn=broken), wait_for_staging=False
            )
            with pytest.raises(StagingError, match="cuda lost"):
                await fut.staged
            assert await queue.finalize() == []
    # Leaving raised nothing: the failure was handled where it was raised.


async def test_concurrent_finalizes_each_wait_for_what_came_before(
    tmp_path: Path, gate: str
) -> None:
    got: dict[str, list[int]] = {}

    async def finalize(name: str, queue: AsyncCheckpointQueue) -> None:
        got[name] = [r.call_idx for r in await queue.finalize()]

    with anyio.fail_after(60):
        async with AsyncCheckpointQueue() as queue:
            await queue.schedule(gated({"x": torch.ones(2)}, gate, tmp_path / "a.pt"))
            async with anyio.create_task_group() as tg:
                tg.start_soon(finalize, "first", queue)
                tg.start_soon(finalize, "second", queue)
                await anyio.wait_all_tasks_blocked()
                assert got == {}  # neither returned while the save is pending
                await anyio.to_thread.run_sync(open_gate, gate)
    assert got == {"first": [0], "second": [0]}


async def test_a_failed_future_collected_unobserved_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    for idx, observe in ((7, False), (8, True)):
        fut = _Future(idx)
        fut.set_outcome(None, WorkerError(f"call {idx} broke", call_idx=idx))
        if observe:
            assert fut.exception() is not None
        del fut
        gc.collect()
    records = [r for r in caplog.records if r.name == "aiockpt"]
    assert [r.getMessage().split(" and ")[0] for r in records] == ["checkpoint call 7 failed"]
    assert "never retrieved" in records[0].getMessage()
    assert records[0].exc_info is not None and str(records[0].exc_info[1]) == "call 7 broke"


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_queue_never_closed_is_reported(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The event loop ends with the queue still open: an error says so, the unobserved
    failure is logged, and the worker is stopped. (Under trio the run itself fails.)"""

    async def forgetful() -> None:
        queue = AsyncCheckpointQueue()
        await queue.__aenter__()
        fut = await queue.schedule(AsyncRequest(raise_value_error, ({}, "never seen"), []))
        done = anyio.Event()
        fut.add_done_callback(lambda f: done.set())
        await done.wait()

    with caplog.at_level(logging.ERROR, logger="aiockpt"):
        await anyio.to_thread.run_sync(partial(anyio.run, forgetful, backend="asyncio"))
        gc.collect()
    messages = [r.getMessage() for r in caplog.records if r.name == "aiockpt"]
    assert messages[0].startswith("an AsyncCheckpointQueue was still open when its event loop")
    failures = [r for r in caplog.records if r.exc_info and isinstance(r.exc_info[1], WorkerError)]
    assert len(failures) == 1 and "never seen" in str(failures[0].exc_info[1])  # type: ignore[index]
    # The worker was stopped: the autouse fixture fails the test if any process is left.


# -- the poller on the loop, and the private limiter -------------------------------------


async def test_no_thread_waits_for_a_save_in_flight(tmp_path: Path, gate: str) -> None:
    """While a save runs the poller sleeps on file descriptors: no thread of this process
    sits in the engine waiting for the worker."""
    with anyio.fail_after(60):
        async with AsyncCheckpointQueue() as queue:
            fut = await queue.schedule(gated({"x": torch.ones(2)}, gate, tmp_path / "a.pt"))
            await anyio.wait_all_tasks_blocked()
            # The thread that sent the request to the worker ends once it has sent it.
            deadline = time.monotonic() + 10
            while (waiting := _aiockpt_frames()) and time.monotonic() < deadline:
                await anyio.sleep(0.01)
            assert waiting == []
            await anyio.to_thread.run_sync(open_gate, gate)
            assert (await fut).call_idx == 0


def _aiockpt_frames() -> list[str]:
    return [
        f"{frame.f_code.co_filename}:{frame.f_code.co_name}"
        for ident, top in sys._current_frames().items()
        if ident != threading.get_ident()
        for frame in _stack(top)
        if "/aiockpt/" in frame.f_code.co_filename
    ]


def _stack(frame: Any) -> Iterator[Any]:
    while frame is not None:
        yield frame
        frame = frame.f_back


async def test_a_busy_default_thread_limiter_does_not_delay_checkpoints(tmp_path: Path) -> None:
    limiter = anyio.to_thread.current_default_thread_limiter()
    old_tokens = limiter.total_tokens
    release = threading.Event()
    limiter.total_tokens = 1
    try:
        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                tg.start_soon(anyio.to_thread.run_sync, release.wait)  # a busy data loader
                await anyio.wait_all_tasks_blocked()
                async with AsyncCheckpointQueue() as queue:
                    fut = await queue.schedule(
                        AsyncRequest(write_value, (5, str(tmp_path / "w")), [])
                    )
                    assert (await fut).call_idx == 0
                release.set()
    finally:
        release.set()
        limiter.total_tokens = old_tokens


# -- lazy staging, backpressure, cancelling requests -------------------------------------


async def test_the_lazy_copy_runs_while_the_loop_thread_computes(tmp_path: Path) -> None:
    """A synchronous step right after ``schedule`` (no await between, as in training):
    the copy is already running in a stager thread meanwhile."""
    copying = threading.Event()
    weights = torch.full((100_000,), 3.0)

    def preload() -> dict[str, torch.Tensor]:
        copying.set()
        return {"w": weights}

    with anyio.fail_after(60):
        async with AsyncCheckpointQueue() as queue:
            fut = await queue.schedule(
                AsyncRequest(
                    wait_then_write,
                    (None, "/dev/null", str(tmp_path / "l.pt")),
                    [],
                    preload_fn=preload,
                    preload_arg_index=0,
                ),
                wait_for_staging=False,
            )
            started_during_step = copying.wait(timeout=20)  # the loop thread is busy here
            await fut.staged
            weights.fill_(4.0)
            await fut
    assert started_during_step
    assert torch.equal(saved(tmp_path / "l.pt")["w"], torch.full((100_000,), 3.0))


async def test_max_pending_makes_schedule_wait_for_room(tmp_path: Path, gate: str) -> None:
    returned: list[int] = []

    async def second(queue: AsyncCheckpointQueue) -> None:
        fut = await queue.schedule(AsyncRequest(write_value, (2, str(tmp_path / "b")), []))
        returned.append(fut.call_idx)

    with anyio.fail_after(60):
        async with AsyncCheckpointQueue(max_pending=1, max_staging_copies=2) as queue:
            first = await queue.schedule(gated({"x": torch.ones(2)}, gate, tmp_path / "a.pt"))
            async with anyio.create_task_group() as tg:
                tg.start_soon(second, queue)
                await anyio.wait_all_tasks_blocked()
                assert returned == [] and queue.pending() == 1
                await anyio.to_thread.run_sync(open_gate, gate)
            assert returned == [1] and (await first).call_idx == 0
            # The first was retrieved through its future: finalize() reports the rest.
            assert [r.call_idx for r in await queue.finalize()] == [1]


async def test_a_cancelled_schedule_leaves_the_request_reachable_through_finalize(
    tmp_path: Path, gate: str
) -> None:
    with anyio.fail_after(60):
        async with AsyncCheckpointQueue(max_staging_copies=1) as queue:
            await queue.schedule(gated({"x": torch.ones(2)}, gate, tmp_path / "a.pt"))
            with anyio.CancelScope() as scope:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(
                        queue.schedule, AsyncRequest(write_value, (2, str(tmp_path / "b")), [])
                    )
                    await anyio.wait_all_tasks_blocked()  # waiting for the staging buffer
                    scope.cancel()
            await anyio.to_thread.run_sync(open_gate, gate)
            assert [r.call_idx for r in await queue.finalize()] == [0, 1]
    assert (tmp_path / "b").exists()


async def test_cancel_withdraws_a_request_that_has_not_started(tmp_path: Path, gate: str) -> None:
    with anyio.fail_after(60):
        async with AsyncCheckpointQueue(max_staging_copies=1) as queue:
            running = await queue.schedule(gated({"x": torch.ones(2)}, gate, tmp_path / "a.pt"))
            staging = await queue.schedule(
                AsyncRequest(write_value, (2, str(tmp_path / "b")), []), wait_for_staging=False
            )
            queued = await queue.schedule(
                AsyncRequest(write_value, (3, str(tmp_path / "c")), []), wait_for_staging=False
            )
            assert [running.cancel(), staging.cancel(), queued.cancel()] == [False, False, True]
            assert queued.done() and queued.cancelled() and not queued.cancel()
            with pytest.raises(
                CheckpointCancelledError, match="call 2 was withdrawn: it was cancelled"
            ):
                await queued
            await anyio.to_thread.run_sync(open_gate, gate)
            assert [r.call_idx for r in await queue.finalize()] == [0, 1]
            after = await queue.schedule(AsyncRequest(write_value, (4, str(tmp_path / "d")), []))
            assert (await after).call_idx == 3
    assert not (tmp_path / "c").exists() and (tmp_path / "b").exists()


# -- attacks: entering cancelled, a killed worker, a raising finalize step ----------------


async def test_entering_under_a_cancelled_scope_leaves_no_worker() -> None:
    with anyio.fail_after(60):
        with anyio.CancelScope() as scope:
            scope.cancel()
            async with AsyncCheckpointQueue():
                pytest.fail("the body must not run under a cancelled scope")
    assert scope.cancelled_caught
    # The autouse fixture fails the test if the worker started for it is still running.


async def test_a_worker_killed_mid_save_fails_that_save_and_the_next_one_works(
    tmp_path: Path, gate: str
) -> None:
    import signal

    with anyio.fail_after(60):
        async with AsyncCheckpointQueue() as queue:
            pid_file = str(tmp_path / "pid")
            fut = await queue.schedule(AsyncRequest(report_pid, ({}, gate, pid_file), []))
            # The worker has started the save (it published its pid): kill it there.
            os.kill(await anyio.to_thread.run_sync(read_pid, pid_file), signal.SIGKILL)
            with pytest.raises(WorkerCrashedError, match=r"call 0 .*SIGKILL while writing it"):
                await fut
            nxt = await queue.schedule(AsyncRequest(write_value, (1, str(tmp_path / "n")), []))
            assert (await nxt).call_idx == 1


async def test_a_raising_finalize_step_fails_only_its_request(tmp_path: Path) -> None:
    ran: list[int] = []

    def broken_step() -> None:
        raise OSError("metadata disk gone")

    with anyio.fail_after(60):
        with pytest.raises(CheckpointErrorGroup) as info:
            async with AsyncCheckpointQueue() as queue:
                await queue.schedule(
                    AsyncRequest(
                        write_value, (0, str(tmp_path / "a")), [broken_step, partial(ran.append, 0)]
                    )
                )
                ok = await queue.schedule(
                    AsyncRequest(write_value, (1, str(tmp_path / "b")), [partial(ran.append, 1)])
                )
                assert (await ok).call_idx == 1
    [error] = info.value.exceptions
    assert isinstance(error, FinalizeError) and error.call_idx == 0
    assert "metadata disk gone" in str(error) and "the steps after it did not run" in str(error)
    assert ran == [1]


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_two_native_asyncio_cancels_during_the_exit_still_close(
    tmp_path: Path, gate: str, anyio_backend: str
) -> None:
    """A second Ctrl-C under asyncio.run (or an asyncio timeout around a TaskGroup) is a
    plain Task.cancel() that anyio's shield cannot stop: the close still finishes, the
    save is finalized, the worker stopped, and then the cancellation propagates."""
    import asyncio

    steps: list[str] = []
    seen: dict[str, Any] = {}

    async def body() -> None:
        async with AsyncCheckpointQueue(timeout=timedelta(seconds=60)) as queue:
            seen["queue"] = queue
            await queue.schedule(
                gated({"w": torch.ones(4)}, gate, tmp_path / "a.pt", [lambda: steps.append("fin")])
            )
            await asyncio.sleep(60)

    task = asyncio.ensure_future(body())
    while "queue" not in seen or seen["queue"].pending() == 0:
        await asyncio.sleep(0.01)
    task.cancel()
    while seen["queue"]._state.name != "DRAINING":  # the exit is waiting for the save
        await asyncio.sleep(0.01)
    task.cancel()  # a second one, while closing
    await asyncio.sleep(0.05)
    open_gate(gate)
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 60)
    assert steps == ["fin"]
    assert torch.equal(saved(tmp_path / "a.pt")["w"], torch.ones(4))
    caller = seen["queue"].engine._persistent_caller
    assert caller is None or caller.process is None


_commit_started = threading.Event()
_closing: dict[str, Any] = {}


def _slow_failing_commit() -> None:
    import time

    _commit_started.set()
    # Fail only once the close has timed out and moved on to stopping the worker.
    queue, deadline = _closing["queue"], time.monotonic() + 60
    while queue._state.name not in ("STOPPING", "CLOSED") and time.monotonic() < deadline:
        time.sleep(0.01)
    raise OSError(28, "disk full while committing")


async def test_a_finalize_step_running_at_the_close_timeout_settles_truly(
    tmp_path: Path,
) -> None:
    with pytest.raises(CheckpointErrorGroup) as info:
        async with AsyncCheckpointQueue(timeout=timedelta(seconds=1)) as queue:
            _commit_started.clear()
            _closing["queue"] = queue
            await queue.schedule(
                AsyncRequest(write_value, (1, str(tmp_path / "a")), [_slow_failing_commit])
            )
            # Leave the block while the finalize step runs: the close times out meanwhile.
            assert await anyio.to_thread.run_sync(_commit_started.wait, 60)
    errors = info.value.exceptions
    assert len(errors) == 1 and isinstance(errors[0], FinalizeError), errors
    assert "disk full while committing" in str(errors[0])
