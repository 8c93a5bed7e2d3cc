"""NVRx's unit tests for in-process restart, as NVRx writes them, on the compat path.

They reach into the queue and its worker through NVRx's debug names:
``TorchAsyncCheckpoint._get_async_calls_queue()``, ``AsyncCallsQueue._get_async_caller()``
and ``caller._debug_is_async_process_running()``. The bodies follow
``tests/checkpointing/unit/test_async_save.py`` and ``test_async_writer.py`` of
nvidia-resiliency-ext with its fixtures replaced: ``tmp_path`` for ``TempNamedDir``, the CPU
for CUDA, a plain model for FSDP, real gloo ranks (``dist_harness``) for
``Utils.initialize_distributed()``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from dist_harness import run_ranks, values
from torch.distributed.checkpoint import DefaultLoadPlanner, DefaultSavePlanner, FileSystemReader
from torch.distributed.checkpoint import load as dcp_load

from aiockpt.compat.nvrx.async_ckpt.core import (
    AsyncCallsQueue,
    AsyncRequest,
    abort_nvrx_checkpoint,
)
from aiockpt.compat.nvrx.async_ckpt.filesystem_async import FileSystemWriterAsync
from aiockpt.compat.nvrx.async_ckpt.state_dict_saver import (
    save_state_dict_async_finalize,
    save_state_dict_async_plan,
)
from aiockpt.compat.nvrx.async_ckpt.torch_ckpt import TorchAsyncCheckpoint


def state_dict_of_a_model() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Linear(256, 10))
    return model.state_dict()


def compare_loaded(async_path: Path, sync_path: Path, state_dict: dict[str, Any]) -> None:
    device = torch.device("cpu")
    loaded_async_state_dict = torch.load(async_path, map_location=device)
    loaded_sync_state_dict = torch.load(sync_path, map_location=device)
    for k in loaded_sync_state_dict:
        assert k in loaded_async_state_dict, f"{k} is not in loaded async state_dict"
        assert torch.equal(loaded_async_state_dict[k], loaded_sync_state_dict[k])
        assert torch.equal(loaded_async_state_dict[k], state_dict[k])


class TestAsyncSave:
    def test_persistent_async_cp_abort(self, tmp_path: Path) -> None:
        ckpt_impl = TorchAsyncCheckpoint(persistent_queue=True)
        state_dict = state_dict_of_a_model()
        async_ckpt_dir, sync_ckpt_dir = tmp_path / "async", tmp_path / "sync"
        async_ckpt_dir.mkdir()
        sync_ckpt_dir.mkdir()

        # Save Sync CP state for reference
        ckpt_impl.save(state_dict, sync_ckpt_dir / "test")

        # Save and finalize async CP
        ckpt_impl.async_save(state_dict, async_ckpt_dir / "test")
        ckpt_impl.finalize_async_save(blocking=True)

        # Validate that NVRx CP workers are initialized
        async_calls_queue = ckpt_impl._get_async_calls_queue()
        assert async_calls_queue is not None, "After saving async CP, we expect valid object"
        async_process = async_calls_queue._get_async_caller()
        assert async_process is not None, "After a valid CP save, we expect a running process"
        assert async_process._debug_is_async_process_running(), "Valid async process expected"

        # Abort the CP workers to mock the action of inprocess restarts
        abort_nvrx_checkpoint()

        # Validate clean-up of NVRx CP workers is done
        async_calls_queue = ckpt_impl._get_async_calls_queue()
        assert async_calls_queue is not None, "We expect a valid state of AsyncCallsQueue"
        async_process = async_calls_queue._get_async_caller()
        if async_process is not None:
            assert async_process._debug_is_async_process_running() is False, (
                "After abort async process stops"
            )

        # Re-start CP process by doing another async CP state.
        ckpt_impl.async_save(state_dict, async_ckpt_dir / "test")
        ckpt_impl.finalize_async_save(blocking=True)

        # Validate that NVRx CP workers are initialized
        async_calls_queue = ckpt_impl._get_async_calls_queue()
        assert async_calls_queue is not None, "After saving async CP, we expect valid object"
        async_process = async_calls_queue._get_async_caller()
        assert async_process is not None, "After a valid CP save, we expect a running process"
        assert async_process._debug_is_async_process_running(), "Valid async process expected"

        compare_loaded(async_ckpt_dir / "test", sync_ckpt_dir / "test", state_dict)
        ckpt_impl.close()
        assert async_process._debug_is_async_process_running() is False

    def test_persistent_async_cp_abort_during_cp_ops(self, tmp_path: Path) -> None:
        ckpt_impl = TorchAsyncCheckpoint(persistent_queue=True)
        state_dict = state_dict_of_a_model()
        async_ckpt_dir, sync_ckpt_dir = tmp_path / "async", tmp_path / "sync"
        async_ckpt_dir.mkdir()
        sync_ckpt_dir.mkdir()

        # Save Sync CP state for reference
        ckpt_impl.save(state_dict, sync_ckpt_dir / "test")

        # Save async CP, not finalized
        ckpt_impl.async_save(state_dict, async_ckpt_dir / "test")

        # Validate that NVRx CP workers are initialized
        async_calls_queue = ckpt_impl._get_async_calls_queue()
        assert async_calls_queue is not None, "After saving async CP, we expect valid object"
        async_process = async_calls_queue._get_async_caller()
        assert async_process is not None, "After a valid CP save, we expect a running process"
        assert async_process._debug_is_async_process_running(), "Valid async process expected"

        # Abort during the ongoing async CP operation (it was never finalized)
        abort_nvrx_checkpoint()

        # Validate clean-up of NVRx CP workers is done
        async_calls_queue = ckpt_impl._get_async_calls_queue()
        assert async_calls_queue is not None, "We expect a valid state of AsyncCallsQueue"
        async_process = async_calls_queue._get_async_caller()
        if async_process is not None:
            assert async_process._debug_is_async_process_running() is False, (
                "After abort async process stops"
            )

        # Re-start CP process by doing another async CP state.
        ckpt_impl.async_save(state_dict, async_ckpt_dir / "test")
        ckpt_impl.finalize_async_save(blocking=True)

        async_calls_queue = ckpt_impl._get_async_calls_queue()
        async_process = async_calls_queue._get_async_caller()
        assert async_process is not None, "After a valid CP save, we expect a running process"
        assert async_process._debug_is_async_process_running(), "Valid async process expected"

        compare_loaded(async_ckpt_dir / "test", sync_ckpt_dir / "test", state_dict)
        ckpt_impl.close()


def test_the_debug_names_answer_as_nvrxs_do(tmp_path: Path) -> None:
    """What NVRx's getters return in each state: a queue's own caller (one warmed up for
    the process before its first save), a fresh unforked caller for a fork-per-request
    queue, and a stopped caller's process is not running."""
    AsyncCallsQueue.warmup_persistent_caller(0)
    warm = AsyncCallsQueue._warm_caller
    queue = AsyncCallsQueue()
    try:
        caller = queue._get_async_caller()
        assert caller is warm and caller._debug_is_async_process_running() is True
        assert queue._get_async_caller() is caller  # the same one, every time
        forked = AsyncCallsQueue(persistent=False)
        temporal = forked._get_async_caller()
        assert type(temporal).__name__ == "TemporalAsyncCaller"
        assert temporal is not forked._get_async_caller()  # a new one each time, as NVRx
        assert temporal._debug_is_async_process_running() is False
        forked.close()
    finally:
        queue.close()
    assert caller._debug_is_async_process_running() is False
    ckpt = TorchAsyncCheckpoint()
    assert ckpt._get_async_calls_queue() is ckpt.queue
    ckpt.close()


