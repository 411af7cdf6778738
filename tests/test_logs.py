"""The JSON-lines log observer operators get with `--logger`."""

from __future__ import annotations

import io
import json

from twisted.logger import Logger
from twisted.trial import unittest

from estat.logs import json_observer


class JSONLogTests(unittest.TestCase):
    def test_one_json_object_per_line_with_named_fields(self):
        out = io.StringIO()
        log = Logger(namespace="estat.test", observer=json_observer(out))
        log.error("could not store {key}: {code}", key="raw/x.jsonl.gz", code="SlowDown",
                  events=12, obj=object())
        try:
            1 / 0
        except ZeroDivisionError:
            log.failure("tick failed")
        lines = out.getvalue().splitlines()
        self.assertEqual(len(lines), 2)
        first = json.loads(lines[0])
        self.assertEqual(first["level"], "error")
        self.assertEqual(first["namespace"], "estat.test")
        self.assertEqual(first["message"], "could not store raw/x.jsonl.gz: SlowDown")
        self.assertEqual((first["key"], first["code"], first["events"]),
                         ("raw/x.jsonl.gz", "SlowDown", 12))
        self.assertTrue(first["obj"].startswith("<object object"))
        self.assertRegex(first["time"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00$")
        second = json.loads(lines[1])
        self.assertEqual(second["level"], "critical")
        self.assertIn("ZeroDivisionError", second["traceback"])
