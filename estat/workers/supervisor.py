"""`--workers N`: one CPython process uses one core, so the parent binds the
tcp: listening sockets and supervises N worker processes that adopt them
(`adoptStreamPort`); the kernel spreads connections over the workers.

Each worker is a whole pipeline (queue, batcher, uploader) with its own
dead-letter subfolder `DLQ_DIR/w<i>` and host id `<HOST_ID>-w<i>`, so
object keys stay unique. The parent restarts a worker that dies, forwards
SIGTERM so every worker drains, and serves `/metrics` (every worker's
metrics with a `worker` label, scraped over a unix socket), `/healthz` and
`/readyz` (ready when every worker is).

Why not prometheus-client's multiprocess mode: it does not support callback
gauges (queue depths are read when scraped) nor per-process collectors, and
its mmap files need cleaning after a worker restart; scraping each worker
keeps every metric exact and per worker.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import sys
import tempfile
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.parser import text_string_to_metric_families
from twisted.application.service import Service
from twisted.internet import endpoints
from twisted.internet.defer import Deferred, DeferredList, inlineCallbacks
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from estat.admin import AdminSite, HealthResource
from estat.config import ConfigError, Settings
from estat.service import ignore_further_signals

_log = Logger()

SETTINGS_ENV = "ESTAT_WORKER_SETTINGS"
RESTART_DELAY_MAX = 30.0


def tcp_listen_address(description: str) -> tuple[int, str, int, int]:
    """(family, interface, port, backlog) of a tcp: endpoint description;
    ConfigError for any other kind, which workers cannot share."""
    from twisted.internet import reactor

    endpoint = endpoints.serverFromString(reactor, description)
    if isinstance(endpoint, endpoints.TCP6ServerEndpoint):
        family = socket.AF_INET6
    elif isinstance(endpoint, endpoints.TCP4ServerEndpoint):
        family = socket.AF_INET
    else:
        raise ConfigError(f"WORKERS > 1 needs tcp: LISTEN endpoints; {description!r} is not one "
                          "(run one process per port, or put TLS in front).")
    interface = endpoint._interface or ("::" if family == socket.AF_INET6 else "0.0.0.0")
    return family, interface, endpoint._port, endpoint._backlog


def bind_listening_socket(description: str) -> tuple[socket.socket, int]:
    family, interface, port, backlog = tcp_listen_address(description)
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((interface, port))
    sock.listen(backlog)
    sock.setblocking(False)
    return sock, family


def worker_settings(settings: Settings, index: int, runtime_dir: str) -> Settings:
    """The settings of worker `index`: its own host id, dead-letter
    subfolder and admin socket; one process, no further workers."""
    return dataclasses.replace(
        settings,
        host_id=f"{settings.host_id}-w{index}",
        dlq_dir=os.path.join(settings.dlq_dir, f"w{index}"),
        admin_listen=f"unix:{admin_socket(runtime_dir, index)}:mode=600",
        workers=1,
    )


def admin_socket(runtime_dir: str, index: int) -> str:
    return os.path.join(runtime_dir, f"w{index}.sock")


class _WorkerProtocol(ProcessProtocol):
    def __init__(self, supervisor: "WorkerSupervisor", index: int) -> None:
        self.supervisor = supervisor
        self.index = index
        self.ended: Deferred[None] = Deferred()

    def processEnded(self, reason: Failure) -> None:
        self.ended.callback(None)
        self.supervisor.worker_ended(self, reason)


class WorkerSupervisor(Service):
    """The parent process of `--workers N` (see the module docstring)."""

    def __init__(self, settings: Settings, reactor: Any) -> None:
        self.settings = settings
        self.reactor = reactor
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        self.restarts = Counter("estat_worker_restarts", "Workers restarted after dying",
                                registry=self.registry)
        self.alive = Gauge("estat_workers_alive", "Worker processes running",
                           registry=self.registry)
        self.alive.set_function(lambda: len(self.workers))
        self.sockets: list[tuple[socket.socket, int]] = []
        self.workers: dict[int, Any] = {}
        self._protocols: dict[int, _WorkerProtocol] = {}
        self._delays: dict[int, float] = {}
        self.stopping = False
        self.runtime_dir = ""
        self.admin_port: Any = None
        self._agent: Any = None

    def startService(self) -> None:
        super().startService()
        self.runtime_dir = tempfile.mkdtemp(prefix="estat-workers-")
        for description in self.settings.listen:
            self.sockets.append(bind_listening_socket(description))
        for index in range(self.settings.workers):
            self._spawn(index)
        site = AdminSite({
            b"metrics": AggregatedMetrics(self),
            b"healthz": HealthResource(),
            b"readyz": AllWorkersReady(self),
        }, reactor=self.reactor)
        d = endpoints.serverFromString(self.reactor, self.settings.admin_listen).listen(site)
        d.addCallback(lambda port: setattr(self, "admin_port", port))
        d.addErrback(self._cannot_start)
        self._forward_sighup()
        _log.info("supervising {workers} workers on {listen}", workers=self.settings.workers,
                  listen=", ".join(self.settings.listen))

    def _forward_sighup(self) -> None:
        """SIGHUP (systemctl reload) reaches every worker, which reloads its
        write keys; the parent itself must not die of it."""
        import signal

        def on_sighup(signum: int, frame: object) -> None:
            self.reactor.callFromThread(self._signal_workers, "HUP")

        signal.signal(signal.SIGHUP, on_sighup)

    def _signal_workers(self, name: str) -> None:
        _log.info("forwarding SIG{name} to {count} workers", name=name, count=len(self.workers))
        for process in list(self.workers.values()):
            try:
                process.signalProcess(name)
            except Exception:  # already gone
                pass

    def _cannot_start(self, failure: Failure) -> None:
        _log.critical("cannot start: {error}; stopping", error=str(failure.value))
        self.reactor.stop()

    def _spawn(self, index: int) -> None:
        settings = worker_settings(self.settings, index, self.runtime_dir)
        payload = dataclasses.asdict(settings)
        payload["listen"] = list(settings.listen)
        env = dict(os.environ)
        env[SETTINGS_ENV] = json.dumps(payload)
        child_fds: dict[int, Any] = {0: "w", 1: 1, 2: 2}
        ports = []
        for offset, (sock, family) in enumerate(self.sockets):
            child_fds[3 + offset] = sock.fileno()
            ports.append(f"{3 + offset}:{int(family)}")
        protocol = _WorkerProtocol(self, index)
        argv = [sys.executable, "-m", "estat.workers.supervisor", str(index), ",".join(ports)]
        self.workers[index] = self.reactor.spawnProcess(
            protocol, sys.executable, argv, env=env, childFDs=child_fds)
        self._protocols[index] = protocol

    def worker_ended(self, protocol: _WorkerProtocol, reason: Failure) -> None:
        index = protocol.index
        self.workers.pop(index, None)
        self._protocols.pop(index, None)
        if self.stopping:
            return
        delay = min(RESTART_DELAY_MAX, self._delays.get(index, 0.5) * 2)
        self._delays[index] = delay
        self.restarts.inc()
        _log.error("worker {index} exited ({reason}); restarting it in {delay}s",
                   index=index, reason=str(reason.value), delay=delay)
        self.reactor.callLater(delay, self._respawn, index)

    def _respawn(self, index: int) -> None:
        if not self.stopping and index not in self.workers:
            self._spawn(index)

    def stopService(self) -> "Deferred[None]":
        super().stopService()
        return self._stop()

    @inlineCallbacks
    def _stop(self):  # type: ignore[no-untyped-def]
        """SIGTERM every worker (each drains as a single server does) and
        wait; one still running long after SHUTDOWN_TIMEOUT is killed."""
        self.stopping = True
        ignore_further_signals(self.settings.shutdown_timeout)
        endings = [p.ended for p in self._protocols.values()]
        for index, process in list(self.workers.items()):
            try:
                process.signalProcess("TERM")
            except Exception:  # already gone
                pass
        # The workers hold the only other copies: once each stops listening,
        # new connections are refused instead of waiting in the backlog.
        for sock, _ in self.sockets:
            sock.close()
        self.sockets = []
        killer = self.reactor.callLater(self.settings.shutdown_timeout + 15, self._kill_all)
        yield DeferredList(endings)
        if killer.active():
            killer.cancel()
        if self.admin_port is not None:
            yield self.admin_port.stopListening()
        shutil.rmtree(self.runtime_dir, ignore_errors=True)
        _log.info("all workers stopped")

    def _kill_all(self) -> None:
        for index, process in list(self.workers.items()):
            _log.critical("worker {index} did not stop within SHUTDOWN_TIMEOUT + 15s; killing "
                          "it (what it held in memory is lost)", index=index)
            try:
                process.signalProcess("KILL")
            except Exception:
                pass

    def fetch(self, index: int, path: bytes) -> "Deferred[tuple[int, bytes]]":
        """GET `path` from worker `index`'s admin socket."""
        from twisted.web.client import readBody

        if self._agent is None:
            self._agent = self._make_agent()
        d = self._agent.request(b"GET", b"http://w%d%s" % (index, path))
        d.addCallback(lambda response: readBody(response).addCallback(
            lambda body: (response.code, body)))
        timeout = self.reactor.callLater(5, d.cancel)
        d.addBoth(lambda result: (timeout.active() and timeout.cancel(), result)[1])
        return d


    def _make_agent(self) -> Any:
        """An HTTP agent whose `http://w<i>/…` URLs reach worker i's socket."""
        from twisted.internet.endpoints import UNIXClientEndpoint
        from twisted.web.client import Agent

        from estat.stores.httpclient import quiet_connection_pool

        supervisor = self

        class WorkerSockets:
            def endpointForURI(self, uri: Any) -> Any:
                index = int(uri.host.decode()[1:])
                return UNIXClientEndpoint(
                    supervisor.reactor, admin_socket(supervisor.runtime_dir, index), timeout=2)

        pool = quiet_connection_pool(self.reactor, persistent=False)
        return Agent.usingEndpointFactory(self.reactor, WorkerSockets(), pool=pool)


