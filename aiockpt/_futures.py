"""The awaitable handle of one scheduled checkpoint, and the result it resolves to."""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

import anyio

from ._exceptions import CheckpointError


@dataclass(frozen=True)
class CheckpointResult:
    """What a finalized checkpoint reports.

    ``value`` is what the request's ``async_fn`` returned in the worker; the ``*_seconds``
    fields time staging (the caller's copy), running (the worker) and the finalize steps.
    """

    call_idx: int
    staged_bytes: int
    stage_seconds: float
    run_seconds: float
    finalize_seconds: float
    value: Any = None


class _StagedPoint:
    """``await fut.staged``: resolves once the request's tensors are copied."""

    def __init__(self, future: CheckpointFuture) -> None:
        self._future = future

    def done(self) -> bool:
        return self._future._staged.is_set()

    def __await__(self) -> Generator[Any, None, None]:
        return self._future._wait_staged().__await__()


class CheckpointFuture:
    """A scheduled checkpoint. ``await fut`` returns its :class:`CheckpointResult` once it
    is finalized (on every rank), or raises the :class:`CheckpointError` explaining why not.

    Any number of tasks may await it, in any order; cancelling one of them cancels only
    that wait, never the checkpoint. ``await fut.staged`` resolves as soon as the tensors are
    staged, after which the caller may modify them.
    """

    def __init__(self, call_idx: int) -> None:
        self.call_idx = call_idx
        self.staged = _StagedPoint(self)
        self._staged = anyio.Event()
        self._done = anyio.Event()
        self._staging_error: CheckpointError | None = None
        self._result: CheckpointResult | None = None
        self._error: CheckpointError | None = None
        self._callbacks: list[Callable[[CheckpointFuture], object]] = []
        self._observed = False  # someone has seen the outcome (result, exception, await)

    def done(self) -> bool:
        """True once the checkpoint is finalized or has failed."""
        return self._done.is_set()

    def result(self) -> CheckpointResult:
        """The result of a finished checkpoint; raises its error if it failed.

        Raises ``RuntimeError`` if it is not finished yet (await the future instead)."""
        if not self.done():
            raise RuntimeError(f"checkpoint call {self.call_idx} is not finished yet")
        self._observed = True
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result

    def exception(self) -> CheckpointError | None:
        """The error of a failed checkpoint, None if it succeeded (RuntimeError if pending)."""
        if not self.done():
            raise RuntimeError(f"checkpoint call {self.call_idx} is not finished yet")
        self._observed = True
        return self._error

    def add_done_callback(self, fn: Callable[[CheckpointFuture], object]) -> None:
        """Call ``fn(future)`` in the event loop's thread when the future is done (at once
        if it already is)."""
        if self.done():
            fn(self)
        else:
            self._callbacks.append(fn)

    def __await__(self) -> Generator[Any, None, CheckpointResult]:
        return self._wait().__await__()

    async def _wait(self) -> CheckpointResult:
        await self._done.wait()
        return self.result()

    async def _wait_staged(self) -> None:
        await self._staged.wait()
        if self._staging_error is not None:
            raise self._staging_error

    def __repr__(self) -> str:
        state = "pending"
        if self.done():
            state = "failed" if self._error is not None else "finalized"
        elif self.staged.done():
            state = "staged"
        return f"<CheckpointFuture call_idx={self.call_idx} {state}>"

    # -- resolution, called by the queue in the event loop's thread -----------------------

    def _set_staged(self, error: CheckpointError | None = None) -> None:
        self._staging_error = error
        self._staged.set()

    def _resolve(self, result: CheckpointResult | None, error: CheckpointError | None) -> None:
        if self.done():
            return
        self._result, self._error = result, error
        if not self._staged.is_set():
            self._set_staged(error)
        self._done.set()
        callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:
            fn(self)
