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
import json
import os
import shutil
import socket
import stat
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import torch
import torch.utils.serialization

from ._checksum import HashingWriter, read_trailer
from ._exceptions import CheckpointNotFoundError, CorruptCheckpointError, StorageError
from ._fastsave import save as fast_save
from ._files import entry_kind, fsync_dir, hash_prefix, open_dir, open_file, opened
from ._metadata import FORMAT_VERSION, METADATA, read_metadata, safe_join, shard_name

__all__ = [
    "METADATA",
    "TMP_MARKER",
    "LocalStorage",
    "Storage",
    "fsync_path",
    "make_dir",
    "read_metadata",
    "remove_temporaries",
    "safe_join",
    "save_file",
    "shard_name",
    "verify",
    "verify_file",
    "write_atomic",
    "write_metadata",
]

# The commit marker of a checkpoint in the torch.distributed.checkpoint format.
DCP_MARKER = ".metadata"
TMP_MARKER = ".tmp-"
_HOST = socket.gethostname().replace("/", "_")


def fsync_path(path: str) -> None:
    """fsync a file, or a directory (which makes a rename or a new file in it durable)."""
    with opened(os.open(path, os.O_RDONLY | os.O_CLOEXEC)) as fd:
        os.fsync(fd)


def temp_path(path: str) -> str:
    """A unique temporary name beside ``path``: hidden, and naming the writer's host and
    pid so that a later save can tell a dead writer's leftover from a live write."""
    directory, name = os.path.split(path)
    token = f"{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    return os.path.join(directory, f".{name}{TMP_MARKER}{token}")


def _writer_state(token: str) -> tuple[str, int]:
    """("dead" | "alive" | "unknown", pid) of the writer named in a temporary file's token."""
    parts = token.rsplit("-", 2)
    if len(parts) != 3 or parts[0] != _HOST or not parts[1].isdigit():
        return "unknown", -1  # another host's, or of an older format: cannot tell
    pid = int(parts[1])
    if pid == os.getpid():
        return "alive", pid
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            zombie = f.read().rsplit(b")", 1)[-1].split()[0] == b"Z"  # killed, not reaped
    except FileNotFoundError:
        return "dead", pid
    except OSError:
        return "unknown", pid
    return ("dead" if zombie else "alive"), pid


def live_writers(directory: str, prefix: str) -> list[int]:
    """Pids of processes on this host that are writing a file named ``prefix`` in
    ``directory`` right now (they hold a temporary file of it)."""
    try:
        names = os.listdir(directory)
    except (FileNotFoundError, NotADirectoryError):
        return []
    pids = []
    for name in names:
        if name.startswith("." + prefix) and TMP_MARKER in name:
            state, pid = _writer_state(name.rsplit(TMP_MARKER, 1)[1])
            if state == "alive":
                pids.append(pid)
    return sorted(pids)


def remove_temporaries(directory: str, prefix: str = "") -> list[str]:
    """Delete temporary files that writers on this host left in ``directory`` when they
    were killed (names starting with ``.`` + ``prefix``, writer no longer running);
    returns the names removed. A live writer's temporary file is left alone."""
    removed: list[str] = []
    try:
        names = os.listdir(directory)
    except (FileNotFoundError, NotADirectoryError):
        return removed
    for name in names:
        if not name.startswith("." + prefix) or TMP_MARKER not in name:
            continue
        if _writer_state(name.rsplit(TMP_MARKER, 1)[1])[0] == "dead":
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(directory, name))
                removed.append(name)
    return removed


