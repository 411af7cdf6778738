"""Crash reconciliation in ACK_MODE=durable: `kill -9` of the server (and
of its workers) at a random moment under load, mid-upload with S3
hanging, refusing, or having stored an object whose answer is lost, then a restart on the same WAL_DIR: every event answered 202 is
stored exactly once (lost = 0, duplicates = 0), in the local store and in
moto S3, with one and two workers. Events that got no answer may or may
not be stored (the client retries those). See tests/e2e/reconcile.py."""

from __future__ import annotations

import os
import random
import signal
from typing import Any, Optional

from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.python import log
from twisted.trial import unittest

from tests.e2e.reconcile import Found, Harness, Load, Report, read_dlq, reconcile
from tests.support import EstatServer, make_workdir, poll_until, read_objects

# CRASH_ACK_MODE=memory shows the suite failing (acknowledged events lost).
DURABLE = {"ACK_MODE": os.environ.get("CRASH_ACK_MODE", "durable"), "FLUSH_INTERVAL": "0.3", "BATCH_SIZE": "200",
           "SHUTDOWN_TIMEOUT": "10"}


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as handle:
            return [int(p) for p in handle.read().split()]
    except OSError:
        return []


def kill_hard(server: EstatServer) -> None:
    """SIGKILL the server's workers, then the server, then any worker it
    started meanwhile: nothing gets to run its stop."""
    assert server.proc is not None
    pid = server.proc.process.pid
    for _ in range(2):
        for child in _children(pid):
            try:
                os.kill(child, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if _ == 0:
            os.kill(pid, signal.SIGKILL)
    server.proc.process.wait(10)


def _busy_worker(server: EstatServer) -> Optional[int]:
    """The pid of a worker that has accepted events, if one has."""
    assert server.proc is not None
    accepted = server.metrics()
    for pid in _children(server.proc.process.pid):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                argv = handle.read().split(b"\0")
        except OSError:
            continue
        index = argv[3].decode() if len(argv) > 3 else ""
        if accepted.get(f'estat_events_accepted_total{{worker="{index}"}}', 0) > 0:
            return pid
    return None


def wal_segments(directory: str) -> list[str]:
    """Every segment file under WAL_DIR (its worker subfolders included)."""
    found = []
    for folder, dirs, names in os.walk(directory):
        dirs[:] = [d for d in dirs if d != "quarantine"]
        found.extend(os.path.join(folder, n) for n in names if n.endswith(".wal"))
    return found


class LocalHarness:
    """The server storing to its local directory; the same load and
    reconciliation as Harness, reading objects from OUTPUT_DIR."""

    def __init__(self, test: Any, env: dict[str, str]) -> None:
        self.test = test
        self.workdir = make_workdir(test)
        self.server = EstatServer(self.workdir, env={**getattr(test, "extra_env", {}), **env})
        test.addCleanup(self._kill)
        self.loads: list[Load] = []

    def _kill(self) -> None:
        if self.server.proc is not None:
            self.server.proc.kill()

    def start(self) -> Any:
        return self.server.start()

    @property
    def dlq_dir(self) -> str:
        return self.server.environment()["DLQ_DIR"]

    def load(self, tag: str, **options: Any) -> Load:
        load = Load(self.server.url, tag, **options)
        self.loads.append(load)
        self.test.addCleanup(load.stop)
        return load

    def metric(self, name: str) -> float:
        return Harness.metric(self, name)  # type: ignore[arg-type]

    @inlineCallbacks
    def reconcile(self, title: str):  # type: ignore[no-untyped-def]
        root = self.server.environment()["OUTPUT_DIR"]
        stored = yield deferToThread(read_objects, root)
        objects = [Found("local", key, key, [line["body"]["id"] for line in lines])
                   for key, lines in stored]
        entries, quarantined = yield deferToThread(read_dlq, self.dlq_dir)
        outcomes = [o for load in self.loads for o in load.outcomes]
        return reconcile(title, outcomes, objects, entries, quarantined)


class CrashDurable(unittest.TestCase):
    """One worker; the workers variant below runs the same with two."""

    timeout = 90
    extra_env: dict[str, str] = {}

    def _harness(self, store: str, env: Optional[dict[str, str]] = None) -> Any:
        env = {**DURABLE, **(env or {})}
        return Harness(self, env) if store == "s3" else LocalHarness(self, env)

    @inlineCallbacks
    def _idle(self, harness: Any, timeout: float = 30.0):  # type: ignore[no-untyped-def]
        """Until the replayed batches and the DLQ are all stored."""
        yield poll_until(
            lambda: harness.metric("estat_uploads_in_flight") == 0
            and harness.metric("estat_upload_queue_depth") == 0
            and harness.metric("estat_event_queue_depth") == 0
            and harness.metric("estat_dlq_entries") == 0,
            timeout, what="the pipeline to be idle after the restart")

    @inlineCallbacks
    def _crash_and_restart(self, harness: Any, title: str,  # type: ignore[no-untyped-def]
                           fault: Optional[str] = None):
        """Load, then `kill -9` at a random moment, after S3 has been made
        to `fault` if given: "hang" (an upload under way never answered),
        "refuse" (uploads fail and go to the DLQ) or "hold" (S3 stores an
        object, its answer never arrives); restart and reconcile."""
        yield harness.start()
        server = harness.server
        load = harness.load(title.replace(" ", "-"), connections=16)
        done = load.start()
        at = random.randint(300, 2500)
        yield poll_until(lambda: load.sent >= at, 30, what=f"{at} events sent")
        if fault == "hang":
            yield harness.proxy.set_mode("hang")
            yield poll_until(lambda: harness.metric("estat_uploads_in_flight") >= 1, 10,
                             what="an upload hanging on S3")
        elif fault == "refuse":
            yield harness.proxy.set_mode("refuse")
            yield poll_until(lambda: harness.dlq_entries() >= 1, 20,
                             what="a refused upload dead-lettered")
        elif fault == "hold":
            harness.proxy.hold_answers(2)
            yield poll_until(lambda: harness.proxy.held_answers >= 1, 20,
                             what="an upload stored by S3 whose answer is held")
        accepted_before = load.accepted_events()
        kill_hard(server)
        yield load.stop()
        yield done
        if fault is not None:
            yield harness.proxy.set_mode("pass")
        wal_dir = os.path.join(server.workdir, "estat-data", "wal")
        left = len(wal_segments(wal_dir))
        yield server.start()
        replayed = harness.metric("estat_wal_replayed_events_total")
        yield self._idle(harness)
        code = yield server.stop(30)
        self.assertIn(code, (0, -15), server.output()[-3000:])
        report: Report = yield harness.reconcile(title)
        report.extra.update({
            "killed at (events sent, accepted so far)": f"{at}, {accepted_before}",
            "segments left by the kill": left,
            "replayed (events)": f"{replayed:.0f}",
        })
        log.msg("reconciliation table:\n" + report.table())
        print(report.table())
        problems = report.problems()
        if problems:
            self.fail("; ".join(problems) + "\n" + report.table() + "\n"
                      + server.output()[-4000:])
        self.assertGreater(report.accepted, 0, report.table())
        self.assertEqual(wal_segments(wal_dir), [], "a clean stop leaves no segment")
        return report

    def test_kill_under_load_local(self):
        return self._crash_and_restart(self._harness("local"), "kill under load local")

    @inlineCallbacks
    def test_kill_under_load_local_again(self):
        """A second random moment (a crash right after a group commit, or
        between a batch's upload and its segment's deletion)."""
        yield self._crash_and_restart(self._harness("local"), "kill again local")

    def test_kill_under_load_s3(self):
        return self._crash_and_restart(self._harness("s3"), "kill under load s3")

    def test_kill_mid_upload_with_s3_hanging(self):
        return self._crash_and_restart(
            self._harness("s3", {"S3_TIMEOUT": "10"}), "kill mid-upload s3 hangs", fault="hang")

    def test_kill_with_s3_refusing(self):
        """Batches dead-lettered (each fsynced before its segment may go)
        and batches still in the log at the kill: the replay and the DLQ
        drain write the same keys, so nothing is stored twice."""
        return self._crash_and_restart(self._harness("s3"), "kill s3 refusing",
                                       fault="refuse")

    def test_kill_after_s3_stored_but_before_its_answer(self):
        """S3 stored an object and the answer was lost: the replay rewrites
        the same key rather than a second copy."""
        return self._crash_and_restart(self._harness("s3", {"S3_TIMEOUT": "10"}),
                                       "kill s3 answer lost", fault="hold")

    @inlineCallbacks
    def test_sigterm_past_the_deadline_leaves_the_rest_in_the_log(self):
        """S3 hangs at a SIGTERM: at SHUTDOWN_TIMEOUT the uploads are given
        up and stay in the log, not in the DLQ; the next start stores them."""
        harness = self._harness("s3", {"SHUTDOWN_TIMEOUT": "2", "S3_TIMEOUT": "10"})
        yield harness.start()
        server = harness.server
        load = harness.load("sigterm-durable", connections=16)
        done = load.start()
        yield poll_until(lambda: load.sent >= 500, 20, what="500 events sent")
        yield harness.proxy.set_mode("hang")
        yield poll_until(lambda: harness.metric("estat_uploads_in_flight") >= 1, 10,
                         what="an upload hanging on S3")
        code = yield server.stop(15)
        yield load.stop()
        yield done
        self.assertIn(code, (0, -15), server.output()[-3000:])
        self.assertIn("stay in the write-ahead log", server.output())
        wal_dir = os.path.join(server.workdir, "estat-data", "wal")
        self.assertTrue(wal_segments(wal_dir), "the unfinished batches' segments stay")
        # Uploads the mode change aborted may be spooled, even after the
        # SIGTERM; none is once the deadline has passed.
        output = server.output()
        self.assertIn("shutdown deadline", output)
        self.assertNotIn("to dead-letter entry", output[output.index("shutdown deadline"):],
                         "nothing is spooled at the deadline in durable mode")
        yield harness.proxy.set_mode("pass")
        yield server.start()
        yield self._idle(harness)
        code = yield server.stop(30)
        report = yield harness.reconcile("SIGTERM past the deadline, durable")
        log.msg("reconciliation table:\n" + report.table())
        self.assertEqual(report.problems(), [], report.table())
        self.assertEqual(wal_segments(wal_dir), [])


class CrashDurableWithWorkers(CrashDurable):
    """The same with `--workers 2`: each worker its own WAL subfolder,
    replayed by the worker of the same index."""

    extra_env = {"WORKERS": "2"}

    def test_kill_under_load_local_again(self):  # type: ignore[override]
        raise unittest.SkipTest("two runs of each kind are enough with one worker")

    @inlineCallbacks
    def test_a_worker_killed_alone_replays_its_own_log(self):
        """`kill -9` of one worker: the parent starts another on the same
        index, which replays that worker's WAL subfolder while the other
        worker goes on serving."""
        harness = self._harness("local")
        yield harness.start()
        server = harness.server
        load = harness.load("worker-killed", connections=16)
        done = load.start()
        yield poll_until(lambda: load.sent >= random.randint(300, 1500), 30,
                         what="events sent")
        # The kernel may hand every connection to one worker: kill one
        # that has accepted events, so that it has a log to replay.
        yield poll_until(lambda: _busy_worker(server) is not None, 30,
                         what="a worker that accepted events")
        os.kill(_busy_worker(server), signal.SIGKILL)
        yield poll_until(lambda: harness.metric("estat_wal_replayed_events_total") > 0, 30,
                         what="the restarted worker to replay its log")
        yield load.stop()
        yield done
        yield self._idle(harness)
        code = yield server.stop(30)
        self.assertIn(code, (0, -15), server.output()[-3000:])
        report = yield harness.reconcile("one worker killed, durable")
        log.msg("reconciliation table:\n" + report.table())
        self.assertEqual(report.problems(), [], report.table())
        self.assertGreater(report.accepted, 0, report.table())
