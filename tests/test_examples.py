"""Every example runs (small sizes) and does what it says."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def run(*argv: str) -> str:
    out = subprocess.run(
        [sys.executable, *argv], capture_output=True, text=True, timeout=90, cwd=ROOT
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.mark.parametrize("mode", [[], ["--fork"]], ids=["persistent", "fork"])
def test_reference_loop_example(tmp_path: Path, mode: list[str]) -> None:
    stdout = run(
        "examples/reference_loop.py", "--steps", "20", "--every", "5", "--out", str(tmp_path), *mode
    )
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == [f"step{s:06d}.pt" for s in (5, 10, 15, 20)]
    for name in files:
        assert torch.load(tmp_path / name, weights_only=True)["step"] == int(name[4:10])
    assert stdout.count("is on disk") == 4


def test_demo_command() -> None:
    stdout = run(
        "-m", "aiockpt", "demo", "--steps", "6", "--every", "2", "--width", "256", "--depth", "2"
    )
    assert "matches the sync one: True" in stdout
    assert "first checkpoint" in stdout and "later checkpoints (mean)" in stdout
    assert "set-up before the loop" in stdout


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_async_orchestrator_example(tmp_path: Path, backend: str) -> None:
    stdout = run(
        "examples/async_orchestrator.py",
        "--steps",
        "9",
        "--every",
        "3",
        "--out",
        str(tmp_path),
        "--backend",
        backend,
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"step{s:06d}.pt" for s in (3, 6, 9)]
    assert "checkpoint 0 done" in stdout and "checkpoint 1 done" in stdout
    assert "finished: 3 checkpoint(s), 1 finalized at exit" in stdout
    last = torch.load(tmp_path / "step000009.pt", weights_only=True)
    assert last["step"] == 9 and set(last) == {"model", "optim", "step"}


def test_plain_vs_async_example(tmp_path: Path) -> None:
    stdout = run(
        "examples/plain_vs_async_finalize.py",
        "--steps",
        "6",
        "--every",
        "2",
        "--out",
        str(tmp_path),
    )
    assert "plain loop finalized calls: [0, 1, 2]" in stdout
    assert "async loop finalized calls: [0, 1, 2]" in stdout
    assert "both loops wrote identical checkpoints: True" in stdout


def test_async_dataloader_example(tmp_path: Path) -> None:
    stdout = run(
        "examples/async_dataloader.py", "--size-mb", "16", "--saves", "1", "--out", str(tmp_path)
    )
    line = next(ln for ln in stdout.splitlines() if ln.startswith("save 1"))
    during = int(line.split("meanwhile: ")[1].split()[0])
    assert during > 0, line  # the loader kept producing while the checkpoint was written
    assert (
        torch.load(tmp_path / "loader1.pt", weights_only=True)["layer0"].numel() == 16 * 2**20 // 32
    )


def test_preemptible_training_example_saves_on_sigterm_and_resumes(tmp_path: Path) -> None:
    import signal
    import time

    run_dir, out_path = tmp_path / "run", tmp_path / "out.txt"
    example = ["examples/preemptible_training.py", "--dir", str(run_dir), "--every", "3"]
    fast = ["--step-seconds", "0.05"]
    with open(out_path, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, *example, *fast, "--steps", "1000"],
            stdout=out,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
    try:
        deadline = time.monotonic() + 60
        while "committed step 3" not in out_path.read_text():  # a checkpoint exists
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, out_path.read_text()
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 75, err
    lines = out_path.read_text().splitlines()
    assert lines[-1].startswith("preempted: resume from step ") and "(exit status 75)" in lines[-1]
    step = int(lines[-1].split("resume from step ")[1].split()[0])
    assert lines[-2] == f"committed step {step}"
    assert "exiting with status 75" in err and f"step {step} committed" in err
    resumed = run(*example, *fast, "--steps", str(step + 2))
    assert resumed.splitlines()[0] == f"resumed from step {step}"
    assert resumed.splitlines()[-2:] == [
        f"committed step {step + 2}",
        f"finished at step {step + 2}",
    ]
