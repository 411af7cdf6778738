"""Benchmark harness for estat-ingest: requests/s, CPU, memory and latency
of estat against bare Twisted floors, on one machine in one run.

    .venv/bin/python bench/run.py            # every scenario, 10 s each
    .venv/bin/python bench/run.py --quick    # 3 s each, a smoke run
    .venv/bin/python bench/run.py --scenarios baseline,single-local -d 20
    .venv/bin/python bench/run.py --workers 1,2   # each estat scenario per worker count
    .venv/bin/python bench/run.py -s baseline,single-local -d 5 --latency
        # then p50/p99/p99.9 at a fixed rate of half each server's maximum

Runs wrk on loopback against a bare twisted.web baseline and against
`twistd -n estat-ingest` (local store and a moto S3 server), then prints one
markdown table. With --latency, each server then gets a fixed-rate (open-loop)
run at a fraction of the req/s it just reached, and a second table gives the
latency percentiles at that rate. Raw results and logs go under
bench/results/ (gitignored).
See bench/README.md for what each column means.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional

# The repository root, for tests.support (free ports, HTTP probes).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import codec_cost  # noqa: E402  (bench/, this script's directory)
import loadgen  # noqa: E402
import procs  # noqa: E402
from servers import Baseline, Estat, parse_metrics  # noqa: E402
from stores import Moto, count_files, count_local_events, list_local_objects  # noqa: E402

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
SCENARIOS = ("baseline", "baseline-httptools", "floor-batch", "floor-chunk1k",
             "floor-chunk13k", "single-local", "batch-local", "chunk1k-local",
             "chunk13k-local", "single-s3", "batch-s3", "single-durable", "batch-durable")
OPTIONAL_SCENARIOS = ("baseline-stock",)  # run only when named
BASELINES = ("baseline", "baseline-httptools", "baseline-stock")
# The httptools floor answering each batch body, as `baseline-httptools`
# answers the single one: the row to subtract from that body's estat row.
FLOORS = {"floor-batch": "batch", "floor-chunk1k": "chunk1k", "floor-chunk13k": "chunk13k"}
BATCH_EVENTS = 100
CHUNK_EVENTS = {"chunk1k": 1_000, "chunk13k": 13_500}


@dataclass(frozen=True)
class Body:
    """What every request of a scenario sends."""

    data: bytes
    content_type: str
    events: int
    encoding: str = ""  # Content-Encoding, "" for none


def body_for(kind: str) -> Body:
    """`single`: one ~1 KB event; `batch`: 100 × ~300 B NDJSON; `chunk1k`,
    `chunk13k`: a log shipper's gzip'd NDJSON chunk of 1,000 or 13,500
    distinct ~300 B events."""
    if kind == "single":
        return Body(loadgen.single_event(), loadgen.JSON_TYPE, 1)
    if kind == "batch":
        return Body(loadgen.ndjson_batch(BATCH_EVENTS), loadgen.NDJSON_TYPE, BATCH_EVENTS)
    events = CHUNK_EVENTS[kind]
    return Body(loadgen.gzipped(loadgen.log_chunk(events)), loadgen.NDJSON_TYPE, events,
                "gzip")


def floor_of(kind: str) -> str:
    """The scenario name of the floor for `kind`'s body."""
    return "baseline-httptools" if kind == "single" else f"floor-{kind}"
CLEAN_STOP_CODES = (-15, 143, 0)
ACCEPTED = "estat_events_accepted_total"
FSYNCS = "estat_wal_fsync_seconds_count"


@dataclass
class Row:
    """One line of the table; `None` prints as a dash."""

    scenario: str
    store: str
    workers: Optional[int] = None  # estat rows: WORKERS of the server
    rps: Optional[float] = None
    ratio: Optional[float] = None
    cpu_ratio: Optional[float] = None
    events_per_s: Optional[float] = None
    non_2xx: str = ""
    p50_ms: Optional[float] = None
    p99_ms: Optional[float] = None
    cpu_s: Optional[float] = None
    cpu_us_per_req: Optional[float] = None
    events_per_req: int = 1
    requests: Optional[int] = None  # wrk's, all statuses
    run_events: Optional[float] = None  # events accepted during the wrk run
    # estat rows: CPU µs per request over the floor's for the same body, and
    # (CPU µs/req - floor's) / events per request
    floor_ratio: Optional[float] = None
    estat_us_per_event: Optional[float] = None
    peak_rss_mib: Optional[float] = None
    wrk_cpu_s: Optional[float] = None
    accepted: Optional[int] = None
    stored: Optional[int] = None
    check: str = ""
    notes: list[str] = field(default_factory=list)
    # --latency: the fixed-rate run on the same server after the wrk run
    latency: Optional[loadgen.Schedule] = None
    latency_basis_rps: Optional[float] = None  # the 202s/s the fixed rate is a fraction of
    latency_connections: Optional[int] = None
    latency_non_2xx: str = ""
    latency_server_cores: Optional[float] = None
    latency_wrk_cores: Optional[float] = None


