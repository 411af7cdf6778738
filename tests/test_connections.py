"""Connections: a new one must send its first request soon; at
MAX_CONNECTIONS the longest-idle one makes room for a new one; and an
orderly stop over real loopback TCP: idle keep-alive connections are
closed at once, a request being received gets its answer, and a client that
never finishes is cut off after the grace period."""

from __future__ import annotations

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.trial import unittest

from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs

from tests.support import (
    Exchange,
    ListenerTestCase,
    RawClient,
    make_certificate,
    make_listener,
    make_workdir,
    poll_until,
    post_bytes,
)


class FirstRequestTimeoutTests(ListenerTestCase):
    def setUp(self) -> None:
        self.listen(first_request_timeout=3, idle_timeout=60, request_timeout=10)

    def test_a_connection_that_sends_nothing_is_closed_after_the_first_request_timeout(self):
        silent = Exchange(self.listener)
        self.clock.advance(2)
        self.assertFalse(silent.transport.disconnecting)
        self.clock.advance(2)  # the reaper looks every second
        self.assertTrue(silent.transport.disconnecting)
        self.assertEqual(silent.transport.value(), b"")  # nothing was asked: no answer
        self.assertEqual(self.metric("estat_events_rejected_total",
                                     reason="first_request_timeout"), 1)

    def test_a_first_request_under_way_has_the_request_timeout(self):
        slow = Exchange(self.listener)
        slow.send(post_bytes(b'{"a":1}')[:20])
        self.clock.advance(8)
        self.assertFalse(slow.transport.disconnecting)
        slow.send(post_bytes(b'{"a":1}')[20:])
        self.assertEqual([code for code, _, _ in slow.responses()], [202])


class ConnectionPressureTests(ListenerTestCase):
    """At MAX_CONNECTIONS the longest-idle connection is closed to admit the
    new one; only when every connection is busy is the new one refused."""

    def setUp(self) -> None:
        self.listen(max_connections=3, first_request_timeout=30, idle_timeout=60)

    def connect(self) -> tuple[StringTransport, object]:
        transport = StringTransport()
        channel = self.listener.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
        assert channel is not None
        channel.makeConnection(transport)
        return transport, channel

    def test_the_longest_idle_connection_makes_room_and_busy_ones_are_kept(self):
        silent = Exchange(self.listener)  # idle since t=0, never asked anything
        self.clock.advance(1)
        older = Exchange(self.listener)
        older.send(post_bytes(b'{"a":1}'))  # idle since t=1
        self.clock.advance(1)
        busy = Exchange(self.listener)
        busy.send(post_bytes(b'{"a":2}')[:30])  # a request arriving
        new = Exchange(self.listener)
        self.assertTrue(silent.transport.disconnecting)
        self.assertFalse(older.transport.disconnecting)
        new.send(post_bytes(b'{"a":3}')[:30])
        newer = Exchange(self.listener)
        self.assertTrue(older.transport.disconnecting)
        self.assertEqual([code for code, _, _ in older.responses()], [202])
        newer.send(post_bytes(b'{"a":4}')[:30])
        # Every open connection is now receiving a request: refuse.
        transport, _ = self.connect()
        self.assertIn(b"too_many_connections", transport.value())
        self.assertTrue(transport.disconnecting)
        for client, body in ((busy, b'{"a":2}'), (new, b'{"a":3}'), (newer, b'{"a":4}')):
            client.send(post_bytes(body)[30:])
            self.assertEqual([code for code, _, _ in client.responses()], [202])
            self.assertFalse(client.transport.disconnecting)
        self.assertEqual(self.metric("estat_connections_evicted_total"), 2)
        self.assertEqual(self.metric("estat_events_rejected_total",
                                     reason="too_many_connections"), 1)


