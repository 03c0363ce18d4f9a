"""The C API (libmf_smem.so, headers in memfabric_hybrid/include): C programs compiled
against the headers move verified bytes between processes and see each refusal's code. The
same programs, compiled as C++ against upstream memfabric_hybrid 1.3.0's own headers (fetched
from its PyPI wheel by scripts/setup.sh), run on this library too; and every struct layout,
enum value, macro and function signature of those headers is checked against ours."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import free_port

ROOT = Path(__file__).resolve().parent.parent
INCLUDE = ROOT / "memfabric_hybrid" / "include"
HEADERS = ["smem/host/smem.h", "smem/host/smem_trans.h", "smem/host/smem_bm.h", "smem/host/smem_shm.h",
           "smem/host/smem_config_store_api.h"]
UPSTREAM = ROOT / ".cache" / "upstream-1.3.0" / "include"
# Upstream's smem_acc_api.h is its networking library (HTTP/TCP servers and links), not part of
# the memory fabric's API; this library does not provide it.
NOT_PROVIDED = ("smem_acc_api.h", "smem_acc_def.h")


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


@pytest.fixture(scope="module")
def cxx() -> str:
    path = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if path is None:
        pytest.skip("no C++ compiler (c++, g++ or clang++) on this machine")
    return path


@pytest.fixture(scope="module")
def upstream() -> Path:
    if not (UPSTREAM / "smem" / "host" / "smem.h").exists():
        pytest.skip(f"upstream 1.3.0 headers not in {UPSTREAM}: scripts/setup.sh fetches them from PyPI "
                    "(python scripts/fetch_upstream_headers.py)")
    return UPSTREAM


def build(cc: str, name: str, tmp_path: Path, include: Path = INCLUDE, cxx: bool = False) -> Path:
    """Compiles tests/capi/<name>.c against the headers in `include` (as C11, or as C++11) and
    links it to libmf_smem.so."""
    lib = library_dir()
    exe = tmp_path / f"{name}{'_cxx' if cxx else ''}"
    lang = ["-x", "c++", "-std=c++11"] if cxx else ["-std=c11"]
    subprocess.run([cc, *lang, "-D_POSIX_C_SOURCE=200809L", "-Wall", "-Wextra", "-Werror", "-O1",
                    "-I", str(include), str(ROOT / "tests" / "capi" / f"{name}.c"),
                    "-L", str(lib), "-lmf_smem", f"-Wl,-rpath,{lib}", "-o", str(exe)], check=True)
    return exe


def upstream_prototypes(upstream: Path) -> dict[str, str]:
    """Every function upstream's headers declare (name: declaration, comments removed)."""
    found = {}
    for header in sorted((upstream / "smem" / "host").glob("*.h")):
        if header.name in NOT_PROVIDED:
            continue
        text = re.sub(r"/\*.*?\*/", " ", header.read_text(), flags=re.S)
        text = re.sub(r"//[^\n]*", " ", text)
        text = re.sub(r"#[^\n]*", " ", text)
        for m in re.finditer(r"([A-Za-z_][\w \t\*]*?\b(smem_\w+)\s*\([^;{]*\))\s*;", text):
            if "typedef" not in m.group(1):
                found[m.group(2)] = " ".join(m.group(1).split())
    return found


