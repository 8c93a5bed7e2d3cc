"""Preemption: a signal to one rank, anywhere, makes every rank save the same step within
the grace period and exit with status 75; a grace period too short, or a second signal,
never costs the previous checkpoint. Multi-rank tests run real gloo ranks
(``preempt_scenarios``) held at gates, so each signal lands exactly where it says."""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import anyio

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup
import pytest
import torch
import trio
from ckpt_helpers import data_file, open_gate, read_pid
from preempt_scenarios import GatedStorage, Ranks, value

from aiockpt import (
    AsyncCheckpointManager,
    AsyncPreemption,
    CheckpointManager,
    DistributedCheckpointError,
    InvalidRequestError,
    Preempted,
    Preemption,
    QueueMisuseError,
    verify,
)
from aiockpt._preempt_agree import decide, plan_values

EXIT = 75
GRACE = 30.0
ROOT = Path(__file__).resolve().parent.parent


def committed(tmp: Path) -> list[int]:
    with CheckpointManager(tmp / "ck", persistent=False) as mgr:
        return mgr.committed_steps()


def check_step(tmp: Path, step: int, world: int) -> None:
    """Step ``step`` is committed, verifies, and holds each rank's value of that step."""
    directory = tmp / "ck" / f"step-{step:012d}"
    verify(str(directory))
    for rank in range(world):
        shard = data_file(directory, f"shard-{rank:05d}-of-{world:05d}.pt")
        w = torch.load(shard, weights_only=True)["w"]
        assert torch.equal(w, torch.full((256,), value(rank, step))), (rank, step)


def agreed_step(results: list[dict[str, Any] | None], world: int) -> int:
    assert all(r is not None and "agreed" in r for r in results), results
    steps = {r["agreed"] for r in results if r is not None}
    assert len(steps) == 1, f"the ranks stopped at different steps: {results}"
    return int(steps.pop())


# -- a signal to one rank, at each point of a step's life ------------------------------

GATES = {  # where: (markers every rank leaves, the gate to open after the signal)
    "step": ("at-step-{r}", "gate-step"),
    "staging": ("staging-{r}", "gate-staging"),
    "write": ("writing-{r}", "gate-write"),
    "commit": ("committing", "gate-commit"),
    "final": ("at-step-{r}", "gate-step"),
}
SAVES = {"step": (3,), "staging": (3, 6), "write": (3, 6), "commit": (3, 6), "final": (3,)}


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("where", list(GATES))
def test_a_signal_to_one_rank_makes_every_rank_save_the_same_step(
    tmp_path: Path, world: int, where: str
) -> None:
    rng = random.Random(f"{world}/{where}")
    target = rng.randrange(world)
    ranks = Ranks("preempted_loop", world, str(tmp_path), where=where, saves=SAVES[where])
    marker, gate = GATES[where]
    ranks.wait_for(*sorted({marker.format(r=r) for r in range(world)}))
    signalled = time.monotonic()
    os.kill(ranks.pids[target], signal.SIGTERM)
    ranks.open(gate)
    second = None
    if where == "final":  # a second signal while every worker writes the last save
        ranks.wait_for(*[f"final-writing-{r}" for r in range(world)])
        second = rng.randrange(world)
        os.kill(ranks.pids[second], signal.SIGTERM)
        ranks.open("gate-final")
    codes = ranks.join()
    elapsed = time.monotonic() - signalled
    results = ranks.results()
    assert codes == [EXIT] * world, results
    step = agreed_step(results, world)
    assert step >= (6 if where in ("step", "final") else 7), results
    for r, result in enumerate(results):
        assert result is not None
        assert (result["outcome"], result["saved"], result["latest"]) == ("saved", step, step)
        assert (
            f"preempted by SIGTERM (first on rank {target}), stopped at step {step}"
            in (result["message"])
        )
        assert f"; resume from step {step}; " in result["message"]
        assert result["message"].endswith("; exiting with status 75")
        log = ranks.log(r)
        assert ("SIGTERM received" in log) == (r == target), log
        assert f"step {step}" in log
    assert elapsed < GRACE, elapsed
    steps = committed(tmp_path)
    assert steps[0] == 3 and steps[-1] == step, steps
    check_step(tmp_path, step, world)
    check_step(tmp_path, 3, world)
    if second is not None:
        assert "1 signal(s) (SIGTERM) came during the last save and were ignored" in (
            results[second] or {}
        ).get("message", "")
        assert all(
            "came during the last save" not in (res or {}).get("message", "")
            for r, res in enumerate(results)
            if r != second
        )


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_a_new_job_restores_the_step_saved_on_preemption(tmp_path: Path, world: int) -> None:
    ranks = Ranks("preempted_loop", world, str(tmp_path), where="step")
    ranks.wait_for(*[f"at-step-{r}" for r in range(world)])
    os.kill(ranks.pids[world - 1], signal.SIGTERM)
    ranks.open("gate-step")
    assert ranks.join() == [EXIT] * world, ranks.results()
    step = agreed_step(ranks.results(), world)
    for r in range(world):
        os.remove(tmp_path / f"result-{r}.json")
    job = Ranks("resume", world, str(tmp_path))
    assert job.join() == [0] * world, job.results()
    for r, result in enumerate(job.results()):
        assert result is not None
        assert result["value"] == {"latest": step, "w": value(r, step), "steps": [3, step]}


