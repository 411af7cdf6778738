"""Child processes for the benchmark: each in its own process group, all
registered so that `stop_all` ends every one of them (on error or Ctrl-C),
plus the /proc readings the table reports (CPU seconds, peak RSS), for one
process or for a process and its children (`--workers N`: the twistd
parent and its worker processes). Free ports and HTTP probes come from
tests/support.py, which the end-to-end tests drive their servers with."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from typing import Optional

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_STARTED: list["Child"] = []


def pinned(cpus: Optional[str]) -> list[str]:
    """The argv prefix that runs a command on `cpus` only (taskset), if any."""
    return ["taskset", "-c", cpus] if cpus else []


class Child:
    """A subprocess in its own session (so a terminal's Ctrl-C reaches only
    the harness, which then stops it), logging to a file."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], cwd: str,
                 log_path: str) -> None:
        self.name = name
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.process = subprocess.Popen(argv, env=env, cwd=cwd, stdout=self._log,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        self.pid = self.process.pid
        # True when something of the child's process group (a worker, say)
        # was still alive after the child itself exited and had to be killed.
        self.left_behind = False
        _STARTED.append(self)

    def running(self) -> bool:
        return self.process.poll() is None

    def output_tail(self, lines: int = 20) -> str:
        """The last lines the process wrote, for error messages."""
        self._log.flush()
        with open(self.log_path, "rb") as handle:
            text = handle.read().decode("utf-8", "replace")
        return "\n".join(text.splitlines()[-lines:])

    def terminate(self, timeout: float) -> Optional[int]:
        """SIGTERM the process and wait; SIGKILL its whole group if it does
        not exit in time. Returns the exit status (None if it was killed)."""
        if self.running():
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill_group()
                return None
        self._reap_group()
        self._log.close()
        if self in _STARTED:
            _STARTED.remove(self)
        return self.process.returncode

    def kill_group(self) -> None:
        """SIGKILL every process of the child's group and reap the child."""
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()
        self._log.close()
        if self in _STARTED:
            _STARTED.remove(self)

    def _reap_group(self) -> None:
        """Leftover grandchildren (if any) go with the group; `left_behind`
        records that there were some (killpg fails once the group is empty)."""
        try:
            os.killpg(self.pid, signal.SIGKILL)
            self.left_behind = True
        except (ProcessLookupError, PermissionError):
            pass


def stop_all(timeout: float = 5.0) -> None:
    """Stop every child still running: SIGTERM, then SIGKILL of its group."""
    for child in list(reversed(_STARTED)):
        child.terminate(timeout)


def wait_until(predicate, timeout: float, what: str, child: Optional[Child] = None,
               interval: float = 0.05) -> None:  # type: ignore[no-untyped-def]
    """Poll `predicate` until truthy; raise RuntimeError after `timeout`
    seconds or as soon as `child` exits."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if child is not None and not child.running():
            raise RuntimeError(f"{child.name} exited while waiting for {what}:\n"
                               + child.output_tail())
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def children(pid: int) -> list[int]:
    """The pids whose parent is `pid` (from the PPid line of /proc/*/status)."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/status") as handle:
                for line in handle:
                    if line.startswith("PPid:"):
                        if int(line.split()[1]) == pid:
                            found.append(int(name))
                        break
        except OSError:  # gone meanwhile
            continue
    return sorted(found)


def tree_cpu_seconds(pid: int) -> dict[int, float]:
    """{pid: utime + stime} of `pid` and of each of its children (the
    workers of `--workers N`); a process that exits meanwhile is left out."""
    readings = {}
    for each in [pid] + children(pid):
        try:
            readings[each] = cpu_seconds(each)
        except OSError:
            continue
    return readings


def tree_peak_rss_mib(pid: int) -> float:
    """VmHWM of `pid` plus that of each of its children, in MiB."""
    total = 0.0
    for each in [pid] + children(pid):
        try:
            total += peak_rss_mib(each)
        except OSError:
            continue
    return total


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rpartition(")")[2].split()
    # fields[0] is the state (field 3); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def peak_rss_mib(pid: int) -> float:
    """VmHWM (peak resident set size) of a process, in MiB."""
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")
