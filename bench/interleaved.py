"""CPU per request of estat from two trees and of the httptools floor, with
short wrk runs taken in turn, so that the slow drifts of a shared machine
fall on all three alike.

```sh
git worktree add /tmp/before <commit>
.venv/bin/python bench/interleaved.py --before /tmp/before            # single body
.venv/bin/python bench/interleaved.py --before /tmp/before -s batch --rounds 12
```

Each server is started once (the floor: bench/baseline_server.py
--httptools; each tree: `twistd -n estat-ingest` with that tree first on
PYTHONPATH, on the local store), pinned to CPU 1 with wrk on CPU 0. Then,
for each round, every server gets one wrk run of `--seconds`, in an order
that alternates between rounds; its CPU per request is its CPU time over
the requests wrk completed (the whole process, and its main thread alone).
Printed: the median of each, and the median over rounds of each tree's
ratio to the floor of the same round. The trees' `estat` must be importable
by this venv's Python (the same dependencies).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from typing import Optional

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH_DIR)
sys.path.insert(0, os.path.dirname(BENCH_DIR))

import loadgen  # noqa: E402
from procs import wait_until  # noqa: E402
from run import body_for  # noqa: E402
from tests.support import free_port, http_status  # noqa: E402

VENV_BIN = os.path.dirname(sys.executable)
_TICKS = os.sysconf("SC_CLK_TCK")


def _cpu_s(pid: int, thread: Optional[int] = None) -> float:
    """User + system CPU seconds of a process, or of one of its threads."""
    path = f"/proc/{pid}/stat" if thread is None else f"/proc/{pid}/task/{thread}/stat"
    with open(path) as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


class _Server:
    def __init__(self, name: str, tree: Optional[str], workdir: str) -> None:
        self.name = name
        self.port = free_port()
        env = dict(os.environ)
        log = open(os.path.join(workdir, f"{name}.log"), "w")
        if tree is None:
            argv = [sys.executable, os.path.join(BENCH_DIR, "baseline_server.py"),
                    str(self.port), "--httptools"]
            env["PYTHONPATH"] = os.path.dirname(BENCH_DIR)
            ready = f"http://127.0.0.1:{self.port}/"
        else:
            admin = free_port()
            data = os.path.join(workdir, name)
            env.update(PYTHONPATH=tree, LISTEN=f"tcp:{self.port}:interface=127.0.0.1",
                       ADMIN_LISTEN=f"tcp:{admin}:interface=127.0.0.1",
                       OUTPUT_DIR=os.path.join(data, "objects"),
                       DLQ_DIR=os.path.join(data, "dlq"), EVENT_QUEUE_SIZE="100000",
                       WORKERS="1")
            argv = [os.path.join(VENV_BIN, "twistd"), "--nodaemon", "--pidfile=",
                    "estat-ingest"]
            ready = f"http://127.0.0.1:{admin}/readyz"
        self.url = f"http://127.0.0.1:{self.port}/collect"
        self.child = subprocess.Popen(["taskset", "-c", "1"] + argv, env=env,
                                      cwd=tree or workdir, stdout=log,
                                      stderr=subprocess.STDOUT, start_new_session=True)
        wait_until(lambda: http_status(ready) in (200, 202), 60, f"{name} to listen")
        self.total: list[float] = []
        self.main: list[float] = []

    def stop(self) -> None:
        self.child.terminate()
        try:
            self.child.wait(60)
        except subprocess.TimeoutExpired:
            self.child.kill()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", required=True, help="the tree to compare with")
    parser.add_argument("--after", default=os.path.dirname(BENCH_DIR),
                        help="the other tree (default: this one)")
    parser.add_argument("-s", "--body", default="single", help="single, batch, chunk1k, ...")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--seconds", type=int, default=2)
    opts = parser.parse_args(argv)
    wrk = loadgen.ensure_wrk()
    body = body_for(opts.body)
    workdir = tempfile.mkdtemp(prefix="estat-interleaved-")
    script = loadgen.write_script(workdir, opts.body, body.data, body.content_type,
                                  encoding=body.encoding)
    servers: list[_Server] = []
    try:
        for name, tree in (("floor", None), ("before", opts.before), ("after", opts.after)):
            servers.append(_Server(name, tree, workdir))
        for number in range(opts.rounds):
            for server in (servers if number % 2 == 0 else servers[::-1]):
                pid = server.child.pid
                total, main_thread = _cpu_s(pid), _cpu_s(pid, pid)
                result = loadgen.run_wrk(wrk, server.url, script, opts.seconds, 64, 1,
                                         os.path.join(workdir, "wrk.log"), cpus="0")
                requests = max(1, result.requests)
                server.total.append((_cpu_s(pid) - total) * 1e6 / requests)
                server.main.append((_cpu_s(pid, pid) - main_thread) * 1e6 / requests)
    finally:
        for server in servers:
            server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    floor = servers[0]
    print(f"{opts.body} body, {opts.rounds} rounds of {opts.seconds} s, servers on CPU 1, wrk on CPU 0")
    print("| server | CPU µs/req (median) | main thread µs/req | × floor (median of rounds) |")
    print("|---|---|---|---|")
    for server in servers:
        ratios = [mine / base for mine, base in zip(server.total, floor.total)]
        print(f"| {server.name} | {statistics.median(server.total):.1f} | "
              f"{statistics.median(server.main):.1f} | {statistics.median(ratios):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