@pytest.mark.slow
def test_a_grace_period_too_short_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    ranks = Ranks("preempted_loop", 2, str(tmp_path), where="final", grace=4.0, untimed=True)
    ranks.wait_for("at-step-0", "at-step-1")
    signalled = time.monotonic()
    os.kill(ranks.pids[0], signal.SIGTERM)
    ranks.open("gate-step")
    ranks.wait_for("final-writing-0", "final-writing-1")  # ... and it never finishes
    codes = ranks.join(timeout=30.0)
    elapsed = time.monotonic() - signalled
    assert codes == [EXIT, EXIT]
    assert 4.0 <= elapsed < 4.0 + 10.0, elapsed
    for r in range(2):
        log = ranks.log(r)
        assert "saving step 6: no earlier save was timed, so it is tried" in log, log
        assert (
            "the deadline (4.0s after the signal) passed before the last save (step 6) "
            "finished: the newest committed checkpoint is step 3 and is intact; stopping the "
            "checkpoint worker and exiting with status 75"
        ) in log, log
    assert ranks.results() == [None, None]  # ended by the watchdog, not by raising
    assert committed(tmp_path) == [3]
    check_step(tmp_path, 3, 2)


@pytest.mark.slow
def test_no_time_for_a_new_save_waits_for_the_one_in_flight_on_every_rank(
    tmp_path: Path,
) -> None:
    # Rank 1 has timed its saves at 100 s: the ranks agree not to save anew (rank 0 would
    # have), and wait for step 6, which is held at its write until the plan is logged.
    ranks = Ranks("slow_plan", 2, str(tmp_path))
    ranks.wait_for("writing-0", "writing-1")
    os.kill(ranks.pids[0], signal.SIGTERM)
    deadline = time.monotonic() + 60
    while not all("not saving step" in ranks.log(r) for r in range(2)):
        assert time.monotonic() < deadline, [ranks.log(r) for r in range(2)]
        time.sleep(0.005)
    ranks.open("gate-write")
    assert ranks.join() == [EXIT, EXIT], ranks.results()
    step = agreed_step(ranks.results(), 2)
    for r, result in enumerate(ranks.results()):
        assert result is not None
        assert (result["outcome"], result["saved"], result["latest"]) == ("in-flight", 6, 6)
        assert (
            "no time for a new save: it would take about 100.0s after the one in flight"
            in (result["message"])
        )
        assert "the save in flight committed step 6; resume from step 6" in result["message"]
        assert f"not saving step {step}: no time for a new save" in ranks.log(r)
    assert committed(tmp_path) == [3, 6]
    check_step(tmp_path, 6, 2)


