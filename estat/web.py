"""The ingest listener: `POST /collect` (one JSON event, or NDJSON with one
event per line), the health endpoints, and the sites that serve them."""

from __future__ import annotations

import time
from typing import Any, Callable, Optional, cast

from twisted.internet.defer import Deferred, DeferredQueue, succeed
from twisted.internet.interfaces import ITCPTransport
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.http import HTTPChannel
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from estat.auth import WriteKeys
from estat.encode import body_error
from estat.metrics import REJECT_REASONS, Metrics
from estat.request import BoundedRequest, error_body, raw_error

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
        write_keys: Optional[WriteKeys] = None,
        cors_origins: str = "",
    ) -> None:
        self.queue = queue
        self.queue_size = queue.size or 0
        self.metrics = metrics
        self.max_body_size = max_body_size
        self.max_batch_body_size = max_batch_body_size
        self.max_batch_events = max_batch_events
        self.validate_json = validate_json
        self.write_keys = write_keys
        origins = {o.strip().encode() for o in cors_origins.split(",") if o.strip()}
        self.cors_any = b"*" in origins
        self.cors_origins = frozenset(origins - {b"*"})
        self.now_ms = now_ms
        self.started = False
        self.draining = False
        self._codes: dict[int, Any] = {}
        self._rejected = {reason: metrics.events_rejected.labels(reason=reason)
                          for reason in REJECT_REASONS}

    def room(self) -> int:
        """Events the queue can still take. Nothing ever waits on
        `queue.get()` (the batcher drains `pending`), so enqueueing is an
        append after this check."""
        return self.queue_size - len(self.queue.pending)

    def ready(self) -> bool:
        return self.started and not self.draining and self.room() > 0

    def count_response(self, code: int) -> None:
        child = self._codes.get(code)
        if child is None:
            child = self._codes[code] = self.metrics.http_requests.labels(code=str(code))
        child.inc()

    def count_rejected(self, reason: str, amount: int = 1) -> None:
        self._rejected[reason].inc(amount)

    def allowed_origin(self, origin: Optional[bytes]) -> Optional[bytes]:
        """The Access-Control-Allow-Origin value for `origin`, if allowed."""
        if origin is None:
            return None
        if self.cors_any:
            return b"*"
        return origin if origin in self.cors_origins else None


_JSON = b"application/json"


