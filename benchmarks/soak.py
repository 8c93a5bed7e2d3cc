"""Soak: many saves through one queue, then count what is left behind.

Prints, per caller, the saves made, the wall time, and what grew between the end of the
warm-up and the end: child processes, threads, file descriptors, memfds (staging
arenas), temporary files, and resident memory. Nothing but RSS noise should grow.

    python benchmarks/soak.py --saves 2000
"""

from __future__ import annotations

import argparse
import contextlib
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch

from aiockpt import TorchCheckpoint


@dataclass
class Snapshot:
    children: int
    threads: int
    fds: int
    memfds: int
    temps: int
    rss: int

    @staticmethod
    def take(directory: Path) -> Snapshot:
        fds = os.listdir("/proc/self/fd")
        memfds = 0
        for fd in fds:
            with contextlib.suppress(OSError):  # closed since the listing
                memfds += os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:")
        me = psutil.Process()
        children = [c for c in me.children() if c.status() != psutil.STATUS_ZOMBIE]
        return Snapshot(
            children=len(children),
            threads=threading.active_count(),
            fds=len(fds),
            memfds=memfds,
            temps=sum(".tmp-" in name for name in os.listdir(directory)),
            rss=me.memory_info().rss,
        )


def settle(ckpt: TorchCheckpoint, timeout: float = 30.0) -> None:
    """Wait (bounded) until the per-save children of finished saves have exited and their
    pipes and pidfds are released, so that a count is not taken while one is exiting."""
    engine = ckpt.queue._engine
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        engine.collect()
        exiting = [
            c
            for c in list(engine._callers)
            if c is not engine._persistent_caller and getattr(c, "process", None) is not None
        ]
        if not exiting:
            return
        time.sleep(0.01)


def soak(directory: Path, saves: int, persistent: bool, warmup: int = 20) -> dict[str, float]:
    """Run ``saves`` saves (plus ``warmup``) and return what grew after the warm-up."""
    state = {f"layer{i}": torch.randn(256, 256) for i in range(8)}
    state["step"] = torch.tensor(0)
    ckpt = TorchCheckpoint(persistent=persistent)
    try:
        for i in range(warmup):
            ckpt.async_save(state, str(directory / f"ckpt{i % 3}.pt"))
            ckpt.finalize_async_save(blocking=True)
        settle(ckpt)
        before = Snapshot.take(directory)
        start = time.perf_counter()
        for i in range(saves):
            state["step"].fill_(i)
            ckpt.async_save(state, str(directory / f"ckpt{i % 3}.pt"))
            ckpt.finalize_async_save(blocking=i % 4 == 3)  # some saves overlap the next
        ckpt.finalize_async_save(blocking=True)
        seconds = time.perf_counter() - start
        settle(ckpt)
        after = Snapshot.take(directory)
    finally:
        ckpt.close()
    last = torch.load(directory / f"ckpt{(saves - 1) % 3}.pt", weights_only=True)
    return {
        "saves": saves,
        "seconds": seconds,
        "last_step_ok": float(int(last["step"]) == saves - 1),
        "children": after.children - before.children,
        "threads": after.threads - before.threads,
        "fds": after.fds - before.fds,
        "memfds": after.memfds - before.memfds,
        "temps": after.temps,
        "rss_mib": (after.rss - before.rss) / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--saves", type=int, default=1000)
    parser.add_argument("--dir", default=None)
    args = parser.parse_args()
    import tempfile

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for persistent in (False, True):
            name = "persistent" if persistent else "fork"
            out = soak(Path(tmp), args.saves, persistent)
            growth = ", ".join(f"{k} {out[k]:+g}" for k in ("children", "threads", "fds", "memfds"))
            print(
                f"{name:10} {args.saves} saves in {out['seconds']:.1f} s; growth after warm-up: "
                f"{growth}, temp files {out['temps']:g}, RSS {out['rss_mib']:+.1f} MiB"
            )


if __name__ == "__main__":
    main()
