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
from itertools import repeat
from typing import Iterable, Iterator, Optional, cast

from isal import isal_zlib

from estat.model import Batch, EncodedObject, Event, body_of, object_key, segment_of, ts_of
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
    if b"\n" in body or b"\r" in body:
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
# flush. So the common case is built by a few C-level list operations, a
# slice of about 512 KiB at a time, gzip'd a slice at a time, and inflated
# for verification by isal's inflater (which runs without the GIL). Slices are
# sized in bytes, and the thread does not give the GIL back on purpose
# (time.sleep(0)) between them: each time it gets the GIL back from a busy
# reactor can take up to 5 ms (sys.getswitchinterval); with 256-event slices
# of small events that cut `batch` from 340k to 140k events/s, for a p99 at
# a fixed rate no better once the machine is busy.
_TEXT_SLICE_BYTES = 512 * 1024
_INFLATE_SLICE_BYTES = 1 << 20
_LINE_START = (b'{"ts":' + _TS + b',"body":').__mod__  # of (seconds, ms)
_THOUSANDS = repeat(1000)
_LINE_END = b"}\n"


def _fast_text(events: list[Event]) -> Optional[bytes]:
    """The JSON Lines of valid events without a writer segment, as
    `event_line` makes them; None when a body holds CR or LF (then
    `event_line` must turn them into spaces)."""
    count = len(events)
    pieces = [_LINE_END] * (3 * count)
    times = list(map(ts_of, events))
    moments = set(times)  # a request's events share theirs: few to format
    if len(moments) * 4 < count:
        starts = {ts: _LINE_START(divmod(ts, 1000)) for ts in moments}
        pieces[0::3] = map(starts.__getitem__, times)
    else:
        pieces[0::3] = map(_LINE_START, map(divmod, times, _THOUSANDS))
    pieces[1::3] = map(body_of, events)
    text = b"".join(pieces)
    if text.count(b"\n") != count or b"\r" in text:
        return None
    return text


def _slice_length(count: int, total_bytes: int) -> int:
    """How many of `count` items make about _TEXT_SLICE_BYTES."""
    return max(1, _TEXT_SLICE_BYTES * count // max(1, total_bytes))


def _texts_of_valid(events: list[Event]) -> Iterator[bytes]:
    step = _slice_length(len(events), sum(map(len, map(body_of, events))))
    for start in range(0, len(events), step):
        part = events[start:start + step]
        text = _fast_text(part)
        yield text if text is not None else b"".join(
            [event_line(ts_ms, body) for ts_ms, body, _ in part])


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
    against 30 ms for 12 MB), a megabyte at a time and thrown away."""
    verify_gzip_stream([data], uncompressed_bytes)


def verify_gzip_stream(chunks: Iterable[bytes], uncompressed_bytes: int,
                       count_lines: bool = False) -> int:
    """`verify_gzip` of the concatenation of `chunks`, read one chunk at a
    time (a file a piece at a time: only a chunk and a megabyte of output
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
                lines += out.count(b"\n") if count_lines else 0
            if inflater.eof or size > uncompressed_bytes:
                break
        while not inflater.eof and size <= uncompressed_bytes:
            out = inflater.decompress(b"", _INFLATE_SLICE_BYTES)
            if not out:
                break  # all input used, no trailer: truncated
            size += len(out)
            lines += out.count(b"\n") if count_lines else 0
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


def _encoded(
    texts: Iterable[bytes], events: list[Event], key: str, batch: Batch, kind: str
) -> EncodedObject:
    data, size = _gzip_texts(texts)
    verify_gzip(data, size)
    return EncodedObject(
        key=key,
        data=data,
        event_count=len(events),
        uncompressed_bytes=size,
        first_ts_ms=events[0].ts,
        last_ts_ms=events[-1].ts,
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
    events = batch.events
    if validated and all_raw_reason is None and events and not any(map(segment_of, events)):
        # The common case: every body checked on arrival, no writer segment.
        key = object_key(prefix, batch.first_ts_ms, host_id, batch.batch_id)
        return [_encoded(_texts_of_valid(events), events, key, batch, "events")]
    good: dict[str, tuple[list[bytes], list[Event]]] = {}
    raw: dict[str, tuple[list[bytes], list[Event]]] = {}
    for event in events:
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
    first = batch.first_ts_ms
    for groups, base, kind in ((good, prefix, "events"), (raw, raw_prefix, "raw")):
        for segment, (lines, group) in groups.items():
            key_prefix = f"{base}/{segment}" if segment else base
            key = object_key(key_prefix, first, host_id, batch.batch_id)
            objects.append(_encoded(_texts_of_lines(lines), group, key, batch, kind))
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
    for event in batch.events:
        lines.append(b'{"ts":%d,"error":"encode_error","body_b64":"%s"}\n' % (
            int(event[0]), binascii.b2a_base64(bytes(event[1]), newline=False)))
    text = b"".join(lines)
    compressor = zlib.compressobj(1, zlib.DEFLATED, GZIP_WBITS)
    data = compressor.compress(text) + compressor.flush()
    first = int(batch.events[0][0]) if batch.events else 0
    last = int(batch.events[-1][0]) if batch.events else 0
    moment = time.gmtime(max(0, first) // 1000)
    prefix = "/".join(_safe_part(part) for part in raw_prefix.split("/") if part)
    key = (f"{prefix or 'raw_dlq'}/dt={moment.tm_year:04d}-{moment.tm_mon:02d}-"
           f"{moment.tm_mday:02d}/hour={moment.tm_hour:02d}/"
           f"{_safe_part(host_id)}-{_safe_part(batch.batch_id)}.jsonl.gz")
    return EncodedObject(key=key, data=data, event_count=len(lines),
                         uncompressed_bytes=len(text), first_ts_ms=first, last_ts_ms=last,
                         batch_id=batch.batch_id, kind="raw")
