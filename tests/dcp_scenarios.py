"""DCP-format scenarios run on every rank by dist_harness.run_ranks ("dcp_scenarios:name")."""

from __future__ import annotations

import os
import signal
from typing import Any

import anyio
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

import aiockpt.dcp
from aiockpt import CheckpointError
from aiockpt.dcp import AsyncDCPCheckpoint, DCPCheckpoint, dcp_save_request
from aiockpt.dcp._write import write_rank_files
from aiockpt.utils import wrap_for_async


def global_tensors(offset: float = 0.0) -> dict[str, torch.Tensor]:
    """The full tensors every scenario saves (``offset`` tells checkpoints apart)."""
    return {
        "row": torch.arange(12 * 6, dtype=torch.float32).reshape(12, 6) + offset,
        "uneven": torch.arange(10 * 3, dtype=torch.float64).reshape(10, 3) * 0.5 + offset,
        "rep": torch.linspace(0, 1, 7) + offset,
        "plain": torch.arange(5, dtype=torch.int64) * 3 + int(offset),
    }


def dtensor_state(mesh: DeviceMesh, offset: float = 0.0) -> dict[str, Any]:
    g = global_tensors(offset)
    return {
        "model": {
            "row": distribute_tensor(g["row"], mesh, [Shard(0)]),
            "uneven": distribute_tensor(g["uneven"], mesh, [Shard(0)]),
            "rep": distribute_tensor(g["rep"], mesh, [Replicate()]),
        },
        "plain": g["plain"],
        "step": 7 + int(offset),
    }


def mismatches(state: dict[str, Any], offset: float) -> list[str]:
    """Names whose loaded values differ from ``global_tensors(offset)`` (collective for
    DTensors)."""
    g = global_tensors(offset)
    bad = []
    for name in ("row", "uneven", "rep"):
        t = state["model"][name]
        full = t.full_tensor() if isinstance(t, DTensor) else t
        if not torch.equal(full, g[name]):
            bad.append(name)
    if not torch.equal(state["plain"], g["plain"]):
        bad.append("plain")
    if state["step"] != 7 + int(offset):
        bad.append("step")
    return bad


def _mesh(world: int) -> DeviceMesh:
    return init_device_mesh("cpu", (world,))


def dtensor_save(rank: int, world: int, tmp: str, mode: str) -> dict[str, Any]:
    """Two saves (offsets 0 and 1) of DTensors into ``ckpt-a`` and ``ckpt-b``; the local
    shards are overwritten as soon as each save says they are staged."""
    mesh = _mesh(world)
    out: dict[str, Any] = {}

    def scribble(sd: dict[str, Any]) -> None:
        for t in sd["model"].values():
            t.to_local().fill_(-1)
        sd["plain"].fill_(-1)

    if mode == "blocking":
        ckpt = DCPCheckpoint(thread_count=2)
        for offset, name in ((0, "ckpt-a"), (1, "ckpt-b")):
            sd = dtensor_state(mesh, offset)
            ckpt.async_save(sd, os.path.join(tmp, name))
            scribble(sd)
        out["finalized"] = ckpt.finalize_async_save(blocking=True, no_dist=False, terminate=True)
        cache = ckpt.plan_cache
    else:

        async def main() -> Any:
            async with AsyncDCPCheckpoint() as ckpt:
                finalized = []
                for offset, name in ((0, "ckpt-a"), (1, "ckpt-b")):
                    sd = dtensor_state(mesh, offset)
                    fut = await ckpt.save(
                        sd, os.path.join(tmp, name), wait_for_staging=mode != "lazy"
                    )
                    await fut.staged
                    scribble(sd)
                    finalized.append((await fut).call_idx)
                # Each was retrieved through its future: nothing is left to report.
                assert await ckpt.finalize() == []
                out["finalized"] = finalized
                return ckpt.plan_cache

        cache = anyio.run(main)
    assert cache is not None
    out["plannings"], out["reuses"] = cache.plannings, cache.reuses
    return out


def dtensor_load(rank: int, world: int, tmp: str, name: str, offset: float, loader: str) -> Any:
    """Load ``name`` into zeroed DTensors sharded over this world; the mismatching names."""
    mesh = _mesh(world)
    sd = dtensor_state(mesh, 0)
    for t in sd["model"].values():
        t.to_local().zero_()
    sd["plain"].zero_()
    sd["step"] = 0
    path = os.path.join(tmp, name)
    if loader == "dcp":
        dcp.load(sd, checkpoint_id=path)
    else:
        aiockpt.dcp.load(sd, path)
    return mismatches(sd, offset)


