"""The server's service tree in-process, on a MemoryReactorClock with an
in-line thread pool and an in-memory store: what starts in which order,
how a start failure surfaces, and the ordered stop that keeps every
accepted event. Also the encoder threads' priority."""

from __future__ import annotations

import json
import os
import re
import socket
import sys
import threading
from typing import Any, Callable

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort
from twisted.internet.testing import (
    MemoryReactorClock,
    StringTransportWithDisconnection,
)
from twisted.logger import capturedLogs
from twisted.python.threadpool import ThreadPool
from twisted.trial import unittest
from zope.interface import implementer

import estat.service
from estat.collect import readiness
from estat.config import Settings
from estat.lifecycle import Phase
from estat.model import EncodedObject
from estat.service import (
    ENCODE_NICENESS,
    IngestService,
    _lower_this_threads_priority,
    build,
)
from tests.fakes import FakeStore
from tests.support import make_workdir


@implementer(IListeningPort)
class RecordingPort:
    """A listening port that notes in the log when it stops, with what
    `/readyz` answered at that moment."""

    def __init__(self, reactor: "ServerReactor", name: str, factory: Any) -> None:
        self.reactor = reactor
        self.name = name
        self.factory = factory
        self.listening = True
        factory.doStart()

    def stopListening(self) -> None:
        ready = self.reactor.readyz()
        self.reactor.log.append(f"stop {self.name} (readyz {ready})")
        self.listening = False
        self.factory.doStop()

    def startListening(self) -> None:
        pass

    def getHost(self) -> IPv4Address:
        return IPv4Address("TCP", "127.0.0.1", 0)


class ServerReactor(MemoryReactorClock):
    """Listens and adopts on paper, noting each in `log`; runs
    `callFromThread` at once (the pool below runs on this thread). A port
    in `refuse` cannot be listened on; `adopt_error` fails adoptions."""

    def __init__(self, log: list[str], refuse: tuple[int, ...] = (),
                 adopt_error: Exception | None = None) -> None:
        super().__init__()
        self.log = log
        self.refuse = refuse
        self.adopt_error = adopt_error
        self.readyz: Callable[[], int] = lambda: 0
        self.ports: dict[str, RecordingPort] = {}

    def listenTCP(self, port: int, factory: Any, backlog: int = 50,
                  interface: str = "") -> RecordingPort:
        if port in self.refuse:
            raise CannotListenError(interface, port, OSError(98, "Address already in use"))
        self.log.append(f"listen {port}")
        listening = self.ports[str(port)] = RecordingPort(self, str(port), factory)
        return listening

    def adoptStreamPort(self, fileno: int, addressFamily: Any, factory: Any) -> RecordingPort:
        if self.adopt_error is not None:
            raise self.adopt_error
        self.log.append(f"adopt fd{fileno}")
        listening = self.ports[f"fd{fileno}"] = RecordingPort(self, f"fd{fileno}", factory)
        return listening

    def callFromThread(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        f(*args, **kwargs)


class InlinePool(ThreadPool):
    """A thread pool that runs each call at once on the calling thread, or,
    while `hold` is set, keeps them until `run_held`."""

    def __init__(self, log: list[str]) -> None:
        super().__init__(minthreads=0, maxthreads=1, name="inline")
        self.log = log
        self.hold = False
        self.held: list[tuple[Any, ...]] = []

    def start(self) -> None:
        self.log.append("pool start")

    def stop(self) -> None:
        self.log.append("pool stop")

    def callInThreadWithCallback(self, onResult: Any, func: Any, *args: Any,
                                 **kwargs: Any) -> None:
        if self.hold:
            self.held.append((onResult, func, args, kwargs))
            return
        try:
            result = func(*args, **kwargs)
        except BaseException as error:
            onResult(False, error)
        else:
            onResult(True, result)

    def run_held(self) -> None:
        self.hold = False
        held, self.held = self.held, []
        for onResult, func, args, kwargs in held:
            self.callInThreadWithCallback(onResult, func, *args, **kwargs)


class ClosingStore(FakeStore):
    """A FakeStore whose puts and close are noted in the log; close notes
    how many puts were still unanswered."""

    root = "memory"

    def __init__(self, log: list[str], manual: bool = True) -> None:
        super().__init__(manual=manual)
        self.log = log

    def put(self, obj: EncodedObject) -> "Deferred[None]":
        self.log.append(f"put {obj.event_count}")
        return super().put(obj)

    def close(self) -> "Deferred[None]":
        unanswered = sum(not d.called for _, d in self.pending)
        self.log.append(f"store close ({unanswered} unanswered)")
        return succeed(None)


def post(body: bytes) -> bytes:
    return (b"POST /collect HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body))


class Connection:
    """One client connection to the ingest listener over a string
    transport; its close is noted in the log."""

    def __init__(self, parts: Any, log: list[str], name: str) -> None:
        self.channel = parts.listener.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5555))
        self.transport = StringTransportWithDisconnection()
        self.transport.protocol = self.channel
        lost = self.channel.connectionLost

        def connection_lost(reason: Any = None) -> None:
            log.append(f"closed {name}")
            lost(reason)

        self.channel.connectionLost = connection_lost
        self.channel.makeConnection(self.transport)

    def send(self, data: bytes) -> None:
        self.channel.dataReceived(data)

    def answers(self) -> list[int]:
        return [int(code) for code in re.findall(rb"HTTP/1\.1 (\d{3}) ", self.transport.value())]


