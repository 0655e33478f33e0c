"""Benchmark the volume renderer (``gpavatar.model.renderer.VolumeRenderer``) and its ray ops.

For every backend usable on the chosen device (``gpavatar.ops.available_backends``;
Triton is never run on the CPU) and every batch size of the chosen size, these cases
are measured on R = B * image^2 rays (paper: 128x128 rays, 32 coarse + 32 fine samples,
32 channels, B = 1 and 2):

* ``ray_box``            -- ``ops.ray_box`` of the camera rays (R, 3);
* ``stratified``         -- ``ops.stratified_depths`` (R, n_coarse), evaluation (no jitter);
* ``importance``         -- ``ops.importance_depths`` from (R, n_coarse) depths and weights;
* ``merge``              -- ``ops.merge_samples`` of coarse and fine depths;
* ``composite fwd``      -- ``ops.composite`` of (R, S) alphas and (R, S, C) values with
  depths, S = n_coarse + n_fine, under ``torch.no_grad()``;
* ``composite fwd+bwd``  -- the same, then ``torch.autograd.grad`` of random upstream
  gradients of color and opacity w.r.t. alphas and values;
* ``render fwd``         -- the whole ``VolumeRenderer`` (both passes) with a trivial
  field (alpha = sigmoid of a linear function of the coordinates, zeroed outside the box;
  value = a linear map of the coordinates), under ``torch.no_grad()``;
* ``render fwd+bwd``     -- the same, then gradients of the fine and coarse images
  w.r.t. the field's parameters;
* ``chain fwd``          -- the whole ``VolumeRenderer`` (camera rays, box, both sampling
  passes, merge, gathers, both composites, depth) driven by a field of ~zero cost: it
  returns alpha (B, N) / value (B, N, C) tensors precomputed once for each pass (N =
  image^2 * n_coarse for the coarse call, image^2 * n_fine for the fine one), so the row
  isolates the sampling + compositing chain (issue 5 target: <= 0.5 ms per frame at
  128^2 rays x 64 samples on an H100), under ``torch.no_grad()``;
* ``chain fwd+bwd``      -- the same with the precomputed tensors as leaves requiring grad,
  then gradients of the fine and coarse images w.r.t. them.

Every row also gets ``ms_per_frame`` = median / B (the ``ms/frame`` column).

The ray ops have no Triton kernels (``backend="triton"`` dispatches them to the CUDA op),
so the four ray-op cases get no ``triton`` row.  A ``nerfacc`` row is added for
``ray_box`` and both composite cases when ``import nerfacc`` works (0.5.x API:
``ray_aabb_intersect``, ``render_weight_from_alpha``, ``accumulate_along_rays``).

The camera: R a small per-batch rotation, T = (0, 0, 14): the box [-1, 1]^3 covers most of
the view and some corner rays miss it (the share of hits is in the config).

Before timing, each backend is compared with the torch reference (``gpavatar.ops.reference``
for the ops on N_CHECK rays spread over the image; a ``backend="torch"`` renderer at image 16
for the render and chain cases, outputs and gradients w.r.t. the field's parameters / the
precomputed tensors); the largest absolute error is stored as ``max_abs_err`` and a row
whose error exceeds the tolerance is flagged ``MISMATCH`` (the run goes on).  Speed-up and
memory ratios are relative to the ``torch`` row of the same case and B in the same run.  A
backend that raises (or whose C++ / Triton op is not registered yet: the public ops would
silently fall back to torch) gets its error string in the row; the script still exits 0.

Usage::

    python benchmarks/bench_render.py [--device cpu|cuda|auto]
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
    "paper": dict(Bs=(1, 2), image=128, n_coarse=32, n_fine=32, C=32),  # GPU
    "cpu": dict(Bs=(1,), image=64, n_coarse=32, n_fine=32, C=32),
    "small": dict(Bs=(1,), image=16, n_coarse=8, n_fine=8, C=8),  # smoke run
}
FOCAL, CAMERA_DISTANCE = 12.0, 14.0
CHECK_IMAGE = 16  # render and chain cases are checked at this image size
CHAIN_TARGET_MS = 0.5  # issue 5: sampling + compositing chain per frame at 128^2 x 64 on an H100
N_CHECK = 1024  # rays used for the op checks
ATOL, RTOL = 1e-4, 1e-4  # flagged when |a-b| > ATOL + RTOL * max|ref|
RAY_CASES = ("ray_box", "stratified", "importance", "merge")
RENDERER_CASES = ("render fwd", "render fwd+bwd", "chain fwd", "chain fwd+bwd")  # whole VolumeRenderer
CASES = RAY_CASES + ("composite fwd", "composite fwd+bwd") + RENDERER_CASES
NERFACC_CASES = ("ray_box", "composite fwd", "composite fwd+bwd")


# --- availability ------------------------------------------------------------------------------

def api_error() -> str | None:
    """Why gpavatar.ops / gpavatar.model.renderer cannot be imported (None when they can)."""
    return H.import_error("gpavatar.model.renderer", "gpavatar.ops")


def _cpp_missing(names) -> str | None:
    try:
        from gpavatar import _extension

        if not _extension.available():
            return f"C++ extension not loaded ({_extension.load_error()})"[:300]
    except Exception as exc:
        return f"gpavatar._extension: {type(exc).__name__}: {exc}"[:300]
    missing = [n for n in names if not hasattr(torch.ops.gpavatar, n)]
    return f"C++ op gpavatar::{', '.join(missing)} is not registered (extension built without it)" if missing else None


def backend_unavailable(case: str, backend: str) -> str | None:
    """Why ``backend`` cannot run ``case`` with its own kernels (None when it should)."""
    err = api_error()
    if err:
        return f"gpavatar cannot be imported ({err})"
    if backend == "torch":
        return None
    if backend == "nerfacc":
        return None if nerfacc_available() else "nerfacc cannot be imported"
    ray_ops = ("ray_box", "stratified_depths", "importance_depths", "merge_samples")
    needs_rays = case in RAY_CASES or case in RENDERER_CASES
    needs_comp = case.startswith("composite") or case in RENDERER_CASES
    if backend in ("cpu", "cuda"):
        names = (ray_ops if needs_rays else ()) + (("composite_forward",) if needs_comp else ())
        return _cpp_missing(names)
    if backend == "triton":
        if case in RAY_CASES:
            return "no Triton kernel for the ray ops (backend='triton' dispatches them to the CUDA op)"
        if case in RENDERER_CASES:  # the ray ops of the renderer run on the CUDA op
            why = _cpp_missing(ray_ops)
            if why:
                return why
        try:
            import gpavatar.kernels.composite  # noqa: F401
        except Exception as exc:
            return f"gpavatar.kernels.composite: {type(exc).__name__}: {exc}"[:300]
    return None


def nerfacc_available() -> bool:
    try:
        import nerfacc  # noqa: F401

        return True
    except Exception:
        return False


# --- inputs ------------------------------------------------------------------------------------

def _rotation(angles: torch.Tensor) -> torch.Tensor:
    """(B, 3) small angles -> (B, 3, 3) = Rz Ry Rx."""
    cx, cy, cz = angles.cos().unbind(-1)
    sx, sy, sz = angles.sin().unbind(-1)
    one, zero = torch.ones_like(cx), torch.zeros_like(cx)
    rx = torch.stack([one, zero, zero, zero, cx, -sx, zero, sx, cx], -1).reshape(-1, 3, 3)
    ry = torch.stack([cy, zero, sy, zero, one, zero, -sy, zero, cy], -1).reshape(-1, 3, 3)
    rz = torch.stack([cz, -sz, zero, sz, cz, zero, zero, zero, one], -1).reshape(-1, 3, 3)
    return rz @ ry @ rx


def make_transform(B: int, generator: torch.Generator) -> torch.Tensor:
    R = _rotation((torch.rand(B, 3, generator=generator, dtype=torch.float64) - 0.5) * 0.3)
    T = torch.tensor([0.0, 0.0, CAMERA_DISTANCE], dtype=torch.float64).expand(B, 3)
    return torch.cat([R, T[..., None]], dim=2).float()


def make_inputs(B, image, n_coarse, n_fine, C, *, device="cpu", seed=0) -> dict:
    """Seeded camera rays and every intermediate of a render (computed with the reference),
    plus the trivial field's parameters and upstream gradients."""
    from gpavatar.model.renderer import camera_rays, pixel_grid
    from gpavatar.ops import reference as ref

    g = torch.Generator().manual_seed(seed)
    transform = make_transform(B, g)
    o, d = camera_rays(transform, pixel_grid(image, image, FOCAL))
    o, d = o.reshape(-1, 3).contiguous(), d.reshape(-1, 3).contiguous()
    R, S = o.shape[0], n_coarse + n_fine
    t0, t1, hit = ref.ray_box_reference(o, d)
    coarse = ref.stratified_depths_reference(t0, t1, n_coarse)
    alphas_c = torch.rand(R, n_coarse, generator=g) * 0.3
    weights = ref.composite_reference(alphas_c, torch.zeros(R, n_coarse, 1))[2]
    fine = ref.importance_depths_reference(coarse, weights, n_fine)
    depths, _ = ref.merge_samples_reference(coarse, fine)
    out = dict(
        transform=transform, origins=o, dirs=d, t0=t0, t1=t1, coarse=coarse, weights=weights, fine=fine,
        depths=depths, alphas=torch.rand(R, S, generator=g) * 0.3, values=torch.randn(R, S, C, generator=g),
        grad_color=torch.randn(R, C, generator=g), grad_opacity=torch.randn(R, generator=g),
        field_a=torch.randn(3, generator=g), field_b=torch.tensor([-1.5]),
        field_w=torch.randn(3, C, generator=g) / math.sqrt(3), field_c=torch.randn(C, generator=g) * 0.1,
        grad_fine=torch.randn(B, C, image, image, generator=g),
        grad_coarse=torch.randn(B, C, image, image, generator=g),
    )
    # The chain cases' precomputed field outputs (drawn last: the tensors above do not change).
    for which, n in (("coarse", n_coarse), ("fine", n_fine)):
        out[f"chain_alpha_{which}"] = torch.rand(B, image * image * n, generator=g) * 0.3
        out[f"chain_value_{which}"] = torch.randn(B, image * image * n, C, generator=g)
    out = {k: t.to(device).contiguous() for k, t in out.items()}
    out.update(B=B, image=image, n_coarse=n_coarse, n_fine=n_fine, C=C, hit_frac=float(hit.double().mean()))
    return out


