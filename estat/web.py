"""The ingest listener: `POST /collect` (one JSON event, or NDJSON with one
event per line), the health endpoints, and the sites that serve them."""

from __future__ import annotations

import time
from typing import Any, Callable, Optional

from twisted.internet.defer import Deferred, DeferredQueue, QueueOverflow, succeed
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from estat.encode import body_error
from estat.metrics import REJECT_REASONS, Metrics
from estat.request import BoundedRequest, error_body

RETRY_AFTER_SECONDS = b"1"
_FORM_URLENCODED = b"application/x-www-form-urlencoded"
_MULTIPART = b"multipart/"
ACCEPTED_BODY = b'{"status":"accepted"}\n'


class IngestState:
    """What the request path needs to know about the server: the event
    queue, whether it is draining, and the limits it enforces."""

    def __init__(
        self,
        queue: DeferredQueue,
        metrics: Metrics,
        max_body_size: int,
        validate_json: bool,
        now_ms: Callable[[], int] = lambda: int(time.time() * 1000),
        max_batch_body_size: int = 1024 * 1024,
        max_batch_events: int = 1000,
    ) -> None:
        self.queue = queue
        self.metrics = metrics
        self.max_body_size = max_body_size
        self.max_batch_body_size = max_batch_body_size
        self.max_batch_events = max_batch_events
        self.validate_json = validate_json
        self.now_ms = now_ms
        self.started = False
        self.draining = False
        self._codes: dict[int, Any] = {}
        self._rejected = {reason: metrics.events_rejected.labels(reason=reason)
                          for reason in REJECT_REASONS}

    def ready(self) -> bool:
        return (
            self.started
            and not self.draining
            and len(self.queue.pending) < (self.queue.size or 0)
        )

    def count_response(self, code: int) -> None:
        child = self._codes.get(code)
        if child is None:
            child = self._codes[code] = self.metrics.http_requests.labels(code=str(code))
        child.inc()

    def count_rejected(self, reason: str, amount: int = 1) -> None:
        self._rejected[reason].inc(amount)


def _answer(request: Request, code: int, body: bytes) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"application/json")
    return body


class CollectResource(Resource):
    """`POST /collect`: validate and queue without waiting; 503 at once when
    the queue is full or the server is stopping.

    An `application/x-ndjson` body is a batch, one event per line, accepted
    or refused as a whole (so a client's retry never duplicates). Multipart
    bodies are refused (415). A body labelled as a URL-encoded form is taken
    as JSON when it is JSON (curl's `--data` sends that label) and refused
    with 415 otherwise; Twisted never parses either."""

    isLeaf = True

    def __init__(self, state: IngestState) -> None:
        super().__init__()
        self.state = state
        self._accepted = state.metrics.events_accepted

    def render(self, request: BoundedRequest) -> bytes:  # type: ignore[override]
        state = self.state
        if request.method != b"POST":
            state.count_rejected("method_not_allowed")
            request.setHeader(b"allow", b"POST")
            return _answer(request, 405, error_body("method_not_allowed", allow="POST"))
        problem = request.body_problem
        media_type = request.media_type
        if problem == "unsupported_content_encoding" or media_type.startswith(_MULTIPART):
            return self._unsupported(request)
        if problem == "invalid_gzip":
            state.count_rejected("invalid_encoding")
            return _answer(request, 400, error_body("invalid_gzip"))
        if state.draining:
            return self._unavailable(request, "shutting_down")
        if request.is_batch:
            return self._collect_batch(request)
        body = request.body
        if state.validate_json or media_type == _FORM_URLENCODED:
            problem = body_error(body)
            if problem is not None and media_type == _FORM_URLENCODED:
                return self._unsupported(request)
            if problem is not None and state.validate_json:
                state.count_rejected("invalid_json")
                return _answer(request, 400, error_body("invalid_json", detail=problem))
        try:
            state.queue.put((state.now_ms(), body))
        except QueueOverflow:
            return self._unavailable(request, "queue_full")
        self._accepted.inc()
        return _answer(request, 202, ACCEPTED_BODY)

    def _collect_batch(self, request: BoundedRequest) -> bytes:
        state = self.state
        events = []
        for number, line in enumerate(request.body.split(b"\n"), 1):
            if line.endswith(b"\r"):
                line = line[:-1]
            if not line.strip():
                continue
            if state.validate_json:
                problem = body_error(line)
                if problem is not None:
                    state.count_rejected("invalid_json")
                    return _answer(request, 400, error_body(
                        "invalid_json", line=number, detail=problem))
            events.append(line)
        if not events:
            state.count_rejected("invalid_json")
            return _answer(request, 400, error_body("invalid_json", detail="no_events"))
        if len(events) > state.max_batch_events:
            state.count_rejected("too_large")
            return _answer(request, 413, error_body(
                "too_many_events", max_events=state.max_batch_events))
        queue = state.queue
        if len(queue.pending) + len(events) > (queue.size or 0):
            return self._unavailable(request, "queue_full")
        now = state.now_ms()
        # Nothing ever waits on queue.get(): the batcher drains `pending`.
        queue.pending.extend([(now, line) for line in events])
        self._accepted.inc(len(events))
        return _answer(request, 202, b'{"status":"accepted","events":%d}\n' % len(events))

    def _unsupported(self, request: Request) -> bytes:
        self.state.count_rejected("unsupported_media_type")
        return _answer(request, 415, error_body(
            "unsupported_media_type", expected="application/json or application/x-ndjson, "
            "optionally with Content-Encoding: gzip"))

    def _unavailable(self, request: Request, reason: str) -> bytes:
        self.state.count_rejected(reason)
        request.setHeader(b"retry-after", RETRY_AFTER_SECONDS)
        if reason == "shutting_down":
            request.setHeader(b"connection", b"close")
        return _answer(request, 503, error_body(reason))


