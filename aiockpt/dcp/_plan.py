"""Planning a DCP save on the caller: DCP's planner decides which rank writes which chunk,
and the plan is reused while the state dict keeps its structure."""

from __future__ import annotations

import dataclasses
import io
import secrets
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.filesystem import _StoragePrefix
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner, WriteItem, WriteItemType
from torch.distributed.checkpoint.utils import _DistWrapper

from .._exceptions import CheckpointError, DistributedCheckpointError, InvalidRequestError
from .._ranks import get_rank

DATA_SUFFIX = ".distcp"

# What one data file holds: its name and the items written to it, in order, each with the
# data to write (a host or device tensor, staged by the engine; or the bytes of an object).
FileBucket = tuple[str, list[tuple[WriteItem, Any]]]


@dataclass
class SavePlanCache:
    """The plans of the last save: reused, without any collective, while this rank's local
    plan stays the same. ``plannings`` counts the collective plannings run."""

    local_plan: SavePlan | None = field(default=None, repr=False)
    central_plan: SavePlan | None = field(default=None, repr=False)
    metadata: Metadata | None = field(default=None, repr=False)
    plannings: int = 0
    reuses: int = 0


@dataclass
class PlannedSave:
    """This rank's part of one save: the files to write and, on the coordinator, the
    global metadata (without storage data: the writes' results fill that in)."""

    buckets: list[FileBucket]
    metadata: Metadata | None
    reused_plan: bool
    nbytes: int = 0
    items: int = 0
    # Set when this rank failed after the ranks agreed to save (or without them, on a
    # reused plan): the save must still be scheduled, failing, so that every rank's calls
    # stay numbered alike and every rank learns of the failure at completion.
    failure: CheckpointError | None = None


def _planning_failure(exc: CheckpointException) -> InvalidRequestError:
    failures = exc.failures
    ranks = sorted(failures)
    first = failures[ranks[0]] if ranks else None
    detail = f"{type(first[0]).__name__}: {first[0]}" if isinstance(first, tuple) else str(exc)
    return InvalidRequestError(
        f"planning the checkpoint failed on rank(s) {ranks}: {detail}; nothing was scheduled "
        "on any rank",
        rank=get_rank(),
    )


def _use_dist(process_group: Any) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(process_group) > 1


