"""How the ranks agree (see ``_preempt`` for the design): the per-step question, answered
from a non-blocking all-reduce launched ``lag`` questions earlier, and the one blocking
reduction that plans the last save. Also the timing of earlier saves the plan rests on.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ._exceptions import DistributedCheckpointError
from ._preempt_signals import Received, signal_name
from ._ranks import get_rank
from ._staging._tree import iter_tensors

_NONE = 2**62  # "no deadline" / "no rank" in a MAX reduction of negated values
SAFETY = 1.25  # a new save must fit in the time left with this factor on its prediction
MARGIN_S = 1.0  # ... and this much to spare (finalize, exit)


def state_nbytes(state_dict: Any) -> int:
    """The bytes of every tensor in ``state_dict`` (what a save stages and writes)."""
    return sum(t.numel() * t.element_size() for t in iter_tensors(state_dict))


@dataclass(frozen=True)
class Verdict:
    """What every rank learned, alike: question ``question``'s reduction found a signal."""

    question: int
    deadline_wall: float  # the earliest deadline of the ranks that got a signal (time.time)
    first_rank: int  # the lowest rank that got one
    signum: int


class Pending:
    """One launched reduction: question ``question``'s flags, reduced in the background."""

    def __init__(self, question: int, work: Any, values: torch.Tensor) -> None:
        self.question, self.work, self.values = question, work, values
        self._lock = threading.Lock()
        self._waited = False
        self._error: Exception | None = None

    def done(self) -> bool:
        return bool(self.work.is_completed())

    def wait(self) -> None:
        """Wait for the reduction (a second waiter, after a cancelled one, waits for the
        same outcome)."""
        with self._lock:
            if self._error is None and not self._waited:
                try:
                    self.work.wait()
                    self._waited = True
                except Exception as exc:
                    self._error = exc
        error = self._error  # gloo: a timeout, or a peer that died
        if error is not None:
            raise DistributedCheckpointError(
                f"the preemption check of step question {self.question} did not finish on all "
                f"ranks ({error}); a rank has died or stopped asking `preempted` each step",
                rank=get_rank(),
            ) from error


class Agreement:
    """The question asked once per step on every rank: question ``q`` launches a
    non-blocking MAX all-reduce of ``[flag, -deadline_ms, -rank, signum]`` and is answered
    from the reduction of question ``q - lag``. Reductions on the group pair up by issue
    order, so every rank's ``q``-th answer comes from the same reduction; a rank that asks
    more often than the others waits for a reduction they never launch, and the group's
    timeout turns that into a :class:`DistributedCheckpointError`."""

    def __init__(self, group: Any, lag: int) -> None:
        self.group = group
        self.lag = lag
        self.asked = 0
        self._pending: deque[Pending] = deque()
        self._due: Pending | None = None  # returned by ask(), not read yet

    def ask(self, received: Received | None, grace: float) -> Pending | None:
        """Launch this question's reduction; return the one now due (None for the first
        ``lag`` questions). Until :meth:`answered` says it was read, the question stays
        open: asked again (its wait was cancelled), it launches nothing and returns the
        same reduction, so every rank's answers still come from the same reductions."""
        if self._due is not None:
            return self._due
        q = self.asked
        self.asked += 1
        if received is None:
            local = [0, -_NONE, -_NONE, 0]
        else:
            deadline_ms = int((received.wall + grace) * 1000)
            local = [1, -deadline_ms, -get_rank(), received.signum]
        values = torch.tensor(local, dtype=torch.int64)
        work = dist.all_reduce(values, op=dist.ReduceOp.MAX, group=self.group, async_op=True)
        self._pending.append(Pending(q, work, values))
        if q < self.lag:
            return None
        self._due = self._pending.popleft()
        return self._due

    def answered(self) -> None:
        """The reduction :meth:`ask` returned has been waited for and read."""
        self._due = None

    def drain(self) -> list[Pending]:
        """The reductions launched and not answered yet (to wait for before the group is
        used otherwise, or left)."""
        out = ([self._due] if self._due is not None else []) + list(self._pending)
        self._due = None
        self._pending.clear()
        return out


def read_verdict(pending: Pending) -> Verdict | None:
    """The answer of a completed reduction: None if no rank had a signal."""
    flag, neg_deadline, neg_rank, signum = (int(v) for v in pending.values.tolist())
    if not flag:
        return None
    return Verdict(pending.question, -neg_deadline / 1000.0, -neg_rank, signum)


class Timing:
    """How long this rank's recent saves took, scheduled to committed, by size."""

    def __init__(self, keep: int = 3) -> None:
        self._records: deque[tuple[int, float]] = deque(maxlen=keep)

    def record(self, nbytes: int, seconds: float) -> None:
        self._records.append((max(nbytes, 1), max(seconds, 0.0)))

    def predict(self, nbytes: int) -> float | None:
        """A cautious estimate for a save of ``nbytes``: the slowest of the last few saves
        (a cold first save, which started the worker, is soon forgotten), scaled up (never
        down: a save has fixed costs) to the size; None before any save."""
        if not self._records:
            return None
        return max(s * max(1.0, nbytes / n) for n, s in self._records)


