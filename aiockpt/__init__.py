"""aiockpt: asynchronous, asyncio-native checkpointing for PyTorch.

The training loop pays only for copying its tensors to host staging buffers; a worker
process writes them, and the program learns of completion by polling (the blocking API,
compatible with ``nvidia_resiliency_ext.checkpointing.async_ckpt``) or by awaiting.

Twins share one rule: the blocking class has the plain name, the awaitable one the
``Async`` prefix (``TorchCheckpoint``/``AsyncTorchCheckpoint``,
``CheckpointQueue``/``AsyncCheckpointQueue``, ``CheckpointManager``/
``AsyncCheckpointManager``, ``load``/``aload``). NVRx's names (``AsyncCallsQueue``,
``TorchAsyncCheckpoint``, ``AsyncRequest``...), where ``Async`` means "in the background",
are kept for the code written against it.
"""

import warnings as _warnings
from typing import Any as _Any

from ._aload import aload as aload
from ._aload import load as load
from ._aload import load_sync as _load_sync
from ._async_queue import AsyncCheckpointQueue as AsyncCheckpointQueue
from ._async_torch import AsyncTorchCheckpoint as AsyncTorchCheckpoint
from ._core._callers import AsyncCaller as AsyncCaller
from ._core._fork import TemporalAsyncCaller as TemporalAsyncCaller
from ._core._persistent import PersistentAsyncCaller as PersistentAsyncCaller
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
from ._exceptions import Preempted as Preempted
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
from ._manager import AsyncCheckpointManager as AsyncCheckpointManager
from ._manager import CheckpointManager as CheckpointManager
from ._options import QueueOptions as QueueOptions
from ._preempt import Preemption as Preemption
from ._preempt_async import AsyncPreemption as AsyncPreemption
from ._queue import AsyncCallsQueue as AsyncCallsQueue
from ._queue import CheckpointQueue as CheckpointQueue
from ._request import AsyncRequest as AsyncRequest
from ._staging._arena import StagingBuffers as StagingBuffers
from ._torch_ckpt import TorchAsyncCheckpoint as TorchAsyncCheckpoint
from ._torch_ckpt import TorchCheckpoint as TorchCheckpoint
from .storage._local import LocalStorage as LocalStorage
from .storage._local import verify as verify
from .storage._protocol import Storage as Storage
from .utils import preload_tensors as preload_tensors
from .utils import wrap_for_async as wrap_for_async

__version__ = "0.1.0"

__all__ = [
    "AsyncCaller",
    "AsyncCallsQueue",
    "AsyncCheckpointManager",
    "AsyncCheckpointQueue",
    "AsyncPreemption",
    "AsyncRequest",
    "AsyncTorchCheckpoint",
    "CheckpointCancelledError",
    "CheckpointError",
    "CheckpointErrorGroup",
    "CheckpointFuture",
    "CheckpointManager",
    "CheckpointNotFoundError",
    "CheckpointQueue",
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
    "Preempted",
    "Preemption",
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
    "TorchCheckpoint",
    "UnsafeCheckpointError",
    "UntrustedEntryError",
    "WorkerCrashedError",
    "WorkerError",
    "aload",
    "load",
    "preload_tensors",
    "verify",
    "wrap_for_async",
]


def __getattr__(name: str) -> _Any:
    # Deprecated names: they work for one more release, with a warning.
    if name == "load_sync":
        _warnings.warn(
            "aiockpt.load_sync is deprecated: use aiockpt.load (it blocks, like torch.load)",
            DeprecationWarning,
            stacklevel=2,
        )
        return _load_sync
    raise AttributeError(f"module 'aiockpt' has no attribute {name!r}")
