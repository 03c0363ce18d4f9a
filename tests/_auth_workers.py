"""Processes for the data-plane admission tests: engines whose process has TLS on."""

from __future__ import annotations

import hashlib
import mmap
import os


def tls_target(tls_info: str, store_url: str, size: int, conn) -> None:
    """A Transfer Engine target (see _te_target.serve) in a process with TLS on."""
    import memfabric_hybrid as mf
    import _te_target

    if mf.set_conf_store_tls(True, tls_info) != 0:
        conn.send(("error", -1, mf.get_last_err_msg()))
        return
    _te_target.serve(store_url, "127.0.0.1:0", size, conn, {"MF_TRANSPORT": "tcp"})


def tls_initiator(tls_info: str, store_url: str, session: str, peer_addr: int, n: int, out) -> None:
    """Writes n bytes to the target over tcp, reads them back; reports what happened."""
    os.environ["MF_TRANSPORT"] = "tcp"
    import memfabric_hybrid as mf
    from _te_target import buffer_address

    if tls_info and mf.set_conf_store_tls(True, tls_info) != 0:
        out.put(("tls", -1, mf.get_last_err_msg()))
        return
    engine = mf.TransferEngine()
    rc = engine.initialize(store_url, "127.0.0.1:0", "Prefill", 0)
    if rc != 0:
        out.put(("initialize", rc, mf.get_last_err_msg()))
        return
    buf = mmap.mmap(-1, 2 * n)
    base = buffer_address(buf)
    assert engine.register_memory(base, 2 * n) == 0, mf.get_last_err_msg()
    data = os.urandom(n)
    buf[:n] = data
    rc = engine.transfer_sync_write(session, base, peer_addr, n)
    if rc != 0:
        out.put(("write", rc, mf.get_last_err_msg()))
        return
    rc = engine.transfer_sync_read(session, base + n, peer_addr, n)
    if rc != 0:
        out.put(("read", rc, mf.get_last_err_msg()))
        return
    out.put(("ok", engine.transport_for(session), hashlib.sha256(data).hexdigest(), buf[n:2 * n] == data))
    engine.destroy()
