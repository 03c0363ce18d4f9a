"""Fault matrix row 4: the link between two test hosts (network namespaces joined by a veth
pair) goes down while a batch crosses it, and comes back.

Nothing tells either end that the link went: no reset, no close; only the transfer deadline
ends the batch. Once the link is up, new connections carry transfers again."""

from __future__ import annotations

import time

import pytest

import memfabric_hybrid as mf
from memfabric_hybrid import _netns
from _faults import SLACK, Target
import _fault_workers

REASON = _netns.unavailable_reason()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"network namespaces unavailable: {REASON}")

SIZE = 64 << 20
TIMEOUT = 2.0
# Regions of the target: timed-out writes of the first test go to the first quarter, verified
# ones to the second half, so that the first test holds whatever the second one finds.
FAILING = (0, SIZE // 4)
CHECKED = (SIZE // 2, SIZE // 2)


class Hosts:
    """An initiator in host A (with the config store) and a target in host B."""

    def __init__(self, spawn, hosts) -> None:
        self.hosts = hosts
        self.ci, child = spawn.Pipe()
        self.pi = spawn.Process(target=_netns.run_in, args=(hosts.a, _fault_workers.netns_initiator,
                                                             hosts.ip_a, SIZE, TIMEOUT, child))
        self.pi.start()
        self.target = None
        assert self.ci.poll(60)
        url = self.ci.recv()
        self.target = Target(spawn, url, SIZE, session=f"{hosts.ip_b}:0", env={"MF_TRANSPORT": "tcp"},
                             ns=hosts.b)
        self.ci.send((self.target.session, self.target.addr))
        assert self.ci.poll(60)
        assert self.ci.recv() == ("ready", "tcp")
        self.down = False

    def ask(self, *cmd, timeout: float = 60):
        self.ci.send(cmd)
        assert self.ci.poll(timeout), f"initiator did not answer {cmd[0]}"
        return self.ci.recv()

    def link(self, up: bool) -> None:
        self.hosts.link(up)
        self.down = not up

    def close(self) -> None:
        if self.down:
            self.link(True)
        if self.pi.is_alive():
            try:
                assert self.ask("stop", timeout=30) == "stopped"
            except (AssertionError, BrokenPipeError, EOFError):
                self.pi.kill()
        self.pi.join(30)
        if self.target is not None:
            self.target.stop()


@pytest.fixture(scope="module")
def two_hosts():
    import multiprocessing as mp

    with _netns.TwoHosts(net=214) as hosts:
        h = Hosts(mp.get_context("spawn"), hosts)
        try:
            yield h
        finally:
            h.close()
    assert h.pi.exitcode == 0 and h.target.proc.exitcode == 0


def test_link_cut_during_a_batch(two_hosts):
    h = two_hosts
    rc, took, msg, digest, read_ok, guards, _, _ = h.ask("write", 41, *CHECKED, 0)
    assert rc == 0 and read_ok and guards, msg
    assert h.target.hash(*CHECKED) == digest

    h.ci.send(("loop", 40, *FAILING))
    for _ in range(2):
        assert h.ci.poll(30)
        _, t0, t1, rc, msg = h.ci.recv()
        assert rc == 0, msg
    try:
        h.link(False)
        cut_at = time.monotonic()
        while True:
            assert h.ci.poll(TIMEOUT * 2 + 10), "the batch did not end after the link went down"
            _, t0, t1, rc, msg = h.ci.recv()
            if rc != 0:
                break
        # Started before or after the cut, the batch in flight ends at its deadline, not before.
        assert rc == mf.SMEM_TIMEOUT, (rc, msg)
        assert TIMEOUT - 0.1 < t1 - t0 < TIMEOUT + SLACK, (t1 - t0, msg)
        assert t1 - cut_at < TIMEOUT + SLACK
        batch = (rc, t1 - t0)

        # A call made while the link is still down is bounded too: a pooled connection stalls
        # until the deadline; a new one is refused by the kernel at once (no route).
        rc, took, msg, _, _, guards, _, _ = h.ask("write", 42, *FAILING, 0)
        assert rc == mf.SMEM_TIMEOUT or (rc == mf.MF_IO and "unreachable" in msg), (rc, msg)
        assert took < TIMEOUT + SLACK, (took, msg)
        assert guards
        down_call = (rc, took)
        # Long enough for the store to drop the target's session (keepalive: 2 s idle, then
        # 3 probes 1 s apart): once the link is back the target must publish itself again.
        time.sleep(max(0.0, cut_at + 6.0 - time.monotonic()))
    finally:
        h.link(True)
    up_at = time.monotonic()
    # The store dropped the target's session during the outage; the target, which makes no
    # store call of its own, publishes itself again once the link is back.
    back_in = h.ask("record", 5.0)
    assert back_in is not None, "the target's record did not come back after the partition"
    # The first tries may find the target unknown (its records were dropped with its session)
    # until its keeper notices and publishes them again.
    rc, took, msg, digest, read_ok, guards, tries, until = h.ask("write", 43, *CHECKED, 10.0)
    assert rc == 0 and read_ok and guards, (rc, msg)
    assert until < 5.0, until
    assert h.target.hash(*CHECKED) == digest
    assert h.target.guards_ok()
    assert h.pi.is_alive() and h.target.proc.is_alive()
    print(f"\n[row 4] batch in flight at the cut: rc={batch[0]} after {batch[1]:.2f}s; "
          f"call while down rc={down_call[0]} in {down_call[1]:.2f}s; link down {up_at - cut_at:.1f}s; "
          f"target's record back {back_in:.2f}s after link up; then verified in {until:.2f}s ({tries} tries)")


def test_timed_out_write_never_lands_over_a_newer_one(two_hosts):
    """The bytes a timed-out write left in its socket send queues must be discarded with the
    connections it gave up on, not retransmitted once the link is back and applied by the peer
    over what a newer, acknowledged write put there."""
    h = two_hosts
    off, n = CHECKED
    rc, *_ = h.ask("write", 50, off, n, 0)
    assert rc == 0
    h.link(False)
    try:
        rc, took, msg, *_ = h.ask("write", 51, off, n, 0)
        assert rc == mf.SMEM_TIMEOUT, (rc, msg)
    finally:
        h.link(True)
    rc, took, msg, digest, read_ok, *_ = h.ask("write", 52, off, n, 10.0)
    assert rc == 0 and read_ok, msg
    # Retransmission backs off to a few seconds after an outage this long; watch that long.
    end = time.monotonic() + 6
    while time.monotonic() < end:
        assert h.target.hash(off, n) == digest, "bytes of the timed-out write replaced newer ones"
        time.sleep(0.25)