@pytest.mark.slow
def test_a_signal_to_a_ranks_process_group_kills_its_worker_yet_the_last_save_commits(
    tmp_path: Path,
) -> None:
    # torchrun signals each rank's process group, SLURM every process of the step: the
    # rank's persistent worker, writing step 6, dies with it. Step 6 fails on every rank;
    # the last save starts a fresh worker and commits.
    ranks = Ranks(
        "preempted_loop",
        2,
        str(tmp_path),
        where="write",
        saves=(3, 6),
        persistent=True,
        own_group=True,
    )
    ranks.wait_for("writing-0", "writing-1")
    os.killpg(os.getpgid(ranks.pids[1]), signal.SIGTERM)
    ranks.open("gate-write")
    assert ranks.join() == [EXIT, EXIT], ranks.results()
    step = agreed_step(ranks.results(), 2)
    assert step >= 7
    for r, result in enumerate(ranks.results()):
        assert result is not None
        assert (result["outcome"], result["saved"]) == ("saved", step)
        seen = json.loads((tmp_path / f"failures-{r}.json").read_text())
        log = ranks.log(r)
        # Where the loop polled before the agreement, it saw step 6 fail; otherwise the
        # last save did.
        assert seen == ["DistributedCheckpointError"] or "a save failed" in log, (seen, log)
    assert committed(tmp_path) == [3, step]
    check_step(tmp_path, step, 2)


@pytest.mark.slow
def test_async_preemption_saves_the_same_step_on_every_rank(tmp_path: Path) -> None:
    ranks = Ranks("async_loop", 2, str(tmp_path))
    ranks.wait_for("writing-0", "writing-1")
    os.kill(ranks.pids[1], signal.SIGTERM)
    ranks.open("gate-write")
    assert ranks.join() == [EXIT, EXIT], ranks.results()
    step = agreed_step(ranks.results(), 2)
    assert step >= 7
    for result in ranks.results():
        assert result is not None
        assert (result["outcome"], result["saved"], result["latest"]) == ("saved", step, step)
    assert committed(tmp_path) == [3, 6, step]
    check_step(tmp_path, step, 2)


@pytest.mark.slow
def test_a_cancelled_question_is_answered_when_asked_again_on_every_rank_alike(
    tmp_path: Path,
) -> None:
    ranks = Ranks("cancelled_question", 2, str(tmp_path))
    assert ranks.join() == [EXIT, EXIT], ranks.results()
    assert agreed_step(ranks.results(), 2) == 2
    for result in ranks.results():
        assert result is not None
        assert (result["outcome"], result["saved"], result["latest"]) == ("saved", 2, 2)
    assert committed(tmp_path) == [2]
    check_step(tmp_path, 2, 2)


@pytest.mark.slow
def test_a_rank_asking_more_often_than_the_others_gets_a_typed_error(tmp_path: Path) -> None:
    ranks = Ranks("asks_out_of_step", 2, str(tmp_path))
    assert ranks.join(timeout=40.0) == [1, 0]
    rank0, rank1 = ranks.results()
    assert rank1 == {"rank": 1, "value": {"answers": [False, False, False]}}
    assert rank0 is not None
    assert (
        "DistributedCheckpointError: the preemption check of step question 3 did not finish "
        "on all ranks"
    ) in rank0["error"]
    assert "a rank has died or stopped asking `preempted` each step" in rank0["error"]


@pytest.mark.slow
def test_the_example_under_torchrun_saves_one_step_when_torchrun_gets_sigterm(
    tmp_path: Path,
) -> None:
    # Kubernetes signals the container's first process: torchrun, which signals each
    # rank's process group (the checkpoint workers with it) and waits for them.
    out_path = tmp_path / "out.txt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node"]
    cmd += ["2", "examples/preemptible_training.py", "--dir", str(tmp_path / "run")]
    cmd += ["--steps", "1000", "--step-seconds", "0.05", "--every", "3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(out_path, "w") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env
        )
    try:
        deadline = time.monotonic() + 90
        while "committed step 3" not in out_path.read_text():
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, out_path.read_text()
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 1, err  # torchrun's own status: it was signalled
    lines = out_path.read_text().splitlines()
    assert lines[-1].startswith("preempted: resume from step "), lines
    step = int(lines[-1].split("resume from step ")[1].split()[0])
    assert lines[-2] == f"committed step {step}"
    for rank in (0, 1):
        assert f"preemption (rank {rank}): preempted by SIGTERM" in err, err
        assert f"resume from step {step}; " in err.split(f"preemption (rank {rank}): preempted")[1]
    directory = tmp_path / "run" / f"step-{step:012d}"
    assert len(verify(str(directory))) == 2  # both ranks' shards, against the metadata
    assert json.loads((directory / "metadata.json").read_text())["world_size"] == 2


