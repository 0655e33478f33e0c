"""Benchmark one field pass (``PointsDecoder``): the fused ``ops.field_query`` against the unfused ops.

One pass = what the renderer asks of the field for one set of samples: KNN (K = 8 over the FLAME
points), the PEF blend, the tri-plane mean, the decoder MLPs, density -> alpha and the rgb head
(paper: B = 1, N = 128^2 x 32 = 524288 samples, P = 5023, planes 3 x 32 x 256^2, the decoder
widths of the paper preset, ``normalize="queries"`` and eps = OFFICIAL_EPS as the model).
Samples: ``_distributions``' ``render`` (both passes of a real render of the procedural head,
its points x5); random directions; seeded random weights and planes.

Rows (``case`` / ``variant``):

* ``pass`` / ``unfused fp32``   -- ``PointsDecoder`` with the separate ops, TF32 off (the baseline);
* ``pass`` / ``unfused tf32``   -- the same with ``torch.backends.cuda.matmul.allow_tf32`` (the
  fast mode's Linear layers; a second baseline);
* ``pass`` / ``fused <p>``      -- ``PointsDecoder`` on the fused path, precision p in ieee, tf32x3,
  tf32, bf16 (KNN + weight sums + the kernel);
* ``kernel`` / ``fused <p>``    -- ``ops.field_query`` with the KNN and weight sums precomputed:
  the kernel alone (plus its per-call weight table);
* ``knn`` / ``knn``             -- ``ops.knn`` alone (what every pass pays before the kernel);
* ``pass`` / ``layers <p>``     -- ``PointsDecoder`` with the tri-plane and PEF ops and the decoder's
  layers as one Triton kernel (``fused_layers``; ``ops.field_query.field_layers``), p in ieee, tf32,
  bf16 (tf32 and bf16 with TF32 allowed; bf16 under bf16 autocast);
* ``layers`` / ``torch <p>``    -- the decoder's layers alone on precomputed tri-plane and PEF
  features, as torch ops (p: fp32, tf32, bf16 autocast), and ``layers`` / ``layers <p>`` as the kernel;
* ``--sweep``: ``kernel`` rows for BLOCK_M x num_warps in SWEEP (tile tuning on a GPU), and
  ``layers`` rows for LAYERS_SWEEP.

Every row is checked against the unfused fp32 pass over all samples before timing: alpha within
TOL[p] absolute, value within TOL[p] of each channel's largest |value|; a fused row must have
launched the kernel (else ``ERROR``: it fell back).  Ratios: ``vs fp32`` = unfused fp32 ms / row ms;
``vs best`` = the fastest unfused row's ms / row ms; ``mem vs fp32`` = row peak / unfused fp32 peak.

Without a GPU: ``--device cpu`` runs the unfused rows, and the fused rows only under
``TRITON_INTERPRET=1`` (``--size tiny``: a smoke run); otherwise they are listed as skipped.

Usage::

    python benchmarks/bench_field.py [--device cpu|cuda|auto] [--size paper|small|tiny]
        [--normalize queries|neighbors] [--precisions ieee,tf32,...] [--sweep]
        [--repeats N] [--json PATH] [--markdown PATH]
"""

from __future__ import annotations

import contextlib
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _distributions as D  # noqa: E402
import _harness as H  # noqa: E402

if H.REPO_ROOT not in sys.path:  # an installed gpavatar still takes precedence
    sys.path.append(H.REPO_ROOT)

SIZES = {
    "paper": dict(B=1, N=524288, P=5023, K=8, plane=256),  # one pass of a 128^2 x (32 + 32) frame (GPU)
    "small": dict(B=1, N=16384, P=1024, K=8, plane=64),
    "tiny": dict(B=1, N=96, P=120, K=8, plane=16),  # smoke run (the Triton interpreter on a CPU)
}
PRECISIONS = ("ieee", "tf32x3", "tf32", "bf16")
BASELINES = ("unfused fp32", "unfused tf32")
TOL = {"fp32": 1e-4, "tf32": 2e-2, "ieee": 1e-4, "tf32x3": 1e-3, "bf16": 5e-2}  # see the module docstring
SWEEP = ((32, 4), (64, 4), (64, 8), (128, 8))  # (BLOCK_M, num_warps)
LAYERS_PRECISIONS = ("ieee", "tf32", "bf16")
LAYERS_SWEEP = ((64, 4), (64, 8), (128, 8), (256, 8))  # (BLOCK_M, num_warps) of the layers kernel


