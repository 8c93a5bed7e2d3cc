"""Write throughput of aiockpt's storage against raw write+fsync and plain torch.save.

All on the same state dict, interleaved, each write durable (fsync'd) before the clock
stops:

- raw: one sequential write of the same tensor bytes into one file, then fsync (floor);
- torch.save: plain ``torch.save`` to a path (CRC32 on), then fsync;
- aiockpt file: ``save_file`` as the worker runs it (temp name, xxh3 while writing, no
  CRC32, fsync, rename, directory fsync) plus the metadata commit;
- aiockpt end-to-end: ``AsyncCheckpointManager.save`` from the staged point to the
  committed future (worker process, result back, commit).

Each timed write goes to a fresh file; deleting it and flushing the disk (``os.sync``)
happen outside the clock.

    python benchmarks/storage_throughput.py --size-gib 1 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable

import anyio
import torch

from aiockpt import AsyncCheckpointManager
from aiockpt.storage._local import save_file, write_metadata


def make_state(size_gib: float) -> dict[str, torch.Tensor]:
    n = 64
    per = int(size_gib * 2**30) // n // 4
    return {f"layer{i}.weight": torch.randn(per) for i in range(n)}


def raw(state: dict[str, torch.Tensor], path: str) -> None:
    with open(path, "wb", buffering=0) as f:
        for t in state.values():
            f.write(memoryview(t.numpy()).cast("B"))
        os.fsync(f.fileno())


def plain_torch_save(state: dict[str, torch.Tensor], path: str) -> None:
    torch.save(state, path)
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)


def aiockpt_file(state: dict[str, torch.Tensor], path: str) -> None:
    directory = os.path.dirname(path)
    record = save_file(state, path)
    write_metadata(directory, [record], {})


def timed(fn: Callable[[str], None], root: str, n: int) -> float:
    """Time ``fn`` writing a fresh file; remove it and flush the disk outside the clock, so
    no contender pays for another's deletion or write-back."""
    directory = os.path.join(root, f"run{n}")
    os.makedirs(directory)
    os.sync()
    t = time.perf_counter()
    fn(os.path.join(directory, "ckpt.pt"))
    elapsed = time.perf_counter() - t
    shutil.rmtree(directory)
    os.sync()
    return elapsed


async def end_to_end(state: dict[str, torch.Tensor], root: str, repeats: int) -> list[float]:
    out = []
    async with AsyncCheckpointManager(os.path.join(root, "mgr")) as mgr:
        for step in range(repeats + 1):
            await anyio.to_thread.run_sync(os.sync)
            fut = await mgr.save(step, state)  # returns at the staged point
            t = time.perf_counter()
            await fut
            if step:  # the first save warms the worker and the staging memory
                out.append(time.perf_counter() - t)
            await anyio.to_thread.run_sync(shutil.rmtree, mgr.steps.path(step))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gib", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=None, help="a directory on the disk to measure")
    args = parser.parse_args()
    state = make_state(args.size_gib)
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    root = tempfile.mkdtemp(dir=args.dir)
    try:
        runs: dict[str, list[float]] = {"raw": [], "torch.save": [], "aiockpt file": []}
        fns: dict[str, Callable[[str], None]] = {
            "raw": lambda path: raw(state, path),
            "torch.save": lambda path: plain_torch_save(state, path),
            "aiockpt file": lambda path: aiockpt_file(state, path),
        }
        n = 0
        for repeat in range(args.repeats + 1):  # the first round warms up and is dropped
            for name, fn in fns.items():
                elapsed = timed(fn, root, n)
                n += 1
                if repeat:
                    runs[name].append(elapsed)
        runs["aiockpt end-to-end"] = anyio.run(end_to_end, state, root, args.repeats)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    floor = statistics.median(runs["raw"])
    print(f"{nbytes / 2**30:.2f} GiB in {len(state)} tensors, median of {args.repeats}, fsync'd")
    print(f"{'':22}{'seconds':>9}{'GB/s':>8}{'vs raw':>8}")
    for name, times in runs.items():
        med = statistics.median(times)
        print(f"{name:22}{med:9.3f}{nbytes / med / 1e9:8.2f}{med / floor:7.2f}x")


if __name__ == "__main__":
    main()
