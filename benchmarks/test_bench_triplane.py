"""pytest-benchmark cases for ``triplane_sample`` (forward and forward+backward).

Run with ``pytest benchmarks/ --benchmark-only``.  Sizes are small (M=4096
points, planes 3x32x64x64) so the CPU cases take a few seconds on 2 cores.
CPU cases are parametrized over the CPU backends (``torch``, ``cpu``); CUDA cases
over the CUDA backends (``torch``, ``cuda``, ``triton``) and are skipped without
a GPU or when a backend is not available (including a C++ extension or Triton
module that does not provide triplane_sample yet).  ``det`` / ``bf16`` cases
exist for the fused backends only.  These are timings, not tests of
correctness -- the package's own suite lives in ``tests/``; ``test_script_smoke``
only checks that the benchmark script runs and its torch rows agree with the
reference.
"""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_triplane import (CASES, CPU_CASES, FUSED_ONLY, backend_unavailable,  # noqa: E402
                            main, make_case_fn, make_inputs)

ops = pytest.importorskip("gpavatar.ops")

SMALL = dict(B=1, M=4096, C=32, H=64, W=64)
CPU_BACKENDS = ("torch", "cpu")
CUDA_BACKENDS = ("torch", "cuda", "triton")


def _backends(device: torch.device) -> list[str]:
    try:
        return list(ops.available_backends(device))
    except Exception:
        return ["torch"]


def _skip_unless_runnable(case: str, backend: str, device: torch.device) -> None:
    if backend == "torch" and case in FUSED_ONLY:
        pytest.skip(f"{case!r} is measured for the fused backends only")
    if backend not in _backends(device):
        pytest.skip(f"backend {backend!r} not available on {device.type}")
    why = backend_unavailable(backend)
    if why:
        pytest.skip(why)


@pytest.fixture(scope="module")
def cpu_inputs():
    return make_inputs(**SMALL, device="cpu", seed=0)


@pytest.fixture(scope="module")
def cuda_inputs():
    return make_inputs(**SMALL, device="cuda", seed=0)


def _group(device: str, case: str) -> str:
    return f"{device} triplane {case} M={SMALL['M']} 3x{SMALL['C']}x{SMALL['H']}x{SMALL['W']}"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", CPU_CASES)
def test_cpu(benchmark, cpu_inputs, case, backend):
    _skip_unless_runnable(case, backend, torch.device("cpu"))
    benchmark.group = _group("cpu", case)
    fn = make_case_fn(case, backend, cpu_inputs)
    benchmark.pedantic(fn, rounds=5, iterations=1, warmup_rounds=1)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
@pytest.mark.parametrize("case", CASES)
def test_cuda(benchmark, request, case, backend):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    _skip_unless_runnable(case, backend, torch.device("cuda"))
    inputs = request.getfixturevalue("cuda_inputs")
    benchmark.group = _group("cuda", case)
    fn = make_case_fn(case, backend, inputs)

    def synced():
        out = fn()
        torch.cuda.synchronize()
        return out

    benchmark.pedantic(synced, rounds=50, iterations=1, warmup_rounds=3)


def test_script_smoke(tmp_path):
    """The script runs end to end on the torch backend and writes a well-formed JSON."""
    path = tmp_path / "triplane.json"
    rc = main(["--device", "cpu", "--size", "small", "--backends", "torch", "--repeats", "2",
               "--max-seconds", "1", "--min-repeats", "1", "--json", str(path)])
    assert rc == 0
    payload = json.loads(path.read_text())
    assert payload["benchmark"] == "triplane" and not payload["partial"]
    rows = payload["rows"]
    assert [r["case"] for r in rows] == [c for c in CPU_CASES if c not in FUSED_ONLY]
    for r in rows:
        assert r["error"] is None and r["correct"], r
        assert r["median_ms"] > 0 and r["speedup_vs_torch"] == 1.0
