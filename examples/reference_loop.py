"""The reference usage pattern with aiockpt: poll without blocking every step, save on a
condition, finalize with blocking at the end. Switching from nvidia_resiliency_ext is the
import line below.

    python examples/reference_loop.py --steps 30 --every 10 --out /tmp/ckpts
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from torch import nn

from aiockpt import TorchAsyncCheckpoint  # was: from nvidia_resiliency_ext...async_ckpt import


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--out", default="ckpt-demo")
    parser.add_argument("--fork", action="store_true", help="fork a process per save")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
    opt = torch.optim.AdamW(model.parameters())
    async_impl = TorchAsyncCheckpoint(persistent_queue=not args.fork)

    for step in range(1, args.steps + 1):
        for idx in async_impl.finalize_async_save(blocking=False):
            print(f"step {step}: checkpoint call {idx} is on disk")
        x, y = torch.randn(32, 512), torch.randint(0, 10, (32,))
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % args.every == 0:
            t = time.perf_counter()
            path = os.path.join(args.out, f"step{step:06d}.pt")
            async_impl.async_save({"model": model.state_dict(), "step": step}, path)
            print(
                f"step {step}: scheduled {path} (loop blocked {1e3 * (time.perf_counter() - t):.1f} ms)"
            )

    for idx in async_impl.finalize_async_save(blocking=True, terminate=True):
        print(f"end: checkpoint call {idx} is on disk")


if __name__ == "__main__":
    main()
