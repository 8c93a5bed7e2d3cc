"""Moving a committed step between a local directory and an object store, commit last on
both sides.

Upload: every data file is streamed from the local step (hashed as it goes, checked
against the record the local commit holds: a file damaged since is not uploaded), then the
commit files in their order, the commit marker last with a conditional create. A step that
is in the store with the same marker already (an upload that ran before a crash) counts
as uploaded; another marker there is an error.

Download: the files the remote commit records into the local step directory, data first in
parallel ranged reads (memory: ``concurrency`` x ``part_size``), the commit files last
(the marker published with no-replace), each file fsync'd: the local step exists only
once it is whole. The caller then verifies it against its checksums, as any local step.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from xxhash import xxh3_64_hexdigest

from .._exceptions import CheckpointNotFoundError, CorruptCheckpointError, StorageError
from ._atomic import write_atomic
from ._files import fsync_dir
from ._local import LocalStorage, make_dir
from ._metadata import MAX_METADATA_BYTES, safe_join
from ._object import ObjectStorage
from ._obstore import obstore, translated

Progress = Callable[[int], object]


def _nothing(_: int) -> None:
    pass


def upload_step(
    local: str,
    remote: str,
    store: ObjectStorage,
    records: list[dict[str, Any]],
    commit_names: list[str],
    progress: Progress = _nothing,
    before_marker: Callable[[], object] | None = None,
) -> bool:
    """Upload the committed local step ``local`` to the prefix ``remote``: the data files
    of ``records`` (checked), then ``commit_names`` in order (checked too if ``records``
    names them), the last one (the marker) created only if absent, right after
    ``before_marker`` (which may raise to refuse). Returns False if the same step was in
    the store already."""
    checks = {r["name"]: r for r in records if r["name"] in commit_names}
    records = [r for r in records if r["name"] not in commit_names]
    reader = LocalStorage()  # no link, FIFO or device is opened
    contents = {name: reader.read_bytes(safe_join(local, name)) for name in commit_names}
    for name, record in checks.items():
        data = contents[name]
        if len(data) != record["nbytes"] or xxh3_64_hexdigest(data) != record["xxh3_64"]:
            raise CorruptCheckpointError(
                f"{local + '/' + name!r} does not match its recorded size and checksum any "
                "more: not uploaded",
                path=f"{local}/{name}",
            )
    marker = commit_names[-1]
    marker_bytes = contents[marker]
    try:
        if store.read_bytes(f"{remote}/{marker}") == marker_bytes:
            return False  # uploaded before (a crash came before it was known)
    except CheckpointNotFoundError:
        pass
    workers = max(1, min(len(records), 4))
    with ThreadPoolExecutor(workers, thread_name_prefix="aiockpt-upload") as pool:
        jobs = [
            pool.submit(
                store.upload_file,
                safe_join(local, r["name"]),
                f"{remote}/{r['name']}",
                r,
                progress,
            )
            for r in records
        ]
        for job in jobs:
            job.result()
    for name in commit_names[:-1]:
        store_, key = store.locate(f"{remote}/{name}")
        with translated(f"{remote}/{name}", "upload"):
            obstore.put(store_, key, contents[name])
    if before_marker is not None:
        before_marker()
    try:
        store.put_new(f"{remote}/{marker}", marker_bytes)
    except StorageError:
        if store.read_bytes(f"{remote}/{marker}") == marker_bytes:
            return False
        raise StorageError(
            f"{remote!r} was committed by another writer with other content: not replaced. "
            "Two jobs upload to this prefix: give each its own",
            path=remote,
        ) from None
    return True


def download_step(
    remote: str,
    local: str,
    store: ObjectStorage,
    commit_names: list[str],
    progress: Progress = _nothing,
) -> list[str]:
    """Download the files the remote step ``remote`` records into the local directory
    ``local`` (created; it must hold no commit marker), commit files last in their order.
    Returns the names written. The caller verifies the step."""
    # Only the files the remote commit records (each name checked: it stays inside
    # ``local``), at their recorded sizes: anything else planted under the prefix is
    # never downloaded, and the step is verified against its checksums afterwards.
    _, records = remote_records(remote, store)
    names: dict[str, int] = {}
    for record in records:
        safe_join(local, record["name"])  # raises for a name that would leave it
        names[record["name"]] = record["nbytes"]
    present = store.list_files(remote)
    if commit_names[-1] not in present:
        raise CheckpointNotFoundError(f"{remote!r} holds no committed step")
    for name, size in names.items():
        if present.get(name) != size:
            raise CorruptCheckpointError(
                f"{remote + '/' + name!r} is {present.get(name, 'missing')} bytes, its step "
                f"records {size}: not downloaded",
                path=f"{remote}/{name}",
            )
    names.update({n: 0 for n in commit_names if n in present})
    make_dir(local)
    data = [n for n in sorted(names) if n not in commit_names]
    lock = threading.Lock()
    budget = threading.Semaphore(store.concurrency)

    def fetch_range(fd: int, url: str, start: int, end: int) -> None:
        with budget:
            s, key = store.locate(url)
            with translated(url, "download"):
                chunk = obstore.get_range(s, key, start=start, end=end)
            view = memoryview(chunk)
            done = 0
            while done < view.nbytes:
                done += os.pwrite(fd, view[done:], start + done)
        with lock:
            progress(end - start)

    with ThreadPoolExecutor(store.concurrency, thread_name_prefix="aiockpt-download") as pool:
        opened_fds: list[int] = []
        try:
            jobs = []
            for name in data:
                path = safe_join(local, name)
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o666)
                opened_fds.append(fd)
                size = names[name]
                os.ftruncate(fd, size)
                for start in range(0, size, store.part_size):
                    end = min(size, start + store.part_size)
                    jobs.append(pool.submit(fetch_range, fd, f"{remote}/{name}", start, end))
            for job in jobs:
                job.result()
            for fd in opened_fds:
                os.fsync(fd)
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)  # the rest is not fetched
            raise
        finally:
            for fd in opened_fds:
                os.close(fd)
    for name in commit_names:
        if name in names:
            content = store.read_bytes(f"{remote}/{name}", 4 * MAX_METADATA_BYTES)  # DCP: 256 MiB

            def write(f: Any, content: bytes = content) -> None:
                f.write(content)

            write_atomic(safe_join(local, name), write, replace=False)
    fsync_dir(local)
    return [*data, *[n for n in commit_names if n in names]]


def remote_records(
    remote: str, store: ObjectStorage
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The listing record of the committed remote step ``remote`` (its metadata, or a DCP
    step's checksum sidecar) and the records of every file to check."""
    import json

    from ._metadata import METADATA

    names = store.list_files(remote)
    if ".metadata.checksums" in names and ".metadata" in names:
        path = f"{remote}/.metadata.checksums"
        try:
            sidecar = json.loads(store.read_bytes(path, MAX_METADATA_BYTES))
            records = [sidecar["metadata"], *sidecar["files"]]
        except (ValueError, KeyError, TypeError, RecursionError) as exc:
            raise CorruptCheckpointError(f"{path!r} is not a checksum sidecar", path=path) from exc
        for record in records:
            if not (
                isinstance(record, dict)
                and isinstance(record.get("name"), str)
                and isinstance(record.get("nbytes"), int)
                and not isinstance(record.get("nbytes"), bool)
                and record["nbytes"] >= 0
                and isinstance(record.get("xxh3_64"), str)
            ):
                raise CorruptCheckpointError(
                    f"{path!r} holds a malformed file record: the step cannot be checked",
                    path=path,
                )
            safe_join(remote, record["name"])
        if not isinstance(sidecar, dict):
            raise CorruptCheckpointError(f"{path!r} is not a checksum sidecar", path=path)
        return sidecar, records
    if METADATA not in names:
        raise CheckpointNotFoundError(
            f"{remote!r} holds no committed checkpoint (no {METADATA} or .metadata)"
        )
    meta = store.read_metadata(remote)
    return meta, list(meta["files"])


def verify_remote(remote: str, store: ObjectStorage, progress: Progress = _nothing) -> list[str]:
    """Check every file of the committed remote step ``remote`` against its record,
    streaming; returns the URLs checked. :class:`CorruptCheckpointError` names the first
    bad one."""
    _, records = remote_records(remote, store)
    checked = []
    for record in records:
        url = f"{remote}/{safe_join('', record['name'])}"
        size, digest = store.hash_object(url, progress)
        if size != record["nbytes"] or digest != record["xxh3_64"]:
            raise CorruptCheckpointError(
                f"{url!r} is corrupt: {size} bytes with xxh3-64 {digest}, its step records "
                f"{record['nbytes']} bytes with {record['xxh3_64']}",
                path=url,
            )
        checked.append(url)
    return checked