class AggregatedMetrics(Resource):
    """`/metrics` of the parent: its own metrics plus every worker's, each
    sample labelled with its worker."""

    isLeaf = True

    def __init__(self, supervisor: WorkerSupervisor) -> None:
        super().__init__()
        self.supervisor = supervisor

    def render_GET(self, request: Request) -> Any:
        indexes = sorted(self.supervisor.workers)
        fetches = [self.supervisor.fetch(i, b"/metrics") for i in indexes]
        d = DeferredList(fetches, consumeErrors=True)
        d.addCallback(lambda results: self._write(request, indexes, results))
        return NOT_DONE_YET

    def _write(self, request: Request, indexes: list[int], results: list[Any]) -> None:
        texts = {index: result[1] for index, (ok, result) in zip(indexes, results)
                 if ok and result[0] == 200}
        body = generate_latest(self.supervisor.registry) + merge_worker_metrics(texts)
        request.setHeader(b"content-type", b"text/plain; version=0.0.4; charset=utf-8")
        request.write(body)
        request.finish()


def merge_worker_metrics(texts: dict[int, bytes]) -> bytes:
    """Worker expositions as one, with a `worker` label on every sample."""
    families: dict[str, Any] = {}
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

    class _Collector:
        def collect(self) -> Any:
            return families.values()

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector())  # type: ignore[arg-type]
    return generate_latest(registry)


