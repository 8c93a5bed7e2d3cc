"""Checkpoint managers for training loops: numbered steps in one directory, retention,
latest, restore and rollback. ``AsyncCheckpointManager`` for async code (it makes no
filesystem call on the event loop), ``CheckpointManager`` for a plain loop; both write
sharded, committed checkpoints through the queues, as a ``torch.save`` file per rank or in
the ``torch.distributed.checkpoint`` format. The rules live in ``_steps``."""

from __future__ import annotations

from typing import Any

import anyio
from typing_extensions import Unpack

from ._aload import in_thread
from ._async_queue import AsyncCheckpointQueue
from ._exceptions import (
    CheckpointError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    InvalidRequestError,
    QueueClosedError,
    QueueMisuseError,
    StorageError,
)
from ._facade import QueueFacade
from ._futures import CheckpointFuture
from ._loops import run_to_end
from ._options import AsyncQueueFacadeKeywords, QueueFacadeKeywords
from ._queue import CheckpointQueue
from ._ranks import get_rank, is_distributed
from ._request import AsyncRequest
from ._steps import StepDirectory, check_step
from ._tracebacks import areleasing, releasing
from ._uploads import RemoteTier, UploadPoint
from .storage._protocol import Storage


def _restore(
    steps: StepDirectory, tier: RemoteTier | None, step: Any, state_dict: Any, **load_options: Any
) -> Any:
    path = steps.restore_path(step) if tier is None else _tiered_path(tier, step)
    return steps.format.restore(path, state_dict, steps.storage, **load_options)


_ERRORS: dict[str, type[CheckpointError]] = {
    "CheckpointNotFoundError": CheckpointNotFoundError,
    "CorruptCheckpointError": CorruptCheckpointError,
    "InvalidRequestError": InvalidRequestError,
}


def _tiered_path(tier: RemoteTier, step: Any) -> str:
    """Rank 0 picks the step (downloading it if needed); every rank loads that one."""
    if not is_distributed():
        return tier.restore_path(step)
    import torch.distributed as dist

    box: list[Any] = [None]
    if get_rank() == 0:
        try:
            box = [("ok", tier.restore_path(step))]
        except CheckpointError as exc:
            box = [(type(exc).__name__, str(exc))]
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind != "ok":
        raise _ERRORS.get(kind, StorageError)(f"rank 0: {value}")
    return str(value)


def _tiers(
    directory: Any,
    keep_last: Any,
    local: Any,
    remote: Any,
    keep_local: Any,
    keep_remote: Any,
    storage: Any,
) -> tuple[Any, Any]:
    """The local directory and its retention: ``directory``/``keep_last``, or
    ``local``/``keep_local`` with a ``remote`` tier."""
    if remote is None:
        if local is not None or keep_local is not None or keep_remote is not None:
            raise InvalidRequestError(
                "local=, keep_local= and keep_remote= make two tiers: pass remote= (a URL) too"
            )
        if directory is None:
            raise InvalidRequestError("pass the checkpoint directory (a path or a URL)")
        return directory, keep_last
    if directory is not None or keep_last is not None or local is None:
        raise InvalidRequestError(
            "two tiers are local=PATH and remote=URL (with keep_local= and keep_remote=), "
            "not a directory or keep_last="
        )
    if storage is not None:
        raise InvalidRequestError("storage= cannot be combined with local=/remote= tiers")
    return local, keep_local


class _Tiered:
    """The remote tier's part of both managers."""

    steps: StepDirectory
    tier: RemoteTier | None

    def _make_tier(self, remote: Any, keep_remote: Any, storage_options: Any, lock: bool) -> None:
        self.tier = None
        if remote is None:
            return
        self.tier = RemoteTier(remote, keep_remote, self.steps, storage_options, lock=lock)
        self.steps.protected = self.tier.protected
        self.steps.on_durable = self.tier.committed

    def _open_all(self) -> None:
        self.steps.open()
        if self.tier is None:
            return
        try:
            self.steps.raise_floor(self.tier.open())
        except BaseException:
            self.steps.close()
            raise

    def _close_all(self) -> None:
        try:
            if self.tier is not None:
                self.tier.close()  # finishes the queued uploads first
        finally:
            self.steps.close()

    def _track(self, step: int) -> UploadPoint | None:
        if self.tier is None or get_rank() != 0:
            return None
        return self.tier.point(step)

    def _settled(self, step: int) -> None:
        self.steps.settled(step)
        if self.tier is not None and get_rank() == 0:
            self.tier.settled_locally(step)

    def _rollback(self, to_step: Any, force: bool) -> list[int]:
        """The local rollback, then (rank 0) the remote steps above ``to_step`` too."""
        if self.tier is not None:
            # The store is read first: unreachable, nothing is deleted on either tier. A
            # step committed only remotely (retention took the local copy) is a step to
            # go back to: the local steps above it go, restore() downloads it.
            step = check_step(to_step)
            remote = self.tier.scan().committed
            force = force or (step not in self.steps.scan().committed and step in remote)
        doomed = self.steps.rollback(to_step, force)
        if self.tier is not None:
            kept = [s for s in self.tier.scan().committed if s <= int(to_step)]
            self.steps.raise_floor(kept[-1] if kept else -1)  # saves go above it
        if self.tier is not None and get_rank() == 0:
            doomed = sorted({*doomed, *self.tier.rollback(int(to_step))})
        return doomed

    def uploads(self) -> dict[int, str]:
        """Each step's upload to the remote tier (rank 0), by step: ``"pending"``,
        ``"uploading"``, ``"uploaded"`` or ``"failed"``; empty without a remote tier."""
        return {} if self.tier is None else self.tier.states()


