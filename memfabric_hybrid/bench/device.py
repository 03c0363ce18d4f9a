"""Device memory benchmark: our copies of CUDA memory (BM, TE) beside the CUDA runtime's cudaMemcpy.

    python -m memfabric_hybrid.bench device [--sizes 4096,65536,1048576,16777216,268435456]
                                            [--seconds 0.3] [--json FILE]

Needs an NVIDIA GPU and torch with CUDA (cupy optional); without them it prints why in one
line and exits 0. Per cell: 2 warm-up calls, then calls in a loop for about ``--seconds``
(at least 3). GB/s is bytes over the median call time; "p50 us" is that median (tables show
it up to 1 MiB, the JSON always). Every timed call returns when the bytes are in place: ours
are synchronous, and each baseline copy is followed by a device synchronize (cudaMemcpy
D2D returns before the copy is done). "ours/cudaMemcpy" compares with the baseline of the
same host buffer kind (pageable or pinned). Rows:

  cudaMemcpy  the baseline: cupy.cuda.runtime.memcpy (kinds 1 H2D, 2 D2H, 3 D2D), or torch
              ``copy_`` where cupy is absent or fails; host buffers are pageable torch CPU
              tensors, and for H2D/D2H also pinned ones (``pin_memory()``, "pinned").
  bm          Big Memory, one rank in this process with an HBM part on the GPU
              (``create(0, 2 MiB, local_hbm_size=max size)``): copy_data H2G / G2H (host
              tensor <-> the HBM GVA, pageable and pinned) against H2D / D2H, and L2G / G2L
              (CUDA tensor <-> the HBM GVA) against D2D.
  te          Transfer Engine, this process and a spawned target on this host (the path is
              CUDA IPC + a device copy; ``transport_for`` is printed): transfer_sync_write /
              read between a CUDA tensor here and the target's (D2D), and between a host
              tensor here (pinned where it registers, else pageable) and it (H2D / D2H).
  te-tcp      the same pair as two fresh spawned processes started with MF_TRANSPORT=tcp:
              D2D over the staged network path (device -> host -> tcp -> host -> device),
              sizes up to 16 MiB; its ratio to cudaMemcpy D2D is informative only.
  mooncake-tcp  Mooncake's transfer engine (its CUDA wheel, ``mooncake-transfer-engine``) in
              the same two-process D2D cells over its tcp protocol (P2PHANDSHAKE; one GPU has
              no RDMA or NVLink path), printed beside te-tcp. Skipped, saying why, where
              ``mooncake.engine`` does not import. MF_BENCH_MOONCAKE_SITE (a directory put
              first on the children's sys.path) and MF_BENCH_MOONCAKE_LIBS (put first on their
              LD_LIBRARY_PATH) load a copy that is not installed (scripts/gpu_check.sh).

Data is verified once per size (random bytes written, read back, compared): "verified" in the
JSON. A failing cell or section prints its error and the rest still runs; no new cell starts
after 150 s, and a watchdog ends a run stuck in a call at 210 s (partial figures written).
Exit status 1 when any cell, section or verification failed.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import os
import queue
import subprocess
import sys
import threading
import time
import traceback
from typing import Any, Callable, Iterator

from ._util import percentile, table, write_json

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
DEFAULT_SIZES = "4096,65536,1048576,16777216,268435456"
TCP_MAX = 16 * MiB
SMALL = 1 * MiB  # tables show p50 us up to this size
BUDGET_S = 150.0  # no cell starts after this
WATCHDOG_S = 210.0  # a call stuck in native code: partial figures, children killed, exit 1
_deadline = [float("inf")]  # time.monotonic() after which no cell starts (same clock in children)
_live: list[Any] = []  # child processes running now


def _human(n: int) -> str:
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= size and n % size == 0:
            return f"{n // size} {unit}"
    return f"{n} B"


def _err() -> str:
    """The exception being handled, as the last lines of its traceback."""
    return "\n".join(traceback.format_exc().strip().splitlines()[-6:])


def _check(rc: Any) -> None:
    if rc is not None and rc != 0:
        raise RuntimeError(f"rc {rc}: {__import__('memfabric_hybrid').get_last_err_msg()}")


def _measure(call: Callable[[], Any], n: int, seconds: float) -> dict[str, Any]:
    """2 warm-up calls, then calls for about `seconds` (at least 3, at most max(3 s, 3 x seconds))."""
    for _ in range(2):
        _check(call())
    lat: list[float] = []
    clock, start, cap = time.perf_counter, time.perf_counter(), max(3.0, 3 * seconds)
    while True:
        t0 = clock()
        _check(call())
        t1 = clock()
        lat.append(t1 - t0)
        if (t1 - start >= seconds and len(lat) >= 3) or t1 - start >= cap:
            break
    lat.sort()
    p50 = percentile(lat, 50)
    return {"gb_s": n / p50 / 1e9, "p50_us": p50 * 1e6, "p99_us": percentile(lat, 99) * 1e6, "calls": len(lat)}


Maker = Callable[[int], Callable[[], Any]]


def _cells(rows: list, path: str, dirs: list[tuple[str, str, Maker]], sizes: list[int], seconds: float) -> None:
    """Per direction (label, baseline key, make(n) -> call) and size: one row appended to `rows`.
    After a failure the direction's larger sizes are skipped."""
    for label, base, make in dirs:
        failed = ""
        for n in sizes:
            row: dict[str, Any] = {"path": path, "dir": label, "base": base, "bytes": n}
            if failed:
                row["error"] = f"skipped: {failed}"
            elif time.monotonic() > _deadline[0]:
                row["error"] = "skipped: time budget spent"
            else:
                try:
                    row.update(_measure(make(n), n, seconds))
                except Exception as e:
                    failed = f"{label} {_human(n)} failed"
                    row["error"] = f"{type(e).__name__}: {e}"
                    print(f"  {path} {label} {_human(n)}: {row['error']}", flush=True)
            rows.append(row)


