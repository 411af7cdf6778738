"""The operator assets in etc/ and the docs that go with them stay true to
the code: every metric and label the alert rules and the Grafana dashboard
query is one the server exports, every alert links to a runbook section that
exists, the systemd units give a drain the time it needs, the endpoints they
and the HAProxy example name are valid Twisted endpoints, and docs/tuning.md
lists every setting with its real default."""

from __future__ import annotations

import json
import os
import re
from typing import Any, Iterator

import yaml
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import endpoints
from twisted.python.systemd import ListenFDs
from twisted.trial.unittest import TestCase

from estat.config import OPTIONS, Settings, parse_positive_seconds
from estat.metrics import Metrics
from estat.workers.supervisor import WorkerSupervisor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALERTS = os.path.join(ROOT, "etc", "prometheus", "estat-alerts.yml")
DASHBOARD = os.path.join(ROOT, "etc", "grafana", "estat-ingest-dashboard.json")
UNITS = [os.path.join(ROOT, "etc", "systemd", name)
         for name in ("estat-ingest.service", "estat-ingest-socket.service")]
SOCKET_UNIT = os.path.join(ROOT, "etc", "systemd", "estat-ingest.socket")
HAPROXY = os.path.join(ROOT, "etc", "haproxy", "haproxy.cfg")
OPS = os.path.join(ROOT, "docs", "ops.md")
TUNING = os.path.join(ROOT, "docs", "tuning.md")

# Names the server exports; `up` and the like come from Prometheus itself.
METRIC_NAME = re.compile(r"\b((?:estat|process|python)_[a-zA-Z0-9_]+)\b")
# name{matchers}: label matchers of one selector.
SELECTOR = re.compile(r"\b((?:estat|process|python)_[a-zA-Z0-9_]+)\s*\{([^}]*)\}")
MATCHER = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"([^"]*)"')
# Labels Prometheus adds to every series it scrapes, and the one the parent
# of --workers N adds to every worker's series.
ADDED_LABELS = {"job", "instance", "worker"}


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as handle:
        return handle.read()


def _exposition(text: str) -> tuple[set[str], dict[str, dict[str, set[str]]]]:
    """From a /metrics text: every series name a query may use, and for each
    the values each of its labels takes.

    A counter family `estat_x` is exported as `estat_x_total` (and
    `estat_x_created`), a histogram as `_bucket`, `_sum`, `_count`: a family
    that has no series yet (a labelled metric nothing has touched) still has
    its TYPE line, so its names are known from that."""
    names: set[str] = set()
    labels: dict[str, dict[str, set[str]]] = {}
    for line in text.splitlines():
        if not line.startswith("# TYPE "):
            continue
        _, _, name, kind = line.split(" ", 3)
        if kind == "counter":
            base = name[:-len("_total")] if name.endswith("_total") else name
            names.update({base + "_total", base + "_created"})
        elif kind == "histogram":
            names.update(name + suffix for suffix in ("_bucket", "_sum", "_count", "_created"))
        elif kind == "summary":
            names.update(name + suffix for suffix in ("", "_sum", "_count", "_created"))
        else:
            names.add(name)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            names.add(sample.name)
            for label, value in sample.labels.items():
                labels.setdefault(sample.name, {}).setdefault(label, set()).add(value)
    return names, labels


def server_metrics() -> tuple[set[str], dict[str, dict[str, set[str]]]]:
    """What the server's /metrics shows as soon as it starts (every labelled
    counter has its known label sets at 0 from the start), plus what the
    parent of --workers N adds of its own."""
    from twisted.internet import reactor

    supervisor = WorkerSupervisor(Settings(workers=2), reactor)
    registry = CollectorRegistry()
    Metrics(registry)
    return _exposition((generate_latest(registry)
                        + generate_latest(supervisor.registry)).decode("utf-8"))


def alert_rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(_read(ALERTS))
    return [rule for group in document["groups"] for rule in group["rules"]]


def dashboard() -> dict[str, Any]:
    return json.loads(_read(DASHBOARD))


