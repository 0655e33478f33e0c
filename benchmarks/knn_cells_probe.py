"""Exactness and tuning probe of the exact KNN methods on one device (meant for a GPU run).

For each query distribution of ``_distributions`` (render, uniform, clustered) at the paper
size (M = 524288, P = 5023, K = 8 by default), the brute-force scan is the reference; every
other method (the grid, the cell lists at several grid sizes G, the cell lists with a tiny list
budget that forces the overflow fallback, the Triton cell lists) must return bit-identical
``dist2`` and ``idx``.  Each is timed (CUDA events, median), next to the ``torch-fast``
baseline, and one call of the default cell path is profiled kernel by kernel.

    python benchmarks/knn_cells_probe.py --device cuda --json probe.json --markdown probe.md

The environment switches the C++/Triton code reads on every call (``GPAVATAR_KNN``,
``GPAVATAR_KNN_CELLS``, ``GPAVATAR_KNN_CELL_BUDGET``) select the method; they are restored
afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _baselines  # noqa: E402
import _harness  # noqa: E402
import _distributions  # noqa: E402

import gpavatar.ops as ops  # noqa: E402


env = _harness.environ


def timed(fn, device, warmup=3, repeats=20, max_seconds=2.0):
    for _ in range(warmup):
        fn()
    times = []
    start = time.perf_counter()
    for _ in range(repeats):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        if time.perf_counter() - start > max_seconds and len(times) >= 3:
            break
    return statistics.median(times)


def profile_once(fn, device, label):
    """Per-kernel device times of one call (torch.profiler), as rows (name, calls, ms)."""
    rows = [(name[:90], calls, ms) for name, calls, ms in _harness.kernel_times(fn, device)]
    print(f"\n== kernels of one call: {label} ==")
    for name, n, ms in rows[:20]:
        print(f"  {ms:8.4f} ms  x{n:<3d} {name}")
    return [dict(kernel=n, calls=c, ms=round(ms, 5)) for n, c, ms in rows[:20]]


def run_once(args, device, backend):
    """knn (every scan, list build and band order) and knn_blend forward + backward, once each."""
    q, p = _distributions.make_queries("render", 1, args.M, args.P, device=device)
    for extra in (dict(), dict(GPAVATAR_KNN_CUDA_SEARCH="buffered"), dict(GPAVATAR_KNN_CUDA_SEARCH="unrolled"),
                  dict(GPAVATAR_KNN_CUDA_SEARCH="grouped"),
                  dict(GPAVATAR_KNN_CUDA_BUILD="flat"), dict(GPAVATAR_KNN_CUDA_BUILD="one_pass"),
                  dict(GPAVATAR_KNN_CUDA_ORDER="centre")):
        with env(GPAVATAR_KNN="cells", **extra):
            ops.knn(q, p, args.K, backend=backend)
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(args.P, 32, generator=g).to(device).requires_grad_(True)
    w1 = (torch.randn(64, 32 + 27, generator=g) * 0.1).to(device).requires_grad_(True)
    b1 = torch.zeros(64, device=device, requires_grad=True)
    w2 = (torch.randn(32, 64, generator=g) * 0.1).to(device).requires_grad_(True)
    b2 = torch.zeros(32, device=device, requires_grad=True)
    for backward in ("buffers", "gather", "tiles"):
        with env(GPAVATAR_BLEND_BACKWARD=backward, GPAVATAR_BLEND_FORWARD="tiles" if backward == "tiles" else "queries"):
            out = ops.knn_blend(q, p, feats, w1, b1, w2, b2, K=args.K, backend=backend).feature
            out.square().sum().backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--M", type=int, default=524288)
    ap.add_argument("--P", type=int, default=5023)
    ap.add_argument("--K", type=int, default=8)
    ap.add_argument("--dist", default="render,uniform,clustered")
    ap.add_argument("--grids", default="8,12,16,20,24,32")
    ap.add_argument("--no-triton", action="store_true")
    ap.add_argument("--once", action="store_true",
                    help="run each CUDA kernel variant once on the render samples, untimed (a target for "
                         "ncu: benchmarks/profile_knn_ncu.sh)")
    ap.add_argument("--json")
    ap.add_argument("--markdown")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    backend = "cuda" if device.type == "cuda" else "cpu"
    if args.once:
        return run_once(args, device, backend)
    rows, profiles, failures = [], {}, 0
    for dist in args.dist.split(","):
        q, p = _distributions.make_queries(dist, 1, args.M, args.P, device=device)
        print(f"\n### {dist}: M={args.M} P={args.P} K={args.K} {_distributions.describe(q.cpu())}")
        with env(GPAVATAR_KNN="brute"):
            ref_d, ref_i = ops.knn(q, p, args.K, backend=backend)
        cases = [("brute", backend, dict(GPAVATAR_KNN="brute")), ("grid", backend, dict(GPAVATAR_KNN="grid"))]
        for G in [int(g) for g in args.grids.split(",")]:
            cases.append((f"cells G={G}", backend, dict(GPAVATAR_KNN="cells", GPAVATAR_KNN_CELLS=G,
                                                        GPAVATAR_KNN_CUDA_BUILD="flat")))
        if backend == "cuda":
            # The two-level list build (knn_cells.h; the same lists from the parents' lists), at every G;
            # the buffered scan (measured slower on an H200 at every G) at the default G only.
            for G in [int(g) for g in args.grids.split(",")]:
                cases.append((f"cells two_level G={G}", backend,
                              dict(GPAVATAR_KNN="cells", GPAVATAR_KNN_CELLS=G, GPAVATAR_KNN_CUDA_BUILD="two_level")))
            # the two-level build in one launch (room reserved with an atomic), at the default G and at 24
            for G in (16, 24):
                cases.append((f"cells one_pass G={G}", backend,
                              dict(GPAVATAR_KNN="cells", GPAVATAR_KNN_CELLS=G, GPAVATAR_KNN_CUDA_BUILD="one_pass")))
            # the lists banded by distance from the cell's centre, at the default G and at 24
            for G in (16, 24):
                cases.append((f"cells centre G={G}", backend,
                              dict(GPAVATAR_KNN="cells", GPAVATAR_KNN_CELLS=G, GPAVATAR_KNN_CUDA_ORDER="centre")))
            cases.append(("cells buffered", backend, dict(GPAVATAR_KNN="cells", GPAVATAR_KNN_CUDA_SEARCH="buffered")))
            # the prefetching scan (no faster on an H200), alone and with the two-level build at the larger grids
            cases.append(("cells unrolled", backend, dict(GPAVATAR_KNN="cells", GPAVATAR_KNN_CUDA_SEARCH="unrolled")))
            # four entries compared with the K-th before any is offered (knn_cells.h: scan_grouped)
            cases.append(("cells grouped", backend, dict(GPAVATAR_KNN="cells", GPAVATAR_KNN_CUDA_SEARCH="grouped")))
            cases.append(("cells centre grouped", backend, dict(GPAVATAR_KNN="cells", GPAVATAR_KNN_CUDA_ORDER="centre",
                                                                GPAVATAR_KNN_CUDA_SEARCH="grouped")))
            for G in [int(g) for g in args.grids.split(",") if int(g) >= 24]:
                cases.append((f"cells two_level unrolled G={G}", backend,
                              dict(GPAVATAR_KNN="cells", GPAVATAR_KNN_CELLS=G, GPAVATAR_KNN_CUDA_BUILD="two_level",
                                   GPAVATAR_KNN_CUDA_SEARCH="unrolled")))
        cases.append(("cells budget=4 (overflow)", backend, dict(GPAVATAR_KNN="cells", GPAVATAR_KNN_CELL_BUDGET=4)))
        cases.append(("auto", backend, dict()))
        if not args.no_triton:
            cases.append(("triton auto", "triton", dict()))
            cases.append(("triton brute", "triton", dict(GPAVATAR_KNN="brute")))
        for name, be, e in cases:
            try:
                with env(**e):
                    d, i = ops.knn(q, p, args.K, backend=be)
                    same_i = bool(torch.equal(i, ref_i))
                    same_d = bool(torch.equal(d, ref_d))
                    n_bad = int((i != ref_i).any(-1).sum())
                    ms = timed(lambda: ops.knn(q, p, args.K, backend=be), device)
                status = "ok" if same_i and same_d else f"MISMATCH ({n_bad} queries)"
            except Exception as exc:  # record and go on
                ms, status, same_i, same_d = float("nan"), f"ERROR {type(exc).__name__}: {exc}"[:200], False, False
            failures += status != "ok"
            rows.append(dict(dist=dist, method=name, backend=be, ms=round(ms, 4), status=status))
            print(f"  {name:28s} {be:7s} {ms:9.4f} ms  {status}")
        try:
            fast = lambda: _baselines.knn_torch_fast(q, p, args.K)  # noqa: E731
            ms = timed(fast, device)
            d, i = fast()
            differ, all_near_ties = _baselines.near_tie_mismatch(d, i, ref_d, ref_i)
            mism = f"{int(differ.sum())} queries differ (all near-ties: {all_near_ties})"
            rows.append(dict(dist=dist, method="torch-fast", backend="torch", ms=round(ms, 4), status="baseline"))
            print(f"  {'torch-fast':28s} {'torch':7s} {ms:9.4f} ms  baseline {mism if mism is not None else ''}")
        except Exception as exc:
            print(f"  torch-fast failed: {type(exc).__name__}: {exc}")
        if _baselines.pytorch3d_error() is None:
            ms = timed(lambda: _baselines.knn_pytorch3d(q, p, args.K), device)
            rows.append(dict(dist=dist, method="pytorch3d", backend="pytorch3d", ms=round(ms, 4), status="baseline"))
            print(f"  {'pytorch3d':28s} {'':7s} {ms:9.4f} ms  baseline")
        if device.type == "cuda":
            with env(GPAVATAR_KNN="cells"):
                profiles[f"{dist} knn cells"] = profile_once(lambda: ops.knn(q, p, args.K, backend=backend),
                                                             device, f"{dist} knn cells")
            for G in (16, 24, 32):
                with env(GPAVATAR_KNN="cells", GPAVATAR_KNN_CELLS=G, GPAVATAR_KNN_CUDA_BUILD="two_level"):
                    profiles[f"{dist} knn cells two_level G={G}"] = profile_once(
                        lambda: ops.knn(q, p, args.K, backend=backend), device, f"{dist} knn cells two_level G={G}")
            H, C = 64, 32
            g = torch.Generator(device="cpu").manual_seed(0)
            feats = torch.randn(args.P, 32, generator=g).to(device)
            w1 = (torch.randn(H, 32 + 27, generator=g) * 0.1).to(device)
            b1 = torch.zeros(H).to(device)
            w2 = (torch.randn(C, H, generator=g) * 0.1).to(device)
            b2 = torch.zeros(C).to(device)
            params = [t.clone().requires_grad_(True) for t in (feats, w1, b1, w2, b2)]
            ref_out = ref_grads = None
            per_query = dict(GPAVATAR_BLEND_FORWARD="queries", GPAVATAR_BLEND_BACKWARD="buffers")
            variants = [("queries+buffers", backend, dict(GPAVATAR_BLEND_CUDA_VARIANT="default", **per_query)),
                        ("occupancy", backend, dict(GPAVATAR_BLEND_CUDA_VARIANT="occupancy", **per_query)),
                        ("generic", backend, dict(GPAVATAR_BLEND_CUDA_VARIANT="generic", **per_query)),
                        ("gather backward", backend, dict(GPAVATAR_BLEND_FORWARD="queries",
                                                          GPAVATAR_BLEND_BACKWARD="gather")),
                        ("tiles", backend, dict(GPAVATAR_BLEND_FORWARD="tiles", GPAVATAR_BLEND_BACKWARD="tiles")),
                        ("auto", backend, dict())]
            if not args.no_triton:
                variants += [(f"triton {d}", "triton", dict(GPAVATAR_TRITON_DOT_PRECISION=d))
                             for d in ("ieee", "tf32", "tf32x3")]
            for variant, be, extra in variants:
                blend = lambda: ops.knn_blend(q, p, feats, w1, b1, w2, b2, K=args.K, backend=be)  # noqa: E731

                def blend_fwd_bwd():
                    out = ops.knn_blend(q, p, *params, K=args.K, backend=be).feature
                    return torch.autograd.grad(out, params, torch.ones_like(out))

                try:
                    with env(**extra):
                        out = blend().feature
                        ref_out = out if ref_out is None else ref_out
                        err = float((out - ref_out).abs().max())
                        grads = blend_fwd_bwd()
                        ref_grads = grads if ref_grads is None else ref_grads
                        # gradients: relative to each one's largest entry (sums over M * K terms)
                        grad_err = max(float((a - b).abs().max() / (1 + b.abs().max())) for a, b in zip(grads, ref_grads))
                        ms = timed(blend, device)
                        ms_bwd = timed(blend_fwd_bwd, device, repeats=10)
                        if variant in ("queries+buffers", "triton tf32", "tiles"):
                            tag = f"{dist} knn_blend {variant}"
                            profiles[f"{tag} fwd"] = profile_once(blend, device, f"{tag} fwd")
                            profiles[f"{tag} fwd+bwd"] = profile_once(blend_fwd_bwd, device, f"{tag} fwd+bwd")
                    tol = 2e-2 if variant == "triton tf32" else 1e-4
                    status = "ok" if err <= tol * (1 + float(ref_out.abs().max())) else f"differs from default by {err:.2e}"
                    if status == "ok" and grad_err > (2e-2 if variant == "triton tf32" else 1e-3):
                        status = f"gradients differ from default by {grad_err:.2e} (relative)"
                    failures += status != "ok"
                    for case, t in ((f"knn_blend fwd ({variant})", ms), (f"knn_blend fwd+bwd ({variant})", ms_bwd)):
                        rows.append(dict(dist=dist, method=case, backend=be, ms=round(t, 4), status=status))
                        print(f"  {case:28s} {be:7s} {t:9.4f} ms  {status}")
                except Exception as exc:
                    failures += 1
                    print(f"  knn_blend {variant} failed: {type(exc).__name__}: {exc}")
    info = dict(gpu=torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu", torch=torch.__version__,
                M=args.M, P=args.P, K=args.K)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(info=info, rows=rows, profiles=profiles), f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(f"## knn method probe on {info['gpu']}\n\n{info}\n\n| dist | method | backend | median ms | status |\n"
                    "|---|---|---|---|---|\n")
            for r in rows:
                f.write(f"| {r['dist']} | {r['method']} | {r['backend']} | {r['ms']} | {r['status']} |\n")
    print(f"\n{failures} failing case(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
