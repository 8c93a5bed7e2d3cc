"""Every exception aiockpt raises, in one place.

    CheckpointError                   base class: catch this to handle any checkpoint failure
    ├── InvalidRequestError           bad input, rejected at the call (also a ValueError)
    ├── QueueClosedError              the queue was closed
    │   └── QueueBrokenError          the async queue's own task died: it refuses new work
    ├── QueueMisuseError              wrong thread, wrong API, or not entered (a RuntimeError)
    │   └── FrozenRequestError        a finalize step added to an already scheduled request
    ├── StagingError                  copying tensors to host buffers (or preload_fn) failed
    ├── WorkerError                   the checkpoint function raised in the worker process
    ├── WorkerCrashedError            the worker process died before it reported a result
    │   └── SaveTimeoutError          the worker passed the save deadline and was killed
    ├── FinalizeError                 a finalize step raised in the caller's process
    ├── CloseTimeoutError             closing gave up on a worker that did not answer in time
    ├── CheckpointCancelledError      ``fut.cancel()`` withdrew the request before it ran
    ├── CheckpointErrorGroup          several failures at once (also an ExceptionGroup)
    ├── DistributedCheckpointError    another rank failed, or ranks stopped agreeing in time
    ├── CheckpointNotFoundError       no committed checkpoint where one was asked for
    ├── CorruptCheckpointError        a file's checksum or size does not match its metadata
    │   └── UntrustedEntryError       a symlink, FIFO or device where a file or directory belongs
    ├── UnsafeCheckpointError         loading would unpickle arbitrary objects
    ├── DirectoryLockedError          another manager (process) writes to the directory
    └── StorageError                  the checkpoint directory cannot be created or written

    Preempted                         not an error: a ``SystemExit`` that ends a preempted job

Exceptions that are built in a worker process and carried to the caller define
``__reduce__`` so that they survive pickling with all their attributes.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import ExceptionGroup


class CheckpointError(Exception):
    """Base class of every error aiockpt raises about a checkpoint.

    ``call_idx`` is the index :meth:`CheckpointQueue.schedule_async_request` returned for
    the request that failed (``None`` when the error is not about one request) and ``rank``
    the torch.distributed rank that saw it (0 in a single process).
    """

    def __init__(self, message: str, *, call_idx: int | None = None, rank: int | None = None):
        super().__init__(message)
        self.message = message
        self.call_idx = call_idx
        self.rank = rank
        # Set by maybe_finalize_async_calls: requests finalized before this one failed.
        self.finalized_call_idxs: list[int] = []

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), self.message, self.__dict__.copy()))

    def __str__(self) -> str:
        return self.message


def _rebuild(cls: type[CheckpointError], message: str, state: dict[str, Any]) -> CheckpointError:
    err = cls.__new__(cls)
    Exception.__init__(err, message)
    err.__dict__.update(state)
    return err


class InvalidRequestError(CheckpointError, ValueError):
    """Raised at the call when a request cannot work: a non-callable function, a path whose
    directory does not exist, arguments that cannot be sent to a persistent worker.

    Nothing was scheduled; fix the argument named in the message and call again.
    """


class QueueClosedError(CheckpointError):
    """Raised when a queue is used after ``close()``/``aclose()``. Create a new queue (a
    blocking ``CheckpointQueue`` starts again by itself at its next request)."""


class QueueBrokenError(QueueClosedError):
    """Raised by every pending future, and by ``schedule`` afterwards, when a task of an
    ``AsyncCheckpointQueue`` (its stager or poller) died of an unexpected error, which is
    the ``__cause__``. Leave the ``async with`` block and open a new queue."""


class StagingError(CheckpointError):
    """Raised at the call when copying the state dict to host staging buffers failed, or
    when the request's ``preload_fn`` raised. Nothing was scheduled; the queue stays usable."""


class WorkerError(CheckpointError):
    """Raised when the request's checkpoint function raised inside the worker process.

    ``exc_type`` and ``exc_message`` name the original exception and ``worker_traceback``
    holds its traceback text as the worker formatted it. The finalize steps of the request
    did not run; the queue stays usable and the next request runs normally.
    """

    def __init__(
        self,
        message: str,
        *,
        call_idx: int | None = None,
        rank: int | None = None,
        exc_type: str = "",
        exc_message: str = "",
        worker_traceback: str = "",
    ):
        super().__init__(message, call_idx=call_idx, rank=rank)
        self.exc_type = exc_type
        self.exc_message = exc_message
        self.worker_traceback = worker_traceback


