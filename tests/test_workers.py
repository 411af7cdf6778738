"""`--workers N` in process: parsing tcp: descriptions, the parent's start
and stop on a fake reactor, and the parent's admin pages over fake
workers."""

from __future__ import annotations

import json
import os
import signal
import socket
from typing import Any, Callable, Optional

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import CannotListenError, ProcessTerminated
from twisted.internet.interfaces import IReactorFromThreads, IReactorProcess
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from estat.config import ConfigError, Settings
from estat.workers.admin import merge_worker_metrics, parent_admin_site
from estat.workers.child import MODULE, SETTINGS_ENV, decode_settings, parse_ports
from estat.workers.supervisor import WorkerSupervisor, tcp_listen_address
from tests.support import site_get


class TcpListenAddressTests(TestCase):
    def test_the_forms_twisted_accepts(self) -> None:
        for description, expected in (
                ("tcp:8080", (socket.AF_INET, "0.0.0.0", 8080, 50)),
                ("tcp:8080:interface=127.0.0.1:backlog=128",
                 (socket.AF_INET, "127.0.0.1", 8080, 128)),
                ("tcp:backlog=7:port=81", (socket.AF_INET, "0.0.0.0", 81, 7)),
                ("tcp:81:127.0.0.1:9", (socket.AF_INET, "127.0.0.1", 81, 9)),
                ("tcp6:8080", (socket.AF_INET6, "::", 8080, 50)),
                ("tcp6:81:9:\\:\\:1", (socket.AF_INET6, "::1", 81, 9)),
                ("tcp:8080:interface=\\:\\:1", (socket.AF_INET6, "::1", 8080, 50))):
            self.assertEqual(tcp_listen_address(description), expected, description)

    def test_other_kinds_are_refused_in_one_sentence(self) -> None:
        for description in ("unix:/tmp/x.sock", "ssl:443:privateKey=k.pem",
                            "systemd:domain=INET:index=0", "tcp4:80"):
            with self.assertRaises(ConfigError, msg=description) as caught:
                tcp_listen_address(description)
            self.assertIn("WORKERS > 1 needs tcp: LISTEN endpoints", str(caught.exception))

    def test_malformed_tcp_descriptions_are_refused(self) -> None:
        for description, problem in (
                ("tcp", "no port"),
                ("tcp:", "numbers"),
                ("tcp:interface=127.0.0.1", "no port"),
                ("tcp:http", "numbers"),
                ("tcp:80:backlog=x", "numbers"),
                ("tcp:80:mode=600", "unexpected 'mode=600'"),
                ("tcp:80:port=81", "unexpected 'port=81'"),
                ("tcp:80:127.0.0.1:50:extra", "too many arguments")):
            with self.assertRaises(ConfigError, msg=description) as caught:
                tcp_listen_address(description)
            self.assertIn(problem, str(caught.exception), description)


class FakeProcess:
    """A spawned worker: records signals; `end` makes it exit."""

    def __init__(self, protocol: ProcessProtocol, argv: list[str], env: dict[str, str],
                 child_fds: dict[int, Any]) -> None:
        self.protocol = protocol
        self.argv = argv
        self.env = env
        self.child_fds = child_fds
        self.signals: list[str] = []

    def signalProcess(self, name: str) -> None:
        self.signals.append(name)

    def end(self) -> None:
        self.protocol.processEnded(Failure(ProcessTerminated(signal=15)))


