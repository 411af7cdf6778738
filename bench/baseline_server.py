"""The framework floors: a bare handler that answers 202 to a POST and does
nothing else, served on the same reactor twistd uses.

Run as a subprocess by bench/run.py: `python bench/baseline_server.py PORT
[--stock | --httptools]`.

- default: a bare twisted.web Resource, the `baseline` scenario. Like
  estat-ingest it writes no access log and its Request does not parse form
  bodies.
- `--stock`: the same Resource on Twisted's defaults. A stock Request parses
  every POST's Content-Type with the `email` package (to look for a form),
  which costs about a third of the throughput, so it is no floor.
- `--httptools`: a bare Twisted Protocol parsed by httptools, the same
  parser and framing estat-ingest's listener uses (estat.http.channel), answering
  the same headers (Date, Content-Type, Content-Length). The floor of
  estat's own stack: the gap to it is what estat does per request.
"""

from __future__ import annotations

import sys
from typing import Any

from twisted.internet import default

default.install()  # the reactor twistd picks (epoll on Linux)

from httptools import HttpParserError, HttpRequestParser  # noqa: E402
from twisted.internet import reactor  # noqa: E402
from twisted.internet.protocol import Factory, Protocol  # noqa: E402
from twisted.web.resource import Resource  # noqa: E402
from twisted.web.server import Request, Site  # noqa: E402

from estat.http.response import http_date  # noqa: E402  (the Date cache estat uses)

ACCEPTED_BODY = b'{"status":"accepted"}\n'


class AcceptResource(Resource):
    """202 for every POST, on every path; the body is read and dropped."""

    isLeaf = True

    def render_POST(self, request: Request) -> bytes:
        request.setResponseCode(202)
        request.setHeader(b"content-type", b"application/json")
        return ACCEPTED_BODY


class NoFormRequest(Request):
    """A Request that never parses form bodies. (A class attribute is not
    enough: Request.__init__ sets `_parsePOSTFormSubmission` per instance.)"""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("parsePOSTFormSubmission", False)
        super().__init__(*args, **kwargs)


class QuietSite(Site):
    """A Site without the access log (estat-ingest has none either)."""

    requestFactory = NoFormRequest

    def log(self, request: Request) -> None:
        """No access log."""


class StockSite(Site):
    """Twisted's defaults: form parsing, and the access log (which goes to
    the legacy log's buffer, as no observer is started)."""


class AcceptProtocol(Protocol):
    """202 to every request, parsed by httptools; keep-alive as the client
    asks."""

    def connectionMade(self) -> None:
        self.parser = HttpRequestParser(self)

    def dataReceived(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except HttpParserError:
            assert self.transport is not None
            self.transport.loseConnection()

    def on_message_complete(self) -> None:
        assert self.transport is not None
        self.transport.write(b"HTTP/1.1 202 Accepted\r\nDate: %s\r\n"
                             b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                             % (http_date(), len(ACCEPTED_BODY), ACCEPTED_BODY))
        if not self.parser.should_keep_alive():
            self.transport.loseConnection()


def main(argv: list[str]) -> None:
    """Listen on 127.0.0.1:PORT until SIGTERM or SIGINT."""
    port = int(argv[1])
    factory: Factory
    if "--httptools" in argv[2:]:
        factory = Factory.forProtocol(AcceptProtocol)
    else:
        factory = (StockSite if "--stock" in argv[2:] else QuietSite)(AcceptResource())
    reactor.listenTCP(port, factory, interface="127.0.0.1")
    print(f"baseline ({type(factory).__name__}) listening on 127.0.0.1:{port} with "
          f"{type(reactor).__name__}", flush=True)
    reactor.run()


if __name__ == "__main__":
    main(sys.argv)
