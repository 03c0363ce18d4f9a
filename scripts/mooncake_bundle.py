"""Trims Mooncake's CUDA wheels into what its transfer engine loads, for a GPU machine without
network (scripts/gpu_check.sh prepare; the wheel is 42 MB per Python, the bundle a quarter).

    python scripts/mooncake_bundle.py WHEEL_DIR STAGE_DIR VERSION

WHEEL_DIR holds mooncake_transfer_engine-VERSION-cp3XX-*.whl (one per CPython) and
nvidia_cuda_runtime_cu12-*.whl. STAGE_DIR gets:
  site/mooncake/              __init__.py and the engine's own libraries (engine.so goes here)
  site/mooncake_transfer_engine.libs/   the libraries the wheel vendors
  engines/engine.cp3XX.so     the engine, per CPython
  cudart/libcudart.so.12      the CUDA 12 runtime it links (CUDA 13 machines lack it)
  syslib/                     the system libraries it links, as this machine has them,
                              except the C and C++ runtimes
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
import zipfile

# Every machine has these, and a foreign copy of them would do harm.
CORE = re.compile(r"^(libc|libm|libpthread|libdl|librt|libgcc_s|libstdc\+\+|ld-linux[^.]*)\.so")


def main(wheel_dir: str, stage: str, version: str) -> int:
    for d in ("site/mooncake", "site/mooncake_transfer_engine.libs", "engines", "cudart", "syslib"):
        os.makedirs(os.path.join(stage, d), exist_ok=True)
    wheels = sorted(glob.glob(os.path.join(wheel_dir, f"mooncake_transfer_engine-{version}-cp3*-*.whl")))
    if not wheels:
        print(f"no mooncake_transfer_engine-{version} wheels in {wheel_dir}", file=sys.stderr)
        return 1
    tags = []
    for w in wheels:
        m = re.search(r"-(cp3\d+)-cp3", os.path.basename(w))
        if not m:
            continue
        tags.append(m.group(1))
        with zipfile.ZipFile(w) as z, open(os.path.join(stage, "engines", f"engine.{m.group(1)}.so"), "wb") as f:
            f.write(z.read("mooncake/engine.so"))
    with zipfile.ZipFile(wheels[0]) as z:  # the rest is the same in every wheel
        for name in ("__init__.py", "libasio.so", "libetcd_wrapper.so"):
            with open(os.path.join(stage, "site/mooncake", name), "wb") as f:
                f.write(z.read(f"mooncake/{name}"))
        for name in z.namelist():
            # Hashed second copies of libraries the engine takes from mooncake/ itself.
            if name.startswith("mooncake_transfer_engine.libs/") and not re.search(r"(etcd_wrapper|asio)-", name):
                with open(os.path.join(stage, "site", name), "wb") as f:
                    f.write(z.read(name))
    runtime = glob.glob(os.path.join(wheel_dir, "nvidia_cuda_runtime_cu12-*.whl"))
    if not runtime:
        print(f"no nvidia_cuda_runtime_cu12 wheel in {wheel_dir}", file=sys.stderr)
        return 1
    with zipfile.ZipFile(runtime[0]) as z, open(os.path.join(stage, "cudart", "libcudart.so.12"), "wb") as f:
        f.write(z.read(next(n for n in z.namelist() if n.endswith("/libcudart.so.12"))))

    # ldd of an engine in place (its RPATH finds the vendored libraries) names the rest.
    engine = os.path.join(stage, "site/mooncake/engine.so")
    shutil.copy(os.path.join(stage, "engines", f"engine.{tags[0]}.so"), engine)
    try:
        listing = subprocess.run(["ldd", engine], capture_output=True, text=True, check=False).stdout
    finally:
        os.remove(engine)
    for line in listing.splitlines():
        m = re.match(r"\s*(\S+) => (/\S+)", line)
        if m and not m.group(2).startswith(stage) and not CORE.match(m.group(1)):
            shutil.copy(m.group(2), os.path.join(stage, "syslib", m.group(1)))
    print(f"Mooncake {version}: engines for {', '.join(tags)}; "
          f"{len(os.listdir(os.path.join(stage, 'syslib')))} system libraries")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 4:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    sys.exit(main(*sys.argv[1:]))
