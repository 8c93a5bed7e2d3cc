"""Scenarios run on every rank by dist_harness.run_ranks; each returns what the test checks."""

from __future__ import annotations

import os
import time
from datetime import timedelta
from typing import Any

import anyio
import torch
import torch.distributed as dist
from ckpt_helpers import make_gate, open_gate, wait_then_write, write_value

from aiockpt import (
    AsyncCheckpointQueue,
    AsyncRequest,
    AsyncTorchCheckpoint,
    CheckpointError,
    CheckpointQueue,
    DistributedCheckpointError,
)


def state(rank: int) -> dict[str, torch.Tensor]:
    return {"w": torch.full((1000,), float(rank)), "b": torch.arange(10) + rank}


def slow_rank(rank: int, world: int, tmp: str) -> dict[str, Any]:
    """The last rank's write is held back by a gate; rank 0 sees its own part done but the
    checkpoint not, then releases the gate."""
    gate = os.path.join(tmp, "gate")
    if rank == 0:
        make_gate(tmp, "gate")
    dist.barrier()

    async def main() -> dict[str, Any]:
        seen: dict[str, Any] = {}
        async with AsyncCheckpointQueue() as queue:
            target = os.path.join(tmp, f"part{rank}.pt")
            rank_gate = gate if rank == world - 1 else "/dev/null"
            fut = await queue.schedule(
                AsyncRequest(wait_then_write, (state(rank), rank_gate, target), [])
            )
            if rank == 0:
                call = queue.engine.active[0]
                await anyio.to_thread.run_sync(queue.engine.wait_local, call, None)
                seen["local_done"] = call.outcome is not None and call.outcome.ok
                seen["future_done_before_gate"] = fut.done()
                await anyio.to_thread.run_sync(open_gate, gate)
            result = await fut
            seen["call_idx"] = result.call_idx
        return seen

    return anyio.run(main)


def failing_rank(rank: int, world: int, tmp: str) -> dict[str, Any]:
    """The last rank cannot write its shard: every rank's future fails, naming it, and no
    metadata is written."""
    from ckpt_helpers import fix_attempts

    import aiockpt._sharded

    ckdir = os.path.join(tmp, "ckpt")
    if rank == world - 1:  # a directory holds the name of this rank's file
        token = fix_attempts(aiockpt._sharded)
        os.makedirs(os.path.join(ckdir, f"shard-{rank:05d}-of-{world:05d}.{token}.pt"))
    dist.barrier()

    async def main() -> dict[str, Any]:
        async with AsyncTorchCheckpoint() as ckpt:
            fut = await ckpt.save_sharded(state(rank), ckdir)
            try:
                await fut
            except DistributedCheckpointError as err:
                return {
                    "type": type(err).__name__,
                    "failed_ranks": err.failed_ranks,
                    "message": str(err),
                    "cause": type(err.__cause__).__name__ if err.__cause__ else None,
                    "metadata": os.path.exists(os.path.join(ckdir, "metadata.json")),
                }
        return {"type": None}

    return anyio.run(main)


def uneven_polling(rank: int, world: int, tmp: str) -> dict[str, Any]:
    """Rank 0 awaits at once; the others first run training collectives on the default
    group. Both the checkpoint and the training collectives come out right."""

    async def main() -> dict[str, Any]:
        sums = []
        async with AsyncTorchCheckpoint() as ckpt:
            fut = await ckpt.save_sharded(state(rank), os.path.join(tmp, "ckpt"))

            def train_collectives() -> None:
                for _ in range(20):
                    t = torch.ones(4)
                    dist.all_reduce(t)
                    sums.append(int(t[0]))

            if rank == 0:
                result = await fut
                await anyio.to_thread.run_sync(train_collectives)
            else:
                await anyio.to_thread.run_sync(train_collectives)
                result = await fut
        return {"call_idx": result.call_idx, "sums": sums}

    return anyio.run(main)


def killed_rank(rank: int, world: int, tmp: str, timeout_s: float) -> dict[str, Any]:
    """The last rank dies after scheduling; the others get an error, not a hang."""

    async def main() -> dict[str, Any]:
        async with AsyncCheckpointQueue(timeout=timedelta(seconds=timeout_s)) as queue:
            fut = await queue.schedule(
                AsyncRequest(write_value, (rank, os.path.join(tmp, f"k{rank}")), [])
            )
            if rank == world - 1:
                os._exit(17)
            start = time.monotonic()
            try:
                await fut
            except CheckpointError as err:
                return {
                    "type": type(err).__name__,
                    "elapsed": time.monotonic() - start,
                    "message": str(err),
                }
        return {"type": None}

    return anyio.run(main)


def fifo_many(rank: int, world: int, tmp: str) -> dict[str, Any]:
    """Three requests in flight on an explicitly passed group: every rank finalizes them in
    the same order."""
    group = dist.new_group(backend="gloo")
    order: list[int] = []

    async def main() -> list[int]:
        async with AsyncCheckpointQueue(
            persistent=False, process_group=group, max_staging_copies=3
        ) as queue:
            futs = []
            for i in range(3):
                fut = await queue.schedule(
                    AsyncRequest(
                        write_value,
                        (i, os.path.join(tmp, f"r{rank}-{i}")),
                        [lambda i=i: order.append(i)],
                    )
                )
                futs.append(fut)
            results = await queue.finalize()
        return [r.call_idx for r in results]

    idxs = anyio.run(main)
    return {"order": order, "results": idxs}


