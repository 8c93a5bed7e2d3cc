"""The on-disk format: files ``torch.load`` reads, written atomically, with checksums.

A single-file checkpoint is one file. A sharded checkpoint is a directory with one file per
rank and a ``metadata.json`` written last, by rank 0, once every rank's file is durable: the
metadata is the commit marker, so a directory without it is not a checkpoint.

Every file is written under a temporary name in its final directory, fsync'd, renamed into
place, and the directory is fsync'd: a crash leaves the old file or the new one. The xxh64
checksum of the bytes is computed as they are written, never by reading them back.

This module knows nothing of queues, workers or event loops.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import uuid
from typing import Any

import torch
import xxhash

METADATA = "metadata.json"
FORMAT_VERSION = 1
TMP_MARKER = ".tmp-"


def shard_name(rank: int, world_size: int) -> str:
    """File name of ``rank``'s part of a sharded checkpoint."""
    return f"shard-{rank:05d}-of-{world_size:05d}.pt"


class _HashingWriter:
    """A write-only file object that hashes and counts the bytes passing through."""

    def __init__(self, raw: Any) -> None:
        self._raw = raw
        self._hash = xxhash.xxh64()
        self.nbytes = 0

    def write(self, data: Any) -> int:
        view = memoryview(data)
        self._hash.update(view)
        self.nbytes += view.nbytes
        written: int = self._raw.write(view)
        return written

    def flush(self) -> None:
        self._raw.flush()

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


def fsync_dir(directory: str) -> None:
    """Make a rename or a new file in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_path(path: str) -> str:
    """A unique temporary name beside ``path`` (hidden, recognisable for clean-up)."""
    directory, name = os.path.split(path)
    return os.path.join(directory, f".{name}{TMP_MARKER}{os.getpid()}-{uuid.uuid4().hex[:8]}")


def write_atomic(path: str, write: Any) -> dict[str, Any]:
    """Call ``write(file)`` on a temporary file, then fsync and rename it to ``path``.

    Returns ``{"name", "nbytes", "xxh64"}`` of what was written. On any failure the
    temporary file is removed and ``path`` is left as it was.
    """
    tmp = temp_path(path)
    try:
        with open(tmp, "wb", buffering=0) as raw:
            writer = _HashingWriter(raw)
            write(writer)
            os.fsync(raw.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(os.path.dirname(os.path.abspath(path)))
    return {"name": os.path.basename(path), "nbytes": writer.nbytes, "xxh64": writer.hexdigest()}


def save_file(state_dict: Any, path: str, **torch_save_kwargs: Any) -> dict[str, Any]:
    """``torch.save(state_dict, path)``, atomically and durably; returns the file record."""
    return write_atomic(path, lambda f: torch.save(state_dict, f, **torch_save_kwargs))


def write_metadata(directory: str, files: list[dict[str, Any]], extra: dict[str, Any]) -> str:
    """Commit a sharded checkpoint: write ``metadata.json`` (atomically) listing ``files``."""
    meta = {
        "format": "aiockpt",
        "version": FORMAT_VERSION,
        "created": time.time(),
        "world_size": len(files),
        "files": files,
        "extra": extra,
    }
    data = json.dumps(meta, indent=1, sort_keys=True).encode()
    path = os.path.join(directory, METADATA)
    write_atomic(path, lambda f: f.write(data))
    return path