@dataclass
class Options:
    """What the command line asked for."""

    duration: float
    connections: int
    threads: int
    scenarios: list[str]
    workers: list[int]
    event_queue_size: int
    results_dir: str
    latency: bool = False  # a fixed-rate run after each scenario's wrk run
    latency_fraction: float = 0.5  # of the req/s the wrk run reached
    latency_duration: float = 10.0
    pin: bool = False  # the server on CPU 1, wrk on CPU 0

    def server_cpus(self) -> Optional[str]:
        return "1" if self.pin else None

    def wrk_cpus(self) -> Optional[str]:
        return "0" if self.pin else None


# --- measuring one server ------------------------------------------------


def measure(wrk: str, url: str, script: str, pid: int, opts: Options,
            logdir: str, notes: Optional[list[str]] = None,
            fixed_rate: bool = False,
            connections: Optional[int] = None) -> tuple[loadgen.WrkResult, float]:
    """Run wrk against `url`; return its result and the server's CPU seconds:
    those of `pid` and of its children (the workers of `--workers N`), read
    before and after the load. A child that appears or goes in between (a
    worker restarted) is noted in `notes`: its CPU is then only partly counted.
    With `fixed_rate` (a LUA_RATE script) wrk runs `--latency-duration`
    seconds with one thread per connection, over `connections` (default
    --connections)."""
    connections = connections or opts.connections
    duration, threads, log = ((opts.latency_duration, connections, "wrk-rate.log")
                              if fixed_rate else (opts.duration, opts.threads, "wrk.log"))
    cpu_before = procs.tree_cpu_seconds(pid)
    result = loadgen.run_wrk(wrk, url, script, duration, connections, threads,
                             os.path.join(logdir, log), cpus=opts.wrk_cpus())
    time.sleep(0.3)  # let the server finish requests wrk abandoned at the end
    cpu_after = procs.tree_cpu_seconds(pid)
    if set(cpu_before) != set(cpu_after) and notes is not None:
        notes.append(f"server processes changed during the load ({sorted(cpu_before)} -> "
                     f"{sorted(cpu_after)}): a worker died or was restarted; CPU s is partial")
    return result, sum(cpu_after[p] - cpu_before.get(p, 0.0) for p in cpu_after)


def fill_from_wrk(row: Row, result: loadgen.WrkResult, cpu_s: float) -> None:
    """The columns wrk and /proc give for every scenario. With N workers
    `cpu_s` sums N + 1 processes and may exceed the duration; the "only X%
    of a core" note still means the server waited."""
    row.rps = result.rps
    row.requests = result.requests
    row.p50_ms, row.p99_ms = result.p50_ms, result.p99_ms
    row.cpu_s = cpu_s
    row.wrk_cpu_s = result.wrk_cpu_s
    row.cpu_us_per_req = cpu_s / result.requests * 1e6 if result.requests else None
    share = cpu_s / result.duration_s if result.duration_s else 0.0
    if row.workers and row.workers > 1:
        row.notes.append(f"the {row.workers} worker processes and their parent used "
                         f"{share:.2f} cores in all, wrk {result.wrk_cpu_s / result.duration_s:.2f}"
                         f" (of {os.cpu_count()})")
    if share < 0.8:
        row.notes.append(f"the server used only {share:.0%} of a core during the run: "
                         "it waited (on wrk, the store, or a busy machine)")
    if result.wrk_cpu_s / result.duration_s > 0.9:
        row.notes.append(f"wrk used {result.wrk_cpu_s / result.duration_s:.0%} of a core: "
                         "the load generator may be the limit (try -t2)")
    bad = result.non_2xx()
    row.non_2xx = ", ".join(f"{n}×{code}" for code, n in bad.items()) or "0"
    errors = result.socket_errors()
    if errors:
        row.notes.append("wrk socket errors: " + ", ".join(f"{k} {v}" for k, v in errors.items()))


