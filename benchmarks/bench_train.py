"""One training step of GPAvatar (random weights): time and peak memory, fused backends vs the official-style path.

A step is what ``gpavatar.train.Trainer.train_step`` does, without its data loading and host-side
logging: ``model.forward_train(images, points, camera, generator=g)`` (training mode: jittered
sampling, fresh StyleGAN noise from ``g``) -> ``GPAvatarLoss`` (the official weights, its random
AlexNet trunk, face-box crops of ``min(256, output_size / 2)`` px, at least 32) -> ``backward`` ->
``Adam`` (the model's ``param_groups``, betas (0, 0.99), lr 1e-4; torch's default implementation
for the baselines, as the official code, and the Trainer's ``adam_implementation`` -- fused -- for
gpavatar's rows).  The model is the preset's
(default ``paper`` on CUDA, ``tiny`` on the CPU) with ``single_source_prob = 0``: every step
encodes all ``--sources`` source images (default 2) and fuses them with MTA, so every step does the
same work (the official recipe skips MTA in 30 % of the steps).  Inputs, seeded: sources and the
target ``torch.rand``, the FLAME points of ``bench_e2e.head_points`` (the procedural head x5),
the camera of ``bench_e2e`` (z = -9 looking at the origin), the face box [0.25, 0.2, 0.75, 0.8].

Backends (``--backends``; default: the baselines then every fused backend of the device, as
``bench_e2e``): ``torch-fast`` is the official-style path a user without gpavatar would train with
-- the pure-torch ops (grid_sample tri-planes, ray sampling, compositing) and the PEF of
``_baselines.knn_blend_torch_fast`` (chunked fp32 distances + topk, the official per-neighbour MLP
and blend, autograd through it); ``pytorch3d`` the same with ``knn_points`` when it imports; then
the fused backends (``cuda``, ``triton`` on a GPU; ``cpu``).  Every row starts from the same
weights, a fresh Adam and the same generator seed, so its first step's loss (``loss``) is the
same up to float rounding: a check that the rows train the same model.

Per row: one warm-up step (it also creates Adam's state), peak memory of one step above the
memory held before it (parameters, Adam state; CUDA ``max_memory_allocated``, CPU: tensor
allocations from ``torch.profiler``), then the median (p20-p80) of ``--repeats`` timed steps (CUDA
events on a GPU, ``perf_counter`` on the CPU), and the activations one more step keeps for its
backward (``saved_bytes``: the distinct storages autograd saves in the forward and the loss, by
top-level module in ``saved_by_module``; the same bytes on every device).  Speed-up and memory
ratios are against the fastest baseline row of the run.  A backend that raises gets its error in
the row; the script goes on.

Usage::

    python benchmarks/bench_train.py [--device cpu|cuda|auto] [--preset paper|tiny] [--batch 1]
        [--sources 2] [--backends torch-fast,cuda] [--repeats N] [--json PATH] [--markdown PATH]
"""

from __future__ import annotations

import contextlib
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness as H  # noqa: E402

if H.REPO_ROOT not in sys.path:  # an installed gpavatar still takes precedence
    sys.path.append(H.REPO_ROOT)

from gpavatar.model.recompute import RECOMPUTE_ENV  # noqa: E402
from gpavatar.train.trainer import adam_implementation  # noqa: E402
from bench_e2e import (BASELINES, CAMERA, PRESETS, SIZE_ALIASES, api_error,  # noqa: E402
                       backend_unavailable, fallback_ops, head_points, ordered_backends, preset_sizes,
                       use_backend)

CASE = "train step"
LR, BETAS = 1e-4, (0.0, 0.99)
BBOX = (0.25, 0.2, 0.75, 0.8)


