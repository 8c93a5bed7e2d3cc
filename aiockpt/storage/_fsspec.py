"""Checkpoints in an object store (or any filesystem) reached through a user-configured
fsspec filesystem: :class:`FsspecStorage`.

Objects are written once and never renamed: a data file streams to its final name (each
save attempt chooses a name of its own) and ``metadata.json``, the commit marker, is
created last with a conditional create that fails if it exists. On S3 (``s3fs``) that is
a ``PUT`` with ``If-None-Match: *``, atomic on the server. The writer's lock is a lease
object, see :class:`FsspecLease`.

This module knows nothing of queues, workers or event loops.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import json
import logging
import os
import posixpath
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import xxhash

from .._exceptions import (
    CheckpointError,
    CheckpointNotFoundError,
    DirectoryLockedError,
    InvalidRequestError,
    StorageError,
)
from ._checksum import HashingWriter
from ._fastsave import save as fast_save
from ._local import _no_crc32
from ._metadata import MAX_METADATA_BYTES, METADATA, metadata_bytes, parse_metadata

logger = logging.getLogger("aiockpt")

LEASE_NAME = ".aiockpt.lease"
_HOST = socket.gethostname()
_CHUNK = 8 * 2**20  # bytes handed to the file per write when it has no block size

# Error codes (botocore's ``response["Error"]["Code"]``) and exception class names.
_CREDENTIAL_CODES = frozenset(
    {
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "ExpiredToken",
        "InvalidToken",
        "TokenRefreshRequired",
        "InvalidClientTokenId",
        "AuthorizationHeaderMalformed",
    }
)
_CREDENTIAL_ERRORS = frozenset(
    {"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"}
)
_DENIED_CODES = frozenset({"AccessDenied", "AllAccessDisabled", "Forbidden", "403"})
_CONNECTION_ERRORS = frozenset(
    {
        "EndpointConnectionError",
        "ConnectionClosedError",
        "ConnectTimeoutError",
        "ReadTimeoutError",
        "ClientConnectorError",
        "ServerDisconnectedError",
        "ConnectionRefusedError",
    }
)
_CONDITION_CODES = frozenset({"PreconditionFailed", "ConditionalRequestConflict", "412"})


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and the exceptions it was raised from or during."""
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        e = todo.pop()
        if id(e) in seen or len(seen) > 16:
            continue
        seen.add(id(e))
        yield e
        todo += [c for c in (e.__cause__, e.__context__) if c is not None]


def _error_code(exc: BaseException) -> str | None:
    """The S3 error code (``NoSuchBucket``, ``AccessDenied``...) behind ``exc``, if any."""
    for e in _chain(exc):
        response = getattr(e, "response", None)
        if isinstance(response, dict):
            error = response.get("Error")
            if isinstance(error, dict) and error.get("Code"):
                return str(error["Code"])
    return None


def _names(exc: BaseException) -> set[str]:
    return {type(e).__name__ for e in _chain(exc)}


def _missing(exc: BaseException) -> bool:
    """Whether ``exc`` says the object does not exist (and not that its bucket does not)."""
    return isinstance(exc, FileNotFoundError) and _error_code(exc) != "NoSuchBucket"


def _digest(data: bytes) -> str:
    return xxhash.xxh3_64_hexdigest(data)


def _pid_dead(pid: int) -> bool:
    """Whether the process ``pid`` of this host has exited (a zombie has)."""
    if pid <= 0:
        return False  # not a pid: cannot tell
    if pid == os.getpid():
        return False
    if os.path.exists("/proc/self/stat"):
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                return f.read().rsplit(b")", 1)[-1].split()[0] == b"Z"
        except FileNotFoundError:
            return True
        except (OSError, IndexError):
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


class _StreamWriter(HashingWriter):
    """:class:`HashingWriter` (``trailer=True``) over a writable file object instead of
    a descriptor: what :func:`_fastsave.save` writes goes to ``file.write`` in pieces of
    at most ``chunk`` bytes, so a buffered uploader (s3fs sends a part per block) never
    holds more than about a block."""

    def __init__(self, file: Any, chunk: int) -> None:
        super().__init__(-1, trailer=True)
        self._file = file
        self._chunk = chunk
        # torch.save turns a failed write into a vague RuntimeError; keep the real cause.
        self.failure: Exception | None = None

    def writev(self, buffers: list[Any]) -> None:
        """Write ``buffers`` in order (what was held back for the trailer first)."""
        if self._tail:
            self._emit(memoryview(self._tail))
            self._tail = bytearray()
        for buffer in buffers:
            self._emit(memoryview(buffer).cast("B"))

    def _emit(self, view: memoryview) -> None:
        self._hash.update(view)
        self.nbytes += view.nbytes
        for start in range(0, view.nbytes, self._chunk):
            try:
                self._file.write(view[start : start + self._chunk])
            except Exception as exc:
                self.failure = exc
                raise


