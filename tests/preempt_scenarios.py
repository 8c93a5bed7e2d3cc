"""Preemption scenarios on real ranks, and the harness that runs them.

Each rank is a process forked from the forkserver (torch preloaded) in a gloo group on
loopback, like ``dist_harness``; unlike there, a rank's exit status is its own: a
:class:`Preempted` leaves the process as the ``SystemExit`` it is. What each rank saw is
written to ``result-R.json``, its ``aiockpt`` log to ``log-R.txt``.

The points where a signal lands are held by gates: a rank (or its checkpoint worker)
leaves a marker file, then waits until the test opens the gate.
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import json
import logging
import os
import re
import shutil
import signal
import tempfile
import time
import traceback
from datetime import timedelta
from typing import Any

import torch
from ckpt_helpers import open_gate, wait_gate

from aiockpt import (
    AsyncCheckpointManager,
    AsyncPreemption,
    CheckpointError,
    CheckpointManager,
    LocalStorage,
    Preempted,
    Preemption,
)
from aiockpt._core._persistent import worker_context

_STEP = re.compile(r"step-0*(\d+)")
_SHARD = re.compile(r"shard-0*(\d+)-of")


def _step_of(path: str) -> int:
    match = _STEP.search(path)
    return int(match.group(1)) if match else -1


class GatedStorage(LocalStorage):
    """Local storage whose writes (in the worker) and commit (rank 0) can be held at a
    gate: the write of step ``write_step``, the commit of ``commit_step``, and, with
    ``final``, the write of the step a rank announced as its last save."""

    def __init__(
        self, tmp: str, write_step: int = -1, commit_step: int = -1, final: bool = False
    ) -> None:
        self.tmp, self.write_step, self.commit_step, self.final = (
            tmp,
            write_step,
            commit_step,
            final,
        )

    def write_file(self, state_dict: Any, path: str) -> dict[str, Any]:
        step = _step_of(path)
        match = _SHARD.search(os.path.basename(path))
        rank = int(match.group(1)) if match else 0
        if step == self.write_step:
            _mark_pid(os.path.join(self.tmp, f"writing-{rank}"))
            wait_gate(os.path.join(self.tmp, "gate-write"))
        if self.final and step == _announced(self.tmp, rank):
            open_gate(os.path.join(self.tmp, f"final-writing-{rank}"))
            wait_gate(os.path.join(self.tmp, "gate-final"))
        return super().write_file(state_dict, path)

    def commit(self, directory: str, files: list[dict[str, Any]], extra: dict[str, Any]) -> None:
        if _step_of(directory) == self.commit_step:
            open_gate(os.path.join(self.tmp, "committing"))
            wait_gate(os.path.join(self.tmp, "gate-commit"))
        super().commit(directory, files, extra)


def _mark_pid(path: str) -> None:
    """Leave a marker holding this process's pid (written whole, then renamed)."""
    with open(path + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.rename(path + ".tmp", path)


def _announced(tmp: str, rank: int) -> int:
    try:
        with open(os.path.join(tmp, f"final-{rank}")) as f:
            return int(f.read())
    except (OSError, ValueError):
        return -2


def _announce(tmp: str, rank: int, step: int) -> None:
    path = os.path.join(tmp, f"final-{rank}")
    with open(path + ".tmp", "w") as f:
        f.write(str(step))
    os.rename(path + ".tmp", path)


def _hold_staging(tmp: str, rank: int) -> None:
    """Hold the next staging copy of this rank at the gate ``gate-staging``."""
    from aiockpt._staging._arena import StagingBuffers

    original = StagingBuffers.stage

    def stage(self: Any, *args: Any, **kwargs: Any) -> Any:
        StagingBuffers.stage = original  # type: ignore[method-assign]
        open_gate(os.path.join(tmp, f"staging-{rank}"))
        wait_gate(os.path.join(tmp, "gate-staging"))
        return original(self, *args, **kwargs)

    StagingBuffers.stage = stage  # type: ignore[method-assign]


def value(rank: int, step: int) -> float:
    return float(rank * 1000 + step)


def preempted_loop(
    rank: int,
    world: int,
    tmp: str,
    where: str = "step",
    saves: tuple[int, ...] = (3,),
    grace: float = 30.0,
    persistent: bool = False,
    own_group: bool = False,
    steps: int = 100_000,
    untimed: bool = False,
) -> dict[str, Any]:
    """A training loop that saves ``saves`` (step 3 is committed before anything else
    happens), with a gate at ``where``: ``step`` (every rank, in step 5), ``staging``
    (every rank, staging the save of step 6), ``write`` (every rank's worker writing step
    6), ``commit`` (rank 0 committing step 6), ``final`` (a step gate, then every
    worker's write of the last save). ``untimed`` saves with the manager directly, so
    the last save's plan has no timing and tries a new save whatever the machine's load."""
    if own_group:
        os.setpgid(0, 0)  # like torchrun: the rank, its forkserver and its worker
    storage = GatedStorage(
        tmp,
        write_step=6 if where == "write" else -1,
        commit_step=6 if where == "commit" else -1,
        final=where == "final",
    )
    mgr = CheckpointManager(os.path.join(tmp, "ck"), storage=storage, persistent=persistent)
    step = 0
    failures: list[str] = []

    def state() -> dict[str, Any]:
        return {"w": torch.full((256,), value(rank, step))}

    with mgr, Preemption(mgr, grace=grace) as pre:
        while step < steps:
            if pre.preempted:
                _announce(tmp, rank, step)
                with open(os.path.join(tmp, f"failures-{rank}.json"), "w") as f:
                    json.dump(failures, f)
                pre.save_and_exit(step, state())
            step += 1
            if step == 5 and where in ("step", "final"):
                open_gate(os.path.join(tmp, f"at-step-{rank}"))
                wait_gate(os.path.join(tmp, "gate-step"))
            if step in saves:
                if where == "staging" and step == 6:
                    _hold_staging(tmp, rank)
                (mgr.save if untimed else pre.save)(step, state())
            try:
                pre.poll(blocking=step == 4)  # step 3 is committed before the gates
            except CheckpointError as err:  # a save failed (its worker was killed): go on
                failures.append(type(err).__name__)
    return {"finished": step}


def slow_plan(rank: int, world: int, tmp: str, grace: float = 30.0) -> dict[str, Any]:
    """Rank 1 has measured its saves at 100 s each: no rank saves anew, every rank waits
    for the save in flight (step 6, held at the write gate until the signal)."""
    storage = GatedStorage(tmp, write_step=6)
    mgr = CheckpointManager(os.path.join(tmp, "ck"), storage=storage, persistent=False)
    step = 0
    with mgr, Preemption(mgr, grace=grace) as pre:
        if rank == 1:  # what a 100 s save of this state would have left
            for _ in range(3):
                pre._timing.record(256 * 4, 100.0)
        while True:
            if pre.preempted:
                pre.save_and_exit(step, {"w": torch.full((256,), value(rank, step))})
            step += 1
            if step in (3, 6):
                pre.save(step, {"w": torch.full((256,), value(rank, step))})
            pre.poll(blocking=step == 4)


def async_loop(rank: int, world: int, tmp: str, grace: float = 30.0) -> dict[str, Any]:
    """The async twin of ``preempted_loop`` with the ``write`` gate."""

    async def main() -> dict[str, Any]:
        storage = GatedStorage(tmp, write_step=6)
        step = 0
        ckdir = os.path.join(tmp, "ck")
        async with (
            AsyncCheckpointManager(ckdir, storage=storage, persistent=False) as mgr,
            AsyncPreemption(mgr, grace=grace) as pre,
        ):
            while True:
                if await pre.preempted():
                    await pre.save_and_exit(step, {"w": torch.full((256,), value(rank, step))})
                step += 1
                if step in (3, 6):
                    fut = await pre.save(step, {"w": torch.full((256,), value(rank, step))})
                    if step == 3:
                        await fut
                await asyncio.sleep(0)

    return asyncio.run(main())


def cancelled_question(rank: int, world: int, tmp: str) -> dict[str, Any]:
    """Rank 0's question at step 2 waits for question 1's reduction, which rank 1 (with a
    SIGTERM) holds back until rank 0 has cancelled that wait; rank 0 then asks again, at
    the same step: the answer of the cancelled question is still there."""

    async def main() -> dict[str, Any]:
        step = 0
        marker = os.path.join(tmp, "cancelled-0")
        async with (
            AsyncCheckpointManager(os.path.join(tmp, "ck"), persistent=False) as mgr,
            AsyncPreemption(mgr, grace=30.0) as pre,
        ):
            while True:
                if rank == 1 and step == 1:
                    os.kill(os.getpid(), signal.SIGTERM)  # rides on question 1
                    while not os.path.exists(marker):
                        time.sleep(0.005)
                if rank == 0 and step == 2:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(pre.preempted(), 0.2)
                        raise AssertionError("question 1's reduction completed without rank 1")
                    with open(marker, "w"):
                        pass
                if await pre.preempted():
                    await pre.save_and_exit(step, {"w": torch.full((256,), value(rank, step))})
                step += 1
                await asyncio.sleep(0)

    return asyncio.run(main())


def asks_out_of_step(rank: int, world: int, tmp: str) -> dict[str, Any]:
    """Rank 0 asks `preempted` six times, the others three times: rank 0 waits for a
    reduction nobody else launches, until the group's timeout (3 s)."""
    mgr = CheckpointManager(os.path.join(tmp, "ck"), persistent=False, timeout=3.0)
    with mgr, Preemption(mgr) as pre:
        answers = [pre.preempted for _ in range(6 if rank == 0 else 3)]
    return {"answers": answers}


def resume(rank: int, world: int, tmp: str) -> dict[str, Any]:
    """A new job: the newest committed step and this rank's restored value."""
    with CheckpointManager(os.path.join(tmp, "ck"), persistent=False) as mgr:
        latest = mgr.latest_step()
        state = mgr.restore()
        return {"latest": latest, "w": float(state["w"][0]), "steps": mgr.committed_steps()}


# -- the harness ----------------------------------------------------------------------


def _rank_main(
    scenario: str, rank: int, world: int, rendezvous: str, tmp: str, kwargs: dict[str, Any]
) -> None:
    import torch.distributed as dist

    faulthandler.dump_traceback_later(55, exit=False)  # where a hung rank is, in its stderr
    handler = logging.FileHandler(os.path.join(tmp, f"log-{rank}.txt"))
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logging.getLogger("aiockpt").addHandler(handler)
    logging.getLogger("aiockpt").setLevel(logging.INFO)
    result: dict[str, Any] = {"rank": rank}
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"file://{rendezvous}",
            rank=rank,
            world_size=world,
            timeout=timedelta(seconds=60),
        )
        result["value"] = globals()[scenario](rank, world, tmp, **kwargs)
    except Preempted as p:
        result.update(
            code=p.code,
            outcome=p.outcome,
            agreed=p.agreed_step,
            saved=p.saved_step,
            latest=p.latest_step,
            message=str(p),
        )
        raise
    except BaseException:
        result["error"] = traceback.format_exc()
        raise
    finally:
        path = os.path.join(tmp, f"result-{rank}.json")
        with open(path + ".tmp", "w") as f:
            json.dump(result, f)
        os.rename(path + ".tmp", path)
        handler.flush()


