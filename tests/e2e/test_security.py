"""End to end: TLS with a certificate made in the test, write keys, and a
key rotation by SIGHUP on a connection that stays open."""

from __future__ import annotations

import http.client
import json
import os
import signal
import ssl

from twisted.internet.defer import inlineCallbacks
from twisted.trial import unittest

from tests.support import EstatServer, make_certificate, make_workdir, poll_until

OLD_KEY = "old-key-0123456789abcdef"
NEW_KEY = "new-key-0123456789abcdef"


class SecurityEndToEnd(unittest.TestCase):
    timeout = 120

    @inlineCallbacks
    def test_tls_write_keys_and_rotation_by_sighup(self):
        workdir = make_workdir(self)
        cert, key = make_certificate(workdir)
        tokens = os.path.join(workdir, "tokens")
        with open(tokens, "w") as handle:
            handle.write(f"{OLD_KEY} web source=web\n")
        server = EstatServer(workdir, env={"AUTH_TOKENS_FILE": tokens, "FLUSH_INTERVAL": "0.2"})
        server.extra_env["LISTEN"] = (f"ssl:{server.port}:interface=127.0.0.1:"
                                      f"privateKey={key}:certKey={cert}")
        yield server.start()
        self.addCleanup(lambda: server.proc.kill())
        context = ssl.create_default_context(cafile=cert)
        connection = http.client.HTTPSConnection("127.0.0.1", server.port, context=context,
                                                 timeout=10)
        self.addCleanup(connection.close)

        def post(key=None):
            headers = {"Content-Type": "application/json"}
            if key:
                headers["Authorization"] = f"Bearer {key}"
            connection.request("POST", "/collect", body=b'{"e":1}', headers=headers)
            response = connection.getresponse()
            return response.status, json.loads(response.read())

        self.assertEqual(post(OLD_KEY), (202, {"status": "accepted"}))
        code, answer = post()
        self.assertEqual((code, answer["error"], answer["detail"]),
                         (401, "unauthorized", "missing_key"))
        self.assertEqual(post(NEW_KEY)[0], 401)
        with open(tokens, "w") as handle:
            handle.write(f"{NEW_KEY} web source=web\n")
        server.proc.signal(signal.SIGHUP)
        yield poll_until(lambda: post(NEW_KEY)[0] == 202, 10, what="the new key to work")
        self.assertEqual(post(OLD_KEY)[0], 401)
        self.assertIn("reloaded 1 write keys", server.output())
        self.assertNotIn(NEW_KEY, server.output())
        self.assertNotIn(OLD_KEY, server.output())
        code = yield server.stop()
        self.assertIn(code, (0, -15), server.output())
        objects = os.path.join(workdir, "objects", "raw", "source=web")
        self.assertTrue(os.path.isdir(objects), "objects of a keyed writer go under its segment")
