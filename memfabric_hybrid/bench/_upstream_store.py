"""The config store of memfabric-hybrid 1.3.0 (the upstream C++ library) as a peer column of the
store benchmark.

Upstream ships no store client in Python or in its C API, so its store is driven by a small C++
program, bench/upstream_store/store_client.cpp, built here against the wheel's libmf_smem.so.
Everything lives in .cache/upstream-1.3.0/ (beside the C headers scripts/fetch_upstream_headers.py
puts there): the wheel (fetched with pip download when missing), its lib/ and the built program.
Each cell gets a fresh upstream server process and ``clients`` client processes; all of them are
stopped when the cell ends, also on error. ``prepare()`` says why the column cannot be measured
instead of raising.
"""

from __future__ import annotations

import os
import random
import select
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from array import array
from pathlib import Path
from typing import Any, IO

from ._util import free_port, percentile

VERSION = "1.3.0"
ROOT = Path(__file__).resolve().parent.parent.parent
CACHE = ROOT / ".cache" / f"upstream-{VERSION}"
LIB = CACHE / "lib"
SOURCE = ROOT / "bench" / "upstream_store" / "store_client.cpp"
PROGRAM = CACHE / "store_client"
HOST = "127.0.0.1"


class UpstreamError(RuntimeError):
    pass


# ---- preparation: wheel, libraries, program ------------------------------------------------------

def _wheel() -> Path:
    found = sorted(CACHE.glob(f"memfabric_hybrid-{VERSION}-*.whl"))
    if found:
        return found[0]
    CACHE.mkdir(parents=True, exist_ok=True)
    # Any of its x86_64 wheels carries the same libraries; pin one so the local Python does not matter.
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
           "--python-version", "3.11", "--platform", "manylinux_2_28_x86_64", "-d", str(CACHE),
           f"memfabric-hybrid=={VERSION}"]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        raise UpstreamError(f"pip download of memfabric-hybrid=={VERSION} took over 600 s") from None
    found = sorted(CACHE.glob(f"memfabric_hybrid-{VERSION}-*.whl"))
    if r.returncode != 0 or not found:
        last = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["no output"]
        raise UpstreamError(f"pip download of memfabric-hybrid=={VERSION} failed ({last[0]}); put its "
                            f"manylinux x86_64 wheel into {CACHE} to measure it offline")
    return found[0]


def _libs() -> Path:
    if (LIB / "libmf_smem.so").exists():
        return LIB
    wheel = _wheel()
    prefix = "memfabric_hybrid/lib/"
    # Extract beside the final place and rename, so that a run stopped half way leaves no lib/.
    tmp = Path(tempfile.mkdtemp(prefix="lib.", dir=CACHE))
    tmp.chmod(0o755)
    try:
        with zipfile.ZipFile(wheel) as z:
            names = [n for n in z.namelist() if n.startswith(prefix) and n.endswith(".so")]
            if not any(n.endswith("/libmf_smem.so") for n in names):
                raise UpstreamError(f"{wheel.name} has no {prefix}libmf_smem.so")
            for n in names:
                (tmp / Path(n).name).write_bytes(z.read(n))
        try:
            tmp.rename(LIB)
        except OSError:
            if not (LIB / "libmf_smem.so").exists():  # not a concurrent run that got there first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return LIB


def _build(lib: Path) -> Path:
    inputs = [SOURCE, lib / "libmf_smem.so"]
    if PROGRAM.exists() and PROGRAM.stat().st_mtime >= max(p.stat().st_mtime for p in inputs):
        return PROGRAM
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not cxx:
        raise UpstreamError("no C++ compiler (c++ or g++; or set CXX) to build its client")
    out = PROGRAM.with_name(f"{PROGRAM.name}.{os.getpid()}")
    # See the head of store_client.cpp for why these flags (old std::string ABI, RPATH).
    cmd = [cxx, "-O2", "-std=c++17", "-D_GLIBCXX_USE_CXX11_ABI=0", str(SOURCE), "-o", str(out),
           f"-L{lib}", "-lmf_smem", "-lmf_hybm_core", f"-Wl,--disable-new-dtags,-rpath,{lib}"]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        raise UpstreamError("building its client took over 300 s") from None
    if r.returncode != 0:
        out.unlink(missing_ok=True)
        tail = " | ".join(r.stderr.strip().splitlines()[-3:]) or "no output"
        raise UpstreamError(f"building its client with {cxx} failed (exit {r.returncode}): {tail}")
    out.replace(PROGRAM)
    return PROGRAM


def prepare(max_size: int) -> tuple[str | None, str | None]:
    """Builds the client and checks it on a fresh upstream server. Returns (the check's summary,
    None), or (None, why the column cannot be measured)."""
    if sys.platform != "linux" or os.uname().machine != "x86_64":
        return None, f"memfabric-hybrid {VERSION}'s libraries are for Linux x86_64 only"
    try:
        _build(_libs())
        with _Server() as srv:
            return srv.check(max_size), None
    except (UpstreamError, OSError, zipfile.BadZipFile) as e:
        return None, str(e)


# ---- processes -------------------------------------------------------------------------------------

