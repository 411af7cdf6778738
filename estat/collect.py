"""What the ingest listener answers: `POST /collect` (one JSON event, a
JSON array of events, or NDJSON with one event per line) and the health
endpoints, every answer with the CORS headers its Origin gets.

The handlers are plain functions of an `IngestRequest` returning an
`Answer`; `estat.http` parses HTTP and writes the answers."""

from __future__ import annotations

import time
from typing import Any, Callable, Mapping, Optional, Sequence
from urllib.parse import parse_qs

import msgspec
from prometheus_client import Counter
from twisted.internet.defer import Deferred

from estat.admission import RETRY_AFTER, Admission, MaybeAnswer, MemoryAdmission, unavailable
from estat.auth import WriteKeys
from estat.http.request import IngestRequest
from estat.http.response import Answer, Headers, error_body
from estat.lifecycle import Lifecycle
from estat.metrics import PROTOCOLS, REJECT_REASONS, Metrics
from estat.model import Chunk, Lines, holds_line_break
from estat.pipeline.queue import EventQueue
from estat.validate import (RAW_ARRAY, all_start_objects, body_error, is_utf8,
                            lines_are_objects, unpaired_surrogate_element)

_FORM_URLENCODED = b"application/x-www-form-urlencoded"
_MULTIPART = b"multipart/"
ACCEPTED_BODY = b'{"status":"accepted"}\n'
ACCEPTED = Answer(202, ACCEPTED_BODY)


class IngestState:
    """What the request path needs to know about the server: the event
    queue, its lifecycle (starting, running, draining), who may write
    from where, and the counters of what it answers."""

    def __init__(
        self,
        queue: EventQueue,
        metrics: Metrics,
        validate_json: bool,
        now_ms: Callable[[], int] = lambda: int(time.time() * 1000),
        write_keys: Optional[WriteKeys] = None,
        cors_origins: str = "",
        lifecycle: Optional[Lifecycle] = None,
    ) -> None:
        self.queue = queue
        self.lifecycle = lifecycle if lifecycle is not None else Lifecycle()
        self.metrics = metrics
        self.validate_json = validate_json
        self.write_keys = write_keys
        origins = {o.strip().encode() for o in cors_origins.split(",") if o.strip()}
        self.cors_any = b"*" in origins
        self.cors_origins = frozenset(origins - {b"*"})
        self.now_ms = now_ms
        self.admission: Admission = MemoryAdmission(self)
        self._codes: dict[int, Any] = {}
        self._rejected = {reason: metrics.events_rejected.labels(reason=reason)
                          for reason in REJECT_REASONS}
        self._rejected_by = {(protocol, reason): metrics.protocol_rejected.labels(
            protocol=protocol, reason=reason) for protocol in PROTOCOLS
            for reason in REJECT_REASONS}
        self._accepted = metrics.events_accepted
        self._accepted_by = {protocol: metrics.protocol_events_accepted.labels(
            protocol=protocol) for protocol in PROTOCOLS}

    def ready(self) -> bool:
        """Running, with room in the queue for at least one more event (and
        in the write-ahead log, in durable mode)."""
        return (self.lifecycle.running and self.queue.room() > 0
                and self.admission.full() is None)

    def count_response(self, code: int) -> None:
        child = self._codes.get(code)
        if child is None:
            child = self._codes[code] = self.metrics.http_requests.labels(code=str(code))
        child.inc()

    def count_rejected(self, reason: str, amount: int = 1, protocol: str = "collect") -> None:
        """Count a refusal; what the listener refuses before a path is
        routed counts as `collect`'s."""
        self._rejected[reason].inc(amount)
        self._rejected_by[protocol, reason].inc(amount)

    def count_accepted(self, amount: int, protocol: str = "collect") -> None:
        self._accepted.inc(amount)
        self._accepted_by[protocol].inc(amount)

    def count_evicted(self) -> None:
        self.metrics.connections_evicted.inc()

    def gauge_connections(self, count: Callable[[], int]) -> None:
        """Export `count()` as the open-connections gauge."""
        self.metrics.open_connections.set_function(count)

    @property
    def loop_errors(self) -> Counter:
        return self.metrics.loop_errors

    def origin_allowed(self, origin: bytes) -> bool:
        """May a page on `origin` post? Only origins CORS_ALLOWED_ORIGINS
        lists (or any, with `*`); none when it is empty."""
        return self.cors_any or origin in self.cors_origins

    def cors_headers(self, headers: dict[bytes, bytes]) -> Headers:
        """The CORS headers of every answer to a request with these
        headers: for an allowed Origin, that origin echoed (never `*`, which
        browsers refuse with credentials), with credentials allowed."""
        origin = headers.get(b"origin")
        if origin is None or not self.origin_allowed(origin):
            return ()
        return ((b"access-control-allow-origin", origin),) + _CORS_ALLOWED

    def admit(self, bodies: Sequence[bytes], segment: str, plain: bool = False) -> MaybeAnswer:
        """Offer one request's event bodies, received now for one writer,
        all or none: 202 (naming how many, for more than one body), or 503
        with Retry-After (see `admit_chunks`). `plain`: no body holds a CR
        or LF, which a single body is looked at for here (two memchr scans
        of its bytes spare the encoder a count of the LFs of its batch's
        whole text, with the GIL held)."""
        if len(bodies) == 1:
            body = bodies[0]
            plain = plain or not holds_line_break(body)
            return self.admit_chunks(
                [Chunk(self.now_ms(), (body,), segment, plain, len(body))], ACCEPTED)
        if type(bodies) is Lines:  # not isinstance: an ABC's check is a Python call
            chunk = Chunk(self.now_ms(), bodies, segment, plain, bodies.size)
        else:
            chunk = Chunk(self.now_ms(), tuple(bodies), segment, plain, sum(map(len, bodies)))
        return self.admit_chunks([chunk], Answer(
            202, b'{"status":"accepted","events":%d}\n' % len(bodies)))

    def admit_chunks(self, chunks: list[Chunk], accepted: Answer = ACCEPTED,
                     protocol: str = "collect") -> MaybeAnswer:
        """The one place every protocol's handler hands events to the
        pipeline, all or none, through `admission` (ACK_MODE's):
        `accepted` once taken (at once, or when a Deferred fires), or 503
        with Retry-After."""
        return self.admission.admit(chunks, accepted, protocol)


