"""The reenactment demo: one source portrait, a driving FLAME sequence, a video and the FPS.

Everything is embedded (no download): the source is the procedural FLAME head
(:mod:`gpavatar.flame.procedural`) rendered with the model's camera and warped like the
official inputs (pipeline.md section 2.9); the driver is a 2-second loop of expressions
(lips part, smile, blink, brow raise), jaw opening and a head turn.  Weights come from
``--checkpoint`` (the official ``one_model.ckpt``), ``--pretrained`` (a ``save_pretrained``
folder) or, without either, from the bundled tiny model (``gpavatar/assets/tiny``, trained
with ``gpavatar train`` on synthetic procedural heads) for the ``tiny`` preset, and random
weights for ``paper`` (the video then shows the pipeline and its speed, not a likeness).

The FPS printed is that of the real-time path (:mod:`gpavatar.realtime`, ``model.realtime``) per
frame (FLAME points and camera in, super-resolved image out) after warm-up: on a GPU every call of
``--batch`` frames replays one CUDA graph, on the CPU it runs eagerly (the frames of
:meth:`GPAvatar.render`); the avatar is built once, before the timing.  A stage breakdown follows
(rays, field pass 1, field pass 2, compositing, super-resolution: CUDA events around per-stage
graphs on a GPU, ``perf_counter`` around eager stages on the CPU).  ``--fast``: the super-resolution
in bf16 channels-last (on a CPU with AMX from ``realtime.CPU_BF16_SR_MIN_PIXELS`` output pixels a call)
and TF32 in the field (fp32 otherwise, TF32 off).  ``--tune``: the real-time
renderer first times its kernel settings on this device and keeps the fastest that pass its image
check (``RealtimeRenderer(tune=True)``; the chosen settings are printed).

    gpavatar demo [--out demo-out/demo.mp4] [--frames 50] [--preset paper|tiny] [--checkpoint PATH]
                  [--pretrained DIR] [--device cuda|cpu] [--backend NAME] [--batch 1] [--fast] [--tune]
                  [--no-progress]

The container follows the suffix of ``--out``: ``.mp4`` (H.264, PyAV) or ``.gif`` (Pillow).  With
``--checkpoint`` or ``--pretrained`` the weights set the model sizes: ``--preset`` may only repeat
them (a contradiction is an error); what runs (preset, sizes, weights) is printed.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from gpavatar.model import GPAvatar
from gpavatar.model.checkpoint import atomic_write

TILE = 256  # side of each panel in the video
# The tiny preset trained on the synthetic procedural-head dataset (`gpavatar train`, see
# gpavatar/assets/tiny/README.md): the demo's default weights on CPU.
TINY_WEIGHTS = Path(__file__).parent / "assets" / "tiny"
FPS_VIDEO = 25
DEFAULT_OUT = "demo-out/demo.mp4"  # `gpavatar demo` and `make demo`
VIDEO_SUFFIXES = (".mp4", ".gif")


def driving_sequence(n_frames: int):
    """(expression (N, 50), pose (N, 6), yaw (N,) radians) of the embedded driver."""
    from gpavatar.flame.procedural import EXPRESSION_NAMES

    t = np.arange(n_frames) / max(n_frames, 1) * 2 * math.pi
    exp = np.zeros((n_frames, 50), np.float32)
    named = {n: i for i, n in enumerate(EXPRESSION_NAMES)}
    exp[:, named["smile"]] = 1.5 * np.clip(np.sin(t), 0, None)
    exp[:, named["lips_part"]] = 1.2 * np.clip(np.sin(2 * t), 0, None)
    exp[:, named["brow_raise"]] = 1.5 * np.clip(-np.sin(t), 0, None)
    exp[:, named["blink"]] = 2.0 * (np.abs(np.sin(3 * t)) > 0.97)
    pose = np.zeros((n_frames, 6), np.float32)
    pose[:, 3] = 0.15 * (1 - np.cos(2 * t)) / 2  # jaw opening (+x)
    yaw = np.radians(20.0) * np.sin(t)
    return exp, pose, yaw.astype(np.float32)


def _procedural_flame():
    from gpavatar.flame import FLAME, load_flame_model
    from gpavatar.flame.procedural import procedural_head_path

    fields = load_flame_model(procedural_head_path())
    return FLAME.clamped(fields, scale=5.0), fields["vc"].astype(np.float64)


def embedded_inputs(n_frames: int, image_size: int):
    """Source image (1, 1, 3, S, S), points (N, 5023, 3), cameras (N, 3, 4), driver meshes (N, 5023, 3),
    faces, vertex colours."""
    from gpavatar.data.official import perspective_warp
    from gpavatar.data.raster import render_mesh
    from gpavatar.data.synthetic import head_camera

    flame, colors = _procedural_flame()
    exp, pose, yaw = driving_sequence(n_frames)
    with torch.no_grad():
        zeros = torch.zeros(1, flame.n_shape)
        source_vertices = flame(zeros, torch.zeros(1, flame.n_exp), torch.zeros(1, 6))[0].numpy()
        points = flame(zeros.expand(n_frames, -1), torch.from_numpy(exp[:, :flame.n_exp]),
                       torch.from_numpy(pose))
    faces = flame.faces.numpy()
    source_camera = head_camera()
    image, _ = render_mesh(source_vertices, faces, colors, source_camera, 12.0, image_size, samples=2)
    source = torch.from_numpy(image).permute(2, 0, 1).float() / 255.0
    source = perspective_warp(source, torch.from_numpy(source_camera))[None, None]
    cameras = torch.from_numpy(np.stack([head_camera(float(a)) for a in yaw]))
    return source, points.float(), cameras, points.numpy(), faces, colors


def _tile(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) in [0, 1] -> (TILE, TILE, 3) uint8."""
    image = F.interpolate(image[None].float().clamp(0, 1), size=(TILE, TILE), mode="bilinear",
                          antialias=image.shape[-1] > TILE, align_corners=False)[0]
    return (image.permute(1, 2, 0) * 255 + 0.5).to(torch.uint8).cpu().numpy()