def widths() -> dict:
    """The decoder widths of the paper preset."""
    from gpavatar.model.config import GPAvatarConfig

    c = GPAvatarConfig.preset("paper")
    return dict(plane_channels=c.plane_channels, point_feature_dim=c.point_feature_dim, pef_dim=c.pef_dim,
                K=c.K, hidden=c.decoder_hidden, value_hidden=c.value_hidden, value_dim=c.render_channels)


def fused_unavailable(device: torch.device) -> str | None:
    from gpavatar.ops import _backend

    if not _backend.triton_available():
        return "triton is not installed"
    if device.type != "cuda" and not _backend.triton_interpreted():
        return "the fused kernel needs a GPU (or TRITON_INTERPRET=1 on the CPU)"
    return None


def make_inputs(B, N, P, K, plane, *, normalize="queries", device="cpu", seed=0) -> dict:
    from gpavatar.model.decoder import PointsDecoder
    from gpavatar.ops import _backend
    from gpavatar.ops.knn_blend import OFFICIAL_EPS

    device = torch.device(device)
    coords, points = D.make_queries("render", B, N, P, seed=seed, device=device)
    g = torch.Generator().manual_seed(seed)
    w = widths()
    dirs = torch.randn(B, N, 3, generator=g).to(device)
    planes = (0.5 * torch.randn(B, 3, plane, plane, w["plane_channels"], generator=g)).to(device)
    torch.manual_seed(seed)
    # CPU: the fused path exists only as the Triton backend under the interpreter
    backend = "triton" if device.type == "cpu" and _backend.triton_interpreted() else None
    dec = PointsDecoder(num_points=P, normalize=normalize, eps=OFFICIAL_EPS, backend=backend, **w)
    dec = dec.to(device).eval().requires_grad_(False)
    return dict(dec=dec, args=(coords, dirs, planes, points), K=K, normalize=normalize)


@contextlib.contextmanager
def _tf32(on: bool):
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = on
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


@contextlib.contextmanager
def count_launches(calls: list):
    """Counts the fused and the layers kernels' launches (the custom ops import field_forward /
    field_layers_forward at each call)."""
    import gpavatar.kernels.field_layers as layers_module
    import gpavatar.kernels.field_query as kernel_module

    spied = [(kernel_module, "field_forward"), (layers_module, "field_layers_forward")]
    reals = [getattr(m, name) for m, name in spied]

    def spy(real):
        def fn(*args, **kwargs):
            calls.append(1)
            return real(*args, **kwargs)
        return fn

    for (m, name), real in zip(spied, reals):
        setattr(m, name, spy(real))
    try:
        yield
    finally:
        for (m, name), real in zip(spied, reals):
            setattr(m, name, real)


@contextlib.contextmanager
def _layers_precision(precision: str, device: torch.device):
    """The torch flags under which the layers (torch or kernel) run at ``precision``: TF32 allowed for
    tf32 and bf16, bf16 autocast for bf16."""
    with _tf32(precision in ("tf32", "bf16")), torch.autocast(device.type, dtype=torch.bfloat16,
                                                                 enabled=precision == "bf16"):
        yield


def make_case_fn(case: str, variant: str, inp: dict, block: tuple | None = None):
    """A zero-argument callable returning (alpha, value) (``knn``: (dist2, idx))."""
    import gpavatar.ops as ops

    dec, (coords, dirs, planes, points) = inp["dec"], inp["args"]
    if case == "knn":
        def fn():
            with torch.no_grad():
                return tuple(ops.knn(coords, points, inp["K"], backend=dec.backend, validate=False))
        return fn
    kind, precision = variant.split()
    if case == "pass" and kind == "layers":
        def fn():
            dec.fused_field, dec.fused_layers = False, True
            try:
                with torch.no_grad(), _layers_precision(precision, coords.device):
                    return dec(coords, dirs, planes, points, validate=False)
            finally:
                dec.fused_layers = None
        return fn
    if case == "pass":
        def fn():
            dec.fused_field = kind == "fused"
            dec.field_precision = precision if kind == "fused" else None
            with torch.no_grad(), _tf32(precision == "tf32"):
                return dec(coords, dirs, planes, points, validate=False)
        return fn
    if case == "layers":
        from gpavatar.ops.field_query import field_layers

        with torch.no_grad():
            tri = ops.triplane_sample(planes, coords, "mean", channels_last=True, backend=dec.backend,
                                      validate=False)
            expr = dec.points_querier(coords, points, validate=False)
        weights = dec.field_weights()
        block_m, num_warps = block or (None, None)

        def fn():
            with torch.no_grad(), _layers_precision(precision, coords.device):
                return tuple(field_layers(tri, expr, coords, dirs, weights, kernel=kind == "layers",
                                          block_m=block_m, num_warps=num_warps))
        return fn
    if case != "kernel" or kind != "fused":
        raise ValueError(f"unknown case {case!r} / variant {variant!r}")
    with torch.no_grad():
        knn = ops.knn(coords, points, inp["K"], backend=dec.backend, validate=False)
        ws = ops.knn_blend_weight_sum(knn.dist2, dec.points_querier.eps) if inp["normalize"] == "queries" else None
    weights = dec.field_weights()
    block_m, num_warps = block or (None, None)

    def fn():
        with torch.no_grad():
            return tuple(ops.field_query(coords, dirs, planes, points, weights, knn=knn, normalize=inp["normalize"],
                                         eps=dec.points_querier.eps, weight_sum=ws, precision=precision, fused=True,
                                         backend=dec.backend, validate=False, block_m=block_m, num_warps=num_warps))
    return fn


