"""`estat-dlq replay`: re-upload entries now, on the reactor, with the
store the server would use (S3 when S3_BUCKET is set, else the local
directory), one entry at a time, each locked while it is uploaded."""

from __future__ import annotations

import time
from typing import Protocol

from prometheus_client import CollectorRegistry
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFromThreads
from twisted.python.threadpool import ThreadPool

from estat.config import Settings
from estat.dlq import disk as dlqdisk
from estat.metrics import Metrics
from estat.stores.base import Store, StoreError, as_store_error
from estat.stores.factory import make_store


class Report(Protocol):
    """Where replay says what it did (the CLI's Reporter)."""

    def say(self, text: str) -> None: ...

    def note(self, text: str) -> None: ...

    def fail(self, text: str) -> None: ...


def replay_all(reactor: IReactorFromThreads, settings: Settings, root: str,
               names: list[str], report: Report, explicit: bool) -> "Deferred[None]":
    """Replay `names` in order; failures go to `report`. With `explicit`
    (IDs named on the command line) a locked entry is a failure; with
    --all it is the server's drain at work and is skipped."""
    return Deferred.fromCoroutine(_replay_all(reactor, settings, root, names, report,
                                              explicit))


async def _replay_all(reactor: IReactorFromThreads, settings: Settings, root: str,
                      names: list[str], report: Report, explicit: bool) -> None:
    pool = ThreadPool(minthreads=0, maxthreads=2, name="estat-dlq")
    pool.start()
    try:
        # The server's own choice of store, with metrics nobody scrapes.
        metrics = Metrics(CollectorRegistry(), process=False)
        store = make_store(settings, reactor, pool, metrics)
        try:
            for name in names:
                await replay_one(store, root, name, report, explicit)
        finally:
            await store.close()
    finally:
        pool.stop()


async def replay_one(store: Store, root: str, name: str, report: Report,
                     explicit: bool) -> None:
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
    except dlqdisk.EntryError as unreadable:
        report.fail(f"{name} cannot be read ({unreadable}); not replayed, the server moves "
                    "it to quarantine/ at its next start.")
        return
    obj = entry.as_object()
    try:
        await store.put(obj)
    except Exception as exception:
        failed(store, root, entry, as_store_error(exception), report)
        return
    dlqdisk.remove_entry(root, entry)
    report.say(f"replayed {name}: {obj.event_count} events stored as {obj.key}")


def failed(store: Store, root: str, entry: dlqdisk.Entry, error: StoreError,
           report: Report) -> None:
    """Count the attempt in the entry's meta.json, release it, say why."""
    meta = dlqdisk.record_failure(entry.meta, error, int(time.time() * 1000))
    try:
        dlqdisk.update_meta(root, entry, meta)
    finally:
        dlqdisk.release(entry)
    report.fail(f"could not replay {entry.name} to the {store.name} store: {error.code}: "
                f"{error.message} (attempt {meta['attempts']}; the entry is kept).")
