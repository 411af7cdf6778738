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
reading while the client does not read its answers. A new connection must
begin its first request within FIRST_REQUEST_TIMEOUT, and at MAX_CONNECTIONS
the longest-idle connection is closed to admit a new one (a 503 only when
every connection is busy), so silent sockets cannot lock clients out. The
listener knows its connections, so a stop can close the idle ones and wait
for the busy ones.
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
    IProtocolNegotiationFactory,
    IPushProducer,
    IReactorTime,
    ITCPTransport,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from estat.http import socketwrite
from estat.http.limits import BodyBudget, Limits
from estat.http.refusals import RefusalLog, reason_of
from estat.http.request import IngestRequest, TooLarge
from estat.http.response import Answer, Headers, error_body, raw_error, response
from estat.lifecycle import Lifecycle
from estat.loops import guarded

_log = Logger()
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_KEEP_ALIVE = ((b"connection", b"keep-alive"),)
_FEED_BYTES = 16 * 1024  # input parsed between two checks for a paused client
_PRIOR_KNOWLEDGE = "Pause on PRI/Upgrade"  # llhttp's error for the HTTP/2 preface


class ListenerCounters(typing.Protocol):
    """What the listener reports, to whoever keeps the metrics: every
    answer by status code, every refusal by reason, and how many
    connections are open."""

    def count_response(self, code: int) -> None: ...

    def count_rejected(self, reason: str) -> None: ...

    def count_evicted(self) -> None:
        """An idle connection was closed to admit a new one."""

    def gauge_connections(self, count: Callable[[], int]) -> None:
        """Report `count()` as the number of open connections."""

    @property
    def loop_errors(self) -> Counter:
        """Where the reaper's unexpected errors are counted (by `loop`)."""