# -- one process ------------------------------------------------------------------------


def _loop(pre: Preemption, signal_at: int, sig: int = signal.SIGTERM) -> None:
    step = 0
    while step < 50:
        if pre.preempted:
            pre.save_and_exit(step, {"w": torch.full((8,), float(step))})
        step += 1
        if step % 3 == 0:
            pre.save(step, {"w": torch.full((8,), float(step))})
        pre.poll()
        if step == signal_at:
            os.kill(os.getpid(), sig)
    raise AssertionError("never preempted")


def test_one_process_saves_the_step_and_exits_with_status_75(tmp_path: Path) -> None:
    with (
        pytest.raises(Preempted) as caught,
        CheckpointManager(tmp_path / "ck") as mgr,
        Preemption(mgr, grace=GRACE) as pre,
    ):
        _loop(pre, signal_at=4)
    p = caught.value
    assert not [t for t in threading.enumerate() if t.name == "aiockpt-preemption-deadline"]
    assert isinstance(p, SystemExit) and p.code == 75 == Preemption.EXIT_CODE
    # One process needs no agreement: the step after the signal is the one saved.
    assert (p.agreed_step, p.saved_step, p.latest_step, p.outcome) == (4, 4, 4, "saved")
    assert p.signal == "SIGTERM" and 0 <= p.seconds < GRACE
    assert str(p).startswith("preempted by SIGTERM (first on rank 0), stopped at step 4: ")
    assert (
        torch.load(data_file(tmp_path / "ck" / "step-000000000004", "shard-00000-of-00001.pt"))[
            "w"
        ].tolist()
        == [4.0] * 8
    )


@pytest.mark.parametrize("persistent", [True, False], ids=["persistent", "fork"])
def test_the_worker_ignores_a_schedulers_early_warning(tmp_path: Path, persistent: bool) -> None:
    # SLURM's --signal=USR1@120 reaches every process of the job step: the worker writing
    # a save goes on with it, while the training process takes it as the warning it is.
    storage = GatedStorage(str(tmp_path), write_step=1)
    mgr = CheckpointManager(tmp_path / "ck", storage=storage, persistent=persistent)
    signals = (signal.SIGTERM, signal.SIGUSR1)
    with pytest.raises(Preempted) as caught, mgr, Preemption(mgr, signals=signals) as pre:
        pre.save(1, {"w": torch.ones(4)})
        worker = read_pid(str(tmp_path / "writing-0"))
        assert worker != os.getpid()
        os.kill(worker, signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGUSR1)
        open_gate(str(tmp_path / "gate-write"))
        assert pre.poll(blocking=True) == [1]
        assert pre.preempted
        pre.save_and_exit(1, {"w": torch.ones(4)})
    assert (caught.value.signal, caught.value.outcome, caught.value.latest_step) == (
        "SIGUSR1",
        "saved",
        1,
    )


def test_handlers_chain_to_the_previous_one_and_are_put_back(tmp_path: Path) -> None:
    calls: list[int] = []

    def previous(signum: int, frame: Any) -> None:
        calls.append(signum)

    old = signal.signal(signal.SIGUSR1, previous)
    try:
        with CheckpointManager(tmp_path / "ck") as mgr:
            pre = Preemption(mgr, grace=GRACE, signals=(signal.SIGTERM, signal.SIGUSR1))
            with pytest.raises(Preempted) as caught, pre:
                assert signal.getsignal(signal.SIGUSR1) != previous
                _loop(pre, signal_at=2, sig=signal.SIGUSR1)
            assert caught.value.signal == "SIGUSR1" and caught.value.agreed_step == 2
            assert calls == [signal.SIGUSR1]  # chained once; not again during the last save
            assert signal.getsignal(signal.SIGUSR1) is previous
            assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    finally:
        signal.signal(signal.SIGUSR1, old)


