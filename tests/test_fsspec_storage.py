"""FsspecStorage: checkpoints through a user-configured fsspec filesystem, against a real S3
server on loopback (moto's server mode, see ``s3_server``) through s3fs."""

from __future__ import annotations

import io
import json
import os
import pickle
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import fsspec
import pytest
import s3fs
import torch
import xxhash
from s3_server import ACCESS_KEY, REGION, SECRET_KEY, S3Server

import aiockpt
from aiockpt._exceptions import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    DirectoryLockedError,
    StorageError,
)
from aiockpt.storage import FsspecStorage

HOST = socket.gethostname()
SHARD = "shard-00000-of-00001.0123456789abcdef.pt"


@pytest.fixture(scope="module")
def server() -> Iterator[S3Server]:
    with S3Server() as srv:
        yield srv


def make_fs(endpoint: str, key: str = ACCESS_KEY, secret: str = SECRET_KEY) -> Any:
    return s3fs.S3FileSystem(
        endpoint_url=endpoint,
        key=key,
        secret=secret,
        client_kwargs={"region_name": REGION},
        skip_instance_cache=True,
    )


@pytest.fixture
def bucket(server: S3Server) -> str:
    return server.make_bucket(f"bkt-{uuid.uuid4().hex[:12]}")


@pytest.fixture
def storage(server: S3Server) -> FsspecStorage:
    return FsspecStorage(make_fs(server.endpoint))


def sd() -> dict[str, Any]:
    return {"w": torch.arange(10_000, dtype=torch.float32).reshape(100, 100), "n": 3}


def lease_of(server: S3Server, bucket: str, key: str) -> dict[str, Any]:
    body = server.client().get_object(Bucket=bucket, Key=key)["Body"].read()
    found: dict[str, Any] = json.loads(body)
    return found


def put(server: S3Server, bucket: str, key: str, body: bytes) -> None:
    server.client().put_object(Bucket=bucket, Key=key, Body=body)


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_s3fs_has_an_atomic_create(storage: FsspecStorage) -> None:
    assert storage.atomic_create is True
    assert storage.is_local is False
    assert storage.remove_temporaries("any/where", "shard") == []


def test_write_commit_read_round_trip(
    server: S3Server, bucket: str, storage: FsspecStorage
) -> None:
    directory = f"{bucket}/run/step-1"
    storage.makedirs(directory)
    assert storage.list_dir(directory) == []
    state = sd()
    record = storage.write_file(state, f"s3://{directory}/{SHARD}")  # a URL is accepted
    data = storage.read_bytes(f"{directory}/{SHARD}")
    assert record == {
        "name": SHARD,
        "nbytes": len(data),
        "xxh3_64": xxhash.xxh3_64_hexdigest(data),
    }
    # the checksum trailer, as LocalStorage writes it
    assert data[-53:-37] == b"aiockpt:xxh3_64:"
    assert data[-37:].decode() == f"{xxhash.xxh3_64_hexdigest(data[:-53])}:{len(data) - 53:020d}"
    loaded = torch.load(io.BytesIO(data), weights_only=True)
    assert torch.equal(loaded["w"], state["w"]) and loaded["n"] == 3

    with pytest.raises(CheckpointNotFoundError, match="holds no committed checkpoint"):
        storage.read_metadata(directory)
    storage.commit(directory, [record], {"step": 1})
    meta = storage.read_metadata(directory)
    assert meta["files"] == [record] and meta["extra"] == {"step": 1}
    assert meta["format"] == "aiockpt" and meta["version"] == 1 and meta["world_size"] == 1
    assert storage.list_dir(directory) == sorted([SHARD, "metadata.json"])
    assert storage.list_dir(f"{bucket}/run") == ["step-1"]
    assert storage.list_dir(f"{bucket}/nothing-here") == []
    assert storage.list_dir(f"{directory}/{SHARD}") == []  # a file is no directory
    assert server.keys(bucket) == ["run/step-1/metadata.json", f"run/step-1/{SHARD}"]
    with pytest.raises(CheckpointNotFoundError, match=r"'.*/step-1/missing\.pt' does not exist"):
        storage.read_bytes(f"{directory}/missing.pt")