def _verify(sizes: list[int], one: Callable[[int], bool]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for n in sizes:
        try:
            out[str(n)] = bool(one(n))
        except Exception as e:
            out[str(n)] = f"{type(e).__name__}: {e}"
    print("  verified: " + ", ".join(f"{_human(int(k))} {v}" for k, v in out.items()), flush=True)
    return out


def _ptr(t: Any) -> int:
    return int(t.data_ptr())


def _bufs(torch: Any, n: int, kind: str, count: int = 2) -> list[Any]:
    """`count` zeroed uint8 tensors of n bytes: kind "cuda", "pageable" or "pinned"."""
    if kind == "cuda":
        return [torch.zeros(n, dtype=torch.uint8, device="cuda") for _ in range(count)]
    ts = [torch.zeros(n, dtype=torch.uint8) for _ in range(count)]
    return [t.pin_memory() for t in ts] if kind == "pinned" else ts


# ---- sections -----------------------------------------------------------------------------------

def _baseline(torch: Any, sizes: list[int], seconds: float, out: dict[str, Any]) -> None:
    host, pinned, dev = (_bufs(torch, max(sizes), k) for k in ("pageable", "pinned", "cuda"))
    torch.cuda.synchronize()
    try:
        import cupy  # type: ignore[import-not-found]

        rt = cupy.cuda.runtime

        def copier(kind: int, dst: Any, src: Any) -> Maker:
            def make(n: int, d: int = _ptr(dst), s: int = _ptr(src)) -> Callable[[], None]:
                return lambda: (rt.memcpy(d, s, n, kind), rt.deviceSynchronize()) and None
            return make
        copier(3, dev[1], dev[0])(16)()  # fails here, not in every cell, where cupy is broken
        out["engine"] = f"cupy {cupy.__version__}: cupy.cuda.runtime.memcpy + deviceSynchronize"
    except Exception as e:
        def copier(kind: int, dst: Any, src: Any) -> Maker:
            def make(n: int) -> Callable[[], None]:
                d, s = dst[:n], src[:n]
                return lambda: (d.copy_(s), torch.cuda.synchronize()) and None
            return make
        out["engine"] = f"torch {torch.__version__}: copy_ + torch.cuda.synchronize (cupy: {type(e).__name__}: {e})"
    print(f"  {out['engine']}", flush=True)
    _cells(out["rows"], "cudaMemcpy", [
        ("H2D", "H2D", copier(1, dev[0], host[0])), ("D2H", "D2H", copier(2, host[1], dev[0])),
        ("D2D", "D2D", copier(3, dev[1], dev[0])), ("H2D pinned", "H2D pinned", copier(1, dev[0], pinned[0])),
        ("D2H pinned", "D2H pinned", copier(2, pinned[1], dev[0])),
    ], sizes, seconds)


def _bm(torch: Any, sizes: list[int], seconds: float, out: dict[str, Any]) -> None:
    import memfabric_hybrid as mf
    from memfabric_hybrid.bm import BmCopyType as T

    top, big = max(sizes), None
    srv = mf.start_config_store("tcp://127.0.0.1:0")
    try:
        cfg = mf.bm.BmConfig()
        cfg.auto_ranking = True
        cfg.set_nic("lo")
        if (rc := mf.bm.initialize(srv.url, 1, 0, cfg)) != 0:
            raise RuntimeError(f"bm.initialize: {rc} {mf.get_last_err_msg()}")
        try:
            big = mf.bm.create(0, 2 * MiB, local_hbm_size=top)  # the HBM part, on the GPU
            g = big.peer_rank_ptr(0)
            if not g:
                raise RuntimeError(f"peer_rank_ptr(0) = 0: {mf.get_last_err_msg()}")
            out["hbm_gva"], out["hbm_size"] = hex(g), big.local_mem_size()
            (hs, hd), (ps, pd), (dv,) = _bufs(torch, top, "pageable"), _bufs(torch, top, "pinned"), \
                _bufs(torch, top, "cuda", 1)
            torch.cuda.synchronize()

            def one(n: int) -> bool:  # H2G then G2H (and G2L) of fresh random bytes
                hs[:n] = torch.randint(0, 256, (n,), dtype=torch.uint8)
                hd[:n].zero_()
                dv[:n].zero_()
                torch.cuda.synchronize()
                _check(big.copy_data(_ptr(hs), g, n, T.H2G, 0))
                _check(big.copy_data(g, _ptr(hd), n, T.G2H, 0))
                _check(big.copy_data(g, _ptr(dv), n, T.G2L, 0))
                return torch.equal(hs[:n], hd[:n]) and torch.equal(dv[:n].cpu(), hs[:n])

            out["verified"] = _verify(sizes, one)

            def cp(src: int, dst: int, kind: int) -> Maker:
                return lambda n: (lambda: big.copy_data(src, dst, n, kind, 0))
            _cells(out["rows"], "bm", [
                ("H2G", "H2D", cp(_ptr(hs), g, T.H2G)), ("G2H", "D2H", cp(g, _ptr(hd), T.G2H)),
                ("H2G pinned", "H2D pinned", cp(_ptr(ps), g, T.H2G)), ("G2H pinned", "D2H pinned", cp(g, _ptr(pd), T.G2H)),
                ("L2G", "D2D", cp(_ptr(dv), g, T.L2G)), ("G2L", "D2D", cp(g, _ptr(dv), T.G2L)),
            ], sizes, seconds)
        finally:
            if big is not None:
                big.destroy()
            mf.bm.uninitialize()
    finally:
        srv.close()


def _mooncake_env() -> dict[str, str]:
    """LD_LIBRARY_PATH for processes that load Mooncake from MF_BENCH_MOONCAKE_LIBS."""
    libs = os.environ.get("MF_BENCH_MOONCAKE_LIBS")
    if not libs:
        return {}
    old = os.environ.get("LD_LIBRARY_PATH")
    return {"LD_LIBRARY_PATH": f"{libs}:{old}" if old else libs}


def _mooncake_import() -> Any:
    site = os.environ.get("MF_BENCH_MOONCAKE_SITE")
    if site and site not in sys.path:
        sys.path.insert(0, site)
    import mooncake.engine  # type: ignore

    # The non-CUDA build would take a device pointer for host memory and crash: only the
    # CUDA build (its engine links the CUDA runtime) may see CUDA tensors.
    with open(mooncake.engine.__file__, "rb") as f:
        if b"libcudart.so" not in f.read():
            raise ImportError(f"{mooncake.engine.__file__} is Mooncake's build without CUDA")
    return mooncake.engine.TransferEngine


def _mooncake_why() -> str:
    """Why Mooncake cannot run here ("" when it imports), asked in a fresh process (its
    libraries stay out of this one)."""
    code = "from memfabric_hybrid.bench.device import _mooncake_import; _mooncake_import()"
    try:
        r = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, **_mooncake_env()),
                           capture_output=True, text=True, timeout=120)
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    lines = (r.stderr or r.stdout).strip().splitlines()
    return "" if r.returncode == 0 else f"mooncake.engine does not import: {lines[-1] if lines else r.returncode}"


