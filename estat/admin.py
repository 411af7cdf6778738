"""The admin listener on twisted.web: `/metrics` in the Prometheus text
format, `/healthz` and `/readyz`."""

from __future__ import annotations

from typing import Any, Callable, Optional

from twisted.web import http
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from estat.collect import HEALTHY, IngestState, readiness
from estat.http.response import Answer, error_body


class _Page(Resource):
    """An admin resource answering GET with an `Answer`."""

    isLeaf = True

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


class _NotFound(Resource):
    isLeaf = True

    def render(self, request: Request) -> bytes:
        request.setResponseCode(404)
        request.setHeader(b"content-type", b"application/json")
        return error_body("not_found")


class _AdminRoot(Resource):
    """Routes the admin listener's exact paths; everything else is 404."""

    isLeaf = True

    def __init__(self, routes: dict[bytes, Resource]) -> None:
        super().__init__()
        self.routes = {b"/" + path: resource for path, resource in routes.items()}
        self.fallback = _NotFound()

    def render(self, request: Request) -> Any:
        return self.routes.get(request.path, self.fallback).render(request)


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


class HealthResource(_Page):
    """`/healthz`: 200 while the process runs."""

    def __init__(self) -> None:
        super().__init__(lambda: HEALTHY)


class ReadyResource(_Page):
    """`/readyz`: see `readiness`."""

    def __init__(self, state: IngestState) -> None:
        super().__init__(lambda: readiness(state))


class AdminSite(Site):
    """An admin listener (`/metrics`, `/healthz`, `/readyz`) on twisted.web:
    `routes` maps each exact path, without its slash, to its resource."""

    displayTracebacks = False

    def __init__(self, routes: dict[bytes, Resource], reactor: Optional[Any] = None) -> None:
        super().__init__(_AdminRoot(routes), timeout=60.0, reactor=reactor)

    def log(self, request: http.Request) -> None:
        """Scrapes are not worth a log line each."""
