"""A minimal writer of the zip container ``torch.save`` produces: stored (uncompressed)
entries whose data starts on a 64-byte boundary, zip64 records where sizes or offsets need
them, and the same closing records (zip64 end of central directory, its locator, then the
classic end record, without an archive comment).

Entries are appended with :meth:`ZipStream.add`, which returns the bytes to write before the
entry's data; :meth:`ZipStream.close` returns the central directory and end records. The
caller writes both, in order, with the data in between: the writer only does arithmetic, so
the data can go straight from where it lies to the file (``os.writev``).
CRC-32 fields are 0, as ``torch.save`` writes them when its CRC-32 computation is off (the
file carries an xxh3-64 checksum instead).
"""

from __future__ import annotations

import struct

ALIGNMENT = 64
_LOCAL = struct.Struct("<IHHHHHIIIHH")
_CENTRAL = struct.Struct("<IHHHHHHIIIHHHHHII")
_ZIP64_END = struct.Struct("<IQHHIIQQQQ")
_ZIP64_LOCATOR = struct.Struct("<IIQI")
_END = struct.Struct("<IHHHHIIH")
_MAX32 = 0xFFFFFFFF  # a field's "see the zip64 record" value
ZIP64_AT = _MAX32  # sizes and offsets from here on go to zip64 fields
_MAX16 = 0xFFFF
_VERSION = 45  # 4.5: zip64
_PAD_ID = 0x4246  # "FB": the padding field torch's writer uses to align data


class ZipStream:
    """Offsets and headers of a stored zip archive written front to back.

    ``prefix`` is the directory every entry lives in (``torch.save`` to a file object uses
    ``"archive"``); ``torch.load`` accepts any.
    """

    def __init__(self, prefix: str = "archive") -> None:
        self.prefix = prefix
        self.offset = 0  # bytes of the archive so far (headers and data)
        self._central: list[bytes] = []

    def add(self, name: str, nbytes: int) -> bytes:
        """Register an entry of ``nbytes`` bytes at the current offset; return its local
        header (with the padding that aligns its data). The caller writes the header, then
        exactly ``nbytes`` bytes of data."""
        encoded = f"{self.prefix}/{name}".encode()
        start = self.offset
        big = nbytes >= ZIP64_AT
        zip64 = struct.pack("<HHQQ", 1, 16, nbytes, nbytes) if big else b""
        fixed = start + _LOCAL.size + len(encoded) + len(zip64) + 4
        pad = -fixed % ALIGNMENT
        extra = zip64 + struct.pack("<HH", _PAD_ID, pad) + b"Z" * pad
        size32 = _MAX32 if big else nbytes
        header = (
            _LOCAL.pack(
                0x04034B50, _VERSION, 0, 0, 0, 0, 0, size32, size32, len(encoded), len(extra)
            )
            + encoded
            + extra
        )
        self.offset = start + len(header) + nbytes
        self._central.append(self._central_entry(encoded, nbytes, start))
        return header

    @staticmethod
    def _central_entry(encoded: bytes, nbytes: int, start: int) -> bytes:
        fields = []
        size32 = nbytes
        if nbytes >= ZIP64_AT:
            fields += [nbytes, nbytes]
            size32 = _MAX32
        offset32 = start
        if start >= ZIP64_AT:
            fields.append(start)
            offset32 = _MAX32
        extra = struct.pack(f"<HH{len(fields)}Q", 1, 8 * len(fields), *fields) if fields else b""
        return (
            _CENTRAL.pack(
                0x02014B50,
                _VERSION,
                _VERSION,
                0,
                0,
                0,
                0,
                0,
                size32,
                size32,
                len(encoded),
                len(extra),
                0,
                0,
                0,
                0,
                offset32,
            )
            + encoded
            + extra
        )

    def close(self) -> bytes:
        """The central directory and the end records: the last bytes of the archive."""
        directory = b"".join(self._central)
        start, count = self.offset, len(self._central)
        end64 = start + len(directory)
        tail = _ZIP64_END.pack(
            0x06064B50, _ZIP64_END.size - 12, _VERSION, _VERSION, 0, 0, count, count,
            len(directory), start,
        )  # fmt: skip
        tail += _ZIP64_LOCATOR.pack(0x07064B50, 0, end64, 1)
        tail += _END.pack(
            0x06054B50,
            0,
            0,
            min(count, _MAX16),
            min(count, _MAX16),
            len(directory) if len(directory) < ZIP64_AT else _MAX32,
            start if start < ZIP64_AT else _MAX32,
            0,
        )
        self.offset = end64 + len(tail)
        return directory + tail
