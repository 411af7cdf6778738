"""The embedded default store: objects written under a local directory with
the same keys as on S3, each committed atomically (temp file, fsync,
rename, fsync of the directory) so a reader never sees a partial file."""

from __future__ import annotations

import errno
import os
import secrets

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from estat.model import EncodedObject
from estat.stores.base import RetryableStoreError


def fsync_directory(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: str, data: bytes) -> None:
    """Write `data` to `path` so that `path` either does not exist or holds
    all of `data`, even after a crash or power loss."""
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    temporary = os.path.join(
        directory, f".{os.path.basename(path)}.{secrets.token_hex(4)}.tmp"
    )
    try:
        with open(temporary, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise
    fsync_directory(directory)


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
        d = deferToThreadPool(
            self._reactor, self._pool, write_atomically, self.path_for(obj.key), obj.data
        )
        d.addErrback(self._as_store_error)
        return d

    @staticmethod
    def _as_store_error(failure):  # type: ignore[no-untyped-def]
        error = failure.check(OSError) and failure.value
        if error:
            code = errno.errorcode.get(error.errno or 0, "EIO")
            raise RetryableStoreError("io_error", code, error.strerror or str(error))
        return failure
