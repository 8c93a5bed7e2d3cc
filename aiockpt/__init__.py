"""aiockpt: asynchronous, asyncio-native checkpointing for PyTorch.

The training loop pays only for copying its tensors to host staging buffers; a worker
process writes them, and the program learns of completion by polling (the blocking API,
compatible with ``nvidia_resiliency_ext.checkpointing.async_ckpt``) or by awaiting.
"""

from ._async_queue import AsyncCheckpointQueue as AsyncCheckpointQueue
from ._async_torch import AsyncTorchCheckpoint as AsyncTorchCheckpoint
from ._callers import AsyncCaller as AsyncCaller
from ._callers import PersistentAsyncCaller as PersistentAsyncCaller
from ._callers import TemporalAsyncCaller as TemporalAsyncCaller
from ._exceptions import CheckpointError as CheckpointError
from ._exceptions import DistributedCheckpointError as DistributedCheckpointError
from ._exceptions import FinalizeError as FinalizeError
from ._exceptions import InvalidRequestError as InvalidRequestError
from ._exceptions import QueueClosedError as QueueClosedError
from ._exceptions import StagingError as StagingError
from ._exceptions import WorkerCrashedError as WorkerCrashedError
from ._exceptions import WorkerError as WorkerError
from ._futures import CheckpointFuture as CheckpointFuture
from ._futures import CheckpointResult as CheckpointResult
from ._queue import AsyncCallsQueue as AsyncCallsQueue
from ._request import AsyncRequest as AsyncRequest
from ._staging import StagingBuffers as StagingBuffers
from ._torch_ckpt import TorchAsyncCheckpoint as TorchAsyncCheckpoint
from .utils import preload_tensors as preload_tensors
from .utils import wrap_for_async as wrap_for_async

__version__ = "0.1.0"

__all__ = [
    "AsyncCaller",
    "AsyncCallsQueue",
    "AsyncCheckpointQueue",
    "AsyncRequest",
    "AsyncTorchCheckpoint",
    "CheckpointError",
    "CheckpointFuture",
    "CheckpointResult",
    "DistributedCheckpointError",
    "FinalizeError",
    "InvalidRequestError",
    "PersistentAsyncCaller",
    "QueueClosedError",
    "StagingBuffers",
    "StagingError",
    "TemporalAsyncCaller",
    "TorchAsyncCheckpoint",
    "WorkerCrashedError",
    "WorkerError",
    "preload_tensors",
    "wrap_for_async",
]
