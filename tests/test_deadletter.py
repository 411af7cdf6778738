"""The dead-letter queue with a task.Clock, an in-line thread pool and a fake
in-memory store: spooling, the budget, crash safety, quarantine, and the
drain (one entry per idle tick, attempts, backoff, restart)."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
from typing import Any, Callable, Optional

from prometheus_client import CollectorRegistry
from twisted.internet import reactor as global_reactor
from twisted.internet.defer import fail, inlineCallbacks
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from twisted.trial import unittest

import estat
from estat.codec import encode_batch
from estat.dlq import disk as dlqdisk
from estat.dlq.spool import DeadLetterQueue
from estat.metrics import Metrics
from estat.model import Batch, Event
from estat.stores.base import PermanentStoreError, RetryableStoreError
from estat.stores import fsutil
from estat.stores.local import LocalStore
from tests.fakes import FakeStore, capture_logs, logged, make_object
from tests.support import REPO_ROOT, make_workdir, poll_until, read_objects

RETRYABLE = RetryableStoreError("connection", "ConnectionRefused", "connection refused")
PERMANENT = PermanentStoreError("client_error", "NoSuchBucket", "no such bucket")


class ThreadlessClock(Clock):
    """A Clock that also takes results back from the (in-line) pool."""

    def callFromThread(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        f(*args, **kwargs)


class InlinePool:
    """Stands in for the service's ThreadPool: runs work at once on the test
    thread, or holds it (`holding = True`) until `run_held()`, which shows
    that a piece of I/O really went through the pool."""

    def __init__(self) -> None:
        self.holding = False
        self.held: list[tuple[Any, ...]] = []
        self.ran: list[str] = []

    def callInThreadWithCallback(self, on_result: Callable[[bool, Any], None],
                                 f: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        if self.holding:
            self.held.append((on_result, f, args, kwargs))
        else:
            self._run(on_result, f, args, kwargs)

    def _run(self, on_result: Any, f: Any, args: Any, kwargs: Any) -> None:
        self.ran.append(f.__name__)
        try:
            result = f(*args, **kwargs)
        except BaseException:
            on_result(False, Failure())
        else:
            on_result(True, result)

    def run_held(self) -> None:
        held, self.held = self.held, []
        for item in held:
            self._run(*item)


def on_disk_bytes(root: str, name: str) -> int:
    """What an entry's two files take on disk."""
    path = os.path.join(root, name)
    return sum(os.path.getsize(os.path.join(path, f)) for f in (dlqdisk.DATA, dlqdisk.META))


class Harness:
    """A DeadLetterQueue on a clock, an in-line pool and a fresh registry."""

    def __init__(self, directory: str, max_bytes: int = 10**9, interval: float = 1.0,
                 clock: Optional[ThreadlessClock] = None) -> None:
        self.directory = directory
        self.clock = clock or ThreadlessClock()
        self.pool = InlinePool()
        self.registry = CollectorRegistry()
        self.metrics = Metrics(self.registry, process=False)
        self.dlq = DeadLetterQueue(directory, max_bytes, self.clock, self.pool,
                                   self.metrics, drain_interval=interval)
        self.store = FakeStore(clock=self.clock)
        self.idle = True

    def value(self, name: str, **labels: str) -> float:
        found = self.registry.get_sample_value(name, labels)
        return 0.0 if found is None else found

    def opened(self) -> "Harness":
        d = self.dlq.open()
        assert d.called, "open did not finish on the in-line pool"
        return self

    def drain(self) -> None:
        self.dlq.start_draining(self.store, lambda: self.idle)

    def entries(self) -> list[str]:
        return dlqdisk.entry_names(self.directory)

    def meta(self, name: str) -> dict[str, Any]:
        with open(os.path.join(self.directory, name, dlqdisk.META)) as handle:
            return json.load(handle)


