"""LoopService and guarded: a failing tick is logged and counted and the
loop goes on; the stop waits for the tick under way."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter
from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock
from twisted.trial import unittest

from estat.loops import LoopService


class LoopServiceTests(unittest.TestCase):
    def setUp(self) -> None:
        self.errors = Counter("loop_errors", "", ["loop"], registry=CollectorRegistry())
        self.clock = Clock()

    def errors_of(self, name: str) -> float:
        return self.errors.labels(loop=name)._value.get()

    def test_errors_are_counted_and_the_loop_goes_on(self) -> None:
        calls = []

        def tick() -> None:
            calls.append(self.clock.seconds())
            if len(calls) == 1:
                raise RuntimeError("boom")
            if len(calls) == 2:
                return fail(ValueError("async boom"))  # type: ignore[return-value]

        service = LoopService("test", 1.0, tick, self.errors, self.clock)
        service.startService()
        self.clock.advance(1.0)
        self.clock.advance(1.0)
        self.assertEqual(calls, [0.0, 1.0, 2.0])
        self.assertEqual(self.errors_of("test"), 2)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError, ValueError)), 2)
        self.successResultOf(service.stopService())

    def test_stop_waits_for_the_tick_under_way(self) -> None:
        pending: Deferred[None] = Deferred()
        service = LoopService("slow", 1.0, lambda: pending, self.errors, self.clock)
        service.startService()
        stopped = service.stopService()
        self.assertNoResult(stopped)
        pending.callback(None)
        self.successResultOf(stopped)
        self.assertEqual(self.errors_of("slow"), 0)
