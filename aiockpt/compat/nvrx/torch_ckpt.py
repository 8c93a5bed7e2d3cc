"""NVRx's ``async_ckpt.torch_ckpt``: ``torch.save`` in the background."""

from ..._torch_ckpt import TorchAsyncCheckpoint as TorchAsyncCheckpoint

__all__ = ["TorchAsyncCheckpoint"]
