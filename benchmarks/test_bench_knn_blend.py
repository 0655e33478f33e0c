"""pytest-benchmark cases for ``knn`` and ``knn_blend`` (forward and forward+backward), plus
checks of the benchmark's own baselines and inputs.

Run with ``pytest benchmarks/ --benchmark-only`` for the timings.  Sizes are small (M=4096
queries, P=1024 points, K=8) so the CPU cases take a few seconds on 2 cores.  CPU cases are
parametrized over the query distributions and the CPU backends (the baselines ``torch-fast``
and ``pytorch3d``, gpavatar's ``cpu``); CUDA cases over ``torch-fast``, ``pytorch3d``,
``cuda`` and ``triton``; a backend that is not available is skipped.  These timings are not
tests of correctness -- the package's own suite lives in ``tests/``.  The tests below check
that the ``torch-fast`` baseline computes what the exact oracle computes (so the ratios
against it compare equal work), that the distributions are what the report says, and that
the script runs end to end (``test_script_smoke``).
"""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _baselines as BL  # noqa: E402
import _distributions as D  # noqa: E402
from bench_knn_blend import CASES, PARAMS, main, make_case_fn, make_inputs  # noqa: E402

ops = pytest.importorskip("gpavatar.ops")
from gpavatar.ops.reference import knn_blend_reference, knn_reference  # noqa: E402

SMALL = dict(B=1, M=4096, P=1024, K=8, Cf=32, H=64, C=32)
CPU_BACKENDS = ("torch-fast", "pytorch3d", "cpu")
CUDA_BACKENDS = ("torch-fast", "pytorch3d", "cuda", "triton")


def _available(backend: str, device: torch.device) -> bool:
    if backend == "torch-fast":
        return True
    if backend == "pytorch3d":
        return BL.pytorch3d_error() is None
    try:
        return backend in ops.available_backends(device) and not (backend == "triton" and device.type != "cuda")
    except Exception:
        return False


@pytest.fixture(scope="module")
def cpu_inputs():
    return {dist: make_inputs(**SMALL, dist=dist, device="cpu", seed=0) for dist in D.DISTRIBUTIONS}