def queue_refusal(state: IngestState, events: int) -> Optional[Answer]:
    """The 503 queue_full (counted) for a request of at least `events`
    events when the event queue has no room for them; else None. The
    listener asks this before a body is read (for one event) and while an
    NDJSON body arrives or inflates (for its lines so far), so that what
    would be refused costs no inflating or parsing that can be spared."""
    if state.queue.room() >= events:
        return None
    return unavailable(state, "queue_full")


_ALLOW = (b"allow", b"POST, OPTIONS")
_UNAUTHORIZED = (b"www-authenticate", b'Bearer realm="estat-ingest"')
_CORS_ALLOWED = ((b"access-control-allow-credentials", b"true"),
                 (b"access-control-expose-headers", b"Retry-After"), (b"vary", b"Origin"))
_PREFLIGHT_HEADERS = b"Content-Type, Content-Encoding, Authorization, X-Write-Key"
_PREFLIGHT = ((b"access-control-allow-methods", b"POST"),
              (b"access-control-max-age", b"600"))
_KEY_EXPECTED = "a write key: Authorization: Bearer <key>, X-Write-Key: <key> or ?write_key=<key>"
_ONE_EVENT = ("one JSON object; several events as application/x-ndjson (one object per "
              "line) or a JSON array of objects")
_ENCODINGS = "Content-Encoding gzip, deflate, zstd or none"


def _query_key(query: bytes) -> Optional[bytes]:
    """The `write_key` of a query string (beacons cannot set headers)."""
    if b"write_key=" not in query:
        return None
    try:
        values = parse_qs(query, max_num_fields=16).get(b"write_key")
    except ValueError:  # more fields than any beacon sends
        return None
    return values[0] if values else None


def _looks_like_ndjson(body: bytes) -> bool:
    """Several lines whose first is one JSON object: NDJSON with the wrong
    Content-Type."""
    first, newline, rest = body.strip().partition(b"\n")
    return bool(newline and rest.strip()) and body_error(first.strip()) is None


