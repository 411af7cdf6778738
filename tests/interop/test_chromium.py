"""Headless Chromium posting from a page on another origin: `fetch` (plain,
`keepalive`, `credentials: "include"`), `navigator.sendBeacon` with a
string, a text/plain Blob and an application/json Blob, a ~20 KB body and
a 404 the page must be able to read; and pages on origins that may not
post, whose events must never be stored."""

from __future__ import annotations

import json
import os
import re
from typing import Any
from unittest import mock

from twisted.internet.defer import inlineCallbacks
from twisted.trial import unittest

from tests.interop.browser import Chromium, serve_page
from tests.interop.harness import Estat, ids_of
from tests.support import free_port

WRITE_KEY = "beacon-key-0123456789abcdef"

# Runs in the allowed page. Every fetch reports what the page could read:
# the status and body, or the error the browser gave instead (an opaque
# CORS failure). sendBeacon reports only whether the browser queued it.
ALLOWED_SCRIPT = r"""
(async (collect) => {
  const results = {};
  const event = (id, extra) => JSON.stringify({id, client: "chromium", ...extra});
  const post = async (name, url, init) => {
    try {
      const answer = await fetch(url, {method: "POST", ...init});
      results[name] = {status: answer.status, body: await answer.text()};
    } catch (error) {
      results[name] = {error: String(error)};
    }
  };
  const json = {"Content-Type": "application/json"};
  await post("fetch-json", collect, {headers: json, body: event("fetch-json")});
  await post("fetch-keepalive", collect,
             {headers: json, keepalive: true, body: event("fetch-keepalive")});
  await post("fetch-credentials", collect,
             {headers: json, credentials: "include", body: event("fetch-credentials")});
  results["beacon-string"] = navigator.sendBeacon(collect, event("beacon-string"));
  results["beacon-text-blob"] = navigator.sendBeacon(
      collect, new Blob([event("beacon-text-blob")], {type: "text/plain"}));
  results["beacon-json-blob"] = navigator.sendBeacon(
      collect, new Blob([event("beacon-json-blob")], {type: "application/json"}));
  await post("fetch-20kb", collect,
             {headers: json, body: event("fetch-20kb", {pad: "x".repeat(20000)})});
  await post("fetch-404", collect.replace("/collect", "/nowhere"),
             {headers: json, body: event("fetch-404")});
  return results;
})(%s)
"""
ALLOWED_POSTS = 8
STORED_FROM_ALLOWED = ["fetch-json", "fetch-keepalive", "fetch-credentials", "beacon-string",
                       "beacon-text-blob", "beacon-json-blob"]

# Runs in a page whose origin may not post: the simple requests a browser
# sends without asking first, and one that needs a preflight.
FORBIDDEN_SCRIPT = r"""
(async (collect) => {
  const event = (id) => JSON.stringify({id, client: "chromium"});
  const quiet = (promise) => promise.then(() => "sent", (error) => String(error));
  return {
    "forbidden-text": await quiet(fetch(collect, {method: "POST", body: event("forbidden-text"),
                                                  headers: {"Content-Type": "text/plain"}})),
    "forbidden-no-cors": await quiet(fetch(collect, {method: "POST", mode: "no-cors",
                                                     body: event("forbidden-no-cors")})),
    "forbidden-beacon": navigator.sendBeacon(collect, event("forbidden-beacon")),
    "forbidden-json": await quiet(fetch(collect, {method: "POST", body: event("forbidden-json"),
                                                  headers: {"Content-Type": "application/json"}})),
  };
})(%s)
"""
SIMPLE_FORBIDDEN_POSTS = 3
EVENT_ID = re.compile(r'"id":"([^"]+)"')
ACCEPTED = {"status": 202, "body": json.dumps({"status": "accepted"}, separators=(",", ":")) + "\n"}


def answers_by_id(requests: dict[str, dict[str, Any]]) -> dict[str, int]:
    """estat's status for each POST the browser sent, by event id."""
    answers = {}
    for request_id, request in requests.items():
        if request["method"] == "POST" and request["status"] is not None:
            found = EVENT_ID.search(request["post"])
            answers[found.group(1) if found else request_id] = request["status"]
    return answers


