"""The ingest listener's HTTP/1.1 server: a Twisted Protocol whose requests
are parsed by httptools (llhttp, Node.js's parser) instead of twisted.web,
whose own machinery cost more than all of estat's work per request (see
bench/README.md).

The listener is the protocol only: the handler it is given turns each
request into an `Answer`, the `Limits` it is given bound every request, and
it reports what it answers and refuses to the counters it is given.

A connection answers each request as soon as its body is complete, in
order, so pipelining and keep-alive need no queue. It defends itself: a
body over its limit is refused before it is read (413, no `100 Continue`),
a whole request must arrive within REQUEST_TIMEOUT of its first byte (408),
header limits get 431, anything llhttp cannot parse gets 400, and it stops
reading while the client does not read its answers. The listener knows its
connections, so a stop can close the idle ones and wait for the busy ones.
"""

from __future__ import annotations

import typing
from collections import deque
from typing import Callable, Optional, Union, cast

from httptools import (
    HttpParserCallbackError,
    HttpParserError,
    HttpParserUpgrade,
    HttpRequestParser,
)
from prometheus_client import Counter
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import (
    IAddress,
    IConsumer,
    IPushProducer,
    IReactorTime,
    ITCPTransport,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from estat.http.limits import Limits
from estat.http.request import IngestRequest, TooLarge
from estat.http.response import Answer, error_body, raw_error, response
from estat.lifecycle import Lifecycle
from estat.loops import guarded

_log = Logger()
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_KEEP_ALIVE = ((b"connection", b"keep-alive"),)
_FEED_BYTES = 16 * 1024  # input parsed between two checks for a paused client


class ListenerCounters(typing.Protocol):
    """What the listener reports, to whoever keeps the metrics: every
    answer by status code, every refusal by reason, and how many
    connections are open."""

    def count_response(self, code: int) -> None: ...

    def count_rejected(self, reason: str) -> None: ...

    def gauge_connections(self, count: Callable[[], int]) -> None:
        """Report `count()` as the number of open connections."""

    @property
    def loop_errors(self) -> Counter:
        """Where the reaper's unexpected errors are counted (by `loop`)."""


# A handler answers at once, or with a Deferred (durable mode: the answer
# waits for an fsync); the channel writes answers in request order either way.
Handler = Callable[[IngestRequest], Union[Answer, "Deferred[Answer]"]]


class _Stop(Exception):
    """Raised in a parser callback to stop parsing this connection's input:
    it was refused, or its last answer closes it."""


@implementer(IPushProducer)
class IngestChannel(Protocol):
    """One client connection; see the module docstring."""

    factory: IngestListener

    def __init__(self, listener: IngestListener) -> None:
        self.factory = listener
        self.handler = listener.handler
        self.limits = listener.limits
        self.counters = listener.counters
        self.lifecycle = listener.lifecycle
        self.parser = HttpRequestParser(self)
        # The connection.
        self.last_active = 0.0  # when input last arrived
        self._network: Optional[IPushProducer] = None  # the transport, when it can pause reading
        self._paused = False  # the client is not reading its answers
        self._held: Optional[memoryview] = None  # input not parsed while paused
        self._out: list[bytes] = []  # answers not written yet
        # Answers that wait for a Deferred, and those behind them, in
        # request order: [response bytes or None while waiting, close].
        self._waiting: deque[list] = deque()
        self._parsing = False  # inside feed_data: its end writes the answers
        self._messages = 0  # requests begun on this connection
        self._done = False  # answered for the last time: ignore what still arrives
        self._closing = False  # loseConnection was called
        self._closing_at = 0.0
        # The request being received.
        self.started: Optional[float] = None  # when its first byte arrived
        self._in_message = False
        self._new_request()

    def _new_request(self) -> None:
        """Forget what the parser saw of the last request's head."""
        self._request: Optional[IngestRequest] = None  # once the headers are complete
        self._url: list[bytes] = []
        self._headers: dict[bytes, bytes] = {}
        self._header_count = 0
        self._header_bytes = 0
        self._head_bytes = 0  # input parsed while the head had not ended

    def connectionMade(self) -> None:
        listener = self.factory
        self.last_active = listener.reactor.seconds()
        listener.channels.add(self)
        transport = self.transport
        if ITCPTransport.providedBy(transport):
            cast(ITCPTransport, transport).setTcpNoDelay(True)  # as twisted.web does
        # Like twisted.web, pause reading only where the transport can.
        self._network = IPushProducer(transport, None)
        if self._network is not None:
            cast(IConsumer, transport).registerProducer(self, True)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._done = True
        self._waiting.clear()  # answers still to come are dropped
        self.started = None
        self.factory.channel_closed(self)

    def idle(self) -> bool:
        """No request is arriving on this connection, nor waiting for its
        answer."""
        return not self._in_message and not self._waiting

    # Reading

    def dataReceived(self, data: bytes) -> None:
        if self._done:
            return
        now = self.factory.reactor.seconds()
        self.last_active = now
        if self.started is None:
            self.started = now
        if self._held is not None:  # input arriving while paused (TLS buffers)
            self._held = memoryview(bytes(self._held) + data)
        elif len(data) <= _FEED_BYTES and not self._paused and not self._waiting:
            self._parse(data)
        else:
            self._feed(memoryview(data))

    def _feed(self, data: memoryview) -> None:
        """Parse a piece at a time, writing its answers, and keep the rest
        while the client is not reading them: one read of tiny pipelined
        requests would otherwise turn into ~8 times its size in answers."""
        while data and not self._done:
            if self._paused or self._waiting:
                self._held = data
                if self._waiting and self._network is not None:
                    self._network.pauseProducing()  # read no more until answered
                return
            piece, data = data[:_FEED_BYTES], data[_FEED_BYTES:]
            self._parse(piece)

    def _parse(self, data: bytes | memoryview) -> None:
        head_before = self._in_message and self._request is None
        message = self._messages
        self._parsing = True
        try:
            self.parser.feed_data(data)
        except HttpParserCallbackError as error:
            # A callback raises _Stop to make llhttp stop at once (a callback
            # has no other way to stop it), and httptools reports any
            # exception from a callback as HttpParserCallbackError with the
            # original as its __context__. Anything but _Stop is a bug.
            if not isinstance(error.__context__, _Stop):
                raise
        except HttpParserUpgrade:
            self._finish(raw_error(400, "bad_request", detail="upgrade_not_supported"),
                         400, "bad_request")
        except HttpParserError:
            self._finish(raw_error(400, "bad_request"), 400, "bad_request")
        finally:
            self._parsing = False
        if not self._in_message:
            self.started = None
        elif (head_before and message == self._messages and self._request is None
              and not self._done):
            # httptools holds a header until its end: bound what it holds
            # (the piece in which a request began is bounded by its size).
            self._head_bytes += len(data)
            if self._head_bytes > self.limits.max_head_bytes:
                try:
                    self._refuse_headers()
                except _Stop:
                    pass
        self._flush()

    def _flush(self) -> None:
        out = self._out
        if out:
            self._out = []
            transport = self.transport
            assert transport is not None
            transport.write(out[0] if len(out) == 1 else b"".join(out))
        if (self._done and not self._closing and not self._waiting
                and self.transport is not None):
            self._closing = True
            self._closing_at = self.factory.reactor.seconds()
            if self._network is not None:
                # A registered producer would keep a paused transport open.
                cast(IConsumer, self.transport).unregisterProducer()
            self.transport.loseConnection()

    # httptools callbacks, in the order a request arrives

    def on_message_begin(self) -> None:
        self._messages += 1
        self._in_message = True
        self._new_request()

    def on_url(self, url: bytes) -> None:
        self._url.append(url)
        if sum(map(len, self._url)) > self.limits.max_header_bytes:
            self._refuse_headers()

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        self._header_bytes += len(name) + len(value) + 4
        limits = self.limits
        if (self._header_count > limits.max_headers
                or self._header_bytes > limits.max_header_bytes):
            self._refuse_headers()
        self._headers.setdefault(name.lower(), value)

    def on_headers_complete(self) -> None:
        limits = self.limits
        request = self._request = IngestRequest(
            self.parser.get_method(), b"".join(self._url), self._headers,
            limits.max_body_size, limits.max_batch_body_size)
        try:
            request.check_declared_length()
        except TooLarge as too_large:
            self._refuse(413, "too_large", max_bytes=too_large.limit)
        expect = self._headers.get(b"expect")
        if expect is not None and expect.lower() == b"100-continue":
            self._out.append(_CONTINUE)
            self._flush()

    def on_body(self, data: bytes) -> None:
        assert self._request is not None
        try:
            self._request.add_body(data)
        except TooLarge as too_large:
            self._refuse(413, "too_large", max_bytes=too_large.limit)

    def on_message_complete(self) -> None:
        request = self._request
        assert request is not None
        self._in_message = False
        self._request = None
        if self.parser.should_upgrade():
            return  # answered by dataReceived's HttpParserUpgrade
        request.body_complete()
        try:
            answer = self.handler(request)
        except Exception:
            _log.failure("unexpected error handling {method} {path}",
                         method=request.method, path=request.path)
            answer = Answer(500, error_body("internal_error"))
        keep_alive = self.parser.should_keep_alive()
        if isinstance(answer, Deferred) or self._waiting:
            if self._answer_later(request, answer, keep_alive):
                self._done = True  # closes once the answers before it are written
                raise _Stop()
            return
        written, close = self._response(request, answer, keep_alive)
        self._out.append(written)
        if close:
            self._done = True
            raise _Stop()

    def _response(self, request: IngestRequest, answer: Answer,
                  keep_alive: bool) -> tuple[bytes, bool]:
        """The bytes of `answer`, and whether the connection closes after."""
        close = answer.close or self.lifecycle.stopping or not keep_alive
        headers = answer.headers
        if not close and b"connection" in request.headers:
            # An HTTP/1.0 client keeps the connection only if told it stays.
            headers += _KEEP_ALIVE
        self.counters.count_response(answer.code)
        return response(answer.code, answer.body, headers, close,
                        head_only=request.method == b"HEAD"), close

    def _answer_later(self, request: IngestRequest,
                      answer: "Answer | Deferred[Answer]", keep_alive: bool) -> bool:
        """Queue the answer behind those waiting; input that arrives
        meanwhile is held and reading stops (see `_feed`), as for a client
        that does not read, until they are all written. True when the
        answer is known already and closes the connection."""
        slot: list = [None, False]
        self._waiting.append(slot)

        def ready(done: Answer) -> None:
            if not self._waiting or slot not in self._waiting:
                return  # the connection is gone
            slot[0], slot[1] = self._response(request, done, keep_alive)
            self._release_answers()

        def failed(failure: Failure) -> None:
            _log.failure("unexpected error handling {method} {path}", failure,
                         method=request.method, path=request.path)
            ready(Answer(500, error_body("internal_error")))

        if isinstance(answer, Deferred):
            answer.addCallbacks(ready, failed)
        else:
            ready(answer)
        return slot[0] is not None and slot[1]

    def _release_answers(self) -> None:
        """Move the answers ready at the head of the line to the output;
        once none waits, write them and read again."""
        waiting = self._waiting
        while waiting and waiting[0][0] is not None:
            written, close = waiting.popleft()
            self._out.append(written)
            if close:
                self._done = True
                waiting.clear()
        if waiting or self._parsing:
            return  # the parse under way flushes
        self._flush()
        if not self._done and not self._paused:
            self.resumeProducing()

    # Refusals: answer, close, and stop reading

    def _refuse_headers(self) -> None:
        limits = self.limits
        self._refuse(431, "headers_too_large", max_headers=limits.max_headers,
                     max_bytes=limits.max_header_bytes)

    def _refuse(self, code: int, error: str, **details: object) -> None:
        """Answer `code` and close; called from parser callbacks."""
        self._finish(raw_error(code, error, **details), code, error)
        raise _Stop()

    def _finish(self, answer: bytes, code: int, reason: str) -> None:
        if self._done:
            return
        self._done = True
        self._in_message = False
        self._request = None
        self.started = None
        self.counters.count_response(code)
        self.counters.count_rejected(reason)
        self._out.append(answer)

    def reap(self, now: float) -> None:
        """408 for a request still arriving after the request timeout; close
        a connection idle for the idle timeout; abort one whose client has
        not taken its last answer a request timeout after the close (a close
        waits for the answers to be sent, so they would stay in memory)."""
        request_timeout = self.limits.request_timeout
        if self._closing:
            if now - self._closing_at > request_timeout and self.transport is not None:
                cast(ITCPTransport, self.transport).abortConnection()
            return
        if self._done:
            return
        if self.started is not None and now - self.started > request_timeout:
            self._finish(raw_error(408, "request_timeout", seconds=request_timeout),
                         408, "request_timeout")
            self._flush()
        elif self.started is None and now - self.last_active > self.limits.idle_timeout:
            self._done = True
            self._flush()

    def close_if_idle(self) -> None:
        if not self._in_message and not self._done:
            self._done = True
            self._flush()

    # IPushProducer: stop reading while the client does not read its answers

    def pauseProducing(self) -> None:
        self._paused = True
        if self._network is not None:
            self._network.pauseProducing()

    def resumeProducing(self) -> None:
        self._paused = False
        held, self._held = self._held, None
        if held is not None:
            self._feed(held)
        if (self._network is not None and not self._done and not self._paused
                and not self._waiting):
            self._network.resumeProducing()

    def stopProducing(self) -> None:
        self._done = True


class _TooManyConnections(Protocol):
    """Answers a connection over the limit with 503 and closes it."""

    def connectionMade(self) -> None:
        assert self.transport is not None  # makeConnection set it
        self.transport.write(raw_error(503, "too_many_connections"))
        self.transport.loseConnection()


class IngestListener(Factory):
    """Builds the ingest listener's connections, each answering with
    `handler` within `limits` and reporting to `counters` (and closing
    after its answer once `lifecycle` is stopping); reaps slow requests and
    idle connections while it listens, and closes them all for an orderly
    stop with `close_connections`."""

    def __init__(self, *, handler: Handler, limits: Limits, counters: ListenerCounters,
                 lifecycle: Lifecycle, reactor: IReactorTime) -> None:
        self.handler = handler
        self.limits = limits
        self.counters = counters
        self.lifecycle = lifecycle
        self.reactor = reactor
        self.channels: set[IngestChannel] = set()
        self._closed_waiters: list[Deferred[None]] = []
        self._reaper: Optional[LoopingCall] = None
        counters.gauge_connections(lambda: len(self.channels))

    def startFactory(self) -> None:
        """Start the reaper. It looks a few times per request timeout for
        requests arriving too slowly (a 408 comes at most a quarter of the
        timeout late) and for idle connections: one timer per listener, not
        one per request."""
        reaper = self._reaper = LoopingCall(guarded("reaper", self.counters.loop_errors,
                                                    self._reap))
        reaper.clock = self.reactor
        reaper.start(min(1.0, self.limits.request_timeout / 4), now=False)

    def stopFactory(self) -> None:
        if self._reaper is not None and self._reaper.running:
            self._reaper.stop()
        self._reaper = None

    def buildProtocol(self, addr: Optional[IAddress]) -> Optional[Protocol]:
        if len(self.channels) >= self.limits.max_connections:
            self.counters.count_rejected("too_many_connections")
            self.counters.count_response(503)
            return _TooManyConnections()
        return IngestChannel(self)

    def _reap(self) -> None:
        now = self.reactor.seconds()
        for channel in list(self.channels):
            channel.reap(now)

    def close_connections(self, grace: float) -> "Deferred[None]":
        """Close idle connections now; let busy ones finish their request
        (each closes after its answer) and abort what is left after
        `grace` seconds. Fires when every connection is gone. (The lifecycle
        is stopping by then, so each busy one closes after its answer.)"""
        for channel in list(self.channels):
            channel.close_if_idle()
        closed = self._all_closed()
        closed.addTimeout(grace, self.reactor, onTimeoutCancel=self._abort_all)
        return closed

    def _all_closed(self) -> "Deferred[None]":
        """Fires when no connection is left."""
        if not self.channels:
            return succeed(None)
        waiter: Deferred[None] = Deferred(canceller=self._closed_waiters.remove)
        self._closed_waiters.append(waiter)
        return waiter

    def _abort_all(self, timed_out: Optional[Failure], grace: float) -> "Deferred[None]":
        """The grace is over: abort every connection left, and fire once
        they are gone."""
        for channel in list(self.channels):
            if channel.transport is not None:
                # TCP, unix and TLS server transports all provide ITCPTransport.
                cast(ITCPTransport, channel.transport).abortConnection()
        return self._all_closed()

    def channel_closed(self, channel: IngestChannel) -> None:
        self.channels.discard(channel)
        if not self.channels and self._closed_waiters:
            waiters, self._closed_waiters = self._closed_waiters, []
            for waiter in waiters:
                waiter.callback(None)
