"""The ingest listener: `POST /collect`, health endpoints, and a request
class that enforces the body limit while the body arrives.

Twisted's own Request has no body limit (it spools large bodies to temporary
files) and parses form bodies; `BoundedRequest` refuses a too-large body
before reading it and never parses forms.
"""

from __future__ import annotations

import json
import time
from io import BytesIO
from typing import Any, Callable, Optional

from twisted.internet.defer import DeferredQueue, QueueOverflow
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from estat.encode import body_error
from estat.metrics import Metrics

_log = Logger()

RETRY_AFTER_SECONDS = b"1"
_FORM_URLENCODED = b"application/x-www-form-urlencoded"
_MULTIPART = b"multipart/"

_STATUS_TEXT = {413: b"Request Entity Too Large"}


def error_body(error: str, **details: object) -> bytes:
    """The short JSON body of every error answer."""
    return json.dumps({"error": error, **details}, separators=(",", ":")).encode() + b"\n"


ACCEPTED_BODY = b'{"status":"accepted"}\n'


class IngestState:
    """What the request path needs to know about the server: the event
    queue, whether it is draining, and the settings it enforces."""

    def __init__(
        self,
        queue: DeferredQueue,
        metrics: Metrics,
        max_body_size: int,
        validate_json: bool,
        now_ms: Callable[[], int] = lambda: int(time.time() * 1000),
    ) -> None:
        self.queue = queue
        self.metrics = metrics
        self.max_body_size = max_body_size
        self.validate_json = validate_json
        self.now_ms = now_ms
        self.started = False
        self.draining = False
        self._codes: dict[int, object] = {}
        self._rejected = {
            reason: metrics.events_rejected.labels(reason=reason)
            for reason in (
                "too_large", "invalid_json", "queue_full", "unsupported_media_type",
                "shutting_down", "method_not_allowed", "not_found",
            )
        }

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
        child.inc()  # type: ignore[attr-defined]

    def count_rejected(self, reason: str) -> None:
        self._rejected[reason].inc()


class BoundedRequest(Request):
    """A Request that keeps at most the body limit in memory: a declared
    Content-Length over the limit is answered 413 before the body is read
    (and before `100 Continue`); a chunked body growing past it is cut off
    with 413 and the connection closed."""

    _parsePOSTFormSubmission = False
    _refused = False
    _received = 0
    _limit = 0

    def gotLength(self, length: Optional[int]) -> None:
        state: IngestState = self.channel.site.state
        self._limit = state.max_body_size
        self.content = BytesIO()
        if length is not None and length > self._limit:
            self._refuse_too_large(state)

    def handleContentChunk(self, data: bytes) -> None:
        if self._refused:
            return
        self._received += len(data)
        if self._received > self._limit:
            self._refuse_too_large(self.channel.site.state)
            return
        self.content.write(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self._refused:
            return
        super().requestReceived(command, path, version)

    def _refuse_too_large(self, state: IngestState) -> None:
        """Answer 413 straight on the transport and close: the request line
        and body were never processed, so Request.write cannot be used."""
        self._refused = True
        self.content = BytesIO()
        # Twisted sends `100 Continue` right after gotLength; it must not.
        self.requestHeaders.removeHeader(b"expect")
        body = error_body("too_large", max_bytes=self._limit)
        self.channel.transport.write(
            b"HTTP/1.1 413 Request Entity Too Large\r\n"
            b"Content-Type: application/json\r\n"
            b"Connection: close\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        state.count_response(413)
        state.count_rejected("too_large")
        self.channel.loseConnection()

    def finish(self) -> None:
        if not self.finished and not self._disconnected:
            self.channel.site.state.count_response(self.code)
        super().finish()

    def processingFailed(self, reason):  # type: ignore[no-untyped-def]
        """Log the failure and answer a JSON 500; never show a traceback."""
        _log.failure("unexpected error handling {method} {path}", failure=reason,
                     method=self.method, path=self.path)
        body = error_body("internal_error")
        self.setResponseCode(500)
        self.setHeader(b"content-type", b"application/json")
        self.setHeader(b"content-length", b"%d" % len(body))
        self.write(body)
        self.finish()
        return reason


def _answer(request: Request, code: int, body: bytes) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"application/json")
    return body


class CollectResource(Resource):
    """`POST /collect`: validate one event body and queue it without
    waiting; 503 at once when the queue is full or the server is stopping.

    Multipart bodies are refused (415). A body labelled as a URL-encoded form
    is taken as JSON when it is JSON (curl's `--data` sends that label) and
    refused with 415 otherwise; Twisted never parses either."""

    isLeaf = True

    def __init__(self, state: IngestState) -> None:
        super().__init__()
        self.state = state
        self._accepted = state.metrics.events_accepted

    def render(self, request: Request) -> bytes:
        state = self.state
        if request.method != b"POST":
            state.count_rejected("method_not_allowed")
            request.setHeader(b"allow", b"POST")
            return _answer(request, 405, error_body("method_not_allowed", allow="POST"))
        ctype = request.requestHeaders.getRawHeaders(b"content-type")
        media_type = ctype[0].split(b";", 1)[0].strip().lower() if ctype else b""
        if media_type.startswith(_MULTIPART):
            return self._unsupported(request)
        if state.draining:
            state.count_rejected("shutting_down")
            request.setHeader(b"retry-after", RETRY_AFTER_SECONDS)
            return _answer(request, 503, error_body("shutting_down"))
        body = request.content.getvalue()
        if state.validate_json or media_type == _FORM_URLENCODED:
            problem = body_error(body)
            if problem is not None and media_type == _FORM_URLENCODED:
                # `curl --data '{...}'` labels JSON as a form: accept that,
                # but a real form body is the wrong media type.
                return self._unsupported(request)
            if problem is not None and state.validate_json:
                state.count_rejected("invalid_json")
                return _answer(request, 400, error_body("invalid_json", detail=problem))
        try:
            state.queue.put((state.now_ms(), body))
        except QueueOverflow:
            state.count_rejected("queue_full")
            request.setHeader(b"retry-after", RETRY_AFTER_SECONDS)
            return _answer(request, 503, error_body("queue_full"))
        self._accepted.inc()
        return _answer(request, 202, ACCEPTED_BODY)

    def _unsupported(self, request: Request) -> bytes:
        self.state.count_rejected("unsupported_media_type")
        return _answer(request, 415, error_body(
            "unsupported_media_type", expected="application/json"))


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

    def render(self, request: Request) -> bytes:
        return self.fallback.render(request)


class IngestSite(Site):
    """The ingest listener's Site: bounded requests, no access log on the
    reactor thread, idle connections closed after a minute."""

    requestFactory = BoundedRequest
    displayTracebacks = False

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

    def log(self, request: Request) -> None:
        """No per-request access log: it would cost more than the request."""


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
