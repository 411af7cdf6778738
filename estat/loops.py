"""Background loops that never end by accident.

A `LoopingCall` stops for good the first time its function raises (or its
Deferred fails), and nothing says so unless someone attached an errback.
`guarded` wraps a tick so an error is logged with the loop's name, counted
in `estat_loop_errors_total{loop=...}`, and the loop goes on; `LoopService`
is Twisted's `TimerService` for such a tick, on an injected clock, so a
loop starts with `startService` and `stopService` waits for its last tick.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from prometheus_client import Counter
from twisted.application.internet import TimerService
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

_log = Logger()

Tick = Callable[[], Optional["Deferred[Any]"]]


def guarded(name: str, errors: Counter, tick: Tick) -> Callable[[], "Deferred[None]"]:
    """`tick`, made unable to fail: an exception it raises, or a failure of
    the Deferred it returns, is logged and counted under `name`, and the
    returned Deferred fires with None once the tick is done."""
    counter = errors.labels(loop=name)

    def failed(failure: Failure) -> None:
        counter.inc()
        _log.failure("unexpected error in the {loop} loop; it goes on", failure=failure,
                     loop=name)

    def run() -> "Deferred[None]":
        d: "Deferred[Any]" = maybeDeferred(tick)
        return d.addCallbacks(lambda _: None, failed)

    return run


class LoopService(TimerService):
    """Runs a guarded `tick` every `interval` seconds on `clock` while the
    service runs (the first at the start, as TimerService does); `stopService`
    fires once the tick under way has returned."""

    def __init__(self, name: str, interval: float, tick: Tick, errors: Counter,
                 clock: IReactorTime) -> None:
        super().__init__(interval, guarded(name, errors, tick))
        self.setName(name)
        self.clock = clock