@dataclass(frozen=True)
class Plan:
    """The last save, as every rank decided it from the same reduced numbers."""

    step: int
    action: str  # "save" (a new save of step), "wait" (it is being saved), "skip" (no time)
    reason: str
    predicted: float | None  # the slowest rank's prediction for a new save, seconds
    in_flight: float  # the slowest rank's estimate of the saves in flight, seconds
    left: float  # seconds to the deadline (the least of the ranks)


def plan_values(
    step: int, needs_save: bool, predicted: float | None, in_flight: float, left: float
) -> list[int]:
    """This rank's part of the plan's reduction (MAX over ranks)."""
    unknown = predicted is None
    predicted_ms = 0 if predicted is None else int(predicted * 1000)
    need = int(needs_save)
    return [
        step,
        -step,
        need,
        -need,
        predicted_ms,
        int(unknown),
        int(in_flight * 1000),
        -int(left * 1000),
    ]


def decide(reduced: list[int]) -> Plan:
    """The plan from the reduced values: identical inputs on every rank, so an identical
    plan. Raises if the ranks are not saving the same step."""
    hi, neg_lo, need, neg_need, predicted_ms, unknown, in_flight_ms, neg_left = reduced
    if hi != -neg_lo:
        raise DistributedCheckpointError(
            f"the ranks called save_and_exit with different steps ({-neg_lo}..{hi}): every "
            "rank must save the step it stopped at, the same everywhere",
            rank=get_rank(),
        )
    if need != -neg_need:
        raise DistributedCheckpointError(
            f"step {hi} is being saved on some ranks and not on others: save through the "
            "Preemption on every rank alike",
            rank=get_rank(),
        )
    step, left, in_flight = hi, -neg_left / 1000.0, in_flight_ms / 1000.0
    predicted = None if unknown else predicted_ms / 1000.0
    if not need:
        action, reason = "wait", f"step {step} is already saved or being saved"
    elif left <= 0:
        action, reason = "skip", "the deadline has passed"
    elif predicted is None:
        action, reason = "save", "no earlier save was timed, so it is tried"
    elif in_flight + predicted * SAFETY + MARGIN_S <= left:
        action = "save"
        reason = f"a save takes about {predicted:.1f}s here"
        if in_flight:
            reason += f" after the one in flight ({in_flight:.1f}s)"
    else:
        action = "skip"
        reason = (
            f"no time for a new save: it would take about {predicted:.1f}s"
            + (f" after the one in flight ({in_flight:.1f}s)" if in_flight else "")
            + f", with {left:.1f}s left"
        )
    return Plan(step, action, reason, predicted, in_flight, left)


def reduce_now(group: Any, values: list[int], what: str) -> list[int]:
    """A blocking MAX all-reduce of ``values`` over ``group`` (errors typed)."""
    tensor = torch.tensor(values, dtype=torch.int64)
    try:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=group)
    except Exception as exc:
        raise DistributedCheckpointError(
            f"{what} did not finish on all ranks ({exc}); a rank has died or is not saving",
            rank=get_rank(),
        ) from exc
    return [int(v) for v in tensor.tolist()]


def describe_outcome(
    plan: Plan,
    latest_before: int | None,
    latest: int | None,
    error: Exception | None,
    verdict: Verdict,
    *,
    seconds: float,
    left: float,
    during_final: list[int],
    exit_code: int,
) -> tuple[str, int | None, str]:
    """``(outcome, saved_step, message)`` of the last save, from the newest committed step
    before and after it."""
    if latest == plan.step:
        outcome, saved = "saved", latest
        what = f"step {latest} committed {seconds:.1f}s after the signal ({left:.1f}s to spare)"
    elif latest is not None and (latest_before is None or latest > latest_before):
        outcome, saved = "in-flight", latest
        what = f"{plan.reason}; the save in flight committed step {latest}"
    else:
        outcome, saved = "not-saved", None
        why = str(error).splitlines()[0] if error is not None else plan.reason
        what = (
            f"nothing new was committed ({why}); the newest committed checkpoint, "
            f"step {latest}, is intact"
        )
    message = (
        f"preempted by {signal_name(verdict.signum)} (first on rank {verdict.first_rank}), "
        f"stopped at step {plan.step}: {what}; resume from step {latest}"
    )
    if during_final:
        names = sorted({signal_name(s) for s in during_final})
        message += (
            f"; {len(during_final)} signal(s) ({', '.join(names)}) came during the last save "
            "and were ignored"
        )
    return outcome, saved, message + f"; exiting with status {exit_code}"
