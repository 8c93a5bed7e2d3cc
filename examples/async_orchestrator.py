"""An async training orchestrator: an ``async def`` loop that checkpoints every N steps
without waiting for the disk. Staging is lazy: the copy overlaps the next forward and
backward passes, and the loop awaits ``fut.staged`` only right before ``optimizer.step()``
changes the parameters. The previous checkpoint's future is awaited only when the next
one is due, so a slow disk shows up there, never as a stall inside a step.

    python examples/async_orchestrator.py --steps 30 --every 10 --out /tmp/ckpts
"""

from __future__ import annotations

import argparse
import os
import time

import anyio
import torch
from torch import nn

from aiockpt import AsyncTorchCheckpoint, CheckpointFuture


async def train(steps: int, every: int, out: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 1024), nn.ReLU(), nn.Linear(1024, 10))
    opt = torch.optim.AdamW(model.parameters())
    previous: CheckpointFuture | None = None
    awaited = 0
    async with AsyncTorchCheckpoint() as ckpt:
        for step in range(1, steps + 1):
            pending: CheckpointFuture | None = None
            if step % every == 0:
                if previous is not None:
                    result = await previous  # raises CheckpointError if that save failed
                    awaited += 1
                    print(
                        f"step {step}: checkpoint {result.call_idx} done "
                        f"(worker wrote it in {result.run_seconds * 1e3:.0f} ms)"
                    )
                t = time.perf_counter()
                state = {"model": model.state_dict(), "optim": opt.state_dict(), "step": step}
                path = os.path.join(out, f"step{step:06d}.pt")
                pending = await ckpt.save(state, path, wait_for_staging=False)
                print(f"step {step}: scheduled {path} in {(time.perf_counter() - t) * 1e3:.2f} ms")
            x, y = torch.randn(64, 512), torch.randint(0, 10, (64,))
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            if pending is not None:
                t = time.perf_counter()
                await pending.staged  # parameters change below: the copy must be done
                print(f"step {step}: waited {(time.perf_counter() - t) * 1e3:.2f} ms for staging")
                previous = pending
            opt.step()
            await anyio.sleep(0)  # let other tasks of the orchestrator run
        results = await ckpt.finalize()  # the saves not awaited above
    print(f"finished: {awaited + len(results)} checkpoint(s), {len(results)} finalized at exit")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--out", default="ckpt-demo")
    parser.add_argument("--backend", default="asyncio", choices=["asyncio", "trio"])
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    anyio.run(train, args.steps, args.every, args.out, backend=args.backend)


if __name__ == "__main__":
    main()
