"""The Segment and PostHog paths behind the ingest listener, in memory:
their envelopes cut into events kept byte for byte, their limits, write
keys, CORS, admission and the recent-id window (on a Clock)."""

from __future__ import annotations

import base64
import gzip
import json
from urllib.parse import quote

from twisted.internet.task import Clock
from twisted.trial import unittest

from estat.auth import WriteKeys, parse_tokens
from estat.config import Settings
from estat.model import Chunk
from estat.sdk.envelope import EnvelopeError, elements, envelope_of, parse, without
from estat.sdk.handler import basic_username
from estat.sdk.idempotence import RecentIds, id_key, id_scope
from tests.support import Exchange, ListenerTestCase, post_bytes

KEY = "k" * 20 + "-segment"
OTHER = "o" * 20 + "-posthog"
TOKENS = f"{KEY} web source=web\n{OTHER} app source=app\n"


def basic(key: str) -> bytes:
    return b"Authorization: Basic %s\r\n" % base64.b64encode(key.encode() + b":")


def stored(event_body: bytes) -> dict:
    return json.loads(event_body)


class EnvelopeTests(unittest.TestCase):
    def test_elements_are_sliced_as_sent(self):
        body = b' [ {"a" : 1 }\n, {"b":"\\u00e9"},{} ] '
        self.assertEqual(elements(parse(body).raw), [b'{"a" : 1 }', b'{"b":"\\u00e9"}', b"{}"])

    def test_envelope_keeps_shared_values_as_sent_and_leaves_out_the_key(self):
        raw = b'{"batch":[{}], "context" : {"x" : [1, 2]}, "writeKey":"s3cret","sentAt":"t"}'
        self.assertEqual(envelope_of(raw, frozenset(("batch", "writeKey"))),
                         b'{"context":{"x" : [1, 2]},"sentAt":"t"}')

    def test_a_single_call_loses_only_its_key(self):
        plain = parse(b'{"type" : "track"}')
        self.assertEqual(without(plain, frozenset(("writeKey",))), b'{"type" : "track"}')
        keyed = parse(b'{"type" : "track", "writeKey": "s3cret", "p": {"a" : 1}}')
        self.assertEqual(without(keyed, frozenset(("writeKey",))),
                         b'{"type":"track","p":{"a" : 1}}')

    def test_invalid_json_is_refused(self):
        for body in (b"{", b'{"a":NaN}', b'["\xff"]', b""):
            with self.assertRaises(EnvelopeError):
                parse(body)

    def test_basic_username(self):
        self.assertEqual(basic_username(b"Basic " + base64.b64encode(b"wk:")), b"wk")
        self.assertEqual(basic_username(b"basic " + base64.b64encode(b"wk:pw")), b"wk")
        self.assertIsNone(basic_username(b"Basic !!!"))
        self.assertIsNone(basic_username(b"Bearer wk"))
        self.assertIsNone(basic_username(None))


class RecentIdsTests(unittest.TestCase):
    def test_bounded_by_count_oldest_first(self):
        window = RecentIds(Clock(), max_ids=2, max_age=60)
        window.add([b"a", b"b"])
        window.add([b"c"])
        self.assertEqual((b"a" in window, b"b" in window, b"c" in window), (False, True, True))
        self.assertEqual(len(window), 2)

    def test_bounded_by_time(self):
        clock = Clock()
        window = RecentIds(clock, max_ids=10, max_age=60)
        window.add([b"a"])
        clock.advance(30)
        window.add([b"b"])
        clock.advance(30)
        self.assertNotIn(b"a", window)
        self.assertIn(b"b", window)
        clock.advance(30)
        self.assertEqual(len(window), 0)

    def test_zero_keeps_nothing(self):
        window = RecentIds(Clock(), max_ids=0, max_age=60)
        window.add([b"a"])
        self.assertNotIn(b"a", window)

    def test_keys_name_protocol_and_writer(self):
        keys = {id_key(id_scope("segment", ""), b"1"), id_key(id_scope("posthog", ""), b"1"),
                id_key(id_scope("segment", "web"), b"1"), id_key(id_scope("segment", ""), b"2")}
        self.assertEqual(len(keys), 4)
        self.assertEqual(len(id_key(id_scope("segment", ""), b"x" * 10000)), 16)


class SdkTestCase(ListenerTestCase):
    sdk = Settings(segment_max_event_size=200, segment_max_batch_size=2000,
                   posthog_max_event_size=200, posthog_max_batch_size=2000,
                   sdk_dedup_ids=100, sdk_dedup_seconds=60, max_batch_events=5)

    def setUp(self) -> None:
        self.listen(queue_size=10, sdk_settings=self.sdk,
                    now_ms=lambda: 1700000000123)

    def post(self, path: bytes, body: bytes, content_type: bytes = b"application/json",
             extra: bytes = b"") -> tuple[int, dict[bytes, bytes], bytes]:
        [answer] = Exchange(self.listener).send_and_read(
            post_bytes(body, content_type, path=path, extra=extra))
        return answer

    def bodies(self) -> list[dict]:
        return [stored(event.body) for event in self.queue]