@contextlib.contextmanager
def _environ(extra: dict[str, str]) -> Iterator[None]:
    """`extra` in os.environ while processes are started (a spawned child's loader reads its
    LD_LIBRARY_PATH at exec, before any of its code runs)."""
    old = {k: os.environ.get(k) for k in extra}
    os.environ.update(extra)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _mooncake_rc(f: Callable[..., int], what: str) -> Callable[..., None]:
    """A Mooncake call that raises on a non-zero return (it leaves no message to fetch)."""
    def call(*args: Any) -> None:
        if (rc := f(*args)) != 0:
            raise RuntimeError(f"Mooncake {what}: rc {rc}")
    return call


def _te_open(url: str, role: str, system: str = "memfabric") -> Any:
    if system == "mooncake":
        te = _mooncake_import()()
        if (rc := te.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "")) != 0:
            raise RuntimeError(f"Mooncake initialize('127.0.0.1', 'P2PHANDSHAKE', 'tcp', ''): rc {rc}")
        return te
    import memfabric_hybrid as mf

    te = mf.TransferEngine()
    te.transfer_timeout = 20.0  # a stuck call fails its cell instead of eating the run
    if (rc := te.initialize(url, "127.0.0.1", role, 0)) != 0:
        raise RuntimeError(f"TransferEngine.initialize(role={role}): {rc} {mf.get_last_err_msg()}")
    return te