class CloseConnectionsTests(ListenerTestCase):
    def setUp(self) -> None:
        self.listen(queue_size=10)
        self.port = reactor.listenTCP(0, self.listener, interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)

    @inlineCallbacks
    def connect(self):  # type: ignore[no-untyped-def]
        client = RawClient()
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.port.getHost().port)
        yield connectProtocol(endpoint, client)
        self.addCleanup(lambda: client.transport.abortConnection())
        return client

    @inlineCallbacks
    def test_idle_closed_at_once_busy_answered_then_closed(self):
        idle = yield self.connect()
        idle.transport.write(b"POST /collect HTTP/1.1\r\nHost: x\r\nContent-Length: 7\r\n"
                             b"Content-Type: application/json\r\n\r\n{\"a\":1}")
        yield poll_until(lambda: b"202 Accepted" in idle.data, 10, what="first answer")
        busy = yield self.connect()
        busy.transport.write(b"POST /collect HTTP/1.1\r\nHost: x\r\nContent-Length: 7\r\n"
                             b"Content-Type: application/json\r\n\r\n{\"a\"")
        yield poll_until(lambda: len(self.listener.channels) == 2
                         and not all(c.idle() for c in self.listener.channels), 10,
                         what="the busy request to arrive")
        self.state.lifecycle.start_draining()
        all_closed = self.listener.close_connections(grace=5)
        yield idle.closed
        self.assertNoResult(all_closed)
        busy.transport.write(b":2}")
        yield busy.closed
        yield all_closed
        self.assertIn(b"503 Service Unavailable", busy.data)
        self.assertIn(b"shutting_down", busy.data)
        self.assertEqual([event.body for event in list(self.queue)], [b'{"a":1}'])

    @inlineCallbacks
    def test_a_client_that_never_finishes_is_aborted_after_the_grace(self):
        slow = yield self.connect()
        slow.transport.write(b"POST /collect HTTP/1.1\r\nHost: x\r\nContent-Length: 7\r\n\r\n{")
        yield poll_until(lambda: self.listener.channels and
                         not all(c.idle() for c in self.listener.channels), 10,
                         what="the slow request to arrive")
        all_closed = self.listener.close_connections(grace=5)
        self.clock.advance(4.9)
        self.assertNoResult(all_closed)
        self.clock.advance(0.2)
        yield all_closed
        yield slow.closed
        self.assertEqual(list(self.queue), [])


class ProxyProtocolTests(unittest.TestCase):
    """Behind HAProxy (`LISTEN=haproxy:tcp:...`) the listener is wrapped by
    Twisted's PROXY-protocol factory; requests still get their answers."""

    @inlineCallbacks
    def test_requests_after_a_proxy_header_are_served(self):
        from twisted.internet import endpoints

        setup = make_listener(queue_size=10)
        listener, queue = setup.listener, setup.queue
        port = yield endpoints.serverFromString(
            reactor, "haproxy:tcp:0:interface=127.0.0.1").listen(listener)
        self.addCleanup(port.stopListening)
        client = RawClient()
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
        yield connectProtocol(endpoint, client)
        self.addCleanup(client.transport.abortConnection)
        request = (b"POST /collect HTTP/1.1\r\nHost: x\r\nContent-Length: 7\r\n"
                   b"Content-Type: application/json\r\n\r\n{\"a\":%d}")
        client.transport.write(b"PROXY TCP4 203.0.113.7 127.0.0.1 5555 8080\r\n"
                               + request % 1 + request % 2)
        yield poll_until(lambda: client.data.count(b"202 Accepted") == 2, 10,
                         what="two answers through the PROXY wrapper")
        self.assertEqual([event.body for event in list(queue)], [b'{"a":1}', b'{"a":2}'])
        self.assertEqual(len(listener.channels), 1)

    @inlineCallbacks
    def test_a_refusal_is_logged_with_the_client_address_from_the_proxy_header(self):
        from twisted.internet import endpoints

        setup = make_listener(queue_size=10)
        port = yield endpoints.serverFromString(
            reactor, "haproxy:tcp:0:interface=127.0.0.1").listen(setup.listener)
        self.addCleanup(port.stopListening)
        client = RawClient()
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
        yield connectProtocol(endpoint, client)
        self.addCleanup(client.transport.abortConnection)
        with capturedLogs() as events:
            client.transport.write(b"PROXY TCP4 203.0.113.7 127.0.0.1 5555 8080\r\n"
                                   + post_bytes(b"not json"))
            yield poll_until(lambda: b"400 Bad Request" in client.data, 10,
                             what="the 400 through the PROXY wrapper")
        [said] = [e for e in events if e.get("log_format", "").startswith("refused")]
        self.assertEqual((said["code"], said["reason"], said["client"]),
                         (400, "invalid_json", "203.0.113.7:5555"))


