"""Preemption: on SIGTERM (or another signal a scheduler sends ahead of a kill) every rank
agrees on one step, saves it within the grace period, and exits with status 75.

    with CheckpointManager("ckpts") as mgr, Preemption(mgr, grace=30.0) as pre:
        step = mgr.latest_step() or 0
        while step < total:
            if pre.preempted:                        # the step's one question
                pre.save_and_exit(step, state())     # raises Preempted: exit status 75
            train_one_step()
            step += 1
            if step % 100 == 0:
                pre.save(step, state())              # the manager's save, timed
            pre.poll()                               # the manager's poll

:class:`AsyncPreemption` (``_preempt_async``) is the twin for async loops. The parts:
``_preempt_signals`` (handlers, watchdog), ``_preempt_agree`` (the reductions, the plan),
``_preempt_base`` (what both handlers share).

**Signals.** A handler is installed for each signal (chaining the handler found there,
which is put back on exit). It records when the signal came and returns: in a handler,
which interrupts the main thread anywhere, nothing else is safe. The deadline is that
moment plus ``grace``. A watchdog thread ends the process at the deadline if the last
save has not finished by then, after killing the checkpoint worker mid-write: a step is
committed only by its metadata, so the previous committed checkpoint is untouched.

**Agreement, with no blocking collective per step.** Reading ``preempted`` is the step's
question. Question *q* launches a non-blocking MAX all-reduce, on a gloo group of the
handler's own, of four int64: ``[signalled, -deadline_ms, -rank, signum]``, and answers
from the reduction of question *q - lag* (``lag=1``): launched a whole step earlier, it
is complete by then in all but a lagging job, so the answer costs no wait.
The step a result is acted on is fixed by the question that launched it (*q + lag*),
which every rank computes identically, never by when the result happens to arrive on
each rank: every rank reads the same reduced tensor at the same question, so every rank
answers True at the same step, also when a single rank got the signal. A signal that
comes between questions *q - 1* and *q* rides on question *q*'s reduction and is acted on
at question *q + lag*: at most ``lag + 1`` steps after it. Reductions on a group pair up
by issue order, so the *q*-th answer is the same reduction on every rank; a rank asking
more often than the others waits for a reduction they never launch, until the group's
timeout raises :class:`DistributedCheckpointError`. The deadline is the earliest of the
ranks' (wall clock, so clocks must agree to within the margin, as NTP keeps them). In one
process the answer is the local signal, at once.

Why not ride on the completion check's reduction (``_dist``), which would cost nothing?
It happens only while a save is in flight (between saves a signal would wait for the
next save), and in the async facade it runs in the poller's thread at moments unrelated
to steps, so no step could be attached to its result without making every rank wait for
every save. A separate 32-byte non-blocking reduction per step is one background gloo
round trip (a fraction of a millisecond of the training thread), on its own
group so that it never interleaves with the completion check or the training's own
collectives; ``lag`` trades latency for slack between ranks.

**The last save** (``save_and_exit(step, state_dict)``): the reductions in flight are
waited for; one non-blocking poll settles what has finished; one blocking all-reduce on
the same group plans the last save from every rank's numbers: the step (which must be the
same), whether it is saved or being saved already, each rank's prediction for a new save
(the slowest recent save, scheduled to committed, scaled up to the size of this state),
what the saves in flight still need, and the time left (the least of the ranks'). Every
rank derives the same plan from the same reduced numbers: ``save`` (a new save fits:
``prediction x 1.25 + 1 s`` after the saves in flight; or nothing was timed yet, and a try
risks nothing), ``wait`` (the step is being saved already) or ``skip`` (no time: only the
saves in flight are waited for). The log says which, and why. Every save then settles (a
failure is logged: the previous checkpoint stays), the manager closes (the async
manager at its own exit, which the exception passes through), and
:class:`Preempted` (a ``SystemExit``, code 75) is raised. Signals during the last save
are counted and reported, never chained: nothing interrupts it.

Where a scheduler signals every process (SLURM, or torchrun's agent signalling its
workers' process groups), the checkpoint worker gets the signal too and dies: the save it
was writing fails on every rank, and the last save starts a fresh worker.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Sequence
from types import TracebackType
from typing import Any, NoReturn

from ._exceptions import CheckpointError
from ._manager import CheckpointManager
from ._preempt_agree import Plan, state_nbytes
from ._preempt_base import PreemptionBase, Tracked

PREEMPTED_EXIT_CODE = PreemptionBase.EXIT_CODE


class Preemption(PreemptionBase):
    """Save on SIGTERM, alike on every rank, within the grace period; then exit with
    status 75 (:attr:`EXIT_CODE`). For a :class:`CheckpointManager` loop::

        with Preemption(mgr, grace=30.0) as pre:
            while step < total:
                if pre.preempted:
                    pre.save_and_exit(step, state_dict)    # never returns
                ...                                        # one training step
                if step % 100 == 0:
                    pre.save(step, state_dict)
                pre.poll()

    Args:
        manager: the :class:`CheckpointManager` to save with (it stays yours: its
            ``save``, ``poll``, ``close``, ``latest_step`` are what this calls).
        grace: seconds between the signal and the kill (Kubernetes'
            ``terminationGracePeriodSeconds``, SLURM's ``KillWait`` or ``--signal``'s
            lead time).
        signals: the signals that mean "you will be killed" (SIGTERM; add SIGUSR1 for
            SLURM's ``--signal=USR1@120``).
        lag: the answer to a step's question comes from the reduction launched ``lag``
            steps before: more lag, more slack between ranks, later agreement.
        chain: call the handler that was installed for each signal before (not
            ``SIG_DFL``/``SIG_IGN``, nor Python's or an event loop's SIGINT handler).

    Entering installs the handlers (in the main thread) and, in a torch.distributed job,
    creates a gloo group (collective: every rank enters); leaving puts the handlers back.
    Ask :attr:`preempted` exactly once per step on every rank; save through :meth:`save`
    and poll through :meth:`poll` so that the last save knows what is in flight and how
    long a save takes here. See the module ``aiockpt._preempt`` for the design.
    """

    manager: CheckpointManager

    def __init__(
        self,
        manager: CheckpointManager,
        grace: float = 30.0,
        signals: Sequence[int] = (signal.SIGTERM,),
        *,
        lag: int = 1,
        chain: bool = True,
    ) -> None:
        super().__init__(manager, grace, signals, lag=lag, chain=chain)

    def __enter__(self) -> Preemption:
        self._install(self._make_group())
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if exc is None and self._agreement is not None:
                # Every rank launched as many reductions: finish them, so none is left
                # half-done on a peer (not after an error: a peer may never launch its own).
                for pending in self._agreement.drain():
                    pending.wait()
        finally:
            self._uninstall()

    @property
    def preempted(self) -> bool:
        """The step's question: True once every rank knows of a signal, on every rank at
        the same step. Read it exactly once per step, on every rank. It waits only for a
        reduction launched ``lag`` steps earlier (for a rank that lags that far)."""
        pending = self._ask()
        if pending is not None:
            pending.wait()
            self._answer(pending)
        return self._verdict is not None

    def save(self, step: int, state_dict: Any, extra: dict[str, Any] | None = None) -> int:
        """:meth:`CheckpointManager.save`, timed (the last save's plan needs to know how
        long a save takes). Returns the call index."""
        self._check_open()
        tracked = Tracked(step, time.monotonic(), state_nbytes(state_dict))
        idx = self.manager.save(step, state_dict, extra)
        self._tracked[idx] = tracked
        return idx

    def poll(self, blocking: bool = False) -> list[int]:
        """:meth:`CheckpointManager.poll`; returns the steps (saved through :meth:`save`)
        that it committed, oldest first."""
        try:
            done = self.manager.poll(blocking)
        except CheckpointError as err:
            for idx in err.finalized_call_idxs:
                self._settled(idx, committed=True)
            if err.call_idx is not None:
                self._settled(err.call_idx, committed=False)
            raise
        return [s for s in (self._settled(idx, committed=True) for idx in done) if s is not None]

    def save_and_exit(
        self, step: int, state_dict: Any, extra: dict[str, Any] | None = None
    ) -> NoReturn:
        """Save ``step`` (the step the loop stopped at, the same on every rank) if there
        is time, wait for every save to commit, close the manager, and raise
        :class:`Preempted` (exit status 75). Call it, on every rank, once
        :attr:`preempted` is True. The log (logger ``aiockpt``) says what was saved, or
        why not; the previous committed checkpoint stays whatever happens."""
        for pending in self._begin_final(step):
            pending.wait()
        try:
            self._settle_all(blocking=False)
            latest_before = self.manager.latest_step()
            plan = self._plan(self._local_plan(step, state_nbytes(state_dict), latest_before))
            error = self._last_save(plan, state_dict, extra)
            error = self._settle_all(blocking=True) or error
            try:
                self.manager.close()
            except CheckpointError as err:
                self._save_failed(err)
                error = error or err
            latest = self.manager.latest_step()
        finally:
            self._watchdog.disarm()
        raise self._finish(plan, latest_before, latest, error)

    def _last_save(
        self, plan: Plan, state_dict: Any, extra: dict[str, Any] | None
    ) -> CheckpointError | None:
        if plan.action != "save":
            return None
        try:
            self.save(plan.step, state_dict, extra)
        except CheckpointError as err:
            self._save_failed(err)
            return err
        return None

    def _settle_all(self, blocking: bool) -> CheckpointError | None:
        """Poll (once, or until every save has settled); failures are logged, the last
        one returned. Every rank polls alike: a failure is raised on every rank."""
        error = None
        while True:
            try:
                self.poll(blocking)
                return error
            except CheckpointError as err:
                self._save_failed(err)
                error = err
            if not blocking:
                return error
