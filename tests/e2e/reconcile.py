"""The reconciliation harness: a moto S3 server, a fault proxy in front of
it, `twistd -n estat-ingest` storing through the proxy, a load generator
that sends events with unique ids over many keep-alive connections and
records every answer, and a reconciliation of what was answered against
what is in the bucket and in the dead-letter directory.

The promise checked: every event answered 202 is stored or dead-lettered,
exactly once (lost = 0, duplicates = 0), and no object is truncated.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

import treq
from treq.client import HTTPClient
from twisted.internet import reactor as global_reactor
from twisted.internet.defer import Deferred, DeferredList, inlineCallbacks
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.web.client import Agent, HTTPConnectionPool

from tests.e2e.proxy import FaultProxy
from tests.support import EstatServer, MotoServer, make_workdir, poll_until

BUCKET = "estat-reconcile"
NDJSON = "application/x-ndjson"


# --- the load ---------------------------------------------------------------


@dataclass
class Outcome:
    """One request: the ids it carried and how it was answered."""

    ids: list[str]
    status: Optional[int]  # None: no HTTP answer (see `error`)
    error: str = ""  # "queue_full", "shutting_down", ... or an exception name
    latency: float = 0.0
    retry_after: Optional[str] = None


class Load:
    """Sends events `{"id": "<tag>-<n>", ...}` from `connections` workers,
    each a sequence of requests on a shared persistent connection pool.
    Every `ndjson_every`-th request of a worker is an NDJSON body of
    `ndjson_lines` events; the others carry one event. `pause` seconds
    between a worker's requests pace the load (0: as fast as answered)."""

    def __init__(self, url: str, tag: str, connections: int = 24, pause: float = 0.0,
                 ndjson_every: int = 4, ndjson_lines: int = 5, pad: int = 40,
                 reactor: Any = global_reactor) -> None:
        self.url = url.rstrip("/") + "/collect"
        self.tag = tag
        self.connections = connections
        self.pause = pause
        self.ndjson_every = ndjson_every
        self.ndjson_lines = ndjson_lines
        self.pad = "x" * pad
        self.reactor = reactor
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.pool.maxPersistentPerHost = connections
        self.pool.retryAutomatically = False  # a POST is never resent
        self.http = HTTPClient(Agent(reactor, pool=self.pool, connectTimeout=5))
        self.outcomes: list[Outcome] = []
        self.sent = 0
        self._next = 0
        self._stopping = False
        self._max_events: Optional[int] = None
        self._done: Optional[Deferred] = None

    def start(self, max_events: Optional[int] = None) -> "Deferred[Any]":
        """Start the workers; fires when they have all stopped (after `stop`
        or once `max_events` events have been sent)."""
        self._max_events = max_events
        self._done = DeferredList([self._worker(n) for n in range(self.connections)],
                                  consumeErrors=True)
        return self._done

    @inlineCallbacks
    def stop(self):  # type: ignore[no-untyped-def]
        """Stop after the requests under way; close the pooled connections."""
        self._stopping = True
        if self._done is not None:
            yield self._done
        yield self.pool.closeCachedConnections()

    def _new_ids(self, count: int) -> list[str]:
        ids = [f"{self.tag}-{self._next + i:07d}" for i in range(count)]
        self._next += count
        return ids

    def _finished(self) -> bool:
        return self._stopping or (self._max_events is not None
                                  and self._next >= self._max_events)

    @inlineCallbacks
    def _worker(self, number: int):  # type: ignore[no-untyped-def]
        request = 0
        while not self._finished():
            request += 1
            batch = self.ndjson_every and request % self.ndjson_every == 0
            count = self.ndjson_lines if batch else 1
            if self._max_events is not None:
                count = min(count, self._max_events - self._next)
            ids = self._new_ids(count)
            lines = [json.dumps({"id": event_id, "worker": number, "pad": self.pad})
                     for event_id in ids]
            body = "\n".join(lines).encode() + (b"\n" if batch else b"")
            content_type = NDJSON if batch else "application/json"
            self.sent += len(ids)
            started = time.monotonic()
            outcome = Outcome(ids, None)
            try:
                response = yield self.http.post(
                    self.url, data=body, headers={"Content-Type": [content_type]},
                    timeout=15, allow_redirects=False, reactor=self.reactor)
                # treq's timeout ends at the headers: bound the body too,
                # so that no worker (nor `stop`) can wait for ever.
                answer = yield treq.content(response).addTimeout(15, self.reactor)
            except Exception as error:  # no answer: the outcome is unknown
                outcome.error = type(error).__name__
            else:
                outcome.status = response.code
                outcome.retry_after = response.headers.getRawHeaders(
                    b"retry-after", [None])[0]
                if response.code != 202:
                    try:
                        outcome.error = json.loads(answer).get("error", "")
                    except ValueError:
                        outcome.error = "not_json"
            outcome.latency = time.monotonic() - started
            self.outcomes.append(outcome)
            if outcome.status is None:
                # No answer (refused, reset): pace retries of the next id.
                yield deferLater(self.reactor, 0.05, lambda: None)
            elif self.pause:
                yield deferLater(self.reactor, self.pause, lambda: None)

    def accepted_events(self) -> int:
        return sum(len(o.ids) for o in self.outcomes if o.status == 202)


