"""pytest-benchmark cases for the volume renderer and its ray ops.

Run with ``pytest benchmarks/ --benchmark-only``.  Sizes are small (16x16 rays, 8 + 8
samples, 8 channels) so the CPU cases take a few seconds on 2 cores.  CPU cases are
parametrized over the CPU backends (``torch``, ``cpu``); CUDA cases over the CUDA
backends (``torch``, ``cuda``, ``triton``) and are skipped without a GPU or when a backend
is not available (including a C++ extension that does not register the ray / composite
ops yet, or a missing Triton composite kernel; the ray ops have no Triton kernels).
The cases are the script's ``CASES``: the ray ops, the composite, the renderer with a
trivial field (``render ...``) and with a field of ~zero cost returning precomputed
tensors (``chain ...``: the sampling + compositing chain alone, issue 5's 0.5 ms/frame
target at 128^2 x 64 on an H100).
These are timings, not tests of correctness -- the package's own suite lives in
``tests/``; ``test_script_smoke`` only checks that the benchmark script runs and its
torch rows agree with the reference, ``test_chain_field`` that the chain cases render the
precomputed tensors and differentiate w.r.t. them.
"""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_render import (  # noqa: E402
    CASES, CHAIN_KEYS, RAY_CASES, backend_unavailable, main, make_case_fn, make_inputs,
)

ops = pytest.importorskip("gpavatar.ops")

SMALL = dict(B=1, image=16, n_coarse=8, n_fine=8, C=8)
CPU_BACKENDS = ("torch", "cpu")
CUDA_BACKENDS = ("torch", "cuda", "triton")


def _backends(device: torch.device) -> list[str]:
    try:
        return list(ops.available_backends(device))
    except Exception:
        return ["torch"]


def _skip_unless_runnable(case: str, backend: str, device: torch.device) -> None:
    if backend not in _backends(device):
        pytest.skip(f"backend {backend!r} not available on {device.type}")
    why = backend_unavailable(case, backend)
    if why:
        pytest.skip(why)


@pytest.fixture(scope="module")
def cpu_inputs():
    return make_inputs(**SMALL, device="cpu", seed=0)


@pytest.fixture(scope="module")
def cuda_inputs():
    return make_inputs(**SMALL, device="cuda", seed=0)


def _group(device: str, case: str) -> str:
    return (f"{device} render {case} {SMALL['image']}x{SMALL['image']} rays "
            f"S={SMALL['n_coarse']}+{SMALL['n_fine']} C={SMALL['C']}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", CASES)
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
    path = tmp_path / "render.json"
    rc = main(["--device", "cpu", "--size", "small", "--backends", "torch", "--repeats", "2",
               "--max-seconds", "1", "--min-repeats", "1", "--json", str(path)])
    assert rc == 0
    payload = json.loads(path.read_text())
    assert payload["benchmark"] == "render" and not payload["partial"]
    rows = payload["rows"]
    assert [r["case"] for r in rows] == list(CASES)
    assert 0 < payload["config"]["hit_frac"] < 1  # the camera sees hits and misses
    for r in rows:
        assert r["error"] is None and r["correct"], r
        assert r["median_ms"] > 0 and r["speedup_vs_torch"] == 1.0 and r["B"] == 1
        assert r["ms_per_frame"] == r["median_ms"] / r["B"]


@pytest.mark.parametrize("n_fine", [4, 8])  # 8 == n_coarse: the passes are told by call order
def test_chain_field(n_fine):
    """The chain cases render the precomputed tensors of each pass and, fwd+bwd, return
    gradients w.r.t. exactly those tensors."""
    from gpavatar.ops import reference as ref

    inp = make_inputs(B=2, image=8, n_coarse=8, n_fine=n_fine, C=4, device="cpu", seed=3)
    out = make_case_fn("chain fwd", "torch", inp)()
    alpha_c, value_c = inp["chain_alpha_coarse"], inp["chain_value_coarse"]
    color = ref.composite_reference(alpha_c.reshape(-1, 8), value_c.reshape(-1, 8, 4))[0]
    torch.testing.assert_close(out["coarse"], color.reshape(2, 8, 8, 4).permute(0, 3, 1, 2))
    torch.testing.assert_close(out["coarse_alphas"], alpha_c.reshape(2, 64, 8))
    got, grads = make_case_fn("chain fwd+bwd", "torch", inp)()
    torch.testing.assert_close(got["fine"], out["fine"])
    assert [g.shape for g in grads] == [inp[k].shape for k in CHAIN_KEYS]
    assert all(bool(g.abs().sum() > 0) for g in grads)


def test_unavailable_backends_are_rows_not_crashes(tmp_path):
    """A backend whose kernels are missing is recorded with an error; the script exits 0."""
    path = tmp_path / "render.json"
    rc = main(["--device", "cpu", "--size", "small", "--cases", "merge,composite fwd", "--repeats", "1",
               "--max-seconds", "1", "--min-repeats", "1", "--json", str(path)])
    assert rc == 0
    rows = json.loads(path.read_text())["rows"]
    assert {r["backend"] for r in rows} >= {"torch"}
    for r in rows:
        assert (r["error"] is None and r["correct"]) or r["error"], r
    assert not any(r["backend"] == "triton" and r["case"] in RAY_CASES for r in rows)
