"""The server as one twistd service: builds the pipeline, starts it in
order, and stops it in one ordered chain with a deadline so nothing that was
accepted is dropped."""

from __future__ import annotations

import os
import sys
import threading
from typing import Any, Optional, Sequence

from prometheus_client import CollectorRegistry
from twisted.application.service import Service
from twisted.internet import endpoints
from twisted.internet.defer import (
    Deferred,
    DeferredList,
    DeferredQueue,
    inlineCallbacks,
)
from twisted.internet.interfaces import IListeningPort
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

import estat
from estat.admin import AdminSite, HealthResource, MetricsPage, ReadyResource
from estat.auth import TokensFileError, WriteKeys
from estat.codec import encode_batch_safely
from estat.collect import IngestState, Routes
from estat.config import Settings
from estat.dlq.spool import DeadLetterQueue
from estat.http.channel import IngestListener
from estat.http.limits import Limits
from estat.metrics import Metrics
from estat.model import Batch, EncodedObject
from estat.pipeline.batcher import Batcher
from estat.pipeline.uploader import Uploader
from estat.stores.base import Store
from estat.stores.local import LocalStore

_log = Logger()

# How much nicer than the process the threads that encode batches are.
# When they and the reactor thread compete for a core, answers come first:
# p99 at a fixed 25k req/s with the server on one core went from 4.8 to
# 2.3-2.9 ms, and `batch` throughput did not change (+10 starved encoding
# and cost a third of it).
ENCODE_NICENESS = 5
_reniced = threading.local()
_reniced_failed: list[OSError] = []  # logged once, not per thread


def _lower_this_threads_priority() -> None:
    """Renice the calling thread, once. Linux only: there `setpriority` on
    a thread id changes that thread alone (elsewhere, the whole process)."""
    if getattr(_reniced, "done", False) or not sys.platform.startswith("linux"):
        return
    _reniced.done = True
    thread = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, thread,
                       os.getpriority(os.PRIO_PROCESS, thread) + ENCODE_NICENESS)
    except OSError as error:  # a seccomp filter without setpriority, say
        if not _reniced_failed:
            _reniced_failed.append(error)
            _log.info("encoder threads keep the process's priority: {error}", error=error)


def make_store(settings: Settings, reactor: Any, pool: ThreadPool, metrics: Metrics) -> Store:
    """S3 when S3_BUCKET is set, else the local directory: the one place
    that choice is made (the server and `estat-dlq replay` both use it)."""
    if settings.s3_bucket:
        from estat.stores.s3 import make_s3_store

        return make_s3_store(settings, reactor, pool, metrics)
    return LocalStore(settings.output_dir, reactor, pool)