class Spooling(unittest.TestCase):

    def setUp(self) -> None:
        self.dir = os.path.join(make_workdir(self), "dlq")
        self.h = Harness(self.dir).opened()

    def test_save_writes_one_complete_entry(self) -> None:
        obj = make_object(1, events=5)
        self.h.clock.advance(1_700_000_100)
        d = self.h.dlq.save(obj, RETRYABLE)
        self.assertIs(self.successResultOf(d), True)  # kept
        [name] = self.h.entries()
        with open(os.path.join(self.dir, name, "data.gz"), "rb") as handle:
            self.assertEqual(handle.read(), obj.data)
        meta = self.h.meta(name)
        self.assertEqual(
            {k: meta[k] for k in ("key", "batch_id", "kind", "event_count",
                                  "uncompressed_bytes", "compressed_bytes", "first_ts_ms",
                                  "last_ts_ms", "created_at_ms", "attempts",
                                  "server_version")},
            {"key": obj.key, "batch_id": obj.batch_id, "kind": "events", "event_count": 5,
             "uncompressed_bytes": obj.uncompressed_bytes, "compressed_bytes": len(obj.data),
             "first_ts_ms": obj.first_ts_ms, "last_ts_ms": obj.last_ts_ms,
             "created_at_ms": 1_700_000_100_000, "attempts": 1,
             "server_version": estat.__version__})
        self.assertEqual(
            (meta["last_error"]["reason"], meta["last_error"]["code"],
             meta["last_error"]["message"]),
            ("connection", "ConnectionRefused", "connection refused"))
        self.assertEqual(self.h.value("estat_dlq_events_enqueued_total"), 5)
        self.assertEqual(self.h.value("estat_dlq_entries"), 1)
        self.assertEqual(self.h.value("estat_dlq_bytes"), on_disk_bytes(self.dir, name))
        self.h.clock.advance(42)
        self.assertEqual(self.h.value("estat_dlq_oldest_entry_age_seconds"), 42)

    def test_file_io_runs_on_the_pool(self) -> None:
        self.h.pool.holding = True
        d = self.h.dlq.save(make_object(1), RETRYABLE)
        self.assertNoResult(d)
        self.assertEqual(self.h.entries(), [])
        self.h.pool.run_held()
        self.successResultOf(d)
        self.assertEqual(len(self.h.entries()), 1)
        self.assertEqual(self.h.pool.ran, ["open_directory", "write_entry"])

    def test_over_budget_is_dropped_and_counted(self) -> None:
        logs = capture_logs(self)
        first = make_object(1, events=4)
        budget = len(first.data) + 1000
        h = Harness(os.path.join(make_workdir(self), "dlq"), max_bytes=budget).opened()
        h.pool.holding = True  # both saves under way at once: the first holds its bytes
        first_d = h.dlq.save(first, RETRYABLE)
        second_d = h.dlq.save(make_object(2, events=7), RETRYABLE)
        self.assertIs(self.successResultOf(second_d), False)  # dropped
        h.pool.run_held()
        self.successResultOf(first_d)
        self.assertEqual(len(h.entries()), 1)
        self.assertEqual(h.value("estat_dlq_dropped_events_total", reason="over_budget"), 7)
        self.assertEqual(h.value("estat_dlq_dropped_events_total", reason="save_error"), 0)
        self.assertEqual(h.value("estat_dlq_events_enqueued_total"), 4)
        [error] = logged(logs, "LOST")
        self.assertEqual(error["log_level"].name, "error")
        self.assertIn("DLQ_MAX_BYTES", error["why"])

    def test_save_error_is_dropped_and_counted(self) -> None:
        logs = capture_logs(self)
        calls = []

        def disk_full(path: str, data: bytes) -> None:
            calls.append(path)
            with open(path, "wb") as handle:
                handle.write(data[:3])
            raise OSError(errno.ENOSPC, "No space left on device")

        self.patch(fsutil, "write_file", disk_full)
        d = self.h.dlq.save(make_object(1, events=6), RETRYABLE)
        self.assertIs(self.successResultOf(d), False)  # dropped
        self.assertEqual(len(calls), 1)
        self.assertEqual(os.listdir(self.dir), [], "the partial entry was not cleaned up")
        self.assertEqual(self.h.value("estat_dlq_dropped_events_total", reason="save_error"), 6)
        self.assertEqual(self.h.value("estat_dlq_entries"), 0)
        [error] = logged(logs, "LOST")
        self.assertIn("No space left on device", error["why"])

    def test_unusable_directory_never_stops_the_server(self) -> None:
        workdir = make_workdir(self)
        with open(os.path.join(workdir, "file"), "w"):
            pass
        logs = capture_logs(self)
        h = Harness(os.path.join(workdir, "file", "dlq"))
        self.assertIsNone(self.successResultOf(h.dlq.open()))
        self.assertTrue(logged(logs, "cannot open the dead-letter directory"))
        self.successResultOf(h.dlq.save(make_object(1, events=2), RETRYABLE))
        self.assertEqual(h.value("estat_dlq_dropped_events_total", reason="save_error"), 2)