def write_video(path: Path, frames: list[np.ndarray], fps: int = FPS_VIDEO) -> None:
    """Frames (H, W, 3) uint8 -> ``path`` by its suffix: ``.mp4`` H.264 (MPEG-4 part 2 if libx264 is
    missing, PyAV) or ``.gif`` (Pillow, looping); written to a temporary file and renamed."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in VIDEO_SUFFIXES:
        raise ValueError(f"video path {path} must end in {' or '.join(VIDEO_SUFFIXES)}")
    path.parent.mkdir(parents=True, exist_ok=True)

    def encode_mp4(tmp: str) -> None:
        import av

        with av.open(tmp, mode="w", format="mp4") as container:
            codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
            stream = container.add_stream(codec, rate=fps)
            stream.height, stream.width = frames[0].shape[:2]
            stream.pix_fmt = "yuv420p"
            for frame in frames:
                for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)

    def encode_gif(tmp: str) -> None:
        from PIL import Image

        images = [Image.fromarray(frame) for frame in frames]
        images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:], duration=round(1000 / fps),
                       loop=0)

    atomic_write(path, encode_gif if suffix == ".gif" else encode_mp4)


def describe_model(model: GPAvatar) -> str:
    """"preset tiny (64² sources, 16² rays x 16 samples, 64² output)" for ``model``'s config."""
    c = model.config
    name = c.preset_name()
    sizes = (f"{c.image_size}² sources, {c.render_size}² rays x {c.n_coarse + c.n_fine} samples, "
             f"{c.output_size}² output")
    return f"preset {name} ({sizes})" if name else f"custom sizes ({sizes})"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def frame_batch(points: torch.Tensor, cameras: torch.Tensor, start: int, batch: int):
    """Frames start .. start + batch - 1 as (points, cameras, n): a short last batch is padded with copies
    of its last frame (the real-time renderer's batch is fixed); n frames are real."""
    p, c = points[start:start + batch], cameras[start:start + batch]
    n = p.shape[0]
    if n < batch:
        p = torch.cat([p, p[-1:].expand(batch - n, -1, -1)])
        c = torch.cat([c, c[-1:].expand(batch - n, -1, -1)])
    return p, c, n


