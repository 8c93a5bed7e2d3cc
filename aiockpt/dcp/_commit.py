"""Committing a DCP checkpoint: once every rank's data files are durable, rank 0 writes the
checksum sidecar and then ``.metadata``, the commit marker, each atomically."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pickle
import time
import uuid
from collections.abc import Callable
from typing import Any

import xxhash
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from .._core._engine import ResultFinalizer
from .._dist import CompletionGroup
from .._exceptions import InvalidRequestError, StorageError
from .._ranks import get_rank, get_world_size
from .._request import AsyncRequest
from ..storage._atomic import remove_temporaries, write_atomic
from ..storage._files import local_path
from ..utils import wrap_for_async
from ._plan import DATA_SUFFIX, PlannedSave, SavePlanCache, plan_save
from ._write import write_rank_files

METADATA = ".metadata"
CHECKSUMS = ".metadata.checksums"  # the sidecar: DCP's reader never opens it
DCP_VERSION = "1.0.0"
SIDECAR_FORMAT = "aiockpt-dcp"
SIDECAR_VERSION = 1


def commit_dcp(
    directory: str,
    metadata: Metadata,
    results: list[list[Any]],
    files: list[dict[str, Any]],
    extra: dict[str, Any],
) -> str:
    """Write the checksum sidecar, then ``.metadata`` (both atomically); returns its path."""
    storage_data = {wr.index: wr.storage_data for rank_results in results for wr in rank_results}
    meta = dataclasses.replace(
        metadata,
        storage_data=storage_data,
        storage_meta=StorageMeta(checkpoint_id=directory, save_id=uuid.uuid4().hex),
        version=DCP_VERSION,
    )
    data = pickle.dumps(meta, protocol=pickle.HIGHEST_PROTOCOL)
    sidecar = {
        "format": SIDECAR_FORMAT,
        "version": SIDECAR_VERSION,
        "created": time.time(),
        "world_size": get_world_size(),
        "metadata": {
            "name": METADATA,
            "nbytes": len(data),
            "xxh3_64": xxhash.xxh3_64_hexdigest(data),
        },
        "files": files,
        "extra": extra,
    }
    encoded = json.dumps(sidecar, indent=1, sort_keys=True).encode()
    # Neither file replaces one that exists: a committing rank of an earlier attempt that
    # is still alive gets an error here instead of overwriting a commit.
    write_atomic(os.path.join(directory, CHECKSUMS), lambda f: f.write(encoded), replace=False)
    path = os.path.join(directory, METADATA)
    write_atomic(path, lambda f: f.write(data), replace=False)
    return path


class CommitDCP(ResultFinalizer):
    """Finalize step of a DCP save, on every rank after global success: gathers every
    rank's write results; the rank holding the global metadata commits; every rank learns
    whether that worked.

    Hooks, as a checkpoint manager uses them: ``before_commit`` (committing rank) may raise
    to refuse the commit; ``on_committed`` runs on every rank once the commit is known;
    ``after_commit`` runs on the committing rank once ``.metadata`` is durable (its failure
    fails the save, which stays committed)."""

    def __init__(
        self,
        directory: str,
        metadata: Metadata | None,
        completion: CompletionGroup,
        extra: dict[str, Any] | None = None,
        after_commit: Callable[[], Any] | None = None,
        *,
        before_commit: Callable[[], Any] | None = None,
        on_committed: Callable[[], Any] | None = None,
    ) -> None:
        self.directory = directory
        self.metadata = metadata
        self.completion = completion
        self.extra = extra or {}
        self.after_commit = after_commit
        self.before_commit = before_commit
        self.on_committed = on_committed

    def _commit(self, gathered: list[Any]) -> tuple[bool, str | None]:
        """On the committing rank: (committed, what failed)."""
        assert self.metadata is not None
        committed = False
        try:
            if self.before_commit is not None:
                self.before_commit()
            commit_dcp(
                self.directory,
                self.metadata,
                [r["results"] for r in gathered],
                [f for r in gathered for f in r["files"]],
                self.extra,
            )
            committed = True
            if self.after_commit is not None:
                self.after_commit()
        except Exception as exc:
            return committed, (
                f"the checkpoint in {self.directory!r} is committed, but the step after "
                f"its commit failed on rank {get_rank()}: {type(exc).__name__}: {exc}"
                if committed
                else f"could not commit the checkpoint in {self.directory!r} on rank "
                f"{get_rank()} ({type(exc).__name__}: {exc}); it has no .metadata and "
                "is not a checkpoint"
            )
        return True, None

    def __call__(self, result: Any, call_idx: int) -> None:
        gathered = self.completion.all_gather_object(call_idx, result)
        outcome = None if self.metadata is None else self._commit(gathered)
        outcomes = [o for o in self.completion.all_gather_object(call_idx, outcome) if o]
        if any(committed for committed, _ in outcomes) and self.on_committed is not None:
            self.on_committed()
        failures = [failure for _, failure in outcomes if failure]
        if failures:
            raise OSError(failures[0])


def checked_directory(checkpoint_id: Any) -> str:
    """``checkpoint_id`` as a directory path string (created if missing)."""
    if not isinstance(checkpoint_id, str | os.PathLike):
        raise InvalidRequestError(
            f"checkpoint_id must be a directory path, not {type(checkpoint_id).__name__}"
        )
    path = os.fspath(checkpoint_id)
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    os.makedirs(local_path(path), exist_ok=True)
    return path


def _prepare_directory(directory: str) -> None:
    # The previous checkpoint in this directory stops being one before any of its files is
    # deleted: each rank drops the marker, then its own data files (earlier saves wrote
    # names of their own), before its worker writes anything.
    for name in (METADATA, CHECKSUMS):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(directory, name))
    mine = f"__{get_rank()}_"
    for name in os.listdir(directory):
        if name.startswith(mine) and name.endswith(DATA_SUFFIX):
            with contextlib.suppress(FileNotFoundError, IsADirectoryError, PermissionError):
                os.unlink(os.path.join(directory, name))
    remove_temporaries(directory, mine)  # left by an interrupted attempt


class _Raise:
    """A ``preload_fn`` that raises ``error``: a request that fails where it is staged."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def __call__(self) -> Any:
        raise self.error