class SegmentTests(SdkTestCase):
    def test_a_batch_is_one_event_per_element_with_its_envelope(self):
        body = (b'{"batch":[{"type":"track","messageId":"m1", "event" : "a"},'
                b'{"type":"identify","messageId":"m2"}],"context":{"ip":"1.2.3.4"},'
                b'"sentAt":"2026-01-01T00:00:00Z","writeKey":"s3cret"}')
        code, _, answer = self.post(b"/v1/batch", body)
        self.assertEqual((code, answer), (200, b'{"success":true}\n'))
        events = list(self.queue)
        self.assertEqual(len(events), 2)
        self.assertEqual(events[0].body,
                         b'{"protocol":"segment","call":"batch","message":{"type":"track",'
                         b'"messageId":"m1", "event" : "a"},"envelope":{"context":'
                         b'{"ip":"1.2.3.4"},"sentAt":"2026-01-01T00:00:00Z"}}')
        self.assertNotIn(b"s3cret", b"".join(event.body for event in events))
        self.assertEqual(self.metric("estat_protocol_events_accepted_total",
                                     protocol="segment"), 2)
        self.assertEqual(self.metric("estat_events_accepted_total"), 2)

    def test_single_calls(self):
        for call in (b"track", b"identify", b"page", b"screen", b"group", b"alias"):
            code, _, _ = self.post(b"/v1/" + call, b'{"type":"%s","writeKey":"s3cret"}' % call)
            self.assertEqual(code, 200)
        self.assertEqual([(body["call"], body["message"]) for body in self.bodies()][:2],
                         [("track", {"type": "track"}), ("identify", {"type": "identify"})])
        self.assertEqual(len(self.queue), 6)

    def test_analytics_js_short_paths(self):
        for path, call in [(b"/v1/t", "track"), (b"/v1/p", "page"), (b"/v1/i", "identify"),
                           (b"/v1/s", "screen"), (b"/v1/g", "group"), (b"/v1/a", "alias")]:
            self.assertEqual(self.post(path, b'{"writeKey":"k","messageId":"%s"}' % path,
                                       b"text/plain")[0], 200)
            self.assertEqual(self.bodies()[-1]["call"], call)
        self.assertEqual(self.post(b"/v1/b", b'{"batch":[{}],"writeKey":"k"}')[0], 200)
        self.assertEqual(self.bodies()[-1]["call"], "batch")

    def test_gzip_body(self):
        body = gzip.compress(b'{"batch":[{"messageId":"g"}]}')
        code, _, _ = self.post(b"/v1/batch", body, extra=b"Content-Encoding: gzip\r\n")
        self.assertEqual(code, 200)
        self.assertEqual(self.bodies()[0]["message"], {"messageId": "g"})

    def test_a_retried_batch_is_stored_once(self):
        body = b'{"batch":[{"messageId":"m1"},{"messageId":"m2"},{"noid":1}]}'
        self.assertEqual(self.post(b"/v1/batch", body)[0], 200)
        self.assertEqual(self.post(b"/v1/batch", body)[0], 200)
        # Each id once; the event without an id is stored each time.
        self.assertEqual([b["message"] for b in self.bodies()],
                         [{"messageId": "m1"}, {"messageId": "m2"}, {"noid": 1}, {"noid": 1}])
        self.assertEqual(self.metric("estat_duplicate_events_total", protocol="segment"), 2)
        partly = b'{"batch":[{"messageId":"m2"},{"messageId":"m3"},{"messageId":"m3"}]}'
        self.assertEqual(self.post(b"/v1/batch", partly)[0], 200)
        self.assertEqual(self.bodies()[-1]["message"], {"messageId": "m3"})
        self.assertEqual(len(self.queue), 5)

    def test_ids_are_forgotten_after_the_window(self):
        body = b'{"batch":[{"messageId":"m1"}]}'
        self.post(b"/v1/batch", body)
        self.clock.advance(61)
        self.post(b"/v1/batch", body)
        self.assertEqual(len(self.queue), 2)

    def test_a_refused_batch_leaves_no_ids_behind(self):
        self.queue.offer([Chunk(1, [b"{}"] * 9)])
        body = b'{"batch":[{"messageId":"a"},{"messageId":"b"}]}'
        code, headers, answer = self.post(b"/v1/batch", body)
        self.assertEqual((code, json.loads(answer)["error"]), (503, "queue_full"))
        self.assertEqual(headers[b"retry-after"], b"1")
        self.assertEqual(len(self.queue), 9)
        self.queue.take(9, 10**9)
        self.assertEqual(self.post(b"/v1/batch", body)[0], 200)
        self.assertEqual(len(self.queue), 2)
        self.assertEqual(self.metric("estat_protocol_rejected_total", protocol="segment",
                                     reason="queue_full"), 1)


    def test_shutting_down(self):
        self.state.lifecycle.start_draining()
        code, headers, answer = self.post(b"/v1/batch", b'{"batch":[{}]}')
        self.assertEqual((code, json.loads(answer)["error"]), (503, "shutting_down"))
        self.assertIn(b"retry-after", headers)

    def test_limits(self):
        too_big_event = b'{"batch":[{"p":"%s"}]}' % (b"x" * 300)
        code, _, answer = self.post(b"/v1/batch", too_big_event)
        self.assertEqual((code, json.loads(answer)["error"]), (413, "too_large"))
        code, _, answer = self.post(b"/v1/batch", b'{"batch":[%s]}' % b",".join([b"{}"] * 6))
        self.assertEqual((code, json.loads(answer)["error"]), (413, "too_many_events"))
        code, _, answer = self.post(b"/v1/batch", b'{"batch":[{"p":"%s"}]}' % (b"x" * 2100))
        self.assertEqual((code, json.loads(answer)["error"]), (413, "too_large"))
        code, _, _ = self.post(b"/v1/track", b'{"p":"%s"}' % (b"x" * 300))
        self.assertEqual(code, 413)
        self.assertEqual(len(self.queue), 0)

    def test_bad_envelopes(self):
        for body, detail in [(b"[]", "not_object"), (b'{"batch":{}}', "batch_not_array"),
                             (b'{"batch":[1]}', "not_object"), (b'{"batch":[]}', "no_events"),
                             (b"{nope", "invalid_json")]:
            code, _, answer = self.post(b"/v1/batch", body)
            self.assertEqual((code, json.loads(answer)["detail"]), (400, detail), body)
        self.assertEqual(self.metric("estat_protocol_rejected_total", protocol="segment",
                                     reason="invalid_json"), 5)
        self.assertEqual(self.post(b"/v1/batch", b"x", extra=b"Content-Encoding: gzip\r\n")[0],
                         400)
        self.assertEqual(self.post(b"/v1/batch", b"x", extra=b"Content-Encoding: br\r\n")[0],
                         415)
        [(code, _, _)] = Exchange(self.listener).send_and_read(
            b"GET /v1/batch HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual(code, 405)


class WriteKeyTests(SdkTestCase):
    def setUp(self) -> None:
        self.listen(queue_size=10, sdk_settings=self.sdk,
                    write_keys=WriteKeys("x", parse_tokens(TOKENS)),
                    cors_origins="https://app.example")

    def test_segment_key_as_basic_user_or_in_the_body(self):
        body = b'{"batch":[{"messageId":"1"}]}'
        self.assertEqual(self.post(b"/v1/batch", body, extra=basic(KEY))[0], 200)
        keyed = b'{"batch":[{"messageId":"2"}],"writeKey":"%s"}' % KEY.encode()
        self.assertEqual(self.post(b"/v1/batch", keyed)[0], 200)
        self.assertEqual([event.segment for event in self.queue], ["source=web"] * 2)
        self.assertNotIn(KEY.encode(), b"".join(event.body for event in self.queue))
        code, headers, answer = self.post(b"/v1/batch", body)
        self.assertEqual((code, json.loads(answer)["detail"]), (401, "missing_key"))
        self.assertIn(b"www-authenticate", headers)
        self.assertEqual(self.post(b"/v1/batch", body, extra=basic("wrong" * 5))[0], 401)
        self.assertEqual(self.metric("estat_protocol_rejected_total", protocol="segment",
                                     reason="auth_invalid"), 1)

    def test_posthog_key_in_the_envelope_or_per_event(self):
        body = b'{"api_key":"%s","batch":[{"event":"a","uuid":"u1"}]}' % OTHER.encode()
        self.assertEqual(self.post(b"/batch/", body)[0], 200)
        js = b'[{"event":"b","properties":{"token":"%s"}}]' % KEY.encode()
        self.assertEqual(self.post(b"/e/", js, b"text/plain")[0], 200)
        self.assertEqual([event.segment for event in self.queue], ["source=app", "source=web"])
        self.assertNotIn(OTHER.encode(), list(self.queue)[0].body)
        mixed = b'[{"event":"c","properties":{"token":"%s"}},{"event":"d"}]' % KEY.encode()
        self.assertEqual(self.post(b"/e/", mixed)[0], 401)
        self.assertEqual(len(self.queue), 2)

    def test_cors_follows_collect(self):
        origin = b"Origin: https://app.example\r\n"
        code, headers, _ = self.post(b"/e/", b'[{"properties":{"token":"%s"}}]' % KEY.encode(),
                                     b"text/plain", extra=origin)
        self.assertEqual((code, headers[b"access-control-allow-origin"]),
                         (200, b"https://app.example"))
        [(code, headers, _)] = Exchange(self.listener).send_and_read(
            b"OPTIONS /v1/batch HTTP/1.1\r\nHost: x\r\n" + origin + b"\r\n")
        self.assertEqual(code, 204)
        self.assertIn(b"Authorization", headers[b"access-control-allow-headers"])
        [(code, _, _)] = Exchange(self.listener).send_and_read(
            b"OPTIONS /e/ HTTP/1.1\r\nHost: x\r\nOrigin: https://evil.example\r\n\r\n")
        self.assertEqual(code, 403)


class PostHogTests(SdkTestCase):
    def test_paths(self):
        for path in (b"/batch", b"/batch/", b"/capture", b"/capture/", b"/e", b"/e/",
                     b"/i/v0/e", b"/i/v0/e/"):
            code, _, answer = self.post(path, b'{"event":"x"}')
            self.assertEqual((code, answer), (200, b'{"status":1}\n'))
        self.assertEqual(len(self.queue), 8)

    def test_server_sdk_batch(self):
        body = (b'{"api_key":"phc_x","batch":[{"event":"a","uuid":"u1","properties":{}},'
                b'{"event":"b", "uuid":"u2"}],"historical_migration":false,"sent_at":"t"}')
        self.assertEqual(self.post(b"/batch/", body)[0], 200)
        [first, second] = list(self.queue)
        self.assertEqual(first.body, b'{"protocol":"posthog","call":"batch","message":'
                         b'{"event":"a","uuid":"u1","properties":{}},"envelope":'
                         b'{"historical_migration":false,"sent_at":"t"}}')
        self.assertIn(b'"message":{"event":"b", "uuid":"u2"}', second.body)
        self.assertEqual(self.post(b"/batch/", body)[0], 200)
        self.assertEqual(len(self.queue), 2)
        self.assertEqual(self.metric("estat_duplicate_events_total", protocol="posthog"), 2)

    def test_single_capture_loses_its_key(self):
        self.post(b"/capture/", b'{"api_key":"phc_x","event":"a", "distinct_id":"d"}')
        self.assertEqual(list(self.queue)[0].body, b'{"protocol":"posthog","call":"capture",'
                         b'"message":{"event":"a","distinct_id":"d"},"envelope":{}}')

    def test_js_gzip_and_base64_and_form(self):
        events = b'[{"event":"g","uuid":"1"}]'
        self.assertEqual(self.post(b"/e/?compression=gzip-js&ver=1.0", gzip.compress(events),
                                   b"text/plain")[0], 200)
        encoded = base64.b64encode(b'{"event":"b64+/?","uuid":"2"}')
        self.assertEqual(self.post(b"/e/", b"data=" + quote(encoded, safe="").encode()
                                   + b"&compression=base64",
                                   b"application/x-www-form-urlencoded")[0], 200)
        encoded = base64.b64encode(b'{"event":"b64+/?","uuid":"3"}')
        self.assertEqual(self.post(b"/e/?compression=base64", b"data=" + encoded,
                                   b"application/x-www-form-urlencoded")[0], 200)
        self.assertEqual(self.post(b"/e/", b"data=" + quote(b'{"event":"f"}').encode(),
                                   b"application/x-www-form-urlencoded")[0], 200)
        self.assertEqual([b["message"]["event"] for b in self.bodies()],
                         ["g", "b64+/?", "b64+/?", "f"])

    def test_bad_bodies(self):
        for body, content_type, error in [
                (b"data=!!!", b"application/x-www-form-urlencoded", "invalid_base64"),
                (b"nope=1", b"application/x-www-form-urlencoded", "invalid_json"),
                (b"\x1f\x8bnot-gzip", b"text/plain", "invalid_gzip"),
                (b"[1]", b"application/json", "invalid_json"),
                (gzip.compress(b"[" + b'{"a":1},' * 300 + b"{}]"), b"text/plain", "too_large")]:
            code, _, answer = self.post(b"/e/?compression=gzip-js", body, content_type)
            self.assertEqual(json.loads(answer)["error"], error, body)
            self.assertIn(code, (400, 413))
        code, _, _ = self.post(b"/e/?compression=lz64", b"data=abc",
                               b"application/x-www-form-urlencoded")
        self.assertEqual(code, 415)
        self.assertEqual(len(self.queue), 0)

