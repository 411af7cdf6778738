"""The write-ahead log's writer: appends records to the current segment
with group commit, on one dedicated thread, and deletes segments when told.

`append` costs the reactor a list append: the bytes of every record that
arrives in the same reactor turn, or while a write is under way, are
joined into the next group, which the writer thread writes and fsyncs at
once (one fsync for the whole group). Each record's Deferred fires, in append order, with its position
once the fsync that covers it has returned; if the write or the fsync
fails, every record of the group fails with `WalWriteError` and the
segment is cut back to where the group began and closed, so that nothing
that was refused survives to be replayed, and the next group opens a new
segment.

A group goes to a new segment when the current one would pass
`segment_bytes` or is `segment_seconds` old, so that segments whose
events are all stored can be deleted (the current one never is)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Optional

from twisted.internet.defer import Deferred, DeferredList, fail, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from estat.metrics import Metrics
from estat.stores.fsutil import fsync_directory
from estat.wal.segment import HEADER, segment_name

_log = Logger()

Run = Callable[..., "Deferred[Any]"]


class WalFull(Exception):
    """The log has reached WAL_MAX_BYTES: refuse, the client retries."""


class WalWriteError(Exception):
    """A record could not be written and fsynced (or the log is closed)."""


class Position(NamedTuple):
    """Where a record's events are: the segment, and the ordinal of its
    first event among the segment's events."""

    segment: int
    first: int


@dataclass
class Segment:
    """A segment file the log knows: its id, bytes, and events written."""

    id: int
    size: int
    events: int = 0
    opened: float = 0.0


class _Pending(NamedTuple):
    data: bytes
    events: int
    waiter: "Deferred[Position]"


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def write_group(fd: Optional[int], directory: str, new_path: Optional[str],
                data: bytes, offset: int) -> tuple[int, float]:
    """On the writer thread: open `new_path` as the segment (closing `fd`)
    if given, append `data`, fdatasync; answer the segment's fd and the
    seconds it took. On an error the segment is cut back to `offset` (the
    size before this group), closed, and the error raised."""
    started = time.monotonic()
    if new_path is not None:
        if fd is not None:
            os.close(fd)
            fd = None
        fd = os.open(new_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND
                     | os.O_CLOEXEC, 0o644)
        offset = 0
        data = HEADER + data
    assert fd is not None
    try:
        _write_all(fd, data)
        os.fdatasync(fd)
        if new_path is not None:
            fsync_directory(directory)
    except OSError:
        try:
            os.ftruncate(fd, offset)
            os.fdatasync(fd)
        except OSError:
            pass
        os.close(fd)
        raise
    return fd, time.monotonic() - started