def ignore_further_signals(timeout: float) -> None:
    """Once a stop has begun, a second SIGTERM or SIGINT must not cut it
    short: log it instead (Twisted's own handler would only complain)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return

    def again(signum: int, frame: object) -> None:
        _log.warn("already stopping: waiting for uploads to finish or be dead-lettered "
                  "(at most SHUTDOWN_TIMEOUT={timeout}s)", timeout=timeout)

    for signum in (signal.SIGTERM, signal.SIGINT):
        try:
            signal.signal(signum, again)
        except (ValueError, OSError):
            pass


class IngestService(Service):
    """Runs the listeners, batcher, uploader and dead-letter drain.

    Start: thread pool, dead-letter directory, loops, then the listeners
    (ready only once all of them listen). Stop: see `stopService`.
    """

    def __init__(self, settings: Settings, reactor: Any,
                 registry: Optional[CollectorRegistry] = None,
                 own_signals: bool = False,
                 inherited_ports: Sequence[tuple[int, int]] = ()) -> None:
        self.settings = settings
        self.inherited_ports = inherited_ports
        self.own_signals = own_signals
        self.reactor = reactor
        self.registry = registry if registry is not None else CollectorRegistry()
        self.metrics = Metrics(self.registry)
        self.pool = ThreadPool(minthreads=0, maxthreads=settings.encode_threads,
                               name="estat-encode")
        self.queue: DeferredQueue = DeferredQueue(size=settings.event_queue_size)
        self.write_keys = (WriteKeys.from_file(settings.auth_tokens_file)
                           if settings.auth_tokens_file else None)
        self.state = IngestState(self.queue, self.metrics, settings.validate_json,
                                 write_keys=self.write_keys,
                                 cors_origins=settings.cors_allowed_origins)
        self.metrics.ready.set_function(lambda: 1 if self.state.ready() else 0)
        self.store = self._make_store()
        self.dlq = DeadLetterQueue(
            settings.dlq_dir, settings.dlq_max_bytes, reactor, self.pool, self.metrics,
            drain_interval=settings.dlq_drain_interval)
        self.uploader = Uploader(self.store, self.dlq, self._encode, self.metrics,
                                 settings.upload_queue_size, settings.upload_concurrency)
        self.batcher = Batcher(reactor, self.queue, self.uploader, self.metrics,
                               settings.batch_size, settings.batch_max_bytes,
                               settings.flush_interval)
        limits = Limits(
            max_headers=settings.max_headers, max_header_bytes=settings.max_header_bytes,
            max_body_size=settings.max_body_size,
            max_batch_body_size=settings.max_batch_body_size,
            request_timeout=settings.request_timeout, idle_timeout=settings.idle_timeout,
            max_connections=settings.max_connections)
        self.ingest_listener = IngestListener(
            handler=Routes(self.state, max_event_bytes=settings.max_body_size,
                           max_batch_events=settings.max_batch_events),
            limits=limits, counters=self.state, reactor=reactor)
        self.admin_site = AdminSite({
            b"metrics": MetricsPage(self.registry),
            b"healthz": HealthResource(),
            b"readyz": ReadyResource(self.state),
        }, reactor=reactor)
        self.ports: list[IListeningPort] = []
        self.admin_port: Optional[IListeningPort] = None
        self._stopping: Optional[Deferred] = None

    def _make_store(self) -> Store:
        return make_store(self.settings, self.reactor, self.pool, self.metrics)

    def _encode(self, batch: Batch) -> "Deferred[list[EncodedObject]]":
        settings = self.settings

        def encode() -> list[EncodedObject]:
            _lower_this_threads_priority()
            with self.metrics.encode_seconds.time():
                return encode_batch_safely(
                    batch, validated=settings.validate_json, prefix=settings.prefix,
                    raw_prefix=settings.raw_prefix, host_id=settings.host_id)

        return deferToThreadPool(self.reactor, self.pool, encode)

    def startService(self) -> None:
        super().startService()
        self.pool.start()
        if self.write_keys is None:
            _log.warn("no AUTH_TOKENS_FILE: anyone who can reach {listen} can write events",
                      listen=", ".join(self.settings.listen))
        if self.own_signals:
            self._reload_keys_on_sighup()
        self._started = self._start()

    def _reload_keys_on_sighup(self) -> None:
        import signal

        def on_sighup(signum: int, frame: object) -> None:
            self.reactor.callFromThread(self.reload_keys)

        signal.signal(signal.SIGHUP, on_sighup)

    def reload_keys(self) -> None:
        """Re-read AUTH_TOKENS_FILE; keep the old keys if it is broken.
        (SIGHUP must never stop the server, whatever is configured.)"""
        if self.write_keys is None:
            _log.info("SIGHUP: nothing to reload (AUTH_TOKENS_FILE is not set)")
            return
        try:
            count = self.write_keys.reload()
        except TokensFileError as error:
            _log.error("keeping the current write keys: {error}", error=str(error))
            return
        _log.info("reloaded {count} write keys from {path}", count=count,
                  path=self.write_keys.path)

    @inlineCallbacks
    def _start(self):  # type: ignore[no-untyped-def]
        try:
            yield self.dlq.open()
            self.batcher.start()
            self.dlq.start_draining(self.store, self.uploader.idle)
            self.admin_port = yield endpoints.serverFromString(
                self.reactor, self.settings.admin_listen).listen(self.admin_site)
            for fd, family in self.inherited_ports:
                self.ports.append(self.reactor.adoptStreamPort(fd, family, self.ingest_listener))
                # The port works on a duplicate; closing ours means stopping
                # the port really stops this process listening.
                os.close(fd)
            for description in self.settings.listen if not self.inherited_ports else ():
                port = yield endpoints.serverFromString(
                    self.reactor, description).listen(self.ingest_listener)
                self.ports.append(port)
        except Exception as error:
            _log.critical("cannot start: {error}; stopping", error=str(error))
            self.reactor.stop()
            return
        self.state.started = True
        _log.info(
            "estat-ingest {version} ready: ingest on {listen}, admin on {admin}, "
            "store {store}", version=estat.__version__,
            listen=", ".join(self.settings.listen), admin=self.settings.admin_listen,
            store=self._store_description())

    def _store_description(self) -> str:
        location = getattr(self.store, "location", None)
        if location is not None:
            return str(location.describe())
        return f"local:{self.store.root}"  # type: ignore[attr-defined]

    def stopService(self) -> "Deferred[None]":
        super().stopService()
        if self._stopping is None:
            self._stopping = self._stop()
        return self._stopping

    @inlineCallbacks
    def _stop(self):  # type: ignore[no-untyped-def]
        """The ordered stop, bounded by SHUTDOWN_TIMEOUT:
        1. stop accepting: /readyz and /collect answer 503, the ports close;
        2. idle keep-alive connections close, busy ones get their answer;
        3. the open batch and the event queue are flushed into batches;
        4. every upload finishes; at the deadline what is left is cancelled
           and goes to the dead-letter directory instead (never dropped);
        5. the dead-letter drain and the thread pool stop."""
        yield self._started
        started_at = self.reactor.seconds()
        timeout = self.settings.shutdown_timeout
        deadline = self.reactor.callLater(timeout, self._deadline_passed)
        if self.own_signals:
            ignore_further_signals(timeout)
        self.state.draining = True
        _log.info("stopping: no longer accepting events (deadline {timeout}s)",
                  timeout=timeout)
        yield DeferredList([port.stopListening() for port in self.ports])
        yield self.ingest_listener.close_connections(grace=min(5.0, timeout / 3))
        yield self.batcher.stop()
        queued, open_events = len(self.queue.pending), self.batcher.open_events()
        self.batcher.flush_all()
        _log.info("flushed {events} queued events; waiting for {batches} batches to upload",
                  events=queued + open_events, batches=self.uploader.depth())
        yield self.dlq.stop_draining()
        yield self.uploader.when_idle()
        if deadline.active():
            deadline.cancel()
        close = getattr(self.store, "close", None)
        if close is not None:
            yield close()
        if self.admin_port is not None:
            yield self.admin_port.stopListening()
        self.pool.stop()
        _log.info("stopped in {seconds:.1f}s: every accepted event is stored or "
                  "dead-lettered", seconds=self.reactor.seconds() - started_at)

    def _deadline_passed(self) -> None:
        _log.warn("shutdown deadline of {seconds}s reached: cancelling uploads, "
                  "their batches go to the dead-letter directory",
                  seconds=self.settings.shutdown_timeout)
        self.uploader.cancel_in_flight()
