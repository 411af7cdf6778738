"""End to end: `--workers 2` shares the port between two worker processes,
restarts a dead worker, aggregates metrics, and drains both on SIGTERM;
SIGHUP never stops the server, with or without workers."""

from __future__ import annotations

import http.client
import json
import os
import signal

from twisted.internet.defer import inlineCallbacks
from twisted.trial import unittest

from estat.workers.child import MODULE
from tests.support import EstatServer, make_workdir, poll_until, read_objects


def worker_pids(server: EstatServer) -> dict[int, int]:
    """Worker index -> pid, from the children of the twistd process."""
    pids = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                argv = handle.read().split(b"\0")
            with open(f"/proc/{pid}/stat") as handle:
                parent = int(handle.read().rsplit(")", 1)[1].split()[1])
        except OSError:
            continue
        if parent == server.proc.process.pid and MODULE.encode() in argv:
            pids[int(argv[argv.index(MODULE.encode()) + 1])] = int(pid)
    return pids


class WorkersEndToEnd(unittest.TestCase):
    timeout = 120

    @inlineCallbacks
    def test_two_workers_share_the_port_restart_and_drain(self):
        workdir = make_workdir(self)
        server = EstatServer(workdir, env={"WORKERS": "2", "FLUSH_INTERVAL": "60",
                                           "BATCH_SIZE": "100000"})
        yield server.start()
        self.addCleanup(lambda: server.proc.kill())
        pids = yield poll_until(lambda: len(worker_pids(server)) == 2 and worker_pids(server),
                                20, what="two workers")
        os.kill(pids[0], signal.SIGKILL)
        yield poll_until(lambda: server.metrics().get("estat_worker_restarts_total") == 1
                         and len(worker_pids(server)) == 2, 20, what="worker 0 restarted")
        yield poll_until(lambda: server.metrics().get('estat_ready{worker="0"}') == 1, 20,
                         what="worker 0 ready again")
        pids = worker_pids(server)
        sent = 0

        def post_events(count: int) -> None:
            nonlocal sent
            for _ in range(count // 5):
                connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
                for _ in range(5):
                    connection.request("POST", "/collect", body=json.dumps({"id": sent}),
                                       headers={"Content-Type": "application/json"})
                    response = connection.getresponse()
                    response.read()
                    self.assertEqual(response.status, 202)
                    sent += 1
                connection.close()

        # Which process accepts a connection on a shared socket is up to the
        # kernel; pausing one worker makes the other take them all, which
        # shows each really serves the port.
        for paused, serving in ((1, 0), (0, 1)):
            os.kill(pids[paused], signal.SIGSTOP)
            try:
                post_events(50)
            finally:
                os.kill(pids[paused], signal.SIGCONT)
        metrics = server.metrics()
        per_worker = [metrics.get(f'estat_events_accepted_total{{worker="{i}"}}', 0)
                      for i in (0, 1)]
        self.assertEqual(per_worker, [50, 50], metrics)
        code = yield server.stop()
        self.assertIn(code, (0, -15), server.output())
        objects = read_objects(os.path.join(workdir, "objects"))
        ids = sorted(line["body"]["id"] for _, lines in objects for line in lines)
        self.assertEqual(ids, list(range(sent)))
        self.assertEqual({key.rsplit("/", 1)[1].split("-")[-2] for key, _ in objects},
                         {"w0", "w1"})
        self.assertEqual(sorted(os.listdir(os.path.join(workdir, "dlq"))), ["w0", "w1"])


class SighupTests(unittest.TestCase):
    """SIGHUP (systemctl reload) must never stop the server."""

    timeout = 60

    @inlineCallbacks
    def check_survives_sighup(self, env, expected_log):
        workdir = make_workdir(self)
        server = EstatServer(workdir, env={"FLUSH_INTERVAL": "0.2", **env})
        yield server.start()
        self.addCleanup(lambda: server.proc.kill())
        server.proc.signal(signal.SIGHUP)
        yield poll_until(lambda: expected_log in server.output() or not server.proc.running(),
                         10, what="the SIGHUP to be handled")
        self.assertTrue(server.proc.running(), server.output())
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        connection.request("POST", "/collect", body=b'{"after":"hup"}',
                           headers={"Content-Type": "application/json"})
        self.assertEqual(connection.getresponse().status, 202)
        connection.close()
        code = yield server.stop()
        self.assertIn(code, (0, -15), server.output())
        lines = [line for _, lines in read_objects(os.path.join(workdir, "objects"))
                 for line in lines]
        self.assertEqual([line["body"] for line in lines], [{"after": "hup"}])

    def test_single_process_without_keys(self):
        return self.check_survives_sighup({}, "nothing to reload")

    def test_workers_forward_it(self):
        return self.check_survives_sighup({"WORKERS": "2"}, "nothing to reload")
