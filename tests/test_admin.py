"""The admin site: exact paths only, JSON 404s, no tracebacks, no access
log."""

from __future__ import annotations

import json

from prometheus_client import CollectorRegistry, Counter
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import TestCase
from twisted.web.server import Request

from estat.admin import AdminPage, AdminSite, HealthResource, MetricsPage
from tests.support import site_get


class Broken(AdminPage):
    def render_GET(self, request: Request) -> bytes:
        raise RuntimeError("secret detail")


class AdminSiteTests(TestCase):
    def setUp(self) -> None:
        registry = CollectorRegistry()
        Counter("estat_things", "Things", registry=registry).inc()
        self.site = AdminSite({b"metrics": MetricsPage(registry), b"healthz": HealthResource(),
                               b"broken": Broken()}, reactor=MemoryReactorClock())

    def test_each_page_at_its_exact_path(self) -> None:
        code, headers, body = site_get(self.site, b"/metrics")
        self.assertEqual(code, 200)
        self.assertTrue(headers[b"content-type"].startswith(b"text/plain"))
        self.assertIn(b"estat_things_total 1.0", body)
        code, headers, body = site_get(self.site, b"/healthz?probe=1")
        self.assertEqual((code, headers[b"content-type"], json.loads(body)),
                         (200, b"application/json", {"status": "ok"}))

    def test_every_other_path_is_a_json_404(self) -> None:
        for path in (b"/", b"/nothing", b"/metrics/", b"/healthz/x", b"//healthz",
                     b"/Metrics", b"/metrics/x/y"):
            code, headers, body = site_get(self.site, path)
            self.assertEqual((code, headers[b"content-type"], json.loads(body)),
                             (404, b"application/json", {"error": "not_found"}), path)

    def test_other_methods_are_refused(self) -> None:
        self.assertEqual(site_get(self.site, b"/healthz", method=b"POST")[0], 405)
        self.assertEqual(site_get(self.site, b"/nothing", method=b"POST")[0], 404)

    def test_an_error_is_a_500_without_its_traceback(self) -> None:
        code, _, body = site_get(self.site, b"/broken")
        self.assertEqual(code, 500)
        self.assertNotIn(b"secret detail", body)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_scrapes_are_not_logged(self) -> None:
        logged = []
        self.site.logFile = type("File", (), {"write": lambda _, line: logged.append(line)})()
        site_get(self.site, b"/healthz")
        self.assertEqual(logged, [])
