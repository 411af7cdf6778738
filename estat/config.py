"""Settings: one table of every option, parsed from the command line or the
environment into a frozen `Settings`, with readable errors for bad values.

The table is the only place a default is written: as text, parsed like
user input, for `Settings`, the twistd help and the documentation alike."""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence

from estat.model import unsafe_key_reason


class ConfigError(ValueError):
    """A setting has a value the server cannot run with; the message is one
    sentence an operator can act on."""


_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "kib": 1024,
    "m": 1000**2,
    "mb": 1000**2,
    "mib": 1024**2,
    "g": 1000**3,
    "gb": 1000**3,
    "gib": 1024**3,
}


def parse_size(text: str) -> int:
    """Parse a byte size such as `16384`, `64KiB`, `8MiB` or `1GB`."""
    match = re.fullmatch(r"\s*(\d+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _SIZE_UNITS:
        raise ValueError("expected a byte size such as 16384, 64KiB or 8MiB")
    return int(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]


def parse_positive_size(text: str) -> int:
    value = parse_size(text)
    if value <= 0:
        raise ValueError("must be greater than zero")
    return value


def _parse_whole(text: str, minimum: int, too_small: str) -> int:
    try:
        value = int(text.strip())
    except ValueError:
        raise ValueError("expected a whole number") from None
    if value < minimum:
        raise ValueError(too_small)
    return value


def parse_positive_int(text: str) -> int:
    return _parse_whole(text, 1, "must be greater than zero")


def parse_non_negative_int(text: str) -> int:
    return _parse_whole(text, 0, "must be zero or more")


def _parse_seconds(text: str, zero_ok: bool) -> float:
    try:
        value = float(text.strip())
    except ValueError:
        raise ValueError("expected a number of seconds") from None
    if not (value >= 0 if zero_ok else value > 0) or value == float("inf"):
        raise ValueError("must be a number of seconds, zero or more" if zero_ok
                         else "must be a number of seconds greater than zero")
    return value


def parse_positive_seconds(text: str) -> float:
    return _parse_seconds(text, zero_ok=False)


def parse_non_negative_seconds(text: str) -> float:
    return _parse_seconds(text, zero_ok=True)


def parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true or false")


def parse_prefix(text: str) -> str:
    value = text.strip().strip("/")
    if not value or not re.fullmatch(r"[A-Za-z0-9._=/-]+", value):
        raise ValueError(
            "must be a non-empty key prefix of letters, digits and . _ = / -"
        )
    unsafe = unsafe_key_reason(value)
    if unsafe is not None:
        raise ValueError(f"must be a safe key prefix: {unsafe}")
    return value


def parse_host_id(text: str) -> str:
    value = text.strip()
    if not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", value):
        raise ValueError("must be 1-64 characters of letters, digits and . _ -")
    return value


def parse_choice(*choices: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = text.strip().lower()
        if value not in choices:
            raise ValueError("expected one of " + ", ".join(choices))
        return value

    return parse


def parse_text(text: str) -> str:
    return text.strip()


def parse_endpoints(items: Sequence[str]) -> tuple[str, ...]:
    """Endpoint descriptions, blanks dropped; at least one."""
    endpoints = tuple(item.strip() for item in items if item.strip())
    if not endpoints:
        raise ValueError("must name at least one endpoint, such as tcp:8080")
    return endpoints


def parse_path(text: str) -> str:
    value = text.strip()
    if not value:
        raise ValueError("must be a directory path")
    return value


def default_host_id() -> str:
    """The host name, reduced to characters that are safe in object keys."""
    name = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname())[:64]
    return name or "estat"


@dataclass(frozen=True)
class Option:
    """One setting: its command-line name, environment variable, parser,
    default (as text, parsed like user input) and help text.

    A `repeatable` option may be given several times on the command line
    and is comma-separated in the environment and the default; its parser
    takes the list of items. An option with `computed` has an empty default
    text and works its default out when the settings are made."""

    name: str
    env: str
    parse: Callable[..., Any]
    default: str
    help: str
    repeatable: bool = False
    computed: Optional[Callable[[], Any]] = None

    @property
    def attribute(self) -> str:
        """The name of the Settings field."""
        return self.name.replace("-", "_")

    def parse_text(self, text: str) -> Any:
        """`text` (from the environment or the default) parsed."""
        return self.parse(text.split(",")) if self.repeatable else self.parse(text)

    def default_value(self) -> Any:
        return self.computed() if self.computed is not None else self.parse_text(self.default)


OPTIONS: tuple[Option, ...] = (
    Option("listen", "LISTEN", parse_endpoints, "tcp:8080",
           "Twisted endpoint for the ingest listener; repeatable, and "
           "comma-separated in the environment", repeatable=True),
    Option("admin-listen", "ADMIN_LISTEN", parse_text,
           "tcp:9100:interface=127.0.0.1",
           "Twisted endpoint for /metrics, /healthz and /readyz"),
    Option("max-body-size", "MAX_BODY_SIZE", parse_positive_size, "16384",
           "largest accepted request body in bytes (413 above)"),
    Option("max-batch-body-size", "MAX_BATCH_BODY_SIZE", parse_positive_size, "20MiB",
           "largest accepted batch (application/x-ndjson or a JSON array) in "
           "bytes, after decompression (413 above)"),
    Option("max-batch-events", "MAX_BATCH_EVENTS", parse_positive_int, "50000",
           "most events in one batch, and lines in an NDJSON one (413 above)"),
    Option("request-bodies-max-bytes", "REQUEST_BODIES_MAX_BYTES", parse_positive_size,
           "64MiB", "request bodies being received at once, as they arrive "
           "(a compressed body compressed), over all connections; a request "
           "that would go over gets 503"),
    Option("segment-max-event-size", "SEGMENT_MAX_EVENT_SIZE", parse_positive_size, "32KiB",
           "largest Segment/RudderStack message, in a batch or as a single call "
           "(/v1/track ...), in bytes (413 above)"),
    Option("segment-max-batch-size", "SEGMENT_MAX_BATCH_SIZE", parse_positive_size, "500KB",
           "largest /v1/batch body in bytes, after decompression (413 above)"),
    Option("posthog-max-event-size", "POSTHOG_MAX_EVENT_SIZE", parse_positive_size, "1MiB",
           "largest PostHog event in bytes (413 above)"),
    Option("posthog-max-batch-size", "POSTHOG_MAX_BATCH_SIZE", parse_positive_size, "1MiB",
           "largest PostHog request body (/batch/, /e/, ...) in bytes, after "
           "decompression (413 above)"),
    Option("sdk-dedup-ids", "SDK_DEDUP_IDS", parse_non_negative_int, "100000",
           "most recent SDK event ids (messageId, uuid) a worker remembers so that a "
           "retried batch is not stored twice; 0: remember none"),
    Option("sdk-dedup-seconds", "SDK_DEDUP_SECONDS", parse_positive_seconds, "3600",
           "seconds a worker remembers an accepted SDK event id"),
    Option("validate-json", "VALIDATE_JSON", parse_bool, "true",
           "reject bodies that are not one JSON object with 400"),
    Option("event-queue-size", "EVENT_QUEUE_SIZE", parse_positive_int,
           "100000", "events waiting for the batcher; /collect answers 503 "
           "when full"),
    Option("event-queue-max-bytes", "EVENT_QUEUE_MAX_BYTES", parse_positive_size,
           "64MiB", "bytes of bodies waiting for the batcher; /collect answers "
           "503 when full"),
    Option("batch-size", "BATCH_SIZE", parse_positive_int, "10000",
           "flush a batch when it holds this many events"),
    Option("batch-max-bytes", "BATCH_MAX_BYTES", parse_positive_size, "8MiB",
           "flush a batch when its bodies add up to this many bytes"),
    Option("flush-interval", "FLUSH_INTERVAL", parse_positive_seconds, "5",
           "flush a batch this many seconds after its first event"),
    Option("upload-queue-size", "UPLOAD_QUEUE_SIZE", parse_positive_int, "4",
           "flushed batches waiting for upload; the batcher stops draining "
           "when full"),
    Option("upload-concurrency", "UPLOAD_CONCURRENCY", parse_positive_int,
           "2", "uploads in flight at once"),
    Option("encode-threads", "ENCODE_THREADS", parse_positive_int, "2",
           "threads that gzip batches and write files"),
    Option("output-dir", "OUTPUT_DIR", parse_path, "./estat-data/objects",
           "directory of the embedded local store (used when S3_BUCKET is "
           "empty)"),
    Option("prefix", "PREFIX", parse_prefix, "raw",
           "key prefix of event objects"),
    Option("raw-prefix", "RAW_PREFIX", parse_prefix, "raw_dlq",
           "key prefix of objects holding bodies that are not valid JSON "
           "(only with VALIDATE_JSON=false)"),
    Option("host-id", "HOST_ID", parse_host_id, "",
           "this server's name in object keys (default: the host name)",
           computed=default_host_id),
    Option("s3-bucket", "S3_BUCKET", parse_text, "",
           "upload to this S3 bucket instead of the local directory"),
    Option("s3-addressing", "S3_ADDRESSING", parse_choice("auto", "path",
                                                          "virtual"), "auto",
           "S3 addressing style: auto is path-style for a custom endpoint "
           "and virtual-hosted for AWS"),
    Option("s3-app-retries", "S3_APP_RETRIES", parse_non_negative_int, "2",
           "extra attempts of a failed S3 PUT, with exponential backoff and "
           "jitter"),
    Option("s3-timeout", "S3_TIMEOUT", parse_positive_seconds, "30",
           "time limit of one S3 PUT attempt, connection included"),
    Option("s3-content-encoding", "S3_CONTENT_ENCODING", parse_bool, "false",
           "also send Content-Encoding: gzip (clients then decompress on "
           "download)"),
    Option("dlq-dir", "DLQ_DIR", parse_path, "./estat-data/dlq",
           "dead-letter directory for batches that could not be stored"),
    Option("dlq-max-bytes", "DLQ_MAX_BYTES", parse_positive_size, "1GiB",
           "disk budget of the dead-letter directory"),
    Option("dlq-drain-interval", "DLQ_DRAIN_INTERVAL", parse_positive_seconds,
           "1", "seconds between re-upload attempts of one dead-letter entry"),
    Option("ack-mode", "ACK_MODE", parse_choice("memory", "durable"), "memory",
           "memory: a 202 means the event is queued in memory (fastest; a "
           "crash loses what is queued); durable: a 202 means it is fsynced "
           "to the write-ahead log in WAL_DIR, and survives kill -9 and power "
           "loss"),
    Option("wal-dir", "WAL_DIR", parse_path, "./estat-data/wal",
           "write-ahead log directory (ACK_MODE=durable)"),
    Option("wal-max-bytes", "WAL_MAX_BYTES", parse_positive_size, "1GiB",
           "disk budget of the write-ahead log; over it requests get 503 "
           "wal_full"),
    Option("auth-tokens-file", "AUTH_TOKENS_FILE", parse_text, "",
           "file of accepted write keys, one `key name [prefix-segment]` per "
           "line, reloaded on SIGHUP; empty: anyone may write"),
    Option("cors-allowed-origins", "CORS_ALLOWED_ORIGINS", parse_text, "",
           "comma-separated origins browsers may post from, or *; empty: none"),
    Option("request-timeout", "REQUEST_TIMEOUT", parse_positive_seconds, "10",
           "seconds a client has to send a whole request once it starts "
           "(408 after)"),
    Option("idle-timeout", "IDLE_TIMEOUT", parse_positive_seconds, "60",
           "seconds an idle keep-alive connection stays open"),
    Option("first-request-timeout", "FIRST_REQUEST_TIMEOUT", parse_positive_seconds, "5",
           "seconds a new connection has to begin its first request; one that "
           "sends nothing is closed"),
    Option("max-connections", "MAX_CONNECTIONS", parse_positive_int, "1024",
           "open ingest connections; at the limit the longest-idle one is "
           "closed to admit a new one, which gets 503 only when none is idle"),
    Option("max-headers", "MAX_HEADERS", parse_positive_int, "64",
           "most header lines in one request (431 above)"),
    Option("max-header-bytes", "MAX_HEADER_BYTES", parse_positive_size, "16KiB",
           "most bytes of request line and headers (431 above)"),
    Option("workers", "WORKERS", parse_positive_int, "1",
           "worker processes sharing the tcp: listening ports, each with its "
           "own queue, batcher, uploader and dead-letter subfolder"),
    # The default outlasts the shipped etc/haproxy/haproxy.cfg's checks:
    # `fall 2` failed checks `inter 2s` apart take a host out within 4 s,
    # and 1 s more covers a check under way.
    Option("drain-delay", "DRAIN_DELAY", parse_non_negative_seconds, "5",
           "seconds a stop keeps serving with /readyz answering 503, so that "
           "load balancers take the host out before its ports close; 0: close "
           "at once"),
    Option("shutdown-timeout", "SHUTDOWN_TIMEOUT", parse_positive_seconds,
           "30", "seconds a stop may take before unfinished uploads go to "
           "the dead-letter directory"),
)


_BY_NAME = {option.name: option for option in OPTIONS}


def option_named(name: str) -> Option:
    return _BY_NAME[name]


def _default(name: str) -> Any:
    """The Settings field of option `name`, with the option's default."""
    return field(default_factory=_BY_NAME[name].default_value)


@dataclass(frozen=True)
class Settings:
    """Every setting of one server, validated; by default what OPTIONS says."""

    listen: tuple[str, ...] = _default("listen")
    admin_listen: str = _default("admin-listen")
    max_body_size: int = _default("max-body-size")
    max_batch_body_size: int = _default("max-batch-body-size")
    max_batch_events: int = _default("max-batch-events")
    request_bodies_max_bytes: int = _default("request-bodies-max-bytes")
    segment_max_event_size: int = _default("segment-max-event-size")
    segment_max_batch_size: int = _default("segment-max-batch-size")
    posthog_max_event_size: int = _default("posthog-max-event-size")
    posthog_max_batch_size: int = _default("posthog-max-batch-size")
    sdk_dedup_ids: int = _default("sdk-dedup-ids")
    sdk_dedup_seconds: float = _default("sdk-dedup-seconds")
    validate_json: bool = _default("validate-json")
    event_queue_size: int = _default("event-queue-size")
    event_queue_max_bytes: int = _default("event-queue-max-bytes")
    batch_size: int = _default("batch-size")
    batch_max_bytes: int = _default("batch-max-bytes")
    flush_interval: float = _default("flush-interval")
    upload_queue_size: int = _default("upload-queue-size")
    upload_concurrency: int = _default("upload-concurrency")
    encode_threads: int = _default("encode-threads")
    output_dir: str = _default("output-dir")
    prefix: str = _default("prefix")
    raw_prefix: str = _default("raw-prefix")
    host_id: str = _default("host-id")
    s3_bucket: str = _default("s3-bucket")
    s3_addressing: str = _default("s3-addressing")
    s3_app_retries: int = _default("s3-app-retries")
    s3_timeout: float = _default("s3-timeout")
    s3_content_encoding: bool = _default("s3-content-encoding")
    dlq_dir: str = _default("dlq-dir")
    dlq_max_bytes: int = _default("dlq-max-bytes")
    dlq_drain_interval: float = _default("dlq-drain-interval")
    ack_mode: str = _default("ack-mode")
    wal_dir: str = _default("wal-dir")
    wal_max_bytes: int = _default("wal-max-bytes")
    auth_tokens_file: str = _default("auth-tokens-file")
    cors_allowed_origins: str = _default("cors-allowed-origins")
    request_timeout: float = _default("request-timeout")
    idle_timeout: float = _default("idle-timeout")
    first_request_timeout: float = _default("first-request-timeout")
    max_connections: int = _default("max-connections")
    max_headers: int = _default("max-headers")
    max_header_bytes: int = _default("max-header-bytes")
    workers: int = _default("workers")
    drain_delay: float = _default("drain-delay")
    shutdown_timeout: float = _default("shutdown-timeout")


def load_settings(
    given: Mapping[str, Any], environ: Mapping[str, str]
) -> Settings:
    """Build Settings from command-line values (`given`, text or None per
    option name; a list for a repeatable option), falling back to the
    environment, then the defaults. Raises ConfigError naming the first
    bad value."""
    values: dict[str, Any] = {}
    for option in OPTIONS:
        raw = given.get(option.name)
        if option.repeatable:
            values[option.attribute] = _parse_repeated(option, raw, environ)
            continue
        source = "--" + option.name
        if raw is None and environ.get(option.env, "").strip():
            raw, source = environ[option.env], option.env
        if raw is None:
            values[option.attribute] = option.default_value()
            continue
        try:
            values[option.attribute] = option.parse(raw)
        except ValueError as error:
            raise ConfigError(f"{source}={raw!r} is not valid: {error}.") from None
    if values["prefix"] == values["raw_prefix"]:
        raise ConfigError("PREFIX and RAW_PREFIX must differ, so that raw "
                          "bodies never mix with events.")
    check_limits(values)
    return Settings(**values)


# (smaller, larger): each request limit must fit what holds the request.
_FITS = (
    ("max_batch_events", "event_queue_size",
     "the event queue could never take a full batch"),
    ("max_batch_body_size", "event_queue_max_bytes",
     "the event queue could never take a full batch"),
    ("max_batch_body_size", "request_bodies_max_bytes",
     "a full batch could never be received"),
    ("max_body_size", "max_batch_body_size", "one event would be larger than a batch"),
)


def check_limits(values: Mapping[str, Any]) -> None:
    """Refuse request limits that the queue or the body budget can never
    accept: such a request would be refused with 503 for ever, and a log
    shipper drops it after a few retries."""
    for small, large, why in _FITS:
        if values[small] > values[large]:
            raise ConfigError(
                f"{small.upper()} ({values[small]}) must not exceed {large.upper()} "
                f"({values[large]}): {why}.")


def _parse_repeated(option: Option, given: Optional[Sequence[str]],
                    environ: Mapping[str, str]) -> Any:
    """The command line's items if any, else the environment's, else the
    default's (both comma-separated)."""
    text = environ.get(option.env, "")
    try:
        if given:
            return option.parse(given)
        return option.parse_text(text if text.strip() else option.default)
    except ValueError as error:
        raise ConfigError(f"{option.env} {error}.") from None