def test_every_upstream_function_is_declared_alike_and_exported(cxx, upstream, tmp_path):
    """Upstream's declarations, repeated after ours in one C++ unit: a different signature is a
    conflicting declaration of a C function; taking each function's address makes the link
    fail for one the library does not export."""
    protos = upstream_prototypes(upstream)
    assert len(protos) > 60, sorted(protos)
    src = tmp_path / "declared.cpp"
    src.write_text("".join(f'#include "{h}"\n' for h in HEADERS)
                   + 'extern "C" {\n' + "".join(f"{p};\n" for p in protos.values()) + "}\n"
                   + "typedef void (*any_fn)();\nstatic any_fn all[] = {\n"
                   + "".join(f"    (any_fn){name},\n" for name in sorted(protos))
                   + "};\nint main() { return all[0] == 0; }\n")
    lib = library_dir()
    out = subprocess.run([cxx, "-std=c++11", "-Wall", "-Werror", "-I", str(INCLUDE), str(src), "-L", str(lib),
                          "-lmf_smem", f"-Wl,-rpath,{lib}", "-o", str(tmp_path / "declared")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-6000:]
    assert subprocess.run([str(tmp_path / "declared")]).returncode == 0


def test_struct_layouts_enums_and_macros_match_upstream(cxx, upstream, tmp_path):
    """The sizes and offsets of every struct field, every enum value and every numeric macro of
    upstream's headers, printed by one program built against theirs and against ours."""
    probe = subprocess.run(["python3", str(ROOT / "tests" / "capi" / "layout_probe.py"), str(upstream)],
                           capture_output=True, text=True, check=True).stdout
    (tmp_path / "probe.cpp").write_text(probe)
    printed = []
    for name, include in (("theirs", upstream), ("ours", INCLUDE)):
        exe = tmp_path / name
        built = subprocess.run([cxx, "-std=c++11", "-w", "-I", str(include), str(tmp_path / "probe.cpp"), "-o",
                                str(exe)], capture_output=True, text=True)
        assert built.returncode == 0, f"{name}: {built.stderr[-4000:]}"
        printed.append(subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout)
    assert printed[0].count("\n") > 150, printed[0]
    assert printed[0] == printed[1], "\n".join(
        f"theirs {a!r} / ours {b!r}" for a, b in zip(printed[0].splitlines(), printed[1].splitlines()) if a != b)


def test_c_program_transfers_between_two_processes(cc, tmp_path):
    exe = build(cc, "te_two_processes", tmp_path)
    check_transfer_program(exe)


def check_transfer_program(exe: Path) -> None:
    out = subprocess.run([str(exe), f"tcp://127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "receiver: 256 blocks landed where addressed" in out.stdout
    assert "all verified" in out.stdout
    assert "refusals: as expected" in out.stdout
    assert "peer-down callback named 127.0.0.1:" in out.stdout


def test_program_built_on_upstream_headers_transfers(cxx, upstream, tmp_path):
    """te_two_processes.c compiled as C++ against upstream 1.3.0's headers, run on this library."""
    check_transfer_program(build(cxx, "te_two_processes", tmp_path, include=upstream, cxx=True))


def build_for(request, cc: str, name: str, tmp_path: Path, headers: str) -> Path:
    """The program built on our headers (C11), or on upstream's (C++11; skips without them)."""
    if headers == "ours":
        return build(cc, name, tmp_path)
    return build(request.getfixturevalue("cxx"), name, tmp_path, include=request.getfixturevalue("upstream"),
                 cxx=True)


@pytest.mark.parametrize("headers", ["ours", "upstream"])
@pytest.mark.parametrize("path", ["same-host", "tcp"])
def test_c_program_big_memory_two_ranks(request, cc, tmp_path, path, headers):
    exe = build_for(request, cc, "bm_two_ranks", tmp_path, headers)
    env = dict(os.environ)
    env.pop("MF_TRANSPORT", None)
    if path == "tcp":
        env["MF_TRANSPORT"] = "tcp"
    out = subprocess.run([str(exe), f"tcp://127.0.0.1:{free_port()}"], capture_output=True, text=True,
                         timeout=120, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    for rank in (0, 1):
        assert f"rank {rank}: parts, batch and refusals verified" in out.stdout, out.stdout


@pytest.mark.parametrize("headers", ["ours", "upstream"])
def test_c_program_share_memory_three_ranks(request, cc, tmp_path, headers):
    exe = build_for(request, cc, "shm_three_ranks", tmp_path, headers)
    out = subprocess.run([str(exe), f"tcp://127.0.0.1:{free_port()}"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    for rank in range(3):
        assert f"rank {rank}: parts, gather, reach and refusals verified" in out.stdout, out.stdout
