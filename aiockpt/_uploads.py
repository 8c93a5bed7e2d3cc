"""The remote tier of a two-tier manager: each step committed in the local directory is
uploaded in the background (from the committed files, never from the training process's
memory) to an object-store prefix, with retention of its own, and restore falls back to
it when the local copy is missing or fails its checksums.

Rank 0 uploads, in a thread of its own, one step at a time in commit order. A step newer
than the newest uploaded one exists only locally: local retention never deletes it. At
open, local steps newer than the newest remote one are queued again (a crash between
the local commit and the upload loses no upload).
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
from collections.abc import Generator
from typing import Any

from ._exceptions import (
    CheckpointError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    InvalidRequestError,
    StorageError,
)
from ._formats import commit_files
from ._futures import _Signal
from ._ranks import get_rank
from ._steps import Listing, StepDirectory, _scan, check_step, step_name
from .storage._object import ObjectStorage
from .storage._tiers import download_step, upload_step
from .storage._urls import is_url, split_url

logger = logging.getLogger("aiockpt")


class UploadPoint:
    """The upload of one step: ``await point`` (any event loop, any thread) or
    ``point.wait(timeout)`` returns once the step is committed in the remote store, or
    raises the :class:`CheckpointError` that kept it from being uploaded."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.state = "pending"  # pending, uploading, uploaded, failed
        self.error: CheckpointError | None = None
        self.seconds: float | None = None  # how long the upload took
        self._signal = _Signal(None)
        self._event = threading.Event()

    def done(self) -> bool:
        return self._event.is_set()

    def settle(self, error: CheckpointError | None) -> None:
        if self._event.is_set():
            return
        self.error = error
        self.state = "uploaded" if error is None else "failed"
        self._event.set()
        self._signal.set()

    def wait(self, timeout: float | None = None) -> None:
        """Block until settled; raises its error, or :class:`TimeoutError`."""
        if not self._event.wait(timeout):
            raise TimeoutError(f"step {self.step} was not uploaded within {timeout} s")
        if self.error is not None:
            raise self.error

    def __await__(self) -> Generator[Any, None, None]:
        return self._wait().__await__()

    async def _wait(self) -> None:
        await self._signal.wait()
        if self.error is not None:
            raise self.error

    def __repr__(self) -> str:
        return f"<UploadPoint step={self.step} {self.state}>"


