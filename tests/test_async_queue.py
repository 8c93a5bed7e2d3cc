"""AsyncCheckpointQueue and AsyncTorchCheckpoint under asyncio, uvloop and trio."""

from __future__ import annotations

import os
import threading
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import pytest
import torch
from async_backends import BACKENDS
from ckpt_helpers import (
    kill_self,
    make_gate,
    open_gate,
    raise_value_error,
    wait_then_write,
    write_value,
)

from aiockpt import (
    AsyncCheckpointQueue,
    AsyncRequest,
    AsyncTorchCheckpoint,
    CheckpointErrorGroup,
    CheckpointFuture,
    CheckpointResult,
    QueueClosedError,
    QueueMisuseError,
    StagingError,
    WorkerCrashedError,
    WorkerError,
)


@pytest.fixture(params=BACKENDS)
def anyio_backend(request: pytest.FixtureRequest) -> Any:
    return request.param


pytestmark = pytest.mark.anyio


def saved(path: Path) -> Any:
    return torch.load(path, weights_only=True)


async def test_schedule_returns_staged_and_future_resolves(tmp_path: Path) -> None:
    sd = {"w": torch.arange(256, dtype=torch.float32), "meta": {"step": 3}}
    async with AsyncCheckpointQueue() as queue:
        fut = await queue.schedule(
            AsyncRequest(wait_then_write, (sd, "/dev/null", str(tmp_path / "a.pt")), [])
        )
        assert fut.staged.done() and fut.call_idx == 0
        sd["w"].zero_()
        result = await fut
    assert isinstance(result, CheckpointResult)
    assert result.call_idx == 0 and result.staged_bytes == 256 * 4
    assert result.value == str(tmp_path / "a.pt")
    assert result.stage_seconds >= 0 and result.run_seconds > 0 and result.finalize_seconds >= 0
    assert fut.done() and fut.exception() is None and fut.result() is result
    assert torch.equal(saved(tmp_path / "a.pt")["w"], torch.arange(256, dtype=torch.float32))


async def test_lazy_staging_returns_at_once_and_protects_after_staged(tmp_path: Path) -> None:
    weights = torch.full((500_000,), 1.0)
    async with AsyncCheckpointQueue() as queue:
        fut = await queue.schedule(
            AsyncRequest(
                wait_then_write, ({"w": weights}, "/dev/null", str(tmp_path / "l.pt")), []
            ),
            wait_for_staging=False,
        )
        assert not fut.done()
        await fut.staged
        weights.fill_(2.0)  # the "optimizer step" after the staged point
        await fut
    assert torch.equal(saved(tmp_path / "l.pt")["w"], torch.full((500_000,), 1.0))


async def test_finalize_steps_run_in_order_in_the_callers_process(tmp_path: Path) -> None:
    seen: list[tuple[int, int]] = []
    async with AsyncCheckpointQueue(persistent=False) as queue:
        futs = [
            await queue.schedule(
                AsyncRequest(
                    write_value,
                    (i, str(tmp_path / str(i))),
                    [lambda i=i: seen.append((i, os.getpid()))],
                )
            )
            for i in range(4)
        ]
        results = await queue.finalize()
    assert [r.call_idx for r in results] == [0, 1, 2, 3] == [f.call_idx for f in futs]
    assert seen == [(i, os.getpid()) for i in range(4)]


async def test_worker_failure_raises_from_future_and_finalize(tmp_path: Path) -> None:
    ran: list[int] = []
    async with AsyncCheckpointQueue() as queue:
        ok1 = await queue.schedule(AsyncRequest(write_value, (1, str(tmp_path / "1")), []))
        bad = await queue.schedule(
            AsyncRequest(raise_value_error, ({}, "no space"), [partial(ran.append, 1)])
        )
        ok2 = await queue.schedule(AsyncRequest(write_value, (2, str(tmp_path / "2")), []))
        with pytest.raises(CheckpointErrorGroup, match=r"1 checkpoint failed \(call 1\)") as info:
            await queue.finalize()
        [error] = info.value.exceptions
        assert isinstance(error, WorkerError) and error.call_idx == 1
        assert "no space" in str(error)
        # finalize raised only after every request settled.
        assert ok1.done() and ok2.done() and bad.done()
        assert (await ok2).call_idx == 2
        with pytest.raises(WorkerError, match="no space"):
            await bad
        assert ran == []


async def test_unobserved_failure_is_raised_when_leaving(tmp_path: Path) -> None:
    with pytest.raises(CheckpointErrorGroup) as info:
        async with AsyncCheckpointQueue() as queue:
            await queue.schedule(AsyncRequest(raise_value_error, ({}, "nobody looked"), []))
    [error] = info.value.exceptions
    assert isinstance(error, WorkerError) and "nobody looked" in str(error)
    # An observed failure is not raised twice.
    async with AsyncCheckpointQueue() as queue:
        fut = await queue.schedule(AsyncRequest(raise_value_error, ({}, "seen"), []))
        with pytest.raises(WorkerError):
            await fut