# --- reading back -----------------------------------------------------------


@dataclass
class Found:
    """Where one copy of events was found: an object or a DLQ entry."""

    place: str  # "s3" or "dlq"
    name: str  # object key, or DLQ entry name
    key: str  # the object key (a DLQ entry's meta key)
    ids: list[str]


def _lines_ids(data: bytes, where: str) -> list[str]:
    """The body ids of a gzip'd JSON Lines object; raises if it is truncated
    or a line is not `{"ts": <epoch seconds>, "body": {...}}` (a `ts` in
    milliseconds, 1000 times too large, is malformed too)."""
    ids = []
    for number, line in enumerate(gzip.decompress(data).splitlines(), 1):
        record = json.loads(line)
        ts = record.get("ts")
        if (not isinstance(ts, (int, float)) or not 1e9 < ts < 1e10
                or not isinstance(record.get("body"), dict)):
            raise AssertionError(f"{where} line {number} is malformed: {line[:200]!r}")
        ids.append(record["body"]["id"])
    return ids


def read_bucket(client: Any, bucket: str = BUCKET) -> list[Found]:
    """Every object in the bucket (blocking: run it in a thread)."""
    found = []
    paginator = client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket):
        for item in page.get("Contents", []):
            data = client.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
            found.append(Found("s3", item["Key"], item["Key"],
                               _lines_ids(data, f"s3://{bucket}/{item['Key']}")))
    return found


def dlq_directories(directory: str) -> list[str]:
    """DLQ_DIR and, with --workers, its per-worker subfolders w<i>."""
    if not os.path.isdir(directory):
        return []
    workers = [os.path.join(directory, name) for name in sorted(os.listdir(directory))
               if re.fullmatch(r"w\d+", name)]
    return workers or [directory]


def read_dlq(directory: str) -> tuple[list[Found], list[str]]:
    """Every committed DLQ entry (`<name>/data.gz` + `<name>/meta.json`,
    see estat/dlqdisk.py), and the names under quarantine/, in DLQ_DIR or
    its worker subfolders."""
    found: list[Found] = []
    quarantined: list[str] = []
    for folder in dlq_directories(directory):
        entries, broken = _read_dlq_folder(folder)
        found.extend(entries)
        quarantined.extend(broken)
    return found, quarantined


def _read_dlq_folder(directory: str) -> tuple[list[Found], list[str]]:
    found: list[Found] = []
    quarantined: list[str] = []
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if name == "quarantine":
            quarantined.extend(sorted(os.listdir(path)))
            continue
        if name.startswith("."):  # an interrupted write or delete
            continue
        with open(os.path.join(path, "meta.json"), "rb") as handle:
            meta = json.load(handle)
        with open(os.path.join(path, "data.gz"), "rb") as handle:
            data = handle.read()
        ids = _lines_ids(data, f"dlq entry {name}")
        if len(ids) != meta["event_count"]:
            raise AssertionError(f"dlq entry {name} holds {len(ids)} events, meta.json "
                                 f"says {meta['event_count']}")
        found.append(Found("dlq", name, meta["key"], ids))
    return found, quarantined


# --- the report -------------------------------------------------------------


