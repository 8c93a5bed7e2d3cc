"""TorchCheckpoint: the reference's usage pattern, real files, real workers."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import psutil
import pytest
import torch
from torch import nn

from aiockpt import InvalidRequestError, TorchCheckpoint, WorkerError


@pytest.mark.parametrize("persistent", [False, True], ids=["fork", "persistent"])
def test_reference_usage_pattern(tmp_path: Path, persistent: bool) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    async_impl = TorchCheckpoint(persistent=persistent)
    expected: dict[int, dict[str, torch.Tensor]] = {}
    finalized: list[int] = []
    for step in range(1, 21):
        finalized += async_impl.finalize_async_save(blocking=False)
        loss = model(torch.randn(8, 32)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 5 == 0:
            expected[step] = {k: v.clone() for k, v in model.state_dict().items()}
            async_impl.async_save(model.state_dict(), tmp_path / f"step{step}.pt")
    finalized += async_impl.finalize_async_save(blocking=True, terminate=True)
    assert finalized == [0, 1, 2, 3]
    for step, state in expected.items():
        saved = torch.load(tmp_path / f"step{step}.pt", weights_only=True)
        assert saved.keys() == state.keys()
        for key in state:
            assert torch.equal(saved[key], state[key]), (step, key)


def test_file_loads_into_a_fresh_model(tmp_path: Path) -> None:
    model = nn.Linear(10, 3)
    ckpt = TorchCheckpoint()
    ckpt.async_save({"model": model.state_dict(), "epoch": 3}, str(tmp_path / "m.pt"))
    assert ckpt.finalize_async_save(blocking=True) == [0]
    ckpt.close()
    fresh = nn.Linear(10, 3)
    state = torch.load(tmp_path / "m.pt", weights_only=True)
    fresh.load_state_dict(state["model"])
    assert state["epoch"] == 3
    assert torch.equal(fresh.weight, model.weight)


def test_bad_paths_are_rejected_at_the_call(tmp_path: Path) -> None:
    ckpt = TorchCheckpoint()
    with pytest.raises(InvalidRequestError, match="does not exist"):
        ckpt.async_save({"a": torch.ones(1)}, tmp_path / "missing" / "x.pt")
    import io

    with pytest.raises(InvalidRequestError, match="file path"):
        ckpt.async_save({"a": torch.ones(1)}, io.BytesIO())
    with pytest.raises(InvalidRequestError, match="needs a path"):
        ckpt.async_save({"a": torch.ones(1)})
    assert ckpt.finalize_async_save(blocking=True) == []
    ckpt.close()


def test_unwritable_target_fails_with_the_worker_error(tmp_path: Path) -> None:
    target = tmp_path / "is_a_dir.pt"
    target.mkdir()
    ckpt = TorchCheckpoint(persistent=True)
    ckpt.async_save({"a": torch.ones(2)}, target)
    with pytest.raises(WorkerError, match="Is a directory"):
        ckpt.finalize_async_save(blocking=True)
    ckpt.close()


@pytest.mark.parametrize("persistent", ["False", "True"])
def test_exit_without_close_completes_the_save_and_leaves_nothing(
    tmp_path: Path, persistent: str
) -> None:
    script = tmp_path / "train.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import os, torch
            from aiockpt import TorchCheckpoint
            if __name__ == "__main__":
                ckpt = TorchCheckpoint(persistent={persistent})
                ckpt.async_save({{"w": torch.arange(100_000.0)}}, {str(tmp_path / "last.pt")!r})
                engine = ckpt.queue._engine
                caller = engine._persistent_caller or engine.active[0].caller
                print(os.getpid(), caller.process.pid, flush=True)
            """
        )
    )
    out = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60, check=True
    )
    pid, worker = (int(v) for v in out.stdout.split())
    assert worker != pid
    saved = torch.load(tmp_path / "last.pt", weights_only=True)
    assert torch.equal(saved["w"], torch.arange(100_000.0))
    # The worker that wrote it did not outlive the program (a reaped child is gone; one
    # that outlived its parent would be re-parented and still exist).
    assert not psutil.pid_exists(worker) or psutil.Process(worker).status() == "zombie"


def test_worker_that_cannot_start_says_why(tmp_path: Path) -> None:
    script = tmp_path / "unguarded.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import torch
            from aiockpt import CheckpointError, TorchCheckpoint
            ckpt = TorchCheckpoint(persistent=True)  # no __main__ guard
            ckpt.async_save({{"w": torch.ones(2)}}, {str(tmp_path / "x.pt")!r})
            try:
                ckpt.finalize_async_save(blocking=True)
            except CheckpointError as err:
                print(type(err).__name__, "|", err)
            """
        )
    )
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert "WorkerCrashedError | " in out.stdout
    assert "before it finished starting" in out.stdout and "__main__" in out.stdout
