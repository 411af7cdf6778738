"""Admission: where an ingest path hands the events it has validated, and
gets the answer to give.

`MemoryAdmission` (ACK_MODE=memory) queues them and answers 202 at once.
`DurableAdmission` (ACK_MODE=durable) checks there is room, appends them
to the write-ahead log, and answers with a Deferred that fires once the
fsync covering them has returned: then the events are queued and the
answer is 202; a failed write is a 503, never a 202. Every ingest route
calls `admit`, so both modes hold for all of them."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, Union

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from estat.http.response import Answer, error_body
from estat.model import Event
from estat.wal.ledger import Ledger
from estat.wal.segment import events_record
from estat.wal.writer import Position, WalFull, WalWriter

if TYPE_CHECKING:
    from estat.collect import IngestState

RETRY_AFTER = (b"retry-after", b"1")
MaybeAnswer = Union[Answer, "Deferred[Answer]"]


def unavailable(state: "IngestState", reason: str) -> Answer:
    """The 503 of a refusal that a retry may cure, counted by `reason`."""
    state.count_rejected(reason)
    return Answer(503, error_body(reason), (RETRY_AFTER,), close=reason == "shutting_down")


class Admission(Protocol):
    def admit(self, events: list[Event], accepted: Answer) -> MaybeAnswer:
        """Take a request's events (one receive time and key segment),
        whole or not at all: `accepted` if taken, else a 503."""


class MemoryAdmission:
    """Queue, answer at once: a 202 means the event is in memory."""

    def __init__(self, state: "IngestState") -> None:
        self.state = state
        self._accepted = state.metrics.events_accepted

    def admit(self, events: list[Event], accepted: Answer) -> MaybeAnswer:
        if not self.state.queue.offer(events):
            return unavailable(self.state, "queue_full")
        self._accepted.inc(len(events))
        return accepted


class DurableAdmission:
    """Log, fsync, then queue: a 202 means the event is on disk.

    Room in the queue is reserved at the append, so the queue takes the
    events when their fsync returns (and does so in log order, which the
    ledger relies on). Refuses with 503 `starting` until the lifecycle
    runs (the log is replayed first), `wal_full` at WAL_MAX_BYTES and
    `wal_unavailable` when the write or fsync fails."""

    def __init__(self, state: "IngestState", writer: WalWriter, ledger: Ledger) -> None:
        self.state = state
        self.writer = writer
        self.ledger = ledger
        self._accepted = state.metrics.events_accepted
        self._reserved = 0  # events logged, not queued yet
        self._reserved_bytes = 0

    def admit(self, events: list[Event], accepted: Answer) -> MaybeAnswer:
        state = self.state
        if not state.lifecycle.running:
            return unavailable(state, "shutting_down" if state.lifecycle.stopping
                               else "starting")
        queue = state.queue
        count = len(events)
        size = sum(len(event.body) for event in events)
        if (queue.room() - self._reserved < count
                or (queue.max_bytes is not None
                    and queue.bytes + self._reserved_bytes + size > queue.max_bytes)):
            return unavailable(state, "queue_full")
        try:
            written = self.writer.append(events_record(events), count)
        except WalFull:
            return unavailable(state, "wal_full")
        self._reserved += count
        self._reserved_bytes += size

        def logged(position: Position) -> Answer:
            self._reserved -= count
            self._reserved_bytes -= size
            queued = queue.offer(events)
            assert queued, "the queue refused events it had room reserved for"
            self.ledger.appended(position, count)
            self._accepted.inc(count)
            return accepted

        def failed(failure: Failure) -> Answer:
            self._reserved -= count
            self._reserved_bytes -= size
            return unavailable(state, "wal_unavailable")

        answer: Deferred[Answer] = written.addCallbacks(logged, failed)
        return answer
