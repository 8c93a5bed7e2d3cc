"""Write throughput of aiockpt's storage against raw write+fsync and plain torch.save.

All on the same state dict, interleaved, each write durable (fsync'd) before the clock
stops:

- raw: one sequential write of the same tensor bytes into one file, then fsync (floor);
- torch.save: plain ``torch.save`` to a path (CRC32 on), then fsync;
- aiockpt file: ``save_file`` as the worker runs it (temp name, xxh3 while writing, no
  CRC32, fsync, rename, directory fsync) plus the metadata commit;
- aiockpt end-to-end: ``AsyncCheckpointManager.save`` from the staged point to the
  committed future (worker process, result back, commit), minus nothing.

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
from aiockpt._storage import save_file, write_metadata


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


def timed(fn: Callable[[], None]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


async def end_to_end(state: dict[str, torch.Tensor], root: str, repeats: int) -> list[float]:
    out = []
    async with AsyncCheckpointManager(os.path.join(root, "mgr"), keep_last=1) as mgr:
        for step in range(repeats + 1):
            fut = await mgr.save(step, state)  # returns at the staged point
            t = time.perf_counter()
            await fut
            if step:  # the first save warms the worker and the staging memory
                out.append(time.perf_counter() - t)
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
        fns = {
            "raw": lambda: raw(state, os.path.join(root, "raw.bin")),
            "torch.save": lambda: plain_torch_save(state, os.path.join(root, "plain.pt")),
            "aiockpt file": lambda: aiockpt_file(state, os.path.join(root, "ck", "a.pt")),
        }
        os.makedirs(os.path.join(root, "ck"))
        for fn in fns.values():  # warm-up: the files exist, the page cache is primed
            fn()
        for _ in range(args.repeats):
            for name, fn in fns.items():
                runs[name].append(timed(fn))
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
