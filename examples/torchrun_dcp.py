"""FSDP2 training with asynchronous DCP-format checkpoints, on CPU (gloo):

    torchrun --nproc-per-node 2 examples/torchrun_dcp.py --out /tmp/ckpts

Every ``--every`` steps the sharded model and optimizer state go to ``--out/stepNNNNNN`` in
the torch.distributed.checkpoint format: the save returns before the copy is done (lazy
staging), the copy overlaps the next forward and backward, and the loop waits for it only
before ``optimizer.step()``. Rank 0 commits ``.metadata`` once every rank's files are
durable. At the end a fresh model resumes from the last checkpoint; any world size could.
"""

from __future__ import annotations

import argparse
import os

import anyio
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import aiockpt.dcp
from aiockpt import CheckpointFuture
from aiockpt.dcp import AsyncDCPCheckpoint


def build(seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


async def train(args: argparse.Namespace) -> None:
    rank = dist.get_rank()
    model, opt = build(seed=0)
    last = ""
    async with AsyncDCPCheckpoint() as ckpt:
        pending: CheckpointFuture | None = None
        for step in range(1, args.steps + 1):
            torch.manual_seed(1000 * rank + step)
            x, y = torch.randn(16, 64), torch.randint(0, 10, (16,))
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            if pending is not None:
                await pending.staged  # the copy must be done before the weights change
            opt.step()
            opt.zero_grad()
            if step % args.every == 0:
                msd, osd = get_state_dict(model, opt)
                last = os.path.join(args.out, f"step{step:06d}")
                pending = await ckpt.save(
                    {"model": msd, "optim": osd, "step": step}, last, wait_for_staging=False
                )
        for result in await ckpt.finalize():
            if rank == 0:
                print(f"rank 0: committed call {result.call_idx}", flush=True)

    # Resume: a differently initialised model loads the last checkpoint.
    fresh, fresh_opt = build(seed=1)
    msd, osd = get_state_dict(fresh, fresh_opt)
    state = {"model": msd, "optim": osd, "step": 0}
    aiockpt.dcp.load(state, last)
    set_state_dict(
        fresh, fresh_opt, model_state_dict=state["model"], optim_state_dict=state["optim"]
    )
    same = all(
        torch.equal(a.full_tensor(), b.full_tensor())
        for a, b in zip(model.parameters(), fresh.parameters(), strict=True)
    )
    if rank == 0:
        print(f"resumed from step {state['step']}: {'ok' if same else 'MISMATCH'}", flush=True)
    if not same:
        raise SystemExit(1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--out", default="dcp-demo")
    args = parser.parse_args()
    dist.init_process_group("gloo")  # torchrun's env:// rendezvous
    try:
        anyio.run(train, args)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
