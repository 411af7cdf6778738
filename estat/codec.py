"""Pure functions that turn a flushed batch into gzip'd JSON Lines objects.

No Twisted here: these run on the encoder thread pool and are tested alone.
Each event becomes `{"ts":<seconds>,"body":<body as received>}\\n`, with
`ts` the receive time in epoch seconds to the millisecond (`1700000000.123`,
what DuckDB's `to_timestamp(ts)` reads; events carry it as ms); bodies that
are not one JSON object (possible only with VALIDATE_JSON=false) go to a
separate raw object as base64, so nothing is lost and no line is invalid.
Should encoding fail even then, `EncodeFailed` carries the bodies as one
raw object built by other code (`salvage_object`) for the dead-letter
directory.
"""

from __future__ import annotations

import base64
import binascii
import re
import time
import zlib
from bisect import bisect_left
from itertools import accumulate, groupby, repeat
from operator import attrgetter, is_, itemgetter
from typing import Iterable, Iterator, Optional, Sequence, cast

from isal import isal_zlib

from estat.model import (Batch, Chunk, EncodedObject, Event, Lines, events_in,
                         events_in_chunks, holds_line_break, line_feeds, line_slices,
                         object_key, sized)
from estat.validate import body_error

# isal level 1: about 6x the throughput of zlib level 1 at a slightly better
# ratio on JSON (bench: see the commit that chose it).
GZIP_LEVEL = 1
GZIP_WBITS = 31  # gzip container, not raw deflate or zlib
# What a corrupt stream raises, from stdlib zlib or from isal.
INFLATE_ERRORS: tuple[type[BaseException], ...] = (
    zlib.error, cast("type[BaseException]", isal_zlib.error))


# A line's `ts` is epoch seconds with the milliseconds as three decimals,
# written from divmod(ms, 1000): exact, unlike float formatting, and C-level.
_TS = b"%d.%03d"


def event_line(ts_ms: int, body: bytes) -> bytes:
    """One JSON line. A valid JSON text can hold CR or LF only as whitespace
    between tokens, so they become spaces: same JSON value, one line."""
    if holds_line_break(body):
        body = body.replace(b"\r", b" ").replace(b"\n", b" ")
    seconds, ms = divmod(ts_ms, 1000)
    return b'{"ts":%d.%03d,"body":%s}\n' % (seconds, ms, body)


def raw_line(ts_ms: int, body: bytes, error: str) -> bytes:
    """A line keeping a body that is not valid JSON, as base64."""
    seconds, ms = divmod(ts_ms, 1000)
    return b'{"ts":%d.%03d,"error":"%s","body_b64":"%s"}\n' % (
        seconds,
        ms,
        error.encode("ascii"),
        base64.b64encode(body),
    )


# Encoding runs on a pool thread while the reactor thread answers requests,
# and both need the GIL. A Python loop per event there held it for ~12 ms
# per 8 MiB batch, and every answer waited: p99 went from 1 to 10 ms at each
# flush. So the common case is built with no Python step per event: the
# events of a chunk share their receive time, so their lines are the
# bodies joined by `}\n{"ts":…,"body":` (one join per chunk, or per slice
# of about 2 MiB of a big one), gzip'd a slice at a time, and inflated for
# verification by isal's inflater (which runs without the GIL), 4 MiB of
# output at a time. Slices are sized in bytes, and few: each time the thread
# gets the GIL back from a busy reactor, after a call that released it, can
# take up to 5 ms (sys.getswitchinterval). With 256-event slices of small
# events that cut `batch` from 340k to 140k events/s; 512 KiB slices and
# 1 MiB of inflated output let the encoders fall behind (503s) where 2 and
# 4 MiB did not (bench: 475-491k against 529-534k events/s, p99 at a fixed
# rate alike). Framing 2 MiB holds the GIL for about a millisecond.
_TEXT_SLICE_BYTES = 2 * 1024 * 1024
_INFLATE_SLICE_BYTES = 1 << 22
_LINE_START = (b'{"ts":' + _TS + b',"body":').__mod__  # of (seconds, ms)
_LINE_END = b"}\n"


_THOUSANDS = repeat(1000)
# Chunk fields by position, for map() over many chunks.
_ts_of = itemgetter(Chunk._fields.index("ts"))
_bodies_of = itemgetter(Chunk._fields.index("bodies"))
_plain_of = itemgetter(Chunk._fields.index("plain"))
_segment_of = itemgetter(Chunk._fields.index("segment"))
_size_of = itemgetter(Chunk._fields.index("size"))
_first = itemgetter(0)
_TEXT_OF = attrgetter("text")  # of a Lines
_ALL_BUT_LAST_BYTE = itemgetter(slice(None, -1))