def forbidden_origin(state: IngestState, origin: bytes, protocol: str = "collect") -> Answer:
    """403 for a request from a page on `origin`, which
    CORS_ALLOWED_ORIGINS does not list: nothing it sends is stored."""
    state.count_rejected("forbidden_origin", protocol=protocol)
    return Answer(403, error_body(
        "forbidden_origin", origin=origin.decode("latin-1"),
        detail="add this origin to CORS_ALLOWED_ORIGINS to let its pages post"
        if state.cors_any or state.cors_origins else
        "CORS_ALLOWED_ORIGINS is empty: no page on another origin may post"))


def preflight(state: IngestState, request: IngestRequest, protocol: str = "collect") -> Answer:
    """CORS preflight for every ingest path browsers post to: which origins
    may POST, with which headers (those the browser asks for), with
    credentials. (The allowed origin itself is echoed on every answer by
    `IngestState.cors_headers`, through the listener.)"""
    headers = request.headers
    origin = headers.get(b"origin")
    if origin is None:
        return Answer(204, b"", (_ALLOW,))
    if not state.origin_allowed(origin):
        return forbidden_origin(state, origin, protocol)
    asked = headers.get(b"access-control-request-headers")
    answer: Headers = ((_ALLOW, (b"access-control-allow-headers",
                                 asked or _PREFLIGHT_HEADERS)) + _PREFLIGHT)
    if headers.get(b"access-control-request-private-network") == b"true":
        answer += ((b"access-control-allow-private-network", b"true"),)
    return Answer(204, b"", answer)


