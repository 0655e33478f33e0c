"""pytest-benchmark cases for ``knn`` and ``knn_blend`` (forward and forward+backward).

Run with ``pytest benchmarks/ --benchmark-only``.  Sizes are small (M=4096
queries, P=1024 points, K=8) so the CPU cases take a few seconds on 2 cores.
CPU cases are parametrized over the CPU backends (``torch``, ``cpu``); CUDA cases
over the CUDA backends (``torch``, ``cuda``, ``triton``) and are skipped without
a GPU or when a backend is not available.  These are timings, not tests of
correctness -- the package's own suite lives in ``tests/``.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_knn_blend import make_case_fn, make_inputs  # noqa: E402

ops = pytest.importorskip("gpavatar.ops")

SMALL = dict(B=1, M=4096, P=1024, K=8, Cf=32, H=64, C=32)
CPU_BACKENDS = ("torch", "cpu")
CUDA_BACKENDS = ("torch", "cuda", "triton")
CASES = ("knn", "knn_blend", "knn_blend+bwd")


def _backends(device: torch.device) -> list[str]:
    try:
        return list(ops.available_backends(device))
    except Exception:
        return ["torch"]


@pytest.fixture(scope="module")
def cpu_inputs():
    return make_inputs(**SMALL, device="cpu", seed=0)


@pytest.fixture(scope="module")
def cuda_inputs():
    return make_inputs(**SMALL, device="cuda", seed=0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", CASES)
def test_cpu(benchmark, cpu_inputs, case, backend):
    if backend not in _backends(torch.device("cpu")):
        pytest.skip(f"backend {backend!r} not available on cpu")
    benchmark.group = f"cpu {case} M={SMALL['M']} P={SMALL['P']} K={SMALL['K']}"
    fn = make_case_fn(case, backend, cpu_inputs)
    benchmark.pedantic(fn, rounds=5, iterations=1, warmup_rounds=1)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
@pytest.mark.parametrize("case", CASES)
def test_cuda(benchmark, request, case, backend):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if backend not in _backends(torch.device("cuda")):
        pytest.skip(f"backend {backend!r} not available on cuda")
    inputs = request.getfixturevalue("cuda_inputs")
    benchmark.group = f"cuda {case} M={SMALL['M']} P={SMALL['P']} K={SMALL['K']}"
    fn = make_case_fn(case, backend, inputs)

    def synced():
        out = fn()
        torch.cuda.synchronize()
        return out

    benchmark.pedantic(synced, rounds=50, iterations=1, warmup_rounds=3)