def _is_s3fs(fs: Any) -> bool:
    module = sys.modules.get("s3fs")
    return module is not None and isinstance(fs, module.S3FileSystem)


def _has_atomic_create(fs: Any) -> bool:
    """Whether ``fs.pipe_file(path, data, mode="create")`` is an exclusive create of the
    filesystem's own (s3fs: ``If-None-Match: *``; the in-memory filesystem: a checked
    open), not fsspec's generic exists-check-then-write."""
    if _is_s3fs(fs):
        return True
    spec = importlib.import_module("fsspec.spec")
    impl = getattr(type(fs), "pipe_file", None)
    if impl is None or impl is spec.AbstractFileSystem.pipe_file:
        return False
    try:
        return "mode" in inspect.signature(impl).parameters
    except (TypeError, ValueError):
        return False


class FsspecStorage:
    """Checkpoints in an object store (or any filesystem) through a user-configured
    fsspec filesystem ``fs``, e.g. ``s3fs.S3FileSystem(endpoint_url=..., key=...,
    secret=...)``.

    Paths are the filesystem's own (``bucket/prefix/...`` for s3fs); ``s3://`` URLs are
    accepted by the methods and stripped to that form. The storage pickles (with its
    filesystem) to the worker process that runs :meth:`write_file`.

    Writes: a data file streams to its final name through ``fs.open(path, "wb")`` (s3fs
    uploads it in parts of a block each: the memory used is bounded) with an xxh3-64
    checksum trailer computed as it is written; each save attempt writes names of its own,
    so no temporary name is needed. :meth:`commit` creates ``metadata.json`` last, only if
    it does not exist, by the filesystem's exclusive create: ``PUT`` with ``If-None-Match:
    *`` on s3fs (atomic on AWS S3 and servers that honour the header; a server that
    ignores it silently overwrites). On a filesystem without an exclusive create (the
    local one through fsspec, say) it checks for the object and then writes it: **racy**,
    two committers at the same moment can both succeed. ``atomic_create`` says which.

    Lock (:meth:`lock`): a lease object ``<directory>/.aiockpt.lease`` holding the
    holder's host, pid, a random token and a renewal count. The protocol:

    * acquire: create the lease with the same exclusive create as the commit;
    * if it exists and names this host and a pid that is no longer running, replace it
      at once;
    * otherwise watch its version (the ETag on s3fs, the content elsewhere) on the local
      monotonic clock (no clocks of two hosts are ever compared): if it changes, its
      holder is alive and renewing: :class:`DirectoryLockedError` naming it (host, pid).
      If it stays unchanged for ``lease_ttl`` seconds, its holder is gone: replace it.
      Seeing a live holder takes up to about ``lease_ttl / 3`` (its renewal period);
    * replacing is conditional on the version observed (s3fs: ``PUT`` with
      ``If-Match: <etag>``), so of two processes taking over the same stale lease one
      wins and the other sees a changed lease (a live holder);
    * the holder rewrites the lease every ``lease_ttl / 3`` seconds from a daemon thread,
      again conditional on the version it wrote last. If that is refused (another process
      took the lease over: this one did not renew for ``lease_ttl``) or no renewal
      succeeded for ``lease_ttl`` seconds, the lease is lost: renewing stops, an error is
      logged, and :meth:`FsspecLease.check`, which the manager runs before every commit,
      raises :class:`DirectoryLockedError`: a writer that lost its lease commits nothing;
    * release: stop renewing, then delete the lease if it is still the version written
      last.

    Without conditional writes (not s3fs) the replacements are check-then-write: racy as
    the commit is.

    Every filesystem error becomes a :class:`StorageError` naming the path and what to do
    (a missing bucket, refused credentials, denied access, an unreachable endpoint).
    """

    is_local = False

    def __init__(self, fs: Any, *, lease_ttl: float = 30.0) -> None:
        if isinstance(lease_ttl, bool) or not isinstance(lease_ttl, int | float):
            raise InvalidRequestError(f"lease_ttl must be a number of seconds, not {lease_ttl!r}")
        if not lease_ttl > 0:
            raise InvalidRequestError(f"lease_ttl must be positive, not {lease_ttl!r}")
        self.fs = fs
        self.lease_ttl = float(lease_ttl)
        self._s3 = _is_s3fs(fs)
        #: whether :meth:`commit` and the lease use an atomic exclusive create
        self.atomic_create = _has_atomic_create(fs)

    def __repr__(self) -> str:
        return f"FsspecStorage({self.fs!r}, lease_ttl={self.lease_ttl:g})"

    # -- helpers -------------------------------------------------------------------

    def _path(self, path: Any) -> str:
        return str(self.fs._strip_protocol(os.fspath(path)))

    def _error(self, exc: BaseException, path: str, doing: str) -> StorageError:
        """A :class:`StorageError` saying why ``doing`` ``path`` failed and what to do."""
        code = _error_code(exc)
        names = _names(exc)
        detail = f"{code}: {exc}" if code else f"{type(exc).__name__}: {exc}"
        if code == "NoSuchBucket":
            return self._no_bucket(path, doing)
        if code in _CREDENTIAL_CODES or names & _CREDENTIAL_ERRORS:
            why = (
                f"the credentials were refused ({detail}): check the key and secret (or "
                "the profile, role or environment) the filesystem was built with"
            )
        elif code in _DENIED_CODES or isinstance(exc, PermissionError):
            why = (
                f"access denied ({detail}): the credentials the filesystem was built with "
                "are wrong, or lack permission for this path: check them and the bucket's "
                "policy"
            )
        elif names & _CONNECTION_ERRORS:
            why = (
                f"cannot reach the storage endpoint ({detail}): check the endpoint URL the "
                "filesystem was built with and the network"
            )
        else:
            why = f"{detail}; check the filesystem's endpoint, credentials and network"
        return StorageError(f"cannot {doing} {path!r}: {why}", path=path)

    def _no_bucket(self, path: str, doing: str) -> StorageError:
        bucket = path.lstrip("/").split("/", 1)[0]
        return StorageError(
            f"cannot {doing} {path!r}: the bucket {bucket!r} does not exist: create it, or "
            "correct the bucket name in the path",
            path=path,
        )

    @contextlib.contextmanager
    def _translated(self, path: str, doing: str) -> Iterator[None]:
        try:
            yield
        except CheckpointError:
            raise
        except Exception as exc:
            raise self._error(exc, path, doing) from exc

    def _cat(self, path: str, limit: int | None = None) -> bytes | None:
        """The content of ``path`` (its first ``limit`` bytes), None if it does not exist."""
        with self._translated(path, "read"):
            try:
                if limit is None:
                    data = self.fs.cat_file(path)
                else:
                    data = self.fs.cat_file(path, start=0, end=limit)
            except Exception as exc:
                if _missing(exc):
                    return None
                raise
        return bytes(data)

    def _read(self, path: str) -> tuple[str, bytes] | None:
        """``(version, content)`` of ``path``, None if it does not exist. The version is
        read first: content newer than it makes a write conditional on it fail."""
        version = None
        if self._s3:
            with self._translated(path, "read"):
                try:
                    self.fs.invalidate_cache(path)
                    version = str(self.fs.info(path)["ETag"])
                except Exception as exc:
                    if _missing(exc):
                        return None
                    raise
        data = self._cat(path)
        if data is None:
            return None
        return (version if version is not None else _digest(data)), data

    def _written(self, path: str, data: bytes, response: Any) -> str:
        """The version of ``path`` that a write of ``data`` answered with ``response``."""
        if not self._s3:
            return _digest(data)
        etag = response.get("ETag") if isinstance(response, dict) else None
        if etag:
            return str(etag)
        found = self._read(path)
        return found[0] if found is not None else ""

    def _ours(self, path: str, data: bytes) -> str | None:
        """The version of ``path`` if it holds exactly ``data`` (a retried request whose
        first attempt went through finds its own bytes), else None."""
        found = self._read(path)
        return found[0] if found is not None and found[1] == data else None

    def _create(self, path: str, data: bytes) -> str:
        """Create ``path`` holding ``data`` if it does not exist (see ``atomic_create``);
        return its version. :class:`FileExistsError` if it exists."""
        with self._translated(path, "create"):
            try:
                if self.atomic_create:
                    response = self.fs.pipe_file(path, data, mode="create")
                else:  # racy: another writer may create it between the two calls
                    self.fs.invalidate_cache(path)
                    exists = self.fs.exists(path)
                    response = None if exists else self.fs.pipe_file(path, data)
            except Exception as exc:
                if not isinstance(exc, FileExistsError) and _error_code(exc) not in (
                    _CONDITION_CODES
                ):
                    raise
                exists = True
            else:
                exists = not self.atomic_create and exists
            version = self._ours(path, data) if exists else self._written(path, data, response)
        if version is None:
            raise FileExistsError(path)
        return version

    def _replace(self, path: str, data: bytes, version: str) -> str | None:
        """Replace ``path`` with ``data`` if it still is ``version``; its new version, or
        None if it changed or vanished meanwhile."""
        with self._translated(path, "write"):
            if self._s3:
                try:
                    response = self.fs.pipe_file(path, data, IfMatch=version)
                except Exception as exc:
                    if not (_missing(exc) or _error_code(exc) in _CONDITION_CODES):
                        raise
                    return self._ours(path, data)
                return self._written(path, data, response)
            found = self._read(path)  # racy: check, then write
            if found is None or found[0] != version:
                return None
            self.fs.pipe_file(path, data)
            return _digest(data)

    def _delete(self, path: str) -> None:
        with self._translated(path, "delete"):
            try:
                self.fs.rm_file(path)
            except Exception as exc:
                if not _missing(exc):
                    raise
            with contextlib.suppress(Exception):
                self.fs.invalidate_cache(path)

    # -- the Storage protocol --------------------------------------------------------

    def write_file(self, state_dict: Any, path: str) -> dict[str, Any]:
        """Stream ``torch.save``'s format of ``state_dict`` to ``path`` with a checksum
        trailer; see :meth:`Storage.write_file`. Durable once the upload completed: an
        object appears whole or not at all. A failed write aborts the upload."""
        path = self._path(path)
        with self._translated(path, "write"):
            f = self.fs.open(path, "wb")
        block = getattr(f, "blocksize", None)
        chunk = block if isinstance(block, int) and block > 0 else _CHUNK
        writer = _StreamWriter(f, chunk)
        try:
            with _no_crc32():
                fast_save(state_dict, writer)
            digest = writer.finish()
        except BaseException:
            self._abandon(f, path)
            if writer.failure is not None:  # the file failed, not the serialization
                raise self._error(writer.failure, path, "write") from writer.failure
            raise
        try:
            f.close()
        except BaseException as exc:
            self._abandon(f, path)
            if isinstance(exc, Exception):
                raise self._error(exc, path, "write") from exc
            raise
        return {"name": posixpath.basename(path), "nbytes": writer.nbytes, "xxh3_64": digest}

    def _abandon(self, f: Any, path: str) -> None:
        """Give up a file being written: abort its upload, never publish what was written
        (closing would), and remove whatever a filesystem without uploads wrote."""
        with contextlib.suppress(Exception):
            f.discard()  # s3fs: aborts the multipart upload
        with contextlib.suppress(Exception):
            f.closed = True
        with contextlib.suppress(Exception):
            self.fs.rm_file(path)

    def read_bytes(self, path: str) -> bytes:
        """See :meth:`Storage.read_bytes`."""
        path = self._path(path)
        data = self._cat(path)
        if data is None:
            raise CheckpointNotFoundError(f"{path!r} does not exist")
        return data

    def commit(self, directory: str, files: list[dict[str, Any]], extra: dict[str, Any]) -> None:
        """Create ``metadata.json`` (the JSON of ``LocalStorage``'s) only if it does not
        exist; :class:`StorageError` if another writer committed ``directory``."""
        directory = self._path(directory)
        data = metadata_bytes(files, extra)
        path = posixpath.join(directory, METADATA)
        try:
            self._create(path, data)
        except FileExistsError:
            raise StorageError(
                f"{path!r} exists already: another writer committed {directory!r} first; "
                "it is never replaced",
                path=path,
            ) from None

    def read_metadata(self, directory: str) -> dict[str, Any]:
        """Read and check ``metadata.json``; see :meth:`Storage.read_metadata`."""
        directory = self._path(directory)
        path = posixpath.join(directory, METADATA)
        data = self._cat(path, limit=MAX_METADATA_BYTES + 1)
        if data is None:
            raise CheckpointNotFoundError(
                f"{directory!r} holds no committed checkpoint (no {METADATA}): its save "
                "failed, was interrupted or is still running"
            )
        return parse_metadata(data, directory, path)

    def list_dir(self, directory: str) -> list[str]:
        """The names directly inside ``directory`` (on an object store: below the prefix
        ``directory/``), sorted; an empty list if there are none."""
        directory = self._path(directory).rstrip("/")
        with self._translated(directory, "list"):
            try:
                self.fs.invalidate_cache(directory)
                entries = self.fs.ls(directory, detail=False)
            except Exception as exc:
                if _missing(exc) or isinstance(exc, NotADirectoryError):
                    return []
                raise
        names = set()
        for entry in entries:
            full = str(entry).rstrip("/")
            if full == directory:  # ``directory`` is a file
                continue
            name = posixpath.basename(full)
            if name:
                names.add(name)
        return sorted(names)

    def makedirs(self, directory: str) -> None:
        """Object stores have no directories: on s3fs this checks that the bucket exists
        (it is never created); elsewhere ``fs.makedirs(exist_ok=True)``."""
        directory = self._path(directory)
        if self._s3:
            bucket = directory.lstrip("/").split("/", 1)[0]
            with self._translated(directory, "create checkpoint directory"):
                try:
                    self.fs.invalidate_cache(bucket)
                    self.fs.info(bucket)
                except FileNotFoundError:
                    raise self._no_bucket(directory, "create checkpoint directory") from None
            return
        with self._translated(directory, "create checkpoint directory"):
            self.fs.makedirs(directory, exist_ok=True)

    def remove_tree(self, path: str) -> None:
        """Delete ``metadata.json`` first (un-committing the checkpoint), then every object
        under ``path``; a missing one is not an error, one left behind a
        :class:`StorageError`."""
        path = self._path(path).rstrip("/")
        if self._s3 and "/" not in path.lstrip("/"):
            raise StorageError(
                f"refusing to delete {path!r}: it is a whole bucket, not a checkpoint", path=path
            )
        self._delete(posixpath.join(path, METADATA))
        with self._translated(path, "delete checkpoint"):
            try:
                self.fs.invalidate_cache(path)
                self.fs.rm(path, recursive=True)
            except Exception as exc:
                if not _missing(exc):
                    raise
            self.fs.invalidate_cache(path)
            try:
                left = self.fs.find(path)
            except Exception as exc:
                if not _missing(exc):
                    raise
                left = []
        if left:
            raise StorageError(
                f"cannot delete checkpoint {path!r}: {len(left)} object(s) are left "
                f"({', '.join(repr(str(p)) for p in left[:3])}); check that the credentials "
                "may delete there",
                path=path,
            )

    def remove_temporaries(self, directory: str, prefix: str) -> list[str]:
        """Nothing to do: data files are written under their final names (an upload
        that did not complete leaves no object)."""
        return []

    def lock(self, directory: str) -> FsspecLease:
        """The lease of ``directory``; see the class docstring."""
        return FsspecLease(self, self._path(directory))


