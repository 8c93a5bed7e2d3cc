"""DCP checkpoints written, or tampered with, by someone else: every data file is read
through the descriptor that was checked (never followed through a link, never a FIFO,
never past its end), and damaged metadata is a typed error saying so."""

from __future__ import annotations

import os
import pickle
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from ckpt_helpers import data_file
from test_dcp import _rewrite_checksums, _save_one_process, assert_values, plain_state
from test_hostile_dirs import cli

import aiockpt.dcp
import aiockpt.storage._local
from aiockpt import CorruptCheckpointError
from aiockpt._exceptions import UntrustedEntryError

DATA = "__0_0.distcp"


def _plain(path: Path, offset: float = 0) -> Path:
    """A checkpoint as plain ``dcp.save`` writes it: no checksum sidecar."""
    w = torch.arange(64.0) + offset
    dcp.save({"w": w, "n": 3}, checkpoint_id=path)
    return path


def _load_plain(path: Path) -> dict[str, Any]:
    state = {"w": torch.zeros(64), "n": 0}
    aiockpt.dcp.load(state, path)
    return state


def _assert_one_line_failure(out: subprocess.CompletedProcess[str], *needles: str) -> None:
    """``aiockpt verify`` failed with one line on stderr, not a traceback."""
    assert out.returncode == 1, (out.stdout, out.stderr)
    assert "Traceback" not in out.stderr
    (line,) = out.stderr.splitlines()
    assert line.startswith("FAILED: ")
    for needle in needles:
        assert needle in line, line


def _assert_bad_row(out: subprocess.CompletedProcess[str], name: str, *needles: str) -> None:
    """``aiockpt ls`` listed ``name`` as one BAD row, with no traceback."""
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr and out.stderr == ""
    (row,) = [line for line in out.stdout.splitlines() if line.startswith(name)]
    assert "BAD: " in row
    for needle in needles:
        assert needle in row, row


# -- reading a checkpoint without a sidecar ----------------------------------------------


def test_a_plain_dcp_data_file_that_is_a_symlink_is_refused(tmp_path: Path) -> None:
    ckpt = _plain(tmp_path / "ckpt")
    outside = _plain(tmp_path / "outside", offset=100)
    (ckpt / DATA).unlink()
    (ckpt / DATA).symlink_to(outside / DATA)  # a well-formed file, elsewhere
    with pytest.raises(UntrustedEntryError, match=r"__0_0\.distcp' is a symlink") as info:
        _load_plain(ckpt)
    assert info.value.path == str(ckpt / DATA)


@pytest.mark.timeout(60)  # opening a FIFO for reading blocks until a writer comes
def test_a_plain_dcp_data_file_that_is_a_fifo_fails_at_once(tmp_path: Path) -> None:
    ckpt = _plain(tmp_path / "ckpt")
    (ckpt / DATA).unlink()
    os.mkfifo(ckpt / DATA)
    with pytest.raises(UntrustedEntryError, match=r"__0_0\.distcp' is a FIFO, not a regular"):
        _load_plain(ckpt)


def test_a_plain_dcp_data_file_shorter_than_its_metadata_says_is_corrupt(
    tmp_path: Path,
) -> None:
    ckpt = _plain(tmp_path / "ckpt")
    size = (ckpt / DATA).stat().st_size
    os.truncate(ckpt / DATA, size // 2)
    with pytest.raises(CorruptCheckpointError, match=rf"has {size // 2} bytes, \.metadata") as info:
        _load_plain(ckpt)
    assert "truncated" in str(info.value)
    assert info.value.path == str(ckpt / DATA)


def test_a_plain_dcp_checkpoint_still_loads(tmp_path: Path) -> None:
    state = _load_plain(_plain(tmp_path / "ckpt", offset=5))
    assert torch.equal(state["w"], torch.arange(64.0) + 5) and state["n"] == 3


# -- the bytes checked are the bytes read --------------------------------------------------


@pytest.mark.parametrize("swap", ["symlink", "rename"])
def test_a_data_file_swapped_after_its_check_is_not_what_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, swap: str
) -> None:
    """Between the checksum check and the read, the data file is replaced by another
    checkpoint's (a link to it, or a copy renamed over it): the load still reads the bytes
    it checked."""
    ckpt, other = tmp_path / "ckpt", tmp_path / "other"
    _save_one_process(ckpt, 0)
    _save_one_process(other, 1)  # same layout, other values
    mine, theirs = data_file(ckpt, DATA), data_file(other, DATA)
    real_hash = aiockpt.storage._local.hash_prefix
    swapped: list[str] = []

    def hash_then_swap(fd: int, nbytes: int, path: str) -> str:
        digest = real_hash(fd, nbytes, path)
        if not swapped:
            staged = ckpt / "staged"
            if swap == "symlink":
                staged.symlink_to(theirs)
            else:
                staged.write_bytes(theirs.read_bytes())
            os.replace(staged, mine)
            swapped.append(path)
        return digest

    monkeypatch.setattr(aiockpt.storage._local, "hash_prefix", hash_then_swap)
    state = plain_state()
    aiockpt.dcp.load(state, ckpt)
    assert swapped == [str(mine)]
    assert_values(state, 0)


