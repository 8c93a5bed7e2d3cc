"""The async queue as a long-lived service: owned by a task, awaited from other threads and
loops, and immune to user code that raises.

Each test is bounded; a worker parked on a gate is released in teardown.
"""

from __future__ import annotations

import asyncio
import gc
import os
import pickle
import subprocess
import sys
import threading
import time
import weakref
from pathlib import Path
from typing import Any

import anyio
import psutil
import pytest
import torch
from async_backends import BACKENDS
from ckpt_helpers import (
    RELEASE,
    UNPICKLING,
    open_gate,
    raise_value_error,
    return_held_until_released,
    return_loaded_where,
    sleep_then_save,
    wait_then_write,
    write_value,
)

import aiockpt.dcp
from aiockpt import (
    AsyncCheckpointManager,
    AsyncCheckpointQueue,
    AsyncRequest,
    AsyncTorchCheckpoint,
    CheckpointCancelledError,
    CheckpointFuture,
    FinalizeError,
    InvalidRequestError,
    WorkerError,
)
from aiockpt.dcp import AsyncDCPCheckpoint

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(90)]


@pytest.fixture(params=BACKENDS)
def anyio_backend(request: pytest.FixtureRequest) -> Any:
    return request.param


def _state() -> dict[str, torch.Tensor]:
    return {"w": torch.arange(8, dtype=torch.float32)}


def _gated(tmp_path: Path, gate: str, name: str) -> AsyncRequest:
    return AsyncRequest(wait_then_write, (_state(), gate, str(tmp_path / name)), [])


# -- other threads and loops ---------------------------------------------------------------


def _await_in_asyncio_thread(fut: CheckpointFuture, out: dict[str, Any]) -> threading.Thread:
    async def wait() -> None:
        try:
            out["result"] = await fut
        except BaseException as exc:  # reported to the test
            out["error"] = exc

    thread = threading.Thread(target=lambda: asyncio.run(wait()))
    thread.start()
    return thread


def _await_in_trio_thread(fut: CheckpointFuture, out: dict[str, Any]) -> threading.Thread:
    import trio

    async def wait() -> None:
        try:
            out["result"] = await fut
        except BaseException as exc:
            out["error"] = exc

    thread = threading.Thread(target=lambda: trio.run(wait))
    thread.start()
    return thread


@pytest.mark.parametrize("foreign", ["asyncio", "trio"])
async def test_a_future_awaited_from_another_threads_loop_is_woken(
    tmp_path: Path, gate: str, foreign: str
) -> None:
    async with AsyncCheckpointQueue() as queue:
        fut = await queue.schedule(_gated(tmp_path, gate, "a.pt"))
        out: dict[str, Any] = {}
        start = _await_in_asyncio_thread if foreign == "asyncio" else _await_in_trio_thread
        thread = start(fut, out)
        open_gate(gate)
        mine = await fut  # the owner's own await is not broken by the other loop
        await anyio.to_thread.run_sync(thread.join, 30)
    assert not thread.is_alive()
    assert "error" not in out, out.get("error")
    assert out["result"] is mine
    assert mine.value == str(tmp_path / "a.pt")
    assert torch.load(tmp_path / "a.pt", weights_only=True)["w"].tolist() == list(range(8))


async def test_cancel_from_another_thread_wakes_the_owner_at_once(
    tmp_path: Path, gate: str
) -> None:
    async with AsyncCheckpointQueue() as queue:
        first = await queue.schedule(_gated(tmp_path, gate, "a.pt"))  # holds the buffer
        # The stager waits for that buffer with the second; the third waits its turn.
        second = await queue.schedule(_gated(tmp_path, gate, "b.pt"), wait_for_staging=False)
        third = await queue.schedule(_gated(tmp_path, gate, "c.pt"), wait_for_staging=False)
        cancelled = await anyio.to_thread.run_sync(third.cancel)
        assert cancelled is True
        # Woken by the cancel itself: the first save is still parked on its gate.
        with anyio.fail_after(10):
            with pytest.raises(CheckpointCancelledError, match="call 2 was withdrawn"):
                await third
        assert not first.done() and not second.done()
        open_gate(gate)
        await first
        await second
    assert third.cancelled()
    assert not (tmp_path / "c.pt").exists()
    assert (tmp_path / "b.pt").exists()


async def test_done_callback_added_from_another_thread_runs_in_the_owning_loop(
    tmp_path: Path,
) -> None:
    ran: list[tuple[int, int]] = []
    async with AsyncCheckpointQueue() as queue:
        loop_thread = threading.get_ident()
        fut = await queue.schedule(AsyncRequest(write_value, (_state(), str(tmp_path / "a")), []))
        await anyio.to_thread.run_sync(
            fut.add_done_callback, lambda f: ran.append((f.call_idx, threading.get_ident()))
        )
        await fut
        await anyio.sleep(0)  # a callback added after the fact is run soon, by the loop
        late = anyio.Event()
        await anyio.to_thread.run_sync(fut.add_done_callback, lambda f: late.set())
        with anyio.fail_after(10):
            await late.wait()
    assert ran == [(0, loop_thread)]


# -- user code that raises ----------------------------------------------------------------


async def test_on_scheduled_raising_withdraws_that_request_only(tmp_path: Path) -> None:
    seen: list[CheckpointFuture] = []

    def refuse(fut: CheckpointFuture) -> None:
        seen.append(fut)
        raise ValueError("no room in the ledger")

    with anyio.fail_after(60):
        async with AsyncCheckpointQueue() as queue:
            with pytest.raises(ValueError, match="no room in the ledger"):
                await queue.schedule(
                    AsyncRequest(write_value, (_state(), str(tmp_path / "a")), []),
                    on_scheduled=refuse,
                )
            fut = await queue.schedule(
                AsyncRequest(write_value, (_state(), str(tmp_path / "b")), [])
            )
            results = await queue.finalize()
    assert [r.call_idx for r in results] == [fut.call_idx] == [1]
    [withdrawn] = seen
    assert withdrawn.cancelled()
    with pytest.raises(CheckpointCancelledError, match="its on_scheduled callback raised"):
        withdrawn.result()
    assert not (tmp_path / "a").exists() and (tmp_path / "b").exists()
    [kept] = queue.failures()
    error = withdrawn.exception()
    assert (type(kept), str(kept), kept.call_idx) == (type(error), str(error), error.call_idx)


