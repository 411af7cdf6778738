"""`estat-dlq replay`: re-upload entries now, on the reactor, with the
store the server would use (S3 when S3_BUCKET is set, else the local
directory), one entry at a time, each locked while it is uploaded."""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry
from twisted.internet.defer import inlineCallbacks
from twisted.python.threadpool import ThreadPool

from estat.config import Settings
from estat.dlq import disk as dlqdisk
from estat.metrics import Metrics
from estat.stores.base import RetryableStoreError, Store, StoreError


def make_store(settings: Settings, reactor: Any, pool: ThreadPool) -> Store:
    """The server's own choice of store, with metrics nobody scrapes."""
    from estat.service import make_store as server_store

    return server_store(settings, reactor, pool, Metrics(CollectorRegistry(), process=False))


@inlineCallbacks
def replay_all(reactor: Any, settings: Settings, root: str, names: list[str],
               report: Any, explicit: bool):  # type: ignore[no-untyped-def]
    """Replay `names` in order; failures go to `report`. With `explicit`
    (IDs named on the command line) a locked entry is a failure; with
    --all it is the server's drain at work and is skipped."""
    pool = ThreadPool(minthreads=0, maxthreads=2, name="estat-dlq")
    pool.start()
    try:
        store = make_store(settings, reactor, pool)
        try:
            for name in names:
                yield replay_one(store, root, name, report, explicit)
        finally:
            close = getattr(store, "close", None)  # the S3 store's connections
            if close is not None:
                yield close()
    finally:
        pool.stop()


@inlineCallbacks
def replay_one(store: Store, root: str, name: str, report: Any,
               explicit: bool):  # type: ignore[no-untyped-def]
    try:
        entry = dlqdisk.claim(root, name)
    except dlqdisk.Busy:
        if explicit:
            report.fail(f"{name} is being uploaded by another process (the server's "
                        "drain?); try again in a moment.")
        else:
            report.note(f"skipped {name}: another process (the server's drain?) is "
                        "uploading it")
        return
    except FileNotFoundError:
        report.note(f"skipped {name}: already gone (re-uploaded or purged meanwhile)")
        return
    except dlqdisk.EntryError as error:
        report.fail(f"{name} cannot be read ({error}); not replayed, the server moves "
                    "it to quarantine/ at its next start.")
        return
    obj = entry.as_object()
    try:
        yield store.put(obj)
    except Exception as error:
        if not isinstance(error, StoreError):
            error = RetryableStoreError("io_error", type(error).__name__, str(error))
        meta = dlqdisk.record_failure(entry.meta, error, int(time.time() * 1000))
        try:
            dlqdisk.update_meta(root, entry, meta)
        finally:
            dlqdisk.release(entry)
        report.fail(f"could not replay {name} to the {store.name} store: {error.code}: "
                    f"{error.message} (attempt {meta['attempts']}; the entry is kept).")
        return
    dlqdisk.remove_entry(root, entry)
    report.say(f"replayed {name}: {obj.event_count} events stored as {obj.key}")