def _step_directory(
    directory: Any,
    keep_last: Any,
    storage: Storage | None,
    format: str,
    planner: Any,
    thread_count: int,
    lock: bool,
    storage_options: dict[str, Any] | None,
    persistent: bool,
) -> StepDirectory:
    format_options: dict[str, Any] = {}
    if planner is not None:
        format_options["planner"] = planner
    if thread_count != 1:
        format_options["thread_count"] = thread_count
    steps = StepDirectory(
        directory,
        keep_last,
        storage,
        format,
        format_options,
        lock=lock,
        storage_options=storage_options,
    )
    if not persistent and not getattr(steps.storage, "fork_safe", True):
        raise InvalidRequestError(
            f"{type(steps.storage).__name__} cannot write from a forked worker (its client "
            "does not survive fork): use persistent=True (the default)"
        )
    return steps


class _Steps:
    """What both managers answer from the directory alone (blocking calls)."""

    steps: StepDirectory

    def latest_step(self) -> int | None:
        """The newest committed step, None if there is none."""
        committed = self.steps.scan().committed
        return committed[-1] if committed else None

    def committed_steps(self) -> list[int]:
        """Every committed step, oldest first (numeric order)."""
        return self.steps.scan().committed


class AsyncCheckpointManager(_Steps, _Tiered, QueueFacade):
    """Numbered checkpoints in ``directory``, for async training loops::

        async with AsyncCheckpointManager("ckpts", keep_last=3) as mgr:
            state = await mgr.restore() if await mgr.alatest_step() is not None else None
            ...
            fut = await mgr.save(step, {"model": model.state_dict()})

    Each step is a directory committed by its metadata; older steps beyond ``keep_last``
    are deleted only after a newer one is committed. Saves must go forward (see
    :meth:`rollback`). Entering takes the directory's lock (:class:`DirectoryLockedError`
    if another manager holds it); ``lock=False`` skips it, for a filesystem without
    ``flock`` (NFS without lockd, Lustre without ``-o flock``): then nothing stops two
    jobs from writing the same directory, so make sure only one does. Queue options pass
    through.

    ``format="torch"`` (the default) writes a ``torch.save`` file per rank, read back by
    :meth:`restore` at the same world size. ``format="dcp"`` writes each step in the
    ``torch.distributed.checkpoint`` format (committed by ``.metadata``, with checksums),
    planned with ``planner`` (default ``DefaultSavePlanner``, reused while the state dict's
    structure holds) and written by ``thread_count`` threads per rank; ``dcp.load`` reads
    it at any world size, and ``await mgr.restore(state_dict=sd)`` loads it into ``sd``.
    """

    def __init__(
        self,
        directory: Any = None,
        keep_last: int | None = None,
        *,
        local: Any = None,
        remote: str | None = None,
        keep_local: int | None = None,
        keep_remote: int | None = None,
        storage: Storage | None = None,
        storage_options: dict[str, Any] | None = None,
        format: str = "torch",
        planner: Any = None,
        thread_count: int = 1,
        persistent: bool = True,
        lock: bool = True,
        **queue_options: Unpack[AsyncQueueFacadeKeywords],
    ) -> None:
        where, keep = _tiers(directory, keep_last, local, remote, keep_local, keep_remote, storage)
        self.steps = _step_directory(
            where,
            keep,
            storage,
            format,
            planner,
            thread_count,
            lock,
            storage_options if remote is None else None,
            persistent,
        )
        self._make_tier(remote, keep_remote, storage_options, lock)
        self.queue = AsyncCheckpointQueue(persistent, **queue_options)
        self._scheduling: anyio.Lock | None = None
        self._holding = False  # the directory is (being) opened by this manager

    async def _acquire(self) -> None:
        if self._holding:  # open already (or opening): its lock is not this call's
            raise QueueMisuseError(
                f"the manager of {self.steps.directory!r} is open already: open it once, "
                "with `async with` or `tg.start(manager.serve)`"
            )
        self._holding = True
        try:
            # To its end even if cancelled (the thread takes the lock): then released.
            await run_to_end(self._open_all)
            await anyio.lowlevel.checkpoint()  # a cancellation that came meanwhile
        except BaseException:
            await self._release()
            raise

    async def _release(self) -> None:
        if not self._holding:
            return
        # Unlocking is a filesystem call (slow on a network filesystem): off the loop, and
        # never skipped by a cancellation.
        with anyio.CancelScope(shield=True):
            await run_to_end(self._close_all)
        self._holding = False

    @areleasing
    async def save(
        self,
        step: int,
        state_dict: Any,
        extra: dict[str, Any] | None = None,
        *,
        wait_for_staging: bool = True,
    ) -> CheckpointFuture:
        """Schedule the checkpoint of ``step``; its future resolves once it is committed.
        ``step`` must be above every committed step and every step being saved;
        ``extra`` must be JSON. Both are checked here, before anything is written.
        In a distributed job every rank saves every step (with ``format="dcp"`` planning
        is collective): tasks saving concurrently are served in the order they called.
        Cancelled, a save that has begun is still scheduled (its future settles the step)
        and the cancellation is raised once it is; a save waiting behind another is not."""
        if self._scheduling is None:
            self._scheduling = anyio.Lock()
        # Concurrent saves plan and schedule one at a time, in call order, so that every
        # rank runs its planning collectives and numbers its calls in the same order.
        async with self._scheduling:
            return await self._save(step, state_dict, extra, wait_for_staging)

    async def _save(
        self, step: int, state_dict: Any, extra: dict[str, Any] | None, wait_for_staging: bool
    ) -> CheckpointFuture:
        completion = self.queue.completion
        reserved: list[int] = []
        scheduled: list[CheckpointFuture] = []

        def build() -> AsyncRequest:
            request, number = self.steps.request(step, state_dict, extra, completion)
            reserved.append(number)
            return request

        def track(fut: CheckpointFuture) -> None:
            # Committed or failed, the step stops blocking others once its save settles.
            scheduled.append(fut)
            fut.uploaded = self._track(number)
            fut.add_done_callback(lambda _: self._settled(number))

        # Once this rank starts building the request it schedules it, even if cancelled
        # meanwhile (the cancellation is delivered right after): the other ranks schedule
        # theirs, and every rank's calls must be numbered alike.
        refused: QueueClosedError | None = None
        with anyio.CancelScope(shield=True):
            try:
                # To its end even under asyncio's Task.cancel() (which passes shields):
                # the step it reserves must be settled whatever happens next.
                request = await run_to_end(build)
                (number,) = reserved
                fut = await self.queue.schedule(
                    request, wait_for_staging=False, needs_global=True, on_scheduled=track
                )
            except BaseException as exc:
                if not scheduled:  # refused: it will not run
                    for number in reserved:
                        self._settled(number)
                if not isinstance(exc, QueueClosedError):
                    raise
                refused = exc
        if refused is not None:
            # The cancellation that reached this save may be what closed the queue (a
            # served manager's task group): then it is what the caller gets.
            await anyio.lowlevel.checkpoint_if_cancelled()
            raise refused
        if wait_for_staging:
            await fut.staged
        return fut

    async def restore(
        self, step: int | None = None, *, state_dict: Any = None, **load_options: Any
    ) -> Any:
        """Load (and verify) ``step``, by default the newest committed. ``format="torch"``:
        returns this rank's state dict (options are :func:`aiockpt.load`'s).
        ``format="dcp"``: loads into ``state_dict`` in place, resharding, and returns it
        (collective; options are :func:`aiockpt.dcp.load`'s). Raises
        :class:`CheckpointNotFoundError` if there is no such committed step."""
        return await in_thread(
            lambda: _restore(self.steps, self.tier, step, state_dict, **load_options)
        )

    async def wait_uploaded(self, step: int | None = None) -> None:
        """Wait until ``step`` (by default every step saved so far) is committed in the
        remote tier (rank 0); raises the :class:`CheckpointError` of a failed upload."""
        if self.tier is None:
            raise InvalidRequestError("this manager has no remote tier (remote=...)")
        for point in self.tier.points_for(None if step is None else check_step(step)):
            await point

    async def alatest_step(self) -> int | None:
        """:meth:`latest_step` without blocking the event loop."""
        return await in_thread(self.latest_step)

    async def acommitted_steps(self) -> list[int]:
        """:meth:`committed_steps` without blocking the event loop."""
        return await in_thread(self.committed_steps)

    async def rollback(self, to_step: int, *, force: bool = False) -> list[int]:
        """Un-commit and delete the steps above ``to_step`` so that saving resumes from
        there; returns them. ``to_step`` must be a committed step (the error names those
        that exist), so a checkpoint is always left; ``force=True`` deletes the steps
        above any ``to_step``, even every one. Refused while saves are pending (await
        them first). In a distributed job every rank calls it."""
        return await in_thread(lambda: self._rollback(to_step, force))


