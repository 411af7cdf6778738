"""The HTTP/1.1 connection itself (estat.http.channel): what twisted.web used to
do for us and the httptools-based channel now does on its own, driven with
raw bytes over an in-memory transport and a Clock."""

from __future__ import annotations

import json
from dataclasses import replace

from prometheus_client import CollectorRegistry, Counter
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from estat.http.channel import IngestListener
from estat.http.request import IngestRequest
from estat.http.response import Answer, raw_error, response
from estat.lifecycle import Lifecycle
from tests.fakes import capture_logs, logged
from tests.support import TEST_LIMITS, Exchange, ListenerTestCase, post_bytes


class ChannelTests(ListenerTestCase):
    def setUp(self) -> None:
        self.listen(idle_timeout=30, request_timeout=10, max_header_bytes=512, max_headers=8)

    def test_pipelined_requests_are_answered_in_order_in_one_write(self):
        client = Exchange(self.listener)
        client.send(post_bytes(b'{"n":1}') + b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n"
                    + post_bytes(b"[2]") + post_bytes(b'{"n":3}'))
        self.assertEqual([code for code, _, _ in client.responses()], [202, 404, 400, 202])
        self.assertEqual([event.body for event in list(self.queue)], [b'{"n":1}', b'{"n":3}'])
        self.assertFalse(client.transport.disconnecting)

    def test_every_answer_has_a_date_and_a_length(self):
        [(code, headers, body)] = Exchange(self.listener).send_and_read(post_bytes(b'{"a":1}'))
        self.assertEqual(code, 202)
        self.assertTrue(headers[b"date"].endswith(b" GMT"))
        self.assertEqual(int(headers[b"content-length"]), len(body))

    def test_http_1_0_closes_unless_it_asks_for_keep_alive(self):
        request = (b"POST /collect HTTP/1.0\r\nContent-Type: application/json\r\n"
                   b"Content-Length: 7\r\n%s\r\n{\"a\":1}")
        client = Exchange(self.listener)
        [(code, headers, _)] = client.send_and_read(request % b"")
        self.assertEqual((code, headers[b"connection"]), (202, b"close"))
        self.assertTrue(client.transport.disconnecting)
        client = Exchange(self.listener)
        [(code, headers, _)] = client.send_and_read(request % b"Connection: keep-alive\r\n")
        self.assertEqual((code, headers[b"connection"]), (202, b"keep-alive"))
        self.assertFalse(client.transport.disconnecting)

    def test_connection_close_is_honoured_and_later_requests_ignored(self):
        client = Exchange(self.listener)
        client.send(post_bytes(b'{"n":1}', extra=b"Connection: close\r\n") + post_bytes(b'{"n":2}'))
        [(code, headers, _)] = client.responses()
        self.assertEqual((code, headers[b"connection"]), (202, b"close"))
        self.assertTrue(client.transport.disconnecting)
        self.assertEqual(len(list(self.queue)), 1)

    def test_100_continue_is_sent_for_a_body_within_the_limit(self):
        client = Exchange(self.listener)
        head = post_bytes(b'{"a":1}', extra=b"Expect: 100-continue\r\n")[:-7]
        client.send(head)
        self.assertEqual(client.transport.value(), b"HTTP/1.1 100 Continue\r\n\r\n")
        client.transport.clear()
        client.send(b'{"a":1}')
        self.assertEqual([code for code, _, _ in client.responses()], [202])

    def test_head_of_healthz_has_no_body(self):
        client = Exchange(self.listener)
        client.send(b"HEAD /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        head = client.transport.value()
        self.assertTrue(head.startswith(b"HTTP/1.1 200 OK\r\n"))
        self.assertTrue(head.endswith(b"\r\n\r\n"))
        self.assertIn(b"Content-Length: 16\r\n", head)

    def test_upgrade_is_ignored_and_the_request_answered_in_http11(self):
        """`Upgrade: h2c` (Java's HttpClient, `curl --http2`) is ignored
        (RFC 9110 section 7.8): the body is read, the answer is HTTP/1.1
        without `Connection: upgrade`, and the connection stays usable."""
        upgrade = b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n"
        chunked = (b"POST /collect HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-ndjson\r\n"
                   b"Transfer-Encoding: chunked\r\n" + upgrade + b"\r\n"
                   b"8\r\n{\"n\":3}\n\r\n8\r\n{\"n\":4}\n\r\n0\r\n\r\n")
        data = (post_bytes(b'{"n":1}', extra=upgrade) + post_bytes(b'{"n":2}') + chunked
                + b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\n"
                  b"Upgrade: websocket\r\n\r\n")
        for cuts in ([], [60, 200, 300], list(range(0, len(data), 7))):
            self.queue.take(len(self.queue), 1 << 30)
            client = Exchange(self.listener)
            client.send_in_pieces(data, cuts)
            answers = client.responses()
            self.assertEqual([code for code, _, _ in answers], [202, 202, 202, 200], cuts)
            for _, headers, _ in answers:
                self.assertNotIn(b"upgrade", headers.get(b"connection", b"").lower())
                self.assertNotIn(b"upgrade", headers)
            self.assertTrue(client.transport.value().startswith(b"HTTP/1.1 202 Accepted\r\n"))
            self.assertEqual([event.body for event in list(self.queue)],
                             [b'{"n":1}', b'{"n":2}', b'{"n":3}', b'{"n":4}'])
            self.assertFalse(client.transport.disconnecting)

    def test_http2_prior_knowledge_is_refused_naming_http11(self):
        logs = capture_logs(self)
        preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x12\x04\x00\x00\x00\x00\x00"
        for _ in range(3):
            client = Exchange(self.listener)
            [(code, _, body)] = client.send_and_read(preface)
            self.assertEqual((code, json.loads(body)["error"]),
                             (505, "http_version_not_supported"))
            self.assertIn("HTTP/1.1", json.loads(body)["detail"])
            self.assertTrue(client.transport.disconnecting)
        self.assertEqual(self.metric("estat_events_rejected_total",
                                     reason="http2_not_supported"), 3)
        # Logged with the advice, at most once per interval, then with how
        # many the quiet period hid.
        said = [e for e in logged(logs, "refused") if e["reason"] == "http2_not_supported"]
        self.assertEqual(len(said), 1)
        self.assertIn("HTTP/1.1", said[0]["advice"])
        self.clock.advance(61)
        Exchange(self.listener).send(preface)
        said = [e for e in logged(logs, "refused") if e["reason"] == "http2_not_supported"]
        self.assertEqual([e["more"] for e in said],
                         ["", " (2 more http2_not_supported refusals since the last such line)"])

    def test_a_header_that_never_ends_is_cut_off(self):
        client = Exchange(self.listener)
        client.send(b"POST /collect HTTP/1.1\r\nX-Long: ")
        for _ in range(20):
            if client.transport.disconnecting:
                break
            client.send(b"v" * 100)
        [(code, _, body)] = client.responses()
        self.assertEqual((code, json.loads(body)["error"]), (431, "headers_too_large"))
        self.assertTrue(client.transport.disconnecting)

    def test_idle_connections_are_closed_after_the_idle_timeout(self):
        client = Exchange(self.listener)
        client.send(post_bytes(b'{"a":1}'))
        self.clock.advance(29)
        self.assertFalse(client.transport.disconnecting)
        self.clock.advance(2)
        self.assertTrue(client.transport.disconnecting)

    def test_stops_reading_while_the_client_does_not_read(self):
        transport = StringTransport()
        channel = self.listener.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
        channel.makeConnection(transport)
        self.assertIs(transport.producer, channel)
        channel.pauseProducing()  # the transport's write buffer is full
        self.assertEqual(transport.producerState, "paused")
        channel.resumeProducing()
        self.assertEqual(transport.producerState, "producing")

    def test_open_connections_gauge_counts_connections(self):
        clients = [Exchange(self.listener) for _ in range(3)]
        clients[0].channel.connectionLost(None)
        self.assertEqual(self.metric("estat_open_connections"), 2)

    def test_a_client_that_does_not_take_its_last_answer_is_aborted(self):
        client = Exchange(self.listener)
        client.send(post_bytes(b'{"a":1}', extra=b"Connection: close\r\n"))
        self.assertTrue(client.transport.disconnecting)  # waits for the answer to be sent
        self.clock.advance(10)
        self.assertFalse(client.transport.disconnected)
        self.clock.advance(2)  # REQUEST_TIMEOUT after the close, by the next reaper round
        self.assertTrue(client.transport.disconnected)

    def test_a_client_that_does_not_read_holds_little_and_loses_nothing(self):
        """Tiny pipelined requests make ~8 times their size in answers: the
        channel parses a piece at a time and stops while the transport's
        buffer is full, then goes on where it stopped."""

        class SmallBuffer(StringTransport):
            def write(self, data: bytes) -> None:
                super().write(data)
                if len(self.value()) > 64 * 1024 and self.producerState == "producing":
                    self.producer.pauseProducing()

        transport = SmallBuffer()
        channel = self.listener.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
        channel.makeConnection(transport)
        request = b"GET /healthz HTTP/1.1\r\n\r\n"
        count = 65536 // len(request)
        channel.dataReceived(request * count)
        self.assertEqual(transport.producerState, "paused")
        answers = 0
        for _ in range(count):
            written = transport.value()
            self.assertLess(len(written), 64 * 1024 + 200 * 1024)
            answers += written.count(b"HTTP/1.1 200 OK")
            transport.clear()
            if answers == count:
                break
            channel.resumeProducing()  # the client read everything
        self.assertEqual(answers, count)
        self.assertEqual(transport.producerState, "producing")
        self.assertFalse(transport.disconnecting)


class _Counts:
    """Counters that remember what the listener reported."""

    def __init__(self) -> None:
        self.responses: list[int] = []
        self.rejected: list[str] = []
        self.open_connections = lambda: -1
        self.loop_errors = Counter("loop_errors", "", ["loop"], registry=CollectorRegistry())

    def count_response(self, code: int) -> None:
        self.responses.append(code)

    def count_rejected(self, reason: str) -> None:
        self.rejected.append(reason)

    def count_evicted(self) -> None:
        self.rejected.append("evicted")

    def gauge_connections(self, count) -> None:
        self.open_connections = count


class _BrokenChannel:
    """A channel whose reap raises, as a bug in it would."""

    def reap(self, now: float) -> None:
        raise RuntimeError("reap failed")


class ListenerTests(unittest.TestCase):
    """The listener is the protocol only: it answers with the handler it is
    given, within the limits it is given, and reports to its counters."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.counts = _Counts()
        self.seen: list[tuple[bytes, bytes, bytes]] = []

        def handler(request: IngestRequest) -> Answer:
            self.seen.append((request.method, request.path, request.body))
            return Answer(201, b'{"made":true}\n', ((b"x-handler", b"yes"),))

        limits = replace(TEST_LIMITS, max_body_size=8, request_timeout=4)
        self.lifecycle = Lifecycle()
        self.listener = IngestListener(handler=handler, limits=limits, counters=self.counts,
                                       lifecycle=self.lifecycle, reactor=self.clock)

    def test_answers_with_the_injected_handler_and_counts(self):
        self.listener.doStart()
        client = Exchange(self.listener)
        [(code, headers, body)] = client.send_and_read(post_bytes(b"{}", path=b"/anything"))
        self.assertEqual((code, headers[b"x-handler"], body), (201, b"yes", b'{"made":true}\n'))
        self.assertEqual(self.seen, [(b"POST", b"/anything", b"{}")])
        client.send(post_bytes(b"{" + b" " * 8 + b"}"))
        self.assertEqual([code for code, _, _ in client.responses()], [201, 413])
        self.assertEqual(len(self.seen), 1)
        self.assertEqual((self.counts.responses, self.counts.rejected), ([201, 413], ["too_large"]))
        self.assertEqual(self.counts.open_connections(), 1)

    def test_the_reaper_runs_from_start_to_stop_of_the_factory(self):
        self.assertEqual(self.clock.getDelayedCalls(), [])
        client = Exchange(self.listener)
        client.send(b"POST /collect HTTP/1.1\r\n")
        self.clock.advance(10)
        self.assertEqual(client.responses(), [])  # not started: nothing reaps
        self.listener.doStart()
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.clock.advance(1)  # the request began 11 s ago: over the timeout of 4
        self.assertEqual([code for code, _, _ in client.responses()], [408])
        self.listener.doStop()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_a_failing_reap_is_counted_and_the_reaper_goes_on(self):
        self.listener.doStart()
        self.listener.channels.add(_BrokenChannel())  # type: ignore[arg-type]
        self.clock.advance(1)
        self.clock.advance(1)
        self.assertEqual(self.counts.loop_errors.labels(loop="reaper")._value.get(), 2)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 2)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)  # still scheduled
        self.listener.doStop()

    def test_close_connections_leaves_no_timer_once_they_are_gone(self):
        busy = Exchange(self.listener)
        busy.send(b"POST /collect HTTP/1.1\r\n")
        idle = Exchange(self.listener)
        closed = self.listener.close_connections(grace=5)
        self.assertTrue(idle.transport.disconnecting)
        self.assertFalse(busy.transport.disconnecting)
        idle.channel.connectionLost(None)
        self.assertNoResult(closed)
        busy.channel.connectionLost(None)
        self.successResultOf(closed)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_close_connections_aborts_what_is_left_after_the_grace(self):
        busy = Exchange(self.listener)
        busy.send(b"POST /collect HTTP/1.1\r\n")
        closed = self.listener.close_connections(grace=5)
        self.clock.advance(4.9)
        self.assertFalse(busy.transport.disconnected)
        self.clock.advance(0.2)
        self.assertTrue(busy.transport.disconnected)  # aborted
        self.assertNoResult(closed)  # until the connection is really gone
        busy.channel.connectionLost(None)
        self.assertIsNone(self.successResultOf(closed))


class ResponseTests(unittest.TestCase):
    def test_a_204_has_no_length_and_head_no_body(self):
        no_content = response(204, b"", ((b"allow", b"POST"),))
        self.assertNotIn(b"Content-Length", no_content)
        self.assertTrue(no_content.endswith(b"allow: POST\r\n\r\n"))
        head = response(200, b'{"status":"ok"}\n', close=True, head_only=True)
        self.assertIn(b"Content-Length: 16\r\nConnection: close\r\n\r\n", head)
        self.assertTrue(head.endswith(b"\r\n\r\n"))

    def test_an_error_closes_and_names_the_error(self):
        [(code, headers, body)] = Exchange.parse(raw_error(431, "headers_too_large", max_headers=5))
        self.assertEqual((code, headers[b"connection"]), (431, b"close"))
        self.assertEqual(json.loads(body), {"error": "headers_too_large", "max_headers": 5})


class PlainAnswerCacheTests(unittest.TestCase):
    def test_a_kept_answer_carries_the_current_date(self):
        """The bytes of a plain answer are kept for as long as the Date
        header is the same, and made anew when it changes."""
        from estat.http import response as module

        now = [1_800_000_000.2]
        self.patch(module.time, "time", lambda: now[0])
        first = module.response(202, b'{"status":"accepted"}\n')
        self.assertIs(module.response(202, b'{"status":"accepted"}\n'), first)
        now[0] += 1
        later = module.response(202, b'{"status":"accepted"}\n')
        self.assertNotEqual(later, first)
        self.assertIn(b"Date: " + module.http_date() + b"\r\n", later)
        self.assertEqual(later, module._build(202, b'{"status":"accepted"}\n'))
