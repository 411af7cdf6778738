"""The collect loop: a LoopingCall that drains the event queue into the
open batch and flushes it on size, bytes or age into the upload queue.

When the upload queue is full it stops draining, so the event queue fills
and /collect answers 503: the seed's fail-fast backpressure chain.
"""

from __future__ import annotations

from typing import Callable, Optional

from twisted.internet.defer import Deferred, DeferredQueue, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from estat.metrics import Metrics
from estat.model import Batch, Event, new_batch_id
from estat.pipeline.uploader import Uploader

_log = Logger()

TICK_SECONDS = 0.05


class Batcher:
    """Owns the open batch. `tick` runs every TICK_SECONDS; `flush_all`
    empties the queue into batches at shutdown."""

    def __init__(
        self,
        clock: IReactorTime,
        queue: DeferredQueue,
        uploader: Uploader,
        metrics: Metrics,
        batch_size: int,
        batch_max_bytes: int,
        flush_interval: float,
        new_id: Callable[[], str] = new_batch_id,
        tick_seconds: float = TICK_SECONDS,
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
        self._events: list[Event] = []
        self._bytes = 0
        self._opened_at = 0.0
        self._loop: Optional[LoopingCall] = None
        self._loop_done: Optional[Deferred] = None
        metrics.event_queue_depth.set_function(lambda: len(queue.pending))
        metrics.event_queue_capacity.set(queue.size or 0)

    def start(self) -> None:
        loop = self._loop = LoopingCall(self.tick)
        loop.clock = self.clock
        self._loop_done = loop.start(self.tick_seconds, now=False)

    def stop(self) -> "Deferred[object]":
        """Stop the loop; fires when the last tick has returned."""
        if self._loop is None or not self._loop.running:
            return succeed(None)
        self._loop.stop()
        assert self._loop_done is not None
        return self._loop_done

    def open_events(self) -> int:
        return len(self._events)

    def tick(self) -> None:
        """One pass of the loop; never raises, so the loop never ends."""
        try:
            self._drain(force=False)
        except Exception:
            self.metrics.loop_errors.labels(loop="batcher").inc()
            _log.failure("unexpected error in the batcher loop")

    def flush_all(self) -> None:
        """Shutdown: every queued event goes into a batch and every batch to
        the uploader, whatever the upload queue's bound."""
        self._drain(force=True)
        if self._events:
            self._flush("shutdown")

    def _due(self, force: bool) -> Optional[str]:
        if not self._events:
            return None
        if len(self._events) >= self.batch_size:
            return "size"
        if self._bytes >= self.batch_max_bytes:
            return "bytes"
        if not force and self.clock.seconds() - self._opened_at >= self.flush_interval:
            return "interval"
        return None

    def _drain(self, force: bool) -> None:
        pending = self.queue.pending
        while True:
            trigger = self._due(force)
            if trigger is not None:
                if not force and not self.uploader.has_room():
                    return  # backpressure: leave events in the queue
                self._flush(trigger)
                continue
            if not pending:
                return
            if not self._events:
                self._opened_at = self.clock.seconds()
            self._take(pending)

    def _take(self, pending: list[Event]) -> None:
        """Move events from the queue into the open batch, stopping at the
        batch's count or byte limit."""
        limit = min(self.batch_size - len(self._events), len(pending))
        size = self._bytes
        max_bytes = self.batch_max_bytes
        taken = 0
        while taken < limit:
            size += len(pending[taken][1])
            taken += 1
            if size >= max_bytes:
                break
        self._events.extend(pending[:taken])
        del pending[:taken]
        self._bytes = size

    def _flush(self, trigger: str) -> None:
        batch = Batch(self._events, self._bytes, self._new_id(), trigger)
        self._events = []
        self._bytes = 0
        self.metrics.batches_flushed.labels(trigger=trigger).inc()
        self.metrics.batch_events.observe(len(batch.events))
        self.uploader.submit(batch)
