"""Walking the nested containers of a state dict to reach its tensors: mappings (dict and its
subclasses), lists, tuples (named ones too) and dataclass instances."""

from __future__ import annotations

import collections
import contextlib
import copy
import dataclasses
import gc
from collections.abc import Callable, Iterator
from typing import Any

import torch

_TENSORS = (torch.Tensor, torch.nn.Parameter)
_KNOWN_DICTS = {dict, collections.OrderedDict, collections.defaultdict}


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


def _is_named_tuple(obj: Any) -> bool:
    return hasattr(type(obj), "_make") and hasattr(obj, "_fields")


def walked(obj: Any) -> bool:
    """Whether the walk enters ``obj``: dicts and lists (subclasses too), exact and named
    tuples, dataclass instances. A subclass or dataclass with its own ``__copy__`` or
    pickling (``__reduce__``) is a leaf the walk does not open: its copy may be the object
    itself, which must never be changed. So is anything else (a tuple subclass with its
    own ``__new__``, a plain object holding tensors)."""
    cls = type(obj)
    if cls is dict or cls is list or cls is tuple:
        return True
    if isinstance(obj, dict | list):
        return _copies_plainly(cls)
    if isinstance(obj, tuple):
        return _is_named_tuple(obj)
    return dataclasses.is_dataclass(obj) and not isinstance(obj, type) and _copies_plainly(cls)


_PLAIN_REDUCE: set[Any] = {
    object.__reduce__,
    collections.OrderedDict.__reduce__,
    collections.defaultdict.__reduce__,
}
_PLAIN_COPY: set[Any] = {None, collections.defaultdict.__copy__}
_OBJECT_REDUCE_EX: Any = object.__reduce_ex__
_plainly: dict[type, bool] = {}


def _copies_plainly(cls: type) -> bool:
    """Whether ``copy.copy`` of a ``cls`` instance is a new object made the default way
    (``__reduce_ex__``), not by the class's own code."""
    known = _plainly.get(cls)
    if known is None:
        known = _plainly[cls] = (
            getattr(cls, "__copy__", None) in _PLAIN_COPY
            and getattr(cls, "__reduce__", None) in _PLAIN_REDUCE
            and getattr(cls, "__reduce_ex__", None) is _OBJECT_REDUCE_EX
        )
    return known


def _shallow(obj: Any) -> Any:
    out = copy.copy(obj)
    if out is obj:  # pragma: no cover - excluded by _copies_plainly
        raise TypeError(f"copy.copy() of a {type(obj).__name__} returned the object itself")
    return out


def map_tensors(
    obj: Any, fn: Callable[[torch.Tensor], Any], leaf: Callable[[Any], Any] | None = None
) -> Any:
    """Return ``obj`` with every tensor ``t`` inside it replaced by ``fn(t)``.

    Dicts keep their type and attributes (``model.state_dict()``'s ``_metadata`` survives),
    named tuples stay named tuples, dataclass instances are copied with their fields mapped.
    A container reached twice is copied once, so sharing and cycles survive as in
    ``copy.deepcopy``. Other objects become ``leaf(obj)`` (themselves by default).
    """
    return _map(obj, fn, leaf, {})


def _map(obj: Any, fn: Callable[[torch.Tensor], Any], leaf: Any, memo: dict[int, Any]) -> Any:
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if not walked(obj):
        return obj if leaf is None else leaf(obj)
    key = id(obj)
    done = memo.get(key)
    if done is not None:
        return done
    if isinstance(obj, dict):
        out = obj.copy() if type(obj) is dict else _shallow(obj)
        memo[key] = out
        if type(obj) in _KNOWN_DICTS:
            for k, value in obj.items():
                # Most values of a state dict are tensors: skip the recursive call for them.
                out[k] = fn(value) if type(value) in _TENSORS else _map(value, fn, leaf, memo)
        else:
            # A subclass's own __setitem__ may refuse to replace a key: the copy has every
            # key already, so its values are replaced as a plain dict would.
            for k, value in obj.items():
                dict.__setitem__(out, k, _map(value, fn, leaf, memo))
        return out
    if isinstance(obj, list):
        # A subclass keeps its class and attributes (a shallow copy, then new items).
        out_list: list[Any] = [] if type(obj) is list else _shallow(obj)
        memo[key] = out_list
        list.__setitem__(out_list, slice(None), [_map(v, fn, leaf, memo) for v in obj])
        return out_list
    if isinstance(obj, tuple):
        items = [_map(v, fn, leaf, memo) for v in obj]
        done = memo.get(key)  # a cycle through this tuple made it already
        if done is None:
            done = memo[key] = type(obj)._make(items) if _is_named_tuple(obj) else tuple(items)  # type: ignore[attr-defined]
        return done
    out = _shallow(obj)
    memo[key] = out
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name, None)
        object.__setattr__(out, f.name, _map(value, fn, leaf, memo))
    return out


def _children(obj: Any) -> Any:
    if isinstance(obj, dict):
        return obj.values()
    if isinstance(obj, list | tuple):
        return obj
    return [getattr(obj, f.name, None) for f in dataclasses.fields(obj)]


def path_of(obj: Any, target: torch.Tensor) -> str | None:
    """Where ``target`` sits inside ``obj`` (``"[0]['model']['weight']"``), None if it
    is not there. Walks the whole structure: for error messages only."""
    return _path(obj, target, "", set())


def _path(obj: Any, target: torch.Tensor, here: str, seen: set[int]) -> str | None:
    if obj is target:
        return here
    if isinstance(obj, torch.Tensor) or not walked(obj) or id(obj) in seen:
        return None
    seen.add(id(obj))
    if isinstance(obj, dict):
        items: Any = obj.items()
    elif isinstance(obj, list | tuple):
        items = enumerate(obj)
    else:
        items = ((f.name, getattr(obj, f.name, None)) for f in dataclasses.fields(obj))
    for key, value in items:
        found = _path(value, target, f"{here}[{key!r}]", seen)
        if found is not None:
            return found
    return None


def iter_tensors(obj: Any) -> list[torch.Tensor]:
    """Every tensor inside ``obj``, in the order :func:`map_tensors` meets them: a tensor
    reached twice appears twice, a container reached twice is entered once."""
    out: list[torch.Tensor] = []
    _collect(obj, out, set())
    return out


def _collect(obj: Any, out: list[torch.Tensor], seen: set[int]) -> None:
    if isinstance(obj, torch.Tensor):
        out.append(obj)
        return
    if not walked(obj) or id(obj) in seen:
        return
    seen.add(id(obj))
    for value in _children(obj):
        if type(value) in _TENSORS:
            out.append(value)
        else:
            _collect(value, out, seen)
