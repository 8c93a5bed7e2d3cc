"""The caller's side of a persistent worker's connection: messages are sent by a thread of
their own, in order, so that a worker that does not read (still starting, stopped, stuck)
never blocks the training loop; the deadlines on the worker decide what happens to it."""

from __future__ import annotations

import contextlib
import os
import threading
from collections import deque
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.reduction import send_handle
from typing import Any


class Sender:
    """Sends messages (and descriptors) to one worker, in the order they were put, from a
    thread that exists only while there is something to send."""

    def __init__(self, conn: Connection, pid: int) -> None:
        self._conn = conn
        self._pid = pid
        self._items: deque[Callable[[], Any]] = deque()
        self._idle = threading.Condition()
        self._running = False  # a thread is sending
        self._thread: threading.Thread | None = None  # the latest one
        self._stopped = False
        self.broken = False  # a send failed: the worker is gone

    def send(self, message: Any) -> None:
        self._put(lambda: self._conn.send(message))

    def send_fd(self, fd: int) -> None:
        """Pass a duplicate of ``fd``: the original may be closed before it is sent."""
        self._put(_PassFd(self._conn, os.dup(fd), self._pid))

    def _put(self, item: Callable[[], Any]) -> None:
        with self._idle:
            if self._stopped:
                _discard(item)
                return
            self._items.append(item)
            if self._running:
                return
            self._running = True
            self._thread = threading.Thread(target=self._run, name="aiockpt-sender", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while True:
            with self._idle:
                if not self._items:
                    self._running = False
                    self._idle.notify_all()
                    return
                item = self._items.popleft()
            try:
                if not self.broken:
                    item()
            except (OSError, EOFError, ValueError):  # the worker (or the connection) is gone
                self.broken = True
            finally:
                _discard(item)

    def stop(self, timeout: float) -> bool:
        """Send nothing more; whether no thread sends any more within ``timeout``. Kill
        the worker first if it may not read what is still queued."""
        with self._idle:
            self._stopped = True
            self._idle.wait_for(lambda: not self._running, timeout)
            for item in self._items:
                _discard(item)
            self._items.clear()
            if self._running:
                return False
            thread = self._thread
        if thread is not None:
            thread.join(timeout)  # it has sent its last: it ends within microseconds
        return True


class _PassFd:
    def __init__(self, conn: Connection, fd: int, pid: int) -> None:
        self.conn, self.fd, self.pid = conn, fd, pid

    def __call__(self) -> None:
        send_handle(self.conn, self.fd, self.pid)

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)


def _discard(item: Callable[[], Any]) -> None:
    if isinstance(item, _PassFd):
        item.close()