async def test_system_exit_in_a_done_callback_is_raised_at_close_and_kills_no_save(
    tmp_path: Path, gate: str
) -> None:
    order: list[str] = []

    def leave(fut: CheckpointFuture) -> None:
        order.append("leave")
        raise SystemExit(3)

    with pytest.raises(SystemExit) as raised:
        async with AsyncCheckpointQueue() as queue:
            first = await queue.schedule(
                AsyncRequest(write_value, (_state(), str(tmp_path / "a")), [])
            )
            first.add_done_callback(leave)
            first.add_done_callback(lambda f: order.append("next callback"))
            second = await queue.schedule(_gated(tmp_path, gate, "b.pt"))
            await first
            open_gate(gate)
            await second
            order.append("second saved")
    assert raised.value.code == 3
    assert order == ["leave", "next callback", "second saved"]
    assert torch.load(tmp_path / "b.pt", weights_only=True)["w"].tolist() == list(range(8))


class _Escape(BaseException):
    """A BaseException of the user's own, neither an Exception nor a cancellation."""


@pytest.mark.parametrize("kind", [KeyboardInterrupt, GeneratorExit, _Escape])
async def test_keyboard_interrupt_in_a_finalize_step_fails_that_save_only(
    tmp_path: Path, gate: str, kind: type[BaseException]
) -> None:
    def interrupt() -> None:
        raise kind

    with pytest.raises(kind):
        async with AsyncCheckpointQueue() as queue:
            first = await queue.schedule(
                AsyncRequest(write_value, (_state(), str(tmp_path / "a")), [interrupt])
            )
            second = await queue.schedule(_gated(tmp_path, gate, "b.pt"))
            with pytest.raises(FinalizeError, match=f"interrupted by {kind.__name__}"):
                await first
            open_gate(gate)
            result = await second
    assert result.call_idx == 1
    assert (tmp_path / "b.pt").exists()


# -- the service form ---------------------------------------------------------------------


async def test_served_queue_is_used_and_closed_from_other_tasks(tmp_path: Path) -> None:
    results: list[int] = []
    async with anyio.create_task_group() as tg:
        queue: AsyncCheckpointQueue = await tg.start(AsyncCheckpointQueue().serve)

        async def client(name: str) -> None:
            fut = await queue.schedule(
                AsyncRequest(write_value, (_state(), str(tmp_path / name)), [])
            )
            results.append((await fut).call_idx)

        async with anyio.create_task_group() as clients:
            clients.start_soon(client, "a")
            clients.start_soon(client, "b")

        async def closer() -> None:
            await queue.aclose()

        tg.start_soon(closer)
    # serve() returned once another task closed the queue: the task group could end.
    assert sorted(results) == [0, 1]
    assert (tmp_path / "a").exists() and (tmp_path / "b").exists()
    assert queue.pending() == 0


async def test_a_served_manager_holds_its_directory_until_closed(tmp_path: Path) -> None:
    from aiockpt import AsyncCheckpointManager
    from aiockpt._exceptions import DirectoryLockedError

    async with anyio.create_task_group() as tg:
        mgr: AsyncCheckpointManager = await tg.start(AsyncCheckpointManager(tmp_path).serve)
        assert isinstance(mgr, AsyncCheckpointManager)
        with pytest.raises(DirectoryLockedError):  # served: the directory is taken
            await tg.start(AsyncCheckpointManager(tmp_path).serve)

        async def trainer() -> None:
            await (await mgr.save(1, {"w": torch.ones(3)}))
            await mgr.aclose()  # from another task: drains, then serve() returns

        tg.start_soon(trainer)
    assert await mgr.acommitted_steps() == [1]
    async with AsyncCheckpointManager(tmp_path) as again:  # released by the close
        restored = await again.restore()
    assert torch.equal(restored["w"], torch.ones(3))


async def test_a_served_facade_reports_itself(tmp_path: Path) -> None:
    from aiockpt import AsyncTorchCheckpoint

    async with anyio.create_task_group() as tg:
        ckpt: AsyncTorchCheckpoint = await tg.start(AsyncTorchCheckpoint().serve)
        assert isinstance(ckpt, AsyncTorchCheckpoint)
        fut = await ckpt.save({"w": torch.ones(2)}, str(tmp_path / "a.pt"))
        tg.cancel_scope.cancel()  # the group ends: the served facade drains first
    assert fut.done() and fut.exception() is None
    assert torch.equal(torch.load(tmp_path / "a.pt")["w"], torch.ones(2))


async def test_a_manager_opened_twice_keeps_its_directory(tmp_path: Path) -> None:
    # A second serve() of a served manager, or `async with` on it, is refused without
    # touching the lock the running manager holds. Before, the refusal released it.
    from aiockpt import AsyncCheckpointManager, QueueMisuseError
    from aiockpt._exceptions import DirectoryLockedError

    async with anyio.create_task_group() as tg:
        mgr: AsyncCheckpointManager = await tg.start(AsyncCheckpointManager(tmp_path).serve)
        with pytest.raises(QueueMisuseError, match="is open already"):
            await tg.start(mgr.serve)
        with pytest.raises(QueueMisuseError, match="is open already"):
            async with mgr:
                pass
        with pytest.raises(DirectoryLockedError):  # still held by the first
            async with AsyncCheckpointManager(tmp_path):
                pass
        await (await mgr.save(1, {"w": torch.ones(2)}))
        await mgr.aclose()
    assert await mgr.acommitted_steps() == [1]


@pytest.mark.parametrize("anyio_backend", [b for b in BACKENDS if b.id != "trio"])
async def test_a_timeout_while_a_manager_takes_its_lock_releases_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # asyncio's own cancellation (a timeout) while the lock is taken in a thread: the
    # thread finishes, and the lock is released. Before, it stayed held.
    from aiockpt import AsyncCheckpointManager
    from aiockpt._steps import StepDirectory

    taking, go, taken = threading.Event(), threading.Event(), threading.Event()
    real_open = StepDirectory.open

    def slow_open(self: StepDirectory) -> None:
        taking.set()
        go.wait(30)  # a slow network filesystem
        real_open(self)
        taken.set()

    monkeypatch.setattr(StepDirectory, "open", slow_open)

    async def enter() -> None:
        async with AsyncCheckpointManager(tmp_path):
            pass

    task = asyncio.create_task(enter())
    await anyio.to_thread.run_sync(taking.wait, 30)
    task.cancel()
    await asyncio.sleep(0)  # the cancellation reaches the task while the thread works
    go.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    await anyio.to_thread.run_sync(taken.wait, 30)  # the thread did take the lock
    monkeypatch.undo()
    async with AsyncCheckpointManager(tmp_path) as again:  # the lock is free
        assert await again.acommitted_steps() == []


