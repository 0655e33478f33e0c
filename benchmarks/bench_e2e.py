"""End-to-end frames per second of ``GPAvatar.render`` (random weights) across backends.

The model (``gpavatar.model.GPAvatar``, preset ``paper`` on CUDA and ``tiny`` on CPU by
default) is built once with seeded random weights, eval mode, StyleGAN noise ``off``, and
every call runs under ``torch.no_grad()`` (inference).  For every batch size B (default 1:
latency, and 4: throughput) the avatar is built once from ``torch.rand(B, V=1, 3, S, S)``
sources, outside the timing.  Inputs: the FLAME points are the procedural head of
``gpavatar.flame.procedural`` (its template x5, the FLAME scale; ``--points random``: a
seeded head-sized cloud ``randn * 0.35`` clamped to +-0.9), the same for every batch element,
and the camera is ``[[1,0,0,0],[0,1,0,0],[0,0,1,9]]`` (row-vector [R|T]: at z = -9 looking at
the origin), so the box [-1, 1]^3 fills the view.

Backends: the baselines -- ``torch-fast``, the official-style path a user without gpavatar
would run: the pure-torch ops (grid_sample tri-planes, ray sampling, compositing) with the
PEF computed by ``_baselines.knn_blend_torch_fast`` (chunked fp32 distances + topk, the
official gather / harmonic embedding / per-neighbour MLP / blend), and ``pytorch3d`` (the same
with pytorch3d's ``knn_points``, when it imports) -- then every fused backend usable on the
device (``gpavatar.ops.available_backends``; Triton on the CPU only when named in
``--backends``, and then only under ``TRITON_INTERPRET=1``), switched with
``model.set_backend``.  ``torch`` (the reference ops with the exact KNN oracle, slow) runs
only when named in ``--backends``.  A fused backend whose extension lacks some of the model's
ops runs those on the torch fallback; the row's ``fallback`` lists them.

Cases (``--cases``):

* ``render``           -- ``model.render(avatar, points, camera)``: rays, both field passes,
  compositing and super-resolution; for every B and mode.  FPS = B / median time.
* ``realtime``         -- the same frames through ``model.realtime(avatar, batch=B, dtype=...)``
  (``gpavatar.realtime``: on a GPU the whole frame is one CUDA graph, replayed with the new
  points / camera copied in; fp32 = float32 with TF32 off, fast = bf16 channels-last
  super-resolution + TF32 field; on the CPU an eager call), fused backends only, for every B and
  mode, plus ``--realtime-batch`` (default 8 on CUDA: the throughput row).  Each row also
  holds the stage breakdown (``stages_ms``: rays, field pass 1, field pass 2, compositing,
  super-resolution; ``RealtimeRenderer.profile``: each stage its own CUDA graph between CUDA
  events on a GPU, eager stages and ``perf_counter`` on the CPU), printed as a second table;
* ``rays+sampling``    -- ``model.renderer`` driven by a field of ~zero cost that returns the
  alpha / value tensors of a real render, precomputed per pass (``bench_render.chain_field``):
  ray_box, stratified, importance, merge, gathers and both composites without the decoder;
* ``field queries``    -- ``model.nerf_mlp`` on the sample positions of one real render
  (B x R^2 x n_coarse, then B x R^2 x n_fine points: the sum of the two calls);
* ``compositing``      -- ``gpavatar.ops.composite`` of the merged (B R^2, n_coarse + n_fine,
  Cv) alphas / values / depths of that render;
* ``super-resolution`` -- ``model.up_renderer(fine, noise="off")`` on its fine image.

The four breakdown cases run in fp32 at the smallest B only; their inputs come from one
render with the first fused backend of the run (the first baseline when there is none).

Modes (``--modes``): ``fp32`` (TF32 off for matmul and cuDNN) and ``fast``
(``torch.autocast(device_type, dtype=torch.bfloat16)`` plus TF32 matmul / cuDNN on; on the
CPU the TF32 flags change nothing).  ``PSNR vs fp32`` is the PSNR (dB, images in [0, 1],
``10 log10(1 / MSE)``) of a fast row's image against the fp32 image of the same backend and
inputs; ``PSNR vs baseline`` that of the row's image against the fp32 ``torch-fast`` image of
the same B (a correctness check of the fused backends).  Speed-up and memory ratios are
relative to the fastest baseline row (``torch-fast``, ``pytorch3d``) of the same case, B and
mode in the same run (``vs best baseline``).  A backend that raises gets its error string in
the row; the script still exits 0.

Usage::

    python benchmarks/bench_e2e.py [--device cpu|cuda|auto] [--preset paper|tiny]
        [--batch 1,4] [--backends torch-fast,cuda,triton] [--modes fp32,fast]
        [--cases render,...] [--realtime-batch 8] [--repeats N] [--json PATH] [--markdown PATH]
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _baselines as BL  # noqa: E402
import _harness as H  # noqa: E402

if H.REPO_ROOT not in sys.path:  # an installed gpavatar still takes precedence
    sys.path.append(H.REPO_ROOT)

PRESETS = ("paper", "tiny")
SIZE_ALIASES = {"paper": "paper", "cpu": "tiny", "small": "tiny"}  # the other scripts' --size
CASES = ("render", "realtime", "rays+sampling", "field queries", "compositing", "super-resolution")
BREAKDOWN = CASES[2:]
IMAGE_CASES = ("render", "realtime")  # cases whose rows get PSNR columns
MODES = ("fp32", "fast")
CAMERA = ((1.0, 0.0, 0.0, 0.0), (0.0, 1.0, 0.0, 0.0), (0.0, 0.0, 1.0, 9.0))
NUM_SOURCES = 1
POINT_SOURCES = ("procedural", "random")
# C++ ops the model calls per backend (their absence means a silent torch fallback).
CPP_OPS = ("knn", "knn_blend_forward", "triplane_sample_forward", "ray_box", "stratified_depths",
           "importance_depths", "merge_samples", "composite_forward")
TRITON_OPS = ("knn_triton", "knn_blend_forward_triton", "triplane_sample_forward_triton",
              "composite_forward_triton")
RAY_OPS = ("ray_box", "stratified_depths", "importance_depths", "merge_samples")  # triton -> CUDA op
BASELINES = ("torch-fast", "pytorch3d")  # the torch ops with the PEF of _baselines
BASELINE = "torch-fast"  # the PSNR reference


# --- availability ------------------------------------------------------------------------------

def api_error() -> str | None:
    """Why gpavatar.model / gpavatar.ops cannot be imported (None when they can)."""
    return H.import_error("gpavatar.model", "gpavatar.ops")


def default_backends(device: torch.device) -> list[str]:
    """The baselines first (torch-fast; pytorch3d when it imports), then every fused backend
    usable on ``device`` (no Triton on the CPU)."""
    import gpavatar.ops as ops

    fused = [b for b in ops.available_backends(device)
             if b != "torch" and not (b == "triton" and device.type != "cuda")]
    return ["torch-fast"] + (["pytorch3d"] if BL.pytorch3d_error() is None else []) + fused


# A realtime row of backend "cuda+fused" / "triton+fused" runs the decoder's field passes as
# the fused ops.field_query (PointsDecoder.fused_field = True; opt-in, slower on an H200).
FUSED_SUFFIX = "+fused"
# A realtime row of backend "cuda+bf16field" runs the field passes' layers under bf16 autocast
# (RealtimeRenderer(field_dtype=torch.bfloat16); fast mode only).
BF16_FIELD_SUFFIX = "+bf16field"
# A realtime row of backend "cuda+upsample" runs the super-resolution's 2x upsampling with the
# Triton kernel (GPAVATAR_UPSAMPLE=triton; the fast mode's bf16 channels-last network only).
UPSAMPLE_SUFFIX = "+upsample"
# A realtime row of backend "cuda+layers" runs the decoder's layers of each field pass as one Triton
# kernel (GPAVATAR_FIELD_LAYERS=triton; ops.field_query.field_layers); suffixes stack
# ("cuda+layers+bf16field+upsample": every opt-in of the fast mode at once).
LAYERS_SUFFIX = "+layers"
# A realtime row of backend "cuda+tc" runs the PEF blend's forward on the tensor cores
# (GPAVATAR_BLEND_TENSOR_CORES=1: tf32 in fast mode, bf16 with +bf16field; fast mode only).
TC_SUFFIX = "+tc"
# A realtime row of backend "cuda+share" builds the PEF's KNN lists once per frame for both field
# passes (GPAVATAR_KNN_SHARE=1; ops.knn_index).
SHARE_SUFFIX = "+share"
# "+g24": the CUDA KNN's grid at 24 cells per axis (GPAVATAR_KNN_CELLS=24: shorter lists, a longer
# build; with +share the build is paid once per frame).
G24_SUFFIX = "+g24"
# "+compile": the super-resolution and the field's layers as torch.compile'd functions
# (RealtimeRenderer(compile="all"); compiled during the warm-up before the capture).
COMPILE_SUFFIX = "+compile"
# "+compilesr": the super-resolution alone compiled (compile="sr"; the field keeps its kernel settings).
COMPILE_SR_SUFFIX = "+compilesr"
# "+plain": the real-time path without its CUDA defaults (gpavatar.realtime.CUDA_DEFAULTS set to their off
# values): the frame as it was before they were promoted, for a same-run comparison.
PLAIN_SUFFIX = "+plain"
# "+tune": RealtimeRenderer(tune=True) -- the renderer times its kernel settings (gpavatar.realtime.SETTINGS)
# on this device, one value at a time, and keeps the faster ones that pass its image check; the row is the
# tuned frame, the report lists every trial.
TUNE_SUFFIX = "+tune"
FAST_ONLY_SUFFIXES = (BF16_FIELD_SUFFIX, UPSAMPLE_SUFFIX, TC_SUFFIX)
# The RealtimeRenderer settings (gpavatar.realtime.SETTINGS) of the suffixes that are kernel switches: the
# renderer applies them to its own frames, its stage breakdown (profile) included.
VARIANT_SETTINGS = {BF16_FIELD_SUFFIX: {"field_bf16": True}, UPSAMPLE_SUFFIX: {"upsample": "triton"},
                    LAYERS_SUFFIX: {"field_layers": "triton"}, TC_SUFFIX: {"blend_tensor_cores": "1"},
                    SHARE_SUFFIX: {"knn_share": "1"}, G24_SUFFIX: {"knn_cells": "24"}}
VARIANT_SUFFIXES = (FUSED_SUFFIX, BF16_FIELD_SUFFIX, UPSAMPLE_SUFFIX, LAYERS_SUFFIX, TC_SUFFIX, SHARE_SUFFIX,
                    G24_SUFFIX, COMPILE_SUFFIX, COMPILE_SR_SUFFIX, PLAIN_SUFFIX, TUNE_SUFFIX)


def realtime_variants(text: str) -> list[str]:
    """``--realtime-variants``: a comma list of suffix combinations without their first "+"
    ("layers", "compile+share"), each made of :data:`VARIANT_SUFFIXES`; a ValueError otherwise."""
    known = {suffix[1:] for suffix in VARIANT_SUFFIXES}
    variants = [v.strip() for v in text.split(",") if v.strip()]
    for v in variants:
        unknown = [part for part in v.split("+") if part not in known]
        if unknown:
            raise ValueError(f"unknown realtime variant {v!r} ({unknown}); combine {sorted(known)} with '+'")
    return ["+" + v for v in variants]


def base_backend(backend: str) -> str:
    """A row's backend without its realtime variant suffixes (``cuda+fused`` -> ``cuda``)."""
    return backend.split("+")[0]


