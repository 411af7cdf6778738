"""No object can be written outside the store's root: a writer's prefix
segment with `..` (or anything unsafe) is refused when the tokens file is
read, at start and on reload (the old keys stay); every key is checked where
keys are built; and the local store refuses a key that resolves outside its
root."""

from __future__ import annotations

import os
import re

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.python.threadpool import ThreadPool
from twisted.trial import unittest

from estat.auth import TokensFileError, WriteKeys, parse_tokens
from estat.model import EncodedObject, object_key
from estat.stores.base import PermanentStoreError
from estat.stores.local import LocalStore
from tests.fakes import make_object
from tests.support import make_workdir

KEY = "k" * 24
UNSAFE_SEGMENTS = ("../../../outside", "source=web/../../x", "./x", "x/.", "a/..",
                   "..", "x/../../y", "sp\\ace", "a%2f..")


class TokensFile(unittest.TestCase):

    def test_unsafe_segments_are_refused_in_one_sentence_naming_the_line(self) -> None:
        for segment in UNSAFE_SEGMENTS:
            with self.assertRaises(TokensFileError, msg=segment) as caught:
                parse_tokens(f"# keys\n{KEY} writer {segment}\n")
            message = str(caught.exception)
            self.assertTrue(message.startswith("AUTH_TOKENS_FILE line 2: the prefix segment "),
                            message)
            self.assertTrue(message.endswith("."), message)
            self.assertIsNone(re.search(r"[.!?] [A-Z]", message), message)  # one sentence

    def test_safe_segments_still_work(self) -> None:
        for segment in ("source=web", "team=a/app=b", "a.b_c-d=e", "/lead=x/and=y/"):
            [writer] = parse_tokens(f"{KEY} writer {segment}\n").values()
            self.assertEqual(writer.segment, segment.strip("/"))

    def test_refused_at_start_and_on_reload_where_the_old_keys_stay(self) -> None:
        path = os.path.join(make_workdir(self), "tokens")
        with open(path, "w") as handle:
            handle.write(f"{KEY} writer ../../../outside\n")
        self.assertRaises(TokensFileError, WriteKeys.from_file, path)
        with open(path, "w") as handle:
            handle.write(f"{KEY} writer source=web\n")
        keys = WriteKeys.from_file(path)
        other = "o" * 24
        with open(path, "w") as handle:
            handle.write(f"{other} evil ../../../outside\n")
        self.assertRaises(TokensFileError, keys.reload)
        writer, _ = keys.writer_for(None, KEY.encode())
        self.assertIsNotNone(writer)
        self.assertEqual(keys.writer_for(None, other.encode()), (None, "auth_invalid"))


class ObjectKeys(unittest.TestCase):

    def test_every_key_is_checked_where_keys_are_built(self) -> None:
        for segment in UNSAFE_SEGMENTS:
            with self.assertRaises(ValueError, msg=segment):
                object_key(f"raw/{segment}", 1700000000000, "host", "01BATCH")
        for prefix, host in (("/raw", "h"), ("raw//x", "h"), ("raw", "../h"), ("raw", "h x")):
            with self.assertRaises(ValueError, msg=(prefix, host)):
                object_key(prefix, 1700000000000, host, "01BATCH")
        self.assertEqual(object_key("raw/source=web", 1700000000000, "h", "01B"),
                         "raw/source=web/dt=2023-11-14/hour=22/h-01B.jsonl.gz")


class LocalStoreRoot(unittest.TestCase):

    def setUp(self) -> None:
        self.work = make_workdir(self)
        self.root = os.path.join(self.work, "objects")
        os.makedirs(self.root)
        self.pool = ThreadPool(0, 1, name="test")
        self.pool.start()
        self.addCleanup(self.pool.stop)
        self.store = LocalStore(self.root, reactor, self.pool)

    def with_key(self, key: str) -> EncodedObject:
        obj = make_object(1)
        return EncodedObject(key, obj.data, obj.event_count, obj.uncompressed_bytes,
                             obj.first_ts_ms, obj.last_ts_ms, obj.batch_id, obj.kind)

    def written_outside(self) -> list[str]:
        return sorted(name for name in os.listdir(self.work) if name != "objects")

    @inlineCallbacks
    def test_a_key_with_dot_dot_is_refused(self):  # type: ignore[no-untyped-def]
        for key in ("../outside.jsonl.gz", "raw/../../outside.jsonl.gz", "/tmp/x.jsonl.gz"):
            error = yield self.assertFailure(self.store.put(self.with_key(key)),
                                             PermanentStoreError)
            self.assertEqual(error.code, "UnsafeKey")
        self.assertEqual(self.written_outside(), [])

    @inlineCallbacks
    def test_a_key_that_resolves_outside_through_a_symlink_is_refused(self):  # type: ignore[no-untyped-def]
        os.mkdir(os.path.join(self.work, "elsewhere"))
        os.symlink(os.path.join(self.work, "elsewhere"), os.path.join(self.root, "raw"))
        error = yield self.assertFailure(
            self.store.put(self.with_key("raw/dt=2023-11-14/x.jsonl.gz")), PermanentStoreError)
        self.assertEqual(error.code, "UnsafeKey")
        self.assertEqual(os.listdir(os.path.join(self.work, "elsewhere")), [])