@pytest.mark.parametrize("kind", ["queue", "facade", "manager"])
async def test_aclose_inside_the_block_leaves_it_quietly(tmp_path: Path, kind: str) -> None:
    # aclose() is idempotent, also when the block it is called in ends afterwards.
    # Before, leaving the block raised "has not been entered yet".
    from aiockpt import AsyncCheckpointManager, AsyncTorchCheckpoint

    made: Any = {
        "queue": AsyncCheckpointQueue,
        "facade": AsyncTorchCheckpoint,
        "manager": lambda: AsyncCheckpointManager(tmp_path),
    }[kind]()
    async with made as opened:
        await opened.aclose()
        await opened.aclose()
    queue = made if kind == "queue" else made.queue
    assert queue._state.name == "CLOSED" and queue.failures() == []


async def test_aclose_while_serve_is_opening_closes_once_open(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # aclose() from another task while serve() starts the worker: it waits for the open,
    # then closes, and serve() returns. Before, aclose returned at once and the queue
    # opened anyway, serving forever.
    making, go = threading.Event(), threading.Event()
    real = AsyncCheckpointQueue._make_engine

    def slow_make_engine(self: AsyncCheckpointQueue) -> None:
        making.set()
        go.wait(30)
        real(self)

    monkeypatch.setattr(AsyncCheckpointQueue, "_make_engine", slow_make_engine)
    queue = AsyncCheckpointQueue()
    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            tg.start_soon(queue.serve)
            await anyio.to_thread.run_sync(making.wait, 30)
            closed = anyio.Event()

            async def close() -> None:
                await queue.aclose()
                closed.set()

            tg.start_soon(close)
            await anyio.wait_all_tasks_blocked()
            assert not closed.is_set()  # it waits for the open
            go.set()
    assert closed.is_set() and queue._state.name == "CLOSED"
    assert queue.engine.closed


@pytest.mark.parametrize("anyio_backend", [b for b in BACKENDS if b.id != "trio"])
async def test_leaving_the_block_in_another_task_drains_then_names_serve(
    tmp_path: Path,
) -> None:
    from aiockpt import QueueClosedError, QueueMisuseError

    queue = AsyncCheckpointQueue()

    async def enter() -> None:  # an aiohttp startup hook, a Ray actor's __init__
        await queue.__aenter__()
        await queue.schedule(AsyncRequest(write_value, (_state(), str(tmp_path / "a")), []))

    async def leave() -> None:  # the matching cleanup hook, in another task
        await queue.__aexit__(None, None, None)

    await asyncio.create_task(enter())
    with pytest.raises(QueueMisuseError, match=r"left in another task.*tg.start\("):
        await asyncio.create_task(leave())
    assert (tmp_path / "a").exists()  # drained before saying so
    assert queue.pending() == 0 and queue.failures() == []
    with pytest.raises(QueueClosedError, match="the queue is closed"):
        await queue.schedule(AsyncRequest(write_value, (_state(), str(tmp_path / "b")), []))


def _open_when_draining(queue: AsyncCheckpointQueue, gate: str, limit: float = 60) -> None:
    deadline = time.monotonic() + limit
    while queue._state.name != "DRAINING" and time.monotonic() < deadline:
        time.sleep(0.005)
    open_gate(gate)


async def test_cancelling_a_served_queue_drains_it_first(tmp_path: Path, gate: str) -> None:
    async with anyio.create_task_group() as tg:
        queue: AsyncCheckpointQueue = await tg.start(AsyncCheckpointQueue().serve)
        fut = await queue.schedule(_gated(tmp_path, gate, "a.pt"))
        opener = threading.Thread(target=_open_when_draining, args=(queue, gate))
        opener.start()
        tg.cancel_scope.cancel()  # serve() closes the queue: the save is drained first
    opener.join()
    assert fut.done() and fut.result().value == str(tmp_path / "a.pt")


async def test_failures_stay_readable_after_a_cancel_scope_swallowed_them(
    tmp_path: Path,
) -> None:
    queue = AsyncCheckpointQueue()
    with anyio.move_on_after(30) as scope:
        async with queue:
            await queue.schedule(AsyncRequest(raise_value_error, (_state(), "disk on fire"), []))
            while queue.pending():
                await anyio.sleep(0.01)
            scope.cancel()
            await anyio.sleep_forever()
    assert scope.cancelled_caught
    [failure] = queue.failures()
    assert isinstance(failure, WorkerError) and "disk on fire" in str(failure)
    assert failure.call_idx == 0


# -- memory --------------------------------------------------------------------------------


async def test_nothing_of_a_save_is_held_once_it_is_awaited(tmp_path: Path) -> None:
    async with AsyncTorchCheckpoint() as ckpt:
        for i in range(3):
            state = {"w": torch.full((1024,), float(i))}
            tensor = weakref.ref(state["w"])
            fut = await ckpt.save(state, str(tmp_path / f"{i}.pt"))
            future = weakref.ref(fut)
            await fut
            del state, fut
            gc.collect()
            assert tensor() is None, "the caller's tensor is still referenced"
            assert future() is None, "the awaited future is still referenced"
        assert await ckpt.finalize() == []  # nothing unobserved is left either


class _CopyFails(torch.Tensor):
    """A tensor whose staging copy fails, as a lost device would."""

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if getattr(func, "__name__", "") in ("copy_", "untyped_storage", "detach", "contiguous"):
            raise RuntimeError("device lost")
        return super().__torch_function__(func, types, args, kwargs or {})


async def test_a_kept_staging_error_holds_none_of_the_callers_tensors(tmp_path: Path) -> None:
    from aiockpt import StagingError, TorchCheckpoint

    kept: list[StagingError] = []
    tensors: list[weakref.ref[torch.Tensor]] = []

    def state() -> dict[str, torch.Tensor]:
        sd = {"w": torch.zeros(1024), "bad": torch.zeros(4).as_subclass(_CopyFails)}
        tensors.append(weakref.ref(sd["w"]))
        return sd

    async with AsyncTorchCheckpoint() as ckpt:
        with pytest.raises(StagingError, match="device lost") as info:
            await ckpt.save(state(), str(tmp_path / "a.pt"))
        kept.append(info.value)
        with pytest.raises(StagingError, match="device lost") as info:
            await ckpt.queue.schedule(AsyncRequest(write_value, (state(), str(tmp_path / "b")), []))
        kept.append(info.value)
    blocking = TorchCheckpoint()
    try:
        with pytest.raises(StagingError, match="device lost") as info:
            blocking.async_save(state(), str(tmp_path / "c.pt"))
        kept.append(info.value)
    finally:
        blocking.close()
    del info
    gc.collect()
    assert [t() is None for t in tensors] == [True, True, True]
    assert [e.call_idx for e in kept] == [0, 1, 0]
    assert all("device lost" in "".join(_format(e)) for e in kept)  # still printable


def _format(error: BaseException) -> list[str]:
    import traceback

    return traceback.format_exception(error)


# -- the loop thread does no filesystem work ---------------------------------------------


async def _torch_save(tmp_path: Path) -> None:
    async with AsyncTorchCheckpoint() as ckpt:
        await (await ckpt.save(_state(), str(tmp_path / "a.pt")))


async def _manager_save(tmp_path: Path) -> None:
    async with AsyncCheckpointManager(tmp_path / "m", keep_last=1) as mgr:
        for step in (1, 2):
            await (await mgr.save(step, _state()))


async def _dcp_save(tmp_path: Path) -> None:
    async with AsyncDCPCheckpoint() as ckpt:
        await (await ckpt.save({"w": torch.ones(4)}, str(tmp_path / "d")))


_FILESYSTEM_CALLS = {
    os: ("stat", "lstat", "mkdir", "makedirs", "listdir", "scandir", "open", "rename", "unlink"),
    os.path: ("isdir", "isfile", "exists", "realpath", "abspath"),
}


@pytest.mark.parametrize("save", [_torch_save, _manager_save, _dcp_save])
async def test_the_facades_make_no_filesystem_call_on_the_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, save: Any
) -> None:
    import fcntl

    loop_thread = threading.get_ident()
    on_loop: list[str] = []

    def spy_on(module: Any, name: str) -> None:
        real = getattr(module, name)

        def spy(*args: Any, **kwargs: Any) -> Any:
            if threading.get_ident() == loop_thread:
                on_loop.append(f"{name}({args[0] if args else ''})")
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, spy)

    for module, names in _FILESYSTEM_CALLS.items():
        for name in names:
            spy_on(module, name)
    spy_on(fcntl, "flock")
    await save(tmp_path)
    monkeypatch.undo()
    assert on_loop == []
    assert any(tmp_path.rglob("*")), "nothing was saved"


