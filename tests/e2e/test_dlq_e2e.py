"""End to end: `twistd -n estat-ingest` uploading to a real moto S3 server
that is down. Events are spooled to the dead-letter directory; once S3 is
back (same port, bucket created again) the spool drains and every event is
in the bucket exactly once: live, after a server restart, or through
`estat-dlq replay`."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.trial import unittest

from estat.dlq import disk as dlqdisk
from tests.support import (
    REPO_ROOT,
    EstatServer,
    MotoServer,
    free_port,
    make_workdir,
    poll_until,
    post,
)

BUCKET = "estat-dlq-e2e"


def bucket_event_ids(moto: MotoServer) -> list[str]:
    """The `id` of every event line in every object of the bucket, with
    repeats (a duplicate upload would show up twice)."""
    client = moto.client()
    ids = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET):
        for item in page.get("Contents", []):
            body = client.get_object(Bucket=BUCKET, Key=item["Key"])["Body"].read()
            for line in gzip.decompress(body).splitlines():
                ids.append(json.loads(line)["body"]["id"])
    return ids


class DeadLetterEndToEnd(unittest.TestCase):
    timeout = 180

    def setUp(self) -> None:
        self.workdir = make_workdir(self)
        # S3 starts down: nothing listens on the port moto will use later.
        self.moto = MotoServer(self.workdir, port=free_port())
        self.addCleanup(self.moto.stop)
        self.env = {
            "S3_BUCKET": BUCKET,
            "AWS_ENDPOINT_URL_S3": self.moto.endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_REGION": "us-east-1",
            "S3_APP_RETRIES": "0",
            "S3_TIMEOUT": "2",
            "FLUSH_INTERVAL": "0.1",
            "BATCH_SIZE": "40",
            "DLQ_DRAIN_INTERVAL": "0.1",
        }
        self.server = EstatServer(self.workdir, env=self.env)
        self.addCleanup(self.kill_server)
        self.dlq = os.path.join(self.workdir, "dlq")

    def kill_server(self) -> None:
        if self.server.proc is not None:
            self.server.proc.kill()

    def post_events(self, prefix: str, count: int) -> list[str]:
        ids = [f"{prefix}-{n}" for n in range(count)]
        for event_id in ids:
            status, answer = post(self.server.url + "/collect",
                                  json.dumps({"id": event_id, "pad": "x" * 50}).encode())
            self.assertEqual(status, 202, answer)
        return ids

    def metric(self, name: str) -> float:
        return self.server.metrics().get(name, 0.0)

    @inlineCallbacks
    def spool_during_outage(self, prefix: str, count: int):  # type: ignore[no-untyped-def]
        """Post `count` events while S3 is down and wait until all of them
        are in the dead-letter directory."""
        ids = self.post_events(prefix, count)
        yield poll_until(lambda: self.metric("estat_dlq_events_enqueued_total") >= count,
                         30, what="the events to be dead-lettered")
        metrics = self.server.metrics()
        self.assertEqual(metrics["estat_dlq_events_enqueued_total"], count)
        self.assertEqual(metrics['estat_dlq_dropped_events_total{reason="over_budget"}'], 0)
        self.assertEqual(metrics['estat_dlq_dropped_events_total{reason="save_error"}'], 0)
        on_disk = sum(dlqdisk.read_meta(self.dlq, name)["event_count"]
                      for name in dlqdisk.entry_names(self.dlq))
        self.assertEqual(on_disk, count)
        self.assertEqual(metrics["estat_dlq_entries"], len(dlqdisk.entry_names(self.dlq)))
        return ids

    @inlineCallbacks
    def s3_comes_back(self):  # type: ignore[no-untyped-def]
        yield self.moto.start()
        self.moto.client().create_bucket(Bucket=BUCKET)

    @inlineCallbacks
    def test_outage_spools_then_the_drain_stores_every_event_once(self):  # type: ignore[no-untyped-def]
        yield self.server.start()
        spooled = yield self.spool_during_outage("outage", 200)
        # the drain keeps trying during the outage, recording each attempt
        yield poll_until(lambda: any(dlqdisk.read_meta(self.dlq, n)["attempts"] > 1
                                     for n in dlqdisk.entry_names(self.dlq)),
                         20, what="a failed re-upload attempt")
        yield self.s3_comes_back()
        yield poll_until(lambda: self.metric("estat_dlq_entries") == 0
                         and not dlqdisk.entry_names(self.dlq), 60,
                         what="the dead-letter directory to drain")
        after = self.post_events("after", 30)
        yield poll_until(lambda: len(bucket_event_ids(self.moto)) >= 230, 30,
                         what="the events posted after the outage")
        ids = bucket_event_ids(self.moto)
        self.assertEqual(sorted(ids), sorted(spooled + after))
        metrics = self.server.metrics()
        self.assertEqual(metrics["estat_events_accepted_total"], 230)
        self.assertEqual(metrics["estat_dlq_events_reuploaded_total"], 200)
        self.assertEqual(metrics["estat_dlq_bytes"], 0)
        code = yield self.server.stop()
        self.assertIn(code, (0, -15), self.server.output())

    @inlineCallbacks
    def test_entries_left_by_one_run_are_drained_by_the_next(self):  # type: ignore[no-untyped-def]
        yield self.server.start()
        spooled = yield self.spool_during_outage("restart", 120)
        code = yield self.server.stop()
        self.assertIn(code, (0, -15), self.server.output())
        yield self.s3_comes_back()
        yield self.server.start()
        yield poll_until(lambda: not dlqdisk.entry_names(self.dlq), 60,
                         what="the next run to drain the dead-letter directory")
        self.assertEqual(sorted(bucket_event_ids(self.moto)), sorted(spooled))
        self.assertEqual(self.metric("estat_dlq_events_reuploaded_total"), 120)
        code = yield self.server.stop()
        self.assertIn(code, (0, -15), self.server.output())

    @inlineCallbacks
    def test_cli_replay_uploads_with_the_server_settings(self):  # type: ignore[no-untyped-def]
        yield self.server.start()
        spooled = yield self.spool_during_outage("cli", 80)
        code = yield self.server.stop()
        self.assertIn(code, (0, -15), self.server.output())
        yield self.s3_comes_back()
        env_file = os.path.join(self.workdir, "estat-ingest.env")
        with open(env_file, "w") as handle:
            for name, value in {**self.env, "DLQ_DIR": self.dlq}.items():
                handle.write(f"{name}={value}\n")
        environ: dict[str, Any] = {k: v for k, v in os.environ.items()
                                   if not k.startswith(("AWS_", "S3_", "DLQ_"))}
        environ["PYTHONPATH"] = REPO_ROOT
        entries = len(dlqdisk.entry_names(self.dlq))
        script = os.path.join(os.path.dirname(sys.executable), "estat-dlq")
        result = subprocess.run([script, "--env-file", env_file, "replay", "--all"],
                                env=environ, capture_output=True, timeout=120)
        self.assertEqual(result.returncode, 0, result.stderr.decode())
        self.assertEqual(result.stdout.decode().count("replayed "), entries)
        self.assertEqual(dlqdisk.entry_names(self.dlq), [])
        self.assertEqual(sorted(bucket_event_ids(self.moto)), sorted(spooled))
