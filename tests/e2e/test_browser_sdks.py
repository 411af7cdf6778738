"""posthog-js and Segment's analytics.js (analytics-next), from npm, in
headless Chromium on a page of an allowed origin, each pointed at a live
`twistd -n estat-ingest` with only its host changed: every event is stored
exactly once, as its own line.

The packages come from the npm registry, which the suite itself does not
reach: `ESTAT_BROWSER_SDKS` names a `node_modules` holding both
(`npm install --prefix DIR posthog-js @segment/analytics-next`, then
`ESTAT_BROWSER_SDKS=DIR/node_modules`); without it, or without Chromium,
these tests are skipped."""

from __future__ import annotations

import functools
import http.server
import os
import shutil
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.trial import unittest

from tests.support import (
    EstatServer,
    Subprocess,
    Timeout,
    make_workdir,
    poll_until,
    read_objects,
    serve_http,
)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or ""
NODE_MODULES = os.environ.get("ESTAT_BROWSER_SDKS", "")
SCRIPTS = {"ph.js": "posthog-js/dist/array.full.no-external.js",
           "ajs.js": "@segment/analytics-next/dist/umd/index.js"}
KEY = "browser-write-key-0123456789"

POSTHOG_PAGE = """<!doctype html><html><body><script src="/ph.js"></script><script>
posthog.init("%(key)s", {api_host: "%(host)s", autocapture: false, capture_pageview: false,
  capture_pageleave: false, disable_session_recording: true, advanced_disable_flags: true,
  persistence: "memory", opt_out_useragent_filter: true});
for (let i = 0; i < %(count)d; i++) posthog.capture("js-event", {n: i});
</script></body></html>"""

SEGMENT_PAGE = """<!doctype html><html><body><script src="/ajs.js"></script><script>
AnalyticsNext.AnalyticsBrowser.load({writeKey: "%(key)s", cdnSettings: {integrations: {
    "Segment.io": {apiKey: "%(key)s", apiHost: "%(api_host)s/v1", protocol: "http"}}}})
  .then(([analytics]) => {
    const sent = [];
    for (let i = 0; i < %(count)d - 2; i++) sent.push(analytics.track("ajs-event", {n: i}));
    sent.push(analytics.page());
    sent.push(analytics.identify("user-1", {plan: "pro"}));
    return Promise.all(sent);
  }).catch((error) => console.error("analytics.js: " + error));
</script></body></html>"""


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


class BrowserSdkTests(unittest.TestCase):
    timeout = 180

    def setUp(self) -> None:
        if not CHROMIUM:
            raise unittest.SkipTest("no chromium on PATH")
        if not NODE_MODULES or not all(os.path.exists(os.path.join(NODE_MODULES, path))
                                       for path in SCRIPTS.values()):
            raise unittest.SkipTest("ESTAT_BROWSER_SDKS does not name a node_modules with "
                                    "posthog-js and @segment/analytics-next")
        self.workdir = make_workdir(self)
        self.www = os.path.join(self.workdir, "www")
        os.mkdir(self.www)
        for name, path in SCRIPTS.items():
            shutil.copy(os.path.join(NODE_MODULES, path), os.path.join(self.www, name))
        self.origin = serve_http(self, functools.partial(_Quiet, directory=self.www))

    @inlineCallbacks
    def check(self, page: str, protocol: str, id_field: str,  # type: ignore[no-untyped-def]
              count: int):
        tokens = os.path.join(self.workdir, "tokens")
        with open(tokens, "w") as handle:
            handle.write(f"{KEY} browser source=browser\n")
        server = EstatServer(self.workdir, env={"AUTH_TOKENS_FILE": tokens,
                                                "CORS_ALLOWED_ORIGINS": self.origin})
        yield server.start()
        with open(os.path.join(self.www, "page.html"), "w") as handle:
            handle.write(page % {"key": KEY, "host": server.url, "count": count,
                                 "api_host": server.url.removeprefix("http://")})
        # Real time, not --virtual-time-budget: the SDKs send from timers,
        # and a virtual clock can end the page before a send finishes.
        accepted = f'estat_protocol_events_accepted_total{{protocol="{protocol}"}}'
        browser = Subprocess(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--user-data-dir=" + os.path.join(self.workdir, "chromium"),
             self.origin + "/page.html"],
            dict(os.environ), self.workdir, os.path.join(self.workdir, "chromium.log"))
        self.addCleanup(browser.kill)
        try:
            yield poll_until(lambda: server.metrics().get(accepted, 0) >= count
                             or not browser.running(), 60, what=f"{count} {protocol} events")
        except Timeout:
            self.fail(f"estat accepted {server.metrics().get(accepted)} of {count}:\n"
                      + browser.output()[-3000:])
        self.assertTrue(browser.running(), browser.output()[-3000:])
        browser.kill()
        code = yield server.stop()
        self.assertEqual(code, -15, server.output())
        ids = []
        for key, lines in read_objects(os.path.join(self.workdir, "objects")):
            self.assertTrue(key.startswith("raw/source=browser/"), key)
            for line in lines:
                self.assertEqual(line["body"]["protocol"], protocol)
                ids.append(line["body"]["message"][id_field])
        self.assertEqual(len(ids), count)
        self.assertEqual(len(set(ids)), count)

    def test_posthog_js(self):  # type: ignore[no-untyped-def]
        return self.check(POSTHOG_PAGE, "posthog", "uuid", 30)

    def test_segment_analytics_js(self):  # type: ignore[no-untyped-def]
        return self.check(SEGMENT_PAGE, "segment", "messageId", 22)