def settle(pid: int, notes: list[str], limit: float = 15.0) -> None:
    """Wait until the server (with its workers) uses under 10% of a core over
    half a second: after a wrk run estat may still be encoding and writing
    what it queued. Noted when it is still busy after `limit` seconds."""
    deadline = time.monotonic() + limit
    while True:
        before = sum(procs.tree_cpu_seconds(pid).values())
        time.sleep(0.5)
        busy = (sum(procs.tree_cpu_seconds(pid).values()) - before) / 0.5
        if busy < 0.1:
            return
        if time.monotonic() > deadline:
            notes.append(f"the server still used {busy:.0%} of a core {limit:g} s after the "
                         "wrk run; the fixed-rate run started anyway")
            return


def fixed_rate(wrk: str, row: Row, max_rps: float, url: str, name: str, body: bytes,
               content_type: str, pid: int, opts: Options,
               logdir: str, encoding: str = "") -> Optional[loadgen.WrkResult]:
    """`--latency`: once the server is idle again, send to it at
    `--latency-fraction` of `max_rps` (the 202s per second the wrk run just
    reached), on a fixed schedule over the same number of connections, and
    fill the row's
    latency columns. None (and a note) when there was no rate to start from."""
    if not max_rps:
        row.notes.append("no req/s from the wrk run: no fixed-rate run")
        return None
    settle(pid, row.notes)
    rate = max_rps * opts.latency_fraction
    connections = rate_connections(rate, opts.connections)
    script = loadgen.write_script(logdir, name, body, content_type, rate=rate,
                                  connections=connections, encoding=encoding)
    print(f"   fixed rate {rate:,.0f} req/s over {connections} connections "
          f"({opts.latency_duration:g} s) ...", flush=True)
    result, cpu_s = measure(wrk, url, script, pid, opts, logdir, row.notes, fixed_rate=True,
                            connections=connections)
    row.latency_basis_rps, row.latency_connections = max_rps, connections
    if result.schedule is None:
        raise RuntimeError(f"the fixed-rate wrk run printed no schedule (see {logdir})")
    row.latency = schedule = result.schedule
    row.latency_non_2xx = ", ".join(f"{n}×{code}" for code, n in result.non_2xx().items()) or "0"
    row.latency_server_cores = cpu_s / result.duration_s
    row.latency_wrk_cores = result.wrk_cpu_s / result.duration_s
    if schedule.achieved_rps < 0.97 * schedule.target_rps:
        row.notes.append(f"fixed rate: achieved {schedule.achieved_rps:,.0f} of "
                         f"{schedule.target_rps:,.0f} req/s: the server (or wrk) fell behind")
    if schedule.late_1ms > 0.01 * schedule.sent:
        row.notes.append(f"fixed rate: {schedule.late_1ms / schedule.sent:.1%} of the sends were "
                         "over 1 ms late (their connection still waited for the previous "
                         "response, or wrk was not scheduled in time); the latency columns "
                         "count that wait, 'p99 ms from send' does not")
    if row.latency_wrk_cores > 0.7:
        where = ("on its one CPU" if opts.pin
                 else f"on {os.cpu_count()} cores shared with the server")
        row.notes.append(f"fixed rate: wrk used {row.latency_wrk_cores:.0%} of a core: {where}, "
                         "the generator's own scheduling delays may be part of the late sends "
                         "and latency")
    errors = result.socket_errors()
    if errors:
        row.notes.append("fixed rate: wrk socket errors: "
                         + ", ".join(f"{k} {v}" for k, v in errors.items()))
    return result


def rate_connections(rate: float, most: int) -> int:
    """Connections for a fixed rate: one per 20 req/s, between 4 and `most`,
    so that a slow rate (a few big chunks a second) is not spread over
    connections that each send once in the run."""
    return max(1, min(most, max(4, math.ceil(rate / 20))))


def run_baseline(wrk: str, opts: Options, logdir: str, name: str) -> Row:
    """A framework floor: a bare handler answering 202 (`baseline`: a
    twisted.web Resource; `-stock`: on Twisted's default Request and Site;
    `-httptools`: a Protocol parsed by httptools, as estat's listener is;
    `floor-<kind>`: the httptools one, sent `<kind>`'s body, which it parses
    and drops without inflating)."""
    row = Row(name, "-")
    body = body_for(FLOORS.get(name, "single"))
    row.events_per_req = body.events
    script = loadgen.write_script(logdir, "baseline", body.data, body.content_type,
                                  encoding=body.encoding)
    flavour = "httptools" if name in FLOORS else name.partition("-")[2]
    server = Baseline(logdir, flavour, cpus=opts.server_cpus())
    try:
        result, cpu_s = measure(wrk, server.url, script, server.child.pid, opts, logdir)
        row.peak_rss_mib = procs.peak_rss_mib(server.child.pid)
        if opts.latency:
            fixed_rate(wrk, row, result.count(202) / result.duration_s, server.url,
                       "baseline", body.data,
                       body.content_type, server.child.pid, opts, logdir, body.encoding)
    finally:
        server.stop()
    fill_from_wrk(row, result, cpu_s)
    row.run_events = result.count(202) * body.events
    row.events_per_s = row.run_events / result.duration_s
    row.check = "n/a (stores nothing)"
    return row


