"""What the C libraries alone cost per event for a scenario's body, timed in
this process on one core: inflating the request (isal), validating its lines
(one msgspec decode of the text), gzip'ing the object's text at estat's level (isal) and
inflating it again to verify it. estat's per-event cost can be no lower than
their sum, so the bench prints it beside the measured figure (same run,
same machine). run.py imports it with the repository root on sys.path, so
that it times the estat of the tree being measured.

Each step is timed as the best of several repeats, the figure least
disturbed by whatever else the machine runs."""

from __future__ import annotations

import time
from typing import Callable

from isal import isal_zlib

from estat import codec
from estat.validate import lines_are_objects

REPEATS = 7


def _best(step: Callable[[], object], events: int) -> float:
    """The fastest of REPEATS runs of `step`, in µs per event."""
    step()
    times = []
    for _ in range(REPEATS):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    return min(times) / events * 1e6


def costs(data: bytes, encoding: str) -> dict[str, float]:
    """µs per event of each step for one request body (NDJSON, gzip'd when
    `encoding` says so)."""
    text = isal_zlib.decompress(data, codec.GZIP_WBITS) if encoding == "gzip" else data
    lines = text.split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    events = len(lines)
    framed = b"".join([codec.event_line(1_700_000_000_000, line) for line in lines])
    gzipped, size = codec._gzip_texts([framed])
    found = {
        "inflate": (_best(lambda: isal_zlib.decompress(data, codec.GZIP_WBITS), events)
                    if encoding == "gzip" else 0.0),
        "validate": _best(lambda: lines_are_objects(text, events, len(text)), events),
        "gzip": _best(lambda: codec._gzip_texts([framed]), events),
        "verify": _best(lambda: codec.verify_gzip(gzipped, size), events),
    }
    found["sum"] = sum(found.values())
    return found


def note(data: bytes, encoding: str) -> str:
    found = costs(data, encoding)
    parts = ", ".join(f"{name} {value:.2f}" for name, value in found.items() if name != "sum")
    return (f"the C libraries alone, one core: {found['sum']:.2f} µs/event "
            f"({parts})")
