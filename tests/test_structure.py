"""
The package's shape, as `.ci/structure.py` checks it: no module over 500
lines, no import cycle, no private Twisted name, no private name of ours
imported across modules, no stale test-case-name header.
"""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_structure_script_finds_nothing() -> None:
    result = subprocess.run([sys.executable, ".ci/structure.py"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
