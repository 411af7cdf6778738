"""The /collect handler and the health endpoints, behind the ingest
listener and its bounded request, driven with raw HTTP bytes over an
in-memory transport (no sockets)."""

from __future__ import annotations

import json

from estat.http.request import _Zlib
from estat.lifecycle import Lifecycle
from estat.model import Chunk
from tests.support import Exchange, ListenerTestCase, post_bytes


class CollectTests(ListenerTestCase):
    def setUp(self) -> None:
        self.listen(queue_size=3, max_body_size=64, now_ms=lambda: 1700000000123)

    def exchange(self, *requests: bytes) -> list[tuple[int, dict[bytes, bytes], bytes]]:
        client = Exchange(self.listener)
        for request in requests:
            client.send(request)
        return client.responses()

    def test_accepts_a_json_object_and_queues_the_exact_bytes(self):
        body = b'{"event" : "x", "s":"\\u00e9\xc3\xa9\\n"}'
        [(code, headers, answer)] = self.exchange(post_bytes(body))
        self.assertEqual(code, 202)
        self.assertEqual(json.loads(answer), {"status": "accepted"})
        self.assertEqual(headers[b"content-type"], b"application/json")
        self.assertEqual(list(self.queue), [(1700000000123, body, "")])
        self.assertEqual(self.metric("estat_events_accepted_total"), 1)
        self.assertEqual(self.metric("estat_http_requests_total", code="202"), 1)

    def test_keep_alive_connection_serves_several_requests(self):
        answers = self.exchange(post_bytes(b'{"a":1}') + post_bytes(b'{"a":2}'))
        self.assertEqual([a[0] for a in answers], [202, 202])
        self.assertEqual([event.body for event in list(self.queue)], [b'{"a":1}', b'{"a":2}'])

    def test_rejects_what_is_not_one_json_object(self):
        for body in [b"", b"nope", b"[1,2]", b'"text"', b"3", b'{"a":NaN}',
                     b'{"a":Infinity}', b'{"a":1} {"b":2}', b'{"a":"\xff"}',
                     '{"a":1}'.encode("utf-16"), b'\xef\xbb\xbf{"a":1}', b'{"a":1']:
            [(code, _, answer)] = self.exchange(post_bytes(body))
            self.assertEqual((code, json.loads(answer)["error"]), (400, "invalid_json"), body)
        self.assertEqual(list(self.queue), [])
        self.assertEqual(self.metric("estat_events_rejected_total", reason="invalid_json"), 12)

    def test_body_at_the_limit_is_accepted(self):
        body = b'{"p":"' + b"x" * (64 - 8) + b'"}'
        self.assertEqual(len(body), 64)
        [(code, _, _)] = self.exchange(post_bytes(body))
        self.assertEqual(code, 202)

    def test_declared_length_over_the_limit_is_refused_before_the_body(self):
        client = Exchange(self.listener)
        client.send(b"POST /collect HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    b"Content-Length: 1000000000\r\nExpect: 100-continue\r\n\r\n")
        [(code, headers, answer)] = client.responses()
        self.assertEqual(code, 413)
        # Until its first byte, an application/json body may be a JSON array:
        # the declared length is held to the batch limit.
        answer = json.loads(answer)
        self.assertEqual((answer["error"], answer["max_bytes"]), ("too_large", 1024 * 1024))
        self.assertIn("MAX_BATCH_BODY_SIZE", answer["detail"])
        self.assertNotIn(b"100 Continue", client.transport.value())
        self.assertTrue(client.transport.disconnecting)
        client.send(b"x" * 1000)  # whatever still arrives is ignored
        self.assertEqual(list(self.queue), [])
        self.assertEqual(self.metric("estat_events_rejected_total", reason="too_large"), 1)
        self.assertEqual(self.metric("estat_http_requests_total", code="413"), 1)

    def test_an_object_is_held_to_the_single_event_limit_from_its_first_byte(self):
        client = Exchange(self.listener)
        client.send(b"POST /collect HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    b"Content-Length: 100000\r\n\r\n  {\"a\":\"" + b"x" * 100)
        [(code, _, answer)] = client.responses()
        answer = json.loads(answer)
        self.assertEqual((code, answer["max_bytes"]), (413, 64))
        self.assertIn("application/x-ndjson or a JSON array", answer["detail"])
        self.assertTrue(client.transport.disconnecting)

    def test_over_limit_body_in_the_same_packet_is_not_processed(self):
        [(code, _, _)] = self.exchange(post_bytes(b'{"p":"' + b"x" * 100 + b'"}'))
        self.assertEqual(code, 413)
        self.assertEqual(list(self.queue), [])

    def test_chunked_body_growing_past_the_limit_is_cut_off(self):
        client = Exchange(self.listener)
        client.send(b"POST /collect HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    b"Transfer-Encoding: chunked\r\n\r\n")
        client.send(b"20\r\n" + b"{" + b" " * 31 + b"\r\n")
        self.assertEqual(client.responses(), [])  # 32 bytes so far: still reading
        client.send(b"40\r\n" + b" " * 64 + b"\r\n")
        [(code, _, answer)] = client.responses()
        self.assertEqual((code, json.loads(answer)["error"]), (413, "too_large"))
        self.assertTrue(client.transport.disconnecting)
        client.send(b"0\r\n\r\n")
        self.assertEqual(list(self.queue), [])

    def test_chunked_body_within_the_limit_is_accepted(self):
        [(code, _, _)] = self.exchange(
            b"POST /collect HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"4\r\n{\"a\"\r\n3\r\n:1}\r\n0\r\n\r\n")
        self.assertEqual(code, 202)
        self.assertEqual(list(self.queue)[0].body, b'{"a":1}')

    def test_multipart_and_real_forms_are_unsupported_but_curl_json_is_accepted(self):
        multipart = (b"--b\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\n1\r\n--b--\r\n")
        answers = self.exchange(
            post_bytes(multipart, b"multipart/form-data; boundary=b"),
            post_bytes(b"a=1&b=2", b"application/x-www-form-urlencoded"),
            post_bytes(b'{"event":"x"}', b"application/x-www-form-urlencoded"))
        self.assertEqual([a[0] for a in answers], [415, 415, 202])
        self.assertEqual(json.loads(answers[0][2])["error"], "unsupported_media_type")
        self.assertEqual(list(self.queue)[0].body, b'{"event":"x"}')
        self.assertEqual(
            self.metric("estat_events_rejected_total", reason="unsupported_media_type"), 2)

    def test_other_methods_and_paths(self):
        answers = self.exchange(
            b"GET /collect HTTP/1.1\r\nHost: x\r\n\r\n",
            post_bytes(b'{"a":1}', path=b"/collect/more"),
            post_bytes(b'{"a":1}', path=b"/"),
            b"GET /nothing-here HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual([a[0] for a in answers], [405, 404, 404, 404])
        self.assertEqual(answers[0][1][b"allow"], b"POST, OPTIONS")
        self.assertEqual(json.loads(answers[1][2]), {"error": "not_found",
                                                     "expected": "POST /collect"})
        self.assertEqual(list(self.queue), [])

    def test_full_queue_answers_503_with_retry_after_at_once(self):
        answers = self.exchange(*[post_bytes(b'{"n":%d}' % i) for i in range(5)])
        self.assertEqual([a[0] for a in answers], [202, 202, 202, 503, 503])
        self.assertEqual(answers[3][1][b"retry-after"], b"1")
        self.assertEqual(json.loads(answers[3][2])["error"], "queue_full")
        self.assertIn("Retry-After", json.loads(answers[3][2])["detail"])
        self.assertEqual(len(list(self.queue)), 3)
        self.assertEqual(self.metric("estat_events_rejected_total", reason="queue_full"), 2)

    def test_with_the_queue_full_a_body_is_not_read_and_the_connection_stays(self):
        """With no room left, a request's body is skipped unread (not
        inflated, not parsed: a broken body gets the same 503), and the
        next request on the connection is answered in turn."""
        from estat.http import request as request_module

        inflated: list[bytes] = []
        original = request_module.IngestRequest.add_body
        self.patch(request_module.IngestRequest, "add_body",
                   lambda request, data: (inflated.append(data), original(request, data)))
        client = Exchange(self.listener)
        for i in range(3):
            client.send(post_bytes(b'{"n":%d}' % i))
        read_before = len(inflated)
        client.send(post_bytes(b'{"broken', extra=b"Content-Encoding: gzip\r\n"))
        client.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        answers = client.responses()
        self.assertEqual([a[0] for a in answers], [202, 202, 202, 503, 200])
        self.assertEqual(json.loads(answers[3][2])["error"], "queue_full")
        self.assertEqual(answers[3][1][b"retry-after"], b"1")
        self.assertEqual(len(inflated), read_before)
        self.assertFalse(client.transport.disconnecting)
        self.assertEqual(self.metric("estat_events_rejected_total", reason="queue_full"), 1)

    def test_an_ndjson_body_with_more_lines_than_room_is_skipped_as_it_arrives(self):
        """Once an NDJSON body has shown more lines than the queue has room
        for, the rest of it is not read: 503 queue_full, nothing queued,
        and the connection answers its next request."""
        from estat.http import request as request_module

        read: list[bytes] = []
        original = request_module.IngestRequest.add_body
        self.patch(request_module.IngestRequest, "add_body",
                   lambda request, data: (read.append(data), original(request, data))[1])
        client = Exchange(self.listener)
        client.send(post_bytes(b'{"n":0}'))  # room for 2 more
        first = b'{"n":1}\n{"n":2}\n{"n":3}\n'
        request = post_bytes(first + b'{"n":4}\n' * 50, content_type=b"application/x-ndjson")
        start = len(request) - 50 * 8 - len(first)
        client.send_in_pieces(request, [start + len(first), start + len(first) + 8])
        client.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        answers = client.responses()
        self.assertEqual([a[0] for a in answers], [202, 503, 200])
        self.assertEqual(json.loads(answers[1][2])["error"], "queue_full")
        self.assertEqual(read[1:], [first], "nothing read after the third line")
        self.assertEqual([e.body for e in self.queue], [b'{"n":0}'])
        self.assertEqual(self.metric("estat_events_rejected_total", reason="queue_full"), 1)

    def test_a_compressed_ndjson_body_stops_inflating_once_its_lines_outnumber_the_room(self):
        """A compressed body is inflated once complete, piece by piece; once
        its lines outnumber the queue's room, the rest is not inflated and
        nothing is validated: 503 queue_full, and the next batch that fits
        is taken."""
        from estat import collect
        from estat.http import request as request_module

        validated: list[int] = []
        original_validate = collect.lines_are_objects
        self.patch(collect, "lines_are_objects",
                   lambda text, count, limit: (validated.append(count),
                                               original_validate(text, count, limit))[1])
        inflated: list[bytes] = []
        original_pieces = request_module._Zlib.pieces

        def pieces(inflater, data, room):
            for piece in original_pieces(inflater, data, room):
                inflated.append(piece)
                yield piece

        self.patch(request_module._Zlib, "pieces", pieces)
        self.patch(request_module, "_INFLATE_PIECE_BYTES", 8)  # one line a piece
        client = Exchange(self.listener)
        client.send(post_bytes(b'{"n":0}'))  # room for 2 more
        client.send(post_bytes(gzip_of(b'{"n":1}\n{"n":2}\n{"n":3}\n' + b'{"n":4}\n' * 50),
                               content_type=b"application/x-ndjson",
                               extra=b"Content-Encoding: gzip\r\n"))
        self.assertEqual(inflated, [b'{"n":1}\n', b'{"n":2}\n', b'{"n":3}\n'])
        answers = client.responses()
        other = Exchange(self.listener)
        other.send(post_bytes(gzip_of(b'{"n":1}\n{"n":2}\n'), content_type=b"application/x-ndjson",
                              extra=b"Content-Encoding: gzip\r\n"))
        answers += other.responses()
        self.assertEqual([a[0] for a in answers], [202, 503, 202])
        self.assertEqual(json.loads(answers[1][2])["error"], "queue_full")
        self.assertEqual(validated, [2])
        self.assertEqual([e.body for e in self.queue], [b'{"n":0}', b'{"n":1}', b'{"n":2}'])
        self.assertEqual(self.metric("estat_events_rejected_total", reason="queue_full"), 1)

    def test_batches_being_received_hold_room_for_as_many_lines_as_their_last(self):
        """A connection's next batch is expected to hold as many lines as
        its last: while such batches are being received, one that would
        take the queue past its room with theirs is refused before it is
        read, and their room is theirs again once they are answered."""
        batch = post_bytes(b'{"n":1}\n{"n":2}\n', content_type=b"application/x-ndjson")
        head, body = batch.split(b"\r\n\r\n", 1)
        shipper = Exchange(self.listener)
        shipper.send(batch)  # 2 lines: room for 1 more
        self.assertEqual([a[0] for a in shipper.responses()], [202])
        self.queue.take(2, 1 << 20)  # room for 3
        shipper.send(head + b"\r\n\r\n")  # expected to hold 2 lines
        self.assertEqual(self.listener.lines_expected, 2)
        other = Exchange(self.listener)
        other.send(post_bytes(b'{"n":9}\n', content_type=b"application/x-ndjson"))
        self.assertEqual([a[0] for a in other.responses()], [202])  # 1 line: room for 2
        late = Exchange(self.listener)
        late.send(post_bytes(b'{"n":3}\n', content_type=b"application/x-ndjson"))
        [(code, _, answer)] = late.responses()
        self.assertEqual((code, json.loads(answer)["error"]), (503, "queue_full"))
        shipper.send(body)  # 2 lines, room for 2
        self.assertEqual([a[0] for a in shipper.responses()], [202, 202])
        self.assertEqual(self.listener.lines_expected, 0)
        self.queue.take(3, 1 << 20)
        late.send(post_bytes(b'{"n":3}\n', content_type=b"application/x-ndjson"))
        self.assertEqual([a[0] for a in late.responses()], [503, 202])
        self.assertEqual([e.body for e in self.queue], [b'{"n":3}'])

    def test_a_first_batch_is_expected_to_hold_lines_as_the_last_one_did_per_byte(self):
        """A connection's first batch has no last one: it is expected to
        hold as many lines per byte as the listener's last complete batch,
        so that many new connections sending at once are not all read in
        full. Before any batch has completed, it is expected to hold one."""
        two_lines = post_bytes(b'{"n":1}\n{"n":2}\n', content_type=b"application/x-ndjson")
        head, body = two_lines.split(b"\r\n\r\n", 1)
        first = Exchange(self.listener)
        first.send(head + b"\r\n\r\n")
        self.assertEqual(self.listener.lines_expected, 1)
        first.send(body)
        self.assertEqual([a[0] for a in first.responses()], [202])  # 1 line per 8 bytes
        newcomer = Exchange(self.listener)
        newcomer.send(head + b"\r\n\r\n")  # 16 bytes: 2 lines, the room holds 1
        self.assertEqual(self.listener.lines_expected, 0)
        newcomer.send(body)
        [(code, _, answer)] = newcomer.responses()
        self.assertEqual((code, json.loads(answer)["error"]), (503, "queue_full"))
        self.assertEqual(len(self.queue), 2)
        one_line = post_bytes(b'{"n":3}\n', content_type=b"application/x-ndjson")
        self.assertEqual([a[0] for a in self.exchange(one_line)], [202])
        self.assertEqual(len(self.queue), 3)

    def test_an_ndjson_body_within_the_room_is_taken(self):
        client = Exchange(self.listener)
        client.send(post_bytes(b'{"n":0}'))
        client.send(post_bytes(b'{"n":1}\n{"n":2}\n', content_type=b"application/x-ndjson"))
        self.assertEqual([a[0] for a in client.responses()], [202, 202])
        self.assertEqual(len(self.queue), 3)

    def test_with_the_queue_full_an_expect_100_continue_is_answered_at_once(self):
        client = Exchange(self.listener)
        for i in range(3):
            client.send(post_bytes(b'{"n":%d}' % i))
        client.send(b"POST /collect HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    b"Content-Length: 9\r\nExpect: 100-continue\r\n\r\n")
        answers = client.responses()
        self.assertEqual([a[0] for a in answers], [202, 202, 202, 503])
        self.assertTrue(client.transport.disconnecting)

    def test_draining_server_answers_503_shutting_down(self):
        self.state.lifecycle.start_draining()
        [(code, headers, answer)] = self.exchange(post_bytes(b'{"a":1}'))
        self.assertEqual((code, json.loads(answer)["error"]), (503, "shutting_down"))
        self.assertIn(b"retry-after", headers)
        self.assertEqual(list(self.queue), [])

    def test_unexpected_error_is_a_json_500_without_traceback(self):
        def broken():
            raise RuntimeError("secret internals")

        self.state.now_ms = broken
        [(code, _, answer)] = self.exchange(post_bytes(b'{"a":1}'))
        self.assertEqual((code, json.loads(answer)), (500, {"error": "internal_error"}))
        self.assertNotIn(b"secret", answer)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_health_and_readiness(self):
        get = b"GET /%s HTTP/1.1\r\nHost: x\r\n\r\n"
        answers = self.exchange(get % b"healthz", get % b"readyz")
        self.assertEqual([a[0] for a in answers], [200, 200])
        for _ in range(3):
            self.queue.offer([Chunk(1, [b"{}"])])
        self.assertEqual(self.exchange(get % b"readyz")[0][0], 503)
        self.queue.take(3, 1 << 20)
        self.state.lifecycle.start_draining()
        [(code, _, answer)] = self.exchange(get % b"readyz")
        self.assertEqual((code, json.loads(answer)["status"]), (503, "draining"))
        self.state.lifecycle = Lifecycle()
        self.assertEqual(json.loads(self.exchange(get % b"readyz")[0][2])["status"], "starting")


def gzip_of(data: bytes) -> bytes:
    import gzip

    return gzip.compress(data)


class BatchAndGzipTests(ListenerTestCase):
    """NDJSON batches and gzip'd request bodies."""

    def setUp(self) -> None:
        self.setup_listener()

    def setup_listener(self, max_batch_body_size: int = 256) -> None:
        self.listen(queue_size=10, max_body_size=64, now_ms=lambda: 5,
                    max_batch_body_size=max_batch_body_size, max_batch_events=4)

    def send(self, body: bytes, ctype: bytes = b"application/x-ndjson",
             extra: bytes = b""):
        [answer] = Exchange(self.listener).send_and_read(post_bytes(body, ctype, extra=extra))
        return answer[0], json.loads(answer[2])

    def test_ndjson_batch_is_accepted_whole_line_by_line(self):
        code, answer = self.send(b'{"a":1}\n{"a":2}\r\n\n{"a":3}\n')
        self.assertEqual((code, answer), (202, {"status": "accepted", "events": 3}))
        self.assertEqual(list(self.queue), [(5, b'{"a":1}', ""), (5, b'{"a":2}', ""), (5, b'{"a":3}', "")])
        self.assertEqual(self.metric("estat_events_accepted_total"), 3)

    def test_a_bad_line_refuses_the_whole_batch_and_names_the_line(self):
        code, answer = self.send(b'{"a":1}\n{"a":2}\n[3]\n{"a":4}\n')
        self.assertEqual((code, answer),
                         (400, {"error": "invalid_json", "line": 3, "detail": "not_object",
                                "expected": "one JSON object per line"}))
        self.assertEqual(list(self.queue), [])

    def test_an_unpaired_surrogate_escape_is_refused_where_it_is(self):
        # RFC 8259 allows "\\ud800", but it is no Unicode character: jq and
        # DuckDB refuse the object it would be stored in.
        code, answer = self.send(b'{"a":1}\n{"a":"\\ud83d\\ude00"}\n{"a":"\\ud800"}\n')
        self.assertEqual((code, answer["line"], answer["detail"]), (400, 3, "unpaired_surrogate"))
        code, answer = self.send(b'[{"a":1}, {"\\udc00":2}]', b"application/json")
        self.assertEqual((code, answer["element"], answer["detail"]),
                         (400, 2, "unpaired_surrogate"))
        code, answer = self.send(b'[{"b":"\\ud800"}]', b"application/json")
        self.assertEqual((code, answer["element"], answer["detail"]),
                         (400, 1, "unpaired_surrogate"))
        code, answer = self.send(b'{"a":"x\\uDBFF"}', b"application/json")
        self.assertEqual((code, answer["detail"]), (400, "unpaired_surrogate"))
        self.assertEqual(list(self.queue), [])
        self.assertEqual(self.metric("estat_events_rejected_total", reason="invalid_json"), 4)

    def test_empty_batch_is_refused(self):
        code, answer = self.send(b"\n\n")
        self.assertEqual((code, answer["detail"]), (400, "no_events"))

    def test_too_many_events_or_bytes_is_413(self):
        code, answer = self.send(b'{"a":1}\n' * 5)
        self.assertEqual((code, answer["error"], answer["max_events"]), (413, "too_many_events", 4))
        self.assertIn("MAX_BATCH_EVENTS", answer["detail"])
        code, answer = self.send(b'{"a":"' + b"x" * 300 + b'"}\n')
        self.assertEqual((code, answer["error"]), (413, "too_large"))
        self.assertEqual(answer["max_bytes"], 256)
        self.assertEqual(list(self.queue), [])

    def test_more_lines_than_a_batch_holds_are_refused_unsplit(self):
        """Blank lines hold no event, but a body of more lines than
        MAX_BATCH_EVENTS is refused before any is split off or checked."""
        from estat import collect

        code, answer = self.send(b"\n" * 4)
        self.assertEqual((code, answer["detail"]), (400, "no_events"))
        self.patch(collect, "lines_are_objects", lambda *args: self.fail("validated"))
        for body in (b"\n" * 6, b'{"a":1}\n' * 4 + b"\n", b'{"a":1}\n' * 4 + b'{"a":1}'):
            self.setup_listener()  # none expects lines per byte from the last body
            code, answer = self.send(body)
            self.assertEqual((code, answer["error"], answer["max_events"]),
                             (413, "too_many_events", 4), body)
            self.assertIn("4 lines (MAX_BATCH_EVENTS)", answer["detail"])
        self.assertEqual(list(self.queue), [])

    def test_batch_that_does_not_fit_the_queue_is_refused_whole(self):
        for i in range(8):
            self.queue.offer([Chunk(1, [b"{}"])])
        code, answer = self.send(b'{"a":1}\n{"a":2}\n{"a":3}\n')
        self.assertEqual((code, answer["error"]), (503, "queue_full"))
        self.assertEqual(len(list(self.queue)), 8)
        code, _ = self.send(b'{"a":1}\n{"a":2}\n')
        self.assertEqual(code, 202)
        self.assertEqual(len(list(self.queue)), 10)

    def test_gzip_single_and_batch_bodies(self):
        code, _ = self.send(gzip_of(b'{"single":true}'), b"application/json",
                            b"Content-Encoding: gzip\r\n")
        self.assertEqual(code, 202)
        code, answer = self.send(gzip_of(b'{"a":1}\n{"a":2}\n'), extra=b"Content-Encoding: gzip\r\n")
        self.assertEqual((code, answer["events"]), (202, 2))
        self.assertEqual([e.body for e in list(self.queue)],
                         [b'{"single":true}', b'{"a":1}', b'{"a":2}'])

    def test_concatenated_gzip_members_are_one_body(self):
        code, answer = self.send(gzip_of(b'{"a":1}\n') + gzip_of(b'{"a":2}\n'),
                                 extra=b"Content-Encoding: gzip\r\n")
        self.assertEqual((code, answer["events"]), (202, 2))

    def test_gzip_bomb_is_cut_off_at_the_limit(self):
        self.setup_listener(max_batch_body_size=65536)
        bomb = gzip_of(b"{" + b" " * 20_000_000 + b"}")
        self.assertLess(len(bomb), 65536)  # small on the wire, 20 MB inflated
        client = Exchange(self.listener)
        inflated = []
        original = _Zlib.pieces

        def spy(inflater, data, room):
            for piece in original(inflater, data, room):
                inflated.append(len(piece))
                yield piece

        self.patch(_Zlib, "pieces", spy)
        client.send(post_bytes(bomb, b"application/x-ndjson", extra=b"Content-Encoding: gzip\r\n"))
        [(code, _, answer)] = client.responses()
        self.assertEqual((code, json.loads(answer)["error"]), (413, "too_large"))
        self.assertLessEqual(sum(inflated), 65537)
        self.assertEqual(list(self.queue), [])

    def test_bad_or_truncated_gzip_is_400_and_unknown_encoding_415(self):
        code, answer = self.send(b"not gzip at all", extra=b"Content-Encoding: gzip\r\n")
        self.assertEqual((code, answer["error"], answer["encoding"]),
                         (400, "invalid_encoding", "gzip"))
        code, answer = self.send(gzip_of(b'{"a":1}\n')[:-6], extra=b"Content-Encoding: gzip\r\n")
        self.assertEqual((code, answer["error"]), (400, "invalid_encoding"))
        code, answer = self.send(b'{"a":1}\n', extra=b"Content-Encoding: br\r\n")
        self.assertEqual((code, answer["error"]), (415, "unsupported_media_type"))
        self.assertEqual(list(self.queue), [])
        self.assertEqual(self.metric(
            "estat_events_rejected_total", reason="invalid_encoding"), 2)

    def test_a_line_over_the_single_event_limit_refuses_the_batch(self):
        """Each line is one event, held to MAX_BODY_SIZE like a single event,
        so the event queue's memory stays EVENT_QUEUE_SIZE x MAX_BODY_SIZE."""
        code, answer = self.send(b'{"a":1}\n{"pad":"' + b"x" * 60 + b'"}\n')
        self.assertEqual((code, answer["error"], answer["line"], answer["max_bytes"]),
                         (413, "too_large", 2, 64))
        self.assertIn("MAX_BODY_SIZE", answer["detail"])
        self.assertEqual(list(self.queue), [])

    def test_single_event_limit_still_applies_to_json(self):
        code, answer = self.send(b'{"a":"' + b"x" * 100 + b'"}', b"application/json")
        self.assertEqual((code, answer["max_bytes"]), (413, 64))



class ShipperBatchTests(ListenerTestCase):
    """What log shippers send: JSON arrays (Fluent Bit `format json`,
    Logstash `json_batch`), deflate and zstd bodies, and NDJSON with the
    wrong label."""

    def setUp(self) -> None:
        self.listen(queue_size=10, max_body_size=64, now_ms=lambda: 5,
                    max_batch_body_size=4096, max_batch_events=4)

    def send(self, body: bytes, ctype: bytes = b"application/json", extra: bytes = b""):
        [answer] = Exchange(self.listener).send_and_read(post_bytes(body, ctype, extra=extra))
        return answer[0], json.loads(answer[2])

    def test_a_json_array_is_a_batch_of_its_elements_as_sent(self):
        code, answer = self.send(b' [ {"a": 1} ,\n{"b":[2, 3]}, {"c":"]"} ] ')
        self.assertEqual((code, answer), (202, {"status": "accepted", "events": 3}))
        self.assertEqual([e.body for e in list(self.queue)],
                         [b'{"a": 1}', b'{"b":[2, 3]}', b'{"c":"]"}'])

    def test_an_array_with_a_bad_element_is_refused_whole(self):
        for body, detail in [(b'[{"a":1}, 2]', "not_object"), (b'[{"a":1}, {"a":NaN}]', None),
                             (b'[{"a":1}', None), (b"[]", "no_events")]:
            code, answer = self.send(body)
            self.assertEqual((code, answer["error"]), (400, "invalid_json"), body)
            if detail:
                self.assertEqual(answer["detail"], detail)
        code, answer = self.send(b"[" + b",".join([b'{"a":1}'] * 5) + b"]")
        self.assertEqual((code, answer["error"]), (413, "too_many_events"))
        code, answer = self.send(b'[{"a":1}, {"p":"' + b"x" * 80 + b'"}]')
        self.assertEqual((code, answer["element"], answer["max_bytes"]), (413, 2, 64))
        self.assertEqual(list(self.queue), [])

    def test_deflate_zlib_and_raw_and_zstd(self):
        import zlib

        import zstandard

        raw = zlib.compressobj(6, zlib.DEFLATED, -15)
        bodies = [(zlib.compress(b'{"a":1}'), b"application/json", b"deflate"),
                  (raw.compress(b'{"a":2}\n{"a":3}\n') + raw.flush(), NDJSON, b"deflate"),
                  (zstandard.ZstdCompressor().compress(b'{"a":4}\n')
                   + zstandard.ZstdCompressor().compress(b'{"a":5}\n'), NDJSON, b"zstd")]
        for body, ctype, encoding in bodies:
            code, answer = self.send(body, ctype, b"Content-Encoding: %s\r\n" % encoding)
            self.assertEqual(code, 202, (encoding, answer))
        self.assertEqual([e.body for e in list(self.queue)],
                         [b'{"a":%d}' % n for n in range(1, 6)])
        code, answer = self.send(b"\x28\xb5\x2f\xfd garbage", NDJSON, b"Content-Encoding: zstd\r\n")
        self.assertEqual((code, answer["error"]), (400, "invalid_encoding"))

    def test_a_zstd_body_cut_at_a_line_boundary_is_refused(self):
        """A stream cut after a block that ends a line inflates to valid,
        shorter NDJSON: only the frame headers show it was cut."""
        import zstandard

        stream = zstandard.ZstdCompressor(write_checksum=True).compressobj()
        first = stream.compress(b'{"a":1}\n') + stream.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)
        rest = stream.compress(b'{"a":2}\n') + stream.flush()
        self.assertEqual(zstandard.ZstdDecompressor().decompressobj().decompress(first),
                         b'{"a":1}\n')
        code, answer = self.send(first, NDJSON, b"Content-Encoding: zstd\r\n")
        self.assertEqual((code, answer["error"]), (400, "invalid_encoding"))
        self.assertEqual(list(self.queue), [])
        code, answer = self.send(first + rest, NDJSON, b"Content-Encoding: zstd\r\n")
        self.assertEqual((code, answer["events"]), (202, 2))

    def test_a_zstd_bomb_inflates_little_past_the_limit(self):
        import zstandard

        from estat.http import request

        bomb = zstandard.ZstdCompressor().compress(b"{" + b" " * 50_000_000 + b"}")
        self.assertLess(len(bomb), 4096)
        inflated = []
        original = request._Zstd.write

        def spy(inflater, data):
            inflated.append(len(data))
            return original(inflater, data)

        self.patch(request._Zstd, "write", spy)
        code, answer = self.send(bomb, NDJSON, b"Content-Encoding: zstd\r\n")
        self.assertEqual((code, answer["error"]), (413, "too_large"))
        self.assertLessEqual(sum(inflated), 4097 + request._ZSTD_WRITE_BYTES)

    def test_ndjson_labelled_json_is_told_the_content_type(self):
        code, answer = self.send(b'{"a":1}\n{"a":2}\n')
        self.assertEqual((code, answer["error"]), (400, "invalid_json"))
        self.assertIn("application/x-ndjson", answer["expected"])
        self.assertEqual(list(self.queue), [])


NDJSON = b"application/x-ndjson"
ORIGIN = b"https://app.example"


class BrowserTests(ListenerTestCase):
    """CORS: only listed origins may post, simple requests included, and
    every answer to them (errors too) carries CORS headers with
    credentials; a beacon's write key may come in the query string."""

    def setUp(self) -> None:
        from estat.auth import WriteKeys, parse_tokens

        self.key = "k" * 24
        self.listen(queue_size=10, max_body_size=64, cors_origins=ORIGIN.decode(),
                    write_keys=WriteKeys("x", parse_tokens(f"{self.key} web\n")))

    def one(self, raw: bytes):
        [answer] = Exchange(self.listener).send_and_read(raw)
        return answer

    def keyed(self, body: bytes, origin: bytes = ORIGIN, path: bytes = b"/collect",
              ctype: bytes = b"text/plain;charset=UTF-8") -> bytes:
        return post_bytes(body, ctype, path=path,
                          extra=b"Origin: %s\r\nX-Write-Key: %s\r\n" % (origin, self.key.encode()))

    def assertCors(self, headers: dict[bytes, bytes]) -> None:
        self.assertEqual((headers.get(b"access-control-allow-origin"),
                          headers.get(b"access-control-allow-credentials"),
                          headers.get(b"vary")), (ORIGIN, b"true", b"Origin"))

    def test_an_unlisted_origin_is_refused_and_nothing_stored(self):
        for origin in (b"https://evil.example", b"null"):
            code, headers, body = self.one(self.keyed(b'{"a":1}', origin))
            self.assertEqual((code, json.loads(body)["error"]), (403, "forbidden_origin"))
            self.assertNotIn(b"access-control-allow-origin", headers)
        self.assertEqual(list(self.queue), [])
        self.assertEqual(self.metric("estat_events_rejected_total", reason="forbidden_origin"), 2)

    def test_with_no_allowed_origins_any_origin_is_refused(self):
        self.listen(queue_size=10, cors_origins="")
        code, _, body = self.one(post_bytes(b'{"a":1}', extra=b"Origin: %s\r\n" % ORIGIN))
        self.assertEqual((code, json.loads(body)["error"]), (403, "forbidden_origin"))
        self.assertIn("CORS_ALLOWED_ORIGINS is empty", json.loads(body)["detail"])
        self.assertEqual(self.one(post_bytes(b'{"a":1}'))[0], 202)  # no Origin: not a page
        self.assertEqual(len(list(self.queue)), 1)

    def test_every_answer_to_an_allowed_origin_carries_cors_headers(self):
        answers = [self.one(self.keyed(b'{"a":1}')),
                   self.one(self.keyed(b'{"a":"' + b"x" * 100 + b'"}')),  # the channel's 413
                   self.one(self.keyed(b"nope")),
                   self.one(self.keyed(b'{"a":1}', path=b"/nowhere")),
                   self.one(post_bytes(b'{"a":1}', extra=b"Origin: %s\r\n" % ORIGIN))]
        self.assertEqual([code for code, _, _ in answers], [202, 413, 400, 404, 401])
        for _, headers, _ in answers:
            self.assertCors(headers)
        self.queue.take(10, 1 << 20)
        for _ in range(10):
            self.queue.offer([Chunk(1, [b"{}"])])
        code, headers, _ = self.one(self.keyed(b'{"a":1}'))
        self.assertEqual(code, 503)
        self.assertCors(headers)

    def test_a_star_echoes_the_origin_never_star(self):
        self.listen(queue_size=10, cors_origins="*")
        code, headers, _ = self.one(post_bytes(b'{"a":1}', extra=b"Origin: %s\r\n" % ORIGIN))
        self.assertEqual(code, 202)
        self.assertCors(headers)

    def test_preflight_allows_credentials_and_the_headers_asked_for(self):
        code, headers, _ = self.one(
            b"OPTIONS /collect HTTP/1.1\r\nHost: x\r\nOrigin: %s\r\n"
            b"Access-Control-Request-Method: POST\r\n"
            b"Access-Control-Request-Headers: content-type,x-write-key\r\n\r\n" % ORIGIN)
        self.assertEqual(code, 204)
        self.assertCors(headers)
        self.assertEqual(headers[b"access-control-allow-headers"], b"content-type,x-write-key")

    def test_a_write_key_in_the_query_string(self):
        request = post_bytes(b'{"a":1}', b"text/plain;charset=UTF-8",
                             path=b"/collect?write_key=%s" % self.key.encode(),
                             extra=b"Origin: %s\r\n" % ORIGIN)
        code, headers, _ = self.one(request)
        self.assertEqual(code, 202)
        code, _, _ = self.one(post_bytes(b'{"a":1}', path=b"/collect?write_key=wrong-wrong-wrong"))
        self.assertEqual(code, 401)
        crowded = b"&".join(b"f%d=1" % n for n in range(20)) + b"&write_key=" + self.key.encode()
        self.assertEqual(self.one(post_bytes(b'{"a":1}', path=b"/collect?" + crowded))[0], 401)
        self.assertEqual([e.body for e in list(self.queue)], [b'{"a":1}'])


class BodyBudgetTests(ListenerTestCase):
    """One budget for the request bodies being received on every
    connection: over it, 503 with Retry-After before the body is read."""

    def test_bodies_over_the_budget_wait_for_room(self):
        self.listen(queue_size=10, max_receiving_bytes=100, max_batch_body_size=100)
        first = Exchange(self.listener)
        head = b"POST /collect HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-ndjson\r\n"
        first.send(head + b"Content-Length: 60\r\n\r\n" + b'{"a":1}\n')
        second = Exchange(self.listener)
        [(code, headers, body)] = second.send_and_read(
            head + b"Content-Length: 60\r\nExpect: 100-continue\r\n\r\n")
        self.assertEqual((code, headers[b"retry-after"], json.loads(body)["error"]),
                         (503, b"1", "request_bodies_full"))
        self.assertNotIn(b"100 Continue", second.transport.value())
        self.assertEqual(self.metric("estat_events_rejected_total",
                                     reason="request_bodies_full"), 1)
        first.send(b" " * 52)
        self.assertEqual([code for code, _, _ in first.responses()], [202])
        self.assertEqual(self.listener.budget.used, 0)  # answered: given back
        third = Exchange(self.listener)
        third.send(head + b"Content-Length: 60\r\n\r\n")
        self.assertEqual(self.listener.budget.used, 60)
        third.transport.loseConnection()
        third.channel.connectionLost()
        self.assertEqual(self.listener.budget.used, 0)

    def test_a_chunked_body_takes_more_as_it_grows(self):
        self.listen(queue_size=1000, max_receiving_bytes=100 * 1024, max_batch_body_size=100 * 1024,
                    max_body_size=1024)
        client = Exchange(self.listener)
        client.send(b"POST /collect HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-ndjson\r\n"
                    b"Transfer-Encoding: chunked\r\n\r\n")
        self.assertEqual(self.listener.budget.used, 64 * 1024)
        data = (b'{"a":"' + b"x" * 792 + b'"}\n') * 100  # 80,000 bytes
        client.send(b"%x\r\n%s\r\n" % (len(data), data))
        self.assertEqual(self.listener.budget.used, 100 * 1024)
        client.send(b"0\r\n\r\n")
        self.assertEqual([code for code, _, _ in client.responses()], [202])
        self.assertEqual(self.listener.budget.used, 0)

    def test_a_compressed_body_takes_its_compressed_size_and_inflates_once(self):
        """Bodies part-way through arriving are held as they came: a gzip'd
        body takes its size on the wire, and is inflated in one go once
        complete."""
        import gzip

        from estat.http.request import _Zlib

        self.listen(queue_size=1000, max_receiving_bytes=100 * 1024, max_batch_body_size=100 * 1024,
                    max_body_size=1024)
        inflated: list[int] = []
        original = _Zlib.pieces
        self.patch(_Zlib, "pieces",
                   lambda inflater, data, room: (inflated.append(len(data)),
                                                 original(inflater, data, room))[1])
        data = gzip.compress((b'{"a":"' + b"x" * 792 + b'"}\n') * 100)  # 80,000 bytes inflated
        self.assertLess(len(data), 2048)
        client = Exchange(self.listener)
        client.send(b"POST /collect HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-ndjson\r\n"
                    b"Content-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n")
        for start in range(0, len(data), 100):
            piece = data[start:start + 100]
            client.send(b"%x\r\n%s\r\n" % (len(piece), piece))
        self.assertEqual((self.listener.budget.used, inflated), (64 * 1024, []))
        client.send(b"0\r\n\r\n")
        [(code, _, answer)] = client.responses()
        self.assertEqual((code, json.loads(answer)["events"]), (202, 100))
        self.assertEqual(inflated, [len(data)])
        self.assertEqual(self.listener.budget.used, 0)

    def test_a_compressed_body_that_cannot_inflate_within_its_limit_is_cut_off_as_it_arrives(self):
        from estat.http.request import compressed_bound

        self.listen(queue_size=1000, max_receiving_bytes=1024 * 1024, max_batch_body_size=1024)
        bound = compressed_bound(1024)
        client = Exchange(self.listener)
        client.send(b"POST /collect HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-ndjson\r\n"
                    b"Content-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n"
                    b"%x\r\n%s\r\n" % (bound, b"\0" * bound))
        self.assertEqual(client.responses(), [])
        client.send(b"1\r\n\0\r\n")
        [(code, _, answer)] = client.responses()
        self.assertEqual((code, json.loads(answer)["error"]), (413, "too_large"))
        self.assertTrue(client.transport.disconnecting)
        self.assertEqual(self.listener.budget.used, 0)
