"""The options every queue takes: one frozen :class:`QueueOptions`, and the typed keywords
(:class:`QueueKeywords`) that build it wherever a queue or a facade is constructed."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypedDict

from ._dist import DEFAULT_TIMEOUT
from ._exceptions import InvalidRequestError


@dataclass(frozen=True)
class QueueOptions:
    """How a queue runs its requests.

    Args:
        persistent: one long-lived worker process (True) or a forked process per request.
        start_method: how the persistent worker starts: ``"forkserver"`` (the default: a
            server process imports torch once, and each worker forked from it starts in
            tens of milliseconds) or ``"spawn"`` (a fresh interpreter per worker, which
            imports torch again and sees the environment as it is at that moment).
        max_staging_copies: host staging copies of the state held at most; scheduling waits
            for an earlier request's worker when all are in use.
        pin_memory: page-lock the staging buffers (default: when CUDA is available).
        process_group: the group completion checks reduce over (default: a dedicated gloo
            group over all ranks, created on first use).
        timeout: how long a completion check waits for the other ranks before it raises.
        single_threaded_staging: copy host tensors on one core; otherwise (the default)
            storages of 32 MiB and more are copied by two threads. Host tensors are always
            copied with plain memmove, which releases the GIL, never with torch's intra-op
            threads.
        save_timeout: seconds a worker may spend on one request before it is killed and
            the request fails with :class:`SaveTimeoutError`. One hour by default (a
            checkpoint that takes longer on one rank is rare; raise it for those), so a
            worker stuck in a write is bounded out of the box; None: no limit. Closing a
            queue waits no longer than this for a worker that does not answer.
        is_daemon: accepted for compatibility with the reference and ignored: the worker is
            never a daemonic process (aiockpt stops it at exit itself, and a daemonic
            process could not start the helper processes a checkpoint function may need).
        cpu_priority: the nice value (0-19) the worker raises itself to when it starts, so
            it yields the CPU to the training step's threads; None leaves it unchanged.
            A worker never lowers its nice value (that needs privileges).
        io_priority: the I/O scheduling class the worker sets for itself (``ioprio_set``):
            1 realtime, 2 best-effort, 3 idle (only when no one else does I/O: the choice
            that keeps checkpoint writes out of the way); 0 or None leaves it unchanged.
        sigterm_timeout: seconds a worker that must stop gets after SIGTERM before it is
            sent SIGKILL (when a queue is closed or aborted).
        start_timeout: seconds a request may wait for a starting persistent worker to be
            ready (it imports torch and your main module); a worker not ready by then is
            killed and the requests sent to it fail with :class:`WorkerCrashedError`, so a
            worker stuck at start never holds a save forever.
        cpu_shm_mode: accepted for compatibility with the reference; aiockpt always stages
            to host memory shared with the worker, so it changes nothing.
    """

    persistent: bool = True
    start_method: str = "forkserver"
    max_staging_copies: int = 1
    pin_memory: bool | None = None
    process_group: Any = None
    timeout: timedelta = DEFAULT_TIMEOUT
    single_threaded_staging: bool = False
    save_timeout: float | None = 3600.0
    is_daemon: bool = True
    cpu_priority: int | None = 10
    io_priority: int | None = None
    sigterm_timeout: float = 30.0
    cpu_shm_mode: bool = False
    start_timeout: float = 300.0

    def __post_init__(self) -> None:
        timeout: Any = self.timeout
        given = timeout
        if isinstance(timeout, int | float) and not isinstance(timeout, bool):
            object.__setattr__(self, "timeout", timeout := timedelta(seconds=timeout))
        if not isinstance(timeout, timedelta) or not timeout.total_seconds() > 0:
            raise InvalidRequestError(
                f"timeout must be a positive timedelta or number of seconds, not {given!r}"
            )
        if self.start_method not in ("spawn", "forkserver"):
            raise InvalidRequestError(
                f"start_method must be 'spawn' or 'forkserver', not {self.start_method!r}; "
                "persistent=False forks a process per request"
            )
        if not self.start_timeout > 0:
            raise InvalidRequestError(
                f"start_timeout must be a positive number of seconds, not {self.start_timeout!r}"
            )
        if self.max_staging_copies < 1:
            raise InvalidRequestError("max_staging_copies must be at least 1")
        if self.save_timeout is not None and not self.save_timeout > 0:
            raise InvalidRequestError(
                f"save_timeout must be a positive number of seconds or None, not "
                f"{self.save_timeout!r}"
            )
        if self.cpu_priority is not None and not 0 <= self.cpu_priority <= 19:
            raise InvalidRequestError(
                f"cpu_priority must be a nice value from 0 to 19 or None, not {self.cpu_priority!r}"
            )
        if self.io_priority is not None and self.io_priority not in range(4):
            raise InvalidRequestError(
                f"io_priority must be an I/O scheduling class from 0 to 3 (3: idle) or None, "
                f"not {self.io_priority!r}"
            )
        if not self.sigterm_timeout >= 0:
            raise InvalidRequestError(
                f"sigterm_timeout must be zero or more seconds, not {self.sigterm_timeout!r}"
            )

    def worker_settings(self) -> WorkerSettings:
        """What a worker process applies to itself and how it is stopped."""
        return WorkerSettings(
            self.cpu_priority,
            self.io_priority,
            self.sigterm_timeout,
            self.start_timeout,
            self.save_timeout,
        )


@dataclass(frozen=True)
class WorkerSettings:
    """The part of :class:`QueueOptions` a caller passes to its worker processes."""

    cpu_priority: int | None = None
    io_priority: int | None = None
    sigterm_timeout: float = 30.0
    start_timeout: float = 300.0
    save_timeout: float | None = 3600.0


# The keywords that build a QueueOptions, in the groups the signatures need: NVRx's five
# (positional in CheckpointQueue), the group completion checks reduce over (the DCP facades
# take a `process_group` of their own, for planning), and the rest.


class ReferenceQueueKeywords(TypedDict, total=False):
    """:class:`QueueOptions` fields that NVRx's ``CheckpointQueue`` takes by position."""

    is_daemon: bool
    cpu_priority: int | None
    io_priority: int | None
    sigterm_timeout: float
    cpu_shm_mode: bool


