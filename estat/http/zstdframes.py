"""Where the frames of a zstd stream end, read from their headers alone
(RFC 8878 section 3.1), as the compressed bytes arrive.

The zstandard stream writer that inflates a body says nothing when its
input stops in the middle of a frame, and a body cut at a line boundary
inflates to valid, shorter NDJSON. Walking the frame and block headers
costs a few Python operations per 128 KiB block and tells whether the
stream ended where a frame ends."""

from __future__ import annotations

_ZSTD_MAGIC = 0xFD2FB528
_SKIPPABLE_MAGIC = 0x184D2A50  # the low four bits are free
_DICTIONARY_ID_BYTES = (0, 1, 2, 4)
_CONTENT_SIZE_BYTES = (0, 2, 4, 8)  # 0 is 1 with the single-segment flag
_RESERVED_BLOCK = 3
_RLE_BLOCK = 1
_CHECKSUM_BYTES = 4


class ZstdFrames:
    """Feed it the compressed bytes in order; `complete()` is whether they
    end just after a frame (at least one), and `bad` whether a header was
    not zstd's."""

    __slots__ = ("bad", "frames", "_buffer", "_skip", "_in_frame", "_checksum")

    def __init__(self) -> None:
        self.bad = False
        self.frames = 0
        self._buffer = b""  # an incomplete header, at most 18 bytes
        self._skip = 0  # bytes of block content (or a skippable frame) still to come
        self._in_frame = False  # between a frame header and its last block
        self._checksum = False

    def feed(self, data: bytes) -> None:
        if self._skip >= len(data) and not self._buffer:
            self._skip -= len(data)  # block content: nothing to read
            return
        buf = self._buffer + data if self._buffer else data
        at, end = 0, len(buf)
        while not self.bad:
            if self._skip:
                step = min(self._skip, end - at)
                at += step
                self._skip -= step
                if self._skip:
                    break
            if at == end:
                break
            size = self._header_size(buf, at, end)
            if size == 0 or end - at < size:
                break
            self._read_header(buf, at)
            at += size
        self._buffer = bytes(buf[at:]) if not self.bad else b""

    def complete(self) -> bool:
        return (not self.bad and self.frames > 0 and not self._in_frame
                and not self._skip and not self._buffer)

    def _header_size(self, buf: bytes, at: int, end: int) -> int:
        """The size of the header at `at`, or 0 while too few bytes have
        arrived to know it."""
        if self._in_frame:
            return 3  # a block header
        if end - at < 5:
            return 0
        magic = int.from_bytes(buf[at:at + 4], "little")
        if magic & 0xFFFFFFF0 == _SKIPPABLE_MAGIC:
            return 8
        if magic != _ZSTD_MAGIC:
            self.bad = True
            return 0
        descriptor = buf[at + 4]
        single_segment = descriptor & 0x20
        content_size = _CONTENT_SIZE_BYTES[descriptor >> 6] or (1 if single_segment else 0)
        return (5 + (0 if single_segment else 1) + _DICTIONARY_ID_BYTES[descriptor & 3]
                + content_size)

    def _read_header(self, buf: bytes, at: int) -> None:
        if self._in_frame:
            header = int.from_bytes(buf[at:at + 3], "little")
            kind, size = (header >> 1) & 3, header >> 3
            if kind == _RESERVED_BLOCK:
                self.bad = True
                return
            self._skip = 1 if kind == _RLE_BLOCK else size
            if header & 1:  # the frame's last block
                self._in_frame = False
                self.frames += 1
                if self._checksum:
                    self._skip += _CHECKSUM_BYTES
            return
        magic = int.from_bytes(buf[at:at + 4], "little")
        if magic & 0xFFFFFFF0 == _SKIPPABLE_MAGIC:
            self._skip = int.from_bytes(buf[at + 4:at + 8], "little")
            return
        self._in_frame = True
        self._checksum = bool(buf[at + 4] & 0x04)
