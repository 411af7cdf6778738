"""The server as a twistd service tree: `build` makes the parts of the
pipeline, `IngestService` starts them in order (listening before twistd
gives up root) and stops them in one ordered chain with a deadline, so
nothing that was accepted is dropped."""

from __future__ import annotations

import gc
import os
import sys
import threading
from dataclasses import dataclass
from functools import partial
from socket import AddressFamily
from typing import Any, Callable, Optional, Sequence, cast

from prometheus_client import CollectorRegistry
from twisted.application.service import MultiService, Service
from twisted.internet import endpoints
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    DeferredList,
    TimeoutError,
    maybeDeferred,
    succeed,
)
from twisted.internet.interfaces import (
    IListeningPort,
    IProtocolFactory,
    IReactorCore,
    IReactorFromThreads,
    IReactorSocket,
    IReactorTime,
)
from twisted.internet.protocol import ServerFactory
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

import estat
from estat.admin import AdminSite, HealthResource, MetricsPage, ReadyResource
from estat.admission import Admission, DurableAdmission, MemoryAdmission
from estat.auth import TokensFileError, WriteKeys
from estat.codec import encode_batch_safely
from estat.collect import IngestState, Routes, queue_refusal
from estat.config import Settings
from estat.dlq.spool import DeadLetterQueue
from estat.http.channel import IngestListener
from estat.http.limits import Limits
from estat.lifecycle import Lifecycle, Phase
from estat.loops import LoopService
from estat.metrics import Metrics
from estat.model import Batch, EncodedObject
from estat.pipeline.batcher import Batcher
from estat.pipeline.queue import EventQueue
from estat.pipeline.uploader import Encoder, Uploader
from estat.sdk import body_limits as sdk_body_limits
from estat.sdk import routes as sdk_routes
from estat.signals import ignore_further_signals
from estat.stores.base import Store
from estat.stores.factory import make_store
from estat.wal.ledger import Ledger, cut_then_encode, wal_batch_id
from estat.wal.recovery import recover
from estat.wal.writer import Run, WalWriter

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




class IIngestReactor(IReactorCore, IReactorTime, IReactorFromThreads, IReactorSocket):
    """What the server needs of its reactor: time for its loops and
    deadlines, threads for encoding and file I/O, adopted sockets for a
    worker, and `stop` for a start that fails once the reactor runs."""


def make_encoder(settings: Settings, reactor: IReactorFromThreads, pool: ThreadPool,
                 metrics: Metrics) -> Encoder:
    """Encode a batch on `pool`, in a thread niced below the reactor's."""

    def encode(batch: Batch) -> list[EncodedObject]:
        _lower_this_threads_priority()
        with metrics.encode_seconds.time():
            return encode_batch_safely(
                batch, validated=settings.validate_json, prefix=settings.prefix,
                raw_prefix=settings.raw_prefix, host_id=settings.host_id)

    return lambda batch: deferToThreadPool(reactor, pool, encode, batch)


@dataclass
class WalParts:
    """The write-ahead log of ACK_MODE=durable: its writer, its ledger, and
    the one thread that writes, fsyncs and deletes its files."""

    writer: WalWriter
    ledger: Ledger
    pool: ThreadPool
    run: Run


def make_wal(settings: Settings, reactor: IIngestReactor, metrics: Metrics) -> WalParts:
    pool = ThreadPool(minthreads=1, maxthreads=1, name="estat-wal")
    run: Run = partial(deferToThreadPool, reactor, pool)
    writer = WalWriter(settings.wal_dir, settings.wal_max_bytes, run, reactor, metrics)
    return WalParts(writer, Ledger(writer), pool, run)


@dataclass
class IngestParts:
    """Everything the server is made of, wired together but not started."""

    settings: Settings
    reactor: IIngestReactor
    registry: CollectorRegistry
    metrics: Metrics
    pool: ThreadPool
    queue: EventQueue
    lifecycle: Lifecycle
    write_keys: Optional[WriteKeys]
    state: IngestState
    store: Store
    dlq: DeadLetterQueue
    uploader: Uploader
    batcher: Batcher
    listener: IngestListener
    admin_site: AdminSite
    admission: Optional[Admission] = None
    wal: Optional[WalParts] = None