def _session_of(system: str, te: Any) -> str:
    """The name an initiator passes to reach `te`."""
    return f"127.0.0.1:{te.get_rpc_port()}" if system == "mooncake" else te.session_id


def _close(system: str, te: Any) -> None:
    if system != "mooncake":  # Mooncake's engine has no close; it goes with the process
        te.destroy()


def _reg_error(system: str) -> str:
    import memfabric_hybrid as mf

    return "" if system == "mooncake" else mf.get_last_err_msg()


def _te_target(url: str, n: int, env: dict[str, str], q: Any, stop: Any, system: str = "memfabric") -> None:
    """Child: registers a CUDA tensor of n bytes, reports (session, address), waits for `stop`."""
    try:
        os.environ.update(env)
        import torch

        te = _te_open(url, "decode", system)
        buf = torch.zeros(n, dtype=torch.uint8, device="cuda")
        torch.cuda.synchronize()
        if (rc := te.register_memory(_ptr(buf), n)) != 0:
            raise RuntimeError(f"target register_memory(cuda, {n}): {rc} {_reg_error(system)}")
        q.put(("ready", _session_of(system, te), _ptr(buf), te.get_rpc_port()))
    except Exception:
        q.put(("error", _err()))
        return
    stop.wait(600)
    _close(system, te)