def load_model(preset: Optional[str], checkpoint: Optional[str], pretrained: Optional[str], device: torch.device,
               backend: Optional[str]) -> tuple[GPAvatar, str]:
    """The demo's model and a description of its weights.  ``checkpoint`` (official, paper sizes) or
    ``pretrained`` set the sizes; ``preset`` may only repeat them (ValueError otherwise).  Without
    either: the bundled tiny model for ``tiny``, random weights for ``paper``."""
    if checkpoint and pretrained:
        raise ValueError("give --checkpoint or --pretrained, not both")
    if checkpoint and preset not in (None, "paper"):
        raise ValueError(f"--preset {preset} contradicts --checkpoint: the official checkpoint is the paper model; "
                         f"drop --preset")
    if checkpoint:
        model, weights = GPAvatar.from_official_checkpoint(checkpoint), f"official checkpoint {checkpoint}"
    elif pretrained:
        model, weights = GPAvatar.from_pretrained(pretrained), f"pretrained {pretrained}"
        actual = model.config.preset_name()
        if preset is not None and actual != preset:
            raise ValueError(f"--preset {preset} contradicts --pretrained {pretrained}, which holds a "
                             f"{describe_model(model)} model; drop --preset (the weights set the sizes)")
    elif preset == "tiny" and (TINY_WEIGHTS / "model.safetensors").is_file():
        model, weights = GPAvatar.from_pretrained(TINY_WEIGHTS), "the bundled tiny model (trained on synthetic heads)"
    else:
        torch.manual_seed(0)
        model, weights = GPAvatar(preset or "paper"), "random weights (no checkpoint given)"
    model.set_noise("stored")
    if backend is not None:
        model.set_backend(backend)
    return model.to(device).eval(), weights


def _bar(iterable, progress: bool, **kwargs):
    if not progress:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, leave=False, **kwargs)


def demo_compile(value: Optional[str], device: torch.device) -> tuple[str, bool]:
    """What the demo compiles, and whether that was the "auto" choice: ``value`` when given ("sr", "layers", "all", "none"), else
    ``$GPAVATAR_REALTIME_COMPILE`` when set, else "auto": the super-resolution on a CUDA device where
    Triton runs (on an H100 the compiled fast super-resolution took 1.8 ms instead of 2.9, the fp32
    one 9.7 instead of 10.3: the largest stage after the two field passes), nothing on a CPU (a C++
    toolchain and a minute of compilation for ~1.5 ms of a tiny frame)."""
    from gpavatar.realtime import COMPILE_ENV, compile_parts

    if value is None:
        value = os.environ.get(COMPILE_ENV) or "auto"
    if value == "auto":
        from gpavatar.ops._backend import triton_available

        return ("sr" if device.type == "cuda" and triton_available() else "none"), True
    try:
        compile_parts(value)
    except ValueError as exc:
        raise ValueError(f"{exc} (or auto, the demo's default)") from None
    return value, False


def _first_frame(model, avatar, first, options: dict, compile: str, automatic: bool, warmup: int):
    """The real-time renderer and its warm-up (+ the capture on a GPU); when the compile was the
    demo's own choice ("auto") and compiling fails, a warning and the same renderer uncompiled."""
    def start(parts: str):
        realtime = model.realtime(avatar, compile=parts, **options)
        for _ in range(warmup):
            realtime(*first)
        return realtime

    try:
        return start(compile)
    except Exception as exc:  # noqa: BLE001  (torch.compile's failures have many types)
        if not automatic or compile == "none":
            raise
        warnings.warn(f"gpavatar demo: compiling the super-resolution failed ({type(exc).__name__}: {exc}); "
                      "rendering without torch.compile (--compile none skips the attempt)", RuntimeWarning,
                      stacklevel=2)
    return start("none")


