"""The encoder: JSON lines round trip, raw prefix, keys, ids, gzip checks."""

from __future__ import annotations

import base64
import gzip
import json
import re

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from estat.codec import (
    encode_batch,
    encode_batch_safely,
    event_line,
    raw_line,
    verify_gzip,
)
from estat.model import Batch, Event, line_feeds, new_batch_id, object_key
from estat.validate import body_error, strict_body_error

TS = 1700000000123  # 2023-11-14T22:13:20.123Z


def batch(*bodies: bytes) -> Batch:
    events = [Event(TS + i, body) for i, body in enumerate(bodies)]
    return Batch.of_events(events, sum(len(b) for b in bodies), "01HF0000000000000000000000", "size")


def lines_of(data: bytes) -> list[bytes]:
    return gzip.decompress(data).split(b"\n")


class EncodeTests(unittest.TestCase):
    def test_round_trip_keeps_every_body_and_unicode(self):
        bodies = [b'{"a":1}', '{"é":"日本","e":"\\u00e9\\"\\\\"}'.encode(), b'{"n":[1,{"x":null}]}']
        [obj] = encode_batch(batch(*bodies), validated=True, prefix="raw",
                             raw_prefix="raw_dlq", host_id="h1")
        raw = gzip.decompress(obj.data)
        self.assertTrue(raw.endswith(b"\n"))
        lines = raw.split(b"\n")[:-1]
        self.assertEqual(len(lines), 3)
        for i, (line, body) in enumerate(zip(lines, bodies)):
            self.assertEqual(line, b'{"ts":1700000000.%03d,"body":%s}' % (123 + i, body))
            self.assertEqual(json.loads(line), {"ts": (TS + i) / 1000, "body": json.loads(body)})
        self.assertEqual(obj.event_count, 3)
        self.assertEqual(obj.uncompressed_bytes, len(raw))
        self.assertEqual((obj.first_ts_ms, obj.last_ts_ms), (TS, TS + 2))
        self.assertEqual(obj.key, "raw/dt=2023-11-14/hour=22/h1-01HF0000000000000000000000.jsonl.gz")

    def test_ts_is_epoch_seconds_with_milliseconds_as_a_fraction(self):
        """The line's `ts` is seconds, as a reader (DuckDB's to_timestamp,
        Python's datetime.fromtimestamp) takes an epoch number; the
        milliseconds are kept as three decimals, zeros included."""
        self.assertEqual(event_line(1700000000005, b"{}"), b'{"ts":1700000000.005,"body":{}}\n')
        self.assertEqual(event_line(1700000000000, b"{}"), b'{"ts":1700000000.000,"body":{}}\n')
        self.assertEqual(event_line(7, b"{}"), b'{"ts":0.007,"body":{}}\n')
        self.assertEqual(raw_line(1700000000120, b"x", "invalid_json"),
                         b'{"ts":1700000000.120,"error":"invalid_json","body_b64":"eA=="}\n')
        [obj] = encode_batch(batch(b'{"a":1}'), validated=True, prefix="raw",
                             raw_prefix="raw_dlq", host_id="h")
        self.assertEqual(json.loads(lines_of(obj.data)[0])["ts"], 1700000000.123)

    def test_line_breaks_between_tokens_become_spaces(self):
        line = event_line(TS, b'{\r\n  "a": "x"\n}')
        self.assertEqual(line.count(b"\n"), 1)
        self.assertEqual(json.loads(line)["body"], {"a": "x"})

    def test_invalid_bodies_go_to_a_raw_object_when_not_validated(self):
        bodies = [b'{"ok":1}', b"not json", b"\xff\xfe", b"[1]", b'{"ok":2}']
        good, raw = encode_batch(batch(*bodies), validated=False, prefix="raw",
                                 raw_prefix="raw_dlq", host_id="h")
        self.assertEqual([json.loads(l)["body"] for l in lines_of(good.data)[:-1]],
                         [{"ok": 1}, {"ok": 2}])
        self.assertTrue(raw.key.startswith("raw_dlq/dt=2023-11-14/hour=22/h-"))
        self.assertEqual(raw.kind, "raw")
        records = [json.loads(l) for l in lines_of(raw.data)[:-1]]
        self.assertEqual([base64.b64decode(r["body_b64"]) for r in records],
                         [b"not json", b"\xff\xfe", b"[1]"])
        self.assertEqual([r["error"] for r in records],
                         ["invalid_json", "invalid_utf8", "not_object"])
        self.assertEqual([round(r["ts"] * 1000) for r in records], [TS + 1, TS + 2, TS + 3])

    def test_an_unpaired_surrogate_goes_to_the_raw_object_when_not_validated(self):
        good, raw = encode_batch(batch(b'{"ok":1}', b'{"n":"\\ud800"}'), validated=False,
                                 prefix="raw", raw_prefix="raw_dlq", host_id="h")
        [line] = lines_of(good.data)[:-1]
        self.assertEqual(json.loads(line)["body"], {"ok": 1})
        [record] = [json.loads(l) for l in lines_of(raw.data)[:-1]]
        self.assertEqual((base64.b64decode(record["body_b64"]), record["error"]),
                         (b'{"n":"\\ud800"}', "unpaired_surrogate"))

    def test_all_invalid_batch_writes_only_a_raw_object(self):
        [raw] = encode_batch(batch(b"x"), validated=False, prefix="raw",
                             raw_prefix="raw_dlq", host_id="h")
        self.assertEqual(raw.kind, "raw")

    def test_unexpected_encoder_failure_keeps_everything_raw(self):
        import estat.codec

        def broken(events):
            raise RuntimeError("boom")

        self.patch(estat.codec, "_chunks_text", broken)
        [raw] = encode_batch_safely(batch(b'{"a":1}', b'{"b":2}'), validated=True,
                                    prefix="raw", raw_prefix="raw_dlq", host_id="h")
        records = [json.loads(l) for l in lines_of(raw.data)[:-1]]
        self.assertEqual([base64.b64decode(r["body_b64"]) for r in records],
                         [b'{"a":1}', b'{"b":2}'])
        self.assertEqual({r["error"] for r in records}, {"encode_error"})

    def test_line_feeds_counts_every_lf(self):
        import random
        rng = random.Random(3)
        samples = [b"", b"\n", b"a", b"\n\n\n", b"a\r\nb\nc", bytes(range(256)) * 3]
        samples += [bytes(rng.choice(b"ab\n\r") for _ in range(rng.randint(0, 200)))
                    for _ in range(200)]
        for data in samples:
            self.assertEqual(line_feeds(data), data.count(b"\n"), data)

    def test_body_error_follows_the_json_spec(self):
        self.assertIsNone(body_error(b' {"a": [1, 2.5e3, true, null, "\\ud83d\\ude00"]} '))
        for body, reason in [(b"", "invalid_json"), (b"{'a':1}", "invalid_json"),
                             (b'{"a":NaN}', "invalid_json"), (b'{"a":-Infinity}', "invalid_json"),
                             (b"\xc3\x28", "invalid_utf8"), (b"null", "not_object"),
                             (b'{"a":1}x', "invalid_json")]:
            self.assertEqual(body_error(body), reason, body)
        self.assertEqual(body_error(b"[" * 100000 + b"]" * 100000), "too_deep")
        # allowed by RFC 8259 though orjson refuses it: the fallback accepts
        self.assertIsNone(body_error(b'{"big":1e400}'))
        # allowed by RFC 8259 but no Unicode text, which jq and DuckDB refuse
        for body in [b'{"lone":"\\ud800"}', b'{"\\udfff":1}', b'{"a":[{"b":"x\\ud83dy"}]}',
                     b'{"low_first":"\\ude00\\ud83d"}', b'{"a":' + b"[" * 500 + b'"\\uDBFF"'
                     + b"]" * 500 + b"}"]:
            self.assertEqual(body_error(body), "unpaired_surrogate", body)
        for body in [b'{"pair":"\\ud83d\\ude00"}', b'{"escaped_backslash":"\\\\ud800"}',
                     b'{"bmp":"\\u00e9\\uffff"}']:
            self.assertIsNone(body_error(body), body)

    def test_verify_gzip_detects_truncation_and_damage(self):
        data = gzip.compress(b"hello\n" * 1000)
        verify_gzip(data, 6000)
        with self.assertRaises(ValueError):
            verify_gzip(data[:-4], 6000)
        with self.assertRaises(ValueError):
            verify_gzip(data[:-8], 6000)
        damaged = data[:-8] + bytes([data[-8] ^ 1]) + data[-7:]
        with self.assertRaises(ValueError):
            verify_gzip(damaged, 6000)
        with self.assertRaises(ValueError):
            verify_gzip(data, 5999)
        with self.assertRaises(ValueError):
            verify_gzip(data + b"junk", 6000)

    def test_large_objects_are_compressed_and_verified_in_slices(self):
        """Several compression slices and several megabytes of inflated
        output: the result is one gzip member that any reader inflates."""
        import zlib

        events = [Event(TS + i, b'{"n":%d,"pad":"%s"}' % (i, b"x" * (i % 5000))) for i in range(3000)]
        [obj] = encode_batch(Batch.of_events(events, 0, "ID", "size"), validated=True, prefix="raw",
                             raw_prefix="raw_dlq", host_id="h")
        text = gzip.decompress(obj.data)
        self.assertGreater(len(text), 3 * 1024 * 1024)
        self.assertEqual(obj.uncompressed_bytes, len(text))
        self.assertEqual([json.loads(line)["body"]["n"] for line in text.splitlines()],
                         list(range(3000)))
        inflater = zlib.decompressobj(31)
        inflater.decompress(obj.data)
        self.assertEqual(inflater.unused_data, b"")  # one member, nothing after it
        verify_gzip(obj.data, len(text))
        with self.assertRaises(ValueError):
            verify_gzip(obj.data[: len(obj.data) // 2], len(text))
        with self.assertRaises(ValueError):
            verify_gzip(obj.data, len(text) - 1)

    def test_batch_ids_sort_by_time_and_are_unique(self):
        ids = [new_batch_id(TS + i) for i in range(50)]
        self.assertEqual(ids, sorted(ids))
        same_ms = [new_batch_id(TS) for _ in range(1000)]
        self.assertEqual(len(set(same_ms + ids)), 1050)
        self.assertTrue(all(re.fullmatch(r"[0-9A-HJKMNP-TV-Z]{26}", i) for i in ids))

    def test_key_uses_utc_partitions_of_the_first_event(self):
        self.assertEqual(object_key("p/q", 0, "h", "ID"), "p/q/dt=1970-01-01/hour=00/h-ID.jsonl.gz")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20)


json_texts = st.recursive(
    st.sampled_from([b"1", b"-0", b"1e400", b"1.5E-3", b"true", b"null", b"NaN", b"Infinity",
                     b'"x"', b'"\\ud800"', b'"\\u00e9"', b'"\xc3\xa9"', b'"\xff"', b'"\x01"',
                     b"01", b"1.", b"[]", b"{}", b" ", b"\n", b","]),
    lambda inner: st.lists(inner, max_size=4).map(lambda xs: b"[" + b",".join(xs) + b"]")
    | st.lists(st.tuples(st.sampled_from([b'"k"', b'"\xe6\x97\xa5"', b"k"]), inner), max_size=3)
    .map(lambda kv: b"{" + b",".join(k + b":" + v for k, v in kv) + b"}"),
    max_leaves=12)


class EncodeProperties(unittest.TestCase):
    @settings(max_examples=400, deadline=None)
    @given(st.one_of(json_texts, st.binary(max_size=30)))
    def test_fast_validator_gives_the_strict_verdict(self, body):
        self.assertEqual(body_error(body), strict_body_error(body), body)

    @settings(max_examples=150, deadline=None)
    @given(st.lists(st.dictionaries(st.text(max_size=10), json_values, max_size=5),
                    min_size=1, max_size=20), st.booleans(), st.booleans())
    def test_any_json_objects_read_back_equal(self, values, ascii_only, pretty):
        bodies = [json.dumps(v, ensure_ascii=ascii_only, indent=2 if pretty else None).encode()
                  for v in values]
        for body in bodies:
            self.assertIsNone(body_error(body))
        [obj] = encode_batch(batch(*bodies), validated=True, prefix="raw",
                             raw_prefix="raw_dlq", host_id="h")
        lines = lines_of(obj.data)
        self.assertEqual(lines[-1], b"")
        self.assertEqual([json.loads(l)["body"] for l in lines[:-1]], values)

    @settings(max_examples=100, deadline=None)
    @given(st.lists(st.sampled_from([b'{"a":1}', b'{\n"a" :\r\n2}', b"{}", b'{"s":"x"}']),
                    min_size=1, max_size=700), st.integers(0, 3),
           st.integers(0, 4102444800000), st.integers(0, 1999))
    def test_the_fast_path_writes_what_event_line_writes(self, bodies, segmented, start, step):
        """Valid events without a segment take a C-level path in slices;
        with one segmented event, the loop per event. Same text either way,
        whatever the milliseconds."""
        events = [Event(start + i * step, body) for i, body in enumerate(bodies)]
        expected = b"".join(event_line(ts, body) for ts, body, _ in events)
        [fast] = encode_batch(Batch.of_events(events, 0, "ID", "size"), validated=True, prefix="raw",
                              raw_prefix="raw_dlq", host_id="h")
        self.assertEqual(gzip.decompress(fast.data), expected)
        self.assertEqual(fast.uncompressed_bytes, len(expected))
        if segmented:
            events[0] = Event(events[0].ts, bodies[0], "source=web")
            objects = encode_batch(Batch.of_events(events, 0, "ID", "size"), validated=True, prefix="raw",
                                   raw_prefix="raw_dlq", host_id="h")
            text = b"".join(gzip.decompress(o.data) for o in reversed(objects))
            self.assertEqual(sorted(text.splitlines()), sorted(expected.splitlines()))

    @settings(max_examples=150, deadline=None)
    @given(st.lists(st.binary(max_size=40), min_size=1, max_size=20))
    def test_arbitrary_bytes_never_make_an_invalid_line(self, bodies):
        objects = encode_batch(batch(*bodies), validated=False, prefix="raw",
                               raw_prefix="raw_dlq", host_id="h")
        recovered = []
        for obj in objects:
            for line in lines_of(obj.data)[:-1]:
                record = json.loads(line)
                if obj.kind == "raw":
                    recovered.append((round(record["ts"] * 1000),
                                      base64.b64decode(record["body_b64"])))
                else:
                    self.assertIsInstance(record["body"], dict)
                    recovered.append((round(record["ts"] * 1000), None))
        self.assertEqual(sorted(ts for ts, _ in recovered), [TS + i for i in range(len(bodies))])
        for ts, body in recovered:
            if body is not None:
                self.assertEqual(body, bodies[ts - TS])


class ChunkTextTests(unittest.TestCase):
    """The lines framed a chunk at a time are `event_line`'s, whatever the
    chunks' times, sizes and bodies."""

    def assert_event_lines(self, chunks: list) -> None:
        from estat.codec import _texts_of_chunks, event_line
        from estat.model import events_in, sized

        expected = b"".join(event_line(ts, body) for ts, body, _ in events_in(chunks))
        self.assertEqual(b"".join(_texts_of_chunks(chunks)), expected)
        self.assertEqual(b"".join(_texts_of_chunks(list(map(sized, chunks)))), expected)

    def test_whether_times_repeat_or_not(self):
        from estat.model import Chunk

        bodies = [b'{"n":%d}' % n for n in range(40)]
        for times in ([1_700_000_000_123] * 40, [1_700_000_000_000 + n for n in range(40)],
                      [1_700_000_000_007 + (n // 10) * 1000 for n in range(40)]):
            self.assert_event_lines([Chunk(ts, [body]) for ts, body in zip(times, bodies)])
        self.assert_event_lines([Chunk(1_700_000_000_001, bodies[:7], "", True),
                                 Chunk(1_700_000_000_002, bodies[7:])])

    def test_bodies_with_line_ends_become_one_line_each(self):
        from estat.model import Chunk

        self.assert_event_lines([Chunk(1, [b'{"a":\n1}', b'{"b":2}']), Chunk(2, [b'{"c":\r3}']),
                                 Chunk(3, [b'{"d":4}'], "", True)])

    def test_chunks_bigger_than_a_slice_and_many_small_ones(self):
        from estat.codec import _TEXT_SLICE_BYTES
        from estat.model import Chunk

        lines = 2 * _TEXT_SLICE_BYTES // 200 + 1  # a chunk of over two slices
        big = [b'{"pad":"%s","n":%d}' % (b"x" * 200, n) for n in range(lines)]
        small = [Chunk(1_700_000_000_000 + n, [b'{"s":%d}' % n]) for n in range(30_000)]
        self.assert_event_lines([Chunk(5, big, "", True), *small, Chunk(6, big + [b'{"\n":1}'])])

    def test_ndjson_texts_kept_whole_frame_as_their_lines(self):
        """A chunk that is an NDJSON text (`Lines`) frames as its bodies
        one by one would, whether it is one line, a few, or longer than a
        slice, and among chunks of single bodies."""
        from estat.codec import _TEXT_SLICE_BYTES
        from estat.model import Chunk, Lines

        def lines_chunk(ts: int, bodies: list[bytes]) -> Chunk:
            return Chunk(ts, Lines(b"".join(body + b"\n" for body in bodies), len(bodies)),
                         "", True)

        few = [b'{"n":%d}' % n for n in range(5)]
        self.assert_event_lines([lines_chunk(1, few[:1])])
        self.assert_event_lines([lines_chunk(1, few), Chunk(2, [b'{"o":1}']),
                                 lines_chunk(3, few[::-1])])
        count = 2 * _TEXT_SLICE_BYTES // 200 + 1
        big = [b'{"pad":"%s","n":%d}' % (b"x" * 200, n) for n in range(count)]
        self.assert_event_lines([lines_chunk(5, big)])
        self.assert_event_lines([Chunk(4, [b'{"s":1}']), lines_chunk(5, big), lines_chunk(6, few)])
