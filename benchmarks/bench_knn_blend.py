"""Benchmark ``gpavatar.ops.knn`` and ``gpavatar.ops.knn_blend`` across backends.

For every backend usable on the chosen device (``gpavatar.ops.available_backends``;
Triton is never run on the CPU) three cases are measured:

* ``knn``            -- forward (plus a ``pytorch3d`` row when pytorch3d imports);
* ``knn_blend``      -- forward, under ``torch.no_grad()``;
* ``knn_blend+bwd``  -- forward and backward (``torch.autograd.grad`` of a random
  upstream gradient w.r.t. point_features, w1, b1, w2, b2).

Before timing, each backend is compared with ``gpavatar.ops.reference`` on the
first few hundred queries (same device, same dtype); the largest absolute error
is stored as ``max_abs_err`` and a row whose error exceeds the tolerance is
flagged ``MISMATCH`` (the run goes on).  Speed-up and memory ratios are relative
to the ``torch`` backend measured in the same run.  A backend that raises gets
its error string in the row; the script still exits 0.

Usage::

    python benchmarks/bench_knn_blend.py [--device cpu|cuda|auto]
        [--size paper|cpu|small] [--repeats N] [--json PATH] [--markdown PATH]
"""

from __future__ import annotations

import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness as H  # noqa: E402

if H.REPO_ROOT not in sys.path:  # an installed gpavatar still takes precedence
    sys.path.append(H.REPO_ROOT)

SIZES = {
    "paper": dict(B=1, M=524288, P=5023, K=8),  # FLAME points, 2^19 queries (GPU)
    "cpu": dict(B=1, M=65536, P=5023, K=8),
    "small": dict(B=1, M=4096, P=1024, K=8),  # smoke run
}
DIMS = dict(Cf=32, H=64, C=32)  # PEF feature / hidden / output widths
N_CHECK = 512  # queries used for the correctness check
ATOL, RTOL = 1e-4, 1e-3  # error is flagged when |a-b| > ATOL + RTOL * max|ref|
CASES = ("knn", "knn_blend", "knn_blend+bwd")


def make_inputs(B, M, P, K=8, Cf=32, H=64, C=32, *, device="cpu", seed=0,
                dtype=torch.float32) -> dict:
    """Seeded FLAME-like data: points near a sphere (|x| <~ 0.8), queries in [-1,1]^3."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(B, P, 3, generator=g, dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    radius = 0.76 * (1.0 + 0.04 * torch.randn(B, P, 1, generator=g, dtype=torch.float64))
    points = dirs * radius * torch.tensor([0.85, 1.0, 0.9], dtype=torch.float64)  # head-ish
    queries = torch.rand(B, M, 3, generator=g, dtype=torch.float64) * 2 - 1
    fin = Cf + 27
    t = dict(
        queries=queries,
        points=points,
        point_features=0.5 * torch.randn(P, Cf, generator=g, dtype=torch.float64),
        w1=torch.randn(H, fin, generator=g, dtype=torch.float64) / math.sqrt(fin),
        b1=0.1 * torch.randn(H, generator=g, dtype=torch.float64),
        w2=torch.randn(C, H, generator=g, dtype=torch.float64) / math.sqrt(H),
        b2=0.1 * torch.randn(C, generator=g, dtype=torch.float64),
        grad_out=torch.randn(B, M, C, generator=g, dtype=torch.float64),
    )
    out = {k: v.to(device=device, dtype=dtype).contiguous() for k, v in t.items()}
    out["K"] = K
    return out


PARAMS = ("point_features", "w1", "b1", "w2", "b2")


def _with_grad(inp: dict) -> dict:
    d = dict(inp)
    for k in PARAMS:
        d[k] = inp[k].detach().clone().requires_grad_(True)
    return d


def make_case_fn(case: str, backend: str, inp: dict, normalize: str = "neighbors"):
    """Return a zero-argument callable running ``case`` with ``backend`` on ``inp``."""
    import gpavatar.ops as ops

    q, p, K = inp["queries"], inp["points"], inp["K"]
    if case == "knn":
        if backend == "pytorch3d":
            from pytorch3d.ops import knn_points

            def fn():
                with torch.no_grad():
                    r = knn_points(q, p, K=K)
                return r[0], r[1]
        else:
            def fn():
                with torch.no_grad():
                    return ops.knn(q, p, K, backend=backend)
        return fn

    if case == "knn_blend":
        def fn():
            with torch.no_grad():
                return ops.knn_blend(q, p, inp["point_features"], inp["w1"], inp["b1"],
                                     inp["w2"], inp["b2"], K, normalize=normalize,
                                     backend=backend)
        return fn

    if case == "knn_blend+bwd":
        g = _with_grad(inp)
        params = [g[k] for k in PARAMS]

        def fn():
            out = ops.knn_blend(q, p, *params, K, normalize=normalize, backend=backend)
            grads = torch.autograd.grad(out[0], params, inp["grad_out"])  # out[0]: feature
            return out[0], grads
        return fn
    raise ValueError(f"unknown case {case!r}")


def _err(a: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(max abs error, error / (ATOL + RTOL * max|ref|)) -- the second > 1 flags a mismatch."""
    a, ref = a.detach().double(), ref.detach().double()
    if a.shape != ref.shape:
        raise ValueError(f"shape {tuple(a.shape)} != reference {tuple(ref.shape)}")
    e = (a - ref).abs().max().item() if a.numel() else 0.0
    scale = ATOL + RTOL * (ref.abs().max().item() if ref.numel() else 0.0)
    return e, e / scale