@dataclass
class Report:
    """sent / accepted / rejected against stored / in DLQ, per event id."""

    title: str
    requests: int = 0
    sent: int = 0
    accepted: int = 0
    rejected: Counter = field(default_factory=Counter)  # "503 queue_full" -> events
    no_answer: Counter = field(default_factory=Counter)  # exception name -> events
    stored: int = 0
    in_dlq: int = 0
    objects: int = 0
    dlq_entries: int = 0
    dlq_already_stored: int = 0  # entries whose key is also in the bucket
    duplicates: int = 0
    lost: int = 0
    stored_without_answer: int = 0  # no HTTP answer, yet stored: allowed
    phantoms: int = 0  # refused (4xx/5xx) yet stored or dead-lettered: a bug
    unknown: int = 0  # found but never sent: a bug
    quarantined: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def problems(self) -> list[str]:
        """What breaks the promise; empty when the run reconciles."""
        found = []
        if self.lost:
            found.append(f"lost={self.lost} e.g. {self.examples.get('lost')}")
        if self.duplicates:
            found.append(f"duplicates={self.duplicates} e.g. {self.examples.get('duplicates')}")
        if self.phantoms:
            found.append(f"phantoms={self.phantoms} e.g. {self.examples.get('phantoms')}")
        if self.unknown:
            found.append(f"unknown={self.unknown} e.g. {self.examples.get('unknown')}")
        if self.quarantined:
            found.append(f"quarantined DLQ entries={self.quarantined}")
        if self.stored + self.in_dlq != self.accepted + self.stored_without_answer:
            found.append(f"stored + in DLQ = {self.stored + self.in_dlq} != accepted "
                         f"{self.accepted} + stored without answer "
                         f"{self.stored_without_answer}")
        return found

    def table(self) -> str:
        rejected = ", ".join(f"{k}: {v}" for k, v in sorted(self.rejected.items())) or "-"
        no_answer = ", ".join(f"{k}: {v}" for k, v in sorted(self.no_answer.items())) or "-"
        rows = [
            ("requests", self.requests),
            ("sent (events)", self.sent),
            ("accepted (202)", self.accepted),
            ("rejected (events, by code)", rejected),
            ("no answer (events, by error)", no_answer),
            ("stored (in S3)", f"{self.stored} in {self.objects} objects"),
            ("in DLQ", f"{self.in_dlq} in {self.dlq_entries} entries"
                       + (f" ({self.dlq_already_stored} already stored, same key)"
                          if self.dlq_already_stored else "")),
            ("stored without an answer", self.stored_without_answer),
            ("duplicates", self.duplicates),
            ("lost (accepted, nowhere)", self.lost),
            ("phantoms (refused, yet kept)", self.phantoms),
        ]
        rows += [(name, value) for name, value in self.extra.items()]
        width = max(len(name) for name, _ in rows)
        lines = [f"== {self.title} ==", "| " + "metric".ljust(width) + " | value |",
                 "|" + "-" * (width + 2) + "|-------|"]
        lines += [f"| {name.ljust(width)} | {value} |" for name, value in rows]
        return "\n".join(lines)


def reconcile(title: str, outcomes: Iterable[Outcome], objects: list[Found],
              entries: list[Found], quarantined: Iterable[str] = ()) -> Report:
    """Match every id against where it was found."""
    report = Report(title)
    status: dict[str, Outcome] = {}
    for outcome in outcomes:
        report.requests += 1
        report.sent += len(outcome.ids)
        for event_id in outcome.ids:
            status[event_id] = outcome
        if outcome.status == 202:
            report.accepted += len(outcome.ids)
        elif outcome.status is not None:
            report.rejected[f"{outcome.status} {outcome.error}".strip()] += len(outcome.ids)
        else:
            report.no_answer[outcome.error] += len(outcome.ids)
    stored_keys = {found.key for found in objects}
    copies: Counter = Counter()
    in_s3: set[str] = set()
    in_dlq: set[str] = set()
    for found in objects:
        copies.update(found.ids)
        in_s3.update(found.ids)
    for found in entries:
        if found.key in stored_keys:
            # A re-upload that reached S3 but whose entry was not deleted
            # (e.g. cancelled at a stop): it will overwrite the same key.
            report.dlq_already_stored += 1
            continue
        copies.update(found.ids)
        in_dlq.update(found.ids)
    report.objects = len(objects)
    report.dlq_entries = len(entries)
    report.quarantined = len(list(quarantined))
    report.stored = len(in_s3)
    report.in_dlq = len(in_dlq - in_s3)
    duplicates = sorted(i for i, n in copies.items() if n > 1)
    report.duplicates = len(duplicates)
    everywhere = in_s3 | in_dlq
    accepted = {i for i, o in status.items() if o.status == 202}
    lost = sorted(accepted - everywhere)
    report.lost = len(lost)
    unknown = sorted(everywhere - set(status))
    report.unknown = len(unknown)
    phantoms = sorted(i for i in everywhere & set(status)
                      if status[i].status not in (202, None))
    report.phantoms = len(phantoms)
    report.stored_without_answer = sum(
        1 for i in everywhere & set(status) if status[i].status is None)
    report.examples = {"lost": lost[:5], "duplicates": duplicates[:5],
                       "phantoms": phantoms[:5], "unknown": unknown[:5]}
    return report


# --- the harness ------------------------------------------------------------


_WORKER_LABEL = re.compile(r'([{,])worker="\d+"(,?)')


def _drop_worker(match: "re.Match[str]") -> str:
    opening, comma = match.group(1), match.group(2)
    return opening if opening == "{" or comma else ""


