"""Benchmark ``gpavatar.ops.knn`` and ``gpavatar.ops.knn_blend`` against honest baselines.

Rows, for every query distribution (``--dist``, default all three of ``_distributions``:
``render`` = both passes of a real render of the procedural head, ``uniform`` in the box,
``clustered`` blobs near the surface; the points are always the procedural FLAME head x5):

* ``knn``            -- forward;
* ``knn_blend``      -- forward, under ``torch.no_grad()``;
* ``knn_blend+bwd``  -- forward and backward (``torch.autograd.grad`` of a random upstream
  gradient w.r.t. point_features, w1, b1, w2, b2).

Backends: the baselines a user could run instead (``_baselines``: ``torch-fast``, chunked fp32
distances + topk + the official blend, its distance method picked by timing ``mm`` against
``cdist`` on this device; ``pytorch3d``'s ``knn_points`` / ``knn_gather`` when it imports,
else the reason is recorded), then every gpavatar backend usable on the device
(``gpavatar.ops.available_backends`` without ``torch``; Triton never on the CPU).  The exact
oracle (``torch`` = ``gpavatar.ops.reference``, float64 sort keys) is slow and is timed only
with ``--oracle``.  On a GPU a ``cuda+tc`` row follows (``knn_blend`` cases): the same op with
the blend forward's products on the tensor cores (``GPAVATAR_BLEND_TENSOR_CORES=1`` with TF32
allowed: the stacked Triton kernel; the backward stays fp32), checked with RTOL_TC instead of
RTOL for its features and gradients.  Then the CUDA KNN's opt-in variants (KNN_VARIANTS, every
case): ``cuda+centre`` (lists banded by distance from the cell's centre), ``cuda+onepass`` (the
one-launch list build) and both.

Every time and peak-memory ratio is against the **fastest baseline present** in the same run
for the same distribution and case (``vs best baseline``: baseline ms / row ms, higher is
faster; ``mem vs best``: row bytes / baseline bytes).  Before timing, every row is compared
with the exact oracle on N_CHECK queries spread over the set: indices must be equal (gpavatar
backends: exactly, else ``MISMATCH``; baselines: except at near-ties, where their inexact
fp32 distances may pick the other point -- the share of such queries is the ``idx mismatch``
column), and dist2, features and gradients within ATOL + RTOL * max|ref| (on the queries whose
indices match).  A backend that raises gets its error string in the row; the script still
exits 0.

Usage::

    python benchmarks/bench_knn_blend.py [--device cpu|cuda|auto] [--size paper|cpu|small]
        [--dist render,uniform,clustered] [--normalize neighbors|queries] [--oracle]
        [--backends torch-fast,cpu,...] [--repeats N] [--json PATH] [--markdown PATH]
"""

from __future__ import annotations

import itertools
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _baselines as BL  # noqa: E402
import _distributions as D  # noqa: E402
import _harness as H  # noqa: E402

if H.REPO_ROOT not in sys.path:  # an installed gpavatar still takes precedence
    sys.path.append(H.REPO_ROOT)

SIZES = {
    "paper": dict(B=1, M=524288, P=5023, K=8),  # FLAME points, 2^19 queries = 128^2 x 32 (GPU)
    "cpu": dict(B=1, M=65536, P=5023, K=8),
    "small": dict(B=1, M=4096, P=1024, K=8),  # smoke run
}
DIMS = dict(Cf=32, H=64, C=32)  # PEF feature / hidden / output widths
N_CHECK = 512  # queries used for the correctness check
ATOL, RTOL = 1e-4, 1e-3  # error is flagged when |a-b| > ATOL + RTOL * max|ref|
RTOL_TC = 2e-2  # the "+tc" rows (tf32 products: 10-bit mantissas)
TC_SUFFIX = "+tc"
# "+tf32": the CUDA blend's tiled forward with the hidden layer's direction products on the tensor
# cores (GPAVATAR_BLEND_FORWARD=tiles_tf32, knn_blend_tiles.h); checked with RTOL_TC, no knn row.
TF32_SUFFIX = "+tf32"
# The CUDA KNN's opt-in variants (csrc/knn/knn_cells.cu; exact, so checked like the default): a row
# "cuda+centre" runs every case with the centre-ordered lists, "cuda+onepass" with the one-launch
# list build, "cuda+grouped" with the grouped list scan (knn_cells.h: scan_grouped), "cuda+match"
# with the list build's match compaction (knn_cells.cu: band_place); suffixes combine in this order
# ("cuda+centre+grouped").
KNN_VARIANTS = {"+centre": {"GPAVATAR_KNN_CUDA_ORDER": "centre"},
                "+onepass": {"GPAVATAR_KNN_CUDA_BUILD": "one_pass"},
                "+grouped": {"GPAVATAR_KNN_CUDA_SEARCH": "grouped"},
                "+match": {"GPAVATAR_KNN_CUDA_COMPACT": "match"}}
