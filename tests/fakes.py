"""In-memory stand-ins and builders shared by the unit tests: the one fake
store, a spool that records, a synchronous encoder, the one object maker
and the one log capture."""

from __future__ import annotations

from typing import Any, Optional

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from estat.codec import encode_batch
from estat.model import Batch, EncodedObject, Event
from estat.stores.base import StoreError

TS_MS = 1_700_000_000_123  # 2023-11-14 22:13:20 UTC
HOST_ID = "host-1"


class FakeStore:
    """Records every put as (time on `clock`, key). With `error` set every
    put fails with it; else with `manual` each put waits in `pending` until
    the test fires it (stored once it succeeds); else it is stored at once
    in `stored`."""

    name = "fake"

    def __init__(self, manual: bool = False, error: Optional[StoreError] = None,
                 clock: Optional[IReactorTime] = None) -> None:
        self.manual = manual
        self.error = error
        self.clock = clock
        self.stored: dict[str, EncodedObject] = {}
        self.pending: list[tuple[EncodedObject, Deferred]] = []
        self.puts: list[tuple[float, str]] = []
        self.closed = False

    @property
    def calls(self) -> int:
        return len(self.puts)

    def put(self, obj: EncodedObject) -> "Deferred[None]":
        self.puts.append((self.clock.seconds() if self.clock else 0.0, obj.key))
        if self.error is not None:
            return fail(self.error)
        if self.manual:
            d: Deferred[None] = Deferred()
            d.addCallback(lambda _: self.stored.__setitem__(obj.key, obj))
            self.pending.append((obj, d))
            return d
        self.stored[obj.key] = obj
        return succeed(None)

    def finish_all(self) -> None:
        pending, self.pending = self.pending, []
        for _, d in pending:
            d.callback(None)

    def describe(self) -> str:
        return "fake store in memory"

    def close(self) -> "Deferred[None]":
        self.closed = True
        return succeed(None)


class RecordingSpool:
    """A spool that keeps what it is given."""

    def __init__(self) -> None:
        self.saved: list[tuple[EncodedObject, StoreError]] = []

    def save(self, obj: EncodedObject, error: StoreError) -> "Deferred[bool]":
        self.saved.append((obj, error))
        return succeed(True)


def sync_encoder(validated: bool = True):  # type: ignore[no-untyped-def]
    def encode(batch: Batch) -> "Deferred[list[EncodedObject]]":
        return succeed(encode_batch(batch, validated=validated, prefix="raw",
                                    raw_prefix="raw_dlq", host_id="h"))
    return encode


def make_object(n: int = 0, events: int = 3) -> EncodedObject:
    """The `n`-th object of a test: a real encoded one (its gzip verifies)
    of `events` JSON events received from TS_MS + n seconds on, in batch
    01HF<n, 22 digits> (so keys are unique and sort by `n`), host HOST_ID."""
    bodies = [Event(TS_MS + n * 1000 + i, b'{"n":%d,"i":%d}' % (n, i)) for i in range(events)]
    batch = Batch.of_events(bodies, sum(len(e.body) for e in bodies), f"01HF{n:022d}", "size")
    [obj] = encode_batch(batch, validated=True, prefix="raw", raw_prefix="raw_dlq",
                         host_id=HOST_ID)
    return obj


def capture_logs(test: unittest.TestCase) -> list[dict[str, Any]]:
    """Every log event emitted until the end of `test`."""
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    test.addCleanup(globalLogPublisher.removeObserver, events.append)
    return events


def logged(events: list[dict[str, Any]], text: str) -> list[dict[str, Any]]:
    """The captured events whose format contains `text`."""
    return [e for e in events if text in e.get("log_format", "")]