def subset(inp: dict, n: int) -> dict:
    """n rays spread evenly over the image (hits and misses), every per-ray tensor."""
    keys = ("origins", "dirs", "t0", "t1", "coarse", "weights", "fine", "depths", "alphas", "values",
            "grad_color", "grad_opacity")
    R = inp["origins"].shape[0]
    idx = torch.linspace(0, R - 1, min(n, R), device=inp["origins"].device).round().long()
    return dict(inp, **{k: inp[k].index_select(0, idx).contiguous() for k in keys})


def trivial_field(params):
    a, b, w, c = params

    def field(coords, dirs):
        inside = ((coords > -1) & (coords < 1)).all(dim=-1)
        alpha = torch.sigmoid(coords @ a + b) * inside.to(coords.dtype)
        return alpha, coords @ w + c, None

    return field


CHAIN_KEYS = ("chain_alpha_coarse", "chain_value_coarse", "chain_alpha_fine", "chain_value_fine")


def chain_field(tensors):
    """A field of ~zero cost for one render: it returns the precomputed (alpha, value) of
    each pass, ``tensors`` = (alpha_coarse (B, N_c), value_coarse (B, N_c, C), alpha_fine
    (B, N_f), value_fine (B, N_f, C)).  The pass is told by N; when n_coarse == n_fine (the
    paper's 32 + 32) both match, and the call order decides (the renderer calls the field
    exactly twice per forward, coarse first).  Make a fresh one per render."""
    alpha_c, value_c, alpha_f, value_f = tensors
    pending = [(alpha_c, value_c), (alpha_f, value_f)]

    def field(coords, dirs):
        N = coords.shape[1]
        i = 0 if pending[0][0].shape[1] == N or len(pending) == 1 else 1
        alpha, value = pending.pop(i)
        if alpha.shape[1] != N:
            raise ValueError(f"chain field: no precomputed pass with N = {N}")
        return alpha, value, None

    return field


