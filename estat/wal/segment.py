"""The on-disk format of a write-ahead log segment, and reading it back.

A segment is one file, `<id>.wal` (the id: 16 decimal digits, so names sort
in the order segments were opened), holding a 12-byte header (`ESTATWAL`
and a version) and then records, each

    length: u32 LE | crc32 of the payload: u32 LE | payload (length bytes)

A payload is one of:

- `E`: the events of one admitted request, sharing one receive time and
  key segment: `E | ts_ms: u64 | segment length: u16 | segment |` then,
  per event, `body length: u32 | body`;
- `C`: a batch cut: `C | segment id: u64 | first event: u32 | count: u32`,
  written (and fsynced) before the batch is uploaded, so that a replay
  cuts the same batches and rewrites the same object keys.

An event's position is (segment id, its ordinal among the segment's
events): it is not written, a reader counts. A record whose bytes end
before its length says, or whose checksum is wrong while it is the last
one, is a torn tail (a write the crash cut short) and is cut off; a bad
record followed by others means the file is corrupt."""

from __future__ import annotations

import os
import re
import struct
import zlib
from dataclasses import dataclass, field
from typing import Iterable, Optional

from estat.model import Chunk, Event

MAGIC = b"ESTATWAL"
VERSION = 1
HEADER = MAGIC + struct.pack("<I", VERSION)
RECORD_HEAD = struct.Struct("<II")
MAX_RECORD = 256 * 1024 * 1024  # no single request comes near it
_EVENTS_HEAD = struct.Struct("<cQH")
_BODY_LENGTH = struct.Struct("<I")
_CUT = struct.Struct("<cQII")
_NAME = re.compile(r"(\d{16})\.wal")


def segment_name(segment_id: int) -> str:
    return f"{segment_id:016d}.wal"


def segment_id_of(name: str) -> Optional[int]:
    """The id in a segment's file name; None for any other file."""
    match = _NAME.fullmatch(name)
    return int(match.group(1)) if match else None


def list_segments(directory: str) -> list[int]:
    """The ids of the segments in `directory`, oldest first."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    return sorted(i for i in map(segment_id_of, names) if i is not None)


def record(payload: bytes) -> bytes:
    """A payload framed with its length and checksum."""
    return RECORD_HEAD.pack(len(payload), zlib.crc32(payload)) + payload


def events_record(chunk: Chunk) -> bytes:
    """One `E` record for a chunk of events (one ts and key segment)."""
    segment = chunk.segment.encode()
    head = _EVENTS_HEAD.pack(b"E", chunk.ts, len(segment)) + segment
    bodies = chunk.bodies
    if len(bodies) == 1:
        payload = head + _BODY_LENGTH.pack(len(bodies[0])) + bodies[0]
    else:
        pack = _BODY_LENGTH.pack
        payload = head + b"".join([piece for body in bodies
                                   for piece in (pack(len(body)), body)])
    return record(payload)


def cut_record(segment_id: int, first: int, count: int) -> bytes:
    return record(_CUT.pack(b"C", segment_id, first, count))


@dataclass
class Cut:
    """A batch of events `first` .. `first + count` of segment `segment`."""

    segment: int
    first: int
    count: int


@dataclass
class Scan:
    """What a segment holds: its events (in order, so an event's index is
    its ordinal; only counted when read without them), its cuts, where its valid records end, and what is wrong
    with the rest (`torn_at`: a torn tail begins there; `corrupt_at`: a bad
    record with more data after it; `bad_header`)."""

    events: list[Event] = field(default_factory=list)
    event_count: int = 0
    cuts: list[Cut] = field(default_factory=list)
    records: int = 0
    end: int = 0
    size: int = 0
    torn_at: Optional[int] = None
    corrupt_at: Optional[int] = None
    bad_header: bool = False

    @property
    def ok(self) -> bool:
        return self.torn_at is None and self.corrupt_at is None and not self.bad_header


def _decode(payload: bytes, into: Scan, keep_events: bool) -> bool:
    """Add one payload's events or cut to `into`; False if it is malformed."""
    kind = payload[:1]
    if kind == b"C" and len(payload) == _CUT.size:
        _, segment, first, count = _CUT.unpack(payload)
        into.cuts.append(Cut(segment, first, count))
        return True
    if kind != b"E" or len(payload) < _EVENTS_HEAD.size:
        return False
    _, ts, seg_length = _EVENTS_HEAD.unpack_from(payload)
    at = _EVENTS_HEAD.size + seg_length
    try:
        segment = payload[_EVENTS_HEAD.size:at].decode()
    except UnicodeDecodeError:
        return False
    events = []
    while at < len(payload):
        if at + 4 > len(payload):
            return False
        (length,) = _BODY_LENGTH.unpack_from(payload, at)
        at += 4
        if at + length > len(payload):
            return False
        events.append(Event(ts, payload[at:at + length], segment))
        at += length
    if not events:
        return False
    into.event_count += len(events)
    if keep_events:
        into.events.extend(events)
    return True


def scan(data: bytes, keep_events: bool = True) -> Scan:
    """Read a whole segment's bytes (see the module docstring)."""
    result = Scan(size=len(data))
    if data[:len(HEADER)] != HEADER:
        result.bad_header = True
        return result
    at = len(HEADER)
    size = len(data)
    while at < size:
        if size - at < RECORD_HEAD.size:
            result.torn_at = at
            break
        length, crc = RECORD_HEAD.unpack_from(data, at)
        end = at + RECORD_HEAD.size + length
        if length == 0 or length > MAX_RECORD:
            if not any(data[at:]):  # zeros a crash left past the last write
                result.torn_at = at
            else:
                result.corrupt_at = at
            break
        if end > size:
            result.torn_at = at
            break
        payload = data[at + RECORD_HEAD.size:end]
        if zlib.crc32(payload) != crc or not _decode(payload, result, keep_events):
            if end == size:
                result.torn_at = at
            else:
                result.corrupt_at = at
            break
        result.records += 1
        at = end
    result.end = at
    return result


def read_segment(path: str, keep_events: bool = True) -> Scan:
    """`scan` of the file at `path` (blocking)."""
    with open(path, "rb") as handle:
        return scan(handle.read(), keep_events)


def write_segment(path: str, records: Iterable[bytes]) -> None:
    """A whole segment at once (tests and tools; the writer appends)."""
    with open(path, "wb") as handle:
        handle.write(HEADER + b"".join(records))
