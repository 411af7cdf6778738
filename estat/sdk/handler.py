"""What the SDK paths share: CORS and methods as `/collect` has them, the
write-key check, the recent-id window, and the admission of a request's
events, all or nothing.

A protocol (estat.sdk.segment, estat.sdk.posthog) only turns a request
into an `Unpacked`: its events as sent, with their ids and keys. The
handler here does the rest, and answers 200 with the protocol's success
body, which is what the SDKs count as delivered."""

from __future__ import annotations

import base64
import binascii
from typing import Any, Callable, NamedTuple, Optional

from twisted.internet.defer import Deferred

from estat.auth import Writer
from estat.collect import IngestState, forbidden_origin, preflight
from estat.http.request import IngestRequest
from estat.http.response import Answer, error_body
from estat.model import Chunk
from estat.sdk.envelope import EnvelopeError, stored_body
from estat.sdk.idempotence import RecentIds, id_key, id_scope

# What the admission answers: an Answer now (a Deferred one once the
# listener takes those; `_then` already handles both).
AdmitResult = Answer
_ALLOW = (b"allow", b"POST, OPTIONS")
_UNAUTHORIZED = (b"www-authenticate", b'Basic realm="estat-ingest"')


class SdkEvent(NamedTuple):
    """One event of a request: the element as sent, its client-chosen id
    (None: it has none, so it is always stored) and its own write key
    (None: the request's)."""

    message: bytes
    event_id: Optional[bytes] = None
    key: Optional[bytes] = None


class Unpacked(NamedTuple):
    """A request's events, the batch's shared members (`{}` for a single
    call), what call it was, and the write key the request carries."""

    events: list[SdkEvent]
    envelope: bytes
    call: bytes
    key: Optional[bytes]


class Refused(Exception):
    """The request is refused with `answer`; `reason` is the counter's."""

    def __init__(self, answer: Answer, reason: str) -> None:
        super().__init__(reason)
        self.answer = answer
        self.reason = reason


def basic_username(authorization: Optional[bytes]) -> Optional[bytes]:
    """The user name of `Authorization: Basic …` (where Segment's SDKs put
    the write key), or None."""
    if authorization is None:
        return None
    scheme, _, value = authorization.strip().partition(b" ")
    if scheme.lower() != b"basic":
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    return decoded.partition(b":")[0] or None


def header_key(request: IngestRequest) -> Optional[bytes]:
    """The write key in the headers: Basic user name, Bearer or
    X-Write-Key."""
    headers = request.headers
    key = headers.get(b"x-write-key") or basic_username(headers.get(b"authorization"))
    if key is None:
        authorization = headers.get(b"authorization")
        if authorization is not None:
            scheme, _, value = authorization.strip().partition(b" ")
            if scheme.lower() == b"bearer":
                key = value.strip() or None
    return key


