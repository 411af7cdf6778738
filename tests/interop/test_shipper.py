"""A client that behaves as a log shipper's default HTTP output (Fluent Bit
`out_http`, Vector's `http` sink, Logstash's `http` output): one whole
buffered chunk per request, compressed, with Fluent Bit's retry rule
(drop the chunk on a 4xx other than 408/429, retry a 408/429/5xx once, then
drop). Against estat's default limits, every event must be stored."""

from __future__ import annotations

import gzip
import http.client
import json
import zlib
from typing import Callable, NamedTuple
from urllib.parse import urlsplit

from twisted.internet.defer import inlineCallbacks
from twisted.trial import unittest

from tests.interop.harness import Estat, answer_of, assert_stored_once, require_module

# Observed Fluent Bit chunks: ~13,500 records and ~2.6 MB of JSON lines.
CHUNK_EVENTS = 13_500
RETRYABLE = {408, 429}


class Delivery(NamedTuple):
    """What happened to one chunk: delivered or dropped, after how many
    attempts, and the last answer (status, body)."""

    delivered: bool
    attempts: int
    status: int
    body: bytes


def records(prefix: str, count: int) -> list[dict[str, object]]:
    """Log records shaped as Fluent Bit's `json_lines` output sends them
    (~190 bytes each)."""
    return [{"date": 1764748800.0 + n / 1000, "id": f"{prefix}-{n:06d}",
             "log": f"GET /api/v1/items/{n} 200 {n % 997}ms user-agent=Mozilla/5.0 "
                    "(X11; Linux x86_64) request-id=3f2b9c1e-6a1d-4b53-9e0f",
             "stream": "stdout", "kubernetes": {"pod": "web-7d9f8b6c5-x2x9k"}}
            for n in range(count)]


def ndjson(events: list[dict[str, object]]) -> bytes:
    return b"".join(json.dumps(event, separators=(",", ":")).encode() + b"\n"
                    for event in events)


def ship(url: str, body: bytes, headers: dict[str, str]) -> Delivery:
    """POST one chunk the way Fluent Bit's out_http does with Retry_Limit 1."""
    parts = urlsplit(url)
    status, answer = 0, b""
    for attempt in (1, 2):
        connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
        try:
            connection.request("POST", "/collect", body=body, headers=headers)
            response = connection.getresponse()
            status, answer = response.status, response.read()
        except OSError as error:
            status, answer = 0, repr(error).encode()
        finally:
            connection.close()
        if 200 <= status < 300:
            return Delivery(True, attempt, status, answer)
        if 400 <= status < 500 and status not in RETRYABLE:
            break
    return Delivery(False, attempt, status, answer)


def gzipped(data: bytes) -> bytes:
    return gzip.compress(data, 6)


class LogShipper(unittest.TestCase):
    timeout = 300

    def assertDelivered(self, deliveries: list[Delivery]) -> None:
        dropped = [(d.status, answer_of(d.body)) for d in deliveries if not d.delivered]
        self.assertEqual(dropped, [], "chunks the shipper dropped: (status, answer)")

    @inlineCallbacks
    def ship_and_check(self, chunks: list[list[dict[str, object]]],
                       encode: Callable[[list[dict[str, object]]], bytes],
                       headers: dict[str, str]):  # type: ignore[no-untyped-def]
        """Ship each chunk to a default estat, then assert every event is
        stored exactly once."""
        estat = yield Estat(self).start()
        deliveries = [ship(estat.url, encode(chunk), headers) for chunk in chunks]
        lines = yield estat.stored()
        self.assertDelivered(deliveries)
        assert_stored_once(self, lines, [event["id"] for chunk in chunks for event in chunk])
        return lines

    @inlineCallbacks
    def test_gzip_ndjson_chunks_of_13500_events(self):
        """Fluent Bit `format json_lines`, `compress gzip`: three chunks of
        13,500 events (~2.6 MB each before gzip), back to back."""
        chunks = [records(f"ndjson{c}", CHUNK_EVENTS) for c in range(3)]
        self.assertGreater(len(ndjson(chunks[0])), 2_500_000)
        lines = yield self.ship_and_check(
            chunks, lambda chunk: gzipped(ndjson(chunk)),
            {"Content-Type": "application/x-ndjson", "Content-Encoding": "gzip"})
        self.assertEqual(lines[0]["body"], chunks[0][0], "each record is stored as sent")

    @inlineCallbacks
    def test_gzip_json_array_chunk(self):
        """Fluent Bit `format json` (Vector `codec json` with array framing):
        one JSON array of 13,500 objects, gzip'd."""
        yield self.ship_and_check(
            [records("array", CHUNK_EVENTS)],
            lambda chunk: gzipped(json.dumps(chunk).encode()),
            {"Content-Type": "application/json", "Content-Encoding": "gzip"})

    @inlineCallbacks
    def test_deflate_single_event(self):
        """aiohttp's `compress=True`: one JSON object, zlib-deflated."""
        yield self.ship_and_check(
            [records("deflate-one", 1)], lambda chunk: zlib.compress(json.dumps(chunk[0]).encode()),
            {"Content-Type": "application/json", "Content-Encoding": "deflate"})

    @inlineCallbacks
    def test_deflate_ndjson_chunk(self):
        yield self.ship_and_check(
            [records("deflate", 1000)], lambda chunk: zlib.compress(ndjson(chunk)),
            {"Content-Type": "application/x-ndjson", "Content-Encoding": "deflate"})

    @inlineCallbacks
    def test_zstd_ndjson_chunk(self):
        """Vector's and Fluent Bit's `compression zstd`."""
        zstandard = require_module("zstandard")
        compressor = zstandard.ZstdCompressor()
        yield self.ship_and_check(
            [records("zstd", CHUNK_EVENTS)], lambda chunk: compressor.compress(ndjson(chunk)),
            {"Content-Type": "application/x-ndjson", "Content-Encoding": "zstd"})

    @inlineCallbacks
    def test_ndjson_sent_as_application_json_names_the_content_type(self):
        """NDJSON labelled `application/json` is refused with a 400 that says
        to use application/x-ndjson; nothing is stored."""
        estat = yield Estat(self).start()
        delivery = ship(estat.url, ndjson(records("mislabelled", 3)),
                        {"Content-Type": "application/json"})
        lines = yield estat.stored()
        self.assertEqual((delivery.status, lines), (400, []), answer_of(delivery.body))
        self.assertIn("application/x-ndjson", delivery.body.decode(), answer_of(delivery.body))
