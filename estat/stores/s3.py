"""The S3 store: a SigV4-signed PutObject sent with treq on the reactor,
with application-level retries, for AWS S3 and S3-compatible stores.

Signing uses botocore's S3SigV4Auth and its standard credential chain
(environment, AWS_PROFILE and the shared files, container and instance
roles, web identity). Anything that may block (credential resolution and
refresh, MD5/SHA-256 of the body, the gzip check) runs on the service's
thread pool; the PUT itself is a Deferred, with no thread per upload.
botocore never sends anything and never retries: the retries are ours,
S3_APP_RETRIES extra attempts with full-jitter exponential backoff, each
attempt bounded by S3_TIMEOUT, the whole put cancellable at shutdown.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import os
import random
import re
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Mapping, Optional, cast
from urllib.parse import quote, urlsplit

import botocore.session
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from botocore.exceptions import BotoCoreError
from treq.client import HTTPClient
from twisted.internet.defer import CancelledError, Deferred, DeferredLock, succeed
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from twisted.web.client import (
    Agent,
    HTTPConnectionPool,
    PotentialDataLoss,
    ResponseDone,
)

import estat
from estat.codec import verify_gzip
from estat.config import ConfigError, Settings
from estat.metrics import Metrics
from estat.model import EncodedObject
from estat.stores.base import PermanentStoreError, RetryableStoreError, StoreError
from estat.stores.httpclient import quiet_connection_pool
from estat.stores.s3_errors import (
    classify_exception,
    classify_response,
    parse_error_body,
)

_log = Logger()

DEFAULT_REGION = "us-east-1"
BACKOFF_BASE = 1.0  # seconds; the first retry waits up to this long
BACKOFF_CAP = 20.0  # seconds; no single wait is longer
MAX_ERROR_BODY = 64 * 1024  # an S3 error document is a few hundred bytes
IDLE_CONNECTION_SECONDS = 10  # below the idle timeout of S3 and proxies

BlockingRunner = Callable[..., "Deferred[Any]"]
CredentialResolver = Callable[[], Optional[Credentials]]

_AWS_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_COMPATIBLE_BUCKET = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{1,61}[A-Za-z0-9]")
_REGION = re.compile(r"[a-z0-9][a-z0-9-]{0,40}")


# --- where objects go -------------------------------------------------------


@dataclass(frozen=True)
class S3Location:
    """Bucket, endpoint and addressing style: everything that makes a URL."""

    endpoint: str  # scheme://host[:port][/path], no trailing slash
    bucket: str
    virtual: bool  # bucket in the host name, else the first path segment

    def url_for(self, key: str) -> str:
        """The object URL. The key is percent-encoded once, as SigV4 for S3
        expects (`=` in `dt=` becomes %3D), and signed as sent."""
        quoted = quote(key, safe="/~")
        parts = urlsplit(self.endpoint)
        if self.virtual:
            return f"{parts.scheme}://{self.bucket}.{parts.netloc}{parts.path}/{quoted}"
        return f"{self.endpoint}/{self.bucket}/{quoted}"

    def describe(self) -> str:
        style = "virtual-hosted" if self.virtual else "path-style"
        return f"s3://{self.bucket} at {self.endpoint} ({style})"


def configured_endpoint(environ: Mapping[str, str]) -> str:
    """AWS_ENDPOINT_URL_S3, else AWS_ENDPOINT_URL, unless
    AWS_IGNORE_CONFIGURED_ENDPOINT_URLS is true (as the AWS SDKs do)."""
    if environ.get("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "").strip().lower() == "true":
        return ""
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        value = environ.get(name, "").strip()
        if value:
            return value.rstrip("/")
    return ""


def aws_endpoint(region: str) -> str:
    suffix = "amazonaws.com.cn" if region.startswith("cn-") else "amazonaws.com"
    return f"https://s3.{region}.{suffix}"


def resolve_region(session: Any, environ: Mapping[str, str]) -> str:
    """AWS_REGION, else botocore's region (AWS_DEFAULT_REGION, then the
    profile's `region`), else us-east-1."""
    region = environ.get("AWS_REGION", "").strip()
    if not region:
        region = (session.get_config_variable("region") or "").strip()
    return region or DEFAULT_REGION