class HeadlessChromium(unittest.TestCase):
    timeout = 180
    maxDiff = None

    @inlineCallbacks
    def run_page(self, estat: Estat, origin: str, script: str, url: str, posts: int):  # type: ignore[no-untyped-def]
        """Load `origin` in a fresh browser, run `script` with the collect
        URL, wait for the page's requests to estat to end; (script result,
        requests seen)."""
        devtools = yield Chromium(self).start()
        devtools.navigate(origin + "/")
        results = devtools.evaluate(script % json.dumps(url))
        return results, devtools.settle(estat.url, posts)

    @inlineCallbacks
    def test_allowed_origin_fetch_and_beacons_are_stored(self):
        """Every form posts from an allowed origin: each event stored once,
        and each fetch's answer readable by the page."""
        page = serve_page(self)
        estat = yield Estat(self, {"FLUSH_INTERVAL": "0.2", "CORS_ALLOWED_ORIGINS": page}).start()
        results, requests = yield self.run_page(estat, page, ALLOWED_SCRIPT,
                                                estat.url + "/collect", ALLOWED_POSTS)
        counts = ids_of((yield estat.stored()))
        observed = {name: (results[name], counts[name]) for name in results}
        expected = {name: (ACCEPTED if name.startswith("fetch") else True, 1)
                    for name in STORED_FROM_ALLOWED}
        big = results["fetch-20kb"]
        limit = json.loads(big["body"]) if big.get("status") == 413 else {}
        if big.get("status") == 202:
            expected["fetch-20kb"] = (ACCEPTED, 1)
        elif limit.get("error") == "too_large" and set(limit) - {"error"}:
            # Refused is allowed when the page can read why: a 413 naming the limit.
            expected["fetch-20kb"] = (big, 0)
        else:
            expected["fetch-20kb"] = ("202 stored, or a readable 413 naming the limit", 0)
        expected["fetch-404"] = ({"status": 404, "body": mock.ANY}, 0)
        self.assertEqual(observed, expected, "(what the page read, times stored) per event; "
                         f"estat answered {answers_by_id(requests)}")
        self.assertEqual(sorted(counts), sorted(name for name, (_, n) in expected.items() if n))
        ended = sorted(r["ended"] for r in requests.values() if r["method"] == "POST")
        self.assertEqual(ended, ["finished"] * ALLOWED_POSTS, "how the browser ended each POST")

    @inlineCallbacks
    def check_forbidden(self, allowed: str):  # type: ignore[no-untyped-def]
        """Post from a page whose origin is not in `allowed`: nothing is
        stored, and estat answers 403 to every POST the browser sends."""
        page = serve_page(self)
        env = {"FLUSH_INTERVAL": "0.2"}
        if allowed:
            env["CORS_ALLOWED_ORIGINS"] = allowed
        estat = yield Estat(self, env).start()
        results, requests = yield self.run_page(estat, page, FORBIDDEN_SCRIPT,
                                                estat.url + "/collect", SIMPLE_FORBIDDEN_POSTS)
        counts = ids_of((yield estat.stored()))
        answers = answers_by_id(requests)
        observed = {name: (answers.get(name), counts[name]) for name in results}
        expected = {name: (403, 0) for name in results}
        # The browser never sends a POST whose preflight was refused.
        expected["forbidden-json"] = (None, 0)
        self.assertEqual(observed, expected, f"(estat's answer, times stored); page saw {results}")

    def test_unlisted_origin_is_refused(self):
        """CORS_ALLOWED_ORIGINS names another origin: every post from this
        page is refused with 403 and nothing is stored."""
        return self.check_forbidden(f"http://127.0.0.1:{free_port()}")

    def test_empty_allowed_origins_refuses_every_origin(self):
        """With CORS_ALLOWED_ORIGINS empty, a request with an Origin is
        refused the same way."""
        return self.check_forbidden("")

    @inlineCallbacks
    def test_beacon_with_write_key_in_the_query(self):
        """With write keys, a beacon (which cannot set headers) carries the
        key as `?write_key=`; a fetch without a key reads a 401."""
        page = serve_page(self)
        estat = Estat(self, {"FLUSH_INTERVAL": "0.2", "CORS_ALLOWED_ORIGINS": page})
        tokens = os.path.join(estat.workdir, "tokens")
        with open(tokens, "w") as handle:
            handle.write(f"{WRITE_KEY} browser\n")
        estat.server.extra_env["AUTH_TOKENS_FILE"] = tokens
        yield estat.start()
        script = r"""
        (async (collect) => {
          const event = (id) => JSON.stringify({id, client: "chromium"});
          const beacon = navigator.sendBeacon(collect + "?write_key=%s", event("beacon-key"));
          let unkeyed;
          try {
            const answer = await fetch(collect, {method: "POST", body: event("fetch-no-key"),
                                       headers: {"Content-Type": "application/json"}});
            unkeyed = {status: answer.status, body: await answer.text()};
          } catch (error) { unkeyed = {error: String(error)}; }
          return {beacon, unkeyed};
        })(%%s)""" % WRITE_KEY
        results, requests = yield self.run_page(estat, page, script, estat.url + "/collect", 2)
        counts = ids_of((yield estat.stored()))
        answers = answers_by_id(requests)
        self.assertEqual(
            (answers.get("beacon-key"), results["unkeyed"].get("status"), dict(counts)),
            (202, 401, {"beacon-key": 1}),
            f"(estat's answer to the beacon, what the unkeyed fetch read, ids stored); "
            f"page saw {results}")