class Collect:
    """`POST /collect`: validate and queue without waiting; 503 at once when
    the queue is full or the server is stopping.

    An `application/x-ndjson` body is a batch, one event per line, and so
    is a body whose top level is a JSON array of objects, one event per
    element (each stored as its bytes arrived): a batch is accepted or
    refused as a whole (so a client's retry never duplicates). Multipart
    bodies are refused (415). A body labelled as a URL-encoded form is taken
    as JSON when it is JSON (curl's `--data` sends that label) and refused
    with 415 otherwise. Each event of a batch is held to `max_event_bytes`,
    like a single event, and a batch to `max_batch_events`. A request with
    an `Origin` CORS_ALLOWED_ORIGINS does not allow is refused (403)."""

    def __init__(self, state: IngestState, max_event_bytes: int,
                 max_batch_events: int) -> None:
        self.state = state
        self.max_event_bytes = max_event_bytes
        self.max_batch_events = max_batch_events

    def __call__(self, request: IngestRequest) -> MaybeAnswer:
        state = self.state
        method = request.method
        if method != b"POST":
            if method == b"OPTIONS":
                return preflight(state, request)
            state.count_rejected("method_not_allowed")
            return Answer(405, error_body("method_not_allowed", allow="POST",
                                          detail="send events with POST"), (_ALLOW,))
        headers = request.headers
        origin = headers.get(b"origin")
        if origin is not None and not state.origin_allowed(origin):
            return forbidden_origin(state, origin)
        segment = ""
        if state.write_keys is not None:
            key = headers.get(b"x-write-key")
            if not key and request.query:
                key = _query_key(request.query)
            writer, reason = state.write_keys.writer_for(headers.get(b"authorization"), key)
            if writer is None:
                state.count_rejected(reason)
                if reason == "auth_conflict":
                    return Answer(400, error_body(
                        "conflicting_keys",
                        detail="X-Write-Key and Authorization name different keys"))
                return Answer(401, error_body(
                    "unauthorized", detail="missing_key" if reason == "auth_missing"
                    else "invalid_key", expected=_KEY_EXPECTED), (_UNAUTHORIZED,))
            segment = writer.segment
        return self._collect(request, segment)

    def _collect(self, request: IngestRequest, segment: str) -> MaybeAnswer:
        state = self.state
        problem = request.body_problem
        media_type = request.media_type
        if problem == "unsupported_content_encoding" or media_type.startswith(_MULTIPART):
            return self._unsupported()
        if problem == "invalid_encoding":
            state.count_rejected("invalid_encoding")
            encoding = request.headers.get(b"content-encoding", b"").decode("latin-1")
            return Answer(400, error_body(
                "invalid_encoding", encoding=encoding,
                detail=f"the body does not decompress as Content-Encoding: {encoding}"))
        if request.is_batch:
            return self._collect_lines(request.body, segment, request.lines)
        if request.is_array:
            return self._collect_array(request.body, segment)
        body = request.body
        if state.validate_json or media_type == _FORM_URLENCODED:
            problem = body_error(body)
            if problem is not None and media_type == _FORM_URLENCODED:
                return self._unsupported()
            if problem is not None and state.validate_json:
                state.count_rejected("invalid_json")
                if _looks_like_ndjson(body):
                    return Answer(400, error_body(
                        "invalid_json", detail=problem, expected="NDJSON (one JSON object per "
                        "line) needs Content-Type: application/x-ndjson"))
                return Answer(400, error_body("invalid_json", detail=problem,
                                              expected=_ONE_EVENT))
        return state.admit([body], segment)

    def _collect_lines(self, body: bytes, segment: str, line_feeds: int) -> MaybeAnswer:
        """An NDJSON batch of `line_feeds` LFs: one event per line, blank
        lines ignored. The common body (LF line ends, no blank line, every
        line an object within the size limit) is checked whole and queued
        as its text; any other goes line by line, which also names the
        line that is wrong."""
        state = self.state
        if line_feeds + (not body.endswith(b"\n")) > self.max_batch_events:
            # Refused before a line is split off or checked: blank lines hold
            # no event, but a body of more lines than a batch's events would
            # cost a Python step each (and a 20 MiB body of LFs, which
            # compresses to 20 KB, a 160 MB list) only to be refused.
            return self._too_many_events("lines")
        if state.validate_json and body and b"\r" not in body:
            text, count = body, line_feeds
            if not body.endswith(b"\n"):
                text, count = body + b"\n", line_feeds + 1
            if lines_are_objects(text, count, self.max_event_bytes):
                if count == 1:
                    return self.admit_batch([text[:-1]], segment, plain=True)
                return self.admit_batch(Lines(text, count), segment, plain=True)
        events = []
        for number, line in enumerate(body.split(b"\n"), 1):
            if line.endswith(b"\r"):
                line = line[:-1]
            if not line.strip():
                continue
            if len(line) > self.max_event_bytes:
                return self._event_too_large("line", number)
            if state.validate_json:
                problem = body_error(line)
                if problem is not None:
                    state.count_rejected("invalid_json")
                    return Answer(400, error_body("invalid_json", line=number, detail=problem,
                                                  expected="one JSON object per line"))
            events.append(line)
        return self.admit_batch(events, segment)

    def _collect_array(self, body: bytes, segment: str) -> MaybeAnswer:
        """A JSON array of objects: one event per element, each the bytes
        of that element as they arrived (never re-serialized)."""
        state = self.state
        try:
            events = list(map(bytes, RAW_ARRAY.decode(body)))
        except (msgspec.DecodeError, RecursionError) as error:
            state.count_rejected("invalid_json")
            element = unpaired_surrogate_element(body)
            if element is not None:
                return Answer(400, error_body("invalid_json", element=element,
                                              detail="unpaired_surrogate",
                                              expected="a JSON array of objects"))
            return Answer(400, error_body("invalid_json", detail=str(error),
                                          expected="a JSON array of objects"))
        validate = state.validate_json
        if (validate and events and max(map(len, events)) <= self.max_event_bytes
                and all_start_objects(events) and is_utf8(body)):
            # msgspec checked every element; each is an object, in UTF-8.
            return self.admit_batch(events, segment)
        for number, event in enumerate(events, 1):
            if len(event) > self.max_event_bytes:
                return self._event_too_large("element", number)
            problem = body_error(event) if validate else (
                None if event[:1] == b"{" else "not_object")
            if problem is not None:
                state.count_rejected("invalid_json")
                return Answer(400, error_body("invalid_json", element=number, detail=problem,
                                              expected="a JSON array of objects"))
        return self.admit_batch(events, segment)

    def _event_too_large(self, where: str, number: int) -> Answer:
        self.state.count_rejected("too_large")
        return Answer(413, error_body(
            "too_large", **{where: number}, max_bytes=self.max_event_bytes,
            detail=f"each event is at most {self.max_event_bytes} bytes (MAX_BODY_SIZE)"))

    def admit_batch(self, events: Sequence[bytes], segment: str,
                    plain: bool = False) -> MaybeAnswer:
        """Admit one request's events as a batch: 400 when there are none,
        413 over `max_batch_events`, else `IngestState.admit` (all or none).
        Routes for other protocols call this with the bodies they cut."""
        state = self.state
        if not events:
            state.count_rejected("invalid_json")
            return Answer(400, error_body("invalid_json", detail="no_events",
                                          expected="at least one event"))
        if len(events) > self.max_batch_events:
            return self._too_many_events("events")
        return state.admit(events, segment, plain)

    def _too_many_events(self, what: str) -> Answer:
        self.state.count_rejected("too_large")
        return Answer(413, error_body(
            "too_many_events", max_events=self.max_batch_events,
            detail=f"a batch holds at most {self.max_batch_events} {what} "
                   "(MAX_BATCH_EVENTS): send smaller chunks"))

    def _unsupported(self) -> Answer:
        self.state.count_rejected("unsupported_media_type")
        return Answer(415, error_body(
            "unsupported_media_type", expected="application/json or application/x-ndjson, "
            f"with {_ENCODINGS}"))


