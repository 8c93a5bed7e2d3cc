"""Helpers with the reference's names: ``wrap_for_async`` and ``preload_tensors``."""

from __future__ import annotations

import gc
from collections.abc import Callable
from typing import Any

import torch

from ._staging._arena import cuda_available
from ._staging._tree import map_tensors


class _GcDisabled:
    """``fn`` run with the garbage collector off; picklable when ``fn`` is (a module-level
    function), so it can be sent to a persistent worker."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self.__wrapped__ = fn

    def __call__(self, state_dict: Any, *args: Any, **kwargs: Any) -> Any:
        enabled = gc.isenabled()
        gc.disable()
        try:
            return self.fn(state_dict, *args, **kwargs)
        finally:
            if enabled:
                gc.enable()

    def __repr__(self) -> str:
        return f"wrap_for_async({self.fn!r})"


def wrap_for_async(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a checkpoint function ``fn(state_dict, *args, **kwargs)`` to run with the
    garbage collector disabled, so a forked worker never frees the parent's CUDA tensors."""
    return _GcDisabled(fn)


def preload_tensors(state_dict: Any, non_blocking: bool = True) -> Any:
    """Return ``state_dict`` with every tensor copied to host memory (pinned when CUDA is
    available). CPU tensors are copied too, never aliased, so the result is a snapshot.

    ``non_blocking`` lets device-to-host copies overlap one another; this function still
    waits for them before it returns, so the result is complete.
    """
    pin = cuda_available()
    devices: set[torch.device] = set()

    def copy(t: torch.Tensor) -> torch.Tensor:
        src = t.detach()
        if src.is_cuda:
            devices.add(src.device)
        if src.layout != torch.strided:
            return src.to("cpu", copy=True)
        dst = torch.empty(src.shape, dtype=src.dtype, pin_memory=pin)
        dst.copy_(src, non_blocking=non_blocking and pin and src.is_cuda)
        return dst

    out = map_tensors(state_dict, copy)
    for device in devices:
        torch.cuda.synchronize(device)
    return out
