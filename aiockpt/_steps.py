"""A directory of numbered checkpoints (``step-000000001000``...): which steps are
committed, the rule that saves go forward, retention, rollback, and the writer's lock.

The rules, enforced here for both managers:

- A save must be above every committed step and every step still being saved. To go back
  (after a divergence, say), ``rollback(to_step)`` first un-commits and deletes the steps
  above ``to_step``. So the checkpoint just committed is always the newest, and retention
  (which keeps the newest ``keep_last``) never deletes it.
- Deleting a step un-commits it first (its format's commit marker removed and fsync'd),
  so a crash mid-way never leaves a committed step with missing files.
- Only real directories count as steps: a link, a file or a FIFO named ``step-*`` is
  never followed, listed as a step or deleted through.
- A step is committed when its format's commit marker and the files committed with it (the
  DCP format's checksum sidecar) are there. A step with the marker but without one of those
  is damaged: not committed, never restored, left alone by retention (someone removed a
  file: it is for them to look at) and deleted only by a rollback below it.
- One process writes the directory: rank 0 holds ``.aiockpt.lock`` while the manager is
  open.
"""

from __future__ import annotations

import logging
import numbers
import os
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ._exceptions import (
    CheckpointError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    InvalidRequestError,
    QueueClosedError,
)
from ._formats import (
    FORMATS,
    StepFormat,
    StepHooks,
    companions,
    markers,
    needs_local_storage,
    step_format,
)
from ._ranks import get_rank, is_distributed
from ._request import AsyncRequest
from .storage._files import entry_kind, local_path, open_dir, opened
from .storage._local import LocalStorage
from .storage._metadata import check_extra
from .storage._object import object_storage
from .storage._protocol import Storage, WriterLock
from .storage._urls import is_url, split_url

logger = logging.getLogger("aiockpt")

MAX_STEP = 2**63 - 1
_STEP_NAME = re.compile(r"^step-([0-9]{12,19})$")


def check_step(step: Any) -> int:
    """``step`` as an int: any non-negative int64 (numpy integers too); else
    :class:`InvalidRequestError`."""
    if isinstance(step, bool) or not isinstance(step, numbers.Integral) or int(step) < 0:
        raise InvalidRequestError(f"step must be a non-negative int, not {step!r}")
    if int(step) > MAX_STEP:
        raise InvalidRequestError(f"step must fit in an int64 (at most {MAX_STEP}), not {step}")
    return int(step)


def step_name(step: int) -> str:
    return f"step-{step:012d}"


def parse_step_name(name: str) -> int | None:
    """The step a directory name stands for; None unless the name is exactly the one
    :func:`step_name` gives (no stray leading zeros, within int64)."""
    match = _STEP_NAME.match(name)
    if match is None:
        return None
    step = int(match.group(1))
    return step if step <= MAX_STEP and step_name(step) == name else None


@dataclass
class Listing:
    """What a scan of the directory found, each list ascending by step."""

    committed: list[int] = field(default_factory=list)
    partial: list[int] = field(default_factory=list)  # no metadata: failed or in progress
    refused: list[tuple[str, str]] = field(default_factory=list)  # (name, what it is)
    foreign: list[int] = field(default_factory=list)  # committed in another format
    foreign_formats: set[str] = field(default_factory=set)  # which formats those are
    damaged: list[tuple[int, str]] = field(default_factory=list)  # (step, what is missing)


def _kind_in(name: str, dir_fd: int) -> str | None:
    """What ``name`` in ``dir_fd`` is (never following it); None if it is not there."""
    try:
        return entry_kind(name, dir_fd)
    except FileNotFoundError:
        return None


def _damage(marker: str, kinds: dict[str, str | None]) -> str | None:
    """What a step with ``marker`` lacks of the files committed with it (their kinds, by
    name), None if nothing."""
    wrong = [
        f"no {name}" if kind is None else f"its {name} is {kind}"
        for name, kind in kinds.items()
        if kind != "a regular file"
    ]
    if not wrong:
        return None
    return (
        f"it has {marker} but {' and '.join(wrong)}, which every step is committed with: "
        "the file was removed or replaced, or the step was not written by aiockpt"
    )


