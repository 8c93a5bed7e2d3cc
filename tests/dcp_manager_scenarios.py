"""Checkpoint managers in the DCP format, run on every rank by dist_harness.run_ranks
("dcp_manager_scenarios:name")."""

from __future__ import annotations

import functools
import os
from typing import Any

import anyio
from dcp_scenarios import _mesh, dtensor_state, kill_stalled_worker, mismatches, write_then_stall

import aiockpt.dcp._commit
from aiockpt import AsyncCheckpointManager, CheckpointError, CheckpointManager


def _zeroed(mesh: Any) -> dict[str, Any]:
    sd = dtensor_state(mesh, 0)
    for t in sd["model"].values():
        t.to_local().zero_()
    sd["plain"].zero_()
    sd["step"] = 0
    return sd


def manager_steps(rank: int, world: int, tmp: str, mode: str) -> dict[str, Any]:
    """Steps 1, 2, 3 of DTensor state (offset = step) with keep_last=2; then restore the
    newest into zeroed DTensors. Reports what every rank saw."""
    mesh = _mesh(world)
    directory = os.path.join(tmp, "ckpts")
    out: dict[str, Any] = {}
    if mode == "blocking":
        with CheckpointManager(directory, keep_last=2, format="dcp", thread_count=2) as mgr:
            for step in (1, 2, 3):
                idx = mgr.save(step, dtensor_state(mesh, step), extra={"offset": step})
                out.setdefault("finalized", []).extend(mgr.poll(blocking=True))
                assert idx == step - 1
            out["committed"] = mgr.committed_steps()
            sd = mgr.restore(state_dict=_zeroed(mesh))
            out["plannings"] = mgr.steps.format.cache.plannings
    else:

        async def main() -> None:
            async with AsyncCheckpointManager(directory, keep_last=2, format="dcp") as mgr:
                futs = []
                for step in (1, 2, 3):
                    futs.append(await mgr.save(step, dtensor_state(mesh, step)))
                out["finalized"] = [(await fut).call_idx for fut in futs]
                out["committed"] = await mgr.acommitted_steps()
                out["sd"] = await mgr.restore(state_dict=_zeroed(mesh))
                out["plannings"] = mgr.steps.format.cache.plannings

        anyio.run(main)
        sd = out.pop("sd")
    out["mismatches"] = mismatches(sd, 3)
    return out


def manager_worker_killed(rank: int, world: int, tmp: str) -> dict[str, Any]:
    """Step 1 commits; the last rank's worker is SIGKILLed once it has written its files
    for step 2; the manager then restores step 1 and commits step 3."""
    mesh = _mesh(world)
    directory = os.path.join(tmp, "ckpts")
    gate = os.path.join(tmp, "gate")
    pid_path = os.path.join(tmp, "pid")
    if rank == world - 1:
        os.mkfifo(gate)
    out: dict[str, Any] = {}
    real_write = aiockpt.dcp._commit.write_rank_files

    async def main() -> None:
        async with AsyncCheckpointManager(directory, keep_last=2, format="dcp") as mgr:
            await (await mgr.save(1, dtensor_state(mesh, 1)))
            if rank == world - 1:
                aiockpt.dcp._commit.write_rank_files = functools.partial(  # type: ignore[assignment]
                    write_then_stall, gate=gate, pid_path=pid_path
                )
            try:
                fut = await mgr.save(2, dtensor_state(mesh, 2))
            finally:
                aiockpt.dcp._commit.write_rank_files = real_write
            if rank == world - 1:
                await anyio.to_thread.run_sync(kill_stalled_worker, gate, pid_path)
            try:
                await fut
                out["error"] = None
            except CheckpointError as err:
                out["error"] = type(err).__name__
                out["failed_ranks"] = getattr(err, "failed_ranks", None)
            out["step2_metadata"] = os.path.exists(
                os.path.join(directory, "step-000000000002", ".metadata")
            )
            out["committed_after_kill"] = await mgr.acommitted_steps()
            out["restored"] = mismatches(await mgr.restore(state_dict=_zeroed(mesh)), 1)
            await (await mgr.save(3, dtensor_state(mesh, 3)))
            out["committed"] = await mgr.acommitted_steps()

    anyio.run(main)
    out["listing"] = sorted(n for n in os.listdir(directory) if n.startswith("step-"))
    return out


