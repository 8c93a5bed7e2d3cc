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
    assert "first checkpoint (cold)" in stdout and "later checkpoints (mean)" in stdout
