"""Process signals during a stop, shared by the server and the parent of
`--workers N`."""

from __future__ import annotations

import signal
import threading

from twisted.logger import Logger

_log = Logger()


def ignore_further_signals(timeout: float) -> None:
    """Once a stop has begun, a second SIGTERM or SIGINT must not cut it
    short: log it instead (Twisted's own handler would only complain).
    Outside the main thread signals cannot be set, so this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        return

    def again(signum: int, frame: object) -> None:
        _log.warn("already stopping: waiting for uploads to finish or be dead-lettered "
                  "(at most SHUTDOWN_TIMEOUT={timeout}s)", timeout=timeout)

    for signum in (signal.SIGTERM, signal.SIGINT):
        try:
            signal.signal(signum, again)
        except (ValueError, OSError):
            pass