class ServiceHarness:
    """`build` and `IngestService` for test settings on a ServerReactor."""

    def __init__(self, test: unittest.TestCase, refuse: tuple[int, ...] = (),
                 adopt_error: Exception | None = None,
                 inherited_ports: tuple[tuple[int, int], ...] = (), manual: bool = True,
                 **overrides: Any) -> None:
        test.patch(estat.service, "_lower_this_threads_priority", lambda: None)
        workdir = make_workdir(test)
        self.log: list[str] = []
        self.reactor = ServerReactor(self.log, refuse, adopt_error)
        self.pool = InlinePool(self.log)
        self.store = ClosingStore(self.log, manual=manual)
        settings = dict(listen=("tcp:8080",), admin_listen="tcp:9100",
                        output_dir=os.path.join(workdir, "objects"),
                        dlq_dir=os.path.join(workdir, "dlq"), batch_size=3,
                        flush_interval=5.0, upload_queue_size=4, upload_concurrency=2,
                        event_queue_size=100, shutdown_timeout=30.0, drain_delay=0.0,
                        host_id="h")
        settings.update(overrides)
        self.settings = Settings(**settings)
        self.parts = build(self.settings, self.reactor, pool=self.pool, store=self.store)
        self.reactor.readyz = lambda: readiness(self.parts.state).code
        self.service = IngestService(self.parts, inherited_ports=inherited_ports)

    def start(self) -> None:
        self.service.privilegedStartService()
        self.service.startService()

    def connect(self, name: str) -> Connection:
        return Connection(self.parts, self.log, name)

    def metric(self, name: str, **labels: str) -> float:
        return self.parts.registry.get_sample_value(name, labels) or 0.0

    def stored_numbers(self) -> list[int]:
        import gzip

        numbers = []
        for obj in self.store.stored.values():
            for line in gzip.decompress(obj.data).splitlines():
                numbers.append(json.loads(line)["body"]["n"])
        return sorted(numbers)