class Harness:
    """moto, a FaultProxy in front of it and an estat server storing to the
    bucket through the proxy, all stopped by the test's cleanups."""

    def __init__(self, test: Any, env: Optional[dict[str, str]] = None) -> None:
        self.test = test
        self.overrides = {**getattr(test, "extra_env", {}), **(env or {})}
        self.workdir = ""
        self.moto: Optional[MotoServer] = None
        self.proxy: Optional[FaultProxy] = None
        self.server: Optional[EstatServer] = None
        self.s3: Any = None
        self.loads: list[Load] = []

    @inlineCallbacks
    def start(self):  # type: ignore[no-untyped-def]
        test = self.test
        self.workdir = make_workdir(test)
        self.moto = MotoServer(self.workdir)
        test.addCleanup(self._stop_moto)
        yield self.moto.start()
        self.s3 = self.moto.client()
        yield deferToThread(self.s3.create_bucket, Bucket=BUCKET)
        self.proxy = FaultProxy(global_reactor, "127.0.0.1", self.moto.port)
        self.proxy.start()
        test.addCleanup(self.proxy.stop)
        env = {
            "S3_BUCKET": BUCKET,
            "AWS_ENDPOINT_URL_S3": self.proxy.url,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_REGION": "us-east-1",
            "AWS_CONFIG_FILE": os.path.join(self.workdir, "no-aws-config"),
            "AWS_SHARED_CREDENTIALS_FILE": os.path.join(self.workdir, "no-aws-credentials"),
            "AWS_EC2_METADATA_DISABLED": "true",
            "HOST_ID": "e2e",
            "FLUSH_INTERVAL": "0.3",
            "BATCH_SIZE": "200",
            "DLQ_DRAIN_INTERVAL": "0.1",
            "S3_TIMEOUT": "2",
            "S3_APP_RETRIES": "0",
            "SHUTDOWN_TIMEOUT": "10",
        }
        env.update(self.overrides)
        self.server = EstatServer(self.workdir, env=env)
        test.addCleanup(self._kill_server)
        yield self.server.start()

    def _stop_moto(self) -> Any:
        return self.moto.stop() if self.moto is not None else None

    def _kill_server(self) -> None:
        if self.server is not None and self.server.proc is not None:
            self.server.proc.kill()

    @property
    def dlq_dir(self) -> str:
        assert self.server is not None
        return self.server.environment()["DLQ_DIR"]

    def load(self, tag: str, **options: Any) -> Load:
        assert self.server is not None
        load = Load(self.server.url, tag, **options)
        self.loads.append(load)
        self.test.addCleanup(load.stop)
        return load

    def dlq_entries(self) -> int:
        """Committed entries in DLQ_DIR (or its worker subfolders) now."""
        try:
            return sum(1 for folder in dlq_directories(self.dlq_dir)
                       for n in os.listdir(folder)
                       if not n.startswith(".") and n != "quarantine")
        except FileNotFoundError:
            return 0

    def metric(self, name: str) -> float:
        """One sample of the server's /metrics (0 if absent), summed over
        workers when the server runs several."""
        assert self.server is not None
        total = 0.0
        for sample, value in self.server.metrics().items():
            if _WORKER_LABEL.sub(_drop_worker, sample).replace("{}", "") == name:
                total += value
        return total

    @inlineCallbacks
    def wait_for_dlq(self, predicate: Any, timeout: float, what: str):  # type: ignore[no-untyped-def]
        """Poll the DLQ_DIR entry count until `predicate(count)` holds."""
        yield poll_until(lambda: predicate(self.dlq_entries()), timeout, what=what)

    @inlineCallbacks
    def stop_server(self, limit: float):  # type: ignore[no-untyped-def]
        """SIGTERM; fires with (exit status, seconds the stop took)."""
        import signal

        assert self.server is not None and self.server.proc is not None
        started = time.monotonic()
        self.server.proc.signal(signal.SIGTERM)
        code = yield self.server.proc.wait_exit(limit)
        return code, time.monotonic() - started

    @inlineCallbacks
    def reconcile(self, title: str, outcomes: Optional[list[Outcome]] = None):  # type: ignore[no-untyped-def]
        """Read the bucket and the DLQ and reconcile them with every load's
        outcomes. Call it when nothing moves (the server stopped or idle)."""
        if outcomes is None:
            outcomes = [o for load in self.loads for o in load.outcomes]
        objects = yield deferToThread(read_bucket, self.s3)
        entries, quarantined = yield deferToThread(read_dlq, self.dlq_dir)
        return reconcile(title, outcomes, objects, entries, quarantined)

    def server_log_tail(self, lines: int = 60) -> str:
        if self.server is None:
            return ""
        return "\n".join(self.server.output().splitlines()[-lines:])

    def check(self, report: Report) -> None:
        """Print the table; fail with it (and the log tail) if it does not
        reconcile."""
        print(report.table())
        problems = report.problems()
        if problems:
            self.test.fail("reconciliation failed: " + "; ".join(problems) + "\n"
                           + report.table() + "\n--- server log (tail) ---\n"
                           + self.server_log_tail())
