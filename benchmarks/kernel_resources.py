"""Registers, local-memory stack and static shared memory of every CUDA kernel of csrc/ (ptxas -v), and
the warps per SM its registers allow: a kernel bound by latency (the KNN search, the list build)
loses speed with every register step past 64, 80, 96, ... at 256 threads a block.  Needs only nvcc
(no GPU), so a change's cost in occupancy shows before a device run.

    python benchmarks/kernel_resources.py [--arch sm_90] [--filter knn] [--json out.json]

Names are demangled and shortened (namespaces and argument lists dropped, template arguments kept).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REGISTERS_PER_SM = 65536
MAX_WARPS_PER_SM = 64  # sm_80 / sm_90
ENTRY = re.compile(r"Compiling entry function '(\w+)' for '(\w+)'")
USED = re.compile(r"Used (\d+) registers(?:, used \d+ barriers)?(?:, (\d+) bytes cumulative stack size)?"
                  r"(?:, (\d+) bytes smem)?")


def nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    path = os.path.join(home, "bin", "nvcc")
    return path if os.path.exists(path) else None


def warps_per_sm(registers: int) -> int:
    """Resident warps per SM its registers allow (allocated per warp in units of 256)."""
    per_warp = -(-max(registers, 1) * 32 // 256) * 256
    return min(MAX_WARPS_PER_SM, REGISTERS_PER_SM // per_warp)


def short_name(mangled: str) -> str:
    """``search_kernel<8, false, 1, 256, false, 0>`` from the mangled name."""
    try:
        name = subprocess.run(["c++filt", mangled], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return mangled
    name = re.sub(r"\(anonymous namespace\)::", "", name)
    depth, cut = 0, len(name)
    for i, ch in enumerate(name):  # drop the argument list (the first '(' outside template brackets)
        depth += ch == "<"
        depth -= ch == ">"
        if ch == "(" and depth == 0:
            cut = i
            break
    name = name[:cut]
    if name.startswith("void "):
        name = name[5:]
    head, sep, tail = name.partition("<")
    return head.split("::")[-1] + sep + tail


def parse(log: str, source: str) -> list[dict]:
    rows, current = [], None
    for line in log.splitlines():
        m = ENTRY.search(line)
        if m:
            current = m.group(1)
            continue
        m = USED.search(line)
        if m and current:
            regs = int(m.group(1))
            rows.append(dict(source=source, kernel=short_name(current), registers=regs,
                             stack_bytes=int(m.group(2) or 0), smem_bytes=int(m.group(3) or 0),
                             warps_per_sm=warps_per_sm(regs)))
            current = None
    return rows


def compile_resources(source: str, arch: str, compiler: str) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [compiler, "-O3", "-std=c++17", f"-arch={arch}", "-I", os.path.join(ROOT, "csrc"), "-DWITH_CUDA",
               "-Xptxas", "-v", "-c", source, "-o", os.path.join(tmp, "k.o")]
        done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"nvcc failed on {source}:\n{done.stderr[-2000:]}")
    return parse(done.stderr + done.stdout, os.path.relpath(source, ROOT))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument("--filter", default="", help="only sources whose path contains this")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    compiler = nvcc()
    if compiler is None:
        print("nvcc not found: nothing to report", file=sys.stderr)
        return 0
    rows = []
    for source in sorted(glob.glob(os.path.join(ROOT, "csrc", "*", "*.cu"))):
        if args.filter in os.path.relpath(source, ROOT):
            rows += compile_resources(source, args.arch, compiler)
    print(f"## CUDA kernel resources ({args.arch}, ptxas -v)\n")
    print("| source | kernel | registers | warps / SM | stack (B) | static smem (B) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['source']} | `{r['kernel']}` | {r['registers']} | {r['warps_per_sm']} | {r['stack_bytes']} | "
              f"{r['smem_bytes']} |")
    print("\nwarps / SM: what the registers allow (a block size or shared memory may allow fewer).")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(arch=args.arch, kernels=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
