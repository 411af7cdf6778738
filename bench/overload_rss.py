"""Overload soak: drive `twistd -n estat-ingest` far past what a slowed S3
can take for a bounded time, and show that memory stays bounded, that the
excess is refused with a fast 503 (not a time-out), and that every accepted
event is stored once S3 recovers.

    .venv/bin/python bench/overload_rss.py [--duration 20] [--s3-delay 2]

Everything runs on loopback: a moto S3 server, a delaying TCP proxy in
front of it (tests/e2e/proxy.py), the server, wrk (every request a unique
id; status codes counted per thread) and a probe that times single POSTs
while wrk runs. Peak RSS is VmHWM from /proc/<pid>/status. Not part of CI.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import loadgen  # noqa: E402  (bench/, this script's directory)
import treq  # noqa: E402
from treq.client import HTTPClient  # noqa: E402
from twisted.internet import task  # noqa: E402
from twisted.internet.defer import inlineCallbacks  # noqa: E402
from twisted.internet.threads import deferToThread  # noqa: E402
from twisted.internet.utils import getProcessOutputAndValue  # noqa: E402
from twisted.web.client import Agent, HTTPConnectionPool  # noqa: E402

from tests.e2e.proxy import FaultProxy  # noqa: E402
from tests.support import EstatServer, MotoServer, poll_until  # noqa: E402

BUCKET = "estat-overload"
MARKER = "OVERLOAD_JSON "

# Every request carries a unique id (thread number from LUA_REPORT's setup,
# then a counter); statuses are counted and reported by loadgen.LUA_REPORT.
LUA = r"""
local pad = string.rep("x", %(pad)d)
n = 0
function request()
  n = n + 1
  local body = '{"id":"w' .. tid .. '-' .. n .. '","pad":"' .. pad .. '"}'
  return wrk.format("POST", "/collect", {["Content-Type"] = "application/json"}, body)
end
"""


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process, in KiB."""
    values = {}
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            name, _, rest = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                values[name] = int(rest.split()[0])
    return values


def read_ids(client: Any) -> Counter:
    """Every event id in the bucket, with its number of copies."""
    ids: Counter = Counter()
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET):
        for item in page.get("Contents", []):
            data = client.get_object(Bucket=BUCKET, Key=item["Key"])["Body"].read()
            for line in gzip.decompress(data).splitlines():
                ids[json.loads(line)["body"]["id"]] += 1
    return ids


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[int(q * (len(ordered) - 1))] if ordered else float("nan")


@inlineCallbacks
def probe(reactor: Any, url: str, results: list[tuple[str, int, float]], running: list[bool]):  # type: ignore[no-untyped-def]
    """One POST every 50 ms on its own connection while wrk runs, timed."""
    pool = HTTPConnectionPool(reactor, persistent=True)
    http = HTTPClient(Agent(reactor, pool=pool, connectTimeout=5))
    n = 0
    while running[0]:
        n += 1
        event_id = f"probe-{n}"
        started = time.monotonic()
        try:
            response = yield http.post(
                url + "/collect", data=json.dumps({"id": event_id}).encode(),
                headers={"Content-Type": ["application/json"]}, timeout=30,
                allow_redirects=False, reactor=reactor)
            yield treq.content(response)
            status = response.code
        except Exception:
            status = 0
        results.append((event_id, status, time.monotonic() - started))
        yield task.deferLater(reactor, 0.05, lambda: None)
    yield pool.closeCachedConnections()