class AllWorkersReady(Resource):
    """`/readyz` of the parent: 200 when every worker answers 200."""

    isLeaf = True

    def __init__(self, supervisor: WorkerSupervisor) -> None:
        super().__init__()
        self.supervisor = supervisor

    def render_GET(self, request: Request) -> Any:
        supervisor = self.supervisor
        indexes = sorted(supervisor.workers)
        if supervisor.stopping or len(indexes) < supervisor.settings.workers:
            return self._answer(request, False)
        d = DeferredList([supervisor.fetch(i, b"/readyz") for i in indexes],
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


def run_worker(index: int, ports: str) -> None:
    """A worker process: the full pipeline on the inherited sockets; stops
    on SIGTERM, or when the parent goes away (stdin closes)."""
    from twisted.internet import reactor, stdio
    from twisted.internet.protocol import Protocol
    from twisted.logger import globalLogBeginner, textFileLogObserver

    from estat.service import IngestService, build

    payload = json.loads(os.environ.pop(SETTINGS_ENV))
    payload["listen"] = tuple(payload["listen"])
    settings = Settings(**payload)
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)],
                                     redirectStandardIO=False)
    inherited = [(int(fd), int(family)) for fd, family in
                 (item.split(":") for item in ports.split(",") if item)]
    ingest_reactor: Any = reactor  # provides every interface IIngestReactor names
    service = IngestService(build(settings, ingest_reactor), own_signals=True,
                            inherited_ports=inherited)

    class _ParentWatch(Protocol):
        def connectionLost(self, reason: Any = None) -> None:
            if reactor.running:
                _log.warn("worker {index}: the parent went away; stopping", index=index)
                reactor.stop()

    stdio.StandardIO(_ParentWatch())
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    reactor.callWhenRunning(service.startService)
    reactor.run()


if __name__ == "__main__":
    run_worker(int(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "")
