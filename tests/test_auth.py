"""Write keys, per-writer prefixes and CORS on /collect."""

from __future__ import annotations

import gzip
import json
import os

from twisted.trial import unittest

from estat.auth import TokensFileError, WriteKeys, parse_tokens, read_tokens_file
from estat.codec import encode_batch
from estat.model import Batch
from tests.support import Exchange, ListenerTestCase, make_workdir, post_bytes

KEY_A = "a" * 20 + "-key-web"
KEY_B = "b" * 20 + "-key-batch"
DEFAULT_SEGMENT = "source=__HIVE_DEFAULT_PARTITION__"
TOKENS = f"""# key name [segment]
{KEY_A} web source=web
{KEY_B}   backend   # no segment
"""


class TokensFileTests(unittest.TestCase):
    def test_parse_names_and_segments(self):
        writers = parse_tokens(TOKENS)
        keys = WriteKeys("x", writers)
        self.assertEqual(keys.writer_for(b"Bearer " + KEY_A.encode(), None)[0].segment,
                         "source=web")
        self.assertEqual(keys.writer_for(None, KEY_B.encode())[0].name, "backend")
        self.assertEqual(keys.writer_for(b"bearer  " + KEY_B.encode(), None)[0].name, "backend")
        self.assertEqual(keys.writer_for(None, None), (None, "auth_missing"))
        self.assertEqual(keys.writer_for(b"Basic " + KEY_A.encode(), None), (None, "auth_missing"))
        self.assertEqual(keys.writer_for(b"Bearer nope-nope-nope-nope", None),
                         (None, "auth_invalid"))

    def test_first_non_empty_key_wins_and_two_keys_conflict(self):
        keys = WriteKeys("x", parse_tokens(TOKENS))
        bearer = b"Bearer " + KEY_A.encode()
        self.assertEqual(keys.writer_for(bearer, b"")[0].name, "web")
        self.assertEqual(keys.writer_for(bearer, b"  ")[0].name, "web")
        self.assertEqual(keys.writer_for(b"Bearer ", KEY_B.encode())[0].name, "backend")
        self.assertEqual(keys.writer_for(bearer, KEY_A.encode())[0].name, "web")
        self.assertEqual(keys.writer_for(bearer, KEY_B.encode()), (None, "auth_conflict"))
        self.assertEqual(keys.writer_for(b"Bearer", b""), (None, "auth_missing"))

    def test_bad_files_name_the_line(self):
        for text, message in [("short name\n", "line 1: a key must be at least 16"),
                              (f"{KEY_A} a b c\n", "line 1 has more than"),
                              (f"\n{KEY_A} web\n{KEY_A} again\n", "line 3 repeats a key"),
                              (f"{KEY_A} bad/name\n", "line 1: the name must be"),
                              (f"{KEY_A} n ../x y\n", "more than"),
                              (f"{KEY_A} n seg ment\n", "more than"),
                              (f"{KEY_A} n se?g\n", "prefix segment"),
                              (f"{KEY_A} n web\n", "must be Hive partitions name=value"),
                              (f"{KEY_A} a source=web\n{KEY_B} b team=x\n",
                               "line 2: the segment's partitions (team) differ from line 1's"),
                              ("# nothing\n", "holds no keys")]:
            with self.assertRaises(TokensFileError) as caught:
                parse_tokens(text)
            self.assertIn(message, str(caught.exception))

    def test_unreadable_file_is_one_sentence(self):
        with self.assertRaises(TokensFileError) as caught:
            read_tokens_file("/nonexistent/tokens")
        self.assertEqual(str(caught.exception),
                         "AUTH_TOKENS_FILE '/nonexistent/tokens' cannot be read: "
                         "No such file or directory.")

    def test_reload_swaps_keys_and_keeps_them_when_broken(self):
        path = os.path.join(make_workdir(self), "tokens")
        with open(path, "w") as handle:
            handle.write(TOKENS)
        keys = WriteKeys.from_file(path)
        new_key = "c" * 24
        with open(path, "w") as handle:
            handle.write(f"{new_key} rotated team=a\n")
        with self.assertRaises(TokensFileError) as caught:
            keys.reload()  # other partitions: the layout would change under readers
        self.assertIn("restart the server", str(caught.exception))
        with open(path, "w") as handle:
            handle.write(f"{new_key} rotated source=app\n")
        self.assertEqual(keys.reload(), 1)
        self.assertEqual(keys.writer_for(None, KEY_A.encode())[1], "auth_invalid")
        self.assertEqual(keys.writer_for(None, new_key.encode())[0].name, "rotated")
        with open(path, "w") as handle:
            handle.write("broken\n")
        with self.assertRaises(TokensFileError):
            keys.reload()
        self.assertEqual(keys.writer_for(None, new_key.encode())[0].name, "rotated")


