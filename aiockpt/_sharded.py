"""Sharded checkpoints across ranks: each rank writes its own file, and once every rank's
file is durable, rank 0 commits the checkpoint by writing its metadata."""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Callable
from typing import Any

from xxhash import xxh3_64_hexdigest

from ._core._engine import ResultFinalizer
from ._dist import CompletionGroup
from ._exceptions import CorruptCheckpointError, InvalidRequestError
from ._formats import StepHooks
from ._ranks import get_rank, get_world_size
from ._request import AsyncRequest
from .storage._files import local_path
from .storage._load import load_path
from .storage._local import LocalStorage, verify
from .storage._metadata import (
    METADATA,
    check_extra,
    read_metadata,
    safe_join,
    shard_name,
    shard_prefix,
)
from .storage._protocol import Storage
from .storage._urls import is_url
from .utils import wrap_for_async

logger = logging.getLogger("aiockpt")

Hook = Callable[[], object]


class CommitSharded(ResultFinalizer):
    """Finalize step of a sharded save, run on every rank after global success: gathers
    the file records (name, size, checksum) and has rank 0 write the metadata. Every rank
    learns whether the commit succeeded, so none reports a checkpoint that is not there.

    Hooks: ``before_commit`` (rank 0) may raise to refuse the commit; ``on_committed``
    runs on every rank once the commit is known; ``after_commit`` (rank 0, retention) runs
    once the metadata is durable, and its failure is logged: the checkpoint stays committed.
    """

    def __init__(
        self,
        directory: str,
        extra: dict[str, Any],
        completion: CompletionGroup,
        storage: Storage,
        after_commit: Hook | None = None,
        *,
        before_commit: Hook | None = None,
        on_committed: Hook | None = None,
    ) -> None:
        self.directory = directory
        self.extra = extra
        self.completion = completion
        self.storage = storage
        self.after_commit = after_commit
        self.before_commit = before_commit
        self.on_committed = on_committed

    def _commit(self, records: list[Any]) -> None:
        if self.before_commit is not None:
            self.before_commit()
        if METADATA in self.storage.list_dir(self.directory):
            raise InvalidRequestError(
                f"{self.directory!r} was committed by another save meanwhile; not replacing it"
            )
        self.storage.commit(self.directory, records, self.extra)

    def __call__(self, result: Any, call_idx: int) -> None:
        records = self.completion.all_gather_object(call_idx, result)
        failure = None
        if get_rank() == 0:
            try:
                self._commit(records)
            except Exception as exc:
                failure = f"{type(exc).__name__}: {exc}"
        failure = self.completion.broadcast_object(call_idx, failure)
        if failure is not None:
            raise OSError(f"rank 0 could not commit {self.directory!r}: {failure}")
        if self.on_committed is not None:
            self.on_committed()
        if get_rank() == 0 and self.after_commit is not None:
            try:
                self.after_commit()
            except Exception:
                logger.warning(
                    "checkpoint %r is committed, but cleaning up after it failed",
                    self.directory,
                    exc_info=True,
                )


def sharded_request(
    state_dict: Any,
    directory: Any,
    extra: dict[str, Any] | None,
    completion: CompletionGroup,
    storage: Storage | None = None,
    after_commit: Hook | None = None,
    *,
    before_commit: Hook | None = None,
    on_committed: Hook | None = None,
) -> AsyncRequest:
    """The request that writes this rank's shard of a checkpoint in ``directory``.

    Raises :class:`InvalidRequestError` at the call if ``extra`` is not JSON or
    ``directory`` already holds a committed checkpoint (its files are never overwritten:
    save to a new directory), :class:`UntrustedEntryError` if ``directory`` is a
    link or a file, :class:`StorageError` if it cannot be created. Makes filesystem calls: run it
    off the event loop."""
    if not isinstance(directory, str | os.PathLike):
        raise InvalidRequestError(f"directory must be a path, not {type(directory).__name__}")
    storage = storage if storage is not None else LocalStorage()
    path = os.fspath(directory)
    if not isinstance(path, str):
        raise InvalidRequestError(f"directory must be a str path, not {path!r}")
    if storage.is_local or not is_url(path):
        local_path(path)
    extra = check_extra(extra)
    storage.makedirs(path)
    if METADATA in storage.list_dir(path):
        raise InvalidRequestError(
            f"{path!r} already holds a committed checkpoint (or something named {METADATA}); "
            "its files are never overwritten in place. Save to a new directory (or delete "
            "this one first)"
        )
    # A name of this attempt's own: a writer of an earlier attempt that is still alive (a
    # stalled worker of a job that was restarted) renames its file to a name no commit
    # records, so it can never replace what this save commits.
    name = shard_name(get_rank(), get_world_size(), secrets.token_hex(8))
    storage.remove_temporaries(path, shard_prefix(get_rank(), get_world_size()))
    return AsyncRequest(
        wrap_for_async(storage.write_file),
        (state_dict, os.path.join(path, name)),
        [
            CommitSharded(
                path,
                extra,
                completion,
                storage,
                after_commit,
                before_commit=before_commit,
                on_committed=on_committed,
            )
        ],
    )


class TorchFormat:
    """``format="torch"``: a ``torch.save`` file per rank, committed by ``metadata.json``
    (written through the manager's :class:`Storage`)."""

    name = "torch"
    marker = METADATA
    needs_local_storage = False
    unchecked_load = "aiockpt.load({path!r}, verify=False)"

    def __init__(self, **options: Any) -> None:
        if options:
            raise InvalidRequestError(
                f"{sorted(options)} apply to format='dcp' only, not format='torch'"
            )

    def save_request(
        self,
        state_dict: Any,
        directory: str,
        extra: dict[str, Any],
        completion: CompletionGroup,
        storage: Storage,
        hooks: StepHooks,
    ) -> AsyncRequest:
        return sharded_request(
            state_dict,
            directory,
            extra,
            completion,
            storage,
            after_commit=hooks.after_commit,
            before_commit=hooks.before_commit,
            on_committed=hooks.on_committed,
        )

    def uncommit(self, directory: str) -> None:
        """Nothing to do: :meth:`Storage.remove_tree` removes ``metadata.json`` first."""

    def step_files(self, directory: str) -> tuple[list[dict[str, Any]], list[str]]:
        """The records of a committed local step's data files, and its commit files."""
        return read_metadata(directory)["files"], [METADATA]

    def verify(self, directory: str, storage: Storage) -> None:
        if storage.is_local:
            verify(directory)
            return
        meta = storage.read_metadata(directory)
        for record in meta["files"]:
            file = safe_join(directory, record["name"])
            data = storage.read_bytes(file)
            if len(data) != record["nbytes"] or xxh3_64_hexdigest(data) != record["xxh3_64"]:
                raise CorruptCheckpointError(
                    f"{file!r} does not match the size and checksum its metadata records",
                    path=file,
                )

    def restore(
        self, directory: str, state_dict: Any, storage: Storage, **load_options: Any
    ) -> Any:
        if state_dict is not None:
            raise InvalidRequestError(
                "restore(state_dict=...) loads in place in format='dcp' only; with "
                "format='torch' restore() returns this rank's state dict"
            )
        return load_path(directory, storage=storage, nofollow=True, **load_options)
