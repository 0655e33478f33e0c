"""Compile Triton kernels for sm_90 (Hopper, the H100 / H200 the benchmarks run on) with triton's own
ptxas, without a GPU, and read their register spills: the interpreter the CPU tests use never
compiles a kernel, so this is how a test bounds the code the GPU will run."""

import json
import os
import subprocess
import sys

import pytest

_SCRIPT = r"""
import importlib, json, os, re, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
for job in json.loads(sys.argv[1]):
    fn = getattr(importlib.import_module(job["module"]), job["kernel"])
    consts = job["constants"]
    sig = {n: "constexpr" if n in consts else job["types"].get(n, "*fp32" if n.endswith("_ptr") else "i32")
           for n in fn.arg_names}
    src = ASTSource(fn, sig, {(fn.arg_names.index(k),): v for k, v in consts.items()})
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                            options=dict(num_warps=job["num_warps"], enable_fp_fusion=job["fp_fusion"]))
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(kernel.asm["ptx"])
    info = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", f.name, "-o", os.devnull], capture_output=True,
                          text=True)
    spill = re.search(r"(\d+) bytes spill stores", info.stdout + info.stderr)
    print(spill.group(1) if spill else "?", flush=True)
"""


def job(module: str, kernel: str, constants: dict, num_warps: int, types: dict | None = None,
        fp_fusion: bool = True) -> dict:
    """One kernel to compile: ``types`` names the non-constexpr arguments' types where the default
    (``*fp32`` for ``*_ptr``, else ``i32``) does not fit."""
    return dict(module=module, kernel=kernel, constants=constants, num_warps=num_warps, types=types or {},
                fp_fusion=fp_fusion)


def sm90_spills(jobs: list[dict], tmp_path) -> list[int]:
    """Bytes of spill stores per job (a subprocess without TRITON_INTERPRET; skips the test when
    triton's bundled ptxas is missing)."""
    import triton

    if not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")):
        pytest.skip("triton's bundled ptxas is not there")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    result = subprocess.run([sys.executable, "-c", _SCRIPT, json.dumps(jobs)], env=env, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    spills = result.stdout.split()
    assert len(spills) == len(jobs) and "?" not in spills, result.stdout
    return [int(s) for s in spills]
