"""Shared fixtures: an embedded config store, free ports, spawn-based process helpers."""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

import memfabric_hybrid as mf  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def store():
    """A config store server in this process on a free port."""
    server = mf.start_config_store("tcp://127.0.0.1:0")
    yield server
    server.close()


@pytest.fixture
def spawn():
    """multiprocessing with the spawn start method (threads do not survive fork)."""
    return mp.get_context("spawn")
