"""Checkpoints in an object store, against a real S3 server on loopback (moto's server mode
in a process of its own, see ``s3_server.py``): the commit without rename, the lease, the
errors a user meets, and two tiers (local commit, background upload, restore falling
back to the remote copy)."""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from typing import Any

import anyio
import pytest
import torch
from s3_server import S3Server

import aiockpt
from aiockpt.storage._object import ObjectStorage

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def server() -> Iterator[S3Server]:
    with S3Server() as srv:
        yield srv


_buckets = iter(range(10**6))


@pytest.fixture
def bucket(server: S3Server) -> str:
    if server.proc is None or server.proc.poll() is not None:
        server.start()  # a test killed it
    return server.make_bucket(f"b{os.getpid()}-{next(_buckets)}")


def state(step: int) -> dict[str, Any]:
    return {"w": torch.full((256,), float(step)), "step": torch.tensor(step)}


def steps_in(server: S3Server, bucket: str, prefix: str) -> list[str]:
    return sorted({k.split("/")[1] for k in server.keys(bucket, prefix + "/") if "step-" in k})


def fast(server: S3Server, **more: Any) -> dict[str, Any]:
    """Options with short timeouts, for the failure tests."""
    return server.options(
        **{
            "progress_timeout": 2.0,
            "max_retries": 1,
            "retry_timeout": 3.0,
            "lease_ttl": 1.5,
            **more,
        }
    )


# -- one tier: the store itself ----------------------------------------------------------


