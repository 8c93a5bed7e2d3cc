"""NVRx's ``async_ckpt.cached_metadata_filesystem_reader``."""

from ...dcp._cached_reader import CachedMetadataFileSystemReader as CachedMetadataFileSystemReader

__all__ = ["CachedMetadataFileSystemReader"]
