"""End to end: `twistd -n estat-ingest` as a subprocess with the embedded
local store, driven over real HTTP."""

from __future__ import annotations

import json
import time

from twisted.internet.defer import inlineCallbacks
from twisted.trial import unittest

from tests.support import EstatServer, make_workdir, poll_until, post, read_objects


class LocalStoreEndToEnd(unittest.TestCase):
    timeout = 120

    @inlineCallbacks
    def test_posted_events_are_written_as_gzip_json_lines(self):
        workdir = make_workdir(self)
        server = EstatServer(workdir, env={"FLUSH_INTERVAL": "0.2"})
        yield server.start()
        self.addCleanup(lambda: server.proc.kill())
        bodies = [json.dumps({"event": "x", "n": i, "s": "é\"\\"}).encode() for i in range(50)]
        for body in bodies:
            status, answer = post(server.url + "/collect", body)
            self.assertEqual((status, json.loads(answer)), (202, {"status": "accepted"}))
        status, answer = post(server.url + "/collect", b"not json")
        self.assertEqual((status, json.loads(answer)["error"]), (400, "invalid_json"))

        def stored():
            lines = [line for _, lines in read_objects(server.environment()["OUTPUT_DIR"])
                     for line in lines]
            return lines if len(lines) >= len(bodies) else None

        lines = yield poll_until(stored, 20, what="events in the output directory")
        self.assertEqual([json.dumps(line["body"]).encode() for line in lines], bodies)
        # `ts` is the receive time in epoch seconds, to the millisecond.
        now = time.time()
        self.assertTrue(all(isinstance(line["ts"], float) and now - 600 < line["ts"] <= now
                            for line in lines), lines[0])
        metrics = server.metrics()
        self.assertEqual(metrics["estat_events_accepted_total"], 50)
        self.assertEqual(metrics['estat_events_stored_total{path="upload",store="local"}'], 50)
        self.assertEqual(metrics['estat_events_rejected_total{reason="invalid_json"}'], 1)
        code = yield server.stop()
        self.assertIn(code, (0, -15), server.output())