def has_variant(backend: str, suffix: str) -> bool:
    """Whether a row's backend carries the realtime variant ``suffix`` (e.g. ``+layers``)."""
    return suffix[1:] in backend.split("+")[1:]


def ops_backend(backend: str) -> str:
    """The gpavatar backend a row's ops run on: ``torch`` for the baselines."""
    backend = base_backend(backend)
    return "torch" if backend in BASELINES else backend


def backend_unavailable(backend: str, device: torch.device) -> str | None:
    import gpavatar.ops as ops

    backend = base_backend(backend)
    if backend == "pytorch3d":
        why = BL.pytorch3d_error()
        return f"backend 'pytorch3d' is not available: {why}" if why else None
    if backend in BASELINES:
        return None
    if backend not in ops.available_backends(device):
        hint = " (the CPU runs Triton only under TRITON_INTERPRET=1)" if backend == "triton" else ""
        return f"backend {backend!r} is not available on {device.type}{hint}"
    return None


def fallback_ops(backend: str) -> list[str]:
    """The model's ops that ``backend`` has no kernel for in this build (they run on torch)."""
    backend = base_backend(backend)
    if backend in ("torch", "auto") or backend in BASELINES:
        return []
    names = CPP_OPS if backend in ("cpu", "cuda") else TRITON_OPS + RAY_OPS
    missing = [n for n in names if not hasattr(torch.ops.gpavatar, n)]
    return [n.replace("_forward", "").replace("_triton", "") for n in missing]