# -- damaged metadata is a typed error -----------------------------------------------------


def _metadata_without(ckpt: Path, edit: Any) -> bytes:
    from torch.distributed.checkpoint.metadata import Metadata

    meta = pickle.loads((ckpt / ".metadata").read_bytes())
    assert isinstance(meta, Metadata)
    edit(meta)
    return pickle.dumps(meta)


def _drop_a_storage_record(meta: Any) -> None:
    key = next(k for k in meta.storage_data if k.fqn == "w")
    del meta.storage_data[key]


GARBLED = {
    "truncated": lambda ckpt: (ckpt / ".metadata").read_bytes()[:-20],
    "random bytes": lambda ckpt: bytes(range(256)) * 4,
    "a str for its items": lambda ckpt: _metadata_without(
        ckpt, lambda m: setattr(m, "state_dict_metadata", "items")
    ),
    "an item that is an int": lambda ckpt: _metadata_without(
        ckpt, lambda m: m.state_dict_metadata.__setitem__("w", 5)
    ),
    "a chunk with no storage": lambda ckpt: _metadata_without(ckpt, _drop_a_storage_record),
}


@pytest.mark.parametrize("damage", sorted(GARBLED))
def test_garbled_metadata_is_reported_as_corrupt_metadata(tmp_path: Path, damage: str) -> None:
    ckpt = _plain(tmp_path / "ckpt")
    (ckpt / ".metadata").write_bytes(GARBLED[damage](ckpt))
    with pytest.raises(CorruptCheckpointError, match=r"\.metadata' is not (a readable|valid) DCP"):
        _load_plain(ckpt)


@pytest.mark.parametrize("storage_meta", ["a str", 5])
def test_metadata_with_a_storage_meta_of_the_wrong_type_is_corrupt(
    tmp_path: Path, storage_meta: object
) -> None:
    ckpt = tmp_path / "ckpt"
    _save_one_process(ckpt)
    data = _metadata_without(ckpt, lambda m: setattr(m, "storage_meta", storage_meta))
    (ckpt / ".metadata").write_bytes(data)
    _rewrite_checksums(ckpt, ".metadata", data)  # consistent: only the content is wrong
    kind = type(storage_meta).__name__
    with pytest.raises(CorruptCheckpointError, match=rf"storage_meta is a {kind}, not"):
        aiockpt.dcp.load(plain_state(), ckpt)
    _assert_one_line_failure(cli("verify", str(ckpt)), f"storage_meta is a {kind}")


def test_a_deeply_nested_sidecar_is_corrupt(tmp_path: Path) -> None:
    ckpt = tmp_path / "step-000000000001"
    _save_one_process(ckpt)
    depth = 100_000
    (ckpt / ".metadata.checksums").write_text("[" * depth + "]" * depth)
    with pytest.raises(CorruptCheckpointError, match=r"\.metadata\.checksums' is not valid JSON"):
        aiockpt.dcp.load(plain_state(), ckpt)
    with pytest.raises(CorruptCheckpointError, match="nested too deeply"):
        aiockpt.dcp.verify_dcp(str(ckpt))
    _assert_one_line_failure(cli("verify", str(ckpt)), "is not valid JSON")
    _assert_bad_row(cli("ls", str(tmp_path)), ckpt.name, "is not valid JSON")