def _slice_length(count: int, total_bytes: int) -> int:
    """How many of `count` items make about _TEXT_SLICE_BYTES."""
    return max(1, _TEXT_SLICE_BYTES * count // max(1, total_bytes))


def _texts_of_chunks(chunks: list[Chunk]) -> Iterator[bytes]:
    """The JSON Lines of valid events without a writer segment, as
    `event_line` makes them: slices of about _TEXT_SLICE_BYTES, each of
    consecutive chunks, or of part of a chunk bigger than that."""
    if min(map(_size_of, chunks)) < 0:  # not from the queue (a replay's)
        chunks = list(map(sized, chunks))
    ends = list(accumulate(map(_size_of, chunks)))
    first = 0
    while first < len(chunks):
        base = ends[first - 1] if first else 0
        last = max(first + 1, bisect_left(ends, base + _TEXT_SLICE_BYTES, first))
        if last == first + 1 and chunks[first].size > _TEXT_SLICE_BYTES:
            yield from _big_chunk_texts(chunks[first])
        else:
            yield _chunks_text(chunks[first:last])
        first = last


def _chunks_text(chunks: list[Chunk]) -> bytes:
    """The lines of a few chunks, by a few C-level calls per chunk: each
    chunk's bodies joined between its line start and end."""
    count = len(chunks)
    times = list(map(_ts_of, chunks))
    moments = set(times)  # requests of the same millisecond share theirs
    if len(moments) * 4 < count:
        formatted = {ts: _LINE_START(divmod(ts, 1000)) for ts in moments}
        starts = list(map(formatted.__getitem__, times))
    else:
        starts = list(map(_LINE_START, map(divmod, times, _THOUSANDS)))
    pieces = [_LINE_END] * (3 * count)
    pieces[0::3] = starts
    bodies = list(map(_bodies_of, chunks))
    texts = list(map(is_, map(type, bodies), repeat(Lines)))
    if not any(texts) and sum(map(len, bodies)) == count:  # one event each
        pieces[1::3] = map(_first, bodies)
    else:
        pieces[1::3] = _framed_runs(texts, starts, bodies)
    text = b"".join(pieces)
    if not all(map(_plain_of, chunks)):
        if line_feeds(text) != events_in_chunks(chunks) or b"\r" in text:
            return b"".join([event_line(ts, body) for ts, body, _ in events_in(chunks)])
    return text


def _framed_runs(texts: list[bool], starts: list[bytes],
                 bodies: list[Sequence[bytes]]) -> list[bytes]:
    """Each chunk's bodies, each but the first after the end of a line and
    the chunk's line start (its lines less the first start and the last
    end): an NDJSON text (`texts` says which) with each LF but the last
    replaced, other bodies joined. Done by C-level maps over each run of
    chunks of one kind, with no Python call per chunk: a function called
    per chunk on the encoding thread doubled the p99 of 100-line batches
    (2.5 against 5.5 ms at half the maximum rate), the reactor waiting for
    the GIL."""
    framed: list[bytes] = []
    for is_text, run in groupby(zip(texts, starts, bodies), key=_first):
        _, run_starts, run_bodies = zip(*run)
        separators = map(_LINE_END.__add__, run_starts)
        if is_text:
            framed.extend(map(bytes.replace, map(_ALL_BUT_LAST_BYTE, map(_TEXT_OF, run_bodies)),
                              repeat(b"\n"), separators))
        else:
            framed.extend(map(bytes.join, separators, run_bodies))
    return framed


def _big_chunk_texts(chunk: Chunk) -> Iterator[bytes]:
    """The lines of one chunk of more than _TEXT_SLICE_BYTES, a slice of
    its bodies at a time."""
    bodies = chunk.bodies
    if type(bodies) is Lines:
        yield from _big_lines_texts(chunk, bodies.text)
        return
    step = _slice_length(len(bodies), chunk.size)
    for first in range(0, len(bodies), step):
        yield _chunks_text([chunk._replace(bodies=bodies[first:first + step])])


def _big_lines_texts(chunk: Chunk, text: bytes) -> Iterator[bytes]:
    """`_big_chunk_texts` of an NDJSON text, a slice of whole lines (to the
    first LF after each _TEXT_SLICE_BYTES) at a time. Each LF becomes a
    line's end and the next line's start, so the framed slices follow one
    another as they are: the first line's start comes before them, and
    the last line's end after them."""
    line_start = _LINE_START(divmod(chunk.ts, 1000))
    separator = _LINE_END + line_start
    yield line_start
    for begin, end in line_slices(text, _TEXT_SLICE_BYTES):
        if end == len(text):
            yield text[begin:end - 1].replace(b"\n", separator)
        else:
            yield text[begin:end].replace(b"\n", separator)
    yield _LINE_END


def _texts_of_lines(lines: list[bytes]) -> Iterator[bytes]:
    step = _slice_length(len(lines), sum(map(len, lines)))
    for start in range(0, len(lines), step):
        yield b"".join(lines[start:start + step])


def _gzip_texts(texts: Iterable[bytes]) -> tuple[bytes, int]:
    """One gzip member of the texts in order, and their total length; the
    whole text is never one buffer."""
    compressor = isal_zlib.compressobj(GZIP_LEVEL, isal_zlib.DEFLATED, GZIP_WBITS)
    parts = []
    size = 0
    for text in texts:
        size += len(text)
        parts.append(compressor.compress(text))
    parts.append(compressor.flush())
    return b"".join(parts), size


def verify_gzip(data: bytes, uncompressed_bytes: int) -> None:
    """Raise ValueError unless `data` is one complete gzip member whose CRC
    and length trailer match and which inflates to `uncompressed_bytes`.
    Inflated by isal's inflater (igzip_inflate: other code than the
    deflate that wrote it, and 3 times faster than stdlib zlib here: 9.5
    against 30 ms for 12 MB), 4 MiB at a time and thrown away."""
    verify_gzip_stream([data], uncompressed_bytes)


def verify_gzip_stream(chunks: Iterable[bytes], uncompressed_bytes: int,
                       count_lines: bool = False) -> int:
    """`verify_gzip` of the concatenation of `chunks`, read one chunk at a
    time (a file a piece at a time: only a chunk and 4 MiB of output
    are ever in memory). Returns the number of lines (LF) inflated when
    `count_lines`, else 0."""
    inflater = isal_zlib.decompressobj(GZIP_WBITS)
    size = lines = 0
    pieces = iter(chunks)
    try:
        for chunk in pieces:
            pending = chunk
            while pending and not inflater.eof and size <= uncompressed_bytes:
                out = inflater.decompress(pending, _INFLATE_SLICE_BYTES)
                pending = inflater.unconsumed_tail
                size += len(out)
                lines += line_feeds(out) if count_lines else 0
            if inflater.eof or size > uncompressed_bytes:
                break
        while not inflater.eof and size <= uncompressed_bytes:
            out = inflater.decompress(b"", _INFLATE_SLICE_BYTES)
            if not out:
                break  # all input used, no trailer: truncated
            size += len(out)
            lines += line_feeds(out) if count_lines else 0
    except INFLATE_ERRORS as error:
        raise ValueError(f"gzip stream is corrupt: {error}") from None
    if size > uncompressed_bytes:
        raise ValueError(f"gzip stream inflates to over {uncompressed_bytes} bytes")
    if not inflater.eof:
        raise ValueError("gzip stream is truncated (no trailer)")
    if inflater.unused_data or next(pieces, b""):
        raise ValueError("gzip stream has trailing bytes")
    if size != uncompressed_bytes:
        raise ValueError(
            f"gzip stream inflates to {size} bytes, expected {uncompressed_bytes}"
        )
    return lines


def _encoded(texts: Iterable[bytes], count: int, first_ts_ms: int, last_ts_ms: int,
             key: str, batch: Batch, kind: str) -> EncodedObject:
    data, size = _gzip_texts(texts)
    verify_gzip(data, size)
    return EncodedObject(
        key=key,
        data=data,
        event_count=count,
        uncompressed_bytes=size,
        first_ts_ms=first_ts_ms,
        last_ts_ms=last_ts_ms,
        batch_id=batch.batch_id,
        kind=kind,
    )


def encode_batch(
    batch: Batch,
    *,
    validated: bool,
    prefix: str,
    raw_prefix: str,
    host_id: str,
    all_raw_reason: Optional[str] = None,
) -> list[EncodedObject]:
    """Encode a batch into one event object per writer prefix segment and,
    when some bodies are not valid JSON objects, raw objects. `validated`
    says every body was already checked on arrival, so the check is skipped
    here; `all_raw_reason` sends every event to the raw objects."""
    first = batch.first_ts_ms
    if validated and all_raw_reason is None:
        # The common case: every body checked on arrival. One object per
        # writer segment, in the order the segments first appear.
        by_segment: dict[str, list[Chunk]]
        if len(set(map(_segment_of, batch.chunks))) == 1:  # no loop over the chunks
            by_segment = {batch.chunks[0].segment: batch.chunks}
        else:
            by_segment = {}
            for chunk in batch.chunks:
                by_segment.setdefault(chunk.segment, []).append(chunk)
        objects = []
        for segment, chunks in by_segment.items():
            key_prefix = f"{prefix}/{segment}" if segment else prefix
            key = object_key(key_prefix, first, host_id, batch.batch_id)
            count = events_in_chunks(chunks)
            objects.append(_encoded(_texts_of_chunks(chunks), count, chunks[0].ts,
                                    chunks[-1].ts, key, batch, "events"))
        return objects
    good: dict[str, tuple[list[bytes], list[Event]]] = {}
    raw: dict[str, tuple[list[bytes], list[Event]]] = {}
    for event in batch.events:
        ts_ms, body, segment = event
        if all_raw_reason is not None:
            error: Optional[str] = all_raw_reason
        else:
            error = None if validated else body_error(body)
        if error is None:
            lines, group = good.setdefault(segment, ([], []))
            lines.append(event_line(ts_ms, body))
        else:
            lines, group = raw.setdefault(segment, ([], []))
            lines.append(raw_line(ts_ms, body, error))
        group.append(event)
    objects = []
    for groups, base, kind in ((good, prefix, "events"), (raw, raw_prefix, "raw")):
        for segment, (lines, group) in groups.items():
            key_prefix = f"{base}/{segment}" if segment else base
            key = object_key(key_prefix, first, host_id, batch.batch_id)
            objects.append(_encoded(_texts_of_lines(lines), len(group), group[0].ts,
                                    group[-1].ts, key, batch, kind))
    return objects


class EncodeFailed(Exception):
    """A batch could be encoded neither normally nor as raw lines. `salvage`
    is its bodies as one raw object (see `salvage_object`), or None when
    even that could not be built; `cause` is the raw encoding's error."""

    def __init__(self, batch: Batch, cause: Exception,
                 salvage: Optional[EncodedObject]) -> None:
        super().__init__(f"batch {batch.batch_id} could not be encoded: "
                         f"{type(cause).__name__}: {cause}")
        self.batch = batch
        self.cause = cause
        self.salvage = salvage


def encode_batch_safely(
    batch: Batch, *, validated: bool, prefix: str, raw_prefix: str, host_id: str
) -> list[EncodedObject]:
    """encode_batch, but should encoding fail unexpectedly, keep every body
    in a raw object under `raw_prefix` instead (reason `encode_error`), so
    that a bug in the encoder loses no event; should that fail too, raise
    EncodeFailed with the bodies salvaged."""
    try:
        return encode_batch(batch, validated=validated, prefix=prefix,
                            raw_prefix=raw_prefix, host_id=host_id)
    except Exception:
        pass
    try:
        return encode_batch(batch, validated=validated, prefix=prefix,
                            raw_prefix=raw_prefix, host_id=host_id,
                            all_raw_reason="encode_error")
    except Exception as error:
        try:
            salvage: Optional[EncodedObject] = salvage_object(batch, raw_prefix, host_id)
        except Exception:
            salvage = None
        raise EncodeFailed(batch, error, salvage) from error


_UNSAFE_CHARACTERS = re.compile(r"[^A-Za-z0-9._=-]")


def _safe_part(text: str) -> str:
    """A key part made of safe characters only, never "", "." or ".."."""
    part = _UNSAFE_CHARACTERS.sub("_", text)[:64]
    return part if part.strip(".") else "_" + part


def salvage_object(batch: Batch, raw_prefix: str, host_id: str) -> EncodedObject:
    """Every body of `batch` as a raw line `{"ts":…,"error":"encode_error",
    "body_b64":…}` in one object, made without what `encode_batch` uses
    (no object_key, event_line or isal: binascii, stdlib zlib, a key whose
    parts are sanitised here), under `{raw_prefix}/dt=…/hour=…/` with no
    writer segment, named like any object of the batch."""
    lines = []
    events = batch.events
    for event in events:
        lines.append(b'{"ts":%d,"error":"encode_error","body_b64":"%s"}\n' % (
            int(event[0]), binascii.b2a_base64(bytes(event[1]), newline=False)))
    text = b"".join(lines)
    compressor = zlib.compressobj(1, zlib.DEFLATED, GZIP_WBITS)
    data = compressor.compress(text) + compressor.flush()
    first = int(events[0][0]) if events else 0
    last = int(events[-1][0]) if events else 0
    moment = time.gmtime(max(0, first) // 1000)
    prefix = "/".join(_safe_part(part) for part in raw_prefix.split("/") if part)
    key = (f"{prefix or 'raw_dlq'}/dt={moment.tm_year:04d}-{moment.tm_mon:02d}-"
           f"{moment.tm_mday:02d}/hour={moment.tm_hour:02d}/"
           f"{_safe_part(host_id)}-{_safe_part(batch.batch_id)}.jsonl.gz")
    return EncodedObject(key=key, data=data, event_count=len(lines),
                         uncompressed_bytes=len(text), first_ts_ms=first, last_ts_ms=last,
                         batch_id=batch.batch_id, kind="raw")
