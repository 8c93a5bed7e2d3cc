"""The staging plan is reused while a state dict's layout is unchanged, and only then; files
written through the persistent worker keep what torch.save keeps."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from test_fastsave import assert_same, many_tensors, torch_saved

from aiockpt import TorchCheckpoint
from aiockpt._staging._arena import StagingBuffers
from aiockpt._staging._scan import PlanCache


def _state() -> dict[str, Any]:
    base = torch.randn(8, 8)
    return {"a": base, "tied": base, "view": base[2:, 1::2], "b": torch.ones(5), "n": 3}


def test_same_layout_gives_the_same_plan_object() -> None:
    cache = PlanCache()
    state = _state()
    first = cache.scan(state).plan
    assert cache.scan(state).plan is first
    # New tensor objects over the same storages, and fresh storages shared the same way.
    detached = {id(v): v.detach() for v in state.values() if isinstance(v, torch.Tensor)}
    rebuilt = {k: detached.get(id(v), v) for k, v in state.items()}
    assert cache.scan(rebuilt).plan is first
    assert cache.scan(_state()).plan is first
    assert cache.hits == 3


def test_any_layout_change_gives_a_new_plan() -> None:
    cache = PlanCache()
    state = _state()
    plan = cache.scan(state).plan
    changes = [
        {**state, "b": torch.ones(6)},  # shape and storage size
        {**state, "b": torch.ones(5, dtype=torch.float64)},  # dtype
        {**state, "tied": state["a"].clone()},  # sharing broken
        {**state, "b": state["a"].view(-1)[:5]},  # sharing added
        {**state, "view": state["a"][3:, 1::2]},  # offset
        {**state, "view": state["a"].t()[2:, 1::2]},  # stride
        {**state, "b": state["a"]},  # the same object twice
    ]
    seen = [plan]
    for changed in changes:
        new = cache.scan(changed).plan
        assert all(new is not p for p in seen)
        seen.append(new)
        back = cache.scan(state).plan
        assert back is not new and back.tensors == plan.tensors
        seen.append(back)
    assert cache.hits == 0


def test_staged_values_follow_a_changed_layout() -> None:
    buffers = StagingBuffers()
    state = _state()
    for step in range(3):
        state["b"] = torch.arange(5 + step, dtype=torch.float32)
        staged = buffers.stage(step, (state,), {})
        out = staged.args[0]
        buffers.release(step)
        assert torch.equal(out["b"], state["b"]) and out["b"].shape == (5 + step,)
        assert out["a"].untyped_storage().data_ptr() == out["tied"].untyped_storage().data_ptr()
        assert out["a"] is out["tied"] or torch.equal(out["a"], out["tied"])
        assert torch.equal(out["view"], state["view"])
    buffers.close()


def test_worker_files_keep_what_torch_save_keeps(tmp_path: Path) -> None:
    state = many_tensors(2000)
    ckpt = TorchCheckpoint()
    try:
        for step in range(3):  # the later saves reuse the plan and the worker's views
            state["step"] = step
            state["model"]["layers"]["layer.5"].add_(1)
            ckpt.async_save(state, tmp_path / f"s{step}.pt")
            ckpt.finalize_async_save(blocking=True)
            got = torch.load(tmp_path / f"s{step}.pt", weights_only=True)
            assert got["step"] == step
            assert_same(got, torch_saved(state))
    finally:
        ckpt.close()