class RefusalLogTests(ListenerTestCase):
    """Refusals are logged with the client's address, one line per reason
    per ten seconds, the next saying how many the quiet period hid."""

    def setUp(self) -> None:
        self.listen(queue_size=10, max_headers=4)

    def test_refusals_name_the_client_and_are_rate_limited_per_reason(self):
        with capturedLogs() as events:
            for _ in range(3):
                Exchange(self.listener).send(post_bytes(b"not json"))
            Exchange(self.listener).send(post_bytes(b"{}", extra=b"A: 1\r\nB: 2\r\n"))
            self.clock.advance(10)
            Exchange(self.listener).send(post_bytes(b"[]"))
            self.state.lifecycle.start_leaving()  # a health answer, not a refusal
            Exchange(self.listener).send(b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
        said = [(e["code"], e["reason"], e["client"], e["more"]) for e in events
                if e.get("log_format", "").startswith("refused")]
        client = "192.168.1.1:54321"  # the peer of a StringTransport
        self.assertEqual(said, [
            (400, "invalid_json", client, ""),
            (431, "headers_too_large", client, ""),
            (400, "invalid_json", client,
             " (2 more invalid_json refusals since the last such line)"),
        ])

class TlsAlpnTests(unittest.TestCase):
    """A TLS listener (`ssl:` endpoint) and a client that offers ALPN
    `h2, http/1.1`, as curl, browsers and Java do: the handshake selects
    http/1.1 and the request is answered."""

    @inlineCallbacks
    def test_alpn_h2_and_http11_selects_http11(self):
        import http.client
        import ssl

        from twisted.internet import endpoints
        from twisted.internet.threads import deferToThread

        workdir = make_workdir(self)
        cert, key = make_certificate(workdir)
        setup = make_listener(queue_size=10)
        port = yield endpoints.serverFromString(
            reactor, f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}"
        ).listen(setup.listener)
        self.addCleanup(port.stopListening)

        def client() -> tuple[object, int, bytes]:
            context = ssl.create_default_context(cafile=cert)
            context.set_alpn_protocols(["h2", "http/1.1"])
            connection = http.client.HTTPSConnection(
                "127.0.0.1", port.getHost().port, context=context, timeout=10)
            try:
                connection.request("POST", "/collect", body=b'{"a":1}',
                                   headers={"Content-Type": "application/json"})
                answer = connection.getresponse()
                assert connection.sock is not None
                return connection.sock.selected_alpn_protocol(), answer.status, answer.read()
            finally:
                connection.close()

        selected, status, _ = yield deferToThread(client)
        self.assertEqual((selected, status), ("http/1.1", 202))
        self.assertEqual([event.body for event in list(setup.queue)], [b'{"a":1}'])


class SlowLargeUploadsTests(unittest.TestCase):
    """Many clients starting large uploads at once over real TCP: only as
    many as REQUEST_BODIES_MAX_BYTES allows are read; the others are
    answered 503 with Retry-After before they send their body."""

    @inlineCallbacks
    def test_uploads_beyond_the_body_budget_get_503_at_once(self):
        setup = make_listener(queue_size=10, max_receiving_bytes=1024 * 1024,
                              max_batch_body_size=512 * 1024)
        port = reactor.listenTCP(0, setup.listener, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
        body = b'{"a":1}\n' + b" " * (400 * 1024 - 8)
        head = (b"POST /collect HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-ndjson\r\n"
                b"Content-Length: %d\r\nExpect: 100-continue\r\n\r\n" % len(body))
        clients = []
        for _ in range(4):
            client = RawClient()
            yield connectProtocol(endpoint, client)
            self.addCleanup(client.transport.abortConnection)
            client.transport.write(head)
            clients.append(client)
        yield poll_until(lambda: all(c.data for c in clients), 10, what="four first answers")
        continued = [c for c in clients if c.data.startswith(b"HTTP/1.1 100 Continue")]
        refused = [c for c in clients if b"503 Service Unavailable" in c.data]
        self.assertEqual((len(continued), len(refused)), (2, 2))
        for client in refused:
            self.assertIn(b"request_bodies_full", client.data)
            self.assertIn(b"retry-after: 1", client.data)
        self.assertEqual(setup.listener.budget.used, 2 * len(body))
        continued[0].transport.write(body)
        yield poll_until(lambda: b"202 Accepted" in continued[0].data, 10, what="the upload")
        self.assertEqual(setup.listener.budget.used, len(body))
        self.assertEqual([e.body for e in list(setup.queue)], [b'{"a":1}'])
