"""The dead-letter directory against what a hostile or careless operator
leaves in it: temporaries that are directories, entries that cannot be
listed, FIFOs, sparse files, symlinked entries and meta.json that lies.
None of them may stop the scan, block start-up or the CLI, be read whole
into memory or be counted as something it is not."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
import tracemalloc
from typing import Any, Callable

from twisted.internet.defer import CancelledError
from twisted.trial import unittest

from estat.dlq import disk as dlqdisk
from tests.fakes import capture_logs, logged, make_object
from tests.support import REPO_ROOT, make_workdir
from tests.test_deadletter import RETRYABLE, Harness

# Long enough for a slow, shared machine; a scan that blocks never ends.
SUBPROCESS_TIMEOUT = 60


def spooled(test: unittest.TestCase, count: int) -> tuple[str, list[str]]:
    """A DLQ directory holding `count` good entries (objects 1..count)."""
    root = os.path.join(make_workdir(test), "dlq")
    first = Harness(root).opened()
    for n in range(1, count + 1):
        first.clock.advance(1)
        first.dlq.save(make_object(n), RETRYABLE)
    return root, first.entries()


def rewrite_meta(root: str, name: str, **changes: Any) -> None:
    """Change fields of an entry's meta.json, as a careless hand would."""
    path = os.path.join(root, name, dlqdisk.META)
    with open(path) as handle:
        meta = json.load(handle)
    meta.update(changes)
    with open(path, "w") as handle:
        json.dump(meta, handle)


def denied_inside(test: unittest.TestCase, directory: str) -> None:
    """Make `directory` behave as a mode-000 directory does for a non-root
    user (tests run as root, where chmod 000 denies nothing): listing it,
    and opening or stat'ing anything inside it, fail with EACCES."""

    def inside(path: Any) -> bool:
        text = os.fsdecode(path) if isinstance(path, (str, bytes)) else ""
        return os.path.abspath(text).startswith(directory + os.sep)

    def guard(original: Callable[..., Any], also_itself: bool) -> Callable[..., Any]:
        def guarded(path: Any, *args: Any, **kwargs: Any) -> Any:
            if inside(path) or (also_itself and os.path.abspath(os.fsdecode(path)) == directory):
                raise PermissionError(errno.EACCES, "Permission denied", path)
            return original(path, *args, **kwargs)
        return guarded

    test.patch(os, "listdir", guard(os.listdir, True))
    test.patch(os, "scandir", guard(os.scandir, True))
    for name in ("open", "lstat", "stat"):
        test.patch(os, name, guard(getattr(os, name), False))
    import builtins
    test.patch(builtins, "open", guard(builtins.open, False))


def run_python(code: str, *args: str) -> subprocess.CompletedProcess[bytes]:
    env = dict(os.environ, PYTHONPATH=REPO_ROOT)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], env=env,
                          capture_output=True, timeout=SUBPROCESS_TIMEOUT)