# A handler answers at once, or with a Deferred (durable mode: the answer
# waits for an fsync); the channel writes answers in request order either way.
Handler = Callable[[IngestRequest], Union[Answer, "Deferred[Answer]"]]
# The headers every answer to a request with these headers carries (CORS),
# the channel's own refusals included.
AnswerHeaders = Callable[[dict[bytes, bytes]], Headers]
_RETRY_AFTER = ((b"retry-after", b"1"),)
_FIRST_SHARE = 64 * 1024  # what a body of unknown size takes at first
# What refuses a request of at least so many events before (the rest of)
# its body is read, when the event queue has no room for them: that answer,
# counted, or None to read on.
QueueRefusal = Callable[[int], Optional[Answer]]
_BAD_REQUEST = ("not a well-formed HTTP/1.1 request (framing, or both Content-Length and "
                "Transfer-Encoding)")


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
        self.budget = listener.budget
        self._max_headers = self.limits.max_headers
        self._max_header_bytes = self.limits.max_header_bytes
        self._share = 0  # bytes of the budget the request being received holds
        self._skipping: Optional[Answer] = None  # the answer of a body not read
        self._last_lines = 0  # lines of the last NDJSON body on this connection (at least)
        self._expected = 0  # lines counted in the listener's lines_expected for this request
        self.parser = HttpRequestParser(self)
        self._upgrade: Optional[IngestRequest] = None  # a request whose Upgrade is ignored
        # The connection.
        self.opened = 0.0  # when the connection was made
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
        self.opened = self.last_active = listener.reactor.seconds()
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
        self._give_back()
        self._waiting.clear()  # answers still to come are dropped
        self.started = None
        self.factory.channel_closed(self)

    def idle(self) -> bool:
        """No request is arriving on this connection, nor waiting for its
        answer."""
        return not self._in_message and not self._waiting

    @property
    def closing(self) -> bool:
        """Its last answer is written and the close has begun."""
        return self._closing

    def evictable(self) -> bool:
        """Idle and open, with nothing held to parse: closing it loses no
        request (it has none under way or waiting for its answer, or has
        never sent one)."""
        return (not self._in_message and not self._done and self._held is None
                and not self._waiting)

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
        except HttpParserUpgrade as upgrade:
            self._ignore_upgrade(data[upgrade.args[0]:])
        except HttpParserError as error:
            if self._url == [b"*"] and str(error) == _PRIOR_KNOWLEDGE:
                self._refuse_http2()
            else:
                self._finish(raw_error(400, "bad_request", detail=_BAD_REQUEST), 400,
                             "bad_request")
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

    def _ignore_upgrade(self, rest: bytes | memoryview) -> None:
        """Answer a request that asked for `Upgrade` (Java's HttpClient
        and `curl --http2` send `Upgrade: h2c`) in HTTP/1.1, as RFC 9110
        section 7.8 allows. llhttp stops at the end of its head and leaves
        the body to the other protocol, so a fresh parser reads the body
        after a made-up head that carries only the request's framing."""
        request = self._upgrade
        assert request is not None
        head = [b"POST / HTTP/%s\r\n" % self.parser.get_http_version().encode()]
        for name in (b"content-length", b"transfer-encoding", b"connection"):
            value = request.headers.get(name)
            if value is not None and not (name == b"connection"
                                          and b"keep-alive" not in value.lower()):
                head.append(b"%s: %s\r\n" % (name, value))
        head.append(b"\r\n")
        self.parser = HttpRequestParser(self)
        head.append(bytes(rest))
        self._parse(b"".join(head))  # the callbacks resume the same request

    def _refuse_http2(self) -> None:
        """HTTP/2 with prior knowledge (the `PRI * HTTP/2.0` preface):
        say in HTTP/1.1 which protocol this server speaks, and close."""
        self._finish(raw_error(505, "http_version_not_supported",
                               detail="this server speaks HTTP/1.1 only: send HTTP/1.1 "
                                      "requests, not HTTP/2 with prior knowledge"),
                     505, "http2_not_supported")

    def _flush(self) -> None:
        out = self._out
        if out:
            self._out = []
            transport = self.transport
            assert transport is not None
            socketwrite.write(transport, out[0] if len(out) == 1 else b"".join(out))
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
        if self._upgrade is not None:  # the made-up head after an Upgrade
            return
        self._messages += 1
        self._in_message = True
        self._new_request()

    def on_url(self, url: bytes) -> None:
        if self._upgrade is not None:
            return
        self._url.append(url)
        if sum(map(len, self._url)) > self.limits.max_header_bytes:
            self._refuse_headers()

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        self._header_bytes += len(name) + len(value) + 4
        if (self._header_count > self._max_headers
                or self._header_bytes > self._max_header_bytes):
            if self._upgrade is not None:
                return  # the made-up head's few headers are the request's own
            self._refuse_headers()
        self._headers.setdefault(name.lower(), value)

    def on_headers_complete(self) -> None:
        if self._upgrade is not None:
            self._request, self._upgrade = self._upgrade, None
            return
        limits = self.limits
        request = self._request = IngestRequest(
            self.parser.get_method(), b"".join(self._url), self._headers,
            limits.max_body_size, limits.max_batch_body_size, limits.path_body_limits)
        declared = self._headers.get(b"content-length")
        length = int(declared) if declared is not None else None
        try:
            request.check_declared_length(length)
        except TooLarge as too_large:
            self._refuse_too_large(too_large)
        share = length if length is not None else min(_FIRST_SHARE, request.limit)
        expect = self._headers.get(b"expect")
        continues = expect is not None and expect.lower() == b"100-continue"
        has_body = (b"transfer-encoding" in self._headers
                    or (length is not None and length > 0))
        # A batch is expected to hold as many lines as its connection's
        # last one (log shippers send batches of about one size), and the
        # batches being received hold room for theirs: when the queue has
        # less room than all of them, this one is refused unread rather
        # than read, inflated and refused once it is complete.
        expected = self._expected_lines(length) if request.is_batch else 1
        listener = self.factory
        refusal = (listener.queue_refusal(listener.lines_expected + expected)
                   if has_body else None)
        if refusal is not None:
            # Do not inflate and parse a body that cannot be taken: its bytes
            # are skipped as they arrive and the connection stays open. A
            # client waiting for 100 Continue is answered now (and closed: it
            # may send the body anyway).
            if continues:
                refusal = self._with_answer_headers(refusal)
                self._finish(response(refusal.code, refusal.body, refusal.headers, True),
                             refusal.code, reason_of(refusal.body), counted=True)
                raise _Stop()
            self._skip_body(refusal)
            return
        if request.is_batch:
            self._expected = expected
            listener.lines_expected += expected
        if share:
            self._take_share(share)
        if continues:
            self._out.append(_CONTINUE)
            self._flush()

    def _expected_lines(self, length: Optional[int]) -> int:
        """The lines this connection's next NDJSON batch is expected to
        hold: as many as its last one. A connection's first batch is
        expected to hold as many lines per byte sent as the listener's last
        complete batch: new connections that all send at once would
        otherwise each be read in full before one of them is refused (64
        log-shipper chunks, 40 MB held)."""
        if self._last_lines:
            return self._last_lines
        if length is None:
            return 1
        return max(1, int(length * self.factory.lines_per_byte))

    def on_body(self, data: bytes) -> None:
        if self._skipping is not None:
            return
        request = self._request
        assert request is not None
        try:
            request.add_body(data)
        except TooLarge as too_large:
            self._refuse_too_large(too_large)
        if request.lines and not self._room_for(request.lines):
            request.drop_body()
            self._give_back()
            return
        if request.held > self._share:
            # A chunked body: take twice as much, up to its limit.
            self._take_share(max(request.held, min(2 * self._share, request.limit))
                             - self._share)

    def _room_for(self, lines: int) -> bool:
        """Whether the queue has room for a batch of `lines` lines (an
        NDJSON batch holds at least as many events, but for blank ones);
        if not, the rest of the body is skipped rather than kept, inflated
        and parsed, and answered 503."""
        refusal = self.factory.queue_refusal(lines)
        if refusal is None:
            return True
        self._skip_body(refusal)
        return False

    def _with_answer_headers(self, answer: Answer) -> Answer:
        return answer._replace(headers=answer.headers + self.factory.answer_headers(self._headers))

    def _skip_body(self, refusal: Answer) -> None:
        """Skip the rest of this request's body; answer `refusal` once it
        has all arrived."""
        self._skipping = self._with_answer_headers(refusal)

    def _take_share(self, size: int) -> None:
        """Take `size` more bytes of the body budget for this request, or
        refuse it with 503 (before its body is read, or as it grows)."""
        if self.budget.take(size):
            self._share += size
            return
        self._refuse(503, "request_bodies_full", _RETRY_AFTER,
                     detail="too many request bodies are being received at once: "
                            "retry after Retry-After seconds")

    def _give_back(self) -> None:
        """The request is answered or gone: return its share of the body
        budget and of the lines expected."""
        if self._share:
            self.budget.give_back(self._share)
            self._share = 0
        if self._expected:
            self.factory.lines_expected -= self._expected
            self._expected = 0

    def _refuse_too_large(self, too_large: TooLarge) -> None:
        limit = too_large.limit
        if too_large.batch:
            detail = (f"a batch is at most {limit} bytes once inflated "
                      "(MAX_BATCH_BODY_SIZE): send smaller chunks")
        else:
            detail = (f"one event is at most {limit} bytes (MAX_BODY_SIZE): send "
                      "several events as application/x-ndjson or a JSON array")
        self._refuse(413, "too_large", max_bytes=limit, detail=detail)

    def on_message_complete(self) -> None:
        request = self._request
        assert request is not None
        if self.parser.should_upgrade():
            self._upgrade = request  # its body follows: see _ignore_upgrade
            return
        self._in_message = False
        self._request = None
        if self._skipping is None:
            try:
                request.body_complete(self._room_for)
            except TooLarge as too_large:
                self._refuse_too_large(too_large)
            if request.lines and self._skipping is None:
                self._room_for(request.lines)  # the queue may have filled since
        if request.lines:
            self._note_lines(request)
        if self._skipping is not None:
            refusal, self._skipping = self._skipping, None
            self._give_back()
            self._answer(request, refusal)
            return
        try:
            answer = self.handler(request)
        except Exception:
            _log.failure("unexpected error handling {method} {path}",
                         method=request.method, path=request.path)
            answer = Answer(500, error_body("internal_error"))
        self._give_back()  # what was accepted is counted by the queue now
        request.body = b""  # the queue holds what it took; an answer may wait long
        self._answer(request, answer)

    def _note_lines(self, request: IngestRequest) -> None:
        """Remember the lines of an NDJSON batch that has ended, to expect
        of the next ones (`_expected_lines`). One refused as it arrived or
        inflated has at least the lines counted so far."""
        if self._skipping is not None:
            self._last_lines = max(self._last_lines, request.lines)
            return
        self._last_lines = request.lines
        if request.held:
            self.factory.lines_per_byte = request.lines / request.held

    def _answer(self, request: IngestRequest, answer: "Answer | Deferred[Answer]") -> None:
        """Write `answer` now, or in its turn once those before it are
        ready; raise _Stop when it closes the connection."""
        keep_alive = self.parser.should_keep_alive()
        if not isinstance(answer, tuple) or self._waiting:  # an Answer is a tuple
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
        if answer.code >= 400:
            self._log_refusal(answer.code, reason_of(answer.body))
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
                     max_bytes=limits.max_header_bytes,
                     detail="send fewer or shorter headers (MAX_HEADERS, MAX_HEADER_BYTES)")

    def _refuse(self, code: int, error: str, headers: Headers = (), **details: object) -> None:
        """Answer `code` and close; called from parser callbacks."""
        if self._headers:
            headers += self.factory.answer_headers(self._headers)
        self._finish(raw_error(code, error, headers, **details), code, error)
        raise _Stop()

    def _finish(self, answer: bytes, code: int, reason: str, counted: bool = False) -> None:
        """Write the refusal `answer` and close (`counted`: its reason is
        counted already, by whoever made it)."""
        if self._done:
            return
        self._done = True
        self._in_message = False
        self._request = None
        self._give_back()
        self.started = None
        self.counters.count_response(code)
        if not counted:
            self.counters.count_rejected(reason)
        self._log_refusal(code, reason)
        if self._waiting:  # after the answers still to come, in request order
            self._waiting.append([answer, True])
        else:
            self._out.append(answer)

    def _log_refusal(self, code: int, reason: str) -> None:
        """Behind a `haproxy:` listener the transport's peer is the
        client's address from the PROXY header, not the balancer's."""
        transport = self.transport
        self.factory.refusals.refused(code, reason,
                                      transport.getPeer() if transport is not None else None)

    def reap(self, now: float) -> None:
        """408 for a request still arriving after the request timeout; close
        a new connection that has not begun a request within the first
        request timeout, and a keep-alive connection idle for the idle
        timeout; abort one whose client has not taken its last answer a
        request timeout after the close (a close waits for the answers to
        be sent, so they would stay in memory)."""
        request_timeout = self.limits.request_timeout
        if self._closing:
            if now - self._closing_at > request_timeout and self.transport is not None:
                cast(ITCPTransport, self.transport).abortConnection()
            return
        if self._done:
            return
        if self.started is not None and now - self.started > request_timeout:
            self._finish(raw_error(408, "request_timeout",
                                   self.factory.answer_headers(self._headers),
                                   seconds=request_timeout,
                                   detail="send the whole request within REQUEST_TIMEOUT "
                                          "seconds of its first byte"),
                         408, "request_timeout")
            self._flush()
        elif self.started is None and self._messages == 0:
            if now - self.opened > self.limits.first_request_timeout:
                self.counters.count_rejected("first_request_timeout")
                self.close_if_idle()
        elif self.started is None and now - self.last_active > self.limits.idle_timeout:
            self.close_if_idle()

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