def run_estat(wrk: str, opts: Options, logdir: str, kind: str, store: str,
              moto: Optional[Moto], workers: int = 1) -> Row:
    """`single` or `batch` against estat-ingest with the local or S3 store,
    run with `workers` worker processes."""
    row = Row(kind, store, workers=workers)
    spec = body_for(kind)
    body, ctype = spec.data, spec.content_type
    row.events_per_req = spec.events
    script = loadgen.write_script(logdir, kind, body, ctype, encoding=spec.encoding)
    datadir = tempfile.mkdtemp(prefix=f"estat-bench-{kind}-{store}-w{workers}-")
    env = {"EVENT_QUEUE_SIZE": str(opts.event_queue_size), "SHUTDOWN_TIMEOUT": "60"}
    if store == "durable":  # the local store, acknowledging after the WAL's fsync
        env.update({"ACK_MODE": "durable", "WAL_DIR": os.path.join(datadir, "wal")})
    bucket = f"bench-{kind}-w{workers}-{int(time.time())}"
    if moto is not None:
        moto.create_bucket(bucket)
        env.update(moto.server_env(bucket))
    server: Optional[Estat] = None
    try:
        server = Estat(logdir, datadir, env, workers, cpus=opts.server_cpus())
        status = loadgen.probe(server.url, body, ctype, spec.encoding)
        if status == 415:
            server.stop(30)
            row.check = "skipped: not supported by this server (415)"
            return row
        if status != 202:
            row.notes.append(f"probe POST answered {status} (expected 202)")
        if workers > 1:
            found = len(procs.children(server.child.pid))
            if found != workers:
                row.notes.append(f"{found} worker processes found under twistd, not {workers}")
        before = server.metrics()
        result, cpu_s = measure(wrk, server.url, script, server.child.pid, opts, logdir,
                                row.notes)
        # Requests wrk abandoned at its end may still be in the server (a
        # 13,500-event chunk takes milliseconds): count after they finish.
        settle(server.child.pid, row.notes)
        after_text = server.metrics_text()
        row.peak_rss_mib = (procs.tree_peak_rss_mib(server.child.pid) if workers > 1
                            else procs.peak_rss_mib(server.child.pid))
        # Half the rate the server accepted: the wrk run's req/s counts the
        # quick 503s of a saturated server, and half of that still saturates.
        accepted_rps = result.count(202) / result.duration_s
        rate_result = (fixed_rate(wrk, row, accepted_rps, server.url, kind, body, ctype,
                                  server.child.pid, opts, logdir, spec.encoding)
                       if opts.latency else None)
        if rate_result is not None:
            # As after the wrk run: a chunk received before the reading but
            # admitted after it would be stored without being counted.
            settle(server.child.pid, row.notes)
        final_text = server.metrics_text() if rate_result else after_text
        code = server.stop(120)
        after = parse_metrics(after_text)[0]
        final, per_worker = parse_metrics(final_text)
        if workers > 1:
            row.notes.append("accepted per worker: " + ", ".join(
                f"w{w} {int(per_worker[w].get(ACCEPTED, 0)):,d}" for w in sorted(per_worker)))
            if len(per_worker) != workers:
                row.notes.append(f"/metrics showed {len(per_worker)} workers, not {workers}")
        if server.child.left_behind:
            row.notes.append("processes of the server's group outlived twistd and were killed")
        fill_from_wrk(row, result, cpu_s)
        account(row, result, before, after)
        if store == "durable":
            fsyncs = after.get(FSYNCS, 0) - before.get(FSYNCS, 0)
            seconds = (after.get("estat_wal_fsync_seconds_sum", 0)
                       - before.get("estat_wal_fsync_seconds_sum", 0))
            row.notes.append(f"{fsyncs / result.duration_s:,.0f} fsyncs/s, "
                             f"{result.count(202) / max(fsyncs, 1):.1f} requests per fsync, "
                             f"{seconds / max(fsyncs, 1) * 1000:.1f} ms per write + fsync")
        if rate_result is not None:  # every event counts for accepted = stored
            cross_check(row.notes, rate_result, after, final, row.events_per_req,
                        "fixed rate: ")
            row.accepted = int(final.get(ACCEPTED, 0))
        if code not in CLEAN_STOP_CODES:
            row.notes.append(f"server exit status {code} (clean stop is -15)")
        if moto is not None:
            objects, row.stored = moto.count_events(bucket)
        else:
            objects, row.stored = count_local_events(server.output_dir)
        row.notes.append(f"{objects} objects")
        if workers > 1:
            keys = (moto.keys(bucket) if moto is not None
                    else list_local_objects(server.output_dir))
            by_worker = {i: sum(f"-w{i}-" in k for k in keys) for i in range(workers)}
            row.notes[-1] += " (" + ", ".join(f"w{i} {n}" for i, n in by_worker.items()) + ")"
        dlq = count_files(server.dlq_dir)
        if dlq:
            row.notes.append(f"{dlq} files left in the dead-letter directory")
        if spec.events > 1 and store == "local" and workers == 1:
            row.notes.append(codec_cost.note(spec.data, spec.encoding))
        row.check = check(row.accepted, row.stored)
        return row
    finally:
        if server is not None and server.child.running():
            server.child.kill_group()  # only on an error or Ctrl-C
        shutil.rmtree(datadir, ignore_errors=True)


