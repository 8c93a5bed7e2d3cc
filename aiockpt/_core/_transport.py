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
import threading
from typing import Any

import torch

from .._staging import _views
from .._staging._arena import Dressing, StagingBuffers, StagingPlan, build_views, dress, dressing
from .._staging._scan import plain_subclass

# Arenas mapped in this (worker) process, by arena id.
_MAPPED: dict[int, mmap.mmap] = {}
# Per arena: the views of its current layout, and its slot storages by byte range.
_VIEWS: dict[int, list[torch.Tensor]] = {}
_SLOTS: dict[int, dict[tuple[int, int], torch.UntypedStorage]] = {}
# Per arena: the plan of its current layout and its slot tensors.
_LAYOUTS: dict[int, tuple[StagingPlan, list[torch.Tensor], list[int], list[int]]] = {}
_LOCK = threading.Lock()  # the reader thread lays out while a request runs
# Storages rebuilt while unpickling one request: the same byte range is one storage.
_STORAGES: dict[tuple[int, int, int], torch.UntypedStorage] = {}


class _RequestPickler(pickle.Pickler):
    def __init__(self, file: io.BytesIO, buffers: StagingBuffers | None, protocol: int) -> None:
        super().__init__(file, protocol=protocol)
        self._buffers = buffers

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, torch.Tensor):
            if self._buffers is not None:
                ref = self._buffers.reference(obj)
                if ref is not None:
                    return _rebuild_view, ref
                where = self._buffers.locate(obj)
                if where is not None:
                    spec = (obj.dtype, tuple(obj.shape), tuple(obj.stride()), obj.storage_offset())
                    return _rebuild_staged, (*where, *spec, dressing(obj))
            if _is_empty_plain(obj):
                # torch's own pickling of empty storages fails for some dtypes (float8).
                spec = (obj.dtype, tuple(obj.shape), tuple(obj.stride()), obj.storage_offset())
                return _rebuild_empty, (*spec, dressing(obj))
        elif type(obj) is torch.UntypedStorage and obj.device.type == "cpu":
            # torch cannot unpickle an UntypedStorage pickled on its own.
            return _rebuild_storage, (bytes(obj),)
        return NotImplemented


def dumps(obj: Any, buffers: StagingBuffers | None) -> bytes:
    """Pickle ``obj``, sending tensors that live in ``buffers`` by reference. Objects that
    pickle only with an older protocol (torch.save uses 2) are sent with that one."""
    for protocol in (pickle.HIGHEST_PROTOCOL, 2):
        out = io.BytesIO()
        try:
            _RequestPickler(out, buffers, protocol).dump(obj)
        except Exception:
            if protocol == 2:
                raise
            continue
        return out.getvalue()
    raise AssertionError("unreachable")


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
    with _LOCK:
        _VIEWS.pop(arena_id, None)
        _LAYOUTS.pop(arena_id, None)
        _SLOTS.pop(arena_id, None)
    _views.withdraw(arena_id)


def lay_out(arena_id: int, plan: StagingPlan, *, replacing: Any = None) -> None:
    """Worker side: build the views of ``plan`` over a mapped arena. With ``replacing``
    (the layout the caller read), only if that is still the arena's layout: the reader
    thread may have laid out a newer plan meanwhile, which must not be undone."""
    mm = _MAPPED[arena_id]
    slots = [
        torch.frombuffer(mm, dtype=torch.uint8, count=size, offset=offset)
        for offset, size in plan.slots
    ]
    views = build_views(slots, plan)
    with _LOCK:
        if replacing is not None and _LAYOUTS.get(arena_id) is not replacing:
            return
        _VIEWS[arena_id] = views
        _LAYOUTS[arena_id] = (
            plan,
            slots,
            [slot.data_ptr() for slot in slots],
            [slot.untyped_storage()._cdata for slot in slots],
        )
        _SLOTS[arena_id] = {
            where: slot.untyped_storage() for where, slot in zip(plan.slots, slots, strict=True)
        }
    _views.announce(arena_id, views)


