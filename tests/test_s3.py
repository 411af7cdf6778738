"""The S3 store: classification and addressing as pure functions; retries,
backoff, timeouts and cancellation against a fake S3 resource in memory
(StubTreq, task.Clock); signing, headers and errors against a real moto S3
server over loopback TCP."""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import os
from typing import Any, Callable, Optional

import botocore.session
from botocore.credentials import Credentials
from botocore.exceptions import NoCredentialsError
from prometheus_client import CollectorRegistry
from treq.testing import StubTreq
from twisted.internet import reactor as global_reactor
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    fail,
    inlineCallbacks,
    maybeDeferred,
)
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.python.threadpool import ThreadPool
from twisted.trial import unittest
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

import estat
from estat.config import ConfigError, Settings
from estat.metrics import Metrics
from estat.model import EncodedObject
from estat.stores.base import PermanentStoreError, RetryableStoreError
from estat.stores.s3 import (
    S3Location,
    S3Store,
    check_s3_settings,
    configured_endpoint,
    content_md5,
    make_s3_store,
    resolve_location,
    resolve_region,
    sign_put,
)
from estat.stores.s3_errors import (
    S3ErrorBody,
    classify_exception,
    classify_response,
    parse_error_body,
)
from estat.tap import validate_environment
from tests.fakes import TS_MS, capture_logs, make_object
from tests.support import MotoServer, make_workdir