async def test_a_workers_result_is_unpickled_off_the_loop() -> None:
    # The result's own code (a slow or hostile __reduce__) must not run on the event loop.
    async with AsyncCheckpointQueue() as queue:
        fut = await queue.schedule(AsyncRequest(return_loaded_where, ({"w": torch.ones(2)},), []))
        result = await fut
    assert isinstance(result.value, int)
    assert result.value != threading.get_ident()


async def test_a_kept_failure_never_holds_the_frame_that_awaited_it() -> None:
    # The future raises its error into the caller's frame; the queue keeps the failure
    # (failures()). Before, that kept error's traceback grew the caller's frame, and its
    # state dict stayed alive with it.
    refs: list[weakref.ref[torch.Tensor]] = []

    async def step(queue: AsyncCheckpointQueue) -> None:
        state = {"w": torch.zeros(1 << 16)}
        refs.append(weakref.ref(state["w"]))
        fut = await queue.schedule(AsyncRequest(raise_value_error, (state, "disk on fire"), []))
        with pytest.raises(WorkerError, match="disk on fire"):
            await fut

    async with AsyncCheckpointQueue() as queue:
        await step(queue)
        gc.collect()
        assert [ref() for ref in refs] == [None]
        [failure] = queue.failures()
        assert isinstance(failure, WorkerError) and "disk on fire" in str(failure)


async def test_a_withdrawn_save_lets_go_of_its_tensors_at_once(tmp_path: Path, gate: str) -> None:
    # A lazily scheduled save waits behind others for the stager; it is cancelled and
    # awaited. Before, its state dict stayed held until the stager reached it (here: until
    # the saves ahead of it finished).
    async with AsyncCheckpointQueue() as queue:
        first = await queue.schedule(_gated(tmp_path, gate, "a.pt"))
        second = await queue.schedule(_gated(tmp_path, gate, "b.pt"), wait_for_staging=False)
        state = {"c": torch.ones(1 << 16)}
        ref = weakref.ref(state["c"])
        third = await queue.schedule(
            AsyncRequest(write_value, (state, str(tmp_path / "c")), []), wait_for_staging=False
        )
        assert third.cancel() is True
        with pytest.raises(CheckpointCancelledError, match="withdrawn"):
            await third
        del state, third
        gc.collect()
        assert ref() is None  # while the saves ahead still wait on the gate
        open_gate(gate)
        await first
        await second
    assert not (tmp_path / "c").exists()


async def test_a_dcp_save_cancelled_while_staging_still_guards_its_directory(
    tmp_path: Path, gate: str
) -> None:
    # The first save into `step` is cancelled while it waits to be staged; it still runs
    # (as documented), so a second save into `step` is refused until it is done. Before,
    # the cancelled save was not tracked and the second was accepted.
    target = str(tmp_path / "step")
    async with AsyncDCPCheckpoint() as ckpt:
        await ckpt.queue.schedule(_gated(tmp_path, gate, "a.pt"))  # holds a buffer
        await ckpt.save({"h": torch.ones(1 << 16)}, str(tmp_path / "other"), wait_for_staging=False)
        with anyio.move_on_after(0.5) as scope:  # staging waits for the gate: always cut
            await ckpt.save({"w": torch.full((1 << 16,), 1.0)}, target)
        assert scope.cancelled_caught
        with pytest.raises(InvalidRequestError, match="is still in flight"):
            await ckpt.save({"w": torch.full((1 << 16,), 2.0)}, target)
        open_gate(gate)
        await ckpt.finalize()
    loaded = {"w": torch.zeros(1 << 16)}
    aiockpt.dcp.load(loaded, target)
    assert torch.equal(loaded["w"], torch.full((1 << 16,), 1.0))


