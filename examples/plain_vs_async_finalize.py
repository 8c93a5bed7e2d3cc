"""The same training loop twice: a plain loop that finalizes without blocking (the
reference pattern), and its async version, where the poller finalizes and the loop just
keeps the futures.

    python examples/plain_vs_async_finalize.py --steps 20 --every 5 --out /tmp/ckpts
"""

from __future__ import annotations

import argparse
import os

import anyio
import torch
from torch import nn

from aiockpt import AsyncTorchCheckpoint, CheckpointFuture, TorchCheckpoint


def make() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Linear(256, 256)
    return model, torch.optim.SGD(model.parameters(), lr=0.01)


def step(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    loss = model(torch.randn(32, 256)).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


def plain_loop(steps: int, every: int, out: str) -> list[int]:
    model, opt = make()
    ckpt = TorchCheckpoint(persistent=True)
    done: list[int] = []
    for i in range(1, steps + 1):
        done += ckpt.finalize_async_save(blocking=False)  # never waits
        step(model, opt)
        if i % every == 0:
            ckpt.async_save(model.state_dict(), os.path.join(out, f"plain{i}.pt"))
    done += ckpt.finalize_async_save(blocking=True, terminate=True)
    return done


async def async_loop(steps: int, every: int, out: str) -> list[int]:
    model, opt = make()
    futures: list[CheckpointFuture] = []
    async with AsyncTorchCheckpoint() as ckpt:
        for i in range(1, steps + 1):
            step(model, opt)
            if i % every == 0:
                futures.append(
                    await ckpt.save(model.state_dict(), os.path.join(out, f"async{i}.pt"))
                )
            await anyio.sleep(0)
        return [r.call_idx for r in await ckpt.finalize()]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--every", type=int, default=5)
    parser.add_argument("--out", default="ckpt-demo")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    print("plain loop finalized calls:", plain_loop(args.steps, args.every, args.out))
    print("async loop finalized calls:", anyio.run(async_loop, args.steps, args.every, args.out))
    same = all(
        torch.equal(
            torch.load(os.path.join(args.out, f"plain{i}.pt"), weights_only=True)["weight"],
            torch.load(os.path.join(args.out, f"async{i}.pt"), weights_only=True)["weight"],
        )
        for i in range(args.every, args.steps + 1, args.every)
    )
    print("both loops wrote identical checkpoints:", same)


if __name__ == "__main__":
    main()
