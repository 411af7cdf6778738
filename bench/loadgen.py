"""Request bodies and the wrk load generator: a Lua script per scenario that
sets the method, body and headers, counts every status code per thread and
prints one JSON line of results when wrk is done."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
from dataclasses import dataclass, field
from typing import Optional

JSON_TYPE = "application/json"
NDJSON_TYPE = "application/x-ndjson"
_MARKER = "BENCH_JSON "

_LUA = r"""
local f = assert(io.open("%(body_path)s", "rb"))
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = "%(content_type)s"
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


def write_script(workdir: str, name: str, body: bytes, content_type: str) -> str:
    """Write the body and the Lua script for one scenario; return the script path."""
    body_path = os.path.join(workdir, f"{name}.body")
    with open(body_path, "wb") as handle:
        handle.write(body)
    script_path = os.path.join(workdir, f"{name}.lua")
    with open(script_path, "w") as handle:
        handle.write((_LUA + LUA_REPORT) % {"body_path": body_path,
                                            "content_type": content_type,
                                            "marker": _MARKER})
    return script_path


def run_wrk(wrk: str, url: str, script: str, duration_s: float, connections: int,
            threads: int, log_path: str) -> WrkResult:
    """Run wrk against a loopback URL for `duration_s` seconds and parse its
    result; wrk is killed (with its group) if it overruns or we are
    interrupted."""
    if not url.startswith("http://127.0.0.1:"):
        raise ValueError(f"refusing to load anything but loopback: {url}")
    usage_before = _children_cpu()
    argv = [wrk, f"-t{threads}", f"-c{connections}", f"-d{max(1, round(duration_s))}s",
            "--timeout", "5s", "-s", script, url]
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
    """The WrkResult from wrk's output (the marker line our `done` prints)."""
    for line in output.splitlines():
        if line.startswith(_MARKER):
            data = json.loads(line[len(_MARKER):])
            return WrkResult(
                duration_s=data["duration_us"] / 1e6, requests=data["requests"],
                p50_ms=data["p50_us"] / 1e3, p99_ms=data["p99_us"] / 1e3,
                max_ms=data["max_us"] / 1e3,
                codes={int(k): v for k, v in data["codes"].items()},
                errors=data["errors"])
    raise RuntimeError("wrk printed no result:\n" + output[-2000:])


def probe(url: str, body: bytes, content_type: str) -> Optional[int]:
    """The status of one POST of `body` (None when nothing answers)."""
    from procs import http_status

    return http_status(url, timeout=5, method="POST", body=body,
                       headers={"Content-Type": content_type})