@contextlib.contextmanager
def use_backend(model, backend: str):
    """``model.set_backend`` for a gpavatar backend; for a baseline, the torch ops with the PEF
    replaced by ``_baselines``' (``BL.baseline_pef``, undone on exit)."""
    model.set_backend(ops_backend(backend))
    saved_fused = model.nerf_mlp.fused_field
    model.nerf_mlp.fused_field = True if has_variant(backend, FUSED_SUFFIX) else saved_fused
    try:
        with BL.baseline_pef(model, backend) if backend in BASELINES else contextlib.nullcontext():
            yield
    finally:
        model.nerf_mlp.fused_field = saved_fused


# --- inputs ------------------------------------------------------------------------------------

def head_points(num_points: int, source: str = "procedural", seed: int = 0) -> tuple[torch.Tensor, str]:
    """(num_points, 3) FLAME-scale points: the procedural head's template x5, or a seeded
    head-sized random cloud (``source="random"``, or when the procedural head is unusable)."""
    if source == "procedural":
        try:
            from gpavatar.flame.procedural import make_procedural_head

            v = torch.from_numpy(make_procedural_head(seed=0)["v_template"]).float() * 5.0
            if v.shape == (num_points, 3):
                return v, "procedural"
        except Exception as exc:  # keep going with the random cloud
            print(f"[bench_e2e] procedural head unavailable ({type(exc).__name__}: {exc}); "
                  "using a random cloud", file=sys.stderr)
    g = torch.Generator().manual_seed(seed + 1)
    return (torch.randn(num_points, 3, generator=g) * 0.35).clamp(-0.9, 0.9), "random"


def preset_sizes(preset: str) -> dict:
    """The sizes of a model preset that the reports print."""
    from gpavatar.model.config import GPAvatarConfig

    return {k: v for k, v in GPAvatarConfig.preset(preset).to_dict().items()
            if k in ("image_size", "plane_size", "plane_channels", "render_size", "n_coarse", "n_fine",
                     "render_channels", "output_size", "num_points", "K")}


def ordered_backends(requested: str | None, device: torch.device) -> list[str]:
    """The comma list ``requested`` (default: every backend of the device), the baselines first (the
    PSNR reference torch-fast leading)."""
    backends = requested.split(",") if requested else default_backends(device)
    return [b for b in BASELINES if b in backends] + [b for b in backends if b not in BASELINES]


