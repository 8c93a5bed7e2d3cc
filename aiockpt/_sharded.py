"""Sharded checkpoints across ranks: each rank writes its own file, and once every rank's
file is durable, rank 0 commits the checkpoint by writing its metadata."""

from __future__ import annotations

import os
from typing import Any

from ._dist import CompletionGroup, get_rank, get_world_size
from ._engine import ResultFinalizer
from ._exceptions import InvalidRequestError
from ._request import AsyncRequest
from ._storage import LocalStorage, Storage, shard_name
from .utils import wrap_for_async


class CommitSharded(ResultFinalizer):
    """Finalize step of a sharded save, run on every rank after global success: gathers
    the file records (name, size, checksum) and has rank 0 write the metadata. Every rank
    learns whether the commit succeeded, so none reports a checkpoint that is not there.
    ``after_commit`` (rank 0 only) runs once the metadata is durable: retention."""

    def __init__(
        self,
        directory: str,
        extra: dict[str, Any],
        completion: CompletionGroup,
        storage: Storage,
        after_commit: Any = None,
    ) -> None:
        self.directory = directory
        self.extra = extra
        self.completion = completion
        self.storage = storage
        self.after_commit = after_commit

    def __call__(self, result: Any, call_idx: int) -> None:
        records = self.completion.all_gather_object(call_idx, result)
        failure = None
        if get_rank() == 0:
            try:
                self.storage.commit(self.directory, records, self.extra)
                if self.after_commit is not None:
                    self.after_commit()
            except Exception as exc:
                failure = f"{type(exc).__name__}: {exc}"
        failure = self.completion.broadcast_object(call_idx, failure)
        if failure is not None:
            raise OSError(f"rank 0 could not commit {self.directory!r}: {failure}")


def sharded_request(
    state_dict: Any,
    directory: Any,
    extra: dict[str, Any] | None,
    completion: CompletionGroup,
    storage: Storage | None = None,
    after_commit: Any = None,
) -> AsyncRequest:
    """The request that writes this rank's shard of a checkpoint in ``directory``."""
    if not isinstance(directory, str | os.PathLike):
        raise InvalidRequestError(f"directory must be a path, not {type(directory).__name__}")
    path = os.fspath(directory)
    assert isinstance(path, str)
    storage = storage if storage is not None else LocalStorage()
    storage.makedirs(path)
    name = shard_name(get_rank(), get_world_size())
    storage.remove_temporaries(path, name)  # left by an interrupted earlier attempt
    return AsyncRequest(
        wrap_for_async(storage.write_file),
        (state_dict, os.path.join(path, name)),
        [CommitSharded(path, extra or {}, completion, storage, after_commit)],
    )
