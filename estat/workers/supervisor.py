"""`--workers N`: one CPython process uses one core, so the parent binds the
tcp: listening sockets and supervises N worker processes that adopt them
(`adoptStreamPort`); the kernel spreads connections over the workers.

Each worker (estat.workers.child) is a whole pipeline with its own
dead-letter subfolder `DLQ_DIR/w<i>` and host id `<HOST_ID>-w<i>`, so
object keys stay unique. The parent restarts a worker that dies, forwards
SIGTERM and SIGHUP to every worker, and serves the admin pages that cover
them all (estat.workers.admin).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import socket
import tempfile
from typing import Any, NamedTuple, Optional

from prometheus_client import CollectorRegistry, Counter, Gauge, ProcessCollector
from twisted.application.service import Service
from twisted.internet import endpoints
from twisted.internet.abstract import isIPv6Address
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import (
    IListeningPort,
    IProcessTransport,
    IProtocolFactory,
    IReactorFromThreads,
    IReactorProcess,
    IReactorTime,
    IReactorUNIX,
)
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from estat.config import ConfigError, Settings
from estat.signals import ignore_further_signals
from estat.workers.admin import WorkerPages, admin_socket, parent_admin_site
from estat.workers.child import SETTINGS_ENV, encode_settings, worker_argv

_log = Logger()

RESTART_DELAY_MAX = 30.0
# How long after SHUTDOWN_TIMEOUT a worker still stopping is killed.
KILL_GRACE = 15.0


class ListenAddress(NamedTuple):
    """Where a tcp: endpoint description listens."""

    family: int
    interface: str
    port: int
    backlog: int


# The positional arguments of each kind, in Twisted's order, and the default
# interface (Twisted's endpoints.serverFromString takes the same forms).
_TCP_KINDS = {
    "tcp": (("port", "interface", "backlog"), "0.0.0.0"),
    "tcp6": (("port", "backlog", "interface"), "::"),
}


def _fields(description: str) -> list[list[str]]:
    """`description` split at each ':', and each part at each '=', as
    Twisted's endpoint strings are; a backslash escapes the next character."""
    fields = [[""]]
    chars = iter(description)
    for char in chars:
        if char == "\\":
            fields[-1][-1] += next(chars, "")
        elif char == ":":
            fields.append([""])
        elif char == "=":
            fields[-1].append("")
        else:
            fields[-1][-1] += char
    return fields


def tcp_listen_address(description: str) -> ListenAddress:
    """Where a tcp: or tcp6: endpoint description listens (`tcp:PORT`, with
    `interface=` and `backlog=`, or all three as keywords or in order);
    ConfigError for any other kind, which workers cannot share."""
    kind, *rest = _fields(description)
    if len(kind) != 1 or kind[0] not in _TCP_KINDS:
        raise ConfigError(f"WORKERS > 1 needs tcp: LISTEN endpoints; {description!r} is not one "
                          "(run one process per port, or put TLS in front).")
    names, default_interface = _TCP_KINDS[kind[0]]
    positional = [field[0] for field in rest if len(field) == 1]
    values = dict(zip(names, positional))
    keywords = [field for field in rest if len(field) != 1]
    problem = None
    if len(positional) > len(names):
        problem = "too many arguments"
    for field in keywords:
        if len(field) != 2 or field[0] not in names or field[0] in values:
            problem = f"unexpected {'='.join(field)!r}"
        else:
            values[field[0]] = field[1]
    if problem is None and "port" not in values:
        problem = "no port"
    if problem is None and not all(values.get(name, "0").isdigit()
                                   for name in ("port", "backlog")):
        problem = "the port and the backlog are numbers"
    if problem is not None:
        raise ConfigError(f"LISTEN {description!r} is not a tcp: endpoint such as "
                          f"tcp:8080:interface=127.0.0.1 ({problem}).")
    interface = values.get("interface") or default_interface
    family = (socket.AF_INET6 if kind[0] == "tcp6" or isIPv6Address(interface)
              else socket.AF_INET)
    return ListenAddress(family, interface, int(values["port"]), int(values.get("backlog", 50)))


