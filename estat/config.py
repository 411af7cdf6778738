"""Settings: one table of every option, parsed from the command line or the
environment into a frozen `Settings`, with readable errors for bad values."""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping


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


def parse_positive_seconds(text: str) -> float:
    try:
        value = float(text.strip())
    except ValueError:
        raise ValueError("expected a number of seconds") from None
    if not value > 0 or value == float("inf"):
        raise ValueError("must be a number of seconds greater than zero")
    return value


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
    default (as text, parsed like user input) and help text."""

    name: str
    env: str
    parse: Callable[[str], Any]
    default: str
    help: str


OPTIONS: tuple[Option, ...] = (
    Option("listen", "LISTEN", parse_text, "tcp:8080",
           "Twisted endpoint for the ingest listener; repeatable, and "
           "comma-separated in the environment"),
    Option("admin-listen", "ADMIN_LISTEN", parse_text,
           "tcp:9100:interface=127.0.0.1",
           "Twisted endpoint for /metrics, /healthz and /readyz"),
    Option("max-body-size", "MAX_BODY_SIZE", parse_positive_size, "16384",
           "largest accepted request body in bytes (413 above)"),
    Option("max-batch-body-size", "MAX_BATCH_BODY_SIZE", parse_positive_size, "1MiB",
           "largest accepted application/x-ndjson body in bytes, after "
           "decompression (413 above)"),
    Option("max-batch-events", "MAX_BATCH_EVENTS", parse_positive_int, "1000",
           "most events in one application/x-ndjson body (413 above)"),
    Option("validate-json", "VALIDATE_JSON", parse_bool, "true",
           "reject bodies that are not one JSON object with 400"),
    Option("event-queue-size", "EVENT_QUEUE_SIZE", parse_positive_int,
           "10000", "events waiting for the batcher; /collect answers 503 "
           "when full"),
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
           "this server's name in object keys (default: the host name)"),
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
    Option("max-connections", "MAX_CONNECTIONS", parse_positive_int, "1024",
           "open ingest connections; further ones get 503 and are closed"),
    Option("max-headers", "MAX_HEADERS", parse_positive_int, "64",
           "most header lines in one request (431 above)"),
    Option("max-header-bytes", "MAX_HEADER_BYTES", parse_positive_size, "16KiB",
           "most bytes of request line and headers (431 above)"),
    Option("workers", "WORKERS", parse_positive_int, "1",
           "worker processes sharing the tcp: listening ports, each with its "
           "own queue, batcher, uploader and dead-letter subfolder"),
    Option("shutdown-timeout", "SHUTDOWN_TIMEOUT", parse_positive_seconds,
           "30", "seconds a stop may take before unfinished uploads go to "
           "the dead-letter directory"),
)


@dataclass(frozen=True)
class Settings:
    """Every setting of one server, validated."""

    listen: tuple[str, ...] = ("tcp:8080",)
    admin_listen: str = "tcp:9100:interface=127.0.0.1"
    max_body_size: int = 16384
    max_batch_body_size: int = 1024 * 1024
    max_batch_events: int = 1000
    validate_json: bool = True
    event_queue_size: int = 10000
    batch_size: int = 10000
    batch_max_bytes: int = 8 * 1024 * 1024
    flush_interval: float = 5.0
    upload_queue_size: int = 4
    upload_concurrency: int = 2
    encode_threads: int = 2
    output_dir: str = "./estat-data/objects"
    prefix: str = "raw"
    raw_prefix: str = "raw_dlq"
    host_id: str = field(default_factory=default_host_id)
    s3_bucket: str = ""
    s3_addressing: str = "auto"
    s3_app_retries: int = 2
    s3_timeout: float = 30.0
    s3_content_encoding: bool = False
    dlq_dir: str = "./estat-data/dlq"
    dlq_max_bytes: int = 1024**3
    dlq_drain_interval: float = 1.0
    auth_tokens_file: str = ""
    cors_allowed_origins: str = ""
    request_timeout: float = 10.0
    idle_timeout: float = 60.0
    max_connections: int = 1024
    max_headers: int = 64
    max_header_bytes: int = 16 * 1024
    workers: int = 1
    shutdown_timeout: float = 30.0


def attribute(option: Option) -> str:
    return option.name.replace("-", "_")


def load_settings(
    given: Mapping[str, Any], environ: Mapping[str, str]
) -> Settings:
    """Build Settings from command-line values (`given`, text or None per
    option name; `listen` a list), falling back to the environment, then the
    defaults. Raises ConfigError naming the first bad value."""
    values: dict[str, Any] = {}
    for option in OPTIONS:
        raw = given.get(option.name)
        source = "--" + option.name
        if option.name == "listen":
            values["listen"] = _parse_listen(raw, environ)
            continue
        if raw is None and environ.get(option.env, "").strip():
            raw, source = environ[option.env], option.env
        if raw is None:
            if option.name == "host-id":
                values["host_id"] = default_host_id()
                continue
            raw = option.default
        try:
            values[attribute(option)] = option.parse(raw)
        except ValueError as error:
            raise ConfigError(f"{source}={raw!r} is not valid: {error}.") from None
    if values["prefix"] == values["raw_prefix"]:
        raise ConfigError("PREFIX and RAW_PREFIX must differ, so that raw "
                          "bodies never mix with events.")
    return Settings(**values)


def _parse_listen(raw: Any, environ: Mapping[str, str]) -> tuple[str, ...]:
    if raw:
        items = list(raw)
    elif environ.get("LISTEN", "").strip():
        items = [part for part in environ["LISTEN"].split(",")]
    else:
        items = ["tcp:8080"]
    items = [item.strip() for item in items if item.strip()]
    if not items:
        raise ConfigError("LISTEN must name at least one endpoint, such as "
                          "tcp:8080.")
    return tuple(items)