class WalWriter:
    """The segments of `directory` and the one being written. `run` runs a
    blocking function on the log's own thread (one thread: its jobs run in
    order) and answers a Deferred on the reactor."""

    def __init__(self, directory: str, max_bytes: int, run: Run, clock: IReactorTime,
                 metrics: Metrics, segment_bytes: int = 16 * 1024 * 1024,
                 segment_seconds: float = 10.0,
                 now_us: Callable[[], int] = lambda: int(time.time() * 1_000_000)) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.segment_bytes = max(len(HEADER) + 1, min(segment_bytes, max_bytes // 4))
        self.segment_seconds = segment_seconds
        self._run = run
        self._clock = clock
        self._metrics = metrics
        self._now_us = now_us
        self.segments: dict[int, Segment] = {}  # by id, oldest first
        self.current: Optional[Segment] = None
        self.bytes = 0  # of every segment, and of the records not written yet
        self.on_sealed: Callable[[], None] = lambda: None
        self._fd: Optional[int] = None
        self._queue: list[_Pending] = []
        self._writing = False
        self._closed = False
        self._idle_waiters: list[Deferred[None]] = []
        self._deleting: dict[int, Deferred[None]] = {}
        self._last_id = 0
        self._kick_call: Optional[IDelayedCall] = None
        metrics.wal_bytes.set_function(lambda: self.bytes)
        metrics.wal_max_bytes.set(max_bytes)
        metrics.wal_segments.set_function(lambda: len(self.segments))

    def path(self, segment_id: int) -> str:
        return os.path.join(self.directory, segment_name(segment_id))

    def adopt(self, segment_id: int, size: int) -> None:
        """Know a segment found at start (never written to again)."""
        self.segments[segment_id] = Segment(segment_id, size)
        self.segments = dict(sorted(self.segments.items()))
        self.bytes += size
        self._last_id = max(self._last_id, segment_id)

    def sealed(self) -> list[int]:
        """The segments no longer written to, oldest first."""
        current = self.current.id if self.current is not None else None
        return [i for i in self.segments if i != current and i not in self._deleting]

    def append(self, data: bytes, events: int, over_budget: bool = False) -> "Deferred[Position]":
        """Write the framed record `data` (holding `events` events) in the
        next group; fires with its position once fsynced. Raises WalFull
        when the budget would be passed (unless `over_budget`: a cut
        record, which must never be refused)."""
        if self._closed:
            return fail(WalWriteError("the write-ahead log is closed"))
        if not over_budget and self.bytes + len(data) > self.max_bytes:
            raise WalFull()
        waiter: Deferred[Position] = Deferred()
        self._queue.append(_Pending(data, events, waiter))
        self.bytes += len(data)
        if not self._writing and self._kick_call is None:
            # Start the group once the reactor has handled all the input of
            # this turn: the requests read in one wake-up share one fsync.
            self._kick_call = self._clock.callLater(0, self._kick)
        return waiter

    def _kick(self) -> None:
        if self._kick_call is not None:
            if self._kick_call.active():
                self._kick_call.cancel()
            self._kick_call = None
        if self._writing:
            return
        if not self._queue:
            waiters, self._idle_waiters = self._idle_waiters, []
            for waiter in waiters:
                waiter.callback(None)
            return
        group, self._queue = self._queue, []
        data = b"".join([pending.data for pending in group])
        current = self.current
        now = self._clock.seconds()
        new: Optional[Segment] = None
        if (current is None or self._fd is None
                or (current.size > len(HEADER)
                    and (current.size + len(data) > self.segment_bytes
                         or now - current.opened >= self.segment_seconds))):
            self._last_id = max(self._last_id + 1, self._now_us())
            new = Segment(self._last_id, len(HEADER), opened=now)
            self.bytes += len(HEADER)
        target = new if new is not None else current
        assert target is not None
        positions = []
        ordinal = target.events
        for pending in group:
            positions.append(Position(target.id, ordinal))
            ordinal += pending.events
        self._writing = True
        offset = current.size if current is not None and new is None else 0
        d = self._run(write_group, self._fd, self.directory,
                      self.path(new.id) if new is not None else None, data, offset)
        d.addCallbacks(self._written, self._failed,
                       callbackArgs=(group, positions, target, new, len(data)),
                       errbackArgs=(group, new, len(data)))

    def _written(self, result: tuple[int, float], group: list[_Pending],
                 positions: list[Position], target: Segment, new: Optional[Segment],
                 size: int) -> None:
        fd, seconds = result
        self._fd = fd
        self._writing = False
        sealed = new is not None and self.current is not None
        if new is not None:
            self.segments[new.id] = new
            self.current = new
        target.size += size
        target.events += sum(pending.events for pending in group)
        self._metrics.wal_fsync_seconds.observe(seconds)
        self._metrics.wal_group_records.observe(len(group))
        for pending, position in zip(group, positions):
            pending.waiter.callback(position)
        self._kick()
        if sealed:
            self.on_sealed()

    def _failed(self, failure: Failure, group: list[_Pending], new: Optional[Segment],
                size: int) -> None:
        self._writing = False
        self._fd = None
        self.bytes -= size
        if new is not None:  # it may exist, holding its header at most
            self.segments[new.id] = new
        self.current = None  # the next group opens a new segment
        self._metrics.wal_write_failures.inc()
        _log.error("cannot write the write-ahead log in {directory}: {error}; {records} "
                   "requests refused with 503 (check the disk and its free space)",
                   directory=self.directory, error=failure.getErrorMessage(),
                   records=len(group))
        error = WalWriteError(failure.getErrorMessage())
        for pending in group:
            pending.waiter.errback(error)
        self._kick()
        self.on_sealed()

    def delete(self, segment_id: int) -> "Deferred[None]":
        """Delete a sealed segment (its events are all stored)."""
        if segment_id in self._deleting:
            return self._deleting[segment_id]
        segment = self.segments.get(segment_id)
        if segment is None or segment is self.current:
            return succeed(None)

        def unlink(path: str) -> None:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

        def deleted(_: object) -> None:
            self.segments.pop(segment_id, None)
            self.bytes -= segment.size
            self._metrics.wal_segments_deleted.inc()

        def failed(failure: Failure) -> None:
            _log.error("cannot delete write-ahead log segment {path}: {error}; it is "
                       "replayed at the next start", path=self.path(segment_id),
                       error=failure.getErrorMessage())

        d = self._run(unlink, self.path(segment_id))
        d.addCallbacks(deleted, failed)
        def forget(_: object) -> None:
            self._deleting.pop(segment_id, None)

        d.addBoth(forget)
        self._deleting[segment_id] = d
        return d

    def when_idle(self) -> "Deferred[None]":
        """Fires once every record appended so far is written (or failed)."""
        if not self._writing and not self._queue:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._idle_waiters.append(waiter)
        return waiter

    async def close(self) -> None:
        """Write what is pending, close the segment (it is sealed then, and
        deleted if its events are all stored), and wait for the deletions
        under way. Appends after this fail."""
        await self.when_idle()
        self._closed = True
        fd, self._fd = self._fd, None
        if fd is not None:
            await self._run(os.close, fd)
        self.current = None
        self.on_sealed()
        await DeferredList(list(self._deleting.values()))
