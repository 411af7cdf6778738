"""One counter of events stored, `estat_events_stored_total{store, path}`:
path="upload" for the uploader's first try, path="dlq" for a re-upload
from the dead-letter directory; the S3 store counts nothing of its own."""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry
from twisted.internet.defer import Deferred, succeed
from twisted.trial import unittest

from estat.metrics import Metrics
from estat.model import Batch, EncodedObject
from estat.pipeline.uploader import Uploader
from tests.fakes import FakeStore, make_object
from tests.support import make_workdir
from tests.test_deadletter import RETRYABLE, Harness


class StoredByPath(unittest.TestCase):

    def test_a_dlq_reupload_is_counted_with_path_dlq(self) -> None:
        h = Harness(os.path.join(make_workdir(self), "dlq")).opened()
        h.dlq.save(make_object(1, events=4), RETRYABLE)
        h.drain()
        h.clock.advance(1)
        self.assertEqual(len(h.store.stored), 1)
        self.assertEqual(h.value("estat_events_stored_total", store="fake", path="dlq"), 4)
        self.assertEqual(h.value("estat_objects_stored_total", store="fake", path="dlq"), 1)
        self.assertEqual(h.value("estat_bytes_stored_total", store="fake", path="dlq"),
                         len(make_object(1, events=4).data))
        self.assertEqual(h.value("estat_events_stored_total", store="fake", path="upload"), 0)

    def test_an_upload_is_counted_with_path_upload(self) -> None:
        registry = CollectorRegistry()
        metrics = Metrics(registry, process=False)
        obj = make_object(2, events=5)

        def encode(batch: Batch) -> "Deferred[list[EncodedObject]]":
            return succeed([obj])

        class NoSpool:
            def save(self, *args: object) -> None:
                raise AssertionError("nothing should be spooled")

        uploader = Uploader(FakeStore(), NoSpool(), encode, metrics,  # type: ignore[arg-type]
                            queue_size=1, concurrency=1)
        uploader.submit(Batch([], 0, "b", "size"))
        value = registry.get_sample_value
        self.assertEqual(value("estat_events_stored_total",
                               {"store": "fake", "path": "upload"}), 5)
        self.assertEqual(value("estat_events_stored_total", {"store": "fake", "path": "dlq"}),
                         None)
        self.assertIsNone(value("estat_s3_events_stored_total"))

    def test_every_store_and_path_starts_at_zero(self) -> None:
        registry = CollectorRegistry()
        Metrics(registry, process=False)
        for store in ("local", "s3"):
            for path in ("upload", "dlq"):
                for name in ("events", "objects", "bytes"):
                    self.assertEqual(registry.get_sample_value(
                        f"estat_{name}_stored_total", {"store": store, "path": path}), 0)
