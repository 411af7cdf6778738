"""socketwrite.write over real loopback TCP: sent at once when nothing is
buffered, and in order, through Twisted's buffer, when something is or when
the socket takes only part of it."""

from __future__ import annotations

from typing import Optional

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from estat.http import socketwrite


class _Server(Protocol):
    def connectionMade(self) -> None:
        self.factory.connected.callback(self)  # type: ignore[attr-defined]


class _Reader(Protocol):
    """Keeps what arrives; `wait_for(n)` fires once n bytes have."""

    def __init__(self) -> None:
        self.received = bytearray()
        self._want = 0
        self._waiter: Optional[Deferred[bytes]] = None

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        self._check()

    def wait_for(self, count: int) -> Deferred[bytes]:
        self._want = count
        self._waiter = Deferred()
        waiter = self._waiter
        self._check()
        return waiter

    def _check(self) -> None:
        if self._waiter is not None and len(self.received) >= self._want:
            waiter, self._waiter = self._waiter, None
            waiter.callback(bytes(self.received))


def _buffered(transport: object) -> int:
    """Bytes waiting in a tcp.Connection's write buffer."""
    return (len(transport.dataBuffer) - transport.offset  # type: ignore[attr-defined]
            + transport._tempDataLen)  # type: ignore[attr-defined]


class SocketWriteTests(unittest.TestCase):
    @inlineCallbacks
    def setUp(self):
        factory = Factory.forProtocol(_Server)
        factory.connected = Deferred()
        self.port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        self.reader = _Reader()
        client = yield connectProtocol(
            TCP4ClientEndpoint(reactor, "127.0.0.1", self.port.getHost().port), self.reader)
        self.addCleanup(client.transport.loseConnection)
        self.server = yield factory.connected
        self.addCleanup(self.server.transport.loseConnection)

    @inlineCallbacks
    def test_with_nothing_buffered_the_bytes_are_sent_at_once(self):
        socketwrite.write(self.server.transport, b"HTTP/1.1 202 Accepted\r\n\r\n")
        self.assertEqual(_buffered(self.server.transport), 0)
        received = yield self.reader.wait_for(25)
        self.assertEqual(received, b"HTTP/1.1 202 Accepted\r\n\r\n")

    @inlineCallbacks
    def test_bytes_already_buffered_go_first(self):
        self.server.transport.write(b"first;")  # buffered until the reactor runs
        socketwrite.write(self.server.transport, b"second")
        self.assertEqual(_buffered(self.server.transport), 12)
        received = yield self.reader.wait_for(12)
        self.assertEqual(received, b"first;second")

    @inlineCallbacks
    def test_what_the_socket_does_not_take_is_buffered_in_order(self):
        big = bytes(range(256)) * (64 * 1024)  # 16 MiB: more than a socket buffer
        socketwrite.write(self.server.transport, big)
        self.assertGreater(_buffered(self.server.transport), 0)
        self.assertLess(_buffered(self.server.transport), len(big))
        socketwrite.write(self.server.transport, b"tail")
        received = yield self.reader.wait_for(len(big) + 4)
        self.assertEqual(received, big + b"tail")

    def test_any_other_transport_is_written_to(self):
        transport = StringTransport()
        socketwrite.write(transport, b"answer")
        self.assertEqual(transport.value(), b"answer")

    @inlineCallbacks
    def test_a_closing_connection_takes_the_buffered_path(self):
        self.server.transport.loseConnection()
        socketwrite.write(self.server.transport, b"last")
        self.assertEqual(_buffered(self.server.transport), 4)  # sent before the close
        received = yield self.reader.wait_for(4)
        self.assertEqual(received, b"last")
