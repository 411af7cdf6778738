"""Every limit the ingest listener enforces, in one value.

The channel applies them while a request arrives: the connection count
when a client connects, the head limits while the request line and headers
are parsed, the body limits before and while the body is read, and the two
timeouts from the listener's reaper. `BodyBudget` is the one limit shared
by every connection: the bytes of request bodies being received at once.
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
    max_batch_body_size: int  # a whole NDJSON or JSON-array body, inflated (413)
    request_timeout: float  # from a request's first byte to its last (408)
    idle_timeout: float  # a keep-alive connection with no request is closed
    first_request_timeout: float  # a new connection that has sent nothing is closed
    max_connections: int  # open at once: one more closes the longest-idle one, or gets 503
    max_receiving_bytes: int  # request bodies being received at once, all connections (503)
    # the body limit of these paths, whatever the media type (413)
    path_body_limits: Mapping[bytes, int] = field(default_factory=dict)

    @property
    def max_head_bytes(self) -> int:
        """What the parser may hold of a request line and headers that have
        not ended: both at their limits, with their CRLFs."""
        return 2 * self.max_header_bytes + 2 * self.max_headers + 64


class BodyBudget:
    """The bytes of request bodies being received, across all connections,
    held under `max_bytes`: a connection takes its share before it reads
    (more as an inflating body grows) and gives it back once its answer is
    given, so per-request limits never add up past the budget."""

    __slots__ = ("max_bytes", "used")

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.used = 0

    def take(self, size: int) -> bool:
        """Take `size` bytes, or answer False (and take nothing) when they
        would go over the budget."""
        if self.used + size > self.max_bytes:
            return False
        self.used += size
        return True

    def give_back(self, size: int) -> None:
        self.used -= size