def _answer(request: Request, code: int, body: bytes) -> bytes:
    request.setResponseCode(code)
    if request.defaultContentType != _JSON:  # BoundedRequest already says JSON
        request.setHeader(b"content-type", _JSON)
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
        method = request.method
        if method != b"POST":
            if method == b"OPTIONS":
                return self._preflight(request)
            state.count_rejected("method_not_allowed")
            request.setHeader(b"allow", b"POST, OPTIONS")
            return _answer(request, 405, error_body("method_not_allowed", allow="POST"))
        if state.cors_any or state.cors_origins:
            allowed = state.allowed_origin(request.getHeader(b"origin"))
            if allowed is not None:
                request.setHeader(b"access-control-allow-origin", allowed)
                request.setHeader(b"vary", b"Origin")
        segment = ""
        if state.write_keys is not None:
            writer, reason = state.write_keys.writer_for(
                request.getHeader(b"authorization"), request.getHeader(b"x-write-key"))
            if writer is None:
                state.count_rejected(reason)
                request.setHeader(b"www-authenticate", b'Bearer realm="estat-ingest"')
                return _answer(request, 401, error_body(
                    "unauthorized", detail="missing_key" if reason == "auth_missing"
                    else "invalid_key"))
            segment = writer.segment
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
            return self._collect_batch(request, segment)
        body = request.body
        if state.validate_json or media_type == _FORM_URLENCODED:
            problem = body_error(body)
            if problem is not None and media_type == _FORM_URLENCODED:
                return self._unsupported(request)
            if problem is not None and state.validate_json:
                state.count_rejected("invalid_json")
                return _answer(request, 400, error_body("invalid_json", detail=problem))
        if state.room() < 1:
            return self._unavailable(request, "queue_full")
        state.queue.pending.append(
            (state.now_ms(), body, segment) if segment else (state.now_ms(), body))
        self._accepted.inc()
        return _answer(request, 202, ACCEPTED_BODY)

    def _collect_batch(self, request: BoundedRequest, segment: str) -> bytes:
        state = self.state
        events = []
        for number, line in enumerate(request.body.split(b"\n"), 1):
            if line.endswith(b"\r"):
                line = line[:-1]
            if not line.strip():
                continue
            if len(line) > state.max_body_size:
                state.count_rejected("too_large")
                return _answer(request, 413, error_body(
                    "too_large", line=number, max_bytes=state.max_body_size))
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
        if len(events) > state.room():
            return self._unavailable(request, "queue_full")
        now = state.now_ms()
        if segment:
            state.queue.pending.extend([(now, line, segment) for line in events])
        else:
            state.queue.pending.extend([(now, line) for line in events])
        self._accepted.inc(len(events))
        return _answer(request, 202, b'{"status":"accepted","events":%d}\n' % len(events))

    def _preflight(self, request: Request) -> bytes:
        """CORS preflight for browser SDKs: which origins may POST, with
        which headers."""
        origin = request.getHeader(b"origin")
        request.setHeader(b"allow", b"POST, OPTIONS")
        if origin is None:
            request.setResponseCode(204)
            return b""
        allowed = self.state.allowed_origin(origin)
        if allowed is None:
            self.state.count_rejected("forbidden_origin")
            return _answer(request, 403, error_body("forbidden_origin"))
        request.setResponseCode(204)
        request.setHeader(b"access-control-allow-origin", allowed)
        request.setHeader(b"access-control-allow-methods", b"POST")
        request.setHeader(b"access-control-allow-headers",
                          b"Content-Type, Content-Encoding, Authorization, X-Write-Key")
        request.setHeader(b"access-control-max-age", b"600")
        request.setHeader(b"vary", b"Origin")
        return b""

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
    """Routes exact paths (`/collect`, not `/collect/`) to their resources;
    everything else is 404. A leaf, so Twisted skips its per-segment
    resource traversal."""

    isLeaf = True

    def __init__(self, routes: dict[bytes, Resource], fallback: Resource) -> None:
        super().__init__()
        self.routes = {b"/" + path: resource for path, resource in routes.items()}
        self.fallback = fallback

    def render(self, request: Request) -> Any:
        return self.routes.get(request.path, self.fallback).render(request)


class TrackedChannel(HTTPChannel):
    """An HTTP connection its site knows about (so a stop can close idle
    keep-alive connections and wait for busy ones) and that defends itself:
    a whole request must arrive within REQUEST_TIMEOUT of its first byte
    (slow clients get 408), and header limits are answered with 431."""

    _request_started: Optional[float] = None
    site: IngestSite  # set by Site.buildProtocol

    def connectionMade(self) -> None:
        site = self.factory
        self.maxHeaders = site.max_headers
        self.totalHeadersSize = site.max_header_bytes
        self.MAX_LENGTH = site.max_header_bytes
        super().connectionMade()
        site.channels.add(self)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._request_started = None
        super().connectionLost(reason)
        self.factory.channel_closed(self)

    def dataReceived(self, data: bytes) -> None:
        # The first byte of a request starts its clock; the site's reaper
        # (not a timer per request, which would cost more than the request)
        # answers 408 to requests still arriving after REQUEST_TIMEOUT.
        if self._request_started is None and not self._handlingRequest:
            self._request_started = self.factory.reactor.seconds()
        super().dataReceived(data)

    def allContentReceived(self) -> None:
        self._request_started = None
        super().allContentReceived()

    def reap_if_late(self, now: float, timeout: float) -> None:
        started = self._request_started
        if started is not None and now - started > timeout:
            self._request_started = None
            self._refuse(408, b"Request Timeout", "request_timeout", seconds=timeout)

    def _respondToBadRequestAndDisconnect(self) -> None:
        """Twisted's answer to a malformed request or too many or too large
        headers: give it a status and JSON body that say which."""
        if (self._receivedHeaderSize > self.totalHeadersSize
                or self._receivedHeaderCount > self.maxHeaders):
            self._refuse(431, b"Request Header Fields Too Large", "headers_too_large",
                         max_headers=self.maxHeaders, max_bytes=self.totalHeadersSize)
        else:
            self._refuse(400, b"Bad Request", "bad_request")

    def lineLengthExceeded(self, line: bytes) -> None:
        self._refuse(431, b"Request Header Fields Too Large", "headers_too_large",
                     max_bytes=self.MAX_LENGTH)

    def _refuse(self, code: int, phrase: bytes, error: str, **details: object) -> None:
        # Every stream transport has `disconnecting`; ITransport omits it.
        if self.transport is None or self.transport.disconnecting:  # type: ignore[attr-defined]
            return
        state = self.factory.state
        state.count_response(code)
        state.count_rejected(error)
        self.transport.write(raw_error(code, phrase, error, **details))
        self.loseConnection()

    def idle(self) -> bool:
        return not self.requests

    _host = None

    def getHost(self):  # type: ignore[no-untyped-def]
        """Every Request asks for the local address: one getsockname()
        per connection instead of one per request."""
        if self._host is None:
            self._host = super().getHost()
        return self._host


