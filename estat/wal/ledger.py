"""Which write-ahead log records the queued events and the batches hold,
and so when a segment may be deleted.

The event queue and the log keep one order: an admitted request's events
are queued in the callback of the fsync that covers them, and the fsyncs
complete in append order. So the ledger needs no per-event field: it keeps
the (segment, first ordinal, count) runs of the queued events, in queue
order, and the batcher takes from its front as it takes events from the
queue. A batch holds events of one segment only (the batcher flushes at a
segment change), named by (segment, first ordinal): a replay cuts the same
batches, under the same object keys.

A segment is deleted once it is sealed, every one of its events is in a
batch that is stored or dead-lettered, and every older segment is gone
(a cut record about a segment lives in it or a later one)."""

from __future__ import annotations

from collections import deque
from typing import Optional

from twisted.internet.defer import Deferred

from estat.model import Batch, EncodedObject
from estat.pipeline.uploader import Encoder
from estat.wal.segment import cut_record
from estat.wal.writer import Position, WalWriter


def wal_batch_id(segment: int, first: int) -> str:
    """The batch id, and so the object key, of the batch of `segment`'s
    events from ordinal `first`."""
    return f"{segment:016d}-{first:08d}"


class Ledger:
    """The runs of the queued events, and the events of each segment not
    yet in a finished batch."""

    def __init__(self, writer: WalWriter) -> None:
        self.writer = writer
        writer.on_sealed = self.collect
        self._runs: deque[list[int]] = deque()  # [segment, first, count], queue order
        self._outstanding: dict[int, int] = {}

    def appended(self, position: Position, count: int) -> None:
        """`count` events at `position` were fsynced and queued."""
        runs = self._runs
        segment, first = position
        if runs and runs[-1][0] == segment and runs[-1][1] + runs[-1][2] == first:
            runs[-1][2] += count
        else:
            runs.append([segment, first, count])
        self._outstanding[segment] = self._outstanding.get(segment, 0) + count

    def replaying(self, segment: int, count: int) -> None:
        """`count` events of `segment` are being replayed into batches."""
        self._outstanding[segment] = self._outstanding.get(segment, 0) + count

    def outstanding(self, segment: int) -> int:
        return self._outstanding.get(segment, 0)

    def front(self) -> Optional[tuple[int, int]]:
        """(segment, events of it at the front of the queue), if any."""
        if not self._runs:
            return None
        segment, _, count = self._runs[0]
        return segment, count

    def take(self, count: int) -> tuple[int, int]:
        """The batcher took `count` events (at most the front run's):
        answers their (segment, first ordinal)."""
        run = self._runs[0]
        segment, first = run[0], run[1]
        assert count <= run[2], (count, run)
        run[1] += count
        run[2] -= count
        if not run[2]:
            self._runs.popleft()
        return segment, first

    def cut(self, batch: Batch) -> "Deferred[Position]":
        """Log the batch's cut; fires once it is fsynced (upload after)."""
        assert batch.wal_span is not None
        segment, first, count = batch.wal_span
        return self.writer.append(cut_record(segment, first, count), 0, over_budget=True)

    def finished(self, batch: Batch) -> None:
        """Every object of `batch` is stored or dead-lettered."""
        if batch.wal_span is None:
            return
        segment, _, count = batch.wal_span
        left = self._outstanding.get(segment, 0) - count
        if left > 0:
            self._outstanding[segment] = left
        else:
            self._outstanding.pop(segment, None)
        self.collect()

    def collect(self) -> None:
        """Delete the oldest sealed segments whose events are all safe."""
        for segment in self.writer.sealed():
            if self._outstanding.get(segment, 0):
                return
            self.writer.delete(segment)


def cut_then_encode(ledger: Ledger, encode: Encoder) -> Encoder:
    """`encode`, once the batch's cut record is fsynced."""

    def encode_cut(batch: Batch) -> "Deferred[list[EncodedObject]]":
        d: Deferred[list[EncodedObject]] = ledger.cut(batch).addCallback(
            lambda _: encode(batch))
        return d

    return encode_cut

