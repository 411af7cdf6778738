"""The event queue between `/collect` and the batcher: bounded, FIFO, and
the only owner of the events waiting in it.

Admission never waits: `offer` takes a request's events whole or not at
all (a refused offer is the 503 that tells the client to retry, so a retry
never duplicates part of a batch). The batcher drains it with `take`.
Nothing waits on the queue either, so it needs no Deferreds: it is a list
and two counters, cheap enough for the per-request path."""

from __future__ import annotations

from bisect import bisect_left
from itertools import accumulate, islice
from typing import Iterator, Optional

from estat.model import Event, body_of



class EventQueue:
    """At most `capacity` events, and, when `max_bytes` is given, at most
    that many bytes of bodies; `bytes` is the size of the bodies queued."""

    def __init__(self, capacity: int, max_bytes: Optional[int] = None) -> None:
        if capacity < 1:
            raise ValueError(f"an event queue holds at least one event, not {capacity}")
        self.capacity = capacity
        self.max_bytes = max_bytes
        self.bytes = 0
        self._events: list[Event] = []
        # The running total of body sizes at the end of each queued event
        # (counted from when the queue was made), so `take` finds its cut
        # by bisection instead of a Python loop over the events.
        self._ends: list[int] = []
        self._taken_bytes = 0  # the running total before the oldest event

    def __len__(self) -> int:
        return len(self._events)

    def __iter__(self) -> Iterator[Event]:
        """The queued events, oldest first (a copy: the queue may change
        while the caller looks)."""
        return iter(list(self._events))

    def room(self) -> int:
        """How many more events `offer` would take now, bytes allowing (0
        once the bodies fill `max_bytes`)."""
        if self.max_bytes is not None and self.bytes >= self.max_bytes:
            return 0
        return self.capacity - len(self._events)

    def offer(self, events: list[Event]) -> bool:
        """Queue all of `events`, or none of them and answer False when they
        would take the queue past its capacity in events or bytes."""
        queued = self._events
        if len(queued) + len(events) > self.capacity:
            return False
        size = len(events[0][1]) if len(events) == 1 else sum(map(len, map(body_of, events)))
        if self.max_bytes is not None and self.bytes + size > self.max_bytes:
            return False
        queued.extend(events)
        ends = self._ends
        start = self._taken_bytes + self.bytes
        if len(events) == 1:
            ends.append(start + size)
        else:
            ends.extend(islice(accumulate(map(len, map(body_of, events)), initial=start), 1, None))
        self.bytes += size
        return True

    def take(self, max_events: int, max_bytes: int) -> list[Event]:
        """Remove and return the oldest events: at most `max_events`, and
        no more once their bodies reach `max_bytes` (the event that reaches
        it is included, so one event is taken if any is queued, however
        large it is, as long as `max_events` is at least one)."""
        queued = self._events
        limit = min(max_events, len(queued))
        if limit <= 0:
            return []
        ends = self._ends
        taken = min(limit, bisect_left(ends, self._taken_bytes + max_bytes, 0, limit) + 1)
        end = ends[taken - 1]
        events = queued[:taken]
        del queued[:taken]
        del ends[:taken]
        self.bytes -= end - self._taken_bytes
        self._taken_bytes = end
        return events
