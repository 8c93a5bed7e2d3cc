"""DCP-format checkpoints: saved by aiockpt's engine on real gloo ranks, loaded by
``dcp.load`` and ``aiockpt.dcp.load`` at other world sizes; failures commit nothing."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from ckpt_helpers import data_file, listing, plain
from dcp_scenarios import global_tensors
from dist_harness import run_ranks, run_torchrun, values

import aiockpt.dcp
from aiockpt import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    InvalidRequestError,
    UnsafeCheckpointError,
)

ROOT = Path(__file__).resolve().parent.parent


def plain_state() -> dict[str, Any]:
    """Zeroed plain tensors with the checkpoint's structure: a one-process load."""
    g = global_tensors()
    return {
        "model": {k: torch.zeros_like(g[k]) for k in ("row", "uneven", "rep")},
        "plain": torch.zeros_like(g["plain"]),
        "step": 0,
    }


def assert_values(state: dict[str, Any], offset: float) -> None:
    g = global_tensors(offset)
    for name in ("row", "uneven", "rep"):
        assert torch.equal(state["model"][name], g[name]), name
    assert torch.equal(state["plain"], g["plain"])
    assert state["step"] == 7 + int(offset)


def load_one_process(path: Path, loader: str) -> dict[str, Any]:
    state = plain_state()
    if loader == "dcp":
        dcp.load(state, checkpoint_id=str(path))
    else:
        aiockpt.dcp.load(state, path)
    return state


