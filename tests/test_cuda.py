"""GPU paths: pinned staging, device-to-host copies, fork after CUDA init (skipped without CUDA)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from ckpt_helpers import wait_then_write

from aiockpt import AsyncRequest, CheckpointQueue, preload_tensors

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("persistent", [False, True], ids=["fork", "persistent"])
def test_gpu_state_is_staged_pinned_and_saved(tmp_path: Path, persistent: bool) -> None:
    weights = torch.randn(1 << 20, device="cuda")
    expected = weights.cpu()
    sd = {"w": weights, "half": weights[:1000].half(), "step": 3}
    with CheckpointQueue(persistent=persistent) as queue:
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


@pytest.mark.parametrize("persistent", [False, True], ids=["fork", "persistent"])
def test_staging_waits_for_the_device_to_host_copy(tmp_path: Path, persistent: bool) -> None:
    """The staged copy is complete when scheduling returns, even when the copy was queued
    behind a long kernel: read the staging buffer on the host at once, with no sync."""
    weights = torch.randn(1 << 22, device="cuda")
    expected = weights.cpu()
    with CheckpointQueue(persistent=persistent) as queue:
        torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU work ahead of the copy
        weights.mul_(1.0)  # same values, queued after the sleep
        queue.schedule_async_request(
            AsyncRequest(wait_then_write, ({"w": weights}, "/dev/null", str(tmp_path / "g.pt")), [])
        )
        arena = queue.staging_buffers.arenas[0]
        staged = arena.views[0]
        assert torch.equal(staged, expected)  # would read stale pages without the sync
        assert queue.maybe_finalize_async_calls(blocking=True) == [0]


def test_a_failed_host_registration_leaves_no_cuda_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from aiockpt._staging._arena import StagingArena

    arena = StagingArena(1 << 20, pin=True)
    try:
        assert arena.pinned
    finally:
        arena.free()
    real = torch.cuda.cudart()

    class Refusing:
        def __getattr__(self, name: str) -> object:
            return getattr(real, name)

        def cudaHostRegister(self, *args: object) -> int:
            # Provoke a real sticky error, as a failed registration leaves one.
            return int(real.cudaHostRegister(0, 1 << 20, 0))

    monkeypatch.setattr("aiockpt._staging._arena._cudart", lambda: Refusing())
    arena = StagingArena(1 << 20, pin=True)
    try:
        assert not arena.pinned
        assert int(real.cudaGetLastError()) == 0  # cleared by the arena
    finally:
        arena.free()
