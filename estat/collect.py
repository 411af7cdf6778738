"""What the ingest listener answers: `POST /collect` (one JSON event, or
NDJSON with one event per line) and the health endpoints.

The handlers are plain functions of an `IngestRequest` returning an
`Answer`; `estat.http` parses HTTP and writes the answers."""

from __future__ import annotations

import time
from typing import Any, Callable, Optional

from prometheus_client import Counter
from twisted.internet.defer import Deferred

from estat.admission import Admission, MaybeAnswer, MemoryAdmission, unavailable
from estat.auth import WriteKeys
from estat.http.request import IngestRequest
from estat.http.response import Answer, error_body
from estat.lifecycle import Lifecycle
from estat.metrics import REJECT_REASONS, Metrics
from estat.model import Event, events_of
from estat.pipeline.queue import EventQueue
from estat.validate import body_error

RETRY_AFTER_SECONDS = b"1"
_FORM_URLENCODED = b"application/x-www-form-urlencoded"
_MULTIPART = b"multipart/"
ACCEPTED_BODY = b'{"status":"accepted"}\n'


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
        self._codes: dict[int, Any] = {}
        self._rejected = {reason: metrics.events_rejected.labels(reason=reason)
                          for reason in REJECT_REASONS}

    def ready(self) -> bool:
        """Running, with room in the queue for at least one more event."""
        return self.lifecycle.running and self.queue.room() > 0

    def count_response(self, code: int) -> None:
        child = self._codes.get(code)
        if child is None:
            child = self._codes[code] = self.metrics.http_requests.labels(code=str(code))
        child.inc()

    def count_rejected(self, reason: str, amount: int = 1) -> None:
        self._rejected[reason].inc(amount)

    def gauge_connections(self, count: Callable[[], int]) -> None:
        """Export `count()` as the open-connections gauge."""
        self.metrics.open_connections.set_function(count)

    @property
    def loop_errors(self) -> Counter:
        return self.metrics.loop_errors

    def allowed_origin(self, origin: Optional[bytes]) -> Optional[bytes]:
        """The Access-Control-Allow-Origin value for `origin`, if allowed."""
        if origin is None:
            return None
        if self.cors_any:
            return b"*"
        return origin if origin in self.cors_origins else None


ACCEPTED = Answer(202, ACCEPTED_BODY)
_RETRY_AFTER = (b"retry-after", RETRY_AFTER_SECONDS)
_ALLOW = (b"allow", b"POST, OPTIONS")
_UNAUTHORIZED = (b"www-authenticate", b'Bearer realm="estat-ingest"')
_PREFLIGHT = ((b"access-control-allow-methods", b"POST"),
              (b"access-control-allow-headers",
               b"Content-Type, Content-Encoding, Authorization, X-Write-Key"),
              (b"access-control-max-age", b"600"), (b"vary", b"Origin"))


