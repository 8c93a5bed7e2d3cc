"""NVRx's ``async_ckpt.core``: requests, callers, the queue and the abort utility."""

from ..._core._callers import AsyncCaller as AsyncCaller
from ..._core._fork import TemporalAsyncCaller as TemporalAsyncCaller
from ..._core._persistent import PersistentAsyncCaller as PersistentAsyncCaller
from ..._queue import AsyncCallsQueue as AsyncCallsQueue
from ..._queue import abort_nvrx_checkpoint as abort_nvrx_checkpoint
from ..._request import AsyncRequest as AsyncRequest

__all__ = [
    "AsyncCaller",
    "AsyncCallsQueue",
    "AsyncRequest",
    "PersistentAsyncCaller",
    "TemporalAsyncCaller",
    "abort_nvrx_checkpoint",
]
