"""Two `twistd estat-ingest` hosts behind HAProxy (Debian's `haproxy`) run
with the shipped etc/haproxy/haproxy.cfg, pointed at loopback ports: a
SIGTERM at load, a rolling restart of both with
etc/haproxy/estat-rolling-restart, and every host out. Clients must see
no error: no HAProxy 503, no connection closed without an answer, and
every event answered 202 stored exactly once; when no host is left,
HAProxy's own 503 is estat's JSON with Retry-After."""

from __future__ import annotations

import collections
import functools
import http.client
import importlib.machinery
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import types
from typing import Optional

from twisted.internet import threads
from twisted.internet.defer import gatherResults, inlineCallbacks
from twisted.trial import unittest

from tests.support import (
    REPO_ROOT,
    VENV_BIN,
    EstatServer,
    Subprocess,
    free_port,
    make_workdir,
    poll_until,
    read_objects,
)

HAPROXY = shutil.which("haproxy") or (os.path.exists("/usr/sbin/haproxy") and "/usr/sbin/haproxy")
SHIPPED = os.path.join(REPO_ROOT, "etc", "haproxy", "haproxy.cfg")
ERRORFILE = os.path.join(REPO_ROOT, "etc", "haproxy", "estat-503.http")
ROLLING_RESTART = os.path.join(REPO_ROOT, "etc", "haproxy", "estat-rolling-restart")
BACKEND = "estat_ingest_hosts"


