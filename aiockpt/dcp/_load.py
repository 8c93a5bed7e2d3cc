"""Loading DCP checkpoints safely, in place, at any world size: the reader
(:mod:`._reader`) reads the metadata through :mod:`._meta`'s checks and every data file
through one checked descriptor; object items are loaded with ``weights_only=True``; DCP's
failures become aiockpt's typed errors."""

from __future__ import annotations

import copy
import io
import os
import pickle
import warnings
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.planner import LoadPlanner, ReadItem
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load

from .._exceptions import (
    CheckpointError,
    CorruptCheckpointError,
    InvalidRequestError,
    UnsafeCheckpointError,
)
from ..storage._files import local_path
from ..storage._metadata import safe_join
from ._commit import METADATA
from ._meta import read_checksums, read_dcp_metadata
from ._reader import CheckedFileSystemReader, check_file


def verify_dcp(directory: str) -> list[str]:
    """Check ``.metadata`` and every data file of the DCP checkpoint in ``directory``
    against the checksum sidecar; returns the paths checked."""
    read_dcp_metadata(directory, require_checksums=True)
    sidecar = read_checksums(directory)
    assert sidecar is not None
    checked = [os.path.join(directory, METADATA)]
    for record in sidecar["files"]:
        path = safe_join(directory, record["name"])
        check_file(path, record)
        checked.append(path)
    return checked


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner, loading non-tensor items with ``weights_only=True``."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as exc:
            raise UnsafeCheckpointError(
                f"refusing to unpickle item {read_item.dest_index.fqn!r}: {exc}"
            ) from exc
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def _typed_failure(exc: CheckpointException, directory: str) -> CheckpointError:
    """DCP's ``CheckpointException`` (a ``BaseException``) as a CheckpointError: a typed
    one raised on some rank as is; otherwise what failed where, as ``InvalidRequestError``
    (the state dict does not fit the checkpoint) or ``CorruptCheckpointError`` (reading)."""
    inners = []
    for rank, failure in sorted(exc.failures.items()):
        inner = failure[0] if isinstance(failure, tuple) else failure
        if isinstance(inner, CheckpointError):
            err = copy.copy(inner)  # CheckpointError copies (and pickles) with its fields
            err.message = f"rank {rank}: {inner.message} (loading {directory!r})"
            err.args = (err.message,)
            err.rank = rank
            return err
        inners.append((rank, inner))
    if not inners:
        return CorruptCheckpointError(f"loading {directory!r} failed: {exc}", path=directory)
    rank, inner = inners[0]
    what = f"loading {directory!r} failed on rank {rank}: {type(inner).__name__}: {inner}"
    if isinstance(inner, OSError):
        return CorruptCheckpointError(f"{what}; the checkpoint cannot be read", path=directory)
    return InvalidRequestError(
        f"{what}; the state dict to load into must have the checkpoint's keys, shapes and "
        "dtypes (load a subset with a planner that allows partial loads)",
        rank=rank,
    )


def load(
    state_dict: dict[str, Any],
    checkpoint_id: str | os.PathLike[str],
    *,
    planner: LoadPlanner | None = None,
    process_group: Any = None,
    require_checksums: bool = False,
) -> None:
    """Load a DCP checkpoint into ``state_dict`` in place, like ``dcp.load``, at any world
    size: each rank reads the chunks its tensors (DTensor shards, plain tensors) need.

    Unlike ``dcp.load``, ``.metadata`` is checked against its recorded xxh3 checksum and
    unpickled with an allow-list of DCP's metadata classes, each data file is checked
    before use, and objects are loaded with ``weights_only=True``. Checkpoints written by
    ``dcp.save`` have no checksums: they load unchecked unless ``require_checksums``.
    Collective over ``process_group`` (default: every rank). Raises
    :class:`UnsafeCheckpointError`, :class:`CorruptCheckpointError` or
    :class:`CheckpointNotFoundError`.
    """
    directory = local_path(os.fspath(checkpoint_id))
    reader = CheckedFileSystemReader(directory, require_checksums)
    reader.read_metadata()  # typed errors here, on this rank, before any collective
    no_dist = not (dist.is_available() and dist.is_initialized())
    try:
        with warnings.catch_warnings():
            if no_dist:  # one process is what the caller has: DCP's warning says nothing
                warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
            dcp_load(
                state_dict,
                storage_reader=reader,
                planner=planner if planner is not None else SafeLoadPlanner(),
                process_group=process_group,
                no_dist=no_dist,
            )
    except CheckpointException as exc:
        raise _typed_failure(exc, directory) from exc
