"""One writer per checkpoint directory: an exclusive ``flock`` on ``.aiockpt.lock``.

The kernel releases the lock when every descriptor of it is closed, so a process that dies
(killed, crashed) releases it at once. A forked worker inherits the descriptor: while a
lingering worker of a dead job still runs, the directory stays locked, as it should.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket

from .._exceptions import DirectoryLockedError, StorageError, UntrustedEntryError
from ._files import open_file, opened

LOCK_NAME = ".aiockpt.lock"


class DirectoryLock:
    """Hold the writer's lock of ``directory`` from :meth:`acquire` to :meth:`release`."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.path = os.path.join(directory, LOCK_NAME)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock or raise :class:`DirectoryLockedError` naming its holder;
        :class:`StorageError` if the lock file cannot be created (read-only filesystem)."""
        if self._fd is not None:
            return
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            os.close(os.open(self.path, flags, 0o644))
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                open_file(self.path)  # raises UntrustedEntryError naming what is there
            raise StorageError(
                f"cannot create or open the lock file {self.path!r}: {exc.strerror or exc}; "
                "the checkpoint directory must be writable, and that name free or a file",
                path=self.path,
            ) from exc
        parent = os.path.dirname(os.path.abspath(self.path))
        with opened(os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)) as pfd:
            fd = open_file(
                self.path, dir_fd=pfd, name=LOCK_NAME, writable=True
            )  # a regular file, no link
        try:
            if os.fstat(fd).st_nlink != 1:
                # A hard link to a file elsewhere: writing our pid would overwrite it.
                raise UntrustedEntryError(
                    f"the lock file {self.path!r} has other hard links (it may be another "
                    "file, which taking the lock would overwrite): remove it and open the "
                    "directory again",
                    path=self.path,
                )
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:  # the holder's line; the file may be longer than it should be
                holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
            except OSError:
                holder = ""
            finally:
                os.close(fd)
            holder = holder.replace("\n", " ")[:200] or "an unknown process"
            raise DirectoryLockedError(
                f"{self.directory!r} is in use by another checkpoint manager ({holder}): one "
                "process writes a directory at a time. Stop that job (and any worker process "
                "it left running), or use another directory",
                holder=holder,
            ) from None
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP):
                raise StorageError(
                    f"the filesystem of {self.directory!r} does not support file locks "
                    f"(flock: {exc.strerror or exc}; NFS without lockd, Lustre without "
                    "-o flock): mount it with locking, put checkpoints on a filesystem "
                    "that has it, or pass lock=False to the manager (then nothing stops two "
                    "jobs from writing this directory: make sure only one does)",
                    path=self.path,
                ) from exc
            raise StorageError(
                f"cannot lock {self.path!r}: {exc.strerror or exc}", path=self.path
            ) from exc
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Give the lock up (idempotent). The lock file stays: removing it would race with
        the next holder."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)
