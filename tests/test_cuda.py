"""GPU paths: pinned staging, device-to-host copies, fork after CUDA init (skipped without CUDA)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from ckpt_helpers import wait_then_write

from aiockpt import AsyncCallsQueue, AsyncRequest, preload_tensors

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("persistent", [False, True], ids=["fork", "persistent"])
def test_gpu_state_is_staged_pinned_and_saved(tmp_path: Path, persistent: bool) -> None:
    weights = torch.randn(1 << 20, device="cuda")
    expected = weights.cpu()
    sd = {"w": weights, "half": weights[:1000].half(), "step": 3}
    with AsyncCallsQueue(persistent=persistent) as queue:
        queue.schedule_async_request(
            AsyncRequest(wait_then_write, (sd, "/dev/null", str(tmp_path / "g.pt")), [])
        )
        arena = queue.staging_buffers.arenas[0]
        assert arena.pinned
        weights.zero_()  # on the device, right after scheduling
        assert queue.maybe_finalize_async_calls(blocking=True) == [0]
    out = torch.load(tmp_path / "g.pt", weights_only=True)
    assert out["w"].device.type == "cpu" and torch.equal(out["w"], expected)
    assert torch.equal(out["half"], expected[:1000].half())


def test_preload_tensors_copies_gpu_tensors_to_pinned_host_memory() -> None:
    sd = {"a": torch.arange(10, device="cuda", dtype=torch.float32), "n": 1}
    out = preload_tensors(sd, non_blocking=True)
    sd["a"].fill_(-1)
    assert out["a"].device.type == "cpu" and out["a"].is_pinned()
    assert torch.equal(out["a"], torch.arange(10, dtype=torch.float32))
