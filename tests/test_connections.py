"""An orderly stop over real loopback TCP: idle keep-alive connections are
closed at once, a request being received gets its answer, and a client that
never finishes is cut off after the grace period."""

from __future__ import annotations

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.trial import unittest

from tests.support import (
    ListenerTestCase,
    RawClient,
    make_certificate,
    make_listener,
    make_workdir,
    poll_until,
)


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