@pytest.fixture(scope="module")
def cuda_inputs():
    return make_inputs(**SMALL, dist="render", device="cuda", seed=0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dist", D.DISTRIBUTIONS)
def test_cpu(benchmark, cpu_inputs, dist, case, backend):
    if not _available(backend, torch.device("cpu")):
        pytest.skip(f"backend {backend!r} not available on cpu")
    benchmark.group = f"cpu {dist} {case} M={SMALL['M']} P={SMALL['P']} K={SMALL['K']}"
    fn = make_case_fn(case, backend, cpu_inputs[dist])
    benchmark.pedantic(fn, rounds=5, iterations=1, warmup_rounds=1)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
@pytest.mark.parametrize("case", CASES)
def test_cuda(benchmark, request, case, backend):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if not _available(backend, torch.device("cuda")):
        pytest.skip(f"backend {backend!r} not available on cuda")
    inputs = request.getfixturevalue("cuda_inputs")
    benchmark.group = f"cuda render {case} M={SMALL['M']} P={SMALL['P']} K={SMALL['K']}"
    fn = make_case_fn(case, backend, inputs)

    def synced():
        out = fn()
        torch.cuda.synchronize()
        return out

    benchmark.pedantic(synced, rounds=50, iterations=1, warmup_rounds=3)


# --- the baselines compute what the oracle computes --------------------------------------------

def _inputs(dist: str, M: int = 777, P: int = 301, seed: int = 3) -> dict:
    # odd sizes on purpose; several chunks with the 64 KiB budget below
    return make_inputs(B=2, M=M, P=P, K=8, Cf=8, H=16, C=8, dist=dist, seed=seed)


@pytest.mark.parametrize("method", BL.DISTANCE_METHODS)
@pytest.mark.parametrize("dist", D.DISTRIBUTIONS)
def test_torch_fast_knn_matches_oracle(dist, method):
    """Indices equal to the exact oracle's except at near-ties (then the distances agree to
    1e-5 relative); dist2 equal (same arithmetic on the same neighbours)."""
    inp = _inputs(dist)
    q, p = inp["queries"], inp["points"]
    d, i = BL.knn_torch_fast(q, p, 8, method=method, memory_budget=64 << 10)
    rd, ri = knn_reference(q, p, 8)
    differ, near_ties = BL.near_tie_mismatch(d, i, rd, ri)
    assert near_ties and differ.double().mean().item() <= 0.01
    torch.testing.assert_close(d[~differ], rd[~differ], atol=0, rtol=0)
    assert bool((d[..., 1:] >= d[..., :-1]).all())


def test_torch_fast_knn_ties_lower_index_first():
    """Duplicated points (exact ties): the returned neighbours are sorted ascending with the
    lower index first, and any difference from the oracle is an (exact) tie."""
    g = torch.Generator().manual_seed(0)
    base = torch.rand(1, 40, 3, generator=g) * 2 - 1
    p = torch.cat([base, base, base[:, :7]], dim=1)  # every point twice, some three times
    q = torch.rand(1, 300, 3, generator=g) * 2 - 1
    d, i = BL.knn_torch_fast(q, p, 8)
    rd, ri = knn_reference(q, p, 8)
    differ, near_ties = BL.near_tie_mismatch(d, i, rd, ri, rtol=0, atol=0)
    assert near_ties
    same_d = d[..., 1:] == d[..., :-1]
    assert bool((i[..., 1:][same_d] > i[..., :-1][same_d]).all())


@pytest.mark.parametrize("checkpoint", [False, True])
@pytest.mark.parametrize("normalize", ["neighbors", "queries"])
@pytest.mark.parametrize("dist", ["render", "clustered"])
def test_torch_fast_blend_matches_oracle(dist, normalize, checkpoint):
    """Features within 1e-4 of the exact oracle on the queries whose neighbours match, and the
    gradients to point_features, w1, b1, w2, b2 of a random upstream gradient (zero on the
    near-tie queries, whose neighbour sets legitimately differ) within 1e-4 relative to the
    largest entry (float32 sums over 2 x 777 queries)."""
    inp = _inputs(dist)
    q, p = inp["queries"], inp["points"]
    mine = [inp[k].clone().requires_grad_(True) for k in PARAMS]
    ref_params = [inp[k].clone().requires_grad_(True) for k in PARAMS]
    f, d, i = BL.knn_blend_torch_fast(q, p, *mine, 8, normalize=normalize, memory_budget=64 << 10,
                                      checkpoint=checkpoint)
    rf, rd, ri = knn_blend_reference(q, p, *ref_params, 8, normalize=normalize)
    differ, near_ties = BL.near_tie_mismatch(d, i, rd, ri)
    assert near_ties and differ.double().mean().item() <= 0.01
    keep = ~differ
    torch.testing.assert_close(f[keep], rf[keep], atol=1e-4, rtol=0)
    grad_out = inp["grad_out"] * keep[..., None]
    for a, b in zip(torch.autograd.grad(f, mine, grad_out), torch.autograd.grad(rf, ref_params, grad_out)):
        torch.testing.assert_close(a, b, atol=1e-4 * max(1.0, b.abs().max().item()), rtol=0)


def test_torch_fast_blend_weight_sum_chunks():
    """``"queries"`` with a precomputed weight_sum over the whole pass: chunked calls agree
    with one call (what bench_e2e's chunked path relies on)."""
    inp = _inputs("uniform")
    q, p = inp["queries"], inp["points"]
    params = [inp[k] for k in PARAMS]
    whole = BL.knn_blend_torch_fast(q, p, *params, 8, normalize="queries")[0]
    d, _ = BL.knn_torch_fast(q, p, 8)
    total = (1.0 / (d + 1e-8)).sum(dim=1)
    parts = [BL.knn_blend_torch_fast(c, p, *params, 8, normalize="queries", weight_sum=total)[0]
             for c in q.split(100, dim=1)]
    torch.testing.assert_close(torch.cat(parts, dim=1), whole, atol=1e-6, rtol=1e-5)


def test_pytorch3d_blend_matches_oracle():
    pytest.importorskip("pytorch3d")
    inp = _inputs("render")
    q, p = inp["queries"], inp["points"]
    f, d, i = BL.knn_blend_pytorch3d(q, p, *[inp[k] for k in PARAMS], 8)
    rf, rd, ri = knn_blend_reference(q, p, *[inp[k] for k in PARAMS], 8)
    differ, near_ties = BL.near_tie_mismatch(d, i, rd, ri)
    assert near_ties
    torch.testing.assert_close(f[~differ], rf[~differ], atol=1e-4, rtol=0)


# --- the distributions ------------------------------------------------------------------------

def test_distributions():
    """Seeded and cached; render = coarse then fine samples of the head inside the box, the fine
    ones nearer the head; clustered = near the head; uniform fills the box."""
    P = 5023
    for dist in D.DISTRIBUTIONS:
        q, p = D.make_queries(dist, 1, 4096, P, seed=0)
        q2, _ = D.make_queries(dist, 1, 4096, P, seed=0)
        assert q.shape == (1, 4096, 3) and p.shape == (1, P, 3) and torch.equal(q, q2)
        assert bool(q.isfinite().all()) and D.describe(q)["inside_box"] > 0.99
    _, p = D.make_queries("render", 1, 4096, P)
    assert float(p.abs().max()) < 1 and float(p.abs().max()) > 0.3  # FLAME x5 in the box
    q, _ = D.make_queries("render", 1, 4096, P)
    near = torch.cdist(q[0], p[0]).min(dim=1).values
    coarse, fine = near[:2048], near[2048:]
    assert fine.median() < coarse.median() and fine.median() < 0.25
    q, _ = D.make_queries("clustered", 1, 4096, P)
    assert torch.cdist(q[0], p[0]).min(dim=1).values.median() < 0.2
    assert D.make_queries("render", 2, 1000, 700)[0].shape == (2, 1000, 3)


# --- the script --------------------------------------------------------------------------------

def test_script_smoke(tmp_path):
    """The CLI runs on the CPU at the small size with the new columns: every ratio against the
    fastest baseline, idx mismatch, one table per distribution, the oracle only when asked."""
    if "cpu" not in ops.available_backends(torch.device("cpu")):
        pytest.skip("no cpu backend in this build")
    path, md = tmp_path / "kb.json", tmp_path / "kb.md"
    rc = main(["--device", "cpu", "--size", "small", "--dist", "render,clustered", "--backends",
               "torch-fast,pytorch3d,cpu,torch", "--torch-fast-method", "mm", "--repeats", "1", "--min-repeats", "1",
               "--max-seconds", "0.1", "--json", str(path), "--markdown", str(md)])
    assert rc == 0
    payload = json.loads(path.read_text())
    assert payload["benchmark"] == "knn_blend" and not payload["partial"] and payload["error"] is None
    assert payload["config"]["dists"] == ["render", "clustered"]
    assert payload["config"]["torch_fast"]["method"] == "mm"
    if BL.pytorch3d_error() is not None:
        assert "pytorch3d" in payload["skipped"]
    rows = payload["rows"]
    backends = [b for b in ("torch-fast", "pytorch3d", "cpu", "torch") if b != "pytorch3d" or
                BL.pytorch3d_error() is None]
    assert [(r["dist"], r["case"], r["backend"]) for r in rows] == [
        (d, c, b) for d in ("render", "clustered") for c in CASES for b in backends]
    for r in rows:
        assert r["error"] is None and r["correct"], r
        assert r["best_baseline"] in ("torch-fast", "pytorch3d") and r["speedup_vs_best"] > 0
        assert r["idx_mismatch"] is not None and r["mem_vs_best"] is not None
        if r["backend"] in ("cpu", "torch"):
            assert r["idx_mismatch"] == 0
        if r["backend"] == r["best_baseline"]:
            assert r["speedup_vs_best"] == 1.0
    text = md.read_text()
    assert "vs best baseline" in text and "### `render`" in text and "### `clustered`" in text


_TC_ROWS = r"""
import sys
sys.path.insert(0, sys.argv[1])
import gpavatar.kernels.knn_blend as kernel_module
from bench_knn_blend import check_case, make_inputs

calls = []
real = kernel_module.knn_blend_forward_stacked
kernel_module.knn_blend_forward_stacked = lambda *a, **k: calls.append(1) or real(*a, **k)
inp = make_inputs(1, 64, 300, 8, 32, 64, 32, dist="render")
for case in ("knn_blend", "knn_blend+bwd"):
    row = check_case(case, "triton+tc", inp)
    print(case, len(calls), row["correct"], row["idx_mismatch"], flush=True)
"""


def test_tensor_core_rows_run_the_stacked_kernel():
    """A "+tc" row runs the stacked forward (counted; the Triton interpreter in a subprocess) and passes
    its check against the oracle, forward and backward."""
    pytest.importorskip("triton")
    import subprocess

    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    result = subprocess.run([sys.executable, "-c", _TC_ROWS, os.path.dirname(os.path.abspath(__file__))], env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    (c1, n1, ok1, mis1), (c2, n2, ok2, mis2) = [line.split() for line in result.stdout.splitlines()]
    assert (c1, c2) == ("knn_blend", "knn_blend+bwd") and 0 < int(n1) < int(n2)
    assert ok1 == ok2 == "True" and float(mis1) == float(mis2) == 0.0


def test_search_model_centre_order_stops_exactly():
    """knn_search_model's centre orders (GPAVATAR_KNN_CUDA_ORDER=centre is centre-fixed): the scan stopped
    at r - |q - c| > d_K keeps the exact K nearest of the whole list, per entry, at band starts and at
    the built edges; each scans fewer entries and inserts fewer than the box-banded lists on the same
    queries."""
    import numpy as np

    import knn_search_model as KM

    rng = np.random.default_rng(0)
    K = 8
    for _ in range(50):
        p, c = rng.uniform(-1, 1, (300, 3)), rng.uniform(-0.2, 0.2, 3)
        q = c + rng.uniform(-0.05, 0.05, 3)
        r = np.sqrt(((p - c) ** 2).sum(1))
        by_r = np.argsort(r)
        d = np.sqrt(((p[by_r] - q) ** 2).sum(1))
        s = float(np.sqrt(((q - c) ** 2).sum()))
        edges = np.concatenate([[-np.inf], np.linspace(r.min(), r.max(), 17)[1:-1]])
        for bands, e in ((0, None), (16, None), (0, edges)):
            n, ins = KM.scan_centre(d, r[by_r], s, K, bands=bands, edges=e)
            assert n < len(d) and np.array_equal(np.sort(d[:n])[:K], np.sort(d)[:K]) and ins[:K].all()
    q, p = rng.uniform(-1, 1, (4096, 3)), rng.uniform(-0.5, 0.5, (500, 3))
    box = KM.model(q, p, 8, K, warps=4)
    for order in ("centre", "centre-bands", "centre-fixed"):
        centre = KM.model(q, p, 8, K, warps=4, list_order=order)
        assert centre["scanned"] < box["scanned"] and 0 < centre["inserts"] < box["inserts"]


def test_search_model_grouped_counts():
    """knn_search_model's grouped columns: ceil(steps / 4) group steps, at most as many with an offer as
    steps with an insert and at least a quarter of them, and the instruction estimates from those counts."""
    import numpy as np

    import knn_search_model as KM

    rng = np.random.default_rng(1)
    q, p = rng.uniform(-1, 1, (4096, 3)), rng.uniform(-0.5, 0.5, (500, 3))
    r = KM.model(q, p, 8, 8, warps=4)
    assert KM.GROUP == 4
    assert r["warp_steps"] / 4 <= r["group_steps"] <= r["warp_steps"] / 4 + 1
    assert r["insert_steps"] / 4 <= r["group_offers"] <= r["insert_steps"]
    assert r["instr_banded"] == pytest.approx(r["warp_steps"] * KM.INSTR_BANDED_STEP
                                              + r["insert_steps"] * KM.INSTR_INSERT)
    assert r["instr_grouped"] == pytest.approx(r["group_steps"] * KM.INSTR_GROUP_STEP
                                               + r["group_offers"] * 4 * KM.INSTR_GROUP_OFFER
                                               + r["insert_steps"] * KM.INSTR_INSERT)
    assert "group_steps" not in KM.model(q, p, 8, 8, warps=2, pool=64)


def test_kernel_resources_parses_ptxas():
    """kernel_resources: ptxas -v lines to rows (registers, stack, shared memory, the warps an SM's
    registers allow), names shortened; with nvcc here, a real compile of one source."""
    import shutil

    import kernel_resources as KR

    log = ("ptxas info    : Compiling entry function '_ZN8gpavatar3knn12_GLOBAL__N_113bucket_kernelEPKfi' for "
           "'sm_90'\nptxas info    : Function properties for x\n    0 bytes stack frame\n"
           "ptxas info    : Used 63 registers, used 1 barriers, 80 bytes cumulative stack size, 32768 bytes smem\n")
    (row,) = KR.parse(log, "csrc/x.cu")
    assert row["kernel"] == "bucket_kernel" and row["registers"] == 63 and row["stack_bytes"] == 80
    assert row["smem_bytes"] == 32768 and row["warps_per_sm"] == 32
    assert [KR.warps_per_sm(r) for r in (32, 64, 65, 80, 128, 255)] == [64, 32, 28, 25, 16, 8]
    if shutil.which("c++filt"):
        assert KR.short_name("_ZN8gpavatar3knn12_GLOBAL__N_113search_kernelILi8ELb0EEEvPKf") == \
            "search_kernel<8, false>"
    if KR.nvcc() is not None:
        rows = KR.compile_resources(str(KR.ROOT) + "/csrc/rays/rays.cu", "sm_90", KR.nvcc())
        assert rows and all(r["registers"] > 0 and r["source"] == "csrc/rays/rays.cu" for r in rows)


def test_knn_variant_rows_run_with_their_settings(monkeypatch):
    """A "+centre" / "+onepass" / "+grouped" row runs its case with the variant's switches set (and only during the
    call), and passes its check against the oracle (on the CPU layout of the CUDA lists, where the
    switches act)."""
    import gpavatar.ops as ops

    import bench_knn_blend as KB

    monkeypatch.setenv("GPAVATAR_KNN", "cells")
    monkeypatch.setenv("GPAVATAR_KNN_LAYOUT", "cuda")
    seen = []
    real = ops.knn

    def spy(*args, **kwargs):
        seen.append((os.environ.get("GPAVATAR_KNN_CUDA_ORDER"), os.environ.get("GPAVATAR_KNN_CUDA_BUILD"),
                     os.environ.get("GPAVATAR_KNN_CUDA_SEARCH"), os.environ.get("GPAVATAR_KNN_CUDA_COMPACT")))
        return real(*args, **kwargs)

    monkeypatch.setattr(ops, "knn", spy)
    inp = KB.make_inputs(1, 2048, 400, 8, 32, 64, 32, dist="render")
    suffixes = KB.knn_variant_suffixes()
    assert suffixes[:6] == ["+centre", "+onepass", "+grouped", "+match", "+centre+onepass", "+centre+grouped"]
    assert len(suffixes) == len(set(suffixes)) == 15 and suffixes[-1] == "+centre+onepass+grouped+match"
    for backend, want in (("cpu+centre", ("centre", None, None, None)), ("cpu+onepass", (None, "one_pass", None, None)),
                          ("cpu+centre+onepass", ("centre", "one_pass", None, None)),
                          ("cpu+grouped", (None, None, "grouped", None)),
                          ("cpu+centre+grouped", ("centre", None, "grouped", None)),
                          ("cpu+onepass+match", (None, "one_pass", None, "match"))):
        seen.clear()
        row = KB.check_case("knn", backend, inp)
        assert row["correct"] and row["idx_mismatch"] == 0.0
        assert seen and set(seen) == {want}
        assert os.environ.get("GPAVATAR_KNN_CUDA_ORDER") is None


def test_tf32_rows_run_the_tensor_core_forward(monkeypatch):
    """A "+tf32" row runs its blend with GPAVATAR_BLEND_FORWARD=tiles_tf32 (only during the call) and
    passes its check (RTOL_TC) against the oracle: on the CPU the emulated tensor-core fragments."""
    import gpavatar.ops as ops

    import bench_knn_blend as KB

    if "cpu" not in ops.available_backends("cpu"):
        pytest.skip("extension not built")
    seen = []
    real = ops.knn_blend

    def spy(*args, **kwargs):
        seen.append(os.environ.get("GPAVATAR_BLEND_FORWARD"))
        return real(*args, **kwargs)

    monkeypatch.setattr(ops, "knn_blend", spy)
    inp = KB.make_inputs(1, 2048, 400, 8, 32, 64, 32, dist="render")
    row = KB.check_case("knn_blend", "cpu+tf32", inp)
    assert row["correct"] and row["idx_mismatch"] == 0.0
    assert seen and set(seen) == {"tiles_tf32"}
    assert os.environ.get("GPAVATAR_BLEND_FORWARD") is None
