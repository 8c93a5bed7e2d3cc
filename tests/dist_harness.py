"""Runs a scenario on N real ranks: spawned processes in a gloo process group on loopback.

The ranks meet through a file store in a directory of their own, not a TCP port: test
files run in parallel, and a port picked free here could be taken by the time rank 0
binds it. torchrun runs with ``--standalone``, whose store binds port 0 itself."""

from __future__ import annotations

import importlib
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import timedelta
from typing import Any

from aiockpt._core._persistent import worker_context


def _rank_main(
    scenario: str,
    rank: int,
    world: int,
    rendezvous: str,
    tmp: str,
    kwargs: dict[str, Any],
    dump_after: float,
) -> None:
    import faulthandler

    import torch.distributed as dist

    # If this rank hangs, say where before the harness kills it.
    faulthandler.dump_traceback_later(dump_after, exit=False)

    try:
        dist.init_process_group(
            "gloo",
            init_method=f"file://{rendezvous}",
            rank=rank,
            world_size=world,
            timeout=timedelta(seconds=60),
        )
        result: tuple[Any, ...] = (
            "ok",
            _scenario(scenario)(rank, world, tmp, **kwargs),
        )
    except BaseException as exc:
        result = ("error", f"{type(exc).__name__}: {exc}", traceback.format_exc())
    with open(os.path.join(tmp, f"result-{rank}.pkl"), "wb") as f:
        pickle.dump(result, f)
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter teardown: a peer may be gone, and tearing gloo down could wait on it.
    os._exit(0)


def _scenario(name: str) -> Any:
    """``module:function`` names a scenario in another module; a bare name is in
    ``dist_scenarios``."""
    module, _, function = name.rpartition(":")
    return getattr(importlib.import_module(module or "dist_scenarios"), function)


def run_ranks(
    scenario: str, world: int, tmp: str, timeout: float = 90, **kwargs: Any
) -> list[tuple[Any, ...] | None]:
    """Run ``dist_scenarios.<scenario>(rank, world, tmp, **kwargs)`` (or ``module:function``)
    on every rank; return each rank's ``("ok", value)`` or ``("error", message,
    traceback)``, None if it died."""
    # Forked from the forkserver the persistent workers use, torch already imported: a
    # rank starts in tens of milliseconds instead of importing torch again.
    ctx = worker_context("forkserver")
    meeting = tempfile.mkdtemp(prefix="aiockpt-rendezvous-")
    rendezvous = os.path.join(meeting, "store")
    procs = [
        ctx.Process(
            target=_rank_main,
            args=(scenario, r, world, rendezvous, tmp, kwargs, max(timeout - 5, 1)),
        )
        for r in range(world)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    shutil.rmtree(meeting, ignore_errors=True)
    assert not hung, f"ranks {hung} did not finish within {timeout}s"
    results: list[tuple[Any, ...] | None] = []
    for r in range(world):
        path = os.path.join(tmp, f"result-{r}.pkl")
        if os.path.exists(path):
            with open(path, "rb") as f:
                results.append(pickle.load(f))
        else:
            results.append(None)
    return results


def values(results: list[tuple[Any, ...] | None]) -> list[Any]:
    """The ranks' return values; fails with every rank's traceback if any rank raised."""
    errors = [f"rank {r}: {res[2]}" for r, res in enumerate(results) if res and res[0] != "ok"]
    assert not errors, "\n".join(errors)
    assert all(res is not None for res in results), f"a rank died: {results}"
    return [res[1] for res in results if res is not None]


def run_torchrun(
    script: str, *args: str, timeout: float = 150.0
) -> subprocess.CompletedProcess[str]:
    """Run ``script`` (relative to the repository) under torchrun with 2 ranks on loopback."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd += [script, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=root, env=env)
