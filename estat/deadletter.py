"""Dead-letter queue (interim: the spool on disk is being built in its own
issue). Until then an object that cannot be stored is counted and logged
as dropped, so the loss is visible."""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from estat.encode import EncodedObject
from estat.metrics import Metrics
from estat.store import Store, StoreError

_log = Logger()


class DeadLetterQueue:
    def __init__(self, directory: str, max_bytes: int, reactor: Any, pool: Any,
                 metrics: Metrics, drain_interval: float = 1.0) -> None:
        self.metrics = metrics

    def open(self) -> "Deferred[None]":
        return succeed(None)

    def save(self, obj: EncodedObject, error: StoreError) -> "Deferred[None]":
        self.metrics.dlq_dropped_events.labels(reason="save_error").inc(obj.event_count)
        _log.error("dropped {events} events of {key}: no dead-letter spool yet",
                   events=obj.event_count, key=obj.key)
        return succeed(None)

    def start_draining(self, store: Store, is_idle: Callable[[], bool]) -> None:
        pass

    def stop_draining(self) -> "Deferred[None]":
        return succeed(None)