def _chain_tensors(inp, requires_grad):
    return tuple(inp[k].detach().clone().requires_grad_(requires_grad) for k in CHAIN_KEYS)


def _field_params(inp, requires_grad):
    return tuple(inp[k].detach().clone().requires_grad_(requires_grad)
                 for k in ("field_a", "field_b", "field_w", "field_c"))


# --- cases -------------------------------------------------------------------------------------

def _nerfacc_case_fn(case: str, inp: dict):
    import nerfacc

    if case == "ray_box":
        o, d = inp["origins"], inp["dirs"]
        aabb = torch.tensor([[-1.0, -1.0, -1.0, 1.0, 1.0, 1.0]], device=o.device)

        def fn():
            t_min, t_max, hits = nerfacc.ray_aabb_intersect(o, d, aabb)
            return t_min[:, 0], t_max[:, 0], hits[:, 0]
        return fn

    backward = case == "composite fwd+bwd"
    alphas = inp["alphas"].detach().requires_grad_(backward)
    values = inp["values"].detach().requires_grad_(backward)

    def forward():
        weights, _ = nerfacc.render_weight_from_alpha(alphas)
        color = nerfacc.accumulate_along_rays(weights, values)
        opacity = nerfacc.accumulate_along_rays(weights, None)[..., 0].clamp(0, 1)
        return color, opacity, weights

    if not backward:
        def fn():
            with torch.no_grad():
                return forward()
        return fn

    def fn():
        color, opacity, weights = forward()
        grads = torch.autograd.grad((color, opacity), (alphas, values), (inp["grad_color"], inp["grad_opacity"]))
        return (color, opacity, weights), grads
    return fn