def restore_views(check: bool = True) -> int:
    """Worker side, after a request: rebuild the views that its function changed (``v.data = ...``, ``requires_grad_()``, an attribute, ``set_``), so that no
    request sees what an earlier one did to them. Returns how many were rebuilt.
    ``check=False`` skips the check (a function known to leave its views alone)."""
    rebuilt = 0
    # Every arena, not only those this request was given: a function may have kept views
    # of another arena from an earlier request (in a global) and changed them now.
    with _LOCK:
        arenas = list(_VIEWS) if check else []
    for arena_id in arenas:
        with _LOCK:
            views, layout = _VIEWS.get(arena_id), _LAYOUTS.get(arena_id)
        if views is None or layout is None:
            continue
        plan, slots, bases, storages = layout
        if [slot.data_ptr() for slot in slots] != bases:
            # A storage was moved (share_memory_(), pickling by torch.multiprocessing):
            # the slots no longer map the arena. Lay the whole arena out again.
            lay_out(arena_id, plan, replacing=layout)
            rebuilt += len(views)
            continue
        changed = [
            i
            for i, (v, spec) in enumerate(zip(views, plan.tensors, strict=True))
            if not _pristine(v, spec, bases, storages)
        ]
        if changed:
            fresh = list(views)
            for i, view in zip(changed, build_views(slots, _subplan(plan, changed)), strict=True):
                fresh[i] = view
            with _LOCK:
                if _VIEWS.get(arena_id) is not views:  # laid out anew meanwhile
                    continue
                _VIEWS[arena_id] = fresh
            _views.announce(arena_id, fresh)
            rebuilt += len(changed)
    return rebuilt


def _pristine(v: torch.Tensor, spec: Any, bases: list[int], storages: list[int]) -> bool:
    slot, dtype, size, stride, offset = spec
    return (
        type(v) is torch.Tensor
        and v.dtype is dtype
        and not v.requires_grad
        and not v.__dict__
        and v.grad is None
        and not v._backward_hooks
        and getattr(v, "_post_accumulate_grad_hooks", None) is None
        and v.untyped_storage()._cdata == storages[slot]
        and v.data_ptr() == bases[slot] + offset * dtype.itemsize
        and v.size() == size
        and v.stride() == stride
        and not v.is_neg()
        and not (dtype.is_complex and v.is_conj())
    )


def _subplan(plan: StagingPlan, indices: list[int]) -> StagingPlan:
    return StagingPlan(plan.slots, tuple(plan.tensors[i] for i in indices), plan.nbytes)


def _rebuild_view(arena_id: int, index: int, how: Dressing | None) -> torch.Tensor:
    view = _VIEWS[arena_id][index]
    return view if how is None else dress(view, how)


def _is_empty_plain(t: torch.Tensor) -> bool:
    return (
        t.device.type == "cpu"
        and t.layout == torch.strided
        and not t.is_quantized
        and not t.is_nested
        and (type(t) in (torch.Tensor, torch.nn.Parameter) or plain_subclass(type(t)))
        and t.untyped_storage().nbytes() == 0
    )


def _rebuild_empty(
    dtype: torch.dtype,
    size: tuple[int, ...],
    stride: tuple[int, ...],
    storage_offset: int,
    how: Dressing,
) -> torch.Tensor:
    data = torch.empty(0, dtype=dtype).set_(_empty_storage(), storage_offset, size, stride)
    return dress(data, how)


def _empty_storage() -> torch.UntypedStorage:
    return torch.UntypedStorage(0)  # type: ignore[no-untyped-call]


def _rebuild_storage(data: bytes) -> torch.UntypedStorage:
    return torch.UntypedStorage.from_buffer(data, dtype=torch.uint8) if data else _empty_storage()


def _rebuild_staged(
    arena_id: int,
    offset: int,
    nbytes: int,
    dtype: torch.dtype,
    size: tuple[int, ...],
    stride: tuple[int, ...],
    storage_offset: int,
    how: Dressing,
) -> torch.Tensor:
    key = (arena_id, offset, nbytes)
    storage = _SLOTS.get(arena_id, {}).get((offset, nbytes)) or _STORAGES.get(key)
    if storage is None:
        mm = _MAPPED[arena_id]
        slot = torch.frombuffer(mm, dtype=torch.uint8, count=nbytes, offset=offset)
        storage = _STORAGES[key] = slot.untyped_storage()
    t = torch.empty(0, dtype=dtype).set_(storage, storage_offset, size, stride)
    return dress(t, how)