@pytest.fixture(scope="module")
def saved_at_4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two DTensor checkpoints saved at 4 ranks with lazy staging (offsets 0 and 1)."""
    tmp = tmp_path_factory.mktemp("dcp4")
    out = values(run_ranks("dcp_scenarios:dtensor_save", 4, str(tmp), timeout=110, mode="lazy"))
    for o in out:
        assert o["finalized"] == [0, 1]
        assert (o["plannings"], o["reuses"]) == (1, 1)  # the second save ran no planning
    return tmp


@pytest.mark.timeout(240)
@pytest.mark.parametrize("loader", ["dcp", "aiockpt"])
def test_saved_at_4_ranks_loads_at_2_ranks_resharded(saved_at_4: Path, loader: str) -> None:
    for name, offset in (("ckpt-a", 0), ("ckpt-b", 1)):
        out = values(
            run_ranks(
                "dcp_scenarios:dtensor_load",
                2,
                str(saved_at_4),
                name=name,
                offset=offset,
                loader=loader,
            )
        )
        assert out == [[], []]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("loader", ["dcp", "aiockpt"])
def test_saved_at_4_ranks_loads_in_one_process(saved_at_4: Path, loader: str) -> None:
    assert_values(load_one_process(saved_at_4 / "ckpt-a", loader), 0)
    assert_values(load_one_process(saved_at_4 / "ckpt-b", loader), 1)


@pytest.mark.timeout(240)
def test_layout_is_dcp_files_then_metadata_and_checksums(saved_at_4: Path) -> None:
    names = listing(saved_at_4 / "ckpt-a")
    assert names == [".metadata", ".metadata.checksums"] + [f"__{r}_0.distcp" for r in range(4)]
    sidecar = json.loads((saved_at_4 / "ckpt-a" / ".metadata.checksums").read_text())
    assert sidecar["world_size"] == 4
    assert sorted(plain(f["name"]) for f in sidecar["files"]) == [
        f"__{r}_0.distcp" for r in range(4)
    ]
    checked = aiockpt.dcp.verify_dcp(str(saved_at_4 / "ckpt-a"))
    assert len(checked) == 5


@pytest.mark.parametrize("mode", ["blocking", "async"])
def test_two_ranks_save_and_load_back(tmp_path: Path, mode: str) -> None:
    out = values(run_ranks("dcp_scenarios:dtensor_save", 2, str(tmp_path), mode=mode))
    assert all(o["finalized"] == [0, 1] and (o["plannings"], o["reuses"]) == (1, 1) for o in out)
    if mode == "blocking":  # thread_count=2: two files per rank
        assert sorted(plain(p.name) for p in (tmp_path / "ckpt-a").glob("*.distcp")) == [
            "__0_0.distcp",
            "__0_1.distcp",
            "__1_0.distcp",
            "__1_1.distcp",
        ]
    assert_values(load_one_process(tmp_path / "ckpt-a", "aiockpt"), 0)
    assert_values(load_one_process(tmp_path / "ckpt-b", "dcp"), 1)


@pytest.mark.timeout(240)
def test_fsdp2_model_and_optimizer_saved_at_4_load_at_2(tmp_path: Path) -> None:
    saved = values(run_ranks("dcp_scenarios:fsdp_save", 4, str(tmp_path), timeout=110))
    assert all(o["finalized"] == [0] and o["types"] == ["DTensor"] for o in saved)
    for loader in ("dcp", "aiockpt"):
        out = values(run_ranks("dcp_scenarios:fsdp_load", 2, str(tmp_path), loader=loader))
        assert out == [[], []], loader
    # One process, plain module: the model's weights alone.
    expected = torch.load(tmp_path / "expected.pt", weights_only=True)["model"]
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    state = {"model": model.state_dict()}
    aiockpt.dcp.load(state, tmp_path / "fsdp")
    for name, value in expected.items():
        assert torch.equal(state["model"][name], value), name


@pytest.mark.parametrize("world", [2, 4])
def test_killed_worker_commits_nothing_and_previous_checkpoint_loads(
    tmp_path: Path, world: int
) -> None:
    out = values(run_ranks("dcp_scenarios:worker_killed", world, str(tmp_path), timeout=110))
    for rank, o in enumerate(out):
        assert o["error"] == "DistributedCheckpointError", o
        assert o["failed_ranks"] == (world - 1,)
        assert o["cause"] == ("WorkerCrashedError" if rank == world - 1 else None)
        assert o["bad_metadata"] is False
    assert "SIGKILL" in out[-1]["message"] or "failed on rank(s)" in out[-1]["message"]
    assert not (tmp_path / "bad" / ".metadata").exists()
    # Every other rank's data files are there, durable but uncommitted.
    assert data_file(tmp_path / "bad", "__0_0.distcp").exists()
    with pytest.raises(CheckpointNotFoundError, match="no committed DCP checkpoint"):
        aiockpt.dcp.load(plain_state(), tmp_path / "bad")
    assert_values(load_one_process(tmp_path / "good", "aiockpt"), 0)
    assert_values(load_one_process(tmp_path / "good", "dcp"), 0)
    assert_values(load_one_process(tmp_path / "after", "aiockpt"), 2)


def test_failing_rank_fails_every_rank_and_commits_nothing(tmp_path: Path) -> None:
    out = values(run_ranks("dcp_scenarios:rank_fails", 2, str(tmp_path)))
    for o in out:
        assert o["error"] == "DistributedCheckpointError", o
        assert o["failed_ranks"] == (1,) and o["call_idx"] == 0
        assert "failed on rank(s) [1]" in o["message"]
        assert o["bad_metadata"] is False
        assert o["after"] == [1]
    assert_values(load_one_process(tmp_path / "after", "dcp"), 2)


def test_save_at_2_ranks_over_a_4_rank_checkpoint(saved_at_4: Path, tmp_path: Path) -> None:
    """Reusing a directory at another world size: the new .metadata names only the new
    files, and the old marker is gone before any file is replaced."""
    target = tmp_path / "ckpt-a"
    for name in os.listdir(saved_at_4 / "ckpt-a"):
        (target).mkdir(exist_ok=True)
        (target / name).write_bytes((saved_at_4 / "ckpt-a" / name).read_bytes())
    values(run_ranks("dcp_scenarios:dtensor_save", 2, str(tmp_path), mode="async"))
    assert_values(load_one_process(target, "aiockpt"), 0)
    assert_values(load_one_process(tmp_path / "ckpt-b", "dcp"), 1)
    sidecar = json.loads((target / ".metadata.checksums").read_text())
    assert sidecar["world_size"] == 2
    assert "__3_0.distcp" in listing(target)  # left over, not referenced


# -- reading foreign and hostile checkpoints -----------------------------------------------


def test_reads_a_checkpoint_written_by_dcp_save(tmp_path: Path) -> None:
    g = global_tensors(3)
    dcp.save(
        {"model": {k: g[k] for k in ("row", "uneven", "rep")}, "plain": g["plain"], "step": 10},
        checkpoint_id=tmp_path / "foreign",
    )
    assert_values(load_one_process(tmp_path / "foreign", "aiockpt"), 3)
    with pytest.raises(CorruptCheckpointError, match=r"has no \.metadata\.checksums"):
        aiockpt.dcp.load(plain_state(), tmp_path / "foreign", require_checksums=True)


class _RunsCode:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> Any:
        return (open, (self.marker, "w"))


def _save_one_process(path: Path, offset: float = 0) -> None:
    g = global_tensors(offset)
    ckpt = aiockpt.dcp.DCPCheckpoint(persistent=False)
    ckpt.async_save(
        {
            "model": {k: g[k] for k in ("row", "uneven", "rep")},
            "plain": g["plain"],
            "step": 7 + int(offset),
        },
        path,
    )
    assert ckpt.finalize_async_save(blocking=True, terminate=True) == [0]


def _rewrite_checksums(path: Path, name: str, data: bytes) -> None:
    import xxhash

    sidecar = json.loads((path / ".metadata.checksums").read_text())
    record = {"nbytes": len(data), "xxh3_64": xxhash.xxh3_64_hexdigest(data)}
    if name == ".metadata":
        sidecar["metadata"].update(record)
    else:
        next(f for f in sidecar["files"] if f["name"] == name).update(record)
    (path / ".metadata.checksums").write_text(json.dumps(sidecar))


@pytest.mark.parametrize("with_checksums", [True, False])
def test_hostile_metadata_pickle_is_refused(tmp_path: Path, with_checksums: bool) -> None:
    ckpt = tmp_path / "ckpt"
    _save_one_process(ckpt)
    marker = tmp_path / "pwned"
    hostile = pickle.dumps(_RunsCode(str(marker)))
    (ckpt / ".metadata").write_bytes(hostile)
    if with_checksums:  # an attacker who also rewrites the checksums gets no further
        _rewrite_checksums(ckpt, ".metadata", hostile)
    else:
        (ckpt / ".metadata.checksums").unlink()
    with pytest.raises(UnsafeCheckpointError, match=r"io\.open is not a DCP metadata class"):
        aiockpt.dcp.load(plain_state(), ckpt)
    assert not marker.exists()


def test_tampered_metadata_or_data_file_is_corrupt(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    _save_one_process(ckpt)
    meta = (ckpt / ".metadata").read_bytes()
    (ckpt / ".metadata").write_bytes(meta[:-1] + bytes([meta[-1] ^ 1]))
    with pytest.raises(CorruptCheckpointError, match=r"\.metadata' is corrupt"):
        aiockpt.dcp.load(plain_state(), ckpt)
    (ckpt / ".metadata").write_bytes(meta)
    shard = data_file(ckpt, "__0_0.distcp")
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match=f"{shard.name}' is corrupt") as info:
        aiockpt.dcp.load(plain_state(), ckpt)
    assert info.value.path == str(shard)
    with pytest.raises(CorruptCheckpointError, match="is corrupt"):
        aiockpt.dcp.verify_dcp(str(ckpt))


def test_object_items_load_with_weights_only(tmp_path: Path) -> None:
    """An object item that is not plain data is refused, not unpickled."""
    import fractions

    ckpt = tmp_path / "ckpt"
    dcp.save({"obj": fractions.Fraction(1, 3), "t": torch.ones(2)}, checkpoint_id=ckpt)
    with pytest.raises(UnsafeCheckpointError, match="refusing to unpickle item 'obj'"):
        aiockpt.dcp.load({"obj": 0, "t": torch.zeros(2)}, ckpt)


def test_torchrun_example(tmp_path: Path) -> None:
    out = run_torchrun(
        "examples/torchrun_dcp.py",
        "--out",
        str(tmp_path),
        "--steps",
        "9",
        "--every",
        "3",
        timeout=150,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    steps = sorted(p.name for p in tmp_path.iterdir())
    assert steps == ["step000003", "step000006", "step000009"]
    for step in steps:
        aiockpt.dcp.verify_dcp(str(tmp_path / step))
    assert "rank 0: committed" in out.stdout and "resumed from step 9: ok" in out.stdout


def test_nvrx_names_on_the_blocking_queue(tmp_path: Path) -> None:
    out = values(run_ranks("dcp_scenarios:nvrx_flow", 2, str(tmp_path)))
    for o in out:
        assert o["finalized"] == [0, 1] and o["order"] == [0, 1]
        assert (o["plannings"], o["reuses"]) == (1, 1)
        assert o["leftovers"] == []
    assert_values(load_one_process(tmp_path / "nvrx-a", "dcp"), 0)
    assert_values(load_one_process(tmp_path / "nvrx-b", "aiockpt"), 1)
    aiockpt.dcp.verify_dcp(str(tmp_path / "nvrx-b"))


def test_cli_verify_checks_a_dcp_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from aiockpt._cli._main import main

    ckpt = tmp_path / "ckpt"
    _save_one_process(ckpt)
    assert main(["verify", str(ckpt)]) == 0
    assert "2 file(s) match their checksums" in capsys.readouterr().out
    shard = data_file(ckpt, "__0_0.distcp")
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    assert main(["verify", str(ckpt)]) == 1
    assert f"{shard.name}' is corrupt" in capsys.readouterr().err


def test_public_names() -> None:
    public = {n for n in dir(aiockpt.dcp) if not n.startswith("_")} - {"annotations"}
    # The NVRx-era name stays importable (it warns) but is not advertised.
    assert set(aiockpt.dcp.__all__) == public - {"DCPAsyncCheckpoint"}
    assert issubclass(aiockpt.dcp.DCPAsyncCheckpoint, aiockpt.dcp.DCPCheckpoint)


class CountingPlanner(torch.distributed.checkpoint.DefaultSavePlanner):
    """A user planner: DCP's default, counting its local plans."""

    made = 0

    def create_local_plan(self) -> Any:
        CountingPlanner.made += 1
        return super().create_local_plan()


