"""The analytics SDKs from PyPI (Segment's, RudderStack's, PostHog's),
each pointed at a live `twistd -n estat-ingest` with only its host
changed: every event is stored exactly once, as its own line, and the SDK
reports no error; and when an answer is lost so that the SDK retries an
accepted batch, nothing is stored twice."""

from __future__ import annotations

import logging
import os
import uuid
from typing import Any, Callable

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial import unittest

from tests.e2e.proxy import FaultProxy
from tests.support import EstatServer, make_workdir, read_objects

SEGMENT_KEY = "segment-write-key-0123456789"
RUDDER_KEY = "rudder-write-key-0123456789"
POSTHOG_KEY = "phc_posthog-project-key-0123456789"
EVENTS = 250  # more than one batch of each SDK (100 events a batch by default)


class _Errors(logging.Handler):
    """Every warning or error an SDK logs."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(f"{record.name}: {record.getMessage()}")


def _segment(host: str, ids: list[str], on_error: Callable[..., None], **options: Any) -> None:
    from segment.analytics import Client

    client = Client(SEGMENT_KEY, host=host, on_error=on_error, **options)
    for number, event_id in enumerate(ids):
        client.track(user_id=f"user-{number % 7}", event="Signed Up",
                     properties={"n": number, "plan": "pro"}, message_id=event_id)
    client.flush()
    client.join()


def _rudder(host: str, ids: list[str], on_error: Callable[..., None], **options: Any) -> None:
    from rudderstack.analytics import Client

    client = Client(RUDDER_KEY, host=host, on_error=on_error, **options)
    for number, event_id in enumerate(ids):
        client.track(user_id=f"user-{number % 7}", event="Order Completed",
                     properties={"n": number}, message_id=event_id)
    client.flush()
    client.join()


def _posthog(host: str, ids: list[str], on_error: Callable[..., None], **options: Any) -> None:
    from posthog import Posthog

    client = Posthog(POSTHOG_KEY, host=host, on_error=on_error, **options)
    for number, event_id in enumerate(ids):
        client.capture("pageview", distinct_id=f"user-{number % 7}",
                       properties={"n": number}, uuid=event_id)
    client.flush()
    client.shutdown()


SDKS = {
    # name: (send, logger, stored protocol, id field, prefix segment of its key)
    "segment": (_segment, "segment", "segment", "messageId", "source=segment"),
    "rudder": (_rudder, "rudderstack", "segment", "messageId", "source=rudder"),
    "posthog": (_posthog, "posthog", "posthog", "uuid", "source=posthog"),
}


class SdkEndToEndTests(unittest.TestCase):
    timeout = 180

    @inlineCallbacks
    def setUp(self):  # type: ignore[no-untyped-def]
        self.workdir = make_workdir(self)
        tokens = os.path.join(self.workdir, "tokens")
        with open(tokens, "w") as handle:
            handle.write(f"{SEGMENT_KEY} segment source=segment\n"
                         f"{RUDDER_KEY} rudder source=rudder\n"
                         f"{POSTHOG_KEY} posthog source=posthog\n")
        self.server = EstatServer(self.workdir, env={"AUTH_TOKENS_FILE": tokens})
        yield self.server.start()
        self.addCleanup(self._stop_server)

    @inlineCallbacks
    def _stop_server(self):  # type: ignore[no-untyped-def]
        if self.server.proc is not None and self.server.proc.running():
            yield self.server.stop()

    def stored(self, protocol: str, id_field: str) -> tuple[list[str], set[str]]:
        """The ids of the stored events of `protocol` (one per line), and
        the prefix segments they were stored under."""
        ids, segments = [], set()
        for key, lines in read_objects(os.path.join(self.workdir, "objects")):
            for line in lines:
                body = line["body"]
                self.assertEqual(body["protocol"], protocol)
                ids.append(body["message"][id_field])
                segments.add(key.split("/dt=")[0])
        return ids, segments

    @inlineCallbacks
    def send(self, name: str, host: str, ids: list[str],  # type: ignore[no-untyped-def]
             **options: Any):
        """Run the SDK in a thread (it blocks) and return what it reported."""
        send, logger_name, _, _, _ = SDKS[name]
        errors: list[Any] = []
        logs = _Errors()
        logger = logging.getLogger(logger_name)
        logger.addHandler(logs)
        try:
            yield deferToThread(send, host, ids, lambda *args: errors.append(args), **options)
        finally:
            logger.removeHandler(logs)
        return errors, logs.records

    @inlineCallbacks
    def check_every_event_once(self, name: str):  # type: ignore[no-untyped-def]
        _, _, protocol, id_field, segment = SDKS[name]
        ids = [str(uuid.uuid4()) for _ in range(EVENTS)]
        errors, logged = yield self.send(name, self.server.url, ids)
        self.assertEqual((errors, logged), ([], []))
        metrics = self.server.metrics()
        self.assertEqual(
            metrics[f'estat_protocol_events_accepted_total{{protocol="{protocol}"}}'], EVENTS)
        code = yield self.server.stop()
        self.assertEqual(code, -15, self.server.output())
        stored, segments = self.stored(protocol, id_field)
        self.assertEqual(sorted(stored), sorted(ids))
        self.assertEqual(segments, {f"raw/{segment}"})

    def test_segment_every_event_once(self):  # type: ignore[no-untyped-def]
        return self.check_every_event_once("segment")

    def test_rudderstack_every_event_once(self):  # type: ignore[no-untyped-def]
        return self.check_every_event_once("rudder")

    def test_posthog_every_event_once(self):  # type: ignore[no-untyped-def]
        return self.check_every_event_once("posthog")

    @inlineCallbacks
    def check_retry_stores_nothing_twice(self, name: str,  # type: ignore[no-untyped-def]
                                         **timeout: float):
        """The proxy keeps estat's answer to the first batch from the SDK:
        the SDK times out and sends the batch again; estat has stored it
        already and answers 200 without storing it twice."""
        _, _, protocol, id_field, _ = SDKS[name]
        proxy = FaultProxy(reactor, "127.0.0.1", self.server.port)
        proxy.start()
        self.addCleanup(proxy.stop)
        proxy.hold_answers(1)
        ids = [str(uuid.uuid4()) for _ in range(EVENTS)]
        errors, _ = yield self.send(name, proxy.url, ids, **timeout)
        self.assertEqual(errors, [])
        self.assertEqual(proxy.held_answers, 1)
        metrics = self.server.metrics()
        self.assertGreater(
            metrics[f'estat_duplicate_events_total{{protocol="{protocol}"}}'], 0)
        code = yield self.server.stop()
        self.assertEqual(code, -15, self.server.output())
        stored, _ = self.stored(protocol, id_field)
        self.assertEqual(sorted(stored), sorted(ids))

    def test_segment_retry_stores_nothing_twice(self):  # type: ignore[no-untyped-def]
        return self.check_retry_stores_nothing_twice("segment", timeout=1)

    def test_rudderstack_retry_stores_nothing_twice(self):  # type: ignore[no-untyped-def]
        return self.check_retry_stores_nothing_twice("rudder", timeout=1)

    def test_posthog_retry_stores_nothing_twice(self):  # type: ignore[no-untyped-def]
        return self.check_retry_stores_nothing_twice("posthog", timeout=1)
