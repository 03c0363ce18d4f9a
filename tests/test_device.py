"""Device backends: what device_info() reports, the not-found paths, and (on a GPU) CUDA.

Without a GPU (CI, every developer machine so far) the CUDA class skips with the reason that
device_info() gives; everything else runs everywhere. Library lookups are made deterministic
by pointing MF_CUDA_LIBRARY / MF_ASCEND_LIBRARY at files that do not exist, in a child
process (a process probes its backends once).
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

import memfabric_hybrid as mf
from conftest import NO_ASCEND, NO_CUDA, run_child

MiB = 1 << 20
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_device_info_shape():
    info = mf.device_info()
    assert set(info) == {"host", "cuda", "ascend"}
    for name, entry in info.items():
        assert isinstance(entry["available"], bool), name
        assert isinstance(entry["selected"], bool) and (entry["available"] or not entry["selected"]), name
        if entry["available"]:
            assert isinstance(entry["devices"], list) and entry["devices"], name
            for d in entry["devices"]:
                assert set(d) == {"id", "name", "memory"}
                assert isinstance(d["id"], int) and isinstance(d["name"], str)
                assert isinstance(d["memory"], int) and d["memory"] >= 0
        else:
            assert isinstance(entry["reason"], str) and entry["reason"], name
    host = info["host"]
    assert host["available"] and host["devices"][0]["id"] == 0 and host["devices"][0]["memory"] > 0
    # The answer is stable: probed once per process.
    assert mf.device_info() == info
    assert "device_info" in mf.__all__ and "device_info" in (mf.__doc__ or "")
    doc = mf.device_info.__doc__ or ""
    assert "Example" in doc and "MF_CUDA_LIBRARY" in doc


def test_not_found_reasons_name_what_was_looked_for():
    info = run_child(
        """
        import json, memfabric_hybrid as mf
        print(json.dumps(mf.device_info()))
        """,
        MF_CUDA_LIBRARY=NO_CUDA, MF_ASCEND_LIBRARY=NO_ASCEND,
    )
    cuda, ascend = info["cuda"], info["ascend"]
    assert cuda == {"available": False, "reason": cuda["reason"], "selected": False}
    assert [k for k, v in info.items() if v["selected"]] == []
    assert cuda["reason"].startswith("CUDA driver not found: tried " + NO_CUDA + " ("), cuda
    assert "No such file" in cuda["reason"] and "MF_CUDA_LIBRARY" in cuda["reason"]
    assert ascend["reason"].startswith("Ascend runtime not found: tried " + NO_ASCEND + " ("), ascend
    assert "MF_ASCEND_LIBRARY" in ascend["reason"]
    assert info["host"]["available"]


def test_default_search_names_the_standard_places():
    info = mf.device_info()
    if info["ascend"]["available"]:
        pytest.skip("an Ascend runtime is installed here")
    reason = info["ascend"]["reason"]
    if os.environ.get("MF_ASCEND_LIBRARY"):
        assert os.environ["MF_ASCEND_LIBRARY"] in reason
    else:
        assert "/usr/local/Ascend/ascend-toolkit/latest/lib64/libascendcl.so" in reason, reason
        assert "libascendcl.so (" in reason
    if not info["cuda"]["available"] and not os.environ.get("MF_CUDA_LIBRARY"):
        assert "libcuda.so.1 (" in info["cuda"]["reason"]


BM_CHILD = """
    import json, memfabric_hybrid as mf
    srv = mf.start_config_store("tcp://127.0.0.1:0")
    cfg = mf.bm.BmConfig()
    cfg.auto_ranking = True
    cfg.set_nic("lo")
    assert mf.bm.initialize(srv.url, 1, 0, cfg) == 0, mf.get_last_err_msg()
    out = {}
    try:
        mf.bm.create(0, 2 * (1 << 20), local_hbm_size=1 << 20)
    except mf.MemFabricError as e:
        out["hbm"] = [e.code, str(e), mf.get_last_err_msg()]
    big = mf.bm.create(1, 2 * (1 << 20))
    rc = big.copy_data(1, 2, 8, mf.bm.BmCopyType.H2G, 0, 0x1234)
    out["stream"] = [rc, mf.get_last_err_msg()]

    class NpuStream:  # what torch_npu.npu.Stream exposes
        npu_stream = 0x5678

    class CudaStream:  # what torch.cuda.Stream exposes
        cuda_stream = 0x9ABC

    for name, s in (("npu", NpuStream()), ("cuda", CudaStream())):
        rc = big.copy_data(1, 2, 8, mf.bm.BmCopyType.H2G, 0, s)
        out[name] = [rc, mf.get_last_err_msg()]
    print(json.dumps(out))
