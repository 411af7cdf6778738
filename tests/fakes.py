"""In-memory stand-ins for unit tests: a store whose puts the test controls,
a spool that records, and a synchronous encoder."""

from __future__ import annotations

from typing import Optional

from twisted.internet.defer import Deferred, succeed

from estat.codec import encode_batch
from estat.model import Batch, EncodedObject
from estat.stores.base import StoreError


class FakeStore:
    """Records puts. With `manual=True` each put waits until the test fires
    it; otherwise it succeeds (or fails with `error`) at once."""

    name = "fake"

    def __init__(self, manual: bool = False, error: Optional[StoreError] = None) -> None:
        self.manual = manual
        self.error = error
        self.stored: dict[str, EncodedObject] = {}
        self.pending: list[tuple[EncodedObject, Deferred]] = []
        self.calls = 0

    def put(self, obj: EncodedObject) -> "Deferred[None]":
        self.calls += 1
        if self.manual:
            d: Deferred[None] = Deferred()
            d.addCallback(lambda _: self.stored.__setitem__(obj.key, obj))
            self.pending.append((obj, d))
            return d
        if self.error is not None:
            d = Deferred()
            d.errback(self.error)
            return d
        self.stored[obj.key] = obj
        return succeed(None)

    def finish_all(self) -> None:
        pending, self.pending = self.pending, []
        for _, d in pending:
            d.callback(None)


class RecordingSpool:
    """A spool that keeps what it is given."""

    def __init__(self) -> None:
        self.saved: list[tuple[EncodedObject, StoreError]] = []

    def save(self, obj: EncodedObject, error: StoreError) -> "Deferred[None]":
        self.saved.append((obj, error))
        return succeed(None)


def sync_encoder(validated: bool = True):  # type: ignore[no-untyped-def]
    def encode(batch: Batch) -> "Deferred[list[EncodedObject]]":
        return succeed(encode_batch(batch, validated=validated, prefix="raw",
                                    raw_prefix="raw_dlq", host_id="h"))
    return encode