def make_setup(preset: str, device: torch.device, *, batch: int = 1, sources: int = 2, seed: int = 0) -> dict:
    """The model (training mode, MTA every step), the loss, seeded inputs and the initial weights."""
    from gpavatar.model import GPAvatar
    from gpavatar.train.losses import GPAvatarLoss

    torch.manual_seed(seed)
    with torch.device(device):
        model = GPAvatar(preset, single_source_prob=0.0)
    model.train()
    c = model.config
    loss = GPAvatarLoss(crop_size=max(32, min(256, c.output_size // 2)), seed=seed).to(device)
    g = torch.Generator().manual_seed(seed)
    points, kind = head_points(c.num_points, "procedural", seed)
    inputs = dict(images=torch.rand(batch, sources, 3, c.image_size, c.image_size, generator=g).to(device),
                  points=points.to(device).expand(batch, -1, -1).contiguous(),
                  transform=torch.tensor(CAMERA, device=device).expand(batch, 3, 4).contiguous(),
                  target=torch.rand(batch, 3, c.output_size, c.output_size, generator=g).to(device),
                  bbox=torch.tensor([BBOX], device=device).expand(batch, 4).contiguous())
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return dict(model=model, loss=loss, inputs=inputs, initial=initial, points_kind=kind, seed=seed)


# Row variants of a gpavatar backend (GPU rows after the plain ones): "+keep" keeps every activation
# (no layer checkpointing, $GPAVATAR_RECOMPUTE=0: gpavatar.model.recompute), "+bf16" runs forward
# and loss under bf16 autocast (the trainer's --amp bf16), "+buffers" runs the C++/CUDA blend's per-query forward and buffers
# backward (GPAVATAR_BLEND_FORWARD=queries, GPAVATAR_BLEND_BACKWARD=buffers: the CUDA default
# before the tiled kernels were measured faster).
# "+graph" replays the step from CUDA graphs (gpavatar.train.graphed.GraphedTrainStep, the trainer's
# --cuda-graph: fused Adam, one launch per step; GPU only).  "+segmented" / "+checkpoint" choose the
# form of the decoder's checkpointed passes (PointsDecoder.segmented True / False: one autograd
# function per pass, the CPU default, or torch.utils.checkpoint per segment, the GPU default).
VARIANTS = ("+keep", "+bf16", "+buffers", "+graph", "+segmented", "+checkpoint")
BUFFERS_ENV = {"GPAVATAR_BLEND_FORWARD": "queries", "GPAVATAR_BLEND_BACKWARD": "buffers"}


def split_variant(backend: str) -> tuple[str, bool, bool, bool]:
    """(backend, keep activations, bf16 autocast, per-query blend) of a row name such as ``cuda+bf16``
    (``+graph``: :func:`graphed_variant`; ``+segmented`` / ``+checkpoint``: :func:`pass_form`)."""
    base, *opts = backend.split("+")
    unknown = [o for o in opts if "+" + o not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown row variant(s) {unknown} of {backend!r}; known: {VARIANTS}")
    return base, "keep" in opts, "bf16" in opts, "buffers" in opts


def pass_form(backend: str):
    """PointsDecoder.segmented for the row: True (``+segmented``), False (``+checkpoint``) or None."""
    opts = backend.split("+")[1:]
    if "segmented" in opts and "checkpoint" in opts:
        raise ValueError(f"{backend!r}: +segmented and +checkpoint exclude each other")
    return True if "segmented" in opts else (False if "checkpoint" in opts else None)


def graphed_variant(backend: str) -> bool:
    """Whether the row replays its step from CUDA graphs (``+graph``)."""
    return "graph" in backend.split("+")[1:]


def precision_of(backend: str) -> str:
    """"bf16" for a row under bf16 autocast (``+bf16``), else "fp32"."""
    return "bf16" if split_variant(backend)[2] else "fp32"


def add_ratios(rows: list[dict]) -> None:
    """Each row against the fastest baseline row of its precision: a ``+bf16`` row against
    ``torch-fast+bf16`` (the official-style path under the same autocast), an fp32 row against
    ``torch-fast``; a precision without a baseline row gets no ratio."""
    H.add_baseline_ratios(rows, list(BASELINES) + [b + "+bf16" for b in BASELINES],
                          key=lambda r: (r["case"], precision_of(r["backend"])))


def make_step(setup: dict, backend: str, pack_hook=None):
    """A zero-argument training step with ``backend`` from the initial weights, a fresh Adam and a
    fresh generator (the same draws for every backend); returns the step's total loss (a tensor).
    ``pack_hook``: a saved-tensor pack hook around the forward and the loss (see
    :func:`saved_activations`)."""
    model, loss_fn, x = setup["model"], setup["loss"], setup["inputs"]
    device = x["images"].device
    model.load_state_dict(setup["initial"])
    graphed, form = graphed_variant(backend), pass_form(backend)
    backend, keep, bf16, buffers = split_variant(backend)
    # The baselines train with torch's default Adam, as the official code does; gpavatar's rows with
    # the Trainer's (fused where torch has it, capturable for +graph).
    options = {} if backend in BASELINES else adam_implementation(device, graphed)
    optimizer = torch.optim.Adam(model.param_groups(LR), lr=LR, betas=BETAS, **options)
    generator = torch.Generator(device).manual_seed(setup["seed"])
    if graphed:
        if pack_hook is not None or keep or buffers or form is not None:
            raise ValueError("+graph rows take no saved-tensor hook, +keep, +buffers, +segmented or +checkpoint")
        return _graphed_step(model, loss_fn, x, optimizer, generator, backend, bf16)

    def step():
        env = dict(BUFFERS_ENV if buffers else {}, **({RECOMPUTE_ENV: "0"} if keep else {}))
        with use_backend(model, backend), H.environ(**env), \
                torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            saved, saved_form = model.nerf_mlp.checkpoint_layers, model.nerf_mlp.segmented
            model.nerf_mlp.checkpoint_layers = False if keep else saved
            model.nerf_mlp.segmented = saved_form if form is None else form
            try:
                with (torch.autograd.graph.saved_tensors_hooks(pack_hook, lambda t: t) if pack_hook
                      else contextlib.nullcontext()):
                    out = model.forward_train(x["images"], x["points"], x["transform"], generator=generator)
                    total = loss_fn(out, x["target"], x["bbox"])["total"]
            finally:
                model.nerf_mlp.checkpoint_layers, model.nerf_mlp.segmented = saved, saved_form
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
        return total.detach()

    return step


def _graphed_step(model, loss_fn, x, optimizer, generator, backend: str, bf16: bool):
    """The step of :func:`make_step` replayed from CUDA graphs (captured at the first call)."""
    from gpavatar.train.graphed import GraphedTrainStep
    from gpavatar.train.trainer import _TrainStep

    graphed = GraphedTrainStep(_TrainStep(model), loss_fn, optimizer, generator, amp="bf16" if bf16 else None)

    def step():
        with use_backend(model, backend):
            terms = graphed(x["images"], x["points"], x["transform"], x["target"], x["bbox"], single_source=False)
        return terms["total"].clone()

    step.optimizer = optimizer
    return step


def _adam_state(step, param) -> list[torch.Tensor]:
    """The Adam state tensors of ``param`` in a graphed step's optimizer."""
    return [t for t in step.optimizer.state.get(param, {}).values() if isinstance(t, torch.Tensor)]


def saved_activations(setup: dict, backend: str) -> tuple[int, dict[str, int]]:
    """The activations one step keeps for its backward: bytes of the distinct storages autograd
    saves during the forward and the loss (parameters excluded; what a checkpoint or a
    recomputing helper drops is not saved), in total and by top-level module.  Independent of
    the device: the CPU figure is the GPU's (same dtypes and shapes)."""
    model, loss_fn = setup["model"], setup["loss"]
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    stack: list[str] = []
    seen: dict[int, tuple[str, int]] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in params and s.data_ptr() not in seen:
            seen[s.data_ptr()] = (stack[-1] if stack else "other", s.nbytes())
        return t

    def enter(label: str):
        def hook(module, args) -> None:
            stack.append(label)
        return hook

    def leave(module, args, output) -> None:  # returns None: the output stays
        stack.pop()

    handles = []
    for prefix, root in (("", model), ("loss", loss_fn)):
        for name, module in root.named_children():
            handles.append(module.register_forward_pre_hook(enter(f"{prefix}.{name}" if prefix else name)))
            handles.append(module.register_forward_hook(leave))
    try:
        make_step(setup, backend, pack_hook=pack)()
    finally:
        for h in handles:
            h.remove()
    by_module: dict[str, int] = {}
    for label, n in seen.values():
        by_module[label] = by_module.get(label, 0) + n
    return sum(by_module.values()), dict(sorted(by_module.items(), key=lambda kv: -kv[1]))


def run_row(setup: dict, backend: str, device: torch.device, *, repeats: int, warmup: int, max_seconds: float,
            min_repeats: int = 3) -> dict:
    row = dict(case=CASE, backend=backend, median_ms=None, p20_ms=None, p80_ms=None, repeats=0, steps_per_s=None,
               peak_mem_bytes=None, resident_bytes=None, saved_bytes=None, saved_by_module=None, loss=None,
               fallback=None, error=None)
    step = None
    try:
        base = split_variant(backend)[0]
        why = backend_unavailable(base, device)
        if why:
            raise RuntimeError(why)
        row["fallback"] = fallback_ops(base) or None
        step = make_step(setup, backend)
        graphed = graphed_variant(backend)
        if graphed and device.type == "cuda":
            torch.cuda.synchronize(device)
            before = torch.cuda.memory_allocated(device)
        row["loss"] = float(step())  # the first step from the initial weights; creates Adam's state
        for _ in range(max(0, warmup - 1)):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            row["resident_bytes"] = torch.cuda.memory_allocated(device)
        if graphed and device.type == "cuda":
            # The graph holds its activations and gradients in its pool for good: the "peak" is that
            # pool (memory held after the capture, less Adam's state), the resident memory the rest.
            adam = sum(t.untyped_storage().nbytes() for p in setup["model"].parameters() for t in
                       _adam_state(step, p))
            row["peak_mem_bytes"] = row["resident_bytes"] - before - adam
            row["resident_bytes"] = before + adam
        else:
            row["peak_mem_bytes"] = H.peak_memory(step, device)
        if not graphed:  # a graph keeps its activations in its pool: nothing to count
            row["saved_bytes"], row["saved_by_module"] = saved_activations(setup, backend)
        row.update(H.time_fn(step, device, repeats=repeats, warmup=0, max_seconds=max_seconds,
                             min_repeats=min_repeats))
        if row["median_ms"]:
            row["steps_per_s"] = 1e3 / row["median_ms"]
    except Exception as exc:  # keep going: the report records the failure
        H.record_error(row, exc, quiet=("backend ",))
    finally:
        step = None
        H.release(device)
    return row


def _fmt_mib(n) -> str:
    return "-" if n is None else f"{n / 2**20:.1f}"


def render_markdown(payload: dict) -> str:
    cfg, env = payload["config"], payload["env"]
    title = (f"## training step (GPAvatar forward_train + loss + backward + Adam, random weights) on "
             f"{H.device_label(env)}\n\npreset `{cfg['preset']}`: B = {cfg['batch']}, {cfg['sources']} sources "
             f"{cfg.get('image_size')}² (MTA every step), {cfg.get('render_size')}² rays x "
             f"{cfg.get('n_coarse')} + {cfg.get('n_fine')} samples, output {cfg.get('output_size')}²; points: "
             f"{cfg.get('points') or '-'}")
    headers = ["backend", "median ms", "p20-p80 ms", "steps/s", "vs best baseline", "peak MiB", "mem vs best",
               "saved MiB", "resident MiB", "loss (step 1)", "status"]
    body = []
    for r in payload["rows"]:
        spread = f"{H.fmt_ms(r['p20_ms'])}-{H.fmt_ms(r['p80_ms'])}" if r["p20_ms"] is not None else "-"
        status = H.error_status(r) or "ok" + (f" (torch fallback: {', '.join(r['fallback'])})"
                                              if r.get("fallback") else "")
        body.append([r["backend"], H.fmt_ms(r["median_ms"]), spread,
                     "-" if r["steps_per_s"] is None else f"{r['steps_per_s']:.2f}",
                     H.fmt_ratio(r.get("speedup_vs_best")) + (f" ({r['best_baseline']})" if r.get("best_baseline")
                                                              else ""),
                     _fmt_mib(r["peak_mem_bytes"]), H.fmt_ratio(r.get("mem_vs_best")), _fmt_mib(r.get("saved_bytes")),
                     _fmt_mib(r["resident_bytes"]),
                     "-" if r["loss"] is None else f"{r['loss']:.6g}", status])
    note = ("Step: forward_train (jittered sampling, fresh noise) + GPAvatarLoss + backward + Adam, as "
            "Trainer.train_step without data loading and logging. Times: median over steps (p20-p80). Peak MiB: "
            + ("CUDA max_memory_allocated during one step above the memory held before it; resident = that held "
               "memory (parameters, Adam state, inputs)." if cfg["device"].startswith("cuda") else
               "CPU tensor memory of one step from torch.profiler allocation events (no malloc/stack; CPU "
               "convolutions add im2col workspaces a GPU does not have).")
            + " Saved MiB: the activations the step keeps for its backward (distinct storages autograd saves "
            "in the forward and the loss, parameters excluded; the same on every device; by module in the JSON)."
            + " vs best baseline: the fastest baseline row of the same precision (torch-fast = the official-style "
            "path: pure-torch ops + the PEF of benchmarks/_baselines.py; pytorch3d = the same with knn_points; a +bf16 "
            "row against the baselines' +bf16 rows, none when the run has none), its ms / this row's ms; "
            "mem vs best: this row's peak / that baseline's peak. loss (step 1): the first step's total loss from "
            "the same weights and draws (rows agree up to float rounding). Field passes of 65536 samples or more "
            "checkpoint the decoder's tri-plane sampling and layers on the gpavatar backends "
            "(GPAVATAR_FIELD_CHECKPOINT, gpavatar/model/decoder.py: the paper preset does, the tiny one does "
            "not), and the MTA token MLPs, the up-sampling convolutions' inputs and the modulated convolutions' "
            "per-sample weights are recomputed in the backward (GPAVATAR_RECOMPUTE, gpavatar/model/recompute.py); the baselines keep every activation, "
            "as the official code does. Row variants: X+keep = without that checkpointing and recomputation; "
            "X+bf16 = forward and loss under bf16 autocast (the trainer's --amp bf16); X+buffers = the C++/CUDA "
            "blend's per-query forward and buffers backward (GPAVATAR_BLEND_FORWARD=queries, "
            "GPAVATAR_BLEND_BACKWARD=buffers), the default before the tiled kernels; X+graph = the step replayed "
            "from CUDA graphs (gpavatar.train.graphed.GraphedTrainStep, the trainer's --cuda-graph: fused Adam, "
            "one launch per step; its peak is the graph's memory pool, its first call captures).")
    return "\n\n".join([title, H.env_markdown(env), H.markdown_table(headers, body), note]) + "\n"


def parse_args(argv=None):
    ap = H.benchmark_parser(__doc__.split("\n\n")[0], None, max_seconds_help="cap on timed seconds per row "
                            "(repeats are reduced, min 3); default 5 on cpu, 20 on cuda")
    ap.add_argument("--preset", choices=PRESETS, default=None, help="default: paper on cuda, tiny on cpu")
    ap.add_argument("--size", choices=sorted(SIZE_ALIASES), default=None,
                    help="alias of --preset for gpu_report.sh's BENCH_ARGS (paper -> paper, cpu/small -> tiny)")
    ap.add_argument("--batch", type=int, default=1, help="batch size B (default 1)")
    ap.add_argument("--sources", type=int, default=2, help="source images per sample (default 2; MTA every step)")
    ap.add_argument("--backends", default=None,
                    help="comma list (default: torch-fast [+ pytorch3d when it imports] + every fused backend of "
                         "the device; triton on cpu only when named, under TRITON_INTERPRET=1)")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = H.resolve_device(args.device)
    if device is None:
        return 2
    if args.batch < 1 or args.sources < 1:
        print("error: --batch and --sources must be >= 1", file=sys.stderr)
        return 2
    preset = args.preset or (SIZE_ALIASES[args.size] if args.size else None) or \
        ("paper" if device.type == "cuda" else "tiny")
    repeats = args.repeats or (10 if device.type == "cuda" else 3)
    warmup = args.warmup if args.warmup is not None else (2 if device.type == "cuda" else 1)
    max_seconds = args.max_seconds if args.max_seconds is not None else (20.0 if device.type == "cuda" else 5.0)
    cfg = dict(preset=preset, device=str(device), batch=args.batch, sources=args.sources, repeats=repeats,
               warmup=warmup, max_seconds=max_seconds, seed=args.seed, lr=LR, betas=list(BETAS), points=None,
               camera=[list(r) for r in CAMERA], bbox=list(BBOX), single_source_prob=0.0)
    payload = dict(benchmark="train", env=H.env_info(device), config=cfg, rows=[], api_error=api_error(),
                   partial=False, error=None)
    backends: list[str] = []
    setup = None
    if payload["api_error"]:
        payload["error"] = f"cannot import gpavatar: {payload['api_error']}"
    else:
        cfg.update(preset_sizes(preset))
        backends = ordered_backends(args.backends, device)
        if device.type == "cuda" and args.backends is None and "cuda" in backends:
            backends += ["cuda" + v for v in VARIANTS if v != "+checkpoint"]  # (the GPU default)
        try:
            setup = make_setup(preset, device, batch=args.batch, sources=args.sources, seed=args.seed)
            cfg["points"] = setup["points_kind"]
        except Exception as exc:
            payload["error"] = f"cannot build the model: {type(exc).__name__}: {exc}"[:500]
            backends = []
    cfg["backends"] = backends

    for backend in backends:
        print(f"[bench_train] {CASE} / {backend} ...", file=sys.stderr, flush=True)
        payload["rows"].append(run_row(setup, backend, device, repeats=repeats, warmup=warmup,
                                       max_seconds=max_seconds, min_repeats=args.min_repeats))
        add_ratios(payload["rows"])
        if args.json:  # partial results survive a timeout
            H.write_json(args.json, dict(payload, partial=True))
    add_ratios(payload["rows"])
    return H.emit_report(payload, render_markdown(payload), args.json, args.markdown)


if __name__ == "__main__":
    sys.exit(main())