@functools.lru_cache(maxsize=None)
def rolling_restart() -> types.ModuleType:
    """etc/haproxy/estat-rolling-restart, a script without .py, as a module."""
    loader = importlib.machinery.SourceFileLoader("estat_rolling_restart", ROLLING_RESTART)
    spec = importlib.util.spec_from_loader(loader.name, loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def loopback_config(shipped: str, port: int, servers: dict[str, int], socket_path: str,
                    inter: Optional[str] = None) -> str:
    """The shipped config with its addresses on loopback: plain HTTP on
    `port` instead of the TLS and redirect front, the runtime socket and
    the error file at local paths, and one server line per test host.
    Everything else (checks, timeouts, retries, PROXY protocol) stays as
    shipped, but for the global maxconn, which needs twice as many file
    descriptors as a test machine may allow; `inter` replaces the check
    interval for a shorter test."""
    text = shipped
    text, maxconns = re.subn(r"^(\s*)maxconn \d+\s*$", r"\g<1>maxconn 2000", text, count=1,
                             flags=re.MULTILINE)
    text = re.sub(r"^\s*bind :443 .*\n", "", text, flags=re.MULTILINE)
    text = re.sub(r"^\s*http-request redirect scheme https .*\n", "", text, flags=re.MULTILINE)
    text, binds = re.subn(r"^(\s*)bind :80\s*$", rf"\g<1>bind 127.0.0.1:{port}", text,
                          flags=re.MULTILINE)
    text, sockets = re.subn(r"stats socket \S+", f"stats socket {socket_path}", text)
    text, errorfiles = re.subn(r"errorfile 503 \S+", f"errorfile 503 {ERRORFILE}", text)
    text, servers_removed = re.subn(r"^\s*server ingest-\d+ \S+\s*\n", "", text,
                                    flags=re.MULTILINE)
    assert (maxconns, binds, sockets, errorfiles) == (1, 1, 1, 1) and servers_removed > 0, \
        "the shipped haproxy.cfg changed shape: update loopback_config"
    if inter is not None:
        text, count = re.subn(r"^(\s*default-server .*)\binter \S+", rf"\g<1>inter {inter}",
                              text, flags=re.MULTILINE)
        assert count == 1, "no check interval on the default-server line"
    lines = "".join(f"    server {name} 127.0.0.1:{server_port}\n"
                    for name, server_port in servers.items())
    return text.rstrip("\n") + "\n" + lines


def check_setting(shipped: str, name: str) -> float:
    """A number of the shipped default-server line (`inter 2s` gives 2)."""
    match = re.search(rf"default-server .*\b{name} (\d+)(ms|s)?\b", shipped)
    assert match is not None, name
    value = float(match.group(1))
    return value / 1000 if match.group(2) == "ms" else value


class HAProxy:
    """HAProxy in the foreground on a loopback config."""

    def __init__(self, workdir: str, servers: dict[str, int], inter: Optional[str] = None):
        self.workdir = workdir
        self.port = free_port()
        self.socket = os.path.join(workdir, "haproxy.sock")
        with open(SHIPPED, encoding="utf-8") as handle:
            shipped = handle.read()
        self.config = os.path.join(workdir, "haproxy.cfg")
        with open(self.config, "w", encoding="utf-8") as handle:
            handle.write(loopback_config(shipped, self.port, servers, self.socket, inter))
        self.proc: Optional[Subprocess] = None

    @inlineCallbacks
    def start(self):  # type: ignore[no-untyped-def]
        assert HAPROXY
        self.proc = Subprocess([HAPROXY, "-db", "-f", self.config], dict(os.environ),
                               self.workdir, os.path.join(self.workdir, "haproxy.log"))
        yield poll_until(lambda: os.path.exists(self.socket) or not self.proc.running(), 20,
                         what="haproxy to start")
        if not self.proc.running():
            raise AssertionError("haproxy exited:\n" + self.proc.output())

    def all_up(self) -> bool:
        """Every server UP, as the rolling restart script reads it."""
        states = rolling_restart().servers_state(self.socket, BACKEND)
        return bool(states) and all(map(rolling_restart().is_up, states.values()))

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()


class Load:
    """A bounded client: `clients` threads, each posting numbered events to
    HAProxy over one keep-alive connection (a new one after an error),
    until stopped. It records every answer and every error."""

    def __init__(self, port: int, clients: int = 4) -> None:
        self.port = port
        self.clients = clients
        self.stopping = threading.Event()
        self.accepted: list[str] = []
        self.answers: collections.Counter[int] = collections.Counter()
        self.errors: list[str] = []
        self._lock = threading.Lock()

    def run(self):  # type: ignore[no-untyped-def]
        from twisted.internet.defer import DeferredList

        return DeferredList([threads.deferToThread(self._client, number)
                             for number in range(self.clients)], fireOnOneErrback=True)

    def _client(self, number: int) -> None:
        connection: Optional[http.client.HTTPConnection] = None
        sent = 0
        while not self.stopping.is_set() and sent < 200_000:
            if connection is None:
                connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            event_id = f"c{number}-{sent}"
            sent += 1
            body = json.dumps({"id": event_id}).encode()
            try:
                connection.request("POST", "/collect", body,
                                   {"Content-Type": "application/json"})
                response = connection.getresponse()
                answer = response.read()
            except (OSError, http.client.HTTPException) as error:
                with self._lock:
                    self.errors.append(f"{event_id}: {error!r}")
                connection.close()
                connection = None
                continue
            with self._lock:
                self.answers[response.status] += 1
                if response.status == 202:
                    self.accepted.append(event_id)
                elif len(self.errors) < 20:
                    self.errors.append(f"{event_id}: {response.status} {answer[:200]!r}")
            if response.will_close:
                connection.close()
                connection = None
        if connection is not None:
            connection.close()

    def total(self) -> int:
        with self._lock:
            return sum(self.answers.values()) + len(self.errors)


def stored_ids(*servers: EstatServer) -> collections.Counter[str]:
    found: collections.Counter[str] = collections.Counter()
    for server in servers:
        for _, lines in read_objects(server.environment()["OUTPUT_DIR"]):
            found.update(line["body"]["id"] for line in lines)
    return found


class BehindHAProxyTests(unittest.TestCase):
    def setUp(self) -> None:
        if not HAPROXY:
            raise unittest.SkipTest("haproxy is not installed (apt-get install haproxy)")
        self.workdir = make_workdir(self)

    @inlineCallbacks
    def hosts(self, env: Optional[dict[str, str]] = None,
              inter: Optional[str] = None):  # type: ignore[no-untyped-def]
        """Two estat hosts with `haproxy:` listeners, and HAProxy in front
        with both UP."""
        servers = {}
        for name in ("ingest-1", "ingest-2"):
            workdir = os.path.join(self.workdir, name)
            os.makedirs(workdir)
            server = EstatServer(workdir, env={"HOST_ID": name, "FLUSH_INTERVAL": "1",
                                               **(env or {})})
            server.extra_env["LISTEN"] = f"haproxy:tcp:{server.port}:interface=127.0.0.1"
            servers[name] = server
        yield gatherResults([server.start() for server in servers.values()])
        for server in servers.values():
            self.addCleanup(lambda s=server: s.proc.kill() if s.proc else None)
        haproxy = HAProxy(self.workdir, {name: s.port for name, s in servers.items()}, inter)
        yield haproxy.start()
        self.addCleanup(haproxy.stop)
        yield poll_until(haproxy.all_up, 30, what="HAProxy to mark both hosts UP")
        return servers, haproxy

    def assert_no_client_errors(self, load: Load, servers: list[EstatServer],
                                haproxy: HAProxy) -> None:
        self.assertEqual(load.errors, [], haproxy.proc.output()[-3000:] if haproxy.proc else "")
        self.assertEqual(set(load.answers), {202})
        stored = stored_ids(*servers)
        self.assertEqual(sorted(stored), sorted(load.accepted),
                         "every accepted event is stored, and nothing else")
        self.assertEqual([i for i, n in stored.items() if n > 1], [], "stored exactly once")

    def test_the_default_drain_delay_outlasts_the_shipped_checks(self):
        from estat.config import option_named, parse_non_negative_seconds

        with open(SHIPPED, encoding="utf-8") as handle:
            shipped = handle.read()
        fall, inter = check_setting(shipped, "fall"), check_setting(shipped, "inter")
        delay = parse_non_negative_seconds(option_named("drain-delay").default)
        self.assertGreaterEqual(delay, fall * inter + 1)

    @inlineCallbacks
    def test_a_sigterm_at_load_is_invisible_to_clients(self):
        """With the shipped checks and the default DRAIN_DELAY: the stopping
        host's /readyz turns 503, HAProxy takes it out, and only then does
        it close its port; then every host out gives estat's JSON 503."""
        servers, haproxy = yield self.hosts(env={"DRAIN_DELAY": option_default("drain-delay")})
        first, second = servers["ingest-1"], servers["ingest-2"]
        load = Load(haproxy.port)
        running = load.run()
        yield poll_until(lambda: load.total() >= 200, 10, what="load to build")
        code = yield first.stop()
        self.assertIn(code, (0, -15), first.output())
        count = load.total()
        yield poll_until(lambda: load.total() >= count + 200, 10, what="load on the other host")
        load.stopping.set()
        yield running
        code = yield second.stop()
        self.assertIn(code, (0, -15), second.output())
        self.assertGreater(stored_ids(first).total(), 0)
        self.assert_no_client_errors(load, [first, second], haproxy)
        # Every host out: HAProxy answers itself, in estat's shape.
        status, headers, body = yield threads.deferToThread(post_once, haproxy.port)
        self.assertEqual(status, 503)
        self.assertEqual(headers.get("content-type"), "application/json")
        self.assertEqual(headers.get("retry-after"), "1")
        self.assertEqual(json.loads(body)["error"], "no_server_available")

    @inlineCallbacks
    def test_a_rolling_restart_with_the_shipped_script_keeps_a_host_in_the_pool(self):
        """Both hosts restarted one after the other by
        etc/haproxy/estat-rolling-restart under load: no HAProxy 503. The
        checks run every 0.5 s instead of 2 s to keep the test short, with
        DRAIN_DELAY set by the same rule (fall x inter + 1 s)."""
        servers, haproxy = yield self.hosts(env={"DRAIN_DELAY": "2"}, inter="500ms")
        restart = os.path.join(self.workdir, "restart.sh")
        for name, server in servers.items():
            with open(os.path.join(self.workdir, f"{name}.env"), "w") as handle:
                for key, value in server.environment().items():
                    if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
                        handle.write(f"export {key}={shell_quote(value)}\n")
        with open(restart, "w") as handle:
            handle.write(RESTART_SCRIPT.format(workdir=shell_quote(self.workdir),
                                               twistd=shell_quote(os.path.join(VENV_BIN,
                                                                               "twistd"))))
        # The test's own processes are restarted by pid: hand them over.
        for name, server in servers.items():
            with open(os.path.join(self.workdir, f"{name}.pid"), "w") as handle:
                handle.write(str(server.proc.process.pid))
        self.addCleanup(kill_restarted, self.workdir, list(servers))
        load = Load(haproxy.port)
        running = load.run()
        yield poll_until(lambda: load.total() >= 200, 10, what="load to build")
        hosts = [f"{name}={server.admin_url}/readyz" for name, server in servers.items()]
        rolled = yield threads.deferToThread(
            subprocess.run, [sys.executable, ROLLING_RESTART, "--socket", haproxy.socket,
                             "--restart", f"sh {restart} {{server}}", "--timeout", "30", *hosts],
            capture_output=True, text=True, timeout=120)
        self.assertEqual(rolled.returncode, 0, rolled.stdout + rolled.stderr)
        count = load.total()
        yield poll_until(lambda: load.total() >= count + 200, 10, what="load after the restart")
        load.stopping.set()
        yield running
        for server in servers.values():  # the first processes have exited cleanly
            self.assertIn(server.proc.process.wait(10), (0, -15), server.output())
        yield threads.deferToThread(kill_restarted, self.workdir, list(servers), True)
        self.assertIn("ingest-2: UP", rolled.stdout)
        self.assert_no_client_errors(load, list(servers.values()), haproxy)


def option_default(name: str) -> str:
    from estat.config import option_named

    return option_named(name).default


def post_once(port: int) -> tuple[int, dict[str, str], bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("POST", "/collect", b'{"id":"late"}',
                           {"Content-Type": "application/json"})
        response = connection.getresponse()
        return (response.status, {k.lower(): v for k, v in response.getheaders()},
                response.read())
    finally:
        connection.close()


def shell_quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


# Restarts one test host as `systemctl restart` would: SIGTERM, wait for the
# exit, start the same server again (detached, on the same ports and
# directories), and note its pid.
RESTART_SCRIPT = """#!/bin/sh
set -eu
name=$1
pid=$(cat {workdir}/$name.pid)
kill -TERM "$pid"
while [ -d /proc/$pid ] && ! grep -q '^State:.*Z' /proc/$pid/status 2>/dev/null; do sleep 0.05; done
. {workdir}/$name.env
cd {workdir}/$name
setsid {twistd} --nodaemon --pidfile= estat-ingest >> {workdir}/$name/restarted.log 2>&1 < /dev/null &
echo $! > {workdir}/$name.pid
"""


def kill_restarted(workdir: str, names: list[str], gently: bool = False) -> None:
    """Stop the hosts the restart script started (SIGTERM and wait when
    `gently`, else SIGKILL)."""
    import signal
    import time

    for name in names:
        try:
            with open(os.path.join(workdir, f"{name}.pid")) as handle:
                pid = int(handle.read())
        except (OSError, ValueError):
            continue
        try:
            os.kill(pid, signal.SIGTERM if gently else signal.SIGKILL)
        except ProcessLookupError:
            continue
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with open(f"/proc/{pid}/status") as status:
                    if re.search(r"^State:\s+Z", status.read(), re.MULTILINE):
                        break
            except OSError:
                break
            time.sleep(0.05)

