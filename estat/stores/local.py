"""The embedded default store: objects written under a local directory with
the same keys as on S3, each committed atomically (temp file, fsync,
rename, fsync of the directory) so a reader never sees a partial file."""

from __future__ import annotations

import errno
import os

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from estat.model import EncodedObject
from estat.stores.base import RetryableStoreError
from estat.stores.fsutil import write_atomically


class LocalStore:
    """Stores objects as files under `root`; `put` runs on the given pool."""

    name = "local"

    def __init__(self, root: str, reactor: IReactorFromThreads, pool: ThreadPool) -> None:
        self.root = os.path.abspath(root)
        self._reactor = reactor
        self._pool = pool

    def path_for(self, key: str) -> str:
        return os.path.join(self.root, *key.split("/"))

    def put(self, obj: EncodedObject) -> "Deferred[None]":
        d: "Deferred[None]" = deferToThreadPool(
            self._reactor, self._pool, write_atomically, self.path_for(obj.key), obj.data
        )
        d.addErrback(self._as_store_error)
        return d

    def describe(self) -> str:
        return f"local:{self.root}"

    def close(self) -> "Deferred[None]":
        """Nothing to release: every put closed its file."""
        return succeed(None)

    @staticmethod
    def _as_store_error(failure: Failure) -> Failure:
        """An OSError (a full disk, a read-only mount) may pass: retryable,
        named by its errno. Anything else is a bug and stays as it is."""
        error = failure.check(OSError) and failure.value
        if isinstance(error, OSError):
            code = errno.errorcode.get(error.errno or 0, "EIO")
            raise RetryableStoreError("io_error", code, error.strerror or str(error))
        return failure