def check(out, ref, precision: str) -> tuple[float, bool]:
    """(error, ok): max |alpha - ref| and max |value - ref| / (each channel's max |ref|)."""
    (alpha, value), (ref_alpha, ref_value) = out, ref
    scale = ref_value.abs().amax(dim=(0, 1)).clamp_min(1e-6)
    err = max(float((alpha - ref_alpha).abs().max()), float(((value - ref_value).abs() / scale).max()))
    return err, err <= TOL[precision] and bool(value.isfinite().all())


def run_row(case, variant, inp, ref, device, *, block=None, repeats, warmup, max_seconds, min_repeats=3):
    row = dict(case=case, variant=variant, backend=variant, block=list(block) if block else None, median_ms=None,
               p20_ms=None, p80_ms=None, repeats=0, peak_mem_bytes=None, max_err=None, correct=None, error=None)
    try:
        fn = make_case_fn(case, variant, inp, block)
        if case != "knn":
            calls: list = []
            with count_launches(calls):
                out = fn()
            if variant.startswith(("fused", "layers")) and not calls:
                raise RuntimeError("the kernel did not run (the pass fell back to the unfused ops)")
            row["max_err"], row["correct"] = check(out, ref, variant.split()[1])
            del out
        row.update(H.measure(fn, device, repeats=repeats, warmup=warmup, max_seconds=max_seconds,
                             min_repeats=min_repeats))
        row["ns_per_sample"] = 1e6 * row["median_ms"] / inp["args"][0].shape[:2].numel()
    except Exception as exc:  # keep going: the report records the failure
        H.record_error(row, exc)
    finally:
        H.release(device)
    return row


def add_ratios(rows: list[dict]) -> None:
    base = next((r for r in rows if r["variant"] == "unfused fp32" and r["error"] is None and r["median_ms"]), None)
    for r in rows:
        r["speedup_vs_fp32"] = base["median_ms"] / r["median_ms"] if base and r["median_ms"] else None
        r["mem_vs_fp32"] = (r["peak_mem_bytes"] / base["peak_mem_bytes"]
                            if base and r["peak_mem_bytes"] is not None and base["peak_mem_bytes"] else None)
    H.add_baseline_ratios(rows, BASELINES, key=lambda r: "pass")


def render_markdown(payload: dict) -> str:
    cfg, env = payload["config"], payload["env"]
    title = (f"## field pass (PointsDecoder) on {H.device_label(env)}\n\nsize `{cfg['size']}`: B={cfg['B']} "
             f"N={cfg['N']} P={cfg['P']} K={cfg['K']} planes 3x{cfg['widths']['plane_channels']}x{cfg['plane']}^2, "
             f"widths {cfg['widths']}, normalize={cfg['normalize']}, samples: render distribution")
    headers = ["case", "variant", "block", "median ms", "p20-p80 ms", "ns/sample", "vs fp32", "vs best", "peak mem",
               "mem vs fp32", "max err", "status"]
    body = []
    for r in payload["rows"]:
        spread = f"{H.fmt_ms(r['p20_ms'])}-{H.fmt_ms(r['p80_ms'])}" if r["p20_ms"] is not None else "-"
        body.append([r["case"], r["variant"], "x".join(map(str, r["block"])) if r["block"] else "default",
                     H.fmt_ms(r["median_ms"]), spread,
                     f"{r['ns_per_sample']:.2f}" if r.get("ns_per_sample") else "-",
                     H.fmt_ratio(r.get("speedup_vs_fp32")), H.fmt_ratio(r.get("speedup_vs_best")),
                     H.fmt_bytes(r["peak_mem_bytes"]), H.fmt_ratio(r.get("mem_vs_fp32")),
                     "-" if r["max_err"] is None else f"{r['max_err']:.1e}",
                     H.error_status(r) or ("ok" if r["correct"] in (True, None) else "MISMATCH")])
    notes = ["Times: median (p20-p80) over repeats; peak mem: above the pre-call level (inputs and weights "
             "excluded). pass = KNN + weight sums + field (the decoder's call); kernel = ops.field_query with "
             "the KNN precomputed; layers = the decoder's layers alone on precomputed tri-plane and PEF "
             "features (torch ops, or the layers kernel). max err: against the unfused fp32 pass, alpha absolute and value relative to "
             f"each channel's max |value|; tolerances {TOL}. vs fp32 / vs best: the unfused fp32 row's / the "
             "fastest unfused row's ms over this row's."]
    skipped = payload.get("skipped") or {}
    notes += [f"- `{k}` not run: {why}" for k, why in skipped.items()]
    return "\n\n".join([title, H.env_markdown(env), H.markdown_table(headers, body), "\n".join(notes)]) + "\n"


