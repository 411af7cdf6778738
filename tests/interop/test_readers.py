"""Readers nobody here wrote, on what estat stored: DuckDB reading the
local store with Hive partitions (typed `dt` and `hour`, and one tree for
writers with and without a prefix segment), boto3 listing and reading
the objects of a (moto) S3 bucket, every line valid JSON as `zcat | jq`
needs, and jq and DuckDB reading the strings JSON allows and they
refuse (an unpaired surrogate escape) kept out of the objects."""

from __future__ import annotations

import datetime
import glob
import gzip
import json
import os

from twisted.internet.defer import inlineCallbacks
from twisted.trial import unittest

from tests.interop.harness import (Estat, assert_stored_once, require_binary, require_module,
                                   run, which)
from tests.support import MotoServer, post

WEB_KEY = "web-key-0123456789abcdef"
BACKEND_KEY = "backend-key-0123456789abcdef"
BUCKET = "estat-interop"
COUNT = 50


def post_events(url: str, prefix: str, key: str = "") -> list[str]:
    """COUNT events, one request each; their ids."""
    ids = [f"{prefix}-{n:03d}" for n in range(COUNT)]
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    for event_id in ids:
        status, answer = post(url + "/collect", json.dumps({"id": event_id}).encode(),
                              headers=headers)
        if status != 202:
            raise AssertionError(f"posting {event_id}: {status} {answer!r}")
    return ids


class DuckDB(unittest.TestCase):
    timeout = 120

    @inlineCallbacks
    def test_hive_partitions_typed_and_uniform_across_prefix_segments(self):
        """Two writers, one with the prefix segment `source=web` and one
        without: one `read_json_auto` over the whole prefix with
        `hive_partitioning` reads every event, `dt` as DATE and `hour` as
        INTEGER matching each event's receive time."""
        duckdb = require_module("duckdb")
        estat = Estat(self, {"FLUSH_INTERVAL": "0.2"})
        tokens = os.path.join(estat.workdir, "tokens")
        with open(tokens, "w") as handle:
            handle.write(f"{WEB_KEY} web source=web\n{BACKEND_KEY} backend\n")
        estat.server.extra_env["AUTH_TOKENS_FILE"] = tokens
        yield estat.start()
        ids = post_events(estat.url, "web", WEB_KEY) + post_events(estat.url, "backend",
                                                                   BACKEND_KEY)
        assert_stored_once(self, (yield estat.stored()), ids)
        files = os.path.join(estat.output_dir, "raw", "**", "*.jsonl.gz")
        connection = duckdb.connect()
        self.addCleanup(connection.close)
        try:
            rows = connection.execute(
                "select body.id, ts, dt, hour, typeof(dt), typeof(hour) from read_json_auto("
                "?, hive_partitioning = true, hive_types = {'dt': 'DATE', 'hour': 'INTEGER'})",
                [files]).fetchall()
        except duckdb.Error as error:
            self.fail(f"DuckDB cannot read the store ({estat.object_keys()}): {error}")
        self.assertEqual(sorted(row[0] for row in rows), sorted(ids))
        for _, ts, dt, hour, dt_type, hour_type in rows:
            received = datetime.datetime.fromtimestamp(ts, datetime.timezone.utc)  # epoch seconds
            self.assertEqual((dt, hour, dt_type, hour_type),
                             (received.date(), received.hour, "DATE", "INTEGER"))


