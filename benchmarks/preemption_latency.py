"""Time from SIGTERM to a committed checkpoint, for a state of a given size (1 GiB).

A child process runs a training loop under ``Preemption`` (a ``CheckpointManager`` with
its persistent worker, a save every ``--every`` steps); once ``--warm`` saves have
committed, this process sends it SIGTERM, either between two saves (``idle``: the last
save is a new save of the agreed step) or just after a save was scheduled (``saving``:
the save in flight, then the new one). It reports, per trial:

- SIGTERM -> committed: until the step the ranks agreed on is committed (the commit's
  own timestamp, recorded by the storage after ``metadata.json`` is durable);
- SIGTERM -> exit: until the process has exited (status 75).

    python benchmarks/preemption_latency.py --mib 1024 --trials 3 --question-ranks 2

``--question-ranks N`` also times the per-step question (``pre.preempted``) on the
training thread of rank 0 of N gloo ranks, with nothing to report (the usual case).

Both clocks are ``time.monotonic()`` (CLOCK_MONOTONIC, shared by every process).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import torch

from aiockpt import CheckpointManager, LocalStorage, Preempted, Preemption


class TimedStorage(LocalStorage):
    """Local storage that notes when each step's commit is durable."""

    def __init__(self, log: str) -> None:
        self.log = log

    def commit(self, directory: str, files: list[dict[str, Any]], extra: dict[str, Any]) -> None:
        super().commit(directory, files, extra)
        with open(self.log, "a") as f:
            f.write(json.dumps({"dir": os.path.basename(directory), "t": time.monotonic()}) + "\n")


def child(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.WARNING, format="    child: %(message)s")
    n = 16
    state = {f"p{i}": torch.randn(args.mib * 2**20 // 4 // n) for i in range(n)}
    marker = os.path.join(args.dir, "marker")
    storage = TimedStorage(os.path.join(args.dir, "commits.jsonl"))
    mgr = CheckpointManager(os.path.join(args.dir, "ck"), keep_last=2, storage=storage)
    committed = 0
    with mgr, Preemption(mgr, grace=args.grace) as pre:
        step = 0
        while True:
            if pre.preempted:
                pre.save_and_exit(step, state)
            time.sleep(args.step_seconds)  # the step's compute
            state["p0"][0] += 1.0
            step += 1
            if step % args.every == 0:
                pre.save(step, state)
                if committed >= args.warm and args.when == "saving":
                    _mark(marker, step)
            committed += len(pre.poll())
            idle = mgr.queue.get_num_unfinalized_calls() == 0
            halfway = step % args.every == args.every // 2  # the next save is far
            if committed >= args.warm and args.when == "idle" and idle and halfway:
                _mark(marker, step)  # nothing in flight: the last save is a new one


def _mark(path: str, step: int) -> None:
    if not os.path.exists(path):
        with open(path + ".tmp", "w") as f:
            f.write(str(step))
        os.rename(path + ".tmp", path)


def trial(args: argparse.Namespace, when: str) -> dict[str, float]:
    work = tempfile.mkdtemp(prefix="aiockpt-preempt-", dir=args.tmp)
    cmd = [sys.executable, __file__, "--child", "--dir", work, "--when", when]
    cmd += ["--mib", str(args.mib), "--grace", str(args.grace), "--every", str(args.every)]
    cmd += ["--warm", str(args.warm), "--step-seconds", str(args.step_seconds)]
    proc = subprocess.Popen(cmd)
    try:
        marker = os.path.join(work, "marker")
        deadline = time.monotonic() + 600
        while not os.path.exists(marker):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the child ended or hung before it was ready: {proc.poll()}")
            time.sleep(0.001)
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=args.grace + 30)
        exited = time.monotonic()
        if code != Preempted.EXIT_CODE:
            raise RuntimeError(f"the child exited with {code}, not {Preempted.EXIT_CODE}")
        with open(os.path.join(work, "commits.jsonl")) as f:
            commits = [json.loads(line) for line in f]
        last = commits[-1]
        if last["t"] < signalled:
            raise RuntimeError("no step was committed after the signal")
        return {"committed": last["t"] - signalled, "exit": exited - signalled}
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        shutil.rmtree(work, ignore_errors=True)


def _question_rank(rank: int, world: int, store: str, steps: int, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    costs = []
    with (
        CheckpointManager(os.path.join(out, "ck"), persistent=False) as mgr,
        Preemption(mgr) as pre,
    ):
        for _ in range(steps):
            time.sleep(0.002)  # the step's compute
            start = time.perf_counter()
            if pre.preempted:
                raise RuntimeError("nobody sent a signal")
            costs.append(time.perf_counter() - start)
    if rank == 0:
        with open(os.path.join(out, "costs.json"), "w") as f:
            json.dump(costs[10:], f)
    dist.destroy_process_group()


def question_cost(world: int, steps: int) -> tuple[float, float]:
    """Median and 99th percentile of ``preempted`` on the training thread (rank 0)."""
    import torch.multiprocessing as mp

    out = tempfile.mkdtemp(prefix="aiockpt-question-")
    try:
        store = os.path.join(out, "store")
        mp.spawn(_question_rank, args=(world, store, steps, out), nprocs=world)
        with open(os.path.join(out, "costs.json")) as f:
            costs = sorted(json.load(f))
        return statistics.median(costs), costs[int(len(costs) * 0.99)]
    finally:
        shutil.rmtree(out, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=1024, help="state size in MiB")
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--when", choices=["idle", "saving", "both"], default="both")
    parser.add_argument("--grace", type=float, default=30.0)
    parser.add_argument("--every", type=int, default=8, help="save every this many steps")
    parser.add_argument("--warm", type=int, default=2, help="saves committed before SIGTERM")
    parser.add_argument("--step-seconds", type=float, default=0.5)
    parser.add_argument("--tmp", default=None, help="where the checkpoints go")
    parser.add_argument(
        "--question-ranks", type=int, default=0, help="also time `preempted` on this many ranks"
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)  # ends with Preempted: exit status 75
        return
    if args.question_ranks:
        median, p99 = question_cost(args.question_ranks, 2000)
        print(
            f"`preempted` on the training thread, {args.question_ranks} ranks: "
            f"{median * 1e6:.0f} us median, {p99 * 1e6:.0f} us p99",
            flush=True,
        )
    whens = ["idle", "saving"] if args.when == "both" else [args.when]
    print(f"state {args.mib} MiB, grace {args.grace:g}s, {args.trials} trial(s) each")
    for when in whens:
        runs = [trial(args, when) for _ in range(args.trials)]
        committed = [r["committed"] for r in runs]
        exited = [r["exit"] for r in runs]
        print(
            f"SIGTERM {'between saves' if when == 'idle' else 'during a save'}: "
            f"-> committed {statistics.median(committed):.2f}s median "
            f"({min(committed):.2f}-{max(committed):.2f}); "
            f"-> exit {statistics.median(exited):.2f}s median "
            f"({min(exited):.2f}-{max(exited):.2f})",
            flush=True,
        )


if __name__ == "__main__":
    main()
