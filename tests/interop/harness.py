"""What every interop case shares: an `estat-ingest` subprocess on loopback
(plain and, on request, TLS with a certificate made for the test), reading
back exactly what it stored after a clean stop, and finding the outside
clients (binaries, optional packages) or skipping with the reason."""

from __future__ import annotations

import collections
import json
import os
import shutil
import subprocess
from typing import Any, Iterable, Optional

from twisted.internet.defer import inlineCallbacks
from twisted.trial import unittest

from tests.support import EstatServer, free_port, make_certificate, make_workdir, read_objects

# Each client call is bounded; a hung client fails its case instead of the run.
CLIENT_TIMEOUT = 60.0


def require_binary(path: str, package: str) -> str:
    """`path` when it is an executable, else skip naming the Debian package."""
    if not os.access(path, os.X_OK):
        raise unittest.SkipTest(f"{path} is not installed (apt-get install -y {package})")
    return path


def require_module(name: str, extra: str = "test") -> Any:
    """Import `name`, else skip naming the extra that installs it."""
    try:
        return __import__(name)
    except ImportError as error:
        raise unittest.SkipTest(f"python package {name!r} is missing ({error}); "
                                f"install the '{extra}' extra: pip install '.[{extra}]'")


def run(argv: list[str], timeout: float = CLIENT_TIMEOUT, **kwargs: Any) -> subprocess.CompletedProcess:
    """Run an outside client to completion, bounded in time, capturing output."""
    return subprocess.run(argv, capture_output=True, timeout=timeout, check=False, **kwargs)


class Estat:
    """One `twistd -n estat-ingest` for a case: `url` is plain HTTP and,
    with `tls=True`, `tls_url` is an `ssl:` listener with a self-signed
    certificate (`cert` is its PEM, for clients to trust)."""

    def __init__(self, case: unittest.TestCase, env: Optional[dict[str, str]] = None,
                 tls: bool = False) -> None:
        self.workdir = make_workdir(case)
        self.server = EstatServer(self.workdir, env=dict(env or {}))
        self.url = self.server.url
        self.output_dir = self.server.environment()["OUTPUT_DIR"]
        self.cert = self.key = ""
        self.tls_port = 0
        self.tls_url = ""
        if tls:
            self.cert, self.key = make_certificate(self.workdir)
            self.tls_port = free_port()
            self.tls_url = f"https://127.0.0.1:{self.tls_port}"
            self.server.extra_env["LISTEN"] = (
                f"tcp:{self.server.port}:interface=127.0.0.1,"
                f"ssl:{self.tls_port}:interface=127.0.0.1:"
                f"privateKey={self.key}:certKey={self.cert}")
        self._case = case
        self._stopped = False

    @inlineCallbacks
    def start(self):  # type: ignore[no-untyped-def]
        yield self.server.start()
        self._case.addCleanup(self._kill)
        return self

    def _kill(self) -> None:
        if self.server.proc is not None:
            self.server.proc.kill()

    @inlineCallbacks
    def stop(self):  # type: ignore[no-untyped-def]
        """SIGTERM and wait, so the open batch and every upload are written."""
        if not self._stopped:
            self._stopped = True
            code = yield self.server.stop()
            self._case.assertIn(code, (0, -15), self.server.output())

    @inlineCallbacks
    def stored(self):  # type: ignore[no-untyped-def]
        """Stop, then every stored line (`{"ts":…, "body":…}`) of the local store."""
        yield self.stop()
        return [line for _, lines in read_objects(self.output_dir) for line in lines]

    def object_keys(self) -> list[str]:
        return [key for key, _ in read_objects(self.output_dir)]


def ids_of(lines: Iterable[dict[str, Any]], field: str = "id") -> collections.Counter:
    """How many times each event id was stored."""
    return collections.Counter(
        line["body"].get(field) if isinstance(line.get("body"), dict) else None
        for line in lines)


def assert_stored_once(case: unittest.TestCase, lines: list[dict[str, Any]],
                       expected: Iterable[str], field: str = "id") -> None:
    """Exactly the `expected` ids are stored, each exactly once."""
    counts = ids_of(lines, field)
    expected = sorted(expected)
    twice = sorted(str(i) for i, n in counts.items() if n > 1)
    missing = sorted(set(expected) - set(counts))
    extra = sorted(str(i) for i in set(counts) - set(expected))
    case.assertEqual(
        (len(missing), missing[:5], extra[:5], twice[:5]), (0, [], [], []),
        f"stored {sum(counts.values())} lines; expected {len(expected)} ids once each "
        "(missing count, first missing, first unexpected, first repeated)")


def answer_of(body: bytes) -> str:
    """An answer body for a failure message: JSON when it is, else the bytes."""
    try:
        return json.dumps(json.loads(body))
    except ValueError:
        return repr(body[:300])


def which(name: str) -> Optional[str]:
    return shutil.which(name)
