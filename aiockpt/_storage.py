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
import shutil
import time
import uuid
from collections.abc import Iterator
from typing import Any, Protocol

import torch
import torch.utils.serialization
import xxhash

from ._exceptions import CheckpointNotFoundError, CorruptCheckpointError

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
        self._hash = xxhash.xxh3_64()
        self.nbytes = 0
        # torch.save turns a failed write into a vague RuntimeError; keep the real cause.
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        view = memoryview(data)
        self._hash.update(view)
        self.nbytes += view.nbytes
        try:
            written: int = self._raw.write(view)
        except OSError as exc:
            self.error = exc
            raise
        return written

    def flush(self) -> None:
        self._raw.flush()

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


def fsync_path(path: str) -> None:
    """fsync a file, or a directory (which makes a rename or a new file in it durable)."""
    fd = os.open(path, os.O_RDONLY)
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

    Returns ``{"name", "nbytes", "xxh3_64"}`` of what was written. On any failure the
    temporary file is removed and ``path`` is left as it was.
    """
    tmp = temp_path(path)
    writer: _HashingWriter | None = None
    try:
        with open(tmp, "wb", buffering=0) as raw:
            writer = _HashingWriter(raw)
            write(writer)
            os.fsync(raw.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if writer is not None and writer.error is not None and exc is not writer.error:
            raise writer.error from exc
        raise
    fsync_path(os.path.dirname(os.path.abspath(path)))
    assert writer is not None
    return {"name": os.path.basename(path), "nbytes": writer.nbytes, "xxh3_64": writer.hexdigest()}


@contextlib.contextmanager
def _no_crc32() -> Iterator[None]:
    config = getattr(getattr(torch.utils, "serialization", None), "config", None)
    save_config = getattr(config, "save", None)
    if save_config is None or not hasattr(save_config, "compute_crc32"):  # torch < 2.6
        yield
        return
    before = save_config.compute_crc32
    save_config.compute_crc32 = False
    try:
        yield
    finally:
        save_config.compute_crc32 = before


def save_file(state_dict: Any, path: str, **torch_save_kwargs: Any) -> dict[str, Any]:
    """``torch.save(state_dict, path)``, atomically and durably; returns the file record."""
    with _no_crc32():
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


def safe_join(directory: str, name: object) -> str:
    """``directory/name`` for a plain file name; anything that could leave ``directory``
    (a separator, ``..``, an absolute path, a NUL) is refused."""
    if (
        not isinstance(name, str)
        or not name
        or name in (".", "..")
        or "/" in name
        or "\\" in name
        or "\x00" in name
        or os.path.isabs(name)
    ):
        raise CorruptCheckpointError(
            f"refusing file name {name!r} in {directory!r}: it would leave the checkpoint "
            "directory",
            path=directory,
        )
    assert isinstance(name, str)
    return os.path.join(directory, name)


def read_metadata(directory: str) -> dict[str, Any]:
    """The metadata of a committed checkpoint; raises if there is none or it is damaged."""
    path = os.path.join(directory, METADATA)
    try:
        with open(path, "rb") as f:
            meta = json.loads(f.read())
    except FileNotFoundError:
        raise CheckpointNotFoundError(
            f"{directory!r} holds no committed checkpoint (no {METADATA}): its save failed, "
            "was interrupted or is still running"
        ) from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise CorruptCheckpointError(f"{path!r} is not valid metadata: {exc}", path=path) from exc
    if (
        not isinstance(meta, dict)
        or meta.get("format") != "aiockpt"
        or not isinstance(meta.get("files"), list)
    ):
        raise CorruptCheckpointError(f"{path!r} is not aiockpt metadata", path=path)
    for record in meta["files"]:
        safe_join(directory, record.get("name") if isinstance(record, dict) else record)
    return meta


def check_bytes(path: str, data: bytes | memoryview, record: dict[str, Any]) -> None:
    """Raise :class:`CorruptCheckpointError` unless ``data`` matches ``record``."""
    if len(data) != record.get("nbytes"):
        raise CorruptCheckpointError(
            f"{path!r} has {len(data)} bytes, its metadata records {record.get('nbytes')}: "
            "the file is truncated or was replaced",
            path=path,
        )
    digest = xxhash.xxh3_64(data).hexdigest()
    if digest != record.get("xxh3_64"):
        raise CorruptCheckpointError(
            f"{path!r} is corrupt: its xxh3-64 checksum is {digest}, its metadata records "
            f"{record.get('xxh3_64')}",
            path=path,
        )


def verify(directory: str) -> list[str]:
    """Check every file of the committed checkpoint in ``directory`` against its metadata;
    returns the paths checked. Raises :class:`CorruptCheckpointError` naming the first bad
    file, :class:`CheckpointNotFoundError` if the checkpoint was never committed."""
    meta = read_metadata(directory)
    checked = []
    for record in meta["files"]:
        path = safe_join(directory, record["name"])
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise CorruptCheckpointError(f"{path!r} is missing", path=path) from None
        check_bytes(path, data, record)
        checked.append(path)
    return checked


def remove_temporaries(directory: str, prefix: str = "") -> list[str]:
    """Delete temporary files left in ``directory`` by interrupted writes (those whose
    name starts with ``.`` + ``prefix``); returns what was removed."""
    removed: list[str] = []
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return removed
    for name in names:
        if name.startswith("." + prefix) and TMP_MARKER in name:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(directory, name))
                removed.append(name)
    return removed


class Storage(Protocol):
    """Where checkpoints live. ``write_file`` runs in the worker process (the object is
    pickled to it), everything else in the caller's. The local filesystem is the default;
    an object store can implement the same methods (through fsspec, say)."""

    def write_file(self, state_dict: Any, path: str) -> dict[str, Any]: ...
    def read_bytes(self, path: str) -> bytes: ...
    def commit(
        self, directory: str, files: list[dict[str, Any]], extra: dict[str, Any]
    ) -> None: ...
    def read_metadata(self, directory: str) -> dict[str, Any]: ...
    def list_dir(self, directory: str) -> list[str]: ...
    def makedirs(self, directory: str) -> None: ...
    def remove_tree(self, path: str) -> None: ...
    def remove_temporaries(self, directory: str, prefix: str) -> list[str]: ...


class LocalStorage:
    """The local (or mounted) filesystem, with atomic, fsync'd writes."""

    def write_file(self, state_dict: Any, path: str) -> dict[str, Any]:
        return save_file(state_dict, path)

    def read_bytes(self, path: str) -> bytes:
        with open(path, "rb") as f:
            return f.read()

    def commit(self, directory: str, files: list[dict[str, Any]], extra: dict[str, Any]) -> None:
        write_metadata(directory, files, extra)

    def read_metadata(self, directory: str) -> dict[str, Any]:
        return read_metadata(directory)

    def list_dir(self, directory: str) -> list[str]:
        try:
            return sorted(os.listdir(directory))
        except FileNotFoundError:
            return []

    def makedirs(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)

    def remove_tree(self, path: str) -> None:
        shutil.rmtree(path, ignore_errors=True)

    def remove_temporaries(self, directory: str, prefix: str) -> list[str]:
        return remove_temporaries(directory, prefix)