async def test_cancelling_an_awaiter_does_not_cancel_the_checkpoint(tmp_path: Path) -> None:
    gate = make_gate(str(tmp_path), "gate")
    async with AsyncCheckpointQueue() as queue:
        fut = await queue.schedule(
            AsyncRequest(wait_then_write, ({"x": torch.ones(3)}, gate, str(tmp_path / "c.pt")), [])
        )
        cancelled = anyio.Event()

        async def impatient() -> None:
            try:
                await fut
            except anyio.get_cancelled_exc_class():
                cancelled.set()
                raise

        async with anyio.create_task_group() as tg:
            tg.start_soon(impatient)
            await anyio.wait_all_tasks_blocked()
            tg.cancel_scope.cancel()
        assert cancelled.is_set() and not fut.done()
        await anyio.to_thread.run_sync(open_gate, gate)
        result = await fut
        assert result.call_idx == 0
    assert torch.equal(saved(tmp_path / "c.pt")["x"], torch.ones(3))


async def test_many_awaiters_and_out_of_order_awaits(tmp_path: Path) -> None:
    gates = [make_gate(str(tmp_path), f"g{i}") for i in range(3)]
    got: dict[str, int] = {}
    async with AsyncCheckpointQueue(persistent=False, max_staging_copies=3) as queue:
        futs = [
            await queue.schedule(
                AsyncRequest(
                    wait_then_write, ({"i": torch.tensor(i)}, gates[i], str(tmp_path / f"{i}")), []
                )
            )
            for i in range(3)
        ]

        async def waiter(name: str, fut: CheckpointFuture) -> None:
            got[name] = (await fut).call_idx

        async with anyio.create_task_group() as tg:
            for n in range(5):
                tg.start_soon(waiter, f"first-{n}", futs[0])
            tg.start_soon(waiter, "last", futs[2])
            tg.start_soon(waiter, "middle", futs[1])
            await anyio.wait_all_tasks_blocked()
            for gate in reversed(gates):
                await anyio.to_thread.run_sync(open_gate, gate)
        # Out of order: the last one is awaited first, after everything already settled.
        assert (await futs[2]).call_idx == 2 and (await futs[0]).call_idx == 0
    assert got == {**{f"first-{n}": 0 for n in range(5)}, "last": 2, "middle": 1}


async def test_done_callbacks(tmp_path: Path) -> None:
    calls: list[tuple[int, bool]] = []
    async with AsyncCheckpointQueue() as queue:
        fut = await queue.schedule(AsyncRequest(write_value, (1, str(tmp_path / "x")), []))
        fut.add_done_callback(lambda f: calls.append((f.call_idx, f.done())))
        await fut
        fut.add_done_callback(lambda f: calls.append((f.call_idx + 10, f.done())))
    assert calls == [(0, True), (10, True)]


async def test_dead_worker_fails_the_future_and_the_next_save_works(tmp_path: Path) -> None:
    async with AsyncCheckpointQueue() as queue:
        fut = await queue.schedule(AsyncRequest(kill_self, ({},), []))
        with pytest.raises(WorkerCrashedError, match="SIGKILL"):
            await fut
        nxt = await queue.schedule(AsyncRequest(write_value, (9, str(tmp_path / "n")), []))
        assert (await nxt).call_idx == 1


async def test_staging_errors(tmp_path: Path) -> None:
    def broken() -> None:
        raise RuntimeError("cuda lost")

    async with AsyncCheckpointQueue() as queue:
        with pytest.raises(StagingError, match="cuda lost"):
            await queue.schedule(AsyncRequest(write_value, (1, None), [], preload_fn=broken))
        fut = await queue.schedule(
            AsyncRequest(write_value, (1, None), [], preload_fn=broken), wait_for_staging=False
        )
        with pytest.raises(StagingError, match="cuda lost"):
            await fut.staged
        with pytest.raises(StagingError, match="cuda lost"):
            await fut
        ok = await queue.schedule(AsyncRequest(write_value, (3, str(tmp_path / "ok")), []))
        assert (await ok).call_idx == 2  # failed stagings used indices 0 and 1