class Flaky:
    """An object every rank holds (so every rank plans the same items), which cannot be
    serialized on the rank where ``fail`` is set."""

    def __init__(self, fail: bool) -> None:
        self.fail = fail

    def __reduce__(self) -> Any:
        if self.fail:
            raise TypeError("this object refuses to be pickled")
        return (Flaky, (False,))


def manager_rank_fails_after_planning(rank: int, world: int, tmp: str) -> dict[str, Any]:
    """Step 1 commits. At step 2 the last rank's state holds an object it cannot
    serialize: the ranks agreed on the plan, then that rank fails alone. It raises at once
    and then idles (its manager's poller alone must settle the failed call); the other
    ranks' futures fail. Then every rank commits step 3."""
    from ckpt_helpers import open_gate, wait_gate

    mesh = _mesh(world)
    directory = os.path.join(tmp, "ckpts")
    gate = os.path.join(tmp, "rank0-saw-step2-fail")
    out: dict[str, Any] = {}

    async def main() -> None:
        async with AsyncCheckpointManager(directory, keep_last=2, format="dcp") as mgr:
            await (await mgr.save(1, dtensor_state(mesh, 1)))
            state = dtensor_state(mesh, 2)
            state["obj"] = Flaky(fail=rank == world - 1)
            try:
                fut = await mgr.save(2, state)
                await fut
                out["step2"] = None
            except CheckpointError as err:
                out["step2"] = type(err).__name__
                out["step2_message"] = str(err)
                out["failed_ranks"] = getattr(err, "failed_ranks", None)
            if rank == 0:
                open_gate(gate)
            else:
                await anyio.to_thread.run_sync(wait_gate, gate, 60.0)
            out["step2_metadata"] = os.path.exists(
                os.path.join(directory, "step-000000000002", ".metadata")
            )
            await (await mgr.save(3, dtensor_state(mesh, 3)))
            out["committed"] = await mgr.acommitted_steps()
            out["restored"] = mismatches(await mgr.restore(state_dict=_zeroed(mesh)), 3)

    anyio.run(main)
    return out


def blocking_manager_planner_fails_on_reuse(rank: int, world: int, tmp: str) -> dict[str, Any]:
    """The last rank's planner raises at step 2, whose plan the other ranks reuse without
    any collective: that rank's save raises at once; polling, every rank learns of it."""
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

    calls = {"n": 0}

    class Planner(DefaultSavePlanner):
        def create_local_plan(self) -> Any:
            calls["n"] += 1
            if rank == world - 1 and calls["n"] == 2:
                raise RuntimeError("the planner failed on the last rank")
            return super().create_local_plan()

    mesh = _mesh(world)
    out: dict[str, Any] = {"errors": []}
    with CheckpointManager(os.path.join(tmp, "ckpts"), format="dcp", planner=Planner()) as mgr:
        mgr.save(1, dtensor_state(mesh, 1))
        mgr.poll(blocking=True)
        try:
            out["save2"] = mgr.save(2, dtensor_state(mesh, 2))
        except CheckpointError as err:
            out["save2"] = f"{type(err).__name__}: {err}"
        for _ in range(2):  # the loop goes on polling, as a training loop does
            try:
                mgr.poll(blocking=True)
            except CheckpointError as err:
                out["errors"].append((type(err).__name__, err.call_idx))
        mgr.save(3, dtensor_state(mesh, 3))
        out["step3"] = mgr.poll(blocking=True)
        out["committed"] = mgr.committed_steps()
    return out