def test_a_signal_during_the_last_save_is_counted_not_chained(tmp_path: Path) -> None:
    calls: list[int] = []
    old = signal.signal(signal.SIGTERM, lambda s, f: calls.append(s))
    try:
        with CheckpointManager(tmp_path / "ck") as mgr, Preemption(mgr, grace=GRACE) as pre:
            save = mgr.save

            def save_and_signal(*args: Any, **kwargs: Any) -> int:
                os.kill(os.getpid(), signal.SIGTERM)  # the last save has begun
                return save(*args, **kwargs)

            with pytest.raises(Preempted) as caught:
                step = 0
                while True:
                    if pre.preempted:
                        mgr.save = save_and_signal  # type: ignore[method-assign]
                        pre.save_and_exit(step, {"w": torch.zeros(4)})
                    step += 1
                    if step == 2:
                        os.kill(os.getpid(), signal.SIGTERM)
        assert calls == [signal.SIGTERM]
        assert caught.value.outcome == "saved" and caught.value.saved_step == 2
        assert "1 signal(s) (SIGTERM) came during the last save and were ignored" in str(
            caught.value
        )
    finally:
        signal.signal(signal.SIGTERM, old)


def test_preempted_is_false_until_a_signal_and_leaving_puts_handlers_back(
    tmp_path: Path,
) -> None:
    before = signal.getsignal(signal.SIGTERM)
    with CheckpointManager(tmp_path / "ck") as mgr, Preemption(mgr, grace=GRACE) as pre:
        assert [pre.preempted for _ in range(5)] == [False] * 5
        assert not pre.received and pre.deadline is None and pre.time_left() is None
    assert signal.getsignal(signal.SIGTERM) is before


def test_misuse_is_refused_with_typed_errors(tmp_path: Path) -> None:
    with CheckpointManager(tmp_path / "ck") as mgr:
        for grace in (0, -1.0, "30", True, math.inf, math.nan, 1e300, 7 * 24 * 3600 + 1):
            with pytest.raises(InvalidRequestError, match="grace must be a positive number"):
                Preemption(mgr, grace=grace)  # type: ignore[arg-type]
        with pytest.raises(InvalidRequestError, match="SIGKILL cannot be caught"):
            Preemption(mgr, signals=(signal.SIGKILL,))
        with pytest.raises(InvalidRequestError, match="at least one signal"):
            Preemption(mgr, signals=())
        with pytest.raises(InvalidRequestError, match="lag must be an int of at least 1"):
            Preemption(mgr, lag=0)
        pre = Preemption(mgr)
        with pytest.raises(QueueMisuseError, match="not open"):
            _ = pre.preempted
        with pre, pytest.raises(QueueMisuseError, match="call it once `preempted` answered"):
            pre.save_and_exit(1, {})
        with pytest.raises(QueueMisuseError, match="entered only once"), pre:
            pass
        errors: list[BaseException] = []

        def enter() -> None:
            try:
                with Preemption(mgr):
                    pass
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=enter)
        thread.start()
        thread.join()
        assert len(errors) == 1 and isinstance(errors[0], QueueMisuseError)
        assert "only in the main thread" in str(errors[0])


@pytest.mark.parametrize(
    ("ranks", "expected"),
    [
        # (step, needs a save, predicted s, in flight s, left s) on each rank
        ([(9, True, 1.0, 0.0, 20.0), (9, True, 2.0, 0.5, 19.0)], ("save", 2.0, 0.5, 19.0)),
        ([(9, True, 1.0, 0.0, 20.0), (9, True, 100.0, 0.0, 20.0)], ("skip", 100.0, 0.0, 20.0)),
        ([(9, True, None, 0.0, 20.0), (9, True, 1.0, 0.0, 20.0)], ("save", None, 0.0, 20.0)),
        ([(9, False, 0.0, 3.0, 20.0), (9, False, 0.0, 2.0, 20.0)], ("wait", 0.0, 3.0, 20.0)),
        ([(9, True, 1.0, 0.0, -1.0), (9, True, 1.0, 0.0, 5.0)], ("skip", 1.0, 0.0, -1.0)),
        # 8 s in flight + 1.25 x 8 s + 1 s margin = 19 s: fits in 19 s, not in 18.9 s
        ([(9, True, 8.0, 8.0, 19.0)], ("save", 8.0, 8.0, 19.0)),
        ([(9, True, 8.0, 8.0, 18.9)], ("skip", 8.0, 8.0, 18.9)),
    ],
)
def test_every_rank_derives_the_same_plan_from_the_reduced_numbers(
    ranks: list[tuple[int, bool, float | None, float, float]], expected: tuple[Any, ...]
) -> None:
    rows = [plan_values(*r) for r in ranks]
    reduced = [max(column) for column in zip(*rows, strict=True)]
    plan = decide(reduced)
    assert (plan.action, plan.predicted, plan.in_flight, plan.left) == expected


