"""Small CUDA workload for ``compute-sanitizer --tool memcheck``.

Runs ``knn`` and ``knn_blend`` forward+backward (both normalizations, shared
``(P, Cf)`` and per-batch ``(B, P, Cf)`` point features) on B=2, M=1000, P=500,
K=8, and ``triplane_sample`` forward+backward (both reductions, both plane
gradient modes, float32 / bfloat16 planes, C = 32 and 33, points inside, on
the border and far outside), and the ray ops + composite chain (forward and
backward) with one backend (default ``cuda``), and compares
with the reference so a kernel that silently reads garbage is also caught.  Then the opt-in
kernel variants once each on a smaller input (``VARIANTS``: the prefetching cell scan, the
two-level list build with and without parents past the cap, the tiled blend forward and
backward).  The PyTorch caching
allocator is disabled (``PYTORCH_NO_CUDA_MEMORY_CACHING=1``) so that every
tensor is its own allocation and out-of-bounds accesses are visible to memcheck.

    compute-sanitizer --tool memcheck --error-exitcode 99 \
        python benchmarks/sanitize_ops.py [--backend cuda]

Exit status: 0 when everything ran and matched, 1 on a mismatch or exception.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("PYTORCH_NO_CUDA_MEMORY_CACHING", "1")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness  # noqa: E402
from bench_knn_blend import PARAMS, make_inputs  # noqa: E402

TOL = 1e-3


def _maxerr(a, b):
    return (a.detach().double() - b.detach().double()).abs().max().item()


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_knn_methods(backend: str, device: torch.device, B=2, M=12000, P=500, K=8) -> list[str]:
    """Every exact KNN method (grid, cell lists at two grid sizes, the cell lists' overflow
    fallback) against brute force, bit for bit, on queries of which some lie far outside."""
    import gpavatar.ops as ops

    g = torch.Generator().manual_seed(3)
    q = torch.rand(B, M, 3, generator=g) * 2 - 1
    q[:, :50] *= 40.0  # far outside the grid
    p = (torch.randn(B, P, 3, generator=g) * 0.3).clamp(-0.9, 0.9)
    p[:, 1] = p[:, 0]  # a duplicate point
    q, p = q.to(device), p.to(device)
    failures = []
    with _harness.environ(GPAVATAR_KNN="brute", GPAVATAR_KNN_CELLS=None, GPAVATAR_KNN_CELL_BUDGET=None):
        rd, ri = ops.knn(q, p, K, backend=backend)
    for name, extra in (("grid", {"GPAVATAR_KNN": "grid"}), ("cells", {"GPAVATAR_KNN": "cells"}),
                        ("cells G=5", {"GPAVATAR_KNN": "cells", "GPAVATAR_KNN_CELLS": "5"}),
                        ("cells overflow", {"GPAVATAR_KNN": "cells", "GPAVATAR_KNN_CELL_BUDGET": "3"})):
        with _harness.environ(**{"GPAVATAR_KNN_CELLS": None, "GPAVATAR_KNN_CELL_BUDGET": None, **extra}):
            d, i = ops.knn(q, p, K, backend=backend)
        _sync(device)
        same = bool(torch.equal(i, ri)) and bool(torch.equal(d, rd))
        print(f"knn {name:20s} bit-identical to brute force: {same}")
        if not same:
            failures.append(f"knn {name} differs from brute force")
    return failures


# The CUDA variants besides the defaults (environment switches) run_variants covers.
VARIANTS = (
    ("knn search unrolled", dict(GPAVATAR_KNN="cells", GPAVATAR_KNN_CUDA_SEARCH="unrolled")),
    ("knn search grouped", dict(GPAVATAR_KNN="cells", GPAVATAR_KNN_CUDA_SEARCH="grouped")),
    ("knn order centre grouped", dict(GPAVATAR_KNN="cells", GPAVATAR_KNN_CUDA_ORDER="centre",
                                      GPAVATAR_KNN_CUDA_SEARCH="grouped")),
    ("knn build flat", dict(GPAVATAR_KNN="cells", GPAVATAR_KNN_CUDA_BUILD="flat")),
    ("knn build two_level cap 40", dict(GPAVATAR_KNN="cells", GPAVATAR_KNN_CUDA_BUILD="two_level",
                                        GPAVATAR_KNN_PARENT_CAP="40")),
    ("knn build one_pass", dict(GPAVATAR_KNN="cells", GPAVATAR_KNN_CUDA_BUILD="one_pass")),
    ("knn order centre", dict(GPAVATAR_KNN="cells", GPAVATAR_KNN_CUDA_ORDER="centre")),
    ("knn order centre buffered", dict(GPAVATAR_KNN="cells", GPAVATAR_KNN_CUDA_ORDER="centre",
                                       GPAVATAR_KNN_CUDA_SEARCH="buffered")),
    ("knn build one_pass overflow", dict(GPAVATAR_KNN="cells", GPAVATAR_KNN_CUDA_BUILD="one_pass",
                                         GPAVATAR_KNN_CELL_BUDGET="3")),
    ("knn compact match", dict(GPAVATAR_KNN="cells", GPAVATAR_KNN_CUDA_COMPACT="match")),
    ("knn compact match one_pass overflow", dict(GPAVATAR_KNN="cells", GPAVATAR_KNN_CUDA_COMPACT="match",
                                                 GPAVATAR_KNN_CUDA_BUILD="one_pass", GPAVATAR_KNN_CELL_BUDGET="3")),
    ("knn compact match flat centre", dict(GPAVATAR_KNN="cells", GPAVATAR_KNN_CUDA_COMPACT="match",
                                           GPAVATAR_KNN_CUDA_BUILD="flat", GPAVATAR_KNN_CUDA_ORDER="centre")),
    ("blend queries + buffers", dict(GPAVATAR_BLEND_FORWARD="queries", GPAVATAR_BLEND_BACKWARD="buffers")),
    ("blend gather", dict(GPAVATAR_BLEND_BACKWARD="gather")),
)


def run_variants(backend: str, device: torch.device, B=2, M=3000, P=500, K=8) -> list[str]:
    """Each of VARIANTS on one input: knn bit-identical to brute force, knn_blend forward and
    backward ("queries" normalization, per-batch features: a partial last tile) against the
    reference."""
    import gpavatar.ops as ops
    from gpavatar.ops.reference import knn_blend_reference

    inp = make_inputs(B, M - 5, P, K, device=device, seed=4)
    q, p = inp["queries"], inp["points"]
    with _harness.environ(GPAVATAR_KNN="brute"):
        rd, ri = ops.knn(q, p, K, backend=backend)
    params = {k: inp[k].detach().clone() for k in PARAMS}
    params["point_features"] = params["point_features"].expand(B, -1, -1).contiguous()
    ref = None
    failures = []
    for name, extra in VARIANTS:
        with _harness.environ(**extra):
            d, i = ops.knn(q, p, K, backend=backend)
            ps = [params[k].detach().clone().requires_grad_(True) for k in PARAMS]
            out = ops.knn_blend(q, p, *ps, K, normalize="queries", backend=backend)
            got = [out[0], *torch.autograd.grad(out[0], ps, inp["grad_out"])]
        _sync(device)
        if ref is None:
            ps = [params[k].detach().clone().requires_grad_(True) for k in PARAMS]
            out = knn_blend_reference(q, p, *ps, K, normalize="queries")
            ref = [out[0], *torch.autograd.grad(out[0], ps, inp["grad_out"])]
        same = bool(torch.equal(i, ri)) and bool(torch.equal(d, rd))
        err = max(_maxerr(a, r) / (1.0 + r.abs().max().item()) for a, r in zip(got, ref))
        print(f"variant {name:28s} knn bit-identical: {same}  knn_blend max_rel_err={err:.2e}")
        if not same or err > TOL:
            failures.append(f"variant {name}: knn identical {same}, knn_blend error {err:.2e}")
    return failures


def run(backend: str, device: torch.device, B=2, M=1000, P=500, K=8) -> list[str]:
    import gpavatar.ops as ops
    from gpavatar.ops.reference import knn_blend_reference, knn_reference

    failures = []
    inp = make_inputs(B, M, P, K, device=device, seed=1)
    q, p = inp["queries"], inp["points"]

    d, i = ops.knn(q, p, K, backend=backend)
    rd, _ = knn_reference(q, p, K)
    _sync(device)
    e = _maxerr(d, rd)
    print(f"knn                      max_abs_err(dist2)={e:.2e}")
    if e > TOL:
        failures.append(f"knn dist2 error {e:.2e}")

    failures += run_knn_methods(backend, device, K=K)

    for normalize in ("neighbors", "queries"):
        for per_batch in (False, True):
            params = {k: inp[k].detach().clone() for k in PARAMS}
            if per_batch:
                params["point_features"] = params["point_features"].expand(B, -1, -1) \
                    .contiguous() + 0.01 * torch.randn(B, P, 1, generator=torch.Generator().manual_seed(2)).to(device)
            results = []
            for b in (backend, "reference"):
                ps = [params[k].detach().clone().requires_grad_(True) for k in PARAMS]
                if b == "reference":
                    out = knn_blend_reference(q, p, *ps, K, normalize=normalize)
                else:
                    out = ops.knn_blend(q, p, *ps, K, normalize=normalize, backend=b)
                grads = torch.autograd.grad(out[0], ps, inp["grad_out"])  # out[0]: feature
                _sync(device)
                results.append([out[0], *grads])
            errs = [_maxerr(a, r) / (1.0 + r.abs().max().item())
                    for a, r in zip(*results)]
            tag = f"knn_blend {normalize:9s} {'(B,P,Cf)' if per_batch else '(P,Cf)  '}"
            print(f"{tag} max_rel_err(feature, grads)={max(errs):.2e}")
            if max(errs) > TOL:
                failures.append(f"{tag} error {max(errs):.2e}")
    failures += run_triplane(backend, device)
    failures += run_rays_and_composite(backend, device)
    return failures


def run_triplane(backend: str, device: torch.device, B=2, M=700) -> list[str]:
    import gpavatar.ops as ops
    from gpavatar.ops.reference import triplane_sample_reference

    failures = []
    g = torch.Generator().manual_seed(3)
    coords = torch.rand(B, M, 3, generator=g) * 2.6 - 1.3
    coords[:, :4] = torch.tensor([[1.0, -1.0, 1.0], [5.0, 5.0, 5.0], [1e5, -1e6, 3.0], [-1.0, 0.0, 1.0]])
    coords = coords.to(device)
    for C, H, W in ((32, 20, 24), (33, 7, 5)):
        planes = torch.randn(B, 3, C, H, W, generator=g).to(device)
        for reduce in ("mean", "concat"):
            grad_out = torch.randn(B, M, 3 * C if reduce == "concat" else C, generator=g).to(device)
            for dtype in (torch.float32, torch.bfloat16):
                for deterministic in (False, True):
                    results = []
                    for b in (backend, "reference"):
                        p = planes.to(dtype).float() if b == "reference" else planes.to(dtype)
                        p = p.detach().clone().requires_grad_(True)
                        c = coords.detach().clone().requires_grad_(True)
                        if b == "reference":
                            out = triplane_sample_reference(p, c, reduce)
                        else:
                            out = ops.triplane_sample(p, c, reduce, deterministic=deterministic, backend=b)
                        grads = torch.autograd.grad(out, (p, c), grad_out)
                        _sync(device)
                        results.append([out, grads[0].float(), grads[1]])
                    errs = [_maxerr(a, r) / (1.0 + r.abs().max().item()) for a, r in zip(*results)]
                    tol = TOL if dtype == torch.float32 else 1e-2
                    tag = f"triplane C={C} {reduce:6s} {str(dtype)[6:]:8s} det={int(deterministic)}"
                    print(f"{tag} max_rel_err(out, grads)={max(errs):.2e}")
                    if max(errs) > tol:
                        failures.append(f"{tag} error {max(errs):.2e}")
    return failures


def run_rays_and_composite(backend: str, device: torch.device, R=3000, C=33) -> list[str]:
    import gpavatar.ops as ops

    failures = []
    g = torch.Generator().manual_seed(4)
    origins = (torch.randn(R, 3, generator=g) * 3).to(device)
    dirs = torch.randn(R, 3, generator=g).to(device)
    dirs[:100, 0] = 0.0
    results = {}
    for b in (backend, "torch"):
        gen = torch.Generator(device=device).manual_seed(5)
        t0, t1, hit = ops.ray_box(origins, dirs, backend=b)
        coarse = ops.stratified_depths(t0, t1, 32, True, gen, backend=b)
        alphas = torch.sigmoid(coarse - coarse.mean(dim=1, keepdim=True))
        values = torch.linspace(-1, 1, 32 * C, device=device).reshape(1, 32, C).expand(R, -1, -1).contiguous()
        out = ops.composite(alphas, values, coarse, backend=b)
        fine = ops.importance_depths(coarse, out.weights.detach(), 32, True, gen, backend=b)
        merged, order = ops.merge_samples(coarse, fine, backend=b)
        a = torch.sigmoid(merged).requires_grad_(True)
        v = values.repeat(1, 2, 1)[:, :64].contiguous().requires_grad_(True)
        out2 = ops.composite(a, v, merged, backend=b)
        grads = torch.autograd.grad(out2.color.sum() + out2.opacity.sum() + out2.depth.sum(), (a, v))
        _sync(device)
        results[b] = [t0, t1, coarse, out.color, fine, merged, out2.color, *grads]
    errs = [_maxerr(x, y) / (1.0 + y.abs().max().item()) for x, y in zip(results[backend], results["torch"])]
    print(f"rays + composite         max_rel_err={max(errs):.2e}")
    if max(errs) > TOL:
        failures.append(f"rays + composite error {max(errs):.2e}")
    return failures


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="memcheck workload for the CUDA ops")
    ap.add_argument("--backend", default="cuda")
    ap.add_argument("--device", default="cuda", help="cpu only for a dry run of this script")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 1
    failures = run(args.backend, device)
    failures += run_variants(args.backend, device)
    _sync(device)
    for f in failures:
        print("MISMATCH:", f)
    print("sanitize_ops:", "FAILED" if failures else "OK")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