# -- test_async_writer.py: several queues and an abort, on two ranks ------------------


def async_save_checkpoint(
    checkpoint_dir: str, state_dict: Any, planner: Any, async_queue: Any
) -> None:
    writer = FileSystemWriterAsync(checkpoint_dir, thread_count=1)
    save_state_dict_ret = save_state_dict_async_plan(state_dict, writer, None, 0, planner=planner)
    save_fn, preload_fn, save_args = writer.get_save_function_and_args()

    def finalize_fn() -> None:
        save_state_dict_async_finalize(*save_state_dict_ret)

    async_queue.schedule_async_request(
        AsyncRequest(save_fn, save_args, [finalize_fn], preload_fn=preload_fn)
    )


def multiple_queues_and_abort(rank: int, world: int, tmp: str) -> dict[str, Any]:
    """NVRx's test_async_cp_with_multiple_queue_and_abort, then ..._followed_by_delete."""
    import os

    import torch.distributed as dist

    model_state = state_dict_of_a_model()
    async_queue_dist = AsyncCallsQueue()
    ckpt_impl = TorchAsyncCheckpoint(persistent_queue=True)
    dir_dist = os.path.join(tmp, "async_checkpoint_dist")
    dir_no_dist = os.path.join(tmp, "async_checkpoint_no_dist")
    os.makedirs(dir_dist, exist_ok=True)
    os.makedirs(dir_no_dist, exist_ok=True)
    planner = DefaultSavePlanner()
    seen: list[Any] = []

    def save_both() -> None:
        async_save_checkpoint(dir_dist, model_state, planner, async_queue_dist)
        if dist.get_rank() == 0:
            ckpt_impl.async_save(model_state, os.path.join(dir_no_dist, "test"))
        async_queue_dist.maybe_finalize_async_calls(blocking=True, no_dist=False)
        ckpt_impl.finalize_async_save(blocking=True, no_dist=True)

    save_both()
    abort_nvrx_checkpoint()
    # validate state of the Async CP workers after abort operation
    queue_no_dist = ckpt_impl._get_async_calls_queue()
    assert queue_no_dist is not None, "We expect a valid state of AsyncCallsQueue"
    for queue in (queue_no_dist, async_queue_dist):
        process = queue._get_async_caller()
        if process is not None:
            seen.append(process._debug_is_async_process_running())
    # Validate that operations seamlessly resume after an abort operation
    save_both()
    process_no_dist = ckpt_impl._get_async_calls_queue()._get_async_caller()
    seen.append(process_no_dist._debug_is_async_process_running())  # True on rank 0 only
    process_dist = async_queue_dist._get_async_caller()
    seen.append(process_dist._debug_is_async_process_running())  # True on every rank
    async_queue_dist.close()
    ckpt_impl.close()
    restored = {k: torch.zeros_like(v) for k, v in model_state.items()}
    dcp_load(restored, storage_reader=FileSystemReader(dir_dist), planner=DefaultLoadPlanner())
    same = all(torch.equal(restored[k], model_state[k]) for k in model_state)

    # ..._followed_by_delete: an exception right after scheduling, then an abort, then the
    # queue is deleted as the training loop exits.
    queue = AsyncCallsQueue(persistent=True)
    try:
        try:
            async_save_checkpoint(
                os.path.join(tmp, "async_checkpoint_delete"), model_state, planner, queue
            )
            raise RuntimeError("Fake exception to mock training process exception")
        except RuntimeError:
            pass
    finally:
        abort_nvrx_checkpoint()
    caller = queue._get_async_caller()
    queue.__del__()
    after_delete = caller._debug_is_async_process_running()
    return {"running": seen, "restored": same, "after_delete": after_delete}


@pytest.mark.slow
def test_async_cp_with_multiple_queue_and_abort(tmp_path: Path) -> None:
    (tmp_path / "async_checkpoint_delete").mkdir()
    out = values(run_ranks("test_nvrx_compat_preempt:multiple_queues_and_abort", 2, str(tmp_path)))
    # After the abort: no worker runs (either queue); after the resumed saves: the
    # rank-0-only queue runs a worker on rank 0 alone, the distributed one everywhere.
    assert out[0]["running"] == [False, False, True, True]
    assert out[1]["running"] == [False, False, False, True]
    assert all(o["restored"] for o in out)
    assert all(o["after_delete"] is False for o in out)
    assert torch.equal(
        torch.load(tmp_path / "async_checkpoint_no_dist" / "test")["0.weight"],
        state_dict_of_a_model()["0.weight"],
    )
