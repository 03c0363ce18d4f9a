"""Fault matrix row 3b: the config store is killed and comes back, empty, at another address;
every rank calls ``bm.update_store_url`` (upstream 1.3's call for a restarted MetaService).

Two BM ranks reach each other over tcp, so besides the runtime's own store client every object
has an engine with one: all of them must move, or peers would not find each other's engines
and new objects could not be created."""

from __future__ import annotations

import time

import memfabric_hybrid as mf
from conftest import free_port
from _faults import SLACK, Target, engine, kill_store, start_store, verified_write, wait_for
import _fault_workers

SIZE = 2 << 20


def ask_all(cmds, out, *cmd, timeout: float = 60) -> list:
    for q in cmds:
        q.put(cmd)
    return sorted(out.get(timeout=timeout) for _ in cmds)


def test_store_restarted_at_another_address(spawn):
    # Before initialize there is nothing to move.
    assert mf.bm.update_store_url("tcp://127.0.0.1:1") == mf.SMEM_NOT_INIT
    old_url = f"tcp://127.0.0.1:{free_port()}"
    old = start_store(old_url)
    new = None
    cmds = [spawn.Queue() for _ in range(2)]
    out = spawn.Queue()
    ranks = [spawn.Process(target=_fault_workers.bm_mover_rank, args=(old_url, r, SIZE, cmds[r], out))
             for r in range(2)]
    try:
        for p in ranks:
            p.start()
        assert sorted(out.get(timeout=90) for _ in ranks) == [("ready", 0), ("ready", 1)]
        assert ask_all(cmds, out, "copy", 1) == [("copy", 0, True), ("copy", 1, True)]

        # Refused moves change nothing: a malformed URL, and an address where no store answers
        # (given up within init_timeout, 2 s here).
        (_, _, rc, _, msg), = ask_all(cmds[:1], out, "move", "tcp://no-such-store")
        assert rc == mf.SMEM_INVALID_PARAM, msg
        nobody = f"tcp://127.0.0.1:{free_port()}"
        (_, _, rc, took, msg), = ask_all(cmds[:1], out, "move", nobody)
        assert rc == mf.SMEM_NOT_CONNECTED, msg
        assert took < 2.0 + SLACK, took
        assert old_url in msg, msg
        probe = mf.StoreClient(old_url, timeout=2.0)
        engines_before = sorted(k for k in probe.list("mf/te/") if not k.endswith("/regions"))
        assert len(engines_before) == 2, engines_before
        probe.close()

        kill_store(old)
        old = None
        new_url = f"tcp://127.0.0.1:{free_port()}"
        new = start_store(new_url)
        moves = ask_all(cmds, out, "move", new_url)
        assert [(r, rc) for _, r, rc, _, _ in moves] == [(0, 0), (1, 0)], moves
        # The new store learned every engine (the objects' own store clients moved too).
        probe = mf.StoreClient(new_url, timeout=2.0)
        assert wait_for(lambda: sorted(k for k in probe.list("mf/te/") if not k.endswith("/regions"))
                        == engines_before, 2.0), probe.list("mf/te/")
        # Old objects go on; a new object is created through the new store, collectively, and
        # its engines find each other there.
        assert ask_all(cmds, out, "copy", 2) == [("copy", 0, True), ("copy", 1, True)]
        assert ask_all(cmds, out, "create", 1) == [("create", 0, 0, True), ("create", 1, 0, True)]
        engines_after = [k for k in probe.list("mf/te/") if not k.endswith("/regions")]
        assert len(engines_after) == 4, engines_after
        probe.close()
        assert ask_all(cmds, out, "stop") == [("stopped", 0), ("stopped", 1)]
        print(f"\n[row 3b] update_store_url took {max(m[3] for m in moves):.3f} s")
    finally:
        for p in ranks:
            p.join(15)
            if p.is_alive():
                p.kill()
        for s in (old, new):
            if s is not None:
                kill_store(s)
    assert [p.exitcode for p in ranks] == [0, 0]


def test_engines_move_to_a_store_at_another_address(spawn):
    """Transfer Engines (an extension beside BM's 1.3 call): the target and the initiator move;
    an engine that starts on the new store finds the target there."""
    old_url = f"tcp://127.0.0.1:{free_port()}"
    old = start_store(old_url)
    new = None
    target = e = None
    try:
        target = Target(spawn, old_url, SIZE)
        e, mem = engine(old_url, SIZE)
        verified_write(e, mem, target, SIZE, seed=1)
        assert e.update_store_url("tcp://no-such-store") == mf.SMEM_INVALID_PARAM
        kill_store(old)
        old = None
        new_url = f"tcp://127.0.0.1:{free_port()}"
        new = start_store(new_url)
        assert target.ask("move", new_url) == (0, "")
        assert e.update_store_url(new_url) == 0, mf.get_last_err_msg()
        verified_write(e, mem, target, SIZE, seed=2)
        # An engine that never knew the old store finds the target through the new one.
        late, late_mem = engine(new_url, SIZE)
        try:
            verified_write(late, late_mem, target, SIZE, seed=3)
        finally:
            late.destroy()
    finally:
        if e is not None:
            e.destroy()
        if target is not None:
            target.stop()
        for s in (old, new):
            if s is not None:
                kill_store(s)
    assert target.proc.exitcode == 0