def run_demo(out: str = DEFAULT_OUT, frames: int = 50, preset: Optional[str] = None,
             checkpoint: Optional[str] = None, pretrained: Optional[str] = None, device: Optional[str] = None,
             backend: Optional[str] = None, batch: int = 1, fast: bool = False, warmup: int = 2,
             progress: bool = False, tune: bool = False, compile: Optional[str] = None) -> dict:
    """Render the embedded driver with the model, write the video (``.mp4`` or ``.gif`` by the suffix of
    ``out``), return the timings and what ran (``preset``, ``model``, ``weights``).

    ``preset`` (None: paper on CUDA, tiny on CPU) picks the model without weights; with ``checkpoint``
    / ``pretrained`` the weights decide and ``preset`` may only repeat them.  Every argument and the
    output path are checked before the model is loaded.  ``compile``: the real-time path's parts run
    as ``torch.compile``'d functions ("sr", "layers", "all", "none", "auto"; None:
    ``$GPAVATAR_REALTIME_COMPILE``, else "auto": :func:`demo_compile`), compiled in the warm-up (tens
    of seconds; "auto" falls back to no compilation with a warning if that fails)."""
    from gpavatar.cli import check_device, check_output_file

    path = check_output_file(out, "--out", VIDEO_SUFFIXES)
    for name, value in (("frames", frames), ("batch", batch)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if preset not in (None, "paper", "tiny"):
        raise ValueError(f"preset must be 'paper' or 'tiny', got {preset!r}")
    dev = check_device(device)
    compile, automatic = demo_compile(compile, dev)  # checked before the model is loaded
    if not (checkpoint or pretrained):
        preset = preset or ("paper" if dev.type == "cuda" else "tiny")
    model, weights = load_model(preset, checkpoint, pretrained, dev, backend)
    c = model.config
    source, points, cameras, meshes, faces, colors = embedded_inputs(frames, c.image_size)
    source, points, cameras = source.to(dev), points.to(dev), cameras.to(dev).float()

    with torch.no_grad():
        _sync(dev)
        start = time.perf_counter()
        avatar = model.build_avatar(source)
        _sync(dev)
        build_ms = 1000 * (time.perf_counter() - start)
    options = dict(batch=batch, dtype=torch.bfloat16 if fast else torch.float32, warmup=max(1, warmup),
                   tune=bool(tune))
    first = frame_batch(points, cameras, 0, batch)[:2]
    # warm-up (+ the capture on a GPU)
    realtime = _first_frame(model, avatar, first, options, compile, automatic,
                            max(1, warmup if dev.type == "cpu" else 1))
    images = []
    _sync(dev)
    start = time.perf_counter()
    for i in _bar(range(0, frames, batch), progress, desc="render", unit="call"):
        batch_points, batch_cameras, n = frame_batch(points, cameras, i, batch)
        # clone: a graph's output is overwritten by the next call
        images.append(realtime(batch_points, batch_cameras)["image"][:n].clone())
    _sync(dev)
    seconds = time.perf_counter() - start
    images = torch.cat(images).cpu()
    stages = realtime.profile(*first, repeats=10 if dev.type == "cuda" else 3)

    from gpavatar.data.raster import render_mesh

    source_tile = _tile(source[0, 0].cpu())
    video = []
    for i in _bar(range(frames), progress, desc="video", unit="frame"):
        driver, _ = render_mesh(meshes[i], faces, colors, cameras[i].cpu().numpy(), 12.0, TILE)
        video.append(np.concatenate([source_tile, driver, _tile(images[i])], axis=1))
    write_video(path, video)
    return {"frames": frames, "seconds": seconds, "fps": frames / seconds, "ms_per_frame": 1000 * seconds / frames,
            "avatar_ms": build_ms, "device": str(dev), "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda"
            else None, "preset": c.preset_name() or "custom", "model": describe_model(model),
            "backend": c.backend or "auto", "batch": batch, "fast": fast, "weights": weights, "video": str(path),
            "cuda_graph": realtime.cuda_graph, "stages_ms": stages, "settings": dict(realtime.settings),
            "tuning": realtime.tuning, "tune_seconds": realtime.tune_seconds,
            "compiled": sorted(realtime.compiled), "defaults": dict(realtime.defaults)}


def add_parser(sub) -> None:
    from gpavatar.cli import NO_PROGRESS_HELP, positive_int

    p = sub.add_parser("demo", help="reenact the embedded procedural head, write a video, print FPS",
                       description="Reenact the embedded procedural head with GPAvatar, write a video "
                       "(source | driver | result) and print the render FPS.")
    p.add_argument("--out", default=DEFAULT_OUT, help="video path, .mp4 (H.264) or .gif")
    p.add_argument("--frames", type=positive_int, default=50, help="frames of the driver (25 per second)")
    p.add_argument("--preset", choices=("paper", "tiny"), default=None,
                   help="model sizes without weights (default: paper on CUDA, tiny on CPU); with --checkpoint / "
                   "--pretrained the weights set the sizes")
    p.add_argument("--checkpoint", help="official one_model.ckpt (paper preset)")
    p.add_argument("--pretrained", help="folder written by GPAvatar.save_pretrained (or gpavatar train)")
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda if available, else cpu)")
    p.add_argument("--backend", default=None, choices=("auto", "cuda", "triton", "cpu", "torch"),
                   help="kernel backend (default: $GPAVATAR_BACKEND, else auto)")
    p.add_argument("--batch", type=positive_int, default=1, help="frames rendered per call (throughput)")
    p.add_argument("--fast", action="store_true",
                   help="fast mode: bf16 channels-last super-resolution (on a CPU with AMX only for large frames), "
                        "TF32 field (default: fp32, TF32 off)")
    p.add_argument("--tune", action="store_true",
                   help="time the real-time path's kernel settings on this device first and keep the fastest "
                   "that pass the image check (gpavatar.realtime; seconds of warm-up, GPU settings only)")
    p.add_argument("--compile", default=None, choices=("auto", "sr", "layers", "all", "none"),
                   help="run the super-resolution and/or the field's layers as torch.compile'd functions (tens of "
                   "seconds of compilation in the warm-up; on an H100 the fast super-resolution 1.8 ms instead of "
                   "2.9; default: $GPAVATAR_REALTIME_COMPILE, else auto: the super-resolution on a CUDA GPU, "
                   "nothing on a CPU)")
    p.add_argument("--no-progress", action="store_true", help=NO_PROGRESS_HELP)
    p.set_defaults(run=_main)