def _read_line(proc: subprocess.Popen, deadline: float, what: str, log: Path, expect: str) -> str:
    """The next protocol line of ``proc`` (its stdout carries nothing else), by ``deadline``; it
    must start with "mfbench ``expect``"."""
    line = b""
    while not line.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([proc.stdout], [], [], left)[0]:
            raise UpstreamError(f"{what}: no 'mfbench {expect}' in time, stopped{_tail(log)}")
        chunk = os.read(proc.stdout.fileno(), 1)  # byte by byte: nothing after the line is taken
        if not chunk:
            code = proc.wait(5)
            raise UpstreamError(f"{what}: exited with {code} before saying so{_tail(log)}")
        line += chunk
    text = line.decode(errors="replace").strip()
    if text.startswith("mfbench error:"):
        raise UpstreamError(f"{what}: {text[len('mfbench error:'):].strip()}{_tail(log)}")
    if not text.startswith(f"mfbench {expect}"):
        raise UpstreamError(f"{what}: said {text!r} where 'mfbench {expect}' was due")
    return text


def _tail(log: Path) -> str:
    try:
        lines = [l for l in log.read_text(errors="replace").splitlines() if l.strip()]
    except OSError:
        return ""
    return f" (its log ends: {' | '.join(lines[-3:])})" if lines else ""


def _stop(proc: subprocess.Popen, stdin_close: bool = True) -> None:
    """Ends ``proc``: EOF on its stdin first (a server then shuts down), then SIGKILL."""
    if proc.poll() is None and stdin_close and proc.stdin:
        try:
            proc.stdin.close()
        except OSError:
            pass
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)
    for f in (proc.stdin, proc.stdout):
        if f:
            try:
                f.close()
            except OSError:
                pass


class _Server:
    """One upstream store server (a process of the built program) on a free loopback port, with a
    scratch directory for the logs and latency files of its clients."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="mf-upstream-store."))
        self.port = free_port()
        self._logs: list[IO[bytes]] = []
        self._proc: subprocess.Popen | None = None

    def __enter__(self) -> "_Server":
        try:
            self._proc = self._spawn(["serve", HOST, str(self.port)], "server")
            _read_line(self._proc, time.monotonic() + 60, "its store server", self.dir / "server.log", "ready")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _spawn(self, args: list[str], name: str) -> subprocess.Popen:
        log = open(self.dir / f"{name}.log", "wb")
        self._logs.append(log)
        return subprocess.Popen([str(PROGRAM), *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log)

    def check(self, max_size: int) -> str:
        proc = self._spawn(["check", HOST, str(self.port), str(random.getrandbits(32)), str(max_size)], "check")
        try:
            line = _read_line(proc, time.monotonic() + 180, "its client's check", self.dir / "check.log", "checked")
            if proc.wait(30) != 0:
                raise UpstreamError(f"its client's check exited with {proc.returncode}{_tail(self.dir / 'check.log')}")
            return line[len("mfbench checked "):]
        finally:
            _stop(proc)

    def measure(self, op: str, size: int, clients: int, seconds: float) -> dict[str, Any]:
        """``clients`` processes run ``op`` for ``seconds``, started together once all are connected
        and warmed up; same figures as the other columns."""
        procs: list[subprocess.Popen] = []
        try:
            for i in range(clients):
                procs.append(self._spawn(["run", HOST, str(self.port), op, str(size), repr(seconds), str(i),
                                          str(self.dir / f"lat{i}")], f"client{i}"))
            deadline = time.monotonic() + 60 + 5 * clients
            for i, p in enumerate(procs):
                _read_line(p, deadline, f"client {i}", self.dir / f"client{i}.log", "ready")
            for p in procs:
                p.stdin.write(b"go\n")
                p.stdin.flush()
            deadline = time.monotonic() + seconds + 60
            results = [_read_line(p, deadline, f"client {i}", self.dir / f"client{i}.log", "result")
                       for i, p in enumerate(procs)]
            # Only now may they disconnect (see the end of Run() in store_client.cpp).
            for p in procs:
                p.stdin.close()
            for i, p in enumerate(procs):
                if p.wait(max(1.0, deadline - time.monotonic())) != 0:
                    raise UpstreamError(f"client {i} exited with {p.returncode}{_tail(self.dir / f'client{i}.log')}")
            ops = wall = 0
            lat: list[float] = []
            for i, line in enumerate(results):
                fields = dict(kv.split("=", 1) for kv in line.split()[2:])
                ns = array("q")
                with open(self.dir / f"lat{i}", "rb") as f:
                    ns.frombytes(f.read())
                if len(ns) != int(fields["ops"]):
                    raise UpstreamError(f"client {i} reported {fields['ops']} ops but {len(ns)} latencies")
                ops += len(ns)
                wall = max(wall, int(fields["wall_ns"]))
                lat.extend(x * 1e-9 for x in ns)
        except subprocess.TimeoutExpired as e:
            raise UpstreamError(f"a client did not exit in time ({e})") from None
        except OSError as e:  # a pipe to a client that is gone, or its latency file
            raise UpstreamError(f"running its clients failed: {e}") from None
        finally:
            for p in procs:
                _stop(p, stdin_close=False)
        lat.sort()
        return {"ops_per_s": ops / (wall * 1e-9), "p50_us": percentile(lat, 50) * 1e6,
                "p99_us": percentile(lat, 99) * 1e6, "ops": ops, "connection": ["tcp"]}

    def close(self) -> None:
        if self._proc is not None:
            _stop(self._proc)
            self._proc = None
        for log in self._logs:
            log.close()
        self._logs = []
        shutil.rmtree(self.dir, ignore_errors=True)


def measure(op: str, size: int, clients: int, seconds: float) -> dict[str, Any]:
    """One cell on a fresh upstream server. Raises UpstreamError, saying why, on any failure."""
    with _Server() as srv:
        return srv.measure(op, size, clients, seconds)