async def test_misuse_raises_clear_errors(tmp_path: Path) -> None:
    queue = AsyncCheckpointQueue()
    with pytest.raises(QueueMisuseError, match="async with"):
        await queue.schedule(AsyncRequest(None, (), []))
    async with queue:
        with pytest.raises(QueueMisuseError, match=r"await queue\.finalize"):
            queue.maybe_finalize_async_calls(blocking=True)
        with pytest.raises(QueueMisuseError, match=r"await queue\.schedule"):
            queue.schedule_async_request(AsyncRequest(None, (), []))
        errors: list[BaseException] = []

        def from_other_thread() -> None:
            try:
                anyio.run(queue.finalize)
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=from_other_thread)
        thread.start()
        await anyio.to_thread.run_sync(thread.join)
        assert len(errors) == 1 and isinstance(errors[0], QueueMisuseError)
        assert "another thread" in str(errors[0])
    with pytest.raises(QueueClosedError, match="closed"):
        await queue.schedule(AsyncRequest(None, (), []))
    await queue.aclose()  # idempotent


async def test_poller_settles_each_request_once(tmp_path: Path) -> None:
    async with AsyncCheckpointQueue() as queue:
        for i in range(5):
            await queue.schedule(AsyncRequest(write_value, (i, str(tmp_path / str(i))), []))
        await queue.finalize()
        assert queue.polls == 5 and queue.pending() == 0


async def test_async_torch_checkpoint_round_trip(tmp_path: Path) -> None:
    model = torch.nn.Linear(16, 4)
    before = model.weight.detach().clone()
    async with AsyncTorchCheckpoint() as ckpt:
        fut = await ckpt.save({"model": model.state_dict(), "step": 1}, tmp_path / "m.pt")
        with torch.no_grad():
            model.weight.add_(1)
        await fut
        fut2 = await ckpt.save(model.state_dict(), tmp_path / "m2.pt", wait_for_staging=False)
        await fut2.staged
        results = await ckpt.finalize()
    assert [r.call_idx for r in results] == [1]  # the first was awaited: retrieved already
    assert torch.equal(saved(tmp_path / "m.pt")["model"]["weight"], before)
    assert torch.equal(saved(tmp_path / "m2.pt")["weight"], model.weight)


async def test_back_to_back_saves_share_one_staging_buffer(tmp_path: Path) -> None:
    """The second save waits for the buffer (in the stager) while the poller waits for the
    same worker: both must wake when it reports, whichever thread reads the news."""
    for round_ in range(3):
        gate = make_gate(str(tmp_path), f"gate{round_}")
        sd = {"w": torch.full((50_000,), 1.0)}
        async with AsyncCheckpointQueue(max_staging_copies=1) as queue:
            first = await queue.schedule(
                AsyncRequest(wait_then_write, (sd, gate, str(tmp_path / f"a{round_}.pt")), [])
            )
            sd["w"].fill_(2.0)
            second = await queue.schedule(
                AsyncRequest(
                    wait_then_write, (sd, "/dev/null", str(tmp_path / f"b{round_}.pt")), []
                ),
                wait_for_staging=False,
            )
            await anyio.wait_all_tasks_blocked()
            assert not second.staged.done()  # no free buffer until the first is written
            await anyio.to_thread.run_sync(open_gate, gate)
            assert [(await f).call_idx for f in (second, first)] == [1, 0]
        assert torch.equal(saved(tmp_path / f"a{round_}.pt")["w"], torch.full((50_000,), 1.0))
        assert torch.equal(saved(tmp_path / f"b{round_}.pt")["w"], torch.full((50_000,), 2.0))


async def test_another_thread_may_wait_for_a_request_beside_the_poller(tmp_path: Path) -> None:
    gate = make_gate(str(tmp_path), "gate")
    async with AsyncCheckpointQueue() as queue:
        fut = await queue.schedule(
            AsyncRequest(wait_then_write, ({"x": torch.ones(2)}, gate, str(tmp_path / "x.pt")), [])
        )
        call = queue.engine.active[0]
        async with anyio.create_task_group() as tg:
            tg.start_soon(anyio.to_thread.run_sync, queue.engine.wait_local, call, None)
            await anyio.wait_all_tasks_blocked()
            await anyio.to_thread.run_sync(open_gate, gate)
        assert call.outcome is not None and call.outcome.ok
        assert (await fut).call_idx == 0


async def test_save_timeout_fails_a_stuck_save_and_the_queue_goes_on(tmp_path: Path) -> None:
    from aiockpt import SaveTimeoutError

    gate = make_gate(str(tmp_path), "never-opened")
    async with AsyncCheckpointQueue(save_timeout=2.0) as queue:
        stuck = await queue.schedule(
            AsyncRequest(wait_then_write, (1, gate, str(tmp_path / "a")), [])
        )
        with pytest.raises(SaveTimeoutError, match=r"call 0 .* save_timeout=2.0s"):
            await stuck
        fut = await queue.schedule(AsyncRequest(write_value, (2, str(tmp_path / "b")), []))
        assert (await fut).call_idx == 1
    assert not (tmp_path / "a").exists()
    assert (tmp_path / "b").exists()
