"""The log lines that say who the ingest listener refused, and why.

Every 4xx and 5xx answer is counted in `estat_events_rejected_total`; the
counter says how many, not who. An operator looking into refusals needs the
client's address, which behind a `haproxy:` listener is the address the
PROXY protocol header carried (the transport's `getPeer()` returns it), not
the balancer's. So each refusal reason gets a log line naming the client,
at most one per reason every `interval` seconds: a flood of `503
queue_full` must not become a flood of log lines. The next line of that
reason says how many refusals the quiet period hid.
"""

from __future__ import annotations

from typing import Optional

from twisted.internet.interfaces import IAddress, IReactorTime
from twisted.logger import Logger

_log = Logger()

LOG_INTERVAL = 10.0  # seconds between two log lines of one refusal reason
# Error answers that refuse nobody: /readyz's 503 is a health answer, asked
# every few seconds by each balancer while the server starts or stops.
NOT_REFUSALS = frozenset({"not_ready"})
# What an operator can do about a refusal that is theirs to fix.
ADVICE = {
    "request_bodies_full": "raise REQUEST_BODIES_MAX_BYTES if this goes on",
    "http2_not_supported": "this listener speaks HTTP/1.1 only: configure the client or "
                           "load balancer for HTTP/1.1",
    "queue_full": "the pipeline is slower than the load: see docs/tuning.md",
}


def client_of(address: Optional[IAddress]) -> str:
    """`host:port` of a TCP address (`[host]:port` for IPv6), else what the
    address says of itself (a unix socket has no client address)."""
    host = getattr(address, "host", None)
    port = getattr(address, "port", None)
    if host is None:
        return "unknown" if address is None else str(getattr(address, "name", None) or "local")
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def reason_of(body: bytes) -> str:
    """The `error` of an error body (`{"error":"<reason>",...}`)."""
    start = body.find(b'"error":"')
    if start < 0:
        return "error"
    start += len(b'"error":"')
    end = body.find(b'"', start)
    return body[start:end].decode("ascii", "replace") if end > 0 else "error"


class RefusalLog:
    """Logs refusals with the client's address, rate limited per reason."""

    def __init__(self, clock: IReactorTime, interval: float = LOG_INTERVAL) -> None:
        self.clock = clock
        self.interval = interval
        self._last: dict[str, float] = {}  # reason -> when it was last logged
        self._hidden: dict[str, int] = {}  # reason -> refusals not logged since

    def refused(self, code: int, reason: str, address: Optional[IAddress]) -> None:
        if reason in NOT_REFUSALS:
            return
        now = self.clock.seconds()
        last = self._last.get(reason)
        if last is not None and now - last < self.interval:
            self._hidden[reason] = self._hidden.get(reason, 0) + 1
            return
        self._last[reason] = now
        hidden = self._hidden.pop(reason, 0)
        more = (f" ({hidden} more {reason} refusals since the last such line)"
                if hidden else "")
        emit = _log.warn if code >= 500 else _log.info
        advice = ADVICE.get(reason)
        emit("refused {code} {reason} to client {client}{more}{advice}", code=code,
             reason=reason, client=client_of(address), more=more,
             advice=f"; {advice}" if advice else "")
