"""The admin listener of the parent of `--workers N`: `/metrics` is its own
metrics plus every worker's, each sample labelled with its worker,
`/healthz` is the parent's, and `/readyz` is 200 only when every worker's
is. The parent reads each worker's pages from the admin socket the worker
listens on, `<runtime dir>/w<i>.sock`.

Why not prometheus-client's multiprocess mode: it does not support callback
gauges (queue depths are read when scraped) nor per-process collectors, and
its mmap files need cleaning after a worker restart; scraping each worker
keeps every metric exact and per worker.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Iterable, Protocol

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.interfaces import IReactorTime, IReactorUNIX, IStreamClientEndpoint
from twisted.web.client import Agent, readBody
from twisted.web.iweb import IAgentEndpointFactory
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from estat.admin import AdminPage, AdminSite, HealthResource
from estat.stores.httpclient import quiet_connection_pool

# How long the parent waits for one worker's page before leaving it out.
FETCH_TIMEOUT = 5.0
CONNECT_TIMEOUT = 2

Results = list[tuple[bool, Any]]


def admin_socket(runtime_dir: str, index: int) -> str:
    """The path of worker `index`'s admin socket."""
    return os.path.join(runtime_dir, f"w{index}.sock")


class Workers(Protocol):
    """What the parent's admin pages need of the supervisor."""

    def indexes(self) -> list[int]:
        """The indexes of the workers running now, in order."""

    def all_running(self) -> bool:
        """Every configured worker runs, and no stop has begun."""

    def fetch(self, index: int, path: bytes) -> "Deferred[tuple[int, bytes]]":
        """(status, body) of a GET of `path` from worker `index`."""


@implementer(IAgentEndpointFactory)
class WorkerSockets:
    """Endpoints for an `Agent`: `http://w<i>/…` reaches worker i's admin
    socket, whatever the runtime directory is when the request is made."""

    def __init__(self, reactor: IReactorUNIX, socket_path: Callable[[int], str]) -> None:
        self.reactor = reactor
        self.socket_path = socket_path

    def endpointForURI(self, uri: Any) -> IStreamClientEndpoint:
        index = int(uri.host.decode()[1:])
        return UNIXClientEndpoint(self.reactor, self.socket_path(index),
                                  timeout=CONNECT_TIMEOUT)


class WorkerPages:
    """GETs pages of the workers' admin listeners, one connection each
    (a worker that restarts has a new socket)."""

    def __init__(self, reactor: IReactorUNIX, socket_path: Callable[[int], str]) -> None:
        self.clock = IReactorTime(reactor)
        pool = quiet_connection_pool(self.clock, persistent=False)
        self.agent = Agent.usingEndpointFactory(
            reactor, WorkerSockets(reactor, socket_path), pool=pool)

    def fetch(self, index: int, path: bytes) -> "Deferred[tuple[int, bytes]]":
        """(status, body) of `path` from worker `index`; fails after
        FETCH_TIMEOUT seconds."""
        d = Deferred.fromCoroutine(self._get(index, path))
        return d.addTimeout(FETCH_TIMEOUT, self.clock)

    async def _get(self, index: int, path: bytes) -> tuple[int, bytes]:
        response = await self.agent.request(b"GET", b"http://w%d%s" % (index, path))
        body = await readBody(response)
        return response.code, body


class AggregatedMetrics(AdminPage):
    """`/metrics` of the parent: its own `registry` plus every worker's
    metrics, each sample labelled with its worker; a worker that does not
    answer is left out."""

    def __init__(self, registry: CollectorRegistry, workers: Workers) -> None:
        super().__init__()
        self.registry = registry
        self.workers = workers

    def render_GET(self, request: Request) -> Any:
        indexes = self.workers.indexes()
        fetches = [self.workers.fetch(i, b"/metrics") for i in indexes]
        d = DeferredList(fetches, consumeErrors=True)
        d.addCallback(lambda results: self._write(request, indexes, results))
        return NOT_DONE_YET

    def _write(self, request: Request, indexes: list[int], results: Results) -> None:
        texts = {index: result[1] for index, (ok, result) in zip(indexes, results)
                 if ok and result[0] == 200}
        body = generate_latest(self.registry) + merge_worker_metrics(texts)
        request.setHeader(b"content-type", b"text/plain; version=0.0.4; charset=utf-8")
        request.write(body)
        request.finish()


class MetricFamilies:
    """A prometheus-client collector that yields metric families already
    built (here: parsed from the workers' pages)."""

    def __init__(self, families: Iterable[Metric]) -> None:
        self.families = list(families)

    def collect(self) -> Iterable[Metric]:
        return self.families


def merge_worker_metrics(texts: dict[int, bytes]) -> bytes:
    """Worker expositions as one, with a `worker` label on every sample:
    each family once (its HELP and TYPE from the first worker that has
    it), then every worker's samples."""
    families: dict[str, Metric] = {}
    for index, text in sorted(texts.items()):
        for family in text_string_to_metric_families(text.decode("utf-8")):
            samples = family.samples
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = family
                merged.samples = []
            for sample in samples:
                merged.samples.append(sample._replace(
                    labels={**sample.labels, "worker": str(index)}))
    registry = CollectorRegistry(auto_describe=False)
    registry.register(MetricFamilies(families.values()))
    return generate_latest(registry)


class AllWorkersReady(AdminPage):
    """`/readyz` of the parent: 200 when every worker answers 200."""

    def __init__(self, workers: Workers) -> None:
        super().__init__()
        self.workers = workers

    def render_GET(self, request: Request) -> Any:
        if not self.workers.all_running():
            return self._answer(request, False)
        d = DeferredList([self.workers.fetch(i, b"/readyz") for i in self.workers.indexes()],
                         consumeErrors=True)
        d.addCallback(lambda results: self._answer(
            request, all(ok and result[0] == 200 for ok, result in results), deferred=True))
        return NOT_DONE_YET

    def _answer(self, request: Request, ready: bool, deferred: bool = False) -> Any:
        request.setResponseCode(200 if ready else 503)
        request.setHeader(b"content-type", b"application/json")
        body = b'{"status":"ready"}\n' if ready else b'{"error":"not_ready"}\n'
        if not deferred:
            return body
        request.write(body)
        request.finish()
        return None


def parent_admin_site(registry: CollectorRegistry, workers: Workers,
                      reactor: IReactorTime) -> AdminSite:
    """The parent's admin site: `AdminSite` with the pages above."""
    return AdminSite({
        b"metrics": AggregatedMetrics(registry, workers),
        b"healthz": HealthResource(),
        b"readyz": AllWorkersReady(workers),
    }, reactor=reactor)
