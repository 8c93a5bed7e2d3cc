"""DCP's file reader with every data file read through one checked descriptor.

A data file is opened once, relative to the checkpoint directory: never through a link,
and only if it is a regular file (a FIFO or a device is refused unopened, so a load cannot
hang on one). With the checksum sidecar its size and xxh3-64 checksum are checked through
that descriptor; then DCP's own reading (slices, ``torch.load``, transforms) gets a stream
that reads the same descriptor with ``pread``, no further than the size checked. Nothing is
opened by name a second time, so a file swapped after its check is never what is read.
"""

from __future__ import annotations

import io
import os
from collections.abc import Generator, Iterator
from contextlib import contextmanager
from pathlib import PurePath
from typing import TYPE_CHECKING, Any

from torch.distributed.checkpoint.filesystem import FileSystem, FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner
from torch.futures import Future

from .._exceptions import CheckpointNotFoundError, CorruptCheckpointError, InvalidRequestError
from ..storage._files import open_file, opened
from ..storage._local import check_record
from ..storage._metadata import safe_join
from ._commit import CHECKSUMS, METADATA
from ._meta import read_checksums, read_dcp_metadata

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer


def check_file(path: str, record: dict[str, Any]) -> None:
    """Check a data file against its sidecar ``record``: a regular file (never followed
    through a link), read in chunks, no more than its recorded size."""
    try:
        with opened(open_file(path)) as fd:
            check_record(fd, path, record)
    except (FileNotFoundError, CheckpointNotFoundError):
        raise CorruptCheckpointError(f"{path!r} is missing", path=path) from None


class _BoundedFile(io.RawIOBase):
    """The first ``size`` bytes of the file behind ``fd``, read with ``pread`` (so the
    descriptor's offset is never shared). Closing it leaves ``fd`` open."""

    def __init__(self, fd: int, size: int) -> None:
        super().__init__()
        self._fd, self._size, self._pos = fd, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = os.SEEK_SET, /) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self._size}[whence]
        if base + offset < 0:
            raise ValueError(f"negative seek position {base + offset}")
        self._pos = base + offset
        return self._pos

    def readinto(self, buffer: WriteableBuffer, /) -> int:
        want = min(memoryview(buffer).nbytes, self._size - self._pos)
        if want <= 0:
            return 0
        got = os.preadv(self._fd, [memoryview(buffer).cast("B")[:want]], self._pos)
        self._pos += got
        return got


class _CheckedFiles(FileSystem):
    """The file system DCP's reader reads data files through: each stream comes from
    :meth:`CheckedFileSystemReader.data_stream`."""

    def __init__(self, reader: CheckedFileSystemReader) -> None:
        self.reader = reader

    @contextmanager
    def create_stream(
        self, path: str | os.PathLike[str], mode: str
    ) -> Generator[io.IOBase, None, None]:
        if mode != "rb":
            raise InvalidRequestError(f"a checkpoint reader opens files to read, not {mode!r}")
        with self.reader.data_stream(path) as stream:
            yield stream


class CheckedFileSystemReader(FileSystemReader):
    """DCP's file reader with the metadata read safely and each data file read through one
    descriptor: never a link or a special file, checked against the sidecar (when there is
    one) before any of its bytes is used, and read no further than its checked size."""

    def __init__(self, path: str | os.PathLike[str], require_checksums: bool = False) -> None:
        super().__init__(path)
        self.directory = os.fspath(path)
        self.require_checksums = require_checksums
        self.records: dict[str, dict[str, Any]] | None = None
        self.fs = _CheckedFiles(self)
        self._ends: dict[str, int] = {}  # file name -> end of the last slice this plan reads

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        super().reset(checkpoint_id)
        if checkpoint_id:
            self.directory = os.fspath(checkpoint_id)

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
        ends: dict[str, int] = {}
        for item in plan.items:
            info = self.storage_data[item.storage_index]
            end = info.offset + info.length
            ends[info.relative_path] = max(ends.get(info.relative_path, 0), end)
        self._ends = ends
        return super().read_data(plan, planner)

    @contextmanager
    def data_stream(self, path: str | os.PathLike[str]) -> Iterator[io.IOBase]:
        """A stream of the data file ``path`` (in this checkpoint), read through the
        descriptor that was checked; the descriptor is closed on leaving the block."""
        where = PurePath(path)
        if where.parent != PurePath(self.path):
            raise CorruptCheckpointError(
                f"refusing to read {os.fspath(path)!r}: not a file of {self.directory!r}",
                path=os.fspath(path),
            )
        file = safe_join(self.directory, where.name)
        try:
            fd = open_file(file)
        except CheckpointNotFoundError:
            raise CorruptCheckpointError(f"{file!r} is missing", path=file) from None
        with opened(fd):
            size = self._checked_size(fd, file, where.name)
            with io.BufferedReader(_BoundedFile(fd, size)) as stream:
                yield stream

    def _checked_size(self, fd: int, file: str, name: str) -> int:
        """How many bytes of ``fd`` may be read: its size, checked against the sidecar's
        record and against the slices this plan reads."""
        size = os.fstat(fd).st_size
        if self.records is not None:
            record = self.records.get(name)
            if record is None:
                raise CorruptCheckpointError(
                    f"{file!r} is read by {METADATA} but has no checksum in {CHECKSUMS}",
                    path=file,
                )
            check_record(fd, file, record)  # its size, then its bytes up to that size
            size = record["nbytes"]
        end = self._ends.get(name, 0)
        if end > size:
            raise CorruptCheckpointError(
                f"{file!r} has {size} bytes, {METADATA} records data in it up to byte {end}: "
                "the file is truncated or belongs to another checkpoint",
                path=file,
            )
        return size
