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

from .._exceptions import DirectoryLockedError, StorageError
from ._files import open_file, opened, read_at_most

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
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = read_at_most(fd, 4096, self.path).decode("utf-8", "replace").strip()
            os.close(fd)
            holder = holder.replace("\n", " ")[:200] or "an unknown process"
            raise DirectoryLockedError(
                f"{self.directory!r} is in use by another checkpoint manager ({holder}): one "
                "process writes a directory at a time. Stop that job (and any worker process "
                "it left running), or use another directory",
                holder=holder,
            ) from None
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