def test_ranks_saving_different_steps_are_an_error() -> None:
    rows = [plan_values(9, True, 1.0, 0.0, 20.0), plan_values(10, True, 1.0, 0.0, 20.0)]
    with pytest.raises(DistributedCheckpointError, match=r"different steps \(9\.\.10\)"):
        decide([max(c) for c in zip(*rows, strict=True)])


# -- async loops inside scopes and task groups -------------------------------------------


async def _async_loop(
    pre: AsyncPreemption, signal_at: int, sleep: Any, sig: int = signal.SIGTERM
) -> None:
    step = 0
    while True:
        if await pre.preempted():
            await pre.save_and_exit(step, {"w": torch.full((4,), float(step))})
        step += 1
        if step == signal_at:
            os.kill(os.getpid(), sig)
        await sleep(0)


async def _nested(kind: str, ckdir: Path) -> None:
    """The loop inside a cancel scope, an anyio task group, a trio nursery, or next to
    the manager served in the caller's task group."""
    sleep = trio.sleep if kind == "trio-nursery" else anyio.sleep
    if kind == "serve":
        async with anyio.create_task_group() as tg:
            mgr = await tg.start(AsyncCheckpointManager(ckdir, persistent=False).serve)
            async with AsyncPreemption(mgr, grace=GRACE) as pre:
                await _async_loop(pre, 3, sleep)
    async with (
        AsyncCheckpointManager(ckdir, persistent=False) as mgr,
        AsyncPreemption(mgr, grace=GRACE) as pre,
    ):
        if kind == "scope":
            with anyio.move_on_after(3600):
                await _async_loop(pre, 3, sleep)
        elif kind == "trio-nursery":
            async with trio.open_nursery() as nursery:
                nursery.start_soon(trio.sleep_forever)
                await _async_loop(pre, 3, sleep)
        else:
            async with anyio.create_task_group() as tg:
                tg.start_soon(anyio.sleep_forever)
                await _async_loop(pre, 3, sleep)


@pytest.mark.parametrize("kind", ["scope", "task-group", "trio-nursery", "serve"])
def test_async_save_and_exit_inside_scopes_and_task_groups_exits_with_75(
    tmp_path: Path, kind: str
) -> None:
    with pytest.raises(Preempted) as caught, AsyncPreemption.unwrap_preempted():
        if kind == "trio-nursery":
            trio.run(_nested, kind, tmp_path / "ck")
        else:
            asyncio.run(_nested(kind, tmp_path / "ck"))
    p = caught.value
    assert (p.code, p.agreed_step, p.saved_step, p.outcome) == (EXIT, 3, 3, "saved")
    assert committed(tmp_path) == [3]


def test_unwrap_preempted_keeps_a_group_with_other_errors() -> None:
    preempted = Preempted(
        "x",
        agreed_step=1,
        saved_step=1,
        latest_step=1,
        outcome="saved",
        signal="SIGTERM",
        seconds=0,
    )
    with pytest.raises(BaseExceptionGroup) as caught, AsyncPreemption.unwrap_preempted():
        raise BaseExceptionGroup("", [preempted, ValueError("boom")])
    assert [type(e) for e in caught.value.exceptions] == [Preempted, ValueError]
    with pytest.raises(Preempted) as bare, AsyncPreemption.unwrap_preempted():
        raise BaseExceptionGroup("", [BaseExceptionGroup("", [preempted])])
    assert bare.value is preempted