@implementer(IReactorProcess, IReactorFromThreads)
class ProcessReactor(MemoryReactorClock):
    """A memory reactor that spawns `FakeProcess`es."""

    def __init__(self, refuse_to_listen: bool = False) -> None:
        super().__init__()
        self.spawned: list[FakeProcess] = []
        self.refuse_to_listen = refuse_to_listen

    def spawnProcess(self, processProtocol: ProcessProtocol, executable: str,
                     args: Any = (), env: Any = None, path: Any = None, uid: Any = None,
                     gid: Any = None, usePTY: Any = False, childFDs: Any = None) -> Any:
        process = FakeProcess(processProtocol, list(args), dict(env or {}), dict(childFDs or {}))
        self.spawned.append(process)
        return process

    def listenTCP(self, port: int, factory: Any, backlog: int = 50, interface: str = "") -> Any:
        if self.refuse_to_listen:
            raise CannotListenError(interface, port, OSError("address in use"))
        return super().listenTCP(port, factory, backlog, interface)

    def callFromThread(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        f(*args, **kwargs)


class SupervisorTests(TestCase):
    def setUp(self) -> None:
        # The supervisor sets SIGHUP, SIGTERM and SIGINT handlers, as a
        # process of its own would: give trial its own back afterwards.
        for signum in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
            self.addCleanup(signal.signal, signum, signal.getsignal(signum))
        self.reactor = ProcessReactor()
        self.supervisor = self.make_supervisor(self.reactor)

    def make_supervisor(self, reactor: ProcessReactor, listen: str = "tcp:0:interface=127.0.0.1"
                        ) -> WorkerSupervisor:
        settings = Settings(workers=2, listen=(listen,), admin_listen="tcp:9100",
                            host_id="h", dlq_dir="/dlq", shutdown_timeout=10.0)
        supervisor = WorkerSupervisor(settings, reactor)
        self.addCleanup(lambda: [sock.close() for sock, _ in supervisor.sockets])
        return supervisor

    def start(self) -> None:
        self.supervisor.privilegedStartService()
        self.supervisor.startService()
        self.addCleanup(lambda: os.path.isdir(self.supervisor.runtime_dir)
                        and os.rmdir(self.supervisor.runtime_dir))

    def test_binding_comes_before_privileges_drop_and_workers_after(self) -> None:
        self.supervisor.privilegedStartService()
        self.assertEqual(len(self.supervisor.sockets), 1)
        self.assertEqual([port[0] for port in self.reactor.tcpServers], [9100])
        self.assertEqual(self.reactor.spawned, [])
        self.supervisor.startService()
        self.addCleanup(os.rmdir, self.supervisor.runtime_dir)
        self.assertEqual(len(self.reactor.spawned), 2)

    def test_each_worker_gets_the_sockets_its_settings_and_stdin(self) -> None:
        self.start()
        sock, family = self.supervisor.sockets[0]
        for index, process in enumerate(self.reactor.spawned):
            self.assertEqual(process.argv[1:4], ["-m", MODULE, str(index)])
            self.assertEqual(parse_ports(process.argv[4]), [(3, int(family))])
            self.assertEqual(process.child_fds, {0: "w", 1: 1, 2: 2, 3: sock.fileno()})
            settings = decode_settings(process.env[SETTINGS_ENV])
            self.assertEqual((settings.host_id, settings.dlq_dir, settings.workers),
                             (f"h-w{index}", f"/dlq/w{index}", 1))
            self.assertEqual(settings.admin_listen, "unix:%s:mode=600" % os.path.join(
                self.supervisor.runtime_dir, f"w{index}.sock"))

    def test_a_port_in_use_is_raised_and_nothing_starts(self) -> None:
        taken = socket.socket()
        self.addCleanup(taken.close)
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        supervisor = self.make_supervisor(
            self.reactor, f"tcp:{taken.getsockname()[1]}:interface=127.0.0.1")
        self.assertRaises(CannotListenError, supervisor.privilegedStartService)
        self.assertEqual(self.reactor.spawned, [])

    def test_an_admin_listener_that_cannot_listen_is_raised(self) -> None:
        supervisor = self.make_supervisor(ProcessReactor(refuse_to_listen=True))
        self.assertRaises(CannotListenError, supervisor.privilegedStartService)

    def test_started_without_twistd_it_binds_first(self) -> None:
        self.supervisor.startService()
        self.addCleanup(os.rmdir, self.supervisor.runtime_dir)
        self.assertEqual(len(self.supervisor.sockets), 1)
        self.assertEqual(len(self.reactor.tcpServers), 1)
        self.assertEqual(len(self.reactor.spawned), 2)

    def test_a_dead_worker_is_restarted_later_and_later(self) -> None:
        self.start()
        for delay in (1.0, 2.0, 4.0):
            self.reactor.spawned[-2 if delay == 1.0 else -1].end()
            spawned = len(self.reactor.spawned)
            self.reactor.advance(delay - 0.01)
            self.assertEqual(len(self.reactor.spawned), spawned)
            self.reactor.advance(0.01)
            self.assertEqual(len(self.reactor.spawned), spawned + 1)
            self.assertEqual(self.reactor.spawned[-1].argv[3], "0")
        self.assertEqual(
            self.supervisor.registry.get_sample_value("estat_worker_restarts_total"), 3)
        self.assertEqual(self.supervisor.indexes(), [0, 1])

    def test_sighup_reaches_every_worker(self) -> None:
        self.start()
        signal.getsignal(signal.SIGHUP)(signal.SIGHUP, None)  # type: ignore[operator]
        self.assertEqual([p.signals for p in self.reactor.spawned], [["HUP"], ["HUP"]])

    def test_stop_terms_every_worker_and_waits_for_them(self) -> None:
        self.start()
        first, second = self.reactor.spawned
        runtime_dir = self.supervisor.runtime_dir
        stopped = self.supervisor.stopService()
        self.assertEqual((first.signals, second.signals), (["TERM"], ["TERM"]))
        self.assertEqual(self.supervisor.sockets, [])
        self.assertFalse(self.supervisor.all_running())
        first.end()
        self.assertNoResult(stopped)
        second.end()
        self.successResultOf(stopped)
        self.assertFalse(os.path.exists(runtime_dir))
        self.assertEqual(len(self.reactor.spawned), 2)  # no restart while stopping
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_a_worker_still_stopping_after_the_grace_is_killed(self) -> None:
        self.start()
        first, second = self.reactor.spawned
        stopped = self.supervisor.stopService()
        first.end()
        self.reactor.advance(5.0 + 10.0 + 15.0 - 0.01)  # DRAIN_DELAY + SHUTDOWN_TIMEOUT + grace
        self.assertEqual(second.signals, ["TERM"])
        self.reactor.advance(0.01)
        self.assertEqual(second.signals, ["TERM", "KILL"])
        second.end()
        self.successResultOf(stopped)


class FakeWorkers:
    """Workers 0 and 1 whose pages are given per (index, path)."""

    def __init__(self, pages: dict[tuple[int, bytes], Optional[tuple[int, bytes]]],
                 complete: bool = True) -> None:
        self.pages = pages
        self.complete = complete

    def indexes(self) -> list[int]:
        return sorted({index for index, _ in self.pages})

    def all_running(self) -> bool:
        return self.complete

    def fetch(self, index: int, path: bytes) -> "Deferred[tuple[int, bytes]]":
        page = self.pages[(index, path)]
        return succeed(page) if page is not None else fail(ConnectionRefusedError())


TEXT = (b"# HELP estat_events_accepted_total Events\n"
        b"# TYPE estat_events_accepted_total counter\n"
        b"estat_events_accepted_total 3.0\n"
        b"# HELP estat_events_rejected_total Rejected\n"
        b"# TYPE estat_events_rejected_total counter\n"
        b'estat_events_rejected_total{reason="queue_full"} 1.0\n')


class MergeTests(TestCase):
    def test_every_sample_gets_its_worker_label(self) -> None:
        merged = merge_worker_metrics({0: TEXT, 1: TEXT.replace(b"3.0", b"4.0")}).decode()
        self.assertIn('estat_events_accepted_total{worker="0"} 3.0', merged)
        self.assertIn('estat_events_accepted_total{worker="1"} 4.0', merged)
        self.assertIn('estat_events_rejected_total{reason="queue_full",worker="1"} 1.0', merged)
        self.assertEqual(merged.count("# TYPE estat_events_accepted_total counter"), 1)

    def test_no_workers_no_samples(self) -> None:
        self.assertEqual(merge_worker_metrics({}), b"")


class ParentAdminTests(TestCase):
    def get(self, workers: FakeWorkers, path: bytes) -> tuple[int, dict[bytes, bytes], bytes]:
        from prometheus_client import CollectorRegistry, Counter

        registry = CollectorRegistry()
        Counter("estat_worker_restarts", "Restarts", registry=registry)
        return site_get(parent_admin_site(registry, workers, MemoryReactorClock()), path)

    def test_metrics_of_the_parent_and_of_each_worker_that_answers(self) -> None:
        workers = FakeWorkers({(0, b"/metrics"): (200, TEXT), (1, b"/metrics"): None,
                               (2, b"/metrics"): (500, b"broken")})
        code, headers, body = self.get(workers, b"/metrics")
        self.assertEqual(code, 200)
        self.assertEqual(headers[b"content-type"], b"text/plain; version=0.0.4; charset=utf-8")
        text = body.decode()
        self.assertIn("estat_worker_restarts_total 0.0", text)
        self.assertIn('estat_events_accepted_total{worker="0"} 3.0', text)
        self.assertNotIn('worker="1"', text)
        self.assertNotIn('worker="2"', text)

    def test_ready_when_every_worker_is(self) -> None:
        ready = {(0, b"/readyz"): (200, b""), (1, b"/readyz"): (200, b"")}
        code, _, body = self.get(FakeWorkers(ready), b"/readyz")
        self.assertEqual((code, json.loads(body)), (200, {"status": "ready"}))
        for pages, complete in (({**ready, (1, b"/readyz"): (503, b"")}, True),
                                ({**ready, (1, b"/readyz"): None}, True),
                                (ready, False)):
            code, _, body = self.get(FakeWorkers(pages, complete), b"/readyz")
            self.assertEqual((code, json.loads(body)), (503, {"error": "not_ready"}))

    def test_health_and_only_exact_paths(self) -> None:
        workers = FakeWorkers({})
        self.assertEqual(self.get(workers, b"/healthz")[0], 200)
        for path in (b"/readyz/", b"/metrics/x", b"/", b"/w0"):
            code, _, body = self.get(workers, path)
            self.assertEqual((code, json.loads(body)), (404, {"error": "not_found"}), path)
