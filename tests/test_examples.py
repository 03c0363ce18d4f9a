"""The examples run as they are and print what they did."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("script,expect", [
    ("demo.py", "all ranks agree"),
    ("bm_two_ranks.py", "hello from rank 0"),
    ("shm_barrier_allgather.py", "all_gather -> [0, 1, 2, 3]"),
])
def test_example_runs(script, expect):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "examples", script)], capture_output=True, text=True, timeout=150)
    assert r.returncode == 0, r.stderr[-2000:]
    assert expect in r.stdout
