"""The values that travel the pipeline: an accepted `Event`, a flushed
`Batch`, an `EncodedObject` ready to store, and how batches and objects are
named. Pure data: no I/O, no Twisted."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from itertools import repeat
from typing import Callable, Iterable, NamedTuple, Optional


class Event(NamedTuple):
    """One accepted event: receive time in ms since the epoch, the body as
    received, and the writer's key prefix segment ("" for none)."""

    ts: int
    body: bytes
    segment: str = ""


_new_tuple = tuple.__new__


def events_of(ts: int, bodies: Iterable[bytes], segment: str = "") -> list[Event]:
    """Events sharing one receive time and segment (one request's), built
    without a Python-level call per event."""
    return list(map(_new_tuple, repeat(Event), zip(repeat(ts), bodies, repeat(segment))))

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


@dataclass
class Batch:
    """Events flushed together; one batch becomes one object (plus one raw
    object when some bodies could not be embedded). In durable mode
    `wal_span` is the (segment, first ordinal, count) of its events in the
    write-ahead log."""

    events: list[Event]
    body_bytes: int
    batch_id: str
    trigger: str
    wal_span: Optional[tuple[int, int, int]] = None

    @property
    def first_ts_ms(self) -> int:
        return self.events[0].ts


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


def object_key(prefix: str, ts_ms: int, host_id: str, batch_id: str) -> str:
    """`{prefix}/dt=YYYY-MM-DD/hour=HH/{host}-{batch_id}.jsonl.gz` in UTC,
    Hive-style partitions that Athena and Spark discover by themselves."""
    moment = time.gmtime(ts_ms // 1000)
    return (
        f"{prefix}/dt={moment.tm_year:04d}-{moment.tm_mon:02d}-{moment.tm_mday:02d}"
        f"/hour={moment.tm_hour:02d}/{host_id}-{batch_id}.jsonl.gz"
    )