CASES = ("knn", "knn_blend", "knn_blend+bwd")
BASELINES = ("torch-fast", "pytorch3d")
ORACLE = "torch"
PARAMS = ("point_features", "w1", "b1", "w2", "b2")


def make_inputs(B, M, P, K=8, Cf=32, H=64, C=32, *, dist="uniform", device="cpu", seed=0,
                dtype=torch.float32) -> dict:
    """Queries / points of distribution ``dist`` (``_distributions``) and seeded PEF weights."""
    queries, points = D.make_queries(dist, B, M, P, seed=seed, device=device, dtype=dtype)
    g = torch.Generator().manual_seed(seed)
    fin = Cf + 27
    t = dict(
        point_features=0.5 * torch.randn(P, Cf, generator=g, dtype=torch.float64),
        w1=torch.randn(H, fin, generator=g, dtype=torch.float64) / math.sqrt(fin),
        b1=0.1 * torch.randn(H, generator=g, dtype=torch.float64),
        w2=torch.randn(C, H, generator=g, dtype=torch.float64) / math.sqrt(H),
        b2=0.1 * torch.randn(C, generator=g, dtype=torch.float64),
        grad_out=torch.randn(B, M, C, generator=g, dtype=torch.float64),
    )
    out = {k: v.to(device=device, dtype=dtype).contiguous() for k, v in t.items()}
    out.update(queries=queries, points=points, K=K, dist=dist)
    return out


def _with_grad(inp: dict) -> dict:
    d = dict(inp)
    for k in PARAMS:
        d[k] = inp[k].detach().clone().requires_grad_(True)
    return d


def knn_variant_suffixes() -> list[str]:
    """Every combination of KNN_VARIANTS' suffixes, in their order: "+centre", ..., "+centre+onepass", ..."""
    names = list(KNN_VARIANTS)
    return ["".join(c) for n in range(1, len(names) + 1) for c in itertools.combinations(names, n)]


def kind_of(backend: str) -> str:
    return "baseline" if backend in BASELINES else "oracle" if backend == ORACLE else "gpavatar"


def _tensor_cores(fn):
    """``fn`` with the blend's tensor-core forward switched on (the "+tc" rows)."""
    def wrapped(*args, **kwargs):
        saved = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = True
        try:
            with H.environ(GPAVATAR_BLEND_TENSOR_CORES="1"):
                return fn(*args, **kwargs)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = saved
    return wrapped


def _with_environment(fn, settings: dict):
    """``fn`` with ``settings`` in the environment (the KNN variant rows)."""
    def wrapped(*args, **kwargs):
        with H.environ(**settings):
            return fn(*args, **kwargs)
    return wrapped