def build(settings: Settings, reactor: IIngestReactor,
          registry: Optional[CollectorRegistry] = None, *,
          pool: Optional[ThreadPool] = None, store: Optional[Store] = None) -> IngestParts:
    """Make the parts for `settings` (reading AUTH_TOKENS_FILE); `pool` and
    `store` replace the encoding thread pool and the store `make_store`
    would pick (tests pass in-memory ones)."""
    registry = registry if registry is not None else CollectorRegistry()
    metrics = Metrics(registry)
    if pool is None:
        pool = ThreadPool(minthreads=0, maxthreads=settings.encode_threads,
                          name="estat-encode")
    queue = EventQueue(settings.event_queue_size, settings.event_queue_max_bytes)
    lifecycle = Lifecycle()
    write_keys = (WriteKeys.from_file(settings.auth_tokens_file)
                  if settings.auth_tokens_file else None)
    state = IngestState(queue, metrics, settings.validate_json,
                        write_keys=write_keys, cors_origins=settings.cors_allowed_origins,
                        lifecycle=lifecycle)
    metrics.ready.set_function(lambda: 1 if state.ready() else 0)
    if store is None:
        store = make_store(settings, reactor, pool, metrics)
    dlq = DeadLetterQueue(settings.dlq_dir, settings.dlq_max_bytes, reactor, pool, metrics,
                          drain_interval=settings.dlq_drain_interval,
                          behind_wal=settings.ack_mode == "durable")
    encoder = make_encoder(settings, reactor, pool, metrics)
    wal = make_wal(settings, reactor, metrics) if settings.ack_mode == "durable" else None
    if wal is not None:
        uploader = Uploader(store, dlq, cut_then_encode(wal.ledger, encoder), metrics,
                            settings.upload_queue_size, settings.upload_concurrency,
                            on_done=wal.ledger.finished)
        batcher = Batcher(reactor, queue, uploader, metrics, settings.batch_size,
                          settings.batch_max_bytes, settings.flush_interval,
                          runs=wal.ledger, span_id=wal_batch_id)
        admission: Admission = DurableAdmission(state, wal.writer, wal.ledger)
    else:
        uploader = Uploader(store, dlq, encoder, metrics,
                            settings.upload_queue_size, settings.upload_concurrency)
        batcher = Batcher(reactor, queue, uploader, metrics, settings.batch_size,
                          settings.batch_max_bytes, settings.flush_interval)
        admission = MemoryAdmission(state)
    state.admission = admission
    limits = Limits(
        max_headers=settings.max_headers, max_header_bytes=settings.max_header_bytes,
        max_body_size=settings.max_body_size, max_batch_body_size=settings.max_batch_body_size,
        request_timeout=settings.request_timeout, idle_timeout=settings.idle_timeout,
        first_request_timeout=settings.first_request_timeout,
        max_connections=settings.max_connections,
        max_receiving_bytes=settings.request_bodies_max_bytes,
        path_body_limits=sdk_body_limits(settings))
    listener = IngestListener(
        handler=Routes(state, max_event_bytes=settings.max_body_size,
                       max_batch_events=settings.max_batch_events,
                       more=sdk_routes(state, settings, reactor)),
        limits=limits, counters=state, lifecycle=lifecycle, reactor=reactor,
        answer_headers=state.cors_headers,
        queue_refusal=partial(queue_refusal, state))
    metrics.request_bodies_bytes.set_function(lambda: listener.budget.used)
    metrics.request_bodies_max_bytes.set(listener.budget.max_bytes)
    admin_site = AdminSite({
        b"metrics": MetricsPage(registry),
        b"healthz": HealthResource(),
        b"readyz": ReadyResource(state),
    }, reactor=reactor)
    return IngestParts(settings, reactor, registry, metrics, pool, queue, lifecycle,
                       write_keys, state, store, dlq, uploader, batcher, listener, admin_site,
                       admission, wal)


# The request path allocates a tuple or two per event: at the default
# threshold (700 allocations) the collector's youngest generation ran every
# few dozen events of a batch, and an older one now and then over every
# event still queued. Its cycles are few (Deferreds, failures), so
# collecting once per GC_YOUNG_THRESHOLD allocations is plenty.
GC_YOUNG_THRESHOLD = 50_000


