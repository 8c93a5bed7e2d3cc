"""The options every queue takes, in one frozen object instead of three keyword lists."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from ._dist import DEFAULT_TIMEOUT
from ._exceptions import InvalidRequestError


@dataclass(frozen=True)
class QueueOptions:
    """How a queue runs its requests.

    Args:
        persistent: one long-lived worker process (True) or a forked process per request.
        start_method: how the persistent worker starts, ``"spawn"`` or ``"forkserver"``.
        max_staging_copies: host staging copies of the state held at most; scheduling waits
            for an earlier request's worker when all are in use.
        pin_memory: page-lock the staging buffers (default: when CUDA is available).
        process_group: the group completion checks reduce over (default: a dedicated gloo
            group over all ranks, created on first use).
        timeout: how long a completion check waits for the other ranks before it raises.
        single_threaded_staging: copy host tensors on one core (plain memmove) rather than
            with torch's intra-op threads.
        save_timeout: seconds a worker may spend on one request before it is killed and
            the request fails with :class:`SaveTimeoutError` (None: no limit). Closing a
            queue waits no longer than this for a worker that does not answer.
    """

    persistent: bool = True
    start_method: str = "spawn"
    max_staging_copies: int = 1
    pin_memory: bool | None = None
    process_group: Any = None
    timeout: timedelta = DEFAULT_TIMEOUT
    single_threaded_staging: bool = False
    save_timeout: float | None = None

    def __post_init__(self) -> None:
        if self.start_method not in ("spawn", "forkserver"):
            raise InvalidRequestError(
                f"start_method must be 'spawn' or 'forkserver', not {self.start_method!r}; "
                "persistent=False forks a process per request"
            )
        if self.max_staging_copies < 1:
            raise InvalidRequestError("max_staging_copies must be at least 1")
        if self.save_timeout is not None and not self.save_timeout > 0:
            raise InvalidRequestError(
                f"save_timeout must be a positive number of seconds or None, not "
                f"{self.save_timeout!r}"
            )
