"""Fetches the C headers of upstream memfabric_hybrid 1.3.0 from PyPI into
.cache/upstream-1.3.0/include (once). The C API's compatibility tests (tests/test_capi.py)
compile programs against them and run them on this library; without them those tests skip.
Only the headers are taken from the wheel; nothing of it is installed or run."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

VERSION = "1.3.0"
ROOT = Path(__file__).resolve().parent.parent
DEST = ROOT / ".cache" / f"upstream-{VERSION}" / "include"


def main() -> int:
    if (DEST / "smem" / "host" / "smem.h").exists():
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        # Any of its wheels carries the same headers; pin one so the local Python does not matter.
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
               "--python-version", "3.11", "--platform", "manylinux_2_28_x86_64", "-d", tmp,
               f"memfabric-hybrid=={VERSION}"]
        subprocess.run(cmd, check=True, timeout=300)
        wheel = next(Path(tmp).glob("*.whl"))
        prefix = "memfabric_hybrid/include/smem/host/"
        with zipfile.ZipFile(wheel) as z:
            names = [n for n in z.namelist() if n.startswith(prefix) and n.endswith(".h")]
            if not names:
                print(f"{wheel.name} has no {prefix}*.h", file=sys.stderr)
                return 1
            out = DEST / "smem" / "host"
            out.mkdir(parents=True, exist_ok=True)
            for n in names:
                (out / Path(n).name).write_bytes(z.read(n))
    print(f"upstream {VERSION} headers in {DEST}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