class SdkHandler:
    """One SDK protocol's paths: `unpack` turns a request into its events
    (raising EnvelopeError or Refused), `success` is the body the SDKs
    expect with a 200, `max_event_bytes` and `max_events` bound each
    event and each request. Events whose ids `recent` holds are answered
    as accepted and not stored again."""

    protocol = ""

    def __init__(self, state: IngestState, recent: RecentIds, max_event_bytes: int,
                 max_events: int) -> None:
        self.state = state
        self.recent = recent
        self.max_event_bytes = max_event_bytes
        self.max_events = max_events
        self.success = Answer(200, b"{}\n")
        self._duplicates = state.metrics.duplicate_events.labels(protocol=self.protocol)

    def unpack(self, request: IngestRequest) -> Unpacked:
        raise NotImplementedError

    def __call__(self, request: IngestRequest) -> AdmitResult:
        state = self.state
        if request.method != b"POST":
            if request.method == b"OPTIONS":
                return preflight(state, request, self.protocol)
            return self._refuse(Answer(405, error_body("method_not_allowed", allow="POST"),
                                       (_ALLOW,)), "method_not_allowed")
        origin = request.headers.get(b"origin")
        if origin is not None and not state.origin_allowed(origin):
            return forbidden_origin(state, origin, self.protocol)
        try:
            answer = self._handle(request)
        except Refused as refused:
            answer = self._refuse(refused.answer, refused.reason)
        except EnvelopeError as error:
            answer = self._refuse(Answer(400, error_body(error.error, **error.details)),
                                  "invalid_json")
        return answer

    def _refuse(self, answer: Answer, reason: str) -> Answer:
        self.state.count_rejected(reason, protocol=self.protocol)
        return answer

    def _handle(self, request: IngestRequest) -> AdmitResult:
        problem = request.body_problem
        if problem == "unsupported_content_encoding":
            raise Refused(Answer(415, error_body(
                "unsupported_media_type", expected="Content-Encoding: gzip or none")),
                "unsupported_media_type")
        if problem == "invalid_gzip":
            raise Refused(Answer(400, error_body("invalid_gzip")), "invalid_encoding")
        unpacked = self.unpack(request)
        events = unpacked.events
        if not events:
            raise EnvelopeError("invalid_json", detail="no_events")
        if len(events) > self.max_events:
            raise Refused(Answer(413, error_body("too_many_events", max_events=self.max_events)),
                          "too_large")
        for index, event in enumerate(events):
            if len(event.message) > self.max_event_bytes:
                raise Refused(Answer(413, error_body(
                    "too_large", index=index, max_bytes=self.max_event_bytes)), "too_large")
        writers = self._writers(request, unpacked)
        return self._admit(unpacked, writers)

    def _writers(self, request: IngestRequest, unpacked: Unpacked) -> list[Optional[Writer]]:
        """Each event's writer (all None when write keys are not
        configured); Refused (401) when one has no valid key."""
        write_keys = self.state.write_keys
        if write_keys is None:
            return [None] * len(unpacked.events)
        request_key = header_key(request) or unpacked.key
        found: dict[bytes, Writer] = {}
        writers: list[Optional[Writer]] = []
        for event in unpacked.events:
            key = event.key or request_key
            writer = found.get(key) if key else None
            if writer is None:
                writer, reason = write_keys.writer_for(None, key)
                if writer is None:
                    raise Refused(Answer(401, error_body(
                        "unauthorized", detail="missing_key" if reason == "auth_missing"
                        else "invalid_key"), (_UNAUTHORIZED,)), reason)
                assert key is not None
                found[key] = writer
            writers.append(writer)
        return writers

    def _admit(self, unpacked: Unpacked, writers: list[Optional[Writer]]) -> AdmitResult:
        """Skip the events whose ids were accepted lately (or earlier in
        this request), queue the others, and remember their ids once the
        admission accepts them: a retry that arrives while an admission is
        still pending is stored again rather than risk losing both."""
        state, recent, protocol = self.state, self.recent, self.protocol
        now = state.now_ms()
        name = protocol.encode()
        queued: dict[str, list[bytes]] = {}  # bodies by writer segment
        keys: list[bytes] = []
        fresh: set[bytes] = set()
        skipped = 0
        scopes: dict[Optional[Writer], bytes] = {}
        for event, writer in zip(unpacked.events, writers):
            if event.event_id is not None and recent.max_ids:
                scope = scopes.get(writer)
                if scope is None:
                    scope = scopes[writer] = id_scope(protocol, writer.name if writer else "")
                key = id_key(scope, event.event_id)
                if key in fresh or key in recent:
                    skipped += 1
                    continue
                fresh.add(key)
                keys.append(key)
            queued.setdefault(writer.segment if writer else "", []).append(
                stored_body(name, unpacked.call, event.message, unpacked.envelope))
        if skipped:
            self._duplicates.inc(skipped)
        if not queued:
            return self.success

        def settle(answer: Answer) -> Answer:
            if answer.code != 202:
                return answer
            recent.add(keys)
            return self.success

        chunks = [Chunk(now, tuple(bodies), segment) for segment, bodies in queued.items()]
        return _then(state.admit_chunks(chunks, protocol=protocol), settle)


def _then(result: Any, change: Callable[[Answer], Answer]) -> Any:
    """`change` applied to an answer now, or to a later answer when it
    fires."""
    if isinstance(result, Deferred):
        return result.addCallback(change)
    return change(result)