def test_a_second_commit_is_refused_and_the_first_stays(
    server: S3Server, bucket: str, storage: FsspecStorage
) -> None:
    directory = f"{bucket}/run/step-2"
    record = storage.write_file(sd(), f"{directory}/{SHARD}")
    storage.commit(directory, [record], {"writer": "first"})
    before = server.client().get_object(Bucket=bucket, Key="run/step-2/metadata.json")
    first = before["Body"].read()
    with pytest.raises(StorageError) as info:
        storage.commit(directory, [record], {"writer": "second"})
    assert str(info.value) == (
        f"'{directory}/metadata.json' exists already: another writer committed "
        f"'{directory}' first; it is never replaced"
    )
    assert info.value.path == f"{directory}/metadata.json"
    after = server.client().get_object(Bucket=bucket, Key="run/step-2/metadata.json")
    assert after["Body"].read() == first and after["ETag"] == before["ETag"]
    assert json.loads(first)["extra"] == {"writer": "first"}
    assert storage.read_metadata(directory)["extra"] == {"writer": "first"}


def test_damaged_metadata_is_a_corrupt_checkpoint(
    server: S3Server, bucket: str, storage: FsspecStorage
) -> None:
    put(server, bucket, "run/step-3/metadata.json", b"{not json")
    with pytest.raises(CorruptCheckpointError, match="is not valid metadata") as info:
        storage.read_metadata(f"{bucket}/run/step-3")
    assert info.value.path == f"{bucket}/run/step-3/metadata.json"
    put(server, bucket, "run/step-4/metadata.json", json.dumps({"format": "x"}).encode())
    with pytest.raises(CorruptCheckpointError, match='no "format": "aiockpt"'):
        storage.read_metadata(f"{bucket}/run/step-4")


