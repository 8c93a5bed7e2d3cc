"""The request a caller schedules, and what the worker reports back about it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

from ._exceptions import (
    CheckpointError,
    DistributedCheckpointError,
    FrozenRequestError,
    InvalidRequestError,
)
from ._ranks import get_rank, is_distributed


class AsyncRequest(NamedTuple):
    """A checkpoint routine to run in the background, and the steps that finish it.

    Same fields and semantics as ``nvidia_resiliency_ext``'s ``AsyncRequest``:

    - ``async_fn(*async_fn_args, **async_fn_kwargs)`` runs in the worker process. ``None``
      means there is nothing to run; the finalize steps still run in order.
    - ``finalize_fns`` run in the caller's process, in scheduling order, after ``async_fn``
      finished on every rank, and only if it succeeded everywhere.
    - ``preload_fn()`` runs in the caller's process at scheduling time; its result replaces
      ``async_fn_args[preload_arg_index]`` (the state dict; index 1 as in the reference).
    - ``is_frozen`` and ``call_idx`` are set by the queue.

    aiockpt copies every tensor found in the arguments to host staging buffers when the
    request is scheduled, so the caller may modify its tensors as soon as scheduling returns.
    """

    async_fn: Callable[..., Any] | None
    async_fn_args: tuple[Any, ...]
    finalize_fns: list[Callable[..., Any]]
    async_fn_kwargs: dict[str, Any] | None = None
    preload_fn: Callable[[], Any] | None = None
    is_frozen: bool = False
    call_idx: int = 0
    preload_arg_index: int = 1

    def add_finalize_fn(self, fn: Callable[[], Any]) -> None:
        """Append ``fn`` to the finalize steps; it runs after the ones already there.

        Raises :class:`FrozenRequestError` (a ``RuntimeError``, as in the reference) on a
        frozen (already scheduled) request.
        """
        if self.is_frozen:
            raise FrozenRequestError(
                "cannot add a finalize function to a frozen AsyncRequest; add it before "
                "scheduling the request"
            )
        if not callable(fn):
            raise InvalidRequestError(f"finalize function {fn!r} is not callable")
        self.finalize_fns.append(fn)

    def freeze(self) -> AsyncRequest:
        """Return a copy that refuses further finalize functions."""
        return self._replace(is_frozen=True, finalize_fns=list(self.finalize_fns))

    def execute_sync(self) -> Any:
        """Run the request in this process, synchronously: preload, ``async_fn``, then (in
        a torch.distributed job, after a barrier, so every rank has written) finalize.

        Useful for debugging and for a final save at exit. Returns ``async_fn``'s result.
        In a distributed job every rank must call it.
        """
        self.validate()
        args = self.prepared_args()
        result = self.async_fn(*args, **(self.async_fn_kwargs or {})) if self.async_fn else None
        if is_distributed():
            dist.barrier()
        self.execute_finalize_fns(validate_matching_call_idx=False)
        return result

    def execute_finalize_fns(self, validate_matching_call_idx: bool = True) -> int:
        """Run the finalize steps in order; return ``call_idx``.

        With ``validate_matching_call_idx`` in a torch.distributed job, the ranks then
        check that they all finalized the same call (every rank must call it) and raise
        :class:`DistributedCheckpointError` if not.
        """
        for fn in self.finalize_fns:
            fn()
        if validate_matching_call_idx and is_distributed():
            highest = torch.tensor([self.call_idx], dtype=torch.int64)
            dist.all_reduce(highest, op=dist.ReduceOp.MAX)
            if int(highest.item()) != self.call_idx:
                raise DistributedCheckpointError(
                    f"rank {get_rank()} finalized call {self.call_idx} while another rank "
                    f"finalized call {int(highest.item())}: every rank must schedule and "
                    "finalize the same requests in the same order",
                    call_idx=self.call_idx,
                    rank=get_rank(),
                )
        return self.call_idx

    def validate(self) -> None:
        """Raise :class:`InvalidRequestError` if the request cannot run as given."""
        if self.async_fn is not None and not callable(self.async_fn):
            raise InvalidRequestError(f"async_fn {self.async_fn!r} is not callable")
        if not isinstance(self.async_fn_args, tuple | list):
            raise InvalidRequestError(
                f"async_fn_args must be a tuple, got {type(self.async_fn_args).__name__}"
            )
        if self.async_fn_kwargs is not None and not isinstance(self.async_fn_kwargs, dict):
            raise InvalidRequestError(
                f"async_fn_kwargs must be a dict, got {type(self.async_fn_kwargs).__name__}"
            )
        for fn in self.finalize_fns:
            if not callable(fn):
                raise InvalidRequestError(f"finalize function {fn!r} is not callable")
        if self.preload_fn is not None:
            if not callable(self.preload_fn):
                raise InvalidRequestError(f"preload_fn {self.preload_fn!r} is not callable")
            if not 0 <= self.preload_arg_index < len(self.async_fn_args):
                raise InvalidRequestError(
                    f"preload_fn replaces async_fn_args[{self.preload_arg_index}], but the "
                    f"request has {len(self.async_fn_args)} positional argument(s); pass a "
                    "placeholder there or set preload_arg_index"
                )

    def prepared_args(self) -> tuple[Any, ...]:
        """The positional arguments with ``preload_fn``'s result in place (runs it)."""
        args = list(self.async_fn_args)
        if self.preload_fn is not None:
            args[self.preload_arg_index] = self.preload_fn()
        return tuple(args)


_REQUEST_FIELDS = ("async_fn", "async_fn_args", "finalize_fns")


def as_request(request: Any) -> AsyncRequest:
    """``request`` as an :class:`AsyncRequest`: an instance is returned as is; another
    object with the reference's fields (``async_fn``, ``async_fn_args``, ``finalize_fns``,
    optionally ``async_fn_kwargs``, ``preload_fn``) is converted by its fields."""
    if isinstance(request, AsyncRequest):
        return request
    if not all(hasattr(request, name) for name in _REQUEST_FIELDS):
        raise InvalidRequestError(
            f"expected an AsyncRequest (or an object with the fields async_fn, "
            f"async_fn_args and finalize_fns), got {type(request).__name__}"
        )
    if getattr(request, "flush_dst", None) is not None:
        raise InvalidRequestError(
            "AsyncRequest.flush_dst (node-local staging then a copy to durable storage) is "
            "not supported; write to the durable directory directly"
        )
    return AsyncRequest(
        request.async_fn,
        tuple(request.async_fn_args),
        list(request.finalize_fns or []),
        getattr(request, "async_fn_kwargs", None),
        getattr(request, "preload_fn", None),
    )


@dataclass(frozen=True)
class LocalOutcome:
    """What this rank's worker reported for one request: success with ``async_fn``'s
    result, or the error that explains the failure."""

    call_idx: int
    error: CheckpointError | None = None
    result: Any = None
    run_seconds: float = 0.0
    #: the result as the worker pickled it, until :func:`~aiockpt._core._process.resolve`
    #: unpickles it (outside the engine's lock: a result's own code may be slow)
    payload: bytes | None = None

    @property
    def ok(self) -> bool:
        return self.error is None