class BrokenPlanner(torch.distributed.checkpoint.DefaultSavePlanner):
    def create_local_plan(self) -> Any:
        raise ValueError("no plan today")


def test_plan_is_reused_until_the_structure_changes(tmp_path: Path) -> None:
    ckpt = aiockpt.dcp.DCPCheckpoint(persistent=False, planner=CountingPlanner())
    CountingPlanner.made = 0
    a = {"w": torch.ones(4, 4), "step": 1}
    ckpt.async_save(a, tmp_path / "a")
    ckpt.async_save({"w": torch.full((4, 4), 2.0), "step": 2}, tmp_path / "b")
    assert ckpt.plan_cache is not None
    assert (ckpt.plan_cache.plannings, ckpt.plan_cache.reuses) == (1, 1)
    # A new key and a new dtype: planned again, and the checkpoint has them.
    changed = {"w": torch.ones(4, 4, dtype=torch.float64), "extra": torch.arange(3), "step": 3}
    ckpt.async_save(changed, tmp_path / "c")
    assert ckpt.finalize_async_save(blocking=True, terminate=True) == [0, 1, 2]
    assert (ckpt.plan_cache.plannings, ckpt.plan_cache.reuses) == (2, 1)
    assert CountingPlanner.made == 4  # every save makes its local plan; one is made twice
    out = {"w": torch.zeros(4, 4, dtype=torch.float64), "extra": torch.zeros(3, dtype=torch.long)}
    out["step"] = 0
    aiockpt.dcp.load(out, tmp_path / "c")
    assert torch.equal(out["extra"], torch.arange(3)) and out["w"].dtype == torch.float64
    assert out["step"] == 3
    b = {"w": torch.zeros(4, 4), "step": 0}
    aiockpt.dcp.load(b, tmp_path / "b")
    assert torch.equal(b["w"], torch.full((4, 4), 2.0)) and b["step"] == 2