def parse_args(argv=None):
    ap = H.benchmark_parser(__doc__.split("\n\n")[0], 10.0)
    ap.add_argument("--size", choices=sorted(SIZES), default=None, help="default: paper on cuda, tiny on cpu")
    ap.add_argument("--normalize", choices=["queries", "neighbors"], default="queries")
    ap.add_argument("--precisions", default=",".join(PRECISIONS), help="comma list of fused precisions")
    ap.add_argument("--sweep", action="store_true", help=f"also time the kernel at BLOCK_M x warps {SWEEP}")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = H.resolve_device(args.device)
    if device is None:
        return 2
    size = args.size or ("paper" if device.type == "cuda" else "tiny")
    repeats = args.repeats or (20 if device.type == "cuda" else 3)
    warmup = args.warmup if args.warmup is not None else (3 if device.type == "cuda" else 0)
    precisions = [p for p in args.precisions.split(",") if p]
    bad = [p for p in precisions if p not in PRECISIONS]
    if bad:
        print(f"error: unknown precision(s) {bad}; choose from {PRECISIONS}", file=sys.stderr)
        return 2
    cfg = dict(size=size, device=str(device), normalize=args.normalize, precisions=precisions, sweep=args.sweep,
               repeats=repeats, warmup=warmup, max_seconds=args.max_seconds, seed=args.seed, **SIZES[size])
    payload = dict(benchmark="field", env=H.env_info(device), config=cfg, rows=[], skipped={}, partial=False,
                   error=None)
    try:
        cfg["widths"] = widths()
        inp = make_inputs(**SIZES[size], normalize=args.normalize, device=device, seed=args.seed)
        why = fused_unavailable(device)
    except Exception as exc:
        payload["error"] = f"cannot set up: {type(exc).__name__}: {exc}"[:500]
        return H.emit_report(payload, render_markdown(payload), args.json, args.markdown)

    plan = [("pass", v, None) for v in BASELINES if device.type == "cuda" or v == "unfused fp32"]
    plan.append(("knn", "knn", None))
    if why:
        payload["skipped"].update({f"fused {p}": why for p in precisions})
    else:
        plan += [(case, f"fused {p}", None) for case in ("pass", "kernel") for p in precisions]
        # the layers kernel at the asked precisions it has, each after the torch layers at the same flags
        layers = [p for p in precisions if p in LAYERS_PRECISIONS]
        plan += [("pass", f"layers {p}", None) for p in layers]
        plan += [("layers", f"{kind} {p}", None) for kernel_p in layers
                 for kind, p in (("torch", "fp32" if kernel_p == "ieee" else kernel_p), ("layers", kernel_p))]
        if args.sweep:
            plan += [("kernel", f"fused {p}", block) for p in precisions for block in SWEEP]
            plan += [("layers", f"layers {p}", block) for p in ("tf32", "bf16") for block in LAYERS_SWEEP]
    with torch.no_grad(), _tf32(False):
        ref = make_case_fn("pass", "unfused fp32", inp)()
    for case, variant, block in plan:
        print(f"[bench_field] {case} / {variant} / {block or 'default'} ...", file=sys.stderr, flush=True)
        payload["rows"].append(run_row(case, variant, inp, ref, device, block=block, repeats=repeats, warmup=warmup,
                                       max_seconds=args.max_seconds, min_repeats=args.min_repeats))
        if args.json:  # partial results survive a timeout
            add_ratios(payload["rows"])
            H.write_json(args.json, dict(payload, partial=True))
    add_ratios(payload["rows"])
    return H.emit_report(payload, render_markdown(payload), args.json, args.markdown)


if __name__ == "__main__":
    sys.exit(main())