def _mode_of(path: str) -> int | None:
    """Permission bits of the regular file at ``path`` (None if there is none)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return stat.S_IMODE(st.st_mode) if stat.S_ISREG(st.st_mode) else None


def write_atomic(
    path: str, write: Callable[[Any], object], *, trailer: bool = False
) -> dict[str, Any]:
    """Call ``write(file)`` on a new temporary file, fsync it, rename it to ``path`` (keeping
    the permission bits of the file it replaces) and fsync the directory.

    Returns ``{"name", "nbytes", "xxh3_64"}`` of the whole file. ``trailer=True`` appends the
    checksum trailer of a zip archive. On any failure the temporary file is removed and
    ``path`` is left as it was.
    """
    tmp = temp_path(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(tmp, flags, 0o666)
    writer = HashingWriter(fd, trailer=trailer)
    try:
        try:
            mode = _mode_of(path)
            if mode is not None:
                os.fchmod(fd, mode)
            write(writer)
            digest = writer.finish()
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if writer.error is not None and exc is not writer.error:
            raise writer.error from exc
        raise
    fsync_dir(os.path.dirname(os.path.abspath(path)))
    return {"name": os.path.basename(path), "nbytes": writer.nbytes, "xxh3_64": digest}


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

    Without ``torch_save_kwargs`` the file is written by :mod:`aiockpt._fastsave` (the same
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
    """Commit a sharded checkpoint: write ``metadata.json`` (atomically) listing ``files``."""
    meta = {
        "format": "aiockpt",
        "version": FORMAT_VERSION,
        "created": time.time(),
        "world_size": len(files),
        "files": files,
        "extra": extra,
    }
    data = json.dumps(meta, indent=1, sort_keys=True, allow_nan=False).encode()
    path = os.path.join(directory, METADATA)
    write_atomic(path, lambda f: f.write(data))
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
    path = os.fspath(path)
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
    """Delete a checkpoint directory safely: un-commit it first (remove ``metadata.json``,
    or a DCP checkpoint's ``.metadata``, and fsync), so a crash mid-way never leaves a committed checkpoint missing files; then
    delete the rest without following any link. A link or file in its place is unlinked."""
    parent, name = os.path.split(os.path.abspath(path))
    with opened(open_dir(parent)) as pfd:
        if entry_kind(name, pfd) != "a directory":
            os.unlink(name, dir_fd=pfd)
            os.fsync(pfd)
            return
        with opened(open_dir(path, dir_fd=pfd, name=name)) as dfd:
            for marker in (METADATA, DCP_MARKER):  # either format's commit marker
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(marker, dir_fd=dfd)
            os.fsync(dfd)
        shutil.rmtree(path)  # fd-based: never follows a link inside
        os.fsync(pfd)


class Storage(Protocol):
    """Where checkpoints live: the protocol a checkpoint manager (and ``load``) writes and
    reads through, passed as ``storage=``.

    ``write_file`` runs in the worker process (the object is pickled to it), everything
    else in the caller's. :class:`LocalStorage`, the local filesystem, is the default; an
    object store can implement the same methods (through fsspec, say). Methods raise
    :class:`StorageError` (or another :class:`CheckpointError`) for a failure the caller
    should see as a failed checkpoint; any other exception in ``write_file`` fails the
    save with a :class:`WorkerError` carrying it.

    Example:
        A storage that reports the files it writes, for a manager:

        ```python
        class ReportingStorage(LocalStorage):
            def write_file(self, state_dict, path):
                record = super().write_file(state_dict, path)
                print("wrote", record["name"], record["nbytes"], "bytes")
                return record

        manager = CheckpointManager("ckpts", storage=ReportingStorage())
        ```
    """

    def write_file(self, state_dict: Any, path: str) -> dict[str, Any]:
        """Write ``state_dict`` to ``path`` so that it is durable and atomic (the old file
        or the new one, never a torn one) once this returns.

        Args:
            state_dict: the staged state dict (host tensors) to serialize.
            path: the file to write, inside a step directory made by :meth:`makedirs`.

        Returns:
            The file's record, stored in the metadata: ``{"name": basename, "nbytes":
            size, "xxh3_64": hex checksum of the bytes}``.
        """
        ...

    def read_bytes(self, path: str) -> bytes:
        """Return the whole content of the file ``path`` (checked against its record
        by the caller). Raises :class:`CheckpointNotFoundError` if it does not exist."""
        ...

    def commit(self, directory: str, files: list[dict[str, Any]], extra: dict[str, Any]) -> None:
        """Commit the checkpoint in ``directory``: write its metadata (``files``, the
        records :meth:`write_file` returned on every rank, and ``extra``, JSON), last
        and atomically. Once this returns the checkpoint must survive a crash."""
        ...

    def read_metadata(self, directory: str) -> dict[str, Any]:
        """Return the metadata :meth:`commit` wrote. Raises
        :class:`CheckpointNotFoundError` if ``directory`` was never committed,
        :class:`CorruptCheckpointError` if its metadata is damaged."""
        ...

    def list_dir(self, directory: str) -> list[str]:
        """Return the names in ``directory``, sorted; an empty list if it does not
        exist."""
        ...

    def makedirs(self, directory: str) -> None:
        """Create ``directory`` (and its parents) if it does not exist, durably."""
        ...

    def remove_tree(self, path: str) -> None:
        """Delete the checkpoint directory ``path``, un-committing it first (its
        metadata goes before its files). A missing one is not an error; one that cannot
        be deleted raises :class:`StorageError`."""
        ...

    def remove_temporaries(self, directory: str, prefix: str) -> list[str]:
        """Remove the temporary files left in ``directory`` by killed writers of names
        starting with ``prefix``; never a live writer's. Returns the names removed."""
        ...


class LocalStorage:
    """The local (or mounted) filesystem, with atomic, fsync'd writes."""

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
