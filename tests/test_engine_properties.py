"""Property-based tests of the engine's ordering, with in-process fake callers.

Any interleaving of scheduling (some of which fails while staging), workers completing in
any order (successfully or not) and non-blocking polls must give: finalize steps in FIFO
order, each at most once, never for a failed request; every request resolved exactly once
(finalized, or its error raised once); every staging lease given back.
"""

from __future__ import annotations

import threading
from typing import Any

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aiockpt import AsyncRequest, CheckpointError, CheckpointQueue, QueueOptions, StagingError
from aiockpt._core._callers import AsyncCaller
from aiockpt._core._engine import CallsEngine
from aiockpt._request import LocalOutcome
from aiockpt._staging._arena import StagingBuffers


class FakeCaller(AsyncCaller):
    """Runs nothing: the test decides when and how each call finishes."""

    def __init__(self, board: dict[int, FakeCaller]) -> None:
        super().__init__()
        self.board = board
        self.running: list[int] = []
        self.news: list[LocalOutcome] = []

    def run(
        self, call_idx: int, fn: Any, args: Any, kwargs: Any, buffers: StagingBuffers | None
    ) -> None:
        self.running.append(call_idx)
        self.board[call_idx] = self

    def finish(self, call_idx: int, ok: bool) -> None:
        self.running.remove(call_idx)
        error = None if ok else CheckpointError(f"call {call_idx} failed", call_idx=call_idx)
        self.news.append(LocalOutcome(call_idx, error=error, result=call_idx))

    def wait_objects(self) -> list[Any]:
        return []

    def collect(self) -> list[LocalOutcome]:
        news, self.news = self.news, []
        return news

    def in_flight(self) -> list[int]:
        return list(self.running)

    def running_since(self, call_idx: int) -> float | None:
        return None

    def kill(self) -> None:
        pass

    def shutdown(self, grace: float = 0.0) -> list[LocalOutcome]:
        return []


def _queue(board: dict[int, FakeCaller]) -> CheckpointQueue:
    queue = CheckpointQueue.__new__(CheckpointQueue)
    queue._finalizing = threading.Lock()
    queue._engine = CallsEngine(
        QueueOptions(persistent=False, max_staging_copies=64),
        caller_factory=lambda: FakeCaller(board),
    )
    return queue


def _broken_preload() -> Any:
    raise RuntimeError("staging failed (generated)")


OPS = st.lists(
    st.one_of(
        st.tuples(st.just("schedule"), st.booleans(), st.booleans()),  # tensors?, staging ok?
        st.tuples(st.just("finish"), st.integers(0, 30), st.booleans()),  # which running, ok?
        st.tuples(st.just("poll"), st.just(False), st.just(False)),
    ),
    max_size=40,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(OPS)
def test_any_interleaving_finalizes_in_order_exactly_once(ops: list[Any]) -> None:
    board: dict[int, FakeCaller] = {}
    queue = _queue(board)
    engine = queue._engine
    finalized: list[int] = []  # finalize steps, in the order they ran
    raised: list[int] = []  # call indices whose error reached the user
    outcome: dict[int, bool] = {}  # what the worker reported (True: ok)
    staging_failed: set[int] = set()

    def poll(blocking: bool = False) -> None:
        while True:
            try:
                queue.maybe_finalize_async_calls(blocking=blocking)
                return
            except CheckpointError as err:
                assert err.call_idx is not None
                raised.append(err.call_idx)

    try:
        for op, a, b in ops:
            if op == "schedule":
                idx = engine.call_idx + 1
                args = ({"w": torch.ones(4)} if a else {}, "target")
                request = AsyncRequest(
                    None,
                    args,
                    [lambda idx=idx: finalized.append(idx)],
                    preload_fn=None if b else _broken_preload,
                    preload_arg_index=0,
                )
                try:
                    assert queue.schedule_async_request(request) == idx
                except StagingError as err:
                    assert err.call_idx == idx and not b
                    staging_failed.add(idx)
            elif op == "finish":
                running = sorted(i for c in set(board.values()) for i in c.running)
                if running:
                    idx = running[a % len(running)]
                    board[idx].finish(idx, b)
                    outcome[idx] = b
            else:
                poll()
        for caller in set(board.values()):
            for idx in list(caller.running):
                caller.finish(idx, True)
                outcome[idx] = True
        poll()
        scheduled = set(range(engine.call_idx + 1))
        # FIFO, at most once, never for a failure.
        assert finalized == sorted(finalized) and len(set(finalized)) == len(finalized)
        assert set(finalized) == {i for i, ok in outcome.items() if ok}
        # Every request resolved exactly once: finalized, or raised (at schedule or after).
        assert sorted(raised) == sorted(set(raised))
        assert set(raised) == {i for i, ok in outcome.items() if not ok}
        assert set(finalized) | set(raised) | staging_failed == scheduled
        assert not (set(finalized) & (set(raised) | staging_failed))
        assert queue.get_num_unfinalized_calls() == 0 and not engine.active
        assert engine.buffers.leased() == []
    finally:
        engine.stop_workers(timeout=0)
