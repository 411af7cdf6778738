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


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


# Built once: json.loads(..., parse_constant=...) builds a decoder per call.
_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


def body_error(body: bytes) -> Optional[str]:
    """Why `body` cannot be stored as an event, or None when it is exactly
    one JSON object (strict UTF-8, no NaN or Infinity, as RFC 8259 says).

    The common body, an object with nothing around it, is accepted by
    msgspec's validating scan, which builds nothing (0.37 against 0.81 µs
    for orjson's decode of a 1 KB event). Anything that scan does not
    accept whole goes to orjson, about 3x faster than the stdlib; it
    refuses a few things RFC 8259 allows (lone surrogate escapes, numbers
    beyond a double), so what it refuses is judged again by the strict
    stdlib decoder, and the verdict is exactly the spec's."""
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
    """body_error by the stdlib decoder alone (the reference verdict)."""
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
    return None


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


# Lines decoded per msgspec call: the array and its elements' extents are
# built for this many at a time, not for a whole 13,500-line chunk (about
# 15 MB more at once), and a slice decodes as fast per line.
_LINES_PER_DECODE = 1000


def all_objects(lines: list[bytes]) -> bool:
    """Whether each of `lines` (none holding a LF) is exactly one JSON
    object, decided in a few C calls per `_LINES_PER_DECODE` lines: msgspec
    checks them as one JSON array (building nothing but the elements'
    extents), and each element must be its line, whole. True means
    `body_error` is None for every line. False says neither which line is
    wrong nor that one is: `body_error` line by line decides then, so what
    msgspec refuses and RFC 8259 allows (a lone surrogate escape, deep
    nesting) still gets the spec's verdict."""
    if not lines or not all_start_objects(lines):
        return False
    if len(lines) <= _LINES_PER_DECODE:
        return _objects_as_array(lines)
    return all(_objects_as_array(lines[start:start + _LINES_PER_DECODE])
               for start in range(0, len(lines), _LINES_PER_DECODE))


def _objects_as_array(lines: list[bytes]) -> bool:
    """all_objects for lines that each begin with `{`, in one decode."""
    # The array is built by one join, the brackets put on the first and
    # last lines of a copy of the list: `b"[" + b",".join(lines) + b"]"`
    # copied the whole text twice more, which cost as much as decoding it.
    wrapped = list(lines)
    if len(wrapped) == 1:
        wrapped[0] = b"[" + wrapped[0] + b"]"
    else:
        wrapped[0] = b"[" + wrapped[0]
        wrapped[-1] = wrapped[-1] + b"]"
    array = b",".join(wrapped)
    if not is_utf8(array):
        return False
    try:
        values = RAW_ARRAY.decode(array)
    except (msgspec.DecodeError, RecursionError):
        return False
    # Elements are separated by at least the commas put between the lines:
    # as many elements as lines, each as long as its line, is each line whole.
    return len(values) == len(lines) and list(map(len, values)) == list(map(len, lines))
