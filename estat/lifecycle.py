"""Where the server is in its life: starting, running, leaving, draining,
stopped.

One object, written by the service and read by the request path: `/readyz`
is 200 only while running; while leaving (the first step of a stop) the
server still serves `/collect` as before, so that a load balancer learns of
the stop from `/readyz` and takes the host out before its ports close;
`/collect` answers 503 and every connection closes after its answer once
draining has begun."""

from __future__ import annotations

from enum import Enum


class Phase(Enum):
    """The phases, in the only order they happen."""

    STARTING = "starting"
    RUNNING = "running"
    LEAVING = "leaving"  # unready, still serving: the balancer takes the host out
    DRAINING = "draining"
    STOPPED = "stopped"


class Lifecycle:
    """The server's phase. `running` and `stopping` are plain attributes
    kept in step with `phase`, so the per-request reads cost one lookup."""

    def __init__(self) -> None:
        self.phase = Phase.STARTING
        self.running = False  # accepting events: ready
        self.stopping = False  # draining or stopped: refuse events, close connections

    def __repr__(self) -> str:
        return f"<Lifecycle {self.phase.value}>"

    def start_running(self) -> None:
        """Every listener listens: accept events (unless a stop came first)."""
        if self.phase is Phase.STARTING:
            self._move(Phase.RUNNING)

    def start_leaving(self) -> None:
        """A stop has begun on a running server: unready, but still
        accepting events (from RUNNING only; otherwise a no-op)."""
        if self.phase is Phase.RUNNING:
            self._move(Phase.LEAVING)

    def start_draining(self) -> None:
        """A stop has begun: accept nothing new (from any earlier phase;
        again is a no-op)."""
        if not self.stopping:
            self._move(Phase.DRAINING)

    def stopped(self) -> None:
        """Everything accepted is stored or dead-lettered."""
        self._move(Phase.STOPPED)

    def _move(self, phase: Phase) -> None:
        self.phase = phase
        self.running = phase is Phase.RUNNING
        self.stopping = phase in (Phase.DRAINING, Phase.STOPPED)
