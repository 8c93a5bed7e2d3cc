"""The README's main job: a small CPU training loop that checkpoints every few steps, once
with plain ``torch.save`` and once with aiockpt, and prints what the loop paid for each."""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .._torch_ckpt import TorchCheckpoint


def _model(width: int, depth: int) -> nn.Module:
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, 10))


def _train(
    steps: int,
    every: int,
    width: int,
    depth: int,
    save: Callable[[dict[str, Any], int], object],
    poll: Callable[[], object],
) -> tuple[float, list[float], float]:
    torch.manual_seed(0)
    model = _model(width, depth)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = torch.randn(64, width), torch.randint(0, 10, (64,))
    blocked: list[float] = []
    start = time.perf_counter()
    loss = torch.zeros(())
    for step in range(1, steps + 1):
        poll()
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
        if step % every == 0:
            t = time.perf_counter()
            save({"model": model.state_dict(), "optim": opt.state_dict(), "step": step}, step)
            blocked.append(time.perf_counter() - t)
    return time.perf_counter() - start, blocked, float(loss.detach())


def _state_like(width: int, depth: int) -> dict[str, Any]:
    """A state dict with the layout the loop will save (model, AdamW moments), to reserve
    staging memory for it before the timed loop."""
    model = _model(width, depth)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.zeros(1, width)).sum().backward()
    opt.step()
    return {"model": model.state_dict(), "optim": opt.state_dict(), "step": 0}


def run_demo(steps: int = 40, every: int = 10, width: int = 1536, depth: int = 4) -> int:
    """Run both loops and print a one-screen summary; returns a process exit code."""
    n_params = sum(p.numel() for p in _model(width, depth).parameters())
    state_mb = n_params * 4 * 3 / 2**20  # weights + two AdamW moments, float32
    print(f"aiockpt demo: MLP with {n_params / 1e6:.1f}M parameters, state ~{state_mb:.0f} MiB")
    print(f"{steps} training steps on CPU, a checkpoint every {every} steps\n")
    with tempfile.TemporaryDirectory(prefix="aiockpt-demo-") as tmp:
        sync_total, sync_blocked, sync_loss = _train(
            steps,
            every,
            width,
            depth,
            lambda sd, step: torch.save(sd, os.path.join(tmp, f"sync-{step}.pt")),
            lambda: None,
        )
        # Start the worker and reserve staging memory before the timed loop: the first
        # save is then as cheap as the later ones.
        t = time.perf_counter()
        ckpt = TorchCheckpoint(persistent=True)
        ckpt.reserve(_state_like(width, depth))
        startup = time.perf_counter() - t
        try:
            async_total, async_blocked, async_loss = _train(
                steps,
                every,
                width,
                depth,
                lambda sd, step: ckpt.async_save(sd, os.path.join(tmp, f"async-{step}.pt")),
                lambda: ckpt.finalize_async_save(blocking=False),
            )
            t = time.perf_counter()
            ckpt.finalize_async_save(blocking=True)
            drain = time.perf_counter() - t
        finally:
            ckpt.close()
        last = torch.load(
            os.path.join(tmp, f"async-{steps // every * every}.pt"), weights_only=True
        )
        same = torch.equal(
            last["model"]["0.weight"],
            torch.load(os.path.join(tmp, f"sync-{steps // every * every}.pt"), weights_only=True)[
                "model"
            ]["0.weight"],
        )

    def ms(values: list[float]) -> str:
        return f"{1000 * sum(values) / len(values):8.1f} ms"

    print(f"aiockpt set-up before the loop (worker start, staging reserve): {startup:.2f} s\n")
    print(f"{'':28}{'torch.save':>14}{'aiockpt':>14}")
    print(f"{'first checkpoint':28}{ms(sync_blocked[:1]):>14}{ms(async_blocked[:1]):>14}")
    if len(sync_blocked) > 1:
        warm_sync, warm_async = sync_blocked[1:], async_blocked[1:]
        print(f"{'later checkpoints (mean)':28}{ms(warm_sync):>14}{ms(warm_async):>14}")
        print(
            f"{'later checkpoints (worst)':28}{ms([max(warm_sync)]):>14}{ms([max(warm_async)]):>14}"
        )
    print(f"{'whole loop':28}{sync_total:12.2f} s{async_total:12.2f} s")
    print(f"{'final loss':28}{sync_loss:14.4f}{async_loss:14.4f}")
    print(f"\nlast async checkpoint loads with torch.load and matches the sync one: {same}")
    print(f"waiting for the last async write at the end took {1000 * drain:.1f} ms")
    speedup = sum(sync_blocked) / max(sum(async_blocked), 1e-9)
    print(f"the loop was blocked {speedup:.1f}x less per checkpoint than with torch.save")
    return 0 if same else 1
