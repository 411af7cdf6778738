"""Is a body one JSON object? The verdict RFC 8259 gives, decided fast, for
one body or for the lines of a batch at once.

Pure functions, used by the request handlers on arrival and by the codec for
bodies that were not checked then."""

from __future__ import annotations

import json
from itertools import repeat
from typing import Optional

import msgspec
import orjson

from estat.model import line_slices


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


# Built once: json.loads(..., parse_constant=...) builds a decoder per call.
_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


def body_error(body: bytes) -> Optional[str]:
    """Why `body` cannot be stored as an event, or None when it is exactly
    one JSON object (strict UTF-8, no NaN or Infinity, as RFC 8259 says)
    whose strings are all Unicode text.

    The common body, an object with nothing around it, is accepted by
    msgspec's validating scan, which builds nothing (0.37 against 0.81 µs
    for orjson's decode of a 1 KB event). Anything that scan does not
    accept whole goes to orjson, about 3x faster than the stdlib; it
    refuses numbers beyond a double, which RFC 8259 allows, so what it
    refuses is judged again by `strict_body_error`."""
    if body[:1] == b"{" and (body.isascii() or is_utf8(body)):
        try:
            if len(RAW_VALUE.decode(body)) == len(body):
                return None
        except (msgspec.DecodeError, RecursionError):
            pass
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError:
        return strict_body_error(body)
    return None if isinstance(value, dict) else "not_object"


def strict_body_error(body: bytes) -> Optional[str]:
    """body_error by the stdlib decoder alone (the reference verdict).

    RFC 8259 lets a string escape half of a UTF-16 surrogate pair
    (`"\\ud800"`), which is no Unicode character: jq, DuckDB and orjson
    refuse such a line, and DuckDB the whole object it is in, so a body
    holding one is refused as `unpaired_surrogate`."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return "invalid_utf8"
    try:
        value = _DECODER.decode(text)
    except ValueError:
        return "invalid_json"
    except RecursionError:
        return "too_deep"
    if not isinstance(value, dict):
        return "not_object"
    if "\\u" in text and _holds_surrogate(value):
        return "unpaired_surrogate"
    return None


def unpaired_surrogate_element(body: bytes) -> Optional[int]:
    """The number (from 1) of the first element of the JSON array `body`
    that holds an unpaired surrogate escape, or None, also when `body` is
    no array the stdlib decoder reads. msgspec refuses such an array as
    "malformed" or "truncated", which would not tell its sender what to
    change."""
    if b"\\u" not in body:
        return None
    try:
        value = _DECODER.decode(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    if not isinstance(value, list):
        return None
    for number, element in enumerate(value, 1):
        if _holds_surrogate(element):
            return number
    return None


def _holds_surrogate(value: object) -> bool:
    """Whether a decoded value's keys or strings hold a surrogate code
    point, which only an unpaired `\\uD800`-`\\uDFFF` escape decodes to
    (UTF-8 input has none: it was checked strictly). Walked with a stack,
    not recursion: the object may nest as deep as the decoder allows."""
    pending: list = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            if not item.isascii():
                try:
                    item.encode("utf-8")
                except UnicodeEncodeError:
                    return True
        elif isinstance(item, dict):
            pending.extend(item)
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
    return False


# A JSON array decoded to its elements' extents only, and a JSON text to its
# own (validated, nothing built).
RAW_ARRAY = msgspec.json.Decoder(list[msgspec.Raw])
RAW_VALUE = msgspec.json.Decoder(msgspec.Raw)


def is_utf8(data: bytes) -> bool:
    """Strict UTF-8 (no encoded surrogates), ASCII decided without decoding."""
    if data.isascii():
        return True
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def all_start_objects(texts: list[bytes]) -> bool:
    """Each of `texts` begins an object (its first byte is `{`)."""
    return all(map(bytes.startswith, texts, repeat(b"{")))


class _Object(msgspec.Struct, gc=False):
    """Any JSON object: its members are checked and skipped, none kept."""


class _WrappedLine(msgspec.Struct, array_like=True, forbid_unknown_fields=True, gc=False):
    """One line of `lines_are_objects`: a JSON array of exactly one object.
    A Struct the cyclic collector does not track, where a `tuple[_Object]`
    made a tuple per line that counted towards its next collection (100
    per 100-line batch)."""

    value: _Object


_WRAPPED_LINE = msgspec.json.Decoder(_WrappedLine)
# The text is decoded in slices of whole lines of about this many bytes:
# what a slice's decode makes (its wrapped copy, a value per line, a str
# for a UTF-8 check) is a fraction of a big batch's text, not twice it.
_DECODE_SLICE_BYTES = 256 * 1024


def lines_are_objects(text: bytes, count: int, max_line_bytes: int) -> bool:
    """Whether `text`, `count` lines each ended by a LF and holding no CR,
    is one JSON object per line (whitespace around it allowed), each at
    most `max_line_bytes` long, decided by a few C calls for the whole
    text: no line is split off.

    Each line is wrapped as `[line]` (one `replace` per slice of lines)
    and the lines decoded by msgspec as a JSON value per line, each
    required to be an array of exactly one object. No value can run past
    its line: a value ends at the `]` that `]\n[` puts at each line end,
    since nothing in JSON lets a `[` follow a closing bracket inside a
    value; and each line holds one at least, so as many values as lines
    is each line one object, whole.

    True means `body_error` is None for every line. False says neither
    which line is wrong nor that one is: `body_error` line by line
    decides then, so what msgspec refuses and RFC 8259 allows (deep
    nesting) still gets the spec's verdict."""
    if not text.endswith(b"\n") or not _lines_within(text, count, max_line_bytes):
        return False
    values = 0
    for begin, end in line_slices(text, _DECODE_SLICE_BYTES):
        piece = text[begin:end] if begin or end < len(text) else text
        if not is_utf8(piece):
            return False
        wrapped = b"[" + piece.replace(b"\n", b"]\n[")
        try:
            values += len(_WRAPPED_LINE.decode_lines(memoryview(wrapped)[:-1]))
        except (msgspec.DecodeError, RecursionError):
            return False
    return values == count


def _lines_within(text: bytes, count: int, max_line_bytes: int) -> bool:
    """Whether no line of `text` (`count` lines, the last ended by a LF) is
    longer than `max_line_bytes`: a LF in every window of half that many
    bytes says so with one memchr per window. The lines are measured
    instead when a window has none, or when there would be more than one
    window per eight lines (a limit near the lines' own length), so that
    the windows never take a Python step per line."""
    if len(text) <= max_line_bytes:
        return True
    step = max(1, max_line_bytes // 2)
    if len(text) <= step * (count // 8 + 1):
        find = text.find
        for start in range(0, len(text), step):
            if find(b"\n", start, start + step) < 0:
                break
        else:
            return True
    return max(map(len, text.split(b"\n"))) <= max_line_bytes
