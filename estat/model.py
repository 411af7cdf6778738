"""The values that travel the pipeline: accepted events as `Chunk`s (the
events of one request, which share a receive time and writer segment), a
flushed `Batch` of chunks, an `EncodedObject` ready to store, and how
batches and objects are named. An `Event` is one of a chunk's events on its
own, for the paths that look at events one by one. Pure data: no I/O, no
Twisted.

Every object key is built by `object_key` and checked there (`check_key`):
each `/`-separated part is a plain name, so no key can point above the
store's root, whatever a prefix, segment or host id holds."""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from itertools import groupby, repeat
from operator import itemgetter
from typing import (Callable, Iterable, Iterator, NamedTuple, Optional, Sequence, Union,
                    overload)


class Event(NamedTuple):
    """One accepted event: receive time in ms since the epoch, the body as
    received, and the writer's key prefix segment ("" for none)."""

    ts: int
    body: bytes
    segment: str = ""


class Lines(Sequence[bytes]):
    """The bodies of an NDJSON text, kept as the text that arrived: `text`
    is `line_count` lines, each one body ended by a LF, none holding a CR. A
    batch's events move from admission to their object's text as this one
    buffer: no `bytes` is made per body (splitting a 13,500-line chunk into
    them, and freeing them, cost 3.3 ms), and the codec frames the lines
    with one `replace`. The bodies one by one are made only when asked for
    (a write-ahead log record, a replay, a test)."""

    __slots__ = ("text", "line_count")

    def __init__(self, text: bytes, line_count: int) -> None:
        self.text = text
        self.line_count = line_count

    @property
    def size(self) -> int:
        """The bodies' total length (the text less its LFs)."""
        return len(self.text) - self.line_count

    def __len__(self) -> int:
        return self.line_count

    def bodies(self) -> list[bytes]:
        lines = self.text.split(b"\n")
        lines.pop()
        return lines

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.bodies())

    @overload
    def __getitem__(self, index: int) -> bytes: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[bytes]: ...

    def __getitem__(self, index: Union[int, slice]) -> Union[bytes, Sequence[bytes]]:
        return self.bodies()[index]

    def first(self, count: int) -> list[bytes]:
        """The first `count` bodies (all, when there are fewer), split off
        the text no further than they reach."""
        lines = self.text.split(b"\n", count)
        del lines[min(count, self.line_count):]
        return lines

    def split_at(self, count: int, size: int) -> tuple["Lines", "Lines"]:
        """The first `count` lines, whose bodies are `size` bytes, and the
        rest, each as Lines."""
        end = size + count
        text = self.text
        return Lines(text[:end], count), Lines(text[end:], self.line_count - count)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Lines):
            return self.text == other.text
        if isinstance(other, Sequence) and not isinstance(other, (bytes, str)):
            return self.bodies() == list(other)
        return NotImplemented

    def __hash__(self) -> int:
        return hash(tuple(self.bodies()))

    def __repr__(self) -> str:
        return f"Lines({self.text!r}, {self.line_count})"


def head_and_tail(bodies: Sequence[bytes], count: int,
                  size: int) -> tuple[Sequence[bytes], Sequence[bytes]]:
    """`bodies` cut after the first `count`, which are `size` bytes."""
    if isinstance(bodies, Lines):
        return bodies.split_at(count, size)
    return bodies[:count], bodies[count:]


def leading(bodies: Sequence[bytes], count: int) -> Sequence[bytes]:
    """The first `count` of `bodies` (all, when there are fewer)."""
    if isinstance(bodies, Lines):
        return bodies.first(count)
    return bodies[:count]


class Chunk(NamedTuple):
    """Accepted events that share a receive time (ms since the epoch) and a
    writer segment, in order: one request's, or one writer's part of an SDK
    batch. The pipeline moves them as chunks, so that no Python object is
    made per event between the request and its object's text. `plain`
    says no body holds a CR or LF (NDJSON lines): then the codec frames
    their lines without looking. `size` is the bodies' total length.
    `bodies` is a tuple: a chunk then holds nothing the cyclic garbage
    collector must keep looking at (it stops tracking such tuples), however
    many wait in the queue; or `Lines`, an NDJSON batch's text.
    """

    ts: int
    bodies: Sequence[bytes]
    segment: str = ""
    plain: bool = False
    size: int = -1  # -1: not counted yet (see `sized`)


def holds_line_break(body: bytes) -> bool:
    """Whether `body` holds a CR or LF: a JSON Lines line cannot frame it
    as it is (two memchr scans)."""
    return b"\n" in body or b"\r" in body


def line_feeds(data: bytes) -> int:
    """How many LF bytes `data` holds. Counted as the length that deleting
    them takes off: CPython 3.11's `bytes.count` of one byte steps through
    every byte, where `replace` finds them with memchr (0.30 against 1.17
    ms for the 4 MB of a 13,500-line chunk)."""
    return len(data) - len(data.replace(b"\n", b""))


def line_slices(text: bytes, size: int) -> Iterator[tuple[int, int]]:
    """Where the slices of whole lines of `text` (which ends with a LF)
    begin and end: each runs to the first LF at or past `size` bytes from
    its beginning, the last to the end of the text."""
    begin = 0
    while begin < len(text):
        end = text.find(b"\n", begin + size - 1) + 1 or len(text)
        yield begin, end
        begin = end


