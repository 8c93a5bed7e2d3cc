"""Checkpoints in an object store (S3, GCS, Azure, and what speaks their protocols), through
obstore, the Python binding of Rust's ``object_store``.

There is no rename in an object store, so the commit is a conditional create: every data
object is uploaded first (multipart, under a name unique to the save attempt, with its
xxh3-64 computed as the bytes stream out), and ``metadata.json`` last with
``If-None-Match: *``. The store accepts one such create and refuses every other with 412:
two writers can never both commit a step, and a step without its manifest does not exist.
Deleting removes the manifest first, then the data.

Paths are URLs (``s3://bucket/run/step-000000000010/metadata.json``). One client is made
per bucket and process (the worker process makes its own: the object is pickled to it,
its clients are not).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import xxhash

from .._exceptions import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    InvalidRequestError,
    StorageError,
)
from ._checksum import HashingWriter
from ._fastsave import save as fast_save
from ._metadata import MAX_METADATA_BYTES, METADATA, metadata_bytes, parse_metadata
from ._obstore import obs_errors, obstore, require_obstore, translated
from ._urls import split_url

# ClientConfig keys of obstore (the rest of the options configure the store itself).
_CLIENT_KEYS = {
    "allow_http",
    "allow_invalid_certificates",
    "connect_timeout",
    "default_content_type",
    "default_headers",
    "http1_only",
    "http2_keep_alive_interval",
    "http2_keep_alive_timeout",
    "http2_keep_alive_while_idle",
    "http2_only",
    "pool_idle_timeout",
    "pool_max_idle_per_host",
    "proxy_url",
    "proxy_ca_certificate",
    "proxy_excludes",
    "read_timeout",
    "timeout",
    "user_agent",
}
# aiockpt's own options, with their defaults.
DEFAULTS: dict[str, Any] = {
    "part_size": 16 * 2**20,  # bytes per multipart part (memory: part_size x concurrency)
    "concurrency": 8,  # parts in flight per object
    "progress_timeout": 60.0,  # seconds one request may take before it is retried
    "max_retries": 5,  # retries of a transient failure (5xx, dropped connection, timeout)
    "retry_timeout": 180.0,  # seconds of retrying before the failure is raised
    "lease_ttl": 30.0,  # seconds a writer's lease lives without renewal
}
READ_CHUNK = 8 * 2**20
_ENV_PREFIXES = ("AWS_", "GOOGLE_", "AZURE_")


def _seconds(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise InvalidRequestError(f"storage option {name} must be a positive number of seconds")
    return float(value)


class _ObjectSink(HashingWriter):
    """:class:`HashingWriter` writing to an obstore writable file instead of a descriptor."""

    def __init__(self, out: Any, *, trailer: bool) -> None:
        super().__init__(-1, trailer=trailer)
        self._out = out

    def _emit(self, view: memoryview) -> None:
        self._hash.update(view)
        self.nbytes += view.nbytes
        if view.nbytes:
            self._out.write(view)

    def writev(self, buffers: list[Any]) -> None:
        if self._tail:
            self._emit(memoryview(self._tail))
            self._tail = bytearray()
        for buffer in buffers:
            self._emit(memoryview(buffer).cast("B"))


class ObjectStorage:
    """:class:`~aiockpt.storage.Storage` in an object store, for URLs such as
    ``s3://bucket/run``: pass the URL where a directory is expected
    (``CheckpointManager("s3://bucket/run")``, ``aiockpt.load(...)``, ``aiockpt ls``).

    Credentials, region and endpoint come from the usual environment (``AWS_*``,
    ``GOOGLE_*``, ``AZURE_*``) or from ``options``: obstore's store and client settings
    (``endpoint``, ``access_key_id``, ``secret_access_key``, ``region``, ``allow_http``,
    ...) and aiockpt's own: ``part_size`` (bytes per multipart part; memory is
    ``part_size`` x ``concurrency`` per object), ``concurrency``, ``progress_timeout``
    (seconds one request may take: a stalled transfer is retried, then raised),
    ``max_retries`` and ``retry_timeout`` (transient errors are retried with exponential
    backoff), ``lease_ttl`` (see :meth:`lock`).
    """

    is_local = False
    #: obstore's client runtime does not survive ``fork``: the persistent worker is needed
    fork_safe = False

    def __init__(self, options: dict[str, Any] | None = None) -> None:
        require_obstore()
        options = dict(options or {})
        own = {k: options.pop(k, v) for k, v in DEFAULTS.items()}
        for name in ("progress_timeout", "retry_timeout", "lease_ttl"):
            own[name] = _seconds(own[name], name)
        for name in ("part_size", "concurrency", "max_retries"):
            value = own[name]
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InvalidRequestError(f"storage option {name} must be a non-negative int")
        if own["part_size"] < 5 * 2**20:
            raise InvalidRequestError("storage option part_size must be at least 5 MiB (S3's)")
        self.part_size: int = own["part_size"]
        self.concurrency: int = max(1, own["concurrency"])
        self.lease_ttl: float = own["lease_ttl"]
        self._own = own
        self._options = options
        # The credentials of the environment that configured it, for the worker process
        # (a forkserver started earlier has an older environment).
        self._environ = {k: v for k, v in os.environ.items() if k.startswith(_ENV_PREFIXES)}
        self._stores: dict[tuple[int, str, str], Any] = {}
        self._stores_lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_stores"] = {}
        del state["_stores_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._stores_lock = threading.Lock()

    # -- clients -----------------------------------------------------------------------

    def locate(self, url: str) -> tuple[Any, str]:
        """The client of ``url``'s bucket (made once per process) and the key in it."""
        scheme, bucket, key = split_url(url)
        tag = (os.getpid(), scheme, bucket)
        with self._stores_lock:
            store = self._stores.get(tag)
            if store is None:
                store = self._make_store(scheme, bucket)
                self._stores = {t: s for t, s in self._stores.items() if t[0] == tag[0]}
                self._stores[tag] = store
        return store, key

    def _make_store(self, scheme: str, bucket: str) -> Any:
        from obstore.store import from_url as _from_url

        from_url: Any = _from_url  # its overloads are per scheme; ours is chosen at run time

        config = {k: v for k, v in self._options.items() if k not in _CLIENT_KEYS}
        client = {k: v for k, v in self._options.items() if k in _CLIENT_KEYS}
        for name, value in self._environ.items():
            os.environ.setdefault(name, value)
        if os.environ.get("AWS_ALLOW_HTTP", "").lower() in ("1", "true") and scheme != "gs":
            client.setdefault("allow_http", True)  # object_store reads it as a client option
        client.setdefault("timeout", timedelta(seconds=self._own["progress_timeout"]))
        client.setdefault("connect_timeout", timedelta(seconds=10))
        retry = {
            "max_retries": self._own["max_retries"],
            "retry_timeout": timedelta(seconds=self._own["retry_timeout"]),
        }
        url = f"{scheme}://{bucket}"
        with translated(url, "configure the store for"):
            try:
                return from_url(url, config=config, client_options=client, retry_config=retry)
            except (ValueError, TypeError) as exc:
                raise InvalidRequestError(f"storage options for {url!r}: {exc}") from exc
            except BaseException as exc:  # obstore panics on some unknown option names
                if type(exc).__name__ != "PanicException":
                    raise
                raise InvalidRequestError(
                    f"storage options for {url!r} were refused by obstore ({exc}): check "
                    f"their names ({sorted(config)})"
                ) from None

    # -- the protocol ------------------------------------------------------------------

    def write_file(self, state_dict: Any, path: str) -> dict[str, Any]:
        """Stream ``torch.save``'s format to the object ``path`` (multipart, hashed as it
        goes, with the checksum trailer); see :meth:`Storage.write_file`."""
        from ._local import _no_crc32

        store, key = self.locate(path)
        with translated(path, "upload"):
            out = obstore.open_writer(
                store, key, buffer_size=self.part_size, max_concurrency=self.concurrency
            )
            with out:
                sink = _ObjectSink(out, trailer=True)
                with _no_crc32():
                    fast_save(state_dict, sink)
                digest = sink.finish()
        return {"name": path.rsplit("/", 1)[1], "nbytes": sink.nbytes, "xxh3_64": digest}

    def read_bytes(self, path: str, limit: int | None = None) -> bytes:
        """See :meth:`Storage.read_bytes`; with ``limit``, an object of more bytes is
        refused (:class:`CorruptCheckpointError`) before any is read."""
        store, key = self.locate(path)
        with translated(path, "read"):
            got = obstore.get(store, key)
            size = got.meta["size"]
            if limit is not None and size > limit:
                raise CorruptCheckpointError(
                    f"{path!r} holds {size} bytes, more than the {limit} it may: it is not "
                    "what aiockpt wrote",
                    path=path,
                )
            return bytes(got.bytes())

    def put_new(self, path: str, data: bytes) -> None:
        """Create the object ``path`` holding ``data`` unless it exists (``If-None-Match:
        *``); :class:`StorageError` if it does."""
        store, key = self.locate(path)
        with translated(path, "create"):
            try:
                obstore.put(store, key, data, mode="create")
            except obs_errors.AlreadyExistsError:
                raise StorageError(
                    f"{path!r} exists already: another writer created it first; it is never "
                    "replaced",
                    path=path,
                ) from None

    def commit(self, directory: str, files: list[dict[str, Any]], extra: dict[str, Any]) -> None:
        """Create ``metadata.json`` with a conditional create: only if no writer committed
        the step first (:class:`StorageError` then); see :meth:`Storage.commit`."""
        self.put_new(f"{directory}/{METADATA}", metadata_bytes(files, extra))

    def read_metadata(self, directory: str) -> dict[str, Any]:
        """See :meth:`Storage.read_metadata`."""
        path = f"{directory}/{METADATA}"
        try:
            data = self.read_bytes(path, MAX_METADATA_BYTES)
        except CheckpointNotFoundError:
            raise CheckpointNotFoundError(
                f"{directory!r} holds no committed checkpoint (no {METADATA}): its save "
                "failed, was interrupted or is still running"
            ) from None
        return parse_metadata(data, directory, path)

    def list_dir(self, directory: str) -> list[str]:
        """The names directly under the prefix ``directory`` (objects and prefixes)."""
        store, key = self.locate(directory)
        prefix = f"{key}/" if key else ""
        with translated(directory, "list"):
            found = obstore.list_with_delimiter(store, prefix or None)
        names = {p.rstrip("/").rsplit("/", 1)[-1] for p in found["common_prefixes"]}
        names |= {o["path"].rsplit("/", 1)[-1] for o in found["objects"]}
        return sorted(names)

    def list_files(self, directory: str) -> dict[str, int]:
        """The objects directly under the prefix ``directory`` (never a deeper prefix,
        which a planted ``metadata.json/x`` would make look like a file): name -> size."""
        store, key = self.locate(directory)
        with translated(directory, "list"):
            found = obstore.list_with_delimiter(store, f"{key}/" if key else None)
        return {o["path"].rsplit("/", 1)[-1]: o["size"] for o in found["objects"]}

    def list_objects(self, directory: str) -> list[dict[str, Any]]:
        """Every object under the prefix ``directory``: ``{"path": url, "size": bytes}``."""
        store, key = self.locate(directory)
        scheme, bucket, _ = split_url(directory)
        out = []
        with translated(directory, "list"):
            for batch in obstore.list(store, f"{key}/" if key else None, chunk_size=1000):
                for obj in batch:
                    out.append({"path": f"{scheme}://{bucket}/{obj['path']}", "size": obj["size"]})
        return out

    def makedirs(self, directory: str) -> None:
        """Nothing to create in an object store; checks that the bucket exists and the
        credentials are accepted, so that a wrong one fails here, before any save."""
        self.list_dir(directory)

    def delete(self, paths: list[str]) -> None:
        """Delete the objects ``paths`` (missing ones are no error)."""
        by_store: dict[int, tuple[Any, list[str]]] = {}
        for path in paths:
            store, key = self.locate(path)
            by_store.setdefault(id(store), (store, []))[1].append(key)
        for store, keys in by_store.values():
            for i in range(0, len(keys), 1000):
                with translated(paths[0], "delete"):
                    obstore.delete(store, keys[i : i + 1000])

    def remove_tree(self, path: str) -> None:
        """Delete ``metadata.json`` first (the step is un-committed), then the rest."""
        self.delete([f"{path}/{METADATA}"])
        self.delete([o["path"] for o in self.list_objects(path)])

    def remove_temporaries(self, directory: str, prefix: str) -> list[str]:
        """Nothing: an object store has no temporary names (an upload a killed writer left
        unfinished is invisible; a bucket lifecycle rule ends it)."""
        return []

    def lock(self, directory: str) -> Any:
        """A lease on ``directory``: see :class:`~aiockpt.storage._lease.Lease`."""
        from ._lease import Lease

        return Lease(self, directory, self.lease_ttl)

    # -- files between tiers -----------------------------------------------------------

    def upload_file(
        self, local: str, url: str, record: dict[str, Any] | None, progress: Callable[[int], object]
    ) -> None:
        """Upload the local file ``local`` to ``url`` in parts, hashing it as it streams;
        if ``record`` is given, the bytes must match its size and xxh3-64, or the object is
        deleted and :class:`CorruptCheckpointError` raised."""
        store, key = self.locate(url)
        digest = xxhash.xxh3_64()
        size = 0

        def chunks() -> Iterator[bytes]:
            nonlocal size
            with open(local, "rb", buffering=0) as f:
                while chunk := f.read(self.part_size):
                    digest.update(chunk)
                    size += len(chunk)
                    progress(len(chunk))
                    yield chunk

        with translated(url, "upload"):
            obstore.put(
                store,
                key,
                chunks(),
                chunk_size=self.part_size,
                max_concurrency=self.concurrency,
            )
        if record is not None and (
            size != record["nbytes"] or digest.hexdigest() != record["xxh3_64"]
        ):
            self.delete([url])
            raise CorruptCheckpointError(
                f"{local!r} does not match its recorded size and checksum any more: not uploaded",
                path=local,
            )

    def hash_object(self, url: str, progress: Callable[[int], object]) -> tuple[int, str]:
        """The size and xxh3-64 of the object ``url``, streamed (memory: one chunk)."""
        store, key = self.locate(url)
        digest = xxhash.xxh3_64()
        size = 0
        with translated(url, "read"):
            for chunk in obstore.get(store, key).stream(min_chunk_size=READ_CHUNK):
                view = memoryview(chunk)
                digest.update(view)
                size += view.nbytes
                progress(view.nbytes)
        return size, digest.hexdigest()


def object_storage(url: str, options: dict[str, Any] | None) -> ObjectStorage:
    """The :class:`ObjectStorage` for the object-store URL ``url``
    (:class:`InvalidRequestError` for another URL)."""
    split_url(url)
    return ObjectStorage(options)
