"""Comparing what a checkpoint holds with what ``torch.save`` keeps of the same object:
classes, attributes, dtypes, shapes, strides, offsets, conjugate/negative bits, storage
bytes, and which objects and storages are shared (by their first position)."""

from __future__ import annotations

import io
import itertools
from typing import Any

import torch

_ATOMIC = (int, float, complex, str, bytes, bool, type(None))


def describe(obj: Any) -> Any:
    """A comparable description of ``obj`` (loaded from a checkpoint)."""
    return _describe(obj, {}, {}, itertools.count())


def _describe(obj: Any, seen: dict[int, int], storages: dict[int, int], ids: Any) -> Any:
    if isinstance(obj, _ATOMIC):
        return obj
    if id(obj) in seen:
        return ("same object as", seen[id(obj)])
    seen[id(obj)] = next(ids)
    if isinstance(obj, torch.nn.parameter.UninitializedTensorMixin):
        return (type(obj).__name__, "uninitialized", obj.requires_grad)
    if isinstance(obj, torch.Tensor):
        state = {k: _describe(v, seen, storages, ids) for k, v in vars(obj).items()}
        head = (type(obj).__name__, obj.dtype, tuple(obj.shape), obj.requires_grad, state)
        if obj.is_quantized or obj.layout != torch.strided:
            return (*head, repr(obj))
        storage = obj.untyped_storage()
        first = storages.setdefault(storage.data_ptr(), len(storages)) if storage.nbytes() else -1
        return (
            *head,
            obj.stride(),
            obj.storage_offset(),
            obj.is_conj(),
            obj.is_neg(),
            first,
            bytes(storage),
        )
    if isinstance(obj, torch.TypedStorage):
        obj = obj._untyped_storage
    if isinstance(obj, torch.UntypedStorage):
        return ("storage", bytes(obj))
    if isinstance(obj, dict):
        items = tuple((k, _describe(v, seen, storages, ids)) for k, v in obj.items())
        return (
            type(obj).__name__,
            items,
            _describe(vars(obj), seen, storages, ids) if hasattr(obj, "__dict__") else None,
        )
    if isinstance(obj, list | tuple):
        return (type(obj).__name__, tuple(_describe(v, seen, storages, ids) for v in obj))
    if hasattr(obj, "__dict__"):
        return (type(obj).__name__, _describe(vars(obj), seen, storages, ids))
    return obj


def as_torch_saves(obj: Any) -> Any:
    """``describe`` of ``obj`` after a ``torch.save``/``torch.load`` round trip, now."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return describe(torch.load(buf, weights_only=False))


def as_saved(path: str) -> Any:
    """``describe`` of the checkpoint file at ``path``."""
    return describe(torch.load(path, weights_only=False))
