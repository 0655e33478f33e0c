"""Where a real-time frame's time goes, kernel by kernel (paper preset on a GPU, random weights).

One frame of ``gpavatar.realtime`` (B = 1, eager: the same kernels as the CUDA graph replays,
plus the eager input checks) is run under ``torch.profiler`` in each mode; every device kernel's
time is summed by name and grouped into the frame's parts (KNN, PEF blend, tri-plane sampling,
matrix products, convolutions, elementwise, ...).  On the CPU (tiny preset by default) the rows
are the operators' self CPU times.

    python benchmarks/profile_frame.py --device cuda --json frame.json --markdown frame.md
    python benchmarks/profile_frame.py --device cuda --train    # one training step instead

This is a diagnosis, not a benchmark: the profiler adds its own overhead; ``bench_e2e.py``
gives the frame times.
"""

from __future__ import annotations

import os
import re
import sys
from collections import defaultdict

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _harness as H  # noqa: E402
from bench_e2e import PRESETS, make_inputs, make_model  # noqa: E402

MODES = {"fp32": torch.float32, "fast": torch.bfloat16, "fast+opt-ins": torch.bfloat16,
         "fp32+tuned": torch.float32, "fast+tuned": torch.bfloat16}
# The RealtimeRenderer settings of the "fast+opt-ins" mode: every opt-in fast-mode kernel not yet timed on a GPU.
OPT_INS = {"field_layers": "triton", "blend_tensor_cores": "1", "upsample": "triton", "knn_share": "1"}

# (group, pattern) in order: the first pattern that matches a kernel's name names its group.
GROUPS = (
    ("optimizer", r"multi_tensor|adam|foreach"),
    ("knn", r"gpavatar::knn(::|$)|knn_kernel|knn_grid"),
    ("pef blend", r"knn_blend|blend_stacked"),
    ("field layers", r"layers_fwd_kernel"),
    ("triplane", r"triplane"),
    ("rays / composite", r"gpavatar::(rays|composite)|composite|merge_samples|sample_pdf"),
    ("triton", r"^triton_|_kernel_0d1d"),
    ("matrix products", r"gemm|xmma|cutlass|sm\d+_.*(mma|gemm)|ampere_|hopper_|nvjet|^aten::(addmm|bmm|mm|matmul)$"),
    ("convolutions", r"conv|cudnn|implicit_convolve|wgrad|dgrad|fprop|pool"),
    ("reductions", r"reduce_kernel|DeviceScan|DeviceReduce|cub::"),
    ("copies / casts", r"copy|Memcpy|Memset|cast|CatArray|fill|Fill"),
    ("elementwise", r"elementwise|vectorized|unrolled|index|gather|scatter|upsample|interpolate|grid_sampler"
                    r"|^aten::(add|sub|mul|div|sin|cos|exp|leaky_relu|relu|sigmoid|softplus|where|clamp|neg|pow)_?$"),
)


def group_of(name: str) -> str:
    for group, pattern in GROUPS:
        if re.search(pattern, name, flags=re.IGNORECASE):
            return group
    return "other"


def profile_frame(frame, device: torch.device) -> list[dict]:
    """Rows (kernel, group, calls, ms) of one call of ``frame`` (after two warm-up calls), the
    largest first: device kernels on a GPU, operators' self CPU time on the CPU."""
    return [dict(kernel=name, group=group_of(name), calls=calls, ms=ms)
            for name, calls, ms in H.kernel_times(frame, device, warmup=2)]


def _frame_fn(model, inp: dict, mode: str):
    """An eager frame of ``mode``; "+tuned": with the settings a tuning renderer (RealtimeRenderer(tune=
    True), graphs on a GPU) chose on this device (``frame.settings``)."""
    settings = dict(OPT_INS) if mode.endswith("+opt-ins") else None
    if mode.endswith("+tuned"):
        tuner = model.realtime(inp["avatar"], batch=1, dtype=MODES[mode], tune=True)
        tuner(inp["points"], inp["transform"])
        settings = dict(tuner.settings)
        del tuner
        H.release(inp["points"].device)
    renderer = model.realtime(inp["avatar"], batch=1, dtype=MODES[mode], cuda_graph=False, settings=settings)

    def frame():
        with torch.no_grad():
            return renderer(inp["points"], inp["transform"])

    frame.settings = settings if mode.endswith("+tuned") else None
    return frame