def _last_active(channel: IngestChannel) -> float:
    return channel.last_active


class _TooManyConnections(Protocol):
    """Answers a connection over the limit with 503 and closes it."""

    def connectionMade(self) -> None:
        assert self.transport is not None  # makeConnection set it
        self.transport.write(raw_error(
            503, "too_many_connections", _RETRY_AFTER,
            detail="MAX_CONNECTIONS connections are open: retry after Retry-After seconds"))
        self.transport.loseConnection()


@implementer(IProtocolNegotiationFactory)
class IngestListener(Factory):
    """Builds the ingest listener's connections, each answering with
    `handler` within `limits` and reporting to `counters` (and closing
    after its answer once `lifecycle` is stopping); reaps slow requests and
    idle connections while it listens, and closes them all for an orderly
    stop with `close_connections`.

    On a TLS listener it offers `http/1.1` by ALPN: Twisted's TLS always
    installs an ALPN callback, which aborts the handshake (an internal-error
    alert) for every client that offers ALPN unless the factory names its
    protocols."""

    def __init__(self, *, handler: Handler, limits: Limits, counters: ListenerCounters,
                 lifecycle: Lifecycle, reactor: IReactorTime,
                 answer_headers: AnswerHeaders = lambda headers: (),
                 queue_refusal: QueueRefusal = lambda events: None) -> None:
        self.handler = handler
        self.answer_headers = answer_headers
        self.queue_refusal = queue_refusal
        self.budget = BodyBudget(limits.max_receiving_bytes)
        # Lines the NDJSON batches being received are expected to hold, and
        # lines per byte received of the last complete one.
        self.lines_expected = 0
        self.lines_per_byte = 0.0
        self.limits = limits
        self.counters = counters
        self.lifecycle = lifecycle
        self.reactor = reactor
        self.channels: set[IngestChannel] = set()
        self.refusals = RefusalLog(reactor)
        self._closed_waiters: list[Deferred[None]] = []
        self._reaper: Optional[LoopingCall] = None
        counters.gauge_connections(lambda: len(self.channels))

    def startFactory(self) -> None:
        """Start the reaper. It looks a few times per timeout for requests
        arriving too slowly (a 408 comes at most a quarter of the timeout
        late), for connections that send nothing and for idle ones: one
        timer per listener, not one per request."""
        reaper = self._reaper = LoopingCall(guarded("reaper", self.counters.loop_errors,
                                                    self._reap))
        reaper.clock = self.reactor
        limits = self.limits
        reaper.start(min(1.0, limits.request_timeout / 4, limits.first_request_timeout / 4),
                     now=False)

    def stopFactory(self) -> None:
        if self._reaper is not None and self._reaper.running:
            self._reaper.stop()
        self._reaper = None

    def acceptableProtocols(self) -> list[bytes]:
        """The ALPN protocols a TLS listener offers: HTTP/1.1 only."""
        return [b"http/1.1"]

    def buildProtocol(self, addr: Optional[IAddress]) -> Optional[Protocol]:
        if len(self.channels) >= self.limits.max_connections and not self._make_room():
            self.counters.count_rejected("too_many_connections")
            self.counters.count_response(503)
            self.refusals.refused(503, "too_many_connections", addr)
            return _TooManyConnections()
        return IngestChannel(self)

    def _make_room(self) -> bool:
        """At the connection limit: whether one more may open. Connections
        already closing do not count (they are gone once their last answer
        is sent, or aborted a request timeout later), up to twice the limit
        in all; otherwise the longest-idle connection is closed for the new
        one. Only when every connection is busy is the new one refused.
        Scans the connections, but only at the limit."""
        limit = self.limits.max_connections
        if len(self.channels) >= 2 * limit:
            return False
        open_ = [channel for channel in self.channels if not channel.closing]
        if len(open_) < limit:
            return True
        idle = [channel for channel in open_ if channel.evictable()]
        if not idle:
            return False
        min(idle, key=_last_active).close_if_idle()
        self.counters.count_evicted()
        return True

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
