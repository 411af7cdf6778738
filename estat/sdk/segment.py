"""Segment's HTTP tracking API, which RudderStack's SDKs speak too:
`POST /v1/batch` with `{"batch":[…], "context":…, "sentAt":…,
"writeKey":…}`, and the single calls `/v1/track`, `/v1/identify`,
`/v1/page`, `/v1/screen`, `/v1/group` and `/v1/alias`, each one message;
also under the short names analytics.js uses (`/v1/b`, `/v1/t`, ...).

The write key comes as the HTTP Basic user name (Segment's convention),
as a Bearer or X-Write-Key header, or as the body's `writeKey`; it is
never stored. A message's `messageId` is its id for the recent-id window.
The answer the SDKs expect is 200 `{"success":true}`."""

from __future__ import annotations

from estat.collect import IngestState
from estat.http.request import IngestRequest
from estat.http.response import Answer
from estat.sdk import envelope
from estat.sdk.envelope import EnvelopeError, text_of
from estat.sdk.handler import SdkEvent, SdkHandler, Unpacked
from estat.sdk.idempotence import RecentIds

SINGLE_CALLS = (b"track", b"identify", b"page", b"screen", b"group", b"alias")
# Each path and the call it is: analytics.js (analytics-next) posts to the
# calls' first letters (`/v1/t`), and to `/v1/b` when it batches.
_CALLS = {b"/v1/" + name: name for name in SINGLE_CALLS + (b"batch",)}
_CALLS.update({b"/v1/" + name[:1]: name for name in SINGLE_CALLS + (b"batch",)})
BATCH_PATHS = (b"/v1/batch", b"/v1/b")
PATHS = tuple(_CALLS)
_KEY = "writeKey"
_CREDENTIALS = frozenset((_KEY,))
_BATCH_SHARED_LEAVE_OUT = frozenset(("batch", _KEY))


class Segment(SdkHandler):
    """See the module docstring."""

    protocol = "segment"

    def __init__(self, state: IngestState, recent: RecentIds, max_event_bytes: int,
                 max_events: int) -> None:
        super().__init__(state, recent, max_event_bytes, max_events)
        self.success = Answer(200, b'{"success":true}\n')

    def unpack(self, request: IngestRequest) -> Unpacked:
        parsed = envelope.parse(request.body)
        value = parsed.value
        if not isinstance(value, dict):
            raise EnvelopeError("invalid_json", detail="not_object")
        key = text_of(value.get(_KEY))
        call = _CALLS[request.path]
        if call != b"batch":
            message = envelope.without(parsed, _CREDENTIALS)
            return Unpacked([SdkEvent(message, _message_id(value))], b"{}", call, key)
        batch = value.get("batch")
        if not isinstance(batch, list):
            raise EnvelopeError("invalid_json", detail="batch_not_array")
        raws = envelope.elements(envelope.members(parsed.raw)["batch"])
        events = []
        for index, (element, raw) in enumerate(zip(batch, raws)):
            if not isinstance(element, dict):
                raise EnvelopeError("invalid_json", detail="not_object", index=index)
            events.append(SdkEvent(raw, _message_id(element)))
        shared = envelope.envelope_of(parsed.raw, _BATCH_SHARED_LEAVE_OUT)
        return Unpacked(events, shared, call, key)


def _message_id(message: dict[str, object]) -> bytes | None:
    return text_of(message.get("messageId"))