def main(argv=None) -> int:
    ap = H.benchmark_parser(__doc__.split("\n\n")[0], None)
    ap.add_argument("--preset", choices=PRESETS, default=None, help="default: paper on cuda, tiny on cpu")
    ap.add_argument("--modes", default="fast,fp32", help="comma list of " + ",".join(MODES)
                    + f" (fast+opt-ins: the fast mode with {OPT_INS}; X+tuned: the settings "
                    "RealtimeRenderer(tune=True) chose on this device)")
    ap.add_argument("--top", type=int, default=30, help="kernels listed per mode (default 30)")
    ap.add_argument("--train", action="store_true",
                    help="profile one training step of bench_train.py (forward_train + losses + backward + Adam, "
                         "2 sources) with the device's gpavatar backend instead of the frames")
    args = ap.parse_args(argv)
    device = H.resolve_device(args.device)
    if device is None:
        return 2
    modes = args.modes.split(",")
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        print(f"error: unknown mode(s) {unknown}; known: {list(MODES)}", file=sys.stderr)
        return 2
    preset = args.preset or ("paper" if device.type == "cuda" else "tiny")
    payload = dict(benchmark="profile_frame", env=H.env_info(device),
                   config=dict(preset=preset, modes=["train"] if args.train else modes), modes={}, error=None)
    what_ran = "one training step" if args.train else "one real-time frame"
    parts = [f"## {what_ran}, kernel by kernel ({preset} preset, B = 1) on {H.device_label(payload['env'])}",
             "", H.env_markdown(payload["env"]), ""]
    if args.train:
        from bench_train import make_setup, make_step

        runs = [("train", lambda: make_step(make_setup(preset, device, seed=args.seed), device.type))]
    else:
        model = make_model(preset, device, seed=args.seed)
        inp = make_inputs(model, 1, device, seed=args.seed)
        # one renderer at a time: each is made when its mode is profiled and dropped after it
        runs = [(mode, lambda mode=mode: _frame_fn(model, inp, mode)) for mode in modes]
    for mode, make in runs:
        fn = make()
        rows = profile_frame(fn, device)
        total = sum(r["ms"] for r in rows)
        launches = sum(r["calls"] for r in rows)
        # The same call without the profiler: on a GPU, wall time well above the kernels' time means
        # the host (Python, dispatch, launches) and not the device sets the pace.
        wall = H.time_fn(fn, device, repeats=3, warmup=0, min_repeats=1)["median_ms"]
        groups: dict[str, list] = defaultdict(lambda: [0, 0.0])
        for r in rows:
            groups[r["group"]][0] += r["calls"]
            groups[r["group"]][1] += r["ms"]
        settings = getattr(fn, "settings", None)
        payload["modes"][mode] = dict(total_ms=total, wall_ms=wall, launches=launches,
                                      groups={g: dict(calls=c, ms=ms) for g, (c, ms) in groups.items()},
                                      kernels=rows, settings=settings)
        what = (f"device time of its {launches} kernels" if device.type == "cuda"
                else f"self CPU time of its {launches} operator calls")
        busy = (f"; the call takes {wall:.3f} ms without the profiler (median of 3): the device is busy "
                f"{100 * total / wall:.0f} % of it" if device.type == "cuda" and wall else
                f"; the call takes {wall:.3f} ms without the profiler (median of 3)")
        if settings is not None:
            busy += "; tuned settings: " + (", ".join(f"{k}={v}" for k, v in settings.items()) or "the defaults")
        parts += [f"### {mode}: {total:.3f} ms of {what}{busy}", "",
                  H.markdown_table(["group", "calls", "ms", "share"],
                                   [[g, c, f"{ms:.3f}", f"{100 * ms / total:.1f} %"]
                                    for g, (c, ms) in sorted(groups.items(), key=lambda kv: -kv[1][1])]), "",
                  H.markdown_table(["kernel", "group", "calls", "ms"],
                                   [[r["kernel"][:100], r["group"], r["calls"], f"{r['ms']:.4f}"]
                                    for r in rows[:args.top]]), ""]
        H.release(device)
    parts.append("One training step (bench_train.make_step: forward_train + GPAvatarLoss + backward + Adam)"
                 if args.train else
                 "Eager frame (cuda_graph=False: the graph replays these kernels without the launch gaps)")
    parts[-1] += ", one call after two warm-ups, under torch.profiler; groups by kernel name (profile_frame.GROUPS)."
    return H.emit_report(payload, "\n".join(parts) + "\n", args.json, args.markdown)


if __name__ == "__main__":
    sys.exit(main())