def _impl(backend: str, opts: dict | None):
    """(knn(q, p, K) -> (dist2, idx), knn_blend(q, p, *params, K, normalize) -> (feature, dist2, idx))."""
    if backend.endswith(TF32_SUFFIX):
        knn, blend = _impl(backend.removesuffix(TF32_SUFFIX), opts)
        return knn, _with_environment(blend, {"GPAVATAR_BLEND_FORWARD": "tiles_tf32"})
    if backend.endswith(TC_SUFFIX):
        knn, blend = _impl(backend.removesuffix(TC_SUFFIX), opts)
        return _tensor_cores(knn), _tensor_cores(blend)
    for suffix, settings in KNN_VARIANTS.items():
        if backend.endswith(suffix):
            knn, blend = _impl(backend.removesuffix(suffix), opts)
            return _with_environment(knn, settings), _with_environment(blend, settings)
    opts = dict(opts or {})
    if backend == "torch-fast":
        method, budget = opts.get("method", "mm"), opts.get("memory_budget")

        def knn(q, p, K):
            return BL.knn_torch_fast(q, p, K, method=method, memory_budget=budget)

        def blend(q, p, *params, K, normalize):
            return BL.knn_blend_torch_fast(q, p, *params, K, normalize=normalize, method=method,
                                           memory_budget=budget, checkpoint=opts.get("checkpoint", False))
        return knn, blend
    if backend == "pytorch3d":
        def blend(q, p, *params, K, normalize):
            return BL.knn_blend_pytorch3d(q, p, *params, K, normalize=normalize,
                                          memory_budget=opts.get("memory_budget"))
        return BL.knn_pytorch3d, blend
    import gpavatar.ops as ops

    def knn(q, p, K):
        return tuple(ops.knn(q, p, K, backend=backend))

    def blend(q, p, *params, K, normalize):
        return tuple(ops.knn_blend(q, p, *params, K, normalize=normalize, backend=backend))
    return knn, blend


def make_case_fn(case: str, backend: str, inp: dict, normalize: str = "neighbors", opts: dict | None = None):
    """A zero-argument callable running ``case`` with ``backend`` on ``inp``; it returns
    (dist2, idx) for ``knn``, (feature, dist2, idx) for ``knn_blend`` and (feature, grads, idx)
    for ``knn_blend+bwd``.  ``opts``: torch-fast options (method, memory_budget, checkpoint)."""
    knn, blend = _impl(backend, opts)
    q, p, K = inp["queries"], inp["points"], inp["K"]
    if case == "knn":
        def fn():
            with torch.no_grad():
                return knn(q, p, K)
        return fn
    if case == "knn_blend":
        def fn():
            with torch.no_grad():
                return blend(q, p, *[inp[k] for k in PARAMS], K=K, normalize=normalize)
        return fn
    if case == "knn_blend+bwd":
        params = [_with_grad(inp)[k] for k in PARAMS]

        def fn():
            feature, _, idx = blend(q, p, *params, K=K, normalize=normalize)
            return feature, torch.autograd.grad(feature, params, inp["grad_out"]), idx
        return fn
    raise ValueError(f"unknown case {case!r}; choose from {CASES}")


def _err(a: torch.Tensor, ref: torch.Tensor, rtol: float = RTOL) -> tuple[float, float]:
    """(max abs error, error / (ATOL + rtol * max|ref|)) -- the second > 1 flags a mismatch."""
    a, ref = a.detach().double(), ref.detach().double()
    if a.shape != ref.shape:
        raise ValueError(f"shape {tuple(a.shape)} != reference {tuple(ref.shape)}")
    e = (a - ref).abs().max().item() if a.numel() else 0.0
    scale = ATOL + rtol * (ref.abs().max().item() if ref.numel() else 0.0)
    return e, e / scale


