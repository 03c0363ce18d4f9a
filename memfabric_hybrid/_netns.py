"""Test hosts in network namespaces: two namespaces joined by a veth pair (tests, benchmarks).

The namespaces, the veth pair and the addresses are created by the caller and removed after.
Processes enter a namespace with setns(2) at the start of a spawned child, before anything
opens a socket.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import uuid

CLONE_NEWNET = 0x40000000


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=20)


def unavailable_reason() -> str | None:
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is not installed"
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    probe = f"mfprobe{uuid.uuid4().hex[:6]}"
    try:
        _ip("netns", "add", probe)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        err = getattr(e, "stderr", b"") or b""
        return f"ip netns add failed here: {err.decode(errors='replace').strip()}"
    _ip("netns", "del", probe)
    return None


class TwoHosts:
    """Namespaces `a` and `b` with addresses `ip_a`, `ip_b` on one veth link.

    `net`: the second octet of the 10.x.y.0/30 link, so tests and benchmarks running at the
    same time use different subnets; the namespaces are our own and reach nothing else."""

    def __init__(self, net: int = 213) -> None:
        tag = uuid.uuid4().hex[:6]
        self.a, self.b = f"mfa{tag}", f"mfb{tag}"
        self.veth_a, self.veth_b = f"va{tag}", f"vb{tag}"
        octet = int(tag[:2], 16)
        self.ip_a, self.ip_b = f"10.{net}.{octet}.1", f"10.{net}.{octet}.2"
        self.created: list[str] = []

    def __enter__(self) -> "TwoHosts":
        try:
            for ns in (self.a, self.b):
                _ip("netns", "add", ns)
                self.created.append(ns)
                _ip("-n", ns, "link", "set", "lo", "up")
            _ip("link", "add", self.veth_a, "netns", self.a, "type", "veth", "peer", "name", self.veth_b, "netns", self.b)
            _ip("-n", self.a, "addr", "add", f"{self.ip_a}/30", "dev", self.veth_a)
            _ip("-n", self.b, "addr", "add", f"{self.ip_b}/30", "dev", self.veth_b)
            _ip("-n", self.a, "link", "set", self.veth_a, "up")
            _ip("-n", self.b, "link", "set", self.veth_b, "up")
        except Exception:
            self.__exit__(None, None, None)
            raise
        return self

    def link(self, up: bool) -> None:
        _ip("-n", self.a, "link", "set", self.veth_a, "up" if up else "down")

    def __exit__(self, *exc) -> None:
        for ns in self.created:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20)
        self.created.clear()


def enter(ns: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/var/run/netns/{ns}", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {ns} failed")
    finally:
        os.close(fd)


def run_in(ns: str, fn, *args) -> None:
    """Target of a spawned Process: enter `ns`, then call fn(*args)."""
    enter(ns)
    fn(*args)