def check_case(case: str, backend: str, inp: dict, normalize: str = "neighbors"):
    """Compare ``backend`` with the reference on the first N_CHECK queries."""
    from gpavatar.ops.reference import knn_blend_reference, knn_reference

    n = min(N_CHECK, inp["queries"].shape[1])
    sub = dict(inp, queries=inp["queries"][:, :n].contiguous(),
               grad_out=inp["grad_out"][:, :n].contiguous())
    got = make_case_fn(case, backend, sub, normalize)()
    q, p, K = sub["queries"], sub["points"], sub["K"]
    if case == "knn":
        ref_d, _ = knn_reference(q, p, K)
        pairs = [(got[0], ref_d)]
    elif case == "knn_blend":
        ref = knn_blend_reference(q, p, *[sub[k] for k in PARAMS], K, normalize=normalize)
        pairs = [(got[0], ref[0]), (got[1], ref[1])]  # (feature, dist2)
    else:
        g = _with_grad(sub)
        params = [g[k] for k in PARAMS]
        ref = knn_blend_reference(q, p, *params, K, normalize=normalize)
        ref_grads = torch.autograd.grad(ref[0], params, sub["grad_out"])
        pairs = [(got[0], ref[0])] + list(zip(got[1], ref_grads))
    errs = [_err(a, b) for a, b in pairs]
    return max(e for e, _ in errs), max(s for _, s in errs) <= 1.0


def pytorch3d_available() -> bool:
    try:
        from pytorch3d.ops import knn_points  # noqa: F401
    except Exception:
        return False
    return True


def run_row(case, backend, inp, device, *, repeats, warmup, max_seconds, normalize,
            min_repeats=3):
    row = dict(case=case, backend=backend, median_ms=None, p20_ms=None, p80_ms=None,
               repeats=0, peak_mem_bytes=None, max_abs_err=None, correct=None, error=None)
    try:
        row["max_abs_err"], row["correct"] = check_case(case, backend, inp, normalize)
        row.update(H.measure(make_case_fn(case, backend, inp, normalize), device, repeats=repeats,
                             warmup=warmup, max_seconds=max_seconds, min_repeats=min_repeats))
    except Exception as exc:  # keep going: the report records the failure
        H.record_error(row, exc)
    finally:
        H.release(device)
    return row


def status(r: dict) -> str:
    return H.error_status(r) or ("ok" if r["correct"] else "MISMATCH")


