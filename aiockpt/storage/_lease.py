"""One writer per prefix of an object store: a lease object taken with a conditional
create, renewed while held, and taken over only after it expired.

The lease is ``PREFIX/.aiockpt.lease``, a small JSON record naming its holder (host, pid,
a random token). Its protocol:

- **Take**: create it with ``If-None-Match: *``. If it exists, its holder is alive until
  it stops renewing: the taker watches the object's ETag for ``ttl`` seconds (its own
  clock only, so no clock is compared across hosts). A changed ETag means a live holder:
  :class:`DirectoryLockedError` naming it. An unchanged one means a dead holder: the
  lease is replaced with ``If-Match: <that ETag>``, so of two takers only one wins. A
  lease naming this host and a pid that is not running is taken over at once.
- **Hold**: a thread rewrites it every ``ttl / 3`` with ``If-Match`` on the ETag it
  holds. If that is refused (another writer took it over) or no renewal succeeded for
  ``ttl`` seconds, the lease is lost, and :meth:`Lease.check` (run before every commit)
  raises :class:`DirectoryLockedError`: a writer that lost its lease never commits.
- **Release**: the thread stops and the object is deleted if it is still ours.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import socket
import threading
import time
from typing import Any

from .._exceptions import DirectoryLockedError
from ._obstore import obs_errors, obstore, translated

logger = logging.getLogger("aiockpt")

LEASE = ".aiockpt.lease"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Lease:
    """The writer's lease on the prefix ``directory`` (see the module doc)."""

    def __init__(self, storage: Any, directory: str, ttl: float) -> None:
        # storage: the ObjectStorage whose clients it uses (locate, delete)
        self.storage = storage
        self.url = f"{directory.rstrip('/')}/{LEASE}"
        self.ttl = ttl
        self._etag: str | None = None
        self._lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._record = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "token": secrets.token_hex(8),
            "ttl": ttl,
        }

    # -- object calls ------------------------------------------------------------------

    def _put(self, mode: Any) -> str:
        store, key = self.storage.locate(self.url)
        data = json.dumps({**self._record, "renewed": time.time()}).encode()
        return str(obstore.put(store, key, data, mode=mode)["e_tag"])

    def _read(self) -> tuple[str, dict[str, Any]] | None:
        store, key = self.storage.locate(self.url)
        try:
            got = obstore.get(store, key)
        except FileNotFoundError:
            return None
        etag = str(got.meta["e_tag"])
        try:
            holder = json.loads(bytes(got.bytes()))
            if not isinstance(holder, dict):
                holder = {}
        except ValueError:
            holder = {}
        return etag, holder

    # -- the protocol ------------------------------------------------------------------

    def acquire(self) -> None:
        """Take the lease (waiting up to ``ttl`` seconds to see whether an existing one is
        alive); :class:`DirectoryLockedError` if another writer holds it."""
        with translated(self.url, "take the writer's lease"):
            self._etag = self._take()
        self._lost = None
        self._stop.clear()
        self._thread = threading.Thread(target=self._renew, name="aiockpt-lease", daemon=True)
        self._thread.start()

    def _take(self) -> str:
        while True:
            try:
                return self._put("create")
            except obs_errors.AlreadyExistsError:
                pass
            seen = self._read()
            if seen is None:
                continue  # released meanwhile
            etag, holder = seen
            here = holder.get("host") == self._record["host"]
            pid = holder.get("pid")
            if not (here and isinstance(pid, int) and not _pid_alive(pid)):
                etag = self._watch(etag, holder)
            try:
                return self._put({"e_tag": etag})
            except (obs_errors.PreconditionError, FileNotFoundError):
                continue  # renewed, released or taken meanwhile: look again

    def _watch(self, etag: str, holder: dict[str, Any]) -> str:
        """Wait until the lease is ``ttl`` seconds old unchanged (returns its ETag);
        :class:`DirectoryLockedError` as soon as it is renewed."""
        # The holder's ttl, if longer: a taker with a shorter one must not cut it short.
        theirs = holder.get("ttl")
        ttl = self.ttl
        if isinstance(theirs, int | float) and not isinstance(theirs, bool) and theirs > ttl:
            ttl = min(float(theirs), 3600.0)
        deadline = time.monotonic() + ttl
        while time.monotonic() < deadline:
            time.sleep(min(ttl / 10, max(0.0, deadline - time.monotonic())))
            seen = self._read()
            if seen is None:
                return etag  # released: the conditional replace below fails, we look again
            if seen[0] != etag:
                who = f"pid {holder.get('pid')} on host {holder.get('host')!r}"
                raise DirectoryLockedError(
                    f"{self.url.rsplit('/', 1)[0]!r} is being written by another checkpoint "
                    f"manager ({who}), whose lease {self.url!r} is alive (renewed within "
                    f"{ttl:g} s). Stop that job, or use another prefix"
                )
        return etag

    def _renew(self) -> None:
        last = time.monotonic()
        while not self._stop.wait(self.ttl / 3):
            try:
                self._etag = self._put({"e_tag": self._etag})
                last = time.monotonic()
            except (obs_errors.PreconditionError, FileNotFoundError):
                # A renewal that timed out here may have reached the store after all:
                # then the lease is still ours, under the ETag it made.
                seen = self._reread()
                if seen is not None and seen[1].get("token") == self._record["token"]:
                    self._etag = seen[0]
                    last = time.monotonic()
                    continue
                self._lost = "another writer took it over (or it was deleted)"
                return
            except Exception as exc:
                if time.monotonic() - last > self.ttl:
                    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                    self._lost = f"it could not be renewed for {self.ttl:g} s ({first[:300]})"
                    return
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                logger.warning("renewing the lease %r failed; retrying: %s", self.url, first)

    def _reread(self) -> tuple[str, dict[str, Any]] | None:
        try:
            return self._read()
        except Exception:
            return None

    def check(self) -> None:
        """:class:`DirectoryLockedError` if the lease was lost: the caller must not commit."""
        if self._lost is not None:
            raise DirectoryLockedError(
                f"this manager lost its lease {self.url!r}: {self._lost}. It no longer owns "
                f"{self.url.rsplit('/', 1)[0]!r} and commits nothing there; close it"
            )
        if self._thread is None:
            raise DirectoryLockedError(f"the lease {self.url!r} is not held")

    def release(self) -> None:
        """Stop renewing and delete the lease if it is still ours; idempotent."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._stop.set()
        thread.join()
        if self._lost is not None:
            return
        with contextlib.suppress(Exception):  # the lease expires anyway
            seen = self._read()
            if seen is not None and seen[0] == self._etag:
                self.storage.delete([self.url])