def account(row: Row, result: loadgen.WrkResult, before: dict[str, float],
            after: dict[str, float]) -> None:
    """Events accepted (the server's counter, probe included, since the
    store holds the probe too) and events/s over the wrk run."""
    row.accepted = int(after.get(ACCEPTED, 0))
    row.run_events = after.get(ACCEPTED, 0) - before.get(ACCEPTED, 0)
    row.events_per_s = row.run_events / result.duration_s
    cross_check(row.notes, result, before, after, row.events_per_req)


def cross_check(notes: list[str], result: loadgen.WrkResult, before: dict[str, float],
                after: dict[str, float], per_request: int, prefix: str = "") -> None:
    """Note when wrk saw more events answered 202 than the server counted
    between `before` and `after`, or when the server's 202s and its accepted
    events disagree (`per_request` events in every request)."""
    seen = result.count(202) * per_request
    counted = after.get(ACCEPTED, 0) - before.get(ACCEPTED, 0)
    if seen > counted:
        notes.append(f"{prefix}wrk saw {seen} events answered 202 but the server counted "
                     f"only {counted:.0f}")
    code_202 = 'estat_http_requests_total{code="202"}'
    served = after.get(code_202, 0) - before.get(code_202, 0)
    if served * per_request != counted:
        notes.append(f"{prefix}server answered {served:.0f} requests 202 for {counted:.0f} "
                     "accepted events")


def check(accepted: Optional[int], stored: Optional[int]) -> str:
    """"ok" when every accepted event was stored; MISMATCH loudly otherwise."""
    if accepted is None or stored is None:
        return "?"
    if accepted == stored:
        return "ok"
    return f"**MISMATCH** ({stored - accepted:+d})"


# --- the table -------------------------------------------------------------


