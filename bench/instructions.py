"""Instructions per request of estat's request path, and per event of its
encoder, counted by valgrind's callgrind: a count that does not move with
whatever else the machine runs, unlike the CPU seconds `run.py` measures, so
that a change to the request path can be judged in one run on a shared,
noisy machine.

```sh
.venv/bin/python bench/instructions.py                  # single and batch bodies
.venv/bin/python bench/instructions.py -s single,batch,chunk1k,chunk13k
```

For each body (those of `run.py`'s scenarios), three counts, each in a
fresh process under callgrind, in this tree:

- `floor`: the `baseline-httptools` protocol (bench/baseline_server.py)
  answering the request, through an in-memory transport;
- `estat`: estat's listener as `service.build` wires it (channel, routes,
  validation, admission, queue, counters, answer), through the same kind of
  transport, the queue drained now and then as the batcher would;
- `encode`: `codec.encode_batch` of batches of the chunks those requests
  queued (at most BATCH_SIZE events each), per event (a run that also
  encodes, less the `estat` run).

Each is the difference between a run of many requests and one of fewer,
divided by the requests (or events) between them, so that start-up is not
counted. Left out, because callgrind counts the process's own instructions
only and runs one thread at a time: the system calls, the reactor's
dispatch, the GIL's hand-offs and the store's writes; `run.py` measures
those (and this does not replace it). callgrind runs the code about 50
times slower: the default bodies take about three and a half minutes.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from typing import Any

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(BENCH_DIR)
# Requests per run, fewer and more: their difference is what is counted.
RUNS = {"single": (1000, 4000), "batch": (100, 400), "chunk1k": (10, 40),
        "chunk13k": (2, 6)}
BATCH_SIZE = 10_000  # the default BATCH_SIZE
_COLLECTED = re.compile(r"Collected : (\d+)")


def _request(kind: str) -> tuple[bytes, int]:
    """The whole HTTP request of `kind`'s body, and its events."""
    sys.path.insert(0, BENCH_DIR)
    from run import body_for  # noqa: E402  (bench/run.py, next to this file)

    body = body_for(kind)
    head = [b"POST /collect HTTP/1.1", b"Host: 127.0.0.1:8080",
            b"Content-Length: %d" % len(body.data),
            b"Content-Type: %s" % body.content_type.encode()]
    if body.encoding:
        head.append(b"Content-Encoding: %s" % body.encoding.encode())
    return b"\r\n".join(head) + b"\r\n\r\n" + body.data, body.events


class _Transport:
    """Takes the answers and drops them."""

    def write(self, data: bytes) -> None:
        self.last = data

    def getPeer(self) -> None:
        return None

    def loseConnection(self) -> None:
        pass


def child(mode: str, kind: str, count: int) -> None:
    """Send `count` requests of `kind` (and, for `encode`, encode what they
    queued), in this process: what callgrind counts."""
    sys.path.insert(0, BENCH_DIR)
    sys.path.insert(0, REPO_ROOT)
    import baseline_server  # noqa: E402  (installs the reactor twistd uses)
    from httptools import HttpRequestParser  # noqa: E402
    from twisted.internet import reactor  # noqa: E402

    from estat.codec import encode_batch  # noqa: E402
    from estat.config import Settings  # noqa: E402
    from estat.model import Batch  # noqa: E402
    from estat.service import build, settle_garbage_collector  # noqa: E402

    request, events = _request(kind)
    workdir = tempfile.mkdtemp(prefix="estat-instructions-")
    parts = build(Settings(output_dir=os.path.join(workdir, "objects"),
                           dlq_dir=os.path.join(workdir, "dlq"),
                           event_queue_size=10 ** 8, event_queue_max_bytes=10 ** 12),
                  reactor)  # type: ignore[arg-type]
    settle_garbage_collector()
    protocol: Any
    if mode == "floor":
        protocol = baseline_server.AcceptProtocol()
        protocol.parser = HttpRequestParser(protocol)
    else:
        protocol = parts.listener.buildProtocol(None)
    protocol.transport = _Transport()
    queue = parts.queue
    drain_every = max(1, BATCH_SIZE // events)
    taken = []
    for number in range(1, count + 1):
        protocol.dataReceived(request)
        if number % drain_every == 0:
            taken.extend(queue.take(BATCH_SIZE, 10 ** 12))
    taken.extend(queue.take(10 ** 8, 10 ** 12))
    if mode != "floor" and not protocol.transport.last.startswith(b"HTTP/1.1 202"):
        raise SystemExit(f"estat did not accept the {kind} body: {protocol.transport.last!r}")
    if mode == "encode":
        chunks = taken
        for start in range(0, len(chunks), drain_every):
            part = chunks[start:start + drain_every]
            encode_batch(Batch(part, sum(chunk.size for chunk in part), "X", "size"),
                         validated=True, prefix="p", raw_prefix="r", host_id="h")


def _instructions(mode: str, kind: str, count: int) -> int:
    """What callgrind counts for one child run."""
    argv = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
            sys.executable, os.path.abspath(__file__), "--child", mode, kind, str(count)]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    found = _COLLECTED.search(done.stderr)
    if done.returncode != 0 or found is None:
        raise SystemExit(f"callgrind failed ({mode} {kind} {count}):\n{done.stderr[-2000:]}")
    return int(found.group(1))


def per_request(mode: str, kind: str) -> float:
    """Instructions per request of a child run (for `encode`, the request
    and the encoding of its events)."""
    fewer, more = RUNS[kind]
    return (_instructions(mode, kind, more) - _instructions(mode, kind, fewer)) / (more - fewer)


def main(argv: list[str]) -> int:
    if argv[:1] == ["--child"]:
        child(argv[1], argv[2], int(argv[3]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-s", "--scenarios", default="single,batch",
                        help="comma-separated bodies: " + ", ".join(RUNS))
    opts = parser.parse_args(argv)
    kinds = [kind.strip() for kind in opts.scenarios.split(",") if kind.strip()]
    unknown = [kind for kind in kinds if kind not in RUNS]
    if unknown:
        parser.error(f"unknown bodies: {', '.join(unknown)} (known: {', '.join(RUNS)})")
    if subprocess.run(["valgrind", "--version"], capture_output=True).returncode != 0:
        raise SystemExit("valgrind is needed: apt-get install -y valgrind")
    print("| body | floor instr/req | estat instr/req | × floor | estat instr/event "
          "(request path) | encode instr/event |")
    print("|---|---|---|---|---|---|")
    for kind in kinds:
        events = _request(kind)[1]
        floor = per_request("floor", kind)
        estat = per_request("estat", kind)
        encode = (per_request("encode", kind) - estat) / events
        print(f"| {kind} | {floor:,.0f} | {estat:,.0f} | {estat / floor:.2f} | "
              f"{(estat - floor) / events:,.0f} | {encode:,.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
