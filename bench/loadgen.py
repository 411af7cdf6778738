"""Request bodies and the wrk load generator: a Lua script per scenario that
sets the method, body and headers, counts every status code per thread and
prints one JSON line of results when wrk is done. With a rate (`--latency`
of run.py) the script also sends on a fixed schedule (open loop) and times
every request itself; see LUA_RATE."""

from __future__ import annotations

import gzip
import json
import os
import random
import resource
import shutil
import signal
import subprocess
from dataclasses import dataclass, field
from typing import Optional

from procs import pinned

JSON_TYPE = "application/json"
NDJSON_TYPE = "application/x-ndjson"
_MARKER = "BENCH_JSON "
_RATE_MARKER = "BENCH_RATE_JSON "

_LUA = r"""
local f = assert(io.open("%(body_path)s", "rb"))
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = "%(content_type)s"
%(encoding_header)s
"""

# Appended to a scenario's script (and %-formatted with it, `marker` set):
# numbers the threads (`tid`), counts every status per thread, and prints
# one JSON line of results, prefixed by the marker, when wrk is done.
LUA_REPORT = r"""
local threads = {}
function setup(thread)
  table.insert(threads, thread)
  thread:set("tid", #threads)
end

codes = {}
function response(status, headers, body)
  codes[status] = (codes[status] or 0) + 1
end

function done(summary, latency, requests)
  local agg = {}
  for _, t in ipairs(threads) do
    for status, n in pairs(t:get("codes")) do
      agg[status] = (agg[status] or 0) + n
    end
  end
  local parts = {}
  for status, n in pairs(agg) do
    table.insert(parts, string.format('"%%d":%%d', status, n))
  end
  local e = summary.errors
  io.write(string.format(
    '%(marker)s{"duration_us":%%d,"requests":%%d,"bytes":%%d,' ..
    '"p50_us":%%d,"p99_us":%%d,"max_us":%%d,"codes":{%%s},' ..
    '"errors":{"connect":%%d,"read":%%d,"write":%%d,"status":%%d,"timeout":%%d}}\n',
    summary.duration, summary.requests, summary.bytes,
    latency:percentile(50), latency:percentile(99), latency.max,
    table.concat(parts, ","),
    e.connect, e.read, e.write, e.status, e.timeout))
end
"""


# Appended after LUA_REPORT (whose setup, response and done it wraps) for a
# fixed-rate run, with wrk -tN -cN: one connection per thread, so in each
# thread's Lua state request() and response() alternate and pair up. Each
# connection sends every `interval_us` (N / rate) from a start common to all
# threads, offset by (tid - 1) / N of an interval so that the N schedules
# interleave evenly. delay() returns the time left to the next scheduled send
# (wrk truncates it to whole ms and its timers have 1 ms resolution: a send
# can be up to 2 ms early); a connection still waiting for its previous
# response sends late, as soon as that arrives (lag > 0). Every request is
# timed from its actual send (what wrk itself measures) and from its
# scheduled send, min(scheduled, actual), which is what a client sending on
# that schedule would see: the time a late send waited for its connection
# counts (no coordinated omission), an early send earns nothing.
LUA_RATE = r"""
local ffi = require("ffi")
ffi.cdef[[
struct bench_timespec { long tv_sec; long tv_nsec; };
int clock_gettime(int clk_id, struct bench_timespec *tp);
]]
local clock = ffi.new("struct bench_timespec")
local function now_us()
  ffi.C.clock_gettime(1, clock)  -- CLOCK_MONOTONIC
  return tonumber(clock.tv_sec) * 1e6 + tonumber(clock.tv_nsec) / 1e3
end

local interval_us = %(interval_us).3f
local connections = %(connections)d

local report_setup = setup
function setup(thread)
  report_setup(thread)
  start_us = start_us or now_us() + 50e3  -- common to all threads: after they connect
  thread:set("start_us", start_us)
end

from_send, from_schedule, lag = {}, {}, {}
first_us, last_us = nil, 0
local next_us, scheduled_us, sent_us

function delay()
  if not next_us then
    next_us = start_us + (tid - 1) * interval_us / connections
  end
  local wait_ms = (next_us - now_us()) / 1e3
  return wait_ms > 0 and wait_ms or 0
end

function request()
  local now = now_us()
  if not next_us then next_us = now end  -- a send without delay() (after a reconnect)
  scheduled_us, sent_us = next_us, now
  next_us = next_us + interval_us
  lag[#lag + 1] = math.floor(now - scheduled_us)
  return wrk.request()
end

local report_response = response
function response(status, headers, body)
  report_response(status, headers, body)
  if sent_us then
    local now = now_us()
    from_send[#from_send + 1] = math.floor(now - sent_us)
    from_schedule[#from_schedule + 1] = math.floor(now - math.min(scheduled_us, sent_us))
    sent_us = nil
    first_us = first_us or now
    last_us = now
  end
end

local report_done = done
function done(summary, latency, requests)
  report_done(summary, latency, requests)
  local function merged(name)
    local all = {}
    for _, t in ipairs(threads) do
      for _, v in ipairs(t:get(name)) do all[#all + 1] = v end
    end
    table.sort(all)
    return all
  end
  local function stats(name)
    local all = merged(name)
    local function pct(p) return all[math.max(1, math.ceil(#all * p / 100))] or 0 end
    return string.format('{"n":%%d,"min":%%d,"p50":%%d,"p99":%%d,"p99.9":%%d,"max":%%d}',
                         #all, all[1] or 0, pct(50), pct(99), pct(99.9), all[#all] or 0)
  end
  -- the sum of each thread's response rate, between its first and last responses
  local rate, sent, late = 0, 0, 0
  for _, t in ipairs(threads) do
    local n, first = #t:get("from_send"), t:get("first_us")
    if first and n > 1 then rate = rate + (n - 1) / (t:get("last_us") - first) * 1e6 end
    for _, v in ipairs(t:get("lag")) do
      sent = sent + 1
      if v > 1000 then late = late + 1 end
    end
  end
  io.write(string.format(
    '%(rate_marker)s{"target_rps":%%.1f,"achieved_rps":%%.1f,"sent":%%d,"late_1ms":%%d,' ..
    '"from_schedule_us":%%s,"from_send_us":%%s,"lag_us":%%s}\n',
    connections / interval_us * 1e6, rate, sent, late,
    stats("from_schedule"), stats("from_send"), stats("lag")))
end
"""