def dashboard_panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in board["panels"]:
        yield panel
        yield from panel.get("panels", [])


def dashboard_queries(board: dict[str, Any]) -> list[str]:
    queries = [target["expr"] for panel in dashboard_panels(board)
               for target in panel.get("targets", [])]
    for variable in board.get("templating", {}).get("list", []):
        query = variable.get("query")
        if isinstance(query, dict):
            query = query.get("query")
        if query:
            queries.append(query)
    return queries


def unknown_metrics(queries: list[str], exported: set[str]) -> list[str]:
    return sorted({f"{name} (in: {query.strip()})" for query in queries
                   for name in METRIC_NAME.findall(query) if name not in exported})


def bad_matchers(queries: list[str], labels: dict[str, dict[str, set[str]]]) -> list[str]:
    """Label names the series does not have, and `=`/`!=` values it never
    takes (a typo in reason="queue_full" would make an alert silent)."""
    problems = []
    for query in queries:
        for name, body in SELECTOR.findall(query):
            known = labels.get(name)
            for label, op, value in MATCHER.findall(body):
                if label in ADDED_LABELS or known is None:
                    continue
                if label not in known:
                    problems.append(f"{name} has no label {label!r} (in: {query.strip()})")
                elif op in ("=", "!=") and "$" not in value and value not in known[label]:
                    problems.append(f"{name}{{{label}}} never is {value!r}; it takes "
                                    f"{sorted(known[label])} (in: {query.strip()})")
    return problems


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading."""
    slug = heading.strip().lower()
    slug = re.sub(r"[^\w\- ]", "", slug)
    return slug.replace(" ", "-")


def markdown_anchors(text: str) -> set[str]:
    anchors = set()
    in_code = False
    for line in text.splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and re.match(r"#{1,6} ", line):
            anchors.add(github_anchor(line.lstrip("#")))
    return anchors


def unit_settings(path: str) -> dict[str, list[str]]:
    """`Section.Key` -> values of a systemd unit (keys may repeat)."""
    settings: dict[str, list[str]] = {}
    section = ""
    for raw in _read(path).splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, _, value = line.partition("=")
        settings.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return settings


def systemd_seconds(text: str) -> float:
    """A systemd time span such as `60`, `90s`, `2min`, `1min 30s`."""
    units = {"": 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "hr": 3600}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", text):
        total += float(number) * units[unit]
    return total


def default_of(env: str) -> str:
    return next(option.default for option in OPTIONS if option.env == env)


class MetricNamesTests(TestCase):
    """Every metric and label the alert rules and the dashboard use exists."""

    def setUp(self) -> None:
        self.exported, self.labels = server_metrics()

    def test_exposition_knows_counter_and_histogram_names(self) -> None:
        self.assertIn("estat_events_accepted_total", self.exported)
        self.assertNotIn("estat_events_accepted", self.exported)
        self.assertIn("estat_s3_put_seconds_bucket", self.exported)
        # A labelled counter no request has touched yet is known from TYPE.
        registry = CollectorRegistry()
        Metrics(registry, process=False)
        names, _ = _exposition(generate_latest(registry).decode())
        self.assertIn("estat_store_failures_total", names)

    def test_alert_rule_metrics_exist(self) -> None:
        queries = [rule["expr"] for rule in alert_rules()]
        self.assertEqual(unknown_metrics(queries, self.exported), [])
        self.assertEqual(bad_matchers(queries, self.labels), [])

    def test_dashboard_metrics_exist(self) -> None:
        queries = dashboard_queries(dashboard())
        self.assertEqual(unknown_metrics(queries, self.exported), [])
        self.assertEqual(bad_matchers(queries, self.labels), [])

    def test_a_renamed_metric_is_caught(self) -> None:
        """The checks above would fail if a metric or a label value changed."""
        queries = ['rate(estat_dlq_dropped_event_total[5m])',
                   'estat_dlq_dropped_events',  # the family name, not the series
                   'rate(estat_events_rejected_total{reason="queue_ful"}[5m])',
                   'rate(estat_s3_put_attempts_total{result="ok"}[5m])']
        self.assertEqual(len(unknown_metrics(queries, self.exported)), 2)
        self.assertEqual(len(bad_matchers(queries, self.labels)), 2)

    def test_the_alerts_watch_the_dlq_the_stores_the_queue_and_the_loops(self) -> None:
        queries = " ".join(rule["expr"] for rule in alert_rules())
        for name in ("estat_dlq_entries", "estat_dlq_oldest_entry_age_seconds",
                     "estat_dlq_dropped_events_total", "estat_s3_put_attempts_total",
                     "estat_store_failures_total", 'reason="queue_full"', "estat_ready",
                     "up{", "estat_loop_errors_total",
                     "estat_dlq_quarantined_entries_total"):
            self.assertIn(name, queries)


class AlertRulesTests(TestCase):
    """The rules file is what Prometheus and an on-call operator need."""

    def test_every_rule_is_complete(self) -> None:
        rules = alert_rules()
        self.assertGreater(len(rules), 5)
        names = [rule["alert"] for rule in rules]
        self.assertEqual(len(names), len(set(names)), "alert names repeat")
        for rule in rules:
            self.assertIn(rule["labels"]["severity"], ("warning", "critical"), rule["alert"])
            for key in ("summary", "description", "runbook_url"):
                self.assertTrue(rule["annotations"].get(key), f"{rule['alert']}: no {key}")

    def test_every_runbook_section_exists(self) -> None:
        anchors = markdown_anchors(_read(OPS))
        for rule in alert_rules():
            path, _, anchor = rule["annotations"]["runbook_url"].partition("#")
            self.assertEqual(path, "docs/ops.md", rule["alert"])
            self.assertIn(anchor, anchors, f"{rule['alert']}: docs/ops.md has no #{anchor}")


class DashboardTests(TestCase):
    """The dashboard imports into Grafana with a Prometheus picked at import."""

    def test_structure(self) -> None:
        board = dashboard()
        self.assertEqual([i["name"] for i in board["__inputs"]], ["DS_PROMETHEUS"])
        self.assertGreaterEqual(board["schemaVersion"], 36)
        ids = [panel["id"] for panel in dashboard_panels(board)]
        self.assertEqual(len(ids), len(set(ids)), "panel ids repeat")
        for panel in dashboard_panels(board):
            if panel["type"] == "row":
                continue
            self.assertTrue(panel.get("targets"), panel["title"])
            for target in panel["targets"]:
                self.assertEqual(target["datasource"]["uid"], "${DS_PROMETHEUS}",
                                 panel["title"])

    def test_it_shows_the_pipeline(self) -> None:
        queries = " ".join(dashboard_queries(dashboard()))
        for name in ("estat_http_requests_total", "estat_events_accepted_total",
                     "estat_events_stored_total", "estat_events_rejected_total",
                     "estat_event_queue_depth", "estat_event_queue_capacity",
                     "estat_upload_queue_depth", "estat_uploads_in_flight",
                     "estat_s3_put_seconds_bucket", "estat_s3_put_attempts_total",
                     "estat_dlq_entries", "estat_dlq_bytes",
                     "estat_dlq_oldest_entry_age_seconds", "estat_dlq_dropped_events_total",
                     "estat_open_connections", "process_resident_memory_bytes",
                     "process_cpu_seconds_total"):
            self.assertIn(name, queries)


class SystemdUnitTests(TestCase):
    """The units let a drain finish and start the server the right way."""

    def test_stop_timeout_exceeds_shutdown_timeout(self) -> None:
        """systemd must not SIGKILL a drain: TimeoutStopSec is above the
        default DRAIN_DELAY + SHUTDOWN_TIMEOUT, and above that + 15 s after
        which the parent of --workers N kills a worker still stopping."""
        shutdown = (parse_positive_seconds(default_of("SHUTDOWN_TIMEOUT"))
                    + parse_positive_seconds(default_of("DRAIN_DELAY")))
        for path in UNITS:
            stop = unit_settings(path)["Service.TimeoutStopSec"][-1]
            self.assertGreater(systemd_seconds(stop), shutdown + 15, path)

    def test_exec_start_and_stop(self) -> None:
        for path in UNITS:
            settings = unit_settings(path)
            command = settings["Service.ExecStart"][-1].split()
            self.assertEqual(command[:4], ["/opt/estat-ingest/.venv/bin/twistd",
                                           "--nodaemon", "--pidfile=", "estat-ingest"], path)
            self.assertEqual(settings["Service.KillSignal"], ["SIGTERM"], path)
            self.assertIn("143", settings["Service.SuccessExitStatus"][-1].split(), path)
            reload = settings["Service.ExecReload"][-1]
            self.assertEqual(reload, "/bin/kill -HUP $MAINPID", path)
            self.assertEqual(settings["Service.StateDirectory"], ["estat-ingest"], path)
            environment = settings["Service.Environment"]
            self.assertIn("DLQ_DIR=/var/lib/estat-ingest/dlq", environment, path)
            self.assertIn("OUTPUT_DIR=/var/lib/estat-ingest/objects", environment, path)

    def test_socket_activated_listener_is_a_valid_endpoint(self) -> None:
        settings = unit_settings(UNITS[1])
        command = settings["Service.ExecStart"][-1].split()
        description = command[command.index("--listen") + 1]
        self.assertTrue(description.startswith("systemd:"))
        # As if systemd had passed one descriptor (fd 3) to this process.
        self.patch(endpoints._SystemdParser, "_sddaemon",
                   ListenFDs([3], ("estat-ingest.socket",)))
        from twisted.internet import reactor

        endpoint = endpoints.serverFromString(reactor, description)
        self.assertIsInstance(endpoint, endpoints.AdoptedStreamServerEndpoint)
        self.assertEqual(endpoint.fileno, 3)
        socket_settings = unit_settings(SOCKET_UNIT)
        self.assertEqual(socket_settings["Socket.Service"], ["estat-ingest-socket.service"])
        # domain=INET needs an IPv4 socket.
        self.assertRegex(socket_settings["Socket.ListenStream"][0], r"^\d+\.\d+\.\d+\.\d+:\d+$")


class HAProxyTests(TestCase):
    """The HAProxy example and its server side agree."""

    def test_proxy_protocol_and_readyz_checks(self) -> None:
        text = _read(HAPROXY)
        self.assertIn("send-proxy-v2", text)
        self.assertRegex(text, r"http-check send meth GET uri /readyz")
        self.assertIn("LISTEN=haproxy:tcp:8080", text)
        from twisted.internet import reactor

        endpoint = endpoints.serverFromString(reactor, "haproxy:tcp:8080")
        self.assertEqual(type(endpoint).__name__, "_WrapperServerEndpoint")


class TuningDocTests(TestCase):
    """docs/tuning.md lists every setting with its real default."""

    def test_every_setting_with_its_default(self) -> None:
        rows = {}
        for line in _read(TUNING).splitlines():
            match = re.match(r"\|\s*`([A-Z0-9_]+)`\s*\|\s*`([^`]*)`\s*\|", line)
            if match:
                rows[match.group(1)] = match.group(2)
        for option in OPTIONS:
            self.assertIn(option.env, rows, f"docs/tuning.md has no row for {option.env}")
            self.assertEqual(rows[option.env], option.default or "(empty)", option.env)


class DocLinksTests(TestCase):
    """The links in docs/ops.md and docs/tuning.md lead somewhere: the file
    exists and, for a Markdown file, so does the section."""

    def test_relative_links_resolve(self) -> None:
        for doc in (OPS, TUNING):
            text = _read(doc)
            for target in re.findall(r"\]\(([^)\s]+)\)", text):
                if re.match(r"[a-z]+:", target):
                    continue
                path, _, anchor = target.partition("#")
                full = os.path.normpath(os.path.join(os.path.dirname(doc), path)) if path else doc
                self.assertTrue(os.path.exists(full), f"{doc}: {target} does not exist")
                if anchor and full.endswith(".md"):
                    self.assertIn(anchor, markdown_anchors(_read(full)), f"{doc}: {target}")
