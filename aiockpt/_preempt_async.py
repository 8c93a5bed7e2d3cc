"""The async twin of :class:`aiockpt.Preemption` (design in ``_preempt``): the same
question, plan and exit, awaited; no wait for a peer or a collective runs on the event
loop."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from types import TracebackType
from typing import Any, NoReturn

import anyio.to_thread

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup

from ._exceptions import CheckpointError, Preempted
from ._futures import CheckpointFuture
from ._manager import AsyncCheckpointManager
from ._preempt_agree import Pending, Plan, state_nbytes
from ._preempt_base import PreemptionBase, Tracked


async def _wait(pending: Pending) -> None:
    if not pending.done():
        await anyio.to_thread.run_sync(pending.wait)
    else:
        pending.wait()  # raises the reduction's error, if it failed


def _cancelled(exc: BaseException) -> bool:
    """asyncio's or trio's cancellation (looked at outside any event loop)."""
    return isinstance(exc, asyncio.CancelledError) or type(exc).__name__ == "Cancelled"


def _only_preempted(group: BaseExceptionGroup[BaseException]) -> Preempted | None:
    """The Preempted in ``group`` if nothing else is there (cancellations aside)."""
    preempted, rest = group.split(Preempted)
    if preempted is None:
        return None
    if rest is not None and rest.split(_cancelled)[1] is not None:
        return None
    leaf: BaseException = preempted
    while isinstance(leaf, BaseExceptionGroup):
        leaf = leaf.exceptions[0]
    assert isinstance(leaf, Preempted)
    return leaf


class AsyncPreemption(PreemptionBase):
    """:class:`Preemption` for async loops and an :class:`AsyncCheckpointManager`::

        async with AsyncCheckpointManager("ckpts") as mgr:
            async with AsyncPreemption(mgr, grace=30.0) as pre:
                while step < total:
                    if await pre.preempted():
                        await pre.save_and_exit(step, state_dict)   # never returns
                    ...                                             # one training step
                    if step % 100 == 0:
                        await pre.save(step, state_dict)

    The arguments are :class:`Preemption`'s. The event loop must run in the main thread
    (signal handlers are installed there). Await :meth:`preempted` exactly once per step
    on every rank; save through :meth:`save` (it times the saves for the last one).
    """

    manager: AsyncCheckpointManager

    def __init__(
        self,
        manager: AsyncCheckpointManager,
        grace: float = 30.0,
        signals: Sequence[int] = (signal.SIGTERM,),
        *,
        lag: int = 1,
        chain: bool = True,
    ) -> None:
        super().__init__(manager, grace, signals, lag=lag, chain=chain)

    @staticmethod
    @contextlib.contextmanager
    def unwrap_preempted() -> Iterator[None]:
        """Raise, bare, a :class:`Preempted` that a task group (or trio nursery) wrapped
        in an exception group, so that the process exits with status 75, not 1::

            with AsyncPreemption.unwrap_preempted():
                asyncio.run(main())      # or anyio.run(main), trio.run(main)

        A group holding other errors too is raised as it is."""
        try:
            yield
        except BaseExceptionGroup as group:
            preempted = _only_preempted(group)
            if preempted is None:
                raise
            raise preempted from None

    async def __aenter__(self) -> AsyncPreemption:
        group = await anyio.to_thread.run_sync(self._make_group)
        self._install(group)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if exc is None and self._agreement is not None:
                for pending in self._agreement.drain():
                    await _wait(pending)
        finally:
            self._uninstall()

    async def preempted(self) -> bool:
        """The step's question (see :attr:`Preemption.preempted`): True once every rank
        knows of a signal, on every rank at the same step. Await it once per step."""
        pending = self._ask()
        if pending is not None:
            await _wait(pending)
            self._answer(pending)
        return self._verdict is not None

    async def save(
        self,
        step: int,
        state_dict: Any,
        extra: dict[str, Any] | None = None,
        *,
        wait_for_staging: bool = True,
    ) -> CheckpointFuture:
        """:meth:`AsyncCheckpointManager.save`, timed (for the last save's plan)."""
        self._check_open()
        tracked = Tracked(step, time.monotonic(), state_nbytes(state_dict))
        fut = await self.manager.save(step, state_dict, extra, wait_for_staging=wait_for_staging)
        self._tracked[fut.call_idx] = tracked
        fut.add_done_callback(self._done)
        return fut

    def _done(self, fut: CheckpointFuture) -> None:
        # Looks at the outcome without observing it: a failure is still the owner's.
        self._settled(fut.call_idx, committed=fut.succeeded_result() is not None)

    async def save_and_exit(
        self, step: int, state_dict: Any, extra: dict[str, Any] | None = None
    ) -> NoReturn:
        """:meth:`Preemption.save_and_exit`, awaited: save ``step`` if there is time, wait
        for every save to commit, raise :class:`Preempted` (exit status 75). The manager
        is left open: leaving its ``async with`` (or its ``serve`` task group) closes it."""
        for pending in self._begin_final(step):
            await _wait(pending)
        try:
            latest_before = await self.manager.alatest_step()
            values = self._local_plan(step, state_nbytes(state_dict), latest_before)
            plan: Plan = await anyio.to_thread.run_sync(self._plan, values)
            error = await self._last_save(plan, state_dict, extra)
            try:
                await self.manager.finalize()
            except CheckpointError as err:  # every save has settled when it raises
                self._save_failed(err)
                error = error or err
            # Not aclose(): the manager's task group belongs to the scope it was entered
            # (or served) in, which the loop's scopes may nest inside; its own exit, which
            # Preempted passes through, closes it, with every save committed by then.
            latest = await self.manager.alatest_step()
        finally:
            self._watchdog.disarm()
        raise self._finish(plan, latest_before, latest, error)

    async def _last_save(
        self, plan: Plan, state_dict: Any, extra: dict[str, Any] | None
    ) -> CheckpointError | None:
        if plan.action != "save":
            return None
        try:
            await self.save(plan.step, state_dict, extra)
        except CheckpointError as err:
            self._save_failed(err)
            return err
        return None