def _open_when_closing(queue: AsyncCheckpointQueue, go: threading.Event) -> None:
    deadline = time.monotonic() + 60
    while queue._state.name in ("OPENING", "OPEN") and time.monotonic() < deadline:
        time.sleep(0.005)
    go.set()


async def test_cancelling_a_served_managers_group_as_a_save_begins_cancels_that_save(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The cancellation that closes a served manager reaches a save() building its request;
    # the queue refuses it once closing: the save raises the cancellation, and the group
    # ends quietly. Before, the save raised QueueClosedError out of the task group.
    from aiockpt import AsyncCheckpointManager
    from aiockpt._steps import StepDirectory

    building, go = threading.Event(), threading.Event()
    real_request = StepDirectory.request

    def slow_request(self: StepDirectory, *args: Any) -> Any:
        building.set()
        go.wait(30)
        return real_request(self, *args)

    monkeypatch.setattr(StepDirectory, "request", slow_request)
    outcome: list[str] = []
    async with anyio.create_task_group() as tg:
        mgr: AsyncCheckpointManager = await tg.start(AsyncCheckpointManager(tmp_path).serve)

        async def saver() -> None:
            try:
                await mgr.save(1, {"w": torch.ones(4)})
            except anyio.get_cancelled_exc_class():
                outcome.append("cancelled")
                raise

        tg.start_soon(saver)
        await anyio.to_thread.run_sync(building.wait, 30)
        threading.Thread(target=_open_when_closing, args=(mgr.queue, go)).start()
        tg.cancel_scope.cancel()
    assert outcome == ["cancelled"]
    assert await mgr.acommitted_steps() == []


async def test_a_slow_result_unpickle_does_not_hold_the_loop(tmp_path: Path) -> None:
    # While a result's own code runs (in the collecting thread), the loop still schedules
    # and cancels: the engine's lock is not held across the unpickle. Before, the loop's
    # cancel waited for the lock, so the unpickle was never released (False).
    UNPICKLING.clear()
    RELEASE.clear()
    async with AsyncCheckpointQueue() as queue:
        fut = await queue.schedule(AsyncRequest(return_held_until_released, ({},), []))
        await anyio.to_thread.run_sync(UNPICKLING.wait, 20)
        assert UNPICKLING.is_set()
        path = str(tmp_path / "later.pt")
        later = await queue.schedule(AsyncRequest(sleep_then_save, ({"x": 1}, 0.1, path), []))
        assert later.cancel() is False  # on the loop: the engine says it runs already
        RELEASE.set()
        assert (await fut).value is True
        assert (await later).value == path
    assert torch.load(path) == {"x": 1}


async def test_settling_a_call_on_the_loop_never_unpickles_the_next_calls_result() -> None:
    # Call 0's result is unpickled (slowly) in the collecting thread while call 1's reply
    # arrives; the loop then settles call 0. Before, that settling read call 1's reply,
    # and ran its result's code, on the loop.
    UNPICKLING.clear()
    RELEASE.clear()
    async with AsyncCheckpointQueue() as queue:
        first = await queue.schedule(AsyncRequest(return_held_until_released, ({},), []))
        await anyio.to_thread.run_sync(UNPICKLING.wait, 20)
        second = await queue.schedule(AsyncRequest(return_loaded_where, ({},), []))
        conn = queue.engine._persistent_caller._conn
        assert await anyio.to_thread.run_sync(conn.poll, 30)  # call 1's reply is there
        RELEASE.set()
        assert (await first).value is True
        assert (await second).value != threading.get_ident()


# -- whole programs ------------------------------------------------------------------------

_SERVICE = """
import asyncio, os, sys, time
from aiockpt import AsyncCheckpointQueue, AsyncRequest

def slow_write(path):
    time.sleep(1.5)
    with open(path, "w") as f:
        f.write("data")

def commit(path):
    with open(path + ".committed", "w") as f:
        f.write("ok")

async def service(path, started):
    async with AsyncCheckpointQueue() as queue:
        await queue.schedule(AsyncRequest(slow_write, (path,), [lambda: commit(path)]))
        started.set()
        await asyncio.sleep(3600)

async def main(path):
    started = asyncio.Event()
    asyncio.create_task(service(path, started))
    await started.wait()  # main returns with the save in flight

if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
    print("exited")
"""

_TRIO_CTRL_C = """
import os, signal, sys, threading, time
import trio
from aiockpt import AsyncCheckpointQueue, AsyncRequest

def slow_write(path):
    time.sleep(1.5)
    with open(path, "w") as f:
        f.write("data")

def interrupt_while_closing(queue, times):
    while queue._state.name != "DRAINING":
        time.sleep(0.01)
    for _ in range(times):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.2)

async def main(path, times):
    async with AsyncCheckpointQueue() as queue:
        await queue.schedule(AsyncRequest(slow_write, (path,), []))
        threading.Thread(target=interrupt_while_closing, args=(queue, times)).start()

if __name__ == "__main__":
    try:
        trio.run(main, sys.argv[1], int(sys.argv[2]))
    except KeyboardInterrupt as exc:
        print("KeyboardInterrupt", *getattr(exc, "__notes__", []), sep="\\n")
"""

_TRIO_CTRL_C_IN_POLLER = """
import os, signal, sys, time
import trio
from aiockpt import AsyncCheckpointQueue, AsyncRequest

def interrupted_unpickle():
    # Runs where the queue reads the worker's reply: Ctrl-C arrives right there.
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.5)
    return "value"

class Reply:
    def __reduce__(self):
        return (interrupted_unpickle, ())

def save(path):
    with open(path, "w") as f:
        f.write("data")
    return Reply()

def commit(path):
    with open(path + ".committed", "w") as f:
        f.write("ok")

async def main(path):
    async with AsyncCheckpointQueue() as queue:
        await queue.schedule(AsyncRequest(save, (path,), [lambda: commit(path)]))
        await trio.sleep(30)

if __name__ == "__main__":
    try:
        trio.run(main, sys.argv[1])
    except KeyboardInterrupt:
        print("KeyboardInterrupt")
"""


_TRIO_SERVED_CTRL_C = """
import os, signal, sys, threading, time
import trio
from aiockpt import AsyncCheckpointQueue, AsyncRequest

def slow_write(path):
    time.sleep(1.5)
    with open(path, "w") as f:
        f.write("data")

def interrupt(queue, times):
    os.kill(os.getpid(), signal.SIGINT)  # to trio's main task: the nursery is cancelled
    while queue._state.name != "DRAINING":
        time.sleep(0.01)
    for _ in range(times):  # while the served queue drains in its own task
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.2)

async def main(path, times):
    async with trio.open_nursery() as nursery:
        queue = await nursery.start(AsyncCheckpointQueue().serve)
        await queue.schedule(AsyncRequest(slow_write, (path,), []))
        threading.Thread(target=interrupt, args=(queue, times)).start()
        await trio.sleep_forever()

if __name__ == "__main__":
    try:
        trio.run(main, sys.argv[1], int(sys.argv[2]))
    except BaseExceptionGroup as group:
        print(*(type(exc).__name__ for exc in group.exceptions))
"""


_TRIO_CTRL_C_WHILE_OPENING = """
import os, signal, sys, threading
import trio
from aiockpt import AsyncCheckpointQueue

real = AsyncCheckpointQueue._make_engine
started = threading.Event()

def make_engine_slowly(self):
    started.set()
    os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while the worker is being started
    real(self)
    print("WORKER", self._engine._persistent_caller.process.pid, flush=True)

AsyncCheckpointQueue._make_engine = make_engine_slowly

async def main():
    async with AsyncCheckpointQueue():
        print("BODY RAN", flush=True)
        await trio.sleep(30)

if __name__ == "__main__":
    try:
        trio.run(main)
    except KeyboardInterrupt:
        print("KeyboardInterrupt", flush=True)
"""


def _run(script: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(script), *args], capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_trio_ctrl_c_while_the_queue_opens_leaves_no_worker(tmp_path: Path) -> None:
    script = tmp_path / "trio_opening.py"
    script.write_text(_TRIO_CTRL_C_WHILE_OPENING)
    out = await anyio.to_thread.run_sync(_run, script)
    lines = out.stdout.split("\n")
    assert lines[0].startswith("WORKER") and "KeyboardInterrupt" in lines, out
    assert "BODY RAN" not in out.stdout
    pid = int(lines[0].split()[1])
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_service_task_owning_the_queue_drains_when_asyncio_run_ends(
    tmp_path: Path,
) -> None:
    script = tmp_path / "service.py"
    script.write_text(_SERVICE)
    out = await anyio.to_thread.run_sync(_run, script, str(tmp_path / "ckpt"))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "exited"
    assert (tmp_path / "ckpt").read_text() == "data"
    assert (tmp_path / "ckpt.committed").read_text() == "ok"
    assert "ERROR" not in out.stderr and "Traceback" not in out.stderr, out.stderr


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize("times", [1, 2])
async def test_trio_ctrl_c_while_leaving_the_block_never_hangs(tmp_path: Path, times: int) -> None:
    script = tmp_path / "trio_ctrl_c.py"
    script.write_text(_TRIO_CTRL_C)
    out = await anyio.to_thread.run_sync(_run, script, str(tmp_path / "ckpt"), str(times))
    lines = out.stdout.splitlines()
    assert lines[:1] == ["KeyboardInterrupt"], out.stderr
    if times == 1:  # one Ctrl-C: the close finishes the save, then the interrupt goes on
        assert (tmp_path / "ckpt").read_text() == "data"
        assert lines[1:] == []
    else:  # a second one: the close stops waiting and says which save it gave up
        assert not (tmp_path / "ckpt").exists()
        assert any("interrupted by a second KeyboardInterrupt" in line for line in lines), lines


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_trio_ctrl_c_while_the_queue_reads_a_reply_reaches_the_program_not_the_queue(
    tmp_path: Path,
) -> None:
    script = tmp_path / "trio_poller.py"
    script.write_text(_TRIO_CTRL_C_IN_POLLER)
    out = await anyio.to_thread.run_sync(_run, script, str(tmp_path / "ckpt"))
    assert out.stdout.split() == ["KeyboardInterrupt"], out.stderr
    assert (tmp_path / "ckpt.committed").read_text() == "ok"  # finalized, not broken
    assert "QueueBrokenError" not in out.stderr and "died" not in out.stderr, out.stderr


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize("times", [1, 2])
async def test_trio_ctrl_c_reaches_a_queue_served_in_a_child_task(
    tmp_path: Path, times: int
) -> None:
    script = tmp_path / "trio_served.py"
    script.write_text(_TRIO_SERVED_CTRL_C)
    out = await anyio.to_thread.run_sync(_run, script, str(tmp_path / "ckpt"), str(times))
    # Every Ctrl-C is delivered: the main task's, and each one the draining queue took.
    assert out.stdout.split() == ["KeyboardInterrupt"] * 2, out.stderr
    assert "interrupt again to give up on them" in out.stderr
    if times == 1:  # the first Ctrl-C during the close waits for the save
        assert (tmp_path / "ckpt").read_text() == "data"
        assert "gave up" not in out.stderr
    else:  # a second one stops waiting, and says which save it gave up
        assert not (tmp_path / "ckpt").exists()
        assert "gave up on checkpoint call 0 because it was interrupted by a second " in out.stderr


# -- lazy staging never commits a snapshot changed under it --------------------------------


async def test_a_tensor_changed_before_its_lazy_copy_fails_that_save(
    tmp_path: Path, gate: str
) -> None:
    from aiockpt import StagingError

    state = {"w": torch.zeros(1024), "b": torch.zeros(4)}
    async with AsyncCheckpointQueue() as queue:
        first = await queue.schedule(_gated(tmp_path, gate, "a.pt"))  # holds the buffer
        lazy = await queue.schedule(
            AsyncRequest(wait_then_write, (state, gate, str(tmp_path / "b.pt")), []),
            wait_for_staging=False,
        )
        state["w"].add_(1)  # before `await lazy.staged`: the caller broke the contract
        open_gate(gate)
        with pytest.raises(StagingError, match=r"the tensor at \[0\]\['w'\] was modified"):
            await lazy
        await first
        # Awaiting `staged` before changing the tensors is the contract: that save holds.
        kept = await queue.schedule(
            AsyncRequest(write_value, (state, str(tmp_path / "c")), []), wait_for_staging=False
        )
        await kept.staged
        state["w"].add_(1)
        await kept
    assert not (tmp_path / "b.pt").exists()
    assert queue.failures()[0].call_idx == 1
    with open(tmp_path / "c", "rb") as f:
        assert pickle.load(f)["w"].eq(1).all()  # the values at `staged`, not after


async def test_lazy_copies_racing_in_place_changes_never_commit_a_mixed_snapshot(
    tmp_path: Path,
) -> None:
    from aiockpt import StagingError

    outcomes: list[str] = []
    async with AsyncCheckpointQueue() as queue:
        for run in range(10):
            state = {f"t{i}": torch.zeros(1 << 16) for i in range(32)}
            fut = await queue.schedule(
                AsyncRequest(write_value, (state, str(tmp_path / f"r{run}")), []),
                wait_for_staging=False,
            )
            for tensor in state.values():  # races the copy in the stager thread
                tensor.add_(1)
            try:
                await fut
            except StagingError:
                outcomes.append("refused")
                continue
            with open(tmp_path / f"r{run}", "rb") as f:
                saved = pickle.load(f)
            values = {float(v.min()) for v in saved.values()} | {
                float(v.max()) for v in saved.values()
            }
            outcomes.append("old" if values == {0.0} else f"mixed {sorted(values)}")
    assert all(o in ("refused", "old") for o in outcomes), outcomes


async def test_a_base_exception_from_a_callback_added_after_close_is_raised_there(
    tmp_path: Path,
) -> None:
    async with AsyncCheckpointQueue() as queue:
        fut = await queue.schedule(AsyncRequest(write_value, (_state(), str(tmp_path / "a")), []))
        await fut

    def interrupt(f: CheckpointFuture) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # no open queue is left to hand it to
        fut.add_done_callback(interrupt)


# -- user code raising what the queue itself uses -----------------------------------------


async def test_a_finalize_step_raising_cancelled_error_fails_that_save_at_once(
    tmp_path: Path,
) -> None:
    def cancelled_step() -> None:
        raise asyncio.CancelledError("the step's own")

    with anyio.fail_after(30):  # far below the queue's 10-minute timeout
        async with AsyncCheckpointQueue() as queue:
            fut = await queue.schedule(
                AsyncRequest(write_value, (_state(), str(tmp_path / "a")), [cancelled_step])
            )
            with pytest.raises(
                FinalizeError, match=r"cancelled_step .* interrupted by CancelledError"
            ):
                await fut
            ok = await queue.schedule(
                AsyncRequest(write_value, (_state(), str(tmp_path / "b")), [])
            )
            assert (await ok).call_idx == 1


# asyncio raises SystemExit out of its event loop itself: trio keeps it in the test.
@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_system_exit_from_a_finalize_step_reaches_a_cancelled_service(
    tmp_path: Path,
) -> None:
    def exit_step() -> None:
        raise SystemExit(3)

    with pytest.raises(BaseException) as info:
        async with anyio.create_task_group() as tg:
            queue: AsyncCheckpointQueue = await tg.start(AsyncCheckpointQueue().serve)
            fut = await queue.schedule(
                AsyncRequest(write_value, (_state(), str(tmp_path / "a")), [exit_step])
            )
            with pytest.raises(FinalizeError, match="interrupted by SystemExit"):
                await fut
            tg.cancel_scope.cancel()  # the service ends by cancellation, not aclose()
    raised = getattr(info.value, "exceptions", [info.value])
    assert [type(e) for e in raised] == [SystemExit]
    assert raised[0].code == 3


@pytest.mark.parametrize("anyio_backend", [b for b in BACKENDS if b.id != "trio"])
async def test_aclose_under_an_asyncio_timeout_raises_the_timeout_there(tmp_path: Path) -> None:
    for delay in (0.001, 0.005, 0.01):
        async with anyio.create_task_group() as tg:
            queue: AsyncCheckpointQueue = await tg.start(AsyncCheckpointQueue().serve)
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(delay):
                    await queue.aclose()
                    await asyncio.sleep(1)  # reached only if aclose() beat the timeout
            await asyncio.sleep(0.01)  # no cancellation is left over for this task


@pytest.mark.parametrize("anyio_backend", [b for b in BACKENDS if b.id != "trio"])
async def test_a_manager_save_cut_by_a_timeout_still_settles_its_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with AsyncCheckpointManager(tmp_path / "m") as mgr:
        real = mgr.steps.request

        def slow_request(*args: Any, **kwargs: Any) -> Any:
            time.sleep(0.5)  # the timeout fires while the request is built
            return real(*args, **kwargs)

        monkeypatch.setattr(mgr.steps, "request", slow_request)
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.1):
                await mgr.save(1, _state())
        monkeypatch.undo()
        # Begun, the save was scheduled: it commits, and the step is not left reserved.
        assert [r.call_idx for r in await mgr.finalize()] == [0]
        assert await mgr.acommitted_steps() == [1]
        await (await mgr.save(2, _state()))
        assert await mgr.acommitted_steps() == [1, 2]


