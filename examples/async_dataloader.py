"""An async data loader keeps prefetching while a checkpoint is staged and written.

The loader is an async generator that fetches batches with simulated I/O latency
(``anyio.sleep``) and feeds them to training. Checkpoints are saved meanwhile; because
staging runs in a worker thread and writing in a worker process, the loader keeps
producing the whole time. The example prints how many batches arrived during the save.

    python examples/async_dataloader.py --size-mb 256 --out /tmp/ckpts
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import AsyncIterator

import anyio
import torch

from aiockpt import AsyncTorchCheckpoint


async def batches(latency: float) -> AsyncIterator[tuple[float, torch.Tensor]]:
    """Yields (arrival time, batch) forever, each after ``latency`` seconds of 'I/O'."""
    while True:
        await anyio.sleep(latency)
        yield time.perf_counter(), torch.randn(32, 128)


async def run(size_mb: int, out: str, latency: float, saves: int) -> None:
    state = {f"layer{i}": torch.randn(size_mb * 2**20 // 4 // 8) for i in range(8)}
    arrivals: list[float] = []
    consumed = 0

    async def prefetch_and_train() -> None:
        nonlocal consumed
        async for arrived, _batch in batches(latency):
            arrivals.append(arrived)
            consumed += 1  # a real loop would run a training step on the batch here

    async with AsyncTorchCheckpoint() as ckpt, anyio.create_task_group() as tg:
        tg.start_soon(prefetch_and_train)
        for n in range(1, saves + 1):
            start = time.perf_counter()
            fut = await ckpt.save(state, os.path.join(out, f"loader{n}.pt"), wait_for_staging=False)
            await fut.staged
            staged = time.perf_counter()
            result = await fut
            end = time.perf_counter()
            during = sum(1 for t in arrivals if start <= t <= end)
            print(
                f"save {n} ({size_mb} MiB): staged after {(staged - start) * 1e3:.0f} ms, on disk "
                f"after {(end - start) * 1e3:.0f} ms (worker {result.run_seconds * 1e3:.0f} ms); "
                f"batches that arrived meanwhile: {during} "
                f"(at the loader's nominal pace: {(end - start) / latency:.0f})"
            )
        tg.cancel_scope.cancel()
    print(f"the loader delivered {consumed} batches in all")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mb", type=int, default=256)
    parser.add_argument("--latency-ms", type=float, default=5.0)
    parser.add_argument("--saves", type=int, default=2)
    parser.add_argument("--out", default="ckpt-demo")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    anyio.run(run, args.size_mb, args.out, args.latency_ms / 1000, args.saves)


if __name__ == "__main__":
    main()
