"""ZstdFrames: whether a zstd stream ends where a frame ends, from its
headers alone, however the bytes arrive."""

from __future__ import annotations

import zstandard
from twisted.trial import unittest

from estat.http.zstdframes import ZstdFrames

PAYLOAD = b"".join(b'{"n":%d,"pad":"%d"}\n' % (i, i * 7919 % 100_003) for i in range(20_000))
SKIPPABLE = b"\x50\x2a\x4d\x18" + (3).to_bytes(4, "little") + b"abc"


def walk(data: bytes, piece: int) -> ZstdFrames:
    frames = ZstdFrames()
    for at in range(0, len(data), piece):
        frames.feed(data[at:at + piece])
    return frames


def streams() -> list[bytes]:
    found = []
    for options in ({}, {"write_checksum": True}, {"write_content_size": False},
                    {"level": 19}):
        compressor = zstandard.ZstdCompressor(**options)
        whole = compressor.compress(PAYLOAD)
        stream = compressor.compressobj()
        found += [whole, stream.compress(PAYLOAD) + stream.flush(), whole + whole,
                  SKIPPABLE + whole]
    return found


class ZstdFramesTests(unittest.TestCase):
    def test_whole_streams_are_complete_in_any_pieces(self):
        for data in streams():
            for piece in (1, 7, 1000, len(data)):
                frames = walk(data, piece)
                self.assertTrue(frames.complete(), (len(data), piece))
                self.assertFalse(frames.bad)

    def test_a_stream_cut_anywhere_but_between_frames_is_not(self):
        whole = zstandard.ZstdCompressor(write_checksum=True).compress(PAYLOAD)
        for cut in range(1, len(whole), max(1, len(whole) // 997)):
            self.assertFalse(walk(whole[:cut], 4096).complete(), cut)
        self.assertFalse(walk(whole[:-1], 4096).complete())  # the checksum cut
        self.assertTrue(walk((whole + whole)[:len(whole)], 4096).complete())

    def test_what_is_not_zstd_is_bad(self):
        for data in (b"garbage that is not zstd", b"", SKIPPABLE):
            frames = walk(data, 5)
            self.assertFalse(frames.complete(), data)
        self.assertTrue(walk(b"garbage that is not zstd", 5).bad)
