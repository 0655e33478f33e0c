"""Benchmark ``gpavatar.ops.triplane.triplane_sample`` across backends.

For every backend usable on the chosen device (``gpavatar.ops.available_backends``;
Triton is never run on the CPU) these cases are measured:

* ``fwd``          -- forward, planes (B, 3, C, H, W), under ``torch.no_grad()``;
* ``fwd+bwd``      -- forward and backward (``torch.autograd.grad`` of a fixed random
  upstream gradient w.r.t. planes and coords);
* ``fwd+bwd det``  -- the same with ``deterministic=True`` (fused backends only;
  compared with the ``torch`` ``fwd+bwd`` row);
* ``fwd cl``, ``fwd+bwd cl`` -- planes given as (B, 3, H, W, C) with
  ``channels_last=True`` (the ``torch`` row reads the permuted view);
* ``fwd+bwd bf16`` -- bfloat16 planes, CUDA only by default (fused backends only;
  compared with the ``torch`` ``fwd+bwd`` row).  Its error is measured against
  the float32 reference evaluated on the same bf16-rounded plane values, with a
  looser tolerance (the plane gradient is returned in bfloat16).

Points are seeded: 80% uniform in [-1, 1]^3, 20% uniform in [-1.25, 1.25]^3, so
about 90% of them lie inside the volume and the rest exercise the zero padding.

Before timing, each backend is compared with ``gpavatar.ops.reference.triplane_sample_reference``
on the first few hundred points (same device, float32); the largest absolute
error is stored as ``max_abs_err`` and a row whose error exceeds the tolerance
is flagged ``MISMATCH`` (the run goes on).  The check points are nudged at most
0.003 texel away from texel centres, where the coords gradient jumps.
Speed-up and memory ratios are relative to the ``torch`` backend in the same
run.  A backend that raises gets its error string in the row; the script still
exits 0.

Usage::

    python benchmarks/bench_triplane.py [--device cpu|cuda|auto]
        [--size paper|cpu|small] [--repeats N] [--json PATH] [--markdown PATH]
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness as H  # noqa: E402

if H.REPO_ROOT not in sys.path:  # an installed gpavatar still takes precedence
    sys.path.append(H.REPO_ROOT)

SIZES = {
    "paper": dict(B=1, M=524288, C=32, H=256, W=256),  # 2^19 ray samples (GPU)
    "cpu": dict(B=1, M=65536, C=32, H=256, W=256),
    "small": dict(B=1, M=4096, C=32, H=64, W=64),  # smoke run
}
OUTSIDE_FRAC, OUTSIDE_EXTENT = 0.2, 1.25  # share of points drawn from [-1.25, 1.25]^3
N_CHECK = 512  # points used for the correctness check
TOL = {"float32": (1e-4, 1e-3), "bfloat16": (1e-3, 1e-2)}  # (ATOL, RTOL): |a-b| > ATOL + RTOL*max|ref|
CASES = ("fwd", "fwd+bwd", "fwd+bwd det", "fwd cl", "fwd+bwd cl", "fwd+bwd bf16")
CPU_CASES = tuple(c for c in CASES if c != "fwd+bwd bf16")
FUSED_ONLY = ("fwd+bwd det", "fwd+bwd bf16")  # no torch row: the flag / dtype is not the reference's
BASELINE_CASE = {"fwd+bwd det": "fwd+bwd", "fwd+bwd bf16": "fwd+bwd"}  # torch row they are compared with


def case_spec(case: str) -> dict:
    """``"fwd+bwd cl"`` -> dict(backward=True, channels_last=True, deterministic=False, bf16=False)."""
    kind, *flags = case.split()
    if kind not in ("fwd", "fwd+bwd") or not set(flags) <= {"cl", "det", "bf16"}:
        raise ValueError(f"unknown case {case!r}")
    return dict(backward=kind == "fwd+bwd", channels_last="cl" in flags,
                deterministic="det" in flags, bf16="bf16" in flags)


# --- the op ------------------------------------------------------------------------------------

_API: list = []  # [(triplane_sample or None, import error or None)], filled once


def _import_api():
    if not _API:  # import once: a failed import can leave half-registered custom ops behind
        try:
            from gpavatar.ops.triplane import triplane_sample as fn

            _API.append((fn, None))
        except Exception as exc:
            _API.append((None, f"{type(exc).__name__}: {exc}"[:300]))
    return _API[0]


def api_error() -> str | None:
    """Why ``gpavatar.ops.triplane`` cannot be imported (None when it can)."""
    return _import_api()[1]


def triplane_sample(planes, coords, reduce="mean", *, channels_last=False, deterministic=False,
                    backend=None):
    """``gpavatar.ops.triplane.triplane_sample``; when that module cannot be imported (the C++
    op not built yet), ``backend="torch"`` falls back to the reference it wraps and every
    other backend raises."""
    fn, err = _import_api()
    if fn is not None:
        return fn(planes, coords, reduce, channels_last=channels_last, deterministic=deterministic,
                  backend=backend)
    if backend != "torch":
        raise RuntimeError(f"gpavatar.ops.triplane cannot be imported ({err})")
    from gpavatar.ops.reference import triplane_sample_reference

    dtype = torch.float64 if planes.dtype == torch.float64 else torch.float32
    p = planes.permute(0, 1, 4, 2, 3) if channels_last else planes
    return triplane_sample_reference(p.to(dtype), coords.to(dtype), reduce)


def backend_unavailable(backend: str) -> str | None:
    """Why ``backend`` cannot run triplane_sample yet (None when it should), without calling it."""
    if backend == "torch":
        return None
    err = api_error()
    if err:
        return f"gpavatar.ops.triplane cannot be imported ({err})"
    if backend in ("cpu", "cuda") and not hasattr(torch.ops.gpavatar, "triplane_sample_forward"):
        return "C++ op gpavatar::triplane_sample_forward is not registered (extension built without it)"
    if backend == "triton":
        try:
            import gpavatar.kernels.triplane  # noqa: F401
        except Exception as exc:
            return f"gpavatar.kernels.triplane: {type(exc).__name__}: {exc}"[:300]
    return None


# --- inputs ------------------------------------------------------------------------------------

def make_inputs(B, M, C, H, W, *, reduce="mean", device="cpu", seed=0) -> dict:
    """Seeded planes (both layouts, same values), a ray-sample-like point cloud and an
    upstream gradient."""
    g = torch.Generator().manual_seed(seed)
    planes = 0.5 * torch.randn(B, 3, C, H, W, generator=g)
    coords = torch.rand(B, M, 3, generator=g) * 2 - 1
    wide = (torch.rand(B, M, 3, generator=g) * 2 - 1) * OUTSIDE_EXTENT
    coords = torch.where(torch.rand(B, M, 1, generator=g) < OUTSIDE_FRAC, wide, coords)
    grad_out = torch.randn(B, M, 3 * C if reduce == "concat" else C, generator=g)
    out = dict(planes=planes, planes_cl=planes.permute(0, 1, 3, 4, 2), coords=coords, grad_out=grad_out)
    out = {k: t.to(device).contiguous() for k, t in out.items()}
    out["reduce"] = reduce
    return out


def inside_fraction(coords: torch.Tensor) -> float:
    return (coords.abs() <= 1).all(dim=-1).double().mean().item() if coords.numel() else 1.0


def _case_planes(spec: dict, inp: dict) -> torch.Tensor:
    planes = inp["planes_cl"] if spec["channels_last"] else inp["planes"]
    return planes.to(torch.bfloat16) if spec["bf16"] else planes


def make_case_fn(case: str, backend: str, inp: dict):
    """Return a zero-argument callable running ``case`` with ``backend`` on ``inp``."""
    spec = case_spec(case)
    planes, coords, reduce = _case_planes(spec, inp), inp["coords"], inp["reduce"]
    kw = dict(channels_last=spec["channels_last"], deterministic=spec["deterministic"], backend=backend)
    if not spec["backward"]:
        def fn():
            with torch.no_grad():
                return triplane_sample(planes, coords, reduce, **kw)
        return fn

    leaves = (planes.detach().requires_grad_(True), coords.detach().requires_grad_(True))
    grad_out = inp["grad_out"]

    def fn():
        out = triplane_sample(*leaves, reduce, **kw)
        return out, torch.autograd.grad(out, leaves, grad_out)  # (grad planes, grad coords)
    return fn


# --- correctness -------------------------------------------------------------------------------

def away_from_kinks(coords: torch.Tensor, sizes, eps: float = 1e-3) -> torch.Tensor:
    """Move coordinates lying within ``eps`` texel of a texel centre (including the padding
    texels -1 and size) to ``2 eps`` .. ``3 eps`` away, for every plane size in ``sizes``: there
    the coords gradient jumps and a last-bit difference picks the other side."""
    c = coords.double()
    for size in sorted(set(sizes)):
        u = ((c + 1) * size - 1) / 2  # unnormalized, align_corners=False
        d = u - u.round()
        shift = torch.where(d >= 0, 2 * eps, -2 * eps) * 2 / size
        c = torch.where(d.abs() < eps, c + shift, c)
    return c.to(coords.dtype)


def _err(a: torch.Tensor, ref: torch.Tensor, atol: float, rtol: float) -> tuple[float, float]:
    """(max abs error, error / (atol + rtol * max|ref|)) -- the second > 1 flags a mismatch."""
    a, ref = a.detach().double(), ref.detach().double()
    if a.shape != ref.shape:
        raise ValueError(f"shape {tuple(a.shape)} != reference {tuple(ref.shape)}")
    e = (a - ref).abs().max().item() if a.numel() else 0.0
    scale = atol + rtol * (ref.abs().max().item() if ref.numel() else 0.0)
    return e, e / scale


def check_case(case: str, backend: str, inp: dict):
    """Compare ``backend`` with the float32 reference on the first N_CHECK points."""
    from gpavatar.ops.reference import triplane_sample_reference

    spec = case_spec(case)
    n = min(N_CHECK, inp["coords"].shape[1])
    Hp, Wp = inp["planes"].shape[3], inp["planes"].shape[4]
    sub = dict(inp, coords=away_from_kinks(inp["coords"][:, :n], (Hp, Wp)).contiguous(),
               grad_out=inp["grad_out"][:, :n].contiguous())
    got = make_case_fn(case, backend, sub)()

    planes = _case_planes(spec, sub).detach().float().requires_grad_(spec["backward"])
    coords = sub["coords"].detach().clone().requires_grad_(spec["backward"])
    ref = triplane_sample_reference(planes.permute(0, 1, 4, 2, 3) if spec["channels_last"] else planes,
                                    coords, sub["reduce"])
    if spec["backward"]:
        ref_grads = torch.autograd.grad(ref, (planes, coords), sub["grad_out"])
        pairs = [(got[0], ref)] + list(zip(got[1], ref_grads))
    else:
        pairs = [(got, ref)]
    atol, rtol = TOL["bfloat16" if spec["bf16"] else "float32"]
    errs = [_err(a, b, atol, rtol) for a, b in pairs]
    return max(e for e, _ in errs), max(s for _, s in errs) <= 1.0


# --- rows --------------------------------------------------------------------------------------

def baseline_case(row: dict) -> str:
    """The torch case a row is compared with (fused-only cases use their plain twin)."""
    return BASELINE_CASE.get(row["case"], row["case"])


def run_row(case, backend, inp, device, *, repeats, warmup, max_seconds, min_repeats=3):
    row = dict(case=case, backend=backend, median_ms=None, p20_ms=None, p80_ms=None,
               repeats=0, peak_mem_bytes=None, max_abs_err=None, correct=None, error=None)
    try:
        why = backend_unavailable(backend)
        if why:
            raise RuntimeError(why)
        row["max_abs_err"], row["correct"] = check_case(case, backend, inp)
        row.update(H.measure(make_case_fn(case, backend, inp), device, repeats=repeats,
                             warmup=warmup, max_seconds=max_seconds, min_repeats=min_repeats))
    except Exception as exc:  # keep going: the report records the failure
        H.record_error(row, exc, quiet=("gpavatar.ops.triplane cannot", "C++ op", "gpavatar.kernels.triplane"))
    finally:
        H.release(device)
    return row


def status(r: dict) -> str:
    return H.error_status(r) or ("ok" if r["correct"] else "MISMATCH")


def render_markdown(payload: dict) -> str:
    cfg, env = payload["config"], payload["env"]
    title = ("## triplane_sample on {dev}\n\nsize `{size}`: B={B} M={M} planes 3x{C}x{H}x{W}, "
             "reduce={reduce}, dtype={dtype}, {inside:.0%} of the points inside [-1, 1]^3").format(
        dev=H.device_label(env), inside=cfg["inside_frac"], **cfg)
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
            ("CUDA max_memory_allocated above the pre-call level (inputs excluded)."
             if cfg["device"].startswith("cuda") else
             "CPU tensor memory from torch.profiler allocation events (no malloc/stack).") +
            " `det` and `bf16` rows are compared with the torch `fwd+bwd` row; `cl` = planes "
            "(B, 3, H, W, C) with channels_last=True. Errors vs the float32 reference on "
            f"{cfg['n_check']} points (bf16: on the bf16-rounded planes, looser tolerance).")
    parts = [title, H.env_markdown(env), H.markdown_table(headers, body), note]
    if payload.get("api_error"):
        parts.append(f"**gpavatar.ops.triplane cannot be imported ({payload['api_error']}); the torch "
                     "rows call gpavatar.ops.reference.triplane_sample_reference directly.**")
    return "\n\n".join(parts) + "\n"


def parse_args(argv=None):
    ap = H.benchmark_parser(__doc__.split("\n\n")[0], 15.0)
    ap.add_argument("--size", choices=sorted(SIZES), default=None,
                    help="default: paper on cuda, cpu on cpu")
    ap.add_argument("--reduce", choices=["mean", "concat"], default="mean")
    ap.add_argument("--backends", default=None, help="comma list to restrict backends")
    ap.add_argument("--cases", default=None,
                    help="comma list of cases (default: all; no bf16 on cpu): " + ",".join(CASES))
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = H.resolve_device(args.device)
    if device is None:
        return 2
    size = args.size or ("paper" if device.type == "cuda" else "cpu")
    repeats = args.repeats or {"paper": 20, "cpu": 10, "small": 10}[size]
    warmup = args.warmup if args.warmup is not None else (3 if device.type == "cuda" else 0)
    cases = (args.cases.split(",") if args.cases else
             list(CASES if device.type == "cuda" else CPU_CASES))
    for c in cases:
        case_spec(c)  # unknown case -> ValueError before anything runs

    inp = make_inputs(**SIZES[size], reduce=args.reduce, device=device, seed=args.seed)
    cfg = dict(size=size, device=str(device), dtype="float32", reduce=args.reduce,
               repeats=repeats, warmup=warmup, max_seconds=args.max_seconds, seed=args.seed,
               inside_frac=inside_fraction(inp["coords"]), n_check=N_CHECK, cases=cases,
               **SIZES[size])
    payload = dict(benchmark="triplane", env=H.env_info(device), config=cfg, rows=[],
                   api_error=None, partial=False, error=None)

    try:
        import gpavatar.ops as ops

        backends = [b for b in ops.available_backends(device)
                    if not (b == "triton" and device.type != "cuda")]
        payload["api_error"] = api_error()
    except Exception as exc:
        payload["error"] = f"cannot import gpavatar.ops: {type(exc).__name__}: {exc}"
        backends = []
    if payload["api_error"]:
        print(f"[bench_triplane] gpavatar.ops.triplane cannot be imported ({payload['api_error']});"
              " torch rows use the reference directly", file=sys.stderr)
    if args.backends:
        keep = set(args.backends.split(","))
        backends = [b for b in backends if b in keep]
    if "torch" in backends:  # reference first
        backends.remove("torch")
        backends.insert(0, "torch")

    for case in cases:
        for b in backends:
            if b == "torch" and case in FUSED_ONLY:
                continue
            print(f"[bench_triplane] {case} / {b} ...", file=sys.stderr, flush=True)
            payload["rows"].append(run_row(case, b, inp, device, repeats=repeats, warmup=warmup,
                                           max_seconds=args.max_seconds,
                                           min_repeats=args.min_repeats))
            if args.json:  # partial results survive a timeout
                H.add_ratios(payload["rows"], baseline_of=baseline_case)
                H.write_json(args.json, dict(payload, partial=True))
    H.add_ratios(payload["rows"], baseline_of=baseline_case)

    return H.emit_report(payload, render_markdown(payload), args.json, args.markdown)


if __name__ == "__main__":
    sys.exit(main())