CRASH_SCRIPT = textwrap.dedent("""
    import os, sys
    from estat.dlq import disk as dlqdisk
    from estat.stores.base import StoreError
    from estat.stores import fsutil
    from tests.fakes import make_object
    point, root = sys.argv[1], sys.argv[2]
    counts = {}
    def crash_on(name, nth, real):
        def wrapper(*args):
            counts[name] = counts.get(name, 0) + 1
            if counts[name] == nth:
                os._exit(3)
            return real(*args)
        return wrapper
    def half_write(path, data):
        with open(path, "wb") as handle:
            handle.write(data[: len(data) // 2])
        os._exit(3)
    if point == "data":
        fsutil.write_file = half_write
    elif point == "meta":
        fsutil.write_file = crash_on("write", 2, fsutil.write_file)
    elif point == "rename":
        dlqdisk.os.rename = crash_on("rename", 1, os.rename)
    elif point == "root_fsync":
        fsutil.fsync_directory = crash_on("fsync", 2, fsutil.fsync_directory)
    obj = make_object(1)
    meta = dlqdisk.make_meta(obj, StoreError("r", "C", "m"), 1, "t")
    dlqdisk.write_entry(root, "0000000000001-events-BATCH0001-aaaaaa", obj.data,
                        dlqdisk.encode_meta(meta))
    os._exit(0)
""")


class CrashSafety(unittest.TestCase):
    """A process killed at each step of a write leaves a whole entry or
    nothing that is taken for one."""

    def crash_at(self, point: str) -> Harness:
        root = os.path.join(make_workdir(self), "dlq")
        os.makedirs(root)
        env = dict(os.environ, PYTHONPATH=REPO_ROOT)
        result = subprocess.run([sys.executable, "-c", CRASH_SCRIPT, point, root], env=env,
                                capture_output=True, timeout=60)
        self.assertEqual(result.returncode, 3, result.stderr.decode())
        return Harness(root).opened()

    def assert_nothing_left(self, h: Harness) -> None:
        self.assertEqual(os.listdir(h.directory), [])
        self.assertEqual(h.value("estat_dlq_entries"), 0)
        self.assertEqual(h.value("estat_dlq_quarantined_entries_total"), 0)

    def test_crash_while_writing_data(self) -> None:
        self.assert_nothing_left(self.crash_at("data"))

    def test_crash_while_writing_meta(self) -> None:
        self.assert_nothing_left(self.crash_at("meta"))

    def test_crash_before_rename(self) -> None:
        self.assert_nothing_left(self.crash_at("rename"))

    def test_crash_after_rename_keeps_the_whole_entry(self) -> None:
        h = self.crash_at("root_fsync")
        self.assertEqual(h.entries(), ["0000000000001-events-BATCH0001-aaaaaa"])
        self.assertEqual(h.value("estat_dlq_entries"), 1)
        self.assertEqual(h.value("estat_dlq_quarantined_entries_total"), 0)
        h.drain()
        h.clock.advance(1)
        self.assertEqual(list(h.store.stored.values()), [make_object(1)])

    def test_leftovers_of_updates_and_deletes_are_removed(self) -> None:
        root = os.path.join(make_workdir(self), "dlq")
        first = Harness(root).opened()
        for n in (1, 2):
            first.clock.advance(1)
            first.dlq.save(make_object(n), RETRYABLE)
        kept, deleted = first.entries()
        # crash mid meta.json update: its temp file is left beside the old meta
        with open(os.path.join(root, kept, ".meta.json.1234abcd.tmp"), "wb") as handle:
            handle.write(b'{"attempts": 9')
        # crash mid delete: the entry was already renamed out of the way
        os.rename(os.path.join(root, deleted), os.path.join(root, ".tmp-del-" + deleted))
        h = Harness(root).opened()
        self.assertEqual(h.entries(), [kept])
        self.assertEqual(sorted(os.listdir(root)), [kept])
        self.assertEqual(sorted(os.listdir(os.path.join(root, kept))), ["data.gz", "meta.json"])
        self.assertEqual(h.meta(kept)["attempts"], 1)


