"""The write-ahead log: its segment format (a torn tail at every byte of
the last record, a corrupt record in the middle), group commit on a
controlled writer thread, the ledger's segment deletion, recovery's
batches, and durable admission."""

from __future__ import annotations

import json
import os
from typing import Any, Callable

from prometheus_client import CollectorRegistry
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.trial import unittest

from estat.metrics import Metrics
from estat.model import Batch, Chunk, Event, Lines, events_in
from estat.wal import segment as seg
from estat.wal.ledger import Ledger, wal_batch_id
from estat.wal.recovery import cut_batches
from estat.wal.segment import Cut
from estat.wal.writer import Position, WalFull, WalWriteError, WalWriter
from tests.support import make_workdir


def _chunk(ts: int, *bodies: bytes, segment: str = "") -> Chunk:
    return Chunk(ts, list(bodies), segment)


def _events(ts: int, *bodies: bytes, segment: str = "") -> list[Event]:
    return events_in([_chunk(ts, *bodies, segment=segment)])


class SegmentFormat(unittest.TestCase):
    def _data(self) -> tuple[bytes, list[int]]:
        """A segment of three records, and where each record begins."""
        records = [seg.events_record(_chunk(5, b'{"a":1}')),
                   seg.events_record(_chunk(6, b'{"b":2}', b'{"c":3}', segment="shop")),
                   seg.cut_record(42, 0, 3)]
        starts, at = [], len(seg.HEADER)
        for record in records:
            starts.append(at)
            at += len(record)
        return seg.HEADER + b"".join(records), starts

    def test_round_trip(self):
        data, _ = self._data()
        found = seg.scan(data)
        self.assertTrue(found.ok)
        self.assertEqual(found.events, [Event(5, b'{"a":1}', ""), Event(6, b'{"b":2}', "shop"),
                                        Event(6, b'{"c":3}', "shop")])
        self.assertEqual(found.cuts, [Cut(42, 0, 3)])
        self.assertEqual((found.records, found.end, found.event_count), (3, len(data), 3))

    def test_an_ndjson_text_is_logged_as_its_bodies(self):
        text = Lines(b'{"b":2}\n{"c":3}\n', 2)
        self.assertEqual(seg.events_record(Chunk(6, text, "shop")),
                         seg.events_record(_chunk(6, b'{"b":2}', b'{"c":3}', segment="shop")))

    def test_a_torn_tail_at_every_byte_of_the_last_record_is_cut_off(self):
        data, starts = self._data()
        last = starts[-1]
        for end in range(last + 1, len(data)):
            found = seg.scan(data[:end])
            self.assertEqual((found.torn_at, found.corrupt_at, found.end, found.records),
                             (last, None, last, 2), f"cut at {end}")
            self.assertEqual(len(found.events), 3)
        for end in range(starts[1] + 1, starts[2]):  # within the second record
            found = seg.scan(data[:end])
            self.assertEqual((found.torn_at, found.records, len(found.events)),
                             (starts[1], 1, 1))

    def test_a_bad_checksum_in_the_last_record_is_a_torn_tail(self):
        data, starts = self._data()
        broken = data[:-1] + bytes([data[-1] ^ 0xFF])
        found = seg.scan(broken)
        self.assertEqual((found.torn_at, found.corrupt_at), (starts[-1], None))

    def test_zeros_past_the_last_record_are_a_torn_tail(self):
        data, _ = self._data()
        found = seg.scan(data + b"\0" * 100)
        self.assertEqual((found.torn_at, found.end, found.records), (len(data), len(data), 3))

    def test_a_bad_record_in_the_middle_is_corrupt(self):
        data, starts = self._data()
        at = starts[1] + seg.RECORD_HEAD.size + 3
        broken = data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1:]
        found = seg.scan(broken)
        self.assertEqual((found.corrupt_at, found.torn_at, found.end, found.records),
                         (starts[1], None, starts[1], 1))
        self.assertFalse(found.ok)

    def test_a_bad_header_is_corrupt(self):
        data, _ = self._data()
        self.assertTrue(seg.scan(b"NOTAWAL!" + data[8:]).bad_header)

    def test_names(self):
        self.assertEqual(seg.segment_id_of(seg.segment_name(17)), 17)
        self.assertIsNone(seg.segment_id_of("17.wal.tmp"))


