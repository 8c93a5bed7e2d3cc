"""The contenders of ``aiockpt bench``: the physical floors, the peers (``torch.save`` and
DCP's ``async_save`` in its configurations) and aiockpt's APIs. Each one saves a state dict
to a path and says how long the training loop was blocked and when the file was durable."""

from __future__ import annotations

import ctypes
import os
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import anyio
import torch

from .._async_torch import AsyncTorchCheckpoint
from .._staging._arena import cuda_available
from .._staging._tree import iter_tensors
from .._torch_ckpt import TorchCheckpoint
from ..storage._atomic import fsync_path

# (blocked seconds, durable seconds, worst event-loop lag during the save or None)
Timing = tuple[float, float, float | None]

FLOOR, PEER, AIOCKPT = "floor", "peer", "aiockpt"


class Contender:
    """One way to save; ``kind`` is FLOOR, PEER or AIOCKPT."""

    name = ""
    kind = PEER

    async def save(self, state: Any, path: str) -> Timing:
        raise NotImplementedError


class CopyFloor(Contender):
    """The best of three back-to-back in-place copies of the state, each way (``copy_``
    and ``memmove``): what staging cannot beat."""

    name, kind = "floor: in-place copy_", FLOOR

    def __init__(self) -> None:
        self._dst: list[torch.Tensor] = []  # a state's worth, allocated at the first save

    async def save(self, state: Any, path: str) -> Timing:
        flat = iter_tensors(state)
        if not self._dst:
            self._dst = [torch.empty_like(t) for t in flat]
        best = float("inf")
        for _ in range(3):
            t = time.perf_counter()
            for dst, src in zip(self._dst, flat, strict=True):
                dst.copy_(src)
            best = min(best, time.perf_counter() - t)
            t = time.perf_counter()
            for dst, src in zip(self._dst, flat, strict=True):
                ctypes.memmove(dst.data_ptr(), src.data_ptr(), src.nbytes)
            best = min(best, time.perf_counter() - t)
        return best, float("nan"), None


class WriteFloor(Contender):
    """The tensors' raw bytes written to one file and fsync'd: what durability cannot beat."""

    name, kind = "floor: raw write+fsync", FLOOR

    async def save(self, state: Any, path: str) -> Timing:
        t = time.perf_counter()
        with open(path, "wb", buffering=0) as f:
            for src in iter_tensors(state):
                f.write(src.contiguous().view(torch.uint8).numpy().data)
            os.fsync(f.fileno())
        return float("nan"), time.perf_counter() - t, None


class TorchSave(Contender):
    """``torch.save`` and an fsync, blocking the loop throughout."""

    name = "torch.save"

    async def save(self, state: Any, path: str) -> Timing:
        t = time.perf_counter()
        torch.save(state, path)
        fsync_path(path)
        d = time.perf_counter() - t
        return d, d, None


class DCPAsyncSave(Contender):
    """``torch.distributed.checkpoint.async_save`` with a thread or a process, and
    optionally the stager a tuned DCP user configures on a CPU machine (staging in a
    background thread into reused shared memory)."""

    def __init__(self, process: bool, tuned: bool) -> None:
        from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

        self._type = AsyncCheckpointerType.PROCESS if process else AsyncCheckpointerType.THREAD
        self._tuned = tuned
        self._stager: Any = None
        how = "process" if process else "thread"
        self.name = f"dcp.async_save ({how}{', tuned stager' if tuned else ''})"

    def _make_stager(self) -> Any:
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

        cuda = cuda_available()
        options = StagingOptions(
            use_pinned_memory=cuda,
            use_shared_memory=True,
            use_async_staging=True,
            use_non_blocking_copy=cuda,
        )
        return DefaultStager(options)

    async def save(self, state: Any, path: str) -> Timing:
        from torch.distributed.checkpoint.state_dict_saver import async_save

        if self._tuned and self._stager is None:
            self._stager = self._make_stager()
        t = time.perf_counter()
        response = async_save(
            state, checkpoint_id=path, async_checkpointer_type=self._type, async_stager=self._stager
        )
        blocked = time.perf_counter() - t
        fut: Any = getattr(response, "upload_completion", response)
        await anyio.to_thread.run_sync(fut.result)
        return blocked, time.perf_counter() - t, None

    def close(self) -> None:
        if self._stager is not None:
            self._stager.close()