def test_the_serve_pattern_exits_with_status_75(tmp_path: Path) -> None:
    code = (
        "import asyncio, sys\n"
        "from pathlib import Path\n"
        "from aiockpt import AsyncPreemption\n"
        "from test_preemption import _nested\n"
        "with AsyncPreemption.unwrap_preempted():\n"
        f"    asyncio.run(_nested('serve', Path({str(tmp_path / 'ck')!r})))\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT / "tests"))
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == EXIT, done.stderr
    assert "stopped at step 3: step 3 committed" in done.stderr


@pytest.mark.parametrize("loop", ["asyncio", "trio"])
def test_sigint_is_not_chained_to_the_event_loops_handler(tmp_path: Path, loop: str) -> None:
    # asyncio's Runner and trio install SIGINT handlers that would raise KeyboardInterrupt
    # (or cancel the loop) mid-step: like Python's own, they are not chained.
    async def main() -> None:
        async with (
            AsyncCheckpointManager(tmp_path / "ck", persistent=False) as mgr,
            AsyncPreemption(mgr, grace=GRACE, signals=(signal.SIGTERM, signal.SIGINT)) as pre,
        ):
            await _async_loop(
                pre, 3, trio.sleep if loop == "trio" else asyncio.sleep, signal.SIGINT
            )

    with pytest.raises(Preempted) as caught:
        trio.run(main) if loop == "trio" else asyncio.run(main())
    p = caught.value
    assert (p.signal, p.agreed_step, p.saved_step, p.outcome) == ("SIGINT", 3, 3, "saved")


def test_a_handler_of_a_closed_preemption_falls_back_to_the_one_it_found(
    tmp_path: Path,
) -> None:
    calls: list[int] = []
    old = signal.signal(signal.SIGTERM, lambda s, f: calls.append(s))
    try:
        with CheckpointManager(tmp_path / "ck") as mgr:
            pre = Preemption(mgr, grace=GRACE)
            with pre:
                ours = signal.getsignal(signal.SIGTERM)
                other = signal.signal(signal.SIGTERM, signal.SIG_IGN)  # another library's
            signal.signal(signal.SIGTERM, other)  # ... which puts back what it found: ours
            assert signal.getsignal(signal.SIGTERM) == ours
            signal.raise_signal(signal.SIGTERM)
        assert calls == [signal.SIGTERM]
        assert not pre.received
    finally:
        signal.signal(signal.SIGTERM, old)


@pytest.mark.parametrize("chain", [False, True])
def test_a_signal_unanswered_when_the_block_ends_goes_to_the_handler_found(
    tmp_path: Path, chain: bool
) -> None:
    calls: list[int] = []
    old = signal.signal(signal.SIGTERM, lambda s, f: calls.append(s))
    try:
        with CheckpointManager(tmp_path / "ck") as mgr:
            with Preemption(mgr, grace=GRACE, chain=chain) as pre:
                assert not pre.preempted
                signal.raise_signal(signal.SIGTERM)  # after the step's question
                assert pre.received and calls == ([signal.SIGTERM] if chain else [])
            assert calls == [signal.SIGTERM]  # once: a chained handler saw it already
    finally:
        signal.signal(signal.SIGTERM, old)


STALE = """
import signal, sys
from aiockpt import CheckpointManager, Preemption
with CheckpointManager(sys.argv[1], persistent=False) as mgr:
    if sys.argv[2] == "stale":
        pre = Preemption(mgr)
        with pre:
            other = signal.signal(signal.SIGTERM, lambda s, f: None)
        signal.signal(signal.SIGTERM, other)
        signal.raise_signal(signal.SIGTERM)
    else:
        with Preemption(mgr) as pre:
            assert not pre.preempted
            signal.raise_signal(signal.SIGTERM)
        print("the block ended", flush=True)
print("still alive")
"""


@pytest.mark.parametrize("case", ["stale", "unanswered"])
def test_sigterm_ends_the_process_once_the_preemption_is_gone(tmp_path: Path, case: str) -> None:
    done = subprocess.run(
        [sys.executable, "-c", STALE, str(tmp_path / "ck"), case],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == -signal.SIGTERM, (done.stdout, done.stderr)
    assert "still alive" not in done.stdout and "the block ended" not in done.stdout
    if case == "unanswered":
        assert "SIGTERM came before the block ended and was never answered" in done.stderr
