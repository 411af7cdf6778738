"""Answers that wait (durable mode: a 202 waits for its fsync): the
channel writes them in request order, reads nothing more meanwhile, and
takes a connection lost while one waits in its stride."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial import unittest

from estat.collect import IngestState
from estat.http.channel import IngestListener
from estat.http.request import IngestRequest
from estat.http.response import Answer
from estat.lifecycle import Lifecycle
from estat.metrics import Metrics
from estat.pipeline.queue import EventQueue
from tests.support import TEST_LIMITS, Exchange, post_bytes


class DeferredAnswers(unittest.TestCase):
    def setUp(self) -> None:
        self.pending: list[Deferred[Answer]] = []
        self.handled: list[bytes] = []
        lifecycle = Lifecycle()
        lifecycle.start_running()
        state = IngestState(EventQueue(10), Metrics(CollectorRegistry(), process=False),
                            validate_json=False, lifecycle=lifecycle)
        self.listener = IngestListener(handler=self._handle, limits=TEST_LIMITS,
                                       counters=state, lifecycle=lifecycle, reactor=Clock())
        self.exchange = Exchange(self.listener)

    def _handle(self, request: IngestRequest) -> Any:
        self.handled.append(request.body)
        if request.body.startswith(b"now"):
            return Answer(200, request.body)
        d: Deferred[Answer] = Deferred()
        self.pending.append(d)
        return d

    def test_answers_are_written_in_request_order(self):
        self.exchange.send(post_bytes(b"wait-1") + post_bytes(b"now-2") + post_bytes(b"wait-3"))
        self.assertEqual(self.exchange.responses(), [])
        self.pending[-1].callback(Answer(202, b"three"))
        self.assertEqual(self.exchange.responses(), [])  # the first still waits
        self.pending[0].callback(Answer(202, b"one"))
        self.assertEqual([(code, body) for code, _, body in self.exchange.responses()],
                         [(202, b"one"), (200, b"now-2"), (202, b"three")])

    def test_reading_pauses_while_an_answer_waits(self):
        self.exchange.send(post_bytes(b"wait-1"))
        self.assertEqual(self.exchange.transport.producerState, "producing")
        self.exchange.send(post_bytes(b"now-2"))  # held, not handled yet
        self.assertEqual(self.handled, [b"wait-1"])
        self.assertEqual(self.exchange.transport.producerState, "paused")
        self.pending[0].callback(Answer(202, b"one"))
        self.assertEqual(self.exchange.transport.producerState, "producing")
        self.assertEqual(self.handled, [b"wait-1", b"now-2"])
        self.assertEqual([body for _, _, body in self.exchange.responses()],
                         [b"one", b"now-2"])

    def test_a_connection_lost_while_waiting_drops_the_answer(self):
        self.exchange.send(post_bytes(b"wait-1"))
        self.exchange.channel.connectionLost()
        self.pending[0].callback(Answer(202, b"one"))
        self.assertEqual(self.exchange.responses(), [])

    def test_a_failed_answer_is_a_500(self):
        self.exchange.send(post_bytes(b"wait-1"))
        self.pending[0].errback(RuntimeError("bug"))
        self.assertEqual([code for code, _, _ in self.exchange.responses()], [500])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_a_busy_connection_is_not_idle_until_answered(self):
        self.exchange.send(post_bytes(b"wait-1"))
        self.assertFalse(self.exchange.channel.idle())
        self.exchange.channel.close_if_idle()
        self.pending[0].callback(Answer(202, b"one"))
        self.assertEqual([body for _, _, body in self.exchange.responses()], [b"one"])

    def test_a_refusal_behind_a_waiting_answer_comes_after_it(self):
        """A pipelined request the channel refuses itself (here: a body
        over the limit) while an earlier answer waits: the client reads
        the earlier answer first, then the refusal."""
        too_large = b"x" * (self.listener.limits.max_body_size + 1)
        self.exchange.send(post_bytes(b"wait-1") + post_bytes(too_large))
        self.assertEqual(self.exchange.responses(), [])
        self.pending[0].callback(Answer(202, b"one"))
        self.assertEqual([code for code, _, _ in self.exchange.responses()], [202, 413])

    def test_a_connection_waiting_for_its_answer_is_never_evicted(self):
        self.exchange.send(post_bytes(b"wait-1"))
        self.assertFalse(self.exchange.channel.evictable())
        self.pending[0].callback(Answer(202, b"one"))
        self.assertTrue(self.exchange.channel.evictable())