def sized(chunk: Chunk) -> Chunk:
    """`chunk` with its `size` counted."""
    if chunk.size >= 0:
        return chunk
    bodies = chunk.bodies
    if isinstance(bodies, Lines):
        return chunk._replace(size=bodies.size)
    size = len(bodies[0]) if len(bodies) == 1 else sum(map(len, bodies))
    return chunk._replace(size=size)


_new_tuple = tuple.__new__


def events_in(chunks: Iterable[Chunk]) -> list[Event]:
    """The events of `chunks`, one by one, in order."""
    events: list[Event] = []
    for ts, bodies, segment, _, _ in chunks:
        events.extend(map(_new_tuple, repeat(Event),
                          zip(repeat(ts), bodies, repeat(segment))))
    return events


_TIME_AND_SEGMENT = itemgetter(Event._fields.index("ts"), Event._fields.index("segment"))
_bodies_of = itemgetter(Chunk._fields.index("bodies"))


def events_in_chunks(chunks: list[Chunk]) -> int:
    """How many events `chunks` hold."""
    if len(chunks) == 1:
        return len(chunks[0].bodies)
    return sum(map(len, map(_bodies_of, chunks)))


def chunks_of(events: Iterable[Event]) -> list[Chunk]:
    """`events` as chunks: each run of events with one receive time and
    segment becomes one, in order."""
    return [Chunk(ts, tuple([event[1] for event in run]), segment)
            for (ts, segment), run in groupby(events, key=_TIME_AND_SEGMENT)]

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


@dataclass
class Batch:
    """Chunks of events flushed together; one batch becomes one object (plus
    one raw object when some bodies could not be embedded). In durable mode
    `wal_span` is the (segment, first ordinal, count) of its events in the
    write-ahead log."""

    chunks: list[Chunk]
    body_bytes: int
    batch_id: str
    trigger: str
    wal_span: Optional[tuple[int, int, int]] = None

    @classmethod
    def of_events(cls, events: list[Event], body_bytes: int, batch_id: str, trigger: str,
                  wal_span: Optional[tuple[int, int, int]] = None) -> "Batch":
        """A batch of events given one by one (a replay, a test)."""
        return cls(chunks_of(events), body_bytes, batch_id, trigger, wal_span)

    @property
    def events(self) -> list[Event]:
        """The events one by one (made on each call: for the rare paths)."""
        return events_in(self.chunks)

    @property
    def event_count(self) -> int:
        return events_in_chunks(self.chunks)

    @property
    def first_ts_ms(self) -> int:
        return self.chunks[0].ts

    @property
    def last_ts_ms(self) -> int:
        return self.chunks[-1].ts


@dataclass(frozen=True)
class EncodedObject:
    """One complete gzip'd JSON Lines object, ready to store under `key`."""

    key: str
    data: bytes
    event_count: int
    uncompressed_bytes: int
    first_ts_ms: int
    last_ts_ms: int
    batch_id: str
    kind: str = "events"  # "events" or "raw"


def new_batch_id(
    now_ms: Optional[int] = None, random_bytes: Callable[[int], bytes] = os.urandom
) -> str:
    """A 26-character ULID: 48 bits of milliseconds then 80 random bits, in
    Crockford base32, so ids sort by time and never collide in practice."""
    if now_ms is None:
        now_ms = int(time.time() * 1000)
    value = (now_ms & ((1 << 48) - 1)) << 80 | int.from_bytes(random_bytes(10), "big")
    chars = []
    for _ in range(26):
        chars.append(_CROCKFORD[value & 31])
        value >>= 5
    return "".join(reversed(chars))


# One part of a key: what PREFIX, a writer's segment and HOST_ID may hold.
_KEY_PART = re.compile(r"[A-Za-z0-9._=-]+")


class UnsafeKeyError(ValueError):
    """A key, or a prefix or segment meant for one, could name a path
    outside the store's root (or one that S3 and a file system disagree
    on)."""


def unsafe_key_reason(path: str) -> Optional[str]:
    """Why `path` (parts joined by "/") cannot be (part of) an object key,
    or None when every part is letters, digits and . _ = - and none is
    empty, "." or ".."."""
    for part in path.split("/"):
        if part in ("", ".", ".."):
            return f"{part!r} is not a name (no empty, '.' or '..' parts)"
        if not _KEY_PART.fullmatch(part):
            return f"{part!r} holds a character other than letters, digits and . _ = -"
    return None


def check_key(key: str) -> str:
    """`key` if it is safe (see `unsafe_key_reason`), else UnsafeKeyError."""
    reason = unsafe_key_reason(key)
    if reason is not None:
        raise UnsafeKeyError(f"unsafe object key {key!r}: {reason}")
    return key


def object_key(prefix: str, ts_ms: int, host_id: str, batch_id: str) -> str:
    """`{prefix}/dt=YYYY-MM-DD/hour=HH/{host}-{batch_id}.jsonl.gz` in UTC,
    Hive-style partitions that Athena and Spark discover by themselves.
    The one place keys are made: raises UnsafeKeyError for an unsafe one."""
    moment = time.gmtime(ts_ms // 1000)
    return check_key(
        f"{prefix}/dt={moment.tm_year:04d}-{moment.tm_mon:02d}-{moment.tm_mday:02d}"
        f"/hour={moment.tm_hour:02d}/{host_id}-{batch_id}.jsonl.gz"
    )
