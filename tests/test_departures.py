"""README.md says where the server departs from the design card, and why:
a reader of the card must find each departure explained."""

from __future__ import annotations

import os
import re

from twisted.trial import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_section(title: str) -> str:
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as handle:
        text = handle.read()
    match = re.search(r"^## " + re.escape(title) + r"\n(.*?)(?=^## |\Z)", text,
                      re.MULTILINE | re.DOTALL)
    if match is None:
        raise AssertionError(f"README.md has no section {title!r}")
    return match.group(1)


class DeparturesTests(unittest.TestCase):
    def test_each_departure_from_the_design_card_is_explained(self):
        section = readme_section("Departures from the design card")
        for needle in (
            "twisted.web", "httptools", "µs",  # the listener, with its figures
            "txaws", "ConfigParser",  # why not txaws
            "pytest-twisted", "trial",  # the test runner
            "DeferredQueue", "EventQueue", "offer", "take",  # the queue
        ):
            self.assertIn(needle, section)