def test_planning_failure_schedules_nothing(tmp_path: Path) -> None:
    ckpt = aiockpt.dcp.DCPCheckpoint(persistent=False, planner=BrokenPlanner())
    with pytest.raises(InvalidRequestError, match=r"failed on rank\(s\) \[0\]: ValueError"):
        ckpt.async_save({"w": torch.ones(2)}, tmp_path / "x")
    assert ckpt.queue.get_num_unfinalized_calls() == 0
    with pytest.raises(InvalidRequestError, match="saves a dict of state, not list"):
        ckpt.async_save([torch.ones(2)], tmp_path / "y")  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError, match="checkpoint_id must be a directory path"):
        ckpt.async_save({"w": torch.ones(2)}, 42)
    ckpt.close()


def test_dcp_save_request_on_a_plain_queue(tmp_path: Path) -> None:
    """What a checkpoint manager builds on: the request, its extra and its after_commit."""
    from aiockpt import CheckpointQueue

    committed: list[str] = []
    with CheckpointQueue(persistent=False) as queue:
        request = aiockpt.dcp.dcp_save_request(
            {"w": torch.arange(6.0)},
            tmp_path / "step-1",
            queue._engine.completion,
            extra={"step": 1},
            after_commit=lambda: committed.append("pruned"),
        )
        queue.schedule_async_request(request, needs_global=True)
        assert queue.maybe_finalize_async_calls(blocking=True) == [0]
    assert committed == ["pruned"]
    sidecar = json.loads((tmp_path / "step-1" / ".metadata.checksums").read_text())
    assert sidecar["extra"] == {"step": 1}
    out = {"w": torch.zeros(6)}
    dcp.load(out, checkpoint_id=str(tmp_path / "step-1"))
    assert torch.equal(out["w"], torch.arange(6.0))


