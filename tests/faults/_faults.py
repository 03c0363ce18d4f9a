"""Shared pieces of the fault matrix: processes to kill, stop or starve, and the checks that
every row makes (bounded calls, typed errors, untouched guard bytes, survivors still working)."""

from __future__ import annotations

import hashlib
import mmap
import random
import socket
import subprocess
import sys
import time

import memfabric_hybrid as mf
import _te_target
from _te_target import buffer_address

# Slack on top of a call's own timeout: the machine has 2 cores shared by every process of a
# test, so a thread may wait a scheduler tick or two after its deadline before it runs.
SLACK = 1.0


def pattern(n: int, seed: int) -> bytes:
    block = random.Random(seed).randbytes(min(n, 1 << 20))
    return (block * (n // len(block) + 1))[:n]


def sha(data) -> str:
    return hashlib.sha256(data).hexdigest()


class Guarded:
    """Memory of this process with one guard page each side of the part that gets registered,
    so a test can tell that a transfer never wrote outside what was registered."""

    FILL = b"\xa5"

    def __init__(self, size: int) -> None:
        self.size = size
        self.guard = mmap.PAGESIZE
        self.buf = mmap.mmap(-1, size + 2 * self.guard)
        self.buf.write(self.FILL * len(self.buf))
        self.addr = buffer_address(self.buf) + self.guard

    def __getitem__(self, s: slice) -> bytes:
        return self.buf[self.guard + s.start: self.guard + s.stop]

    def __setitem__(self, s: slice, data: bytes) -> None:
        self.buf[self.guard + s.start: self.guard + s.stop] = data

    def guards_ok(self) -> bool:
        g = self.guard
        return self.buf[:g] == self.FILL * g and self.buf[g + self.size:] == self.FILL * g


class Target:
    """A Transfer Engine in its own process (tests/_te_target.py) whose registered region lies
    between guard pages; the test drives it through a pipe."""

    def __init__(self, spawn, store_url: str, size: int, session: str = "127.0.0.1:0",
                 env: dict | None = None, ns: str | None = None, serve=None) -> None:
        import memfabric_hybrid._netns as netns

        serve = serve or _te_target.serve
        self.conn, child = spawn.Pipe()
        args = (store_url, session, size, child, env)
        if ns is None:
            self.proc = spawn.Process(target=serve, args=args)
        else:
            self.proc = spawn.Process(target=netns.run_in, args=(ns, serve, *args))
        self.proc.start()
        assert self.conn.poll(60), "target did not start"
        msg = self.conn.recv()
        assert msg[0] == "ready", msg
        _, self.session, self.addr, self.pid = msg
        self.size = size

    def ask(self, *cmd, timeout: float = 30):
        self.conn.send(cmd)
        assert self.conn.poll(timeout), f"target did not answer {cmd[0]} within {timeout}s"
        return self.conn.recv()

    def hash(self, off: int = 0, n: int | None = None) -> str:
        return self.ask("hash", off, self.size - off if n is None else n)

    def guards_ok(self) -> bool:
        return self.ask("guards")

    def stop(self) -> None:
        if self.proc.is_alive():
            try:
                self.ask("stop")
            except (BrokenPipeError, EOFError, ConnectionResetError, AssertionError):
                self.proc.kill()
        self.proc.join(30)
        self.conn.close()


def engine(store_url: str, size: int, session: str = "127.0.0.1:0", timeout: float = 2.0):
    """An engine of this process with `size` guarded bytes registered; returns (engine, memory)."""
    e = mf.TransferEngine()
    e.transfer_timeout = timeout
    assert e.initialize(store_url, session, "Prefill", 0) == 0, mf.get_last_err_msg()
    mem = Guarded(size)
    assert e.register_memory(mem.addr, size) == 0, mf.get_last_err_msg()
    return e, mem


def timed(fn, *args):
    """(return code, seconds taken, last error message) of one engine call."""
    t = time.monotonic()
    rc = fn(*args)
    return rc, time.monotonic() - t, mf.get_last_err_msg()


def verified_write(e, mem: Guarded, target: Target, n: int, seed: int) -> None:
    """Writes `n` fresh bytes to the target, checks them there, reads them back and checks them
    here: the proof, after each fault, that the survivors still move the right bytes."""
    data = pattern(n, seed)
    mem[0:n] = data
    rc, took, msg = timed(e.transfer_sync_write, target.session, mem.addr, target.addr, n)
    assert rc == 0, (rc, msg)
    assert target.hash(0, n) == sha(data)
    mem[0:n] = b"\0" * n
    rc, took, msg = timed(e.transfer_sync_read, target.session, mem.addr, target.addr, n)
    assert rc == 0, (rc, msg)
    assert mem[0:n] == data
    assert mem.guards_ok() and target.guards_ok()


def start_store(url: str) -> subprocess.Popen:
    """A config store in its own process (the standalone server), listening when this returns."""
    p = subprocess.Popen([sys.executable, "-m", "memfabric_hybrid.store_server", "--listen", url],
                         stdout=subprocess.PIPE, text=True)
    line = p.stdout.readline()
    assert line.startswith("listening on"), line
    return p


def kill_store(p: subprocess.Popen) -> None:
    p.kill()
    p.wait(30)
    p.stdout.close()


def closed_by_peer(s: socket.socket, within: float) -> tuple[bool, bytes]:
    """Reads until the other end closes; (closed within `within` seconds, bytes received)."""
    s.settimeout(within)
    got = b""
    end = time.monotonic() + within
    while time.monotonic() < end:
        try:
            b = s.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            return True, got
        except socket.timeout:
            return False, got
        if not b:
            return True, got
        got += b
    return False, got


def raise_fd_limit(want: int) -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))


def wait_for(pred, timeout: float, step: float = 0.05) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(step)
    return pred()

