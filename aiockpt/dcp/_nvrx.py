"""NVRx's names for the DCP path (``FileSystemWriterAsync``, ``save_state_dict_async_plan``,
``save_state_dict_async_finalize``), so Megatron-style callers switch by changing an import.

The flow is NVRx's::

    writer = FileSystemWriterAsync(checkpoint_dir, thread_count=2)
    ret = save_state_dict_async_plan(state_dict, writer, None, 0, planner, enable_cache=True)
    save_fn, preload_fn, save_args = writer.get_save_function_and_args()
    queue.schedule_async_request(AsyncRequest(
        save_fn, save_args, [lambda: save_state_dict_async_finalize(*ret)],
        preload_fn=preload_fn))

aiockpt's queue stages the tensors itself, so ``preload_fn`` is None. The worker leaves its
write results in a hidden file that the finalize step reads back and removes.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
from collections.abc import Callable
from typing import Any

import torch.distributed as dist
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.planner import SavePlanner
from torch.distributed.checkpoint.storage import WriteResult
from torch.distributed.checkpoint.utils import _DistWrapper

from .._exceptions import CorruptCheckpointError
from ..storage._atomic import write_atomic
from ..utils import wrap_for_async
from ._commit import CHECKSUMS, METADATA, checked_directory, commit_dcp
from ._meta import MetadataUnpickler
from ._plan import FileBucket, PlannedSave, SavePlanCache, plan_save
from ._write import write_rank_files

_caches: dict[int, SavePlanCache] = {}


def _results_path(directory: str, rank: int) -> str:
    return os.path.join(directory, f".__{rank}.write_results")


def write_and_record(rank: int, buckets: list[FileBucket], directory: str, threads: int) -> None:
    """The worker's function: write the files, then record their results for finalize."""
    result = write_rank_files(buckets, directory, threads)
    data = pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL)
    write_atomic(_results_path(directory, rank), lambda f: f.write(data))


class _ResultsUnpickler(MetadataUnpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("torch.distributed.checkpoint.storage", "WriteResult"):
            return WriteResult
        return super().find_class(module, name)


class FileSystemWriterAsync:
    """The directory and the planned writes of one save (create one per save, as in NVRx)."""

    def __init__(self, path: str | os.PathLike[str], *args: Any, **kwargs: Any) -> None:
        self.checkpoint_dir = checked_directory(path)
        self.thread_count: int = int(kwargs.get("thread_count", 1))
        self.planned: PlannedSave | None = None
        self.rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0

    def get_save_function_and_args(
        self,
    ) -> tuple[Callable[..., Any] | None, Callable[[], Any] | None, list[Any]]:
        """``(save_fn, preload_fn, save_args)`` for an :class:`aiockpt.AsyncRequest`."""
        if self.planned is None:
            return None, None, []
        for name in (METADATA, CHECKSUMS):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self.checkpoint_dir, name))
        return (
            wrap_for_async(write_and_record),
            None,
            [self.rank, self.planned.buckets, self.checkpoint_dir, self.thread_count],
        )

    def retrieve_write_results(self) -> dict[str, Any]:
        """This rank's write results, left by its worker (the file is removed)."""
        path = _results_path(self.checkpoint_dir, self.rank)
        try:
            with open(path, "rb") as f:
                result: dict[str, Any] = _ResultsUnpickler(io.BytesIO(f.read())).load()
        except FileNotFoundError:
            raise CorruptCheckpointError(
                f"rank {self.rank} has no write results at {path!r}: its save did not run",
                path=path,
            ) from None
        os.unlink(path)
        return result


def save_state_dict_async_plan(
    state_dict: dict[str, Any],
    storage_writer: FileSystemWriterAsync,
    process_group: Any = None,
    coordinator_rank: int = 0,
    planner: SavePlanner | None = None,
    enable_cache: bool = False,
    metadata_cache: SavePlanCache | None = None,
) -> tuple[FileSystemWriterAsync, Metadata | None, _DistWrapper]:
    """Plan the save (collective over ``process_group``, or none when ``enable_cache`` and
    the structure is unchanged); returns what :func:`save_state_dict_async_finalize` takes."""
    cache = metadata_cache
    if enable_cache and cache is None:
        cache = _caches.setdefault(id(process_group), SavePlanCache())
    planned = plan_save(
        state_dict,
        planner,
        cache if enable_cache else None,
        process_group,
        storage_writer.thread_count,
    )
    storage_writer.planned = planned
    use_dist = dist.is_available() and dist.is_initialized()
    wrapper = _DistWrapper(process_group, use_dist, coordinator_rank)
    return storage_writer, planned.metadata, wrapper


def save_state_dict_async_finalize(
    storage_writer: FileSystemWriterAsync, global_metadata: Metadata | None, dist_wrapper: Any
) -> None:
    """Gather every rank's write results; the coordinator commits the checkpoint (checksum
    sidecar, then ``.metadata``). Collective; raises on every rank if the commit failed."""
    result = storage_writer.retrieve_write_results()
    gathered = dist_wrapper.all_gather_object(result)
    failure = None
    if global_metadata is not None:
        try:
            commit_dcp(
                storage_writer.checkpoint_dir,
                global_metadata,
                [r["results"] for r in gathered],
                [f for r in gathered for f in r["files"]],
                {},
            )
        except Exception as exc:
            failure = f"{type(exc).__name__}: {exc}"
    failures = [f for f in dist_wrapper.all_gather_object(failure) if f]
    if failures:
        raise OSError(
            f"could not commit {storage_writer.checkpoint_dir!r}: {failures[0]}; it has no "
            ".metadata and is not a checkpoint"
        )
