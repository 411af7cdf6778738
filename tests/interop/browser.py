"""Headless Chromium for the browser cases: a page server on its own
loopback origin, the browser as a subprocess, and a small DevTools
protocol client (over `websocket-client`) that runs a script in a page and
waits until every request the page made to estat has finished."""

from __future__ import annotations

import http.server
import json
import os
import tempfile
import time
import urllib.request
from typing import Any, Callable, Optional

from twisted.internet.defer import inlineCallbacks
from twisted.trial import unittest

from tests.interop.harness import require_binary, require_module
from tests.support import Subprocess, poll_until, serve_http

CHROMIUM = "/usr/bin/chromium"
PAGE = b"<!doctype html><html><head><title>estat interop</title></head><body></body></html>"


class _PageHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (the standard library's name)
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(PAGE)))
        self.end_headers()
        self.wfile.write(PAGE)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def serve_page(case: unittest.TestCase) -> str:
    """An empty page on a new loopback origin, served from a thread (the
    browser loads it while the test blocks on the DevTools socket);
    returns the origin."""
    return serve_http(case, _PageHandler)


class DevTools:
    """One page target over the DevTools protocol: `call` sends a command
    and returns its result, keeping the events that arrive meanwhile."""

    def __init__(self, websocket_url: str) -> None:
        websocket = require_module("websocket", "test")
        self._timeout_error = websocket.WebSocketTimeoutException
        self.socket = websocket.create_connection(websocket_url, timeout=30,
                                                  suppress_origin=True)
        self.events: list[dict[str, Any]] = []
        self._next = 0

    def close(self) -> None:
        self.socket.close()

    def _receive(self, deadline: float) -> dict[str, Any]:
        self.socket.settimeout(max(0.05, deadline - time.monotonic()))
        message: dict[str, Any] = json.loads(self.socket.recv())
        if "id" not in message:
            self.events.append(message)
        return message

    def call(self, method: str, timeout: float = 60.0, **params: Any) -> dict[str, Any]:
        self._next += 1
        self.socket.send(json.dumps({"id": self._next, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while True:
            message = self._receive(deadline)
            if message.get("id") == self._next:
                if "error" in message:
                    raise AssertionError(f"DevTools {method} failed: {message['error']}")
                result: dict[str, Any] = message["result"]
                return result

    def wait(self, done: Callable[[], bool], timeout: float) -> bool:
        """Read events until `done()` or `timeout` seconds; whether done."""
        deadline = time.monotonic() + timeout
        while not done():
            if time.monotonic() > deadline:
                return False
            try:
                self._receive(deadline)
            except self._timeout_error:
                return done()
        return True

    def navigate(self, url: str) -> None:
        self.call("Page.enable")
        self.call("Network.enable")
        self.call("Page.navigate", url=url)
        if not self.wait(lambda: any(e["method"] == "Page.loadEventFired" for e in self.events),
                         30):
            raise AssertionError(f"the page {url} did not load")

    def evaluate(self, expression: str) -> Any:
        """The value of an expression (a Promise is awaited)."""
        result = self.call("Runtime.evaluate", expression=expression, awaitPromise=True,
                           returnByValue=True)
        if "exceptionDetails" in result:
            raise AssertionError(f"the page script threw: {result['exceptionDetails']}")
        return result["result"].get("value")

    def requests_to(self, origin: str) -> dict[str, dict[str, Any]]:
        """Every request the page sent to `origin`, by DevTools request id:
        method, post data, response status (if any) and whether it ended."""
        seen: dict[str, dict[str, Any]] = {}
        for event in self.events:
            if event["method"] == "Network.requestWillBeSent":
                request = event["params"]["request"]
                if request["url"].startswith(origin):
                    seen[event["params"]["requestId"]] = {
                        "method": request["method"], "url": request["url"],
                        "post": request.get("postData", ""), "status": None, "ended": None}
        # Extra-info events may come before the request's own; a response
        # the page may not read (CORS) has only the extra-info status.
        for event in self.events:
            params = event.get("params", {})
            found = seen.get(params.get("requestId", ""))
            if found is None:
                continue
            if event["method"] in ("Network.responseReceivedExtraInfo",
                                   "Network.responseReceived"):
                found["status"] = params.get("statusCode") or params["response"]["status"]
            elif event["method"] == "Network.loadingFinished":
                found["ended"] = "finished"
            elif event["method"] == "Network.loadingFailed":
                found["ended"] = "failed: " + params.get("errorText", "")
        return seen

    def settle(self, origin: str, posts: int, timeout: float = 30.0) -> dict[str, dict[str, Any]]:
        """Wait until the page has sent `posts` POSTs to `origin` and every
        request to it has ended (beacons and keepalive fetches outlive the
        script); returns `requests_to(origin)`."""
        def done() -> bool:
            requests = self.requests_to(origin)
            return (sum(r["method"] == "POST" for r in requests.values()) >= posts
                    and all(r["ended"] for r in requests.values()))

        self.wait(done, timeout)
        return self.requests_to(origin)


class Chromium:
    """Headless Chromium with a fresh profile, driven over DevTools."""

    def __init__(self, case: unittest.TestCase) -> None:
        require_binary(CHROMIUM, "chromium")
        require_module("websocket", "test")
        self.case = case
        self.profile = tempfile.mkdtemp(prefix="estat-chromium-")
        self.proc: Optional[Subprocess] = None
        self.devtools: Optional[DevTools] = None

    @inlineCallbacks
    def start(self):  # type: ignore[no-untyped-def]
        import shutil

        self.case.addCleanup(shutil.rmtree, self.profile, True)
        argv = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                f"--user-data-dir={self.profile}", "--remote-debugging-port=0",
                "--remote-debugging-address=127.0.0.1", "about:blank"]
        self.proc = Subprocess(argv, dict(os.environ), self.profile,
                               os.path.join(self.profile, "chromium.log"))
        self.case.addCleanup(self.proc.kill)
        active = os.path.join(self.profile, "DevToolsActivePort")

        def port() -> Optional[str]:
            if not self.proc.running():
                raise AssertionError("chromium exited:\n" + self.proc.output())
            if os.path.exists(active):
                lines = open(active).read().split()
                return lines[0] if len(lines) >= 2 else None
            return None

        devtools_port = yield poll_until(port, 30, what="chromium's DevTools port")
        with urllib.request.urlopen(f"http://127.0.0.1:{devtools_port}/json/list",
                                    timeout=10) as answer:
            targets = json.loads(answer.read())
        page = [t for t in targets if t.get("type") == "page"][0]
        self.devtools = DevTools(page["webSocketDebuggerUrl"])
        self.case.addCleanup(self.devtools.close)
        return self.devtools