class FakeThread:
    """The writer's thread, run by the test: each job waits until `step`."""

    def __init__(self) -> None:
        self.jobs: list[tuple[Callable[..., Any], tuple[Any, ...], Deferred[Any]]] = []

    def __call__(self, function: Callable[..., Any], *args: Any) -> "Deferred[Any]":
        d: Deferred[Any] = Deferred()
        self.jobs.append((function, args, d))
        return d

    def step(self) -> None:
        function, args, d = self.jobs.pop(0)
        try:
            result = function(*args)
        except Exception as error:
            d.errback(error)
        else:
            d.callback(result)

    def run_all(self) -> None:
        while self.jobs:
            self.step()


class GroupCommit(unittest.TestCase):
    def setUp(self) -> None:
        self.directory = make_workdir(self)
        self.thread = FakeThread()
        self.clock = Clock()
        self.registry = CollectorRegistry()
        self.writer = WalWriter(self.directory, 1_000_000, self.thread, self.clock,
                                Metrics(self.registry, process=False),
                                now_us=lambda: 1000)

    def _append(self, body: bytes) -> "Deferred[Position]":
        """Append, and let the reactor turn end (the group starts then)."""
        d = self.writer.append(seg.events_record(_chunk(1, body)), 1)
        self.clock.advance(0)
        return d

    def test_records_of_one_reactor_turn_share_a_group(self):
        for body in (b"1", b"2", b"3"):
            self.writer.append(seg.events_record(_chunk(1, body)), 1)
        self.assertEqual(self.thread.jobs, [])
        self.clock.advance(0)
        self.assertEqual(len(self.thread.jobs), 1)
        self.thread.step()
        self.assertEqual(self.registry.get_sample_value("estat_wal_group_records_sum"), 3)

    def test_one_fsync_covers_every_record_that_arrived_during_the_last(self):
        first = self._append(b"1")
        self.assertEqual(len(self.thread.jobs), 1)  # written at once
        waiting = [self._append(b"%d" % n) for n in range(2, 6)]
        self.assertEqual(len(self.thread.jobs), 1)  # they wait for the next group
        fired: list[Any] = []
        for d in [first, *waiting]:
            d.addCallback(fired.append)
        self.thread.step()
        self.assertEqual(fired, [Position(1000, 0)])
        self.assertEqual(len(self.thread.jobs), 1)  # the second group, all four
        self.thread.step()
        self.assertEqual(fired, [Position(1000, n) for n in range(5)])
        self.assertEqual(self.registry.get_sample_value("estat_wal_group_records_count"), 2)
        self.assertEqual(self.registry.get_sample_value("estat_wal_group_records_sum"), 5)
        found = seg.read_segment(self.writer.path(1000))
        self.assertEqual([e.body for e in found.events], [b"1", b"2", b"3", b"4", b"5"])

    def test_a_failed_write_fails_its_group_and_the_next_opens_a_new_segment(self):
        self._append(b"ok")
        self.thread.step()
        failing = self._append(b"lost")
        function, args, d = self.thread.jobs.pop(0)
        fd = args[0]
        os.close(fd)  # the write fails: EBADF
        self.thread.jobs.insert(0, (function, args, d))
        self.thread.step()
        self.failureResultOf(failing, WalWriteError)
        self.assertEqual(self.registry.get_sample_value("estat_wal_write_failures_total"), 1)
        after = self._append(b"after")
        self.thread.step()
        position = self.successResultOf(after)
        self.assertEqual(position, Position(1001, 0))
        self.assertEqual([e.body for e in seg.read_segment(self.writer.path(1000)).events],
                         [b"ok"])

    def test_refuses_over_the_budget_but_never_a_cut(self):
        self.writer.max_bytes = 100
        self._append(b"x" * 50)
        with self.assertRaises(WalFull):
            self._append(b"y" * 50)
        self.writer.append(seg.cut_record(1, 0, 1), 0, over_budget=True)
        self.clock.advance(0)

    def test_rolls_over_by_age_and_deletes_only_sealed_segments(self):
        ledger = Ledger(self.writer)
        first = self._append(b"a")
        self.thread.run_all()
        ledger.appended(self.successResultOf(first), 1)
        self.clock.advance(self.writer.segment_seconds)
        second = self._append(b"b")
        self.thread.run_all()
        self.assertEqual(self.successResultOf(second).segment, 1001)
        self.assertEqual(list(self.writer.segments), [1000, 1001])
        segment, first_ordinal = ledger.take(1)
        ledger.finished(Batch([], 1, wal_batch_id(segment, first_ordinal), "size",
                              (segment, first_ordinal, 1)))
        self.thread.run_all()
        self.assertEqual(list(self.writer.segments), [1001])
        self.assertFalse(os.path.exists(self.writer.path(1000)))

    def test_close_writes_what_is_pending_then_refuses(self):
        pending = self._append(b"a")
        closed = Deferred.fromCoroutine(self.writer.close())
        self.thread.run_all()
        self.successResultOf(pending)
        self.successResultOf(closed)
        self.failureResultOf(self._append(b"late"), WalWriteError)


