"""The worker's part of a DCP save: write this rank's data files, each under a temporary
name, fsync'd and renamed, in the layout of DCP's ``FileSystemWriter`` (one
``torch.save``'d record per tensor chunk, raw bytes per object)."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.planner import WriteItemType
from torch.distributed.checkpoint.storage import WriteResult

from ..storage._atomic import write_atomic
from ..storage._local import _no_crc32
from ._plan import FileBucket


def _write_bucket(directory: str, bucket: FileBucket) -> tuple[list[WriteResult], dict[str, Any]]:
    name, entries = bucket
    results: list[WriteResult] = []

    def write(f: Any) -> None:
        for item, data in entries:
            offset = f.nbytes
            if item.type == WriteItemType.BYTE_IO:
                f.write(data)
            else:
                torch.save(data, f)
            length = f.nbytes - offset
            results.append(
                WriteResult(
                    index=item.index,
                    size_in_bytes=length,
                    storage_data=_StorageInfo(name, offset, length),
                )
            )

    with _no_crc32():
        record = write_atomic(os.path.join(directory, name), write)
    return results, record


def write_rank_files(
    buckets: list[FileBucket], directory: str, thread_count: int = 1
) -> dict[str, Any]:
    """Write each bucket to its file in ``directory`` (``thread_count`` files at a time).

    Returns ``{"results": [WriteResult, ...], "files": [{"name", "nbytes", "xxh3_64"}]}``;
    a file that failed leaves no trace but its temporary name's clean-up.
    """
    if thread_count > 1 and len(buckets) > 1:
        with ThreadPoolExecutor(min(thread_count, len(buckets)), "aiockpt-dcp-write") as pool:
            done = list(pool.map(lambda b: _write_bucket(directory, b), buckets))
    else:
        done = [_write_bucket(directory, b) for b in buckets]
    return {
        "results": [r for results, _ in done for r in results],
        "files": [record for _, record in done],
    }
