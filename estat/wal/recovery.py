"""Recovery at start in durable mode: every segment left in WAL_DIR is
read back and its events go, as batches, through the normal uploader,
before the server accepts anything.

A segment is read twice: once for the cut records (a batch's cut may be
in a later segment than its events), then for its events, one segment at
a time, so a replay holds one segment in memory plus the upload queue.
Batches that were cut before the crash are cut again alike (same ids, so
the same object keys: an upload that completed is overwritten, never
duplicated); events that were not in a batch yet are cut now.

A torn tail (the record a crash cut short) is cut off the file, counted
and logged with its offset. A segment with a bad record in the middle is
copied whole to `quarantine/` for an operator (`estat-wal verify`) and
cut back to its valid records, which are replayed: the start never fails
on a bad segment, so a bad segment cannot make a crash loop."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from typing import Callable, Iterator

from twisted.logger import Logger

from estat.metrics import Metrics
from estat.model import Batch, Event
from estat.pipeline.uploader import Uploader
from estat.stores.fsutil import fsync_directory
from estat.wal.ledger import Ledger, wal_batch_id
from estat.wal.segment import Cut, Scan, list_segments, read_segment, segment_name
from estat.wal.writer import Run, WalWriter

_log = Logger()
QUARANTINE = "quarantine"


@dataclass
class Recovered:
    """What a recovery did."""

    segments: int = 0
    events: int = 0
    batches: int = 0
    torn: list[tuple[str, int]] = field(default_factory=list)  # (segment, offset)
    quarantined: list[str] = field(default_factory=list)


def cut_batches(segment: int, events: list[Event], cuts: list[Cut], batch_size: int,
                batch_max_bytes: int) -> Iterator[Batch]:
    """The batches of one segment's events: the logged cuts as they were,
    and the events after them cut by size and bytes, as the batcher would."""
    position = 0
    for cut in sorted(cuts, key=lambda c: c.first):
        if cut.first < position or cut.first + cut.count > len(events):
            continue  # overlaps one taken already, or past the valid records
        yield from _fresh(segment, events, position, cut.first, batch_size, batch_max_bytes)
        chosen = events[cut.first:cut.first + cut.count]
        yield Batch.of_events(chosen, sum(len(e.body) for e in chosen),
                    wal_batch_id(segment, cut.first), "replay",
                    (segment, cut.first, cut.count))
        position = cut.first + cut.count
    yield from _fresh(segment, events, position, len(events), batch_size, batch_max_bytes)


def _fresh(segment: int, events: list[Event], start: int, end: int, batch_size: int,
           batch_max_bytes: int) -> Iterator[Batch]:
    first = start
    while first < end:
        size = 0
        last = first
        while last < end and last - first < batch_size:
            size += len(events[last].body)
            last += 1
            if size >= batch_max_bytes:
                break
        yield Batch.of_events(events[first:last], size, wal_batch_id(segment, first), "replay",
                    (segment, first, last - first))
        first = last


def _repair(directory: str, segment: int, found: Scan) -> None:
    """Blocking: keep a corrupt segment's copy in quarantine/, and cut the
    segment back to its valid records (a torn tail, to its last whole one)."""
    path = os.path.join(directory, segment_name(segment))
    if not found.ok and (found.corrupt_at is not None or found.bad_header):
        quarantine = os.path.join(directory, QUARANTINE)
        os.makedirs(quarantine, exist_ok=True)
        shutil.copyfile(path, os.path.join(quarantine, segment_name(segment)))
        fsync_directory(quarantine)
    if found.bad_header:
        os.unlink(path)
    else:
        with open(path, "r+b") as handle:
            handle.truncate(found.end)
            os.fsync(handle.fileno())
    fsync_directory(directory)


def _segments(directory: str) -> list[int]:
    os.makedirs(directory, exist_ok=True)
    return list_segments(directory)


async def recover(directory: str, writer: WalWriter, ledger: Ledger, uploader: Uploader,
                  run: Run, metrics: Metrics, batch_size: int,
                  batch_max_bytes: int,
                  before_submit: Callable[[Batch], None] = lambda batch: None) -> Recovered:
    """Replay every segment of `directory` (see the module docstring);
    fires once every batch is submitted to `uploader` (not yet stored)."""
    done = Recovered()
    segments = await run(_segments, directory)
    if not segments:
        return done
    cuts: dict[int, list[Cut]] = {}
    for segment in segments:
        path = os.path.join(directory, segment_name(segment))
        found: Scan = await run(read_segment, path, False)
        name = segment_name(segment)
        if found.torn_at is not None:
            done.torn.append((name, found.torn_at))
            metrics.wal_torn_records.inc()
            _log.warn("write-ahead log segment {name}: torn record at byte {offset} "
                      "(cut short by the crash; it was never acknowledged), cut off",
                      name=name, offset=found.torn_at)
        if found.corrupt_at is not None or found.bad_header:
            done.quarantined.append(name)
            metrics.wal_quarantined_segments.inc()
            _log.error("write-ahead log segment {name} is corrupt at byte {offset}: "
                       "copied to {quarantine}, the {records} records before it are "
                       "replayed; see `estat-wal verify`", name=name,
                       offset=0 if found.bad_header else found.corrupt_at,
                       quarantine=os.path.join(directory, QUARANTINE),
                       records=found.records)
        if not found.ok:
            await run(_repair, directory, segment, found)
            if found.bad_header:
                continue
        writer.adopt(segment, found.end)
        ledger.replaying(segment, found.event_count)
        for cut in found.cuts:
            cuts.setdefault(cut.segment, []).append(cut)
    for segment in list(writer.segments):
        found = await run(read_segment, writer.path(segment))
        done.segments += 1
        done.events += len(found.events)
        metrics.wal_replayed_events.inc(len(found.events))
        for batch in cut_batches(segment, found.events, cuts.get(segment, []),
                                 batch_size, batch_max_bytes):
            await uploader.when_room()
            done.batches += 1
            before_submit(batch)
            uploader.submit(batch)
    if done.segments:
        _log.info("replayed {events} events of {segments} write-ahead log segments "
                  "in {batches} batches", events=done.events, segments=done.segments,
                  batches=done.batches)
    ledger.collect()
    return done
