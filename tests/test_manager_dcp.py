"""Checkpoint managers with ``format="dcp"``: numbered steps in the DCP format, committed by
``.metadata``, retained, rolled back and restored in place (resharded) on real ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest
import torch
import torch.distributed.checkpoint as dcp
from ckpt_helpers import data_file, listing
from dcp_scenarios import global_tensors
from dist_harness import run_ranks, values
from test_dcp import assert_values, plain_state

import aiockpt.dcp
from aiockpt import (
    AsyncCheckpointManager,
    CheckpointManager,
    CheckpointNotFoundError,
    InvalidRequestError,
)


def _state(step: int) -> dict[str, Any]:
    return {"w": torch.arange(6.0) + step, "nested": {"b": torch.full((2, 3), step)}, "n": step}


def _zeroed() -> dict[str, Any]:
    return {"w": torch.zeros(6), "nested": {"b": torch.zeros(2, 3, dtype=torch.int64)}, "n": 0}


def _assert_step(sd: dict[str, Any], step: int) -> None:
    expected = _state(step)
    assert torch.equal(sd["w"], expected["w"])
    assert torch.equal(sd["nested"]["b"], expected["nested"]["b"])
    assert sd["n"] == step


def _steps(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("step-"))


@pytest.mark.parametrize("persistent", [True, False])
def test_blocking_manager_saves_retains_and_restores_in_place(
    tmp_path: Path, persistent: bool
) -> None:
    with CheckpointManager(tmp_path, keep_last=2, format="dcp", persistent=persistent) as mgr:
        for step in (10, 20, 30):
            assert mgr.save(step, _state(step), extra={"lr": step / 100}) == step // 10 - 1
            assert mgr.poll(blocking=True) == [step // 10 - 1]
        assert mgr.committed_steps() == [20, 30]
        assert mgr.latest_step() == 30
        target = _zeroed()
        assert mgr.restore(state_dict=target) is target
        _assert_step(target, 30)
        _assert_step(mgr.restore(20, state_dict=_zeroed()), 20)
        # The structure never changed: one planning, then the plan is reused.
        assert mgr.steps.format.cache.plannings == 1
        assert mgr.steps.format.cache.reuses == 2
    assert _steps(tmp_path) == ["step-000000000020", "step-000000000030"]
    step_dir = tmp_path / "step-000000000030"
    assert {".metadata", ".metadata.checksums", "__0_0.distcp"} <= set(listing(step_dir))
    assert not (step_dir / "metadata.json").exists()
    sidecar = json.loads((step_dir / ".metadata.checksums").read_text())
    assert sidecar["extra"] == {"lr": 0.3, "step": 30}
    # Plain DCP reads it, and aiockpt verifies it.
    plain = _zeroed()
    dcp.load(plain, checkpoint_id=str(step_dir))
    _assert_step(plain, 30)
    checked = aiockpt.dcp.verify_dcp(str(step_dir))
    assert checked == [str(step_dir / ".metadata"), str(data_file(step_dir, "__0_0.distcp"))]


def test_cli_lists_dcp_steps(tmp_path: Path) -> None:
    with CheckpointManager(tmp_path, format="dcp", persistent=False) as mgr:
        mgr.save(5, _state(5))
        mgr.poll(blocking=True)
        mgr.save(6, _state(6))
    out = subprocess.run(
        [sys.executable, "-m", "aiockpt", "ls", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.splitlines()
    rows = [line.split() for line in out[1:]]
    assert [(r[0], r[1], r[2]) for r in rows] == [
        ("step-000000000005", "5", "1"),
        ("step-000000000006", "6", "1"),
    ]


def test_restore_needs_a_state_dict_in_the_dcp_format_only(tmp_path: Path) -> None:
    with CheckpointManager(tmp_path / "d", format="dcp", persistent=False) as mgr:
        with pytest.raises(CheckpointNotFoundError, match="no committed checkpoint"):
            mgr.restore(state_dict=_zeroed())
        mgr.save(1, _state(1))
        mgr.poll(blocking=True)
        with pytest.raises(InvalidRequestError, match=r"loads in place.*restore\(state_dict="):
            mgr.restore()
    with CheckpointManager(tmp_path / "t", persistent=False) as mgr:
        mgr.save(1, _state(1))
        mgr.poll(blocking=True)
        with pytest.raises(InvalidRequestError, match="format='dcp' only"):
            mgr.restore(state_dict=_zeroed())


def test_bad_format_options_are_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequestError, match="format must be one of"):
        CheckpointManager(tmp_path, format="safetensors")
    with pytest.raises(InvalidRequestError, match=r"\['thread_count'\] apply to format='dcp'"):
        CheckpointManager(tmp_path, thread_count=4)

    with pytest.raises(
        InvalidRequestError, match="takes format='torch' only"
    ):
        CheckpointManager(tmp_path, format="dcp", storage=object())  # type: ignore[arg-type]


@pytest.mark.parametrize(("first", "second"), [("torch", "dcp"), ("dcp", "torch")])
def test_a_directory_of_the_other_format_is_refused_and_kept(
    tmp_path: Path, first: str, second: str
) -> None:
    """Opened in the other format, a committed step must not pass for a failed save (which
    retention deletes): the manager refuses the directory."""
    with CheckpointManager(tmp_path, format=first, persistent=False) as mgr:
        mgr.save(1, _state(1))
    before = sorted(os.listdir(tmp_path / "step-000000000001"))
    with pytest.raises(InvalidRequestError, match=f"holds checkpoints in the '{first}' format"):
        CheckpointManager(tmp_path, keep_last=1, format=second)
    assert sorted(os.listdir(tmp_path / "step-000000000001")) == before
    # The lock was released: the right format opens it.
    with CheckpointManager(tmp_path, format=first, persistent=False) as mgr:
        assert mgr.committed_steps() == [1]


def test_rollback_uncommits_dcp_steps_first(tmp_path: Path) -> None:
    with CheckpointManager(tmp_path, format="dcp", persistent=False) as mgr:
        for step in (1, 2, 3):
            mgr.save(step, _state(step))
            mgr.poll(blocking=True)
        with pytest.raises(InvalidRequestError, match="saves must go forward"):
            mgr.save(2, _state(2))
        assert mgr.rollback(1) == [2, 3]
        assert mgr.committed_steps() == [1]
        mgr.save(2, _state(22))
        mgr.poll(blocking=True)
        _assert_step(mgr.restore(state_dict=_zeroed()), 22)
    assert _steps(tmp_path) == ["step-000000000001", "step-000000000002"]


def test_async_manager_concurrent_saves_commit_in_call_order(tmp_path: Path) -> None:
    order: list[int] = []

    async def main() -> None:
        async with AsyncCheckpointManager(tmp_path, keep_last=3, format="dcp") as mgr:

            async def save(step: int) -> None:
                fut = await mgr.save(step, _state(step), wait_for_staging=step % 2 == 0)
                order.append((await fut).call_idx)

            async with anyio.create_task_group() as tg:
                for step in (1, 2, 3, 4):
                    tg.start_soon(save, step)
                    await anyio.sleep(0)  # let each task take its turn at the lock
            assert await mgr.acommitted_steps() == [2, 3, 4]
            target = _zeroed()
            assert await mgr.restore(state_dict=target) is target
            _assert_step(target, 4)
            _assert_step(await mgr.restore(3, state_dict=_zeroed()), 3)

    anyio.run(main)
    assert sorted(order) == [0, 1, 2, 3]


def test_async_manager_cancelled_while_planning_releases_the_step(tmp_path: Path) -> None:
    async def main() -> None:
        async with AsyncCheckpointManager(tmp_path, format="dcp") as mgr:
            with anyio.CancelScope() as scope:
                scope.cancel()
                await mgr.save(1, _state(1))
            assert scope.cancelled_caught
            # Nothing was scheduled for step 1, and it can be saved now.
            await (await mgr.save(1, _state(1)))
            assert await mgr.acommitted_steps() == [1]

    anyio.run(main)


@pytest.mark.parametrize("mode", ["blocking", "async"])
def test_two_ranks_manager_steps_load_resharded_in_one_process(tmp_path: Path, mode: str) -> None:
    out = values(run_ranks("dcp_manager_scenarios:manager_steps", 2, str(tmp_path), mode=mode))
    for o in out:
        assert o["finalized"] == [0, 1, 2], o
        assert o["committed"] == [2, 3]
        assert o["mismatches"] == []
        assert o["plannings"] == 1
    ckpts = tmp_path / "ckpts"
    assert _steps(ckpts) == ["step-000000000002", "step-000000000003"]
    step3 = ckpts / "step-000000000003"
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata"} <= set(listing(step3))
    for loader in ("dcp", "aiockpt"):
        state = plain_state()
        if loader == "dcp":
            dcp.load(state, checkpoint_id=str(step3))
        else:
            aiockpt.dcp.load(state, step3)
        assert_values(state, 3)
    assert torch.equal(state["model"]["row"], global_tensors(3)["row"])


def test_two_ranks_killed_worker_commits_nothing_and_the_manager_goes_on(tmp_path: Path) -> None:
    out = values(
        run_ranks("dcp_manager_scenarios:manager_worker_killed", 2, str(tmp_path), timeout=110)
    )
    for o in out:
        assert o["error"] == "DistributedCheckpointError", o
        assert o["failed_ranks"] == (1,)
        assert o["step2_metadata"] is False
        assert o["committed_after_kill"] == [1]
        assert o["restored"] == []
        assert o["committed"] == [1, 3]
    # The failed step's leftovers are deleted once a newer step commits.
    assert out[0]["listing"] == ["step-000000000001", "step-000000000003"]


def test_two_ranks_one_rank_failing_after_the_plan_fails_every_rank(tmp_path: Path) -> None:
    """Ranks agree on a plan, then one cannot serialize its data: it raises at once, the
    others' saves fail at completion (its idle manager takes part), nothing commits, and
    the next step commits on every rank: call numbers stayed aligned."""
    out = values(
        run_ranks("dcp_manager_scenarios:manager_rank_fails_after_planning", 2, str(tmp_path))
    )
    assert out[1]["step2"] == "StagingError"
    assert "refuses to be pickled" in out[1]["step2_message"]
    assert "on rank 1" in out[1]["step2_message"]
    assert out[0]["step2"] == "DistributedCheckpointError"
    assert out[0]["failed_ranks"] == (1,)
    assert "refuses to be pickled" in out[0]["step2_message"]
    for o in out:
        assert o["step2_metadata"] is False
        assert o["committed"] == [1, 3]
        assert o["restored"] == []


def test_two_ranks_planner_failing_on_a_reused_plan_fails_every_rank(tmp_path: Path) -> None:
    out = values(
        run_ranks("dcp_manager_scenarios:blocking_manager_planner_fails_on_reuse", 2, str(tmp_path))
    )
    assert out[0]["save2"] == 1
    assert out[1]["save2"].startswith("StagingError: ")
    assert "the planner failed on the last rank" in out[1]["save2"]
    assert out[0]["errors"] == [("DistributedCheckpointError", 1)]
    assert out[1]["errors"] == []  # raised at the save already: not raised twice
    for o in out:
        assert o["step3"] == [2]
        assert o["committed"] == [1, 3]


def test_a_step_that_is_a_link_is_never_written_through(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    with CheckpointManager(outside, format="dcp", persistent=False) as mgr:
        mgr.save(1, _state(7))
    before = {p.name: p.read_bytes() for p in (outside / "step-000000000001").iterdir()}
    managed = tmp_path / "managed"
    managed.mkdir()
    (managed / "step-000000000005").symlink_to(outside / "step-000000000001")
    with CheckpointManager(managed, format="dcp", persistent=False) as mgr:
        with pytest.raises(aiockpt.UntrustedEntryError, match="is a symlink"):
            mgr.save(5, _state(5))
        mgr.save(6, _state(6))  # nothing was scheduled for step 5; the manager goes on
        assert mgr.poll(blocking=True) == [0]
    after = {p.name: p.read_bytes() for p in (outside / "step-000000000001").iterdir()}
    assert after == before


class _NoPickle:
    def __reduce__(self) -> Any:
        raise TypeError("this object refuses to be pickled")


def test_unserializable_item_or_unpreparable_directory_is_a_typed_error(tmp_path: Path) -> None:
    with CheckpointManager(tmp_path, format="dcp", persistent=False) as mgr:
        with pytest.raises(aiockpt.StagingError, match="refuses to be pickled") as info:
            mgr.save(1, {"w": torch.ones(2), "obj": _NoPickle()})
        assert info.value.call_idx == 0 and info.value.rank == 0
        (tmp_path / "step-000000000002" / ".metadata.checksums" / "x").mkdir(parents=True)
        with pytest.raises(aiockpt.StagingError, match=r"cannot prepare .* for a new save"):
            mgr.save(2, _state(2))
        assert mgr.save(1, _state(1)) == 2  # both steps were released
        assert mgr.poll(blocking=True) == [2]
        assert mgr.committed_steps() == [1]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda s: s["files"][0].pop("nbytes"), "malformed file record"),
        (lambda s: s["files"].__setitem__(0, "__0_0.distcp"), "malformed file record"),
        (lambda s: s.pop("world_size"), "records no world size"),
        (lambda s: s["metadata"].pop("xxh3_64"), "malformed file record"),
    ],
)
def test_an_edited_sidecar_is_corrupt_for_restore_and_ls(
    tmp_path: Path, edit: Any, message: str
) -> None:
    with CheckpointManager(tmp_path, format="dcp", persistent=False) as mgr:
        mgr.save(1, _state(1))
    sidecar_path = tmp_path / "step-000000000001" / ".metadata.checksums"
    sidecar = json.loads(sidecar_path.read_text())
    edit(sidecar)
    sidecar_path.write_text(json.dumps(sidecar))
    with (
        CheckpointManager(tmp_path, format="dcp", persistent=False) as mgr,
        pytest.raises(aiockpt.CorruptCheckpointError, match=message),
    ):
        mgr.restore(state_dict=_zeroed())
    listing = subprocess.run(
        [sys.executable, "-m", "aiockpt", "ls", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert listing.returncode == 0, listing.stderr
    assert "step-000000000001         BAD: " in listing.stdout
    assert message in listing.stdout


def test_restore_into_a_state_dict_that_does_not_fit_is_a_typed_error(tmp_path: Path) -> None:
    with CheckpointManager(tmp_path, format="dcp", persistent=False) as mgr:
        mgr.save(1, _state(1))
        mgr.poll(blocking=True)
        with pytest.raises(InvalidRequestError, match=r"failed on rank 0: RuntimeError: Missing"):
            mgr.restore(state_dict={**_zeroed(), "extra": torch.zeros(1)})
        with pytest.raises(InvalidRequestError, match="ValueError: Size mismatch"):
            mgr.restore(state_dict={**_zeroed(), "w": torch.zeros(7)})


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_a_save_cancelled_while_waiting_for_room_still_runs_and_settles(
    tmp_path: Path, backend: str
) -> None:
    """Once begun (planned: every rank plans), a save is scheduled even if cancelled, so
    that every rank numbers its calls alike; its step is released when it settles."""

    async def main() -> None:
        async with AsyncCheckpointManager(tmp_path, format="dcp", max_pending=1) as mgr:
            fut1 = await mgr.save(1, {"w": torch.ones(2**22)})
            with anyio.CancelScope() as scope:

                async def cancel_once_begun() -> None:
                    while 2 not in mgr.steps._in_flight:  # reserved: save(2) has begun
                        await anyio.sleep(0.001)
                    scope.cancel()

                async with anyio.create_task_group() as tg:
                    tg.start_soon(cancel_once_begun)
                    await mgr.save(2, _state(2))  # waits for room behind save(1)
            assert scope.cancelled_caught
            await fut1
            await mgr.queue.finalize()
            assert await mgr.acommitted_steps() == [1, 2]
            assert mgr.steps._in_flight == set()
            assert await mgr.rollback(1) == [2]

    anyio.run(main, backend=backend)


def test_a_step_whose_sidecar_was_removed_is_not_committed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Step 2 has its .metadata and data but lost its checksum sidecar, and its data file was
    replaced (by step 1's: same layout, other values): nothing can tell. The manager does not
    count it, restores the newest step it can check, and says what is wrong with step 2."""
    with CheckpointManager(tmp_path, format="dcp", persistent=False) as mgr:
        for step in (1, 2):
            mgr.save(step, _state(step))
            mgr.poll(blocking=True)
    two = tmp_path / "step-000000000002"
    (two / ".metadata.checksums").unlink()
    data_file(two, "__0_0.distcp").write_bytes(
        data_file(tmp_path / "step-000000000001", "__0_0.distcp").read_bytes()
    )

    def assert_refused(err: aiockpt.CorruptCheckpointError) -> None:
        assert err.path == str(two)
        for needle in (
            "step 2 in",
            "is not a committed checkpoint",
            "has .metadata but no .metadata.checksums",
            "committed: [1]",
            f"aiockpt.dcp.load(state_dict, {str(two)!r})",
        ):
            assert needle in str(err), str(err)

    with CheckpointManager(tmp_path, keep_last=1, format="dcp", persistent=False) as mgr:
        assert mgr.committed_steps() == [1] and mgr.latest_step() == 1
        found = mgr.steps.scan()
        assert [step for step, _ in found.damaged] == [2] and found.partial == []
        with pytest.raises(aiockpt.CorruptCheckpointError) as info:
            mgr.restore(2, state_dict=_zeroed())
        assert_refused(info.value)
        with caplog.at_level("WARNING", logger="aiockpt"):
            _assert_step(mgr.restore(state_dict=_zeroed()), 1)
        assert "step 2" in caplog.text and ".metadata.checksums" in caplog.text
    listing = subprocess.run(
        [sys.executable, "-m", "aiockpt", "ls", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    (row,) = [line for line in listing.stdout.splitlines() if line.startswith(two.name)]
    assert "BAD: " in row and "without .metadata.checksums" in row

    async def restore_async() -> None:
        async with AsyncCheckpointManager(tmp_path, keep_last=1, format="dcp") as mgr:
            assert await mgr.acommitted_steps() == [1]
            with pytest.raises(aiockpt.CorruptCheckpointError) as info:
                await mgr.restore(2, state_dict=_zeroed())
            assert_refused(info.value)
            # Retention leaves it for you to look at; a rollback below it deletes it.
            await (await mgr.save(3, _state(3)))
            assert _steps(tmp_path) == ["step-000000000002", "step-000000000003"]
            assert await mgr.rollback(1, force=True) == [2, 3]

    anyio.run(restore_async)
    assert _steps(tmp_path) == []


def test_a_step_holding_a_marker_is_never_replaced_by_a_save(tmp_path: Path) -> None:
    # A damaged step (its sidecar gone) and a step another manager committed (lock=False)
    # both hold .metadata: a save of that step is refused, and their files stay. Before,
    # the save deleted them and wrote its own.
    with CheckpointManager(tmp_path / "a", format="dcp", persistent=False) as mgr:
        for step in (1, 2):
            mgr.save(step, _state(step))
            mgr.poll(blocking=True)
    two = tmp_path / "a" / "step-000000000002"
    (two / ".metadata.checksums").unlink()
    before = sorted(os.listdir(two))
    with CheckpointManager(tmp_path / "a", format="dcp", persistent=False) as mgr:
        assert mgr.committed_steps() == [1]
        with pytest.raises(InvalidRequestError, match=r"already holds a checkpoint's \.metadata"):
            mgr.save(2, _state(20))
        assert sorted(os.listdir(two)) == before

    first = CheckpointManager(tmp_path / "b", format="dcp", persistent=False, lock=False)
    second = CheckpointManager(tmp_path / "b", format="dcp", persistent=False, lock=False)
    try:
        first.save(1, _state(1))
        first.poll(blocking=True)
        with pytest.raises(InvalidRequestError, match="never replaced by a save"):
            second.save(1, _state(10))
        _assert_step(first.restore(state_dict=_zeroed()), 1)
    finally:
        first.close()
        second.close()


def test_a_sidecar_with_a_bad_world_size_or_extra_is_corrupt(tmp_path: Path) -> None:
    with CheckpointManager(tmp_path, format="dcp", persistent=False) as mgr:
        mgr.save(1, _state(1))
        mgr.poll(blocking=True)
    step = tmp_path / "step-000000000001"
    sidecar = json.loads((step / ".metadata.checksums").read_text())
    for edit, message in (
        (("world_size", -7), "records a world size of -7"),
        (("extra", [1]), "is not an object"),
    ):
        bad = dict(sidecar)
        bad[edit[0]] = edit[1]
        (step / ".metadata.checksums").write_text(json.dumps(bad))
        with pytest.raises(aiockpt.CorruptCheckpointError, match=message):
            aiockpt.dcp.verify_dcp(str(step))
