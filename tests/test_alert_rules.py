"""Every shipped alert rule fires when it should, checked by Prometheus
itself (`promtool test rules`), and every labelled counter exists at 0 from
the start, so that `increase()` and `rate()` see its first increment.

The promtool test file is generated from etc/prometheus/estat-alerts.yml:
one test case per rule, on the series its expression selects, taken from
what a freshly started server exports. A counter goes from 0 to 1 (or keeps
rising, for a rule that wants a rate sustained over its `for`); a series the
server does not export at start appears only with its first increment, as
it would in Prometheus, and the alert then fails to fire. Gauges go from a
value that must not fire to one that must (GAUGE_SERIES). A rule whose
series cannot be made fails the test: add a case for it here."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from typing import Any, Optional

import yaml
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.trial import unittest

from estat.config import Settings
from estat.metrics import Metrics
from estat.workers.supervisor import WorkerSupervisor
from tests.support import make_workdir
from tests.test_assets import ALERTS, MATCHER, alert_rules

PROMTOOL = shutil.which("promtool")
NO_PROMTOOL = ("promtool not found: install Debian's `prometheus` package "
               "(apt-get install -y prometheus) to evaluate the alert rules")
SCRAPE = {"job": "estat-ingest", "instance": "ingest-1:9100"}
# The minute at which every series changes (before it: minutes 0-10).
STEP_MINUTE = 11
SELECTOR = re.compile(r"\b(up|(?:estat|process|python)_[a-zA-Z0-9_]+)\s*(\{[^}]*\})?")
RANGE = re.compile(r"\[(\d+)m\]")
BY = re.compile(r"\bby\s*\(([^)]*)\)")
# Gauges: (value before the step, value after it). "a+b" is a ramp.
GAUGE_SERIES = {
    "up": ("1", "0"),
    "estat_ready": ("1", "0"),
    "estat_upload_queue_depth": ("0", "1"),
    "estat_upload_queue_capacity": ("1", "1"),
    "estat_dlq_entries": ("0", "1+1"),
    "estat_dlq_oldest_entry_age_seconds": ("0", "1000"),
    "estat_dlq_bytes": ("0", str(1 << 30)),
    "estat_wal_max_bytes": ("1000", "1000"),
    "estat_wal_bytes": ("0", "900"),
}
# Histograms: from the step on, one observation a minute in the bucket
# whose bound is given here, so the buckets from it up rise and the ones
# below stay at 0.
HISTOGRAM_SERIES = {"estat_wal_fsync_seconds_bucket": "0.1"}
# Label values for a series the server does not export at start.
EXAMPLE_LABELS = {"store": "s3", "reason": "timeout", "loop": "uploader"}


def start_samples() -> dict[str, list[dict[str, str]]]:
    """Series name -> label sets of what a server exports before anything
    happened (and the parent of --workers N adds)."""
    from twisted.internet import reactor

    registry = CollectorRegistry()
    Metrics(registry, process=False)
    supervisor = WorkerSupervisor(Settings(workers=2), reactor)
    text = (generate_latest(registry) + generate_latest(supervisor.registry)).decode()
    samples: dict[str, list[dict[str, str]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(dict(sample.labels))
    return samples


def matches(labels: dict[str, str], matchers: list[tuple[str, str, str]]) -> bool:
    for label, op, value in matchers:
        have = labels.get(label, "")
        if ((op == "=" and have != value) or (op == "!=" and have == value)
                or (op == "=~" and not re.fullmatch(value, have))
                or (op == "!~" and re.fullmatch(value, have))):
            return False
    return True


def series_text(name: str, labels: dict[str, str]) -> str:
    body = ",".join(f'{key}="{value}"' for key, value in sorted(labels.items()))
    return f"{name}{{{body}}}"


class RuleCase:
    """The promtool test case of one rule, or `problem` saying why none."""

    def __init__(self, rule: dict[str, Any], exported: dict[str, list[dict[str, str]]]) -> None:
        self.rule = rule
        self.problem: Optional[str] = None
        self.series: dict[str, tuple[str, dict[str, str]]] = {}  # text -> (values, labels)
        expr = rule["expr"]
        ranges = [int(minutes) for minutes in RANGE.findall(expr)]
        self.for_minutes = parse_minutes(rule.get("for", "0m"))
        # A rate or increase over a window shorter than `for` needs a
        # counter that keeps rising; else one step from 0 to 1 must do.
        sustained = bool(ranges) and self.for_minutes >= min(ranges)
        for name, braces in SELECTOR.findall(expr):
            matchers = MATCHER.findall(braces or "")
            if any(labels.get("__name__") == name and matches(labels, matchers)
                   for _, labels in self.series.values()):
                continue
            if name in HISTOGRAM_SERIES:
                self.add_histogram(name, exported, float(HISTOGRAM_SERIES[name]))
                continue
            values = self.values_of(name, sustained)
            if values is None:
                self.problem = (f"{rule['alert']}: no test case for {name} (not a counter "
                                "and not in GAUGE_SERIES)")
                return
            labels = self.labels_for(name, matchers, exported, self.by_labels())
            before, after = values
            if name.endswith("_total") and not any(
                    matches(start, matchers) and set(start) <= set(labels)
                    for start in exported.get(name, [])):
                before = "_"  # not exported until its first increment
            shown = {key: value for key, value in labels.items() if key != "__name__"}
            self.series[series_text(name, shown)] = (
                f"{before}x{STEP_MINUTE - 1} {after}x60", labels)

    def add_histogram(self, name: str, exported: dict[str, list[dict[str, str]]],
                      bound: float) -> None:
        for labels in exported.get(name, []):
            rising = float(labels["le"]) >= bound  # float("+Inf") is inf
            series = {"__name__": name, **labels, **SCRAPE}
            shown = {key: value for key, value in series.items() if key != "__name__"}
            self.series[series_text(name, shown)] = (
                f"0x{STEP_MINUTE - 1} {'1+1' if rising else '0'}x60", series)

    @staticmethod
    def values_of(name: str, sustained: bool) -> Optional[tuple[str, str]]:
        if name.endswith("_total"):
            return ("0", "1+1") if sustained else ("0", "1")
        return GAUGE_SERIES.get(name)

    def by_labels(self) -> Optional[set[str]]:
        """The labels the expression aggregates by, or None (it keeps all)."""
        by = BY.search(self.rule["expr"])
        return {label.strip() for label in by.group(1).split(",")} if by else None

    @staticmethod
    def labels_for(name: str, matchers: list[tuple[str, str, str]],
                   exported: dict[str, list[dict[str, str]]],
                   by: Optional[set[str]]) -> dict[str, str]:
        """The first exported series the selector takes, else one made from
        its matchers and the EXAMPLE_LABELS it aggregates by, with the
        labels a scrape adds."""
        for labels in sorted(exported.get(name, []), key=sorted):
            if matches(labels, matchers):
                return {"__name__": name, **labels, **SCRAPE}
        made = {label: value for label, value in EXAMPLE_LABELS.items() if label in (by or ())}
        made.update({label: value for label, op, value in matchers if op == "="})
        return {"__name__": name, **made, **SCRAPE}

    def alert_labels(self) -> dict[str, str]:
        """What the firing alert carries: the rule's labels, its name, and
        the labels its expression keeps (the `by` labels, or all)."""
        [first, *_] = [labels for _, labels in self.series.values()]
        kept = {key: value for key, value in first.items() if key != "__name__"}
        by = self.by_labels()
        if by is not None:
            kept = {key: value for key, value in kept.items() if key in by}
        if "histogram_quantile" in self.rule["expr"]:
            kept.pop("le", None)  # the quantile is taken across the buckets
        return {**kept, **self.rule.get("labels", {}), "alertname": self.rule["alert"]}

    def as_test(self) -> dict[str, Any]:
        name = self.rule["alert"]
        fires_at = STEP_MINUTE + self.for_minutes + 1
        return {
            "name": name,
            "interval": "1m",
            "input_series": [{"series": text, "values": values}
                             for text, (values, _) in self.series.items()],
            "alert_rule_test": [
                {"eval_time": f"{STEP_MINUTE - 1}m", "alertname": name, "exp_alerts": []},
                {"eval_time": f"{fires_at}m", "alertname": name,
                 "exp_alerts": [{"exp_labels": self.alert_labels()}]},
            ],
        }


def parse_minutes(text: str) -> int:
    match = re.fullmatch(r"(\d+)([smh])", text)
    assert match, f"a `for` of {text!r}"
    number, unit = int(match.group(1)), match.group(2)
    return {"s": number // 60, "m": number, "h": number * 60}[unit]


def without_annotations(rules_path: str, target: str) -> None:
    """The rules as shipped minus their annotations: promtool compares an
    alert's annotations too, and their templates are checked by `promtool
    check rules` instead."""
    with open(rules_path, encoding="utf-8") as handle:
        document = yaml.safe_load(handle)
    for group in document["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    with open(target, "w", encoding="utf-8") as handle:
        yaml.safe_dump(document, handle, sort_keys=False)


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=120)


class LabelledCountersStartAtZero(unittest.TestCase):

    def test_every_labelled_counter_has_its_label_sets_at_start(self) -> None:
        registry = CollectorRegistry()
        Metrics(registry, process=False)
        empty = [family.name for family in registry.collect()
                 if family.type == "counter" and not family.samples]
        self.assertEqual(empty, [])

    def test_store_failures_and_loop_errors_are_exported_at_zero(self) -> None:
        exported = start_samples()
        for store in ("local", "s3"):
            for reason in ("timeout", "connection", "credentials", "io_error"):
                self.assertIn({"store": store, "reason": reason},
                              exported["estat_store_failures_total"])
        for loop in ("batcher", "uploader", "dlq", "reaper"):
            self.assertIn({"loop": loop}, exported["estat_loop_errors_total"])


class PromtoolRules(unittest.TestCase):
    """Each shipped rule, evaluated by promtool."""

    def setUp(self) -> None:
        if PROMTOOL is None:
            print(NO_PROMTOOL)
            raise unittest.SkipTest(NO_PROMTOOL)
        self.work = make_workdir(self)

    def test_the_shipped_rules_check(self) -> None:
        result = promtool("check", "rules", ALERTS)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)

    def test_every_rule_fires_on_its_first_failure_and_not_before(self) -> None:
        exported = start_samples()
        cases = [RuleCase(rule, exported) for rule in alert_rules()]
        self.assertEqual([case.problem for case in cases if case.problem], [])
        rules = os.path.join(self.work, "rules.yml")
        without_annotations(ALERTS, rules)
        tests = os.path.join(self.work, "tests.yml")
        with open(tests, "w", encoding="utf-8") as handle:
            yaml.safe_dump({"rule_files": [rules], "evaluation_interval": "1m",
                            "tests": [case.as_test() for case in cases]}, handle,
                           sort_keys=False)
        self.assertEqual(len(cases), len(alert_rules()))
        result = promtool("test", "rules", tests)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)

    def test_a_rule_without_a_case_fails(self) -> None:
        rule = {"alert": "X", "expr": "estat_something_new > 3", "labels": {}}
        self.assertIn("no test case for estat_something_new",
                      RuleCase(rule, start_samples()).problem or "")