def bind_listening_socket(description: str) -> tuple[socket.socket, int]:
    """A non-blocking socket listening where `description` says, and its
    address family, for the workers to adopt; CannotListenError if the
    address cannot be bound."""
    address = tcp_listen_address(description)
    sock = socket.socket(address.family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((address.interface, address.port))
    except OSError as error:  # as Twisted's listenTCP says it
        sock.close()
        raise CannotListenError(address.interface, address.port, error) from None
    sock.listen(address.backlog)
    sock.setblocking(False)
    return sock, address.family


def listen_at_once(reactor: Any, description: str, factory: IProtocolFactory) -> IListeningPort:
    """Listen on endpoint `description`, raising what stops it from
    listening: tcp:, unix: and the other stream endpoints that come with
    Twisted listen before `listen` returns. (`reactor` is whatever the
    endpoint needs: IReactorTCP for tcp:, IReactorUNIX for unix:, ...)"""
    outcome: list[Any] = []
    listening = endpoints.serverFromString(reactor, description).listen(factory)
    listening.addBoth(outcome.append)
    if not outcome:
        listening.cancel()
        raise ConfigError(f"{description!r} does not listen at once; use tcp: or unix:.")
    if isinstance(outcome[0], Failure):
        outcome[0].raiseException()
    port: IListeningPort = outcome[0]
    return port


def worker_settings(settings: Settings, index: int, runtime_dir: str) -> Settings:
    """The settings of worker `index`: its own host id, dead-letter and
    write-ahead log subfolders and admin socket; one process, no further workers."""
    return dataclasses.replace(
        settings,
        host_id=f"{settings.host_id}-w{index}",
        dlq_dir=os.path.join(settings.dlq_dir, f"w{index}"),
        wal_dir=os.path.join(settings.wal_dir, f"w{index}"),
        admin_listen=f"unix:{admin_socket(runtime_dir, index)}:mode=600",
        workers=1,
    )


class WorkerProtocol(ProcessProtocol):
    """Tells the supervisor when worker `index` has ended; `ended` fires
    then too."""

    def __init__(self, supervisor: "WorkerSupervisor", index: int) -> None:
        self.supervisor = supervisor
        self.index = index
        self.ended: Deferred[None] = Deferred()

    def processEnded(self, reason: Failure) -> None:
        self.ended.callback(None)
        self.supervisor.worker_ended(self, reason)


class WorkerSupervisor(Service):
    """The parent process of `--workers N` (see the module docstring).

    `privilegedStartService` binds the listening sockets and the admin
    listener, before twistd drops `--uid/--gid`; `startService` then starts
    the workers, which so run as the unprivileged user. A failure to bind
    is raised to twistd, which reports it and exits."""

    def __init__(self, settings: Settings, reactor: IReactorProcess) -> None:
        self.settings = settings
        self.reactor = reactor
        self.clock = IReactorTime(reactor)
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        self.restarts = Counter("estat_worker_restarts", "Workers restarted after dying",
                                registry=self.registry)
        self.alive = Gauge("estat_workers_alive", "Worker processes running",
                           registry=self.registry)
        self.alive.set_function(lambda: len(self.workers))
        self.sockets: list[tuple[socket.socket, int]] = []
        self.workers: dict[int, IProcessTransport] = {}
        self._protocols: dict[int, WorkerProtocol] = {}
        self._delays: dict[int, float] = {}
        self.stopping = False
        self.runtime_dir = ""
        self.admin_port: Optional[IListeningPort] = None
        self.pages = WorkerPages(IReactorUNIX(reactor),
                                 lambda index: admin_socket(self.runtime_dir, index))

    # What the admin pages read (estat.workers.admin.Workers).

    def indexes(self) -> list[int]:
        return sorted(self.workers)

    def all_running(self) -> bool:
        return not self.stopping and len(self.workers) >= self.settings.workers

    def fetch(self, index: int, path: bytes) -> "Deferred[tuple[int, bytes]]":
        return self.pages.fetch(index, path)

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        for description in self.settings.listen:
            self.sockets.append(bind_listening_socket(description))
        site = parent_admin_site(self.registry, self, self.clock)
        self.admin_port = listen_at_once(self.reactor, self.settings.admin_listen, site)

    def startService(self) -> None:
        if self.admin_port is None:  # not started by twistd
            self.privilegedStartService()
        super().startService()
        # Made now, as the user the workers run as: they create their
        # admin sockets in it.
        self.runtime_dir = tempfile.mkdtemp(prefix="estat-workers-")
        for index in range(self.settings.workers):
            self._spawn(index)
        self._forward_sighup()
        _log.info("supervising {workers} workers on {listen}", workers=self.settings.workers,
                  listen=", ".join(self.settings.listen))

    def _forward_sighup(self) -> None:
        """SIGHUP (systemctl reload) reaches every worker, which reloads its
        write keys; the parent itself must not die of it."""
        threads = IReactorFromThreads(self.reactor)

        def on_sighup(signum: int, frame: object) -> None:
            threads.callFromThread(self._signal_workers, "HUP")

        signal.signal(signal.SIGHUP, on_sighup)

    def _signal_workers(self, name: str) -> None:
        _log.info("forwarding SIG{name} to {count} workers", name=name, count=len(self.workers))
        self._signal_all(name)

    def _signal_all(self, name: str) -> None:
        for process in list(self.workers.values()):
            try:
                process.signalProcess(name)
            except Exception:  # already gone
                pass

    def _spawn(self, index: int) -> None:
        env = dict(os.environ)
        env[SETTINGS_ENV] = encode_settings(worker_settings(self.settings, index, self.runtime_dir))
        # fd 0 is a pipe the parent never writes to: see child.ParentWatch.
        child_fds: dict[int, Any] = {0: "w", 1: 1, 2: 2}
        ports = []
        for offset, (sock, family) in enumerate(self.sockets):
            child_fds[3 + offset] = sock.fileno()
            ports.append((3 + offset, int(family)))
        protocol = WorkerProtocol(self, index)
        argv = worker_argv(index, ports)
        self.workers[index] = self.reactor.spawnProcess(
            protocol, argv[0], argv, env=env, childFDs=child_fds)
        self._protocols[index] = protocol

    def worker_ended(self, protocol: WorkerProtocol, reason: Failure) -> None:
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
        self.clock.callLater(delay, self._respawn, index)

    def _respawn(self, index: int) -> None:
        if not self.stopping and index not in self.workers:
            self._spawn(index)

    def stopService(self) -> "Deferred[None]":
        super().stopService()
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        """SIGTERM every worker (each drains as a single server does) and
        wait; one still running KILL_GRACE after DRAIN_DELAY + SHUTDOWN_TIMEOUT is killed."""
        self.stopping = True
        ignore_further_signals(self.settings.shutdown_timeout)
        endings = [p.ended for p in self._protocols.values()]
        self._signal_all("TERM")
        # The workers hold the only other copies: once each stops listening,
        # new connections are refused instead of waiting in the backlog.
        for sock, _ in self.sockets:
            sock.close()
        self.sockets = []
        # Each worker first serves DRAIN_DELAY seconds more, unready.
        killer = self.clock.callLater(self.settings.drain_delay
                                      + self.settings.shutdown_timeout + KILL_GRACE,
                                      self._kill_all)
        await DeferredList(endings)
        if killer.active():
            killer.cancel()
        if self.admin_port is not None:
            await maybeDeferred(self.admin_port.stopListening)
        shutil.rmtree(self.runtime_dir, ignore_errors=True)
        _log.info("all workers stopped")

    def _kill_all(self) -> None:
        for index in self.workers:
            _log.critical("worker {index} did not stop within DRAIN_DELAY + "
                          "SHUTDOWN_TIMEOUT + {grace:g}s; "
                          "killing it (what it held in memory is lost)", index=index,
                          grace=KILL_GRACE)
        self._signal_all("KILL")
