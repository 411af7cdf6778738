"""The upload stage: a bounded queue of flushed batches, a fixed number of
uploads in flight, encoding off the reactor thread, and every object that
cannot be stored handed to the dead-letter spool, never dropped."""

from __future__ import annotations

from collections import deque
from functools import partial
from typing import Callable, Protocol

from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.logger import Logger

from estat.codec import EncodeFailed
from estat.loops import guarded
from estat.metrics import Metrics
from estat.model import Batch, EncodedObject
from estat.stores.base import RetryableStoreError, Store, StoreError, as_store_error

_log = Logger()


class Spool(Protocol):
    """Where objects go when the store fails (the dead-letter queue).
    `save` never fails: what it cannot keep it counts and logs, and answers
    False."""

    def save(self, obj: EncodedObject, error: StoreError) -> "Deferred[bool]":
        ...

    def salvage(self, failed: EncodeFailed) -> "Deferred[bool]":
        """Keep the bodies of a batch that could not be encoded."""


Encoder = Callable[[Batch], "Deferred[list[EncodedObject]]"]


class Uploader:
    """Takes flushed batches (at most `queue_size` waiting), encodes and
    stores `concurrency` of them at a time."""

    def __init__(
        self,
        store: Store,
        spool: Spool,
        encode: Encoder,
        metrics: Metrics,
        queue_size: int,
        concurrency: int,
        on_done: Callable[[Batch], None] = lambda batch: None,
    ) -> None:
        self.store = store
        self.spool = spool
        self._encode = encode
        self._metrics = metrics
        self.queue_size = queue_size
        self.concurrency = concurrency
        self._queue: deque[Batch] = deque()
        self._in_flight = 0
        self._puts: set[Deferred] = set()
        self._idle_waiters: list[Deferred[None]] = []
        self._past_deadline = False
        self._abandoned = False
        self._on_done = on_done  # durable mode: the log may let the batch's records go
        self._room_waiters: list[Deferred[None]] = []
        metrics.upload_queue_depth.set_function(lambda: len(self._queue))
        metrics.upload_queue_capacity.set(queue_size)
        metrics.uploads_in_flight.set_function(lambda: self._in_flight)
        self._stored = (
            metrics.events_stored.labels(store=store.name, path="upload"),
            metrics.objects_stored.labels(store=store.name, path="upload"),
            metrics.bytes_stored.labels(store=store.name, path="upload"),
        )

    def has_room(self) -> bool:
        return len(self._queue) < self.queue_size

    def idle(self) -> bool:
        return not self._queue and self._in_flight == 0

    def depth(self) -> int:
        """Batches waiting for their upload to start."""
        return len(self._queue)

    def in_flight(self) -> int:
        """Batches being encoded or uploaded."""
        return self._in_flight

    def unfinished(self) -> int:
        """Batches not yet stored or spooled: waiting and in flight."""
        return len(self._queue) + self._in_flight

    def submit(self, batch: Batch) -> None:
        """Queue a batch. The batcher checks `has_room` first; at shutdown it
        submits regardless, since those events are already in memory."""
        self._queue.append(batch)
        self._pump()

    def when_room(self) -> "Deferred[None]":
        """Fires once `has_room` (a replay submits no faster than this)."""
        return _once(self.has_room(), self._room_waiters)

    def when_idle(self) -> "Deferred[None]":
        """Fires once every queued and in-flight batch is stored or spooled."""
        return _once(self.idle(), self._idle_waiters)

    def cancel_in_flight(self) -> None:
        """At the shutdown deadline: cancel the store calls under way and
        send every object still to come straight to the spool."""
        self._past_deadline = True
        self._cancel_puts()

    def abandon(self) -> None:
        """At the shutdown deadline in durable mode: cancel the store calls
        under way and start no more, spooling nothing; those batches stay
        in the write-ahead log and are replayed at the next start."""
        self._abandoned = True
        self._cancel_puts()

    def _cancel_puts(self) -> None:
        for put in list(self._puts):
            put.cancel()

    def _pump(self) -> None:
        while self._in_flight < self.concurrency and self._queue:
            batch = self._queue.popleft()
            self._in_flight += 1
            d = guarded("uploader", self._metrics.loop_errors,
                        partial(self._process_deferred, batch))()
            d.addBoth(self._finished)

    def _finished(self, _: object) -> None:
        self._in_flight -= 1
        self._pump()
        while self._room_waiters and self.has_room():
            self._room_waiters.pop(0).callback(None)
        if self.idle():
            waiters, self._idle_waiters = self._idle_waiters, []
            for waiter in waiters:
                waiter.callback(None)

    def _process_deferred(self, batch: Batch) -> "Deferred[None]":
        return Deferred.fromCoroutine(self._process(batch))

    async def _process(self, batch: Batch) -> None:
        if self._abandoned:
            return
        try:
            objects = await self._encode(batch)
        except EncodeFailed as failed:
            if await self.spool.salvage(failed) and not self._abandoned:
                self._on_done(batch)  # its bodies are dead-lettered
            raise  # still a bug in this loop: `guarded` logs and counts it
        kept = True
        for obj in objects:
            if obj.kind == "raw":
                self._metrics.raw_events.inc(obj.event_count)
            kept = await self._store_or_spool(obj) and kept
        if self._abandoned:
            return
        if kept:
            self._on_done(batch)
        elif batch.wal_span is not None:
            self._metrics.wal_kept_events.inc(batch.event_count)
            _log.warn("batch {batch} was neither stored nor dead-lettered: its events stay "
                      "in the write-ahead log and are replayed at the next start",
                      batch=batch.batch_id)

    async def _store_or_spool(self, obj: EncodedObject) -> bool:
        """Whether `obj` is stored or dead-lettered."""
        if self._abandoned:
            return False
        if self._past_deadline:
            return await self.spool.save(obj, RetryableStoreError(
                "timeout", "ShutdownDeadline", "not uploaded before the shutdown deadline"))
        put = self.store.put(obj)
        self._puts.add(put)
        try:
            await put
        except CancelledError:
            error: StoreError = RetryableStoreError(
                "timeout", "Cancelled", "upload cancelled at shutdown")
        except StoreError as store_error:
            error = store_error
        except Exception as other:
            error = as_store_error(other)
            _log.failure("unexpected error storing {key}", key=obj.key)
        else:
            events, objects, size = self._stored
            events.inc(obj.event_count)
            objects.inc()
            size.inc(len(obj.data))
            return True
        finally:
            self._puts.discard(put)
        if self._abandoned:
            return False  # left in the write-ahead log
        self._metrics.store_failures.labels(store=self.store.name, reason=error.reason).inc()
        _log.error(
            "could not store {key} ({events} events) in the {store} store: "
            "{code}: {message}; saving it to the dead-letter directory",
            key=obj.key, events=obj.event_count, store=self.store.name,
            code=error.code, message=error.message,
        )
        return await self.spool.save(obj, error)


def _once(ready: bool, waiters: "list[Deferred[None]]") -> "Deferred[None]":
    """A Deferred fired now when `ready`, else one added to `waiters` (for
    the uploader to fire when it becomes so)."""
    if ready:
        return succeed(None)
    waiter: Deferred[None] = Deferred()
    waiters.append(waiter)
    return waiter