class FsspecLease:
    """The writer's lease of a directory of a :class:`FsspecStorage` (protocol in its
    docstring), held from :meth:`acquire` to :meth:`release`. ``lost`` is set if another
    process took it over while it was held (this one did not renew in time)."""

    def __init__(self, storage: FsspecStorage, directory: str) -> None:
        self.storage = storage
        self.directory = directory
        self.path = posixpath.join(directory.rstrip("/"), LEASE_NAME)
        self.ttl = storage.lease_ttl
        self.lost = False
        self._token = uuid.uuid4().hex
        self._renewals = 0
        self._version: str | None = None
        self._renewed = 0.0  # monotonic time of the last write of the lease that succeeded
        self._mutex = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def held(self) -> bool:
        return self._version is not None and not self.lost

    def _body(self) -> bytes:
        return json.dumps(
            {
                "host": _HOST,
                "pid": os.getpid(),
                "token": self._token,
                "renewal": self._renewals,
                "ttl": self.ttl,
            },
            sort_keys=True,
        ).encode()

    @staticmethod
    def _holder(content: bytes) -> tuple[str, int | None, str]:
        """(host, pid, description) of the holder a lease names."""
        try:
            found = json.loads(content)
            host, pid = found["host"], found["pid"]
            if isinstance(host, str) and isinstance(pid, int) and not isinstance(pid, bool):
                return host, pid, f"pid {pid} on host {host}"
        except (ValueError, UnicodeDecodeError, TypeError, KeyError):
            pass
        shown = content[:100].decode("utf-8", "replace")
        return "", None, f"an unknown holder (the lease holds {shown!r})"

    def acquire(self) -> None:
        """Take the lease, or raise :class:`DirectoryLockedError` naming its holder once
        it is seen renewed (within about ``ttl / 3``); a lease not renewed for ``ttl``
        seconds, or of a dead process of this host, is taken over."""
        if self.held:
            return
        self.release()  # a lease that was lost: stop its thread first
        poll = min(self.ttl / 10, 1.0)
        watched: tuple[str, float] | None = None  # (version, first seen: monotonic)
        while True:
            self._renewals = 0
            body = self._body()
            try:
                self._start(self.storage._create(self.path, body))
                return
            except FileExistsError:
                pass
            found = self.storage._read(self.path)
            if found is None:
                time.sleep(poll)
                continue  # released meanwhile: create it again
            version, content = found
            host, pid, holder = self._holder(content)
            if host == _HOST and pid is not None and _pid_dead(pid):
                taken = self.storage._replace(self.path, body, version)
                if taken is not None:
                    logger.warning(
                        "took over the lease %r of %s, which is no longer running",
                        self.path,
                        holder,
                    )
                    self._start(taken)
                    return
                continue  # it changed meanwhile: look again
            now = time.monotonic()
            if watched is not None and watched[0] != version:
                raise DirectoryLockedError(
                    f"{self.directory!r} is in use by another checkpoint manager ({holder}), "
                    f"which holds its lease {self.path!r} and renews it: one process writes a "
                    "directory at a time. Stop that job (and any worker process it left "
                    "running), or use another directory",
                    holder=holder,
                )
            if watched is None:
                watched = (version, now)
            elif now - watched[1] >= self.ttl:
                taken = self.storage._replace(self.path, body, version)
                if taken is not None:
                    logger.warning(
                        "took over the lease %r of %s: it was not renewed for %g s",
                        self.path,
                        holder,
                        self.ttl,
                    )
                    self._start(taken)
                    return
                continue  # renewed or taken at the last moment: look again
            time.sleep(poll)

    def _start(self, version: str) -> None:
        self._version = version
        self._renewed = time.monotonic()
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._renew_loop,
            args=(self._stop,),
            name=f"aiockpt-lease-{self.directory}",
            daemon=True,
        )
        self._thread.start()

    def _renew_loop(self, stop: threading.Event) -> None:
        while not stop.wait(self.ttl / 3):
            with self._mutex:
                if stop.is_set() or self._version is None:
                    return
                self._renewals += 1
                try:
                    version = self.storage._replace(self.path, self._body(), self._version)
                except CheckpointError as exc:
                    if time.monotonic() - self._renewed < self.ttl:
                        logger.warning(
                            "could not renew the lease %r (will retry): %s", self.path, exc
                        )
                        continue
                    version = None  # another process may have taken it over by now
                if version is None:
                    self.lost = True
                    logger.error(
                        "lost the lease %r: another process may have taken %r over (this one "
                        "did not renew it within %g s); it commits nothing there any more",
                        self.path,
                        self.directory,
                        self.ttl,
                    )
                    return
                self._version = version
                self._renewed = time.monotonic()

    def check(self) -> None:
        """:class:`DirectoryLockedError` unless the lease is held and was renewed within
        ``ttl`` seconds: the manager calls this before every commit, so a writer that lost
        its lease commits nothing."""
        if self._version is None:
            raise DirectoryLockedError(f"the lease {self.path!r} is not held")
        if self.lost or time.monotonic() - self._renewed >= self.ttl:
            raise DirectoryLockedError(
                f"this manager lost its lease {self.path!r} (not renewed within "
                f"{self.ttl:g} s): it no longer owns {self.directory!r} and commits nothing "
                "there; close it"
            )

    def release(self) -> None:
        """Stop renewing and delete the lease if it is still ours (idempotent); a failure
        to delete is logged: the lease then expires after ``ttl`` seconds."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        with self._mutex:
            version, self._version = self._version, None
        if version is None:
            return
        try:
            found = self.storage._read(self.path)
            if found is not None and found[0] == version:
                self.storage._delete(self.path)
        except CheckpointError as exc:
            logger.warning(
                "could not delete the lease %r (it expires in %g s): %s", self.path, self.ttl, exc
            )
