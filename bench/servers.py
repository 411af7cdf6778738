"""The servers under test, as subprocesses on free loopback ports:
the bare twisted.web baseline and `twistd -n estat-ingest` from this tree."""

from __future__ import annotations

import os
import sys
import urllib.request
from typing import Optional

from procs import Child, free_port, http_status, wait_until

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(BENCH_DIR)
VENV_BIN = os.path.dirname(sys.executable)


class Baseline:
    """bench/baseline_server.py: 202 to every POST, nothing else."""

    def __init__(self, logdir: str, stock: bool = False) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/collect"
        argv = [sys.executable, os.path.join(BENCH_DIR, "baseline_server.py"), str(self.port)]
        self.child = Child("baseline", argv + (["--stock"] if stock else []),
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
    """`twistd --nodaemon --pidfile= estat-ingest` with its data in `datadir`."""

    def __init__(self, logdir: str, datadir: str, extra_env: dict[str, str]) -> None:
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
            **extra_env,
        })
        argv = [os.path.join(VENV_BIN, "twistd"), "--nodaemon", "--pidfile=", "estat-ingest"]
        self.child = Child("estat-ingest", argv, env, datadir,
                           os.path.join(logdir, "server.log"))
        try:
            wait_until(lambda: http_status(self.admin_url + "/readyz") == 200, 60,
                       "estat-ingest to be ready", self.child)
        except BaseException:
            self.child.kill_group()
            raise

    def metrics(self) -> dict[str, float]:
        """The admin /metrics page as {sample name with labels: value}."""
        with urllib.request.urlopen(self.admin_url + "/metrics", timeout=10) as response:
            text = response.read().decode()
        values = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                values[name] = float(value)
        return values

    def stop(self, timeout: float) -> Optional[int]:
        """SIGTERM (the server flushes and finishes uploads) and wait; twistd
        exits with -15 after a clean stop. None if it had to be killed."""
        return self.child.terminate(timeout)
