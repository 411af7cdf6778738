"""Test helpers: an ingest listener on an in-memory transport (with a client
that sends raw bytes and reads the answers), a raw TCP client, free ports,
polling with a deadline on the reactor, and real subprocesses (a moto S3
server, `twistd -n estat-ingest`)."""

from __future__ import annotations

import datetime
import gzip
import http.server
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, Callable, Optional

from prometheus_client import CollectorRegistry
from twisted.internet import reactor as global_reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from estat.auth import WriteKeys
from estat.collect import IngestState, Routes, queue_refusal
from estat.config import Settings
from estat.http.channel import IngestListener
from estat.http.limits import Limits
from estat.metrics import Metrics
from estat.pipeline.queue import EventQueue
from estat.sdk import body_limits as sdk_body_limits
from estat.sdk import routes as sdk_routes

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV_BIN = os.path.dirname(sys.executable)


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Timeout(AssertionError):
    pass


@inlineCallbacks
def poll_until(predicate: Callable[[], Any], timeout: float = 20.0,
               interval: float = 0.05, what: str = "condition"):  # type: ignore[no-untyped-def]
    """Fire with the predicate's first truthy value, polling on the reactor
    (never blocking it); fail with Timeout after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise Timeout(f"timed out after {timeout}s waiting for {what}")
        yield deferLater(global_reactor, interval, lambda: None)


def http_status(url: str, timeout: float = 2.0, method: str = "GET",
                body: Optional[bytes] = None,
                headers: Optional[dict[str, str]] = None) -> Optional[int]:
    """The status code of one request, or None when nothing answers (also
    used by bench/, which probes its servers the same way)."""
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            response.read()
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)
    except OSError:
        return None


def site_get(site: Any, path: bytes, method: bytes = b"GET"
             ) -> tuple[int, dict[bytes, bytes], bytes]:
    """(status, headers, body) of one HTTP/1.0 request to a twisted.web
    `site` in memory (headers by lower-case name)."""
    from twisted.internet.testing import StringTransport

    channel = site.buildProtocol(None)
    transport = StringTransport()
    channel.makeConnection(transport)
    channel.dataReceived(b"%s %s HTTP/1.0\r\nHost: x\r\n\r\n" % (method, path))
    head, _, body = transport.value().partition(b"\r\n\r\n")
    status, *lines = head.split(b"\r\n")
    headers = dict(line.split(b": ", 1) for line in lines)
    return int(status.split()[1]), {k.lower(): v for k, v in headers.items()}, body


def read_objects(root: str) -> list[tuple[str, list[dict[str, Any]]]]:
    """Every `.jsonl.gz` object under `root` as (relative key, lines)."""
    found = []
    for directory, _, names in os.walk(root):
        for name in sorted(names):
            if name.endswith(".jsonl.gz"):
                path = os.path.join(directory, name)
                with gzip.open(path, "rb") as handle:
                    lines = [json.loads(line) for line in handle.read().splitlines()]
                found.append((os.path.relpath(path, root), lines))
    return found


class Subprocess:
    """A child process whose output goes to a file kept for failure reports.

    It leads a process group of its own, so that whatever it starts (the
    workers of `--workers N`) can be found, and killed, once it has exited:
    a process outliving the test would hold its ports and files into the
    next one. `left_behind` lists the pids that had to be killed so."""

    def __init__(self, argv: list[str], env: dict[str, str], cwd: str, log_path: str) -> None:
        self.argv = argv
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.process = subprocess.Popen(argv, env=env, cwd=cwd, stdout=self._log,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        self.left_behind: list[int] = []

    def output(self) -> str:
        if not self._log.closed:
            self._log.flush()
        with open(self.log_path, "rb") as handle:
            return handle.read().decode("utf-8", "replace")

    def running(self) -> bool:
        return self.process.poll() is None

    def signal(self, signum: int) -> None:
        if self.running():
            self.process.send_signal(signum)

    @inlineCallbacks
    def wait_exit(self, timeout: float = 30.0):  # type: ignore[no-untyped-def]
        yield poll_until(lambda: not self.running(), timeout, what=f"{self.argv[0]} to exit")
        self.kill_group_rest()
        self._log.close()
        return self.process.returncode

    def kill(self) -> None:
        if self.running():
            self.process.kill()
            self.process.wait()
        self.kill_group_rest()
        self._log.close()

    def kill_group_rest(self) -> None:
        """SIGKILL what is left of the process group once its leader has
        exited, noting the pids in `left_behind`."""
        group = self.process.pid
        members = [pid for pid in _pids() if _pgid(pid) == group and pid != group]
        for pid in members:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
            self.left_behind.append(pid)


def _pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def _pgid(pid: int) -> Optional[int]:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


class MotoServer:
    """A real moto S3 server on a free loopback port, as a subprocess."""

    def __init__(self, workdir: str, port: Optional[int] = None,
                 env: Optional[dict[str, str]] = None) -> None:
        self.workdir = workdir
        self.port = port or free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.extra_env = env or {}
        self.proc: Optional[Subprocess] = None

    @inlineCallbacks
    def start(self):  # type: ignore[no-untyped-def]
        env = {**os.environ, **self.extra_env}
        self.proc = Subprocess(
            [os.path.join(VENV_BIN, "moto_server"), "-H", "127.0.0.1", "-p", str(self.port)],
            env, self.workdir, os.path.join(self.workdir, f"moto-{self.port}.log"))
        yield poll_until(lambda: http_status(self.endpoint + "/moto-api/") is not None
                         or not self.proc.running(), 30, what="moto to listen")
        if not self.proc.running():
            raise AssertionError("moto_server exited:\n" + self.proc.output())

    @inlineCallbacks
    def stop(self):  # type: ignore[no-untyped-def]
        if self.proc is not None and self.proc.running():
            self.proc.signal(signal.SIGTERM)
            try:
                yield self.proc.wait_exit(10)
            except Timeout:
                self.proc.kill()

    def client(self) -> Any:
        """A boto-style botocore S3 client for reading the bucket in tests."""
        import botocore.session

        session = botocore.session.get_session()
        return session.create_client(
            "s3", region_name="us-east-1", endpoint_url=self.endpoint,
            aws_access_key_id="testing", aws_secret_access_key="testing")


class EstatServer:
    """`twistd -n estat-ingest` from this source tree, as a subprocess on
    free loopback ports, in its own working directory."""

    def __init__(self, workdir: str, env: Optional[dict[str, str]] = None,
                 args: Optional[list[str]] = None) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.admin_port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.admin_url = f"http://127.0.0.1:{self.admin_port}"
        self.extra_env = env or {}
        self.args = args or []
        self.proc: Optional[Subprocess] = None
        self.starts = 0

    def environment(self) -> dict[str, str]:
        env = {key: value for key, value in os.environ.items()
               if not key.startswith(("AWS_", "S3_"))}
        env["PYTHONPATH"] = REPO_ROOT
        env.update({
            "LISTEN": f"tcp:{self.port}:interface=127.0.0.1",
            "ADMIN_LISTEN": f"tcp:{self.admin_port}:interface=127.0.0.1",
            "OUTPUT_DIR": os.path.join(self.workdir, "objects"),
            "DLQ_DIR": os.path.join(self.workdir, "dlq"),
            "DRAIN_DELAY": "0",  # no balancer to wait for, unless a test says so
        })
        env.update(self.extra_env)
        return env

    @inlineCallbacks
    def start(self):  # type: ignore[no-untyped-def]
        self.starts += 1
        argv = [os.path.join(VENV_BIN, "twistd"), "--nodaemon", "--pidfile=",
                "estat-ingest", *self.args]
        self.proc = Subprocess(argv, self.environment(), self.workdir,
                               os.path.join(self.workdir, f"twistd-{self.starts}.log"))
        try:
            yield poll_until(
                lambda: not self.proc.running()
                or http_status(self.admin_url + "/readyz") == 200,
                30, what="estat-ingest to be ready")
        except Timeout:
            self.proc.kill()
            raise AssertionError("estat-ingest never became ready:\n" + self.proc.output())
        if not self.proc.running():
            raise AssertionError("estat-ingest exited at start:\n" + self.proc.output())

    @inlineCallbacks
    def stop(self, timeout: float = 60.0):  # type: ignore[no-untyped-def]
        """SIGTERM and wait; -15 is twistd's clean stop (it re-raises). A
        clean stop ends the workers first: one left running fails."""
        assert self.proc is not None
        self.proc.signal(signal.SIGTERM)
        code = yield self.proc.wait_exit(timeout)
        if self.proc.left_behind:
            raise AssertionError(f"processes {self.proc.left_behind} outlived twistd's stop "
                                 f"(killed):\n{self.proc.output()[-3000:]}")
        return code

    def output(self) -> str:
        return self.proc.output() if self.proc else ""

    def metrics(self) -> dict[str, float]:
        """The admin /metrics page as {sample name with labels: value}."""
        with urllib.request.urlopen(self.admin_url + "/metrics", timeout=5) as response:
            text = response.read().decode()
        values = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                values[name] = float(value)
        return values


def post(url: str, body: bytes, content_type: str = "application/json",
         headers: Optional[dict[str, str]] = None) -> tuple[int, bytes]:
    """A blocking POST for end-to-end tests: (status, body)."""
    request = urllib.request.Request(url, data=body, method="POST",
                                     headers={"Content-Type": content_type, **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status), response.read()
    except urllib.error.HTTPError as error:
        return int(error.code), error.read()


def make_workdir(test: Any) -> str:
    """A fresh directory, removed after the test."""
    path = tempfile.mkdtemp(prefix="estat-test-")
    test.addCleanup(shutil.rmtree, path, True)
    return path


# An ingest listener in memory

# The server's limits, but for a small single event (tests send bodies
# just over it).
TEST_LIMITS = Limits(max_headers=64, max_header_bytes=16 * 1024, max_body_size=1024,
                     max_batch_body_size=1024 * 1024, request_timeout=10.0,
                     idle_timeout=60.0, first_request_timeout=5.0, max_connections=1024,
                     max_receiving_bytes=64 * 1024 * 1024)


@dataclass
class Listening:
    """An ingest listener and what its tests look at."""

    listener: IngestListener
    queue: EventQueue
    state: IngestState
    registry: CollectorRegistry
    clock: Clock

    def metric(self, name: str, **labels: str) -> float:
        """A sample's value, 0 when it was never set."""
        value = self.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value