def _scan_local(directory: str, marker: str, required: tuple[str, ...] = ()) -> Listing:
    others = {name: m for name, m in markers().items() if m != marker}
    found = Listing()
    try:
        dfd = open_dir(directory)
    except CheckpointNotFoundError:
        return found
    with opened(dfd):
        for name in os.listdir(dfd):
            step = parse_step_name(name)
            if step is None:
                continue
            try:
                what = entry_kind(name, dfd)
                if what != "a directory":
                    found.refused.append((name, what))
                    continue
                with opened(open_dir(os.path.join(directory, name), dir_fd=dfd, name=name)) as s:
                    kind = _kind_in(marker, s)
                    inside = os.listdir(s) if kind is None else []
                    foreign = {name for name, m in others.items() if m in inside}
                    damage = _damage(marker, {c: _kind_in(c, s) for c in required})
            except (FileNotFoundError, CheckpointError):
                continue  # removed or replaced while we looked
            if foreign:  # never taken for a failed save (and deleted) by this format
                found.foreign.append(step)
                found.foreign_formats |= foreign
            elif kind is None:
                found.partial.append(step)
            elif kind != "a regular file":
                found.refused.append((name, f"a directory whose {marker} is {kind}"))
            elif damage is not None:
                found.damaged.append((step, damage))
            else:
                found.committed.append(step)
    found.committed.sort()
    found.partial.sort()
    found.foreign.sort()
    found.damaged.sort()
    return found


def _scan(directory: str, storage: Storage, marker: str, required: tuple[str, ...]) -> Listing:
    if storage.is_local:
        return _scan_local(directory, marker, required)
    found = Listing()
    # An object store's files only: a prefix named like the marker is not one.
    list_files = getattr(storage, "list_files", storage.list_dir)
    for name in storage.list_dir(directory):
        step = parse_step_name(name)
        if step is None:
            continue
        try:
            inside = list_files(os.path.join(directory, name))
        except CheckpointError as exc:  # one step's odd key must not hide the others
            found.damaged.append((step, f"it cannot be listed: {exc}"))
            continue
        damage = _damage(marker, {c: "a regular file" if c in inside else None for c in required})
        if marker not in inside:
            found.partial.append(step)
        elif damage is not None:
            found.damaged.append((step, damage))
        else:
            found.committed.append(step)
    found.committed.sort()
    found.partial.sort()
    found.damaged.sort()
    return found


class _NoLock:
    """``lock=False``: the directory is not locked (a filesystem without ``flock``)."""

    def acquire(self) -> None:
        pass

    def release(self) -> None:
        pass


