"""The dead-letter queue: objects the store could not take are spooled to
DLQ_DIR (crash-safe, within a byte budget) and re-uploaded later, one entry
per idle tick, oldest first, under the same key.

Every file operation runs on the service's thread pool; the format lives
in `estat.dlq.disk`. `save` never fails: what it cannot keep it counts and
logs. The drain tick is `estat.loops.guarded`: an error in it is logged
and counted, and the loop goes on.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Optional, cast

from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

import estat
from estat.codec import EncodeFailed
from estat.dlq import disk as dlqdisk
from estat.loops import guarded
from estat.metrics import Metrics
from estat.model import EncodedObject
from estat.stores.base import PermanentStoreError, Store, StoreError, as_store_error

_log = Logger()

BACKOFF_CAP = 300.0


class _Cancelled:
    """A re-upload stopped at shutdown: not an attempt."""


_CANCELLED = _Cancelled()


class DeadLetterQueue:
    """The spool in `directory` and its drain loop (see the module doc).
    `reactor` is the clock of the loop and of entry ages, and takes the
    results of the work done on `pool` back to its thread."""

    def __init__(self, directory: str, max_bytes: int, reactor: IReactorTime,
                 pool: ThreadPool, metrics: Metrics, drain_interval: float = 1.0,
                 backoff_cap: float = BACKOFF_CAP, behind_wal: bool = False) -> None:
        self.directory = os.path.abspath(directory)
        # ACK_MODE=durable: what cannot be spooled is not lost, it stays in
        # the write-ahead log (the uploader counts it there).
        self.behind_wal = behind_wal
        self.max_bytes = max_bytes
        self.drain_interval = drain_interval
        self.backoff_cap = backoff_cap
        self._reactor = reactor
        self._pool = pool
        self._metrics = metrics
        self._entries: dict[str, tuple[int, int]] = {}  # name -> (bytes, created ms)
        self._bytes = 0
        self._reserved = 0  # bytes of saves under way, held against the budget
        self._oldest_ms: Optional[int] = None
        self._loop: Optional[LoopingCall] = None
        self._loop_done: Optional[Deferred] = None
        self._store: Optional[Store] = None
        self._is_idle: Callable[[], bool] = lambda: False
        self._put: Optional[Deferred] = None
        self._stopping = False
        self._not_before = 0.0
        self._permanent_failures = 0
        metrics.dlq_entries.set_function(lambda: len(self._entries))
        metrics.dlq_bytes.set_function(lambda: self._bytes)
        metrics.dlq_oldest_entry_age.set_function(self._oldest_age)

    # -- bookkeeping -----------------------------------------------------

    def _now_ms(self) -> int:
        return int(self._reactor.seconds() * 1000)

    def _oldest_age(self) -> float:
        oldest = self._oldest_ms
        if oldest is None:
            return 0.0
        return max(0.0, self._reactor.seconds() - oldest / 1000)

    def _set_entries(self, entries: dict[str, tuple[int, int]]) -> None:
        self._entries = entries
        self._recount()

    def _add(self, name: str, size: int, created_ms: int) -> None:
        self._entries[name] = (size, created_ms)
        self._recount()

    def _forget(self, name: str) -> None:
        if self._entries.pop(name, None) is not None:
            self._recount()

    def _recount(self) -> None:
        values = list(self._entries.values())
        self._bytes = sum(size for size, _ in values)
        self._oldest_ms = min((created for _, created in values), default=None)

    def entry_names(self) -> list[str]:
        """Entries this server knows of, oldest first."""
        return sorted(self._entries)

    def _run(self, f: Callable[..., Any], *args: Any) -> "Deferred[Any]":
        threads = cast(IReactorFromThreads, self._reactor)
        return deferToThreadPool(threads, self._pool, f, *args)

    def _log_quarantined(self, quarantined: list[tuple[str, str, str]]) -> None:
        for name, reason, where in quarantined:
            self._metrics.dlq_quarantined_entries.inc()
            _log.error("dead-letter entry {entry} cannot be read ({reason}); moved to "
                       "{where} for inspection, it will not be re-uploaded",
                       entry=name, reason=reason, where=where)

    # -- start-up ----------------------------------------------------------

    def open(self) -> "Deferred[None]":
        """Create the directory, clean up after a crash, quarantine broken
        entries and load the rest. Fails only when cancelled (a stop before
        the start finished: it fires at once, whatever the scan's thread is
        doing, and the scan's late result is ignored); a directory that
        cannot be read is logged, and saves will then count their drops."""
        d = self._run(dlqdisk.open_directory, self.directory)
        d.addCallbacks(self._opened, self._open_failed)
        return d

    def _opened(self, scan: dlqdisk.Scan) -> None:
        if scan.removed:
            _log.info("removed {count} leftovers of interrupted dead-letter writes in "
                      "{directory}", count=len(scan.removed), directory=self.directory)
        for path, why in scan.kept:
            self._metrics.dlq_scan_errors.inc()
            _log.error("could not remove {path} from the dead-letter directory {directory} "
                       "({why}); it is skipped, every entry is still loaded: remove it by "
                       "hand", path=path, why=why, directory=self.directory)
        self._log_quarantined(scan.quarantined)
        self._set_entries(scan.entries)
        _log.info("dead-letter directory {directory}: {entries} entries, {bytes} bytes "
                  "of {max_bytes}", directory=self.directory, entries=len(self._entries),
                  bytes=self._bytes, max_bytes=self.max_bytes)

    def _open_failed(self, failure: Failure) -> Optional[Failure]:
        if failure.check(CancelledError):
            return failure
        _log.error("cannot open the dead-letter directory {directory}: {error}; failed "
                   "uploads will be dropped until it is usable (check DLQ_DIR and its "
                   "permissions)", directory=self.directory,
                   error=failure.getErrorMessage())
        return None

    # -- saving ----------------------------------------------------------

    def save(self, obj: EncodedObject, error: StoreError) -> "Deferred[bool]":
        """Spool `obj`, or drop it (counted, logged) when over the budget or
        when it cannot be written. The Deferred never fails: it fires with
        whether `obj` was kept (durable mode then keeps a dropped object's
        events in the write-ahead log instead)."""
        try:
            created_ms = self._now_ms()
            meta = dlqdisk.encode_meta(
                dlqdisk.make_meta(obj, error, created_ms, estat.__version__))
            name = dlqdisk.entry_name(created_ms, obj)
            size = dlqdisk.entry_size(obj.data, meta)
        except Exception:
            _log.failure("cannot describe {key} for the dead-letter directory", key=obj.key)
            self._drop(obj, "save_error", "it could not be described")
            return succeed(False)
        if self._bytes + self._reserved + size > self.max_bytes:
            self._drop(obj, "over_budget",
                       f"DLQ_MAX_BYTES={self.max_bytes} would be exceeded "
                       f"({self._bytes + self._reserved} bytes spooled, {size} more); "
                       "restore the store or raise DLQ_MAX_BYTES")
            return succeed(False)
        self._reserved += size
        d = self._run(dlqdisk.write_entry, self.directory, name, obj.data, meta)

        def saved(_: object) -> bool:
            self._reserved -= size
            self._add(name, size, created_ms)
            self._metrics.dlq_events_enqueued.inc(obj.event_count)
            _log.info("saved {key} ({events} events) to dead-letter entry {entry}",
                      key=obj.key, events=obj.event_count, entry=name)
            return True

        def failed(failure: Failure) -> bool:
            self._reserved -= size
            self._drop(obj, "save_error",
                       f"it could not be written to {self.directory}: "
                       f"{failure.getErrorMessage()}; check free space and permissions")
            return False

        kept: Deferred[bool] = d.addCallbacks(saved, failed)
        return kept

    def salvage(self, failed: EncodeFailed) -> "Deferred[bool]":
        """Spool the bodies of a batch that could not be encoded (its
        salvage object), or count and log them as lost when even that
        could not be built. The Deferred never fails: it fires with whether
        they were kept, as `save`'s does."""
        if failed.salvage is None:
            self._lost(failed.batch.event_count, f"batch {failed.batch.batch_id}",
                       "encode_error", "it could not be encoded, not even as base64 lines "
                       f"({type(failed.cause).__name__}: {failed.cause})")
            return succeed(False)
        _log.error("could not encode batch {batch_id} ({events} events): {error}; saving its "
                   "bodies as base64 lines in {key} to the dead-letter directory",
                   batch_id=failed.batch.batch_id, events=failed.salvage.event_count,
                   error=str(failed.cause), key=failed.salvage.key)
        return self.save(failed.salvage, PermanentStoreError(
            "encode_error", type(failed.cause).__name__, str(failed.cause)))

    def _drop(self, obj: EncodedObject, reason: str, why: str) -> None:
        self._lost(obj.event_count, obj.key, reason, why)

    def _lost(self, events: int, what: str, reason: str, why: str) -> None:
        if self.behind_wal:
            _log.error("could not dead-letter {events} events of {key} because {why}; "
                       "they stay in the write-ahead log until the next start",
                       events=events, key=what, why=why, reason=reason)
            return
        self._metrics.dlq_dropped_events.labels(reason=reason).inc(events)
        _log.error("LOST {events} events of {key}: not dead-lettered because {why}",
                   events=events, key=what, why=why, reason=reason)

    # -- draining --------------------------------------------------------

    def start_draining(self, store: Store, is_idle: Callable[[], bool]) -> None:
        """Re-upload one entry per tick while `is_idle()`, oldest first; the
        first tick comes one interval after the start."""
        self._store = store
        self._is_idle = is_idle
        self._stopping = False
        self._loop = LoopingCall(guarded("dlq", self._metrics.loop_errors, self._tick))
        self._loop.clock = self._reactor
        self._loop_done = self._loop.start(self.drain_interval, now=False)

    def stop_draining(self) -> "Deferred[None]":
        """Stop the loop; a re-upload in flight is cancelled (its entry stays
        and is re-uploaded later, same key) and the tick is waited for."""
        loop, done = self._loop, self._loop_done
        self._loop = self._loop_done = None
        if loop is None or done is None or not loop.running:
            return succeed(None)
        self._stopping = True
        if self._put is not None:
            self._put.cancel()
        loop.stop()
        return done.addCallback(lambda _: None)

    def _tick(self) -> Optional["Deferred[None]"]:
        """Drain one entry if there is one, it is time, and the uploader is
        idle. (`guarded` logs and counts what goes wrong here.)"""
        waiting = self._reactor.seconds() < self._not_before
        if self._stopping or not self._entries or waiting or not self._is_idle():
            return None
        return Deferred.fromCoroutine(self._drain_one())

    async def _drain_one(self) -> None:
        pick: dlqdisk.Pick = await self._run(
            dlqdisk.claim_oldest, self.directory, self.entry_names())
        for name in pick.gone:
            self._forget(name)
        for name, _, _ in pick.quarantined:
            self._forget(name)
        self._log_quarantined(pick.quarantined)
        entry = pick.entry
        if entry is None:
            return
        if self._stopping or self._store is None:
            await self._run(dlqdisk.release, entry)
            return
        error = await self._reupload(self._store, entry)
        if error is None:
            await self._succeeded(entry)
        elif isinstance(error, _Cancelled):
            await self._run(dlqdisk.release, entry)
        else:
            await self._failed(entry, error)

    async def _reupload(self, store: Store,
                        entry: dlqdisk.Entry) -> Optional[StoreError | _Cancelled]:
        """Put the entry's object: None once stored, else the StoreError, or
        _CANCELLED when the drain stopped meanwhile."""
        self._put = store.put(entry.as_object())
        try:
            await self._put
        except CancelledError:
            return _CANCELLED
        except Exception as error:
            return as_store_error(error)
        finally:
            self._put = None
        return None

    async def _succeeded(self, entry: dlqdisk.Entry) -> None:
        self._permanent_failures = 0
        self._not_before = 0.0
        events = entry.events  # lines uploaded, not what meta.json claims
        self._metrics.dlq_events_reuploaded.inc(events)
        if self._store is not None:
            self._metrics.count_stored(self._store.name, "dlq", events, len(entry.data))
        self._forget(entry.name)
        _log.info("re-uploaded dead-letter entry {entry} ({events} events) as {key}",
                  entry=entry.name, events=events, key=entry.meta["key"])
        try:
            await self._run(dlqdisk.remove_entry, self.directory, entry)
        except OSError as error:
            # Stored, but still on disk: the next run uploads it again under
            # the same key, which overwrites rather than duplicates.
            _log.error("re-uploaded {entry} but could not delete it: {error}",
                       entry=entry.name, error=str(error))

    async def _failed(self, entry: dlqdisk.Entry, error: StoreError) -> None:
        if isinstance(error, PermanentStoreError):
            self._permanent_failures += 1
            delay = min(self.backoff_cap,
                        self.drain_interval * 2 ** self._permanent_failures)
            self._not_before = self._reactor.seconds() + delay
        else:
            self._permanent_failures = 0
            self._not_before = 0.0
            delay = self.drain_interval
        meta = dlqdisk.record_failure(entry.meta, error, self._now_ms())
        # During an outage the same entry fails every tick: log the 2nd, 4th,
        # 8th... attempt and any change of error, not every second.
        attempts = meta["attempts"]
        previous = (entry.meta.get("last_error") or {}).get("code")
        noteworthy = attempts & (attempts - 1) == 0 or previous != error.code
        log = _log.warn if noteworthy else _log.debug
        log("re-upload of dead-letter entry {entry} failed (attempt {attempts}): "
            "{code}: {message}; next try in {delay}s", entry=entry.name,
            attempts=attempts, code=error.code, message=error.message,
            reason=error.reason, delay=delay)
        encoded = dlqdisk.encode_meta(meta)
        await self._run(dlqdisk.update_meta, self.directory, entry, meta)
        if entry.name in self._entries:
            created_ms = self._entries[entry.name][1]
            self._add(entry.name, dlqdisk.entry_size(entry.data, encoded), created_ms)