def make_listener(*, queue_size: int = 100, now_ms: Callable[[], int] = lambda: 1,
                  max_batch_events: int = 1000, write_keys: Optional[WriteKeys] = None,
                  cors_origins: str = "", clock: Optional[Clock] = None,
                  queue: Optional[EventQueue] = None, metrics: Optional[Metrics] = None,
                  sdk_settings: Settings = Settings(), **changed_limits: Any) -> Listening:
    """The ingest listener as the server wires it (its handler, state and
    counters, the SDK paths with `sdk_settings`' limits), with `TEST_LIMITS`
    changed by `changed_limits`, started as a port starts it: its reaper and
    the recent-id window run on `clock`. Its lifecycle is running (ready);
    `queue` and `metrics` are made unless given."""
    clock = clock if clock is not None else Clock()
    if metrics is None:
        metrics = Metrics(CollectorRegistry(), process=False)
    if queue is None:
        queue = EventQueue(queue_size)
    state = IngestState(queue, metrics, True, now_ms=now_ms, write_keys=write_keys,
                        cors_origins=cors_origins)
    state.lifecycle.start_running()
    changed_limits.setdefault("path_body_limits", sdk_body_limits(sdk_settings))
    limits = replace(TEST_LIMITS, **changed_limits)
    listener = IngestListener(
        handler=Routes(state, max_event_bytes=limits.max_body_size,
                       max_batch_events=max_batch_events,
                       more=sdk_routes(state, sdk_settings, clock)),
        limits=limits, counters=state, lifecycle=state.lifecycle, reactor=clock,
        answer_headers=state.cors_headers,
        queue_refusal=partial(queue_refusal, state))
    listener.doStart()
    return Listening(listener, queue, state, metrics.registry, clock)


