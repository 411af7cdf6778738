"""Is a body one JSON object? The verdict RFC 8259 gives, decided fast.

Pure functions, used by the request handlers on arrival and by the codec for
bodies that were not checked then."""

from __future__ import annotations

import json
from typing import Optional

import orjson


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


# Built once: json.loads(..., parse_constant=...) builds a decoder per call.
_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


def body_error(body: bytes) -> Optional[str]:
    """Why `body` cannot be stored as an event, or None when it is exactly
    one JSON object (strict UTF-8, no NaN or Infinity, as RFC 8259 says).

    orjson decides most bodies about 3x faster than the stdlib; it refuses
    a few things RFC 8259 allows (lone surrogate escapes, numbers beyond a
    double), so what it refuses is judged again by the strict stdlib
    decoder, and the verdict is exactly the spec's."""
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