class Collect:
    """`POST /collect`: validate and queue without waiting; 503 at once when
    the queue is full or the server is stopping.

    An `application/x-ndjson` body is a batch, one event per line, accepted
    or refused as a whole (so a client's retry never duplicates). Multipart
    bodies are refused (415). A body labelled as a URL-encoded form is taken
    as JSON when it is JSON (curl's `--data` sends that label) and refused
    with 415 otherwise. Each line of a batch is held to `max_event_bytes`,
    like a single event, and a batch to `max_batch_events`."""

    def __init__(self, state: IngestState, max_event_bytes: int,
                 max_batch_events: int, admission: Optional[Admission] = None) -> None:
        self.state = state
        self.max_event_bytes = max_event_bytes
        self.max_batch_events = max_batch_events
        self.admission = admission if admission is not None else MemoryAdmission(state)

    def __call__(self, request: IngestRequest) -> MaybeAnswer:
        state = self.state
        method = request.method
        if method != b"POST":
            if method == b"OPTIONS":
                return self._preflight(request)
            state.count_rejected("method_not_allowed")
            return Answer(405, error_body("method_not_allowed", allow="POST"), (_ALLOW,))
        cors: tuple[tuple[bytes, bytes], ...] = ()
        if state.cors_any or state.cors_origins:
            allowed = state.allowed_origin(request.headers.get(b"origin"))
            if allowed is not None:
                cors = ((b"access-control-allow-origin", allowed), (b"vary", b"Origin"))
        segment = ""
        if state.write_keys is not None:
            headers = request.headers
            writer, reason = state.write_keys.writer_for(
                headers.get(b"authorization"), headers.get(b"x-write-key"))
            if writer is None:
                state.count_rejected(reason)
                return Answer(401, error_body(
                    "unauthorized", detail="missing_key" if reason == "auth_missing"
                    else "invalid_key"), (_UNAUTHORIZED,) + cors)
            segment = writer.segment
        answer = self._collect(request, segment)
        if not cors:
            return answer
        if isinstance(answer, Deferred):
            return answer.addCallback(lambda done: done._replace(headers=done.headers + cors))
        return answer._replace(headers=answer.headers + cors)

    def _collect(self, request: IngestRequest, segment: str) -> MaybeAnswer:
        state = self.state
        problem = request.body_problem
        media_type = request.media_type
        if problem == "unsupported_content_encoding" or media_type.startswith(_MULTIPART):
            return self._unsupported()
        if problem == "invalid_gzip":
            state.count_rejected("invalid_encoding")
            return Answer(400, error_body("invalid_gzip"))
        if state.lifecycle.stopping:
            return self._unavailable("shutting_down")
        if request.is_batch:
            return self._collect_batch(request, segment)
        body = request.body
        if state.validate_json or media_type == _FORM_URLENCODED:
            problem = body_error(body)
            if problem is not None and media_type == _FORM_URLENCODED:
                return self._unsupported()
            if problem is not None and state.validate_json:
                state.count_rejected("invalid_json")
                return Answer(400, error_body("invalid_json", detail=problem))
        return self.admission.admit([Event(state.now_ms(), body, segment)], ACCEPTED)

    def _collect_batch(self, request: IngestRequest, segment: str) -> MaybeAnswer:
        state = self.state
        events = []
        for number, line in enumerate(request.body.split(b"\n"), 1):
            if line.endswith(b"\r"):
                line = line[:-1]
            if not line.strip():
                continue
            if len(line) > self.max_event_bytes:
                state.count_rejected("too_large")
                return Answer(413, error_body(
                    "too_large", line=number, max_bytes=self.max_event_bytes))
            if state.validate_json:
                problem = body_error(line)
                if problem is not None:
                    state.count_rejected("invalid_json")
                    return Answer(400, error_body("invalid_json", line=number, detail=problem))
            events.append(line)
        if not events:
            state.count_rejected("invalid_json")
            return Answer(400, error_body("invalid_json", detail="no_events"))
        if len(events) > self.max_batch_events:
            state.count_rejected("too_large")
            return Answer(413, error_body("too_many_events", max_events=self.max_batch_events))
        return self.admission.admit(
            events_of(state.now_ms(), events, segment),
            Answer(202, b'{"status":"accepted","events":%d}\n' % len(events)))

    def _preflight(self, request: IngestRequest) -> Answer:
        """CORS preflight for browser SDKs: which origins may POST, with
        which headers."""
        origin = request.headers.get(b"origin")
        if origin is None:
            return Answer(204, b"", (_ALLOW,))
        allowed = self.state.allowed_origin(origin)
        if allowed is None:
            self.state.count_rejected("forbidden_origin")
            return Answer(403, error_body("forbidden_origin"), (_ALLOW,))
        return Answer(204, b"", (_ALLOW, (b"access-control-allow-origin", allowed)) + _PREFLIGHT)

    def _unsupported(self) -> Answer:
        self.state.count_rejected("unsupported_media_type")
        return Answer(415, error_body(
            "unsupported_media_type", expected="application/json or application/x-ndjson, "
            "optionally with Content-Encoding: gzip"))

    def _unavailable(self, reason: str) -> Answer:
        return unavailable(self.state, reason)


HEALTHY = Answer(200, b'{"status":"ok"}\n')
_READY = Answer(200, b'{"status":"ready"}\n')


def readiness(state: IngestState) -> Answer:
    """200 when new events would be accepted; 503 while starting, draining
    for shutdown, or with a full event queue."""
    if state.ready():
        return _READY
    status = "queue_full" if state.lifecycle.running else state.lifecycle.phase.value
    return Answer(503, error_body("not_ready", status=status), (_RETRY_AFTER,))


def _get_only(request: IngestRequest, answer: Callable[[], Answer]) -> Answer:
    if request.method in (b"GET", b"HEAD"):
        return answer()
    return Answer(405, error_body("method_not_allowed", allow="GET"), ((b"allow", b"GET"),))


class Routes:
    """The ingest listener's paths, matched exactly (`/collect`, not
    `/collect/`); everything else is a JSON 404. `max_event_bytes` and
    `max_batch_events` are `Collect`'s."""

    def __init__(self, state: IngestState, max_event_bytes: int,
                 max_batch_events: int, admission: Optional[Admission] = None) -> None:
        self.state = state
        collect = Collect(state, max_event_bytes, max_batch_events, admission)
        self._routes: dict[bytes, Callable[[IngestRequest], MaybeAnswer]] = {
            b"/collect": collect,
            b"/healthz": lambda request: _get_only(request, lambda: HEALTHY),
            b"/readyz": lambda request: _get_only(request, lambda: readiness(state)),
        }

    def __call__(self, request: IngestRequest) -> MaybeAnswer:
        handler = self._routes.get(request.path)
        if handler is None:
            self.state.count_rejected("not_found")
            return Answer(404, error_body("not_found"))
        return handler(request)
