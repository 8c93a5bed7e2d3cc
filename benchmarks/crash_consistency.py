"""Crash consistency: SIGKILL the trainer, its worker or both at random moments, restart,
and check that nothing reported committed was ever lost.

Each trial starts a training process on one shared checkpoint directory (a manager with
``keep_last=2``). It restores the newest step, checks that its values are that step's, then
saves the following steps, printing each commit as it learns of it. The harness kills it (or
its worker, or both) after a random delay; a killed worker makes that step fail and the
trainer goes on with a fresh worker. The next trial restarts on the same directory while
the old worker may still be writing: exactly the restart users make.

After every trial a fresh process checks the invariants:

- the newest committed step is at least the last step the trainer reported committed;
- every committed step verifies against its checksums, and restores to its own values.

    python benchmarks/crash_consistency.py --trials 200 --seed 1

Prints one line per trial and a summary; exits 1 if any invariant failed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

TRAINER = """
import os, sys
import anyio
import torch
from aiockpt import AsyncCheckpointManager, CheckpointError, CheckpointManager

def state(step, numel):
    return {"w": torch.full((numel,), float(step)), "b": torch.arange(64) + step}

def check(step, restored):
    assert float(restored["w"][0]) == step and float(restored["w"][-1]) == step, step
    assert torch.equal(restored["b"], torch.arange(64) + step), step

def blank(numel):
    return state(-1, numel)

def say(*words):
    print(*words, flush=True)

def sync_main(directory, fmt, numel):
    with CheckpointManager(directory, keep_last=2, format=fmt) as mgr:
        step = mgr.latest_step()
        if step is not None:
            restored = mgr.restore(state_dict=blank(numel)) if fmt == "dcp" else mgr.restore()
            check(step, restored)
        say("RESTORED", step)
        step = -1 if step is None else step
        while True:
            step += 1
            mgr.save(step, state(step, numel))
            say("WORKER", mgr.queue._engine._persistent_caller.process.pid)
            try:
                for done in mgr.poll(blocking=True):
                    say("COMMITTED", done)
            except CheckpointError as exc:
                say("FAILED", step, type(exc).__name__)

async def async_main(directory, fmt, numel):
    async with AsyncCheckpointManager(directory, keep_last=2, format=fmt) as mgr:
        step = await mgr.alatest_step()
        if step is not None:
            target = blank(numel) if fmt == "dcp" else None
            check(step, await mgr.restore(state_dict=target))
        say("RESTORED", step)
        step = -1 if step is None else step
        while True:
            step += 1
            fut = await mgr.save(step, state(step, numel))
            say("WORKER", mgr.queue._engine._persistent_caller.process.pid)
            try:
                await fut
                say("COMMITTED", step)
            except CheckpointError as exc:
                say("FAILED", step, type(exc).__name__)

if __name__ == "__main__":
    directory, fmt, kind, numel = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    if kind == "sync":
        sync_main(directory, fmt, numel)
    else:
        anyio.run(async_main, directory, fmt, numel)
"""

CHECKER = """
import json, sys
import torch
from aiockpt import CheckpointManager

directory, fmt, numel = sys.argv[1], sys.argv[2], int(sys.argv[3])
with CheckpointManager(directory, format=fmt) as mgr:
    steps = mgr.committed_steps()
    bad = []
    for step in steps:
        try:
            mgr.steps.format.verify(mgr.steps.path(step), mgr.steps.storage)
            if fmt == "dcp":
                target = {"w": torch.zeros(numel), "b": torch.zeros(64, dtype=torch.int64)}
                restored = mgr.restore(step, state_dict=target)
            else:
                restored = mgr.restore(step)
            ok = float(restored["w"][0]) == step and float(restored["w"][-1]) == step
            ok = ok and torch.equal(restored["b"], torch.arange(64) + step)
            if not ok:
                bad.append([step, "values of another step"])
        except Exception as exc:
            bad.append([step, f"{type(exc).__name__}: {exc}"])
