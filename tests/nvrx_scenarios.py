"""Rank scenarios for the NVRx compatibility suite (run by ``dist_harness.run_ranks``)."""

from __future__ import annotations

import os
import time
from typing import Any

from aiockpt.compat.nvrx.async_ckpt.core import AsyncRequest


def write_after(path: str, delay: float) -> None:
    # The delay makes the slow rank observable: without a barrier, rank 0's finalize
    # would look for rank 1's file before it exists.
    time.sleep(delay)
    with open(path, "w") as f:
        f.write("written")


def execute_sync_barrier(rank: int, world: int, tmp: str) -> dict[str, Any]:
    """Every rank writes its file (rank 1 slowly); rank 0's finalize lists what it sees."""
    seen: list[list[str]] = []

    def list_files() -> None:
        seen.append(sorted(n for n in os.listdir(tmp) if n.startswith("part-")))

    request = AsyncRequest(
        write_after,
        (os.path.join(tmp, f"part-{rank}"), 1.0 if rank == 1 else 0.0),
        [list_files] if rank == 0 else [],
    )
    request.execute_sync()
    finalized = AsyncRequest(None, (), [], call_idx=3).execute_finalize_fns()
    return {"seen": seen, "finalized": finalized}


def execute_finalize_fns_mismatch(rank: int, world: int, tmp: str) -> str:
    """Ranks finalizing different calls are told so."""
    request = AsyncRequest(None, (), [], call_idx=rank)
    try:
        request.execute_finalize_fns()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return "no error"
