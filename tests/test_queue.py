"""The event queue: all-or-nothing admission within its capacity in events
and bytes, and FIFO takes bounded by count and bytes."""

from __future__ import annotations

import random

from twisted.trial import unittest

from estat.model import Chunk, Event, Lines, events_in
from estat.pipeline.queue import EventQueue


def sized(*sizes: int) -> list[Chunk]:
    """One chunk of one event per size, received at 0, 1, 2…"""
    return [Chunk(n, [b"x" * size]) for n, size in enumerate(sizes)]


def times(chunks: list[Chunk]) -> list[int]:
    return [event.ts for event in events_in(chunks)]


class OfferTests(unittest.TestCase):
    def test_offers_within_capacity_are_queued_in_order(self):
        queue = EventQueue(5)
        self.assertTrue(queue.offer(sized(1)))
        self.assertTrue(queue.offer([Chunk(7, [b"ab", b"cde"], "w")]))
        self.assertEqual(list(queue), [Event(0, b"x"), Event(7, b"ab", "w"),
                                       Event(7, b"cde", "w")])
        self.assertEqual((len(queue), queue.room(), queue.bytes), (3, 2, 6))

    def test_an_offer_that_does_not_fit_is_refused_whole(self):
        queue = EventQueue(3)
        self.assertTrue(queue.offer(sized(1, 1)))
        self.assertFalse(queue.offer(sized(1, 1)))
        self.assertEqual((len(queue), queue.bytes), (2, 2))
        self.assertTrue(queue.offer(sized(4)))
        self.assertEqual(queue.room(), 0)
        self.assertFalse(queue.offer(sized(1)))
        self.assertEqual((len(queue), queue.bytes), (3, 6))

    def test_a_byte_capacity_refuses_whole_offers_too(self):
        queue = EventQueue(100, max_bytes=10)
        self.assertTrue(queue.offer(sized(4, 4)))
        self.assertFalse(queue.offer(sized(1, 2)))
        self.assertTrue(queue.offer(sized(2)))
        self.assertFalse(queue.offer(sized(1)))
        self.assertEqual((len(queue), queue.bytes), (3, 10))
        self.assertEqual(queue.room(), 0)  # full by bytes: not ready

    def test_iterating_gives_a_copy(self):
        queue = EventQueue(5)
        queue.offer(sized(1, 2))
        for _ in queue:
            queue.take(1, 100)
        self.assertEqual(len(queue), 0)

    def test_a_queue_holds_at_least_one_event(self):
        self.assertRaises(ValueError, EventQueue, 0)


class TakeTests(unittest.TestCase):
    def setUp(self) -> None:
        self.queue = EventQueue(10)
        self.queue.offer(sized(3, 3, 3, 3, 3))

    def test_takes_the_oldest_up_to_the_count(self):
        self.assertEqual(times(self.queue.take(2, 1000)), [0, 1])
        self.assertEqual(times(self.queue.take(2, 1000)), [2, 3])
        self.assertEqual((len(self.queue), self.queue.bytes), (1, 3))

    def test_stops_once_the_bytes_are_reached_including_that_event(self):
        self.assertEqual(times(self.queue.take(10, 7)), [0, 1, 2])
        self.assertEqual(times(self.queue.take(10, 6)), [3, 4])
        self.assertEqual((len(self.queue), self.queue.bytes), (0, 0))

    def test_one_event_however_large(self):
        queue = EventQueue(3)
        queue.offer(sized(50, 1))
        self.assertEqual(times(queue.take(5, 10)), [0])
        self.assertEqual(times(queue.take(5, 0)), [1])

    def test_empty_queue_or_no_count_takes_nothing(self):
        self.assertEqual(self.queue.take(0, 1000), [])
        self.assertEqual(len(self.queue), 5)
        self.assertEqual(EventQueue(1).take(5, 5), [])

    def test_taking_makes_room(self):
        self.queue.offer(sized(1, 1, 1, 1, 1))
        self.assertFalse(self.queue.offer(sized(1)))
        self.queue.take(2, 1000)
        self.assertEqual(self.queue.room(), 2)
        self.assertTrue(self.queue.offer(sized(1, 1)))


class TakeCutTests(unittest.TestCase):
    """`take`'s cut (found by bisection) is the one a walk over the events
    gives, for any mix of offers and takes, sizes and budgets, and of
    chunks of bodies and NDJSON texts."""

    def test_take_matches_a_walk_over_the_events(self):
        rng = random.Random(7)
        queue = EventQueue(10_000, max_bytes=50_000)
        mirror: list[Event] = []
        for step in range(3000):
            if rng.random() < 0.6:
                chunks = []
                for c in range(rng.choice((1, 1, 1, 2, 3))):
                    bodies = [b"x" * rng.choice((0, 1, 5, 40, 300))
                              for _ in range(rng.randint(1, 30))]
                    if rng.random() < 0.5:  # an NDJSON text, kept whole
                        chunks.append(Chunk(step * 10 + c, Lines(
                            b"".join(body + b"\n" for body in bodies), len(bodies))))
                    else:
                        chunks.append(Chunk(step * 10 + c, bodies))
                if queue.offer(chunks):
                    mirror.extend(events_in(chunks))
            else:
                max_events = rng.randint(0, 60)
                max_bytes = rng.choice((0, 1, 10, 100, 1000, 5000))
                size = taken = 0
                while taken < min(max_events, len(mirror)):
                    size += len(mirror[taken].body)
                    taken += 1
                    if size >= max_bytes:
                        break
                expected, mirror[:taken] = mirror[:taken], []
                chunks = queue.take(max_events, max_bytes)
                self.assertEqual(events_in(chunks), expected)
                self.assertTrue(all(chunk.bodies for chunk in chunks))
                self.assertEqual([chunk.size for chunk in chunks],
                                 [sum(map(len, chunk.bodies)) for chunk in chunks])
            self.assertEqual(queue.bytes, sum(len(e.body) for e in mirror))
            self.assertEqual(len(queue), len(mirror))
            self.assertEqual(list(queue), mirror)


class ChunkTests(unittest.TestCase):
    def test_a_chunk_is_cut_where_a_take_ends_and_the_rest_stays_first(self):
        queue = EventQueue(100)
        queue.offer([Chunk(1, [b"a", b"b", b"c", b"d"], "w", True), Chunk(2, [b"e"])])
        [front] = queue.take(3, 1000)
        self.assertEqual(front, Chunk(1, [b"a", b"b", b"c"], "w", True, 3))
        self.assertEqual(queue.take(10, 1000), [Chunk(1, [b"d"], "w", True, 1),
                                                Chunk(2, [b"e"], "", False, 1)])
        self.assertEqual((len(queue), queue.bytes), (0, 0))

    def test_an_offer_of_several_chunks_is_taken_or_refused_whole(self):
        queue = EventQueue(4)
        self.assertFalse(queue.offer([Chunk(1, [b"a", b"b"]), Chunk(1, [b"c", b"d", b"e"])]))
        self.assertEqual(len(queue), 0)
        self.assertTrue(queue.offer([Chunk(1, [b"a", b"b"]), Chunk(1, [b"c"], "w")]))
        self.assertEqual(times(queue.take(10, 100)), [1, 1, 1])