def resolve_location(settings: Settings, environ: Mapping[str, str], region: str) -> S3Location:
    """Endpoint and addressing. `auto` is path-style for a custom endpoint
    (MinIO, Ceph RGW, moto rarely have wildcard DNS) and virtual-hosted for
    AWS, except for bucket names with dots, which break TLS host names."""
    endpoint = configured_endpoint(environ)
    custom = bool(endpoint)
    if not custom:
        endpoint = aws_endpoint(region)
    if settings.s3_addressing == "auto":
        virtual = not custom and "." not in settings.s3_bucket
    else:
        virtual = settings.s3_addressing == "virtual"
    return S3Location(endpoint=endpoint, bucket=settings.s3_bucket, virtual=virtual)


def check_s3_settings(settings: Settings, environ: Optional[Mapping[str, str]] = None,
                      session: Any = None) -> None:
    """Start-up check of the S3 settings (text and config files only: no
    network, no credential lookup). Raises ConfigError with one sentence."""
    if not settings.s3_bucket:
        return
    environ = os.environ if environ is None else environ
    endpoint = configured_endpoint(environ)
    if endpoint:
        _check_endpoint(endpoint)
    bucket = settings.s3_bucket
    pattern = _COMPATIBLE_BUCKET if endpoint else _AWS_BUCKET
    if not pattern.fullmatch(bucket) or ".." in bucket or _is_ip(bucket):
        raise ConfigError(
            f"S3_BUCKET={bucket!r} is not a valid bucket name: use 3-63 lowercase "
            "letters, digits, dots and hyphens, starting and ending with a letter "
            "or digit.")
    try:
        session = session or botocore.session.Session()
        region = resolve_region(session, environ)
    except BotoCoreError as error:  # e.g. AWS_PROFILE names no profile
        raise ConfigError(f"The AWS configuration cannot be read: {error}.") from None
    if not _REGION.fullmatch(region):
        raise ConfigError(f"AWS region {region!r} is not a region name such as eu-west-1.")
    if settings.s3_addressing == "virtual" and not endpoint and "." in bucket:
        raise ConfigError(
            f"S3_ADDRESSING=virtual cannot be used with the dotted bucket {bucket!r} "
            "on AWS (TLS host names do not match); use auto or path.")


def _check_endpoint(endpoint: str) -> None:
    problem = ""
    try:
        parts = urlsplit(endpoint)
        parts.port  # raises ValueError for a port that is not a number
    except ValueError:
        problem = "it cannot be parsed"
    else:
        if parts.scheme not in ("http", "https"):
            problem = "it must start with http:// or https://"
        elif not parts.hostname:
            problem = "it has no host name"
        elif parts.query or parts.fragment or parts.username or parts.password:
            problem = "it must not contain a query, fragment or user name"
    if problem:
        raise ConfigError(
            f"The S3 endpoint URL {endpoint!r} (AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL) "
            f"is not valid: {problem}.")


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


# --- blocking helpers, run on the thread pool -------------------------------


def content_md5(data: bytes, uncompressed_bytes: int) -> str:
    """Check that `data` is a complete gzip stream (trailer, CRC, length),
    then return its base64 MD5 for the Content-MD5 header."""
    verify_gzip(data, uncompressed_bytes)
    return base64.b64encode(hashlib.md5(data).digest()).decode("ascii")


def sign_put(credentials: Credentials, region: str, url: str,
             headers: Mapping[str, str], body: bytes) -> dict[str, str]:
    """The headers of a SigV4-signed PUT. `get_frozen_credentials` may
    refresh (an HTTP call to STS or the metadata service), hence a thread."""
    frozen = credentials.get_frozen_credentials()
    request = AWSRequest(method="PUT", url=url, headers=dict(headers), data=body)
    S3SigV4Auth(frozen, "s3", region).add_auth(request)
    return {name: value for name, value in request.headers.items()}