def check_subset(inp: dict, n: int = N_CHECK) -> dict:
    """``inp`` restricted to n queries spread evenly over the set (both passes of a render)."""
    M = inp["queries"].shape[1]
    sel = torch.arange(min(n, M), device=inp["queries"].device) * max(1, M // max(1, min(n, M)))
    return dict(inp, queries=inp["queries"][:, sel].contiguous(), grad_out=inp["grad_out"][:, sel].contiguous())


def check_case(case: str, backend: str, inp: dict, normalize: str = "neighbors", opts: dict | None = None) -> dict:
    """Compare ``backend`` with the exact oracle on :func:`check_subset`: returns max_abs_err,
    idx_mismatch (share of queries whose indices differ) and correct."""
    from gpavatar.ops.reference import knn_blend_reference, knn_reference

    sub = check_subset(inp)
    q, p, K = sub["queries"], sub["points"], sub["K"]
    knn, blend = _impl(backend, opts)
    with torch.no_grad():
        ref_d, ref_i = knn_reference(q, p, K)
        d, i = knn(q, p, K) if case == "knn" else blend(q, p, *[sub[k] for k in PARAMS], K=K, normalize=normalize)[1:]
    differ, near_ties = BL.near_tie_mismatch(d, i, ref_d, ref_i)
    exact_required = kind_of(backend) != "baseline"
    keep = ~differ  # (B, n): queries whose neighbours match the oracle's
    pairs = [(d, ref_d)]
    if case == "knn_blend":
        with torch.no_grad():
            got = blend(q, p, *[sub[k] for k in PARAMS], K=K, normalize=normalize)[0]
            ref = knn_blend_reference(q, p, *[sub[k] for k in PARAMS], K, normalize=normalize)[0]
        pairs.append((got[keep], ref[keep]))
    elif case == "knn_blend+bwd":
        grad_out = sub["grad_out"] * keep[..., None]  # mismatched queries contribute nothing
        g1, g2 = _with_grad(sub), _with_grad(sub)
        got = blend(q, p, *[g1[k] for k in PARAMS], K=K, normalize=normalize)[0]
        ref = knn_blend_reference(q, p, *[g2[k] for k in PARAMS], K, normalize=normalize)[0]
        got_g = torch.autograd.grad(got, [g1[k] for k in PARAMS], grad_out)
        ref_g = torch.autograd.grad(ref, [g2[k] for k in PARAMS], grad_out)
        pairs += [(got.detach()[keep], ref.detach()[keep])] + list(zip(got_g, ref_g))
    rtol = RTOL_TC if backend.endswith((TC_SUFFIX, TF32_SUFFIX)) else RTOL
    errs = [_err(a, b, rtol) for a, b in pairs]
    ok = max(s for _, s in errs) <= 1.0 and (not bool(differ.any()) if exact_required else near_ties)
    return dict(max_abs_err=max(e for e, _ in errs), idx_mismatch=differ.double().mean().item(), correct=ok)


def run_row(case, backend, inp, device, *, repeats, warmup, max_seconds, normalize, min_repeats=3, opts=None):
    row = dict(dist=inp["dist"], case=case, backend=backend, kind=kind_of(backend), median_ms=None, p20_ms=None,
               p80_ms=None, repeats=0, peak_mem_bytes=None, max_abs_err=None, idx_mismatch=None, correct=None,
               error=None)
    try:
        row.update(check_case(case, backend, inp, normalize, opts))
        row.update(H.measure(make_case_fn(case, backend, inp, normalize, opts), device, repeats=repeats,
                             warmup=warmup, max_seconds=max_seconds, min_repeats=min_repeats))
    except Exception as exc:  # keep going: the report records the failure
        H.record_error(row, exc)
    finally:
        H.release(device)
    return row


def status(r: dict) -> str:
    return H.error_status(r) or ("ok" if r["correct"] else "MISMATCH")


def _fmt_share(x) -> str:
    if x is None:
        return "-"
    return "0" if x == 0 else f"{100 * x:.2g} %"


def render_markdown(payload: dict) -> str:
    cfg, env = payload["config"], payload["env"]
    tf = cfg.get("torch_fast") or {}
    title = ("## knn / knn_blend on {dev}\n\nsize `{size}`: B={B} M={M} P={P} K={K} Cf={Cf} H={H} C={C}, "
             "normalize={normalize}, dtype={dtype}; torch-fast: distances by `{method}` ({times}), "
             "{budget} MiB chunks{ckpt}").format(
        dev=H.device_label(env), method=tf.get("method"), budget=(tf.get("memory_budget") or 0) >> 20,
        times=", ".join(f"{k} {v:.1f} ms" for k, v in (tf.get("calibration_ms") or {}).items()) or "not timed",
        ckpt=", checkpointed" if tf.get("checkpoint") else "", **cfg)
    parts = [title, H.env_markdown(env)]
    skipped = payload.get("skipped") or {}
    if skipped:
        parts.append("\n".join(f"- `{b}` not run: {why}" for b, why in skipped.items()))
    headers = ["case", "backend", "median ms", "p20-p80 ms", "vs best baseline", "peak mem", "mem vs best",
               "idx mismatch", "max abs err", "status"]
    for dist in cfg["dists"]:
        rows = [r for r in payload["rows"] if r["dist"] == dist]
        if not rows:
            continue
        info = payload.get("distributions", {}).get(dist, {})
        body = []
        for r in rows:
            spread = (f"{H.fmt_ms(r['p20_ms'])}-{H.fmt_ms(r['p80_ms'])}" if r["p20_ms"] is not None else "-")
            err = "-" if r["max_abs_err"] is None else f"{r['max_abs_err']:.2e}"
            best = r.get("best_baseline")
            body.append([r["case"], r["backend"], H.fmt_ms(r["median_ms"]), spread,
                         H.fmt_ratio(r.get("speedup_vs_best")) + (f" ({best})" if best else ""),
                         H.fmt_bytes(r["peak_mem_bytes"]), H.fmt_ratio(r.get("mem_vs_best")),
                         _fmt_share(r["idx_mismatch"]), err, status(r)])
        parts.append(f"### `{dist}`: {D.DESCRIPTIONS.get(dist, dist)} (inside box: "
                     f"{100 * info.get('inside_box', float('nan')):.1f} %)\n\n" + H.markdown_table(headers, body))
    note = ("Times: median over repeats (p20-p80 spread). vs best baseline: the fastest error-free baseline row "
            f"({', '.join(BASELINES)}) of the same distribution and case, its ms / this row's ms (named in "
            "brackets); mem vs best: this row's peak / that baseline's peak. idx mismatch: share of the "
            f"{N_CHECK} checked queries whose neighbour indices differ from the exact oracle (baselines: near-ties "
            "of their inexact fp32 distances, allowed; gpavatar backends: must be 0). Peak mem: " +
            ("CUDA max_memory_allocated above the pre-call level."
             if cfg["device"].startswith("cuda") else
             "CPU tensor memory from torch.profiler allocation events (no malloc/stack)."))
    parts.append(note)
    return "\n\n".join(parts) + "\n"


def parse_args(argv=None):
    ap = H.benchmark_parser(__doc__.split("\n\n")[0], 15.0)
    ap.add_argument("--size", choices=sorted(SIZES), default=None, help="default: paper on cuda, cpu on cpu")
    ap.add_argument("--dist", default=",".join(D.DISTRIBUTIONS),
                    help="comma list of query distributions (default: all): " + ",".join(D.DISTRIBUTIONS))
    ap.add_argument("--normalize", choices=["neighbors", "queries"], default="neighbors")
    ap.add_argument("--backends", default=None,
                    help="comma list to restrict backends (baselines torch-fast, pytorch3d; gpavatar backends; "
                         "torch = the exact oracle)")
    ap.add_argument("--oracle", action="store_true", help="also time the exact oracle (torch; slow)")
    ap.add_argument("--torch-fast-method", choices=("auto",) + BL.DISTANCE_METHODS, default="auto",
                    help="torch-fast distances (auto: the faster on this device, timed on one chunk)")
    ap.add_argument("--torch-fast-budget-mib", type=int, default=None,
                    help="torch-fast chunk memory budget (default: 1024 on cuda, 64 on cpu)")
    ap.add_argument("--torch-fast-checkpoint", action="store_true",
                    help="torch-fast fwd+bwd with torch.utils.checkpoint per chunk (less memory, slower)")
    return ap.parse_args(argv)


def choose_backends(device: torch.device, args, payload: dict) -> list[str]:
    """Baselines first, then gpavatar's backends, then (with --oracle) the exact oracle."""
    backends = ["torch-fast"]
    why = BL.pytorch3d_error()
    if why is None:
        backends.append("pytorch3d")
    else:
        payload["skipped"]["pytorch3d"] = why
    try:
        import gpavatar.ops as ops

        backends += [b for b in ops.available_backends(device)
                     if b != ORACLE and not (b == "triton" and device.type != "cuda")]
        if device.type == "cuda" and "cuda" in backends:
            at = backends.index("cuda") + 1
            backends[at:at] = ["cuda" + TC_SUFFIX, "cuda" + TF32_SUFFIX] + ["cuda" + v for v in knn_variant_suffixes()]
    except Exception as exc:
        payload["error"] = f"cannot import gpavatar.ops: {type(exc).__name__}: {exc}"
        return []
    if args.oracle:
        backends.append(ORACLE)
    if args.backends:
        keep = args.backends.split(",")
        backends = [b for b in backends if b in keep] + (
            [ORACLE] if ORACLE in keep and ORACLE not in backends else [])
    return backends


def main(argv=None) -> int:
    args = parse_args(argv)
    device = H.resolve_device(args.device)
    if device is None:
        return 2
    dists = [d.strip() for d in args.dist.split(",") if d.strip()]
    bad = [d for d in dists if d not in D.DISTRIBUTIONS]
    if bad:
        print(f"error: unknown --dist {bad}; choose from {D.DISTRIBUTIONS}", file=sys.stderr)
        return 2
    size = args.size or ("paper" if device.type == "cuda" else "cpu")
    repeats = args.repeats or {"paper": 20, "cpu": 5, "small": 10}[size]
    warmup = args.warmup if args.warmup is not None else (3 if device.type == "cuda" else 0)
    budget = (args.torch_fast_budget_mib << 20) if args.torch_fast_budget_mib else BL.default_memory_budget(device)
    opts = dict(method=args.torch_fast_method, memory_budget=budget, checkpoint=args.torch_fast_checkpoint,
                calibration_ms=None)
    cfg = dict(size=size, device=str(device), dtype="float32", normalize=args.normalize, dists=dists,
               repeats=repeats, warmup=warmup, max_seconds=args.max_seconds, seed=args.seed, n_check=N_CHECK,
               torch_fast=opts, **SIZES[size], **DIMS)
    payload = dict(benchmark="knn_blend", env=H.env_info(device), config=cfg, distributions={}, skipped={},
                   rows=[], partial=False, error=None)
    backends = choose_backends(device, args, payload)
    cfg["backends"] = backends

    for dist in dists if backends else []:
        print(f"[bench_knn_blend] {dist}: making the inputs ...", file=sys.stderr, flush=True)
        inp = make_inputs(**SIZES[size], **DIMS, dist=dist, device=device, seed=args.seed)
        payload["distributions"][dist] = dict(description=D.DESCRIPTIONS[dist], **D.describe(inp["queries"]))
        if opts["method"] == "auto" and "torch-fast" in backends:
            opts["method"], opts["calibration_ms"] = BL.pick_distance_method(inp["queries"], inp["points"],
                                                                             inp["K"], memory_budget=budget)
        for case in CASES:
            for b in backends:
                if case == "knn" and b.endswith((TC_SUFFIX, TF32_SUFFIX)):
                    continue  # the KNN has no products: the same row as without the suffix
                print(f"[bench_knn_blend] {dist} {case} / {b} ...", file=sys.stderr, flush=True)
                payload["rows"].append(run_row(case, b, inp, device, repeats=repeats, warmup=warmup,
                                               max_seconds=args.max_seconds, normalize=args.normalize,
                                               min_repeats=args.min_repeats, opts=opts))
                if args.json:  # partial results survive a timeout
                    H.add_baseline_ratios(payload["rows"], BASELINES, key=lambda r: (r["dist"], r["case"]))
                    H.write_json(args.json, dict(payload, partial=True))
        del inp
    H.add_baseline_ratios(payload["rows"], BASELINES, key=lambda r: (r["dist"], r["case"]))
    return H.emit_report(payload, render_markdown(payload), args.json, args.markdown)


if __name__ == "__main__":
    sys.exit(main())
