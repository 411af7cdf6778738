"""The admin listener on twisted.web: `/metrics` in the Prometheus text
format, `/healthz` and `/readyz`.

Each page is a child of the site's root (`putChild`); a page has no
children of its own, so any other path, `/metrics/` included, is a JSON
404 rather than Twisted's HTML one."""

from __future__ import annotations

from typing import Any, Callable, Optional

from twisted.internet.interfaces import IReactorTime
from twisted.web import http
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request, Site

from estat.collect import HEALTHY, IngestState, readiness
from estat.http.response import Answer, error_body


class NotFound(Resource):
    """A JSON 404 for every method and every path below."""

    isLeaf = True

    def render(self, request: Request) -> bytes:
        request.setResponseCode(404)
        request.setHeader(b"content-type", b"application/json")
        return error_body("not_found")


NOT_FOUND = NotFound()


class AdminPage(Resource):
    """A resource that answers only at its own path: every path below it
    is the JSON 404 (`isLeaf` would have it answer `/metrics/x` too)."""

    def getChild(self, path: bytes, request: Request) -> IResource:
        return NOT_FOUND


class _AnswerPage(AdminPage):
    """An admin page answering GET with an `Answer`."""

    def __init__(self, answer: Callable[[], Answer]) -> None:
        super().__init__()
        self.answer = answer

    def render_GET(self, request: Request) -> bytes:
        answer = self.answer()
        request.setResponseCode(answer.code)
        request.setHeader(b"content-type", b"application/json")
        for name, value in answer.headers:
            request.setHeader(name, value)
        return answer.body


class MetricsPage(AdminPage):
    """`/metrics` in the Prometheus text format, rendered on the reactor
    thread (prometheus-client's own resource is WSGI on the global thread
    pool, and cannot answer over a unix socket)."""

    def __init__(self, registry: Any) -> None:
        super().__init__()
        self.registry = registry

    def render_GET(self, request: Request) -> bytes:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode())
        return generate_latest(self.registry)


class HealthResource(_AnswerPage):
    """`/healthz`: 200 while the process runs."""

    def __init__(self) -> None:
        super().__init__(lambda: HEALTHY)


class ReadyResource(_AnswerPage):
    """`/readyz`: see `readiness`."""

    def __init__(self, state: IngestState) -> None:
        super().__init__(lambda: readiness(state))


class AdminSite(Site):
    """An admin listener (`/metrics`, `/healthz`, `/readyz`) on twisted.web:
    `routes` maps each exact path, without its slash, to its resource (an
    `AdminPage`, so that nothing below it answers)."""

    displayTracebacks = False

    def __init__(self, routes: dict[bytes, Resource],
                 reactor: Optional[IReactorTime] = None) -> None:
        root = AdminPage()  # "/" itself is a 404 too: its child b"" is missing
        for path, resource in routes.items():
            root.putChild(path, resource)
        super().__init__(root, timeout=60.0, reactor=reactor)

    def log(self, request: http.Request) -> None:
        """Scrapes are not worth a log line each."""