def sync_reference_loop(rank: int, world: int, tmp: str) -> dict[str, Any]:
    """The reference pattern with no_dist=False: poll every step, save every 4 steps."""
    queue = CheckpointQueue(persistent=True)
    finalized: list[int] = []
    finalize_order: list[int] = []
    for step in range(1, 13):
        finalized += queue.maybe_finalize_async_calls(blocking=False, no_dist=False)
        if step % 4 == 0:
            queue.schedule_async_request(
                AsyncRequest(
                    write_value,
                    (step, os.path.join(tmp, f"s{rank}-{step}")),
                    [lambda s=step: finalize_order.append(s)],
                )
            )
    finalized += queue.maybe_finalize_async_calls(blocking=True, no_dist=False)
    queue.close()
    return {
        "finalized": finalized,
        "order": finalize_order,
        "reductions": queue._engine.completion.reductions,
    }


def absent_rank(rank: int, world: int, tmp: str, timeout_s: float) -> dict[str, Any]:
    """The last rank is alive but never finalizes: the others' blocking finalize times out
    with an error instead of waiting forever."""
    queue = CheckpointQueue(persistent=False, timeout=timedelta(seconds=timeout_s))
    queue.schedule_async_request(
        AsyncRequest(write_value, (rank, os.path.join(tmp, f"a{rank}")), [])
    )
    outcome: dict[str, Any] = {"type": None}
    if rank != world - 1:
        queue._engine.completion.group()  # collective: every rank creates it
        start = time.monotonic()
        try:
            queue.maybe_finalize_async_calls(blocking=True, no_dist=False)
        except CheckpointError as err:
            outcome = {
                "type": type(err).__name__,
                "elapsed": time.monotonic() - start,
                "message": str(err),
            }
    else:
        queue._engine.completion.group()
    dist.barrier()  # the absent rank waits here until the others have given up
    return outcome


def staging_fails_on_one_rank(rank: int, world: int, tmp: str) -> dict[str, Any]:
    """The last rank fails to stage call 0 (its preload raises there only). It learns at
    once; every other rank learns at the completion check of call 0, with that rank's
    message; call indices stay aligned, so call 1 succeeds everywhere."""
    from aiockpt import StagingError

    def preload() -> Any:
        if rank == world - 1:
            raise RuntimeError(f"device lost on rank {rank}")
        return state(rank)

    out: dict[str, Any] = {}
    with CheckpointQueue(persistent=True) as queue:
        try:
            queue.schedule_async_request(
                AsyncRequest(
                    write_value,
                    (None, os.path.join(tmp, f"a{rank}")),
                    [],
                    preload_fn=preload,
                    preload_arg_index=0,
                )
            )
            out["schedule"] = "ok"
        except StagingError as err:
            out["schedule"] = f"StagingError: {err.call_idx}"
        done = queue.schedule_async_request(
            AsyncRequest(write_value, (rank, os.path.join(tmp, f"b{rank}")), [])
        )
        out["second_idx"] = done
        try:
            out["first"] = queue.maybe_finalize_async_calls(blocking=True, no_dist=False)
        except DistributedCheckpointError as err:
            out["first"] = f"{type(err).__name__} {err.call_idx} {list(err.failed_ranks)}"
            out["rank_errors"] = err.rank_errors
        out["then"] = queue.maybe_finalize_async_calls(blocking=True, no_dist=False)
    return out


def commit_fails_on_rank_zero(rank: int, world: int, tmp: str) -> dict[str, Any]:
    """Rank 0 cannot write the metadata: every rank's save fails, naming rank 0's error,
    and the step is not committed; the next step commits."""
    from ckpt_helpers import FaultyStorage

    from aiockpt import CheckpointManager, FinalizeError

    storage = FaultyStorage("commit_raises")
    out: dict[str, Any] = {}
    with CheckpointManager(os.path.join(tmp, "ck"), storage=storage) as mgr:
        mgr.save(1, state(rank))
        try:
            mgr.poll(blocking=True)
            out["first"] = "committed"
        except FinalizeError as err:
            out["first"] = f"FinalizeError: {err}"
        storage.fault = "none"
        mgr.save(2, state(rank))
        out["second"] = mgr.poll(blocking=True)
        out["committed"] = mgr.committed_steps()
    return out


def keep_last_with_a_failed_newer_save(rank: int, world: int, tmp: str) -> dict[str, Any]:
    """keep_last=1: step 1 is committed, step 2 fails on the last rank. Step 1 must survive
    (nothing newer was committed), and a later step 3 then replaces it."""
    from ckpt_helpers import FaultyStorage

    from aiockpt import CheckpointManager

    storage = FaultyStorage("none")
    out: dict[str, Any] = {}
    with CheckpointManager(os.path.join(tmp, "ck"), keep_last=1, storage=storage) as mgr:
        mgr.save(1, state(rank))
        mgr.poll(blocking=True)
        storage.fault = "raise" if rank == world - 1 else "none"
        mgr.save(2, state(rank))
        try:
            mgr.poll(blocking=True)
        except DistributedCheckpointError as err:
            out["second"] = list(err.failed_ranks)
        storage.fault = "none"
        out["after_failure"] = mgr.committed_steps()
        restored = mgr.restore()
        out["restored_rank_value"] = float(restored["w"][0])
        mgr.save(3, state(rank))
        mgr.poll(blocking=True)
        out["after_third"] = mgr.committed_steps()
    return out
