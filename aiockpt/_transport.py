"""Sending a staged request to a persistent worker without copying its tensors.

Staged tensors are pickled as references into a shared arena (arena id, the byte range of
their storage, dtype, size, stride, storage offset); the worker maps each arena once, from
the file descriptor the caller sent it, and rebuilds the tensors as views of the same pages.
Tensors that shared a storage in the caller share one in the worker. Everything else is
pickled as usual.
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
# Storages rebuilt while unpickling one request: the same byte range is one storage.
_STORAGES: dict[tuple[int, int, int], torch.UntypedStorage] = {}


class _RequestPickler(pickle.Pickler):
    def __init__(self, file: io.BytesIO, buffers: StagingBuffers | None) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self._buffers = buffers

    def reducer_override(self, obj: Any) -> Any:
        if self._buffers is not None and type(obj) in (torch.Tensor, torch.nn.Parameter):
            where = self._buffers.locate(obj)
            if where is not None:
                spec = (obj.dtype, tuple(obj.shape), tuple(obj.stride()), obj.storage_offset())
                kind = (type(obj) is torch.nn.Parameter, obj.requires_grad)
                return _rebuild_staged, (*where, *spec, *kind)
            if _is_empty_plain(obj):
                # torch's own pickling of empty storages fails for some dtypes (float8).
                return _rebuild_empty, (obj.dtype, tuple(obj.shape), tuple(obj.stride()))
        return NotImplemented


def dumps(obj: Any, buffers: StagingBuffers | None) -> bytes:
    """Pickle ``obj``, sending tensors that live in ``buffers`` by reference."""
    out = io.BytesIO()
    _RequestPickler(out, buffers).dump(obj)
    return out.getvalue()


def loads(payload: bytes) -> Any:
    """Worker side: unpickle a request made by :func:`dumps`."""
    _STORAGES.clear()
    try:
        return pickle.loads(payload)
    finally:
        _STORAGES.clear()


def map_arena(arena_id: int, fd: int, nbytes: int) -> None:
    """Worker side: map the arena whose descriptor the caller sent; takes ownership of fd."""
    try:
        _MAPPED[arena_id] = mmap.mmap(fd, nbytes)
    finally:
        os.close(fd)


def unmap_arena(arena_id: int) -> None:
    """Worker side: forget an arena the caller freed (the pages go with the last view)."""
    _MAPPED.pop(arena_id, None)


def _is_empty_plain(t: torch.Tensor) -> bool:
    return (
        t.device.type == "cpu"
        and t.layout == torch.strided
        and not t.is_quantized
        and not t.is_nested
        and t.untyped_storage().nbytes() == 0
    )


def _rebuild_empty(
    dtype: torch.dtype, size: tuple[int, ...], stride: tuple[int, ...]
) -> torch.Tensor:
    return torch.empty_strided(size, stride, dtype=dtype)


def _rebuild_staged(
    arena_id: int,
    offset: int,
    nbytes: int,
    dtype: torch.dtype,
    size: tuple[int, ...],
    stride: tuple[int, ...],
    storage_offset: int,
    parameter: bool = False,
    requires_grad: bool = False,
) -> torch.Tensor:
    key = (arena_id, offset, nbytes)
    storage = _STORAGES.get(key)
    if storage is None:
        mm = _MAPPED[arena_id]
        slot = torch.frombuffer(mm, dtype=torch.uint8, count=nbytes, offset=offset)
        storage = _STORAGES[key] = slot.untyped_storage()
    t = torch.empty(0, dtype=dtype).set_(storage, storage_offset, size, stride)
    if parameter:
        return torch.nn.Parameter(t, requires_grad=requires_grad)
    return t.requires_grad_(True) if requires_grad else t
