"""Writes a C++ program that prints the ABI of a set of smem headers: the size and alignment of
every struct, the offset and size of every field, the value of every enum constant and of every
object-like macro. The names come from the reference headers given (upstream's); compiled once
against those and once against ours, the two outputs must be identical.

    python tests/capi/layout_probe.py REFERENCE_INCLUDE_DIR > probe.cpp
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

HEADERS = ["smem.h", "smem_def.h", "smem_tls_options.h", "smem_config_store_def.h", "smem_config_store_api.h",
           "smem_bm_def.h", "smem_bm.h", "smem_shm_def.h", "smem_shm.h", "smem_trans_def.h", "smem_trans.h"]


def strip_comments(text: str) -> str:
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    return re.sub(r"//[^\n]*", " ", text)


def field_names(body: str) -> list[str]:
    names = []
    for decl in body.split(";"):
        decl = " ".join(decl.split())
        if not decl:
            continue
        fn = re.search(r"\(\s*\*\s*(\w+)\s*\)\s*\(", decl)
        if fn:
            names.append(fn.group(1))
            continue
        m = re.search(r"(\w+)\s*(\[[^\]]*\])?\s*$", decl)
        if m:
            names.append(m.group(1))
    return names


def collect(include: Path) -> tuple[dict[str, list[str]], list[str], list[str]]:
    structs: dict[str, list[str]] = {}
    enums: list[str] = []
    macros: list[str] = []
    for name in HEADERS:
        path = include / "smem" / "host" / name
        if not path.exists():
            continue
        raw = path.read_text()
        for m in re.finditer(r"^\s*#\s*define\s+(\w+)\s+(\S.*)$", raw, flags=re.M):
            if not re.search(r"_H_*$", m.group(1)):
                macros.append(m.group(1))
        text = strip_comments(raw)
        for m in re.finditer(r"typedef\s+struct\s*\w*\s*\{(.*?)\}\s*(\w+)\s*;", text, flags=re.S):
            structs[m.group(2)] = field_names(m.group(1))
        for m in re.finditer(r"typedef\s+enum\s*\w*\s*\{(.*?)\}\s*\w+\s*;", text, flags=re.S):
            for item in m.group(1).split(","):
                item = item.strip()
                if item:
                    enums.append(item.split("=")[0].strip())
    return structs, enums, macros


def program(include: Path) -> str:
    structs, enums, macros = collect(include)
    out = ["#include <cstddef>", "#include <cstdio>"]
    out += [f'#include "smem/host/{h}"' for h in HEADERS if (include / "smem" / "host" / h).exists()]
    out.append("int main() {")
    for s, fields in sorted(structs.items()):
        out.append(f'  std::printf("struct {s} size %zu align %zu\\n", sizeof({s}), alignof({s}));')
        for f in fields:
            out.append(f'  std::printf("  {s}.{f} at %zu size %zu\\n", offsetof({s}, {f}), '
                       f'sizeof((({s} *)0)->{f}));')
    for e in sorted(set(enums)):
        out.append(f'  std::printf("enum {e} = %lld\\n", (long long)({e}));')
    for m in sorted(set(macros)):
        out.append(f'  std::printf("macro {m} = %lld\\n", (long long)({m}));')
    out.append("  return 0;\n}")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.stdout.write(program(Path(sys.argv[1])))