class LedgerOrder(unittest.TestCase):
    def test_runs_follow_the_queue_and_stop_at_a_segment_change(self):
        writer: Any = type("W", (), {"on_sealed": None, "sealed": lambda self: []})()
        ledger = Ledger(writer)
        ledger.appended(Position(7, 0), 3)
        ledger.appended(Position(7, 3), 2)
        ledger.appended(Position(8, 0), 4)
        self.assertEqual(ledger.front(), (7, 5))
        self.assertEqual(ledger.take(4), (7, 0))
        self.assertEqual(ledger.front(), (7, 1))
        self.assertEqual(ledger.take(1), (7, 4))
        self.assertEqual(ledger.front(), (8, 4))
        self.assertEqual((ledger.outstanding(7), ledger.outstanding(8)), (5, 4))


class ReplayCuts(unittest.TestCase):
    def test_logged_cuts_are_kept_and_the_rest_cut_by_size(self):
        events = _events(1, *[b"e%d" % n for n in range(10)])
        batches = list(cut_batches(9, events, [Cut(9, 0, 3), Cut(9, 3, 1)],
                                   batch_size=4, batch_max_bytes=10_000))
        self.assertEqual([b.wal_span for b in batches],
                         [(9, 0, 3), (9, 3, 1), (9, 4, 4), (9, 8, 2)])
        self.assertEqual([b.batch_id for b in batches],
                         [wal_batch_id(9, n) for n in (0, 3, 4, 8)])
        self.assertEqual([e for b in batches for e in b.events], events)

    def test_a_cut_past_the_valid_records_is_ignored(self):
        events = _events(1, b"a", b"b")
        batches = list(cut_batches(9, events, [Cut(9, 0, 5)], 10, 10_000))
        self.assertEqual([b.wal_span for b in batches], [(9, 0, 2)])


def _at_once(function: Callable[..., Any], *args: Any) -> "Deferred[Any]":
    """A writer thread that has already run the job."""
    return succeed(function(*args))


class FakeUploader:
    def __init__(self) -> None:
        self.batches: list[Batch] = []

    def when_room(self) -> "Deferred[None]":
        return succeed(None)

    def submit(self, batch: Batch) -> None:
        self.batches.append(batch)


