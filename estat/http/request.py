"""One request on the ingest listener, as it arrives.

`IngestRequest` holds what the parser saw (method, path, headers) and reads
at most a limit of body: the limit comes from the media type, a declared
Content-Length over it is refused before the body is read (and before
`100 Continue`), a chunked body that grows past it is cut off, and a gzip'd
body is inflated while it arrives with the limit applied to the inflated
size, so a gzip bomb never inflates past the limit.
"""

from __future__ import annotations

import zlib
from typing import Any, Mapping, Optional

from estat.codec import GZIP_WBITS

NDJSON = b"application/x-ndjson"
_GZIP_ENCODINGS = (b"gzip", b"x-gzip")
_NO_PATH_LIMITS: Mapping[bytes, int] = {}


class TooLarge(Exception):
    """The body is over its limit; `limit` is that limit in bytes."""

    def __init__(self, limit: int) -> None:
        super().__init__(limit)
        self.limit = limit


class IngestRequest:
    """See the module docstring. `headers` maps lowercased names to the
    first value; `query` is what follows the path's `?`. A path in
    `path_limits` has that body limit whatever its media type (the SDK
    paths, whose batches are JSON). After the body arrives: `body` holds it (inflated),
    `media_type` the lowercased type without parameters, `is_batch` whether
    it is NDJSON, `body_problem` an error name when the body could not be
    read (bad gzip, unknown Content-Encoding)."""

    __slots__ = ("method", "path", "query", "headers", "media_type", "is_batch", "limit",
                 "body_problem", "body", "_chunks", "_received", "_inflater")

    def __init__(self, method: bytes, url: bytes, headers: dict[bytes, bytes],
                 max_body_size: int, max_batch_body_size: int,
                 path_limits: Mapping[bytes, int] = _NO_PATH_LIMITS) -> None:
        self.method = method
        self.path, _, self.query = url.partition(b"?")
        self.headers = headers
        self.body = b""
        self.body_problem: Optional[str] = None
        self._chunks: list[bytes] = []
        self._received = 0
        self._inflater: Any = None
        content_type = headers.get(b"content-type")
        if content_type:
            self.media_type = content_type.split(b";", 1)[0].strip().lower()
        else:
            self.media_type = b""
        self.is_batch = self.media_type == NDJSON
        limit = path_limits.get(self.path) if path_limits else None
        if limit is None:
            limit = max_batch_body_size if self.is_batch else max_body_size
        self.limit = limit
        encoding = headers.get(b"content-encoding")
        if encoding:
            name = encoding.strip().lower()
            if name in _GZIP_ENCODINGS:
                self._inflater = zlib.decompressobj(GZIP_WBITS)
            elif name != b"identity":
                self.body_problem = "unsupported_content_encoding"

    def check_declared_length(self) -> None:
        """Refuse a declared Content-Length over the limit (raises TooLarge)."""
        declared = self.headers.get(b"content-length")
        if declared is not None and int(declared) > self.limit:
            raise TooLarge(self.limit)

    def add_body(self, data: bytes) -> None:
        """Take the next piece of body; raises TooLarge past the limit."""
        if self.body_problem is not None:
            return
        if self._inflater is not None:
            try:
                data = self._inflate(data)
            except zlib.error:
                self.body_problem = "invalid_gzip"
                self._chunks = []
                return
        self._received += len(data)
        if self._received > self.limit:
            self._chunks = []
            raise TooLarge(self.limit)
        self._chunks.append(data)

    def _inflate(self, data: bytes) -> bytes:
        """Inflate what arrived, never producing more than one byte past the
        limit; concatenated gzip members are allowed (RFC 1952)."""
        out = []
        room = self.limit - self._received + 1
        while data and room > 0:
            piece = self._inflater.decompress(data, room)
            out.append(piece)
            room -= len(piece)
            if self._inflater.eof:
                data = self._inflater.unused_data
                if data:
                    self._inflater = zlib.decompressobj(GZIP_WBITS)
            else:
                data = self._inflater.unconsumed_tail
        return b"".join(out)

    def body_complete(self) -> None:
        """The whole body has arrived: join it, and notice a truncated gzip
        stream."""
        if self._inflater is not None and self.body_problem is None:
            if not self._inflater.eof:
                self.body_problem = "invalid_gzip"
        chunks = self._chunks
        self.body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        self._chunks = []
