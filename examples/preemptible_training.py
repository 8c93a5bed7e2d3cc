"""A training loop you can kill with ``kill -TERM`` and resume, alone or under torchrun:

    python examples/preemptible_training.py --dir /tmp/run --steps 100 [--grace 30]
    torchrun --standalone --nproc-per-node 2 examples/preemptible_training.py --dir /tmp/run

It trains a small MLP on CPU for about a second a step (``--step-seconds``), saves every
``--every`` steps and prints ``committed step K`` as each checkpoint commits. On SIGTERM
(to any rank) every rank stops at the same step, saves it within ``--grace`` seconds,
prints ``committed step K`` and exits with status 75. Run it again with the same ``--dir``:
it prints ``resumed from step K`` and carries on from there.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist
from torch import nn

from aiockpt import CheckpointManager, Preempted, Preemption


def train_for(model: nn.Module, opt: torch.optim.Optimizer, seconds: float, seed: int) -> None:
    """Minibatch updates for about ``seconds`` (then, in a job of several ranks, one
    average of the parameters: the training's own collective, once per step)."""
    gen = torch.Generator().manual_seed(seed)
    until = time.monotonic() + seconds
    while True:
        x = torch.randn(64, 128, generator=gen)
        loss = (model(x) - x[:, :16]).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if time.monotonic() >= until:
            break
    if dist.is_initialized():
        with torch.no_grad():
            for p in model.parameters():
                dist.all_reduce(p)
                p /= dist.get_world_size()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", required=True, help="the checkpoint directory")
    parser.add_argument("--steps", type=int, default=100, help="train until this step")
    parser.add_argument("--grace", type=float, default=30.0, help="seconds from SIGTERM to kill")
    parser.add_argument("--every", type=int, default=5, help="save every this many steps")
    parser.add_argument("--step-seconds", type=float, default=1.0, help="seconds per step")
    args = parser.parse_args()

    if "WORLD_SIZE" in os.environ:  # under torchrun
        dist.init_process_group("gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 512), nn.ReLU(), nn.Linear(512, 16))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def say(message: str) -> None:
        if rank == 0:
            print(message, flush=True)

    def state() -> dict[str, object]:
        return {"model": model.state_dict(), "optim": opt.state_dict()}

    try:
        with (
            CheckpointManager(args.dir, keep_last=3) as mgr,
            Preemption(mgr, grace=args.grace) as pre,
        ):
            step = mgr.latest_step() or 0
            if step:
                restored = mgr.restore()
                model.load_state_dict(restored["model"])
                opt.load_state_dict(restored["optim"])
                say(f"resumed from step {step}")
            try:
                while step < args.steps:
                    if pre.preempted:  # the same answer on every rank, at the same step
                        pre.save_and_exit(step, state())
                    train_for(model, opt, args.step_seconds, seed=1000 * rank + step)
                    step += 1
                    if step % args.every == 0 or step == args.steps:
                        pre.save(step, state())
                    for committed in pre.poll():
                        say(f"committed step {committed}")
                for committed in pre.poll(blocking=True):
                    say(f"committed step {committed}")
                say(f"finished at step {step}")
            except Preempted as p:
                if p.saved_step is not None:
                    say(f"committed step {p.saved_step}")
                say(f"preempted: resume from step {p.latest_step} (exit status {p.code})")
                raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
