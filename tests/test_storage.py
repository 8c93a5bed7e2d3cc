"""The on-disk format: atomic writes, checksums, verification, safe loading."""

from __future__ import annotations

import io
import json
import os
import random
import stat
import struct
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy
import pytest
import torch
import xxhash
from ckpt_helpers import Opaque

from aiockpt import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    InvalidRequestError,
    UnsafeCheckpointError,
    aload,
    load,
    verify,
)
from aiockpt.storage._atomic import write_atomic
from aiockpt.storage._local import save_file, write_metadata


def committed_dir(tmp_path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    ck = tmp_path / "ck"
    ck.mkdir()
    record = save_file(tensors, str(ck / "shard-00000-of-00001.pt"))
    write_metadata(str(ck), [record], {"step": 1})
    return ck


def test_save_file_is_loadable_and_checksummed(tmp_path: Path) -> None:
    sd = {"w": torch.randn(100, 100), "n": 3}
    record = save_file(sd, str(tmp_path / "a.pt"))
    data = (tmp_path / "a.pt").read_bytes()
    assert data[-53:-37] == b"aiockpt:xxh3_64:"
    assert data[-37:].decode() == f"{xxhash.xxh3_64(data[:-53]).hexdigest()}:{len(data) - 53:020d}"
    assert record == {
        "name": "a.pt",
        "nbytes": len(data),
        "xxh3_64": xxhash.xxh3_64(data).hexdigest(),
    }
    assert torch.equal(torch.load(tmp_path / "a.pt", weights_only=True)["w"], sd["w"])
    assert os.listdir(tmp_path) == ["a.pt"]


def test_failed_write_leaves_the_previous_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "a.pt"
    save_file({"v": torch.ones(4)}, str(target))
    before = target.read_bytes()

    def half_then_fail(f: object) -> None:
        f.write(b"partial")  # type: ignore[attr-defined]
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        write_atomic(str(target), half_then_fail)
    assert target.read_bytes() == before
    assert os.listdir(tmp_path) == ["a.pt"]


def test_verify_and_load_name_a_corrupted_file(tmp_path: Path) -> None:
    ck = committed_dir(tmp_path, {"w": torch.arange(1000.0)})
    shard = ck / "shard-00000-of-00001.pt"
    assert verify(str(ck)) == [str(shard)]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match="checksum") as info:
        verify(str(ck))
    assert info.value.path == str(shard)
    with pytest.raises(CorruptCheckpointError, match=r"shard-00000-of-00001\.pt"):
        load(ck)
    shard.write_bytes(bytes(data[:-10]))
    with pytest.raises(CorruptCheckpointError, match="truncated"):
        load(ck)
    # verify=False skips the check; a damaged zip still fails, as a CorruptCheckpointError.
    shard.write_bytes(bytes(data[:-200]))
    with pytest.raises(CorruptCheckpointError):
        load(ck, verify=False)


def test_metadata_cannot_point_outside_the_checkpoint(tmp_path: Path) -> None:
    ck = committed_dir(tmp_path, {"w": torch.ones(2)})
    meta = json.loads((ck / "metadata.json").read_text())
    for evil in ("../secret.pt", "/etc/passwd", "sub/x.pt", ".."):
        meta["files"][0]["name"] = evil
        (ck / "metadata.json").write_text(json.dumps(meta))
        with pytest.raises(CorruptCheckpointError, match="leave the checkpoint"):
            load(ck)
        with pytest.raises(CorruptCheckpointError, match="leave the checkpoint"):
            verify(str(ck))


def test_a_huge_world_size_in_metadata_is_refused_before_anything_is_built(
    tmp_path: Path,
) -> None:
    ck = committed_dir(tmp_path, {"w": torch.ones(2)})
    meta = json.loads((ck / "metadata.json").read_text())
    meta["world_size"] = 100_000_000  # would build 10^8 shard names
    (ck / "metadata.json").write_text(json.dumps(meta))
    for check in (load, lambda p: verify(str(p))):
        with pytest.raises(CorruptCheckpointError, match=r"1 shard file.* world size of 100000000"):
            check(ck)


def test_uncommitted_directory_is_not_a_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "half").mkdir()
    save_file({"w": torch.ones(2)}, str(tmp_path / "half" / "shard-00000-of-00001.pt"))
    with pytest.raises(
        CheckpointNotFoundError, match=r"no committed checkpoint \(no metadata.json\)"
    ):
        load(tmp_path / "half")
    (tmp_path / "half" / "metadata.json").write_text("{not json")
    with pytest.raises(CorruptCheckpointError, match="not valid metadata"):
        load(tmp_path / "half")


