"""Sharded checkpoints across ranks: each rank writes its own file, and once every rank's
file is durable, rank 0 commits the checkpoint by writing its metadata."""

from __future__ import annotations

import os
from typing import Any

from ._dist import CompletionGroup, get_rank, get_world_size
from ._engine import ResultFinalizer
from ._exceptions import InvalidRequestError
from ._request import AsyncRequest
from ._storage import save_file, shard_name, write_metadata
from .utils import wrap_for_async

_save_file = wrap_for_async(save_file)


class CommitSharded(ResultFinalizer):
    """Finalize step of a sharded save, run on every rank after global success: gathers
    the file records (name, size, checksum) and has rank 0 write the metadata. Every rank
    learns whether the commit succeeded, so none reports a checkpoint that is not there."""

    def __init__(self, directory: str, extra: dict[str, Any], completion: CompletionGroup):
        self.directory = directory
        self.extra = extra
        self.completion = completion

    def __call__(self, result: Any) -> None:
        records = self.completion.all_gather_object(-1, result)
        failure = None
        if get_rank() == 0:
            try:
                write_metadata(self.directory, records, self.extra)
            except Exception as exc:
                failure = f"{type(exc).__name__}: {exc}"
        failure = self.completion.broadcast_object(-1, failure)
        if failure is not None:
            raise OSError(f"rank 0 could not commit {self.directory!r}: {failure}")


def sharded_request(
    state_dict: Any, directory: Any, extra: dict[str, Any] | None, completion: CompletionGroup
) -> AsyncRequest:
    """The request that writes this rank's shard of a checkpoint in ``directory``."""
    if not isinstance(directory, str | os.PathLike):
        raise InvalidRequestError(f"directory must be a path, not {type(directory).__name__}")
    path = os.fspath(directory)
    assert isinstance(path, str)
    os.makedirs(path, exist_ok=True)
    shard = os.path.join(path, shard_name(get_rank(), get_world_size()))
    return AsyncRequest(
        _save_file, (state_dict, shard), [CommitSharded(path, extra or {}, completion)]
    )
