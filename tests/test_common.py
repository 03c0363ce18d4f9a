"""The common API of the seed: return codes, last-error messages, logging, types, docs."""

from __future__ import annotations

import pytest

import memfabric_hybrid as mf
from conftest import free_port


def test_initialize_and_flags():
    assert mf.initialize() == 0
    assert mf.initialize(0) == 0
    assert mf.initialize(1) == mf.SMEM_INVALID_PARAM
    assert "reserved" in mf.get_last_err_msg()
    with pytest.raises(TypeError):
        mf.initialize("0")


def test_last_error_messages_are_kept_and_cleared():
    mf.get_and_clear_last_err_msg()
    assert mf.get_last_err_msg() == ""
    assert mf.set_log_level(7) == -2000
    assert "0 debug" in mf.get_last_err_msg()
    assert "out of range" in mf.get_and_clear_last_err_msg()
    assert mf.get_last_err_msg() == ""


def test_set_log_level_bounds_and_types():
    for lvl in (0, 1, 2, 3):
        assert mf.set_log_level(lvl) == 0
    assert mf.set_log_level(-1) == mf.SMEM_INVALID_PARAM
    assert mf.set_log_level(4) == mf.SMEM_INVALID_PARAM
    with pytest.raises(TypeError):
        mf.set_log_level("debug")
    mf.set_log_level(2)


def test_extern_logger_receives_messages_and_may_raise(capfd):
    got = []
    assert mf.set_extern_logger(lambda level, msg: got.append((level, msg))) == 0
    try:
        mf.set_log_level(0)
        assert mf.create_config_store("tcp://bad-url") == mf.SMEM_INVALID_PARAM
        assert any(lvl == 0 and "bad-url" in m for lvl, m in got), got
        # Messages below the level are filtered.
        got.clear()
        mf.set_log_level(3)
        assert mf.create_config_store("tcp://bad-url") == mf.SMEM_INVALID_PARAM
        assert got == []

        def broken(level, msg):
            raise RuntimeError("logger bug")

        mf.set_log_level(0)
        assert mf.set_extern_logger(broken) == 0
        # The failing logger does not break the call, which still reports its code.
        assert mf.create_config_store("tcp://bad-url") == mf.SMEM_INVALID_PARAM
        assert mf.create_config_store("tcp://bad-url") == mf.SMEM_INVALID_PARAM
        err = capfd.readouterr().err
        assert err.count("extern logger raised") == 1
    finally:
        mf.set_log_level(2)
        assert mf.set_extern_logger(None) == 0
    with pytest.raises(TypeError):
        mf.set_extern_logger(42)


@pytest.mark.parametrize(
    "url",
    ["", "127.0.0.1:5000", "http://127.0.0.1:5000", "tcp://127.0.0.1", "tcp://127.0.0.1:0",
     "tcp://127.0.0.1:99999", "tcp://host.example:5000", "tcp://::1:5000"],
)
def test_create_config_store_rejects_bad_urls(url):
    assert mf.create_config_store(url) == -2000
    assert repr(url) in mf.get_last_err_msg() or url in mf.get_last_err_msg()


def test_create_config_store_serves_clients():
    url = f"tcp://127.0.0.1:{free_port()}"
    assert mf.create_config_store(url) == 0
    with mf.StoreClient(url, timeout=5) as c:
        c.set("k", b"v")
        assert c.get("k") == b"v"
    # The same address twice: the port is taken, a clear error.
    assert mf.create_config_store(url) != 0
    assert "bind" in mf.get_last_err_msg()


def test_ipv6_store(store):
    try:
        server = mf.start_config_store("tcp://[::1]:0")
    except mf.StoreError as e:
        pytest.skip(f"no IPv6 loopback here: {e}")
    with server, mf.StoreClient(server.url, timeout=5) as c:
        assert server.url.startswith("tcp://[::1]:")
        c.set("six", "v6")
        assert c.get("six") == b"v6"


def test_docstrings_for_help():
    assert "flags" in mf.initialize.__doc__
    assert "0 debug" in mf.set_log_level.__doc__
    assert "tcp://ip:port" in mf.create_config_store.__doc__
    assert "TCPStore" in mf.StoreClient.__doc__
    assert "all_gather" in mf.StoreGroup.__doc__
    assert "Common interface" in mf.__doc__
    assert mf.ERROR_NAMES[-2000] == "SMEM_INVALID_PARAM"
