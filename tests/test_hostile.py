"""Hostile and broken clients: slow senders, oversized headers, too many
connections, malformed requests, and arbitrary bytes split anywhere."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import inlineCallbacks
from twisted.trial import unittest

from estat.codec import encode_batch
from estat.model import Batch
from tests.support import (
    Exchange,
    ListenerTestCase,
    RawClient,
    make_listener,
    poll_until,
    post_bytes,
)


class LimitTests(ListenerTestCase):
    def setUp(self) -> None:
        self.listen(request_timeout=10, max_headers=5, max_header_bytes=512, max_connections=3)

    def rejected(self, reason):
        return self.metric("estat_events_rejected_total", reason=reason)

    def test_a_request_must_arrive_within_the_timeout_even_when_trickled(self):
        client = Exchange(self.listener)
        request = post_bytes(b'{"a":1}')
        for i in range(9):
            client.send(request[i:i + 1])
            self.clock.advance(1)
        self.assertEqual(client.responses(), [])
        self.clock.advance(2)  # the reaper looks every second
        [(code, _, body)] = client.responses()
        self.assertEqual((code, json.loads(body)["error"], json.loads(body)["seconds"]),
                         (408, "request_timeout", 10))
        self.assertTrue(client.transport.disconnecting)
        self.assertEqual(self.rejected("request_timeout"), 1)

    def test_idle_keep_alive_connection_is_not_a_slow_request(self):
        client = Exchange(self.listener)
        client.send(post_bytes(b'{"a":1}'))
        self.clock.advance(30)
        self.assertEqual([r[0] for r in client.responses()], [202])
        client.send(post_bytes(b'{"a":2}'))
        self.assertEqual([r[0] for r in client.responses()], [202, 202])
        self.assertFalse(client.transport.disconnecting)

    def test_too_many_or_too_large_headers_are_431(self):
        many = b"".join(b"X-H%d: v\r\n" % i for i in range(6))
        big = b"X-Big: " + b"v" * 600 + b"\r\n"
        for extra in (many, big):
            client = Exchange(self.listener)
            client.send(post_bytes(b'{"a":1}', extra=extra))
            [(code, _, body)] = client.responses()
            self.assertEqual((code, json.loads(body)["error"]), (431, "headers_too_large"))
            self.assertTrue(client.transport.disconnecting)
        client = Exchange(self.listener)
        client.send(b"POST /" + b"c" * 1000 + b" HTTP/1.1\r\n")
        [(code, _, _)] = client.responses()
        self.assertEqual(code, 431)
        self.assertEqual(list(self.queue), [])

    def test_malformed_requests_get_a_json_400(self):
        for raw in (b"POST /collect HTTP/1.1\r\nContent-Length: x\r\n\r\n",
                    b"GARBAGE\r\n\r\n",
                    b"POST /collect HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"):
            client = Exchange(self.listener)
            client.send(raw)
            [(code, _, body)] = client.responses()
            self.assertEqual((code, json.loads(body)["error"]), (400, "bad_request"), raw)

    def test_connections_over_the_limit_get_503_and_are_closed(self):
        """When every open connection is busy (an idle one would be closed
        to make room instead)."""
        clients = [Exchange(self.listener) for _ in range(3)]
        for client in clients:
            client.send(post_bytes(b'{"a":1}')[:20])
        from twisted.internet.testing import StringTransport

        extra = self.listener.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
        transport = StringTransport()
        extra.makeConnection(transport)
        self.assertIn(b"503 Service Unavailable", transport.value())
        self.assertIn(b"too_many_connections", transport.value())
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.rejected("too_many_connections"), 1)
        for client in clients:
            client.send(post_bytes(b'{"a":1}')[20:])
            self.assertEqual(client.responses()[0][0], 202)


class SlowlorisTests(unittest.TestCase):
    """Over real loopback TCP: slow connections do not stop a normal client."""

    @inlineCallbacks
    def test_normal_client_served_while_slow_clients_trickle(self):
        setup = make_listener(request_timeout=10)
        queue = setup.queue
        port = reactor.listenTCP(0, setup.listener, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
        slow = []
        for _ in range(8):
            client = RawClient()
            yield connectProtocol(endpoint, client)
            self.addCleanup(client.transport.abortConnection)
            client.transport.write(b"POST /collect HTTP/1.1\r\nHost: x\r\nContent-Le")
            slow.append(client)
        normal = RawClient()
        yield connectProtocol(endpoint, normal)
        self.addCleanup(normal.transport.abortConnection)
        for i in range(20):
            normal.transport.write(post_bytes(b'{"n":%d}' % i))
        yield poll_until(lambda: normal.data.count(b"202 Accepted") == 20, 5,
                         what="the normal client's 20 answers")
        self.assertEqual(len(list(queue)), 20)
        self.assertTrue(all(client.data == b"" for client in slow))


class RequestPathProperties(unittest.TestCase):
    """Arbitrary bodies, split at arbitrary points: never a 5xx, never an
    exception, and every accepted body reads back byte-identical."""

    @settings(max_examples=200, deadline=None)
    @given(body=st.one_of(st.binary(max_size=80),
                          st.dictionaries(st.text(max_size=6), st.text(max_size=10), max_size=4)
                          .map(lambda d: json.dumps(d, ensure_ascii=False).encode())),
           ctype=st.sampled_from([b"application/json", b"application/x-ndjson", b"text/plain",
                                  b"application/x-www-form-urlencoded"]),
           chunked=st.booleans(), cuts=st.lists(st.integers(0, 400), max_size=6))
    def test_any_body_any_split(self, body, ctype, chunked, cuts):
        setup = make_listener()
        listener, queue = setup.listener, setup.queue
        if chunked:
            raw = (b"POST /collect HTTP/1.1\r\nHost: x\r\nContent-Type: %s\r\n"
                   b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n"
                   % (ctype, len(body), body)) if body else post_bytes(body, ctype)
        else:
            raw = post_bytes(body, ctype)
        client = Exchange(listener)
        client.send_in_pieces(raw, cuts)
        [(code, _, answer)] = client.responses()
        self.assertIn(code, (202, 400, 413, 415), answer)
        self.assertIn("status" if code == 202 else "error", json.loads(answer))
        self.assertEqual(self.flushLoggedErrors(), [])
        if code == 202:
            self.assertTrue(list(queue))
            events = list(queue)
            if ctype != b"application/x-ndjson":
                self.assertEqual(events, [(1, body, "")])
            [obj] = encode_batch(Batch.of_events(events, 0, "ID", "size"), validated=True, prefix="raw",
                                 raw_prefix="raw_dlq", host_id="h")
            import gzip

            lines = gzip.decompress(obj.data).splitlines()
            self.assertEqual([json.loads(l)["body"] for l in lines],
                             [json.loads(e.body) for e in events])
        else:
            self.assertEqual(list(queue), [])


class ArbitraryBytesProperties(unittest.TestCase):
    """Whatever bytes arrive, split anywhere, the channel never raises, and
    everything it writes is whole HTTP/1.1 responses with JSON bodies."""

    @settings(max_examples=300, deadline=None)
    @given(head=st.lists(st.sampled_from([
        b"POST /collect HTTP/1.1\r\n", b"GET /healthz HTTP/1.0\r\n", b"Host: x\r\n",
        b"Content-Length: 7\r\n", b"Content-Length: -1\r\n", b"Transfer-Encoding: chunked\r\n",
        b"Content-Encoding: gzip\r\n", b"Expect: 100-continue\r\n", b"Connection: close\r\n",
        b"Content-Type: application/x-ndjson\r\n", b"Upgrade: h2c\r\n", b"\r\n",
        b"Connection: Upgrade, HTTP2-Settings\r\n", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        b'{"a":1}', b"7\r\n{\"a\":1}\r\n0\r\n\r\n"]), max_size=12),
        noise=st.binary(max_size=40), cuts=st.lists(st.integers(0, 300), max_size=5))
    def test_never_raises_and_answers_whole_responses(self, head, noise, cuts):
        listener = make_listener(max_headers=8, max_header_bytes=256).listener
        raw = b"".join(head) + noise
        client = Exchange(listener)
        client.send_in_pieces(raw, cuts)
        out = client.transport.value().replace(b"HTTP/1.1 100 Continue\r\n\r\n", b"")
        for code, headers, body in Exchange.parse(out):
            self.assertTrue(code < 500 or code == 505, code)  # 505: HTTP/2 prior knowledge
            self.assertIn(b"error" if code >= 400 else b"status", body)
            self.assertEqual(int(headers[b"content-length"]), len(body))
        self.assertEqual(self.flushLoggedErrors(), [])
        client.transport.loseConnection()
        client.channel.connectionLost()
        self.assertEqual((listener.budget.used, listener.lines_expected), (0, 0))