def settle_garbage_collector() -> None:
    """Once start-up is over: collect, move what it built (modules, the
    parts) out of the collector's sight for good (`gc.freeze`), and raise
    the youngest generation's threshold."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)


class ThreadPoolService(Service):
    """A thread pool that runs while the service runs."""

    def __init__(self, pool: ThreadPool) -> None:
        self.pool = pool
        self.setName("pool")

    def startService(self) -> None:
        super().startService()
        self.pool.start()

    def stopService(self) -> None:
        """Waits for the threads to finish what they are doing."""
        super().stopService()
        self.pool.stop()


class DrainService(Service):
    """The dead-letter drain loop: re-uploads to `store` while `is_idle()`."""

    def __init__(self, dlq: DeadLetterQueue, store: Store, is_idle: Callable[[], bool]) -> None:
        self.dlq = dlq
        self.store = store
        self.is_idle = is_idle
        self.setName("dlq-drain")

    def startService(self) -> None:
        super().startService()
        self.dlq.start_draining(self.store, self.is_idle)

    def stopService(self) -> "Deferred[None]":
        """Fires once a re-upload under way is cancelled and its tick done."""
        super().stopService()
        return self.dlq.stop_draining()


class ListenerService(Service):
    """Listens from `privilegedStartService`, so a port below 1024 is bound
    before twistd gives up root for --uid/--gid, and stops listening in
    `stopService`; `startService` listens if that has not happened (a
    worker is started without the privileged step).

    Twisted's StreamServerEndpointService does the same, but keeps the
    outcome of the listen to itself and only logs a failure. Here a failure
    that comes at once is raised (twistd then exits, saying why), and
    `listening` fires with the port, or fails, so the server is ready only
    once every listener listens."""

    def __init__(self, name: str,
                 listen: Callable[[], "IListeningPort | Deferred[IListeningPort]"]) -> None:
        self.setName(name)
        self._listen = listen
        self.listening: Optional[Deferred[IListeningPort]] = None
        self.port: Optional[IListeningPort] = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self._start_listening()

    def startService(self) -> None:
        super().startService()
        if self.listening is None:
            self._start_listening()

    def _start_listening(self) -> None:
        failed: list[Failure] = []

        def listened(port: IListeningPort) -> IListeningPort:
            self.port = port
            return port

        def failure(reason: Failure) -> Failure:
            failed.append(reason)
            return reason

        listening = maybeDeferred(self._listen).addCallbacks(listened, failure)
        if failed:
            listening.addErrback(lambda _: None)  # raised here instead
            failed[0].raiseException()
        self.listening = listening

    def stopService(self) -> "Deferred[Any]":
        """Stop listening, or give up a listen still under way."""
        super().stopService()
        port, self.port = self.port, None
        if port is not None:
            return maybeDeferred(port.stopListening)
        if self.listening is not None:
            self.listening.cancel()
        return succeed(None)


def endpoint_listener(name: str, reactor: IIngestReactor, description: str,
                      factory: IProtocolFactory) -> ListenerService:
    """A listener on a Twisted endpoint string such as `tcp:8080`."""
    return ListenerService(
        name, lambda: endpoints.serverFromString(reactor, description).listen(factory))


def adopted_listener(name: str, reactor: IReactorSocket, fd: int, family: int,
                     factory: IProtocolFactory) -> ListenerService:
    """A listener on a socket inherited from the worker supervisor."""

    def adopt() -> IListeningPort:
        # Any protocol factory will do; the stub asks for a ServerFactory.
        port = reactor.adoptStreamPort(fd, AddressFamily(family), cast(ServerFactory, factory))
        # The port works on a duplicate; closing ours means stopping the
        # port really stops this process listening.
        os.close(fd)
        return port

    return ListenerService(name, adopt)


class IngestService(MultiService):
    """The listeners, batcher, uploader and dead-letter drain, as a tree:
    thread pool, batcher loop, drain loop, admin listener, ingest listeners.

    `privilegedStartService` binds every listener. `startService` starts
    the pool, opens the dead-letter directory, starts the loops, and turns
    the lifecycle to running (ready) once every listener listens. The stop
    is one ordered chain, see `stopService`: a MultiService would stop its
    children all at once."""

    def __init__(self, parts: IngestParts, own_signals: bool = False,
                 inherited_ports: Sequence[tuple[int, int]] = ()) -> None:
        super().__init__()
        self.parts = parts
        self.settings = settings = parts.settings
        self.reactor = reactor = parts.reactor
        self.own_signals = own_signals
        self.lifecycle = parts.lifecycle
        self.pool_service = ThreadPoolService(parts.pool)
        self.batcher_service: LoopService = parts.batcher.service()
        self.drain_service = DrainService(parts.dlq, parts.store, parts.uploader.idle)
        self.admin_listener = endpoint_listener("admin", reactor, settings.admin_listen,
                                                parts.admin_site)
        if inherited_ports:
            self.ingest_listeners = [
                adopted_listener(f"ingest-fd{fd}", reactor, fd, family, parts.listener)
                for fd, family in inherited_ports]
        else:
            self.ingest_listeners = [
                endpoint_listener(f"ingest-{number}", reactor, description, parts.listener)
                for number, description in enumerate(settings.listen)]
        for child in [self.pool_service, self.batcher_service, self.drain_service,
                      self.admin_listener, *self.ingest_listeners]:
            child.setServiceParent(self)
        self._started: Optional[Deferred[None]] = None
        self._stopping: Optional[Deferred[None]] = None

    def privilegedStartService(self) -> None:
        """Bind every listener; a listen that fails is raised to twistd."""
        try:
            super().privilegedStartService()
        except Exception as error:
            _log.critical("cannot start: {error}", error=str(error))
            raise

    def startService(self) -> None:
        Service.startService(self)  # the children start in order, in _start
        self.pool_service.startService()
        if self.parts.write_keys is None:
            _log.warn("no AUTH_TOKENS_FILE: anyone who can reach {listen} can write events",
                      listen=", ".join(self.settings.listen))
        if self.own_signals:
            self._reload_keys_on_sighup()
        self._started = Deferred.fromCoroutine(self._start())
        self._started.addErrback(self._start_failed)

    async def _start(self) -> None:
        await self.parts.dlq.open()
        wal = self.parts.wal
        if wal is not None:
            # Durable mode: /collect answers 503 starting until the log is
            # replayed (the lifecycle runs only once this is done).
            wal.pool.start()
            settings = self.settings
            await recover(settings.wal_dir, wal.writer, wal.ledger, self.parts.uploader,
                          wal.run, self.parts.metrics, settings.batch_size,
                          settings.batch_max_bytes)
        self.batcher_service.startService()
        self.drain_service.startService()
        listeners = [self.admin_listener, *self.ingest_listeners]
        for listener in listeners:
            listener.startService()
        results = await DeferredList([listener.listening for listener in listeners
                                      if listener.listening is not None],
                                     consumeErrors=True)
        for ok, result in results:
            if not ok:
                cast(Failure, result).raiseException()
        settle_garbage_collector()
        self.lifecycle.start_running()
        _log.info(
            "estat-ingest {version} ready: ingest on {listen}, admin on {admin}, "
            "store {store}", version=estat.__version__,
            listen=", ".join(self.settings.listen), admin=self.settings.admin_listen,
            store=self.parts.store.describe())

    def _start_failed(self, failure: Failure) -> None:
        """Once the reactor runs, twistd no longer hears of a failure:
        say it, and stop (the ordered stop then runs). A start cancelled
        by a stop is no failure."""
        if failure.check(CancelledError):
            _log.info("stopped before the start had finished")
            return
        _log.critical("cannot start: {error}; stopping", error=failure.getErrorMessage())
        self.reactor.callWhenRunning(self.reactor.stop)

    def _reload_keys_on_sighup(self) -> None:
        import signal

        def on_sighup(signum: int, frame: object) -> None:
            self.reactor.callFromThread(self.reload_keys)

        signal.signal(signal.SIGHUP, on_sighup)

    def reload_keys(self) -> None:
        """Re-read AUTH_TOKENS_FILE; keep the old keys if it is broken.
        (SIGHUP must never stop the server, whatever is configured.)"""
        write_keys = self.parts.write_keys
        if write_keys is None:
            _log.info("SIGHUP: nothing to reload (AUTH_TOKENS_FILE is not set)")
            return
        try:
            count = write_keys.reload()
        except TokensFileError as error:
            _log.error("keeping the current write keys: {error}", error=str(error))
            return
        _log.info("reloaded {count} write keys from {path}", count=count,
                  path=write_keys.path)

    def stopService(self) -> "Deferred[None]":
        if self._stopping is None:
            Service.stopService(self)  # the children stop in order, in _stop
            if self.lifecycle.phase is Phase.STARTING:
                # A start still under way finishes, but never becomes ready:
                # no balancer sent anything, so no DRAIN_DELAY either.
                self.lifecycle.start_draining()
            self._stopping = Deferred.fromCoroutine(self._stop())
        return self._stopping

    async def _stop(self) -> None:
        """The ordered stop, bounded by DRAIN_DELAY + SHUTDOWN_TIMEOUT:
        1. leave: /readyz answers 503 for DRAIN_DELAY while /collect is
           served as before, so that load balancers take the host out
           (skipped when the server never became ready);
        2. stop accepting: /collect answers 503, the ports close;
        3. idle keep-alive connections close, busy ones get their answer;
        4. the open batch and the event queue are flushed into batches;
        5. every upload finishes; SHUTDOWN_TIMEOUT after step 2 what is left
           is cancelled and goes to the dead-letter directory instead
           (never dropped);
        6. the store, the admin listener and the thread pool stop."""
        parts = self.parts
        if self._started is not None:
            # A start still under way (a slow dead-letter scan, say) must
            # not hold up a SIGTERM: cancel it; one that failed has said so.
            self._started.cancel()
            await self._started
        begun = self.reactor.seconds()
        delay, timeout = self.settings.drain_delay, self.settings.shutdown_timeout
        if self.own_signals:
            ignore_further_signals(timeout)
        if self.lifecycle.running and delay > 0:
            self.lifecycle.start_leaving()
            _log.info("stopping: /readyz answers 503, still accepting events for "
                      "{delay}s (DRAIN_DELAY) so that load balancers take this host out",
                      delay=delay)
            await deferLater(self.reactor, delay, lambda: None)
        started_at = self.reactor.seconds()
        self.lifecycle.start_draining()
        _log.info("stopping: no longer accepting events (deadline {timeout}s)",
                  timeout=timeout)
        await DeferredList([listener.stopService() for listener in self.ingest_listeners])
        await parts.listener.close_connections(grace=min(5.0, timeout / 3))
        if self.batcher_service.running:
            await self.batcher_service.stopService()
        queued, open_events = len(parts.queue), parts.batcher.open_events()
        parts.batcher.flush_all()
        _log.info("flushed {events} queued events; waiting for {batches} batches to upload "
                  "({in_flight} in flight)", events=queued + open_events,
                  batches=parts.uploader.unfinished(), in_flight=parts.uploader.in_flight())
        await self.drain_service.stopService()
        abandoned = await self._uploads_finished(deadline=started_at + timeout)
        if parts.wal is not None:
            await parts.wal.writer.close()
            parts.wal.pool.stop()
        await parts.store.close()
        await self.admin_listener.stopService()
        self.pool_service.stopService()
        self.lifecycle.stopped()
        _log.info("stopped in {seconds:.1f}s: every accepted event is {where}",
                  seconds=self.reactor.seconds() - begun,
                  where="stored, dead-lettered or in the write-ahead log, replayed at "
                  "the next start" if abandoned else "stored or dead-lettered")

    async def _uploads_finished(self, deadline: float) -> bool:
        """Wait for every upload; at `deadline`, cancel those under way and
        send what is left to the dead-letter directory, then wait for that.
        In durable mode what is left stays in the write-ahead log instead
        (answers True then)."""
        uploader = self.parts.uploader
        idle = uploader.when_idle()
        idle.addTimeout(max(0.0, deadline - self.reactor.seconds()), self.reactor)
        try:
            await idle
            return False
        except TimeoutError:
            pass
        if self.parts.wal is not None:
            _log.warn("shutdown deadline of {seconds}s reached: cancelling uploads; their "
                      "batches stay in the write-ahead log and are replayed at the next "
                      "start", seconds=self.settings.shutdown_timeout)
            uploader.abandon()
            await uploader.when_idle()
            return True
        _log.warn("shutdown deadline of {seconds}s reached: cancelling uploads, "
                  "their batches go to the dead-letter directory",
                  seconds=self.settings.shutdown_timeout)
        uploader.cancel_in_flight()
        await uploader.when_idle()
        return False
