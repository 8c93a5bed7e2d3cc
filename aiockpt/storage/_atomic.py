"""Atomic, durable writes: a temporary name beside the target (naming its writer), fsync,
rename, fsync of the directory; and the clean-up of temporaries that killed writers left."""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
import uuid
from collections.abc import Callable
from typing import Any

from .._exceptions import StorageError
from ._checksum import HashingWriter
from ._files import fsync_dir, opened

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
            # Only a leftover file: a directory (or anything else) planted under such a
            # name is not ours to delete, and does not stop the save.
            with contextlib.suppress(FileNotFoundError, IsADirectoryError, PermissionError):
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


def _publish(tmp: str, path: str) -> None:
    """Give the finished file ``tmp`` the name ``path`` only if nothing has it yet: a hard
    link is created atomically or not at all (a filesystem without hard links falls back
    to a check, then a rename)."""
    try:
        os.link(tmp, path, follow_symlinks=False)
    except FileExistsError:
        raise StorageError(
            f"{path!r} exists already: another writer committed it first; it is never replaced",
            path=path,
        ) from None
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
            raise
        if os.path.lexists(path):
            raise StorageError(
                f"{path!r} exists already: another writer committed it first; it is never replaced",
                path=path,
            ) from None
        os.replace(tmp, path)
        return
    os.unlink(tmp)


def write_atomic(
    path: str, write: Callable[[Any], object], *, trailer: bool = False, replace: bool = True
) -> dict[str, Any]:
    """Call ``write(file)`` on a new temporary file, fsync it, rename it to ``path`` (keeping
    the permission bits of the file it replaces) and fsync the directory.

    Returns ``{"name", "nbytes", "xxh3_64"}`` of the whole file. ``trailer=True`` appends the
    checksum trailer of a zip archive. ``replace=False`` (a commit marker) never replaces
    an existing ``path``: :class:`StorageError` if there is one. On any failure the
    temporary file is removed and ``path`` is left as it was.
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
        if replace:
            os.replace(tmp, path)
        else:
            _publish(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if writer.error is not None and exc is not writer.error:
            raise writer.error from exc
        raise
    fsync_dir(os.path.dirname(os.path.abspath(path)))
    return {"name": os.path.basename(path), "nbytes": writer.nbytes, "xxh3_64": digest}