class RemoteTier:
    """Uploads of ``local``'s committed steps to ``url`` (see the module doc)."""

    def __init__(
        self,
        url: Any,
        keep: Any,
        local: StepDirectory,
        storage_options: dict[str, Any] | None,
        *,
        lock: bool = True,
    ) -> None:
        if not is_url(url):
            raise InvalidRequestError(f"remote must be an object-store URL (s3://...), not {url!r}")
        split_url(url)
        if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 1):
            raise InvalidRequestError("keep_remote must be an int of at least 1 (or None)")
        self.url = url.rstrip("/")
        self.keep = keep
        self.local = local
        self.storage = ObjectStorage(storage_options)
        self.lease = self.storage.lock(self.url) if lock else None
        self._mutex = threading.Condition()
        self._queue: collections.deque[int] = collections.deque()
        self._points: dict[int, UploadPoint] = {}
        self._enqueued: set[int] = set()
        self._busy: int | None = None  # the step being uploaded
        self._uploaded = -1  # newest step committed remotely
        self._thread: threading.Thread | None = None
        self._closing = False

    # -- life cycle (rank 0 runs the uploads) -------------------------------------------

    def open(self) -> int:
        """Check the store (a missing bucket or refused credentials fail here), take the
        lease and queue the local steps not uploaded yet. Returns the newest remote step
        (-1: none), which every later save must be above."""
        self.storage.makedirs(self.url)
        if get_rank() != 0:
            found = self.scan().committed
            return found[-1] if found else -1
        if self.lease is not None:
            self.lease.acquire()
        try:
            remote = self.scan().committed
            self._uploaded = remote[-1] if remote else -1
            for step in self.local.scan().committed:
                if step > self._uploaded:
                    self.point(step)
                    self._enqueued.add(step)
                    self._queue.append(step)
        except BaseException:
            if self.lease is not None:
                self.lease.release()
            raise
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="aiockpt-uploader", daemon=True)
        self._thread.start()
        return self._uploaded

    def close(self) -> None:
        """Finish the queued uploads (each bounded by the store's timeouts and retries),
        stop the thread and release the lease; idempotent."""
        with self._mutex:
            self._closing = True
            self._mutex.notify_all()
            thread, self._thread = self._thread, None
        if thread is not None:
            thread.join()
        if self.lease is not None:
            self.lease.release()

    # -- bookkeeping -------------------------------------------------------------------

    def point(self, step: int) -> UploadPoint:
        """The upload of ``step`` (made when first asked for)."""
        with self._mutex:
            point = self._points.get(step)
            if point is None:
                point = self._points[step] = UploadPoint(step)
            return point

    def committed(self, step: int) -> None:
        """``step`` is committed locally (rank 0): queue its upload."""
        self.point(step)
        with self._mutex:
            self._enqueued.add(step)
            self._queue.append(step)
            self._mutex.notify_all()
            waiting = len(self._queue)
        keep = self.local.keep_last
        if keep is not None and waiting > keep:
            logger.warning(
                "%d steps wait for their upload to %r, more than keep_local=%d: uploads are "
                "slower than saves, and the local directory keeps them all until they are up",
                waiting,
                self.url,
                keep,
            )

    def settled_locally(self, step: int) -> None:
        """The local save of ``step`` is over: if it was not committed, nothing is
        uploaded, and its upload fails."""
        with self._mutex:
            if step in self._enqueued:
                return
        self.point(step).settle(
            StorageError(f"step {step} was not uploaded: its save was not committed locally")
        )

    def protected(self) -> set[int]:
        """The local steps that exist only locally and are newer than every uploaded
        one: local retention keeps them."""
        with self._mutex:
            return {s for s, p in self._points.items() if s > self._uploaded and not p.done()}

    def states(self) -> dict[int, str]:
        with self._mutex:
            return {s: p.state for s, p in sorted(self._points.items())}

    def wait(self, step: int | None, timeout: float | None) -> None:
        """Block until ``step`` (None: every step saved so far) is uploaded; raises the
        first failure, :class:`TimeoutError` after ``timeout`` seconds in all."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for point in self.points_for(step):
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            point.wait(left)

    def points_for(self, step: int | None) -> list[UploadPoint]:
        """The uploads ``wait_uploaded(step)`` waits for (none for a step uploaded before
        this manager); :class:`InvalidRequestError` for a step it never saw."""
        with self._mutex:
            if step is None:
                points = [p for _, p in sorted(self._points.items())]
            elif step in self._points:
                points = [self._points[step]]
            elif step <= self._uploaded:
                points = []
            else:
                raise InvalidRequestError(
                    f"step {step} was not saved by this manager (its uploads: "
                    f"{sorted(self._points) or 'none'})"
                )
        return points

    def scan(self) -> Listing:
        return _scan(self.url, self.storage, self.local.marker, self.local.required)

    def path(self, step: int) -> str:
        return f"{self.url}/{step_name(step)}"

    # -- the uploader thread -----------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._mutex:
                while not self._queue and not self._closing:
                    self._mutex.wait()
                if not self._queue:
                    return
                step = self._queue.popleft()
                point = self._points[step]
                if point.done():
                    continue
                point.state = "uploading"
                self._busy = step
            try:
                point.settle(self._upload(step, point))
            finally:
                with self._mutex:
                    self._busy = None
                    self._mutex.notify_all()

    def _upload(self, step: int, point: UploadPoint) -> CheckpointError | None:
        start = time.monotonic()
        try:
            if self.lease is not None:
                self.lease.check()
            local = self.local.path(step)
            records, commit_names = self.local.format.step_files(local)
            check = None if self.lease is None else self.lease.check
            upload_step(
                local, self.path(step), self.storage, records, commit_names, before_marker=check
            )
            point.seconds = time.monotonic() - start
            with self._mutex:
                self._uploaded = max(self._uploaded, step)
            if self.lease is not None:
                self.lease.check()  # a writer that lost the prefix deletes nothing there
            self._prune(step)
            self.local.retain()  # the local steps it protected may go now
            logger.info("step %d uploaded to %r in %.2f s", step, self.url, point.seconds)
            return None
        except Exception as exc:
            error = (
                exc
                if isinstance(exc, CheckpointError)
                else StorageError(f"uploading step {step} to {self.url!r} failed: {exc}")
            )
            logger.error(
                "step %d was not uploaded to %r: %s. It stays in the local directory while "
                "no newer step is uploaded; if none is by then, the next start uploads it",
                step,
                self.url,
                error,
            )
            return error

    def _prune(self, step: int) -> None:
        found = self.scan()
        doomed = [s for s in found.partial if s < step]
        if self.keep is not None:
            older = [s for s in found.committed if s < step]
            doomed += older[: max(0, len(older) - (self.keep - 1))]
        for old in sorted(doomed):
            try:
                self._delete(old)
            except CheckpointError as exc:
                logger.warning("could not delete remote step %r: %s", self.path(old), exc)

    def _delete(self, step: int) -> None:
        """Un-commit the remote ``step`` (its marker first), then delete its objects."""
        self.storage.delete([f"{self.path(step)}/{self.local.marker}"])
        self.storage.remove_tree(self.path(step))

    def rollback(self, to_step: int) -> list[int]:
        """Rank 0, after the local rollback: queued uploads of steps above ``to_step``
        are dropped (their uploads fail), the one running is waited for, and the remote
        steps above ``to_step`` are un-committed and deleted, newest first (a restore must
        never find a step that was rolled back). Returns the remote steps deleted."""
        with self._mutex:
            dropped = [s for s in self._queue if s > to_step]
            self._queue = collections.deque(s for s in self._queue if s <= to_step)
            while self._busy is not None:
                self._mutex.wait()
        for step in dropped:
            self.point(step).settle(
                StorageError(f"step {step} was not uploaded: it was rolled back to {to_step}")
            )
        with self._mutex:  # a step saved again after the rollback is a new upload
            for step in [s for s in self._points if s > to_step]:
                del self._points[step]
                self._enqueued.discard(step)
        found = self.scan()
        every = {*found.committed, *found.partial, *(s for s, _ in found.damaged)}
        doomed = sorted(s for s in every if s > to_step)
        for step in reversed(doomed):
            self._delete(step)
        with self._mutex:
            self._uploaded = min(self._uploaded, to_step)
        return doomed

    # -- restore -----------------------------------------------------------------------

    def restore_path(self, step: Any) -> str:
        """The local path of the newest step (or ``step``) that verifies: the local copy,
        else the remote one downloaded into the local directory (replacing a damaged
        local copy). Raises :class:`CheckpointNotFoundError` if none is found,
        :class:`CorruptCheckpointError` if every candidate failed its checks."""
        local, remote = self.local.scan(), self.scan()
        damaged = {s for s, _ in local.damaged}
        if step is not None:
            candidates = [check_step(step)]
        else:
            candidates = sorted({*local.committed, *remote.committed, *damaged}, reverse=True)
        tried: list[str] = []
        for s in candidates:
            path = self.local.path(s)
            if s in local.committed:
                try:
                    self.local.format.verify(path, self.local.storage)
                    return path
                except CheckpointError as exc:
                    tried.append(f"local step {s}: {exc}")
                    logger.warning("the local copy of step %d fails its checks: %s", s, exc)
            if s in remote.committed:
                try:
                    self._download(s)
                    self.local.format.verify(path, self.local.storage)
                    logger.warning("restoring step %d from %r", s, self.path(s))
                    return path
                except CheckpointError as exc:
                    tried.append(f"remote step {s}: {exc}")
                    logger.warning("the remote copy of step %d fails: %s", s, exc)
            elif s not in local.committed:
                tried.append(f"step {s}: {'damaged locally, ' if s in damaged else ''}not remote")
        if not tried:
            raise CheckpointNotFoundError(
                f"no committed checkpoint in {self.local.directory!r} or {self.url!r}"
            )
        raise CorruptCheckpointError(
            "no copy of "
            + ("any step" if step is None else f"step {step}")
            + " verifies: "
            + "; ".join(tried[-6:]),
            path=self.local.directory,
        )

    def _download(self, step: int) -> None:
        path = self.local.path(step)
        if os.path.lexists(path):
            self.local.delete(step)  # damaged, partial or failing: replaced by the remote copy
        download_step(self.path(step), path, self.storage, commit_files(self.local.format.name))