class Recovery(unittest.TestCase):
    def test_torn_tail_cut_off_corrupt_segment_quarantined_both_replayed(self):
        directory = make_workdir(self)
        registry = CollectorRegistry()
        metrics = Metrics(registry, process=False)
        torn = os.path.join(directory, seg.segment_name(100))
        whole = seg.events_record(_chunk(1, b"a", b"b"))
        seg.write_segment(torn, [whole, seg.cut_record(100, 0, 2),
                                 seg.events_record(_chunk(2, b"c"))[:-2]])
        corrupt = os.path.join(directory, seg.segment_name(200))
        bad = bytearray(seg.events_record(_chunk(3, b"d")))
        bad[-1] ^= 0xFF
        seg.write_segment(corrupt, [seg.events_record(_chunk(3, b"x")), bytes(bad),
                                    seg.events_record(_chunk(3, b"y"))])
        writer = WalWriter(directory, 1_000_000, _at_once, Clock(), metrics)
        ledger = Ledger(writer)
        uploader = FakeUploader()
        from estat.wal.recovery import recover
        done = self.successResultOf(Deferred.fromCoroutine(recover(
            directory, writer, ledger, uploader, _at_once, metrics, 100, 10_000)))  # type: ignore[arg-type]
        self.assertEqual([(b.batch_id, [e.body for e in b.events]) for b in uploader.batches],
                         [(wal_batch_id(100, 0), [b"a", b"b"]), (wal_batch_id(200, 0), [b"x"])])
        self.assertEqual(done.torn, [(seg.segment_name(100), len(seg.HEADER) + len(whole)
                                      + len(seg.cut_record(0, 0, 0)))])
        self.assertEqual(done.quarantined, [seg.segment_name(200)])
        self.assertTrue(seg.read_segment(torn).ok)
        self.assertTrue(seg.read_segment(corrupt).ok)
        self.assertTrue(os.path.exists(os.path.join(directory, "quarantine",
                                                    seg.segment_name(200))))
        self.assertEqual(registry.get_sample_value("estat_wal_torn_records_total"), 1)
        self.assertEqual(registry.get_sample_value("estat_wal_quarantined_segments_total"), 1)
        self.assertEqual(registry.get_sample_value("estat_wal_replayed_events_total"), 3)
        for batch in uploader.batches:
            ledger.finished(batch)
        self.assertEqual(seg.list_segments(directory), [])  # each batch stored: all gone