def test_metadata_naming_a_file_outside_the_checkpoint_is_refused(tmp_path: Path) -> None:
    """A well-formed .metadata whose storage points at ../secret: nothing is read there."""
    from aiockpt.dcp._meta import unpickle_metadata

    ckpt = tmp_path / "ckpt"
    _save_one_process(ckpt)
    (tmp_path / "secret").write_bytes(b"not yours")
    meta = unpickle_metadata((ckpt / ".metadata").read_bytes(), str(ckpt / ".metadata"))
    for info in meta.storage_data.values():
        info.relative_path = "../secret"
    hostile = pickle.dumps(meta)
    (ckpt / ".metadata").write_bytes(hostile)
    (ckpt / ".metadata.checksums").unlink()
    with pytest.raises(CorruptCheckpointError, match="would leave the checkpoint directory"):
        aiockpt.dcp.load(plain_state(), ckpt)


def test_concurrent_saves_plan_in_turn_with_a_shared_planner(tmp_path: Path) -> None:
    """Tasks that save at once share the planner and the cache: each checkpoint still
    holds its own values, and they finalize in call order."""
    import anyio

    async def main() -> list[int]:
        async with aiockpt.dcp.AsyncDCPCheckpoint(planner=CountingPlanner()) as ckpt:
            futs: dict[int, Any] = {}

            async def save(i: int) -> None:
                futs[i] = await ckpt.save({"w": torch.full((64, 64), float(i))}, tmp_path / f"c{i}")

            async with anyio.create_task_group() as tg:
                for i in range(4):
                    tg.start_soon(save, i)
            results = await ckpt.finalize()
            assert sorted(futs[i].call_idx for i in range(4)) == [r.call_idx for r in results]
            return [futs[i].call_idx for i in range(4)]

    idxs = anyio.run(main)
    assert sorted(idxs) == [0, 1, 2, 3]
    for i in range(4):
        out = {"w": torch.zeros(64, 64)}
        aiockpt.dcp.load(out, tmp_path / f"c{i}")
        assert torch.equal(out["w"], torch.full((64, 64), float(i))), i


