"""Opening what a checkpoint directory holds without trusting it.

Everything inside a checkpoint directory is opened relative to the directory's descriptor
with ``O_NOFOLLOW``, checked with ``lstat`` before it is opened (so a FIFO or a device is
never opened) and with ``fstat`` on the descriptor after (so a swap in between is caught),
and read no further than the size its record allows. Symlinks, FIFOs, sockets and devices
raise :class:`UntrustedEntryError`; missing entries :class:`CheckpointNotFoundError`.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from collections.abc import Iterator
from contextlib import contextmanager

import xxhash

from .._exceptions import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    InvalidRequestError,
    StorageError,
    UntrustedEntryError,
)

CHUNK = 8 * 2**20  # hashing reads this much at a time: memory stays flat for any file size


_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def local_path(path: str) -> str:
    """``path`` if it names a place on the local (or mounted) filesystem;
    :class:`InvalidRequestError` for a URL (``s3://bucket/run``), which would otherwise
    be taken for a relative path and create a directory named ``s3:`` here."""
    if _URL.match(path):
        raise InvalidRequestError(
            f"{path!r} is a URL: aiockpt reads and writes local or mounted filesystem "
            "paths only. Mount the store (or sync a local directory to it) and pass a path"
        )
    return path


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISLNK, "a symlink"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISREG, "a regular file"),
    ):
        if test(mode):
            return name
    return "an unknown kind of file"


def _refuse(path: str, mode: int, wanted: str) -> UntrustedEntryError:
    return UntrustedEntryError(
        f"{path!r} is {_kind(mode)}, not {wanted}: aiockpt follows no links and opens no "
        "special files inside a checkpoint directory; remove it or point aiockpt elsewhere",
        path=path,
    )


def _unreadable(path: str, exc: OSError) -> StorageError:
    """A permission error, an overlong name, an I/O error: typed, saying where."""
    return StorageError(
        f"cannot open {path!r}: {exc.strerror or exc}; check its permissions (and the filesystem)",
        path=path,
    )


def _lstat(name: str, dir_fd: int | None, path: str) -> os.stat_result:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        raise CheckpointNotFoundError(f"{path!r} does not exist") from None
    except OSError as exc:
        raise _unreadable(path, exc) from exc


def _open_checked(name: str, flags: int, dir_fd: int | None, path: str, want_dir: bool) -> int:
    wanted = "a directory" if want_dir else "a regular file"
    is_wanted = stat.S_ISDIR if want_dir else stat.S_ISREG
    mode = _lstat(name, dir_fd, path).st_mode
    if not is_wanted(mode):
        raise _refuse(path, mode, wanted)
    try:
        fd = os.open(name, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    except FileNotFoundError:
        raise CheckpointNotFoundError(f"{path!r} does not exist") from None
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):  # replaced by a link since the lstat
            raise UntrustedEntryError(
                f"{path!r} changed into a link while opening it", path=path
            ) from exc
        raise _unreadable(path, exc) from exc
    mode = os.fstat(fd).st_mode
    if not is_wanted(mode):
        os.close(fd)
        raise _refuse(path, mode, wanted)
    return fd


def open_dir(path: str, *, dir_fd: int | None = None, name: str | None = None) -> int:
    """A descriptor of the real directory ``path``; with ``dir_fd``, of ``name`` inside it,
    which must not be a link. The caller's own top-level path is resolved as usual."""
    if dir_fd is None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise CheckpointNotFoundError(f"{path!r} does not exist") from None
        except NotADirectoryError:
            raise CheckpointNotFoundError(f"{path!r} is not a directory") from None
        except OSError as exc:
            raise _unreadable(path, exc) from exc
        return fd
    assert name is not None
    return _open_checked(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd, path, want_dir=True)


def open_file(
    path: str,
    *,
    dir_fd: int | None = None,
    name: str | None = None,
    follow: bool = False,
    writable: bool = False,
) -> int:
    """A read-only descriptor of the regular file ``path`` (or ``name`` in ``dir_fd``).
    ``follow=True``: ``path`` is the caller's own and may be a link to a regular file."""
    if follow:
        try:
            mode = os.stat(path).st_mode
        except FileNotFoundError:
            raise CheckpointNotFoundError(f"{path!r} does not exist") from None
        except OSError as exc:  # a loop of links, a name too long, not a directory
            raise _unreadable(path, exc) from exc
        if not stat.S_ISREG(mode):
            raise _refuse(path, mode, "a regular file")
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise _unreadable(path, exc) from exc
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            os.close(fd)
            raise _refuse(path, mode, "a regular file")
        return fd
    if dir_fd is None:
        parent, name = os.path.split(os.path.abspath(path))
        with opened(open_dir(parent)) as pfd:
            return _open_checked(name, os.O_RDONLY, pfd, path, want_dir=False)
    assert name is not None
    return _open_checked(name, os.O_RDWR if writable else os.O_RDONLY, dir_fd, path, False)


@contextmanager
def opened(fd: int) -> Iterator[int]:
    """Close ``fd`` on leaving the block."""
    try:
        yield fd
    finally:
        os.close(fd)


def entry_kind(name: str, dir_fd: int) -> str:
    """What ``name`` in ``dir_fd`` is ("a directory", "a symlink", ...), never following it."""
    return _kind(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)


def read_at_most(fd: int, limit: int, path: str) -> bytes:
    """The whole file behind ``fd``; :class:`CorruptCheckpointError` if it holds more than
    ``limit`` bytes (nothing beyond ``limit + 1`` is read)."""
    chunks: list[bytes] = []
    total = 0
    while total <= limit:
        chunk = os.read(fd, min(CHUNK, limit + 1 - total))
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        total += len(chunk)
    raise CorruptCheckpointError(f"{path!r} is larger than {limit} bytes", path=path)


def hash_prefix(fd: int, nbytes: int, path: str) -> str:
    """xxh3-64 of the first ``nbytes`` of ``fd``, read in fixed chunks (memory stays flat);
    :class:`CorruptCheckpointError` if the file ends sooner."""
    digest = xxhash.xxh3_64()
    buffer = bytearray(min(CHUNK, max(nbytes, 1)))
    view = memoryview(buffer)
    offset = 0
    while offset < nbytes:
        want = min(len(buffer), nbytes - offset)
        got = os.preadv(fd, [view[:want]], offset)
        if got == 0:
            raise CorruptCheckpointError(
                f"{path!r} ends after {offset} bytes, {nbytes} were expected: it is truncated",
                path=path,
            )
        digest.update(view[:got])
        offset += got
    return digest.hexdigest()


def fsync_dir(path: str) -> None:
    """fsync a directory: makes the names created, renamed or removed in it durable."""
    with opened(os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)) as fd:
        os.fsync(fd)
