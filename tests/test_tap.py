"""Options and settings: precedence, defaults, and one-sentence errors."""

from __future__ import annotations

import dataclasses
import os
import subprocess

from twisted.python import usage
from twisted.trial import unittest

from estat.config import OPTIONS, ConfigError, Settings, default_host_id, load_settings
from estat.tap import Options
from tests.support import REPO_ROOT, VENV_BIN, make_workdir


class OptionsTests(unittest.TestCase):
    def setUp(self) -> None:
        self.workdir = make_workdir(self)
        self.env = {"OUTPUT_DIR": os.path.join(self.workdir, "o"),
                    "DLQ_DIR": os.path.join(self.workdir, "d")}

    def parse(self, *argv: str, **env: str) -> Settings:
        options = Options(environ={**self.env, **env})
        options.parseOptions(list(argv))
        assert options.settings is not None
        return options.settings

    def test_defaults_are_the_documented_ones(self):
        settings = self.parse()
        self.assertEqual(settings.listen, ("tcp:8080",))
        self.assertEqual(settings.admin_listen, "tcp:9100:interface=127.0.0.1")
        self.assertEqual((settings.max_body_size, settings.event_queue_size,
                          settings.batch_size, settings.batch_max_bytes,
                          settings.flush_interval, settings.upload_queue_size),
                         (16384, 100000, 10000, 8 * 1024 * 1024, 5.0, 4))
        # What a log shipper's default output sends fits the defaults.
        self.assertEqual((settings.max_batch_body_size, settings.max_batch_events),
                         (20 * 1024 * 1024, 50000))
        self.assertTrue(settings.validate_json)
        self.assertEqual((settings.prefix, settings.raw_prefix), ("raw", "raw_dlq"))

    def test_settings_defaults_are_the_options_defaults(self):
        """One source of truth: a field per option, its default the option's
        text parsed like user input (the host id worked out at start)."""
        fields = {f.name for f in dataclasses.fields(Settings)}
        self.assertEqual(fields, {o.name.replace("-", "_") for o in OPTIONS})
        defaults = Settings()
        self.assertEqual(defaults, load_settings({}, {}))
        for option in OPTIONS:
            expected = (default_host_id() if option.name == "host-id"
                        else option.parse_text(option.default))
            self.assertEqual(getattr(defaults, option.attribute), expected, option.name)
        self.assertEqual((defaults.listen, defaults.max_batch_body_size,
                          defaults.dlq_max_bytes, defaults.s3_timeout),
                         (("tcp:8080",), 20 * 1024 * 1024, 1024**3, 30.0))

    def test_a_request_limit_the_queue_can_never_take_is_refused(self):
        for env, message in [
            ({"MAX_BATCH_EVENTS": "2000", "EVENT_QUEUE_SIZE": "1000"},
             "MAX_BATCH_EVENTS (2000) must not exceed EVENT_QUEUE_SIZE (1000): the event "
             "queue could never take a full batch."),
            ({"EVENT_QUEUE_MAX_BYTES": "1MiB"},
             "MAX_BATCH_BODY_SIZE (20971520) must not exceed EVENT_QUEUE_MAX_BYTES "
             "(1048576): the event queue could never take a full batch."),
            ({"REQUEST_BODIES_MAX_BYTES": "1MiB"},
             "MAX_BATCH_BODY_SIZE (20971520) must not exceed REQUEST_BODIES_MAX_BYTES "
             "(1048576): a full batch could never be received.")]:
            with self.assertRaises(ConfigError) as caught:
                load_settings({}, env)
            self.assertEqual(str(caught.exception), message)

    def test_listen_needs_an_endpoint_wherever_it_is_given(self):
        message = "LISTEN must name at least one endpoint, such as tcp:8080."
        for given, env in (({"listen": [" "]}, {}), ({}, {"LISTEN": " , "})):
            with self.assertRaises(ConfigError) as caught:
                load_settings(given, env)
            self.assertEqual(str(caught.exception), message)
        # a blank LISTEN is no LISTEN; items given on the command line are
        # not split at commas, the environment's are
        self.assertEqual(load_settings({}, {"LISTEN": " "}).listen, ("tcp:8080",))
        self.assertEqual(load_settings({"listen": ["tcp:1,x"]}, {}).listen, ("tcp:1,x",))

    def test_option_beats_environment_beats_default(self):
        self.assertEqual(self.parse(BATCH_SIZE="7").batch_size, 7)
        self.assertEqual(self.parse("--batch-size", "9", BATCH_SIZE="7").batch_size, 9)
        settings = self.parse(LISTEN="tcp:1,tcp:2", MAX_BODY_SIZE="64KiB",
                              VALIDATE_JSON="false", FLUSH_INTERVAL="0.5")
        self.assertEqual(settings.listen, ("tcp:1", "tcp:2"))
        self.assertEqual(settings.max_body_size, 65536)
        self.assertFalse(settings.validate_json)
        self.assertEqual(settings.flush_interval, 0.5)
        self.assertEqual(self.parse("--listen", "tcp:3", "--listen", "tcp:4",
                                    LISTEN="tcp:1").listen, ("tcp:3", "tcp:4"))

    def test_bad_values_are_one_clear_sentence(self):
        cases = [
            (["--batch-size", "0"], {}, "--batch-size='0' is not valid: must be greater than zero."),
            ([], {"BATCH_SIZE": "ten"}, "BATCH_SIZE='ten' is not valid: expected a whole number."),
            ([], {"MAX_BODY_SIZE": "12 parsecs"}, "MAX_BODY_SIZE='12 parsecs' is not valid"),
            ([], {"VALIDATE_JSON": "maybe"}, "expected true or false"),
            ([], {"FLUSH_INTERVAL": "-1"}, "greater than zero"),
            ([], {"FLUSH_INTERVAL": "nan"}, "greater than zero"),
            ([], {"PREFIX": "a b"}, "PREFIX='a b' is not valid"),
            ([], {"PREFIX": "../outside"}, "PREFIX='../outside' is not valid: must be a safe key"),
            ([], {"RAW_PREFIX": "raw/./x"}, "RAW_PREFIX='raw/./x' is not valid: must be a safe key"),
            ([], {"PREFIX": "x", "RAW_PREFIX": "x"}, "PREFIX and RAW_PREFIX must differ"),
            ([], {"LISTEN": "bogus:1"}, "LISTEN 'bogus:1' is not a Twisted endpoint"),
            ([], {"ADMIN_LISTEN": "tcp:notaport"}, "ADMIN_LISTEN 'tcp:notaport'"),
            ([], {"S3_ADDRESSING": "sideways"}, "expected one of auto, path, virtual"),
            ([], {"WORKERS": "2", "LISTEN": "unix:/tmp/x.sock"},
             "WORKERS > 1 needs tcp: LISTEN endpoints; 'unix:/tmp/x.sock' is not one"),
        ]
        for argv, env, message in cases:
            with self.assertRaises(usage.UsageError, msg=(argv, env)) as caught:
                self.parse(*argv, **env)
            text = str(caught.exception)
            self.assertIn(message, text)
            self.assertEqual(text.count("\n"), 0, text)

    def test_unwritable_output_directory_is_refused(self):
        blocker = os.path.join(self.workdir, "file")
        open(blocker, "w").close()
        with self.assertRaises(usage.UsageError) as caught:
            self.parse(OUTPUT_DIR=os.path.join(blocker, "sub"))
        self.assertRegex(str(caught.exception), r"^OUTPUT_DIR '.*' cannot be created: ")

    def test_help_documents_every_option_with_its_variable(self):
        text = " ".join(str(Options(environ={})).split())
        for option in OPTIONS:
            self.assertIn("--" + option.name, text)
            self.assertIn("env " + option.env, text)

    def test_env_file_documents_every_variable_with_its_default(self):
        with open(os.path.join(REPO_ROOT, "etc", "estat-ingest.env")) as handle:
            text = handle.read()
        for option in OPTIONS:
            self.assertIn(f"#{option.env}={option.default}\n", text)


class TwistdTests(unittest.TestCase):
    """The real `twistd` command, as an operator runs it."""

    def run_twistd(self, *argv: str, env: dict[str, str] | None = None):
        workdir = make_workdir(self)
        environ = {**os.environ, "PYTHONPATH": REPO_ROOT, **(env or {})}
        return subprocess.run([os.path.join(VENV_BIN, "twistd"), *argv], cwd=workdir,
                              env=environ, capture_output=True, text=True, timeout=60)

    def test_twistd_lists_the_plugin(self):
        result = self.run_twistd("--help")
        self.assertRegex(result.stdout, r"estat-ingest\s+HTTP event ingest")

    def test_bad_setting_stops_twistd_with_one_sentence_and_no_traceback(self):
        result = self.run_twistd("-n", "estat-ingest", "--batch-size", "-3")
        self.assertNotEqual(result.returncode, 0)
        output = result.stdout + result.stderr
        self.assertIn("--batch-size='-3' is not valid: must be greater than zero.", output)
        self.assertNotIn("Traceback", output)
