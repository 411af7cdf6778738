"""What every store (local directory, S3) promises, and the two kinds of
failure an upload can end with."""

from __future__ import annotations

from typing import Protocol

from twisted.internet.defer import Deferred

from estat.model import EncodedObject


class StoreError(Exception):
    """An upload failed. `reason` is a low-cardinality metric label, `code`
    and `message` what the store said (for logs and the dead-letter meta);
    an HTTP store also sets the answer's `status` and `request_id`."""

    retryable = False
    status = 0
    request_id = ""

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


def as_store_error(error: BaseException) -> StoreError:
    """`error` itself if it is a StoreError, else a retryable `io_error`
    named after its type: a failure nobody classified is assumed to pass,
    so the object is kept (dead-lettered, retried) rather than given up."""
    if isinstance(error, StoreError):
        return error
    return RetryableStoreError("io_error", type(error).__name__, str(error))


class Store(Protocol):
    """Somewhere objects are written. `put` fires with None once the object
    is durably stored under `obj.key`, or fails with a StoreError; putting
    the same key twice overwrites (so retries never duplicate).

    A structural type rather than a zope Interface: the stores and the test
    fakes satisfy it by shape, and mypy checks every use statically."""

    name: str

    def put(self, obj: EncodedObject) -> "Deferred[None]":
        ...

    def describe(self) -> str:
        """Where objects go, in a few words for the start-up log line."""
        ...

    def close(self) -> "Deferred[None]":
        """Release what the store holds open (connections), once the last
        `put` has finished; fires when done."""
        ...