class HealthResource(Resource):
    """`/healthz`: 200 while the process runs."""

    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        return _answer(request, 200, b'{"status":"ok"}\n')


class ReadyResource(Resource):
    """`/readyz`: 200 when new events would be accepted; 503 while starting,
    draining for shutdown, or with a full event queue."""

    isLeaf = True

    def __init__(self, state: IngestState) -> None:
        super().__init__()
        self.state = state

    def render_GET(self, request: Request) -> bytes:
        state = self.state
        if state.ready():
            return _answer(request, 200, b'{"status":"ready"}\n')
        if not state.started:
            status = "starting"
        elif state.draining:
            status = "draining"
        else:
            status = "queue_full"
        request.setHeader(b"retry-after", RETRY_AFTER_SECONDS)
        return _answer(request, 503, error_body("not_ready", status=status))


class NotFoundResource(Resource):
    """A JSON 404 for every path we do not serve."""

    isLeaf = True

    def __init__(self, state: Optional[IngestState] = None) -> None:
        super().__init__()
        self.state = state

    def render(self, request: Request) -> bytes:
        if self.state is not None:
            self.state.count_rejected("not_found")
        return _answer(request, 404, error_body("not_found"))


class Root(Resource):
    """Routes exact paths to their resources; everything else is 404."""

    def __init__(self, routes: dict[bytes, Resource], fallback: Resource) -> None:
        super().__init__()
        self.routes = routes
        self.fallback = fallback

    def getChild(self, path: bytes, request: Request) -> Resource:
        resource = self.routes.get(path)
        if resource is None or request.postpath:
            return self.fallback
        return resource


class TrackedChannel(HTTPChannel):
    """An HTTP connection its site knows about, so a stop can close idle
    keep-alive connections and wait for busy ones."""

    def connectionMade(self) -> None:
        super().connectionMade()
        self.factory.channels.add(self)

    def connectionLost(self, reason: Failure) -> None:
        super().connectionLost(reason)
        self.factory.channel_closed(self)

    def idle(self) -> bool:
        return not self.requests

    _host = None

    def getHost(self):  # type: ignore[no-untyped-def]
        """Every Request asks for the local address: one getsockname()
        per connection instead of one per request."""
        if self._host is None:
            self._host = super().getHost()
        return self._host


class IngestSite(Site):
    """The ingest listener's Site: bounded requests, no access log on the
    reactor thread, idle connections closed after a minute, and a
    `close_connections` for an orderly stop."""

    requestFactory = BoundedRequest
    protocol = TrackedChannel
    displayTracebacks = False
    closing = False

    def __init__(self, state: IngestState, idle_timeout: float = 60.0,
                 reactor: Optional[Any] = None) -> None:
        routes = {
            b"collect": CollectResource(state),
            b"healthz": HealthResource(),
            b"readyz": ReadyResource(state),
        }
        super().__init__(Root(routes, NotFoundResource(state)), timeout=idle_timeout,
                         reactor=reactor)
        self.state = state
        self.channels: set[TrackedChannel] = set()
        self._closed_waiters: list[Deferred] = []

    def log(self, request: Request) -> None:
        """No per-request access log: it would cost more than the request."""

    def close_connections(self, grace: float) -> "Deferred[None]":
        """Close idle connections now; let busy ones finish their request
        (each closes after its answer) and abort what is left after
        `grace` seconds. Fires when every connection is gone."""
        self.closing = True
        for channel in list(self.channels):
            if channel.idle():
                channel.loseConnection()
        if not self.channels:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._closed_waiters.append(waiter)
        timer = self.reactor.callLater(grace, self._abort_all)
        waiter.addBoth(lambda result: (timer.active() and timer.cancel(), result)[1])
        return waiter

    def _abort_all(self) -> None:
        for channel in list(self.channels):
            if channel.transport is not None:
                channel.transport.abortConnection()

    def channel_closed(self, channel: TrackedChannel) -> None:
        self.channels.discard(channel)
        if not self.channels and self._closed_waiters:
            waiters, self._closed_waiters = self._closed_waiters, []
            for waiter in waiters:
                waiter.callback(None)

    def request_done(self, channel: HTTPChannel) -> None:
        """While closing, a connection ends after its answer."""
        if self.closing:
            channel.persistent = False


class AdminSite(Site):
    """The admin listener: `/metrics`, `/healthz`, `/readyz`."""

    displayTracebacks = False

    def __init__(self, state: IngestState, metrics_resource: Resource,
                 reactor: Optional[Any] = None) -> None:
        routes = {
            b"metrics": metrics_resource,
            b"healthz": HealthResource(),
            b"readyz": ReadyResource(state),
        }
        super().__init__(Root(routes, NotFoundResource()), timeout=60.0, reactor=reactor)

    def log(self, request: Request) -> None:
        """Scrapes are not worth a log line each."""
