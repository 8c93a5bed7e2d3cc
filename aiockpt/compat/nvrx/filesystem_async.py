"""NVRx's ``async_ckpt.filesystem_async``: the DCP writer of the asynchronous path."""

from ...dcp._nvrx import FileSystemWriterAsync as FileSystemWriterAsync

__all__ = ["FileSystemWriterAsync"]