class UnicodeEscapes(unittest.TestCase):
    timeout = 120

    @inlineCallbacks
    def test_jq_and_duckdb_read_every_object_escapes_and_all(self):
        """Characters outside the BMP, escaped as a surrogate pair and as
        UTF-8, are stored as sent and read back by `zcat | jq` and DuckDB;
        an unpaired surrogate escape, which JSON allows and both refuse
        (DuckDB the whole file), is answered 400 and never stored."""
        duckdb = require_module("duckdb")
        jq = require_binary(which("jq") or "/usr/bin/jq", "jq")
        estat = Estat(self, {"FLUSH_INTERVAL": "0.2"})
        yield estat.start()
        accepted = [(b'{"id":"pair","s":"\\ud83d\\ude00"}', "application/json"),
                    ('{"id":"utf8","s":"\U0001f600"}'.encode(), "application/json"),
                    (b'{"id":"ndjson-1","s":"\\uD83D\\uDE00"}\n{"id":"ndjson-2","s":"x"}\n',
                     "application/x-ndjson")]
        refused = [(b'{"id":"lone","s":"\\ud800"}', "application/json", {}),
                   (b'{"id":"ok"}\n{"id":"low","s":"\\ude00"}\n', "application/x-ndjson",
                    {"line": 2}),
                   (b'[{"id":"ok"},{"id":"key","\\udbff":1}]', "application/json",
                    {"element": 2})]
        for body, content_type in accepted:
            status, answer = post(estat.url + "/collect", body, content_type)
            self.assertEqual(status, 202, answer)
        for body, content_type, where in refused:
            status, answer = post(estat.url + "/collect", body, content_type)
            refusal = json.loads(answer)
            refusal.pop("expected", None)
            self.assertEqual((status, refusal), (400, {"error": "invalid_json", **where,
                                                       "detail": "unpaired_surrogate"}), body)
        lines = yield estat.stored()
        assert_stored_once(self, lines, ["pair", "utf8", "ndjson-1", "ndjson-2"])
        objects = glob.glob(os.path.join(estat.output_dir, "raw", "**", "*.jsonl.gz"),
                            recursive=True)
        self.assertTrue(objects)
        read = []
        for path in objects:
            with gzip.open(path, "rb") as handle:
                done = run([jq, "-r", ".body | [.id, .s] | @tsv"], input=handle.read())
            self.assertEqual(done.returncode, 0, done.stderr)
            read += done.stdout.decode("utf-8").splitlines()
        self.assertEqual(sorted(read), ["ndjson-1\t\U0001f600", "ndjson-2\tx",
                                        "pair\t\U0001f600", "utf8\t\U0001f600"])
        connection = duckdb.connect()
        self.addCleanup(connection.close)
        rows = connection.execute("select body.id, body.s from read_json_auto(?)",
                                  [objects]).fetchall()
        self.assertEqual(sorted(rows), [("ndjson-1", "\U0001f600"), ("ndjson-2", "x"),
                                        ("pair", "\U0001f600"), ("utf8", "\U0001f600")])


class Boto3(unittest.TestCase):
    timeout = 180

    @inlineCallbacks
    def test_list_and_read_the_bucket(self):
        """boto3 lists the bucket under the Hive layout; every object is
        gzip'd JSON Lines whose every line parses; each event once."""
        boto3 = require_module("boto3")
        estat = Estat(self, {"FLUSH_INTERVAL": "0.2", "BATCH_SIZE": "40"})
        moto = MotoServer(estat.workdir)
        yield moto.start()
        self.addCleanup(moto.stop)
        client = boto3.client("s3", region_name="us-east-1", endpoint_url=moto.endpoint,
                              aws_access_key_id="testing", aws_secret_access_key="testing")
        client.create_bucket(Bucket=BUCKET)
        estat.server.extra_env.update({
            "S3_BUCKET": BUCKET, "AWS_ENDPOINT_URL_S3": moto.endpoint,
            "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_REGION": "us-east-1"})
        yield estat.start()
        ids = post_events(estat.url, "s3") + post_events(estat.url, "s3-more")
        yield estat.stop()
        lines = []
        keys = []
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET):
            for item in page.get("Contents", []):
                keys.append(item["Key"])
                data = client.get_object(Bucket=BUCKET, Key=item["Key"])["Body"].read()
                for line in gzip.decompress(data).decode("utf-8").splitlines():
                    lines.append(json.loads(line))
        self.assertGreater(len(keys), 1)
        for key in keys:
            self.assertRegex(key, r"^raw/dt=\d{4}-\d{2}-\d{2}/hour=\d{2}/[^/]+\.jsonl\.gz$")
        assert_stored_once(self, lines, ids)
