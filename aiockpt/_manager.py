"""Checkpoint managers for training loops: numbered steps in one directory, retention,
latest and restore. ``AsyncCheckpointManager`` for async code, ``CheckpointManager`` for a
plain loop; both write sharded, committed checkpoints through the queues."""

from __future__ import annotations

import os
import re
from typing import Any

from ._async_queue import AsyncCheckpointQueue, QueueFacade
from ._exceptions import CheckpointNotFoundError, InvalidRequestError
from ._futures import CheckpointFuture
from ._load import load, load_sync
from ._queue import AsyncCallsQueue
from ._request import AsyncRequest
from ._sharded import sharded_request
from ._storage import METADATA, LocalStorage, Storage

_STEP_DIR = re.compile(r"^step-(\d{12})$")


class _Layout:
    """Where steps live in the manager's directory, which are committed, what to prune."""

    def __init__(self, directory: Any, keep_last: int | None, storage: Storage | None) -> None:
        if keep_last is not None and keep_last < 1:
            raise InvalidRequestError("keep_last must be at least 1 (or None to keep all)")
        self.directory = os.fspath(directory)
        self.keep_last = keep_last
        self.storage = storage if storage is not None else LocalStorage()
        self.storage.makedirs(self.directory)

    def step_dir(self, step: int) -> str:
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise InvalidRequestError(f"step must be a non-negative int, not {step!r}")
        return os.path.join(self.directory, f"step-{step:012d}")

    def steps(self) -> tuple[list[int], list[int]]:
        """(committed steps, uncommitted steps), each ascending."""
        committed: list[int] = []
        partial: list[int] = []
        for name in self.storage.list_dir(self.directory):
            match = _STEP_DIR.match(name)
            if match is None:
                continue
            has_meta = METADATA in self.storage.list_dir(os.path.join(self.directory, name))
            (committed if has_meta else partial).append(int(match.group(1)))
        return committed, partial

    def request(
        self, step: int, state_dict: Any, extra: dict[str, Any] | None, queue_engine: Any
    ) -> AsyncRequest:
        directory = self.step_dir(step)
        if step in self.steps()[0]:
            raise InvalidRequestError(
                f"step {step} is already committed in {directory!r}; save under a new step"
            )
        return sharded_request(
            state_dict,
            directory,
            {"step": step, **(extra or {})},
            queue_engine.completion,
            self.storage,
            after_commit=lambda: self.prune(step),
        )

    def prune(self, committed_step: int) -> None:
        """After ``committed_step`` is committed: drop committed steps beyond the newest
        ``keep_last``, and uncommitted leftovers of older steps (crashed saves)."""
        committed, partial = self.steps()
        doomed = [s for s in partial if s < committed_step]
        if self.keep_last is not None:
            doomed += committed[: max(0, len(committed) - self.keep_last)]
        for step in doomed:
            self.storage.remove_tree(self.step_dir(step))

    def restore_dir(self, step: int | None) -> str:
        committed, _ = self.steps()
        if step is None:
            if not committed:
                raise CheckpointNotFoundError(f"no committed checkpoint in {self.directory!r}")
            step = committed[-1]
        elif step not in committed:
            raise CheckpointNotFoundError(
                f"step {step} has no committed checkpoint in {self.directory!r} "
                f"(committed: {committed})"
            )
        return self.step_dir(step)


class _Steps:
    """What both managers answer from the directory alone."""

    layout: _Layout

    def latest_step(self) -> int | None:
        """The newest committed step, None if there is none."""
        committed, _ = self.layout.steps()
        return committed[-1] if committed else None

    def committed_steps(self) -> list[int]:
        """Every committed step, oldest first."""
        return self.layout.steps()[0]


class AsyncCheckpointManager(_Steps, QueueFacade):
    """Numbered checkpoints in ``directory``, for async training loops::

        async with AsyncCheckpointManager("ckpts", keep_last=3) as mgr:
            state = await mgr.restore() if mgr.latest_step() is not None else None
            ...
            fut = await mgr.save(step, {"model": model.state_dict()})

    Each step is a directory committed by its metadata; older steps beyond ``keep_last``
    are deleted only after a newer one is committed. Queue options pass through.
    """

    def __init__(
        self,
        directory: Any,
        keep_last: int | None = None,
        *,
        storage: Storage | None = None,
        **queue_options: Any,
    ) -> None:
        self.layout = _Layout(directory, keep_last, storage)
        self.queue = AsyncCheckpointQueue(**queue_options)

    async def save(
        self,
        step: int,
        state_dict: Any,
        extra: dict[str, Any] | None = None,
        *,
        wait_for_staging: bool = True,
    ) -> CheckpointFuture:
        """Schedule the checkpoint of ``step``; its future resolves once it is committed."""
        request = self.layout.request(step, state_dict, extra, self.queue.engine)
        return await self.queue.schedule(
            request, wait_for_staging=wait_for_staging, needs_global=True
        )

    async def restore(self, step: int | None = None, **load_options: Any) -> Any:
        """Load (and verify) this rank's shard of ``step``, by default the latest committed."""
        return await load(
            self.layout.restore_dir(step), storage=self.layout.storage, **load_options
        )


class CheckpointManager(_Steps):
    """The blocking twin of :class:`AsyncCheckpointManager`, for plain training loops:
    call ``poll()`` every step (it never blocks) and ``close()`` at the end."""

    def __init__(
        self,
        directory: Any,
        keep_last: int | None = None,
        *,
        storage: Storage | None = None,
        **queue_options: Any,
    ) -> None:
        self.layout = _Layout(directory, keep_last, storage)
        self.queue = AsyncCallsQueue(**queue_options)

    def save(self, step: int, state_dict: Any, extra: dict[str, Any] | None = None) -> int:
        """Schedule the checkpoint of ``step``; returns its call index."""
        request = self.layout.request(step, state_dict, extra, self.queue._engine)
        return self.queue.schedule_async_request(request, needs_global=True)

    def poll(self, blocking: bool = False) -> list[int]:
        """Commit the checkpoints that are done; return their call indices (FIFO)."""
        return self.queue.maybe_finalize_async_calls(blocking=blocking, no_dist=True)

    def restore(self, step: int | None = None, **load_options: Any) -> Any:
        return load_sync(self.layout.restore_dir(step), storage=self.layout.storage, **load_options)

    def close(self) -> None:
        self.queue.close(no_dist=True)

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