def _main(args) -> int:
    from gpavatar.cli import progress_enabled

    r = run_demo(args.out, args.frames, args.preset, args.checkpoint, args.pretrained, args.device, args.backend,
                 args.batch, args.fast, progress=progress_enabled(args.no_progress), tune=args.tune,
                 compile=args.compile)
    where = r["gpu"] or "CPU"
    print(f"gpavatar demo: {r['frames']} frames, {r['model']}, weights: {r['weights']}")
    print(f"  device {r['device']} ({where}), backend {r['backend']}, batch {r['batch']}"
          f"{', fast mode (bf16 super-resolution, TF32 field)' if r['fast'] else ', fp32'}")
    print(f"  avatar (encoder + MTA, once): {r['avatar_ms']:.1f} ms")
    if r["defaults"] or r["compiled"]:
        print(f"  real-time path: {', '.join(f'{k}={v}' for k, v in r['defaults'].items()) or 'no'} device defaults"
              f", compiled: {', '.join(r['compiled']) or 'nothing'}")
    if r["tuning"]:
        base, chosen = r["tuning"][0], next(t for t in r["tuning"] if t["chosen"])
        settings = ", ".join(f"{k}={v}" for k, v in r["settings"].items()) or "the defaults"
        print(f"  tuned ({len(r['tuning'])} trials, {r['tune_seconds']:.1f} s): {settings}; frame {base['ms']:.3g} -> "
              f"{chosen['ms']:.3g} ms")
    how = "one CUDA graph per call" if r["cuda_graph"] else "eager"
    print(f"  render: {r['ms_per_frame']:.2f} ms/frame = {r['fps']:.3g} FPS ({how}, {r['batch']} frame(s) per call)")
    from gpavatar.realtime import REPORTED_STAGES

    stages = r["stages_ms"]
    clock = "CUDA events" if r["cuda_graph"] else "perf_counter"
    print(f"  stages (ms per call, {clock}): " + ", ".join(f"{k} {stages[k]:.3g}" for k in REPORTED_STAGES)
          + f"; frame {stages['frame']:.3g}")
    print(f"  wrote {r['video']} (source | driver | GPAvatar)")
    return 0