def make_case_fn(case: str, backend: str, inp: dict):
    """A zero-argument callable running ``case`` with ``backend`` on ``inp``."""
    if backend == "nerfacc":
        return _nerfacc_case_fn(case, inp)
    import gpavatar.ops as ops
    from gpavatar.model.renderer import VolumeRenderer

    kw = dict(backend=backend)
    if case == "ray_box":
        return lambda: ops.ray_box(inp["origins"], inp["dirs"], **kw)
    if case == "stratified":
        return lambda: ops.stratified_depths(inp["t0"], inp["t1"], inp["n_coarse"], **kw)
    if case == "importance":
        return lambda: ops.importance_depths(inp["coarse"], inp["weights"], inp["n_fine"], **kw)
    if case == "merge":
        return lambda: ops.merge_samples(inp["coarse"], inp["fine"], **kw)
    if case.startswith("composite"):
        backward = case == "composite fwd+bwd"
        alphas = inp["alphas"].detach().requires_grad_(backward)
        values = inp["values"].detach().requires_grad_(backward)
        if not backward:
            def fn():
                with torch.no_grad():
                    return tuple(ops.composite(alphas, values, inp["depths"], **kw))
            return fn

        def fn():
            out = ops.composite(alphas, values, inp["depths"], **kw)
            grads = torch.autograd.grad((out.color, out.opacity), (alphas, values),
                                        (inp["grad_color"], inp["grad_opacity"]))
            return tuple(out), grads
        return fn
    if case in RENDERER_CASES:
        backward = case.endswith("fwd+bwd")
        renderer = VolumeRenderer(image_size=inp["image"], focal=FOCAL, n_coarse=inp["n_coarse"],
                                  n_fine=inp["n_fine"], backend=backend).to(inp["transform"].device)
        if case.startswith("chain"):  # precomputed once; a fresh (free) closure per render
            params = _chain_tensors(inp, backward)

            def new_field():
                return chain_field(params)
        else:
            params = _field_params(inp, backward)
            field = trivial_field(params)

            def new_field():
                return field
        transform = inp["transform"]
        if not backward:
            def fn():
                with torch.no_grad():
                    return renderer(new_field(), transform)
            return fn

        def fn():
            out = renderer(new_field(), transform)
            grads = torch.autograd.grad((out["fine"], out["coarse"]), params,
                                        (inp["grad_fine"], inp["grad_coarse"]))
            return out, grads
        return fn
    raise ValueError(f"unknown case {case!r}")