def _te_measure(url: str, session: str, remote: int, sizes: list[int], seconds: float, host: bool,
                path: str, out: dict[str, Any] | None = None, system: str = "memfabric") -> dict[str, Any]:
    """Initiator: times sync write/read to the target's CUDA tensor at `remote`, into `out`."""
    import torch

    out = {"rows": []} if out is None else out
    top = max(sizes)
    te = _te_open(url, "prefill", system)
    try:
        out["local_session"], out["rpc_port"] = _session_of(system, te), te.get_rpc_port()

        def reg(ts: list[Any]) -> list[Any]:
            for t in ts:
                if (rc := te.register_memory(_ptr(t), t.numel())) != 0:
                    raise RuntimeError(f"register_memory({t.device}, {t.numel()}): {rc} {_reg_error(system)}")
            return ts
        a, b = reg(_bufs(torch, top, "cuda"))
        h0 = h1 = None
        for kind in ("pinned", "pageable") if host else ():
            try:
                h0, h1 = reg(_bufs(torch, top, kind))
                out["host"] = kind
                break
            except Exception as e:
                out[f"{kind}_error"] = f"{type(e).__name__}: {e}"
                print(f"  {kind} host buffers refused: {e}", flush=True)
        torch.cuda.synchronize()
        W: Callable[..., Any]
        R: Callable[..., Any]
        if system == "mooncake":
            out["transport"] = "tcp (Mooncake)"
            W = _mooncake_rc(te.transfer_sync_write, "transfer_sync_write")
            R = _mooncake_rc(te.transfer_sync_read, "transfer_sync_read")
        else:
            try:
                out["transport"] = te.transport_for(session)
            except Exception as e:
                out["transport"] = f"? ({type(e).__name__}: {e})"
            W, R = te.transfer_sync_write, te.transfer_sync_read
        print(f"  transport to {session}: {out['transport']}", flush=True)

        def one(n: int) -> bool:  # random bytes written from one buffer, read back into another
            ok = True
            for src, dst, dev in [(a, b, "cuda")] + ([(h0, h1, "cpu")] if h0 is not None else []):
                src[:n] = torch.randint(0, 256, (n,), dtype=torch.uint8, device=dev)
                dst[:n].zero_()
                torch.cuda.synchronize()
                _check(W(session, _ptr(src), remote, n))
                _check(R(session, _ptr(dst), remote, n))
                ok = ok and torch.equal(src[:n], dst[:n])
            return ok

        out["verified"] = _verify(sizes, one)

        def op(f: Callable[..., Any], t: Any) -> Maker:
            p = _ptr(t)
            return lambda n: (lambda: f(session, p, remote, n))
        dirs = [("write D2D", "D2D", op(W, a)), ("read D2D", "D2D", op(R, b))]
        if h0 is not None:
            sfx = " pinned" if out["host"] == "pinned" else ""
            dirs += [(f"write H2D{sfx}", f"H2D{sfx}", op(W, h0)), (f"read D2H{sfx}", f"D2H{sfx}", op(R, h1))]
        _cells(out["rows"], path, dirs, sizes, seconds)
    finally:
        _close(system, te)
    return out


def _te_initiator(env: dict[str, str], q: Any, deadline: float, *args: Any) -> None:
    """Child: _te_measure in a process started with `env`; the result goes to `q`."""
    try:
        os.environ.update(env)
        _deadline[0] = deadline
        q.put(("done", _te_measure(*args)))
    except Exception:
        q.put(("error", _err()))