def render_markdown(payload: dict) -> str:
    cfg, env = payload["config"], payload["env"]
    title = ("## knn / knn_blend on {dev}\n\nsize `{size}`: B={B} M={M} P={P} K={K} "
             "Cf={Cf} H={H} C={C}, normalize={normalize}, dtype={dtype}").format(
        dev=H.device_label(env), **cfg)
    headers = ["case", "backend", "median ms", "p20-p80 ms", "speed-up vs torch",
               "peak mem", "mem vs torch", "max abs err", "status"]
    body = []
    for r in payload["rows"]:
        spread = (f"{H.fmt_ms(r['p20_ms'])}-{H.fmt_ms(r['p80_ms'])}"
                  if r["p20_ms"] is not None else "-")
        err = "-" if r["max_abs_err"] is None else f"{r['max_abs_err']:.2e}"
        body.append([r["case"], r["backend"], H.fmt_ms(r["median_ms"]), spread,
                     H.fmt_ratio(r.get("speedup_vs_torch")), H.fmt_bytes(r["peak_mem_bytes"]),
                     H.fmt_ratio(r.get("mem_vs_torch")), err, status(r)])
    note = ("Times: median over repeats (p20-p80 spread). Peak mem: " +
            ("CUDA max_memory_allocated above the pre-call level."
             if cfg["device"].startswith("cuda") else
             "CPU tensor memory from torch.profiler allocation events (no malloc/stack)."))
    return "\n\n".join([title, H.env_markdown(env), H.markdown_table(headers, body), note]) + "\n"


def parse_args(argv=None):
    ap = H.benchmark_parser(__doc__.split("\n\n")[0], 15.0)
    ap.add_argument("--size", choices=sorted(SIZES), default=None,
                    help="default: paper on cuda, cpu on cpu")
    ap.add_argument("--normalize", choices=["neighbors", "queries"], default="neighbors")
    ap.add_argument("--backends", default=None, help="comma list to restrict backends")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = H.resolve_device(args.device)
    if device is None:
        return 2
    size = args.size or ("paper" if device.type == "cuda" else "cpu")
    repeats = args.repeats or {"paper": 20, "cpu": 5, "small": 10}[size]
    warmup = args.warmup if args.warmup is not None else (3 if device.type == "cuda" else 0)
    cfg = dict(size=size, device=str(device), dtype="float32", normalize=args.normalize,
               repeats=repeats, warmup=warmup, max_seconds=args.max_seconds, seed=args.seed,
               **SIZES[size], **DIMS)
    payload = dict(benchmark="knn_blend", env=H.env_info(device), config=cfg, rows=[],
                   partial=False, error=None)

    try:
        import gpavatar.ops as ops

        backends = [b for b in ops.available_backends(device)
                    if not (b == "triton" and device.type != "cuda")]
    except Exception as exc:
        payload["error"] = f"cannot import gpavatar.ops: {type(exc).__name__}: {exc}"
        backends = []
    if args.backends:
        keep = set(args.backends.split(","))
        backends = [b for b in backends if b in keep]
    if "torch" in backends:  # reference first
        backends.remove("torch")
        backends.insert(0, "torch")

    inp = make_inputs(**SIZES[size], **DIMS, device=device, seed=args.seed)
    for case in CASES:
        extra = ["pytorch3d"] if case == "knn" and backends and pytorch3d_available() else []
        for b in backends + extra:
            print(f"[bench_knn_blend] {case} / {b} ...", file=sys.stderr, flush=True)
            payload["rows"].append(run_row(case, b, inp, device, repeats=repeats,
                                           warmup=warmup, max_seconds=args.max_seconds,
                                           normalize=args.normalize,
                                           min_repeats=args.min_repeats))
            if args.json:  # partial results survive a timeout
                H.add_ratios(payload["rows"])
                H.write_json(args.json, dict(payload, partial=True))
    H.add_ratios(payload["rows"])

    return H.emit_report(payload, render_markdown(payload), args.json, args.markdown)


if __name__ == "__main__":
    sys.exit(main())