async def test_a_task_cancelled_while_the_queue_opens_never_runs_the_block(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if not isinstance(anyio.lowlevel.current_token().native_token, asyncio.AbstractEventLoop):
        pytest.skip("Task.cancel() is asyncio's")
    started, proceed = threading.Event(), threading.Event()
    real = AsyncCheckpointQueue._make_engine

    def held_open(self: AsyncCheckpointQueue) -> None:
        started.set()
        proceed.wait(30)
        real(self)

    monkeypatch.setattr(AsyncCheckpointQueue, "_make_engine", held_open)
    ran: list[str] = []
    engines: list[Any] = []

    async def enter() -> None:
        queue = AsyncCheckpointQueue()
        try:
            async with queue:
                ran.append("body")  # must not run: the task was cancelled while opening
        finally:
            engines.append(queue._engine)

    task = asyncio.create_task(enter())
    assert await anyio.to_thread.run_sync(started.wait, 30)
    task.cancel()
    proceed.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert ran == []
    assert engines[0] is not None and engines[0].closed  # its worker was stopped


_ENTER_THEN_ACLOSE = """
import asyncio, sys, torch
sys.path.insert(0, {tests!r})
from ckpt_helpers import write_value
from aiockpt import AsyncCheckpointQueue, AsyncRequest

async def main():
    queue = AsyncCheckpointQueue()
    await queue.__aenter__()
    fut = await queue.schedule(AsyncRequest(write_value, ({{"w": torch.ones(2)}}, {out!r}), []))
    await fut
    await queue.aclose()
    print("CLOSED", flush=True)

if __name__ == "__main__":
    asyncio.run(main())
"""


def test_entering_then_calling_aclose_in_the_same_task_leaves_nothing_at_loop_end(
    tmp_path: Path,
) -> None:
    script = tmp_path / "enter_then_aclose.py"
    out = tmp_path / "a"
    script.write_text(_ENTER_THEN_ACLOSE.format(tests=str(Path(__file__).parent), out=str(out)))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "CLOSED" in done.stdout
    assert "cancel scope" not in done.stderr and "Traceback" not in done.stderr, done.stderr
    with open(out, "rb") as f:
        assert torch.equal(pickle.load(f)["w"], torch.ones(2))


_DCP_MANAGER_ON_LOOP = """
import asyncio, sys, threading
import torch
from aiockpt import AsyncCheckpointManager

opened_on_loop = []

async def main():
    loop_thread = threading.get_ident()

    def audit(event, args):
        if event == "open" and threading.get_ident() == loop_thread:
            opened_on_loop.append(args[0])

    sys.addaudithook(audit)
    mgr = AsyncCheckpointManager({directory!r}, format="dcp")
    print("CONSTRUCTED", len(opened_on_loop), "torch.distributed.checkpoint" in sys.modules)
    async with mgr:
        print("IMPORTED", "torch.distributed.checkpoint" in sys.modules)

asyncio.run(main())
"""


def test_a_dcp_manager_made_on_the_loop_imports_its_format_in_a_thread(tmp_path: Path) -> None:
    # Importing torch.distributed.checkpoint reads hundreds of files: not on the loop.
    script = tmp_path / "dcp_manager.py"
    script.write_text(_DCP_MANAGER_ON_LOOP.format(directory=str(tmp_path / "ckpts")))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "CONSTRUCTED 0 False" in done.stdout, done.stdout
    assert "IMPORTED True" in done.stdout, done.stdout


def test_a_call_into_a_blocked_loop_gives_up_at_its_bound_and_never_runs_later() -> None:
    from aiockpt._loops import call_in_loop

    loop = asyncio.new_event_loop()
    ready, block, drained = threading.Event(), threading.Event(), threading.Event()
    ran: list[str] = []

    async def capture() -> anyio.lowlevel.EventLoopToken:
        return anyio.lowlevel.current_token()

    token = loop.run_until_complete(capture())

    def blocked() -> None:  # the loop is stuck in user code
        ready.set()
        block.wait(30)

    thread = threading.Thread(target=loop.run_forever)
    loop.call_soon(blocked)
    thread.start()
    try:
        assert ready.wait(30)
        assert call_in_loop(token, lambda: ran.append("late"), 0.5) == (False, None)
        block.set()  # the loop runs again: the call it gave up on must not happen now
        loop.call_soon_threadsafe(drained.set)
        assert drained.wait(30)
        assert ran == []
        assert call_in_loop(token, lambda: ran.append("now") or 7, 30) == (True, 7)
        assert ran == ["now"]
    finally:
        block.set()
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)
        loop.close()