class StartTests(unittest.TestCase):
    def test_listeners_bind_in_the_privileged_step_and_ready_waits_for_the_spool(self):
        h = ServiceHarness(self)
        h.pool.hold = True
        h.service.privilegedStartService()
        self.assertEqual(h.log, ["listen 9100", "listen 8080"])
        self.assertEqual(h.parts.lifecycle.phase, Phase.STARTING)
        h.service.startService()
        # The pool runs, but the dead-letter directory is not open yet: no
        # loop runs, no second listen, and /readyz says starting.
        self.assertEqual(h.log, ["listen 9100", "listen 8080", "pool start"])
        self.assertFalse(h.service.batcher_service.running)
        self.assertFalse(h.service.drain_service.running)
        answer = readiness(h.parts.state)
        self.assertEqual((answer.code, json.loads(answer.body)["status"]), (503, "starting"))
        h.pool.run_held()
        self.assertTrue(h.service.batcher_service.running)
        self.assertTrue(h.service.drain_service.running)
        self.assertEqual(h.parts.lifecycle.phase, Phase.RUNNING)
        self.assertEqual(readiness(h.parts.state).code, 200)
        self.assertEqual(h.metric("estat_ready"), 1)
        self.assertEqual(h.log, ["listen 9100", "listen 8080", "pool start"])
        self.successResultOf(h.service.stopService())

    def test_a_refused_listen_is_raised_to_twistd(self):
        h = ServiceHarness(self, refuse=(8080,))
        with capturedLogs() as events:
            self.assertRaises(CannotListenError, h.service.privilegedStartService)
        [critical] = [e for e in events if e["log_level"].name == "critical"]
        self.assertIn("Address already in use", critical["error"])
        self.assertNotIn("pool start", h.log)
        self.assertEqual(h.parts.lifecycle.phase, Phase.STARTING)

    def test_a_worker_adopts_its_sockets_after_the_spool_opens(self):
        sock = socket.socket()
        self.addCleanup(sock.close)
        fd = os.dup(sock.fileno())
        h = ServiceHarness(self, inherited_ports=((fd, socket.AF_INET),))
        h.pool.hold = True
        h.service.startService()  # a worker skips the privileged step
        self.assertEqual(h.log, ["pool start"])
        h.pool.run_held()
        self.assertEqual(h.log, ["pool start", "listen 9100", f"adopt fd{fd}"])
        self.assertRaises(OSError, os.fstat, fd)  # ours is closed, the port has its own
        self.assertEqual(h.parts.lifecycle.phase, Phase.RUNNING)
        self.successResultOf(h.service.stopService())
        self.assertIn(f"stop fd{fd} (readyz 503)", h.log)

    def test_a_failure_once_the_reactor_runs_is_said_and_stops_it(self):
        h = ServiceHarness(self, adopt_error=OSError(9, "Bad file descriptor"),
                           inherited_ports=((1000, socket.AF_INET),))
        h.reactor.running = True
        with capturedLogs() as events:
            h.service.startService()
        [critical] = [e for e in events if e["log_level"].name == "critical"]
        self.assertIn("Bad file descriptor", critical["error"])
        self.assertTrue(h.reactor.hasStopped)
        self.assertEqual(h.parts.lifecycle.phase, Phase.STARTING)
        self.assertEqual(readiness(h.parts.state).code, 503)
        # twistd then stops the service: the ordered stop still runs.
        self.successResultOf(h.service.stopService())
        self.assertEqual(h.log[-2:], ["stop 9100 (readyz 503)", "pool stop"])


