"""The HTTP/1.1 connection itself (estat.http.channel): what twisted.web used to
do for us and the httptools-based channel now does on its own, driven with
raw bytes over an in-memory transport and a Clock."""

from __future__ import annotations

import json

from prometheus_client import CollectorRegistry
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from estat.collect import IngestState
from estat.http.channel import IngestListener
from estat.metrics import Metrics
from estat.pipeline.queue import EventQueue
from tests.test_web import Exchange, post_bytes


class ChannelTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.registry = CollectorRegistry()
        self.queue: EventQueue = EventQueue(100)
        self.state = IngestState(self.queue, Metrics(self.registry, process=False), 1024, True,
                                 now_ms=lambda: 1)
        self.state.lifecycle.start_running()
        self.listener = IngestListener(self.state, reactor=self.clock, idle_timeout=30,
                                       request_timeout=10, max_header_bytes=512, max_headers=8)

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

    def test_upgrade_requests_are_refused(self):
        client = Exchange(self.listener)
        [(code, _, body)] = client.send_and_read(
            b"GET /collect HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
        self.assertEqual((code, json.loads(body)),
                         (400, {"error": "bad_request", "detail": "upgrade_not_supported"}))
        self.assertTrue(client.transport.disconnecting)

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
        self.assertEqual(self.registry.get_sample_value("estat_open_connections"), 2)

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
