"""``format="dcp"`` for the checkpoint managers: each step a DCP checkpoint, committed by
``.metadata``, planned once per structure (the plan cache lives as long as the manager)."""

from __future__ import annotations

import contextlib
import os
from typing import Any

from .._dist import CompletionGroup
from .._exceptions import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    InvalidRequestError,
    UntrustedEntryError,
)
from .._formats import StepHooks
from .._request import AsyncRequest
from ..storage._files import open_dir, opened
from ._commit import CHECKSUMS, dcp_save_request
from ._commit import METADATA as MARKER
from ._load import load, verify_dcp
from ._meta import read_checksums
from ._plan import SavePlanCache


class DCPFormat:
    """The ``torch.distributed.checkpoint`` layout, written through the filesystem."""

    name = "dcp"
    marker = MARKER
    needs_local_storage = True
    unchecked_load = "aiockpt.dcp.load(state_dict, {path!r})"

    def __init__(self, planner: Any = None, thread_count: int = 1) -> None:
        self.planner = planner
        self.thread_count = thread_count
        self.cache = SavePlanCache()

    def save_request(
        self,
        state_dict: Any,
        directory: str,
        extra: dict[str, Any],
        completion: CompletionGroup,
        storage: Any,
        hooks: StepHooks,
    ) -> AsyncRequest:
        """Plan (collective on every rank; callers keep plannings in one order) and build
        the save; the plan is reused while the structure holds."""
        # A real directory of its own (never a link to elsewhere), as in the torch format.
        storage.makedirs(directory)
        if os.path.lexists(os.path.join(directory, MARKER)):
            # Committed (by another writer meanwhile), or damaged: its files are never
            # replaced by a save; deleting it is a rollback's to do.
            raise InvalidRequestError(
                f"{directory!r} already holds a checkpoint's {MARKER} (committed by another "
                "writer, or damaged: see `aiockpt ls`); its files are never replaced by a "
                "save. Roll back below this step (rollback(s, force=True) if no committed "
                "step is below it), or save a later step"
            )
        return dcp_save_request(
            state_dict,
            directory,
            completion,
            planner=self.planner,
            cache=self.cache,
            thread_count=self.thread_count,
            extra=extra,
            after_commit=hooks.after_commit,
            before_commit=hooks.before_commit,
            on_committed=hooks.on_committed,
        )

    def uncommit(self, directory: str) -> None:
        """Remove ``.metadata`` and make that durable before any data file goes."""
        try:
            dfd = open_dir(directory)
        except (CheckpointNotFoundError, UntrustedEntryError):
            return  # gone, or not a directory: the storage deletes what is there
        with opened(dfd):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(MARKER, dir_fd=dfd)
            os.fsync(dfd)

    def step_files(self, directory: str) -> tuple[list[dict[str, Any]], list[str]]:
        """The records of a committed local step's files (``.metadata``'s included), and
        its commit files (the checksum sidecar, then ``.metadata``)."""
        sidecar = read_checksums(directory)
        if sidecar is None:
            raise CorruptCheckpointError(f"{directory!r} has no {CHECKSUMS}", path=directory)
        return [sidecar["metadata"], *sidecar["files"]], [CHECKSUMS, MARKER]

    def verify(self, directory: str, storage: Any) -> None:
        verify_dcp(directory)

    def restore(self, directory: str, state_dict: Any, storage: Any, **load_options: Any) -> Any:
        if not isinstance(state_dict, dict):
            raise InvalidRequestError(
                "a checkpoint in the DCP format loads in place, resharded: pass the state "
                "dict to fill, restore(state_dict=...), on every rank"
            )
        # Every step this format commits has its sidecar: one without it is not restored
        # unchecked (the manager's scan refuses it first; this covers a removal since).
        load(state_dict, directory, **{"require_checksums": True, **load_options})
        return state_dict