def make_model(preset: str, device: torch.device, *, seed: int = 0, query_chunk: int = 0):
    from gpavatar.model import GPAvatar

    torch.manual_seed(seed)
    model = GPAvatar(preset, query_chunk=query_chunk).to(device).eval()
    model.set_noise("off")
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def make_inputs(model, B: int, device: torch.device, *, seed: int = 0, points: str = "procedural") -> dict:
    """Seeded sources (B, V, 3, S, S), the avatar (built once, fp32), points (B, P, 3), camera (B, 3, 4)."""
    c = model.config
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(B, NUM_SOURCES, 3, c.image_size, c.image_size, generator=g).to(device)
    pts, kind = head_points(c.num_points, points, seed)
    with torch.no_grad():
        avatar = model.build_avatar(images)
    return dict(B=B, avatar=avatar, points=pts.to(device).expand(B, -1, -1).contiguous(),
                transform=torch.tensor(CAMERA, device=device).expand(B, 3, 4).contiguous(), points_kind=kind)


def capture(model, inp: dict, backend: str) -> dict:
    """Run one fp32 render with ``backend`` and keep the inputs of every stage: the field's
    coords / dirs / alpha / value of both passes, the merged (alphas, values, depths) of the
    fine composite and the fine image."""
    import gpavatar.ops as ops

    avatar, points, transform = inp["avatar"], inp["points"], inp["transform"]
    base, passes = model.field(avatar, points), []

    def field(coords, dirs):
        alpha, value, extras = base(coords, dirs)
        passes.append((coords, dirs, alpha, value))
        return alpha, value, extras

    with torch.no_grad(), precision("fp32", transform.device), use_backend(model, backend):
        out = model.renderer(field, transform)
        (cc, dc, ac, vc), (cf, df, af, vf) = passes
        o, d = model.renderer.rays(transform)
        B, HW = o.shape[:2]

        def depths(coords):  # (B, HW*S, 3) -> (B*HW, S): distance along each sample's ray
            x = coords.reshape(B, HW, -1, 3) - o[:, :, None]
            return (x * d[:, :, None]).sum(-1).reshape(B * HW, -1).contiguous()

        merged, order = ops.merge_samples(depths(cc), depths(cf), backend="torch")
        R = B * HW
        alphas = ops.merge_values(ac.reshape(R, -1), af.reshape(R, -1), order)
        values = ops.merge_values(vc.reshape(R, -1, vc.shape[-1]), vf.reshape(R, -1, vf.shape[-1]), order)
    return dict(coarse=(cc, dc), fine=(cf, df), chain=(ac, vc, af, vf), alphas=alphas, values=values,
                depths=merged, fine_image=out["fine"].to(model.query_style_tplane.dtype).contiguous())


