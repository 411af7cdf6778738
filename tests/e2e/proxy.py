"""A TCP proxy in front of the S3 endpoint, run on the caller's reactor, that
can make S3 unavailable or slow without touching the S3 process:

- ``pass``: forward bytes both ways (optionally delaying what the client
  sends by ``delay`` seconds, so every PUT is that much slower; `set_delay`
  changes it without breaking connections);
- ``refuse``: stop listening, so connections are refused (ECONNREFUSED);
- ``hang``: accept connections, read and discard what arrives, never answer.

Changing the mode aborts every open connection, so pooled keep-alive
connections cannot carry on in the old mode. In ``pass`` mode,
`hold_answers(n)` makes the next `n` connections that get an answer keep it
from the client (the server did the work; the client times out and
retries), as when an answer is lost on the way.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Optional

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.interfaces import IDelayedCall, IListeningPort
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.python.failure import Failure

MODES = ("pass", "refuse", "hang")


class _Upstream(Protocol):
    """The proxy's connection to the real server."""

    def __init__(self, downstream: "_Downstream") -> None:
        self.downstream = downstream

    def connectionMade(self) -> None:
        self.downstream.proxy.upstreams.add(self)
        self.downstream.upstream_ready(self)

    def dataReceived(self, data: bytes) -> None:
        self.downstream.from_upstream(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.downstream.proxy.upstreams.discard(self)
        self.downstream.upstream_lost()
        self.downstream.proxy.connection_closed()


class _UpstreamFactory(ClientFactory):
    def __init__(self, downstream: "_Downstream") -> None:
        self.downstream = downstream

    def buildProtocol(self, addr: Any) -> _Upstream:
        return _Upstream(self.downstream)

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        self.downstream.upstream_lost()


class _Downstream(Protocol):
    """One accepted connection from the client (the server under test)."""

    def __init__(self, proxy: "FaultProxy") -> None:
        self.proxy = proxy
        self.mode = proxy.mode
        self.upstream: Optional[_Upstream] = None
        self._unsent: list[bytes] = []  # before the upstream connection is up
        self._delayed: deque[tuple[float, bytes]] = deque()
        self._timer: Optional[IDelayedCall] = None
        self._connector: Any = None
        self.closed = False
        self.holding = False  # this connection's answers are kept from the client

    def connectionMade(self) -> None:
        self.proxy.connections.add(self)
        self.proxy.accepted += 1
        if self.mode == "pass":
            self._connector = self.proxy.reactor.connectTCP(
                self.proxy.target_host, self.proxy.target_port, _UpstreamFactory(self),
                timeout=5)

    def dataReceived(self, data: bytes) -> None:
        if self.mode != "pass":
            return  # hang: swallow the request, never answer
        delay = self.proxy.delay
        if delay > 0 or self._delayed:
            self._delayed.append((self.proxy.reactor.seconds() + delay, data))
            self._schedule()
        else:
            self._forward(data)

    def _schedule(self) -> None:
        if self._timer is not None or not self._delayed:
            return
        due = self._delayed[0][0]
        wait = max(0.0, due - self.proxy.reactor.seconds())
        self._timer = self.proxy.reactor.callLater(wait, self._release)

    def _release(self) -> None:
        self._timer = None
        now = self.proxy.reactor.seconds()
        while self._delayed and self._delayed[0][0] <= now + 1e-6:
            self._forward(self._delayed.popleft()[1])
        self._schedule()

    def _forward(self, data: bytes) -> None:
        if self.upstream is not None:
            self.upstream.transport.write(data)
        else:
            self._unsent.append(data)

    def upstream_ready(self, upstream: _Upstream) -> None:
        if self.closed:
            upstream.transport.abortConnection()
            return
        self.upstream = upstream
        for data in self._unsent:
            upstream.transport.write(data)
        self._unsent = []

    def from_upstream(self, data: bytes) -> None:
        if not self.holding and self.proxy.answers_to_hold > 0:
            self.proxy.answers_to_hold -= 1
            self.proxy.held_answers += 1
            self.holding = True
        if not self.closed and not self.holding:
            self.transport.write(data)

    def upstream_lost(self) -> None:
        if not self.closed:
            self.transport.loseConnection()

    def abort(self) -> None:
        self.transport.abortConnection()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.closed = True
        self.proxy.connections.discard(self)
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._delayed.clear()
        if self.upstream is not None:
            self.upstream.transport.abortConnection()
        elif self._connector is not None:
            self._connector.disconnect()
        self.proxy.connection_closed()


class _DownstreamFactory(Factory):
    def __init__(self, proxy: "FaultProxy") -> None:
        self.proxy = proxy

    def buildProtocol(self, addr: Any) -> _Downstream:
        return _Downstream(self.proxy)


class FaultProxy:
    """Listens on 127.0.0.1 (a fixed port once started) and forwards to
    `target_host:target_port` according to `mode` (see the module doc)."""

    def __init__(self, reactor: Any, target_host: str, target_port: int) -> None:
        self.reactor = reactor
        self.target_host = target_host
        self.target_port = target_port
        self.mode = "pass"
        self.delay = 0.0
        self.port = 0
        self.accepted = 0
        self.answers_to_hold = 0
        self.held_answers = 0
        self.connections: set[_Downstream] = set()
        self.upstreams: set[_Upstream] = set()
        self._listening: Optional[IListeningPort] = None
        self._gone_waiters: list[tuple[set[Any], Deferred[None]]] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self._listen()

    def _listen(self) -> None:
        if self._listening is None:
            self._listening = self.reactor.listenTCP(
                self.port, _DownstreamFactory(self), interface="127.0.0.1")
            self.port = self._listening.getHost().port

    @inlineCallbacks
    def set_mode(self, mode: str, delay: float = 0.0):  # type: ignore[no-untyped-def]
        """Switch mode (and the pass-through delay); open connections are
        aborted. Fires once the new mode is in force."""
        if mode not in MODES:
            raise ValueError(f"unknown proxy mode {mode!r}")
        self.mode, self.delay = mode, delay
        if mode == "refuse" and self._listening is not None:
            listening, self._listening = self._listening, None
            yield listening.stopListening()
        yield self._abort_all()
        if mode != "refuse":
            self._listen()

    def hold_answers(self, count: int) -> None:
        """Keep the answers of the next `count` answered connections from
        their clients (see the module docstring)."""
        self.answers_to_hold = count

    def set_delay(self, delay: float) -> None:
        """Change the pass-through delay of what clients send from now on,
        on open connections too (nothing is aborted)."""
        self.delay = delay

    def _abort_all(self) -> "Deferred[None]":
        """Abort every open connection; fire once those are gone. Only
        those: a client may open new ones meanwhile (in `hang` mode they
        never close), and waiting for them too would wait for ever."""
        doomed: set[Any] = self.connections | self.upstreams
        for connection in list(self.connections):
            connection.abort()
        for upstream in list(self.upstreams):
            upstream.transport.abortConnection()
        waiter: Deferred[None] = Deferred()
        self._gone_waiters.append((doomed, waiter))
        self.connection_closed()
        return waiter

    def connection_closed(self) -> None:
        """Fire the waiters whose aborted connections are all gone."""
        still_open = self.connections | self.upstreams
        ready = [waiter for doomed, waiter in self._gone_waiters if not doomed & still_open]
        self._gone_waiters = [(doomed, waiter) for doomed, waiter in self._gone_waiters
                              if doomed & still_open]
        for waiter in ready:  # after the list is settled: a callback may abort again
            waiter.callback(None)

    @inlineCallbacks
    def stop(self):  # type: ignore[no-untyped-def]
        """Stop listening and abort every connection (for cleanups)."""
        if self._listening is not None:
            listening, self._listening = self._listening, None
            yield listening.stopListening()
        yield self._abort_all()