class EngineKeywords(TypedDict, total=False):
    """:class:`QueueOptions` fields of aiockpt's own, but for ``process_group``."""

    start_method: str
    max_staging_copies: int
    pin_memory: bool | None
    timeout: timedelta | float
    single_threaded_staging: bool
    save_timeout: float | None
    start_timeout: float


class GroupKeywords(TypedDict, total=False):
    """The :class:`QueueOptions` field naming the completion checks' process group."""

    process_group: Any


class ExtraQueueKeywords(EngineKeywords, GroupKeywords, total=False):
    """What :class:`~aiockpt.CheckpointQueue` takes by keyword after NVRx's arguments."""


class QueueKeywords(ReferenceQueueKeywords, ExtraQueueKeywords, total=False):
    """The keywords that build a :class:`QueueOptions` (all but ``persistent``, which every
    queue and facade takes as its first argument); see :class:`QueueOptions` for each."""


class QueueFacadeKeywords(QueueKeywords, total=False):
    """What a blocking facade forwards to its :class:`~aiockpt.CheckpointQueue`: the
    options' keywords, or ``options=`` a whole :class:`QueueOptions`."""

    options: QueueOptions | None


class AsyncQueueFacadeKeywords(QueueFacadeKeywords, total=False):
    """What an async facade forwards to its :class:`~aiockpt.AsyncCheckpointQueue`."""

    no_dist: bool
    max_pending: int | None


class DCPQueueKeywords(ReferenceQueueKeywords, EngineKeywords, total=False):
    """What a DCP facade forwards to its :class:`~aiockpt.CheckpointQueue` (its own
    ``process_group`` is the planning group)."""

    options: QueueOptions | None


class AsyncDCPQueueKeywords(DCPQueueKeywords, total=False):
    """What an async DCP facade forwards to its :class:`~aiockpt.AsyncCheckpointQueue`."""

    no_dist: bool
    max_pending: int | None


def build_options(
    persistent: bool, options: QueueOptions | None, keywords: Mapping[str, Any]
) -> QueueOptions:
    """``options`` if given (then no keyword may be), else a :class:`QueueOptions` of
    ``persistent`` and ``keywords``."""
    if options is None:
        return QueueOptions(persistent, **keywords)
    if keywords:
        raise InvalidRequestError(
            f"pass options=QueueOptions(...) or its keywords, not both (got {sorted(keywords)})"
        )
    return options