def test_a_manager_saves_lists_retains_and_restores_through_the_environment(
    server: S3Server, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in server.env().items():
        monkeypatch.setenv(name, value)
    url = f"s3://{bucket}/run"
    with aiockpt.CheckpointManager(url, keep_last=2) as mgr:
        for step in (1, 2, 3):
            mgr.save(step, state(step), extra={"loss": step / 10})
            assert mgr.poll(blocking=True) == [step - 1]
        assert mgr.committed_steps() == [2, 3]
        assert torch.equal(mgr.restore()["w"], state(3)["w"])
        assert torch.equal(mgr.restore(2)["w"], state(2)["w"])
    keys = server.keys(bucket)
    assert steps_in(server, bucket, "run") == ["step-000000000002", "step-000000000003"]
    assert "run/.aiockpt.lease" not in keys  # released at close
    meta = json.loads(ObjectStorage().read_bytes(f"{url}/step-000000000003/metadata.json"))
    assert meta["extra"] == {"loss": 0.3, "step": 3}
    assert next(k.rsplit("/", 1)[1] for k in keys if "step-000000000003" in k) == "metadata.json"
    loaded = aiockpt.load(f"{url}/step-000000000003")
    assert torch.equal(loaded["w"], state(3)["w"]) and int(loaded["step"]) == 3


def test_the_commit_is_a_conditional_create_so_two_writers_never_both_commit(
    server: S3Server, bucket: str
) -> None:
    storage = ObjectStorage(server.options())
    directory = f"s3://{bucket}/run/step-000000000001"
    record = storage.write_file(state(1), f"{directory}/shard-00000-of-00001.0123456789abcdef.pt")
    barrier = threading.Barrier(8)
    outcomes: list[str] = []

    def commit(i: int) -> None:
        barrier.wait()
        try:
            storage.commit(directory, [record], {"writer": i})
            outcomes.append(f"won {i}")
        except aiockpt.StorageError as exc:
            assert "another writer created it first" in str(exc)
            outcomes.append("refused")

    threads = [threading.Thread(target=commit, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [o for o in outcomes if o.startswith("won")]
    assert len(winners) == 1 and outcomes.count("refused") == 7
    meta = storage.read_metadata(directory)
    assert meta["extra"] == {"writer": int(winners[0].split()[1])}
    assert meta["files"] == [record]


def test_a_second_manager_is_refused_while_the_first_holds_the_lease(
    server: S3Server, bucket: str
) -> None:
    url = f"s3://{bucket}/run"
    opts = fast(server)
    with (
        aiockpt.CheckpointManager(url, storage_options=opts),
        pytest.raises(aiockpt.DirectoryLockedError, match=f"pid {os.getpid()} on host"),
    ):
        aiockpt.CheckpointManager(url, storage_options=opts)
    with aiockpt.CheckpointManager(url, storage_options=opts) as mgr:  # released: free
        mgr.save(1, state(1))
        mgr.poll(blocking=True)
        assert mgr.committed_steps() == [1]


def test_a_killed_writers_lease_is_taken_over_at_once(server: S3Server, bucket: str) -> None:
    url = f"s3://{bucket}/run"
    code = textwrap.dedent(
        f"""
        import sys, aiockpt
        mgr = aiockpt.CheckpointManager({url!r}, storage_options={server.options()!r})
        print("open", flush=True)
        sys.stdin.read()
        """
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None and child.stdout.readline() == "open\n"
        assert "run/.aiockpt.lease" in server.keys(bucket)
    finally:
        child.kill()
        child.wait(30)
    start = time.monotonic()
    # a ttl far longer than the test: only the dead pid lets it in
    with aiockpt.CheckpointManager(url, storage_options=server.options(lease_ttl=600)) as mgr:
        assert time.monotonic() - start < 60
        assert mgr.committed_steps() == []


def test_a_writer_that_lost_its_lease_commits_nothing(server: S3Server, bucket: str) -> None:
    url = f"s3://{bucket}/run"
    storage = ObjectStorage(server.options())
    with aiockpt.CheckpointManager(url, storage_options=fast(server)) as mgr:
        mgr.save(1, state(1))
        mgr.poll(blocking=True)
        # another host's writer takes the lease over (as after an expiry it saw)
        storage.delete([f"{url}/.aiockpt.lease"])
        storage.put_new(f"{url}/.aiockpt.lease", b'{"host": "elsewhere", "pid": 1}')
        lease = mgr.steps.lock
        deadline = time.monotonic() + 30
        while getattr(lease, "_lost", None) is None and time.monotonic() < deadline:
            time.sleep(0.05)
        mgr.save(2, state(2))
        with pytest.raises(aiockpt.CheckpointError, match="lost its lease"):
            mgr.poll(blocking=True)
        assert mgr.committed_steps() == [1]
    assert storage.read_bytes(f"{url}/.aiockpt.lease") == b'{"host": "elsewhere", "pid": 1}'


def test_wrong_credentials_and_a_missing_bucket_fail_at_open(server: S3Server, bucket: str) -> None:
    with pytest.raises(aiockpt.StorageError, match="does not exist: create it"):
        aiockpt.CheckpointManager("s3://no-such-bucket/run", storage_options=fast(server))
    with (
        S3Server(auth=True) as strict,  # checks signatures: refuses every key
        pytest.raises(aiockpt.StorageError, match="refused the credentials") as err,
    ):
        aiockpt.CheckpointManager(f"s3://{bucket}/run", storage_options=fast(strict))
    assert f"s3://{bucket}/run" in str(err.value) and "AWS_ACCESS_KEY_ID" in str(err.value)


def test_urls_and_options_that_cannot_work_are_refused_with_what_to_do(
    server: S3Server, tmp_path: Any
) -> None:
    with pytest.raises(aiockpt.InvalidRequestError, match="not http://"):
        aiockpt.CheckpointManager("http://example.com/run")
    with pytest.raises(aiockpt.InvalidRequestError, match="BUCKET/PREFIX"):
        aiockpt.CheckpointManager("s3://bucket/a/../b")
    with pytest.raises(aiockpt.InvalidRequestError, match="pass them with a URL"):
        aiockpt.CheckpointManager(str(tmp_path), storage_options=server.options())
    with pytest.raises(aiockpt.InvalidRequestError, match="persistent=True"):
        aiockpt.CheckpointManager("s3://bucket/run", persistent=False)
    with pytest.raises(aiockpt.InvalidRequestError, match="use two tiers"):
        aiockpt.CheckpointManager("s3://bucket/run", format="dcp")
    with pytest.raises(aiockpt.InvalidRequestError, match="part_size must be at least 5 MiB"):
        ObjectStorage({"part_size": 1024})
    with pytest.raises(aiockpt.InvalidRequestError, match="pass remote="):
        aiockpt.CheckpointManager(local=str(tmp_path))


def test_a_stalled_server_becomes_a_typed_error_not_a_hang(server: S3Server, bucket: str) -> None:
    url = f"s3://{bucket}/run"
    # a lease that outlives the stall (one that does not is lost: see the lease tests)
    with aiockpt.CheckpointManager(url, storage_options=fast(server, lease_ttl=60)) as mgr:
        server.pause()
        try:
            start = time.monotonic()
            # Refused at the call (its listing) or in the worker's write: a typed error.
            with pytest.raises(aiockpt.CheckpointError, match=r"could not (list|upload|create)"):
                mgr.save(1, state(1))
                mgr.poll(blocking=True)
            assert time.monotonic() - start < 60
        finally:
            server.resume()
        mgr.save(2, state(2))
        mgr.poll(blocking=True)
        assert mgr.committed_steps() == [2]


# -- two tiers ------------------------------------------------------------------------


def test_two_tiers_commit_locally_then_upload_with_retention_on_each_side(
    server: S3Server, bucket: str, tmp_path: Any
) -> None:
    local, remote = str(tmp_path / "nvme"), f"s3://{bucket}/run"

    async def main() -> None:
        async with aiockpt.AsyncCheckpointManager(
            local=local,
            remote=remote,
            keep_local=1,
            keep_remote=2,
            storage_options=server.options(),
        ) as mgr:
            for step in (1, 2, 3):
                fut = await mgr.save(step, state(step), wait_for_staging=False)
                await fut.staged
                await fut  # durable locally
                assert os.path.isfile(os.path.join(local, f"step-{step:012d}", "metadata.json"))
                await fut.uploaded
                assert fut.uploaded.state == "uploaded" and fut.uploaded.seconds > 0
            await mgr.wait_uploaded()
            assert mgr.uploads() == {1: "uploaded", 2: "uploaded", 3: "uploaded"}
            assert await mgr.acommitted_steps() == [3]

    anyio.run(main)
    assert steps_in(server, bucket, "run") == ["step-000000000002", "step-000000000003"]
    assert sorted(n for n in os.listdir(local) if n.startswith("step-")) == ["step-000000000003"]


def test_restore_falls_back_to_the_remote_copy_when_the_local_one_is_bad_or_gone(
    server: S3Server, bucket: str, tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    local, remote = str(tmp_path / "nvme"), f"s3://{bucket}/run"
    tiers = {"local": local, "remote": remote, "storage_options": server.options()}
    with aiockpt.CheckpointManager(**tiers, keep_local=5) as mgr:
        for step in (1, 2):
            mgr.save(step, state(step))
            mgr.poll(blocking=True)
        mgr.wait_uploaded(timeout=60)
    (shard,) = glob.glob(os.path.join(local, "step-000000000002", "shard-*"))
    with open(shard, "r+b") as f:
        f.seek(64)
        f.write(b"\xff" * 8)
    with aiockpt.CheckpointManager(**tiers, keep_local=5) as mgr:
        restored = mgr.restore()
    assert torch.equal(restored["w"], state(2)["w"])
    assert "the local copy of step 2 fails its checks" in caplog.text
    aiockpt.verify(os.path.join(local, "step-000000000002"))  # repaired by the download
    import shutil

    shutil.rmtree(local)
    with aiockpt.CheckpointManager(**tiers, keep_local=5) as mgr:
        assert torch.equal(mgr.restore()["w"], state(2)["w"])
        assert torch.equal(mgr.restore(1)["w"], state(1)["w"])
        with pytest.raises(aiockpt.InvalidRequestError, match="step 2 is already committed"):
            mgr.save(2, state(2))  # the remote steps count: saves go forward
    # the remote copy is damaged too: the newest step that verifies is restored
    storage = ObjectStorage(server.options())
    (key,) = [k for k in server.keys(bucket, "run/step-000000000002/") if "shard" in k]
    server.client().put_object(Bucket=bucket, Key=key, Body=b"garbage")
    shutil.rmtree(os.path.join(local, "step-000000000002"))
    with aiockpt.CheckpointManager(**tiers, keep_local=5) as mgr:
        assert torch.equal(mgr.restore()["w"], state(1)["w"])
        with pytest.raises(aiockpt.CorruptCheckpointError, match="remote step 2"):
            mgr.restore(2)
    assert storage.list_dir(f"{remote}/step-000000000001")


def test_a_crash_between_local_commit_and_upload_is_uploaded_at_the_next_start(
    server: S3Server, bucket: str, tmp_path: Any
) -> None:
    local, remote = str(tmp_path / "nvme"), f"s3://{bucket}/run"
    code = textwrap.dedent(
        f"""
        import sys, torch, aiockpt
        if __name__ == "__main__":
            mgr = aiockpt.CheckpointManager(
                local={local!r}, remote={remote!r}, storage_options={fast(server)!r}
            )
            print("open", flush=True)
            sys.stdin.readline()
            mgr.save(1, {{"w": torch.full((256,), 1.0)}})
            mgr.poll(blocking=True)
            print("committed", flush=True)
            sys.stdin.read()
        """
    )
    script = tmp_path / "trainer.py"
    script.write_text(code)
    child = subprocess.Popen(
        [sys.executable, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None and child.stdin is not None
        assert child.stdout.readline() == "open\n"
        server.pause()  # the upload cannot finish
        child.stdin.write("go\n")
        child.stdin.flush()
        assert child.stdout.readline() == "committed\n"
        os.killpg(os.getpgid(child.pid), 0)
        child.send_signal(signal.SIGKILL)
        child.wait(30)
    finally:
        server.resume()
        child.kill()
    assert steps_in(server, bucket, "run") in ([], ["step-000000000001"])
    assert "run/step-000000000001/metadata.json" not in server.keys(bucket)
    with aiockpt.CheckpointManager(
        local=local, remote=remote, storage_options=server.options()
    ) as mgr:
        assert mgr.uploads() == {1: "pending"} or mgr.uploads()[1] in ("uploading", "uploaded")
        mgr.wait_uploaded(1, timeout=60)
    assert "run/step-000000000001/metadata.json" in server.keys(bucket)
    loaded = aiockpt.load(f"{remote}/step-000000000001", storage_options=server.options())
    assert torch.equal(loaded["w"], torch.full((256,), 1.0))


def test_an_upload_to_a_killed_server_fails_typed_and_the_local_step_is_kept(
    server: S3Server, bucket: str, tmp_path: Any
) -> None:
    local, remote = str(tmp_path / "nvme"), f"s3://{bucket}/run"
    mgr = aiockpt.CheckpointManager(
        local=local, remote=remote, keep_local=1, storage_options=fast(server)
    )
    try:
        server.stop()
        mgr.save(1, state(1))
        mgr.poll(blocking=True)
        start = time.monotonic()
        with pytest.raises(aiockpt.StorageError, match=r"could not (read|upload)"):
            mgr.wait_uploaded(1, timeout=120)
        assert time.monotonic() - start < 60
        assert mgr.uploads() == {1: "failed"}
        mgr.save(2, state(2))
        mgr.poll(blocking=True)
        with pytest.raises(aiockpt.StorageError):
            mgr.wait_uploaded(2, timeout=120)
        assert mgr.committed_steps() == [2]  # step 1 went once step 2 was committed
    finally:
        mgr.close()
    server.start()
    server.make_bucket(bucket)
    with aiockpt.CheckpointManager(
        local=local, remote=remote, keep_local=1, storage_options=server.options()
    ) as mgr:
        mgr.wait_uploaded(2, timeout=60)
    assert steps_in(server, bucket, "run") == ["step-000000000002"]


def test_a_rollback_goes_back_on_both_tiers(server: S3Server, bucket: str, tmp_path: Any) -> None:
    local, remote = str(tmp_path / "nvme"), f"s3://{bucket}/run"
    tiers = {"local": local, "remote": remote, "storage_options": server.options()}
    with aiockpt.CheckpointManager(**tiers, keep_local=1) as mgr:
        for step in (1, 2, 3):
            mgr.save(step, state(step))
            mgr.poll(blocking=True)
        mgr.wait_uploaded(timeout=60)
        assert mgr.committed_steps() == [3]  # step 1 is only in the store now
        assert mgr.rollback(1) == [2, 3]
        assert steps_in(server, bucket, "run") == ["step-000000000001"]
        assert torch.equal(mgr.restore()["w"], state(1)["w"])  # downloaded
        mgr.save(2, {"w": torch.full((256,), 20.0)})  # forward again from step 1
        mgr.poll(blocking=True)
        mgr.wait_uploaded(2, timeout=60)
    import shutil

    shutil.rmtree(local)
    with aiockpt.CheckpointManager(**tiers) as mgr:
        assert torch.equal(mgr.restore()["w"], torch.full((256,), 20.0))


def test_two_tiers_carry_the_dcp_format(server: S3Server, bucket: str, tmp_path: Any) -> None:
    local, remote = str(tmp_path / "nvme"), f"s3://{bucket}/dcp"
    tiers = {"local": local, "remote": remote, "storage_options": server.options()}
    with aiockpt.CheckpointManager(**tiers, format="dcp") as mgr:
        mgr.save(5, {"w": torch.arange(10.0)})
        mgr.poll(blocking=True)
        mgr.wait_uploaded(5, timeout=60)
    names = [k.rsplit("/", 1)[1] for k in server.keys(bucket, "dcp/step-000000000005/")]
    assert ".metadata" in names and ".metadata.checksums" in names
    import shutil

    shutil.rmtree(local)
    with aiockpt.CheckpointManager(**tiers, format="dcp") as mgr:
        target = {"w": torch.zeros(10)}
        mgr.restore(state_dict=target)
    assert torch.equal(target["w"], torch.arange(10.0))


# -- the command line ----------------------------------------------------------------


def test_the_cli_lists_verifies_and_copies_steps_in_the_store(
    server: S3Server, bucket: str, tmp_path: Any
) -> None:
    url = f"s3://{bucket}/run"
    with aiockpt.CheckpointManager(url, storage_options=server.options()) as mgr:
        mgr.save(7, state(7))
        mgr.poll(blocking=True)
    env = {**os.environ, **server.env()}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "aiockpt", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )

    listing = cli("ls", url)
    assert listing.returncode == 0, listing.stderr
    assert "step-000000000007" in listing.stdout and " 7 " in listing.stdout
    checked = cli("verify", f"{url}/step-000000000007")
    assert checked.returncode == 0, checked.stderr
    assert "1 file(s) match their checksums" in checked.stdout
    copy = cli("cp", f"{url}/step-000000000007", str(tmp_path / "here"))
    assert copy.returncode == 0, copy.stderr
    assert torch.equal(aiockpt.load(str(tmp_path / "here"))["w"], state(7)["w"])
    back = cli("cp", str(tmp_path / "here"), f"s3://{bucket}/copy/step-000000000007")
    assert back.returncode == 0, back.stderr
    assert cli("verify", f"s3://{bucket}/copy/step-000000000007").returncode == 0
    (key,) = [k for k in server.keys(bucket, "run/") if "shard" in k]
    server.client().put_object(Bucket=bucket, Key=key, Body=b"x" * 10)
    bad = cli("verify", f"{url}/step-000000000007")
    assert bad.returncode == 1 and "is corrupt" in bad.stderr
    missing = cli("ls", "s3://no-such-bucket/run")
    assert missing.returncode == 2 and "does not exist" in missing.stderr


# -- what attacks found -----------------------------------------------------------------


def test_a_writer_that_loses_its_lease_during_an_upload_does_not_commit_it(
    server: S3Server, bucket: str, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    local, remote = str(tmp_path / "nvme"), f"s3://{bucket}/run"
    storage = ObjectStorage(server.options())
    upload_file = ObjectStorage.upload_file

    def taken_over_meanwhile(self: ObjectStorage, *args: Any) -> None:
        upload_file(self, *args)
        storage.delete([f"{remote}/.aiockpt.lease"])  # another writer takes it over
        storage.put_new(f"{remote}/.aiockpt.lease", b'{"host": "elsewhere", "pid": 1}')
        lease = mgr.tier.lease  # type: ignore[union-attr]
        deadline = time.monotonic() + 30
        while lease._lost is None and time.monotonic() < deadline:
            time.sleep(0.05)

    monkeypatch.setattr(ObjectStorage, "upload_file", taken_over_meanwhile)
    mgr = aiockpt.CheckpointManager(local=local, remote=remote, storage_options=fast(server))
    try:
        mgr.save(1, state(1))
        mgr.poll(blocking=True)
        with pytest.raises(aiockpt.DirectoryLockedError, match="lost its lease"):
            mgr.wait_uploaded(1, timeout=60)
    finally:
        mgr.close()
    assert "run/step-000000000001/metadata.json" not in server.keys(bucket)


def test_a_renewal_that_landed_late_keeps_the_lease(server: S3Server, bucket: str) -> None:
    url = f"s3://{bucket}/run"
    with aiockpt.CheckpointManager(url, storage_options=fast(server)) as mgr:
        lease = mgr.steps.lock
        key = "run/.aiockpt.lease"
        ours = json.loads(server.client().get_object(Bucket=bucket, Key=key)["Body"].read())
        # our own renewal, applied by the store after we gave up on it: a new ETag
        late = json.dumps({**ours, "renewed": ours["renewed"] + 1}).encode()
        server.client().put_object(Bucket=bucket, Key=key, Body=late)
        first = lease._etag  # type: ignore[attr-defined]
        deadline = time.monotonic() + 30
        while lease._etag == first and time.monotonic() < deadline:  # type: ignore[attr-defined]
            time.sleep(0.05)
        assert lease._lost is None  # type: ignore[attr-defined]
        mgr.save(1, state(1))
        mgr.poll(blocking=True)
        assert mgr.committed_steps() == [1]


def test_a_taker_with_a_shorter_ttl_waits_for_the_holders(server: S3Server, bucket: str) -> None:
    url = f"s3://{bucket}/run"
    with aiockpt.CheckpointManager(url, storage_options=fast(server, lease_ttl=6.0)):
        start = time.monotonic()
        with pytest.raises(aiockpt.DirectoryLockedError, match="is alive"):
            aiockpt.CheckpointManager(url, storage_options=fast(server, lease_ttl=0.5))
        assert time.monotonic() - start > 0.5  # it watched past its own ttl


def test_planted_objects_never_make_a_step_or_hide_the_others(
    server: S3Server, bucket: str, tmp_path: Any
) -> None:
    local, remote = str(tmp_path / "nvme"), f"s3://{bucket}/run"
    tiers = {"local": local, "remote": remote, "storage_options": server.options()}
    with aiockpt.CheckpointManager(**tiers, keep_remote=2) as mgr:
        for step in (1, 2):
            mgr.save(step, state(step))
            mgr.poll(blocking=True)
        mgr.wait_uploaded(timeout=60)
    s3 = server.client()
    # a "folder" named like the marker, and a key no listing of its step accepts
    s3.put_object(Bucket=bucket, Key="run/step-000000000003/metadata.json/", Body=b"")
    s3.put_object(Bucket=bucket, Key="run/step-000000000001//x", Body=b"")
    with aiockpt.CheckpointManager(**tiers, keep_remote=2, keep_local=1) as mgr:
        assert mgr.tier is not None
        found = mgr.tier.scan()
        assert found.committed == [2] and 3 in found.partial
        assert [s for s, _ in found.damaged] == [1]
        mgr.save(3, state(3))  # step 3 is free: the planted one is not a step
        mgr.poll(blocking=True)
        mgr.wait_uploaded(3, timeout=60)
        assert torch.equal(mgr.restore(2)["w"], state(2)["w"])
    assert "run/step-000000000002/metadata.json" in server.keys(bucket)


def test_hostile_sizes_are_refused_before_anything_is_read_or_allocated(
    server: S3Server, bucket: str, tmp_path: Any
) -> None:
    local, remote = str(tmp_path / "nvme"), f"s3://{bucket}/run"
    tiers = {"local": local, "remote": remote, "storage_options": server.options()}
    with aiockpt.CheckpointManager(**tiers) as mgr:
        mgr.save(1, state(1))
        mgr.poll(blocking=True)
        mgr.wait_uploaded(timeout=60)
    s3 = server.client()
    key = "run/step-000000000001/metadata.json"
    meta = json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
    meta["files"][0]["nbytes"] = 2**62
    s3.put_object(Bucket=bucket, Key=key, Body=json.dumps(meta).encode())
    import shutil

    shutil.rmtree(local)
    start = time.monotonic()
    with (
        aiockpt.CheckpointManager(**tiers) as mgr,
        pytest.raises(
            aiockpt.CorruptCheckpointError,
            match="its step records 4611686018427387904: not downloaded",
        ),
    ):
        mgr.restore(1)
    assert time.monotonic() - start < 60
    meta["files"][0]["nbytes"] = 10  # the object is larger than recorded: not read
    s3.put_object(Bucket=bucket, Key=key, Body=json.dumps(meta).encode())
    with pytest.raises(aiockpt.CorruptCheckpointError, match="more than the 10 it may"):
        aiockpt.load(f"{remote}/step-000000000001", storage_options=server.options())
    s3.put_object(Bucket=bucket, Key=key, Body=b" " * (65 * 2**20))
    with pytest.raises(aiockpt.CorruptCheckpointError, match="more than the 67108864"):
        aiockpt.load(f"{remote}/step-000000000001", storage_options=server.options())


def test_a_dcp_marker_damaged_after_the_local_commit_is_not_uploaded(
    server: S3Server, bucket: str, tmp_path: Any
) -> None:
    from aiockpt.dcp._format import DCPFormat
    from aiockpt.storage._tiers import upload_step

    path = str(tmp_path / "ck")
    with aiockpt.CheckpointManager(path, format="dcp") as mgr:
        mgr.save(1, {"w": torch.arange(10.0)})
        mgr.poll(blocking=True)
    step = os.path.join(path, "step-000000000001")
    with open(os.path.join(step, ".metadata"), "r+b") as f:
        f.seek(40)
        f.write(b"\x00\x01")
    records, commit_names = DCPFormat().step_files(step)
    storage = ObjectStorage(server.options())
    with pytest.raises(aiockpt.CorruptCheckpointError, match="not uploaded"):
        upload_step(step, f"s3://{bucket}/dcp/step-000000000001", storage, records, commit_names)
    assert server.keys(bucket, "dcp/") == []


def test_waiting_for_a_step_this_manager_never_saw_is_refused(
    server: S3Server, bucket: str, tmp_path: Any
) -> None:
    async def main() -> None:
        async with aiockpt.AsyncCheckpointManager(
            local=str(tmp_path), remote=f"s3://{bucket}/run", storage_options=server.options()
        ) as mgr:
            with anyio.fail_after(30), pytest.raises(aiockpt.InvalidRequestError, match="step 99"):
                await mgr.wait_uploaded(99)
            await mgr.wait_uploaded()  # nothing saved: returns
            assert mgr.uploads() == {}

    anyio.run(main)