def _get(q: Any, proc: Any, timeout: float, what: str) -> tuple:
    """The next message of `proc` on `q`; raises when it died or timed out first."""
    end = time.monotonic() + timeout
    while True:
        try:
            return q.get(timeout=1)
        except queue.Empty:
            if not proc.is_alive():
                try:
                    return q.get(timeout=2)
                except queue.Empty:
                    raise RuntimeError(f"{what} exited (code {proc.exitcode}) without a word") from None
            if time.monotonic() > end:
                raise TimeoutError(f"{what} said nothing within {timeout:.0f} s")


def _te(sizes: list[int], seconds: float, tcp: bool, out: dict[str, Any], system: str = "memfabric") -> None:
    import memfabric_hybrid as mf

    ctx = mp.get_context("spawn")
    env = {"MF_TRANSPORT": "tcp"} if tcp else {}
    srv = mf.start_config_store("tcp://127.0.0.1:0")
    stop, q = ctx.Event(), ctx.Queue()
    procs = []
    loader = _mooncake_env() if system == "mooncake" else {}
    try:
        target = ctx.Process(target=_te_target, args=(srv.url, max(sizes), env, q, stop, system), daemon=True)
        with _environ(loader):
            target.start()
        procs.append(target)
        _live.append(target)
        msg = _get(q, target, 120, "TE target")
        if msg[0] != "ready":
            raise RuntimeError("TE target failed:\n" + msg[1])
        _, session, remote, port = msg
        out["target"] = {"session": session, "address": hex(remote), "rpc_port": port}
        path = ("mooncake-tcp" if system == "mooncake" else "te-tcp") if tcp else "te"
        args = (srv.url, session, remote, sizes, seconds, not tcp, path)
        if not tcp:  # this process is the initiator
            _te_measure(*args, out=out)
            return
        q2 = ctx.Queue()  # a fresh initiator process, started with the same env
        ini = ctx.Process(target=_te_initiator, args=(env, q2, _deadline[0], *args, None, system), daemon=True)
        with _environ(loader):
            ini.start()
        procs.append(ini)
        _live.append(ini)
        msg = _get(q2, ini, max(60.0, _deadline[0] - time.monotonic() + 60), "TE initiator")
        if msg[0] != "done":
            raise RuntimeError("TE initiator failed:\n" + msg[1])
        rows = msg[1].pop("rows")
        out.update(msg[1])
        out["rows"].extend(rows)
    finally:
        stop.set()
        for pr in procs:
            pr.join(20)
            if pr.is_alive():
                pr.terminate()
                pr.join(5)
            _live.remove(pr)
        srv.close()


def _mooncake(sizes: list[int], seconds: float, out: dict[str, Any]) -> None:
    if not sizes:
        out["skipped"] = "no size <= 16 MiB"
    elif why := _mooncake_why():
        out["skipped"] = why
    else:
        _te(sizes, seconds, True, out, system="mooncake")
    if out.get("skipped"):
        print(f"  skipped: {out['skipped']}", flush=True)