print(json.dumps({"committed": steps, "bad": bad}))
"""


@dataclass
class Trial:
    index: int
    fmt: str
    kind: str
    target: str
    delay: float
    reported: int | None = None
    latest: int | None = None
    failures: int = 0
    problem: str = ""


def _kill(pid: int | None) -> None:
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def run_trial(trial: Trial, work: Path, numel: int, timeout: float) -> None:
    """Start a trainer, kill what the trial says when it says, then check the directory."""
    directory = work / f"ckpt-{trial.fmt}"
    argv = [sys.executable, str(work / "trainer.py"), str(directory), trial.fmt, trial.kind]
    proc = subprocess.Popen([*argv, str(numel)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    os.set_blocking(proc.stdout.fileno(), False)
    # Whom to kill, and when (counted from the first save): killing only the worker fails
    # that save; the trainer goes on with a fresh worker and is killed a while later.
    victims = {"trainer": ["trainer"], "worker": ["worker", "trainer"], "both": ["both"]}
    plan = list(victims[trial.target])
    worker: int | None = None
    started = time.monotonic()
    kill_at: float | None = None
    buffer = b""
    while proc.poll() is None and plan:
        now = time.monotonic()
        if now - started > timeout:
            trial.problem = f"the trainer did not finish its part within {timeout} s"
            break
        with contextlib.suppress(BlockingIOError):
            buffer += os.read(proc.stdout.fileno(), 65536)
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            words = line.decode().split()
            if words[:1] == ["WORKER"]:
                worker = int(words[1])
                if kill_at is None:  # the first save is under way
                    kill_at = now + trial.delay
            elif words[:1] == ["COMMITTED"]:
                trial.reported = int(words[1])
            elif words[:1] == ["FAILED"]:
                trial.failures += 1
        if kill_at is not None and now >= kill_at and worker is not None:
            victim = plan.pop(0)
            if victim in ("worker", "both"):
                _kill(worker)
            if victim in ("trainer", "both"):
                _kill(proc.pid)
            kill_at = now + 0.5 + trial.delay
            continue
        time.sleep(0.005)
    _kill(proc.pid)
    os.set_blocking(proc.stdout.fileno(), True)
    rest, err = proc.communicate(timeout=60)
    # Whole lines only: the kill may cut the last one short ("COMMITTED 18" of 186).
    for line in (buffer + rest).decode().split("\n")[:-1]:
        if line.startswith("COMMITTED"):
            trial.reported = int(line.split()[1])
    if proc.returncode != -signal.SIGKILL and not trial.problem:
        tail = err.decode(errors="replace").strip()[-2000:]
        trial.problem = f"the trainer exited with {proc.returncode}: {tail}"
    check = subprocess.run(
        [sys.executable, str(work / "checker.py"), str(directory), trial.fmt, str(numel)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if check.returncode != 0:
        trial.problem = trial.problem or f"the check failed: {check.stderr.strip()[-2000:]}"
        return
    found = json.loads(check.stdout.strip().splitlines()[-1])
    trial.latest = found["committed"][-1] if found["committed"] else None
    if found["bad"]:
        trial.problem = trial.problem or f"committed steps that do not restore: {found['bad']}"
    elif trial.reported is not None and (trial.latest is None or trial.latest < trial.reported):
        trial.problem = (
            f"step {trial.reported} was reported committed, the newest is {trial.latest}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--numel", type=int, default=1 << 20, help="floats per state dict")
    parser.add_argument("--max-delay", type=float, default=2.0, help="seconds before a kill")
    parser.add_argument("--timeout", type=float, default=120.0, help="per trainer, per check")
    parser.add_argument("--formats", nargs="+", default=["torch", "dcp"])
    parser.add_argument("--dir", help="work directory (default: a temporary one)")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        work = Path(tmp)
        (work / "trainer.py").write_text(TRAINER)
        (work / "checker.py").write_text(CHECKER)
        problems = 0
        for i in range(args.trials):
            trial = Trial(
                index=i,
                fmt=rng.choice(args.formats),
                kind=rng.choice(["sync", "async"]),
                target=rng.choice(["trainer", "worker", "both"]),
                delay=rng.uniform(0.0, args.max_delay),
            )
            run_trial(trial, work, args.numel, args.timeout)
            problems += bool(trial.problem)
            print(
                f"trial {i:4d} {trial.fmt:5s} {trial.kind:5s} kill {trial.target:7s} "
                f"after {trial.delay:4.2f} s: reported {trial.reported}, newest {trial.latest}, "
                f"failed saves {trial.failures}  {'PROBLEM: ' + trial.problem if trial.problem else 'ok'}",
                flush=True,
            )
        print(f"{args.trials} trials, {problems} with a problem (seed {args.seed})")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
