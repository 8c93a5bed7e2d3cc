"""A DCP reader that reads a checkpoint's ``.metadata`` once per process (NVRx's
``CachedMetadataFileSystemReader``), with aiockpt's checksum checks."""

from __future__ import annotations

import os
from typing import Any, ClassVar

from torch.distributed.checkpoint.metadata import Metadata

from ._commit import METADATA
from ._reader import CheckedFileSystemReader


class CachedMetadataFileSystemReader(CheckedFileSystemReader):
    """:class:`CheckedFileSystemReader` whose metadata is shared by every reader of the
    same directory in this process. Unlike the reference's cache, an entry is keyed by the
    ``.metadata`` file's identity too, so a checkpoint saved again at the same path is
    read afresh. ``cache_metadata=False`` reads it every time."""

    # Per checkpoint: its metadata, and the checksum records its data files are checked
    # against (None: no sidecar), so a reader served from the cache checks them too.
    _metadata_cache: ClassVar[dict[tuple[Any, ...], tuple[Metadata, Any]]] = {}

    def __init__(self, path: str | os.PathLike[str], cache_metadata: bool = True) -> None:
        super().__init__(os.fspath(path))
        self._cache_metadata = cache_metadata
        self._abs_path = os.path.abspath(os.fspath(path))

    def _cache_key(self) -> tuple[Any, ...] | None:
        try:
            st = os.stat(os.path.join(self._abs_path, METADATA))
        except OSError:
            return None
        return (self._abs_path, st.st_ino, st.st_size, st.st_mtime_ns)

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        key = self._cache_key() if self._cache_metadata else None
        if key is None:
            return super().read_metadata(*args, **kwargs)
        cache = CachedMetadataFileSystemReader._metadata_cache
        if key not in cache:
            cache[key] = (super().read_metadata(*args, **kwargs), self.records)
        meta, self.records = cache[key]
        return meta

    @classmethod
    def clear_metadata_cache(cls) -> None:
        """Forget every cached metadata."""
        cls._metadata_cache.clear()
