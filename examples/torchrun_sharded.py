"""Distributed async checkpoints under torchrun, on CPU (gloo):

    torchrun --nproc-per-node 2 examples/torchrun_sharded.py --out /tmp/ckpts

Each rank trains its own replica (DDP-style all-reduce of gradients), writes its own shard in
the background, and rank 0 commits each checkpoint (metadata.json) only once every rank's
shard is durable. The loop is the reference pattern with global completion.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch import nn

from aiockpt import TorchCheckpoint


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--out", default="ckpt-demo")
    args = parser.parse_args()

    dist.init_process_group("gloo")  # torchrun's env:// rendezvous
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    ckpt = TorchCheckpoint(persistent=True)
    pending: dict[int, str] = {}

    def report(indices: list[int]) -> None:
        for idx in indices:
            if rank == 0:
                print(f"rank 0: committed {pending[idx]}", flush=True)
            del pending[idx]

    for step in range(1, args.steps + 1):
        report(ckpt.finalize_async_save(blocking=False, no_dist=False))
        torch.manual_seed(1000 * rank + step)
        loss = nn.functional.cross_entropy(model(torch.randn(32, 256)), torch.randint(0, 10, (32,)))
        opt.zero_grad()
        loss.backward()
        for p in model.parameters():  # the training program's own collectives
            assert p.grad is not None
            dist.all_reduce(p.grad)
            p.grad /= world
        opt.step()
        if step % args.every == 0:
            directory = os.path.join(args.out, f"step{step:06d}")
            idx = ckpt.async_save_sharded(
                {"model": model.state_dict(), "optim": opt.state_dict()}, directory, {"step": step}
            )
            pending[idx] = directory
    report(ckpt.finalize_async_save(blocking=True, no_dist=False, terminate=True))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
