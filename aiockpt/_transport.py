"""Sending a staged request to a persistent worker without copying its tensors.

Staged tensors are pickled as references into a shared arena (id, offset, dtype, shape);
the worker maps each arena once, from the file descriptor the caller sent it, and rebuilds
the tensors as views of the same pages. Everything else is pickled as usual.
"""

from __future__ import annotations

import io
import mmap
import os
import pickle
from typing import Any

import torch

from ._staging import StagingBuffers

# Arenas mapped in this (worker) process, by arena id.
_MAPPED: dict[int, mmap.mmap] = {}


class _RequestPickler(pickle.Pickler):
    def __init__(self, file: io.BytesIO, buffers: StagingBuffers | None) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self._buffers = buffers

    def reducer_override(self, obj: Any) -> Any:
        if self._buffers is not None and isinstance(obj, torch.Tensor):
            where = self._buffers.locate(obj)
            if where is not None:
                return _rebuild_staged, (*where, obj.dtype, tuple(obj.shape))
        return NotImplemented


def dumps(obj: Any, buffers: StagingBuffers | None) -> bytes:
    """Pickle ``obj``, sending tensors that live in ``buffers`` by reference."""
    out = io.BytesIO()
    _RequestPickler(out, buffers).dump(obj)
    return out.getvalue()


def map_arena(arena_id: int, fd: int, nbytes: int) -> None:
    """Worker side: map the arena whose descriptor the caller sent; takes ownership of fd."""
    try:
        _MAPPED[arena_id] = mmap.mmap(fd, nbytes)
    finally:
        os.close(fd)


def unmap_arena(arena_id: int) -> None:
    """Worker side: forget an arena the caller freed (the pages go with the last view)."""
    _MAPPED.pop(arena_id, None)


def _rebuild_staged(
    arena_id: int, offset: int, dtype: torch.dtype, shape: tuple[int, ...]
) -> torch.Tensor:
    count = 1
    for dim in shape:
        count *= dim
    if count == 0:
        return torch.empty(shape, dtype=dtype)
    mm = _MAPPED[arena_id]
    return torch.frombuffer(mm, dtype=dtype, count=count, offset=offset).view(shape)