def test_cancel_from_another_thread_gives_up_on_a_blocked_owner_and_the_save_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import aiockpt._futures as futures_module

    monkeypatch.setattr(futures_module, "_CANCEL_WAIT_S", 0.5)
    gate = str(tmp_path / "gate")
    outcome: dict[str, Any] = {}
    scheduled, blocked, release = threading.Event(), threading.Event(), threading.Event()

    async def owner() -> None:
        async with AsyncCheckpointQueue() as queue:
            fut = await queue.schedule(
                AsyncRequest(wait_then_write, ("data", gate, str(tmp_path / "a")), [])
            )
            outcome["fut"] = fut
            scheduled.set()
            blocked.set()
            release.wait(30)  # the owning loop is stuck in user code
            open_gate(gate)
            outcome["result"] = await fut

    thread = threading.Thread(target=lambda: asyncio.run(owner()))
    thread.start()
    try:
        assert scheduled.wait(30) and blocked.wait(30)
        assert outcome["fut"].cancel() is False  # the owner never answered within the bound
    finally:
        release.set()
        thread.join(60)
    assert outcome["result"].call_idx == 0
    assert torch.load(tmp_path / "a", weights_only=True) == "data"


async def test_a_result_whose_unpickling_raises_keyboardinterrupt_fails_that_save_only(
    tmp_path: Path,
) -> None:
    if not isinstance(anyio.lowlevel.current_token().native_token, asyncio.AbstractEventLoop):
        pytest.skip("trio takes KeyboardInterrupt for a Ctrl-C of its own")
    from ckpt_helpers import return_interrupting

    from aiockpt import WorkerError

    with pytest.raises(KeyboardInterrupt, match="while the result was unpickled"):
        async with AsyncCheckpointQueue() as queue:
            first = await queue.schedule(AsyncRequest(write_value, (1, str(tmp_path / "a")), []))
            bad = await queue.schedule(
                AsyncRequest(return_interrupting, ({"w": torch.ones(2)},), [])
            )
            last = await queue.schedule(AsyncRequest(write_value, (2, str(tmp_path / "b")), []))
            assert (await first).call_idx == 0
            with pytest.raises(WorkerError, match=r"could not be unpickled .*KeyboardInterrupt"):
                await bad
            assert (await last).call_idx == 2  # the other saves go on
    for name, value in (("a", 1), ("b", 2)):
        with open(tmp_path / name, "rb") as f:
            assert pickle.load(f) == value