def test_second_save_into_a_directory_in_flight_is_refused(tmp_path: Path) -> None:
    ckpt = aiockpt.dcp.DCPCheckpoint(persistent=False)
    ckpt.async_save({"w": torch.ones(3)}, tmp_path / "x")
    with pytest.raises(InvalidRequestError, match="is still in flight"):
        ckpt.async_save({"w": torch.full((3,), 2.0)}, tmp_path / "x" / ".." / "x")
    ckpt.async_save({"w": torch.full((3,), 3.0)}, tmp_path / "y")  # elsewhere: fine
    assert ckpt.finalize_async_save(blocking=True) == [0, 1]
    assert ckpt.finalize_async_save(blocking=True) == []
    ckpt.async_save({"w": torch.full((3,), 4.0)}, tmp_path / "x")  # committed: may rewrite
    assert ckpt.finalize_async_save(blocking=True, terminate=True) == [2]
    out = {"w": torch.zeros(3)}
    aiockpt.dcp.load(out, tmp_path / "x")
    assert torch.equal(out["w"], torch.full((3,), 4.0))

    async def main() -> None:
        async with aiockpt.dcp.AsyncDCPCheckpoint() as ackpt:
            fut = await ackpt.save({"w": torch.ones(3)}, tmp_path / "z")
            with pytest.raises(InvalidRequestError, match="is still in flight"):
                await ackpt.save({"w": torch.ones(3)}, tmp_path / "z")
            await fut
            await (await ackpt.save({"w": torch.ones(3)}, tmp_path / "z"))

    import anyio

    anyio.run(main)


def test_commit_failures_are_reported_for_what_they_are(tmp_path: Path) -> None:
    from aiockpt import CheckpointQueue, FinalizeError

    def boom() -> None:
        raise RuntimeError("retention broke")

    with CheckpointQueue(persistent=False) as queue:
        completion = queue._engine.completion
        request = aiockpt.dcp.dcp_save_request({"w": torch.ones(2)}, tmp_path / "a", completion)
        queue.schedule_async_request(request, needs_global=True)
        (tmp_path / "a" / ".metadata").mkdir()  # the marker cannot be written
        with pytest.raises(FinalizeError, match="could not commit the checkpoint") as info:
            queue.maybe_finalize_async_calls(blocking=True)
        assert "it has no .metadata" in str(info.value.__cause__)
        request = aiockpt.dcp.dcp_save_request(
            {"w": torch.ones(2)}, tmp_path / "b", completion, after_commit=boom
        )
        queue.schedule_async_request(request, needs_global=True)
        with pytest.raises(FinalizeError, match="is committed, but the step after"):
            queue.maybe_finalize_async_calls(blocking=True)
    out = {"w": torch.zeros(2)}
    aiockpt.dcp.load(out, tmp_path / "b")
    assert torch.equal(out["w"], torch.ones(2))


@pytest.mark.parametrize("loader", ["dcp", "aiockpt"])
def test_sharded_tensor_saved_at_2_ranks_loads_in_one_process(tmp_path: Path, loader: str) -> None:
    """Legacy ShardedTensor local shards are staged like DTensor ones: the values are those
    at the save, not the ones written into the shard right after it returned."""
    out = values(run_ranks("dcp_scenarios:sharded_tensor_save", 2, str(tmp_path)))
    assert out == [{"finalized": [0]}, {"finalized": [0]}]
    state = {"st": torch.zeros(8, 3)}
    if loader == "dcp":
        dcp.load(state, checkpoint_id=str(tmp_path / "st"))
    else:
        aiockpt.dcp.load(state, tmp_path / "st")
    assert torch.equal(state["st"], torch.arange(24.0).reshape(8, 3) + 1.0)