class BlockingAiockpt(Contender):
    """:class:`TorchCheckpoint`: ``async_save`` (blocked until staged), then a blocking
    finalize (durable)."""

    kind = AIOCKPT

    def __init__(self, name: str, persistent: bool, reserve: Any = None) -> None:
        self.name = name
        self.ckpt = TorchCheckpoint(persistent=persistent)
        if reserve is not None:  # prepared before its first save: memory and worker
            self.ckpt.reserve(reserve)

    async def save(self, state: Any, path: str) -> Timing:
        t = time.perf_counter()
        self.ckpt.async_save(state, path)
        blocked = time.perf_counter() - t
        self.ckpt.finalize_async_save(blocking=True)
        return blocked, time.perf_counter() - t, None

    def close(self) -> None:
        self.ckpt.close()


class AsyncAiockpt(Contender):
    """:class:`AsyncTorchCheckpoint` on the event loop, whose lag a heartbeat measures."""

    name, kind = "aiockpt (async)", AIOCKPT

    def __init__(self, ckpt: AsyncTorchCheckpoint, worst_lag: Callable[[float, float], float]):
        self.ckpt = ckpt
        self.worst_lag = worst_lag

    async def save(self, state: Any, path: str) -> Timing:
        t = time.perf_counter()
        fut = await self.ckpt.save(state, path)
        blocked = time.perf_counter() - t
        await fut
        end = time.perf_counter()
        return blocked, end - t, self.worst_lag(t, end)


NAMES = (
    CopyFloor.name,
    WriteFloor.name,
    TorchSave.name,
    "dcp.async_save (thread)",
    "dcp.async_save (process)",
    "dcp.async_save (thread, tuned stager)",
    "dcp.async_save (process, tuned stager)",
    "aiockpt (fork)",
    "aiockpt (persistent)",
    "aiockpt (persistent, reserved)",
    AsyncAiockpt.name,
)


def selected(only: list[str] | None, floors: bool) -> list[str]:
    """The contenders to run, in :data:`NAMES` order: each name containing one of ``only``
    (all without ``only``), and the floors with ``floors=True``."""
    return [
        n
        for n in NAMES
        if only is None or any(word in n for word in only) or (floors and n.startswith("floor"))
    ]


def _make(name: str, state: Any) -> Contender:
    makers: dict[str, Callable[[], Contender]] = {
        CopyFloor.name: CopyFloor,
        WriteFloor.name: WriteFloor,
        TorchSave.name: TorchSave,
        "dcp.async_save (thread)": lambda: DCPAsyncSave(process=False, tuned=False),
        "dcp.async_save (process)": lambda: DCPAsyncSave(process=True, tuned=False),
        "dcp.async_save (thread, tuned stager)": lambda: DCPAsyncSave(process=False, tuned=True),
        "dcp.async_save (process, tuned stager)": lambda: DCPAsyncSave(process=True, tuned=True),
        "aiockpt (fork)": lambda: BlockingAiockpt(name, persistent=False),
        "aiockpt (persistent)": lambda: BlockingAiockpt(name, persistent=True),
        "aiockpt (persistent, reserved)": lambda: BlockingAiockpt(name, True, reserve=state),
    }
    return makers[name]()


@asynccontextmanager
async def contenders(
    names: list[str], state: Any, worst_lag: Callable[[float, float], float]
) -> AsyncIterator[list[Contender]]:
    """The contenders ``names``, ready to save ``state``; closed (workers stopped) on exit."""
    async with AsyncExitStack() as stack:
        made: list[Contender] = []
        for name in names:
            if name == AsyncAiockpt.name:
                ckpt = await stack.enter_async_context(AsyncTorchCheckpoint())
                made.append(AsyncAiockpt(ckpt, worst_lag))
                continue
            contender = _make(name, state)
            closer = getattr(contender, "close", None)
            if closer is not None:
                stack.callback(closer)
            made.append(contender)
        yield made
