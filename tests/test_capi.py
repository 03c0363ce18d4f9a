"""The C API (libmf_smem.so, headers in rust/memfabric-capi/include): a C program compiled
against the headers moves verified bytes between two processes and sees each refusal's code."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import free_port

ROOT = Path(__file__).resolve().parent.parent
INCLUDE = ROOT / "rust" / "memfabric-capi" / "include"
HEADERS = ["smem/host/smem.h", "smem/host/smem_trans.h", "smem/host/smem_bm.h", "smem/host/smem_shm.h"]


def library_dir() -> Path:
    """Where libmf_smem.so is (built by the test run's cargo test; built here if missing)."""
    target = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
    for profile in ("debug", "release"):
        if (target / profile / "libmf_smem.so").exists():
            return target / profile
    subprocess.run(["cargo", "build", "-q", "-p", "memfabric-capi"], cwd=ROOT, check=True, timeout=1200)
    return target / "debug"


@pytest.fixture(scope="module")
def cc() -> str:
    path = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if path is None:
        pytest.skip("no C compiler (cc, gcc or clang) on this machine")
    return path


def test_headers_compile_as_c_and_cxx(cc, tmp_path):
    src = tmp_path / "all.c"
    src.write_text("".join(f'#include "{h}"\n' for h in HEADERS) + "int main(void) { return 0; }\n")
    subprocess.run([cc, "-std=c99", "-Wall", "-Wextra", "-Werror", "-pedantic", "-I", str(INCLUDE), "-fsyntax-only",
                    str(src)], check=True)
    cxx = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if cxx is not None:
        subprocess.run([cxx, "-x", "c++", "-std=c++11", "-Wall", "-Wextra", "-Werror", "-I", str(INCLUDE),
                        "-fsyntax-only", str(src)], check=True)


def build(cc: str, name: str, tmp_path: Path) -> Path:
    """Compiles tests/capi/<name>.c against the headers and links it to libmf_smem.so."""
    lib = library_dir()
    exe = tmp_path / name
    subprocess.run([cc, "-std=c11", "-D_POSIX_C_SOURCE=200809L", "-Wall", "-Wextra", "-Werror", "-O1",
                    "-I", str(INCLUDE), str(ROOT / "tests" / "capi" / f"{name}.c"),
                    "-L", str(lib), "-lmf_smem", f"-Wl,-rpath,{lib}", "-o", str(exe)], check=True)
    return exe


def test_c_program_transfers_between_two_processes(cc, tmp_path):
    exe = build(cc, "te_two_processes", tmp_path)
    out = subprocess.run([str(exe), f"tcp://127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "receiver: 256 blocks landed where addressed" in out.stdout
    assert "all verified" in out.stdout
    assert "refusals: as expected" in out.stdout


@pytest.mark.parametrize("path", ["same-host", "tcp"])
def test_c_program_big_memory_two_ranks(cc, tmp_path, path):
    exe = build(cc, "bm_two_ranks", tmp_path)
    env = dict(os.environ)
    env.pop("MF_TRANSPORT", None)
    if path == "tcp":
        env["MF_TRANSPORT"] = "tcp"
    out = subprocess.run([str(exe), f"tcp://127.0.0.1:{free_port()}"], capture_output=True, text=True,
                         timeout=120, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    for rank in (0, 1):
        assert f"rank {rank}: parts, batch and refusals verified" in out.stdout, out.stdout


def test_c_program_share_memory_three_ranks(cc, tmp_path):
    exe = build(cc, "shm_three_ranks", tmp_path)
    out = subprocess.run([str(exe), f"tcp://127.0.0.1:{free_port()}"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    for rank in range(3):
        assert f"rank {rank}: parts, gather, reach and refusals verified" in out.stdout, out.stdout