class StepDirectory:
    """The steps in ``directory`` and the bookkeeping of one manager's saves into it.

    ``open()`` (filesystem calls: off the event loop) creates the directory, takes the lock
    on rank 0 and reads the newest committed step; ``close()`` releases the lock.
    ``format`` names a :mod:`aiockpt._formats` format (``"torch"``: a ``torch.save``
    file per rank and ``metadata.json``; ``"dcp"``: the ``torch.distributed.checkpoint``
    layout), configured with ``format_options``.
    """

    def __init__(
        self,
        directory: Any,
        keep_last: Any,
        storage: Storage | None,
        format: str = "torch",
        format_options: dict[str, Any] | None = None,
        *,
        lock: bool = True,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        if format not in FORMATS:
            raise InvalidRequestError(f"format must be one of {FORMATS}, not {format!r}")
        if keep_last is not None and (
            isinstance(keep_last, bool)
            or not isinstance(keep_last, numbers.Integral)
            or keep_last < 1
        ):
            raise InvalidRequestError("keep_last must be an int of at least 1 (or None: keep all)")
        raw = os.fspath(directory)
        if is_url(raw):  # an object store: s3://bucket/run
            split_url(raw)
            self.directory = raw.rstrip("/")
            if storage is None:
                storage = object_storage(raw, storage_options)
        else:
            self.directory = local_path(raw)
        if storage_options is not None and not is_url(raw):
            raise InvalidRequestError(
                "storage_options configure an object store: pass them with a URL "
                "(s3://bucket/prefix), not with a local path"
            )
        self.keep_last = None if keep_last is None else int(keep_last)
        self.storage = storage if storage is not None else LocalStorage()
        self._format_name, self._format_options = format, dict(format_options or {})
        self._format: StepFormat | None = None  # imported when first needed (see format)
        self._format_lock = threading.Lock()
        # A storage written before ``is_local`` existed is taken for a remote one.
        remote = storage is not None and not getattr(storage, "is_local", False)
        if needs_local_storage(format) and remote:
            raise InvalidRequestError(
                f"format={format!r} writes through the local (or mounted) filesystem: an "
                "object store (or another custom storage) takes format='torch' only. For "
                f"format={format!r} with an object store, use two tiers: local=PATH, "
                "remote=URL"
            )
        self.marker = markers()[format]
        self.required = companions(format)  # committed with the marker
        self.lock: WriterLock = self.storage.lock(self.directory) if lock else _NoLock()
        self._mutex = threading.Lock()
        self._pruning = threading.Lock()
        # A remote tier's hooks (rank 0): the steps local retention must keep (not yet
        # uploaded), and what to do once a step is durable here (queue its upload).
        self.protected: Callable[[], set[int]] = set
        self.on_durable: Callable[[int], object] | None = None
        self._in_flight: set[int] = set()  # scheduled, outcome not yet known here
        self._newest = -1  # newest committed step known (-1: none)
        self._open = False

    # -- life cycle --------------------------------------------------------------------

    @property
    def format(self) -> StepFormat:
        """The format object, made (its module imported) at the first use: :meth:`open`,
        which the async manager runs in a thread."""
        made = self._format
        if made is None:
            with self._format_lock:
                if self._format is None:
                    self._format = step_format(self._format_name, self._format_options)
                made = self._format
        return made

    def open(self) -> None:
        """Raises :class:`StorageError` (cannot create), :class:`UntrustedEntryError` (the
        directory is a file), :class:`DirectoryLockedError` (another manager holds it)."""
        self.format  # noqa: B018  (imported here, off any event loop)
        # The directory you name is yours: a link to a directory (ckpts -> /scratch/run)
        # is used as such. Links inside it are never followed.
        if not (getattr(self.storage, "is_local", False) and os.path.isdir(self.directory)):
            self.storage.makedirs(self.directory)
        if get_rank() == 0:
            self.lock.acquire()
        try:
            found = self.scan()
            if found.foreign:
                theirs = " or ".join(repr(f) for f in sorted(found.foreign_formats))
                raise InvalidRequestError(
                    f"{self.directory!r} holds checkpoints in the {theirs} format (steps "
                    f"{found.foreign[-3:]}), not {self.format.name!r}: open it with "
                    f"format={theirs}, or use another directory for this format"
                )
        except BaseException:
            self.lock.release()
            raise
        committed = found.committed
        self._newest = committed[-1] if committed else -1
        self._open = True

    def close(self) -> None:
        self._open = False
        self.lock.release()

    # -- reading -----------------------------------------------------------------------

    def scan(self) -> Listing:
        return _scan(self.directory, self.storage, self.marker, self.required)

    def path(self, step: int) -> str:
        return os.path.join(self.directory, step_name(step))

    def restore_path(self, step: Any) -> str:
        """The committed step directory to load (the newest if ``step`` is None).
        Raises :class:`CorruptCheckpointError` for a damaged step (see the module doc),
        :class:`CheckpointNotFoundError` for any other step that is not committed."""
        found = self.scan()
        committed, damaged = found.committed, dict(found.damaged)
        if step is None:
            if not committed:
                raise CheckpointNotFoundError(f"no committed checkpoint in {self.directory!r}")
            for newer in [s for s in damaged if s > committed[-1]]:
                logger.warning(
                    "restoring step %d of %r, not step %d: %s",
                    committed[-1],
                    self.directory,
                    newer,
                    damaged[newer],
                )
            return self.path(committed[-1])
        step = check_step(step)
        if step in damaged:
            raise self._damaged(step, damaged[step], committed)
        if step not in committed:
            shown = committed if len(committed) <= 10 else ["...", *committed[-10:]]
            raise CheckpointNotFoundError(
                f"step {step} has no committed checkpoint in {self.directory!r} "
                f"(committed: {shown})"
            )
        return self.path(step)

    def _damaged(self, step: int, damage: str, committed: list[int]) -> CorruptCheckpointError:
        path = self.path(step)
        shown = committed if len(committed) <= 10 else ["...", *committed[-10:]]
        return CorruptCheckpointError(
            f"step {step} in {self.directory!r} is not a committed checkpoint: {damage}. Its "
            f"files cannot be checked, so it is not restored: restore another step "
            f"(committed: {shown}), or delete {path!r}. If you trust its files, "
            f"{self.format.unchecked_load.format(path=path)} reads it unchecked",
            path=path,
        )

    # -- saving ------------------------------------------------------------------------

    def request(
        self, step: Any, state_dict: Any, extra: dict[str, Any] | None, completion: Any
    ) -> tuple[AsyncRequest, int]:
        """The sharded request that saves ``step``, reserved until :meth:`settled`.
        Raises :class:`InvalidRequestError` if the step does not go forward, ``extra`` is
        not JSON or names ``"step"``; makes filesystem calls."""
        step = check_step(step)
        extra = check_extra(extra)
        if "step" in extra:
            raise InvalidRequestError(
                'extra["step"] is reserved: the manager records the step you save under'
            )
        self._reserve(step)
        hooks = StepHooks(
            before_commit=lambda: self._check_still_newest(step),
            on_committed=lambda: self._committed(step),
            after_commit=lambda: self._after_commit(step),
        )
        try:
            request = self.format.save_request(
                state_dict,
                self.path(step),
                {**extra, "step": step},
                completion,
                self.storage,
                hooks,
            )
        except BaseException:
            self.settled(step)
            raise
        return request, step

    def raise_floor(self, step: int) -> None:
        """Saves must go above ``step`` too (the newest step of a remote tier)."""
        with self._mutex:
            self._newest = max(self._newest, step)

    def _after_commit(self, step: int) -> None:
        if self.on_durable is not None:
            self.on_durable(step)
        self._prune_logged(step)

    def _prune_logged(self, step: int) -> None:
        try:
            self.prune(step)
        except CorruptCheckpointError as exc:
            logger.error(
                "checkpoint %r was committed, but reading it back failed, so no older step "
                "was deleted: %s. Check the storage (and for another writer of this "
                "directory); the older steps stay restorable with restore(step)",
                self.path(step),
                exc,
            )
        except Exception:  # the checkpoint stays committed; the next commit tries again
            logger.warning(
                "checkpoint %r is committed, but cleaning up after it failed",
                self.path(step),
                exc_info=True,
            )

    def _reserve(self, step: int) -> None:
        with self._mutex:
            if step in self._in_flight:
                raise InvalidRequestError(
                    f"step {step} is already being saved to {self.directory!r}"
                )
            above = max([self._newest, *self._in_flight])
            if step <= above:
                what = "committed" if above == self._newest else "being saved"
                raise InvalidRequestError(
                    f"cannot save step {step} in {self.directory!r}: step {above} is already "
                    f"{what}, and saves must go forward (retention keeps the newest steps). "
                    "To go back, call rollback(s) first with s a committed step below "
                    f"{step} (committed_steps() lists them): it un-commits and deletes the "
                    "steps above s"
                )
            self._in_flight.add(step)

    def _committed(self, step: int) -> None:
        with self._mutex:
            self._in_flight.discard(step)
            self._newest = max(self._newest, step)

    def settled(self, step: int) -> None:
        """The save of ``step`` is over (committed or failed): it no longer blocks others."""
        with self._mutex:
            self._in_flight.discard(step)

    def _check_still_newest(self, step: int) -> None:
        check_lease = getattr(self.lock, "check", None)
        if check_lease is not None:
            check_lease()  # a writer that lost its lease on an object store commits nothing
        newer = [s for s in self.scan().committed if s >= step]
        if newer:
            raise InvalidRequestError(
                f"refusing to commit step {step} in {self.directory!r}: step {newer[-1]} is "
                "committed there already"
            )

    # -- deleting ----------------------------------------------------------------------

    def delete(self, step: int) -> None:
        """Un-commit ``step`` (its format's marker first), then delete its directory."""
        self.format.uncommit(self.path(step))
        self.storage.remove_tree(self.path(step))

    def prune(self, committed_step: int) -> list[int]:
        """After ``committed_step`` is committed (rank 0): delete the committed steps
        beyond the newest ``keep_last`` and leftovers of failed saves of older steps; never
        ``committed_step`` itself, never a step still being saved. A committed step is
        deleted only after ``committed_step`` was read back whole (its checksums). Returns
        what it deleted."""
        with self._pruning:  # the commit's and the uploader's, one at a time
            return self._prune(committed_step)

    def retain(self) -> None:
        """Apply retention again (a remote tier's upload just made older steps free)."""
        committed = self.scan().committed
        if committed:
            self._prune_logged(committed[-1])

    def _prune(self, committed_step: int) -> list[int]:
        found = self.scan()
        with self._mutex:
            busy = {committed_step, *self._in_flight}
        busy |= self.protected()  # exists only here: not uploaded yet
        doomed = [s for s in found.partial if s < committed_step and s not in busy]
        if self.keep_last is not None:
            older = [s for s in found.committed if s < committed_step]
            keep = self.keep_last - (committed_step in found.committed)
            retired = [s for s in older[: max(0, len(older) - keep)] if s not in busy]
            if retired:
                # Read back before an older checkpoint goes: raises (keeping them all) if
                # the new one is not whole any more (its files replaced or damaged).
                self.format.verify(self.path(committed_step), self.storage)
            doomed += retired
        for step in sorted(doomed):
            self.delete(step)
        return sorted(doomed)

    def rollback(self, to_step: Any, force: bool = False) -> list[int]:
        """Un-commit and delete every step above ``to_step``, newest first (so a crash
        mid-way leaves the directory as if rolled back less far). ``to_step`` must be a
        committed step, so a checkpoint is always left; ``force=True`` deletes the steps
        above any ``to_step``, even every one. Collective in a distributed job: every rank
        calls it; rank 0 deletes. Returns the steps deleted."""
        to_step = check_step(to_step)
        if not self._open:
            raise QueueClosedError(
                f"the manager of {self.directory!r} is not open (or closed): roll back inside "
                "`async with` / before close(), while it holds the directory's lock"
            )
        with self._mutex:
            if self._in_flight:
                raise InvalidRequestError(
                    f"cannot roll back {self.directory!r} while steps {sorted(self._in_flight)} "
                    "are being saved: wait for them (finalize/poll) first"
                )
        found = self.scan()
        if not force and to_step not in found.committed:
            below = [s for s in found.committed if s < to_step]
            if below:
                advice = f"Roll back to step {below[-1]}, the newest committed step below it"
            else:
                advice = "No committed step is below it, so every checkpoint would go"
            raise InvalidRequestError(
                f"cannot roll back {self.directory!r} to step {to_step}: it is not a committed "
                f"step (committed: {found.committed or 'none'}). {advice}; or pass "
                f"force=True to delete every step above {to_step} anyway"
            )
        steps = found.committed + found.partial + [s for s, _ in found.damaged]
        doomed = sorted({s for s in steps if s > to_step})
        if get_rank() == 0:
            for step in reversed(doomed):
                self.delete(step)
        if is_distributed():
            import torch.distributed as dist

            dist.barrier()
        kept = [s for s in found.committed if s <= to_step]
        with self._mutex:
            self._newest = kept[-1] if kept else -1
        return doomed
