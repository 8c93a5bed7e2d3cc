"""The on-disk format: files ``torch.load`` reads, written atomically, with checksums.

A single-file checkpoint is one file carrying its own xxh3-64 checksum in a trailer
``torch.load`` ignores (see ``_checksum``). A sharded checkpoint is a directory with one
file per rank and a ``metadata.json`` written last, by rank 0, once every rank's file is
durable: the metadata is the commit marker, so a directory without it is not a checkpoint.

Every file is written under a temporary name in its final directory, fsync'd, renamed into
place, and the directory is fsync'd: a crash leaves the old file or the new one. Checksums
are computed as the bytes are written, never by reading them back.

This module knows nothing of queues, workers or event loops.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Iterator
from typing import Any

import torch
import torch.utils.serialization

from .._exceptions import CheckpointNotFoundError, CorruptCheckpointError, StorageError
from ._atomic import remove_temporaries, write_atomic
from ._checksum import read_trailer
from ._fastsave import save as fast_save
from ._files import (
    entry_kind,
    fsync_dir,
    hash_prefix,
    local_path,
    open_dir,
    open_file,
    opened,
)
from ._lock import DirectoryLock
from ._metadata import METADATA, metadata_bytes, read_metadata, safe_join


@contextlib.contextmanager
def _no_crc32() -> Iterator[None]:
    config = getattr(torch.utils.serialization, "config", None)
    save_config = getattr(config, "save", None)
    if save_config is None or not hasattr(save_config, "compute_crc32"):
        yield  # a torch without the switch computes CRC32 as always
        return
    before = save_config.compute_crc32
    save_config.compute_crc32 = False  # xxh3 replaces it, at a fraction of the cost
    try:
        yield
    finally:
        save_config.compute_crc32 = before


def save_file(state_dict: Any, path: str, **torch_save_kwargs: Any) -> dict[str, Any]:
    """``torch.save(state_dict, path)``, atomically and durably, with a checksum trailer;
    returns the file record. Temporary files of earlier writers of ``path`` on this host
    that were killed are removed first.

    Without ``torch_save_kwargs`` the file is written by :mod:`aiockpt.storage._fastsave` (the same
    format, far less work per tensor); with them, by ``torch.save`` itself."""
    directory, name = os.path.split(os.path.abspath(path))
    remove_temporaries(directory, name)

    def write(f: Any) -> None:
        if torch_save_kwargs:
            torch.save(state_dict, f, **torch_save_kwargs)
        else:
            fast_save(state_dict, f)

    with _no_crc32():
        return write_atomic(path, write, trailer=True)


def write_metadata(directory: str, files: list[dict[str, Any]], extra: dict[str, Any]) -> str:
    """Commit a sharded checkpoint: write ``metadata.json`` (atomically) listing ``files``;
    :class:`StorageError` if the directory was committed meanwhile (never replaced)."""
    data = metadata_bytes(files, extra)
    path = os.path.join(directory, METADATA)
    write_atomic(path, lambda f: f.write(data), replace=False)
    return path


def verify_file(path: str) -> int:
    """Check a single-file checkpoint against its checksum trailer; returns its size.

    Raises :class:`CorruptCheckpointError` if it does not match or carries no checksum,
    :class:`CheckpointNotFoundError` if it is missing, :class:`UntrustedEntryError` if it is
    not a regular file."""
    with opened(open_file(path, follow=True)) as fd:
        size = os.fstat(fd).st_size
        found = read_trailer(fd, size, path)
        if found is None:
            raise CorruptCheckpointError(
                f"{path!r} carries no aiockpt checksum (it was not written by aiockpt): "
                "nothing to verify it against",
                path=path,
            )
        nbytes, expected = found
        digest = hash_prefix(fd, nbytes, path)
    if digest != expected:
        raise CorruptCheckpointError(
            f"{path!r} is corrupt: its xxh3-64 checksum is {digest}, its trailer records "
            f"{expected}",
            path=path,
        )
    return size


def check_record(fd: int, path: str, record: dict[str, Any]) -> None:
    """Raise :class:`CorruptCheckpointError` unless the file behind ``fd`` has exactly the
    size and checksum of its metadata ``record``. Reads no more than the recorded size."""
    size = os.fstat(fd).st_size
    if size != record["nbytes"]:
        raise CorruptCheckpointError(
            f"{path!r} has {size} bytes, its metadata records {record['nbytes']}: the file "
            "is truncated or was replaced",
            path=path,
        )
    digest = hash_prefix(fd, size, path)
    if digest != record["xxh3_64"]:
        raise CorruptCheckpointError(
            f"{path!r} is corrupt: its xxh3-64 checksum is {digest}, its metadata records "
            f"{record['xxh3_64']}",
            path=path,
        )


def verify(path: str) -> list[str]:
    """Check a checkpoint: every file of the committed checkpoint directory ``path``
    against its metadata, or the single file ``path`` against its trailer. Returns the
    files checked. Raises :class:`CorruptCheckpointError` naming the first bad file,
    :class:`CheckpointNotFoundError` if there is no (committed) checkpoint."""
    path = local_path(os.fspath(path))
    if not os.path.isdir(path):
        verify_file(path)
        return [path]
    with opened(open_dir(path)) as dfd:
        meta = read_metadata(path, dir_fd=dfd)
        checked = []
        for record in meta["files"]:
            file, fd = open_record(path, dfd, record)
            with opened(fd):
                check_record(fd, file, record)
            checked.append(file)
    return checked


def open_record(directory: str, dir_fd: int, record: dict[str, Any]) -> tuple[str, int]:
    """The path and a read-only descriptor of the file a metadata ``record`` names in the
    checkpoint ``directory`` (open as ``dir_fd``); never outside it, never through a link."""
    file = safe_join(directory, record["name"])
    try:
        return file, open_file(file, dir_fd=dir_fd, name=record["name"])
    except CheckpointNotFoundError:
        raise CheckpointNotFoundError(
            f"{file!r} is missing from the committed checkpoint {directory!r}"
        ) from None


def make_dir(path: str) -> None:
    """Create the directory ``path`` (and its parents), fsyncing each parent so the new
    entry survives a crash. An existing entry that is not a real directory raises
    :class:`UntrustedEntryError`; a read-only or forbidden location :class:`StorageError`."""
    parent, name = os.path.split(os.path.abspath(path))
    try:
        with opened(open_dir(parent)) as pfd:
            try:
                os.mkdir(name, 0o777, dir_fd=pfd)
            except FileExistsError:
                os.close(open_dir(path, dir_fd=pfd, name=name))  # refuses links and files
                return
            os.fsync(pfd)
    except CheckpointNotFoundError:
        make_dir(parent)
        make_dir(path)
    except OSError as exc:
        raise StorageError(
            f"cannot create checkpoint directory {path!r}: {exc.strerror or exc}; "
            "check that the filesystem is writable and you may write there",
            path=path,
        ) from exc


def remove_checkpoint(path: str) -> None:
    """Delete a checkpoint directory safely: un-commit it first (remove ``metadata.json``
    and fsync), so a crash mid-way never leaves a committed checkpoint missing files; then
    delete the rest without following any link. A link or file in its place is unlinked.
    (Another format un-commits its own marker before calling this.)"""
    parent, name = os.path.split(os.path.abspath(path))
    with opened(open_dir(parent)) as pfd:
        if entry_kind(name, pfd) != "a directory":
            os.unlink(name, dir_fd=pfd)
            os.fsync(pfd)
            return
        with opened(open_dir(path, dir_fd=pfd, name=name)) as dfd:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(METADATA, dir_fd=dfd)
            os.fsync(dfd)
        shutil.rmtree(path)  # fd-based: never follows a link inside
        os.fsync(pfd)


class LocalStorage:
    """The local (or mounted) filesystem, with atomic, fsync'd writes."""

    is_local = True

    def write_file(self, state_dict: Any, path: str) -> dict[str, Any]:
        """``torch.save`` to a temporary name, fsync, rename, fsync the directory; see
        :meth:`Storage.write_file`."""
        return save_file(state_dict, path)

    def read_bytes(self, path: str) -> bytes:
        """See :meth:`Storage.read_bytes`; opens no link, FIFO or device."""
        with opened(open_file(path)) as fd, os.fdopen(os.dup(fd), "rb") as f:
            return f.read()  # the loaders map files instead; this serves other callers

    def commit(self, directory: str, files: list[dict[str, Any]], extra: dict[str, Any]) -> None:
        """Write ``metadata.json``; once this returns, the checkpoint and its entry in the
        parent directory are durable."""
        write_metadata(directory, files, extra)
        fsync_dir(os.path.dirname(os.path.abspath(directory)))

    def read_metadata(self, directory: str) -> dict[str, Any]:
        """Read and check ``metadata.json``; see :meth:`Storage.read_metadata`."""
        return read_metadata(directory)

    def list_dir(self, directory: str) -> list[str]:
        """See :meth:`Storage.list_dir`."""
        try:
            return sorted(os.listdir(directory))
        except FileNotFoundError:
            return []

    def makedirs(self, directory: str) -> None:
        """See :meth:`Storage.makedirs`; the new directory's entry is fsync'd in its
        parent."""
        make_dir(directory)

    def remove_tree(self, path: str) -> None:
        """Delete a checkpoint directory (un-committed first); :class:`StorageError` if
        it cannot be deleted. A missing one is not an error."""
        try:
            remove_checkpoint(path)
        except CheckpointNotFoundError:
            pass
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                raise StorageError(
                    f"cannot delete checkpoint {path!r}: {exc.strerror or exc}",
                    path=path,
                ) from exc

    def remove_temporaries(self, directory: str, prefix: str) -> list[str]:
        """See :meth:`Storage.remove_temporaries`; a temporary name says which host and
        process wrote it, so a live writer's file is never touched."""
        return remove_temporaries(directory, prefix)

    def lock(self, directory: str) -> DirectoryLock:
        """An exclusive ``flock`` on ``directory/.aiockpt.lock``; see
        :class:`~aiockpt.storage._lock.DirectoryLock`."""
        return DirectoryLock(directory)