@inlineCallbacks
def main(reactor: Any, options: argparse.Namespace):  # type: ignore[no-untyped-def]
    workdir = tempfile.mkdtemp(prefix="estat-overload-")
    moto = MotoServer(workdir)
    yield moto.start()
    proxy = server = None
    try:
        s3 = moto.client()
        s3.create_bucket(Bucket=BUCKET)
        proxy = FaultProxy(reactor, "127.0.0.1", moto.port)
        proxy.start()
        settings = {
            "EVENT_QUEUE_SIZE": str(options.event_queue_size),
            "MAX_BATCH_EVENTS": str(min(50000, options.event_queue_size)),
            "MAX_BODY_SIZE": "16384",
            "BATCH_SIZE": str(options.batch_size),
            "BATCH_MAX_BYTES": "8MiB",
            "FLUSH_INTERVAL": "1",
            "UPLOAD_QUEUE_SIZE": "4",
            "UPLOAD_CONCURRENCY": "2",
            "S3_TIMEOUT": "30",
            "S3_APP_RETRIES": "2",
            "SHUTDOWN_TIMEOUT": "30",
        }
        env = dict(settings, S3_BUCKET=BUCKET, AWS_ENDPOINT_URL_S3=proxy.url,
                   AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                   AWS_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true",
                   AWS_CONFIG_FILE=os.path.join(workdir, "none"),
                   AWS_SHARED_CREDENTIALS_FILE=os.path.join(workdir, "none"),
                   HOST_ID="overload", DLQ_DRAIN_INTERVAL="0.1")
        server = EstatServer(workdir, env=env)
        yield server.start()
        pid = server.proc.process.pid
        at_start = proc_status(pid)
        proxy.set_delay(options.s3_delay)
        batch_bytes = min(options.batch_size * (options.body_bytes + 40), 8 * 1024 * 1024)
        print("settings:", " ".join(f"{k}={v}" for k, v in settings.items()))
        print(f"load: wrk -t{options.threads} -c{options.connections} -d{options.duration}s, "
              f"~{options.body_bytes} B bodies with unique ids; S3 slowed by "
              f"{options.s3_delay}s per PUT (capacity ~"
              f"{2 * options.batch_size / options.s3_delay:.0f} events/s)")

        samples: list[int] = []
        sampler = task.LoopingCall(lambda: samples.append(proc_status(pid)["VmRSS"]))
        sampler.start(0.25)
        probes: list[tuple[str, int, float]] = []
        running = [True]
        probing = probe(reactor, server.url, probes, running)
        script = os.path.join(workdir, "overload.lua")
        with open(script, "w") as handle:
            handle.write((LUA + loadgen.LUA_REPORT) % {"pad": options.body_bytes - 30,
                                                       "marker": MARKER})
        out, err, code = yield getProcessOutputAndValue(options.wrk, [
            f"-t{options.threads}", f"-c{options.connections}", f"-d{options.duration}s",
            "--timeout", "10s", "-s", script, server.url + "/collect"])
        running[0] = False
        yield probing
        sampler.stop()
        text = out.decode()
        line = next((ln for ln in text.splitlines() if ln.startswith(MARKER)), None)
        if code != 0 or line is None:
            raise RuntimeError(f"wrk failed ({code}):\n{text}\n{err.decode()}")
        wrk = json.loads(line[len(MARKER):])
        after_load = proc_status(pid)

        accepted = server.metrics().get("estat_events_accepted_total", 0)
        recovered_at = time.monotonic()
        proxy.set_delay(0)
        yield poll_until(
            lambda: server.metrics().get(
                'estat_events_stored_total{path="upload",store="s3"}', 0) >= accepted
            and server.metrics().get("estat_dlq_entries", 0) == 0, 300,
            interval=0.5, what="every accepted event to be stored")
        drain_s = time.monotonic() - recovered_at
        metrics = server.metrics()
        stop_code = yield server.stop(60)
        ids = yield deferToThread(read_ids, s3)

        codes = {int(k): v for k, v in wrk["codes"].items()}
        probe_503 = [lat for _, status, lat in probes if status == 503]
        probe_202 = [lat for _, status, lat in probes if status == 202]
        probe_ok_ids = {i for i, status, _ in probes if status == 202}
        duplicates = sum(1 for n in ids.values() if n > 1)
        missing_probes = len(probe_ok_ids - set(ids))
        stored = len(ids)
        bound = (options.event_queue_size * 16384
                 + (4 + 2 + 1) * 8 * 1024 * 1024)
        # wrk's "status" error count is the non-2xx answers, not a socket error
        socket_errors = {k: v for k, v in wrk["errors"].items() if k != "status"}
        print(f"wrk: {wrk['requests']} requests in {wrk['duration_us'] / 1e6:.1f}s "
              f"({wrk['requests'] / (wrk['duration_us'] / 1e6):.0f}/s), codes {codes}, "
              f"socket errors {socket_errors}, latency p50 {wrk['p50_us'] / 1000:.1f} ms, "
              f"p99 {wrk['p99_us'] / 1000:.1f} ms, max {wrk['max_us'] / 1000:.1f} ms")
        print(f"time-to-503 (probe, {len(probe_503)} answers): p50 "
              f"{percentile(probe_503, 0.5) * 1000:.1f} ms, p99 "
              f"{percentile(probe_503, 0.99) * 1000:.1f} ms, max "
              f"{max(probe_503, default=float('nan')) * 1000:.1f} ms; probe 202s: "
              f"{len(probe_202)} (p50 {percentile(probe_202, 0.5) * 1000:.1f} ms)")
        print(f"RSS: at start {at_start['VmRSS'] / 1024:.1f} MiB, peak sampled "
              f"{max(samples) / 1024:.1f} MiB, VmHWM (peak) after load "
              f"{after_load['VmHWM'] / 1024:.1f} MiB")
        print(f"memory bound of these settings: EVENT_QUEUE_SIZE x MAX_BODY_SIZE + "
              f"(UPLOAD_QUEUE_SIZE + UPLOAD_CONCURRENCY + 1) x BATCH_MAX_BYTES = "
              f"{bound / 2**20:.0f} MiB worst case (+ encoded copies); with these bodies "
              f"~{(options.event_queue_size * (options.body_bytes + 100) + 7 * batch_bytes) / 2**20:.0f} MiB")
        print(f"accepted (server) {accepted:.0f}, 202 seen by wrk {codes.get(202, 0)} + probe "
              f"{len(probe_202)}; stored {stored} distinct ids, duplicates {duplicates}, "
              f"probe 202s missing {missing_probes}; drained in {drain_s:.1f}s after S3 "
              f"recovered; via DLQ {metrics.get('estat_dlq_events_enqueued_total', 0):.0f}; "
              f"stop exit status {stop_code}")
        ok = (stored == accepted and duplicates == 0 and missing_probes == 0
              and codes.get(202, 0) + len(probe_202) <= accepted
              and stop_code in (0, -15) and codes.get(503, 0) > 0)
        print("RESULT:", "PASS" if ok else "FAIL")
        if not ok:
            raise SystemExit(1)
    finally:
        if server is not None and server.proc is not None:
            server.proc.kill()
        if proxy is not None:
            yield proxy.stop()
        yield moto.stop()
        if not options.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print("kept", workdir)


def run() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=20, help="seconds of overload")
    parser.add_argument("--s3-delay", type=float, default=2.0, help="added seconds per PUT")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--body-bytes", type=int, default=1024)
    parser.add_argument("--event-queue-size", type=int, default=10000)
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--wrk", default=shutil.which("wrk") or "/usr/bin/wrk")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    options = parser.parse_args()

    task.react(main, [options])


if __name__ == "__main__":
    run()