# --- correctness -------------------------------------------------------------------------------

def _err(a, ref) -> tuple[float, float]:
    """(max abs error, error / (ATOL + RTOL max|ref|)) -- the second > 1 flags a mismatch."""
    a, ref = torch.as_tensor(a).detach().double(), torch.as_tensor(ref).detach().double()
    if a.shape != ref.shape:
        raise ValueError(f"shape {tuple(a.shape)} != reference {tuple(ref.shape)}")
    if a.dtype == torch.bool or not a.numel():
        e = float((a != ref).sum()) if a.numel() else 0.0
        return e, e / ATOL if e else 0.0
    e = (a - ref).abs().max().item()
    return e, e / (ATOL + RTOL * ref.abs().max().item())


def _reference_outputs(case: str, inp: dict):
    """The torch reference of ``case`` on ``inp``, as a flat list of tensors matching _flatten."""
    from gpavatar.ops import reference as ref

    if case == "ray_box":
        return list(ref.ray_box_reference(inp["origins"], inp["dirs"]))
    if case == "stratified":
        return [ref.stratified_depths_reference(inp["t0"], inp["t1"], inp["n_coarse"])]
    if case == "importance":
        return [ref.importance_depths_reference(inp["coarse"], inp["weights"], inp["n_fine"])]
    if case == "merge":
        return [ref.merge_samples_reference(inp["coarse"], inp["fine"])[0]]
    backward = case == "composite fwd+bwd"
    alphas = inp["alphas"].detach().clone().requires_grad_(backward)
    values = inp["values"].detach().clone().requires_grad_(backward)
    color, opacity, weights, depth = ref.composite_reference(alphas, values, inp["depths"])
    outs = [color, opacity, weights]
    if backward:
        outs += list(torch.autograd.grad((color, opacity), (alphas, values),
                                         (inp["grad_color"], inp["grad_opacity"])))
    return outs


def _flatten(case: str, backend: str, got, inp: dict):
    if case == "ray_box":
        t0, t1, hit = got
        return [t0, t1, hit]
    if case == "merge":
        depths, order = got
        both = torch.cat([inp["coarse"], inp["fine"]], dim=1)
        if not torch.equal(both.gather(1, order), depths):
            raise ValueError("merge order does not reproduce the merged depths")
        return [depths]
    if case in ("stratified", "importance"):
        return [got]
    forward, grads = (got, ()) if case == "composite fwd" else got
    return list(forward[:3]) + list(grads)


def check_case(case: str, backend: str, inp: dict, device) -> tuple[float, bool]:
    if case in RENDERER_CASES:
        return _check_render(case, backend, inp, device)
    sub = subset(inp, N_CHECK)
    got = _flatten(case, backend, make_case_fn(case, backend, sub)(), sub)
    ref = _reference_outputs(case, sub)
    if case == "ray_box" and backend == "nerfacc":  # nerfacc marks misses differently: compare hits
        hit = ref[2] & got[2]
        got, ref = [got[0][hit], got[1][hit], got[2]], [ref[0][hit], ref[1][hit], ref[2]]
    errs = [_err(a, b) for a, b in zip(got, ref)]
    return max(e for e, _ in errs), max(s for _, s in errs) <= 1.0


