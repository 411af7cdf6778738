"""A JSON-lines log observer for operators: `twistd --logger
estat.logs.json_observer estat-ingest` writes one JSON object per line."""

from __future__ import annotations

import json
import sys
from datetime import datetime, timezone
from typing import IO, Any, Optional

from twisted.logger import ILogObserver, formatEvent
from zope.interface import implementer

_SKIP = {"log_format", "log_logger", "log_source", "log_io", "log_text", "log_flattened",
         "log_trace", "log_time", "log_level", "log_namespace", "log_failure",
         "log_system", "format", "message", "time", "system", "isError", "failure",
         "why", "printed"}


@implementer(ILogObserver)
class JSONLinesObserver:
    """Writes each log event as one JSON line: time, level, namespace, the
    formatted message, the named fields, and a traceback for failures."""

    def __init__(self, out: IO[str]) -> None:
        self.out = out

    def __call__(self, event: dict[str, Any]) -> None:
        level = event.get("log_level")
        record: dict[str, Any] = {
            "time": datetime.fromtimestamp(event.get("log_time", 0), timezone.utc)
            .isoformat(timespec="milliseconds"),
            "level": level.name if level is not None else "info",
            "namespace": event.get("log_namespace", ""),
            "message": formatEvent(event),
        }
        for key, value in event.items():
            if key in _SKIP or key.startswith("_"):
                continue
            record[key] = value if _is_json(value) else repr(value)
        failure = event.get("log_failure")
        if failure is not None:
            record["traceback"] = failure.getTraceback()
        self.out.write(json.dumps(record, default=repr) + "\n")
        self.out.flush()


def _is_json(value: Any) -> bool:
    return isinstance(value, (str, int, float, bool, type(None)))


def json_observer(out: Optional[IO[str]] = None) -> JSONLinesObserver:
    """The factory `twistd --logger` calls."""
    return JSONLinesObserver(out if out is not None else sys.stdout)
