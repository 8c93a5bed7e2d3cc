"""DCP-format saves at 2 ranks: aiockpt against ``dcp.async_save``, per rank.

Each rank (a spawned process in a gloo group) holds a DTensor state sharded over the ranks
(``Shard(0)``) and saves it several times with each contender into a DCP checkpoint
directory. For every save it measures, from the call:

- blocked: until the save call returned to the training loop;
- staged:  until the tensors may be modified (staging done);
- durable: until the checkpoint is committed on every rank (``.metadata`` written).

Contenders: ``dcp.async_save`` with the thread and the process executor, each with its
default stager and with ``DefaultStager(StagingOptions(use_async_staging=True,
use_shared_memory=True, use_pinned_memory=False, use_non_blocking_copy=False))`` (the
tuned choice on a CPU machine); aiockpt's ``AsyncDCPCheckpoint`` waiting for staging and
with lazy staging, and the blocking ``DCPCheckpoint``; and two floors: an in-place
copy of the local shards, and a raw write and fsync of them. The first save of each
contender is a warm-up and not counted; figures are medians.

    python benchmarks/dcp_bench.py --mib 1024 --saves 3
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import anyio
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

Timing = tuple[float, float, float]  # blocked, staged, durable (seconds)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _state(mib: int, world: int) -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    rows = 64 * world
    per_tensor = mib * 2**20 // 8  # 8 tensors of float32
    cols = max(1, per_tensor // 4 // rows)
    state = {}
    for i in range(8):
        full = torch.empty(rows, cols, dtype=torch.float32).uniform_()
        state[f"layer{i}.weight"] = distribute_tensor(full, mesh, [Shard(0)])
    return {"model": state, "step": 0}


def _local(state: dict[str, Any]) -> list[torch.Tensor]:
    return [t.to_local() for t in state["model"].values()]


def _dcp(kind: str, tuned: bool) -> Callable[[dict[str, Any], str], Timing]:
    from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
    from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType, async_save

    executor = AsyncCheckpointerType.PROCESS if kind == "process" else AsyncCheckpointerType.THREAD
    stager = (
        DefaultStager(
            StagingOptions(
                use_pinned_memory=False,
                use_shared_memory=True,
                use_async_staging=True,
                use_non_blocking_copy=False,
            )
        )
        if tuned
        else None
    )

    def save(state: dict[str, Any], path: str) -> Timing:
        t = time.perf_counter()
        response = async_save(
            state, checkpoint_id=path, async_checkpointer_type=executor, async_stager=stager
        )
        blocked = time.perf_counter() - t
        staging = getattr(response, "staging_completion", None)
        upload = getattr(response, "upload_completion", response)
        if staging is not None:
            staging.result()
        staged = time.perf_counter() - t
        upload.result()
        return blocked, staged, time.perf_counter() - t

    return save


def _floor() -> Callable[[dict[str, Any], str], Timing]:
    dst: list[torch.Tensor] = []

    def copy(state: dict[str, Any], path: str) -> Timing:
        src = _local(state)
        if not dst:  # allocated and touched once: a floor, not a first-touch measurement
            dst.extend(torch.empty_like(s).copy_(s) for s in src)
        t = time.perf_counter()
        for d, s in zip(dst, src, strict=True):
            d.copy_(s)
        took = time.perf_counter() - t
        return took, took, float("nan")

    return copy


def _write_floor(state: dict[str, Any], path: str) -> Timing:
    """This rank's local shards written raw to one file and fsync'd: what any durable
    save of them costs at least."""
    os.makedirs(path, exist_ok=True)
    t = time.perf_counter()
    with open(os.path.join(path, f"raw-{dist.get_rank()}"), "wb", buffering=0) as f:
        for src in _local(state):
            f.write(src.contiguous().view(torch.uint8).numpy().data)
        os.fsync(f.fileno())
    took = time.perf_counter() - t
    return float("nan"), float("nan"), took


def _rank(rank: int, world: int, port: int, args: Any, out: str, results: Any) -> None:
    from aiockpt.dcp import AsyncDCPCheckpoint, DCPCheckpoint

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(minutes=5),
    )
    state = _state(args.mib, world)
    report: dict[str, list[Timing]] = {}

    def run(name: str, save: Callable[[dict[str, Any], str], Timing]) -> None:
        if args.only and not any(o in name for o in args.only):
            return
        timings = []
        for i in range(args.saves + 1):
            path = os.path.join(out, f"{name.replace(' ', '_')}-{i}")
            dist.barrier()
            timing = save(state, path)
            dist.barrier()
            if i:  # the first save warms up (plans, allocates, starts workers)
                timings.append(timing)
            if rank == 0:
                shutil.rmtree(path, ignore_errors=True)
        report[name] = timings

    run("floor: in-place copy_", _floor())
    run("floor: raw write+fsync", _write_floor)
    run("dcp.async_save thread", _dcp("thread", tuned=False))
    run("dcp.async_save thread+tuned stager", _dcp("thread", tuned=True))
    run("dcp.async_save process", _dcp("process", tuned=False))
    run("dcp.async_save process+tuned stager", _dcp("process", tuned=True))

    blocking = DCPCheckpoint()

    def aiockpt_blocking(state: dict[str, Any], path: str) -> Timing:
        t = time.perf_counter()
        blocking.async_save(state, path)
        b = time.perf_counter() - t
        blocking.finalize_async_save(blocking=True, no_dist=False)
        return b, b, time.perf_counter() - t

    run("aiockpt DCPCheckpoint", aiockpt_blocking)
    blocking.close()

    async def aiockpt_async() -> None:
        async with AsyncDCPCheckpoint() as ckpt:
            for lazy in (False, True):

                def save(state: dict[str, Any], path: str, lazy: bool = lazy) -> Timing:
                    async def one() -> Timing:
                        t = time.perf_counter()
                        fut = await ckpt.save(state, path, wait_for_staging=not lazy)
                        b = time.perf_counter() - t
                        await fut.staged
                        s = time.perf_counter() - t
                        await fut
                        return b, s, time.perf_counter() - t

                    return anyio.from_thread.run(one)

                name = "aiockpt AsyncDCPCheckpoint" + (" lazy" if lazy else "")
                await anyio.to_thread.run_sync(run, name, save)

    anyio.run(aiockpt_async)
    results.put((rank, report))
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--mib", type=int, default=1024, help="total state size over all ranks")
    parser.add_argument("--saves", type=int, default=3, help="counted saves per contender")
    parser.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    parser.add_argument("--only", nargs="*", default=None, help="contenders whose name has this")
    args = parser.parse_args()
    out = tempfile.mkdtemp(prefix="dcp-bench-", dir=args.dir)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [
        ctx.Process(target=_rank, args=(r, args.ranks, port, args, out, results))
        for r in range(args.ranks)
    ]
    for p in procs:
        p.start()
    reports = dict(results.get() for _ in procs)
    for p in procs:
        p.join()
    shutil.rmtree(out, ignore_errors=True)
    print(
        f"DCP-format saves, {args.ranks} ranks, {args.mib} MiB in total "
        f"({args.mib / args.ranks:.0f} MiB per rank), median of {args.saves} warm saves"
    )
    print(f"{'contender':40}{'rank':>5}{'blocked':>11}{'staged':>11}{'durable':>11}")
    for name in reports[0]:
        for rank in range(args.ranks):
            timings = reports[rank][name]
            b, s, d = (statistics.median(x) for x in zip(*timings, strict=True))
            print(f"{name:40}{rank:>5}{b * 1e3:>9.1f}ms{s * 1e3:>9.1f}ms{d * 1e3:>9.1f}ms")


if __name__ == "__main__":
    main()
