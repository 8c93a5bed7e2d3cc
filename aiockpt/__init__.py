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
from ._exceptions import CheckpointCancelledError as CheckpointCancelledError
from ._exceptions import CheckpointError as CheckpointError
from ._exceptions import CheckpointErrorGroup as CheckpointErrorGroup
from ._exceptions import CheckpointNotFoundError as CheckpointNotFoundError
from ._exceptions import CloseTimeoutError as CloseTimeoutError
from ._exceptions import CorruptCheckpointError as CorruptCheckpointError
from ._exceptions import DirectoryLockedError as DirectoryLockedError
from ._exceptions import DistributedCheckpointError as DistributedCheckpointError
from ._exceptions import FinalizeError as FinalizeError
from ._exceptions import FrozenRequestError as FrozenRequestError
from ._exceptions import InvalidRequestError as InvalidRequestError
from ._exceptions import QueueBrokenError as QueueBrokenError
from ._exceptions import QueueClosedError as QueueClosedError
from ._exceptions import QueueMisuseError as QueueMisuseError
from ._exceptions import SaveTimeoutError as SaveTimeoutError
from ._exceptions import StagingError as StagingError
from ._exceptions import StorageError as StorageError
from ._exceptions import UnsafeCheckpointError as UnsafeCheckpointError
from ._exceptions import UntrustedEntryError as UntrustedEntryError
from ._exceptions import WorkerCrashedError as WorkerCrashedError
from ._exceptions import WorkerError as WorkerError
from ._futures import CheckpointFuture as CheckpointFuture
from ._futures import CheckpointResult as CheckpointResult
from ._load import load as load
from ._load import load_sync as load_sync
from ._manager import AsyncCheckpointManager as AsyncCheckpointManager
from ._manager import CheckpointManager as CheckpointManager
from ._options import QueueOptions as QueueOptions
from ._queue import AsyncCallsQueue as AsyncCallsQueue
from ._request import AsyncRequest as AsyncRequest
from ._staging import StagingBuffers as StagingBuffers
from ._storage import LocalStorage as LocalStorage
from ._storage import Storage as Storage
from ._storage import verify as verify
from ._torch_ckpt import TorchAsyncCheckpoint as TorchAsyncCheckpoint
from .utils import preload_tensors as preload_tensors
from .utils import wrap_for_async as wrap_for_async

__version__ = "0.1.0"

__all__ = [
    "AsyncCaller",
    "AsyncCallsQueue",
    "AsyncCheckpointManager",
    "AsyncCheckpointQueue",
    "AsyncRequest",
    "AsyncTorchCheckpoint",
    "CheckpointCancelledError",
    "CheckpointError",
    "CheckpointErrorGroup",
    "CheckpointFuture",
    "CheckpointManager",
    "CheckpointNotFoundError",
    "CheckpointResult",
    "CloseTimeoutError",
    "CorruptCheckpointError",
    "DirectoryLockedError",
    "DistributedCheckpointError",
    "FinalizeError",
    "FrozenRequestError",
    "InvalidRequestError",
    "LocalStorage",
    "PersistentAsyncCaller",
    "QueueBrokenError",
    "QueueClosedError",
    "QueueMisuseError",
    "QueueOptions",
    "SaveTimeoutError",
    "StagingBuffers",
    "StagingError",
    "Storage",
    "StorageError",
    "TemporalAsyncCaller",
    "TorchAsyncCheckpoint",
    "UnsafeCheckpointError",
    "UntrustedEntryError",
    "WorkerCrashedError",
    "WorkerError",
    "load",
    "load_sync",
    "preload_tensors",
    "verify",
    "wrap_for_async",
]
