"""The event queue between `/collect` and the batcher: bounded, FIFO, and
the only owner of the events waiting in it.

Admission never waits: `offer` takes a request's chunks whole or not at
all (a refused offer is the 503 that tells the client to retry, so a retry
never duplicates part of a batch). The batcher drains it with `take`, which
cuts a chunk in two where a batch ends. Nothing waits on the queue either,
so it needs no Deferreds: a list of chunks and running totals, cheap enough
for the per-request path whatever the number of events in a request."""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from itertools import accumulate
from typing import Iterator, Optional

from estat.model import (Chunk, Event, events_in, events_in_chunks, head_and_tail, leading,
                         sized)


class EventQueue:
    """At most `capacity` events, and, when `max_bytes` is given, at most
    that many bytes of bodies; `bytes` is the size of the bodies queued."""

    def __init__(self, capacity: int, max_bytes: Optional[int] = None) -> None:
        if capacity < 1:
            raise ValueError(f"an event queue holds at least one event, not {capacity}")
        self.capacity = capacity
        self.max_bytes = max_bytes
        self.bytes = 0
        self._count = 0
        self._chunks: list[Chunk] = []
        # Running totals of events and of body bytes at the end of each
        # queued chunk, counted from when the queue was made, and the same
        # before the oldest queued event: `take` finds its cut by bisection
        # instead of a Python loop over the chunks.
        self._event_ends: list[int] = []
        self._byte_ends: list[int] = []
        self._taken_events = 0
        self._taken_bytes = 0

    def __len__(self) -> int:
        """The events queued."""
        return self._count

    def __iter__(self) -> Iterator[Event]:
        """The queued events one by one, oldest first (a copy: the queue
        may change while the caller looks)."""
        return iter(events_in(self._chunks))

    def room(self) -> int:
        """How many more events `offer` would take now, bytes allowing (0
        once the bodies fill `max_bytes`)."""
        if self.max_bytes is not None and self.bytes >= self.max_bytes:
            return 0
        return self.capacity - self._count

    def offer(self, chunks: list[Chunk]) -> bool:
        """Queue all of `chunks`, or none of them and answer False when they
        would take the queue past its capacity in events or bytes."""
        if len(chunks) == 1:  # the common case, kept to a few steps
            chunk = chunks[0]
            if chunk.size < 0:
                chunk = sized(chunk)
            count, size = len(chunk.bodies), chunk.size
            if self._count + count > self.capacity or (
                    self.max_bytes is not None and self.bytes + size > self.max_bytes):
                return False
            self._event_ends.append(self._taken_events + self._count + count)
            self._byte_ends.append(self._taken_bytes + self.bytes + size)
            self._chunks.append(chunk)
            self._count += count
            self.bytes += size
            return True
        chunks = list(map(sized, chunks))
        count = events_in_chunks(chunks)
        size = sum(chunk.size for chunk in chunks)
        if self._count + count > self.capacity:
            return False
        if self.max_bytes is not None and self.bytes + size > self.max_bytes:
            return False
        events = self._taken_events + self._count
        ends = self._taken_bytes + self.bytes
        for chunk in chunks:
            events += len(chunk.bodies)
            ends += chunk.size
            self._event_ends.append(events)
            self._byte_ends.append(ends)
        self._chunks.extend(chunks)
        self._count += count
        self.bytes += size
        return True

    def take(self, max_events: int, max_bytes: int) -> list[Chunk]:
        """Remove and return the oldest events, as chunks: at most
        `max_events`, and no more once their bodies reach `max_bytes` (the
        event that reaches it is included, so one event is taken if any is
        queued, however large it is, as long as `max_events` is at least
        one). A chunk the cut falls in is cut in two."""
        limit = min(max_events, self._count)
        if limit <= 0:
            return []
        event_limit = self._taken_events + limit
        byte_limit = self._taken_bytes + max_bytes
        # Whole chunks: those that end within the count and below the
        # bytes; the cut in the next one (if any) is found inside it.
        whole = min(bisect_right(self._event_ends, event_limit),
                    bisect_left(self._byte_ends, byte_limit))
        taken = self._chunks[:whole]
        if whole:
            self._advance(whole, self._event_ends[whole - 1], self._byte_ends[whole - 1])
        if self._chunks and self._taken_events < event_limit:
            taken.append(self._cut_front(event_limit - self._taken_events,
                                         byte_limit - self._taken_bytes))
        return taken

    def _advance(self, chunks: int, events_end: int, bytes_end: int) -> None:
        """Forget the `chunks` oldest chunks, which ended at these totals."""
        del self._chunks[:chunks]
        del self._event_ends[:chunks]
        del self._byte_ends[:chunks]
        self._count -= events_end - self._taken_events
        self.bytes -= bytes_end - self._taken_bytes
        self._taken_events = events_end
        self._taken_bytes = bytes_end

    def _cut_front(self, max_events: int, max_bytes: int) -> Chunk:
        """Take the first events of the oldest chunk: at most `max_events`,
        and no more once they reach `max_bytes` (the whole chunk if it ends
        within both)."""
        chunk = self._chunks[0]
        bodies = chunk.bodies
        sizes = list(accumulate(map(len, leading(bodies, max_events))))
        count = min(max_events, bisect_left(sizes, max_bytes) + 1)
        count = min(count, len(bodies))
        size = sizes[count - 1]
        if count == len(bodies):
            self._advance(1, self._event_ends[0], self._byte_ends[0])
            return chunk
        head, tail = head_and_tail(bodies, count, size)
        front = chunk._replace(bodies=head, size=size)
        self._chunks[0] = chunk._replace(bodies=tail, size=chunk.size - size)
        self._count -= count
        self.bytes -= size
        self._taken_events += count
        self._taken_bytes += size
        return front
