"""Every Prometheus metric the server exports, created once on an injected
registry. Labelled children used on hot paths are looked up once here.

Every labelled counter has each of its known label sets created at 0 when
the metrics are: a series that appears only with its first increment is
invisible to `increase()` and `rate()`, so an alert on it would miss the
first failure."""

from __future__ import annotations

from typing import Any, Iterator, Optional, Sequence

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import CounterMetricFamily

REJECT_REASONS = (
    "too_large",
    "invalid_json",
    "queue_full",
    "unsupported_media_type",
    "shutting_down",
    "method_not_allowed",
    "not_found",
    "invalid_encoding",
    "auth_missing",
    "auth_invalid",
    "auth_conflict",
    "forbidden_origin",
    "request_timeout",
    "headers_too_large",
    "bad_request",
    "too_many_connections",
    "first_request_timeout",
    "http2_not_supported",
    "request_bodies_full",
    "starting",
    "wal_full",
    "wal_unavailable",
)
# The wire protocols the ingest listener speaks: /collect, Segment's (and
# RudderStack's) tracking API, PostHog's capture API.
PROTOCOLS = ("collect", "segment", "posthog")
FLUSH_TRIGGERS = ("size", "bytes", "interval", "shutdown", "segment", "replay")
STORE_FAILURE_REASONS = (
    "timeout",
    "connection",
    "throttled",
    "server_error",
    "client_error",
    "credentials",
    "io_error",
    "encode_error",
)
DLQ_DROP_REASONS = ("over_budget", "save_error", "encode_error")
PUT_OUTCOMES = ("ok", "retryable", "permanent")
# The answers the ingest listener gives (estat.collect, estat.http.channel).
HTTP_CODES = ("200", "202", "204", "400", "401", "403", "404", "405", "408", "413",
              "415", "431", "500", "503")
STORE_NAMES = ("local", "s3")
# How an event reached the store: the uploader's first try, or a re-upload
# from the dead-letter directory (the server's drain or `estat-dlq replay`).
STORED_PATHS = ("upload", "dlq")
LOOPS = ("batcher", "uploader", "dlq", "reaper")


class _Count:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1) -> None:
        self.value += amount


