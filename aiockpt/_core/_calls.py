"""The life of one scheduled request, in one place.

    STAGING ──► SENT ──► REPORTED ──► SETTLED ──► FINALIZED
       │          │          │           │
       └──────────┴──────────┴───────────┴──────► FAILED

- STAGING: its tensors are being copied; it holds a staging lease.
- SENT: its worker runs it; the lease is still held (the worker reads the buffers).
- REPORTED: the worker reported (or died); the lease is given back at this transition and
  at no other.
- SETTLED: every rank agreed it succeeded; its finalize steps may run.
- FINALIZED / FAILED: terminal. A call can fail before its worker reports (a completion
  check that could not agree, a staging error): it then keeps its lease until the report.

The engine is the only writer of these states; every transition checks where it comes from.
"""

from __future__ import annotations

import enum
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .._exceptions import CheckpointError
from .._request import LocalOutcome


class CallState(enum.Enum):
    STAGING = "staging"
    SENT = "sent"
    REPORTED = "reported"
    SETTLED = "settled"
    FINALIZED = "finalized"
    FAILED = "failed"


_TERMINAL = (CallState.FINALIZED, CallState.FAILED)


def describe_target(fn: Any, args: tuple[Any, ...]) -> str:
    """A short name for what a request writes: its first path argument, else its function."""
    for arg in args:
        if isinstance(arg, str | os.PathLike):
            return repr(os.fspath(arg))
    name = getattr(fn, "__qualname__", None) or getattr(
        getattr(fn, "fn", None), "__qualname__", None
    )
    return f"function {name}" if name else "no path"


@dataclass(eq=False)
class Call:
    """One scheduled request: what finalizing it needs, and where it is in its life.

    It keeps the finalize steps and a description of its target, never the caller's
    tensors: those are dropped once staged.
    """

    call_idx: int
    finalize_fns: list[Callable[..., Any]]
    target: str
    needs_global: bool
    release_lease: Callable[[int], None]
    scheduled_at: float = field(default_factory=time.time)
    state: CallState = CallState.STAGING
    caller: Any = None
    staged_bytes: int = 0
    stage_seconds: float = 0.0
    sent_at: float | None = None  # time.monotonic() when its worker got it
    outcome: LocalOutcome | None = None
    error: CheckpointError | None = None
    error_raised: bool = False  # its error already reached the user (at schedule)
    timed_out: bool = False  # its worker was killed for passing the save deadline
    timed_out_unstarted: bool = False  # killed (deadline or close) before its worker began it
    leased: bool = True

    def _move(self, allowed: tuple[CallState, ...], to: CallState) -> None:
        if self.state not in allowed:
            raise RuntimeError(
                f"checkpoint call {self.call_idx} cannot go from {self.state.value} to {to.value}"
            )
        self.state = to

    def _give_back(self) -> None:
        if self.leased:
            self.leased = False
            self.release_lease(self.call_idx)

    @property
    def terminal(self) -> bool:
        return self.state in _TERMINAL

    @property
    def awaiting_report(self) -> bool:
        """Its worker still runs it (whatever the completion checks decided meanwhile)."""
        return self.sent_at is not None and self.outcome is None

    def sent(self, caller: Any, stage_seconds: float, staged_bytes: int) -> None:
        self._move((CallState.STAGING,), CallState.SENT)
        self.caller, self.stage_seconds, self.staged_bytes = caller, stage_seconds, staged_bytes
        self.sent_at = time.monotonic()

    def reported(self, outcome: LocalOutcome) -> None:
        """The worker reported or died: the lease goes back whatever state the call is in."""
        if self.outcome is not None:
            return
        self.outcome = outcome
        self._give_back()
        if self.state is CallState.SENT:
            self.state = CallState.REPORTED

    def local_outcome(self) -> LocalOutcome | None:
        """This rank's outcome, as the completion check sees it."""
        if self.outcome is not None:
            return self.outcome
        if self.state is CallState.FAILED and self.error is not None:
            return LocalOutcome(self.call_idx, error=self.error)
        return None

    def settled(self) -> None:
        self._move((CallState.REPORTED,), CallState.SETTLED)

    def finalized(self) -> None:
        self._move((CallState.SETTLED,), CallState.FINALIZED)

    def failed(self, error: CheckpointError) -> None:
        """Fail the call (from any live state); it keeps its lease while its worker runs."""
        if self.terminal:
            return
        self.state, self.error = CallState.FAILED, error
        if self.sent_at is None:  # never reached a worker: nothing reads its buffers
            self._give_back()
