"""Turning this rank's "done" into "done on every rank", on torch.distributed.

One reduction per check: ``[running, failed, call_idx, -call_idx]`` with MAX tells whether
any rank is still writing, whether any rank failed, and whether all ranks are checking the
same request. It runs on a dedicated gloo group so that it never interleaves with the
training program's own collectives, and that group's timeout turns a dead or absent rank
into an error instead of a hang. Without an initialized process group, or with
``no_dist=True``, a process is its own world.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from ._exceptions import CheckpointError, DistributedCheckpointError
from ._ranks import get_rank, is_distributed
from ._request import LocalOutcome

DEFAULT_TIMEOUT = timedelta(minutes=10)


@dataclass(frozen=True)
class GlobalStatus:
    """The reduced answer for one request: finished everywhere? failed anywhere (where)?"""

    done: bool
    failed_ranks: tuple[int, ...] = ()
    rank_errors: dict[int, str] | None = None  # each failing rank's error, first line


class CompletionGroup:
    """Runs the completion reductions of one queue.

    ``group`` is a process group to reduce over; by default a new gloo group over all ranks
    is created the first time a reduction is needed (creating it is itself collective, so
    every rank must reach that point, which the queue's contract already asks).
    """

    def __init__(self, group: Any = None, timeout: timedelta = DEFAULT_TIMEOUT) -> None:
        self._group = group
        self.timeout = timeout
        self._lock = threading.Lock()
        self.reductions = 0  # collectives issued so far (for tests and benchmarks)

    def group(self) -> Any:
        with self._lock:
            if self._group is None:
                self._group = dist.new_group(backend="gloo", timeout=self.timeout)
            return self._group

    def reduce(
        self, call_idx: int, running: bool, failed: bool, error: str | None = None
    ) -> GlobalStatus:
        """One all-reduce over the group; must be called in the same order on every rank.
        When some rank failed, one more collective gathers every rank's ``error``."""
        group = self.group()
        t = torch.tensor([int(running), int(failed), call_idx, -call_idx], dtype=torch.int64)
        self._collective(call_idx, lambda: dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group))
        any_running, any_failed, hi, neg_lo = (int(v) for v in t.tolist())
        if hi != -neg_lo:
            raise DistributedCheckpointError(
                f"ranks are completing different requests (call indices {-neg_lo}..{hi}): "
                "every rank must schedule the same requests and finalize with no_dist=False "
                "the same number of times",
                call_idx=call_idx,
                rank=get_rank(),
            )
        if any_running:
            return GlobalStatus(done=False)
        if not any_failed:
            return GlobalStatus(done=True)
        gathered: list[Any] = [None] * dist.get_world_size(group)
        mine = (failed, error if failed else None)
        self._collective(call_idx, lambda: dist.all_gather_object(gathered, mine, group=group))
        errors = {
            dist.get_global_rank(group, i) if group is not None else i: message or "unknown error"
            for i, (rank_failed, message) in enumerate(gathered)
            if rank_failed
        }
        return GlobalStatus(done=True, failed_ranks=tuple(sorted(errors)), rank_errors=errors)

    def all_gather_object(self, call_idx: int, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order (``[obj]`` outside a distributed job)."""
        if not is_distributed():
            return [obj]
        group = self.group()
        out: list[Any] = [None] * dist.get_world_size(group)
        self._collective(call_idx, lambda: dist.all_gather_object(out, obj, group=group))
        return out

    def broadcast_object(self, call_idx: int, obj: Any, src: int = 0) -> Any:
        """``obj`` as rank ``src`` has it (``obj`` outside a distributed job)."""
        if not is_distributed():
            return obj
        group = self.group()
        box = [obj]
        self._collective(call_idx, lambda: dist.broadcast_object_list(box, src=src, group=group))
        return box[0]

    def _collective(self, call_idx: int, op: Any) -> None:
        self.reductions += 1
        try:
            op()
        except Exception as exc:  # gloo reports a timeout or a dead peer as RuntimeError
            raise DistributedCheckpointError(
                f"the completion check of call {call_idx} did not finish on all ranks within "
                f"{self.timeout.total_seconds():.0f}s ({exc}); a rank has died or stopped "
                "finalizing its checkpoints",
                call_idx=call_idx,
                rank=get_rank(),
            ) from exc


def remote_failure(
    call_idx: int,
    failed_ranks: tuple[int, ...],
    local: CheckpointError | None,
    rank_errors: dict[int, str] | None = None,
) -> DistributedCheckpointError:
    """The error every rank raises for a request that failed on ``failed_ranks``; it
    quotes each failing rank's error, and on a failing rank its own error is the cause."""
    rank_errors = rank_errors or {}
    quoted = "".join(f"\n  rank {r}: {rank_errors[r]}" for r in failed_ranks if r in rank_errors)
    err = DistributedCheckpointError(
        f"checkpoint call {call_idx} failed on rank(s) {list(failed_ranks)}; no finalize step "
        f"ran on any rank.{quoted}",
        call_idx=call_idx,
        rank=get_rank(),
        failed_ranks=failed_ranks,
        rank_errors=rank_errors,
    )
    err.__cause__ = local
    return err


def settle(
    call_idx: int,
    local: Callable[[float | None], LocalOutcome | None],
    blocking: bool,
    distributed: bool,
    completion: CompletionGroup,
) -> tuple[bool, CheckpointError | None]:
    """Decide one request's fate: ``(done, error)`` (error None: it succeeded everywhere).

    ``local(timeout)`` returns this rank's outcome (None while running; timeout None waits).
    When ``distributed``, one reduction per attempt over ``completion``'s group, which
    every rank must issue in the same order; ``blocking`` waits locally before reducing.
    """
    outcome = local(None if blocking else 0.0)
    if not distributed:
        if outcome is None:
            return False, None
        return True, outcome.error
    while True:
        error = outcome.error if outcome is not None else None
        status = completion.reduce(
            call_idx,
            running=outcome is None,
            failed=error is not None,
            error=error.message.splitlines()[0] if error is not None else None,
        )
        if status.done or not blocking:
            break
        outcome = local(None)
    if not status.done:
        return False, None
    assert outcome is not None
    if status.failed_ranks:
        return True, remote_failure(
            call_idx, status.failed_ranks, outcome.error, status.rank_errors
        )
    return True, None
