"""What the blocking and the async preemption handlers share (see ``_preempt``): the
signals, the deadline, the per-step question, the plan of the last save and its report."""

from __future__ import annotations

import logging
import math
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from ._dist import DEFAULT_TIMEOUT
from ._exceptions import CheckpointError, InvalidRequestError, Preempted, QueueMisuseError
from ._preempt_agree import (
    Agreement,
    Pending,
    Plan,
    Timing,
    Verdict,
    decide,
    describe_outcome,
    plan_values,
    read_verdict,
    reduce_now,
)
from ._preempt_signals import SignalCatcher, Watchdog, end_at_deadline, signal_name
from ._ranks import get_rank, is_distributed

logger = logging.getLogger("aiockpt")
MAX_GRACE_S = 7 * 24 * 3600.0  # no scheduler waits longer (math.inf overflows the timers)


@dataclass
class Tracked:
    """A save made through the handler, until it settles: its step, when it was asked
    for (``time.monotonic()``) and its size."""

    step: int
    since: float
    nbytes: int


class PreemptionBase:
    """The state both handlers share; see :class:`aiockpt.Preemption`."""

    EXIT_CODE = Preempted.EXIT_CODE

    def __init__(
        self,
        manager: Any,
        grace: float = 30.0,
        signals: Sequence[int] = (signal.SIGTERM,),
        *,
        lag: int = 1,
        chain: bool = True,
    ) -> None:
        if (
            isinstance(grace, bool)
            or not isinstance(grace, int | float)
            or not math.isfinite(grace)
            or not 0 < grace <= MAX_GRACE_S
        ):
            raise InvalidRequestError(
                f"grace must be a positive number of seconds, at most {MAX_GRACE_S:.0f} (a "
                f"week), not {grace!r}"
            )
        if isinstance(lag, bool) or not isinstance(lag, int) or lag < 1:
            raise InvalidRequestError(f"lag must be an int of at least 1, not {lag!r}")
        self.manager = manager
        self.grace = float(grace)
        self.lag = lag
        self._catcher = SignalCatcher(signals, chain)
        self._watchdog = Watchdog(self._expire)
        self._agreement: Agreement | None = None
        self._verdict: Verdict | None = None
        self._noticed = False
        self._deadline: float | None = None  # time.monotonic()
        self._timing = Timing()
        self._tracked: dict[int, Tracked] = {}  # call index -> save in flight
        self._final_step: int | None = None
        self._state = "new"

    # -- what the loop may look at ------------------------------------------------------

    @property
    def signals(self) -> tuple[int, ...]:
        """The signals handled."""
        return self._catcher.signals

    @property
    def received(self) -> bool:
        """Whether this rank got one of the signals (the agreed answer is ``preempted``)."""
        return self._catcher.first is not None

    @property
    def deadline(self) -> float | None:
        """When the job will be killed (``time.monotonic()``), once known on this rank."""
        return self._deadline

    def time_left(self) -> float | None:
        """Seconds to the deadline, once known on this rank (None before)."""
        return None if self._deadline is None else self._deadline - time.monotonic()

    # -- life ---------------------------------------------------------------------------

    def _group_timeout(self) -> timedelta:
        options = getattr(getattr(self.manager, "queue", None), "options", None)
        timeout = getattr(options, "timeout", None)
        return timeout if isinstance(timeout, timedelta) else DEFAULT_TIMEOUT

    def _make_group(self) -> Any:
        """The group the question reduces over (collective: every rank makes it)."""
        if self._state != "new":
            raise QueueMisuseError("a Preemption can be entered only once; create a new one")
        if not is_distributed():
            return None
        return dist.new_group(backend="gloo", timeout=self._group_timeout())

    def _install(self, group: Any) -> None:
        self._catcher.install()
        self._agreement = Agreement(group, self.lag) if group is not None else None
        self._state = "open"

    def _uninstall(self) -> None:
        self._catcher.restore()
        self._watchdog.disarm()
        self._state = "closed"
        signum = self._catcher.unforwarded() if self._verdict is None else None
        if signum is not None:  # the block ended before the loop heard of it: pass it on
            logger.warning(
                "preemption (rank %d): %s came before the block ended and was never "
                "answered: delivering it to the handler found before",
                get_rank(),
                signal_name(signum),
            )
            signal.raise_signal(signum)

    def _check_open(self) -> None:
        if self._state != "open":
            raise QueueMisuseError(
                "the Preemption is not open: use `with Preemption(manager) as pre:` (`async "
                "with AsyncPreemption(...)`) around the training loop"
            )

    # -- the question -------------------------------------------------------------------

    def _ask(self) -> Pending | None:
        """Launch this step's reduction; return the one due now (None: nothing to wait)."""
        self._check_open()
        self._notice()
        if self._verdict is not None:
            return None
        first = self._catcher.first
        if self._agreement is None:  # one process: its own signal is the answer
            if first is not None:
                self._agree(Verdict(0, first.wall + self.grace, get_rank(), first.signum))
            return None
        return self._agreement.ask(first, self.grace)

    def _answer(self, pending: Pending) -> None:
        if self._agreement is not None:
            self._agreement.answered()
        verdict = read_verdict(pending)
        if verdict is not None and self._verdict is None:
            self._agree(verdict)

    def _notice(self) -> None:
        first = self._catcher.first
        if first is None or self._noticed:
            return
        self._noticed = True
        self._set_deadline(first.monotonic + self.grace)
        logger.warning(
            "preemption (rank %d): %s received; the job will be killed in %.1fs: the ranks "
            "agree on a step, save it and exit",
            get_rank(),
            first.name,
            self.grace,
        )

    def _agree(self, verdict: Verdict) -> None:
        self._verdict = verdict
        self._set_deadline(time.monotonic() + (verdict.deadline_wall - time.time()))
        logger.warning(
            "preemption (rank %d): every rank knows of %s (first received on rank %d); "
            "%.1fs left to save",
            get_rank(),
            signal_name(verdict.signum),
            verdict.first_rank,
            self.time_left() or 0.0,
        )

    def _set_deadline(self, deadline: float) -> None:
        if self._deadline is None or deadline < self._deadline:
            self._deadline = deadline
        self._watchdog.arm(self._deadline)

    # -- saves made through the handler ------------------------------------------------

    def _settled(self, idx: int, committed: bool) -> int | None:
        """Forget save ``idx``; if it committed, time it. Returns its step."""
        tracked = self._tracked.pop(idx, None)
        if tracked is None:
            return None
        if committed:
            self._timing.record(tracked.nbytes, time.monotonic() - tracked.since)
        return tracked.step

    # -- the last save ------------------------------------------------------------------

    def _begin_final(self, step: int) -> list[Pending]:
        self._check_open()
        if self._verdict is None:
            raise QueueMisuseError(
                "save_and_exit is for a preempted job: call it once `preempted` answered True "
                "(it does on every rank at the same step)"
            )
        if self._final_step is not None:
            raise QueueMisuseError("save_and_exit was called already")
        self._catcher.final = True  # from here on a signal is counted, never chained
        self._final_step = step
        return self._agreement.drain() if self._agreement is not None else []

    def _local_plan(self, step: int, nbytes: int, latest: int | None) -> list[int]:
        now = time.monotonic()
        in_flight = list(self._tracked.values())
        newest = max([-1 if latest is None else latest, *(t.step for t in in_flight)])
        needs_save = step > newest
        predicted = self._timing.predict(nbytes) if needs_save else 0.0
        remaining = sum(
            max(0.0, (self._timing.predict(t.nbytes) or 0.0) - (now - t.since)) for t in in_flight
        )
        left = self.time_left()
        return plan_values(step, needs_save, predicted, remaining, 0.0 if left is None else left)

    def _plan(self, values: list[int]) -> Plan:
        if self._agreement is not None:
            values = reduce_now(self._agreement.group, values, "planning the last save")
        plan = decide(values)
        what = {"save": "saving step", "wait": "waiting for step", "skip": "not saving step"}
        logger.warning(
            "preemption (rank %d): %s %d: %s",
            get_rank(),
            what[plan.action],
            plan.step,
            plan.reason,
        )
        return plan

    def _save_failed(self, error: CheckpointError) -> None:
        logger.warning(
            "preemption (rank %d): a save failed during the last save: %s",
            get_rank(),
            str(error).splitlines()[0] if str(error) else type(error).__name__,
        )

    def _finish(
        self,
        plan: Plan,
        latest_before: int | None,
        latest: int | None,
        error: CheckpointError | None,
    ) -> Preempted:
        """Report the outcome (and the signals met meanwhile); the exception to raise."""
        assert self._verdict is not None
        verdict = self._verdict
        seconds = time.time() - (verdict.deadline_wall - self.grace)
        left = self.time_left() or 0.0
        outcome, saved, message = describe_outcome(
            plan,
            latest_before,
            latest,
            error,
            verdict,
            seconds=seconds,
            left=left,
            during_final=self._catcher.during_final,
            exit_code=self.EXIT_CODE,
        )
        logger.warning("preemption (rank %d): %s", get_rank(), message)
        return Preempted(
            message,
            agreed_step=plan.step,
            saved_step=saved,
            latest_step=latest,
            outcome=outcome,
            signal=signal_name(verdict.signum),
            seconds=seconds,
        )

    def _expire(self) -> None:
        """The deadline passed (in the watchdog's thread): see :func:`end_at_deadline`."""
        end_at_deadline(self.manager, self.grace, self._final_step, self.EXIT_CODE)
