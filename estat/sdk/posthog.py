"""PostHog's capture API: `/batch/`, `/capture/`, `/e/` and `/i/v0/e/`
(each with or without the trailing slash), in the forms PostHog's SDKs
send:

- a JSON body: `{"api_key":…, "batch":[…], "sent_at":…}` (the server
  SDKs), a JSON array of events (posthog-js), or one event object;
- gzip'd: `Content-Encoding: gzip`, or `?compression=gzip-js` with the
  gzip'd JSON as a `text/plain` body (posthog-js);
- form-encoded: `data=<JSON or base64 of it>` (posthog-js with
  `compression=base64`, and its beacons).

The write key is the envelope's `api_key` (or `token`), or each event's
own `api_key`, `token` or `properties.token` (posthog-js puts the
project key there); the envelope's is never stored, an event's own fields
are kept as sent. An event's `uuid` is its id for the recent-id window.
The answer the SDKs expect is 200 `{"status":1}`."""

from __future__ import annotations

import base64
import binascii
import zlib
from typing import Any, Optional
from urllib.parse import parse_qs

from estat.codec import GZIP_WBITS
from estat.collect import IngestState
from estat.http.request import IngestRequest
from estat.http.response import Answer, error_body
from estat.sdk.envelope import (
    EnvelopeError,
    elements,
    envelope_of,
    members,
    parse,
    text_of,
    without,
)
from estat.sdk.handler import Refused, SdkEvent, SdkHandler, Unpacked
from estat.sdk.idempotence import RecentIds

CALLS = (b"batch", b"capture", b"e", b"i/v0/e")
PATHS = tuple(b"/" + call + slash for call in CALLS for slash in (b"", b"/"))
_CREDENTIALS = frozenset(("api_key", "token"))
_BATCH_SHARED_LEAVE_OUT = _CREDENTIALS | {"batch"}
_FORM = b"application/x-www-form-urlencoded"
_GZIP_MAGIC = b"\x1f\x8b"


class PostHog(SdkHandler):
    """See the module docstring. `max_body_bytes` also bounds a body
    inflated here (`compression=gzip-js`)."""

    protocol = "posthog"

    def __init__(self, state: IngestState, recent: RecentIds, max_event_bytes: int,
                 max_events: int, max_body_bytes: int) -> None:
        super().__init__(state, recent, max_event_bytes, max_events)
        self.max_body_bytes = max_body_bytes
        self.success = Answer(200, b'{"status":1}\n')

    def unpack(self, request: IngestRequest) -> Unpacked:
        parsed = parse(self.decoded(request))
        value = parsed.value
        call = request.path.strip(b"/")
        if isinstance(value, list):
            return Unpacked(_events(value, elements(parsed.raw)), b"{}", call, None)
        if not isinstance(value, dict):
            raise EnvelopeError("invalid_json", detail="not_object")
        key = _key_of(value)
        batch = value.get("batch")
        if batch is None:
            return Unpacked([_event(value, without(parsed, _CREDENTIALS), use_key=False)],
                            b"{}", call, key)
        if not isinstance(batch, list):
            raise EnvelopeError("invalid_json", detail="batch_not_array")
        raws = elements(members(parsed.raw)["batch"])
        return Unpacked(_events(batch, raws), envelope_of(parsed.raw, _BATCH_SHARED_LEAVE_OUT),
                        call, key)

    def decoded(self, request: IngestRequest) -> bytes:
        """The JSON the SDK sent, out of its form, base64 and gzip-js
        wrappings."""
        body = request.body
        compression = _first(parse_qs(request.query), b"compression")
        if body.startswith(b"data=") or (request.media_type == _FORM
                                         and body.lstrip()[:1] not in (b"{", b"[")):
            form = parse_qs(body, max_num_fields=16)
            data = _first(form, b"data")
            if data is None:
                raise EnvelopeError("invalid_json", detail="no_data_field")
            compression = _first(form, b"compression") or compression
            body = data
            _check_compression(compression)
            if compression == b"base64" or body.lstrip()[:1] not in (b"{", b"["):
                body = _unbase64(body)
        _check_compression(compression)
        if body.startswith(_GZIP_MAGIC):
            body = self._inflate(body)
        return body

    def _inflate(self, body: bytes) -> bytes:
        """The gzip'd body inflated, never past `max_body_bytes`."""
        inflater = zlib.decompressobj(GZIP_WBITS)
        try:
            out = inflater.decompress(body, self.max_body_bytes + 1)
        except zlib.error:
            raise Refused(Answer(400, error_body("invalid_gzip")), "invalid_encoding") from None
        if len(out) > self.max_body_bytes:
            raise Refused(Answer(413, error_body("too_large", max_bytes=self.max_body_bytes)),
                          "too_large")
        if not inflater.eof:
            raise Refused(Answer(400, error_body("invalid_gzip")), "invalid_encoding")
        return out


def _check_compression(compression: Optional[bytes]) -> None:
    """Refuse the compressions not implemented (posthog-js's old lz64)."""
    if compression == b"lz64":
        raise Refused(Answer(415, error_body(
            "unsupported_media_type", expected="compression=gzip-js, base64 or none")),
            "unsupported_media_type")


def _first(form: dict[bytes, list[bytes]], name: bytes) -> Optional[bytes]:
    values = form.get(name)
    return values[0] if values else None


def _unbase64(data: bytes) -> bytes:
    try:
        # A '+' that reached us unescaped was turned into a space by the form decoding.
        return base64.b64decode(data.strip().replace(b" ", b"+"), validate=True)
    except (binascii.Error, ValueError):
        raise EnvelopeError("invalid_base64") from None


def _key_of(value: dict[str, Any]) -> Optional[bytes]:
    return text_of(value.get("api_key")) or text_of(value.get("token"))


def _event(value: Any, raw: bytes, index: Optional[int] = None,
           use_key: bool = True) -> SdkEvent:
    """One event; its own key is `api_key`, `token` or `properties.token`
    (not for a single event, whose top-level key is the request's)."""
    if not isinstance(value, dict):
        raise EnvelopeError("invalid_json", detail="not_object", index=index)
    key = None
    if use_key:
        properties = value.get("properties")
        key = _key_of(value) or (text_of(properties.get("token"))
                                 if isinstance(properties, dict) else None)
    elif isinstance(value.get("properties"), dict):
        key = text_of(value["properties"].get("token"))
    return SdkEvent(raw, text_of(value.get("uuid")), key)


def _events(values: list[Any], raws: list[bytes]) -> list[SdkEvent]:
    return [_event(value, raw, index) for index, (value, raw) in enumerate(zip(values, raws))]