class ReactorCounter:
    """A counter that only the reactor thread touches (the request path):
    an increment is a float add, where prometheus-client's Counter takes a
    lock. Same `labels(...).inc()` interface; exported as `<name>_total`."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = (),
                 registry: Optional[CollectorRegistry] = None) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._children: dict[tuple[str, ...], _Count] = {}
        if not self.labelnames:
            self._unlabelled = self._children[()] = _Count()
        if registry is not None:
            registry.register(self)  # type: ignore[arg-type]

    def labels(self, **labels: Any) -> _Count:
        key = tuple(str(labels[name]) for name in self.labelnames)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = _Count()
        return child

    def inc(self, amount: float = 1) -> None:
        self._unlabelled.value += amount

    def _family(self) -> CounterMetricFamily:
        return CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def describe(self) -> list[CounterMetricFamily]:
        return [self._family()]

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = self._family()
        for key, child in list(self._children.items()):
            family.add_metric(list(key), child.value)
        yield family


class Metrics:
    """The server's metrics on one registry (a fresh one per test)."""

    def __init__(self, registry: CollectorRegistry, process: bool = True) -> None:
        self.registry = registry
        if process:
            ProcessCollector(registry=registry)
            PlatformCollector(registry=registry)
            GCCollector(registry=registry)
        r = registry
        self.http_requests = ReactorCounter(
            "estat_http_requests", "HTTP requests answered on the ingest listener, by status code",
            ["code"], registry=r)
        self.events_accepted = ReactorCounter(
            "estat_events_accepted", "Events answered 202 and queued", registry=r)
        self.events_rejected = ReactorCounter(
            "estat_events_rejected", "Requests refused, by reason", ["reason"], registry=r)
        for code in HTTP_CODES:
            self.http_requests.labels(code=code)
        for reason in REJECT_REASONS:
            self.events_rejected.labels(reason=reason)
        self.protocol_events_accepted = ReactorCounter(
            "estat_protocol_events_accepted", "Events answered as accepted and queued, by "
            "wire protocol", ["protocol"], registry=r)
        self.protocol_rejected = ReactorCounter(
            "estat_protocol_rejected", "Requests refused, by wire protocol and reason",
            ["protocol", "reason"], registry=r)
        self.duplicate_events = ReactorCounter(
            "estat_duplicate_events", "SDK events whose id was accepted lately: answered "
            "as accepted and not stored again, by wire protocol", ["protocol"], registry=r)
        for protocol in PROTOCOLS:
            self.protocol_events_accepted.labels(protocol=protocol)
            self.duplicate_events.labels(protocol=protocol)
            for reason in REJECT_REASONS:
                self.protocol_rejected.labels(protocol=protocol, reason=reason)
        self.batches_flushed = Counter(
            "estat_batches_flushed", "Batches flushed, by what triggered the flush",
            ["trigger"], registry=r)
        for trigger in FLUSH_TRIGGERS:
            self.batches_flushed.labels(trigger=trigger)
        self.batch_events = Histogram(
            "estat_batch_events", "Events per flushed batch", registry=r,
            buckets=(1, 10, 100, 1000, 5000, 10000, 50000, 100000))
        self.encode_seconds = Histogram(
            "estat_encode_seconds", "Time to encode and gzip one batch", registry=r,
            buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))
        self.events_stored = Counter(
            "estat_events_stored", "Events durably stored, by store and by path: upload "
            "(the first try) or dlq (a re-upload from the dead-letter directory)",
            ["store", "path"], registry=r)
        self.objects_stored = Counter(
            "estat_objects_stored", "Objects durably stored, by store and path",
            ["store", "path"], registry=r)
        self.bytes_stored = Counter(
            "estat_bytes_stored", "Compressed bytes durably stored, by store and path",
            ["store", "path"], registry=r)
        self.raw_events = Counter(
            "estat_raw_events", "Events whose body was not valid JSON, written to the raw prefix",
            registry=r)
        self.store_failures = Counter(
            "estat_store_failures", "Uploads that failed after all retries, by store and reason",
            ["store", "reason"], registry=r)
        for store in STORE_NAMES:
            for reason in STORE_FAILURE_REASONS:
                self.store_failures.labels(store=store, reason=reason)
            for path in STORED_PATHS:
                for counter in (self.events_stored, self.objects_stored, self.bytes_stored):
                    counter.labels(store=store, path=path)
        self.event_queue_depth = Gauge(
            "estat_event_queue_depth", "Events waiting for the batcher", registry=r)
        self.event_queue_capacity = Gauge(
            "estat_event_queue_capacity", "EVENT_QUEUE_SIZE", registry=r)
        self.event_queue_bytes = Gauge(
            "estat_event_queue_bytes", "Bytes of the event bodies waiting for the batcher",
            registry=r)
        self.event_queue_max_bytes = Gauge(
            "estat_event_queue_max_bytes", "EVENT_QUEUE_MAX_BYTES (0: no byte bound)",
            registry=r)
        self.request_bodies_bytes = Gauge(
            "estat_request_bodies_bytes", "Bytes of the request bodies being received, "
            "held against REQUEST_BODIES_MAX_BYTES", registry=r)
        self.request_bodies_max_bytes = Gauge(
            "estat_request_bodies_max_bytes", "REQUEST_BODIES_MAX_BYTES", registry=r)
        self.upload_queue_depth = Gauge(
            "estat_upload_queue_depth", "Flushed batches waiting for upload", registry=r)
        self.upload_queue_capacity = Gauge(
            "estat_upload_queue_capacity", "UPLOAD_QUEUE_SIZE", registry=r)
        self.uploads_in_flight = Gauge(
            "estat_uploads_in_flight", "Batches being encoded or uploaded", registry=r)
        self.loop_errors = Counter(
            "estat_loop_errors", "Unexpected errors caught in a background loop, by loop",
            ["loop"], registry=r)
        for loop in LOOPS:
            self.loop_errors.labels(loop=loop)
        self.open_connections = Gauge(
            "estat_open_connections", "Open connections on the ingest listener", registry=r)
        self.connections_evicted = ReactorCounter(
            "estat_connections_evicted", "Idle connections closed to admit a new one at "
            "MAX_CONNECTIONS", registry=r)
        self.ready = Gauge(
            "estat_ready", "1 when /readyz answers 200", registry=r)

        # S3 store (what it stored is in estat_events_stored{store="s3"})
        self.s3_put_seconds = Histogram(
            "estat_s3_put_seconds", "Duration of one S3 PUT attempt", registry=r,
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.s3_put_attempts = Counter(
            "estat_s3_put_attempts", "S3 PUT attempts, by outcome", ["outcome"], registry=r)
        for outcome in PUT_OUTCOMES:
            self.s3_put_attempts.labels(outcome=outcome)
        self.s3_put_failures = Counter(
            "estat_s3_put_failures", "Failed S3 PUT attempts, by reason", ["reason"],
            registry=r)
        for reason in STORE_FAILURE_REASONS:
            self.s3_put_failures.labels(reason=reason)

        # Dead-letter queue
        self.dlq_events_enqueued = Counter(
            "estat_dlq_events_enqueued", "Events saved to the dead-letter directory",
            registry=r)
        self.dlq_events_reuploaded = Counter(
            "estat_dlq_events_reuploaded", "Events re-uploaded from the dead-letter directory",
            registry=r)
        self.dlq_dropped_events = Counter(
            "estat_dlq_dropped_events", "Events lost because they could not be dead-lettered",
            ["reason"], registry=r)
        for reason in DLQ_DROP_REASONS:
            self.dlq_dropped_events.labels(reason=reason)
        self.dlq_quarantined_entries = Counter(
            "estat_dlq_quarantined_entries", "Unreadable dead-letter entries moved aside",
            registry=r)
        self.dlq_scan_errors = Counter(
            "estat_dlq_scan_errors", "Leftovers in the dead-letter directory that the "
            "start-up scan could not remove and skipped", registry=r)
        self.dlq_entries = Gauge(
            "estat_dlq_entries", "Entries in the dead-letter directory", registry=r)
        self.dlq_bytes = Gauge(
            "estat_dlq_bytes", "Bytes in the dead-letter directory", registry=r)
        self.dlq_oldest_entry_age = Gauge(
            "estat_dlq_oldest_entry_age_seconds", "Age of the oldest dead-letter entry",
            registry=r)

        # Write-ahead log (ACK_MODE=durable)
        self.wal_bytes = Gauge(
            "estat_wal_bytes", "Bytes in the write-ahead log, with records not written yet",
            registry=r)
        self.wal_max_bytes = Gauge(
            "estat_wal_max_bytes", "WAL_MAX_BYTES (0 in memory mode)", registry=r)
        self.wal_segments = Gauge(
            "estat_wal_segments", "Segment files in the write-ahead log", registry=r)
        self.wal_segments_deleted = Counter(
            "estat_wal_segments_deleted", "Segments deleted once all their events were stored",
            registry=r)
        self.wal_fsync_seconds = Histogram(
            "estat_wal_fsync_seconds", "Time to write and fsync one group of records",
            registry=r, buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1,
                                 0.25, 0.5, 1, 5))
        self.wal_group_records = Histogram(
            "estat_wal_group_records", "Records (requests and batch cuts) per fsync",
            registry=r, buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000))
        self.wal_write_failures = Counter(
            "estat_wal_write_failures", "Groups whose write or fsync failed (their requests "
            "got 503)", registry=r)
        self.wal_kept_events = Counter(
            "estat_wal_kept_events", "Events neither stored nor dead-lettered, kept in the "
            "write-ahead log until the next start replays them", registry=r)
        self.wal_replayed_events = Counter(
            "estat_wal_replayed_events", "Events replayed from the write-ahead log at start",
            registry=r)
        self.wal_torn_records = Counter(
            "estat_wal_torn_records", "Torn tail records cut off at start", registry=r)
        self.wal_quarantined_segments = Counter(
            "estat_wal_quarantined_segments", "Corrupt segments copied to quarantine/ at start",
            registry=r)

    def count_stored(self, store: str, path: str, events: int, size: int) -> None:
        """One object of `events` events and `size` bytes is stored in
        `store` by `path` ("upload" or "dlq")."""
        self.events_stored.labels(store=store, path=path).inc(events)
        self.objects_stored.labels(store=store, path=path).inc()
        self.bytes_stored.labels(store=store, path=path).inc(size)