def _model(world: int, seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    mesh = _mesh(world)
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    return model, opt


def _full(obj: Any) -> Any:
    if isinstance(obj, DTensor):
        return obj.full_tensor()
    if isinstance(obj, torch.Tensor):
        return obj.clone()
    if isinstance(obj, dict):
        return {k: _full(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_full(v) for v in obj]
    return obj


def fsdp_save(rank: int, world: int, tmp: str) -> dict[str, Any]:
    """An FSDP2 model and its Adam state after two steps, saved through the blocking API;
    rank 0 records the full tensors the checkpoint must hold."""
    model, opt = _model(world, seed=0)
    for step in range(2):
        torch.manual_seed(100 + step)
        model(torch.randn(4, 16)).sum().backward()
        opt.step()
        opt.zero_grad()
    msd, osd = get_state_dict(model, opt)
    state = {"model": msd, "optim": osd}
    expected = _full(state)
    if rank == 0:
        torch.save(expected, os.path.join(tmp, "expected.pt"))
    ckpt = DCPCheckpoint()
    ckpt.async_save(state, os.path.join(tmp, "fsdp"))
    finalized = ckpt.finalize_async_save(blocking=True, no_dist=False, terminate=True)
    return {"finalized": finalized, "types": sorted({type(v).__name__ for v in msd.values()})}


def fsdp_load(rank: int, world: int, tmp: str, loader: str) -> list[str]:
    """A differently initialised FSDP2 model at this world size loads the checkpoint; the
    names whose full values differ from what was saved."""
    model, opt = _model(world, seed=1)
    msd, osd = get_state_dict(model, opt)
    state = {"model": msd, "optim": osd}
    path = os.path.join(tmp, "fsdp")
    if loader == "dcp":
        dcp.load(state, checkpoint_id=path)
    else:
        aiockpt.dcp.load(state, path)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    got = _full(dict(zip(("model", "optim"), get_state_dict(model, opt), strict=True)))
    expected = torch.load(os.path.join(tmp, "expected.pt"), weights_only=True)
    bad = [k for k, v in expected["model"].items() if not torch.equal(got["model"][k], v)]
    for fqn, entries in expected["optim"]["state"].items():
        for key, value in entries.items():
            if not torch.equal(got["optim"]["state"][fqn][key], value):
                bad.append(f"optim.{fqn}.{key}")
    return bad


def write_then_stall(
    buckets: Any, directory: str, thread_count: int, gate: str, pid_path: str
) -> Any:
    """The real write, then the worker's pid, then a block on the FIFO ``gate``: the test
    kills the worker there, its files durable but never reported."""
    result = write_rank_files(buckets, directory, thread_count)
    with open(pid_path, "w") as f:
        f.write(str(os.getpid()))
    with open(gate) as g:
        g.read()
    return result


def kill_stalled_worker(gate: str, pid_path: str) -> None:
    """SIGKILL the worker blocked in ``write_then_stall`` on ``gate``."""
    # Opening the FIFO returns once the worker opened it: its pid is written by then.
    fd = os.open(gate, os.O_WRONLY)
    with open(pid_path) as f:
        os.kill(int(f.read()), signal.SIGKILL)
    os.close(fd)


def worker_killed(rank: int, world: int, tmp: str) -> dict[str, Any]:
    """Save ``good``; then the last rank's worker is SIGKILLed while saving ``bad``; then
    save ``after``. Reports what every rank saw."""
    mesh = _mesh(world)
    gate = os.path.join(tmp, "gate")
    pid_path = os.path.join(tmp, "pid")
    if rank == world - 1:
        os.mkfifo(gate)
    out: dict[str, Any] = {}

    def kill_worker() -> None:
        kill_stalled_worker(gate, pid_path)

    async def main() -> None:
        async with AsyncDCPCheckpoint() as ckpt:
            await (await ckpt.save(dtensor_state(mesh, 0), os.path.join(tmp, "good")))
            request = dcp_save_request(
                dtensor_state(mesh, 1),
                os.path.join(tmp, "bad"),
                ckpt.queue.engine.completion,
                cache=ckpt.plan_cache,
            )
            if rank == world - 1:
                request = request._replace(
                    async_fn=wrap_for_async(write_then_stall),
                    async_fn_args=(*request.async_fn_args, gate, pid_path),
                )
            fut = await ckpt.queue.schedule(request, needs_global=True)
            if rank == world - 1:
                await anyio.to_thread.run_sync(kill_worker)
            try:
                await fut
                out["error"] = None
            except CheckpointError as err:
                out["error"] = type(err).__name__
                out["failed_ranks"] = getattr(err, "failed_ranks", None)
                out["cause"] = type(err.__cause__).__name__ if err.__cause__ else None
                out["message"] = str(err)
            out["bad_metadata"] = os.path.exists(os.path.join(tmp, "bad", ".metadata"))
            await (await ckpt.save(dtensor_state(mesh, 2), os.path.join(tmp, "after")))

    anyio.run(main)
    return out


def rank_fails(rank: int, world: int, tmp: str) -> dict[str, Any]:
    """The last rank cannot write its data file (a directory holds its name): every rank's
    finalize raises, no ``.metadata``; then a save elsewhere still commits."""
    from ckpt_helpers import fix_attempts

    from aiockpt.dcp import _plan

    mesh = _mesh(world)
    bad = os.path.join(tmp, "bad")
    if rank == world - 1:  # a directory holds the name of this rank's data file
        token = fix_attempts(_plan)
        os.makedirs(os.path.join(bad, f"__{rank}_0.{token}.distcp"))
    dist.barrier()
    ckpt = DCPCheckpoint()
    ckpt.async_save(dtensor_state(mesh, 1), bad)
    out: dict[str, Any] = {}
    try:
        ckpt.finalize_async_save(blocking=True, no_dist=False)
        out["error"] = None
    except CheckpointError as err:
        out.update(
            error=type(err).__name__,
            failed_ranks=getattr(err, "failed_ranks", None),
            message=str(err),
            call_idx=err.call_idx,
        )
    out["bad_metadata"] = os.path.exists(os.path.join(bad, ".metadata"))
    ckpt.async_save(dtensor_state(mesh, 2), os.path.join(tmp, "after"))
    out["after"] = ckpt.finalize_async_save(blocking=True, no_dist=False, terminate=True)
    return out


def nvrx_flow(rank: int, world: int, tmp: str) -> dict[str, Any]:
    """NVRx's DCP flow, names imported from aiockpt.dcp, on aiockpt's blocking queue: two
    saves with the plan cache; the second plans without communicating."""
    from aiockpt import AsyncRequest, CheckpointQueue
    from aiockpt.dcp import (
        FileSystemWriterAsync,
        SavePlanCache,
        save_state_dict_async_finalize,
        save_state_dict_async_plan,
    )

    mesh = _mesh(world)
    queue = CheckpointQueue(persistent=True)
    cache = SavePlanCache()
    order: list[int] = []
    for offset, name in ((0, "nvrx-a"), (1, "nvrx-b")):
        writer = FileSystemWriterAsync(os.path.join(tmp, name), thread_count=2)
        ret = save_state_dict_async_plan(
            dtensor_state(mesh, offset), writer, None, 0, enable_cache=True, metadata_cache=cache
        )
        save_fn, preload_fn, save_args = writer.get_save_function_and_args()

        def finalize_fn(ret: Any = ret, offset: int = offset) -> None:
            save_state_dict_async_finalize(*ret)
            order.append(offset)

        queue.schedule_async_request(
            AsyncRequest(save_fn, tuple(save_args), [finalize_fn], preload_fn=preload_fn)
        )
    finalized = queue.maybe_finalize_async_calls(blocking=True, no_dist=False)
    queue.close()
    return {
        "finalized": finalized,
        "order": order,
        "plannings": cache.plannings,
        "reuses": cache.reuses,
        "leftovers": sorted(n for n in os.listdir(os.path.join(tmp, "nvrx-a")) if "results" in n),
    }


def sharded_tensor(world: int, offset: float = 0.0) -> Any:
    """A (legacy) ShardedTensor of shape (8, 3), split by rows over ``world`` ranks."""
    from torch.distributed._shard.metadata import ShardMetadata
    from torch.distributed._shard.sharded_tensor import Shard as STShard
    from torch.distributed._shard.sharded_tensor import init_from_local_shards

    rank = dist.get_rank()
    full = torch.arange(8 * 3, dtype=torch.float32).reshape(8, 3) + offset
    rows = 8 // world
    local = full[rank * rows : (rank + 1) * rows].clone()
    meta = ShardMetadata([rank * rows, 0], [rows, 3], f"rank:{rank}/cpu")
    return init_from_local_shards([STShard(local, meta)], [8, 3])


def sharded_tensor_save(rank: int, world: int, tmp: str) -> dict[str, Any]:
    """A ShardedTensor state saved by DCPCheckpoint; its local shard scribbled on as
    soon as the save returns (staged)."""
    ckpt = DCPCheckpoint()
    st = sharded_tensor(world, 1.0)
    ckpt.async_save({"st": st}, os.path.join(tmp, "st"))
    st.local_shards()[0].tensor.fill_(-1)
    finalized = ckpt.finalize_async_save(blocking=True, no_dist=False, terminate=True)
    return {"finalized": finalized}
