"""What every store shares: the error helper, the choice of store from the
settings, and the connection pool whose connections do not log."""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IProtocol, IProtocolFactory, IStreamClientEndpoint
from twisted.internet.task import Clock
from twisted.python.threadpool import ThreadPool
from twisted.trial import unittest
from zope.interface import implementer

from estat.config import Settings
from estat.metrics import Metrics
from estat.stores.base import (
    PermanentStoreError,
    RetryableStoreError,
    StoreError,
    as_store_error,
)
from estat.stores.factory import make_store
from estat.stores.httpclient import quiet_connection_pool
from estat.stores.local import LocalStore
from estat.stores.s3 import S3Store
from tests.fakes import capture_logs, logged
from tests.support import make_workdir


class AsStoreError(unittest.TestCase):
    def test_a_store_error_is_kept_as_it_is(self):
        for error in (RetryableStoreError("timeout", "Timeout", "slow"),
                      PermanentStoreError("client_error", "NoSuchBucket", "gone")):
            self.assertIs(as_store_error(error), error)

    def test_anything_else_is_a_retryable_io_error_named_after_its_type(self):
        error = as_store_error(ZeroDivisionError("division by zero"))
        self.assertIsInstance(error, RetryableStoreError)
        self.assertTrue(error.retryable)
        self.assertEqual((error.reason, error.code, error.message),
                         ("io_error", "ZeroDivisionError", "division by zero"))
        self.assertEqual((error.status, error.request_id), (0, ""))

    def test_store_errors_carry_no_http_answer_unless_given_one(self):
        error: StoreError = PermanentStoreError("client_error", "AccessDenied", "no")
        self.assertEqual((error.status, error.request_id), (0, ""))


class MakeStore(unittest.TestCase):
    def setUp(self) -> None:
        self.pool = ThreadPool(0, 1, name="test")
        self.metrics = Metrics(CollectorRegistry(), process=False)

    def test_without_a_bucket_the_local_directory(self):
        root = make_workdir(self)
        store = make_store(Settings(output_dir=root, host_id="h"), Clock(), self.pool,
                           self.metrics)
        self.assertIsInstance(store, LocalStore)
        self.assertEqual(store.describe(), f"local:{root}")

    def test_with_a_bucket_s3(self):
        self.patch_environment()
        store = make_store(Settings(s3_bucket="bkt-test", host_id="h"), Clock(), self.pool,
                           self.metrics)
        self.assertIsInstance(store, S3Store)
        self.assertEqual(store.describe(),
                         "s3://bkt-test at http://s3.test (path-style)")
        self.assertIsNone(self.successResultOf(store.close()))

    def patch_environment(self) -> None:
        """A custom endpoint and a region, whatever the machine's AWS setup."""
        environ = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        environ.update(AWS_ENDPOINT_URL_S3="http://s3.test", AWS_REGION="us-east-1")
        self.patch(os, "environ", environ)


@implementer(IStreamClientEndpoint)
class RecordingEndpoint:
    """Keeps the factory it is asked to connect; the connection never comes."""

    def __init__(self) -> None:
        self.factories: list[IProtocolFactory] = []

    def connect(self, protocolFactory: IProtocolFactory) -> "Deferred[IProtocol]":
        self.factories.append(protocolFactory)
        return Deferred()


class QuietPool(unittest.TestCase):
    def test_new_connections_log_neither_start_nor_stop(self):
        logs = capture_logs(self)
        endpoint = RecordingEndpoint()
        pool = quiet_connection_pool(Clock(), persistent=False)
        pool.getConnection(("http", b"s3.test", 80), endpoint)
        [factory] = endpoint.factories
        factory.doStart()
        factory.doStop()
        self.assertEqual(logged(logs, "factory"), [])

