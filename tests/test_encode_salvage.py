"""A batch that can be encoded neither normally nor as raw lines is not
lost: its bodies go to the dead-letter directory as base64 lines built by
other code, and when even that fails the loss is a `LOST` log line and
`estat_dlq_dropped_events_total{reason="encode_error"}`."""

from __future__ import annotations

import base64
import json
import os
import zlib
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.trial import unittest

from estat import codec
from estat.dlq import disk as dlqdisk
from estat.model import Batch, EncodedObject, Event
from estat.pipeline.uploader import Uploader
from tests.fakes import capture_logs, logged
from tests.support import make_workdir
from tests.test_deadletter import Harness

BODIES = [b'{"n":%d}' % n for n in range(5)]


def batch_of(bodies: list[Any], segment: str = "source=web") -> Batch:
    events = [Event(1700000000000 + n, body, segment) for n, body in enumerate(bodies)]
    return Batch.of_events(events, 40, "01HFSALVAGE", "size")


class Salvage(unittest.TestCase):

    def setUp(self) -> None:
        self.h = Harness(os.path.join(make_workdir(self), "dlq")).opened()
        self.logs = capture_logs(self)

    def upload(self, batch: Batch) -> None:
        def encode(batch: Batch) -> "Deferred[list[EncodedObject]]":
            return maybeDeferred(codec.encode_batch_safely, batch, validated=True,
                                 prefix="raw", raw_prefix="raw_dlq", host_id="h")

        uploader = Uploader(self.h.store, self.h.dlq, encode, self.h.metrics,
                            queue_size=1, concurrency=1)
        uploader.submit(batch)
        self.assertTrue(uploader.idle())
        self.flushLoggedErrors()  # the encoder's bug, logged with its traceback

    def test_when_both_encodings_fail_the_bodies_go_to_the_dlq(self) -> None:
        def broken(*args: Any, **kwargs: Any) -> list[EncodedObject]:
            raise RuntimeError("encoder bug")

        self.patch(codec, "encode_batch", broken)
        self.upload(batch_of(BODIES))
        [name] = self.h.entries()
        entry = dlqdisk.read_entry(self.h.directory, name)
        records = [json.loads(line) for line in
                   zlib.decompress(entry.data, 31).splitlines()]
        self.assertEqual([base64.b64decode(r["body_b64"]) for r in records], BODIES)
        self.assertEqual({r["error"] for r in records}, {"encode_error"})
        self.assertEqual([r["ts"] for r in records], [1700000000000 + n for n in range(5)])
        self.assertEqual(entry.meta["key"],
                         "raw_dlq/dt=2023-11-14/hour=22/h-01HFSALVAGE.jsonl.gz")
        self.assertEqual(entry.meta["last_error"]["reason"], "encode_error")
        self.assertEqual(self.h.value("estat_dlq_events_enqueued_total"), 5)
        self.assertEqual(self.h.value("estat_loop_errors_total", loop="uploader"), 1)
        self.assertEqual(logged(self.logs, "LOST"), [])
        self.assertEqual(len(logged(self.logs, "could not encode batch")), 1)

    def test_when_even_the_salvage_fails_the_loss_is_logged_and_counted(self) -> None:
        unencodable = object()  # no bytes at all: every encoding fails
        self.upload(batch_of([b'{"a":1}', unencodable, b'{"b":2}']))
        self.assertEqual(self.h.entries(), [])
        [line] = logged(self.logs, "LOST")
        self.assertEqual(line["events"], 3)
        self.assertEqual(line["reason"], "encode_error")
        self.assertEqual(self.h.value("estat_dlq_dropped_events_total",
                                      reason="encode_error"), 3)

    def test_the_salvage_key_is_safe_whatever_the_prefix_and_host(self) -> None:
        from estat.model import check_key

        obj = codec.salvage_object(batch_of(BODIES), "../raw//x/./", "h/../..")
        self.assertEqual(check_key(obj.key), obj.key)
        codec.verify_gzip(obj.data, obj.uncompressed_bytes)
