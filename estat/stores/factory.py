"""`make_store`: the one place the server and `estat-dlq replay` choose
their store from the settings."""

from __future__ import annotations

from twisted.internet.interfaces import IReactorFromThreads
from twisted.python.threadpool import ThreadPool

from estat.config import Settings
from estat.metrics import Metrics
from estat.stores.base import Store
from estat.stores.local import LocalStore


def make_store(settings: Settings, reactor: IReactorFromThreads, pool: ThreadPool,
               metrics: Metrics) -> Store:
    """S3 when S3_BUCKET is set, else the local directory. The S3 module
    (botocore, treq) is imported only when it is used."""
    if settings.s3_bucket:
        from estat.stores.s3 import make_s3_store

        return make_s3_store(settings, reactor, pool, metrics)
    return LocalStore(settings.output_dir, reactor, pool)
