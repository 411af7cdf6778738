"""The local store writes each object atomically under its key, with the
file primitives of `estat.stores.fsutil`."""

from __future__ import annotations

import os

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.python.threadpool import ThreadPool
from twisted.trial import unittest

from estat.codec import encode_batch
from estat.model import Batch, Event
from estat.stores import fsutil
from estat.stores.base import RetryableStoreError
from estat.stores.fsutil import write_atomically, write_file
from estat.stores.local import LocalStore
from tests.support import make_workdir


class LocalStoreTests(unittest.TestCase):
    def setUp(self) -> None:
        self.root = make_workdir(self)
        self.pool = ThreadPool(0, 1, name="test")
        self.pool.start()
        self.addCleanup(self.pool.stop)

    def obj(self):
        batch = Batch.of_events([Event(1700000000000, b'{"a":1}')], 7, "01ID", "size")
        [obj] = encode_batch(batch, validated=True, prefix="raw", raw_prefix="raw_dlq",
                             host_id="h")
        return obj

    @inlineCallbacks
    def test_put_writes_the_exact_bytes_under_the_key_and_no_temp_files(self):
        store = LocalStore(self.root, reactor, self.pool)
        obj = self.obj()
        yield store.put(obj)
        path = os.path.join(self.root, "raw", "dt=2023-11-14", "hour=22", "h-01ID.jsonl.gz")
        with open(path, "rb") as handle:
            self.assertEqual(handle.read(), obj.data)
        self.assertEqual(os.listdir(os.path.dirname(path)), ["h-01ID.jsonl.gz"])
        yield store.put(obj)  # the same key again overwrites
        self.assertEqual(os.listdir(os.path.dirname(path)), ["h-01ID.jsonl.gz"])

    @inlineCallbacks
    def test_io_errors_are_retryable_store_errors(self):
        blocker = os.path.join(self.root, "file")
        open(blocker, "w").close()
        store = LocalStore(blocker, reactor, self.pool)
        error = yield self.assertFailure(store.put(self.obj()), RetryableStoreError)
        self.assertEqual((error.reason, error.code), ("io_error", "ENOTDIR"))

    def test_describe_names_the_directory_and_close_has_nothing_to_wait_for(self):
        store = LocalStore(os.path.join(self.root, "objects"), reactor, self.pool)
        self.assertEqual(store.describe(), "local:" + os.path.join(self.root, "objects"))
        self.assertIsNone(self.successResultOf(store.close()))


class FileTests(unittest.TestCase):
    def setUp(self) -> None:
        self.root = make_workdir(self)

    def test_write_file_replaces_the_content_and_syncs_it(self):
        path = os.path.join(self.root, "f")
        synced = []
        real_fsync = os.fsync
        self.patch(fsutil.os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
        write_file(path, b"first, longer")
        write_file(path, b"second")
        with open(path, "rb") as handle:
            self.assertEqual(handle.read(), b"second")
        self.assertEqual(len(synced), 2)

    def test_write_atomically_creates_directories_and_syncs_the_directory(self):
        path = os.path.join(self.root, "a", "b", "obj")
        synced = []
        self.patch(fsutil, "fsync_directory", synced.append)
        write_atomically(path, b"data")
        with open(path, "rb") as handle:
            self.assertEqual(handle.read(), b"data")
        self.assertEqual(synced, [os.path.dirname(path)])

    def test_a_crash_before_the_rename_leaves_no_file_under_the_name(self):
        path = os.path.join(self.root, "a", "obj.jsonl.gz")

        def crash(src, dst):
            raise KeyboardInterrupt("power cut")

        self.patch(fsutil.os, "replace", crash)
        with self.assertRaises(KeyboardInterrupt):
            write_atomically(path, b"data")
        self.assertEqual(os.listdir(os.path.dirname(path)), [])

    def test_temp_name_is_hidden_and_not_an_object_name(self):
        seen = []
        real_replace = os.replace

        def spy(src, dst):
            seen.append(os.path.basename(src))
            real_replace(src, dst)

        self.patch(fsutil.os, "replace", spy)
        write_atomically(os.path.join(self.root, "x.jsonl.gz"), b"data")
        [name] = seen
        self.assertTrue(name.startswith(".") and not name.endswith(".jsonl.gz"), name)
