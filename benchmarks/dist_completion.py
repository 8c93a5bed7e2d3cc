"""Cost of global completion, and blocked time per rank, for 1, 2 and 4 ranks on loopback.

Each rank (a spawned process in a gloo group) saves the same per-rank state size several
times with the blocking queue. Per request it measures:

- blocked: ``schedule_async_request`` (the copy to staging buffers);
- completion: once every rank's worker is done (waited for, then a barrier), the time of
  ``maybe_finalize_async_calls(blocking=True, no_dist=False)``: the reduction(s) that turn
  local "done" into global "done";
- collectives: how many the completion check issued for the request.

    python benchmarks/dist_completion.py --ranks 1 2 4 --mib-per-rank 64 --saves 10
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import tempfile
import time
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from aiockpt import AsyncRequest, CheckpointQueue
from aiockpt.storage._local import save_file


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rank(rank: int, world: int, port: int, mib: int, saves: int, out: str, results: Any) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=120),
    )
    state = {f"p{i}": torch.randn(mib * 2**20 // 4 // 16) for i in range(16)}
    queue = CheckpointQueue(persistent=True)
    queue._engine.completion.group()  # collective; outside the timed region
    blocked, completion, collectives = [], [], []
    for n in range(saves + 1):  # the first (cold) save is not counted
        path = os.path.join(out, f"r{rank}-{n}.pt")
        dist.barrier()
        t = time.perf_counter()
        queue.schedule_async_request(AsyncRequest(save_file, (state, path), []))
        b = time.perf_counter() - t
        engine = queue._engine
        engine.wait_local(engine.active[0], None)
        dist.barrier()  # every rank's part is on disk
        before = engine.completion.reductions
        t = time.perf_counter()
        assert queue.maybe_finalize_async_calls(blocking=True, no_dist=False) == [n]
        c = time.perf_counter() - t
        if n:
            blocked.append(b)
            completion.append(c)
            collectives.append(engine.completion.reductions - before)
        os.unlink(path)
    queue.close()
    results.put((rank, blocked, completion, collectives))
    dist.barrier()
    dist.destroy_process_group()


def run(world: int, mib: int, saves: int) -> dict[str, float]:
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(
            _rank,
            args=(world, _free_port(), mib, saves, out, results),
            nprocs=world,
            start_method="spawn",
        )
    rows = [results.get() for _ in range(world)]
    blocked = [b for _, bs, _, _ in rows for b in bs]
    completion = [c for _, _, cs, _ in rows for c in cs]
    collectives = [k for _, _, _, ks in rows for k in ks]
    return {
        "blocked_ms": 1e3 * statistics.median(blocked),
        "blocked_max_ms": 1e3 * max(blocked),
        "completion_ms": 1e3 * statistics.median(completion),
        "completion_p90_ms": 1e3 * sorted(completion)[int(0.9 * (len(completion) - 1))],
        "collectives": statistics.mean(collectives),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--mib-per-rank", type=int, default=64)
    parser.add_argument("--saves", type=int, default=10)
    args = parser.parse_args()
    print(f"{args.mib_per_rank} MiB per rank, {args.saves} warm saves per rank, gloo on loopback")
    print(
        f"{'ranks':>5} {'blocked (median)':>17} {'blocked (max)':>14} "
        f"{'completion (median)':>20} {'completion (p90)':>17} {'collectives/request':>20}"
    )
    for world in args.ranks:
        r = run(world, args.mib_per_rank, args.saves)
        print(
            f"{world:>5} {r['blocked_ms']:>14.1f} ms {r['blocked_max_ms']:>11.1f} ms "
            f"{r['completion_ms']:>17.2f} ms {r['completion_p90_ms']:>14.2f} ms "
            f"{r['collectives']:>20.1f}"
        )


if __name__ == "__main__":
    main()
