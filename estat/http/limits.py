"""Every limit the ingest listener enforces, in one value.

The channel applies them while a request arrives: the connection count
when a client connects, the head limits while the request line and headers
are parsed, the body limits before and while the body is read, and the two
timeouts from the listener's reaper.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping


@dataclass(frozen=True, slots=True)
class Limits:
    """The ingest listener's limits (the server takes them from its
    settings, where their defaults are)."""

    max_headers: int  # header lines in one request (431 past it)
    max_header_bytes: int  # the request line, and all headers together (431)
    max_body_size: int  # one JSON event, and each NDJSON line (413)
    max_batch_body_size: int  # a whole NDJSON body, inflated (413)
    request_timeout: float  # from a request's first byte to its last (408)
    idle_timeout: float  # a keep-alive connection with no request is closed
    max_connections: int  # open at once; one more is answered 503 and closed
    # the body limit of these paths, whatever the media type (413)
    path_body_limits: Mapping[bytes, int] = field(default_factory=dict)

    @property
    def max_head_bytes(self) -> int:
        """What the parser may hold of a request line and headers that have
        not ended: both at their limits, with their CRLFs."""
        return 2 * self.max_header_bytes + 2 * self.max_headers + 64