class OneBadEntry(unittest.TestCase):
    """Every step of the scan handles an OSError per entry."""

    def test_a_directory_named_like_a_temporary_never_stops_the_scan(self) -> None:
        root, (odd, other) = spooled(self, 2)
        os.mkdir(os.path.join(root, odd, ".meta.json.deadbeef.tmp"))
        logs = capture_logs(self)
        h = Harness(root).opened()
        self.assertEqual(h.dlq.entry_names(), [odd, other])
        self.assertEqual(h.value("estat_dlq_entries"), 2)
        self.assertEqual(h.value("estat_dlq_scan_errors_total"), 1)
        [line] = logged(logs, "could not remove")
        self.assertEqual(line["path"], f"{odd}/.meta.json.deadbeef.tmp")
        self.assertEqual(logged(logs, "cannot open the dead-letter directory"), [])

    def test_a_temporary_that_cannot_be_removed_never_stops_the_scan(self) -> None:
        root, [good] = spooled(self, 1)
        stuck = os.path.join(root, ".tmp-stuck")
        os.mkdir(stuck)
        real_rmtree = dlqdisk.shutil.rmtree

        def rmtree(path: str, *args: Any, **kwargs: Any) -> None:
            if path == stuck:
                raise PermissionError(errno.EACCES, "Permission denied", path)
            real_rmtree(path, *args, **kwargs)

        self.patch(dlqdisk.shutil, "rmtree", rmtree)
        logs = capture_logs(self)
        h = Harness(root).opened()
        self.assertEqual(h.dlq.entry_names(), [good])
        self.assertEqual(h.value("estat_dlq_scan_errors_total"), 1)
        self.assertEqual(len(logged(logs, "could not remove")), 1)

    def test_an_entry_that_cannot_be_listed_is_quarantined_and_the_rest_load(self) -> None:
        root, (first, locked, last) = spooled(self, 3)
        denied_inside(self, os.path.join(root, locked))
        logs = capture_logs(self)
        h = Harness(root).opened()
        self.assertEqual(h.dlq.entry_names(), [first, last])
        self.assertEqual(h.value("estat_dlq_entries"), 2)
        self.assertEqual(h.value("estat_dlq_quarantined_entries_total"), 1)
        [line] = logged(logs, "cannot be read")
        self.assertEqual(line["entry"], locked)
        self.assertIn("Permission denied", line["reason"])
        self.assertTrue(os.path.isdir(os.path.join(root, "quarantine", locked)))

    def test_a_mode_000_entry_as_a_non_root_user(self) -> None:
        """The same with a real chmod, where it means something."""
        if os.geteuid() == 0:
            raise unittest.SkipTest("root ignores mode 000; the patched test covers it")
        root, (first, locked) = spooled(self, 2)
        path = os.path.join(root, locked)
        os.chmod(path, 0)
        self.addCleanup(os.chmod, path, 0o755)
        h = Harness(root).opened()
        self.assertEqual(h.dlq.entry_names(), [first])
        self.assertEqual(h.value("estat_dlq_quarantined_entries_total"), 1)


class NonRegularFiles(unittest.TestCase):
    """Only regular files are ever opened for reading: a FIFO would block
    the open (and so the start, or `estat-dlq list`) forever."""

    def fifo_everywhere(self) -> tuple[str, str, list[str]]:
        root, (good, fifo_meta, fifo_data) = spooled(self, 3)
        for name, file in ((fifo_meta, dlqdisk.META), (fifo_data, dlqdisk.DATA)):
            os.unlink(os.path.join(root, name, file))
            os.mkfifo(os.path.join(root, name, file))
        os.mkfifo(os.path.join(root, "9999999999999-events-fifo-000000"))
        return root, good, [fifo_meta, fifo_data, "9999999999999-events-fifo-000000"]

    def test_fifos_never_block_the_scan(self) -> None:
        root, good, fifos = self.fifo_everywhere()
        result = run_python("""
            import sys
            from estat.dlq import disk
            scan = disk.open_directory(sys.argv[1])
            print(sorted(scan.entries))
            for name, reason, where in scan.quarantined:
                print(name, reason)
            """, root)
        self.assertEqual(result.returncode, 0, result.stderr.decode())
        lines = result.stdout.decode().splitlines()
        self.assertEqual(lines[0], repr([good]))
        self.assertEqual(sorted(line.split()[0] for line in lines[1:]), sorted(fifos))
        self.assertIn("not a regular file", result.stdout.decode())

    def test_fifos_never_block_estat_dlq_list(self) -> None:
        root, good, fifos = self.fifo_everywhere()
        result = run_python("""
            import sys
            from estat.dlq.cli import run
            sys.exit(run(["--dlq-dir", sys.argv[1], "list"], environ={}))
            """, root)
        out = result.stdout.decode()
        self.assertIn(good, out, result.stderr.decode())
        fifo_meta, fifo_data, fifo_entry = fifos
        for name in (fifo_meta, fifo_entry):
            self.assertRegex(out, f"{name} .*UNREADABLE")
        self.assertRegex(out, f"{fifo_data} .* 1 ")  # list reads only meta.json

    def test_fifos_never_block_estat_dlq_verify(self) -> None:
        root, good, fifos = self.fifo_everywhere()
        result = run_python("""
            import sys
            from estat.dlq.cli import run
            sys.exit(run(["--dlq-dir", sys.argv[1], "verify"], environ={}))
            """, root)
        self.assertIn(f"ok  {good}", result.stdout.decode(), result.stderr.decode())
        for name in fifos:
            self.assertRegex(result.stderr.decode(), f"BAD {name}: .*not a")

    def test_a_stop_during_the_scan_never_waits_for_it(self) -> None:
        """Cancelling `open()` (the service does at a stop before the start
        finished) ends it at once, whatever the pool thread is doing, and
        a late result changes nothing."""
        root, [good] = spooled(self, 1)
        h = Harness(root)
        h.pool.holding = True  # the scan is stuck on its thread
        logs = capture_logs(self)
        d = h.dlq.open()
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertEqual(logged(logs, "cannot open the dead-letter directory"), [])
        h.pool.run_held()
        self.assertEqual(h.dlq.entry_names(), [])


