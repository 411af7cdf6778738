"""`estat-dlq`, the installed console script, run as a subprocess against
dead-letter directories built with the real on-disk format."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Optional

from twisted.trial import unittest

from estat.dlq import disk as dlqdisk
from estat.stores.base import RetryableStoreError
from tests.fakes import make_object
from tests.support import REPO_ROOT, make_workdir, read_objects

RETRYABLE = RetryableStoreError("connection", "ConnectionRefused", "connection refused")

SCRIPT = os.path.join(os.path.dirname(sys.executable), "estat-dlq")


class Result:
    def __init__(self, completed: subprocess.CompletedProcess) -> None:
        self.code = completed.returncode
        self.out = completed.stdout.decode()
        self.err = completed.stderr.decode()

    def __repr__(self) -> str:
        return f"exit {self.code}\nstdout:\n{self.out}\nstderr:\n{self.err}"


class CliTestCase(unittest.TestCase):

    def setUp(self) -> None:
        if not os.path.exists(SCRIPT):
            self.fail(f"{SCRIPT} is missing: run .venv/bin/pip install '.[test]'")
        self.workdir = make_workdir(self)
        self.dlq = os.path.join(self.workdir, "dlq")
        self.out_dir = os.path.join(self.workdir, "objects")
        self.objects = {}
        now_ms = int(time.time() * 1000)
        # three entries, 3 days, 2 hours and 1 minute old
        for n, age_s in ((1, 3 * 86400), (2, 7200), (3, 60)):
            obj = make_object(n, events=n + 1)
            created = now_ms - age_s * 1000
            name = dlqdisk.entry_name(created, obj)
            meta = dlqdisk.make_meta(obj, RETRYABLE, created, "0.1.0")
            dlqdisk.write_entry(self.dlq, name, obj.data, dlqdisk.encode_meta(meta))
            self.objects[name] = obj
        self.names = sorted(self.objects)

    def cli(self, *args: str, env: Optional[dict[str, str]] = None) -> Result:
        environ = {k: v for k, v in os.environ.items()
                   if not k.startswith(("AWS_", "S3_", "DLQ_", "OUTPUT_DIR"))}
        environ.update(PYTHONPATH=REPO_ROOT, DLQ_DIR=self.dlq, OUTPUT_DIR=self.out_dir)
        environ.update(env or {})
        completed = subprocess.run([SCRIPT, *args], env=environ, cwd=self.workdir,
                                   capture_output=True, timeout=60)
        return Result(completed)

    def meta(self, name: str) -> dict:
        with open(os.path.join(self.dlq, name, "meta.json")) as handle:
            return json.load(handle)


class Inspecting(CliTestCase):

    def test_list_prints_one_line_per_entry_oldest_first(self) -> None:
        result = self.cli("list")
        self.assertEqual(result.code, 0, result)
        header, *lines = result.out.splitlines()
        self.assertEqual(header.split()[:5], ["ID", "AGE", "EVENTS", "BYTES", "ATTEMPTS"])
        self.assertEqual([line.split()[0] for line in lines], self.names)
        ages = [line.split()[1] for line in lines]
        self.assertEqual((ages[0], ages[1], ages[2][:3]), ("3d00h", "2h00m", "1m0"))
        first = lines[0].split()
        obj = self.objects[self.names[0]]
        self.assertEqual(first[2:5], [str(obj.event_count), str(len(obj.data)), "1"])
        self.assertIn("ConnectionRefused: connection refused", lines[0])
        self.assertIn("3 entries, 9 events", result.err)

    def test_list_shows_unreadable_entries_without_failing(self) -> None:
        os.unlink(os.path.join(self.dlq, self.names[1], "meta.json"))
        result = self.cli("list")
        self.assertEqual(result.code, 0, result)
        self.assertIn("UNREADABLE: meta.json is missing", result.out.splitlines()[2])

    def test_show_prints_meta_and_first_lines(self) -> None:
        name = self.names[2]
        result = self.cli("show", name[:16], "--lines", "2")
        self.assertEqual(result.code, 0, result)
        self.assertIn(f'"key": "{self.objects[name].key}"', result.out)
        self.assertIn('"event_count": 4', result.out)
        data_lines = result.out.split("lines of data.gz ---\n")[1].splitlines()
        self.assertEqual([json.loads(line)["body"] for line in data_lines],
                         [{"n": 3, "i": 0}, {"n": 3, "i": 1}])

    def test_show_unknown_or_ambiguous_id_fails_with_one_sentence(self) -> None:
        result = self.cli("show", "nope")
        self.assertEqual(result.code, 1, result)
        self.assertEqual(result.err.strip(), f"estat-dlq: no dead-letter entry 'nope' in "
                                             f"{self.dlq} (see `estat-dlq list`).")
        result = self.cli("show", "1")
        self.assertEqual(result.code, 1, result)
        self.assertIn("matches 3 entries", result.err)

    def test_verify_reports_each_bad_entry(self) -> None:
        result = self.cli("verify")
        self.assertEqual(result.code, 0, result)
        self.assertEqual(len([l for l in result.out.splitlines() if l.startswith("ok ")]), 3)
        path = os.path.join(self.dlq, self.names[0], "data.gz")
        data = bytearray(open(path, "rb").read())
        data[-5] ^= 0xFF  # the stored CRC no longer matches
        open(path, "wb").write(bytes(data))
        result = self.cli("verify")
        self.assertEqual(result.code, 1, result)
        self.assertIn(f"BAD {self.names[0]}: data.gz does not verify", result.err)
        self.assertIn("3 entries checked, 1 bad", result.err)

    def test_missing_directory_and_bad_settings(self) -> None:
        result = self.cli("list", "--dlq-dir", os.path.join(self.workdir, "absent"))
        self.assertEqual(result.code, 1, result)
        self.assertIn("does not exist (check --dlq-dir or DLQ_DIR)", result.err)
        result = self.cli("list", env={"S3_TIMEOUT": "soon"})
        self.assertEqual(result.code, 2, result)
        self.assertEqual(result.err.strip(), "estat-dlq: S3_TIMEOUT='soon' is not valid: "
                                             "expected a number of seconds.")
        result = self.cli("purge")
        self.assertEqual(result.code, 2, result)

    def test_settings_come_from_an_env_file(self) -> None:
        env_file = os.path.join(self.workdir, "estat-ingest.env")
        with open(env_file, "w") as handle:
            handle.write(f"# the server's settings\nDLQ_DIR='{self.dlq}'\n")
        result = self.cli("--env-file", env_file, "list",
                          env={"DLQ_DIR": os.path.join(self.workdir, "elsewhere")})
        self.assertEqual(result.code, 0, result)
        self.assertEqual(len(result.out.splitlines()), 4)


class Replaying(CliTestCase):

    def test_replay_ids_uploads_with_the_same_key_and_deletes(self) -> None:
        chosen = [self.names[0], self.names[2]]
        result = self.cli("replay", *chosen)
        self.assertEqual(result.code, 0, result)
        stored = dict(read_objects(self.out_dir))
        self.assertEqual(sorted(stored), sorted(self.objects[n].key for n in chosen))
        for name in chosen:
            path = os.path.join(self.out_dir, self.objects[name].key)
            self.assertEqual(open(path, "rb").read(), self.objects[name].data)
        self.assertEqual(dlqdisk.entry_names(self.dlq), [self.names[1]])

    def test_failed_replay_keeps_the_entry_and_records_the_attempt(self) -> None:
        blocker = os.path.join(self.workdir, "not-a-dir")
        open(blocker, "w").close()
        result = self.cli("replay", "--all", "--output-dir", blocker)
        self.assertEqual(result.code, 1, result)
        self.assertEqual(len(result.err.splitlines()), 3, result)
        self.assertIn("could not replay", result.err)
        self.assertEqual(dlqdisk.entry_names(self.dlq), self.names)
        meta = self.meta(self.names[0])
        self.assertEqual((meta["attempts"], meta["last_error"]["code"]), (2, "ENOTDIR"))

    def test_replay_never_touches_an_entry_another_process_holds(self) -> None:
        fd = dlqdisk.lock_entry(self.dlq, self.names[0])
        self.addCleanup(dlqdisk.unlock, fd)
        result = self.cli("replay", self.names[0])
        self.assertEqual(result.code, 1, result)
        self.assertIn("is being uploaded by another process", result.err)
        result = self.cli("replay", "--all")
        self.assertEqual(result.code, 0, result)
        self.assertIn(f"skipped {self.names[0]}", result.err)
        self.assertEqual(dlqdisk.entry_names(self.dlq), [self.names[0]])
        self.assertEqual(len(read_objects(self.out_dir)), 2)


class Purging(CliTestCase):

    def test_purge_ids(self) -> None:
        result = self.cli("purge", self.names[1])
        self.assertEqual(result.code, 0, result)
        self.assertIn(f"purged {self.names[1]} (3 events)", result.out)
        self.assertEqual(dlqdisk.entry_names(self.dlq), [self.names[0], self.names[2]])

    def test_purge_older_than(self) -> None:
        result = self.cli("purge", "--older-than", "1h")
        self.assertEqual(result.code, 0, result)
        self.assertEqual(dlqdisk.entry_names(self.dlq), [self.names[2]])
        self.assertEqual(os.listdir(self.dlq), [self.names[2]])
        result = self.cli("purge", "--older-than", "soon")
        self.assertEqual(result.code, 2, result)
        self.assertIn("is not a duration", result.err)

    def test_purge_refuses_a_locked_entry(self) -> None:
        fd = dlqdisk.lock_entry(self.dlq, self.names[0])
        self.addCleanup(dlqdisk.unlock, fd)
        result = self.cli("purge", self.names[0], self.names[1])
        self.assertEqual(result.code, 1, result)
        self.assertIn("is being uploaded by another process", result.err)
        self.assertEqual(dlqdisk.entry_names(self.dlq), [self.names[0], self.names[2]])