class Admission(unittest.TestCase):
    def setUp(self) -> None:
        from estat.admission import DurableAdmission
        from estat.collect import ACCEPTED, IngestState
        from estat.pipeline.queue import EventQueue
        self.accepted = ACCEPTED
        self.thread = FakeThread()
        metrics = Metrics(CollectorRegistry(), process=False)
        self.queue = EventQueue(3)
        self.state = IngestState(self.queue, metrics, validate_json=True)
        self.clock = Clock()
        self.writer = WalWriter(make_workdir(self), 10_000, self.thread, self.clock, metrics,
                                now_us=lambda: 5)
        self.ledger = Ledger(self.writer)
        self.admission = DurableAdmission(self.state, self.writer, self.ledger)

    def test_refused_while_starting(self):
        answer = self.admission.admit([_chunk(1, b"{}")], self.accepted)
        self.assertEqual((answer.code, json.loads(answer.body)["error"]), (503, "starting"))

    def test_answers_202_after_the_fsync_and_queues_then(self):
        self.state.lifecycle.start_running()
        answer = self.admission.admit([_chunk(1, b"{}", b"[]")], self.accepted)
        self.assertIsInstance(answer, Deferred)
        self.assertNoResult(answer)
        self.assertEqual(len(self.queue), 0)
        # room is reserved meanwhile: one more event fits, two do not
        refused = self.admission.admit([_chunk(1, b"1", b"2")], self.accepted)
        self.assertEqual(refused.code, 503)
        self.clock.advance(0)
        self.thread.step()
        self.assertEqual(self.successResultOf(answer), self.accepted)
        self.assertEqual(len(self.queue), 2)
        self.assertEqual(self.ledger.front(), (5, 2))

    def test_a_failed_fsync_is_a_503_never_a_202(self):
        self.state.lifecycle.start_running()
        answer = self.admission.admit([_chunk(1, b"{}")], self.accepted)
        self.clock.advance(0)
        function, args, d = self.thread.jobs.pop(0)
        d.errback(OSError(5, "Input/output error"))
        self.assertEqual(json.loads(self.successResultOf(answer).body)["error"],
                         "wal_unavailable")
        self.assertEqual(len(self.queue), 0)

    def test_a_batch_with_several_keys_is_logged_as_queued(self):
        """An SDK batch may carry events of several write keys: the log
        holds each with its own key segment, in the order the queue holds
        them, so a replay gives the same events as the queue."""
        self.state.lifecycle.start_running()
        chunks = [Chunk(7, [b'{"a":1}', b'{"c":3}'], "shop"), Chunk(7, [b'{"b":2}'])]
        events = events_in(chunks)
        answer = self.admission.admit(chunks, self.accepted, "segment")
        self.clock.advance(0)
        function, args, d = self.thread.jobs.pop(0)
        data = args[3]
        d.callback((3, 0.001))
        self.assertEqual(self.successResultOf(answer), self.accepted)
        queued = list(self.queue)
        self.assertEqual(sorted(queued), sorted(events))
        self.assertEqual(seg.scan(seg.HEADER + data).events, queued)

    def test_wal_full(self):
        self.state.lifecycle.start_running()
        self.writer.max_bytes = 10
        answer = self.admission.admit([_chunk(1, b"{}")], self.accepted)
        self.assertEqual(json.loads(answer.body)["error"], "wal_full")


    def test_readyz_turns_503_as_the_log_reaches_its_budget(self):
        from estat.collect import readiness
        self.state.admission = self.admission
        self.state.lifecycle.start_running()
        self.assertEqual(readiness(self.state).code, 200)
        self.admission.admit([_chunk(1, b"x" * 9_800)], self.accepted)  # of 10,000
        self.assertEqual(readiness(self.state).code, 200)
        self.admission.admit([_chunk(1, b"x" * 150)], self.accepted)
        answer = readiness(self.state)
        self.assertEqual((answer.code, json.loads(answer.body)["status"]), (503, "wal_full"))


class Cli(unittest.TestCase):
    def test_list_and_verify(self):
        import io

        from estat.wal.cli import run
        directory = make_workdir(self)
        os.makedirs(os.path.join(directory, "w0"))
        seg.write_segment(os.path.join(directory, "w0", seg.segment_name(1)),
                          [seg.events_record(_chunk(1, b"a")), b"\x05\x00"])
        out = io.StringIO()
        self.assertEqual(run(["--wal-dir", directory, "list"], out, io.StringIO()), 0)
        self.assertIn("1 records  1 events  0 cuts  torn tail at byte", out.getvalue())
        bad = bytearray(seg.events_record(_chunk(1, b"b")))
        bad[-1] ^= 1
        seg.write_segment(os.path.join(directory, seg.segment_name(2)),
                          [bytes(bad), seg.events_record(_chunk(1, b"c"))])
        out = io.StringIO()
        self.assertEqual(run(["--wal-dir", directory, "verify"], out, io.StringIO()), 1)
        self.assertIn("CORRUPT at byte 12", out.getvalue())
        self.assertIn("2 segments, 1 corrupt", out.getvalue())


