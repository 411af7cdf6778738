"""`estat/` stays mypy-clean (with the zope plugin), as the conventions ask."""

from __future__ import annotations

import os
import subprocess
import sys

from twisted.trial import unittest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class MypyTests(unittest.TestCase):

    def test_estat_is_mypy_clean(self) -> None:
        # Run from the repo root so mypy reads [tool.mypy] in pyproject.toml.
        result = subprocess.run([sys.executable, "-m", "mypy", "estat"], cwd=REPO_ROOT,
                                capture_output=True, text=True, timeout=600)
        self.assertEqual(result.returncode, 0,
                         f"mypy found problems in estat/:\n{result.stdout}{result.stderr}")