@contextlib.contextmanager
def precision(mode: str, device: torch.device):
    """``fp32``: TF32 off for matmul and cuDNN; ``fast``: TF32 on plus bf16 autocast.  The
    flags are restored on exit."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose from {MODES}")
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    fast = mode == "fast"
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = fast
    try:
        if fast:
            with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16):
                yield
        else:
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


# --- cases -------------------------------------------------------------------------------------

def make_case_fn(case: str, backend: str, mode: str, model, inp: dict, cap: dict | None = None):
    """A zero-argument callable running ``case`` with ``backend`` in ``mode`` (no_grad).
    ``cap`` (from :func:`capture`) feeds the breakdown cases."""
    import gpavatar.ops as ops

    if case not in CASES:
        raise ValueError(f"unknown case {case!r}; choose from {CASES}")
    device = inp["transform"].device
    avatar, points, transform = inp["avatar"], inp["points"], inp["transform"]
    chunk = model.config.query_chunk

    def run(body):
        def fn():
            with torch.no_grad(), precision(mode, device), use_backend(model, backend):
                return body()
        return fn

    if case == "render":
        return run(lambda: model.render(avatar, points, transform))
    if case == "realtime":
        return realtime_fn(model, inp, backend, mode)
    if cap is None:
        raise ValueError(f"case {case!r} needs the captured render (capture())")
    if case == "rays+sampling":
        from bench_render import chain_field

        return run(lambda: model.renderer(chain_field(cap["chain"]), transform))
    if case == "field queries":
        (cc, dc), (cf, df) = cap["coarse"], cap["fine"]
        return run(lambda: (model.nerf_mlp(cc, dc, avatar.planes, points, chunk=chunk),
                            model.nerf_mlp(cf, df, avatar.planes, points, chunk=chunk)))
    if case == "compositing":
        return run(lambda: tuple(ops.composite(cap["alphas"], cap["values"], cap["depths"],
                                                   backend=ops_backend(backend))))
    return run(lambda: model.up_renderer(cap["fine_image"], noise="off"))


def realtime_fn(model, inp: dict, backend: str, mode: str):
    """A zero-argument callable rendering ``inp``'s frame with a :class:`gpavatar.realtime.RealtimeRenderer`
    of ``backend`` (made and, on a GPU, captured here; ``fn.realtime`` is the renderer).  The
    renderer sets its own precision (no autocast around it)."""
    from gpavatar.realtime import CUDA_DEFAULTS, MODE_DTYPES, SETTINGS

    if backend in BASELINES or backend == "torch":
        raise ValueError(f"case 'realtime' runs the fused backends only, got {backend!r}")
    avatar, points, transform = inp["avatar"], inp["points"], inp["transform"]
    off = {s.name: s.off for s in SETTINGS}
    settings = {name: off[name] for name in CUDA_DEFAULTS[mode]} if has_variant(backend, PLAIN_SUFFIX) else {}
    for suffix, values in VARIANT_SETTINGS.items():
        # fast-mode options apply to the fast rows only (a variant's fp32 frame is the plain one: its PSNR reference)
        if has_variant(backend, suffix) and (mode == "fast" or suffix not in FAST_ONLY_SUFFIXES):
            settings.update(values)
    options = dict(settings=settings)
    if has_variant(backend, COMPILE_SUFFIX):
        options["compile"] = "all"
    elif has_variant(backend, COMPILE_SR_SUFFIX):
        options["compile"] = "sr"
    if has_variant(backend, TUNE_SUFFIX):
        options["tune"] = True
    with torch.no_grad(), use_backend(model, backend):
        rt = model.realtime(avatar, batch=inp["B"], dtype=MODE_DTYPES[mode], **options)
        rt(points, transform)  # warm-up and, on a GPU, the capture

    def fn():
        with use_backend(model, backend):  # the eager (CPU) path dispatches per call
            return rt(points, transform)

    fn.realtime = rt
    return fn


# --- rows --------------------------------------------------------------------------------------

def run_row(case, backend, mode, model, inp, device, *, cap=None, images=None, repeats, warmup,
            max_seconds, min_repeats=3):
    """Measure one row; ``images`` ({(B, backend, mode): image}) collects render images for the
    PSNR columns."""
    B = inp["B"]
    row = dict(case=case, backend=backend, mode=mode, B=B, median_ms=None, p20_ms=None, p80_ms=None,
               repeats=0, fps=None, peak_mem_bytes=None, psnr_vs_fp32=None, psnr_vs_baseline=None,
               fallback=None, error=None, stages_ms=None)
    fn = None
    try:
        why = backend_unavailable(backend, device)
        if why:
            raise RuntimeError(why)
        row["fallback"] = fallback_ops(backend) or None
        footprint = _start_footprint(device) if case == "realtime" else None
        fn = make_case_fn(case, backend, mode, model, inp, cap)
        if footprint is not None:  # the warm-up and the CUDA graph's memory pool
            footprint = _end_footprint(device, footprint)
        if case in IMAGE_CASES and images is not None:
            from gpavatar.realtime import psnr

            image = fn()["image"].detach().float().clone()  # a graph's output is overwritten by the next call
            images[(case, B, backend, mode)] = image
            if mode == "fast":
                ref = images.get((case, B, backend, "fp32"))
                if ref is None:
                    ref = make_case_fn(case, backend, "fp32", model, inp)()["image"].detach().float().clone()
                row["psnr_vs_fp32"] = psnr(image, ref)
            base_ref = images.get(("render", B, BASELINE, "fp32"))
            if backend != BASELINE and base_ref is not None:
                row["psnr_vs_baseline"] = psnr(image, base_ref)
            del image
        row.update(H.measure(fn, device, repeats=repeats, warmup=warmup, max_seconds=max_seconds,
                             min_repeats=min_repeats))
        if footprint is not None and row["peak_mem_bytes"] is not None:
            row["peak_mem_bytes"] = max(row["peak_mem_bytes"], footprint)
        if row["median_ms"]:
            row["fps"] = B * 1e3 / row["median_ms"]
        if case == "realtime":
            if fn.realtime.tuning:
                row["tuning"], row["tune_s"] = fn.realtime.tuning, fn.realtime.tune_seconds
            with use_backend(model, backend):
                row["stages_ms"] = fn.realtime.profile(inp["points"], inp["transform"],
                                                       repeats=max(1, min(repeats, 20)))
    except Exception as exc:  # keep going: the report records the failure
        H.record_error(row, exc, quiet=("backend ",))
    finally:
        fn = None  # a real-time renderer's graphs and static buffers go before the cache is emptied
        H.release(device)
    return row


def _start_footprint(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def _end_footprint(device: torch.device, base: int) -> int:
    torch.cuda.synchronize(device)
    return int(torch.cuda.max_memory_allocated(device) - base)


def ratio_key(r: dict):
    """Rows compared for ``vs best baseline``: same case, B and mode; a realtime row against the
    baselines' render rows (the official-style path renders the same frames)."""
    return ("render" if r["case"] == "realtime" else r["case"], r["B"], r["mode"])


def status(r: dict) -> str:
    return H.error_status(r) or "ok" + (f" (torch fallback: {', '.join(r['fallback'])})" if r.get("fallback") else "")


def _fmt_db(x) -> str:
    if x is None:
        return "-"
    return "inf" if math.isinf(x) else f"{x:.1f}"


def _fmt_mib(n) -> str:
    return "-" if n is None else f"{n / 2**20:.1f}"