class Quarantine(unittest.TestCase):

    def test_unreadable_entries_are_moved_aside_not_deleted(self) -> None:
        root = os.path.join(make_workdir(self), "dlq")
        first = Harness(root).opened()
        for n in range(1, 7):
            first.clock.advance(1)
            first.dlq.save(make_object(n), RETRYABLE)
        good, bad_json, no_data, corrupt, truncated, bad_key = first.entries()
        with open(os.path.join(root, bad_json, "meta.json"), "w") as handle:
            handle.write("{not json")
        os.unlink(os.path.join(root, no_data, "data.gz"))
        path = os.path.join(root, corrupt, "data.gz")
        data = bytearray(open(path, "rb").read())
        data[12] ^= 0xFF
        open(path, "wb").write(bytes(data))
        path = os.path.join(root, truncated, "data.gz")
        short = open(path, "rb").read()[:-6]
        open(path, "wb").write(short)  # and meta.json agrees, so gzip must catch it
        meta = first.meta(truncated)
        meta["compressed_bytes"] = len(short)
        open(os.path.join(root, truncated, "meta.json"), "w").write(json.dumps(meta))
        meta = first.meta(bad_key)
        meta["key"] = "../../etc/passwd"
        open(os.path.join(root, bad_key, "meta.json"), "w").write(json.dumps(meta))
        open(os.path.join(root, "stray-file"), "w").write("?")

        logs = capture_logs(self)
        h = Harness(root).opened()
        self.assertEqual(h.entries(), [good])
        moved = sorted(os.listdir(os.path.join(root, "quarantine")))
        self.assertEqual(moved, sorted([bad_json, no_data, corrupt, truncated, bad_key,
                                        "stray-file"]))
        self.assertEqual(h.value("estat_dlq_quarantined_entries_total"), 6)
        self.assertEqual(h.value("estat_dlq_entries"), 1)
        reasons = {e["entry"]: e["reason"] for e in logged(logs, "cannot be read")}
        self.assertIn("not valid JSON", reasons[bad_json])
        self.assertIn("data.gz is missing", reasons[no_data])
        self.assertIn("does not verify", reasons[corrupt])
        self.assertIn("does not verify", reasons[truncated])
        self.assertIn("unsafe key", reasons[bad_key])
        with open(os.path.join(root, "quarantine", corrupt, "QUARANTINED.txt")) as handle:
            self.assertIn("does not verify", handle.read())

    def test_entry_broken_after_start_is_quarantined_by_the_drain(self) -> None:
        h = Harness(os.path.join(make_workdir(self), "dlq")).opened()
        h.dlq.save(make_object(1), RETRYABLE)
        h.clock.advance(1)
        h.dlq.save(make_object(2), RETRYABLE)
        broken, good = h.entries()
        open(os.path.join(h.directory, broken, "data.gz"), "wb").write(b"garbage")
        h.drain()
        h.clock.advance(1)
        self.assertEqual([key for _, key in h.store.puts], [make_object(2).key])
        self.assertEqual(h.value("estat_dlq_quarantined_entries_total"), 1)
        self.assertEqual(os.listdir(os.path.join(h.directory, "quarantine")), [broken])
        self.assertEqual(h.value("estat_dlq_entries"), 0)


