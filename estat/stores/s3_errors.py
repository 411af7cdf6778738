"""How a failed S3 PUT attempt is classified: retryable or permanent, and
with which low-cardinality `reason` (a label of estat_s3_put_failures_total).

Decided by exception type, HTTP status and the S3 error `Code` element of
the XML error body, never by message text, so that a reworded message or an
S3-compatible store with other wording classifies the same way.
"""

from __future__ import annotations

import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from typing import Optional

from botocore.exceptions import (
    BotoCoreError,
    ConfigNotFound,
    InvalidConfigError,
    NoCredentialsError,
    PartialCredentialsError,
    ProfileNotFound,
    UnknownCredentialError,
)
from twisted.internet import error as net_error
from twisted.internet.defer import CancelledError
from twisted.internet.defer import TimeoutError as DeferredTimeoutError
from twisted.python.failure import Failure
from twisted.web.client import (
    RequestNotSent,
    RequestTransmissionFailed,
    ResponseFailed,
)

from estat.stores.base import PermanentStoreError, RetryableStoreError, StoreError

# Error codes S3 documents as worth retrying, whatever the status says.
RETRYABLE_CODES = {
    "RequestTimeout": "timeout",  # 400: the body did not arrive in time
    "SlowDown": "throttled",  # 503
    "Throttling": "throttled",
    "ThrottlingException": "throttled",
    "RequestLimitExceeded": "throttled",
    "TooManyRequests": "throttled",
    "InternalError": "server_error",  # 500
    "ServiceUnavailable": "server_error",  # 503
    "OperationAborted": "server_error",  # 409: a conflicting operation ran
    # 400: the body S3 received does not match our Content-MD5, so it was
    # damaged on the way; sending it again is the fix.
    "BadDigest": "connection",
}

# Codes that mean "who you are or what you may do is wrong".
CREDENTIAL_CODES = frozenset({
    "AccessDenied",
    "AccountProblem",
    "AllAccessDisabled",
    "ExpiredToken",
    "InvalidAccessKeyId",
    "InvalidToken",
    "SignatureDoesNotMatch",
    "TokenRefreshRequired",
})

# Credential-chain failures that will not pass by themselves.
_MISSING_CREDENTIALS = (
    NoCredentialsError,
    PartialCredentialsError,
    ProfileNotFound,
    ConfigNotFound,
    InvalidConfigError,
    UnknownCredentialError,
)

_TIMEOUTS = (
    DeferredTimeoutError,
    net_error.TimeoutError,
    net_error.TCPTimedOutError,
    CancelledError,
    net_error.ConnectingCancelledError,
)

_CONNECTION_ERRORS = (
    net_error.ConnectError,
    net_error.DNSLookupError,
    net_error.ConnectionClosed,
    ResponseFailed,
    RequestTransmissionFailed,
    RequestNotSent,
    OSError,
)

# Longest S3 error message kept for logs and the dead-letter meta.
_MAX_MESSAGE = 300


@dataclass(frozen=True)
class S3ErrorBody:
    """The fields of an S3 XML error document that we keep. Other fields
    (StringToSign, CanonicalRequest...) are never logged."""

    code: str = ""
    message: str = ""
    request_id: str = ""


def parse_error_body(body: bytes) -> S3ErrorBody:
    """Read `<Error><Code/><Message/><RequestId/></Error>`, tolerating XML
    namespaces (some S3-compatible stores add one) and non-XML bodies."""
    try:
        root = ElementTree.fromstring(body)
    except (ElementTree.ParseError, ValueError):
        return S3ErrorBody()
    fields: dict[str, str] = {}
    for child in root:
        tag = child.tag.rsplit("}", 1)[-1]
        if tag in ("Code", "Message", "RequestId") and tag not in fields:
            fields[tag] = (child.text or "").strip()
    return S3ErrorBody(
        code=fields.get("Code", ""),
        message=fields.get("Message", "")[:_MAX_MESSAGE],
        request_id=fields.get("RequestId", ""),
    )


def classify_response(status: int, error: S3ErrorBody, phrase: str = "") -> StoreError:
    """The StoreError for a non-2xx answer: the S3 code decides when it is
    known, else the status (408/429/5xx retryable, 401/403 credentials,
    any other status a permanent client error)."""
    code = error.code or f"HTTP{status}"
    message = error.message or phrase or f"HTTP status {status}"
    if error.code in RETRYABLE_CODES:
        return RetryableStoreError(RETRYABLE_CODES[error.code], code, message)
    if error.code in CREDENTIAL_CODES:
        return PermanentStoreError("credentials", code, message)
    if status == 408:
        return RetryableStoreError("timeout", code, message)
    if status == 429:
        return RetryableStoreError("throttled", code, message)
    if status >= 500:
        return RetryableStoreError("server_error", code, message)
    if status in (401, 403) and error.code != "RequestTimeTooSkewed":
        return PermanentStoreError("credentials", code, message)
    # 3xx (wrong region or endpoint), 404 NoSuchBucket, other 4xx.
    return PermanentStoreError("client_error", code, message)


def _wrapped_reasons(exception: BaseException) -> list[Failure]:
    reasons = getattr(exception, "reasons", None)
    return list(reasons) if isinstance(reasons, list) else []


def _is_timeout(exception: BaseException) -> bool:
    if isinstance(exception, _TIMEOUTS):
        return True
    return any(reason.check(*_TIMEOUTS) for reason in _wrapped_reasons(exception))


def classify_exception(exception: BaseException) -> Optional[StoreError]:
    """The StoreError for an exception raised by an attempt (the caller has
    already ruled out a cancellation it asked for, so a cancellation here
    is a timeout firing), or None for an exception that is a bug and must
    surface as it is."""
    if isinstance(exception, StoreError):
        return exception
    if isinstance(exception, _MISSING_CREDENTIALS):
        return PermanentStoreError(
            "credentials", "NoCredentials",
            f"no usable AWS credentials ({type(exception).__name__})")
    if isinstance(exception, BotoCoreError):
        # Instance metadata, container endpoint or STS did not answer.
        return RetryableStoreError(
            "credentials", type(exception).__name__, "could not fetch AWS credentials")
    name = type(exception).__name__
    if _is_timeout(exception):
        return RetryableStoreError("timeout", "Timeout", "no complete answer within S3_TIMEOUT")
    if isinstance(exception, _CONNECTION_ERRORS):
        detail = "; ".join(
            type(reason.value).__name__ for reason in _wrapped_reasons(exception))
        return RetryableStoreError("connection", name, detail or str(exception)[:_MAX_MESSAGE])
    return None