def render_markdown(payload: dict) -> str:
    cfg, env = payload["config"], payload["env"]
    title = ("## end-to-end render (GPAvatar, random weights) on {dev}\n\npreset `{preset}`: sources "
             "{V}x3x{S}x{S}, planes 3x{C}x{P}x{P}, {R}x{R} rays, {nc} + {nf} samples per ray, Cv={Cv}, output "
             "{O}x{O}; B in {Bs}; modes {modes}; points: {pts}; query_chunk {qc}").format(
        dev=H.device_label(env), preset=cfg["preset"], V=NUM_SOURCES, S=cfg["image_size"], C=cfg["plane_channels"],
        P=cfg["plane_size"], R=cfg["render_size"], nc=cfg["n_coarse"], nf=cfg["n_fine"], Cv=cfg["render_channels"],
        O=cfg["output_size"], Bs=list(cfg["Bs"]), modes=",".join(cfg["modes"]), pts=cfg["points"] or "-",
        qc=cfg["query_chunk"])
    headers = ["case", "B", "backend", "mode", "median ms", "p20-p80 ms", "FPS", "vs best baseline",
               "peak MiB", "mem vs best", "PSNR vs fp32 dB", "PSNR vs baseline dB", "status"]
    body = []
    for r in payload["rows"]:
        spread = f"{H.fmt_ms(r['p20_ms'])}-{H.fmt_ms(r['p80_ms'])}" if r["p20_ms"] is not None else "-"
        body.append([r["case"], r["B"], r["backend"], r["mode"], H.fmt_ms(r["median_ms"]), spread,
                     "-" if r["fps"] is None else f"{r['fps']:.1f}",
                     H.fmt_ratio(r.get("speedup_vs_best")) + (f" ({r['best_baseline']})" if r.get("best_baseline")
                                                              else ""),
                     _fmt_mib(r["peak_mem_bytes"]), H.fmt_ratio(r.get("mem_vs_best")),
                     _fmt_db(r["psnr_vs_fp32"]), _fmt_db(r["psnr_vs_baseline"]), status(r)])
    note = ("Times: median over repeats (p20-p80 spread); FPS = B / median (for a breakdown row: the frame "
            "rate if that stage were the only cost). Peak MiB: " +
            ("CUDA max_memory_allocated above the pre-call level (model, avatar and inputs excluded)."
             if cfg["device"].startswith("cuda") else
             "CPU tensor memory from torch.profiler allocation events (no malloc/stack).") +
            " fp32: TF32 off; fast: torch.autocast bf16 + TF32 matmul/cuDNN. PSNR vs fp32: the fast image "
            "against the fp32 image of the same backend; PSNR vs baseline: against the fp32 torch-fast image of "
            "the same B (images in [0, 1]). vs best baseline: the fastest baseline row (torch-fast, pytorch3d) of "
            "the same case, B and mode, its ms / this row's ms (named in brackets); mem vs best: this row's peak / "
            "that baseline's peak. Breakdown rows (fp32, smallest B): rays+sampling = the renderer with a "
            "field of ~zero cost (precomputed alpha/value of a real render); field queries = nerf_mlp on both "
            "passes' sample positions; compositing = ops.composite of the merged samples; super-resolution = "
            "up_renderer on the fine image (no custom ops: the same work on every backend). torch-fast = the "
            "official-style path a user would run: pure-torch ops, PEF by chunked fp32 distances + topk + the "
            "official per-neighbour MLP (benchmarks/_baselines.py); pytorch3d = the same with knn_points; "
            "torch = gpavatar's reference ops (exact KNN oracle). \"torch fallback\" lists ops this build has "
            "no kernel for on that backend. realtime rows: gpavatar.realtime (one CUDA graph per call on a GPU, "
            "eager on the CPU; fp32 = TF32 off, fast = bf16 channels-last super-resolution + TF32 field, no "
            "autocast), compared with the baselines' render rows of the same B and mode; their peak includes the "
            "warm-up and the CUDA graph's memory pool. Backend X+fused: the same with each field pass as the fused "
            "ops.field_query kernel (GPAVATAR_FIELD_FUSED; products in tf32 in fast mode, ieee in fp32). Backend "
            "X+bf16field (fast mode): the field passes' layers under bf16 autocast (RealtimeRenderer(field_dtype="
            "torch.bfloat16)). Backend X+upsample (fast mode): the super-resolution's 2x upsampling by the Triton "
            "kernel (GPAVATAR_UPSAMPLE=triton). Backend X+layers: each field pass's decoder layers as one Triton "
            "kernel (GPAVATAR_FIELD_LAYERS=triton: tf32 products in fast mode, bf16 with +bf16field, ieee in fp32). "
            "Backend X+tc (fast mode): the PEF blend's forward on the tensor cores (GPAVATAR_BLEND_TENSOR_CORES=1). "
            "Backend X+share: one KNN index per frame for both passes (GPAVATAR_KNN_SHARE=1); X+g24: the CUDA "
            "KNN grid at 24 cells per axis (GPAVATAR_KNN_CELLS=24). Backend X+compile: the super-resolution "
            "and the field's layers as torch.compile'd functions (RealtimeRenderer(compile=\"all\"), compiled before the capture). "
            "Backend X+tune: RealtimeRenderer(tune=True), the settings it chose on this device (trials below). "
            "Suffixes stack.")
    parts = [title, H.env_markdown(env), H.markdown_table(headers, body), note]
    staged = [r for r in payload["rows"] if r.get("stages_ms")]
    if staged:
        from gpavatar.realtime import REPORTED_STAGES

        stage_rows = []
        for r in staged:
            st = r["stages_ms"]
            stage_rows.append([r["B"], r["backend"], r["mode"]] + [H.fmt_ms(st.get(k)) for k in REPORTED_STAGES]
                              + [H.fmt_ms(sum(st.get(k, 0.0) for k in REPORTED_STAGES)), H.fmt_ms(st.get("frame"))])
        clock = ("CUDA events around each stage replayed as its own CUDA graph; frame = the one-graph frame"
                 if cfg["device"].startswith("cuda") else "time.perf_counter around eager stages")
        parts += ["### realtime stage breakdown (median ms per call of B frames)",
                  H.markdown_table(["B", "backend", "mode", *REPORTED_STAGES, "sum", "frame"], stage_rows),
                  f"Clock: {clock}. rays = camera rays + coarse depths + coarse composite + importance depths; "
                  "compositing = merge of both passes + composite + depth maps."]
    tuned = [r for r in payload["rows"] if r.get("tuning")]
    if tuned:
        trial_rows = []
        for r in tuned:
            for t in r["tuning"]:
                settings = ", ".join(f"{k}={v}" for k, v in t["settings"].items()) or "(untuned)"
                trial_rows.append([r["B"], r["backend"], r["mode"], settings, H.fmt_ms(t["ms"]), _fmt_db(t["psnr"]),
                                   t["status"] + (" (chosen)" if t.get("chosen") else "")])
            if r.get("tune_s") is not None:
                trial_rows.append([r["B"], r["backend"], r["mode"], f"(the tuning took {r['tune_s']:.1f} s)", "",
                                   "", ""])
        parts += ["### realtime tuning (RealtimeRenderer(tune=True): one value at a time on top of the best so far)",
                  H.markdown_table(["B", "backend", "mode", "settings", "median ms", "PSNR dB", "status"], trial_rows),
                  "median ms: the trial's frame (CUDA graph replays between CUDA events on a GPU); PSNR: fp32 mode "
                  "against the untuned frame (kept from 60 dB), fast mode against the fp32 frame (kept from "
                  "tune_psnr, 40 dB); a value is kept when its frame is faster than the best so far by the "
                  "tuner's margin (gpavatar.realtime.tune_keeps: 0.5 % for graph replays, 2 % eager; 2 % "
                  "before 2026-12-06) with the two p20-p80 spreads apart."]
    return "\n\n".join(parts) + "\n"