class ListenerTestCase(unittest.TestCase):
    """A test case around one listener from `make_listener`: `listen` makes
    it and keeps its parts as attributes of the test."""

    def listen(self, **options: Any) -> Listening:
        setup = make_listener(**options)
        self.listener, self.queue, self.state = setup.listener, setup.queue, setup.state
        self.clock, self.metric = setup.clock, setup.metric
        return setup


Answers = list[tuple[int, dict[bytes, bytes], bytes]]


class Exchange:
    """One client connection to the listener over an in-memory transport:
    send bytes, read the answers."""

    def __init__(self, listener: IngestListener) -> None:
        self.transport = StringTransport()
        channel = listener.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5555))
        assert channel is not None
        self.channel = channel
        channel.makeConnection(self.transport)

    def send(self, data: bytes) -> None:
        self.channel.dataReceived(data)

    def send_in_pieces(self, data: bytes, cuts: list[int]) -> None:
        """Send `data` cut at the given offsets (out of range ones ignored)."""
        last = 0
        for cut in sorted(set(c for c in cuts if c < len(data))):
            self.send(data[last:cut])
            last = cut
        self.send(data[last:])

    def send_and_read(self, data: bytes) -> Answers:
        self.send(data)
        return self.responses()

    def responses(self) -> Answers:
        """Parse every complete response written so far."""
        return self.parse(self.transport.value())

    @staticmethod
    def parse(data: bytes) -> Answers:
        """(status, lowercased headers, body) of each response in `data`."""
        out = []
        while data:
            head, _, rest = data.partition(b"\r\n\r\n")
            lines = head.split(b"\r\n")
            code = int(lines[0].split(b" ")[1])
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                headers[name.strip().lower()] = value.strip()
            length = int(headers.get(b"content-length", b"0"))
            out.append((code, headers, rest[:length]))
            data = rest[length:]
        return out


