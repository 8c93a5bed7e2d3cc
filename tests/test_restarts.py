"""A job restarted while a writer of the old job is still alive: the old writer can never
replace what the new job commits, in either format."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from aiockpt import CheckpointManager

pytestmark = pytest.mark.timeout(300)

TRAINER = """
import os, sys
import torch
from aiockpt import CheckpointManager

if __name__ == "__mp_main__" and os.environ.get("STALL_DIR"):
    # In the first job's worker: the write of step 2's data file stalls between its
    # temporary file and the rename (a hung network filesystem).
    import aiockpt.storage._atomic as atomic

    real_replace = os.replace

    def stalled_replace(src, dst, **kwargs):
        if "step-000000000002" in dst:
            stall = os.environ["STALL_DIR"]
            open(os.path.join(stall, "stalled"), "w").close()
            with open(os.path.join(stall, "gate")):  # a FIFO: until the test opens it
                pass
        return real_replace(src, dst, **kwargs)

    atomic.os.replace = stalled_replace

def state(value):
    return {"w": torch.full((1 << 16,), float(value))}

def main(fmt, directory, phase):
    with CheckpointManager(directory, keep_last=1, format=fmt) as mgr:
        if phase == "first":
            mgr.save(1, state(1))
            mgr.poll(blocking=True)
            print("WORKER", mgr.queue._engine._persistent_caller.process.pid, flush=True)
            mgr.save(2, state(2))
            sys.stdin.readline()  # the job is killed here, its worker stalled
        else:
            restored = mgr.restore(state_dict=state(0)) if fmt == "dcp" else mgr.restore()
            print("RESTORED", mgr.latest_step(), float(restored["w"][0]), flush=True)
            mgr.save(2, state(22))
            mgr.poll(blocking=True)
            print("COMMITTED", mgr.committed_steps(), flush=True)

if __name__ == "__main__":
    main(*sys.argv[1:4])
"""


def _committed_names(step: Path, fmt: str) -> set[str]:
    if fmt == "torch":
        return {r["name"] for r in json.loads((step / "metadata.json").read_text())["files"]}
    sidecar = json.loads((step / ".metadata.checksums").read_text())
    return {r["name"] for r in sidecar["files"]}


def _data_files(step: Path) -> set[str]:
    return {p.name for p in step.iterdir() if p.suffix in (".pt", ".distcp")}


@pytest.mark.parametrize("fmt", ["torch", "dcp"])
def test_a_stalled_writer_of_a_killed_job_never_clobbers_the_restarted_jobs_commit(
    tmp_path: Path, fmt: str
) -> None:
    script = tmp_path / "trainer.py"
    script.write_text(TRAINER)
    ckdir = tmp_path / "ckpts"
    stall = tmp_path / "stall"
    stall.mkdir()
    os.mkfifo(stall / "gate")
    argv = [sys.executable, str(script), fmt, str(ckdir)]
    first = subprocess.Popen(
        [*argv, "first"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "STALL_DIR": str(stall)},
    )
    worker = None
    try:
        assert first.stdin is not None and first.stdout is not None
        tag, pid = first.stdout.readline().split()
        assert tag == "WORKER"
        worker = psutil.Process(int(pid))
        deadline = time.monotonic() + 120
        while not (stall / "stalled").exists():  # the worker is inside step 2's write
            assert time.monotonic() < deadline and first.poll() is None
            time.sleep(0.01)
        first.kill()  # the job dies; its worker lives on, stalled before its rename
        first.wait(timeout=60)

        second = subprocess.run(
            [*argv, "second"], capture_output=True, text=True, timeout=240, check=False
        )
        assert second.returncode == 0, second.stderr
        assert second.stdout.split("\n")[:2] == ["RESTORED 1 1.0", "COMMITTED [2]"]
        step2 = ckdir / "step-000000000002"
        committed = _committed_names(step2, fmt)
        assert not (ckdir / "step-000000000001").exists()  # keep_last=1 pruned it
        assert worker.is_running()

        os.close(os.open(stall / "gate", os.O_WRONLY))  # the old writer renames, and ends
        worker.wait(timeout=120)
    finally:
        first.kill()
        first.wait(timeout=60)
        for pipe in (first.stdin, first.stdout):
            if pipe is not None:
                pipe.close()
        if worker is not None and worker.is_running():
            worker.kill()
    with CheckpointManager(ckdir, format=fmt) as mgr:
        assert mgr.committed_steps() == [2]
        mgr.steps.format.verify(str(step2), mgr.steps.storage)
        target = {"w": torch.zeros(1 << 16)}
        restored = mgr.restore(state_dict=target) if fmt == "dcp" else mgr.restore()
    assert torch.equal(restored["w"], torch.full((1 << 16,), 22.0))
    # The old writer did finish its write: under a name the commit does not record.
    assert _data_files(step2) - committed, "the old writer wrote nothing"