def request_for_plan(
    planned: PlannedSave,
    directory: str,
    completion: CompletionGroup,
    thread_count: int = 1,
    extra: dict[str, Any] | None = None,
    after_commit: Callable[[], Any] | None = None,
    *,
    before_commit: Callable[[], Any] | None = None,
    on_committed: Callable[[], Any] | None = None,
) -> AsyncRequest:
    """The request that writes a planned save: its tensors are plain (local shards), so the
    engine stages them; its finalize step commits."""
    failure = planned.failure
    if failure is None:
        try:
            _prepare_directory(directory)
        except OSError as exc:
            failure = StorageError(
                f"cannot prepare {directory!r} for a new save on rank {get_rank()}: "
                f"{type(exc).__name__}: {exc}",
                path=directory,
                rank=get_rank(),
            )
            failure.__cause__ = exc
    if failure is not None:
        # Scheduled all the same, failing when it is staged: this rank raises at once,
        # and the others learn of it at completion instead of waiting for this rank.
        return AsyncRequest(None, (None,), [], preload_fn=_Raise(failure), preload_arg_index=0)
    return AsyncRequest(
        wrap_for_async(write_rank_files),
        (planned.buckets, directory, thread_count),
        [
            CommitDCP(
                directory,
                planned.metadata,
                completion,
                extra,
                after_commit,
                before_commit=before_commit,
                on_committed=on_committed,
            )
        ],
    )


def dcp_save_request(
    state_dict: dict[str, Any],
    directory: Any,
    completion: CompletionGroup,
    *,
    planner: Any = None,
    cache: SavePlanCache | None = None,
    process_group: Any = None,
    thread_count: int = 1,
    extra: dict[str, Any] | None = None,
    after_commit: Callable[[], Any] | None = None,
    before_commit: Callable[[], Any] | None = None,
    on_committed: Callable[[], Any] | None = None,
) -> AsyncRequest:
    """Plan a DCP save of ``state_dict`` into ``directory`` (collective, on every rank) and
    return the request that writes it; schedule it with ``needs_global=True``.

    ``completion`` is the queue's completion group (``queue.completion``);
    ``extra`` is recorded in the checksum sidecar; the hooks are :class:`CommitDCP`'s
    (``after_commit`` runs on rank 0 once ``.metadata`` is durable: retention, say).
    """
    path = checked_directory(directory)
    planned = plan_save(state_dict, planner, cache, process_group, thread_count)
    return request_for_plan(
        planned,
        path,
        completion,
        thread_count,
        extra,
        after_commit,
        before_commit=before_commit,
        on_committed=on_committed,
    )