def fmt(value: Optional[float], spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table_head(head: str, show_workers: bool) -> list[str]:
    """A markdown table's header and rule, with a `workers` column after
    `store` when asked."""
    if show_workers:
        head = head.replace("| store |", "| store | workers |")
    return [head, "|" + "---|" * (head.count("|") - 1)]


def table(rows: list[Row], show_workers: bool = False) -> str:
    """The markdown table, then one line per anomaly or note; with
    `show_workers` (`--workers` other than 1) a `workers` column too."""
    lines = table_head(
        "| scenario | store | req/s | × baseline | × baseline by CPU | events/s | non-2xx | p50 ms "
        "| p99 ms | server CPU s | CPU µs/req | × floor CPU | estat µs/event | peak RSS MiB "
        "| accepted | stored | accepted = stored |", show_workers)
    for r in rows:
        workers = f" {fmt(r.workers, 'd')} |" if show_workers else ""
        lines.append(
            f"| {r.scenario} | {r.store} |{workers} {fmt(r.rps, ',.0f')} | {fmt(r.ratio, '.2f')} | {fmt(r.cpu_ratio, '.2f')} "
            f"| {fmt(r.events_per_s, ',.0f')} | {r.non_2xx or '-'} | {fmt(r.p50_ms, '.2f')} "
            f"| {fmt(r.p99_ms, '.2f')} | {fmt(r.cpu_s, '.1f')} | {fmt(r.cpu_us_per_req, '.0f')} "
            f"| {fmt(r.floor_ratio, '.2f')} | {fmt(r.estat_us_per_event, '.2f')} "
            f"| {fmt(r.peak_rss_mib, '.0f')} "
            f"| {fmt(r.accepted, ',d')} | {fmt(r.stored, ',d')} | {r.check} |")
    def where(r: Row) -> str:
        return f"{r.scenario}/{r.store}" + (f"/{r.workers}w" if show_workers and r.workers else "")

    notes = [f"- {where(r)}: {note}" for r in rows for note in r.notes]
    return "\n".join(lines + ([""] + notes if notes else []))


def latency_table(rows: list[Row], show_workers: bool = False) -> str:
    """`--latency`: one line per row that had a fixed-rate run. The
    percentiles count from each request's scheduled send time; "p99 ms from
    send" from its actual send, as wrk does (they differ when sends were late)."""
    lines = table_head(
        "| scenario | store | 202/s (wrk run) | connections | target req/s | achieved req/s "
        "| p50 ms | p99 ms "
        "| p99.9 ms | max ms | p99 ms from send | late sends | non-2xx | server cores "
        "| wrk cores | accepted = stored |", show_workers)
    for r in rows:
        s = r.latency
        if s is None:
            continue
        workers = f" {fmt(r.workers, 'd')} |" if show_workers else ""
        late = s.late_1ms / s.sent if s.sent else None
        lines.append(
            f"| {r.scenario} | {r.store} |{workers} {fmt(r.latency_basis_rps, ',.0f')} "
            f"| {fmt(r.latency_connections, 'd')} | {s.target_rps:,.0f} "
            f"| {s.achieved_rps:,.0f} | {s.from_schedule['p50']:.2f} | {s.from_schedule['p99']:.2f} "
            f"| {s.from_schedule['p99.9']:.2f} | {s.from_schedule['max']:.2f} "
            f"| {s.from_send['p99']:.2f} | {fmt(late, '.2%')} | {r.latency_non_2xx} "
            f"| {fmt(r.latency_server_cores, '.2f')} | {fmt(r.latency_wrk_cores, '.2f')} "
            f"| {r.check} |")
    return "\n".join(lines)


# --- the run -------------------------------------------------------------


def parse_args(argv: list[str]) -> Options:
    parser = argparse.ArgumentParser(
        description="Benchmark estat-ingest against a bare twisted.web baseline with wrk "
                    "(loopback only).")
    parser.add_argument("-d", "--duration", type=float, default=10.0,
                        help="seconds of load per scenario (default 10)")
    parser.add_argument("--quick", action="store_true",
                        help="3 s per scenario: a smoke run, not a measurement")
    parser.add_argument("-c", "--connections", type=int, default=64,
                        help="keep-alive connections (default 64)")
    parser.add_argument("-t", "--threads", type=int, default=1,
                        help="wrk threads (default 1: the machine has 2 cores and the "
                             "server needs one)")
    parser.add_argument("-s", "--scenarios", default=",".join(SCENARIOS),
                        help="comma-separated subset of " + ", ".join(SCENARIOS)
                             + " (default: all of them); 'single', 'batch', 'local' and "
                             "'s3' select groups; 'baseline-httptools' is a bare "
                             "httptools Protocol (estat's own stack); 'baseline-stock' "
                             "(opt-in) is the baseline on Twisted's default Request and "
                             "Site")
    parser.add_argument("-w", "--workers", default="1",
                        help="comma-separated worker counts, e.g. 1,2 (default 1): every "
                             "estat scenario runs once per count (WORKERS=N), the baseline "
                             "once; wrk shares the cores with the workers")
    parser.add_argument("--event-queue-size", type=int, default=100_000,
                        help="EVENT_QUEUE_SIZE of the server (default 100000)")
    parser.add_argument("--results-dir", default=os.path.join(BENCH_DIR, "results"),
                        help="where logs and results.json go (default bench/results)")
    parser.add_argument("--latency", action="store_true",
                        help="after each scenario's wrk run, send to the same server at a "
                             "fixed rate (open loop: --latency-fraction of the 202s per "
                             "second it reached) and print a second table of latency "
                             "percentiles")
    parser.add_argument("--latency-fraction", type=float, default=0.5,
                        help="the fixed rate as a fraction of the wrk run's 202s per "
                             "second (default 0.5)")
    parser.add_argument("--latency-duration", type=float, default=None,
                        help="seconds of the fixed-rate run (default 10; 3 with --quick)")
    parser.add_argument("--pin", action="store_true",
                        help="run each server on CPU 1 and wrk on CPU 0 (taskset), so that "
                             "neither takes the other's core; one worker only")
    args = parser.parse_args(argv)
    if not 0 < args.latency_fraction <= 1:
        parser.error("--latency-fraction: give a number in (0, 1]")
    if args.pin and worker_counts(args.workers, parser) != [1]:
        parser.error("--pin: one worker only (workers would share the server's one CPU)")
    if args.pin and (os.cpu_count() or 1) < 2:
        parser.error("--pin: needs 2 CPUs")
    return Options(
        duration=3.0 if args.quick else args.duration, connections=args.connections,
        threads=args.threads, scenarios=select(args.scenarios),
        workers=worker_counts(args.workers, parser),
        event_queue_size=args.event_queue_size, results_dir=args.results_dir,
        latency=args.latency, latency_fraction=args.latency_fraction,
        latency_duration=(args.latency_duration if args.latency_duration is not None
                          else 3.0 if args.quick else 10.0),
        pin=args.pin)


def worker_counts(spec: str, parser: argparse.ArgumentParser) -> list[int]:
    """Distinct positive worker counts from a comma-separated spec, in order."""
    counts: list[int] = []
    for item in spec.split(","):
        if not item.strip():
            continue
        try:
            count = int(item)
        except ValueError:
            count = 0
        if count < 1:
            parser.error(f"--workers: {item.strip()!r} is not a positive integer")
        if count not in counts:
            counts.append(count)
    if not counts:
        parser.error("--workers: give at least one count")
    return counts


def show_workers(opts: Options) -> bool:
    """The workers column is there unless every estat row has one worker."""
    return opts.workers != [1]


def select(spec: str) -> list[str]:
    """Scenario names from a comma-separated spec, in the canonical order."""
    wanted = {w.strip() for w in spec.split(",") if w.strip()}
    every = SCENARIOS + OPTIONAL_SCENARIOS
    chosen = [s for s in every if s in wanted
              or (s in SCENARIOS and any(w in s.split("-") for w in wanted))]
    unknown = [w for w in wanted if not any(w == s or w in s.split("-") for s in every)]
    if unknown or not chosen:
        raise SystemExit(f"unknown scenarios {unknown}; choose from {', '.join(every)}")
    return chosen


def run_one(name: str, wrk: str, opts: Options, rundir: str,
            get_moto: Callable[[], Moto], workers: Optional[int] = None) -> Row:
    """One scenario (estat ones with `workers`); an error becomes a row that
    says what failed."""
    label = name + (f"-w{workers}" if workers and show_workers(opts) else "")
    logdir = os.path.join(rundir, label)
    os.makedirs(logdir, exist_ok=True)
    print(f"== {label} ({opts.duration:g} s) ...", flush=True)
    kind, _, store = name.partition("-")
    try:
        if name in BASELINES or name in FLOORS:
            return run_baseline(wrk, opts, logdir, name)
        moto = get_moto() if store == "s3" else None
        return run_estat(wrk, opts, logdir, kind, store, moto, workers or 1)
    except (RuntimeError, OSError, ValueError) as error:
        row = Row(kind, store or "-", workers=workers, check=f"**FAILED** (see {logdir})")
        row.notes.append(str(error).splitlines()[0] if str(error) else repr(error))
        print(f"   {name} failed: {error}", flush=True)
        return row


def run(opts: Options) -> list[Row]:
    """Every chosen scenario in order; the baseline's req/s sets the ratios."""
    wrk = loadgen.ensure_wrk()
    rundir = os.path.join(opts.results_dir, time.strftime("%Y%m%d-%H%M%S"))
    os.makedirs(rundir, exist_ok=True)
    moto: list[Moto] = []

    def get_moto() -> Moto:
        if not moto:
            moto.append(Moto(rundir))
        return moto[0]

    rows: list[Row] = []
    try:
        for name in opts.scenarios:
            if name in BASELINES or name in FLOORS:
                rows.append(run_one(name, wrk, opts, rundir, get_moto))
                continue
            for workers in opts.workers:  # side by side: 1 and 2 workers minutes apart
                rows.append(run_one(name, wrk, opts, rundir, get_moto, workers))
    finally:
        for m in moto:
            m.stop()
    set_ratios(rows)
    durable_vs_memory(rows)
    save(rundir, opts, rows)
    return rows


def set_ratios(rows: list[Row]) -> None:
    """Each row against the baseline: req/s over req/s, and baseline CPU per
    request over the row's (what the ratio would be if each had a whole core)."""
    base = next((r for r in rows if r.scenario == "baseline" and r.rps), None)
    if base is None:
        print("no baseline in this run: no ratios", flush=True)
        set_floor_figures(rows)
        return
    for row in rows:
        if row.rps is not None:
            row.ratio = row.rps / base.rps  # type: ignore[operator]
        if row.cpu_us_per_req and base.cpu_us_per_req:
            row.cpu_ratio = base.cpu_us_per_req / row.cpu_us_per_req
    set_floor_figures(rows)


def set_floor_figures(rows: list[Row]) -> None:
    """Each estat row against the httptools floor that answered the same
    body in this run: CPU per request over the floor's, and what estat
    itself spent per event it accepted: its CPU less the floor's CPU per
    request for each request, over the events accepted in the run. With
    every request accepted that is (CPU µs/req - floor's) / events per
    request; requests refused (503) still cost estat CPU, which this charges
    to the events that were accepted."""
    floors = {r.scenario: r for r in rows if r.store == "-" and r.cpu_us_per_req}
    for row in rows:
        floor = floors.get(floor_of(row.scenario)) if row.store != "-" else None
        if floor is None or not row.cpu_us_per_req or floor.cpu_us_per_req is None:
            continue
        row.floor_ratio = row.cpu_us_per_req / floor.cpu_us_per_req
        if row.cpu_s is not None and row.requests and row.run_events:
            row.estat_us_per_event = ((row.cpu_s * 1e6 - floor.cpu_us_per_req * row.requests)
                                      / row.run_events)


def durable_vs_memory(rows: list[Row]) -> None:
    """A note on each durable row: its events/s against the memory-mode
    row of the same kind (local store, same workers) in this run."""
    for row in rows:
        if row.store != "durable" or not row.events_per_s:
            continue
        memory = next((r for r in rows if r.scenario == row.scenario and r.store == "local"
                       and r.workers == row.workers and r.events_per_s), None)
        if memory is not None:
            row.notes.append(f"{row.events_per_s / memory.events_per_s:.0%} of memory "
                             "mode's events/s")


def save(rundir: str, opts: Options, rows: list[Row]) -> None:
    """results.json and table.md in the run's directory."""
    with open(os.path.join(rundir, "results.json"), "w") as handle:
        json.dump({"options": asdict(opts), "rows": [asdict(r) for r in rows]}, handle,
                  indent=2)
    with open(os.path.join(rundir, "table.md"), "w") as handle:
        handle.write(table(rows, show_workers(opts)) + "\n")
        if opts.latency:
            handle.write("\n" + latency_header(opts) + "\n\n"
                         + latency_table(rows, show_workers(opts)) + "\n")
    print(f"(raw results in {rundir})", flush=True)


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def header(opts: Options, load: str) -> str:
    """The line above the table: how the load was made, and how busy the
    machine was before the run."""
    workers = (f"; estat with {', '.join(map(str, opts.workers))} workers"
               if show_workers(opts) else "")
    cores = ("the server pinned to CPU 1 and wrk to CPU 0" if opts.pin
             else f"{os.cpu_count()} cores shared by wrk and the server")
    return (f"wrk -t{opts.threads} -c{opts.connections} -d{opts.duration:g}s per scenario, "
            f"loopback, {cores}{workers}; load average before the run: {load}")


def latency_header(opts: Options) -> str:
    """The line above the latency table: how the fixed-rate load was made."""
    return (f"fixed rate: {opts.latency_fraction:.0%} of the 202s per second of each row's "
            f"wrk run above, for {opts.latency_duration:g} s on the same server, wrk with a "
            "thread per connection (a connection per 20 req/s, 4 to "
            f"{opts.connections}), each sending every connections/rate s on a schedule; "
            "latency from the scheduled send time")


def main(argv: list[str]) -> int:
    opts = parse_args(argv)
    with open("/proc/loadavg") as handle:
        load = " ".join(handle.read().split()[:3])
    signal.signal(signal.SIGTERM, _terminate)
    try:
        rows = run(opts)
    except KeyboardInterrupt:
        print("interrupted: stopping everything started", file=sys.stderr)
        return 130
    finally:
        procs.stop_all()
    print()
    print(header(opts, load))
    print()
    print(table(rows, show_workers(opts)))
    if opts.latency:
        print()
        print(latency_header(opts))
        print()
        print(latency_table(rows, show_workers(opts)))
    return 1 if any("MISMATCH" in r.check or "FAILED" in r.check for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
