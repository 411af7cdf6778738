"""Admission: where an ingest path hands the events it has validated, and
gets the answer to give.

`MemoryAdmission` (ACK_MODE=memory) queues them and answers 202 at once.
`DurableAdmission` (ACK_MODE=durable) checks there is room, appends them
to the write-ahead log, and answers with a Deferred that fires once the
fsync covering them has returned: then the events are queued and the
answer is 202; a failed write is a 503, never a 202. Every ingest route
calls `admit`, so both modes hold for all of them."""

from __future__ import annotations

from typing import Optional, Protocol, Union

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from estat.http.response import Answer, error_body
from estat.lifecycle import Lifecycle
from estat.model import Chunk, events_in_chunks, sized
from estat.pipeline.queue import EventQueue
from estat.wal.ledger import Ledger
from estat.wal.segment import events_record
from estat.wal.writer import Position, WalFull, WalWriter

RETRY_AFTER = (b"retry-after", b"1")
_MAX_HEADROOM = 1 << 20
MaybeAnswer = Union[Answer, "Deferred[Answer]"]


class AdmissionState(Protocol):
    """What admission reads and counts of the request path's state
    (`estat.collect.IngestState`)."""

    queue: EventQueue
    lifecycle: Lifecycle

    def count_accepted(self, amount: int, protocol: str = "collect") -> None: ...

    def count_rejected(self, reason: str, amount: int = 1,
                       protocol: str = "collect") -> None: ...


_UNAVAILABLE = {
    "queue_full": "the event queue is full: retry after Retry-After seconds",
    "shutting_down": "the server is stopping: retry after Retry-After seconds",
    "starting": "the server is replaying its write-ahead log: retry after Retry-After seconds",
    "wal_full": "the write-ahead log is at WAL_MAX_BYTES until the store catches up: "
                "retry after Retry-After seconds",
    "wal_unavailable": "the write-ahead log could not be written: retry after "
                       "Retry-After seconds",
}


def unavailable(state: AdmissionState, reason: str, protocol: str = "collect") -> Answer:
    """The 503 of a refusal that a retry may cure, counted by `reason` and
    `protocol` (closing the connection when the server is stopping)."""
    state.count_rejected(reason, protocol=protocol)
    return Answer(503, error_body(reason, detail=_UNAVAILABLE[reason]), (RETRY_AFTER,),
                  close=reason == "shutting_down")


class Admission(Protocol):
    def admit(self, chunks: list[Chunk], accepted: Answer,
              protocol: str = "collect") -> MaybeAnswer:
        """Take a request's events (its chunks) whole or not at all:
        `accepted` if taken, else a 503; counted under `protocol`."""

    def full(self) -> Optional[str]:
        """Why requests would be refused now for want of room beyond the
        queue's (a reason of `_UNAVAILABLE`), or None."""


class MemoryAdmission:
    """Queue, answer at once: a 202 means the event is in memory."""

    def __init__(self, state: AdmissionState) -> None:
        self.state = state

    def admit(self, chunks: list[Chunk], accepted: Answer,
              protocol: str = "collect") -> MaybeAnswer:
        state = self.state
        if state.lifecycle.stopping:
            return unavailable(state, "shutting_down", protocol)
        if not state.queue.offer(chunks):
            return unavailable(state, "queue_full", protocol)
        state.count_accepted(events_in_chunks(chunks), protocol)
        return accepted

    def full(self) -> Optional[str]:
        return None


def logged_form(chunks: list[Chunk]) -> bytes:
    """The log records of one request's chunks, in order: an `E` record
    carries one chunk (one receive time and key segment), so an SDK batch
    written with several keys becomes one record per key, all in one
    append."""
    if len(chunks) == 1:
        return events_record(chunks[0])
    return b"".join(map(events_record, chunks))


class DurableAdmission:
    """Log, fsync, then queue: a 202 means the event is on disk.

    Room in the queue is reserved at the append, so the queue takes the
    events when their fsync returns (and does so in log order, which the
    ledger relies on). Refuses with 503 `starting` until the lifecycle
    runs (the log is replayed first), `wal_full` at WAL_MAX_BYTES and
    `wal_unavailable` when the write or fsync fails."""

    def __init__(self, state: AdmissionState, writer: WalWriter, ledger: Ledger) -> None:
        self.state = state
        self.writer = writer
        self.ledger = ledger
        self._reserved = 0  # events logged, not queued yet
        self._reserved_bytes = 0

    def admit(self, chunks: list[Chunk], accepted: Answer,
              protocol: str = "collect") -> MaybeAnswer:
        state = self.state
        if not state.lifecycle.running:
            return unavailable(state, "shutting_down" if state.lifecycle.stopping
                               else "starting", protocol)
        queue = state.queue
        chunks = list(map(sized, chunks))
        count = events_in_chunks(chunks)
        size = sum(chunk.size for chunk in chunks)
        if (queue.room() - self._reserved < count
                or (queue.max_bytes is not None
                    and queue.bytes + self._reserved_bytes + size > queue.max_bytes)):
            return unavailable(state, "queue_full", protocol)
        data = logged_form(chunks)
        try:
            written = self.writer.append(data, count)
        except WalFull:
            return unavailable(state, "wal_full", protocol)
        self._reserved += count
        self._reserved_bytes += size

        def logged(position: Position) -> Answer:
            self._reserved -= count
            self._reserved_bytes -= size
            queued = queue.offer(chunks)
            assert queued, "the queue refused events it had room reserved for"
            self.ledger.appended(position, count)
            state.count_accepted(count, protocol)
            return accepted

        def failed(failure: Failure) -> Answer:
            self._reserved -= count
            self._reserved_bytes -= size
            return unavailable(state, "wal_unavailable", protocol)

        answer: Deferred[Answer] = written.addCallbacks(logged, failed)
        return answer

    def full(self) -> Optional[str]:
        """`wal_full` once less than 1 % of WAL_MAX_BYTES (1 MiB at most) is
        left: most requests would be refused, so /readyz says so."""
        writer = self.writer
        headroom = min(_MAX_HEADROOM, writer.max_bytes // 100)
        return "wal_full" if writer.max_bytes - writer.bytes < headroom else None
