"""Global completion across real ranks: spawned processes in a gloo group on loopback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ckpt_helpers import data_file, plain
from dist_harness import run_ranks, run_torchrun, values

ROOT = Path(__file__).resolve().parent.parent


def test_slow_rank_delays_every_rank(tmp_path: Path) -> None:
    out = values(run_ranks("slow_rank", 2, str(tmp_path)))
    assert out[0]["local_done"] is True
    assert out[0]["future_done_before_gate"] is False
    assert [o["call_idx"] for o in out] == [0, 0]


@pytest.mark.parametrize("world", [2, 4])
def test_failing_rank_fails_every_rank_and_writes_no_metadata(tmp_path: Path, world: int) -> None:
    out = values(run_ranks("failing_rank", world, str(tmp_path)))
    for rank, o in enumerate(out):
        assert o["type"] == "DistributedCheckpointError", o
        assert o["failed_ranks"] == (world - 1,)
        assert f"failed on rank(s) [{world - 1}]" in o["message"]
        assert o["metadata"] is False
        assert o["cause"] == ("WorkerError" if rank == world - 1 else None)
    assert not (tmp_path / "ckpt" / "metadata.json").exists()


def test_ranks_polling_at_different_rates_agree(tmp_path: Path) -> None:
    out = values(run_ranks("uneven_polling", 2, str(tmp_path)))
    assert [o["call_idx"] for o in out] == [0, 0]
    assert all(o["sums"] == [2] * 20 for o in out)
    meta = json.loads((tmp_path / "ckpt" / "metadata.json").read_text())
    assert [plain(f["name"]) for f in meta["files"]] == [
        "shard-00000-of-00002.pt",
        "shard-00001-of-00002.pt",
    ]
    for rank in range(2):
        shard = torch.load(tmp_path / "ckpt" / meta["files"][rank]["name"], weights_only=True)
        assert torch.equal(shard["w"], torch.full((1000,), float(rank)))


def test_killed_rank_is_an_error_within_the_timeout(tmp_path: Path) -> None:
    results = run_ranks("killed_rank", 2, str(tmp_path), timeout_s=20.0)
    assert results[1] is None  # it died
    survivor = values(results[:1])[0]
    assert survivor["type"] == "DistributedCheckpointError", survivor
    assert "did not finish on all ranks" in survivor["message"]
    assert survivor["elapsed"] < 20.0 + 10.0


@pytest.mark.parametrize("world", [2, 4])
def test_requests_in_flight_finalize_in_the_same_order_everywhere(
    tmp_path: Path, world: int
) -> None:
    out = values(run_ranks("fifo_many", world, str(tmp_path)))
    assert all(o["order"] == [0, 1, 2] and o["results"] == [0, 1, 2] for o in out)


def test_sync_reference_loop_with_global_completion(tmp_path: Path) -> None:
    out = values(run_ranks("sync_reference_loop", 2, str(tmp_path)))
    assert out[0]["finalized"] == out[1]["finalized"] == [0, 1, 2]
    assert out[0]["order"] == out[1]["order"] == [4, 8, 12]
    assert out[0]["reductions"] == out[1]["reductions"]


def test_torchrun_example(tmp_path: Path) -> None:
    out = run_torchrun(
        "examples/torchrun_sharded.py",
        "--out",
        str(tmp_path),
        "--steps",
        "12",
        "--every",
        "4",
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    steps = sorted(p.name for p in tmp_path.iterdir())
    assert steps == ["step000004", "step000008", "step000012"]
    for step in steps:
        meta = json.loads((tmp_path / step / "metadata.json").read_text())
        assert meta["world_size"] == 2 and meta["extra"]["step"] == int(step[4:])
    assert "rank 0: committed" in out.stdout


def test_rank_that_stops_participating_times_out_with_an_error(tmp_path: Path) -> None:
    out = values(run_ranks("absent_rank", 2, str(tmp_path), timeout_s=3.0))
    assert out[0]["type"] == "DistributedCheckpointError", out[0]
    assert "within 3s" in out[0]["message"] and "call 0" in out[0]["message"]
    assert 2.5 < out[0]["elapsed"] < 30.0


def test_a_rank_failing_to_stage_fails_that_request_everywhere_and_no_other(
    tmp_path: Path,
) -> None:
    out = values(run_ranks("staging_fails_on_one_rank", 2, str(tmp_path)))
    assert out[1]["schedule"] == "StagingError: 0"
    assert out[0]["schedule"] == "ok"
    # Rank 0 learns of rank 1's staging failure at the completion check of call 0...
    assert out[0]["first"] == "DistributedCheckpointError 0 [1]"
    assert "device lost on rank 1" in out[0]["rank_errors"][1]
    # ...rank 1 already saw it at the call, so it is not raised twice there...
    assert out[1]["first"] == [1]
    # ...and both ranks still number their requests alike: call 1 succeeds everywhere.
    assert [o["second_idx"] for o in out] == [1, 1]
    assert out[0]["then"] == [1] and out[1]["then"] == []
    assert (tmp_path / "b0").exists() and (tmp_path / "b1").exists()


def test_rank_zero_failing_to_commit_fails_every_rank(tmp_path: Path) -> None:
    out = values(run_ranks("commit_fails_on_rank_zero", 2, str(tmp_path)))
    for o in out:
        assert o["first"].startswith("FinalizeError: "), o
        assert "rank 0 could not commit" in o["first"]
        assert "No space left on device (injected, metadata)" in o["first"]
        assert o["committed"] == [2]


def test_keep_last_keeps_the_old_step_when_the_newer_save_fails(tmp_path: Path) -> None:
    out = values(run_ranks("keep_last_with_a_failed_newer_save", 2, str(tmp_path)))
    for rank, o in enumerate(out):
        assert o["second"] == [1]
        assert o["after_failure"] == [1]
        assert o["restored_rank_value"] == float(rank)
    # Rank 0 prunes once every rank knows step 3 is committed: rank 1 may look first.
    assert out[0]["after_third"] == [3] and out[1]["after_third"] in ([3], [1, 3])
    assert sorted(p.name for p in (tmp_path / "ck").iterdir() if p.name.startswith("step-")) == [
        "step-000000000003"
    ]
    # Every rank's shard of the committed step verifies from the command line...
    step = tmp_path / "ck" / "step-000000000003"
    cli = [sys.executable, "-m", "aiockpt", "verify", str(step)]
    ok = subprocess.run(cli, capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    shard = data_file(step, "shard-00001-of-00002.pt")
    assert data_file(step, "shard-00000-of-00002.pt").name in ok.stdout and shard.name in ok.stdout
    # ...and a flipped byte in rank 1's shard is named.
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    bad = subprocess.run(cli, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and shard.name in bad.stderr
