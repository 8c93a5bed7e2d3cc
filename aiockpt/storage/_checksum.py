"""Checksums written with the bytes: a hashing writer, and the trailer that makes a single
``torch.save`` file self-checking.

``torch.save`` writes a zip archive, which ends with a 22-byte end-of-central-directory
record whose last field is the length of an archive comment. The writer holds those 22
bytes back, sets the comment length and appends the comment::

    aiockpt:xxh3_64:<16 hex digits>:<20 decimal digits>

the xxh3-64 and the length of every byte before the comment. Any zip reader, ``torch.load``
included, skips the comment; :func:`read_trailer` finds it again.
"""

from __future__ import annotations

import os
import struct
from typing import Any

import xxhash

from .._exceptions import CorruptCheckpointError

EOCD_SIGNATURE = b"PK\x05\x06"
EOCD_SIZE = 22
MAGIC = b"aiockpt:xxh3_64:"
TRAILER_SIZE = len(MAGIC) + 16 + 1 + 20
_IOV_MAX = 1024
_SEARCH = 4096  # how far from the end a misplaced trailer is still recognised


class HashingWriter:
    """A write-only file object over a descriptor that hashes and counts what it writes;
    with ``trailer=True`` it appends the checksum trailer in :meth:`finish`."""

    def __init__(self, fd: int, *, trailer: bool = False) -> None:
        self._fd = fd
        self._hash = xxhash.xxh3_64()
        self._tail = bytearray()  # held back: the zip's closing record, patched at the end
        self._hold = EOCD_SIZE if trailer else 0
        self.nbytes = 0
        # torch.save turns a failed write into a vague RuntimeError; keep the real cause.
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        size = view.nbytes
        if not self._hold:
            self._emit(view)
        elif size >= self._hold:
            self._emit(memoryview(self._tail))
            self._emit(view[: size - self._hold])
            self._tail = bytearray(view[size - self._hold :])
        else:
            self._tail += view
            excess = len(self._tail) - self._hold
            if excess > 0:
                self._emit(memoryview(self._tail)[:excess])
                del self._tail[:excess]
        return size

    def writev(self, buffers: list[Any]) -> None:
        """Write ``buffers`` in order, many per system call (``os.writev``). The bytes
        held back for the trailer go first, so the archive's closing record must come in a
        later :meth:`write`."""
        if self._tail:
            self._emit(memoryview(self._tail))
            self._tail = bytearray()
        views = [memoryview(b).cast("B") for b in buffers]
        for view in views:
            self._hash.update(view)
            self.nbytes += view.nbytes
        i = 0
        while i < len(views):
            try:
                written = os.writev(self._fd, views[i : i + _IOV_MAX])
            except OSError as exc:
                self.error = exc
                raise
            while i < len(views) and written >= views[i].nbytes:
                written -= views[i].nbytes
                i += 1
            if written:
                views[i] = views[i][written:]

    def _emit(self, view: memoryview) -> None:
        self._hash.update(view)
        self.nbytes += view.nbytes
        while view.nbytes:
            try:
                written = os.write(self._fd, view)
            except OSError as exc:
                self.error = exc
                raise
            view = view[written:]

    def flush(self) -> None:
        pass  # unbuffered: every write reached the descriptor

    def finish(self) -> str:
        """Write what was held back (and the trailer); return the xxh3-64 of the file."""
        if self._hold:
            tail = self._tail
            if len(tail) != EOCD_SIZE or tail[:4] != EOCD_SIGNATURE or tail[-2:] != b"\0\0":
                raise ValueError(
                    "the data written is not a zip archive (torch.save's default format); "
                    "aiockpt files cannot use _use_new_zipfile_serialization=False"
                )
            tail[-2:] = struct.pack("<H", TRAILER_SIZE)
            self._emit(memoryview(tail))
            digest = self._hash.hexdigest()
            self._emit(memoryview(MAGIC + f"{digest}:{self.nbytes:020d}".encode()))
        return self._hash.hexdigest()


def read_trailer(fd: int, size: int, path: str) -> tuple[int, str] | None:
    """``(nbytes, xxh3_64)`` of the checked prefix of the file behind ``fd``, or None if it
    carries no aiockpt trailer (a plain ``torch.save`` file). A damaged trailer raises
    :class:`CorruptCheckpointError`."""
    if size < EOCD_SIZE + TRAILER_SIZE:
        return None
    end = os.pread(fd, EOCD_SIZE + TRAILER_SIZE, size - EOCD_SIZE - TRAILER_SIZE)
    eocd, trailer = end[:EOCD_SIZE], end[EOCD_SIZE:]
    claims_eocd = eocd[:4] == EOCD_SIGNATURE and eocd[-2:] == struct.pack("<H", TRAILER_SIZE)
    if not claims_eocd and not trailer.startswith(MAGIC):
        # Not where it belongs: a trailer a little before or after the end means bytes
        # were cut or appended, which is corruption, not a file without a trailer.
        near = min(size, _SEARCH)
        if MAGIC in os.pread(fd, near, size - near):
            raise CorruptCheckpointError(
                f"{path!r} ends {_SEARCH} bytes or less away from its aiockpt checksum "
                "trailer: bytes were cut from it or appended to it; the file is corrupt",
                path=path,
            )
        return None
    bad = CorruptCheckpointError(
        f"{path!r} has a damaged aiockpt checksum trailer: the file is corrupt", path=path
    )
    if not (claims_eocd and trailer.startswith(MAGIC)) or trailer[len(MAGIC) + 16 : -20] != b":":
        raise bad
    digest = trailer[len(MAGIC) : len(MAGIC) + 16].decode("ascii", "replace")
    length = trailer[-20:]
    if not length.isdigit() or any(c not in "0123456789abcdef" for c in digest):
        raise bad
    nbytes = int(length)
    if nbytes + TRAILER_SIZE != size:
        raise CorruptCheckpointError(
            f"{path!r} has {size} bytes, its trailer records {nbytes + TRAILER_SIZE}: the "
            "file is truncated or was extended",
            path=path,
        )
    return nbytes, digest