class StopTests(unittest.TestCase):
    """The stop order is the server's promise: stop accepting, answer what
    is arriving, flush, upload or dead-letter, and only then close the
    store and the pool."""

    def accept(self, h: ServiceHarness) -> tuple[Connection, Connection]:
        """Seven events accepted: one batch uploading, one open, two queued;
        an idle keep-alive connection and one whose request is arriving."""
        h.start()
        idle = h.connect("idle")
        for n in range(5):
            idle.send(post(b'{"n":%d}' % n))
        h.reactor.advance(0.05)  # the batcher takes them: 0-2 flushed, 3-4 open
        for n in range(5, 7):
            idle.send(post(b'{"n":%d}' % n))
        self.assertEqual(idle.answers(), [202] * 7)
        self.assertEqual((len(h.parts.queue), h.parts.batcher.open_events()), (2, 2))
        busy = h.connect("busy")
        busy.send(post(b'{"n":99}')[:-3])
        return idle, busy

    def test_the_stop_order(self):
        h = ServiceHarness(self)
        _, busy = self.accept(h)
        del h.log[:]
        stopped = h.service.stopService()
        # /readyz was 503 before the port stopped; the idle connection closed
        # at once; the busy one may still finish its request.
        self.assertEqual(h.log, ["stop 8080 (readyz 503)", "closed idle"])
        self.assertEqual(h.parts.lifecycle.phase, Phase.DRAINING)
        self.assertNoResult(stopped)
        busy.send(post(b'{"n":99}')[-3:])
        self.assertEqual(busy.answers(), [503])
        self.assertIn(b"shutting_down", busy.transport.value())
        # Then the batcher stops and everything is flushed: 3-5 uploads
        # beside 0-2, 6 waits its turn; nothing closes while a put is open.
        self.assertEqual(h.log, ["stop 8080 (readyz 503)", "closed idle", "closed busy",
                                 "put 3"])
        self.assertEqual((len(h.store.pending), h.parts.uploader.depth()), (2, 1))
        self.assertFalse(h.service.batcher_service.running)
        self.assertEqual((len(h.parts.queue), h.parts.batcher.open_events()), (0, 0))
        h.reactor.advance(10)  # no loop runs any more, and the deadline is far
        self.assertEqual(len(h.log), 4)
        self.assertNoResult(stopped)
        h.store.finish_all()
        self.assertEqual(h.log[4:], ["put 1"])
        self.assertNoResult(stopped)
        h.store.finish_all()
        self.successResultOf(stopped)
        self.assertEqual(h.log[5:], ["store close (0 unanswered)", "stop 9100 (readyz 503)",
                                     "pool stop"])
        self.assertEqual(h.parts.lifecycle.phase, Phase.STOPPED)
        self.assertEqual(h.stored_numbers(), list(range(7)))
        self.assertEqual(h.parts.dlq.entry_names(), [])

    def test_a_stop_leaves_the_pool_first_while_still_serving(self):
        """DRAIN_DELAY: /readyz answers 503 at once, on both listeners, but
        /collect is answered as before (202, keep-alive) until the delay is
        over; only then do the ports close and the rest of the stop run."""
        h = ServiceHarness(self, drain_delay=5.0)
        idle, busy = self.accept(h)
        del h.log[:]
        with capturedLogs() as events:
            stopped = h.service.stopService()
        self.assertEqual(h.log, [])  # no port closed, no connection closed
        self.assertEqual(h.parts.lifecycle.phase, Phase.LEAVING)
        answer = readiness(h.parts.state)
        self.assertEqual((answer.code, json.loads(answer.body)["status"]), (503, "leaving"))
        self.assertEqual(h.metric("estat_ready"), 0)
        self.assertTrue([e for e in events if "DRAIN_DELAY" in e.get("log_format", "")])
        h.reactor.advance(4.9)
        idle.send(post(b'{"n":7}'))
        self.assertEqual(idle.answers(), [202] * 8)
        self.assertFalse(idle.transport.disconnecting)
        # The pipeline runs on (the batcher cut a batch), but nothing closed.
        self.assertEqual(h.log, ["put 3"])
        self.assertTrue(h.reactor.ports["8080"].listening)
        self.assertNoResult(stopped)
        h.reactor.advance(0.2)
        self.assertEqual(h.log[1:], ["stop 8080 (readyz 503)", "closed idle"])
        self.assertEqual(h.parts.lifecycle.phase, Phase.DRAINING)
        busy.send(post(b'{"n":99}')[-3:])
        self.assertEqual(busy.answers(), [503])
        while h.store.pending:
            h.store.finish_all()
        self.successResultOf(stopped)
        self.assertEqual(h.stored_numbers(), list(range(8)))
        self.assertEqual(h.log[-3:], ["store close (0 unanswered)", "stop 9100 (readyz 503)",
                                      "pool stop"])

    def test_a_server_that_never_became_ready_does_not_wait_the_drain_delay(self):
        h = ServiceHarness(self, manual=False, drain_delay=5.0)
        h.pool.hold = True
        h.start()
        stopped = h.service.stopService()
        h.pool.run_held()
        self.successResultOf(stopped)
        self.assertEqual(h.reactor.seconds(), 0)

    def test_the_stop_log_counts_the_batches_in_flight_too(self):
        h = ServiceHarness(self)
        self.accept(h)
        with capturedLogs() as events:
            h.service.stopService()
            h.reactor.advance(5.1)  # the busy connection's grace is over
        [said] = [e for e in events if "waiting for" in e.get("log_format", "")]
        # 0-2 and 3-5 are uploading, 6 waits its turn.
        self.assertEqual((said["batches"], said["in_flight"]), (3, 2))

    def test_at_the_deadline_uploads_are_cancelled_into_the_dead_letter_queue(self):
        h = ServiceHarness(self)
        _, busy = self.accept(h)
        stopped = h.service.stopService()
        h.reactor.advance(4.9)
        self.assertNotIn("closed busy", h.log)
        h.reactor.advance(0.2)  # the grace for a request still arriving is over
        self.assertTrue(busy.transport.disconnected)
        self.assertEqual((len(h.store.pending), h.parts.uploader.depth()), (2, 1))
        h.reactor.advance(24.8)
        self.assertNoResult(stopped)
        self.assertFalse(any("store close" in line for line in h.log))
        with capturedLogs() as events:
            h.reactor.advance(0.2)
        self.successResultOf(stopped)
        self.assertTrue([e for e in events if "deadline" in e.get("log_format", "")])
        self.assertEqual(h.store.stored, {})
        self.assertEqual(len(h.parts.dlq.entry_names()), 3)
        self.assertEqual(h.metric("estat_dlq_events_enqueued_total"), 7)
        self.assertEqual(h.log[-3:], ["store close (0 unanswered)", "stop 9100 (readyz 503)",
                                      "pool stop"])

    def test_a_second_stop_is_the_same_stop(self):
        h = ServiceHarness(self, manual=False)
        h.start()
        first, second = h.service.stopService(), h.service.stopService()
        self.assertIs(first, second)
        self.successResultOf(first)
        self.assertEqual(h.log.count("pool stop"), 1)

    def test_a_stop_during_the_start_does_not_wait_for_it_and_never_becomes_ready(self):
        h = ServiceHarness(self, manual=False)
        h.pool.hold = True  # the dead-letter scan never finishes by itself
        h.reactor.running = True
        h.start()
        with capturedLogs() as events:
            stopped = h.service.stopService()
        self.successResultOf(stopped)
        self.assertEqual(h.parts.lifecycle.phase, Phase.STOPPED)
        self.assertEqual(h.log[-1], "pool stop")
        self.assertFalse(h.reactor.hasStopped)  # a cancelled start is no failure
        self.assertEqual([e for e in events if e["log_level"].name == "critical"], [])
        h.pool.run_held()  # the scan's late result changes nothing
        self.assertEqual(h.parts.lifecycle.phase, Phase.STOPPED)


