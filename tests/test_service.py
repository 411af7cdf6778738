"""Service-level details that need no running server."""

from __future__ import annotations

import os
import sys
import threading

from twisted.trial import unittest

from estat.service import ENCODE_NICENESS, _lower_this_threads_priority


class EncoderPriorityTests(unittest.TestCase):
    def test_an_encoding_thread_is_reniced_once_and_alone(self):
        if not sys.platform.startswith("linux"):
            raise unittest.SkipTest("per-thread niceness is Linux's")
        process = os.getpriority(os.PRIO_PROCESS, 0)
        seen = []

        def encoder() -> None:
            _lower_this_threads_priority()
            _lower_this_threads_priority()  # a second batch on the same thread
            seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))

        thread = threading.Thread(target=encoder)
        thread.start()
        thread.join()
        self.assertEqual(seen, [min(19, process + ENCODE_NICENESS)])
        self.assertEqual(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()), process)

    def test_a_filter_that_refuses_setpriority_is_said_once(self):
        import estat.service

        if not sys.platform.startswith("linux"):
            raise unittest.SkipTest("per-thread niceness is Linux's")

        said = []

        class Log:
            def info(self, message: str, **fields: object) -> None:
                said.append(fields["error"])

        def refused(*args: object) -> None:
            raise PermissionError(1, "Operation not permitted")

        self.patch(estat.service, "_log", Log())
        self.patch(estat.service, "_reniced_failed", [])
        self.patch(os, "setpriority", refused)
        threads = [threading.Thread(target=_lower_this_threads_priority) for _ in range(3)]
        for thread in threads:
            thread.start()
            thread.join()
        self.assertEqual(len(said), 1)
        self.assertIsInstance(said[0], PermissionError)
