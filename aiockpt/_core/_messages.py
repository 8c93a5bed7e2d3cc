"""The typed messages a caller and its worker process exchange over their connection."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# -- caller -> persistent worker ------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    """Run the pickled ``(fn, args, kwargs)`` of ``call_idx`` and reply with its outcome."""

    call_idx: int
    payload: bytes


@dataclass(frozen=True)
class MapArena:
    """Map a staging arena of ``nbytes``; its file descriptor follows on the connection."""

    arena_id: int
    nbytes: int


@dataclass(frozen=True)
class LayOut:
    """Build the tensor views of ``plan`` (a ``StagingPlan``) over a mapped arena; requests
    then refer to them by index. ``version`` names this layout of the arena."""

    arena_id: int
    version: int
    plan: Any


@dataclass(frozen=True)
class DropArena:
    """Forget an arena the caller freed."""

    arena_id: int


@dataclass(frozen=True)
class Stop:
    """Finish what was sent before, then exit."""


# -- worker -> caller -----------------------------------------------------------------------


@dataclass(frozen=True)
class Ready:
    """The persistent worker has started (it imported torch and can run requests)."""

    pid: int


@dataclass(frozen=True)
class Started:
    """The worker took ``call_idx`` and runs it now: from here on it may have written."""

    call_idx: int


@dataclass(frozen=True)
class Done:
    """``call_idx`` succeeded; ``payload`` is its pickled result (unpickled by the caller)."""

    call_idx: int
    seconds: float
    payload: bytes


@dataclass(frozen=True)
class Failed:
    """``call_idx`` raised in the worker: the exception's type, message and traceback."""

    call_idx: int
    seconds: float
    exc_type: str
    exc_message: str
    traceback: str


Reply = Done | Failed
