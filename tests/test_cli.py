"""The command line: bench (small sizes), verify, ls, and the installed console script."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from ckpt_helpers import data_file

from aiockpt import CheckpointManager
from aiockpt._cli._bench import parse_size

ROOT = Path(__file__).resolve().parent.parent


def cli(*argv: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "aiockpt", *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def test_parse_size() -> None:
    assert parse_size("1GiB") == 2**30
    assert parse_size("256MiB") == 256 * 2**20
    assert parse_size("64M") == 64 * 2**20
    assert parse_size("1.5KiB") == 1536
    assert parse_size("1000") == 1000
    with pytest.raises(ValueError, match="1GiB"):
        parse_size("lots")


def test_bench_small_run_reports_every_contender(tmp_path: Path) -> None:
    out = cli("bench", "--size", "8MiB", "--saves", "2", "--json", str(tmp_path / "r.json"))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "[round 3/3] aiockpt (async)" in out.stderr  # progress lines
    report = json.loads((tmp_path / "r.json").read_text())
    names = [r["name"] for r in report["contenders"]]
    assert names == [
        "floor: in-place copy_",
        "floor: raw write+fsync",
        "torch.save",
        "dcp.async_save (thread)",
        "dcp.async_save (process)",
        "dcp.async_save (thread, tuned stager)",
        "dcp.async_save (process, tuned stager)",
        "aiockpt (fork)",
        "aiockpt (persistent)",
        "aiockpt (persistent, reserved)",
        "aiockpt (async)",
    ]
    assert abs(report["state_bytes"] - 8 * 2**20) < 0.05 * 8 * 2**20
    rows = {r["name"]: r for r in report["contenders"]}
    for name in names[2:]:
        row = rows[name]
        assert row["blocked_warm_s"] > 0 and row["durable_s"] >= row["blocked_warm_s"]
        assert len(report["raw"][name]["durable"]) == 3
    assert rows["aiockpt (async)"]["loop_lag_max_s"] is not None
    assert rows["torch.save"]["loop_lag_max_s"] is None
    assert set(report["verdict"]) >= {"blocked_vs_best_dcp", "durable_vs_write_floor"}
    assert "warm blocked: aiockpt" in out.stdout and "vs copy" in out.stdout


def test_bench_can_run_a_subset(tmp_path: Path) -> None:
    out = cli("bench", "--size", "4MiB", "--saves", "2", "--only", "persistent", "--quiet")
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [line.split("  ")[0] for line in out.stdout.splitlines()[3:] if line.strip()]
    assert "aiockpt (persistent)" in out.stdout and "dcp.async_save" not in out.stdout
    assert any(r.startswith("floor: in-place copy_") for r in rows)


def test_bench_with_many_tensors_prints_per_tensor_cost(tmp_path: Path) -> None:
    out = cli(
        "bench", "--tensors", "1000", "--size", "8MiB", "--saves", "1", "--quiet",
        "--only", "persistent", "torch.save", "--json", str(tmp_path / "r.json"),
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert lines[0].startswith("state dict: 0.01 GiB in 1000 tensors")
    assert lines[1].split() == [
        "contender", "blocked", "blocked", "vs", "copy", "us/t", "durable", "vs", "write",
        "GB/s", "peak+", "growth", "loop", "lag",
    ]  # fmt: skip
    expected = [
        "floor: in-place copy_",
        "floor: raw write+fsync",
        "torch.save",
        "aiockpt (persistent)",
        "aiockpt (persistent, reserved)",
    ]
    for line, name in zip(lines[3:], expected, strict=False):
        assert line.startswith(name) and len(line.split()) >= 10
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["tensors"] == 1000
    assert report["state_bytes"] == 1000 * (8 * 2**20 // 4 // 1000) * 4
    rows = {r["name"]: r for r in report["contenders"]}
    assert rows["torch.save"]["us_per_tensor_over_copy"] is not None
    assert rows["floor: in-place copy_"]["us_per_tensor_over_copy"] == 0.0


def test_bench_sweep_runs_each_point(tmp_path: Path) -> None:
    out = cli(
        "bench", "--sweep", "--size", "2MiB", "--counts", "10", "--sizes", "2MiB,4MiB",
        "--max-size", "3MiB", "--saves", "1", "--only", "aiockpt (persistent)",
        "--quiet", "--json", str(tmp_path / "s.json"), timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads((tmp_path / "s.json").read_text())
    # 4MiB is over --max-size; (100 tensors, 2MiB) is the size point.
    assert [(p["tensors"], p["size"]) for p in report["points"]] == [
        (10, 2 * 2**20),
        (100, 2 * 2**20),
    ]
    for point in report["points"]:
        assert list(point["contenders"]) == [
            "floor: in-place copy_",
            "floor: raw write+fsync",
            "aiockpt (persistent)",
        ]
        mine = point["contenders"]["aiockpt (persistent)"]
        assert mine["failed"] is None and mine["durable_vs_write_floor"] is not None
        assert mine["durable_vs_torch_save"] is None  # torch.save was not run
    tail = out.stdout[out.stdout.index("| tensors |") :].splitlines()
    table = [line for line in tail if line.startswith("|")]
    assert len(table) == 2 + 2 and table[2].startswith("| 10 | 2 MiB |")
    assert tail[-1] == f"JSON written to {tmp_path / 's.json'}"


def test_bench_reports_a_failing_contender(tmp_path: Path) -> None:
    import anyio

    from aiockpt._cli import _bench

    class Unpicklable:
        def __reduce__(self) -> Any:
            raise TypeError("cannot pickle this")

    state = {"w": torch.ones(10), "odd": Unpicklable()}
    report = anyio.run(
        lambda: _bench.run_bench(2**20, 1, str(tmp_path), ["torch.save"], state=state)
    )
    (row,) = report["contenders"]
    assert row["name"] == "torch.save"
    assert row["failed"] == "TypeError: cannot pickle this"
    assert row["durable_s"] is None


def test_verify_and_ls(tmp_path: Path) -> None:
    with CheckpointManager(tmp_path / "ck", persistent=False) as mgr:
        for step in (100, 200):
            mgr.save(step, {"w": torch.full((1000,), float(step))})
        mgr.poll(blocking=True)
    (tmp_path / "ck" / "step-000000000300").mkdir()  # an interrupted save
    listing = cli("ls", str(tmp_path / "ck"))
    assert listing.returncode == 0, listing.stderr
    lines = listing.stdout.splitlines()
    assert lines[1].startswith("step-000000000100") and " 100 " in lines[1]
    assert lines[2].startswith("step-000000000200")
    assert lines[3].startswith("step-000000000300") and "no (incomplete" in lines[3]

    step = tmp_path / "ck" / "step-000000000200"
    ok = cli("verify", str(step))
    assert ok.returncode == 0 and "1 file(s) match their checksums" in ok.stdout
    shard = data_file(step, "shard-00000-of-00001.pt")
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0xFF
    shard.write_bytes(bytes(data))
    bad = cli("verify", str(step))
    assert bad.returncode == 1
    assert "FAILED" in bad.stderr and shard.name in bad.stderr
    missing = cli("verify", str(tmp_path / "ck" / "step-000000000300"))
    assert missing.returncode == 1 and "no committed checkpoint" in missing.stderr


def test_console_script_is_installed() -> None:
    script = Path(sys.executable).parent / "aiockpt"
    assert script.exists(), "pip install -e . installs the aiockpt command"
    out = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "bench" in out.stdout and "verify" in out.stdout


def test_plot_draws_a_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from aiockpt._cli._bench import plot

    rows = [
        {"name": n, "kind": k, "blocked_warm_s": b, "durable_s": d}
        for n, k, b, d in [
            ("floor: in-place copy_", "floor", 0.1, None),
            ("torch.save", "peer", 0.9, 0.9),
            ("aiockpt (async)", "aiockpt", 0.1, 0.8),
        ]
    ]
    plot({"contenders": rows, "state_bytes": 2**30}, str(tmp_path / "c.png"))
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_an_unreadable_step_is_one_bad_row_and_a_typed_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import errno
    import os

    from aiockpt import StorageError, load
    from aiockpt._cli._main import main

    with CheckpointManager(tmp_path, persistent=False) as mgr:
        for step in (1, 2):
            mgr.save(step, {"w": torch.full((2,), float(step))})
            mgr.poll(blocking=True)
    real_stat = os.stat

    def denied(path: Any, *args: Any, **kwargs: Any) -> Any:
        # Step 1's metadata cannot be read (root ignores chmod, so the refusal is made here).
        fd = kwargs.get("dir_fd")
        if (
            fd is not None
            and str(path) == "metadata.json"
            and "step-000000000001" in os.readlink(f"/proc/self/fd/{fd}")
        ):
            raise PermissionError(errno.EACCES, "Permission denied")
        return real_stat(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", denied)
    assert main(["ls", str(tmp_path)]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert any("step-000000000001" in r and "BAD: cannot open" in r for r in rows), rows
    assert any("step-000000000002" in r and "BAD" not in r for r in rows), rows
    with pytest.raises(StorageError, match=r"cannot open .*Permission denied"):
        load(tmp_path / "step-000000000001")
    assert torch.equal(load(tmp_path / "step-000000000002")["w"], torch.full((2,), 2.0))


def test_verify_of_a_path_that_cannot_be_looked_at_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "plain").write_text("x")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    for name in ("plain/", "loop", "a" * 300):
        out = cli("verify", str(tmp_path / name))
        assert out.returncode == 1, out
        assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1
        assert out.stderr.startswith("FAILED: ")


def test_bench_remote_on_a_loopback_server(tmp_path: Path) -> None:
    import socket
    from urllib.parse import urlparse

    out = cli(
        "bench", "--remote", "--size", "16MiB", "--saves", "1", "--quiet",
        "--json", str(tmp_path / "r.json"),
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert lines[0].startswith("store: loopback S3 server (moto")
    assert lines[1].startswith("machine: ")
    assert lines[3].split() == [
        "contender", "blocked", "to", "local", "commit", "to", "committed", "in", "store",
        "MiB/s", "cold",
    ]  # fmt: skip
    names = [
        "floor: raw bytes, obstore",
        "aiockpt (two tiers)",
        "aiockpt (one tier)",
        "dcp.save (FsspecWriter)",
        "dcp.save (FsspecWriter, 8 thr)",
    ]
    for line, name in zip(lines[4:9], names, strict=True):
        assert line.startswith(name) and "failed" not in line, line
        figures = line[len(name) :].replace("(", " ").replace(")", " ").replace("-", " ")
        assert len(figures.split()) >= 5 and all(float(v) >= 0 for v in figures.split()), line
    report = json.loads((tmp_path / "r.json").read_text())
    rows = {r["name"]: r for r in report["contenders"]}
    assert list(rows) == names
    for row in rows.values():
        assert row["failed"] is None and row["mib_per_s"] > 0
        assert row["committed_s"]["median"] > 0 and row["committed_s"]["cold"] > 0
        assert row["blocked_s"]["median"] > 0
    two = report["raw"]["aiockpt (two tiers)"]
    assert len(two["done"]) == len(two["local"]) == 2  # a cold run, a warm one
    # Both from the save call: committed locally first, then uploaded.
    assert all(0 < local <= done for local, done in zip(two["local"], two["done"], strict=True))
    # The server was stopped: nothing answers on its port any more.
    port = urlparse(report["store"].rsplit(" at ", 1)[1]).port
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0