def parse_args(argv=None):
    ap = H.benchmark_parser(__doc__.split("\n\n")[0], None, max_seconds_help="cap on timed seconds per row "
                            "(repeats are reduced, min 3); default 3 on cpu, 10 on cuda")
    ap.add_argument("--preset", choices=PRESETS, default=None, help="default: paper on cuda, tiny on cpu")
    ap.add_argument("--size", choices=sorted(SIZE_ALIASES), default=None,
                    help="alias of --preset for gpu_report.sh's BENCH_ARGS (paper -> paper, cpu/small -> tiny)")
    ap.add_argument("--batch", default="1,4", help="comma list of batch sizes (default 1,4)")
    ap.add_argument("--backends", default=None,
                    help="comma list (default: the baselines torch-fast [+ pytorch3d when it imports] + every "
                         "fused backend of the device; torch = reference ops with the exact KNN oracle, only when "
                         "named; triton on cpu only when named, under TRITON_INTERPRET=1)")
    ap.add_argument("--modes", default="fp32,fast", help="comma list of " + ",".join(MODES))
    ap.add_argument("--cases", default=None, help="comma list of cases (default: all): " + ",".join(CASES))
    ap.add_argument("--points", choices=POINT_SOURCES, default="procedural",
                    help="FLAME points: procedural head template x5 (default) or a random head-sized cloud")
    ap.add_argument("--query-chunk", type=int, default=0, help="config query_chunk (0 = whole pass)")
    ap.add_argument("--realtime-variants", default=None,
                    help="comma list of the realtime rows' variants on a GPU, suffixes without the first '+' "
                         "combined with '+' (e.g. layers,share,compile+share; default: the full list; '' for none)")
    ap.add_argument("--realtime-batch", default=None,
                    help="comma list of extra batch sizes for the realtime case only (throughput; default 8 on "
                         "cuda, none on cpu; '' for none)")
    return ap.parse_args(argv)


def _split(text: str, allowed, what: str) -> list[str]:
    items = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in items if s not in allowed]
    if unknown:
        raise ValueError(f"unknown {what} {unknown}; choose from {tuple(allowed)}")
    return items