def post_bytes(body: bytes, content_type: bytes = b"application/json",
               path: bytes = b"/collect", extra: bytes = b"") -> bytes:
    """A whole POST request; `extra` is more header lines, each with its CRLF."""
    return (b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: %s\r\n"
            b"Content-Length: %d\r\n%s\r\n%s" % (path, content_type, len(body), extra, body))


class RawClient(Protocol):
    """A TCP client that keeps every byte it receives; `closed` fires when
    the connection is lost."""

    def __init__(self) -> None:
        self.data = b""
        self.closed: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: object = None) -> None:
        self.closed.callback(None)


def make_certificate(directory: str) -> tuple[str, str]:
    """A self-signed certificate for 127.0.0.1 and its key, as PEM files."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
    with open(cert_path, "wb") as handle:
        handle.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(key_path, "wb") as handle:
        handle.write(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    return cert_path, key_path


def serve_http(case: unittest.TestCase, handler: Any) -> str:
    """Serve `handler` (a BaseHTTPRequestHandler factory) on a new loopback
    origin from a thread, until `case` ends: a page a browser under test
    loads while the test blocks on it. Returns the origin."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    case.addCleanup(thread.join, 5)
    case.addCleanup(server.server_close)
    case.addCleanup(server.shutdown)
    return f"http://127.0.0.1:{server.server_address[1]}"
