"""Walking the nested containers of a state dict to reach its tensors: mappings (dict and its
subclasses), lists, tuples (named ones too) and dataclass instances."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import gc
from collections.abc import Callable, Iterator
from typing import Any

import torch

_TENSORS = (torch.Tensor, torch.nn.Parameter)


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Keep the cyclic garbage collector off for the block (it is switched back on after,
    if it was on): walking a big state dict allocates a few objects per tensor, and each
    collection would traverse every one of them."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def map_tensors(obj: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    """Return ``obj`` with every tensor ``t`` inside it replaced by ``fn(t)``.

    Dicts keep their type and attributes (``model.state_dict()``'s ``_metadata`` survives),
    named tuples stay named tuples, dataclass instances are copied with their fields mapped;
    other objects are returned as they are.
    """
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        out = obj.copy() if type(obj) is dict else copy.copy(obj)
        for key, value in obj.items():
            # Most values of a state dict are tensors: skip the recursive call for them.
            out[key] = fn(value) if type(value) in _TENSORS else map_tensors(value, fn)
        return out
    if isinstance(obj, list):
        return [map_tensors(v, fn) for v in obj]
    if isinstance(obj, tuple):
        items = [map_tensors(v, fn) for v in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out = copy.copy(obj)  # type: ignore[arg-type]
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name, None)
            object.__setattr__(out, f.name, map_tensors(value, fn))
        return out
    return obj


def _children(obj: Any) -> Any:
    if isinstance(obj, dict):
        return obj.values()
    if isinstance(obj, list | tuple):
        return obj
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return [getattr(obj, f.name, None) for f in dataclasses.fields(obj)]
    return ()


def path_of(obj: Any, target: torch.Tensor, here: str = "") -> str | None:
    """Where ``target`` sits inside ``obj`` (``"[0]['model']['weight']"``), None if it
    is not there. Walks the whole structure: for error messages only."""
    if obj is target:
        return here
    if isinstance(obj, dict):
        items: Any = obj.items()
    elif isinstance(obj, list | tuple):
        items = enumerate(obj)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        items = ((f.name, getattr(obj, f.name, None)) for f in dataclasses.fields(obj))
    else:
        return None
    for key, value in items:
        found = path_of(value, target, f"{here}[{key!r}]")
        if found is not None:
            return found
    return None


def iter_tensors(obj: Any) -> list[torch.Tensor]:
    """Every tensor inside ``obj``, in traversal order (a tensor reached twice appears twice)."""
    out: list[torch.Tensor] = []
    _collect(obj, out)
    return out


def _collect(obj: Any, out: list[torch.Tensor]) -> None:
    if isinstance(obj, torch.Tensor):
        out.append(obj)
        return
    for value in _children(obj):
        if type(value) in _TENSORS:
            out.append(value)
        else:
            _collect(value, out)