def test_arbitrary_objects_need_an_explicit_opt_in(tmp_path: Path) -> None:
    torch.save({"obj": Opaque(7), "w": torch.ones(1)}, tmp_path / "pickled.pt")
    with pytest.raises(UnsafeCheckpointError, match="weights_only=False"):
        load(tmp_path / "pickled.pt")
    assert load(tmp_path / "pickled.pt", weights_only=False)["obj"].value == 7


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_async_load_checks_and_loads(tmp_path: Path, anyio_backend: str) -> None:
    ck = committed_dir(tmp_path, {"w": torch.arange(10.0)})
    out = await aload(ck)
    assert torch.equal(out["w"], torch.arange(10.0))
    shard = ck / "shard-00000-of-00001.pt"
    data = shard.read_bytes()
    shard.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    with pytest.raises(CorruptCheckpointError, match="checksum"):
        await aload(ck)


# -- single files carry their checksum ------------------------------------------------------


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


def test_single_file_carries_a_checksum_that_load_and_verify_check(tmp_path: Path) -> None:
    target = tmp_path / "model.pt"
    save_file({"w": torch.arange(5000.0)}, str(target))
    assert zipfile.ZipFile(target).comment.startswith(b"aiockpt:xxh3_64:")
    assert torch.equal(torch.load(target, weights_only=True)["w"], torch.arange(5000.0))
    assert verify(str(target)) == [str(target)]
    # Inside the tensor data: torch.load alone does not notice.
    flip(target, target.read_bytes().index(struct.pack("<f", 700.0)))
    assert torch.load(target, weights_only=True)["w"][700] != 700.0
    with pytest.raises(CorruptCheckpointError, match="checksum") as info:
        load(target)
    assert info.value.path == str(target)
    with pytest.raises(CorruptCheckpointError, match="checksum"):
        verify(str(target))
    assert load(target, verify=False)["w"].shape == (5000,)


def test_damaged_trailer_and_plain_torch_files(tmp_path: Path) -> None:
    target = tmp_path / "model.pt"
    save_file({"w": torch.ones(10)}, str(target))
    flip(target, -40)  # inside the trailer's digits
    with pytest.raises(CorruptCheckpointError, match="damaged aiockpt checksum trailer"):
        verify(str(target))
    plain = tmp_path / "plain.pt"
    torch.save({"w": torch.ones(3)}, plain)
    with pytest.raises(CorruptCheckpointError, match="carries no aiockpt checksum"):
        verify(str(plain))
    assert torch.equal(load(plain)["w"], torch.ones(3))  # nothing to check it against


@pytest.mark.parametrize("damage", ["one byte appended", "last byte cut", "flipped and cut"])
def test_a_file_cut_or_extended_after_its_trailer_is_corrupt_not_unchecked(
    tmp_path: Path, damage: str
) -> None:
    target = tmp_path / "model.pt"
    save_file({"w": torch.arange(1000.0) * 4}, str(target))
    data = target.read_bytes()
    if damage == "one byte appended":
        data += b"\0"
    elif damage == "last byte cut":
        data = data[:-1]
    else:  # a changed value that a trailer, if read, would catch
        i = data.index(struct.pack("<f", 400.0))
        data = data[:i] + struct.pack("<f", 1000.0) + data[i + 4 : -1]
    target.write_bytes(data)
    with pytest.raises(CorruptCheckpointError, match="cut from it or appended to it") as info:
        load(target)
    assert info.value.path == str(target)
    with pytest.raises(CorruptCheckpointError, match="cut from it or appended to it"):
        verify(str(target))


def test_overwriting_keeps_the_mode_of_the_replaced_file(tmp_path: Path) -> None:
    target = tmp_path / "secret.pt"
    save_file({"w": torch.ones(2)}, str(target))
    target.chmod(0o600)
    save_file({"w": torch.zeros(2)}, str(target))
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert torch.equal(load(target)["w"], torch.zeros(2))


HALF_THEN_BLOCK = """
import os, sys
from aiockpt.storage._atomic import write_atomic
def half(f):
    f.write(b"x" * 100_000)
    print("writing", flush=True)
    os.read(0, 1)  # blocks until killed
write_atomic(sys.argv[1], half)
"""


