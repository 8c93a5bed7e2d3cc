"""The crash-consistency harness (``benchmarks/crash_consistency.py``) at a small count:
the trainer, its worker or both SIGKILLed at random moments, restarted on the same
directory, every committed step checked in a fresh process. ``--trials 200`` is the
large run (see docs/reliability.md)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

HARNESS = Path(__file__).resolve().parent.parent / "benchmarks" / "crash_consistency.py"

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def test_random_sigkills_never_lose_a_reported_commit(tmp_path: Path) -> None:
    argv = [sys.executable, str(HARNESS), "--trials", "8", "--seed", "7", "--numel", "65536"]
    out = subprocess.run(
        [*argv, "--dir", str(tmp_path)], capture_output=True, text=True, timeout=840, check=False
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.splitlines()[-1] == "8 trials, 0 with a problem (seed 7)"
    reported = re.findall(r"reported (\d+), newest (\d+)", out.stdout)
    # The harness did exercise commits: most trials saw some before their kill.
    assert len(reported) >= 4, out.stdout
    assert all(int(newest) >= int(step) for step, newest in reported)
    assert list(tmp_path.iterdir()) == []  # its work directory is gone
