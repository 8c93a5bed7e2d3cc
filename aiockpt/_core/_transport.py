"""Sending a staged request to a persistent worker without copying its tensors.

The worker maps each arena once, from the file descriptor the caller sent it, and builds
the tensor views of the arena's layout once per layout (:func:`lay_out`). A staged tensor
is then pickled as ``(arena id, view index)``, a few bytes, and unpickled as that view.
Other tensors in an arena are pickled with the byte range of their storage, dtype, size,
stride and storage offset. Tensors that shared a storage in the caller share one in the
worker. Everything else is pickled as usual.
"""

from __future__ import annotations

import io
import mmap
import os
import pickle
from typing import Any

import torch

from .._staging import _views
from .._staging._arena import StagingBuffers, StagingPlan, build_views

# Arenas mapped in this (worker) process, by arena id.
_MAPPED: dict[int, mmap.mmap] = {}
# Per arena: the views of its current layout, and its slot storages by byte range.
_VIEWS: dict[int, list[torch.Tensor]] = {}
_SLOTS: dict[int, dict[tuple[int, int], torch.UntypedStorage]] = {}
# Storages rebuilt while unpickling one request: the same byte range is one storage.
_STORAGES: dict[tuple[int, int, int], torch.UntypedStorage] = {}


class _RequestPickler(pickle.Pickler):
    def __init__(self, file: io.BytesIO, buffers: StagingBuffers | None) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self._buffers = buffers

    def reducer_override(self, obj: Any) -> Any:
        if self._buffers is not None and type(obj) in (torch.Tensor, torch.nn.Parameter):
            ref = self._buffers.reference(obj)
            if ref is not None:
                return _rebuild_view, ref
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
    _VIEWS.pop(arena_id, None)
    _SLOTS.pop(arena_id, None)
    _views.withdraw(arena_id)


def lay_out(arena_id: int, plan: StagingPlan) -> None:
    """Worker side: build the views of ``plan`` over a mapped arena."""
    mm = _MAPPED[arena_id]
    slots = [
        torch.frombuffer(mm, dtype=torch.uint8, count=size, offset=offset)
        for offset, size in plan.slots
    ]
    _VIEWS[arena_id] = build_views(slots, plan)
    _views.announce(arena_id, _VIEWS[arena_id])
    _SLOTS[arena_id] = {
        where: slot.untyped_storage() for where, slot in zip(plan.slots, slots, strict=True)
    }


def _rebuild_view(arena_id: int, index: int, parameter: bool, requires_grad: bool) -> torch.Tensor:
    t = _VIEWS[arena_id][index]
    if parameter:
        return torch.nn.Parameter(t, requires_grad=requires_grad)
    return t.detach().requires_grad_(True) if requires_grad else t


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
    storage = _SLOTS.get(arena_id, {}).get((offset, nbytes)) or _STORAGES.get(key)
    if storage is None:
        mm = _MAPPED[arena_id]
        slot = torch.frombuffer(mm, dtype=torch.uint8, count=nbytes, offset=offset)
        storage = _STORAGES[key] = slot.untyped_storage()
    t = torch.empty(0, dtype=dtype).set_(storage, storage_offset, size, stride)
    if parameter:
        return torch.nn.Parameter(t, requires_grad=requires_grad)
    return t.requires_grad_(True) if requires_grad else t