def plan_save(
    state_dict: dict[str, Any],
    planner: SavePlanner | None,
    cache: SavePlanCache | None,
    process_group: Any = None,
    thread_count: int = 1,
) -> PlannedSave:
    """Plan this rank's writes. Collective over ``process_group`` unless ``cache`` holds
    the plan of a save with the same local plan (then no rank communicates).

    Every rank must reuse or replan at the same save: in an SPMD program a change in the
    state dict's structure happens on every rank at once.
    """
    if thread_count < 1:
        raise InvalidRequestError(f"thread_count must be at least 1, not {thread_count}")
    planner = planner if planner is not None else DefaultSavePlanner()
    use_dist = _use_dist(process_group)
    if (
        process_group is not None
        and dist.is_initialized()
        and dist.get_world_size(process_group) != dist.get_world_size()
    ):
        # The commit gathers write results from every rank of the job: the files of a
        # rank outside the planning group would be left out of .metadata.
        raise InvalidRequestError(
            f"process_group has {dist.get_world_size(process_group)} of the job's "
            f"{dist.get_world_size()} ranks; a DCP checkpoint is planned over every rank"
        )
    wrapper = _DistWrapper(process_group, use_dist, 0)
    metadata: Metadata | None = None

    def local_step() -> SavePlan:
        # Checked here, so that inside the planning collective a bad state dict on one
        # rank fails every rank instead of leaving the others waiting for it.
        if not isinstance(state_dict, dict):
            raise InvalidRequestError(
                f"a DCP checkpoint saves a dict of state, not {type(state_dict).__name__}"
            )
        planner.set_up_planner(state_dict, None, wrapper.is_coordinator)
        return planner.create_local_plan()

    def failed(what: str, exc: Exception) -> PlannedSave:
        failure = InvalidRequestError(
            f"{what} on rank {get_rank()} failed: {type(exc).__name__}: {exc}", rank=get_rank()
        )
        failure.__cause__ = exc
        return PlannedSave([], None, reused, failure=failure)

    def global_step(all_plans: list[SavePlan]) -> list[SavePlan]:
        nonlocal metadata
        all_plans, metadata = planner.create_global_plan(all_plans)
        return [
            dataclasses.replace(p, storage_data=_StoragePrefix(f"__{i}_"))
            for i, p in enumerate(all_plans)
        ]

    reused = False
    if cache is not None and cache.central_plan is not None:
        try:
            local = local_step()
        except Exception as exc:  # the other ranks may be reusing the plan: go on, failing
            return failed("planning the checkpoint", exc)
        reused = local == cache.local_plan
    if reused:
        assert cache is not None and cache.central_plan is not None
        central = cache.central_plan
        metadata = cache.metadata
        cache.reuses += 1
    else:
        kept: list[SavePlan] = []

        def local_step_kept() -> SavePlan:
            kept.append(local_step())
            return kept[-1]

        try:
            central = wrapper.reduce_scatter("plan", local_step_kept, global_step)
        except CheckpointException as exc:
            raise _planning_failure(exc) from exc
        except RuntimeError as exc:  # the collective itself: a rank absent, or gone
            raise DistributedCheckpointError(
                f"the planning collective failed on rank {get_rank()}: {exc}. Every rank must "
                "save at once, and the state dict's structure must change on every rank at "
                "the same save (a rank whose structure is unchanged reuses its plan and does "
                "not take part); nothing was scheduled on this rank",
                rank=get_rank(),
            ) from exc
        if cache is not None:
            cache.local_plan = kept[-1] if kept else None
            cache.central_plan = central
            cache.metadata = metadata
            cache.plannings += 1
    try:
        final = planner.finish_plan(central)
        buckets, nbytes = _resolve(final, planner, thread_count)
    except Exception as exc:  # e.g. an object that cannot be serialized
        return failed("preparing the checkpoint's data", exc)
    return PlannedSave(buckets, metadata, reused, nbytes, len(final.items))


def _item_nbytes(item: WriteItem) -> int:
    size = item.tensor_storage_size()
    return size if size is not None else 0


def _split(items: list[WriteItem], bins: int) -> list[list[WriteItem]]:
    """Items in ``bins`` groups of about equal byte size (largest first, to the lightest)."""
    if bins == 1:
        return [list(items)]
    groups: list[list[WriteItem]] = [[] for _ in range(bins)]
    sizes = [0] * bins
    for item in sorted(items, key=_item_nbytes, reverse=True):
        i = sizes.index(min(sizes))
        groups[i].append(item)
        sizes[i] += _item_nbytes(item) or 1
    return [g for g in groups if g]


def _resolve(
    plan: SavePlan, planner: SavePlanner, thread_count: int
) -> tuple[list[FileBucket], int]:
    prefix = plan.storage_data.prefix if isinstance(plan.storage_data, _StoragePrefix) else ""
    # Names of this save attempt's own (the plan may be reused): a writer of an earlier
    # attempt still alive renames its file to a name this commit does not record.
    attempt = secrets.token_hex(8)
    buckets: list[FileBucket] = []
    nbytes = 0
    for i, group in enumerate(_split(plan.items, thread_count)):
        entries: list[tuple[WriteItem, Any]] = []
        for item in group:
            data = planner.resolve_data(item)
            if item.type == WriteItemType.BYTE_IO:
                assert isinstance(data, io.BytesIO)
                payload: Any = data.getvalue()
                nbytes += len(payload)
            else:
                assert isinstance(data, torch.Tensor)
                payload = data.detach()
                nbytes += payload.numel() * payload.element_size()
            entries.append((item, payload))
        buckets.append((f"{prefix}{i}.{attempt}{DATA_SUFFIX}", entries))
    return buckets, nbytes
