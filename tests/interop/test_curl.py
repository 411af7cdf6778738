"""Debian's curl with its default settings: TLS with ALPN, `--http2` on
http:// (an `Upgrade: h2c` request), a chunked body, and `Expect:
100-continue` (forced on a small body, and curl's own for a body over
1 MiB)."""

from __future__ import annotations

import json
import os
import ssl
import http.client

from twisted.internet.defer import inlineCallbacks
from twisted.trial import unittest

from tests.interop.harness import CLIENT_TIMEOUT, Estat, answer_of, assert_stored_once, \
    require_binary, run

CURL = "/usr/bin/curl"


def curl(case: unittest.TestCase, url: str, body_path: str, *options: str,
         content_type: str = "application/json") -> tuple[int, str, dict[str, str], bytes]:
    """POST the file at `body_path` with curl: (status, HTTP version, last
    response's headers, body). Status 0 when curl failed (its error is kept
    in the body)."""
    out = os.path.join(os.path.dirname(body_path), "curl-out")
    head = os.path.join(os.path.dirname(body_path), "curl-head")
    done = run([require_binary(CURL, "curl"), "-sS", "--max-time", str(int(CLIENT_TIMEOUT) - 5),
                "-o", out, "-D", head, "-w", "%{http_code} %{http_version}",
                "-H", f"Content-Type: {content_type}", *options,
                "--data-binary", "@" + body_path, url + "/collect"])
    code, _, version = done.stdout.decode().partition(" ")
    if done.returncode != 0 or not os.path.exists(out):
        return 0, version, {}, done.stderr
    with open(head, "rb") as handle:
        blocks = handle.read().decode("latin-1").split("\r\n\r\n")
    last = [block for block in blocks if block.strip()][-1].splitlines()
    headers = {}
    for line in last[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    with open(out, "rb") as handle:
        return int(code), version, headers, handle.read()


def write(directory: str, name: str, data: bytes) -> str:
    path = os.path.join(directory, name)
    with open(path, "wb") as handle:
        handle.write(data)
    return path


class Curl(unittest.TestCase):
    timeout = 180

    def setUp(self) -> None:
        require_binary(CURL, "curl")

    def assertAccepted(self, answer: tuple[int, str, dict[str, str], bytes],
                       events: int = 1) -> None:
        code, version, headers, body = answer
        expected = {"status": "accepted", **({"events": events} if events > 1 else {})}
        self.assertEqual((code, version), (202, "1.1"), answer_of(body))
        self.assertEqual(json.loads(body), expected)
        self.assertNotIn("upgrade", headers.get("connection", "").lower())
        self.assertNotIn("upgrade", headers)

    @inlineCallbacks
    def test_tls_with_alpn(self):
        """curl offers ALPN h2,http/1.1 over TLS; the server picks http/1.1
        and stores the event."""
        estat = yield Estat(self, {"FLUSH_INTERVAL": "0.2"}, tls=True).start()
        body = write(estat.workdir, "event.json", b'{"id":"curl-tls"}')
        self.assertAccepted(curl(self, estat.tls_url, body, "--cacert", estat.cert))
        assert_stored_once(self, (yield estat.stored()), ["curl-tls"])

    @inlineCallbacks
    def test_http2_on_http_is_answered_in_http11(self):
        """`curl --http2 http://…` sends `Upgrade: h2c`; the server ignores
        it and answers 202 in HTTP/1.1."""
        estat = yield Estat(self, {"FLUSH_INTERVAL": "0.2"}).start()
        body = write(estat.workdir, "event.json", b'{"id":"curl-h2c"}')
        self.assertAccepted(curl(self, estat.url, body, "--http2"))
        assert_stored_once(self, (yield estat.stored()), ["curl-h2c"])

    @inlineCallbacks
    def test_chunked_body(self):
        estat = yield Estat(self, {"FLUSH_INTERVAL": "0.2"}).start()
        single = write(estat.workdir, "event.json", b'{"id":"curl-chunked"}')
        self.assertAccepted(curl(self, estat.url, single, "-H", "Transfer-Encoding: chunked"))
        lines = b"".join(b'{"id":"curl-chunked-%d"}\n' % n for n in range(100))
        batch = write(estat.workdir, "events.ndjson", lines)
        self.assertAccepted(curl(self, estat.url, batch, "-H", "Transfer-Encoding: chunked",
                                 content_type="application/x-ndjson"), events=100)
        assert_stored_once(self, (yield estat.stored()),
                           ["curl-chunked"] + [f"curl-chunked-{n}" for n in range(100)])

    @inlineCallbacks
    def test_expect_100_continue_forced(self):
        estat = yield Estat(self, {"FLUSH_INTERVAL": "0.2"}).start()
        body = write(estat.workdir, "event.json", b'{"id":"curl-expect"}')
        self.assertAccepted(curl(self, estat.url, body, "-H", "Expect: 100-continue"))
        assert_stored_once(self, (yield estat.stored()), ["curl-expect"])

    @inlineCallbacks
    def test_expect_100_continue_on_a_body_over_one_mebibyte(self):
        """curl sends `Expect: 100-continue` by itself for a body over 1 MiB:
        an NDJSON chunk of 8,000 events (~1.5 MB) with default settings."""
        estat = yield Estat(self, {"FLUSH_INTERVAL": "0.2"}).start()
        ids = [f"curl-big-{n:05d}" for n in range(8000)]
        pad = "x" * 160
        data = "".join(json.dumps({"id": i, "pad": pad}) + "\n" for i in ids).encode()
        self.assertGreater(len(data), 1024 * 1024)
        body = write(estat.workdir, "events.ndjson", data)
        self.assertAccepted(curl(self, estat.url, body,
                                 content_type="application/x-ndjson"), events=len(ids))
        assert_stored_once(self, (yield estat.stored()), ids)


class PythonSslWithAlpn(unittest.TestCase):
    """The standard library's ssl offering ALPN `h2, http/1.1`, as HTTP
    clients that can speak both do."""

    timeout = 120

    @inlineCallbacks
    def test_alpn_selects_http11_and_the_event_is_stored(self):
        estat = yield Estat(self, {"FLUSH_INTERVAL": "0.2"}, tls=True).start()
        context = ssl.create_default_context(cafile=estat.cert)
        context.set_alpn_protocols(["h2", "http/1.1"])
        connection = http.client.HTTPSConnection("127.0.0.1", estat.tls_port,
                                                 context=context, timeout=10)
        self.addCleanup(connection.close)
        try:
            connection.connect()
        except (ssl.SSLError, OSError) as error:
            self.fail(f"TLS handshake offering ALPN h2,http/1.1 failed: {error!r}")
        self.assertEqual(connection.sock.selected_alpn_protocol(), "http/1.1")
        connection.request("POST", "/collect", body=b'{"id":"python-alpn"}',
                           headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        self.assertEqual((response.status, json.loads(response.read())),
                         (202, {"status": "accepted"}))
        connection.close()
        assert_stored_once(self, (yield estat.stored()), ["python-alpn"])