class CheckpointManager(_Steps, _Tiered):
    """The blocking twin of :class:`AsyncCheckpointManager`, for plain training loops:
    call ``poll()`` every step (it never blocks) and ``close()`` at the end. Creating it
    takes the directory's lock (:class:`DirectoryLockedError` if another manager holds it).
    ``format``, ``planner`` and ``thread_count`` are :class:`AsyncCheckpointManager`'s.
    """

    def __init__(
        self,
        directory: Any = None,
        keep_last: int | None = None,
        *,
        local: Any = None,
        remote: str | None = None,
        keep_local: int | None = None,
        keep_remote: int | None = None,
        storage: Storage | None = None,
        storage_options: dict[str, Any] | None = None,
        format: str = "torch",
        planner: Any = None,
        thread_count: int = 1,
        persistent: bool = True,
        lock: bool = True,
        **queue_options: Unpack[QueueFacadeKeywords],
    ) -> None:
        where, keep = _tiers(directory, keep_last, local, remote, keep_local, keep_remote, storage)
        self.steps = _step_directory(
            where,
            keep,
            storage,
            format,
            planner,
            thread_count,
            lock,
            storage_options if remote is None else None,
            persistent,
        )
        self._make_tier(remote, keep_remote, storage_options, lock)
        self._open_all()
        try:
            self.queue = CheckpointQueue(persistent, **queue_options)
        except BaseException:
            self._close_all()
            raise
        self._step_of: dict[int, int] = {}  # call index -> step, until it is settled
        self._closed = False

    @releasing
    def save(self, step: int, state_dict: Any, extra: dict[str, Any] | None = None) -> int:
        """Schedule the checkpoint of ``step``; returns its call index. ``step`` must be
        above every committed step and every step being saved; ``extra`` must be JSON."""
        if self._closed:
            # Its queue could start again, but the directory lock is released.
            raise QueueClosedError("the checkpoint manager is closed; create a new one")
        request, number = self.steps.request(step, state_dict, extra, self.queue.completion)
        try:
            idx = self.queue.schedule_async_request(request, needs_global=True)
        except CheckpointError:
            self._settled(number)  # refused or staging failed: it will not run
            raise
        self._step_of[idx] = number
        self._track(number)
        return idx

    def _settle(self, idxs: list[int]) -> None:
        for idx in idxs:
            number = self._step_of.pop(idx, None)
            if number is not None:
                self._settled(number)

    def poll(self, blocking: bool = False) -> list[int]:
        """Commit the checkpoints that are done; return their call indices (FIFO)."""
        try:
            done = self.queue.maybe_finalize_async_calls(blocking=blocking, no_dist=True)
        except CheckpointError as err:
            failed = [] if err.call_idx is None else [err.call_idx]
            self._settle([*err.finalized_call_idxs, *failed])
            raise
        self._settle(done)
        return done

    def restore(
        self, step: int | None = None, *, state_dict: Any = None, **load_options: Any
    ) -> Any:
        """Load (and verify) ``step``, by default the newest committed (see
        :meth:`AsyncCheckpointManager.restore`; ``format="dcp"`` loads into ``state_dict``)."""
        return _restore(self.steps, self.tier, step, state_dict, **load_options)

    def wait_uploaded(self, step: int | None = None, timeout: float | None = None) -> None:
        """Block until ``step`` (by default every step committed so far) is committed in
        the remote tier (rank 0); raises the :class:`CheckpointError` of a failed upload,
        :class:`TimeoutError` after ``timeout`` seconds. Call :meth:`poll` first: a step
        is uploaded once it is committed locally."""
        if self.tier is None:
            raise InvalidRequestError("this manager has no remote tier (remote=...)")
        self.tier.wait(step, timeout)

    def rollback(self, to_step: int, *, force: bool = False) -> list[int]:
        """Un-commit and delete the steps above ``to_step``; returns them (see
        :meth:`AsyncCheckpointManager.rollback`)."""
        return self._rollback(to_step, force)

    def close(self) -> None:
        """Finalize pending saves, stop the worker, release the directory. Idempotent."""
        self._closed = True
        try:
            self.queue.close(no_dist=True)
        finally:
            self._close_all()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
