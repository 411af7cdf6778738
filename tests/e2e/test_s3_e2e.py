"""End to end: `twistd -n estat-ingest` as a subprocess storing to a real
moto S3 server over loopback TCP, driven over real HTTP."""

from __future__ import annotations

import collections
import gzip
import json
import re

from twisted.internet.defer import inlineCallbacks
from twisted.logger import Logger
from twisted.trial import unittest

from tests.support import EstatServer, MotoServer, make_workdir, poll_until, post

_log = Logger()

BUCKET = "estat-e2e"
KEY = re.compile(r"raw/dt=\d{4}-\d{2}-\d{2}/hour=\d{2}/e2e-host-[0-9A-HJKMNP-TV-Z]{26}\.jsonl\.gz")
# What the uploader stored in S3 (re-uploads from the DLQ have path="dlq").
STORED = 'estat_{}_stored_total{{path="upload",store="s3"}}'


def bucket_contents(client):  # type: ignore[no-untyped-def]
    """Every object of the bucket as (key, head, lines)."""
    found = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET):
        for item in page.get("Contents", []):
            got = client.get_object(Bucket=BUCKET, Key=item["Key"])
            lines = [json.loads(line) for line in
                     gzip.decompress(got["Body"].read()).splitlines()]
            found.append((item["Key"], got, lines))
    return found


class S3EndToEnd(unittest.TestCase):
    timeout = 180

    @inlineCallbacks
    def test_every_posted_event_is_in_the_bucket_exactly_once(self):
        workdir = make_workdir(self)
        moto = MotoServer(workdir)
        yield moto.start()
        self.addCleanup(moto.stop)
        client = moto.client()
        client.create_bucket(Bucket=BUCKET)
        server = EstatServer(workdir, env={
            "S3_BUCKET": BUCKET,
            "AWS_ENDPOINT_URL_S3": moto.endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_REGION": "us-east-1",
            "HOST_ID": "e2e-host",
            "BATCH_SIZE": "100",
            "FLUSH_INTERVAL": "0.2",
        })
        yield server.start()
        self.addCleanup(lambda: server.proc.kill())

        count = 1000
        ids = [f"evt-{n:05d}" for n in range(count)]
        accepted = 0
        for event_id in ids:
            status, _ = post(server.url + "/collect",
                             json.dumps({"id": event_id, "kind": "e2e"}).encode())
            accepted += status == 202
        self.assertEqual(accepted, count)

        def stored():  # type: ignore[no-untyped-def]
            contents = bucket_contents(client)
            lines = sum(len(lines) for _, _, lines in contents)
            return contents if lines >= count else None

        contents = yield poll_until(stored, 60, what=f"{count} events in the bucket")
        found = [line["body"]["id"] for _, _, lines in contents for line in lines]
        repeated = [i for i, n in collections.Counter(found).items() if n > 1]
        self.assertEqual(repeated, [], "no event is stored twice")
        self.assertEqual(sorted(found), ids, "every accepted event is stored")
        for key, got, lines in contents:
            self.assertRegex(key, KEY)
            self.assertEqual(got["ContentType"], "application/gzip")
            self.assertNotIn("ContentEncoding", got)
            self.assertEqual(got["Metadata"]["event-count"], str(len(lines)))
            self.assertEqual(got["Metadata"]["host"], "e2e-host")
            self.assertEqual(got["Metadata"]["first-receive-ms"], str(round(lines[0]["ts"] * 1000)))
            self.assertEqual(got["Metadata"]["last-receive-ms"], str(round(lines[-1]["ts"] * 1000)))

        metrics = yield poll_until(
            lambda: (lambda m: m if m.get(STORED.format("events")) == count else None)(
                server.metrics()), 10, what="the S3 counters to settle")
        self.assertEqual(metrics["estat_events_accepted_total"], count)
        self.assertEqual(metrics[STORED.format("events")], count)
        self.assertEqual(metrics[STORED.format("objects")], len(contents))
        self.assertEqual(metrics['estat_s3_put_attempts_total{outcome="ok"}'], len(contents))
        self.assertEqual(metrics['estat_s3_put_attempts_total{outcome="permanent"}'], 0)
        # A retried attempt (say, a keep-alive connection closed by the
        # server at the wrong moment) is allowed, but must be accounted for.
        retried = metrics['estat_s3_put_attempts_total{outcome="retryable"}']
        self.assertEqual(retried, sum(value for name, value in metrics.items()
                                      if name.startswith("estat_s3_put_failures_total{")))
        self.assertEqual(metrics[STORED.format("bytes")],
                         sum(got["ContentLength"] for _, got, _ in contents))
        self.assertEqual(metrics["estat_s3_put_seconds_count"], len(contents) + retried)
        _log.info("S3 end to end: {accepted} events accepted, {found} found in the bucket "
                  "in {objects} objects", accepted=accepted, found=len(found),
                  objects=len(contents))
        code = yield server.stop()
        self.assertIn(code, (0, -15), server.output())
        after = sum(len(lines) for _, _, lines in bucket_contents(client))
        self.assertEqual(after, count, "a clean stop adds no duplicate")
