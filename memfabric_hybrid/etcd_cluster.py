"""A throwaway etcd cluster on loopback ports, for tests and benchmarks of the etcd store.

Runs the ``etcd`` binary (Debian's ``etcd-server``; ``MF_ETCD_BIN`` names another) as N
members on free ``127.0.0.1`` ports, each with its own data directory in a temporary
directory that :meth:`LocalEtcdCluster.stop` removes. Data directories go to ``/dev/shm``
where it exists: etcd syncs every write to disk, and a test measures the store, not the disk.

Example::

    >>> from memfabric_hybrid.etcd_cluster import LocalEtcdCluster, etcd_binary
    >>> if etcd_binary():                                      # doctest: +SKIP
    ...     with LocalEtcdCluster(3) as cluster:
    ...         url = cluster.url("jobs/42")  # etcd://127.0.0.1:p0,127.0.0.1:p1,127.0.0.1:p2/jobs/42
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.request
from typing import Dict, List, Optional

__all__ = ["LocalEtcdCluster", "etcd_binary", "why_no_etcd"]


def etcd_binary() -> Optional[str]:
    """The etcd server binary to run (``MF_ETCD_BIN`` or ``etcd`` on PATH), or None."""
    explicit = os.environ.get("MF_ETCD_BIN")
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    return shutil.which("etcd") or (
        "/usr/bin/etcd" if os.access("/usr/bin/etcd", os.X_OK) else None
    )


def why_no_etcd() -> Optional[str]:
    """None when etcd can run here, else why not (for skip reasons)."""
    if etcd_binary() is None:
        return ("no etcd binary: install Debian's etcd-server (scripts/setup.sh does, as root) "
                "or set MF_ETCD_BIN")
    return None


def _free_ports(n: int) -> List[int]:
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


class LocalEtcdCluster:
    """``size`` etcd members on loopback; started by the constructor.

    Args:
        size: number of members (3 tolerates one failure).
        tls: ``{"ca": path, "cert": path, "key": path}`` to serve clients over mutual TLS
            (the certificate must name 127.0.0.1); members talk to each other in plaintext.
        start_timeout: seconds to wait for every member to answer.
        extra_args: more etcd flags for every member (``--quota-backend-bytes``...).
    """

    def __init__(self, size: int = 3, tls: Optional[Dict[str, str]] = None,
                 start_timeout: float = 30.0, extra_args: Optional[List[str]] = None) -> None:
        binary = etcd_binary()
        if binary is None:
            raise RuntimeError(why_no_etcd() or "no etcd")
        self.binary = binary
        self.size = size
        self.tls = tls
        self.extra_args = list(extra_args or [])
        base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
        self.dir = tempfile.mkdtemp(prefix="mf-etcd-", dir=base)
        ports = _free_ports(2 * size)
        self.client_ports = ports[:size]
        self.peer_ports = ports[size:]
        self.names = [f"m{i}" for i in range(size)]
        self.procs: List[Optional[subprocess.Popen]] = [None] * size
        scheme = "https" if tls else "http"
        self._client_urls = [f"{scheme}://127.0.0.1:{p}" for p in self.client_ports]
        self._initial = ",".join(
            f"{n}=http://127.0.0.1:{p}" for n, p in zip(self.names, self.peer_ports))
        try:
            for i in range(size):
                self.start_member(i)
            self.wait_healthy(start_timeout)
        except BaseException:
            self.stop()
            raise

    # ---- members ---------------------------------------------------------------------------

    def _command(self, i: int) -> List[str]:
        cmd = [
            self.binary,
            "--name", self.names[i],
            "--data-dir", os.path.join(self.dir, self.names[i]),
            "--listen-client-urls", self._client_urls[i],
            "--advertise-client-urls", self._client_urls[i],
            "--listen-peer-urls", f"http://127.0.0.1:{self.peer_ports[i]}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{self.peer_ports[i]}",
            "--initial-cluster", self._initial,
            "--initial-cluster-state", "new",
            "--initial-cluster-token", os.path.basename(self.dir),
            "--log-level", "warn",
        ]
        if self.tls:
            cmd += ["--cert-file", self.tls["cert"], "--key-file", self.tls["key"],
                    "--trusted-ca-file", self.tls["ca"], "--client-cert-auth"]
        return cmd + self.extra_args

    def start_member(self, i: int) -> None:
        """Starts member ``i`` (again, with its data, after :meth:`kill`)."""
        if self.procs[i] is not None and self.procs[i].poll() is None:
            return
        log = open(os.path.join(self.dir, f"{self.names[i]}.log"), "ab")
        try:
            self.procs[i] = subprocess.Popen(self._command(i), stdout=log, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL)
        finally:
            log.close()

    def kill(self, i: int) -> None:
        """Kills member ``i`` at once (SIGKILL), as a crash would."""
        p = self.procs[i]
        if p is not None:
            p.kill()
            p.wait()
            self.procs[i] = None

    def alive(self) -> List[int]:
        """Indices of the members whose process runs."""
        return [i for i, p in enumerate(self.procs) if p is not None and p.poll() is None]

    def _health(self, i: int, timeout: float) -> bool:
        url = self._client_urls[i] + "/health"
        ctx = None
        if self.tls:
            ctx = ssl.create_default_context(cafile=self.tls["ca"])
            ctx.load_cert_chain(self.tls["cert"], self.tls["key"])
        try:
            with urllib.request.urlopen(url, timeout=timeout, context=ctx) as r:
                return b'"true"' in r.read()
        except OSError:
            return False

    def wait_healthy(self, timeout: float = 30.0, members: Optional[List[int]] = None) -> None:
        """Waits until each member (default: every running one) reports a healthy cluster."""
        todo = list(self.alive() if members is None else members)
        deadline = time.monotonic() + timeout
        while todo:
            todo = [i for i in todo if not self._health(i, 1.0)]
            if not todo:
                return
            for i in todo:
                p = self.procs[i]
                if p is None or p.poll() is not None:
                    raise RuntimeError(f"etcd member {self.names[i]} exited; log:\n{self.log(i)}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"etcd members {todo} not healthy within {timeout}s; log:\n"
                                   f"{self.log(todo[0])}")
            time.sleep(0.1)

    def _status(self, i: int) -> Optional[dict]:
        ctx = None
        if self.tls:
            ctx = ssl.create_default_context(cafile=self.tls["ca"])
            ctx.load_cert_chain(self.tls["cert"], self.tls["key"])
        req = urllib.request.Request(self._client_urls[i] + "/v3/maintenance/status", data=b"{}",
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=2, context=ctx) as r:
                return json.loads(r.read())
        except (OSError, ValueError):
            return None

    def leader(self) -> Optional[int]:
        """Index of the member that leads now, if a running member knows one."""
        for i in self.alive():
            st = self._status(i)
            if st and st.get("leader") and st["leader"] == st.get("header", {}).get("member_id"):
                return i
        return None

    def log(self, i: int) -> str:
        """The last lines member ``i`` logged."""
        try:
            with open(os.path.join(self.dir, f"{self.names[i]}.log"), "rb") as f:
                return f.read()[-4000:].decode(errors="replace")
        except OSError:
            return ""

    # ---- use -------------------------------------------------------------------------------

    def url(self, prefix: str = "") -> str:
        """The store URL of this cluster, with keys under ``prefix``."""
        hosts = ",".join(f"127.0.0.1:{p}" for p in self.client_ports)
        return f"etcd://{hosts}/{prefix.strip('/')}"

    def stop(self) -> None:
        """Kills every member and removes the data directories."""
        for i in range(self.size):
            self.kill(i)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "LocalEtcdCluster":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __del__(self) -> None:
        if any(p is not None for p in getattr(self, "procs", [])):
            self.stop()
