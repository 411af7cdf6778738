"""A worker process of `--workers N`: the whole pipeline (queue, batcher,
uploader, dead-letter queue) on listening sockets inherited from the
parent, with the parent-given settings.

    python -m estat.workers.child INDEX FD:FAMILY[,FD:FAMILY...]

The parent passes its settings, as JSON, in the environment variable
SETTINGS_ENV (the settings of this worker: see `worker_settings` in the
supervisor), and each listening socket as a file descriptor with its
address family.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Any, Sequence

from twisted.internet.interfaces import IReactorCore
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from estat.config import Settings

_log = Logger()

SETTINGS_ENV = "ESTAT_WORKER_SETTINGS"
MODULE = "estat.workers.child"


def encode_settings(settings: Settings) -> str:
    """`settings` as the JSON text of SETTINGS_ENV."""
    payload = dataclasses.asdict(settings)
    payload["listen"] = list(settings.listen)
    return json.dumps(payload)


def decode_settings(text: str) -> Settings:
    """The `Settings` that `encode_settings` gave `text` for."""
    payload = json.loads(text)
    payload["listen"] = tuple(payload["listen"])
    return Settings(**payload)


def worker_argv(index: int, ports: Sequence[tuple[int, int]]) -> list[str]:
    """The command line of worker `index`, given its inherited (fd, family)
    listening sockets."""
    return [sys.executable, "-m", MODULE, str(index),
            ",".join(f"{fd}:{family}" for fd, family in ports)]


def parse_ports(text: str) -> list[tuple[int, int]]:
    """The (fd, family) pairs of `worker_argv`'s last argument."""
    return [(int(fd), int(family)) for fd, family in
            (item.split(":") for item in text.split(",") if item)]


class ParentWatch(Protocol):
    """Stops the worker when its stdin closes.

    A worker's stdin is the read end of a pipe whose write end only the
    parent holds, and never writes to. The kernel closes that end when the
    parent exits in any way, SIGKILL and crashes included (when it cannot
    signal anyone), so end-of-file on stdin is the one sure sign that the
    parent is gone, and a worker never outlives it holding the port."""

    def __init__(self, index: int, reactor: IReactorCore) -> None:
        self.index = index
        self.reactor = reactor

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.reactor.running:
            _log.warn("worker {index}: the parent went away; stopping", index=self.index)
            self.reactor.stop()


def run_worker(index: int, ports: str) -> None:
    """A worker process: the full pipeline on the inherited sockets, started
    as twistd starts a service (so a start failure ends the process, and the
    parent starts it again); stops on SIGTERM, or when the parent goes away."""
    from twisted.internet import reactor as _reactor
    from twisted.internet import stdio
    from twisted.logger import globalLogBeginner, textFileLogObserver

    # Imported here, not at the top: the parent imports this module for the
    # settings codec and has no use for the pipeline.
    from estat.service import IngestService, build

    reactor: Any = _reactor
    settings = decode_settings(os.environ.pop(SETTINGS_ENV))
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)],
                                     redirectStandardIO=False)
    service = IngestService(build(settings, reactor), own_signals=True,
                            inherited_ports=parse_ports(ports))
    stdio.StandardIO(ParentWatch(index, reactor), reactor=reactor)
    service.privilegedStartService()
    service.startService()
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    reactor.run()


if __name__ == "__main__":
    run_worker(int(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "")