def _check_render(case: str, backend: str, inp: dict, device) -> tuple[float, bool]:
    small = make_inputs(inp["B"], min(CHECK_IMAGE, inp["image"]), inp["n_coarse"], inp["n_fine"], inp["C"],
                        device=device, seed=1)
    got, want = make_case_fn(case, backend, small)(), make_case_fn(case, "torch", small)()
    if not case.endswith("fwd+bwd"):
        got, want = (got, ()), (want, ())
    keys = ("coarse", "fine", "opacity", "depth_raw", "coarse_alphas")
    errs = [_err(got[0][k], want[0][k]) for k in keys]
    errs += [_err(a, b) for a, b in zip(got[1], want[1])]
    return max(e for e, _ in errs), max(s for _, s in errs) <= 1.0


# --- rows --------------------------------------------------------------------------------------

def run_row(case, backend, inp, device, *, repeats, warmup, max_seconds, min_repeats=3):
    row = dict(case=case, backend=backend, B=inp["B"], rays=inp["origins"].shape[0],
               samples=inp["n_coarse"] + inp["n_fine"], median_ms=None, p20_ms=None, p80_ms=None,
               repeats=0, ms_per_frame=None, peak_mem_bytes=None, max_abs_err=None, correct=None,
               error=None)
    try:
        why = backend_unavailable(case, backend)
        if why:
            raise RuntimeError(why)
        row["max_abs_err"], row["correct"] = check_case(case, backend, inp, device)
        row.update(H.measure(make_case_fn(case, backend, inp), device, repeats=repeats,
                             warmup=warmup, max_seconds=max_seconds, min_repeats=min_repeats))
        if row["median_ms"] is not None:
            row["ms_per_frame"] = row["median_ms"] / row["B"]
    except Exception as exc:  # keep going: the report records the failure
        H.record_error(row, exc, quiet=("gpavatar cannot", "C++ ", "no Triton", "gpavatar.kernels", "nerfacc cannot"))
    finally:
        H.release(device)
    return row


def status(r: dict) -> str:
    return H.error_status(r) or ("ok" if r["correct"] else "MISMATCH")


def render_markdown(payload: dict) -> str:
    cfg, env = payload["config"], payload["env"]
    title = ("## volume renderer and ray ops on {dev}\n\nsize `{size}`: B in {Bs}, {image}x{image} rays, "
             "{n_coarse} + {n_fine} samples per ray, C={C}, focal {focal:g}, camera at distance {dist:g} "
             "({hit} of the rays hit the box)").format(
        dev=H.device_label(env), Bs=list(cfg["Bs"]), focal=FOCAL, dist=CAMERA_DISTANCE,
        hit="-" if cfg["hit_frac"] is None else f"{cfg['hit_frac']:.0%}",
        **{k: cfg[k] for k in ("size", "image", "n_coarse", "n_fine", "C")})
    headers = ["case", "B", "backend", "median ms", "p20-p80 ms", "ms/frame", "speed-up vs torch",
               "peak mem", "mem vs torch", "max abs err", "status"]
    body = []
    for r in payload["rows"]:
        spread = f"{H.fmt_ms(r['p20_ms'])}-{H.fmt_ms(r['p80_ms'])}" if r["p20_ms"] is not None else "-"
        err = "-" if r["max_abs_err"] is None else f"{r['max_abs_err']:.2e}"
        body.append([r["case"], r["B"], r["backend"], H.fmt_ms(r["median_ms"]), spread,
                     H.fmt_ms(r.get("ms_per_frame")),
                     H.fmt_ratio(r.get("speedup_vs_torch")), H.fmt_bytes(r["peak_mem_bytes"]),
                     H.fmt_ratio(r.get("mem_vs_torch")), err, status(r)])
    note = ("Times: median over repeats (p20-p80 spread); ms/frame = median / B. Peak mem: " +
            ("CUDA max_memory_allocated above the pre-call level (inputs excluded)."
             if cfg["device"].startswith("cuda") else
             "CPU tensor memory from torch.profiler allocation events (no malloc/stack).") +
            f" Ops checked against gpavatar.ops.reference on {cfg['n_check']} rays spread over the image; render "
            f"and chain cases against a backend='torch' renderer at {CHECK_IMAGE}x{CHECK_IMAGE} (outputs and "
            "gradients w.r.t. the field's parameters / precomputed tensors). Render rows include the "
            "trivial field (identical for every backend). Chain rows are the same renderer with a field "
            "of ~zero cost (it returns alpha / value tensors precomputed per pass; fwd+bwd: gradients "
            "w.r.t. them): the sampling + compositing chain alone. "
            f"Issue 5 target: chain <= {CHAIN_TARGET_MS:g} ms/frame at 128x128 rays x 64 samples "
            "(size `paper`) on an H100; rows of another size or card do not measure it. The ray "
            "ops have no Triton kernels (no triton rows).")
    parts = [title, H.env_markdown(env), H.markdown_table(headers, body), note]
    return "\n\n".join(parts) + "\n"


