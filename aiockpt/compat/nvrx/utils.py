"""NVRx's ``checkpointing.utils``: ``preload_tensors``, ``wrap_for_async`` and the
nested-container map they are built on."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ...utils import preload_tensors as preload_tensors
from ...utils import wrap_for_async as wrap_for_async

__all__ = ["dict_list_map_outplace", "preload_tensors", "wrap_for_async"]


def dict_list_map_outplace(f: Callable[[Any], Any], x: Any) -> Any:
    """``f`` applied to every leaf of nested dicts and lists, into new containers."""
    if isinstance(x, dict):
        return {k: dict_list_map_outplace(f, v) for k, v in x.items()}
    if isinstance(x, list):
        return [dict_list_map_outplace(f, v) for v in x]
    return f(x)
