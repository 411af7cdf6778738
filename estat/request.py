"""A twisted.web Request that reads at most a limit of body.

Twisted's own Request has no body limit (it spools large bodies to temporary
files) and parses form bodies. `BoundedRequest` picks the limit from the
media type, refuses a declared Content-Length over it before reading the
body (and before `100 Continue`), cuts off a chunked body that grows past
it, and inflates a gzip'd body while it arrives, applying the limit to the
inflated size so a gzip bomb never inflates past the limit.
"""

from __future__ import annotations

import json
import zlib
from typing import TYPE_CHECKING, Any, Optional

from twisted.logger import Logger
from twisted.web.server import Request

if TYPE_CHECKING:  # estat.web imports this module
    from estat.web import TrackedChannel

_log = Logger()

NDJSON = b"application/x-ndjson"
_GZIP_ENCODINGS = (b"gzip", b"x-gzip")


def error_body(error: str, **details: object) -> bytes:
    """The short JSON body of every error answer."""
    return json.dumps({"error": error, **details}, separators=(",", ":")).encode() + b"\n"


def raw_error(code: int, phrase: bytes, error: str, **details: object) -> bytes:
    """A complete error response that closes the connection, for answers
    given before Twisted has parsed a request (Request.write needs one)."""
    body = error_body(error, **details)
    return (b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nConnection: close\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (code, phrase, len(body), body))


class _NoContent:
    """Stands for `request.content`, which Twisted seeks and closes: the
    body lives in `BoundedRequest.body` instead (one object for all)."""

    def tell(self) -> int:
        return 0

    def seek(self, offset: int, whence: int = 0) -> int:
        return 0

    def read(self, size: int = -1) -> bytes:
        return b""

    def getvalue(self) -> bytes:
        return b""

    def close(self) -> None:
        pass


_NO_CONTENT = _NoContent()


class BoundedRequest(Request):
    """See the module docstring. After the body arrives: `body` holds it
    (inflated), `media_type` the lowercased type without parameters,
    `is_batch` whether it is NDJSON, `body_problem` an error name when the
    body could not be read (bad gzip, unknown Content-Encoding)."""

    defaultContentType = b"application/json"  # every answer here is JSON
    _refused = False
    _received = 0
    _limit = 0
    _inflater: Any = None
    body = b""
    media_type = b""
    is_batch = False
    body_problem: Optional[str] = None
    channel: TrackedChannel  # BoundedRequest is IngestSite's requestFactory
    # Twisted's bare `content = None` makes mypy think it is always None.
    content: Any

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._parsePOSTFormSubmission = False  # never parse forms (Twisted would)

    def gotLength(self, length: Optional[int]) -> None:
        state = self.channel.site.state
        headers = self.requestHeaders
        content_type = headers.getRawHeaders(b"content-type")
        if content_type:
            self.media_type = content_type[0].split(b";", 1)[0].strip().lower()
            self.is_batch = self.media_type == NDJSON
        self._limit = state.max_batch_body_size if self.is_batch else state.max_body_size
        self._chunks: list[bytes] = []
        self.content = _NO_CONTENT
        encoding = headers.getRawHeaders(b"content-encoding")
        if encoding:
            name = encoding[0].strip().lower()
            if name in _GZIP_ENCODINGS:
                self._inflater = zlib.decompressobj(31)
            elif name != b"identity":
                self.body_problem = "unsupported_content_encoding"
        if length is not None and length > self._limit:
            self._refuse_too_large(state)

    def handleContentChunk(self, data: bytes) -> None:
        if self._refused or self.body_problem is not None:
            return
        if self._inflater is not None:
            try:
                data = self._inflate(data)
            except zlib.error:
                self.body_problem = "invalid_gzip"
                self._chunks = []
                return
        self._received += len(data)
        if self._received > self._limit:
            self._refuse_too_large(self.channel.site.state)
            return
        self._chunks.append(data)

    def _inflate(self, data: bytes) -> bytes:
        """Inflate what arrived, never producing more than one byte past the
        limit; concatenated gzip members are allowed (RFC 1952)."""
        out = []
        room = self._limit - self._received + 1
        while data and room > 0:
            piece = self._inflater.decompress(data, room)
            out.append(piece)
            room -= len(piece)
            if self._inflater.eof:
                data = self._inflater.unused_data
                if data:
                    self._inflater = zlib.decompressobj(31)
            else:
                data = self._inflater.unconsumed_tail
        return b"".join(out)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self._refused:
            return
        if self._inflater is not None and self.body_problem is None:
            if not self._inflater.eof:
                self.body_problem = "invalid_gzip"  # truncated stream
        chunks = self._chunks
        self.body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        self._chunks = []
        super().requestReceived(command, path, version)

    def _refuse_too_large(self, state: Any) -> None:
        """Answer 413 straight on the transport and close: the request line
        and body were never processed, so Request.write cannot be used."""
        self._refused = True
        self._chunks = []
        self.content = _NO_CONTENT
        # Twisted sends `100 Continue` right after gotLength; it must not.
        self.requestHeaders.removeHeader(b"expect")
        transport = self.channel.transport
        assert transport is not None  # the body is arriving on it
        transport.write(raw_error(
            413, b"Request Entity Too Large", "too_large", max_bytes=self._limit))
        state.count_response(413)
        state.count_rejected("too_large")
        self.channel.loseConnection()

    def finish(self) -> None:
        if not self.finished and not self._disconnected:
            site = self.channel.site
            site.state.count_response(self.code)
            site.request_done(self.channel)
        super().finish()

    def processingFailed(self, reason):  # type: ignore[no-untyped-def]
        """Log the failure and answer a JSON 500; never show a traceback."""
        _log.failure("unexpected error handling {method} {path}", failure=reason,
                         method=self.method, path=self.path)
        body = error_body("internal_error")
        self.setResponseCode(500)
        self.setHeader(b"content-type", b"application/json")
        self.setHeader(b"content-length", b"%d" % len(body))
        self.write(body)
        self.finish()
        return reason