# --- the store --------------------------------------------------------------


class _PutState:
    """Per put: whether the caller cancelled it, so that a cancellation we
    did not ask for (a timeout firing) is told apart from a shutdown."""

    cancelled = False


class _AttemptTimedOut(Exception):
    """One attempt had no complete answer within the timeout."""


class S3Store:
    """Stores objects in one S3 bucket. `put` fires with None once S3
    answered 2xx, or fails with a StoreError after the last attempt, or
    with CancelledError when cancelled (no further attempt is made)."""

    name = "s3"

    def __init__(
        self,
        *,
        http: Any,
        location: S3Location,
        region: str,
        resolve_credentials: CredentialResolver,
        run_blocking: BlockingRunner,
        clock: IReactorTime,
        metrics: Metrics,
        retries: int = 2,
        timeout: float = 30.0,
        content_encoding: bool = False,
        host_id: str = "estat",
        random_fraction: Callable[[], float] = random.random,
        backoff_base: float = BACKOFF_BASE,
        backoff_cap: float = BACKOFF_CAP,
        connection_pool: Optional[HTTPConnectionPool] = None,
    ) -> None:
        self._http = http  # treq.HTTPClient or treq.testing.StubTreq
        self.location = location
        self.region = region
        self._resolve_credentials = resolve_credentials
        self._run_blocking = run_blocking
        self._clock = clock
        self._metrics = metrics
        self.retries = retries
        self.timeout = timeout
        self.content_encoding = content_encoding
        self.host_id = host_id
        self._random = random_fraction
        self._backoff_base = backoff_base
        self._backoff_cap = backoff_cap
        self._connection_pool = connection_pool
        self._credentials: Optional[Credentials] = None
        self._credentials_lock = DeferredLock()
        self._attempt_outcome = {
            outcome: metrics.s3_put_attempts.labels(outcome=outcome)
            for outcome in ("ok", "retryable", "permanent")
        }

    # public API

    def put(self, obj: EncodedObject) -> "Deferred[None]":
        """Upload `obj` under its key; retries overwrite the same key."""
        state = _PutState()
        inner = Deferred.fromCoroutine(self._put(obj, state))

        def cancel(_: Deferred) -> None:
            state.cancelled = True
            inner.cancel()

        outer: Deferred[None] = Deferred(cancel)
        inner.chainDeferred(outer)
        return outer

    def describe(self) -> str:
        return self.location.describe()

    def close(self) -> "Deferred[None]":
        """Close idle keep-alive connections (at shutdown, after the last
        upload), so the process exits without dangling sockets."""
        if self._connection_pool is None:
            return succeed(None)
        return self._connection_pool.closeCachedConnections()

    def backoff_delay(self, retry: int) -> float:
        """Full jitter: uniform in [0, min(cap, base * 2**retry)) seconds,
        `retry` counting from 0, so retries of many uploads spread out."""
        ceiling = min(self._backoff_cap, self._backoff_base * (2 ** retry))
        return self._random() * ceiling

    def headers_for(self, obj: EncodedObject, md5: str) -> dict[str, str]:
        """Request headers before signing: integrity, type and metadata."""
        headers = {
            "Content-MD5": md5,
            "Content-Type": "application/gzip",
            "x-amz-meta-event-count": str(obj.event_count),
            "x-amz-meta-first-receive-ms": str(obj.first_ts_ms),
            "x-amz-meta-last-receive-ms": str(obj.last_ts_ms),
            "x-amz-meta-uncompressed-bytes": str(obj.uncompressed_bytes),
            "x-amz-meta-batch-id": obj.batch_id,
            "x-amz-meta-kind": obj.kind,
            "x-amz-meta-host": self.host_id,
            "x-amz-meta-server-version": estat.__version__,
        }
        if self.content_encoding:
            headers["Content-Encoding"] = "gzip"
        return headers

    # the retry loop

    async def _put(self, obj: EncodedObject, state: _PutState) -> None:
        try:
            md5 = await self._run_blocking(content_md5, obj.data, obj.uncompressed_bytes)
        except ValueError as error:
            if state.cancelled:
                raise CancelledError() from None
            failure = PermanentStoreError("encode_error", "IncompleteGzip", str(error))
            self._count_failure(failure)
            self._log_permanent(obj, failure)
            raise failure from None
        url = self.location.url_for(obj.key)
        headers = self.headers_for(obj, md5)
        retry = 0
        while True:
            try:
                await self._attempt(obj, url, headers, state)
            except StoreError as failure:
                if state.cancelled:
                    raise CancelledError() from None
                if not failure.retryable or retry >= self.retries:
                    raise
                delay = self.backoff_delay(retry)
                retry += 1
                _log.warn(
                    "S3 PUT of {key} failed ({reason}: {s3_code}); retry {retry} of "
                    "{retries} in {delay:.2f}s", key=obj.key, reason=failure.reason,
                    s3_code=failure.code, retry=retry, retries=self.retries, delay=delay)
                await deferLater(self._clock, delay, lambda: None)
            else:
                self._metrics.s3_events_stored.inc(obj.event_count)
                self._metrics.s3_objects_stored.inc()
                self._metrics.s3_bytes_stored.inc(len(obj.data))
                return

    def _attempt(self, obj: EncodedObject, url: str, headers: dict[str, str],
                 state: _PutState) -> "Deferred[None]":
        """One signed PUT, bounded as a whole (signing, connecting, sending,
        reading the answer) by the timeout, counted and timed."""
        started = self._clock.seconds()
        d = Deferred.fromCoroutine(self._send(obj, url, headers))

        def timed_out(result: object, timeout: float) -> object:
            # Whatever cancelling the attempt failed with, it failed because
            # the time was up.
            return Failure(_AttemptTimedOut()) if isinstance(result, Failure) else result

        d.addTimeout(self.timeout, self._clock, onTimeoutCancel=timed_out)

        def failed(failure: Failure) -> Failure:
            if state.cancelled:
                return Failure(CancelledError())
            if failure.check(_AttemptTimedOut):
                error: Optional[StoreError] = RetryableStoreError(
                    "timeout", "Timeout", f"no complete answer within {self.timeout:g}s")
            else:
                error = classify_exception(failure.value)
            if error is None:
                return failure  # a bug: surface it, do not retry it
            self._metrics.s3_put_seconds.observe(self._clock.seconds() - started)
            self._count_failure(error)
            if not error.retryable:
                self._log_permanent(obj, error)
            return Failure(error)

        def succeeded(_: object) -> None:
            self._metrics.s3_put_seconds.observe(self._clock.seconds() - started)
            self._attempt_outcome["ok"].inc()

        d.addCallbacks(succeeded, failed)
        return d

    async def _send(self, obj: EncodedObject, url: str, headers: dict[str, str]) -> None:
        credentials = await self._credentials_lock.run(self._ensure_credentials)
        signed = await self._run_blocking(
            sign_put, credentials, self.region, url, headers, obj.data)
        signed["User-Agent"] = f"estat-ingest/{estat.__version__}"
        response = await self._http.put(
            url, data=obj.data, headers=signed, timeout=self.timeout,
            allow_redirects=False, unbuffered=True, reactor=self._clock)
        body = await _read_capped(response, MAX_ERROR_BODY)
        if 200 <= response.code < 300:
            return
        parsed = parse_error_body(body)
        error = classify_response(response.code, parsed, _phrase(response))
        error.status = response.code
        error.request_id = parsed.request_id
        raise error

    async def _ensure_credentials(self) -> Credentials:
        """Resolve credentials once with the chain (off the reactor); a
        refreshable result refreshes itself when signing. Not cached while
        missing, so credentials that appear later are picked up."""
        if self._credentials is None:
            credentials = await self._run_blocking(self._resolve_credentials)
            if credentials is None:
                raise PermanentStoreError(
                    "credentials", "NoCredentials",
                    "no AWS credentials found (environment, AWS_PROFILE and shared "
                    "files, container or instance role, web identity)")
            self._credentials = credentials
        return self._credentials

    # metrics and logs

    def _count_failure(self, error: StoreError) -> None:
        outcome = "retryable" if error.retryable else "permanent"
        self._attempt_outcome[outcome].inc()
        self._metrics.s3_put_failures.labels(reason=error.reason).inc()

    def _log_permanent(self, obj: EncodedObject, error: StoreError) -> None:
        _log.error(
            "S3 refused PUT of {key} to {bucket}: HTTP {status} {s3_code}: {s3_message} "
            "(reason {reason}, request id {request_id}); not retrying",
            key=obj.key, bucket=self.location.bucket, status=error.status,
            s3_code=error.code, s3_message=error.message, reason=error.reason,
            request_id=error.request_id)