def _vs_mooncake(secs: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """te-tcp beside mooncake-tcp, cell by cell."""
    theirs = {(r["dir"], r["bytes"]): r for r in secs.get("mooncake-tcp", {}).get("rows", []) if "gb_s" in r}
    out = []
    for r in secs.get("te-tcp", {}).get("rows", []):
        m = theirs.get((r["dir"], r["bytes"]))
        if m and "gb_s" in r:
            out.append({"dir": r["dir"], "bytes": r["bytes"], "gb_s": r["gb_s"], "mooncake_gb_s": m["gb_s"],
                        "ratio": r["gb_s"] / m["gb_s"], "p50_us": r["p50_us"], "mooncake_p50_us": m["p50_us"]})
    return out


# ---- report -------------------------------------------------------------------------------------

NAN = float("nan")


def _at(base: dict[tuple[str, int], dict[str, Any]], key: str, n: int, what: str = "gb_s") -> float:
    return base.get((key, n), {}).get(what, NAN)


def _f(v: float | None) -> float:
    return NAN if v is None else v


def _report(rows: list[dict[str, Any]], base: dict[tuple[str, int], dict[str, Any]]) -> str:
    out = []
    for r in rows:
        n, key, gb = r["bytes"], r["base"], r.get("gb_s", NAN)
        plain = key.replace(" pinned", "")
        out.append([r["path"], r["dir"], _human(n), gb, r.get("p50_us", NAN) if n <= SMALL else NAN,
                    _at(base, plain, n), _at(base, plain + " pinned", n), gb / _at(base, key, n)])
    return table(["path", "direction", "size", "ours GB/s", "ours p50 us", "cudaMemcpy GB/s",
                  "cudaMemcpy pinned GB/s", "ours/cudaMemcpy"], out)


def _summary(rows: list[dict[str, Any]], base: dict[tuple[str, int], dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (path, direction): GB/s and ratio at its largest size, p50 us at its smallest."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["path"], r["dir"]), []).append(r)
    out = []
    for (path, d), rs in groups.items():
        big, small = max(rs, key=lambda r: r["bytes"]), min(rs, key=lambda r: r["bytes"])
        gb, b = big["gb_s"], _at(base, big["base"], big["bytes"])
        s = {"path": path, "dir": d, "vs": big["base"], "largest": big["bytes"], "gb_s": gb, "base_gb_s": b,
             "ratio": gb / b, "smallest": small["bytes"], "p50_us": small["p50_us"],
             "base_p50_us": _at(base, small["base"], small["bytes"], "p50_us")}
        out.append({k: None if v != v else v for k, v in s.items()})  # NaN (no baseline) -> null
    return out


def _watchdog(result: dict[str, Any], path: str | None) -> threading.Timer:
    def fire() -> None:
        print(f"\nwatchdog: still running after {WATCHDOG_S:.0f} s (a call is stuck); stopping", flush=True)
        for pr in list(_live):
            pr.kill()
        result["watchdog"] = f"stopped after {WATCHDOG_S:.0f} s"
        try:
            write_json(path, result)
        except Exception as e:
            print(f"partial figures not written: {e}", flush=True)
        os._exit(1)
    t = threading.Timer(WATCHDOG_S, fire)
    t.daemon = True
    t.start()
    return t


def _no_cuda() -> tuple[str, Any]:
    import memfabric_hybrid as mf

    c = mf.device_info()["cuda"]
    if not c["available"]:
        return f"no CUDA here: {c.get('reason', '')}", None
    try:
        import torch
    except Exception as e:
        return f"torch is not importable ({type(e).__name__}: {e})", None
    if not torch.cuda.is_available():
        return f"torch {torch.__version__} has no CUDA (built for CUDA {torch.version.cuda})", None
    return "", torch


SECTIONS = ("cudaMemcpy", "bm", "te", "te-tcp", "mooncake-tcp")


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m memfabric_hybrid.bench device", description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default=DEFAULT_SIZES, help="copy sizes in bytes")
    p.add_argument("--seconds", type=float, default=0.3, help="measuring time per cell")
    p.add_argument("--json", default=None)
    p.add_argument("--only", default="", help=f"comma-separated sections to run ({','.join(SECTIONS)})")
    a = p.parse_args(argv)
    sizes = sorted({int(x) for x in a.sizes.split(",") if x})
    only = {x for x in a.only.split(",") if x}
    unknown = only - set(SECTIONS)
    if unknown:
        p.error(f"no section {', '.join(sorted(unknown))} (sections: {', '.join(SECTIONS)})")
    result: dict[str, Any] = {"sizes": sizes, "seconds": a.seconds}
    why, torch = _no_cuda()
    if why:
        print(f"device benchmark skipped: {why}")
        write_json(a.json, dict(result, skipped=why))
        return 0
    import memfabric_hybrid as mf

    _deadline[0] = time.monotonic() + BUDGET_S
    dog = _watchdog(result, a.json)
    gpu = mf.device_info()["cuda"]["devices"][0]
    result["gpu"] = dict(gpu, torch=torch.__version__, torch_cuda=torch.version.cuda)
    print(f"GPU 0: {gpu['name']} ({gpu['memory'] / GiB:.0f} GiB); torch {torch.__version__} (CUDA {torch.version.cuda})")
    tcp_sizes = [n for n in sizes if n <= TCP_MAX]
    sections: list[tuple[str, Callable[[dict[str, Any]], None]]] = [
        ("cudaMemcpy", lambda o: _baseline(torch, sizes, a.seconds, o)),
        ("bm", lambda o: _bm(torch, sizes, a.seconds, o)),
        ("te", lambda o: _te(sizes, a.seconds, False, o)),
        ("te-tcp", lambda o: _te(tcp_sizes, a.seconds, True, o) if tcp_sizes else o.update(error="no size <= 16 MiB")),
        ("mooncake-tcp", lambda o: _mooncake(tcp_sizes, a.seconds, o)),
    ]
    if only:
        sections = [(name, run) for name, run in sections if name in only]
    secs: dict[str, dict[str, Any]] = {}
    result["sections"] = secs
    base: dict[tuple[str, int], dict[str, Any]] = {}
    failed = False
    for name, run in sections:
        print(f"\n== {name}", flush=True)
        out: dict[str, Any] = {"rows": []}
        secs[name] = out
        t0 = time.monotonic()
        try:
            run(out) if t0 < _deadline[0] else out.update(error="skipped: time budget spent")
        except Exception:
            out["error"] = _err()
        out["seconds"] = round(time.monotonic() - t0, 1)
        torch.cuda.empty_cache()
        rows = out["rows"]
        if name == "cudaMemcpy":
            base = {(r["dir"], r["bytes"]): r for r in rows if "gb_s" in r}
            print(table(["direction", "size", "GB/s", "p50 us"],
                        [[r["dir"], _human(r["bytes"]), r.get("gb_s", NAN), r.get("p50_us", NAN)] for r in rows]))
        elif rows:
            print(_report(rows, base))
        if out.get("error"):
            print(f"  section {name} failed:\n    " + out["error"].replace("\n", "\n    "), flush=True)
        bad_ver = [k for k, v in out.get("verified", {}).items() if v is not True]
        if name != "mooncake-tcp":  # the peer's failures are reported, not ours to fail on
            failed |= bool(out.get("error") or bad_ver) or any("error" in r for r in rows)
    ours = [r for n, s in secs.items() if n != "cudaMemcpy" for r in s["rows"] if "gb_s" in r]
    result["summary"] = summ = _summary(ours, base)
    print("\n== summary (GB/s and ratio at the largest size, p50 us at the smallest)")
    print(table(["path", "direction", "vs", "largest", "GB/s", "cudaMemcpy GB/s", "ratio", "smallest", "p50 us",
                 "cudaMemcpy p50 us"],
                [[s["path"], s["dir"], s["vs"], _human(s["largest"]), *(_f(s[k]) for k in ("gb_s", "base_gb_s", "ratio")),
                  _human(s["smallest"]), _f(s["p50_us"]), _f(s["base_p50_us"])] for s in summ]) if summ else "  (none)")
    result["vs_mooncake"] = vs = _vs_mooncake(secs)
    if vs:
        print("\n== te-tcp beside Mooncake (tcp), two processes, D2D")
        print(table(["direction", "size", "ours GB/s", "Mooncake GB/s", "ours/Mooncake", "ours p50 us",
                     "Mooncake p50 us"],
                    [[v["dir"], _human(v["bytes"]), v["gb_s"], v["mooncake_gb_s"], v["ratio"], v["p50_us"],
                      v["mooncake_p50_us"]] for v in vs]))
    print("all sections ran and every copy verified" if not failed else "some cells, sections or checks FAILED (above)")
    dog.cancel()
    write_json(a.json, result)
    return 1 if failed else 0