def main(argv=None) -> int:
    args = parse_args(argv)
    device = H.resolve_device(args.device)
    if device is None:
        return 2
    preset = args.preset or (SIZE_ALIASES[args.size] if args.size else None) or \
        ("paper" if device.type == "cuda" else "tiny")
    Bs = tuple(int(b) for b in args.batch.split(","))
    realtime_text = args.realtime_batch if args.realtime_batch is not None else ("8" if device.type == "cuda" else "")
    realtime_Bs = tuple(b for b in (int(x) for x in realtime_text.split(",") if x.strip()) if b not in Bs)
    modes = _split(args.modes, MODES, "mode(s)")
    cases = _split(args.cases, CASES, "case(s)") if args.cases else list(CASES)
    if args.realtime_variants is not None:
        realtime_variants(args.realtime_variants)  # a typo fails here, on any device
    repeats = args.repeats or (20 if device.type == "cuda" else 5)
    warmup = args.warmup if args.warmup is not None else (2 if device.type == "cuda" else 0)
    max_seconds = args.max_seconds if args.max_seconds is not None else (10.0 if device.type == "cuda" else 3.0)

    cfg = dict(preset=preset, device=str(device), Bs=Bs, realtime_Bs=realtime_Bs if "realtime" in cases else (),
               modes=modes, cases=cases, repeats=repeats, warmup=warmup,
               max_seconds=max_seconds, seed=args.seed, points=None, query_chunk=args.query_chunk,
               camera=[list(r) for r in CAMERA], num_sources=NUM_SOURCES, capture_backend=None)
    payload = dict(benchmark="e2e", env=H.env_info(device), config=cfg, rows=[], api_error=None,
                   partial=False, error=None)
    payload["api_error"] = api_error()
    backends: list[str] = []
    model = None
    if payload["api_error"]:
        payload["error"] = f"cannot import gpavatar: {payload['api_error']}"
    else:
        cfg.update(preset_sizes(preset))
        backends = ordered_backends(args.backends, device)
        try:
            model = make_model(preset, device, seed=args.seed, query_chunk=args.query_chunk)
        except Exception as exc:
            payload["error"] = f"cannot build the model: {type(exc).__name__}: {exc}"[:500]
            backends = []
    cfg["backends"] = backends

    images: dict = {}
    realtime_backends = [b for b in backends if b not in BASELINES and b != "torch"]
    if device.type == "cuda" and args.realtime_variants is not None:  # the variants asked for
        base = [b for b in realtime_backends if b in ("cuda", "triton")]
        realtime_backends += [b + v for b in base[:1] for v in realtime_variants(args.realtime_variants)]
    elif device.type == "cuda":  # and each with the fused field passes, and (fast mode) bf16 field layers
        base = [b for b in realtime_backends if b in ("cuda", "triton")]
        realtime_backends += ([b + FUSED_SUFFIX for b in base] + [b + BF16_FIELD_SUFFIX for b in base[:1]]
                              + [b + v for b in base[:1] for v in (
                                  UPSAMPLE_SUFFIX, LAYERS_SUFFIX, TC_SUFFIX, SHARE_SUFFIX, SHARE_SUFFIX + G24_SUFFIX,
                                  LAYERS_SUFFIX + TC_SUFFIX,
                                  LAYERS_SUFFIX + TC_SUFFIX + SHARE_SUFFIX + UPSAMPLE_SUFFIX,
                                  LAYERS_SUFFIX + TC_SUFFIX + SHARE_SUFFIX + BF16_FIELD_SUFFIX + UPSAMPLE_SUFFIX,
                                  # last: their warm-up compiles (tens of seconds)
                                  COMPILE_SUFFIX, COMPILE_SUFFIX + SHARE_SUFFIX)])
    for B in Bs + cfg["realtime_Bs"]:
        if not backends:
            break
        extra = B not in Bs  # a realtime-only batch size
        print(f"[bench_e2e] B={B}: building the avatar ...", file=sys.stderr, flush=True)
        inp = make_inputs(model, B, device, seed=args.seed, points=args.points)
        cfg["points"] = inp["points_kind"]
        cap = None
        breakdown = [c for c in cases if c in BREAKDOWN] if B == min(Bs) and "fp32" in modes and not extra else []
        if breakdown:
            usable = [b for b in backends if backend_unavailable(b, device) is None]
            fused = [b for b in usable if b not in BASELINES and b != "torch"]
            cap_backend = (fused or usable or [None])[0]
            if cap_backend is not None:
                try:
                    cap = capture(model, inp, cap_backend)
                    cfg["capture_backend"] = cap_backend
                except Exception as exc:
                    traceback.print_exc(limit=3)
                    payload["error"] = f"capture render failed: {type(exc).__name__}: {exc}"[:500]
                    breakdown = []
        for case in cases:
            if case not in IMAGE_CASES and case not in breakdown or (extra and case != "realtime"):
                continue
            case_modes = modes if case in IMAGE_CASES else ["fp32"]
            case_backends = realtime_backends if case == "realtime" else backends
            # realtime rows variant by variant, both modes together: a fast row's PSNR reference is its own
            # variant's fp32 frame (not made twice), and the variants that warm up longest (+tune, +compile,
            # listed last) run last, where a capped run cuts them and not the others
            pairs = ([(m, b) for b in case_backends for m in case_modes] if case == "realtime"
                     else [(m, b) for m in case_modes for b in case_backends])
            for mode, b in pairs:
                if any(has_variant(b, x) for x in FAST_ONLY_SUFFIXES) and mode != "fast":
                    continue  # fast-mode options (the fp32 network is NCHW on a GPU)
                print(f"[bench_e2e] B={B} {case} / {b} / {mode} ...", file=sys.stderr, flush=True)
                payload["rows"].append(run_row(case, b, mode, model, inp, device, cap=cap, images=images,
                                               repeats=repeats, warmup=warmup, max_seconds=max_seconds,
                                               min_repeats=args.min_repeats))
                if args.json:  # partial results survive a timeout
                    H.add_baseline_ratios(payload["rows"], BASELINES, key=ratio_key)
                    H.write_json(args.json, dict(payload, partial=True))
        del inp, cap
        images.clear()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    H.add_baseline_ratios(payload["rows"], BASELINES, key=ratio_key)

    return H.emit_report(payload, render_markdown(payload), args.json, args.markdown)


if __name__ == "__main__":
    sys.exit(main())
