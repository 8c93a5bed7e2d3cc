"""DCP's file reader with the metadata read through :mod:`._meta`'s checks and each data
file checked against the checksum sidecar (when there is one) before it is read."""

from __future__ import annotations

from typing import Any

from torch.distributed.checkpoint.filesystem import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner
from torch.futures import Future

from .._exceptions import CheckpointNotFoundError, CorruptCheckpointError
from ..storage._files import open_file, opened
from ..storage._local import check_record
from ..storage._metadata import safe_join
from ._commit import CHECKSUMS
from ._meta import read_checksums, read_dcp_metadata


def check_file(path: str, record: dict[str, Any]) -> None:
    """Check a data file against its record: a regular file (never followed through a
    link), read in chunks, no more than its recorded size."""
    try:
        with opened(open_file(path)) as fd:
            check_record(fd, path, record)
    except (FileNotFoundError, CheckpointNotFoundError):
        raise CorruptCheckpointError(f"{path!r} is missing", path=path) from None


class CheckedFileSystemReader(FileSystemReader):
    """DCP's file reader with the metadata read safely and each data file checked against
    the sidecar (when there is one) before any of its bytes is used."""

    def __init__(self, path: str, require_checksums: bool = False) -> None:
        super().__init__(path)
        self.directory = path
        self.require_checksums = require_checksums
        self.records: dict[str, dict[str, Any]] | None = None

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if kwargs.get("rank") is not None:  # only global metadata: aiockpt writes that
            raise CheckpointNotFoundError(f"{self.directory!r} has no rank-local metadata")
        meta = read_dcp_metadata(self.directory, self.require_checksums)
        sidecar = read_checksums(self.directory)
        self.records = {r["name"]: r for r in sidecar["files"]} if sidecar is not None else None
        if meta.storage_meta is None:
            meta.storage_meta = StorageMeta()
        meta.storage_meta.load_id = self.load_id
        return meta

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        if self.records is not None:
            names = {self.storage_data[item.storage_index].relative_path for item in plan.items}
            for name in sorted(names):
                path = safe_join(self.directory, name)
                record = self.records.get(name)
                if record is None:
                    raise CorruptCheckpointError(
                        f"{path!r} is read by .metadata but has no checksum in {CHECKSUMS}",
                        path=path,
                    )
                check_file(path, record)
        return super().read_data(plan, planner)