HEALTHY = Answer(200, b'{"status":"ok"}\n')
_READY = Answer(200, b'{"status":"ready"}\n')


def readiness(state: IngestState) -> Answer:
    """200 when new events would be accepted; 503 while starting, draining
    for shutdown, with a full event queue, or (durable mode) a full
    write-ahead log."""
    if state.ready():
        return _READY
    if not state.lifecycle.running:
        status = state.lifecycle.phase.value
    else:
        status = state.admission.full() or "queue_full"
    return Answer(503, error_body("not_ready", status=status), (RETRY_AFTER,))


def _get_only(request: IngestRequest, answer: Callable[[], Answer]) -> Answer:
    if request.method in (b"GET", b"HEAD"):
        return answer()
    return Answer(405, error_body("method_not_allowed", allow="GET"), ((b"allow", b"GET"),))


class Routes:
    """The ingest listener's paths, matched exactly (`/collect`, not
    `/collect/`); everything else is a JSON 404. `max_event_bytes` and
    `max_batch_events` are `Collect`'s; `more` adds the paths of other
    protocols (estat.sdk's)."""

    def __init__(self, state: IngestState, max_event_bytes: int,
                 max_batch_events: int,
                 more: Optional[Mapping[bytes, Callable[[IngestRequest], MaybeAnswer]]] = None
                 ) -> None:
        self.state = state
        collect = Collect(state, max_event_bytes, max_batch_events)
        self._routes: dict[bytes, Callable[[IngestRequest], MaybeAnswer]] = {
            b"/collect": collect,
            b"/healthz": lambda request: _get_only(request, lambda: HEALTHY),
            b"/readyz": lambda request: _get_only(request, lambda: readiness(state)),
        }
        self._routes.update(more or {})

    def __call__(self, request: IngestRequest) -> MaybeAnswer:
        handler = self._routes.get(request.path)
        answer: MaybeAnswer
        if handler is None:
            if request.method == b"OPTIONS" and b"origin" in request.headers:
                # A page asks before it posts anywhere: let it read the 404.
                answer = preflight(self.state, request)
            else:
                self.state.count_rejected("not_found")
                answer = Answer(404, error_body("not_found", expected="POST /collect"))
        else:
            answer = handler(request)
        if b"origin" not in request.headers:
            return answer
        cors = self.state.cors_headers(request.headers)
        if not cors:
            return answer
        if isinstance(answer, Deferred):  # ACK_MODE=durable: answered after the fsync
            return answer.addCallback(lambda done: done._replace(headers=done.headers + cors))
        return answer._replace(headers=answer.headers + cors)