def parse_args(argv=None):
    ap = H.benchmark_parser(__doc__.split("\n\n")[0], 10.0)
    ap.add_argument("--size", choices=sorted(SIZES), default=None, help="default: paper on cuda, cpu on cpu")
    ap.add_argument("--batch", default=None, help="comma list of batch sizes (default: the size's)")
    ap.add_argument("--backends", default=None, help="comma list to restrict backends (nerfacc included)")
    ap.add_argument("--cases", default=None, help="comma list of cases (default: all): " + ",".join(CASES))
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = H.resolve_device(args.device)
    if device is None:
        return 2
    size = args.size or ("paper" if device.type == "cuda" else "cpu")
    spec = dict(SIZES[size])
    if args.batch:
        spec["Bs"] = tuple(int(b) for b in args.batch.split(","))
    repeats = args.repeats or {"paper": 20, "cpu": 5, "small": 10}[size]
    warmup = args.warmup if args.warmup is not None else (3 if device.type == "cuda" else 0)
    cases = args.cases.split(",") if args.cases else list(CASES)
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        raise ValueError(f"unknown case(s) {unknown}; choose from {CASES}")

    cfg = dict(size=size, device=str(device), dtype="float32", repeats=repeats, warmup=warmup,
               max_seconds=args.max_seconds, seed=args.seed, n_check=N_CHECK, cases=cases, focal=FOCAL,
               camera_distance=CAMERA_DISTANCE, hit_frac=None, **spec)
    payload = dict(benchmark="render", env=H.env_info(device), config=cfg, rows=[], api_error=None,
                   partial=False, error=None)
    payload["api_error"] = api_error()
    if payload["api_error"]:
        payload["error"] = f"cannot import gpavatar: {payload['api_error']}"
        backends = []
    else:
        import gpavatar.ops as ops

        backends = [b for b in ops.available_backends(device) if not (b == "triton" and device.type != "cuda")]
        if "torch" in backends:  # reference first
            backends.remove("torch")
            backends.insert(0, "torch")
        if nerfacc_available():
            backends.append("nerfacc")
    if args.backends:
        keep = set(args.backends.split(","))
        backends = [b for b in backends if b in keep]

    for B in spec["Bs"]:
        if not backends:
            break
        inp = make_inputs(B, spec["image"], spec["n_coarse"], spec["n_fine"], spec["C"], device=device,
                          seed=args.seed)
        cfg["hit_frac"] = inp["hit_frac"]
        for case in cases:
            for b in backends:
                if (b == "triton" and case in RAY_CASES) or (b == "nerfacc" and case not in NERFACC_CASES):
                    continue
                print(f"[bench_render] B={B} {case} / {b} ...", file=sys.stderr, flush=True)
                payload["rows"].append(run_row(case, b, inp, device, repeats=repeats, warmup=warmup,
                                               max_seconds=args.max_seconds, min_repeats=args.min_repeats))
                if args.json:  # partial results survive a timeout
                    H.add_ratios(payload["rows"], key=lambda r: (r["case"], r["B"]))
                    H.write_json(args.json, dict(payload, partial=True))
        del inp
    H.add_ratios(payload["rows"], key=lambda r: (r["case"], r["B"]))

    return H.emit_report(payload, render_markdown(payload), args.json, args.markdown)


if __name__ == "__main__":
    sys.exit(main())