def test_remove_tree_deletes_the_metadata_first(
    server: S3Server, bucket: str, storage: FsspecStorage
) -> None:
    for step in ("step-1", "step-10"):  # a prefix of the other's name: left alone
        directory = f"{bucket}/run/{step}"
        storage.commit(directory, [storage.write_file(sd(), f"{directory}/{SHARD}")], {})
    seen: list[list[str]] = []
    real_rm = storage.fs.rm

    def failing_rm(path: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append(server.keys(bucket))
        raise PermissionError(13, "Access Denied")

    storage.fs.rm = failing_rm
    try:
        with pytest.raises(StorageError, match=r"cannot delete checkpoint '.*/run/step-1'") as err:
            storage.remove_tree(f"{bucket}/run/step-1")
    finally:
        storage.fs.rm = real_rm
    assert "access denied" in str(err.value)
    # un-committed before anything else went: its data file is still there, its metadata not
    assert seen == [[f"run/step-1/{SHARD}", "run/step-10/metadata.json", f"run/step-10/{SHARD}"]]
    storage.remove_tree(f"{bucket}/run/step-1")
    assert server.keys(bucket) == ["run/step-10/metadata.json", f"run/step-10/{SHARD}"]
    storage.remove_tree(f"{bucket}/run/step-1")  # missing: no error
    storage.remove_tree(f"{bucket}/run/step-10")
    assert server.keys(bucket) == []
    assert storage.list_dir(f"{bucket}/run") == []


def test_lease_excludes_a_second_holder_until_released(server: S3Server, bucket: str) -> None:
    storage = FsspecStorage(make_fs(server.endpoint), lease_ttl=3.0)
    directory = f"{bucket}/run"
    first = storage.lock(directory)
    first.acquire()
    assert first.held
    lease = lease_of(server, bucket, "run/.aiockpt.lease")
    assert (lease["host"], lease["pid"], lease["renewal"]) == (HOST, os.getpid(), 0)
    second = storage.lock(directory)
    started = time.monotonic()
    with pytest.raises(DirectoryLockedError) as info:
        second.acquire()
    assert info.value.holder == f"pid {os.getpid()} on host {HOST}"
    assert str(info.value) == (
        f"'{directory}' is in use by another checkpoint manager ({info.value.holder}), which "
        f"holds its lease '{directory}/.aiockpt.lease' and renews it: one process writes a "
        "directory at a time. Stop that job (and any worker process it left running), or use "
        "another directory"
    )
    assert time.monotonic() - started < 3.0  # raised on seeing a renewal, before the ttl
    assert not second.held
    assert lease_of(server, bucket, "run/.aiockpt.lease")["renewal"] >= 1  # renewed
    assert lease_of(server, bucket, "run/.aiockpt.lease")["token"] == lease["token"]
    first.check()
    first.release()
    first.release()  # idempotent
    assert server.keys(bucket) == []
    with pytest.raises(DirectoryLockedError, match="is not held"):
        first.check()
    second.acquire()
    assert lease_of(server, bucket, "run/.aiockpt.lease")["token"] != lease["token"]
    second.release()
    assert server.keys(bucket) == []


def test_lease_of_a_dead_process_on_this_host_is_taken_over_at_once(
    server: S3Server, bucket: str, storage: FsspecStorage
) -> None:
    pid = dead_pid()
    body = {"host": HOST, "pid": pid, "token": "old", "renewal": 7, "ttl": 30.0}
    put(server, bucket, "run/.aiockpt.lease", json.dumps(body).encode())
    lock = storage.lock(f"{bucket}/run")  # lease_ttl 30 s: not waited for
    started = time.monotonic()
    lock.acquire()
    assert time.monotonic() - started < 5
    lease = lease_of(server, bucket, "run/.aiockpt.lease")
    assert (lease["host"], lease["pid"], lease["renewal"]) == (HOST, os.getpid(), 0)
    lock.release()
    assert server.keys(bucket) == []


def test_lease_of_another_host_is_taken_over_once_not_renewed_for_its_ttl(
    server: S3Server, bucket: str
) -> None:
    body = {"host": "other-host", "pid": 1, "token": "theirs", "renewal": 3, "ttl": 1.0}
    put(server, bucket, "run/.aiockpt.lease", json.dumps(body).encode())
    lock = FsspecStorage(make_fs(server.endpoint), lease_ttl=1.0).lock(f"{bucket}/run")
    started = time.monotonic()
    lock.acquire()
    assert time.monotonic() - started >= 1.0
    assert lease_of(server, bucket, "run/.aiockpt.lease")["pid"] == os.getpid()
    lock.release()


def test_a_holder_that_lost_its_lease_knows_it(server: S3Server, bucket: str) -> None:
    lock = FsspecStorage(make_fs(server.endpoint), lease_ttl=0.6).lock(f"{bucket}/run")
    lock.acquire()
    body = {"host": "other-host", "pid": 1, "token": "theirs", "renewal": 0, "ttl": 0.6}
    put(server, bucket, "run/.aiockpt.lease", json.dumps(body).encode())  # taken over
    deadline = time.monotonic() + 5
    while not lock.lost and time.monotonic() < deadline:
        time.sleep(0.05)
    assert lock.lost and not lock.held
    with pytest.raises(DirectoryLockedError, match="lost its lease"):
        lock.check()
    lock.release()  # not ours any more: left alone
    assert lease_of(server, bucket, "run/.aiockpt.lease")["token"] == "theirs"


def test_a_missing_bucket_is_a_storage_error_naming_it(server: S3Server) -> None:
    storage = FsspecStorage(make_fs(server.endpoint))
    expected = (
        "the bucket 'no-such-bucket' does not exist: create it, or correct the bucket name "
        "in the path"
    )
    with pytest.raises(StorageError) as info:
        storage.makedirs("no-such-bucket/run")
    assert str(info.value) == f"cannot create checkpoint directory 'no-such-bucket/run': {expected}"
    with pytest.raises(StorageError) as info:
        storage.write_file(sd(), f"no-such-bucket/run/step-1/{SHARD}")
    assert str(info.value) == f"cannot write 'no-such-bucket/run/step-1/{SHARD}': {expected}"
    assert info.value.path == f"no-such-bucket/run/step-1/{SHARD}"
    with pytest.raises(StorageError, match=expected):
        storage.commit("no-such-bucket/run/step-1", [], {})
    with pytest.raises(StorageError, match=expected):
        storage.list_dir("no-such-bucket/run")
    with pytest.raises(StorageError, match=expected):
        storage.read_bytes(f"no-such-bucket/run/step-1/{SHARD}")
    with pytest.raises(StorageError, match=expected):
        storage.lock("no-such-bucket/run").acquire()


def test_refused_credentials_are_a_storage_error_saying_so(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # moto checks signatures once this many requests went through (the readiness probe)
    monkeypatch.setenv("INITIAL_NO_AUTH_ACTION_COUNT", "1")
    with S3Server() as strict:
        storage = FsspecStorage(make_fs(strict.endpoint, key="wrong", secret="wrong"))
        with pytest.raises(StorageError) as info:
            storage.write_file(sd(), f"some-bucket/run/{SHARD}")
        assert str(info.value) == (
            f"cannot write 'some-bucket/run/{SHARD}': the credentials were refused "
            "(InvalidAccessKeyId: The AWS Access Key Id you provided does not exist in our "
            "records.): check the key and secret (or the profile, role or environment) the "
            "filesystem was built with"
        )
        with pytest.raises(StorageError) as info:
            storage.makedirs("some-bucket/run")  # a HEAD request: a bare 403, no error code
        assert str(info.value) == (
            "cannot create checkpoint directory 'some-bucket/run': access denied (403: "
            "Forbidden): the credentials the filesystem was built with are wrong, or lack "
            "permission for this path: check them and the bucket's policy"
        )


def test_an_unreachable_endpoint_is_a_storage_error() -> None:
    from s3_server import free_port

    fs = s3fs.S3FileSystem(
        endpoint_url=f"http://127.0.0.1:{free_port()}",
        key=ACCESS_KEY,
        secret=SECRET_KEY,
        client_kwargs={"region_name": REGION},
        config_kwargs={"retries": {"max_attempts": 1}, "connect_timeout": 1},
        skip_instance_cache=True,
    )
    with pytest.raises(StorageError, match="cannot reach the storage endpoint"):
        FsspecStorage(fs).commit("bkt/run/step-1", [], {})


def test_pickles_with_its_filesystem(server: S3Server, bucket: str) -> None:
    storage = FsspecStorage(make_fs(server.endpoint), lease_ttl=12.0)
    copy = pickle.loads(pickle.dumps(storage))
    assert isinstance(copy, FsspecStorage) and copy is not storage
    assert (copy.lease_ttl, copy.atomic_create, copy.is_local) == (12.0, True, False)
    record = copy.write_file(sd(), f"{bucket}/run/{SHARD}")
    assert (
        xxhash.xxh3_64_hexdigest(storage.read_bytes(f"{bucket}/run/{SHARD}")) == record["xxh3_64"]
    )


def test_a_large_file_goes_up_in_parts(server: S3Server, bucket: str) -> None:
    fs = make_fs(server.endpoint)
    fs.default_block_size = 5 * 2**20  # the smallest part S3 takes
    storage = FsspecStorage(fs)
    state = {"big": torch.randn(3 * 2**20), "small": torch.ones(3)}  # 12 MiB: 3 parts
    record = storage.write_file(state, f"{bucket}/run/{SHARD}")
    data = storage.read_bytes(f"{bucket}/run/{SHARD}")
    assert record["nbytes"] == len(data) > 12 * 2**20
    assert record["xxh3_64"] == xxhash.xxh3_64_hexdigest(data)
    assert torch.equal(torch.load(io.BytesIO(data), weights_only=True)["big"], state["big"])
    etag = server.client().head_object(Bucket=bucket, Key=f"run/{SHARD}")["ETag"]
    assert etag.endswith('-3"')  # a multipart upload of 3 parts


def test_a_failed_write_publishes_nothing(server: S3Server, bucket: str) -> None:
    fs = make_fs(server.endpoint)
    fs.default_block_size = 5 * 2**20
    storage = FsspecStorage(fs)

    class Unpicklable:
        def __reduce__(self) -> Any:
            raise RuntimeError("cannot pickle this")

    state = {"big": torch.randn(3 * 2**20), "bad": Unpicklable()}
    with pytest.raises(RuntimeError, match="cannot pickle this"):
        storage.write_file(state, f"{bucket}/run/{SHARD}")
    assert server.keys(bucket) == []
    uploads = server.client().list_multipart_uploads(Bucket=bucket)
    assert uploads.get("Uploads", []) == []


@pytest.mark.parametrize("protocol", ["memory", "file"])
def test_other_filesystems(protocol: str, tmp_path: Any) -> None:
    fs = fsspec.filesystem(protocol, skip_instance_cache=True)
    root = f"/aiockpt-test-{uuid.uuid4().hex[:8]}" if protocol == "memory" else str(tmp_path)
    storage = FsspecStorage(fs, lease_ttl=0.9)
    assert storage.atomic_create is (protocol == "memory")  # local: exists-check, then write
    directory = f"{root}/run/step-1"
    storage.makedirs(directory)
    record = storage.write_file(sd(), f"{directory}/{SHARD}")
    storage.commit(directory, [record], {"k": 1})
    with pytest.raises(StorageError, match="another writer committed"):
        storage.commit(directory, [record], {"k": 2})
    assert storage.read_metadata(directory)["extra"] == {"k": 1}
    assert storage.list_dir(directory) == sorted([SHARD, "metadata.json"])
    assert torch.equal(
        torch.load(io.BytesIO(storage.read_bytes(f"{directory}/{SHARD}")))["w"], sd()["w"]
    )
    first, second = storage.lock(f"{root}/run"), storage.lock(f"{root}/run")
    first.acquire()
    with pytest.raises(DirectoryLockedError):
        second.acquire()
    first.release()
    second.acquire()
    second.release()
    storage.remove_tree(directory)
    assert storage.list_dir(f"{root}/run") == []


def test_manager_end_to_end(server: S3Server, bucket: str) -> None:
    storage = FsspecStorage(make_fs(server.endpoint))
    directory = f"{bucket}/run"
    with aiockpt.CheckpointManager(directory, keep_last=2, storage=storage) as mgr:
        assert mgr.latest_step() is None
        for step in (1, 2, 3):
            mgr.save(step, {"w": torch.full((1000,), float(step)), "step": step})
            mgr.poll(blocking=True)
        assert mgr.committed_steps() == [2, 3]
        assert server.keys(bucket, "run/.aiockpt.lease") == ["run/.aiockpt.lease"]
    assert server.keys(bucket, "run/.aiockpt.lease") == []  # released on close
    names = sorted({key.split("/")[1] for key in server.keys(bucket)})
    assert names == ["step-000000000002", "step-000000000003"]
    with aiockpt.CheckpointManager(directory, keep_last=2, storage=storage) as mgr:
        assert mgr.committed_steps() == [2, 3] and mgr.latest_step() == 3
        restored = mgr.restore()
        assert torch.equal(restored["w"], torch.full((1000,), 3.0)) and restored["step"] == 3
        assert mgr.restore(step=2)["step"] == 2
