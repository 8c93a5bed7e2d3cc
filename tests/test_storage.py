"""The on-disk format: atomic writes, checksums, verification, safe loading."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import xxhash
from ckpt_helpers import Opaque

from aiockpt import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    UnsafeCheckpointError,
    load,
    load_sync,
    verify,
)
from aiockpt._storage import save_file, write_atomic, write_metadata


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
        load_sync(ck)
    shard.write_bytes(bytes(data[:-10]))
    with pytest.raises(CorruptCheckpointError, match="truncated"):
        load_sync(ck)
    # verify=False skips the check; a damaged zip still fails, as a CorruptCheckpointError.
    shard.write_bytes(bytes(data[:-200]))
    with pytest.raises(CorruptCheckpointError):
        load_sync(ck, verify=False)


def test_metadata_cannot_point_outside_the_checkpoint(tmp_path: Path) -> None:
    ck = committed_dir(tmp_path, {"w": torch.ones(2)})
    meta = json.loads((ck / "metadata.json").read_text())
    for evil in ("../secret.pt", "/etc/passwd", "sub/x.pt", ".."):
        meta["files"][0]["name"] = evil
        (ck / "metadata.json").write_text(json.dumps(meta))
        with pytest.raises(CorruptCheckpointError, match="leave the checkpoint"):
            load_sync(ck)
        with pytest.raises(CorruptCheckpointError, match="leave the checkpoint"):
            verify(str(ck))


def test_uncommitted_directory_is_not_a_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "half").mkdir()
    save_file({"w": torch.ones(2)}, str(tmp_path / "half" / "shard-00000-of-00001.pt"))
    with pytest.raises(
        CheckpointNotFoundError, match=r"no committed checkpoint \(no metadata.json\)"
    ):
        load_sync(tmp_path / "half")
    (tmp_path / "half" / "metadata.json").write_text("{not json")
    with pytest.raises(CorruptCheckpointError, match="not valid metadata"):
        load_sync(tmp_path / "half")


def test_arbitrary_objects_need_an_explicit_opt_in(tmp_path: Path) -> None:
    torch.save({"obj": Opaque(7), "w": torch.ones(1)}, tmp_path / "pickled.pt")
    with pytest.raises(UnsafeCheckpointError, match="weights_only=False"):
        load_sync(tmp_path / "pickled.pt")
    assert load_sync(tmp_path / "pickled.pt", weights_only=False)["obj"].value == 7


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_async_load_checks_and_loads(tmp_path: Path, anyio_backend: str) -> None:
    ck = committed_dir(tmp_path, {"w": torch.arange(10.0)})
    out = await load(ck)
    assert torch.equal(out["w"], torch.arange(10.0))
    shard = ck / "shard-00000-of-00001.pt"
    data = shard.read_bytes()
    shard.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    with pytest.raises(CorruptCheckpointError, match="checksum"):
        await load(ck)