class DurablePipeline(unittest.TestCase):
    """Admission, log, queue, batcher, uploader and ledger together: a
    batch holds one segment's events, is named after them, and a segment
    goes once its batches are stored (not when abandoned at a stop)."""

    def setUp(self) -> None:
        from estat.admission import DurableAdmission
        from estat.collect import ACCEPTED, IngestState
        from estat.pipeline.batcher import Batcher
        from estat.pipeline.queue import EventQueue
        from estat.pipeline.uploader import Uploader
        from estat.wal.ledger import cut_then_encode
        from tests.fakes import FakeStore, RecordingSpool, sync_encoder
        self.accepted = ACCEPTED
        self.clock = Clock()
        self.thread = FakeThread()
        metrics = Metrics(CollectorRegistry(), process=False)
        queue = EventQueue(100)
        state = IngestState(queue, metrics, validate_json=True)
        state.lifecycle.start_running()
        ids = iter(range(1000, 2000))
        self.writer = WalWriter(make_workdir(self), 1_000_000, self.thread, self.clock,
                                metrics, now_us=lambda: next(ids))
        ledger = Ledger(self.writer)
        self.store = FakeStore(manual=True)
        self.uploader = Uploader(self.store, RecordingSpool(),
                                 cut_then_encode(ledger, sync_encoder(True)), metrics, 10, 4,
                                 on_done=ledger.finished)
        self.batcher = Batcher(self.clock, queue, self.uploader, metrics, 100, 1_000_000,
                               flush_interval=60.0, runs=ledger, span_id=wal_batch_id)
        self.admission = DurableAdmission(state, self.writer, ledger)

    def _admit(self, *bodies: bytes) -> None:
        answer = self.admission.admit([_chunk(1, *bodies)], self.accepted)
        self._settle()
        self.assertEqual(self.successResultOf(answer).code, 202)  # type: ignore[arg-type]

    def _settle(self) -> None:
        """Run the log's writes until none is left."""
        while self.thread.jobs or self.writer._kick_call is not None:
            self.clock.advance(0)
            self.thread.run_all()

    def test_batches_stop_at_a_segment_and_segments_go_once_stored(self):
        self._admit(b'{"a":1}', b'{"a":2}')
        self._admit(b'{"a":3}')
        self.clock.advance(self.writer.segment_seconds)
        self._admit(b'{"b":1}')
        self.batcher.flush_all()
        self._settle()  # the cut records
        keys = [obj.key for obj, _ in self.store.pending]
        self.assertEqual(len(keys), 2, keys)
        self.assertIn(f"-{wal_batch_id(1000, 0)}.jsonl.gz", keys[0])
        self.assertIn(f"-{wal_batch_id(1001, 0)}.jsonl.gz", keys[1])
        self.assertEqual(list(self.writer.segments), [1000, 1001])
        self.store.pending[0][1].callback(None)
        self._settle()
        self.assertEqual(list(self.writer.segments), [1001])  # 1001 is being written

    def test_a_batch_abandoned_at_the_deadline_keeps_its_segment(self):
        self._admit(b'{"a":1}')
        self.clock.advance(self.writer.segment_seconds)
        self._admit(b'{"b":1}')
        self.batcher.flush_all()
        self._settle()
        self.uploader.abandon()
        self._settle()
        self.assertEqual(list(self.writer.segments), [1000, 1001])
        self.successResultOf(self.uploader.when_idle())

    def test_a_batch_the_dlq_cannot_keep_keeps_its_segment(self):
        from estat.stores.base import RetryableStoreError

        class Dropping:
            def save(self, obj: Any, error: Any) -> "Deferred[bool]":
                return succeed(False)

        self.store.manual = False
        self.store.error = RetryableStoreError("timeout", "T", "down")
        self.uploader.spool = Dropping()  # type: ignore[assignment]
        self._admit(b'{"a":1}')
        self.clock.advance(self.writer.segment_seconds)
        self._admit(b'{"b":1}')
        self.batcher.flush_all()
        self._settle()
        self.successResultOf(self.uploader.when_idle())
        self.assertEqual(list(self.writer.segments), [1000, 1001])
        self.flushLoggedErrors()
