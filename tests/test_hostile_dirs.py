"""A checkpoint directory written by someone else: links, FIFOs, devices, files where
directories belong. aiockpt must refuse each with a typed error, promptly, and never read,
write or delete through it."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from aiockpt import (
    CheckpointManager,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    DirectoryLockedError,
    StorageError,
    load,
    verify,
)
from aiockpt._exceptions import UntrustedEntryError
from aiockpt.storage._local import save_file, write_metadata

SHARD = "shard-00000-of-00001.pt"
ROOT = Path(__file__).resolve().parent.parent


def committed(directory: Path, value: float) -> Path:
    directory.mkdir(parents=True)
    record = save_file({"w": torch.full((4,), value)}, str(directory / SHARD))
    write_metadata(str(directory), [record], {"step": int(value)})
    return directory


def managed(tmp_path: Path, steps: list[int]) -> Path:
    ckpts = tmp_path / "ckpts"
    with CheckpointManager(ckpts, persistent=False) as mgr:
        for step in steps:
            mgr.save(step, {"w": torch.full((4,), float(step))})
        mgr.poll(blocking=True)
    return ckpts


def cli(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "aiockpt", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )


def test_planted_step_symlink_is_not_a_step(tmp_path: Path) -> None:
    outside = committed(tmp_path / "elsewhere", 99.0)
    ckpts = managed(tmp_path, [1])
    (ckpts / "step-000000000099").symlink_to(outside)
    with CheckpointManager(ckpts, keep_last=1, persistent=False) as mgr:
        assert mgr.latest_step() == 1 and mgr.committed_steps() == [1]
        assert float(mgr.restore()["w"][0]) == 1.0
        with pytest.raises(CheckpointNotFoundError, match="step 99"):
            mgr.restore(step=99)
        mgr.save(2, {"w": torch.zeros(4)})
        mgr.poll(blocking=True)  # retention runs: it must not delete through the link
        assert mgr.committed_steps() == [2]
    assert sorted(os.listdir(outside)) == ["metadata.json", SHARD]
    listing = cli("ls", str(ckpts))
    assert listing.returncode == 0, listing.stderr
    (bad,) = [line for line in listing.stdout.splitlines() if "step-000000000099" in line]
    assert "BAD: a link" in bad


def test_a_step_symlink_does_not_redirect_a_save(tmp_path: Path) -> None:
    ckpts = managed(tmp_path, [1])
    target = tmp_path / "victim"
    target.mkdir()
    (ckpts / "step-000000000005").symlink_to(target)
    (ckpts / "step-000000000006").write_bytes(b"a plain file named like a step")
    with CheckpointManager(ckpts, persistent=False) as mgr:
        with pytest.raises(UntrustedEntryError, match="is a symlink, not a directory"):
            mgr.save(5, {"w": torch.ones(4)})
        with pytest.raises(UntrustedEntryError, match="is a regular file, not a directory"):
            mgr.save(6, {"w": torch.ones(4)})
        assert mgr.committed_steps() == [1]
        mgr.save(7, {"w": torch.ones(4)})  # the refused steps did not block the next one
        mgr.poll(blocking=True)
    assert os.listdir(target) == []


def test_fifo_metadata_or_shard_fails_fast_instead_of_hanging(tmp_path: Path) -> None:
    ck = committed(tmp_path / "ck", 1.0)
    (ck / "metadata.json").unlink()
    os.mkfifo(ck / "metadata.json")
    for call in (lambda: load(ck), lambda: verify(str(ck))):
        with pytest.raises(UntrustedEntryError, match="is a FIFO, not a regular file") as info:
            call()
        assert info.value.path == str(ck / "metadata.json")
    listing = cli("ls", str(tmp_path))
    assert listing.returncode == 0 and "BAD:" in listing.stdout and "FIFO" in listing.stdout
    assert cli("verify", str(ck)).returncode == 1

    ck2 = committed(tmp_path / "ck2", 2.0)
    (ck2 / SHARD).unlink()
    os.mkfifo(ck2 / SHARD)
    with pytest.raises(UntrustedEntryError, match="is a FIFO"):
        load(ck2)
    single = tmp_path / "single.pt"
    os.mkfifo(single)
    with pytest.raises(UntrustedEntryError, match="is a FIFO"):
        load(single)
    bad = cli("verify", str(single))
    assert bad.returncode == 1 and "FIFO" in bad.stderr


def test_links_inside_a_checkpoint_are_not_followed(tmp_path: Path) -> None:
    ck = committed(tmp_path / "ck", 1.0)
    real = committed(tmp_path / "real", 1.0)
    (ck / SHARD).unlink()
    (ck / SHARD).symlink_to(real / SHARD)  # same bytes: only the link is wrong
    with pytest.raises(UntrustedEntryError, match="is a symlink"):
        load(ck)
    with pytest.raises(UntrustedEntryError, match="is a symlink"):
        verify(str(ck))
    (ck / SHARD).unlink()
    (ck / SHARD).symlink_to("/dev/zero")
    with pytest.raises(UntrustedEntryError, match="is a symlink"):
        load(ck)
    meta = ck / "metadata.json"
    meta.rename(tmp_path / "meta.json")
    meta.symlink_to(tmp_path / "meta.json")
    with pytest.raises(UntrustedEntryError, match=r"metadata\.json' is a symlink"):
        load(ck)


def test_device_files_are_refused_unopened(tmp_path: Path) -> None:
    ck = committed(tmp_path / "ck", 1.0)
    (ck / SHARD).unlink()
    try:
        os.mknod(ck / SHARD, stat.S_IFCHR | 0o600, os.makedev(1, 3))  # /dev/null's numbers
    except PermissionError:
        pytest.skip("cannot create a device node here")
    with pytest.raises(UntrustedEntryError, match="is a character device"):
        load(ck)
    with pytest.raises(UntrustedEntryError, match="is a character device"):
        verify(str(ck))


def test_ls_escapes_what_it_prints_and_survives_a_bad_step(tmp_path: Path) -> None:
    ckpts = managed(tmp_path, [1, 2])
    meta_path = ckpts / "step-000000000002" / "metadata.json"
    text = meta_path.read_text().replace('"step": 2', '"step": "\\u001b[31mEVIL\\u0007"')
    meta_path.write_text(text)
    (ckpts / "step-000000000001" / "metadata.json").write_text("{broken")
    listing = cli("ls", str(ckpts))
    assert listing.returncode == 0, listing.stderr
    assert "\x1b" not in listing.stdout and "\x07" not in listing.stdout
    lines = listing.stdout.splitlines()
    assert lines[1].startswith("step-000000000001") and "BAD: " in lines[1]
    assert lines[2].startswith("step-000000000002") and "\\x1b[31" in lines[2]


def test_verify_accepts_a_single_file(tmp_path: Path) -> None:
    target = tmp_path / "model.pt"
    save_file({"w": torch.ones(1000)}, str(target))
    ok = cli("verify", str(target))
    assert ok.returncode == 0, ok.stderr
    assert "1 file matches its checksum" in ok.stdout
    data = bytearray(target.read_bytes())
    data[100] ^= 0xFF
    target.write_bytes(bytes(data))
    bad = cli("verify", str(target))
    assert bad.returncode == 1 and "checksum" in bad.stderr and "Traceback" not in bad.stderr


def test_a_second_writer_in_the_same_directory_is_refused(tmp_path: Path) -> None:
    ckpts = managed(tmp_path, [1])
    code = "import sys, aiockpt; aiockpt.CheckpointManager(sys.argv[1])"
    with CheckpointManager(ckpts, persistent=False) as first:
        second = subprocess.run(
            [sys.executable, "-c", code, str(ckpts)], capture_output=True, text=True, timeout=60
        )
        assert second.returncode == 1
        assert "DirectoryLockedError" in second.stderr
        assert f"pid {os.getpid()} on host" in second.stderr
        assert first.latest_step() == 1


def test_a_planted_lock_link_is_refused_not_followed(tmp_path: Path) -> None:
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (ckpts / ".aiockpt.lock").symlink_to(victim)
    with pytest.raises(UntrustedEntryError, match=r"\.aiockpt\.lock' is a symlink"):
        CheckpointManager(ckpts)
    assert victim.read_text() == "precious"
    (ckpts / ".aiockpt.lock").unlink()
    os.mkfifo(ckpts / ".aiockpt.lock")
    with pytest.raises(UntrustedEntryError, match="is a FIFO"):
        CheckpointManager(ckpts)


def test_a_lock_file_hard_linked_to_an_outside_file_is_refused_not_overwritten(
    tmp_path: Path,
) -> None:
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    os.link(victim, ckpts / ".aiockpt.lock")
    with pytest.raises(UntrustedEntryError, match="has other hard links"):
        CheckpointManager(ckpts)
    assert victim.read_text() == "precious"


def test_a_locked_directory_with_an_oversized_lock_file_says_who_holds_it(
    tmp_path: Path,
) -> None:
    import fcntl

    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    lock = ckpts / ".aiockpt.lock"
    lock.write_text("pid 4242 on host elsewhere\n" + "x" * 10_000)
    fd = os.open(lock, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another holder
        before = len(os.listdir("/proc/self/fd"))
        with pytest.raises(DirectoryLockedError, match="pid 4242 on host elsewhere"):
            CheckpointManager(ckpts)
        assert len(os.listdir("/proc/self/fd")) == before  # no descriptor left behind
    finally:
        os.close(fd)


def test_a_filesystem_without_locks_is_a_typed_error_saying_what_to_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno
    import fcntl

    def no_locks(fd: int, op: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with pytest.raises(StorageError, match=r"does not support file locks .* pass lock=False"):
        CheckpointManager(tmp_path / "ckpts")
    # lock=False, the documented way out: saves and restores without flock.
    with CheckpointManager(tmp_path / "ckpts", lock=False, persistent=False) as mgr:
        mgr.save(1, {"w": torch.ones(2)})
        mgr.poll(blocking=True)
        assert mgr.committed_steps() == [1]
        assert torch.equal(mgr.restore()["w"], torch.ones(2))


def test_a_manager_directory_that_is_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "plain").write_text("not a directory")
    with pytest.raises(UntrustedEntryError, match="is a regular file, not a directory"):
        CheckpointManager(tmp_path / "plain")


def test_failed_and_successful_loads_leave_no_descriptor_open(tmp_path: Path) -> None:
    good = committed(tmp_path / "good", 1.0)
    fifo = committed(tmp_path / "fifo", 2.0)
    (fifo / SHARD).unlink()
    os.mkfifo(fifo / SHARD)
    flipped = committed(tmp_path / "flipped", 3.0)
    data = bytearray((flipped / SHARD).read_bytes())
    data[-100] ^= 1
    (flipped / SHARD).write_bytes(bytes(data))
    before = sorted(os.listdir("/proc/self/fd"))
    for _ in range(20):
        assert float(load(good)["w"][0]) == 1.0
        verify(str(good))
        for bad in (fifo, flipped, tmp_path / "missing"):
            with pytest.raises((CorruptCheckpointError, CheckpointNotFoundError)):
                load(bad)
    assert sorted(os.listdir("/proc/self/fd")) == before


def test_ls_lists_steps_in_numeric_order(tmp_path: Path) -> None:
    ckpts = managed(tmp_path, [2 * 10**11, 10**12])  # lexically, 10^12 would come first
    listing = cli("ls", str(ckpts))
    assert listing.returncode == 0, listing.stderr
    rows = [line.split() for line in listing.stdout.splitlines()[1:]]
    assert [row[:2] for row in rows] == [
        ["step-200000000000", "200000000000"],
        ["step-1000000000000", "1000000000000"],
    ]


def test_a_directory_named_like_a_dead_writers_temporary_file_does_not_stop_a_save(
    tmp_path: Path,
) -> None:
    from aiockpt.storage._atomic import _HOST, TMP_MARKER

    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    step = tmp_path / "ckpts" / "step-000000000001"
    step.mkdir(parents=True)
    planted = step / f".shard-00000-of-00001.pt{TMP_MARKER}{_HOST}-{dead.stdout.strip()}-0badc0de"
    planted.mkdir()
    with CheckpointManager(tmp_path / "ckpts", persistent=False) as mgr:
        mgr.save(1, {"w": torch.ones(3)})
        mgr.poll(blocking=True)
        assert mgr.committed_steps() == [1]
        assert torch.equal(mgr.restore()["w"], torch.ones(3))
    assert planted.is_dir()  # not ours to delete


def test_a_manager_directory_you_name_may_be_a_link_to_a_directory(tmp_path: Path) -> None:
    scratch = tmp_path / "scratch" / "run"
    scratch.mkdir(parents=True)
    (tmp_path / "ckpts").symlink_to(scratch)  # ckpts -> /scratch/run, as on clusters
    with CheckpointManager(tmp_path / "ckpts", persistent=False) as mgr:
        mgr.save(1, {"w": torch.ones(3)})
        mgr.poll(blocking=True)
        assert mgr.committed_steps() == [1]
    assert (scratch / "step-000000000001" / "metadata.json").is_file()
    with CheckpointManager(tmp_path / "ckpts", persistent=False) as mgr:
        assert torch.equal(mgr.restore()["w"], torch.ones(3))
    (tmp_path / "file").write_text("x")
    (tmp_path / "to-a-file").symlink_to(tmp_path / "file")
    with pytest.raises(UntrustedEntryError, match="is a symlink, not a directory"):
        CheckpointManager(tmp_path / "to-a-file")


def test_a_url_is_never_taken_for_a_relative_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # CheckpointManager("s3://bucket/run") used to create ./s3:/bucket/run and report
    # success: every entry point that takes a path refuses a URL, saying what to do.
    import aiockpt.dcp
    from aiockpt import (
        AsyncCheckpointManager,
        InvalidRequestError,
        StorageError,
        TorchCheckpoint,
        load,
        verify,
    )

    monkeypatch.chdir(tmp_path)
    for name in [n for n in os.environ if n.startswith(("AWS_", "GOOGLE_", "AZURE_"))]:
        monkeypatch.delenv(name)
    url = "s3://bucket/run"
    message = r"is a URL: aiockpt reads and writes local or mounted filesystem paths only"
    # The managers and load go to the store (none is reachable here): a typed error.
    with pytest.raises(StorageError, match="could not list 's3://bucket/run'"):
        CheckpointManager(url)
    with pytest.raises(InvalidRequestError, match="not http://"):
        AsyncCheckpointManager("http://bucket/run")
    with pytest.raises(StorageError, match="could not read 's3://bucket/run/step-"):
        load(url + "/step-000000000001")
    with pytest.raises(InvalidRequestError, match=message):
        verify(url)
    with pytest.raises(InvalidRequestError, match=message):
        aiockpt.dcp.load({"w": torch.zeros(2)}, url)
    ckpt = TorchCheckpoint(persistent=False)
    try:
        with pytest.raises(InvalidRequestError, match=message):
            ckpt.async_save({"w": torch.ones(2)}, "file:///tmp/x.pt")
        with pytest.raises(InvalidRequestError, match=message):
            ckpt.async_save_sharded({"w": torch.ones(2)}, url)
    finally:
        ckpt.close()
    assert os.listdir(tmp_path) == []  # no directory named "s3:" (or "gs:", "file:")
    for command in ("ls", "verify"):
        out = cli(command, url)
        assert out.returncode in (1, 2) and "could not list 's3://bucket/run'" in out.stderr
        assert "Traceback" not in out.stderr
