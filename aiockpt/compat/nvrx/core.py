"""NVRx's ``async_ckpt.core``: requests, callers, the queue and the abort utility."""

from ..._callers import AsyncCaller as AsyncCaller
from ..._callers import PersistentAsyncCaller as PersistentAsyncCaller
from ..._callers import TemporalAsyncCaller as TemporalAsyncCaller
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
