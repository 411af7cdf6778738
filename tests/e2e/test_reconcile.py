"""End-to-end reconciliation under faults: every event answered 202 ends up
in the bucket or the dead-letter directory exactly once, through steady
load, an S3 outage, a hanging S3, a SIGTERM under load followed by a
restart, and overload with small queues. See tests/e2e/reconcile.py."""

from __future__ import annotations

import signal
import time
from typing import Optional

from twisted.internet.defer import inlineCallbacks
from twisted.python import log
from twisted.trial import unittest

from tests.e2e.reconcile import Found, Harness, Outcome, Report, reconcile
from tests.support import poll_until

STORED = 'estat_events_stored_total{path="upload",store="s3"}'
DLQ_IN = "estat_dlq_events_enqueued_total"
DLQ_OUT = "estat_dlq_events_reuploaded_total"


def show(report: Report) -> None:
    log.msg("reconciliation table:\n" + report.table())


class Reconcile(unittest.TestCase):
    timeout = 120

    @inlineCallbacks
    def _stop_and_reconcile(self, harness: Harness, title: str, limit: float = 20.0,
                            extra: Optional[dict[str, str]] = None):  # type: ignore[no-untyped-def]
        """SIGTERM the server (it must stop cleanly), then reconcile the
        still bucket and DLQ with every answer."""
        code, took = yield harness.stop_server(limit)
        self.assertIn(code, (0, -15), f"exit status {code}\n" + harness.server_log_tail())
        report = yield harness.reconcile(title)
        report.extra["stop: exit status, seconds"] = f"{code}, {took:.2f}"
        report.extra.update(extra or {})
        show(report)
        harness.check(report)
        return report

    @inlineCallbacks
    def _wait_for_drain(self, harness: Harness, timeout: float = 30.0):  # type: ignore[no-untyped-def]
        """Poll until the DLQ is empty and the uploader has nothing left."""
        yield harness.wait_for_dlq(lambda n: n == 0, timeout, "the DLQ to drain")
        yield poll_until(
            lambda: harness.metric("estat_uploads_in_flight") == 0
            and harness.metric("estat_upload_queue_depth") == 0
            and harness.metric("estat_event_queue_depth") == 0,
            timeout, what="the upload pipeline to be idle")

    @inlineCallbacks
    def _fault_under_load(self, harness: Harness, name: str, mode: str,  # type: ignore[no-untyped-def]
                          dlq_entries: int):
        """Start the server under load; after 600 events put the S3 proxy in
        `mode` until `dlq_entries` DLQ entries exist, then back to pass for
        600 more; stop the load and wait for the DLQ to drain."""
        yield harness.start()
        load = harness.load(name, connections=24, pause=0.02)
        done = load.start()
        yield poll_until(lambda: load.sent >= 600, 20, what="600 events sent")
        yield harness.proxy.set_mode(mode)
        yield harness.wait_for_dlq(lambda n: n >= dlq_entries, 20,
                                   f"{dlq_entries} DLQ entries while S3 is in {mode} mode")
        fault_sent = load.sent
        yield harness.proxy.set_mode("pass")
        yield poll_until(lambda: load.sent >= fault_sent + 600, 20,
                         what="600 more events after S3 is back")
        yield load.stop()
        yield done
        yield self._wait_for_drain(harness)

    @inlineCallbacks
    def test_steady_load(self):
        """No faults: everything sent is accepted and stored, nothing goes
        to the DLQ, without needing the stop to flush it."""
        harness = Harness(self)
        yield harness.start()
        load = harness.load("steady", connections=24)
        yield load.start(max_events=3000)
        yield load.stop()
        accepted = load.accepted_events()
        yield poll_until(lambda: harness.metric(STORED) >= accepted, 20,
                         what=f"{accepted} events stored in S3")
        report = yield self._stop_and_reconcile(harness, "steady load")
        self.assertEqual((report.accepted, report.sent), (3000, 3000), report.table())
        self.assertEqual((report.stored, report.in_dlq), (3000, 0), report.table())

    @inlineCallbacks
    def test_s3_unavailable_then_back(self):
        """S3 refuses connections for a while under load: batches go to
        the DLQ, and drain to S3 once it is back."""
        harness = Harness(self, env={"S3_APP_RETRIES": "1"})
        yield self._fault_under_load(harness, "outage", "refuse", dlq_entries=3)
        via_dlq, reuploaded = harness.metric(DLQ_IN), harness.metric(DLQ_OUT)
        report = yield self._stop_and_reconcile(harness, "S3 unavailable, then back", extra={
            "went through the DLQ (events)": f"{via_dlq:.0f} in, {reuploaded:.0f} re-uploaded"})
        self.assertGreater(via_dlq, 0, report.table())
        self.assertEqual(via_dlq, reuploaded, report.table())
        self.assertEqual(report.in_dlq, 0, report.table())

    @inlineCallbacks
    def test_s3_hangs_then_answers(self):
        """S3 accepts connections and never answers: each PUT times out
        after S3_TIMEOUT, the batch goes to the DLQ, and the DLQ drains once
        S3 answers again."""
        harness = Harness(self, env={"S3_TIMEOUT": "1", "S3_APP_RETRIES": "0"})
        yield self._fault_under_load(harness, "hang", "hang", dlq_entries=2)
        via_dlq, reuploaded = harness.metric(DLQ_IN), harness.metric(DLQ_OUT)
        timeouts = harness.metric('estat_s3_put_failures_total{reason="timeout"}')
        report = yield self._stop_and_reconcile(harness, "S3 hangs, then answers", extra={
            "went through the DLQ (events)": f"{via_dlq:.0f} in, {reuploaded:.0f} re-uploaded",
            "S3 PUT time-outs": f"{timeouts:.0f}"})
        self.assertGreater(timeouts, 0, report.table())
        self.assertGreater(via_dlq, 0, report.table())
        self.assertEqual(report.in_dlq, 0, report.table())

    @inlineCallbacks
    def test_sigterm_under_load_then_restart(self):
        """SIGTERM (twice) under load while S3 hangs: the stop ends within
        SHUTDOWN_TIMEOUT plus a margin, having put every accepted event in
        S3 or the DLQ; a restart on the same DLQ_DIR drains it."""
        shutdown_timeout = 2.0
        harness = Harness(self, env={"SHUTDOWN_TIMEOUT": str(shutdown_timeout),
                                     "S3_TIMEOUT": "10", "S3_APP_RETRIES": "0"})
        yield harness.start()
        server = harness.server
        load = harness.load("sigterm", connections=24, pause=0.02)
        done = load.start()
        yield poll_until(lambda: load.sent >= 600, 20, what="600 events sent")
        yield harness.proxy.set_mode("hang")
        yield poll_until(lambda: harness.metric("estat_uploads_in_flight") >= 1, 10,
                         what="an upload hanging on S3")
        started = time.monotonic()
        server.proc.signal(signal.SIGTERM)
        yield poll_until(lambda: "no longer accepting events" in server.output(), 5,
                         what="the stop to begin")
        server.proc.signal(signal.SIGTERM)  # a second one must not cut the stop short
        code = yield server.proc.wait_exit(shutdown_timeout + 5)
        took = time.monotonic() - started
        yield load.stop()
        yield done
        output = server.output()
        self.assertIn(code, (0, -15), f"exit status {code}\n" + output[-4000:])
        self.assertLess(took, shutdown_timeout + 3, output[-4000:])
        self.assertIn("shutdown deadline", output)
        self.assertIn("already stopping", output)
        spooled = yield harness.reconcile("after SIGTERM, before restart")
        spooled.extra["stop: exit status, seconds"] = f"{code}, {took:.2f}"
        show(spooled)
        harness.check(spooled)
        self.assertGreater(spooled.in_dlq, 0, spooled.table())

        yield harness.proxy.set_mode("pass")
        yield server.start()
        yield self._wait_for_drain(harness)
        report = yield self._stop_and_reconcile(harness, "SIGTERM under load, restart drains")
        self.assertEqual(report.in_dlq, 0, report.table())
        self.assertEqual(report.accepted, spooled.accepted, report.table())

    @inlineCallbacks
    def test_overload_with_small_queues(self):
        """A slow S3 and tiny queues: most requests get a fast 503 with
        Retry-After, and every 202 is still stored (none via the DLQ)."""
        harness = Harness(self, env={
            "EVENT_QUEUE_SIZE": "50", "MAX_BATCH_EVENTS": "50", "UPLOAD_QUEUE_SIZE": "1",
            "UPLOAD_CONCURRENCY": "1", "BATCH_SIZE": "20", "FLUSH_INTERVAL": "0.2",
            "S3_TIMEOUT": "5"})
        yield harness.start()
        harness.proxy.set_delay(0.25)
        load = harness.load("overload", connections=24)
        yield load.start(max_events=6000)
        yield load.stop()
        refused = [o for o in load.outcomes if o.status == 503]
        latencies = sorted(o.latency for o in refused)
        harness.proxy.set_delay(0)  # S3 recovers
        accepted = load.accepted_events()
        yield poll_until(lambda: harness.metric(STORED) >= accepted, 20,
                         what=f"{accepted} events stored")
        yield self._wait_for_drain(harness)
        via_dlq = harness.metric(DLQ_IN)
        self.assertTrue(latencies, "no 503 at all")
        spread = " / ".join(f"{latencies[int(q * (len(latencies) - 1))] * 1000:.0f}"
                            for q in (0.5, 0.99, 1.0))
        report = yield self._stop_and_reconcile(harness, "overload, small queues", extra={
            "503 latency p50 / p99 / max (ms)": spread,
            "went through the DLQ (events)": f"{via_dlq:.0f}"})
        self.assertGreater(len(refused), len(load.outcomes) // 4, report.table())
        self.assertEqual({o.error for o in refused}, {"queue_full"}, report.table())
        self.assertTrue(all(o.retry_after for o in refused), report.table())
        self.assertLess(latencies[int(0.99 * (len(latencies) - 1))], 1.0, report.table())
        self.assertGreater(report.accepted, 0, report.table())
        self.assertEqual(via_dlq, 0, report.table())


class ReconcileWithWorkers(Reconcile):
    """The same scenarios with `--workers 2`: two worker processes share the
    port, each with its own pipeline and DLQ subfolder."""

    extra_env = {"WORKERS": "2"}


class ReconcileArithmetic(unittest.TestCase):
    """The reconciliation itself can fail: loss, duplicates and phantoms
    are caught (no processes here)."""

    def _report(self, objects, entries=()):  # type: ignore[no-untyped-def]
        outcomes = [Outcome(["a", "b"], 202), Outcome(["c"], 202),
                    Outcome(["d"], 503, "queue_full"), Outcome(["e"], None, "ConnectionLost")]
        return reconcile("t", outcomes, list(objects), list(entries))

    def test_clean_run_reconciles(self):
        report = self._report([Found("s3", "k1", "k1", ["a", "b"])],
                              [Found("dlq", "e1", "k2", ["c"])])
        self.assertEqual(report.problems(), [], report.table())
        self.assertEqual((report.accepted, report.stored, report.in_dlq), (3, 2, 1))
        self.assertEqual(report.rejected, {"503 queue_full": 1})

    def test_loss_duplicates_and_phantoms_are_problems(self):
        lost = self._report([Found("s3", "k1", "k1", ["a", "b"])])
        self.assertEqual(lost.lost, 1)
        duplicated = self._report([Found("s3", "k1", "k1", ["a", "b"]),
                                   Found("s3", "k2", "k2", ["c", "a"])])
        self.assertEqual(duplicated.duplicates, 1)
        phantom = self._report([Found("s3", "k1", "k1", ["a", "b", "c", "d"])])
        self.assertEqual(phantom.phantoms, 1)
        for report in (lost, duplicated, phantom):
            self.assertTrue(report.problems(), report.table())

    def test_dlq_entry_already_stored_under_its_key_is_not_a_duplicate(self):
        report = self._report([Found("s3", "k1", "k1", ["a", "b"]),
                               Found("s3", "k2", "k2", ["c", "e"])],
                              [Found("dlq", "e1", "k2", ["c", "e"])])
        self.assertEqual(report.problems(), [], report.table())
        self.assertEqual((report.dlq_already_stored, report.stored_without_answer), (1, 1))