class Sizes(unittest.TestCase):
    """Sizes are checked before reading, and data.gz is verified a piece at
    a time: a huge (sparse) file never comes into memory whole."""

    SPARSE = 256 * 1024 * 1024

    def peak_while_opening(self, root: str) -> tuple[int, Harness]:
        tracemalloc.start()
        self.addCleanup(tracemalloc.stop)
        h = Harness(root).opened()
        return tracemalloc.get_traced_memory()[1], h

    def test_a_sparse_data_gz_bigger_than_meta_says_is_not_read(self) -> None:
        root, (good, huge) = spooled(self, 2)
        os.truncate(os.path.join(root, huge, dlqdisk.DATA), self.SPARSE)
        peak, h = self.peak_while_opening(root)
        self.assertEqual(h.dlq.entry_names(), [good])
        self.assertLess(peak, 16 * 1024 * 1024)
        with open(os.path.join(root, "quarantine", huge, "QUARANTINED.txt")) as handle:
            self.assertIn(f"data.gz holds {self.SPARSE} bytes", handle.read())

    def test_a_sparse_data_gz_that_meta_agrees_with_is_verified_in_pieces(self) -> None:
        root, (good, huge) = spooled(self, 2)
        os.truncate(os.path.join(root, huge, dlqdisk.DATA), self.SPARSE)
        rewrite_meta(root, huge, compressed_bytes=self.SPARSE)
        peak, h = self.peak_while_opening(root)
        self.assertEqual(h.dlq.entry_names(), [good])
        self.assertLess(peak, 16 * 1024 * 1024)

    def test_a_huge_meta_json_is_not_read(self) -> None:
        root, (good, huge) = spooled(self, 2)
        os.truncate(os.path.join(root, huge, dlqdisk.META), self.SPARSE)
        peak, h = self.peak_while_opening(root)
        self.assertEqual(h.dlq.entry_names(), [good])
        self.assertLess(peak, 16 * 1024 * 1024)


class ReuploadCounts(unittest.TestCase):

    def test_events_reuploaded_counts_lines_not_meta(self) -> None:
        root, [liar] = spooled(self, 1)  # make_object: 3 events, 3 lines
        rewrite_meta(root, liar, event_count=999)
        h = Harness(root).opened()
        h.drain()
        h.clock.advance(1)
        self.assertEqual(len(h.store.stored), 1)
        self.assertEqual(h.value("estat_dlq_events_reuploaded_total"), 3)

    def test_a_symlinked_entry_leaves_no_link_behind(self) -> None:
        root, [name] = spooled(self, 1)
        elsewhere = os.path.join(make_workdir(self), "elsewhere")
        os.rename(os.path.join(root, name), elsewhere)
        os.symlink(elsewhere, os.path.join(root, name))
        h = Harness(root).opened()
        h.drain()
        h.clock.advance(1)
        self.assertEqual(len(h.store.stored), 1)
        self.assertEqual(os.listdir(root), [])
