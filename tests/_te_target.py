"""A Transfer Engine target process for the tests: registers a buffer and answers commands."""

from __future__ import annotations

import ctypes
import hashlib
import mmap
import os


def buffer_address(buf: mmap.mmap) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(buf))


def serve(store_url: str, session: str, size: int, conn, env: dict | None = None) -> None:
    """Commands on `conn`: ("hash", off, n), ("fill", byte), ("move", store_url), ("unregister",),
    ("stop",)."""
    os.environ.update(env or {})
    import memfabric_hybrid as mf

    # A guard page's worth of unregistered memory on both sides of the region, so tests can
    # check that bytes outside the registration never change.
    guard = mmap.PAGESIZE
    buf = mmap.mmap(-1, size + 2 * guard)
    buf.write(b"\xee" * (size + 2 * guard))
    base = buffer_address(buf)
    engine = mf.TransferEngine()
    rc = engine.initialize(store_url, session, "Decode", 0)
    if rc != 0:
        conn.send(("error", rc, mf.get_last_err_msg()))
        return
    rc = engine.register_memory(base + guard, size)
    if rc != 0:
        conn.send(("error", rc, mf.get_last_err_msg()))
        return
    conn.send(("ready", engine.session_id, base + guard, os.getpid()))
    while True:
        cmd = conn.recv()
        if cmd[0] == "hash":
            _, off, n = cmd
            conn.send(hashlib.sha256(buf[guard + off: guard + off + n]).hexdigest())
        elif cmd[0] == "guards":
            conn.send(buf[:guard] == b"\xee" * guard and buf[guard + size:] == b"\xee" * guard)
        elif cmd[0] == "fill":
            _, off, data = cmd
            buf[guard + off: guard + off + len(data)] = data
            conn.send("ok")
        elif cmd[0] == "move":
            rc = engine.update_store_url(cmd[1])
            conn.send((rc, mf.get_last_err_msg() if rc else ""))
        elif cmd[0] == "unregister":
            conn.send(engine.unregister_memory(base + guard))
        elif cmd[0] == "stop":
            engine.destroy()
            conn.send("stopped")
            return