class Ranks:
    """``world`` ranks running ``scenario(rank, world, tmp, **kwargs)``."""

    def __init__(self, scenario: str, world: int, tmp: str, **kwargs: Any) -> None:
        self.world, self.tmp = world, tmp
        self._meeting = tempfile.mkdtemp(prefix="aiockpt-rendezvous-")
        ctx = worker_context("forkserver")
        rendezvous = os.path.join(self._meeting, "store")
        self.procs = [
            ctx.Process(target=_rank_main, args=(scenario, r, world, rendezvous, tmp, kwargs))
            for r in range(world)
        ]
        for p in self.procs:
            p.start()

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs if p.pid is not None]

    def wait_for(self, *names: str, timeout: float = 60.0) -> None:
        """Wait for marker files (bounded); fail early, with the ranks' errors, if a rank
        died meanwhile."""
        deadline = time.monotonic() + timeout
        for name in names:
            path = os.path.join(self.tmp, name)
            while not os.path.exists(path):
                dead = [r for r, p in enumerate(self.procs) if p.exitcode is not None]
                assert not dead, f"ranks {dead} exited before {name}: {self.results()}"
                assert time.monotonic() < deadline, f"{name} never appeared: {self.results()}"
                time.sleep(0.005)

    def open(self, name: str) -> None:
        open_gate(os.path.join(self.tmp, name))

    def join(self, timeout: float = 60.0) -> list[int | None]:
        """Every rank's exit status; ranks still running after ``timeout`` are killed
        (and the test fails)."""
        deadline = time.monotonic() + timeout
        for p in self.procs:
            p.join(max(0.0, deadline - time.monotonic()))
        hung = [r for r, p in enumerate(self.procs) if p.is_alive()]
        for p in self.procs:
            if p.is_alive():
                p.kill()
                p.join()
        shutil.rmtree(self._meeting, ignore_errors=True)
        assert not hung, f"ranks {hung} did not exit within {timeout}s: {self.results()}"
        return [p.exitcode for p in self.procs]

    def results(self) -> list[dict[str, Any] | None]:
        out: list[dict[str, Any] | None] = []
        for r in range(self.world):
            try:
                with open(os.path.join(self.tmp, f"result-{r}.json")) as f:
                    out.append(json.load(f))
            except (OSError, ValueError):
                out.append(None)
        return out

    def log(self, rank: int) -> str:
        try:
            with open(os.path.join(self.tmp, f"log-{rank}.txt")) as f:
                return f.read()
        except OSError:
            return ""