class Draining(unittest.TestCase):

    def setUp(self) -> None:
        self.h = Harness(os.path.join(make_workdir(self), "dlq")).opened()
        self.objects = []
        for n in (1, 2, 3):
            obj = make_object(n, events=n)
            self.objects.append(obj)
            self.h.clock.advance(10)
            self.successResultOf(self.h.dlq.save(obj, RETRYABLE))
        self.addCleanup(self.h.dlq.stop_draining)

    def keys_put(self) -> list[str]:
        return [key for _, key in self.h.store.puts]

    def test_one_entry_per_idle_tick_oldest_first(self) -> None:
        self.h.drain()
        self.assertEqual(self.keys_put(), [])
        for count in (1, 2, 3):
            self.h.clock.advance(1)
            self.assertEqual(self.keys_put(), [o.key for o in self.objects[:count]])
            self.assertEqual(self.h.value("estat_dlq_entries"), 3 - count)
        self.assertEqual(self.h.store.stored, {o.key: o for o in self.objects})
        self.assertEqual(self.h.entries(), [])
        self.assertEqual(self.h.value("estat_dlq_events_reuploaded_total"), 1 + 2 + 3)
        self.assertEqual(self.h.value("estat_dlq_bytes"), 0)
        self.assertEqual(self.h.value("estat_dlq_oldest_entry_age_seconds"), 0)
        self.h.clock.advance(5)
        self.assertEqual(len(self.keys_put()), 3)

    def test_no_drain_while_the_uploader_is_busy(self) -> None:
        self.h.idle = False
        self.h.drain()
        self.h.clock.pump([1] * 30)
        self.assertEqual(self.keys_put(), [])
        self.h.idle = True
        self.h.clock.advance(1)
        self.assertEqual(self.keys_put(), [self.objects[0].key])

    def test_only_one_reupload_in_flight(self) -> None:
        self.h.store.manual = True
        self.h.drain()
        self.h.clock.pump([1] * 10)
        self.assertEqual(len(self.h.store.pending), 1)
        obj, d = self.h.store.pending.pop()
        self.assertEqual(obj, self.objects[0])
        d.callback(None)
        self.h.clock.advance(1)
        self.assertEqual([o.key for o, _ in self.h.store.pending], [self.objects[1].key])

    def test_failure_updates_attempts_and_last_error(self) -> None:
        first = self.h.entries()[0]
        self.h.store.error = RETRYABLE
        self.h.drain()
        self.h.clock.advance(1)
        self.h.clock.advance(1)
        meta = self.h.meta(first)
        self.assertEqual(meta["attempts"], 3)
        self.assertEqual(meta["last_error"]["code"], "ConnectionRefused")
        self.assertEqual(meta["last_error"]["at_ms"], int(self.h.clock.seconds() * 1000))
        self.assertEqual(self.keys_put(), [self.objects[0].key] * 2)
        self.assertEqual(len(self.h.entries()), 3)
        self.assertEqual(self.h.value("estat_dlq_events_reuploaded_total"), 0)
        self.h.store.error = None
        self.h.clock.advance(1)
        self.assertEqual(self.h.store.stored, {self.objects[0].key: self.objects[0]})

    def test_backoff_after_permanent_errors(self) -> None:
        self.h.store.error = PERMANENT
        self.h.drain()
        start = self.h.clock.seconds()
        self.h.clock.pump([1] * 1500)
        times = [t - start for t, _ in self.h.store.puts]
        gaps = [b - a for a, b in zip(times, times[1:])]
        self.assertEqual(gaps[:8], [2, 4, 8, 16, 32, 64, 128, 256])
        self.assertEqual(set(gaps[8:]), {300})
        self.assertEqual(self.h.meta(self.h.entries()[0])["last_error"]["code"],
                         "NoSuchBucket")
        # once the bucket exists again the drain resumes at its next try
        self.h.store.error = None
        self.h.clock.pump([1] * 300)
        self.assertEqual(self.h.entries(), [])

    def test_stop_cancels_the_reupload_in_flight_and_waits(self) -> None:
        self.h.store.manual = True
        self.h.drain()
        self.h.clock.advance(1)
        [(_, put)] = self.h.store.pending
        self.h.pool.holding = True
        stopped = self.h.dlq.stop_draining()
        self.assertTrue(put.called, "the put was not cancelled")
        self.assertNoResult(stopped)  # the lock release is still on the pool
        self.h.pool.run_held()
        self.assertIsNone(self.successResultOf(stopped))
        self.assertEqual(self.h.meta(self.h.entries()[0])["attempts"], 1)
        self.h.clock.pump([1] * 5)
        self.assertEqual(len(self.h.store.puts), 1)
        # saves keep working after the drain stopped
        self.h.pool.holding = False
        self.successResultOf(self.h.dlq.save(make_object(9), RETRYABLE))
        self.assertEqual(len(self.h.entries()), 4)

    def test_entry_locked_by_another_process_is_skipped(self) -> None:
        oldest = self.h.entries()[0]
        fd = dlqdisk.lock_entry(self.h.directory, oldest)
        self.addCleanup(dlqdisk.unlock, fd)
        self.h.drain()
        self.h.clock.advance(1)
        self.assertEqual(self.keys_put(), [self.objects[1].key])
        self.assertIn(oldest, self.h.entries())

    def test_entries_removed_by_the_cli_are_forgotten(self) -> None:
        for name in self.h.entries():
            dlqdisk.remove_entry(self.h.directory, dlqdisk.claim(self.h.directory, name))
        self.h.drain()
        self.h.clock.advance(1)
        self.assertEqual(self.keys_put(), [])
        self.assertEqual(self.h.value("estat_dlq_entries"), 0)
        self.assertEqual(self.h.value("estat_dlq_bytes"), 0)

    def test_a_tick_never_raises(self) -> None:
        calls = []

        def broken_idle() -> bool:
            calls.append(1)
            raise RuntimeError("boom")

        self.h.dlq.start_draining(self.h.store, broken_idle)
        self.h.clock.pump([1] * 3)
        self.assertEqual(len(calls), 3, "the loop stopped after an error")
        self.assertEqual(self.h.value("estat_loop_errors_total", loop="dlq"), 3)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 3)

    def test_raw_objects_are_spooled_and_reuploaded_like_any_batch(self) -> None:
        batch = Batch.of_events([Event(1_700_000_000_000, b"not json")], 0, "RAWBATCH", "size")
        [raw] = encode_batch(batch, validated=False, prefix="raw", raw_prefix="raw_dlq",
                             host_id="test")
        self.assertEqual(raw.kind, "raw")
        self.h.clock.advance(-self.h.clock.seconds())  # older than the others
        self.successResultOf(self.h.dlq.save(raw, RETRYABLE))
        self.assertEqual(self.h.meta(self.h.entries()[0])["kind"], "raw")
        self.h.drain()
        self.h.clock.advance(1)
        self.assertEqual(self.keys_put(), [raw.key])
        self.assertTrue(raw.key.startswith("raw_dlq/"))
        self.assertEqual(self.h.store.stored[raw.key], raw)

    def test_unexpected_store_exception_counts_as_a_failed_attempt(self) -> None:
        self.h.store.put = lambda obj: fail(ValueError("surprise"))  # type: ignore
        self.h.drain()
        self.h.clock.advance(1)
        meta = self.h.meta(self.h.entries()[0])
        self.assertEqual((meta["attempts"], meta["last_error"]["code"]), (2, "ValueError"))