class WorkerCrashedError(CheckpointError):
    """Raised when the worker process died (killed, segfault, ``os._exit``) before it
    reported a result for the request. ``exitcode`` is the process's exit status, negative
    for a signal as in :attr:`multiprocessing.Process.exitcode`.

    The checkpoint of that request was not written completely. The next request starts a
    fresh worker; check the worker's stderr and the machine's memory (the kernel's OOM
    killer sends SIGKILL) before retrying.
    """

    def __init__(
        self,
        message: str,
        *,
        call_idx: int | None = None,
        rank: int | None = None,
        exitcode: int | None = None,
    ):
        super().__init__(message, call_idx=call_idx, rank=rank)
        self.exitcode = exitcode


class FinalizeError(CheckpointError):
    """Raised when a finalize step of a request raised in the caller's process. The steps
    after it did not run; the original exception is the ``__cause__``."""


class CloseTimeoutError(CheckpointError):
    """Raised when leaving an ``AsyncCheckpointQueue`` (or ``aclose()``) gave up on a request
    whose worker did not answer within the queue's ``timeout``. The worker was stopped; the
    checkpoint was not finalized. Raise ``timeout`` if saves legitimately take longer."""


class CheckpointCancelledError(CheckpointError):
    """Raised by a future that ``fut.cancel()`` withdrew before it started writing: nothing
    was written. A cancelled future counts as observed and is never reported again."""


class CheckpointErrorGroup(ExceptionGroup[CheckpointError], CheckpointError):  # type: ignore[override]
    """Raised by ``finalize()`` and when leaving an ``AsyncCheckpointQueue`` with every
    failure nobody observed yet, in scheduling order, as an anyio task group groups its
    tasks' errors. It is a :class:`CheckpointError` too, so ``except CheckpointError``
    catches it; ``except* WorkerError`` picks out one kind."""

    def __new__(cls, message: str, exceptions: Sequence[CheckpointError]) -> CheckpointErrorGroup:
        return super().__new__(cls, message, exceptions)

    def __init__(self, message: str, exceptions: Sequence[CheckpointError]) -> None:
        ExceptionGroup.__init__(self, message, exceptions)
        self.call_idx = None
        self.rank = None
        self.finalized_call_idxs = []

    def derive(self, excs: Sequence[CheckpointError]) -> CheckpointErrorGroup:  # type: ignore[override]
        return CheckpointErrorGroup(self.message, excs)

    def __reduce__(self) -> tuple[Any, ...]:
        return (CheckpointErrorGroup, (self.message, list(self.exceptions)))

    def __str__(self) -> str:
        return ExceptionGroup.__str__(self)


class DistributedCheckpointError(CheckpointError):
    """Raised on every rank when the request failed on some rank (``failed_ranks`` names
    them, ``rank_errors`` maps each to the first line of its error), or when ranks did not
    reach the completion check within the timeout (a rank died or stopped calling the
    queue). No finalize step ran anywhere."""

    def __init__(
        self,
        message: str,
        *,
        call_idx: int | None = None,
        rank: int | None = None,
        failed_ranks: tuple[int, ...] = (),
        rank_errors: dict[int, str] | None = None,
    ):
        super().__init__(message, call_idx=call_idx, rank=rank)
        self.failed_ranks = failed_ranks
        self.rank_errors = dict(rank_errors or {})


class CheckpointNotFoundError(CheckpointError):
    """Raised by ``load``/``restore`` when there is no committed checkpoint at the path or
    step asked for. A directory without ``metadata.json`` was never committed (its save
    failed or is still running); its files must not be trusted."""


class CorruptCheckpointError(CheckpointError):
    """Raised by ``verify``/``load``/``restore`` when a file does not match the size or
    checksum its metadata records, or the metadata itself is damaged or names a path
    outside the checkpoint. ``path`` is the offending file. Restore an older checkpoint."""

    def __init__(self, message: str, *, path: str = "", **kwargs: int | None) -> None:
        super().__init__(message, **kwargs)
        self.path = path


