"""A failed save must not keep the caller's state dict alive.

An exception holds its traceback, and the traceback holds every frame it left, with their
local variables: the state dict, the request, the staged tensors. A user who keeps the
error (in a list of failures, a log record, ``sys.last_value``) would keep all of them.
Errors that leave the library therefore carry tracebacks that still print but whose
finished frames have no local variables.
"""

from __future__ import annotations

import contextlib
import copy
import functools
from collections.abc import Callable, Coroutine
from typing import Any, ParamSpec, TypeVar

from ._exceptions import CheckpointError

_P = ParamSpec("_P")
_T = TypeVar("_T")
_E = TypeVar("_E", bound=BaseException)


def drop_locals(error: BaseException) -> None:
    """Clear the local variables of the finished frames in ``error``'s tracebacks (and its
    causes' and contexts'): the traceback still prints, but holds no state dict."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [error]
    while todo:
        exc = todo.pop()
        if exc is None or id(exc) in seen:
            continue
        seen.add(id(exc))
        # The first entry is the frame that caught it, which may still run (or be a
        # suspended coroutine, which clearing would close); the exception left the others.
        tb = exc.__traceback__.tb_next if exc.__traceback__ is not None else None
        while tb is not None:
            with contextlib.suppress(RuntimeError):  # still executing: left alone
                tb.tb_frame.clear()
            tb = tb.tb_next
        todo += [exc.__cause__, exc.__context__]


def detached(error: _E) -> _E:
    """A copy of ``error`` to keep: the same class, message, attributes, cause, notes and
    traceback as now. Raising the original again (``fut.result()`` does) prepends the
    raiser's frames, with their local variables, to the original's traceback; never to
    the copy's. An error that cannot be copied is kept as it is."""
    try:
        kept = copy.copy(error)
    except Exception:
        return error
    if kept is error or type(kept) is not type(error):
        return error
    kept.__traceback__ = error.__traceback__
    kept.__cause__, kept.__context__ = error.__cause__, error.__context__
    kept.__suppress_context__ = error.__suppress_context__
    notes = getattr(error, "__notes__", None)
    if notes is not None:
        kept.__notes__ = list(notes)
    return kept


def releasing(fn: Callable[_P, _T]) -> Callable[_P, _T]:
    """Wrap a public method that takes a state dict: a :class:`CheckpointError` it raises
    holds none of its arguments."""

    @functools.wraps(fn)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _T:
        try:
            return fn(*args, **kwargs)
        except CheckpointError as exc:
            del args, kwargs  # this frame stays in the traceback
            drop_locals(exc)
            raise

    return wrapper


def areleasing(
    fn: Callable[_P, Coroutine[Any, Any, _T]],
) -> Callable[_P, Coroutine[Any, Any, _T]]:
    """:func:`releasing` for a coroutine function."""

    @functools.wraps(fn)
    async def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _T:
        try:
            return await fn(*args, **kwargs)
        except CheckpointError as exc:
            del args, kwargs
            drop_locals(exc)
            raise

    return wrapper
