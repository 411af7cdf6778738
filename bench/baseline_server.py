"""The framework floor: a bare twisted.web Resource that answers 202 to a
POST and does nothing else, served on the same reactor twistd uses.

Run as a subprocess by bench/run.py: `python bench/baseline_server.py PORT
[--stock]`. Like estat-ingest's IngestSite it writes no access log and its
Request does not parse form bodies, so the two differ only by what estat does
per request. `--stock` keeps Twisted's defaults instead: a stock Request
parses every POST's Content-Type with the `email` package (to look for a
form), which costs about a third of the throughput, so a stock baseline is
slower than estat-ingest itself and is no floor.
"""

from __future__ import annotations

import sys
from typing import Any

from twisted.internet import default

default.install()  # the reactor twistd picks (epoll on Linux)

from twisted.internet import reactor  # noqa: E402
from twisted.web.resource import Resource  # noqa: E402
from twisted.web.server import Request, Site  # noqa: E402

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


def main(argv: list[str]) -> None:
    """Listen on 127.0.0.1:PORT until SIGTERM or SIGINT."""
    port = int(argv[1])
    site_class = StockSite if "--stock" in argv[2:] else QuietSite
    reactor.listenTCP(port, site_class(AcceptResource()), interface="127.0.0.1")
    print(f"baseline ({site_class.__name__}) listening on 127.0.0.1:{port} with "
          f"{type(reactor).__name__}", flush=True)
    reactor.run()


if __name__ == "__main__":
    main(sys.argv)