class Restart(unittest.TestCase):

    def test_entries_of_one_run_are_drained_by_the_next(self) -> None:
        root = os.path.join(make_workdir(self), "dlq")
        first = Harness(root).opened()
        objects = [make_object(n, events=n) for n in (1, 2, 3)]
        for obj in objects:
            first.clock.advance(1)
            first.dlq.save(obj, RETRYABLE)
        first.drain()
        first.store.error = RETRYABLE
        first.clock.advance(1)
        self.successResultOf(first.dlq.stop_draining())

        second = Harness(root).opened()
        self.assertEqual(second.value("estat_dlq_entries"), 3)
        self.assertEqual(second.value("estat_dlq_bytes"), first.value("estat_dlq_bytes"))
        second.drain()
        second.clock.pump([1] * 3)
        self.successResultOf(second.dlq.stop_draining())
        self.assertEqual(second.store.stored, {o.key: o for o in objects})
        self.assertEqual(second.value("estat_dlq_events_reuploaded_total"), 6)
        self.assertEqual(os.listdir(root), [])


class RealThreads(unittest.TestCase):
    """The same path on the real reactor and a real ThreadPool, into the
    local store."""

    timeout = 30

    @inlineCallbacks
    def test_spool_and_drain_with_a_thread_pool(self):  # type: ignore[no-untyped-def]
        workdir = make_workdir(self)
        pool = ThreadPool(minthreads=0, maxthreads=2, name="test-dlq")
        pool.start()
        self.addCleanup(pool.stop)
        metrics = Metrics(CollectorRegistry(), process=False)
        dlq = DeadLetterQueue(os.path.join(workdir, "dlq"), 10**9, global_reactor, pool,
                              metrics, drain_interval=0.01)
        yield dlq.open()
        objects = [make_object(n) for n in range(5)]
        for obj in objects:
            yield dlq.save(obj, RETRYABLE)
        store = LocalStore(os.path.join(workdir, "objects"), global_reactor, pool)
        dlq.start_draining(store, lambda: True)
        yield poll_until(lambda: not os.listdir(os.path.join(workdir, "dlq")), 10,
                         what="the DLQ to drain")
        yield dlq.stop_draining()
        stored = read_objects(os.path.join(workdir, "objects"))
        self.assertEqual(sorted(key for key, _ in stored), sorted(o.key for o in objects))