class AuthenticatedCollectTests(ListenerTestCase):
    def setUp(self) -> None:
        self.listen(queue_size=10, now_ms=lambda: 7,
                    write_keys=WriteKeys("x", parse_tokens(TOKENS)),
                    cors_origins="https://app.example, https://b.example")

    def one(self, raw: bytes):
        [answer] = Exchange(self.listener).send_and_read(raw)
        return answer

    def test_missing_or_wrong_key_is_401_and_counted(self):
        code, headers, body = self.one(post_bytes(b'{"a":1}'))
        self.assertEqual((code, json.loads(body)["detail"]), (401, "missing_key"))
        self.assertIn("?write_key=", json.loads(body)["expected"])
        self.assertIn(b"Bearer", headers[b"www-authenticate"])
        code, _, body = self.one(post_bytes(b'{"a":1}', extra=b"X-Write-Key: wrong-wrong-wrong\r\n"))
        self.assertEqual((code, json.loads(body)["detail"]), (401, "invalid_key"))
        self.assertEqual(list(self.queue), [])
        for reason in ("auth_missing", "auth_invalid"):
            self.assertEqual(self.metric("estat_events_rejected_total", reason=reason), 1)

    def test_empty_write_key_header_falls_back_to_bearer(self):
        code, _, _ = self.one(post_bytes(b'{"a":1}', extra=b"X-Write-Key: \r\n"
                                         b"Authorization: Bearer %s\r\n" % KEY_A.encode()))
        self.assertEqual(code, 202)
        self.assertEqual(list(self.queue), [(7, b'{"a":1}', "source=web")])

    def test_two_different_keys_are_a_400_naming_the_conflict(self):
        code, _, body = self.one(post_bytes(
            b'{"a":1}', extra=b"X-Write-Key: %s\r\nAuthorization: Bearer %s\r\n"
            % (KEY_B.encode(), KEY_A.encode())))
        self.assertEqual((code, json.loads(body)),
                         (400, {"error": "conflicting_keys",
                                "detail": "X-Write-Key and Authorization name different keys"}))
        self.assertEqual(list(self.queue), [])
        self.assertEqual(self.metric("estat_events_rejected_total", reason="auth_conflict"), 1)

    def test_valid_keys_queue_events_with_their_writer_segment(self):
        code, _, _ = self.one(post_bytes(b'{"a":1}', extra=b"Authorization: Bearer %s\r\n"
                                         % KEY_A.encode()))
        self.assertEqual(code, 202)
        code, _, _ = self.one(post_bytes(b'{"b":1}\n{"b":2}\n', b"application/x-ndjson",
                                         extra=b"X-Write-Key: %s\r\n" % KEY_B.encode()))
        self.assertEqual(code, 202)
        self.assertEqual(list(self.queue),
                         [(7, b'{"a":1}', "source=web"), (7, b'{"b":1}', DEFAULT_SEGMENT),
                          (7, b'{"b":2}', DEFAULT_SEGMENT)])
        objects = encode_batch(Batch.of_events(list(self.queue), 0, "ID", "size"), validated=True,
                               prefix="raw", raw_prefix="raw_dlq", host_id="h")
        keys = {o.key: [json.loads(l)["body"] for l in gzip.decompress(o.data).splitlines()]
                for o in objects}
        self.assertEqual(keys, {
            "raw/source=web/dt=1970-01-01/hour=00/h-ID.jsonl.gz": [{"a": 1}],
            f"raw/{DEFAULT_SEGMENT}/dt=1970-01-01/hour=00/h-ID.jsonl.gz": [{"b": 1}, {"b": 2}],
        })

    def test_cors_preflight_and_headers(self):
        preflight = (b"OPTIONS /collect HTTP/1.1\r\nHost: x\r\nOrigin: %s\r\n"
                     b"Access-Control-Request-Method: POST\r\n\r\n")
        code, headers, _ = self.one(preflight % b"https://app.example")
        self.assertEqual(code, 204)
        self.assertEqual(headers[b"access-control-allow-origin"], b"https://app.example")
        self.assertIn(b"Authorization", headers[b"access-control-allow-headers"])
        self.assertEqual(headers[b"access-control-allow-methods"], b"POST")
        code, headers, body = self.one(preflight % b"https://evil.example")
        self.assertEqual((code, json.loads(body)["error"]), (403, "forbidden_origin"))
        self.assertNotIn(b"access-control-allow-origin", headers)
        code, headers, _ = self.one(post_bytes(
            b'{"a":1}', extra=b"Origin: https://b.example\r\nX-Write-Key: %s\r\n" % KEY_B.encode()))
        self.assertEqual((code, headers[b"access-control-allow-origin"]),
                         (202, b"https://b.example"))
        code, headers, _ = self.one(post_bytes(
            b'{"a":1}', extra=b"Origin: https://evil.example\r\nX-Write-Key: %s\r\n"
            % KEY_B.encode()))
        self.assertNotIn(b"access-control-allow-origin", headers)
