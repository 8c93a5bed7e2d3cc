"""Walking the nested containers of a state dict (dicts, lists, tuples) to reach its tensors."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch


def map_tensors(obj: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    """Return ``obj`` with every tensor ``t`` inside it replaced by ``fn(t)``.

    Dicts keep their type and attributes (``model.state_dict()``'s ``_metadata`` survives),
    named tuples stay named tuples; other objects are returned as they are.
    """
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        out = copy.copy(obj)
        for key, value in obj.items():
            out[key] = map_tensors(value, fn)
        return out
    if isinstance(obj, list):
        return [map_tensors(v, fn) for v in obj]
    if isinstance(obj, tuple):
        items = [map_tensors(v, fn) for v in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
    return obj


def iter_tensors(obj: Any) -> list[torch.Tensor]:
    """Every tensor inside ``obj``, in traversal order (a tensor reached twice appears twice)."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    values = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, list | tuple) else ()
    return [t for value in values for t in iter_tensors(value)]
