"""What every store (local directory, S3) promises, and the two kinds of
failure an upload can end with."""

from __future__ import annotations

from typing import Protocol

from twisted.internet.defer import Deferred

from estat.model import EncodedObject


class StoreError(Exception):
    """An upload failed. `reason` is a low-cardinality metric label, `code`
    and `message` what the store said (for logs and the dead-letter meta)."""

    retryable = False

    def __init__(self, reason: str, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.reason = reason
        self.code = code
        self.message = message


class RetryableStoreError(StoreError):
    """A failure that may pass if the same upload is tried again later
    (timeouts, refused connections, 5xx, throttling, a full disk)."""

    retryable = True


class PermanentStoreError(StoreError):
    """A failure that will not pass by itself (access denied, no such bucket,
    a rejected request): an operator has to act."""


class Store(Protocol):
    """Somewhere objects are written. `put` fires with None once the object
    is durably stored under `obj.key`, or fails with a StoreError; putting
    the same key twice overwrites (so retries never duplicate)."""

    name: str

    def put(self, obj: EncodedObject) -> "Deferred[None]":
        ...