class EncoderPriorityTests(unittest.TestCase):
    def test_an_encoding_thread_is_reniced_once_and_alone(self):
        if not sys.platform.startswith("linux"):
            raise unittest.SkipTest("per-thread niceness is Linux's")
        process = os.getpriority(os.PRIO_PROCESS, 0)
        seen = []

        def encoder() -> None:
            _lower_this_threads_priority()
            _lower_this_threads_priority()  # a second batch on the same thread
            seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))

        thread = threading.Thread(target=encoder)
        thread.start()
        thread.join()
        self.assertEqual(seen, [min(19, process + ENCODE_NICENESS)])
        self.assertEqual(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()), process)

    def test_a_filter_that_refuses_setpriority_is_said_once(self):
        import estat.service

        if not sys.platform.startswith("linux"):
            raise unittest.SkipTest("per-thread niceness is Linux's")

        said = []

        class Log:
            def info(self, message: str, **fields: object) -> None:
                said.append(fields["error"])

        def refused(*args: object) -> None:
            raise PermissionError(1, "Operation not permitted")

        self.patch(estat.service, "_log", Log())
        self.patch(estat.service, "_reniced_failed", [])
        self.patch(os, "setpriority", refused)
        threads = [threading.Thread(target=_lower_this_threads_priority) for _ in range(3)]
        for thread in threads:
            thread.start()
            thread.join()
        self.assertEqual(len(said), 1)
        self.assertIsInstance(said[0], PermissionError)


class ByteBoundGaugeTests(unittest.TestCase):
    def test_the_byte_bounds_are_exported_with_what_uses_them(self):
        """The event queue's bytes and the bytes of the bodies being
        received are gauges beside their bounds, so an operator sees a 503
        queue_full or request_bodies_full coming."""
        h = ServiceHarness(self, event_queue_max_bytes=1 << 20,
                           request_bodies_max_bytes=4 << 20)
        h.start()
        self.assertEqual(h.metric("estat_event_queue_max_bytes"), 1 << 20)
        self.assertEqual(h.metric("estat_request_bodies_max_bytes"), 4 << 20)
        receiving = h.connect("slow")
        receiving.send(b"POST /collect HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                       b"\r\nContent-Length: 5000\r\n\r\n{")
        self.assertEqual(h.metric("estat_request_bodies_bytes"), 5000)
        done = h.connect("done")
        done.send(b"POST /collect HTTP/1.1\r\nHost: x\r\nContent-Length: 9\r\n\r\n"
                  b'{"n":123}')
        self.assertEqual(done.answers(), [202])
        self.assertEqual(h.metric("estat_event_queue_bytes"), 9)
        self.assertEqual(h.metric("estat_request_bodies_bytes"), 5000)
