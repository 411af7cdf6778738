"""The batcher and uploader together, driven by a task.Clock: flush
triggers, new batch lists, and the backpressure chain down to a 503."""

from __future__ import annotations

import gzip
import json

from prometheus_client import CollectorRegistry
from twisted.internet.task import Clock
from twisted.trial import unittest

from estat.metrics import Metrics
from estat.model import Chunk
from estat.pipeline.batcher import Batcher
from estat.pipeline.queue import EventQueue
from estat.pipeline.uploader import Uploader
from estat.stores.base import PermanentStoreError, RetryableStoreError
from tests.fakes import FakeStore, RecordingSpool, sync_encoder
from tests.support import Exchange, make_listener, post_bytes


class PipelineTests(unittest.TestCase):
    def build(self, *, batch_size=5, batch_max_bytes=10_000, flush_interval=5.0,
              queue_size=20, upload_queue_size=2, concurrency=1, store=None, validated=True):
        self.clock = Clock()
        self.registry = CollectorRegistry()
        self.metrics = Metrics(self.registry, process=False)
        self.queue = EventQueue(queue_size)
        self.store = store or FakeStore()
        self.spool = RecordingSpool()
        self.uploader = Uploader(self.store, self.spool, sync_encoder(validated), self.metrics,
                                 upload_queue_size, concurrency)
        self.batcher = Batcher(self.clock, self.queue, self.uploader, self.metrics,
                               batch_size, batch_max_bytes, flush_interval)
        loop = self.batcher.service()
        loop.startService()
        self.addCleanup(loop.stopService)

    def metric(self, name, **labels):
        return self.registry.get_sample_value(name, labels) or 0.0

    def put(self, n, start=0, size=0):
        for i in range(start, start + n):
            body = json.dumps({"n": i, "pad": "x" * size}).encode()
            self.queue.offer([Chunk(1700000000000 + i, [body])])

    def stored_numbers(self):
        numbers = []
        for obj in sorted(self.store.stored.values(), key=lambda o: o.first_ts_ms):
            for line in gzip.decompress(obj.data).splitlines():
                numbers.append(json.loads(line)["body"]["n"])
        return numbers

    def test_size_trigger_flushes_full_batches_and_keeps_the_rest_open(self):
        self.build(batch_size=5)
        self.put(12)
        self.clock.advance(0.05)
        self.assertEqual(self.stored_numbers(), list(range(10)))
        self.assertEqual(self.batcher.open_events(), 2)
        self.assertEqual(self.metric("estat_batches_flushed_total", trigger="size"), 2)
        self.assertEqual(self.metric("estat_events_stored_total", store="fake", path="upload"), 10)

    def test_interval_trigger_flushes_after_the_first_event_ages(self):
        self.build(flush_interval=5.0)
        self.put(2)
        self.clock.advance(0.05)
        self.clock.pump([0.05] * 96)  # 4.8 s after the first event was drained
        self.assertEqual(self.store.stored, {})
        self.clock.pump([0.05] * 5)
        self.assertEqual(self.stored_numbers(), [0, 1])
        self.assertEqual(self.metric("estat_batches_flushed_total", trigger="interval"), 1)

    def test_bytes_trigger(self):
        self.build(batch_size=1000, batch_max_bytes=300)
        self.put(10, size=90)  # ~110 bytes each: 3 per batch
        self.clock.advance(0.05)
        self.assertEqual(self.metric("estat_batches_flushed_total", trigger="bytes"), 3)
        for obj in self.store.stored.values():
            self.assertEqual(obj.event_count, 3)

    def test_each_flush_makes_a_new_list(self):
        self.build(batch_size=2, upload_queue_size=5)
        self.store.manual = True
        self.put(4)
        self.clock.advance(0.05)
        (first, _), = self.store.pending
        self.assertEqual(first.event_count, 2)
        self.assertEqual(len(self.uploader._queue), 1)
        queued = self.uploader._queue[0]
        self.assertEqual([e.body for e in queued.events],
                         [b'{"n": 2, "pad": ""}', b'{"n": 3, "pad": ""}'])
        self.assertIsNot(queued.events, self.batcher._events)

    def test_backpressure_chain_ends_in_503_and_recovers(self):
        self.build(batch_size=2, queue_size=4, upload_queue_size=1, concurrency=1,
                   store=FakeStore(manual=True))
        setup = make_listener(clock=self.clock, queue=self.queue, metrics=self.metrics)
        state = setup.state
        codes = []
        for i in range(12):
            [(code, _, _)] = Exchange(setup.listener).send_and_read(post_bytes(b'{"n":%d}' % i))
            codes.append(code)
            self.clock.advance(0.05)
        # 1 batch uploading + 1 queued + 1 full open batch + 4 in the event queue
        self.assertEqual(codes, [202] * 10 + [503] * 2)
        self.assertEqual(len(self.store.pending), 1)
        self.assertEqual(self.uploader.depth(), 1)
        self.assertEqual(self.metric("estat_event_queue_depth"), 4)
        self.assertEqual(self.metric("estat_upload_queue_depth"), 1)
        self.assertEqual(self.metric("estat_events_rejected_total", reason="queue_full"), 2)
        self.assertFalse(state.ready())
        # S3 recovers: everything accepted is stored, in order, once.
        while self.store.pending or len(self.queue) or self.batcher.open_events():
            self.store.finish_all()
            self.clock.advance(5)
        self.assertEqual(self.stored_numbers(), list(range(10)))
        self.assertTrue(state.ready())

    def test_single_events_with_and_without_line_breaks_are_one_line_each(self):
        """A single event is marked plain at admission unless it holds a CR
        or LF; either way its object has one line per event, whose body
        reads back as sent."""
        self.build(batch_size=4)
        setup = make_listener(clock=self.clock, queue=self.queue, metrics=self.metrics)
        bodies = [b'{"n":0}', b'{\r\n  "n": 1\n}', b'{"n":2,"s":"a\\nb"}', b'{"n":\r3}']
        for body in bodies:
            [(code, _, _)] = Exchange(setup.listener).send_and_read(post_bytes(body))
            self.assertEqual(code, 202)
        self.assertEqual([chunk.plain for chunk in self.queue._chunks],
                         [True, False, True, False])
        self.clock.advance(0.05)
        [obj] = self.store.stored.values()
        lines = gzip.decompress(obj.data).splitlines()
        self.assertEqual([json.loads(line)["body"] for line in lines],
                         [json.loads(body) for body in bodies])

    def test_store_failure_goes_to_the_spool_not_the_floor(self):
        error = RetryableStoreError("connection", "ConnectionRefused", "refused")
        self.build(batch_size=3, store=FakeStore(error=error))
        self.put(3)
        self.clock.advance(0.05)
        [(obj, saved_error)] = self.spool.saved
        self.assertEqual(obj.event_count, 3)
        self.assertIs(saved_error, error)
        self.assertEqual(self.metric("estat_store_failures_total", store="fake",
                                     reason="connection"), 1)
        self.flushLoggedErrors()

    def test_flush_all_at_shutdown_ignores_the_upload_bound(self):
        self.build(batch_size=2, upload_queue_size=1, store=FakeStore(manual=True))
        self.put(7)
        self.batcher.flush_all()
        self.assertEqual(list(self.queue), [])
        self.assertEqual(self.metric("estat_batches_flushed_total", trigger="shutdown"), 1)
        idle = self.uploader.when_idle()
        self.assertNoResult(idle)
        while self.store.pending:
            self.store.finish_all()
        self.successResultOf(idle)
        self.assertEqual(self.stored_numbers(), list(range(7)))

    def test_cancel_at_deadline_spools_in_flight_and_queued_objects(self):
        self.build(batch_size=2, upload_queue_size=5, store=FakeStore(manual=True))
        self.put(6)
        self.batcher.flush_all()
        idle = self.uploader.when_idle()
        self.uploader.cancel_in_flight()
        self.successResultOf(idle)
        self.assertEqual(sorted(o.event_count for o, _ in self.spool.saved), [2, 2, 2])
        self.assertEqual(self.store.stored, {})
        self.flushLoggedErrors()

    def test_a_failing_tick_is_counted_and_the_loop_goes_on(self):
        self.build(batch_size=1)
        submit = self.uploader.submit

        def broken(batch):
            self.uploader.submit = submit
            raise TypeError("a bug")

        self.uploader.submit = broken
        self.put(1)
        self.clock.advance(0.05)
        self.assertEqual(self.metric("estat_loop_errors_total", loop="batcher"), 1)
        self.assertEqual(len(self.flushLoggedErrors(TypeError)), 1)
        self.assertEqual(self.store.stored, {})
        self.put(5, start=1)
        self.clock.advance(0.05)
        self.assertEqual(self.stored_numbers(), list(range(1, 6)))

    def test_permanent_error_also_spools(self):
        error = PermanentStoreError(
            "client_error", "NoSuchBucket", "The specified bucket does not exist")
        self.build(batch_size=1, store=FakeStore(error=error))
        self.put(1)
        self.clock.advance(0.05)
        [(obj, saved_error)] = self.spool.saved
        self.assertEqual(obj.event_count, 1)
        self.assertIs(saved_error, error)
        self.assertFalse(saved_error.retryable)
        self.assertEqual(self.metric("estat_store_failures_total", store="fake",
                                     reason="client_error"), 1)
        self.flushLoggedErrors()
