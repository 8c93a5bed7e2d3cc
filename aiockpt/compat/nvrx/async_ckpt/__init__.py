"""NVRx's ``checkpointing.async_ckpt`` package."""

from ..core import AsyncCallsQueue as AsyncCallsQueue
from ..core import AsyncRequest as AsyncRequest
from ..torch_ckpt import TorchAsyncCheckpoint as TorchAsyncCheckpoint

__all__ = ["AsyncCallsQueue", "AsyncRequest", "TorchAsyncCheckpoint"]