def single_event(size: int = 1024) -> bytes:
    """One JSON object of about `size` bytes, shaped like an analytics event."""
    event = {"event": "page_view", "user_id": "u-0001234567", "session": "s-89abcdef",
             "ts_client": 1795695707974, "url": "https://example.com/products/42",
             "props": {"plan": "pro", "country": "DE", "pad": ""}}
    pad = size - len(json.dumps(event, separators=(",", ":")))
    event["props"]["pad"] = "x" * max(pad, 0)  # type: ignore[index]
    return json.dumps(event, separators=(",", ":")).encode()


def ndjson_batch(events: int = 100, size: int = 300) -> bytes:
    """`events` JSON objects of about `size` bytes each, one per line."""
    return b"".join(single_event(size) + b"\n" for _ in range(events))


_WORDS = ("GET", "POST", "200", "404", "ok", "error", "timeout", "user", "cart", "item",
          "search", "login", "api", "v2", "retry", "cache", "hit", "miss", "db", "slow")


def log_chunk(events: int, size: int = 300, seed: int = 16) -> bytes:
    """A log shipper's chunk: `events` NDJSON lines of about `size` bytes
    that differ from each other (ids, times, paths, a random pad) as real
    events do, so that gzip compresses them about as much as real ones
    (5-6x) rather than to nothing, as it would `ndjson_batch`'s copies."""
    rng = random.Random(seed)
    lines = []
    for n in range(events):
        event = {"event": rng.choice(("page_view", "click", "signup", "log")),
                 "user_id": f"u-{rng.randrange(10**10):010d}", "seq": n,
                 "ts_client": 1795695707974 + n * 7,
                 "url": f"https://example.com/p/{rng.randrange(10**6)}",
                 "props": {"plan": rng.choice(("free", "pro")), "pad": ""}}
        pad = size - len(json.dumps(event, separators=(",", ":")))
        words = " ".join(rng.choice(_WORDS) for _ in range(max(pad, 0) // 5 + 1))
        event["props"]["pad"] = words[:max(pad, 0)]  # type: ignore[index]
        lines.append(json.dumps(event, separators=(",", ":")).encode())
    return b"\n".join(lines) + b"\n"


def gzipped(body: bytes) -> bytes:
    """`body` as one gzip member (level 6, what shippers default to)."""
    return gzip.compress(body, compresslevel=6, mtime=0)


@dataclass
class WrkResult:
    """What one wrk run measured, from the Lua `done` callback."""

    duration_s: float
    requests: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    codes: dict[int, int]
    errors: dict[str, int] = field(default_factory=dict)
    wrk_cpu_s: float = 0.0
    schedule: Optional["Schedule"] = None  # fixed-rate runs only

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s else 0.0

    def count(self, status: int) -> int:
        return self.codes.get(status, 0)

    def non_2xx(self) -> dict[int, int]:
        return {code: n for code, n in sorted(self.codes.items()) if not 200 <= code < 300}

    def socket_errors(self) -> dict[str, int]:
        """connect/read/write/timeout errors (`status` is the non-2xx count)."""
        return {k: v for k, v in self.errors.items() if v and k != "status"}


@dataclass
class Schedule:
    """What LUA_RATE measured in a fixed-rate run. Percentiles are dicts with
    n, min, p50, p99, p99.9 and max, in ms."""

    target_rps: float
    achieved_rps: float  # responses/s: the sum over threads, each between its first and last
    sent: int
    late_1ms: int  # sends more than 1 ms after their scheduled time
    from_schedule: dict[str, float]  # latency from the scheduled send time
    from_send: dict[str, float]  # latency from the actual send (wrk's own)
    lag: dict[str, float]  # actual - scheduled send time (< 0: early)


def ensure_wrk() -> str:
    """The path of wrk, installing Debian's package when it is missing."""
    path = shutil.which("wrk")
    if path:
        return path
    print("wrk not found: apt-get install -y wrk", flush=True)
    subprocess.run(["apt-get", "install", "-y", "wrk"], check=True,
                   stdout=subprocess.DEVNULL)
    path = shutil.which("wrk")
    if not path:
        raise RuntimeError("wrk is still missing after apt-get install -y wrk")
    return path


def write_script(workdir: str, name: str, body: bytes, content_type: str,
                 rate: Optional[float] = None, connections: int = 0,
                 encoding: str = "") -> str:
    """Write the body and the Lua script for one scenario; return the script
    path. `encoding`, when given, is sent as Content-Encoding. With `rate` (requests/s over all `connections`) the script sends on
    a fixed schedule (LUA_RATE) and must run with one wrk thread per
    connection."""
    body_path = os.path.join(workdir, f"{name}.body")
    with open(body_path, "wb") as handle:
        handle.write(body)
    lua = _LUA + LUA_REPORT
    values: dict[str, object] = {
        "body_path": body_path, "content_type": content_type, "marker": _MARKER,
        "encoding_header": (f'wrk.headers["Content-Encoding"] = "{encoding}"' if encoding
                            else "")}
    if rate is not None:
        if rate <= 0 or connections < 1:
            raise ValueError(f"a fixed rate needs rate > 0 and connections >= 1 "
                             f"({rate}, {connections})")
        lua += LUA_RATE
        values.update(interval_us=connections / rate * 1e6, connections=connections,
                      rate_marker=_RATE_MARKER)
        name += "-rate"
    script_path = os.path.join(workdir, f"{name}.lua")
    with open(script_path, "w") as handle:
        handle.write(lua % values)
    return script_path


def run_wrk(wrk: str, url: str, script: str, duration_s: float, connections: int,
            threads: int, log_path: str, cpus: Optional[str] = None) -> WrkResult:
    """Run wrk against a loopback URL for `duration_s` seconds and parse its
    result; wrk is killed (with its group) if it overruns or we are
    interrupted."""
    if not url.startswith("http://127.0.0.1:"):
        raise ValueError(f"refusing to load anything but loopback: {url}")
    usage_before = _children_cpu()
    argv = pinned(cpus) + [wrk, f"-t{threads}", f"-c{connections}",
                           f"-d{max(1, round(duration_s))}s", "--timeout", "5s", "-s", script, url]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               start_new_session=True, text=True)
    try:
        output, _ = process.communicate(timeout=duration_s + 30)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    with open(log_path, "w") as handle:
        handle.write(output)
    result = parse_wrk(output)
    result.wrk_cpu_s = _children_cpu() - usage_before
    return result


def _children_cpu() -> float:
    """CPU seconds of every reaped child so far (wrk is the only child reaped
    while it runs, so the difference around a run is wrk's own)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def parse_wrk(output: str) -> WrkResult:
    """The WrkResult from wrk's output (the marker line our `done` prints, and
    the one LUA_RATE's prints after it in a fixed-rate run)."""
    result = None
    for line in output.splitlines():
        if line.startswith(_MARKER):
            data = json.loads(line[len(_MARKER):])
            result = WrkResult(
                duration_s=data["duration_us"] / 1e6, requests=data["requests"],
                p50_ms=data["p50_us"] / 1e3, p99_ms=data["p99_us"] / 1e3,
                max_ms=data["max_us"] / 1e3,
                codes={int(k): v for k, v in data["codes"].items()},
                errors=data["errors"])
        elif line.startswith(_RATE_MARKER) and result is not None:
            data = json.loads(line[len(_RATE_MARKER):])
            result.schedule = Schedule(
                target_rps=data["target_rps"], achieved_rps=data["achieved_rps"],
                sent=data["sent"], late_1ms=data["late_1ms"],
                **{key: _ms(data[key + "_us"]) for key in ("from_schedule", "from_send", "lag")})
    if result is None:
        raise RuntimeError("wrk printed no result:\n" + output[-2000:])
    return result


def _ms(stats: dict[str, int]) -> dict[str, float]:
    """LUA_RATE's µs statistics in ms (the count `n` as is)."""
    return {k: (v if k == "n" else v / 1e3) for k, v in stats.items()}


def probe(url: str, body: bytes, content_type: str, encoding: str = "") -> Optional[int]:
    """The status of one POST of `body` (None when nothing answers)."""
    from tests.support import http_status

    headers = {"Content-Type": content_type}
    if encoding:
        headers["Content-Encoding"] = encoding
    return http_status(url, timeout=5, method="POST", body=body, headers=headers)
