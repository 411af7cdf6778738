"""The servers under test, as subprocesses on free loopback ports:
the bare twisted.web baseline and `twistd -n estat-ingest` from this tree."""

from __future__ import annotations

import os
import re
import sys
import urllib.request
from typing import Optional

from procs import Child, pinned, wait_until

from tests.support import free_port, http_status

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(BENCH_DIR)
VENV_BIN = os.path.dirname(sys.executable)


class Baseline:
    """bench/baseline_server.py: 202 to every POST, nothing else. `flavour`
    is "" (twisted.web), "stock" or "httptools" (see that file)."""

    def __init__(self, logdir: str, flavour: str = "", cpus: Optional[str] = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/collect"
        argv = pinned(cpus) + [sys.executable, os.path.join(BENCH_DIR, "baseline_server.py"),
                               str(self.port)]
        self.child = Child("baseline", argv + ([f"--{flavour}"] if flavour else []),
                           dict(os.environ), logdir, os.path.join(logdir, "server.log"))
        try:
            wait_until(lambda: http_status(self.url, method="POST", body=b"{}") == 202, 30,
                       "the baseline server to answer", self.child)
        except BaseException:
            self.child.kill_group()
            raise

    def stop(self) -> Optional[int]:
        return self.child.terminate(10)


class Estat:
    """`twistd --nodaemon --pidfile= estat-ingest` with its data in `datadir`;
    with `workers` > 1 the twistd process is the parent of that many worker
    processes (WORKERS), which it stops on SIGTERM."""

    def __init__(self, logdir: str, datadir: str, extra_env: dict[str, str],
                 workers: int = 1, cpus: Optional[str] = None) -> None:
        self.workers = workers
        self.port = free_port()
        self.admin_port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/collect"
        self.admin_url = f"http://127.0.0.1:{self.admin_port}"
        self.output_dir = os.path.join(datadir, "objects")
        self.dlq_dir = os.path.join(datadir, "dlq")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "S3_"))}
        env.update({
            "PYTHONPATH": REPO_ROOT,
            "LISTEN": f"tcp:{self.port}:interface=127.0.0.1",
            "ADMIN_LISTEN": f"tcp:{self.admin_port}:interface=127.0.0.1",
            "OUTPUT_DIR": self.output_dir,
            "DLQ_DIR": self.dlq_dir,
            "WORKERS": str(workers),
            **extra_env,
        })
        argv = pinned(cpus) + [os.path.join(VENV_BIN, "twistd"), "--nodaemon", "--pidfile=",
                               "estat-ingest"]
        self.child = Child("estat-ingest", argv, env, datadir,
                           os.path.join(logdir, "server.log"))
        try:
            wait_until(lambda: http_status(self.admin_url + "/readyz") == 200, 60,
                       "estat-ingest to be ready", self.child)
        except BaseException:
            self.child.kill_group()
            raise

    def metrics(self) -> dict[str, float]:
        """The admin /metrics page as {sample name with labels: value},
        summed over the `worker` label (see `parse_metrics`)."""
        return parse_metrics(self.metrics_text())[0]

    def metrics_text(self) -> str:
        with urllib.request.urlopen(self.admin_url + "/metrics", timeout=10) as response:
            return response.read().decode()

    def stop(self, timeout: float) -> Optional[int]:
        """SIGTERM (the server flushes and finishes uploads) and wait; twistd
        exits with -15 after a clean stop. None if it had to be killed."""
        return self.child.terminate(timeout)


_LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"\s*,?')


def parse_metrics(text: str) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """A Prometheus text page as ({sample: value}, {worker: {sample: value}}).

    `sample` is the name with its labels as printed (`name{a="x",b="y"}`)
    minus any `worker` label, and the first dict sums every sample over that
    label: with `--workers N` the parent shows each worker's samples with
    `worker="<i>"`, so `estat_events_accepted_total` is the sum over the
    workers. (The parent's own process_* samples, which have no worker
    label, are added in too; the harness reads only estat_* samples.)"""
    totals: dict[str, float] = {}
    per_worker: dict[str, dict[str, float]] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        sample, _, value = line.rpartition(" ")
        name, brace, rest = sample.partition("{")
        worker = None
        if brace:
            labels = []
            for key, label_value in _LABEL.findall(rest.rstrip("}")):
                if key == "worker":
                    worker = label_value
                else:
                    labels.append(f'{key}="{label_value}"')
            sample = name + ("{" + ",".join(labels) + "}" if labels else "")
        totals[sample] = totals.get(sample, 0.0) + float(value)
        if worker is not None:
            per_worker.setdefault(worker, {})[sample] = float(value)
    return totals, per_worker