class _TooManyConnections(Protocol):
    """Answers a connection over MAX_CONNECTIONS with 503 and closes it."""

    def connectionMade(self) -> None:
        assert self.transport is not None  # makeConnection set it
        self.transport.write(raw_error(503, b"Service Unavailable", "too_many_connections"))
        self.transport.loseConnection()


class IngestSite(Site):
    """The ingest listener's Site: bounded requests, no access log on the
    reactor thread, idle connections closed after a minute, and a
    `close_connections` for an orderly stop."""

    requestFactory = BoundedRequest
    # Twisted types HTTPFactory.protocol as its HTTP/1.1-or-2 proxy factory
    # only; any HTTPChannel subclass works (Factory.buildProtocol calls it).
    protocol = TrackedChannel  # type: ignore[assignment]
    displayTracebacks = False
    closing = False

    def __init__(self, state: IngestState, idle_timeout: float = 60.0,
                 reactor: Optional[Any] = None, request_timeout: float = 10.0,
                 max_connections: int = 1024, max_headers: int = 64,
                 max_header_bytes: int = 16384) -> None:
        self.request_timeout = request_timeout
        self.max_connections = max_connections
        self.max_headers = max_headers
        self.max_header_bytes = max_header_bytes
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
        state.metrics.open_connections.set_function(lambda: len(self.channels))

    def buildProtocol(self, addr):  # type: ignore[no-untyped-def]
        if self._reaper is None:
            self._start_reaper()
        if len(self.channels) >= self.max_connections:
            self.state.count_rejected("too_many_connections")
            self.state.count_response(503)
            return _TooManyConnections()
        return super().buildProtocol(addr)

    def log(self, request: http.Request) -> None:
        """No per-request access log: it would cost more than the request."""

    _reaper: Optional[LoopingCall] = None

    def _start_reaper(self) -> None:
        """Check a few times per REQUEST_TIMEOUT for requests arriving too
        slowly; a 408 comes at most a quarter of the timeout late."""
        reaper = self._reaper = LoopingCall(self._reap)
        reaper.clock = self.reactor
        reaper.start(min(1.0, self.request_timeout / 4), now=False)

    def _reap(self) -> None:
        now = self.reactor.seconds()
        for channel in list(self.channels):
            channel.reap_if_late(now, self.request_timeout)

    def stopFactory(self) -> None:
        if self._reaper is not None and self._reaper.running:
            self._reaper.stop()
        self._reaper = None
        super().stopFactory()

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

        def cancel_timer(result: Optional[Failure]) -> Optional[Failure]:
            if timer.active():
                timer.cancel()
            return result

        waiter.addBoth(cancel_timer)
        return waiter

    def _abort_all(self) -> None:
        for channel in list(self.channels):
            if channel.transport is not None:
                # TCP, unix and TLS server transports all provide ITCPTransport.
                cast(ITCPTransport, channel.transport).abortConnection()

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


class MetricsPage(Resource):
    """`/metrics` in the Prometheus text format, rendered on the reactor
    thread (prometheus-client's own resource is WSGI on the global thread
    pool, and cannot answer over a unix socket)."""

    isLeaf = True

    def __init__(self, registry: Any) -> None:
        super().__init__()
        self.registry = registry

    def render_GET(self, request: Request) -> bytes:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode())
        return generate_latest(self.registry)


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

    def log(self, request: http.Request) -> None:
        """Scrapes are not worth a log line each."""