def sample(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def error_xml(code: str, message: str = "something went wrong") -> bytes:
    return (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
            f"<Message>{message}</Message><RequestId>REQ123</RequestId>"
            f"<StringToSign>secret-ish</StringToSign></Error>").encode()


HANG = "hang"
HANG_BODY = "hang-body"  # headers and part of the body, then nothing


class FakeS3(Resource):
    """An S3 endpoint in memory: answers each PUT with the next scripted
    answer (the last one repeats): (status, S3 code or None, body or None)
    or HANG, a request that is never answered."""

    isLeaf = True

    def __init__(self, clock: Clock, answers: list[Any]) -> None:
        super().__init__()
        self.clock = clock
        self.answers = list(answers)
        self.requests: list[dict[str, Any]] = []
        self.hanging: list[Any] = []
        self.lost: list[Any] = []

    def render(self, request):  # type: ignore[no-untyped-def]
        headers = {name.decode().lower(): values[0].decode()
                   for name, values in request.requestHeaders.getAllRawHeaders()}
        self.requests.append({
            "time": self.clock.seconds(), "method": request.method.decode(),
            "uri": request.uri.decode(), "headers": headers, "body": request.content.read(),
        })
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if answer in (HANG, HANG_BODY):
            self.hanging.append(request)
            request.notifyFinish().addErrback(self.lost.append)
            if answer == HANG_BODY:
                request.setResponseCode(500)
                request.setHeader(b"content-length", b"1000")
                request.write(b"<Error><Code>Internal")
            return NOT_DONE_YET
        status, code, body = answer
        request.setResponseCode(status)
        if code is not None:
            request.setHeader(b"content-type", b"application/xml")
            return error_xml(code)
        return body or b""


class Recorder:
    """A synchronous stand-in for deferToThreadPool that records what would
    have run on the pool."""

    def __init__(self) -> None:
        self.calls: list[Callable[..., Any]] = []

    def __call__(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred:
        self.calls.append(function)
        return maybeDeferred(function, *args, **kwargs)


LOCATION = S3Location(endpoint="http://s3.test", bucket="bkt-test", virtual=False)


class FakeS3Case(unittest.TestCase):
    """Builds an S3Store over StubTreq and a Clock."""

    def make_store(self, answers: list[Any], *, retries: int = 2, timeout: float = 30.0,
                   random_fraction: Callable[[], float] = lambda: 0.5,
                   resolve: Optional[Callable[[], Any]] = None, http: Any = None,
                   content_encoding: bool = False) -> S3Store:
        self.clock = Clock()
        self.s3 = FakeS3(self.clock, answers)
        self.stub = StubTreq(self.s3)
        self.metrics = Metrics(CollectorRegistry(), process=False)
        self.runner = Recorder()
        self.resolved = 0

        def default_resolve() -> Credentials:
            self.resolved += 1
            return Credentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG")

        self.store = S3Store(
            http=http or self.stub, location=LOCATION, region="us-east-1",
            resolve_credentials=resolve or default_resolve, run_blocking=self.runner,
            clock=self.clock, metrics=self.metrics, retries=retries, timeout=timeout,
            content_encoding=content_encoding, host_id="host-1",
            random_fraction=random_fraction)
        return self.store

    def attempts(self, outcome: str) -> float:
        return sample(self.metrics, "estat_s3_put_attempts_total", outcome=outcome)

    def failures(self, reason: str) -> float:
        return sample(self.metrics, "estat_s3_put_failures_total", reason=reason)


class RequestShape(FakeS3Case):
    def test_put_sends_signed_request_with_integrity_type_and_metadata(self):
        store = self.make_store([(200, None, None)])
        obj = make_object(events=3)
        self.assertIsNone(self.successResultOf(store.put(obj)))
        [request] = self.s3.requests
        headers = request["headers"]
        self.assertEqual(request["method"], "PUT")
        self.assertEqual(request["uri"],
                         "/bkt-test/raw/dt%3D2023-11-14/hour%3D22/"
                         "host-1-01HF0000000000000000000000.jsonl.gz")
        self.assertEqual(request["body"], obj.data)
        self.assertEqual(headers["content-md5"],
                         base64.b64encode(hashlib.md5(obj.data).digest()).decode())
        self.assertEqual(headers["x-amz-content-sha256"], hashlib.sha256(obj.data).hexdigest())
        self.assertEqual(headers["content-type"], "application/gzip")
        self.assertNotIn("content-encoding", headers)
        self.assertEqual(headers["content-length"], str(len(obj.data)))
        self.assertTrue(headers["authorization"].startswith(
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/"))
        self.assertIn("/us-east-1/s3/aws4_request", headers["authorization"])
        for signed in ("content-md5", "content-type", "host", "x-amz-meta-event-count"):
            self.assertIn(signed, headers["authorization"].split("SignedHeaders=")[1])
        self.assertEqual(
            {name: value for name, value in headers.items() if name.startswith("x-amz-meta-")},
            {"x-amz-meta-event-count": "3",
             "x-amz-meta-first-receive-ms": str(TS_MS),
             "x-amz-meta-last-receive-ms": str(TS_MS + 2),
             "x-amz-meta-uncompressed-bytes": str(obj.uncompressed_bytes),
             "x-amz-meta-batch-id": obj.batch_id,
             "x-amz-meta-kind": "events",
             "x-amz-meta-host": "host-1",
             "x-amz-meta-server-version": estat.__version__})
        self.assertEqual(self.attempts("ok"), 1)
        self.assertEqual(sample(self.metrics, "estat_s3_events_stored_total"), 3)
        self.assertEqual(sample(self.metrics, "estat_s3_objects_stored_total"), 1)
        self.assertEqual(sample(self.metrics, "estat_s3_bytes_stored_total"), len(obj.data))
        self.assertEqual(sample(self.metrics, "estat_s3_put_seconds_count"), 1)

    def test_content_encoding_only_when_configured(self):
        store = self.make_store([(200, None, None)], content_encoding=True)
        self.successResultOf(store.put(make_object()))
        self.assertEqual(self.s3.requests[0]["headers"]["content-encoding"], "gzip")

    def test_blocking_work_goes_through_the_pool(self):
        store = self.make_store([(200, None, None)])
        self.successResultOf(store.put(make_object()))
        self.successResultOf(store.put(make_object()))
        names = [function.__name__ for function in self.runner.calls]
        self.assertEqual(names, ["content_md5", "default_resolve", "sign_put",
                                 "content_md5", "sign_put"])
        self.assertEqual(self.resolved, 1, "credentials are resolved once and kept")

    def test_incomplete_gzip_is_refused_before_upload(self):
        store = self.make_store([(200, None, None)])
        obj = make_object()
        truncated = EncodedObject(**{**obj.__dict__, "data": obj.data[:-4]})
        error = self.failureResultOf(store.put(truncated), PermanentStoreError).value
        self.assertEqual((error.reason, error.code), ("encode_error", "IncompleteGzip"))
        self.assertEqual(self.s3.requests, [])
        self.assertEqual(self.failures("encode_error"), 1)

    def test_no_credentials_is_permanent_and_sends_nothing(self):
        for resolve in (lambda: None, self._raise_no_credentials):
            store = self.make_store([(200, None, None)], resolve=resolve)
            error = self.failureResultOf(store.put(make_object()), PermanentStoreError).value
            self.assertEqual((error.reason, error.code), ("credentials", "NoCredentials"))
            self.assertEqual(self.s3.requests, [])
            self.assertEqual((self.attempts("permanent"), self.failures("credentials")), (1, 1))
            self.assertEqual(self.clock.getDelayedCalls(), [])

    @staticmethod
    def _raise_no_credentials() -> None:
        raise NoCredentialsError()


class Retries(FakeS3Case):
    def test_slowdown_and_internal_error_are_retried_with_backoff(self):
        store = self.make_store([(503, "SlowDown", None), (500, "InternalError", None),
                                 (200, None, None)], random_fraction=lambda: 0.5)
        d = store.put(make_object())
        self.assertNoResult(d)
        self.assertEqual(len(self.s3.requests), 1)
        self.clock.advance(0.49)  # first wait: 0.5 * min(20, 1 * 2**0)
        self.assertEqual(len(self.s3.requests), 1)
        self.clock.advance(0.01)
        self.assertEqual(len(self.s3.requests), 2)
        self.clock.advance(0.99)  # second wait: 0.5 * 2
        self.assertNoResult(d)
        self.clock.advance(0.01)
        self.successResultOf(d)
        self.assertEqual([r["time"] for r in self.s3.requests], [0.0, 0.5, 1.5])
        self.assertEqual({r["uri"] for r in self.s3.requests}, {self.s3.requests[0]["uri"]},
                         "every retry overwrites the same key")
        self.assertEqual((self.attempts("retryable"), self.attempts("ok")), (2, 1))
        self.assertEqual((self.failures("throttled"), self.failures("server_error")), (1, 1))
        self.assertEqual(sample(self.metrics, "estat_s3_put_seconds_count"), 3)

    def test_retries_stop_after_s3_app_retries_extra_attempts(self):
        for retries in (0, 1, 3):
            store = self.make_store([(503, "SlowDown", None)], retries=retries,
                                    random_fraction=lambda: 1.0)
            d = store.put(make_object())
            self.clock.pump([1.0, 2.0, 4.0, 8.0, 16.0])
            error = self.failureResultOf(d, RetryableStoreError).value
            self.assertEqual((error.reason, error.code), ("throttled", "SlowDown"))
            self.assertEqual(len(self.s3.requests), 1 + retries)
            self.assertEqual(self.attempts("retryable"), 1 + retries)
            self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_backoff_is_full_jitter_exponential_and_capped(self):
        store = self.make_store([(200, None, None)], random_fraction=lambda: 1.0)
        self.assertEqual([store.backoff_delay(n) for n in range(7)],
                         [1.0, 2.0, 4.0, 8.0, 16.0, 20.0, 20.0])
        fractions = iter([0.0, 0.25])
        store = self.make_store([(200, None, None)], random_fraction=lambda: next(fractions))
        self.assertEqual([store.backoff_delay(3), store.backoff_delay(3)], [0.0, 2.0])

    def test_every_retryable_answer_is_retried(self):
        cases = [((503, "SlowDown"), "throttled"), ((429, None), "throttled"),
                 ((400, "RequestTimeout"), "timeout"), ((500, "InternalError"), "server_error"),
                 ((502, None), "server_error"), ((504, None), "server_error"),
                 ((408, None), "timeout")]
        for (status, code), reason in cases:
            store = self.make_store([(status, code, b"<html>bad gateway</html>"),
                                     (200, None, None)], random_fraction=lambda: 0.0)
            d = store.put(make_object())
            self.clock.advance(0)
            self.successResultOf(d)
            self.assertEqual(len(self.s3.requests), 2, (status, code))
            self.assertEqual(self.failures(reason), 1, (status, code))

    def test_connection_errors_are_retried(self):
        class Refusing:
            calls = 0

            def put(self, url: str, **kwargs: Any) -> Deferred:
                Refusing.calls += 1
                return fail(ConnectionRefusedError("nobody listens"))

        store = self.make_store([], retries=1, http=Refusing(), random_fraction=lambda: 0.0)
        d = store.put(make_object())
        self.clock.advance(0)
        error = self.failureResultOf(d, RetryableStoreError).value
        self.assertEqual((error.reason, error.code), ("connection", "ConnectionRefusedError"))
        self.assertEqual(Refusing.calls, 2)
        self.assertEqual(self.failures("connection"), 2)


class PermanentErrors(FakeS3Case):
    def assert_permanent(self, status: int, code: Optional[str], reason: str) -> None:
        logs = capture_logs(self)
        store = self.make_store([(status, code, None)], retries=2)
        error = self.failureResultOf(store.put(make_object()), PermanentStoreError).value
        self.assertEqual(error.reason, reason)
        self.assertEqual(error.code, code or f"HTTP{status}")
        self.assertEqual(len(self.s3.requests), 1, "a permanent error is not retried")
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual((self.attempts("permanent"), self.attempts("retryable")), (1, 0))
        self.assertEqual(self.failures(reason), 1)
        [event] = [e for e in logs if e.get("s3_code") == error.code]
        self.assertEqual((event["status"], event["request_id"]),
                         (status, "REQ123" if code else ""))
        if code:
            self.assertEqual(event["s3_message"], "something went wrong")
        text = repr(event)
        for secret in ("wJalrXUtnFEMI", "secret-ish", "Signature="):
            self.assertNotIn(secret, text)

    def test_access_denied(self):
        self.assert_permanent(403, "AccessDenied", "credentials")

    def test_signature_does_not_match(self):
        self.assert_permanent(403, "SignatureDoesNotMatch", "credentials")

    def test_invalid_access_key(self):
        self.assert_permanent(403, "InvalidAccessKeyId", "credentials")

    def test_no_such_bucket(self):
        self.assert_permanent(404, "NoSuchBucket", "client_error")

    def test_other_client_errors(self):
        self.assert_permanent(400, "InvalidArgument", "client_error")

    def test_redirect_is_not_followed(self):
        self.assert_permanent(301, "PermanentRedirect", "client_error")

    def test_forbidden_without_a_body(self):
        self.assert_permanent(403, None, "credentials")


class TimeoutsAndCancellation(FakeS3Case):
    def test_an_attempt_that_never_completes_times_out(self):
        store = self.make_store([HANG], retries=0, timeout=5.0)
        d = store.put(make_object())
        self.clock.advance(4.9)
        self.assertNoResult(d)
        self.clock.advance(0.1)
        error = self.failureResultOf(d, RetryableStoreError).value
        self.assertEqual(error.reason, "timeout")
        self.assertEqual(self.failures("timeout"), 1)
        self.stub.flush()
        self.assertEqual(len(self.s3.lost), 1, "the hung request is aborted")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_the_timeout_also_bounds_reading_the_answer(self):
        store = self.make_store([HANG_BODY], retries=0, timeout=5.0)
        d = store.put(make_object())
        self.stub.flush()
        self.clock.advance(4.9)
        self.assertNoResult(d)
        self.clock.advance(0.1)
        error = self.failureResultOf(d, RetryableStoreError).value
        self.assertEqual(error.reason, "timeout")
        self.stub.flush()
        self.assertEqual(len(self.s3.lost), 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_a_timed_out_attempt_is_retried(self):
        store = self.make_store([HANG, (200, None, None)], retries=1, timeout=5.0,
                                random_fraction=lambda: 0.5)
        d = store.put(make_object())
        self.clock.advance(5.0)
        self.assertNoResult(d)
        self.clock.advance(0.5)
        self.successResultOf(d)
        self.assertEqual([r["time"] for r in self.s3.requests], [0.0, 5.5])
        self.assertEqual((self.failures("timeout"), self.attempts("ok")), (1, 1))

    def test_cancel_during_backoff(self):
        store = self.make_store([(503, "SlowDown", None), (200, None, None)])
        d = store.put(make_object())
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)  # the backoff wait
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(100)
        self.assertEqual(len(self.s3.requests), 1, "no attempt after cancellation")

    def test_cancel_during_request(self):
        store = self.make_store([HANG, (200, None, None)])
        d = store.put(make_object())
        self.assertEqual(len(self.s3.requests), 1)
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.stub.flush()
        self.assertEqual(len(self.s3.lost), 1, "the request in flight is aborted")
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(100)
        self.assertEqual(len(self.s3.requests), 1)
        self.assertEqual(self.attempts("retryable") + self.attempts("permanent"), 0,
                         "a shutdown is not an S3 failure")

    def test_cancel_while_work_is_on_the_pool(self):
        store = self.make_store([(200, None, None)])
        pending: Deferred = Deferred()
        store._run_blocking = lambda function, *args: pending
        d = store.put(make_object())
        d.cancel()
        self.failureResultOf(d, CancelledError)
        pending.callback("late result is ignored")
        self.assertEqual(self.s3.requests, [])


class Classification(unittest.TestCase):
    def test_parse_error_body(self):
        self.assertEqual(parse_error_body(error_xml("SlowDown", "Please reduce")),
                         S3ErrorBody("SlowDown", "Please reduce", "REQ123"))
        namespaced = (b'<Error xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
                      b"<Code>NoSuchBucket</Code><Message>gone</Message></Error>")
        self.assertEqual(parse_error_body(namespaced).code, "NoSuchBucket")
        self.assertEqual(parse_error_body(b"<html>502</html>"), S3ErrorBody())
        self.assertEqual(parse_error_body(b"not xml at all"), S3ErrorBody())
        self.assertEqual(parse_error_body(b""), S3ErrorBody())

    def test_code_wins_over_status_and_message_text_is_ignored(self):
        # A message that reads like throttling does not make a 403 retryable.
        error = classify_response(403, S3ErrorBody("AccessDenied", "SlowDown, retry later"))
        self.assertFalse(error.retryable)
        self.assertEqual(classify_response(400, S3ErrorBody("RequestTimeout")).reason, "timeout")
        self.assertTrue(classify_response(400, S3ErrorBody("BadDigest")).retryable)
        self.assertEqual(classify_response(403, S3ErrorBody("RequestTimeTooSkewed")).reason,
                         "client_error")
        self.assertFalse(classify_response(409, S3ErrorBody("BucketAlreadyExists")).retryable)

    def test_exceptions_by_type(self):
        self.assertEqual(classify_exception(NoCredentialsError()).reason, "credentials")
        self.assertFalse(classify_exception(NoCredentialsError()).retryable)
        self.assertEqual(classify_exception(CancelledError()).reason, "timeout")
        self.assertEqual(classify_exception(ConnectionRefusedError()).reason, "connection")
        self.assertIsNone(classify_exception(KeyError("a bug")))


class Addressing(unittest.TestCase):
    class Session:
        def __init__(self, region: Optional[str]) -> None:
            self.region = region

        def get_config_variable(self, name: str) -> Optional[str]:
            return self.region if name == "region" else None

    def test_region(self):
        self.assertEqual(resolve_region(self.Session("eu-west-1"), {}), "eu-west-1")
        self.assertEqual(resolve_region(self.Session("eu-west-1"), {"AWS_REGION": "us-west-2"}),
                         "us-west-2")
        self.assertEqual(resolve_region(self.Session(None), {}), "us-east-1")

    def test_endpoint_variables(self):
        both = {"AWS_ENDPOINT_URL": "http://all:1", "AWS_ENDPOINT_URL_S3": "http://s3:2/"}
        self.assertEqual(configured_endpoint(both), "http://s3:2")
        self.assertEqual(configured_endpoint({"AWS_ENDPOINT_URL": "http://all:1"}),
                         "http://all:1")
        self.assertEqual(configured_endpoint({**both, "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS":
                                              "true"}), "")

    def test_aws_is_virtual_hosted_and_custom_endpoints_path_style(self):
        key = "raw/dt=2024-01-01/hour=00/h-X.jsonl.gz"
        aws = resolve_location(Settings(s3_bucket="events"), {}, "eu-west-1")
        self.assertEqual(aws.url_for(key), "https://events.s3.eu-west-1.amazonaws.com/"
                                           "raw/dt%3D2024-01-01/hour%3D00/h-X.jsonl.gz")
        dotted = resolve_location(Settings(s3_bucket="my.events"), {}, "eu-west-1")
        self.assertEqual(dotted.url_for("k"), "https://s3.eu-west-1.amazonaws.com/my.events/k")
        minio = resolve_location(Settings(s3_bucket="events"),
                                 {"AWS_ENDPOINT_URL_S3": "http://minio:9000"}, "us-east-1")
        self.assertEqual(minio.url_for("k"), "http://minio:9000/events/k")
        forced = resolve_location(Settings(s3_bucket="events", s3_addressing="virtual"),
                                  {"AWS_ENDPOINT_URL_S3": "https://rgw.example:8443"}, "x")
        self.assertEqual(forced.url_for("k"), "https://events.rgw.example:8443/k")
        path = resolve_location(Settings(s3_bucket="events", s3_addressing="path"), {},
                                "cn-north-1")
        self.assertEqual(path.url_for("k"), "https://s3.cn-north-1.amazonaws.com.cn/events/k")


class StartupChecks(unittest.TestCase):
    session = Addressing.Session("eu-west-1")

    def check(self, bucket: str, environ: dict[str, str], **settings: Any) -> None:
        check_s3_settings(Settings(s3_bucket=bucket, **settings), environ, self.session)

    def test_valid_settings_pass(self):
        self.check("events-1", {})
        self.check("legacy_Bucket", {"AWS_ENDPOINT_URL_S3": "https://rgw.local:7480"})
        check_s3_settings(Settings(s3_bucket=""), {})

    def test_bad_values_are_one_sentence(self):
        bad = [("events", {"AWS_ENDPOINT_URL_S3": "ftp://host"}, {}, "http:// or https://"),
               ("events", {"AWS_ENDPOINT_URL": "http://host:port"}, {}, "cannot be parsed"),
               ("events", {"AWS_ENDPOINT_URL_S3": "http:///path"}, {}, "no host name"),
               ("events", {"AWS_ENDPOINT_URL_S3": "http://h/?x=1"}, {}, "query"),
               ("Events_1", {}, {}, "not a valid bucket name"),
               ("ab", {}, {}, "not a valid bucket name"),
               ("a..b", {}, {}, "not a valid bucket name"),
               ("192.168.1.1", {}, {}, "not a valid bucket name"),
               ("my.events", {}, {"s3_addressing": "virtual"}, "dotted bucket"),
               ("events", {"AWS_REGION": "EU West"}, {}, "not a region name")]
        for bucket, environ, settings, expected in bad:
            with self.assertRaises(ConfigError) as raised:
                self.check(bucket, environ, **settings)
            message = str(raised.exception)
            self.assertIn(expected, message)
            self.assertTrue(message.endswith("."), message)
            self.assertNotIn("\n", message)

    def test_unknown_profile(self):
        session = botocore.session.Session(profile="estat-no-such-profile")
        with self.assertRaises(ConfigError) as raised:
            check_s3_settings(Settings(s3_bucket="events"), {}, session)
        self.assertIn("estat-no-such-profile", str(raised.exception))

    def test_validate_environment_runs_the_s3_check(self):
        workdir = make_workdir(self)
        with self.assertRaises(ConfigError):
            validate_environment(Settings(s3_bucket="x", dlq_dir=os.path.join(workdir, "dlq")))
        validate_environment(Settings(s3_bucket="events-ok",
                                      dlq_dir=os.path.join(workdir, "dlq"),
                                      output_dir=os.path.join(workdir, "unused")))
        self.assertFalse(os.path.exists(os.path.join(workdir, "unused")),
                         "with S3 the output directory is not created")


class AuthMotoServer(MotoServer):
    """moto with authentication enforced after the first `free` actions,
    which the test spends creating an IAM user and its access key."""

    free_actions = 3

    def __init__(self, workdir: str) -> None:
        super().__init__(workdir, env={"INITIAL_NO_AUTH_ACTION_COUNT": str(self.free_actions)})

    def client_for(self, service: str, key: str, secret: str) -> Any:
        from botocore.config import Config

        return botocore.session.get_session().create_client(
            service, region_name="us-east-1", endpoint_url=self.endpoint,
            aws_access_key_id=key, aws_secret_access_key=secret,
            config=Config(retries={"max_attempts": 0}))


class AgainstMoto(unittest.TestCase):
    """A real moto S3 server over TCP that checks every signature: only the
    IAM user created here may write, with its own key."""

    timeout = 60
    bucket = "estat-test-bucket"

    @inlineCallbacks
    def setUp(self):  # type: ignore[no-untyped-def]
        self.workdir = make_workdir(self)
        self.moto = AuthMotoServer(self.workdir)
        yield self.moto.start()
        self.addCleanup(self.moto.stop)
        iam = self.moto.client_for("iam", "bootstrap", "bootstrap")
        iam.create_user(UserName="estat")
        key = iam.create_access_key(UserName="estat")["AccessKey"]
        iam.put_user_policy(UserName="estat", PolicyName="all", PolicyDocument=json.dumps({
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
        self.key, self.secret = key["AccessKeyId"], key["SecretAccessKey"]
        self.reader = self.moto.client_for("s3", self.key, self.secret)
        self.reader.create_bucket(Bucket=self.bucket)
        self.pool = ThreadPool(minthreads=0, maxthreads=2, name="test-s3")
        self.pool.start()
        self.addCleanup(self.pool.stop)

    def make(self, key: str, secret: str, bucket: Optional[str] = None,
             **settings: Any) -> tuple[S3Store, Metrics]:
        session = botocore.session.Session()
        session.set_credentials(key, secret)
        metrics = Metrics(CollectorRegistry(), process=False)
        store = make_s3_store(
            Settings(s3_bucket=bucket or self.bucket, host_id="host-1", **settings),
            global_reactor, self.pool, metrics,
            environ={"AWS_ENDPOINT_URL_S3": self.moto.endpoint, "AWS_REGION": "us-east-1"},
            session=session)
        self.addCleanup(store.close)
        return store, metrics

    @inlineCallbacks
    def test_object_lands_with_key_body_metadata_and_headers(self):
        store, metrics = self.make(self.key, self.secret)
        self.assertFalse(store.location.virtual)
        obj = make_object(events=5)
        yield store.put(obj)
        got = self.reader.get_object(Bucket=self.bucket, Key=obj.key)
        body = got["Body"].read()
        self.assertEqual(body, obj.data)
        self.assertEqual(gzip.decompress(body).count(b"\n"), 5)
        self.assertEqual(got["ContentType"], "application/gzip")
        self.assertNotIn("ContentEncoding", got)
        self.assertEqual(got["ETag"].strip('"'), hashlib.md5(obj.data).hexdigest())
        self.assertEqual(got["Metadata"], {
            "event-count": "5", "first-receive-ms": str(TS_MS),
            "last-receive-ms": str(TS_MS + 4),
            "uncompressed-bytes": str(obj.uncompressed_bytes), "batch-id": obj.batch_id,
            "kind": "events", "host": "host-1", "server-version": estat.__version__})
        self.assertEqual(sample(metrics, "estat_s3_put_attempts_total", outcome="ok"), 1)
        self.assertEqual(sample(metrics, "estat_s3_events_stored_total"), 5)

    @inlineCallbacks
    def test_a_second_put_of_the_same_key_overwrites(self):
        store, _ = self.make(self.key, self.secret, s3_content_encoding=True)
        obj = make_object(events=2)
        yield store.put(obj)
        yield store.put(obj)
        listing = self.reader.list_objects_v2(Bucket=self.bucket)
        self.assertEqual([item["Key"] for item in listing["Contents"]], [obj.key])
        got = self.reader.head_object(Bucket=self.bucket, Key=obj.key)
        self.assertEqual(got["ContentEncoding"], "gzip")

    @inlineCallbacks
    def test_wrong_secret_is_a_permanent_credentials_error(self):
        store, metrics = self.make(self.key, "not-the-secret")
        error = yield self.assertFailure(store.put(make_object()), PermanentStoreError)
        self.assertEqual((error.reason, error.code), ("credentials", "SignatureDoesNotMatch"))
        self.assertEqual(sample(metrics, "estat_s3_put_attempts_total", outcome="permanent"), 1)
        self.assertEqual(sample(metrics, "estat_s3_put_attempts_total", outcome="retryable"), 0)

    @inlineCallbacks
    def test_unknown_access_key_is_a_permanent_credentials_error(self):
        store, _ = self.make("AKIAESTATUNKNOWN0000", "whatever")
        error = yield self.assertFailure(store.put(make_object()), PermanentStoreError)
        self.assertEqual((error.reason, error.code), ("credentials", "InvalidAccessKeyId"))

    @inlineCallbacks
    def test_no_such_bucket_is_permanent_and_not_retried(self):
        store, metrics = self.make(self.key, self.secret, bucket="estat-missing-bucket",
                                   s3_app_retries=2)
        error = yield self.assertFailure(store.put(make_object()), PermanentStoreError)
        self.assertEqual((error.reason, error.code), ("client_error", "NoSuchBucket"))
        self.assertEqual(sample(metrics, "estat_s3_put_attempts_total", outcome="permanent"), 1)
        self.assertEqual(sample(metrics, "estat_s3_put_failures_total", reason="client_error"),
                         1)


class Helpers(unittest.TestCase):
    def test_content_md5_checks_the_gzip_stream(self):
        obj = make_object()
        self.assertEqual(content_md5(obj.data, obj.uncompressed_bytes),
                         base64.b64encode(hashlib.md5(obj.data).digest()).decode())
        with self.assertRaises(ValueError):
            content_md5(obj.data[:-1], obj.uncompressed_bytes)
        with self.assertRaises(ValueError):
            content_md5(obj.data, obj.uncompressed_bytes + 1)

    def test_sign_put_adds_a_session_token(self):
        credentials = Credentials("AKID", "secret", token="session-token")
        headers = sign_put(credentials, "eu-west-1", "https://b.s3.eu-west-1.amazonaws.com/k",
                           {"Content-MD5": "x"}, b"body")
        self.assertEqual(headers["X-Amz-Security-Token"], "session-token")
        self.assertIn("/eu-west-1/s3/aws4_request", headers["Authorization"])
