"""The collect loop: every TICK_SECONDS it drains the event queue into the
open batch and flushes it on size, bytes or age into the upload queue.

When the upload queue is full it stops draining, so the event queue fills
and /collect answers 503: fail fast, end to end, instead of buffering
without bound.
"""

from __future__ import annotations

from typing import Callable, Optional, Protocol

from twisted.internet.interfaces import IReactorTime

from estat.loops import LoopService
from estat.metrics import Metrics
from estat.model import Batch, Chunk, new_batch_id
from estat.pipeline.queue import EventQueue
from estat.pipeline.uploader import Uploader

TICK_SECONDS = 0.05


class Runs(Protocol):
    """Where the queued events are in the write-ahead log (durable mode):
    see estat.wal.ledger.Ledger."""

    def front(self) -> Optional[tuple[int, int]]: ...

    def take(self, count: int) -> tuple[int, int]: ...


def _no_span_id(segment: int, first: int) -> str:
    raise AssertionError("a batch id from a log position without a log")


class Batcher:
    """Owns the open batch. `tick` runs every TICK_SECONDS while the
    `service()` runs; `flush_all` empties the queue into batches at
    shutdown."""

    def __init__(
        self,
        clock: IReactorTime,
        queue: EventQueue,
        uploader: Uploader,
        metrics: Metrics,
        batch_size: int,
        batch_max_bytes: int,
        flush_interval: float,
        new_id: Callable[[], str] = new_batch_id,
        tick_seconds: float = TICK_SECONDS,
        runs: Optional[Runs] = None,
        span_id: Callable[[int, int], str] = _no_span_id,
    ) -> None:
        self.clock = clock
        self.queue = queue
        self.uploader = uploader
        self.metrics = metrics
        self.batch_size = batch_size
        self.batch_max_bytes = batch_max_bytes
        self.flush_interval = flush_interval
        self._new_id = new_id
        self.tick_seconds = min(tick_seconds, flush_interval)
        self._chunks: list[Chunk] = []
        self._events = 0  # in the open batch
        self._bytes = 0
        self._opened_at = 0.0
        # Durable mode: a batch holds events of one log segment, and is
        # named by where they begin, so that a replay names it alike.
        self._runs = runs
        self._span_id = span_id
        # (segment, first ordinal) of the open batch; None for events the
        # log does not know of (a bug: they would not be replayed)
        self._span: Optional[tuple[int, int]] = None
        metrics.event_queue_depth.set_function(lambda: len(queue))
        metrics.event_queue_capacity.set(queue.capacity)
        metrics.event_queue_bytes.set_function(lambda: queue.bytes)
        metrics.event_queue_max_bytes.set(queue.max_bytes or 0)

    def service(self) -> LoopService:
        """The loop, as a service: `tick` from `startService` (guarded:
        an error is logged and counted, and the loop goes on) until
        `stopService`, which fires once the last tick has returned."""
        return LoopService("batcher", self.tick_seconds, self.tick,
                           self.metrics.loop_errors, self.clock)

    def open_events(self) -> int:
        return self._events

    def tick(self) -> None:
        """One pass of the loop: drain what the upload queue has room for."""
        self._drain(force=False)

    def flush_all(self) -> None:
        """Shutdown: every queued event goes into a batch and every batch to
        the uploader, whatever the upload queue's bound."""
        self._drain(force=True)
        if self._events:
            self._flush("shutdown")

    def _due(self, force: bool) -> str | None:
        if not self._events:
            return None
        if self._events >= self.batch_size:
            return "size"
        if self._bytes >= self.batch_max_bytes:
            return "bytes"
        if not force and self.clock.seconds() - self._opened_at >= self.flush_interval:
            return "interval"
        if self._runs is not None:
            front = self._runs.front()
            if front is not None and (self._span is None or front[0] != self._span[0]):
                return "segment"
        return None

    def _drain(self, force: bool) -> None:
        queue = self.queue
        while True:
            trigger = self._due(force)
            if trigger is not None:
                if not force and not self.uploader.has_room():
                    return  # backpressure: leave events in the queue
                self._flush(trigger)
                continue
            if not len(queue):
                return
            if not self._events:
                self._opened_at = self.clock.seconds()
            self._take()

    def _take(self) -> None:
        """Move events from the queue into the open batch, stopping at the
        batch's count or byte limit."""
        queue = self.queue
        before = queue.bytes
        limit = self.batch_size - self._events
        front = self._runs.front() if self._runs is not None else None
        if front is not None:
            limit = min(limit, front[1])
        opening = not self._events
        events = len(queue)
        taken = queue.take(limit, self.batch_max_bytes - self._bytes)
        count = events - len(queue)
        if front is not None and taken:
            span = self._runs.take(count)  # type: ignore[union-attr]
            if opening:
                self._span = span
        elif opening:
            self._span = None
        self._chunks.extend(taken)
        self._events += count
        self._bytes += before - queue.bytes

    def _flush(self, trigger: str) -> None:
        if self._runs is not None and self._span is not None:
            segment, first = self._span
            batch = Batch(self._chunks, self._bytes, self._span_id(segment, first), trigger,
                          (segment, first, self._events))
        else:
            batch = Batch(self._chunks, self._bytes, self._new_id(), trigger)
        self.metrics.batch_events.observe(self._events)
        self._chunks = []
        self._events = 0
        self._bytes = 0
        self.metrics.batches_flushed.labels(trigger=trigger).inc()
        self.uploader.submit(batch)