def _phrase(response: Any) -> str:
    phrase = getattr(response, "phrase", b"")
    return phrase.decode("latin-1") if isinstance(phrase, bytes) else str(phrase)


class _CappedBody(Protocol):
    """Reads a response body keeping at most `limit` bytes (the rest is read
    and dropped, so the connection can go back to the pool). Cancelling
    `finished` stops the transport: a hung body does not keep a socket."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.chunks: list[bytes] = []
        self.size = 0
        self.finished: Deferred[bytes] = Deferred(self._cancel)

    def _cancel(self, _: Deferred) -> None:
        if self.transport is not None:
            # A response body's transport is a producer (Twisted's
            # TransportProxyProducer), not a full ITransport.
            cast(IPushProducer, self.transport).stopProducing()

    def dataReceived(self, data: bytes) -> None:
        if self.size < self.limit:
            kept = data[: self.limit - self.size]
            self.chunks.append(kept)
            self.size += len(kept)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.finished.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.finished.callback(b"".join(self.chunks))
        else:
            self.finished.errback(reason)


def _read_capped(response: Any, limit: int) -> "Deferred[bytes]":
    body = _CappedBody(limit)
    response.deliverBody(body)
    return body.finished


# --- assembly ---------------------------------------------------------------


def make_s3_store(settings: Settings, reactor: Any, pool: ThreadPool, metrics: Metrics,
                  environ: Optional[Mapping[str, str]] = None,
                  session: Any = None) -> S3Store:
    """The S3 store of a server: botocore session for region and credentials,
    a persistent HTTP connection pool and treq client of its own, blocking
    work on `pool`."""
    environ = os.environ if environ is None else environ
    session = session or botocore.session.Session()
    region = resolve_region(session, environ)
    location = resolve_location(settings, environ, region)
    connection_pool = quiet_connection_pool(reactor, persistent=True)
    # One connection per upload in flight, plus the dead-letter re-upload.
    connection_pool.maxPersistentPerHost = settings.upload_concurrency + 1
    connection_pool.cachedConnectionTimeout = IDLE_CONNECTION_SECONDS
    connection_pool.retryAutomatically = False  # retries are ours alone
    agent = Agent(reactor, pool=connection_pool, connectTimeout=settings.s3_timeout)
    store = S3Store(
        http=HTTPClient(agent),
        location=location,
        region=region,
        resolve_credentials=session.get_credentials,
        run_blocking=partial(deferToThreadPool, reactor, pool),
        clock=reactor,
        metrics=metrics,
        retries=settings.s3_app_retries,
        timeout=settings.s3_timeout,
        content_encoding=settings.s3_content_encoding,
        host_id=settings.host_id,
        connection_pool=connection_pool,
    )
    _log.info("S3 store: {location}, region {region}, {retries} retries, "
              "timeout {timeout}s", location=location.describe(), region=region,
              retries=settings.s3_app_retries, timeout=settings.s3_timeout)
    return store
