"""Event-loop figures of the async facade, printed (not asserted):

1. worst heartbeat lag: a task ticking every 1 ms while a state dict is staged and written
   (torch keeps its default thread count, as in a training program);
2. the caller's blocked time (``await queue.schedule`` returning) for a warm save, against an
   in-place ``copy_`` of the same tensors into preallocated buffers, in the same run;
3. lazy staging: how much of the copy overlaps a training step's compute that runs
   synchronously ON THE LOOP THREAD right after ``schedule`` returns (torch kernels that
   release the GIL, no ``await`` in between), and what is left to wait at ``fut.staged``;
4. the idle queue: its CPU use, and the threads that are inside aiockpt (none expected).

    python benchmarks/async_responsiveness.py --size-gib 1 --saves 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time

import anyio
import torch

from aiockpt import AsyncTorchCheckpoint


def make_state(size_gib: float) -> dict[str, torch.Tensor]:
    total = int(size_gib * 2**30)
    big = total * 9 // 10 // 32  # bytes per large tensor
    state = {f"layers.{i}.weight": torch.randn(big // 4) for i in range(32)}
    small = (total - 32 * big) // 400
    state.update(
        {f"norms.{i}": torch.randn(max(small // 2, 1), dtype=torch.bfloat16) for i in range(200)}
    )
    return state


def inplace_copy_seconds(state: dict[str, torch.Tensor], repeats: int = 3) -> float:
    dst = {k: torch.empty_like(v) for k, v in state.items()}
    for k in state:  # touch the pages once: the floor is a warm copy
        dst[k].copy_(state[k])
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        for k, v in state.items():
            dst[k].copy_(v)
        times.append(time.perf_counter() - t)
    return min(times)


class Heartbeat:
    def __init__(self, period: float = 0.001) -> None:
        self.period = period
        self.ticks: list[tuple[float, float]] = []  # (time, lag)

    async def run(self) -> None:
        while True:
            t = time.perf_counter()
            await anyio.sleep(self.period)
            now = time.perf_counter()
            self.ticks.append((now, now - t - self.period))

    def worst(self, start: float, end: float) -> float:
        lags = [lag for t, lag in self.ticks if start <= t <= end]
        return max(lags) if lags else float("nan")


def gil_free_compute(seconds: float) -> None:
    """Stand-in for a forward/backward pass: torch kernels run without the GIL."""
    a = torch.randn(256, 256)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        a = (a @ a).tanh_()


async def main(size_gib: float, saves: int, out_dir: str, parallel: bool) -> None:
    state = make_state(size_gib)
    nbytes = sum(v.numel() * v.element_size() for v in state.values())
    print(f"state dict: {len(state)} tensors, {nbytes / 2**30:.2f} GiB")
    floor = inplace_copy_seconds(state)
    print(f"in-place copy_ floor: {floor * 1e3:.1f} ms")
    beat = Heartbeat()
    rows = []
    async with AsyncTorchCheckpoint(single_threaded_staging=not parallel) as ckpt:
        async with anyio.create_task_group() as tg:
            tg.start_soon(beat.run)
            for n in range(saves):
                path = os.path.join(out_dir, f"bench{n}.pt")
                start = time.perf_counter()
                fut = await ckpt.save(state, path)
                blocked = time.perf_counter() - start
                await fut
                end = time.perf_counter()
                rows.append((n, blocked, end - start, beat.worst(start, end)))
                await anyio.to_thread.run_sync(os.unlink, path)  # freeing 1 GiB takes a while
            print("\nsave  blocked (await schedule)  until on disk  worst heartbeat lag")
            for n, blocked, total, lag in rows:
                tag = "cold" if n == 0 else "warm"
                print(
                    f"{n} {tag}  {blocked * 1e3:10.1f} ms {'':12}{total * 1e3:9.0f} ms  {lag * 1e3:12.2f} ms"
                )
            warm = [b for n, b, _, _ in rows if n > 0] or [rows[0][1]]
            warm_blocked = statistics.median(warm)
            print(
                f"\nwarm blocked / in-place copy floor: {statistics.median(warm) / floor:.2f}x"
                f" (median of {len(warm)})"
            )
            print(f"worst heartbeat lag over all saves: {max(r[3] for r in rows) * 1e3:.2f} ms")

            # Lazy staging: the step runs on the loop thread itself, as a training loop does.
            compute = max(2.5 * floor, 0.05)
            lazy_blocked = []
            for n in range(saves):
                path = os.path.join(out_dir, f"lazy{n}.pt")
                t = time.perf_counter()
                fut = await ckpt.save(state, path, wait_for_staging=False)
                returned = time.perf_counter() - t
                gil_free_compute(compute)  # synchronous: blocks this loop, not the stager
                t = time.perf_counter()
                await fut.staged
                lazy_blocked.append(returned + time.perf_counter() - t)
                await fut
                await anyio.to_thread.run_sync(os.unlink, path)
            blocked = statistics.median(lazy_blocked)
            print(
                f"lazy staging, {compute * 1e3:.0f} ms step on the loop thread: blocked "
                f"{blocked * 1e3:.2f} ms per checkpoint (median of {len(lazy_blocked)}; "
                f"returns + await fut.staged); overlap with compute "
                f"{100 * max(0.0, 1 - blocked / max(warm_blocked, 1e-9)):.0f}% of the "
                f"{warm_blocked * 1e3:.0f} ms a staged save blocks"
            )

            tg.cancel_scope.cancel()
        idle = 3.0
        cpu0, t0 = time.process_time(), time.perf_counter()
        await anyio.sleep(idle)
        cpu = time.process_time() - cpu0
        wall = time.perf_counter() - t0
        print(
            f"idle queue: {100 * cpu / wall:.3f}% of one core over {wall:.1f} s "
            "(whole process, queue open, nothing scheduled)"
        )
        me = threading.get_ident()
        inside = [
            ident
            for ident, frame in sys._current_frames().items()
            if ident != me and _in_aiockpt(frame)
        ]
        print(
            f"idle queue: {len(inside)} thread(s) inside aiockpt, "
            f"{threading.active_count()} thread(s) in the process"
        )


def _in_aiockpt(frame: object) -> bool:
    while frame is not None:
        if f"{os.sep}aiockpt{os.sep}" in frame.f_code.co_filename:  # type: ignore[attr-defined]
            return True
        frame = frame.f_back  # type: ignore[attr-defined]
    return False


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gib", type=float, default=1.0)
    parser.add_argument("--saves", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    parser.add_argument("--backend", default="asyncio", choices=["asyncio", "trio"])
    parser.add_argument(
        "--parallel-staging", action="store_true", help="stage with torch's intra-op threads"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        anyio.run(main, args.size_gib, args.saves, tmp, args.parallel_staging, backend=args.backend)