class UnsafeCheckpointError(CheckpointError):
    """Raised by ``load`` when the file holds pickled objects other than tensors and plain
    containers, which ``weights_only=True`` (the default) refuses to unpickle. Pass
    ``weights_only=False`` only for files you trust: unpickling can run arbitrary code."""


class SaveTimeoutError(WorkerCrashedError):
    """Raised when a request's worker did not report within the queue's ``save_timeout``
    (a write stuck on a dead network filesystem, say): the worker was killed and the
    checkpoint was not written. Check the storage, then save again; the next request starts
    a fresh worker."""


class QueueMisuseError(CheckpointError, RuntimeError):
    """Raised when a queue is used in a way it does not support: from a thread or event
    loop it does not belong to, through the other facade's API, or before it was entered.
    Nothing was scheduled; the message says which API to use instead."""


class UntrustedEntryError(CorruptCheckpointError):
    """Raised by ``load``/``verify``/the managers/``aiockpt ls`` when a checkpoint directory
    holds a symlink, FIFO, socket or device (or a plain file named like a step directory)
    where a regular file or a real directory belongs. aiockpt never follows or opens such
    entries. ``path`` names it: remove it, or stop sharing the directory with whoever
    planted it."""


class DirectoryLockedError(CheckpointError):
    """Raised when a checkpoint manager is opened on a directory another manager holds,
    or when a save finds another live process on this host writing the same file (a
    worker that outlived its job, say). ``holder`` names it ("pid 1234 on host node7").
    One process writes a directory at a time; the lock is released when its holder closes
    its manager or dies. Stop the other job (or its lingering worker processes), or use
    another directory."""

    def __init__(self, message: str, *, holder: str = "", **kwargs: int | None) -> None:
        super().__init__(message, **kwargs)
        self.holder = holder


class StorageError(CheckpointError):
    """Raised at the call when the checkpoint directory cannot be created, locked or
    written (a read-only filesystem, missing permission). ``path`` names it; the original
    ``OSError`` is the ``__cause__``. Fix the mount or permissions, or choose another path."""

    def __init__(self, message: str, *, path: str = "", **kwargs: int | None) -> None:
        super().__init__(message, **kwargs)
        self.path = path


class FrozenRequestError(QueueMisuseError):
    """Raised by :meth:`AsyncRequest.add_finalize_fn` on a request that was already
    scheduled (frozen). Add every finalize step before scheduling the request. A
    ``RuntimeError``, as the reference raises."""


class Preempted(SystemExit):
    """Raised by ``Preemption.save_and_exit`` once a preempted job has done what it could
    before its deadline: a ``SystemExit`` whose ``code`` is :attr:`EXIT_CODE` (75,
    ``EX_TEMPFAIL``: "try again later"), so an uncaught one ends the process with that
    status, after ``with`` blocks and ``finally`` clauses have run.

    ``agreed_step`` is the step every rank agreed to stop at; ``saved_step`` the step the
    last save committed (None if none did); ``latest_step`` the newest committed step
    when the job exited (resume from it); ``outcome`` says what happened: ``"saved"``
    (``agreed_step`` committed), ``"in-flight"`` (no time for a new save: the save in
    flight committed), ``"not-saved"`` (nothing new committed: no time, or the save
    failed; the log says why). ``signal`` names the signal, ``seconds`` the time from it
    to the end of the last save.
    """

    EXIT_CODE = 75

    def __init__(
        self,
        message: str,
        *,
        agreed_step: int,
        saved_step: int | None,
        latest_step: int | None,
        outcome: str,
        signal: str,
        seconds: float,
    ) -> None:
        super().__init__(self.EXIT_CODE)
        self.message = message
        self.agreed_step = agreed_step
        self.saved_step = saved_step
        self.latest_step = latest_step
        self.outcome = outcome
        self.signal = signal
        self.seconds = seconds

    def __reduce__(self) -> tuple[Any, ...]:
        state = {k: v for k, v in self.__dict__.items() if k != "message"}
        return (_rebuild_preempted, (self.message, state))

    def __str__(self) -> str:
        return self.message


def _rebuild_preempted(message: str, state: dict[str, Any]) -> Preempted:
    return Preempted(message, **state)
