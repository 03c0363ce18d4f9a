"""The examples run as they are and print what they did."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def has_torch() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


KV = ["kv_transfer_prefill_decode.py", "--layers", "2", "--blocks", "64", "--request-blocks", "16", "--requests", "6"]


HBM = "from rank 0's HBM part into its own, verified"


@pytest.mark.parametrize("script,expect,env", [
    (["demo.py"], "all ranks agree", {}),
    (["bm_two_ranks.py"], "hello from rank 0", {}),
    (["bm_hbm_parts.py"], HBM, {}),
    (["bm_hbm_parts.py"], HBM, {"MF_TRANSPORT": "tcp"}),
    (["shm_barrier_allgather.py"], "all_gather -> [0, 1, 2, 3]", {}),
    (KV, "decode verified 96 blocks bit for bit", {}),
    (KV + ["--transport", "tcp"], "over tcp; decode verified 96 blocks bit for bit", {}),
], ids=["demo", "bm", "bm-hbm", "bm-hbm-tcp", "shm", "kv", "kv-tcp"])
def test_example_runs(script, expect, env):
    if script[0].startswith("kv_") and not has_torch():
        pytest.skip("the KV-cache example needs torch, which is not installed")
    cmd = [sys.executable, os.path.join(ROOT, "examples", script[0])] + script[1:]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=150, env=dict(os.environ, **env))
    assert r.returncode == 0, r.stderr[-2000:]
    assert expect in r.stdout