def test_temporary_file_of_a_killed_save_is_removed_by_the_next(tmp_path: Path) -> None:
    target = tmp_path / "model.pt"
    proc = subprocess.Popen(
        [sys.executable, "-c", HALF_THEN_BLOCK, str(target)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"writing\n"
        (left,) = [n for n in os.listdir(tmp_path) if ".tmp-" in n]
        proc.kill()
    finally:
        proc.wait(timeout=60)
        for pipe in (proc.stdin, proc.stdout):
            assert pipe is not None
            pipe.close()
    assert f"-{proc.pid}-" in left and not target.exists()
    save_file({"w": torch.ones(2)}, str(target))
    assert os.listdir(tmp_path) == ["model.pt"]


# -- what loads are given ---------------------------------------------------------------------


def test_random_or_damaged_bytes_are_corrupt_not_unsafe(tmp_path: Path) -> None:
    rng = random.Random(1234)
    junk = tmp_path / "junk.pt"
    for data in (
        bytes(rng.getrandbits(8) for _ in range(5000)),
        b"PK\x03\x04" + bytes(rng.getrandbits(8) for _ in range(5000)),
        b"",
    ):
        junk.write_bytes(data)
        with pytest.raises(CorruptCheckpointError) as info:
            load(junk)
        assert not isinstance(info.value, UnsafeCheckpointError)
    good = tmp_path / "good.pt"
    save_file({"w": torch.arange(100.0)}, str(good))
    whole = good.read_bytes()
    # Cut anywhere before the checksum trailer (which only torch.load's reader skips).
    for cut in range(0, len(whole) - 53, max(1, len(whole) // 40)):
        junk.write_bytes(whole[:cut])
        with pytest.raises(CorruptCheckpointError):
            load(junk, verify=False)
        with pytest.raises(CorruptCheckpointError):
            load(junk)


def test_missing_path_or_shard_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(CheckpointNotFoundError, match="does not exist"):
        load(tmp_path / "nothing.pt")
    with pytest.raises(CheckpointNotFoundError, match="does not exist"):
        verify(str(tmp_path / "nothing.pt"))
    ck = committed_dir(tmp_path, {"w": torch.ones(2)})
    (ck / "shard-00000-of-00001.pt").unlink()
    with pytest.raises(CheckpointNotFoundError, match="missing from the committed checkpoint"):
        load(ck)
    with pytest.raises(CheckpointNotFoundError, match="missing from the committed checkpoint"):
        verify(str(ck))


def test_rank_must_be_an_int(tmp_path: Path) -> None:
    ck = committed_dir(tmp_path, {"w": torch.ones(2)})
    for bad in ("0", 0.0, True):
        with pytest.raises(InvalidRequestError, match="rank must be an int"):
            load(ck, rank=bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError, match="no shard for rank 1"):
        load(ck, rank=1)
    assert torch.equal(load(ck, rank=numpy.int64(0))["w"], torch.ones(2))


def test_load_maps_the_file_instead_of_copying_it(tmp_path: Path) -> None:
    ck = committed_dir(tmp_path, {"w": torch.arange(2.0**16)})
    shard = str(ck / "shard-00000-of-00001.pt")
    state = load(ck)
    with open("/proc/self/maps") as maps:
        assert shard in maps.read()  # torch.load(mmap=True) of the checked file
    assert torch.equal(state["w"], torch.arange(2.0**16))


# -- metadata must describe exactly the checkpoint ------------------------------------------------


def two_rank_dir(tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    ck = tmp_path / "ck2"
    ck.mkdir()
    records = [
        save_file({"rank": torch.tensor(r)}, str(ck / f"shard-{r:05d}-of-00002.pt"))
        for r in range(2)
    ]
    write_metadata(str(ck), records, {"step": 1})
    return ck, json.loads((ck / "metadata.json").read_text())


def edits(meta: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    files = meta["files"]
    yield "swapped", {**meta, "files": [files[1], files[0]]}
    yield "duplicated", {**meta, "files": [files[0], files[0]]}
    yield "dropped", {**meta, "files": [files[0]]}
    yield "empty", {**meta, "files": []}
    yield "world_size", {**meta, "world_size": 3}
    yield "version", {**meta, "version": 2}
    yield "no version", {k: v for k, v in meta.items() if k != "version"}
    yield "foreign", {**meta, "files": [files[0], {**files[1], "name": "other.pt"}]}
    yield "size", {**meta, "files": [files[0], {**files[1], "nbytes": "12"}]}
    yield "digest", {**meta, "files": [files[0], {**files[1], "xxh3_64": None}]}
    yield "extra", {**meta, "extra": [1]}
    yield "not a dict", [meta]  # type: ignore[misc]


def test_edited_metadata_is_corrupt(tmp_path: Path) -> None:
    ck, meta = two_rank_dir(tmp_path)
    assert int(load(ck, rank=1)["rank"]) == 1
    refused = []
    for what, edited in edits(meta):
        (ck / "metadata.json").write_text(json.dumps(edited))
        with pytest.raises(CorruptCheckpointError, match="not valid aiockpt metadata"):
            load(ck, rank=0)
        with pytest.raises(CorruptCheckpointError, match="not valid aiockpt metadata"):
            verify(str(ck))
        refused.append(what)
    assert len(refused) == 12


def test_oversized_metadata_is_refused_without_reading_it_all(tmp_path: Path) -> None:
    ck, _ = two_rank_dir(tmp_path)
    with open(ck / "metadata.json", "r+b") as f:
        f.truncate(65 * 2**20)  # sparse: costs no disk
    with pytest.raises(CorruptCheckpointError, match="larger than"):
        load(ck, rank=0)


def test_a_damaged_pickle_in_a_valid_archive_is_corrupt_without_unsafe_advice(
    tmp_path: Path,
) -> None:
    good = tmp_path / "good.pt"
    torch.save({"w": torch.ones(2)}, good)
    damaged = tmp_path / "damaged.pt"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(damaged, "w") as dst:
        for name in src.namelist():
            data = src.read(name)
            if name.endswith("data.pkl"):
                # A dict, a key, then an opcode no unpickler knows.
                data = b"\x80\x02}q\x00(X\x01\x00\x00\x00aq\x01\xff\xff"
            dst.writestr(name, data)
    with pytest.raises(
        CorruptCheckpointError, match=r"it is damaged \(Unsupported operand"
    ) as info:
        load(damaged)
    assert not isinstance(info.value, UnsafeCheckpointError)
    assert "weights_only" not in str(info.value)


def test_trailer_does_not_depend_on_how_torch_splits_its_writes(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    torch.save({"w": torch.arange(300.0), "b": torch.ones(3)}, buffer)
    archive = buffer.getvalue()
    expected = (tmp_path / "whole.pt").as_posix()
    record = write_atomic(expected, lambda f: f.write(archive), trailer=True)
    want = Path(expected).read_bytes()
    rng = random.Random(7)
    for attempt in range(30):
        cuts = sorted(rng.sample(range(1, len(archive)), rng.randint(1, 60)))
        pieces = [archive[a:b] for a, b in zip([0, *cuts], [*cuts, len(archive)], strict=True)]
        path = (tmp_path / f"split{attempt}.pt").as_posix()
        got = write_atomic(
            path, lambda f, pieces=pieces: [f.write(p) for p in pieces], trailer=True
        )
        assert Path(path).read_bytes() == want and got["xxh3_64"] == record["xxh3_64"]
    assert torch.equal(load(expected)["w"], torch.arange(300.0))
    with pytest.raises(ValueError, match="not a zip archive"):
        write_atomic((tmp_path / "raw.pt").as_posix(), lambda f: f.write(b"raw"), trailer=True)
    assert sorted(p.name for p in tmp_path.iterdir() if ".tmp-" in p.name) == []


def test_a_legacy_torch_save_file_is_named_as_such_not_damaged(tmp_path: Path) -> None:
    legacy = tmp_path / "legacy.pt"
    torch.save({"w": torch.ones(2)}, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(CorruptCheckpointError, match="legacy \\(non-zip\\) format") as info:
        load(legacy)
    assert "damaged" not in str(info.value)


def test_loading_a_dcp_checkpoint_as_a_torch_one_says_how_to_load_it(tmp_path: Path) -> None:
    import torch.distributed.checkpoint as dcp

    dcp.save({"w": torch.ones(3)}, checkpoint_id=str(tmp_path / "dcp"))
    with pytest.raises(CheckpointNotFoundError, match=r"is a torch.distributed.checkpoint") as e:
        load(tmp_path / "dcp")
    assert "aiockpt.dcp.load" in str(e.value) and "save failed" not in str(e.value)