"""


def test_bm_hbm_and_device_streams_say_why():
    out = run_child(BM_CHILD, MF_CUDA_LIBRARY=NO_CUDA, MF_ASCEND_LIBRARY=NO_ASCEND)
    code, text, last = out["hbm"]
    assert code == mf.MF_UNSUPPORTED == -3006
    for msg in (text, last):
        assert "local_hbm_size 1048576: no device memory here (no device backend: " in msg, msg
        assert "CUDA driver not found: tried " + NO_CUDA in msg, msg
        assert "Ascend runtime not found: tried " + NO_ASCEND in msg, msg
    rc, msg = out["stream"]
    assert rc == mf.MF_UNSUPPORTED
    assert "device stream handle 0x1234 given, but no device backend: " in msg, msg
    assert "CUDA driver not found" in msg and "Ascend runtime not found" in msg, msg
    # A torch_npu stream goes to the Ascend backend, a torch.cuda one to CUDA: each says why
    # its own backend is missing.
    rc, msg = out["npu"]
    assert rc == mf.MF_UNSUPPORTED
    assert "a stream of the ascend backend given, but Ascend runtime not found: tried " + NO_ASCEND in msg, msg
    assert "CUDA" not in msg, msg
    rc, msg = out["cuda"]
    assert rc == mf.MF_UNSUPPORTED
    assert "a stream of the cuda backend given, but CUDA driver not found: tried " + NO_CUDA in msg, msg
    assert "Ascend" not in msg, msg


def test_bm_hbm_in_this_process(store):
    if mf.device_info()["cuda"]["available"] or mf.device_info()["ascend"]["available"]:
        pytest.skip("an accelerator is present; TestCuda covers this case")
    if any(v["selected"] for v in mf.device_info().values()):
        pytest.skip("MF_DEVICE_BACKEND chose a backend; test_host_device.py covers this case")
    cfg = mf.bm.BmConfig()
    cfg.auto_ranking = True
    cfg.set_nic("lo")
    assert mf.bm.initialize(store.url, 1, 0, cfg) == 0, mf.get_last_err_msg()
    try:
        with pytest.raises(mf.MemFabricError) as ei:
            mf.bm.create(0, MiB, local_hbm_size=MiB)
        assert ei.value.code == mf.MF_UNSUPPORTED
        info = mf.device_info()
        assert info["cuda"]["reason"] in str(ei.value)
        assert info["ascend"]["reason"] in str(ei.value)
    finally:
        mf.bm.uninitialize()


def _cuda_reason() -> str:
    c = mf.device_info()["cuda"]
    return "" if c["available"] else c["reason"]


@pytest.mark.skipif(bool(_cuda_reason()), reason=f"no CUDA: {_cuda_reason()}")
class TestCuda:
    """Runs where the CUDA driver loads (a machine with an NVIDIA GPU)."""

    def test_devices_match_torch(self):
        devs = mf.device_info()["cuda"]["devices"]
        assert devs and all(d["memory"] > 0 and d["name"] for d in devs)
        torch = pytest.importorskip("torch")
        if not torch.cuda.is_available():
            pytest.skip("torch has no CUDA here")
        assert len(devs) == torch.cuda.device_count()
        for d in devs:
            assert d["name"] == torch.cuda.get_device_name(d["id"])
            assert d["memory"] == torch.cuda.get_device_properties(d["id"]).total_memory

    def test_torch_cuda_tensors_round_trip(self):
        # The device the backend reports is usable by the framework in the same process
        # (primary contexts are shared): allocate, copy both ways, verify.
        torch = pytest.importorskip("torch")
        if not torch.cuda.is_available():
            pytest.skip("torch has no CUDA here")
        x = torch.arange(1 << 20, dtype=torch.int32)
        y = x.cuda()
        z = torch.empty_like(y)
        z.copy_(y)
        assert torch.equal(z.cpu(), x)

    def test_rust_gpu_suite(self):
        # The device API itself (alloc, H2D/D2H/D2D, streams, events, IPC across processes)
        # is checked by the Rust GPU tests; run them here so one pytest run covers it all.
        # MF_GPU_TEST_BINARY: the core's test binary built elsewhere (scripts/gpu_check.sh),
        # for GPU machines without a Rust toolchain.
        binary = os.environ.get("MF_GPU_TEST_BINARY")
        cargo = shutil.which("cargo")
        if binary:
            cmd = [binary, "device::cuda::gpu", "--nocapture", "--test-threads=1"]
        elif cargo is not None:
            cmd = [cargo, "test", "-q", "-p", "memfabric", "--lib", "device::cuda::gpu", "--", "--nocapture",
                   "--test-threads=1"]
        else:
            pytest.skip("cargo is not installed here and MF_GPU_TEST_BINARY is not set")
        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
        text = out.stdout + out.stderr
        assert out.returncode == 0, text
        assert "GPU check skipped" not in text, text
        assert "ipc child verified" in text, text
