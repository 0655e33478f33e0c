"""Reenact one's own sources with a FLAME driving sequence: video, frames, depth, attention, orbit.

    gpavatar reenact [IMAGE|FOLDER ...] [--dataset DIR --source KEY ...]
                     [--driver FILE|DIR] [--driver-video ID] [--driver-keys FIRST:LAST] [--frames A:B]
                     [--checkpoint CKPT | --pretrained DIR] [--preset tiny|paper] [--flame FILE]
                     [--out reenact-out/reenact.mp4] [--layout side|result] [--frames-dir DIR]
                     [--depth] [--attention] [--orbit [DEGREES]] [--elevation 5] [--fps N]
                     [--batch 1] [--device cuda|cpu] [--backend NAME] [--fast] [--tune] [--no-progress]

**Sources** (V >= 1, fused by multi tri-plane attention): image files or folders of them (.png,
.jpg, ...; sorted by name), already aligned like the encoder's inputs (the official inference
warps tracked frames with pipeline.md 2.9 first; there is no tracker here), each resized so its
shorter side is the model's ``image_size`` and centre-cropped, divided by 255; and / or frames of
an official-layout dataset (``--dataset DIR --source KEY``, repeatable or comma-separated),
divided by 256 and warped with their own ``transform_matrix`` as in training. Identity (FLAME
shape): the mean ``mica_shape`` of the dataset sources; for image sources only, the driver's mean
``mica_shape`` when it has one, else the mean shape (zeros).

**Driver** (:mod:`gpavatar.data.driver`): a ``.npz`` / ``.json`` driver file (schema there;
``gpavatar data synth`` writes ``OUT/driver.json`` as an example), an official-layout dataset folder
(``--driver-video`` id, default the first; or ``--driver-keys FIRST:LAST``, inclusive), a tracker
folder / ``.pkl`` (``smoothed.pkl`` or ``lightning.pkl``), or nothing: the demo's scripted 2-second
driver (:func:`gpavatar.demo.driving_sequence`). ``--frames`` picks frames by position: ``N`` (the
first N) or ``A:B[:STEP]``. Per frame (pipeline.md 4.4): points = FLAME(identity, driver
expression, driver pose) x 5, camera = the driver's ``transform_matrix``. FLAME model: ``--flame``,
else the dataset's ``generic_model.pkl`` / ``flame.npz``, else the procedural head (what ``gpavatar
data synth`` renders).

**Model**: ``--checkpoint`` (official ``one_model.ckpt``, strict), ``--pretrained`` (a
``save_pretrained`` folder) or the bundled tiny model (:data:`gpavatar.demo.TINY_WEIGHTS`).

**Outputs** (every file written to a temporary name, then renamed; ``OUT`` = ``--out`` without suffix):

* ``--out`` video (.mp4 H.264 or .gif): ``side`` = sources (2 x 2 grid when V > 1) | driver (its
  dataset frame, else the FLAME mesh under the frame's camera) | result; ``result`` = the result alone;
* ``--frames-dir DIR``: ``frame_00000.png`` ... at the model's output size;
* ``--depth``: ``OUT_depth.mp4`` (colour-mapped: near = bright, background black) and
  ``OUT_depth.npy`` (N, R, R) float32: the surface depth Σ w t / opacity in world units from the
  camera at the render resolution R, NaN where opacity < 0.05 (background);
* ``--attention``: ``OUT_attention.png`` (one row per source: the source, then its MTA weight on
  the xy, xz and zy planes, dark violet 0 .. pale yellow 1) and ``OUT_attention.npy`` (V, 3, H, W);
* ``--orbit [DEGREES]`` (360 without a value): the driver's cameras are replaced by a look-at
  camera at the driver's mean distance (‖T‖) and ``--elevation``, azimuth sweeping DEGREES around the head
  centred on the front (official ``--rotate A`` = ``--orbit 2A``) while the expression plays.

Frames are rendered by the real-time path (:mod:`gpavatar.realtime`, ``model.realtime``): on a GPU
every call of ``--batch`` frames replays one CUDA graph (the last call padded to the batch), on the
CPU the calls run eagerly, the frames of :meth:`GPAvatar.render`.  ``--fast``: its fast mode (bf16
channels-last super-resolution, TF32 field); ``--tune``: it first times its kernel settings on the
device.  The render FPS printed is that of those calls (points and cameras in, images out) after
the first call (on a GPU, the capture); the avatar is built once, before (fp32; TF32 with --fast).

    >>> result = reenact(["face.png"], driver="data/synth/driver.json", out="out/face.mp4")  # doctest: +SKIP
    >>> result["fps"] > 0  # doctest: +SKIP
    True
"""

from __future__ import annotations

import math
import time
import warnings
from fractions import Fraction
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch

from gpavatar.data.driver import Driver, load_driver
from gpavatar.data.sources import Sources, dataset_sources, image_files, image_sources
from gpavatar.reenact_output import TILE, attention_grid, depth_tiles, grid2x2, save_array, save_png, tile

__all__ = ["DEFAULT_OUT", "scripted_driver", "orbit_cameras", "parse_frames", "parse_key_range", "reenact",
           "add_parser"]

DEFAULT_OUT = "reenact-out/reenact.mp4"
VIDEO_SUFFIXES = (".mp4", ".gif")
LAYOUTS = ("side", "result")
SCRIPTED_FRAMES = 50  # the demo's driver: 2 s at 25 fps
OPAQUE = 0.05  # opacity below which a depth pixel is background (NaN)
PathLike = Union[str, "Path"]


# --- argument parsing ------------------------------------------------------------------------------------------


def parse_frames(text: str) -> slice:
    """``"N"`` -> the first N frames; ``"A:B"`` / ``"A:B:STEP"`` -> that slice (ints >= 0, STEP >= 1)."""
    import argparse

    parts = text.split(":")
    try:
        values = [None if p == "" else int(p) for p in parts]
    except ValueError:
        values = None
    if values is None or not 1 <= len(parts) <= 3 or any(v is not None and v < 0 for v in values) \
            or (len(parts) == 1 and values[0] in (None, 0)) or (len(parts) == 3 and values[2] == 0):
        raise argparse.ArgumentTypeError(f"must be N (the first N frames, N >= 1) or A:B[:STEP] with integers "
                                         f">= 0 (STEP >= 1), got {text!r}")
    return slice(0, values[0]) if len(parts) == 1 else slice(*values)


def parse_key_range(text: str) -> tuple:
    """``"img_000007_2:img_000007_9"`` -> (first, last) frame keys (inclusive)."""
    import argparse

    first, sep, last = text.partition(":")
    if not sep or not first or not last or ":" in last:
        raise argparse.ArgumentTypeError(f"must be FIRST:LAST frame keys, e.g. img_000007_0:img_000007_9, got {text!r}")
    return first, last


# --- drivers and cameras ---------------------------------------------------------------------------------------


def scripted_driver(frames: int = SCRIPTED_FRAMES) -> Driver:
    """The demo's embedded driver (expressions, jaw and a head turn) as a :class:`Driver`."""
    from gpavatar.data.synthetic import head_camera
    from gpavatar.demo import driving_sequence

    expression, pose, yaw = driving_sequence(frames)
    cameras = np.stack([head_camera(float(a)) for a in yaw])
    return Driver(expression, pose, cameras, source="the scripted demo driver")


def orbit_cameras(transforms: np.ndarray, degrees: float, elevation: float = 5.0) -> np.ndarray:
    """(N, 3, 4) look-at cameras around the origin (up +y) at the mean distance ‖T‖ of ``transforms``
    (a smooth path), ``elevation`` degrees, azimuth -degrees/2 + degrees·t/N for frame t (0 = in front,
    on +z; +x is the subject's left). Row-form [R|T] with R = [x y z] columns, z towards the origin,
    T = -C R for the camera centre C."""
    transforms = np.asarray(transforms, dtype=np.float64)
    N = transforms.shape[0]
    distance = np.full(N, np.linalg.norm(transforms[:, :, 3], axis=1).mean())
    azimuth = np.radians(-degrees / 2 + degrees * np.arange(N) / max(N, 1))
    el = math.radians(elevation)
    centre = distance[:, None] * np.stack([math.cos(el) * np.sin(azimuth), np.full(N, math.sin(el)),
                                           math.cos(el) * np.cos(azimuth)], -1)
    z = -centre / np.linalg.norm(centre, axis=1, keepdims=True)
    x = np.cross(np.array([0.0, 1.0, 0.0]), z)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    y = np.cross(z, x)
    R = np.stack([x, y, z], axis=2)  # columns
    T = -np.einsum("nc,ncr->nr", centre, R)
    return np.concatenate([R, T[:, :, None]], axis=2).astype(np.float32)


def _fit(array: np.ndarray, n: int) -> np.ndarray:
    """Truncate or zero-pad the last axis to n."""
    if array.shape[-1] >= n:
        return array[..., :n]
    return np.concatenate([array, np.zeros(array.shape[:-1] + (n - array.shape[-1],), array.dtype)], -1)


def _flame(flame: Optional[PathLike], roots: Sequence[Optional[Path]]):
    """FLAME layer (scale 5) and vertex colours (V, 3) for the driver panel."""
    from gpavatar.flame import FLAME, load_flame_model
    from gpavatar.flame.procedural import procedural_head_path

    path = Path(flame) if flame is not None else None
    if path is not None and not path.is_file():
        raise FileNotFoundError(f"--flame {path} not found (a FLAME .pkl or .npz)")
    for root in roots:
        for name in ("generic_model.pkl", "flame.npz"):
            if path is None and root is not None and (root / name).is_file():
                path = root / name
    fields = load_flame_model(path or procedural_head_path())
    colours = fields.get("vc")
    colours = np.full((len(fields["v_template"]), 3), 0.75) if colours is None else colours.astype(np.float64)
    return FLAME.clamped(fields, scale=5.0), colours


# --- the command -------------------------------------------------------------------------------------------------


def _check_options(out, layout, frames_dir, orbit, elevation, batch, fps, frames):
    from gpavatar.cli import UsageError, check_output_file

    path = check_output_file(out, "--out", VIDEO_SUFFIXES)
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be an int >= 1, got {batch!r}")
    for name, value in (("orbit", orbit), ("elevation", elevation), ("fps", fps)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value)):
            raise TypeError(f"{name} must be a finite number, got {value!r}")
    if orbit is not None and orbit <= 0:
        raise ValueError(f"orbit must be > 0 degrees, got {orbit}")
    if not -89 <= elevation <= 89:
        raise ValueError(f"elevation must be in [-89, 89] degrees, got {elevation}")
    if fps is not None and fps <= 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    if frames is not None and not isinstance(frames, slice) and (isinstance(frames, bool)
                                                                 or not isinstance(frames, int) or frames < 1):
        raise TypeError(f"frames must be None, an int >= 1 or a slice, got {frames!r}")
    if frames_dir is not None and Path(frames_dir).exists() and not Path(frames_dir).is_dir():
        raise UsageError(f"--frames-dir {frames_dir} is a file, not a folder")
    return path


def _driver(driver, driver_video, driver_keys, frames) -> Driver:
    if isinstance(driver, Driver):
        if driver_video is not None or driver_keys is not None:
            raise ValueError("driver_video / driver_keys need a dataset or tracker driver path, not a Driver")
        chosen = driver
    elif driver is None:
        if driver_video is not None or driver_keys is not None:
            raise ValueError("--driver-video / --driver-keys need --driver DIR (a dataset or tracker folder)")
        chosen = scripted_driver(frames if isinstance(frames, int) else SCRIPTED_FRAMES if frames is None
                                 else max(SCRIPTED_FRAMES, frames.stop or 0))
    else:
        chosen = load_driver(driver, driver_video, driver_keys)
    if frames is not None:
        chosen = chosen.select(slice(0, frames) if isinstance(frames, int) else frames)
    return chosen


def reenact(sources: Sequence[PathLike] = (), *, dataset: Optional[PathLike] = None, source_keys: Sequence[str] = (),
            driver: Union[PathLike, Driver, None] = None, driver_video: Optional[str] = None,
            driver_keys: Optional[tuple] = None, frames: Union[int, slice, None] = None,
            checkpoint: Optional[PathLike] = None, pretrained: Optional[PathLike] = None, preset: Optional[str] = None,
            flame: Optional[PathLike] = None, out: PathLike = DEFAULT_OUT, layout: str = "side",
            frames_dir: Optional[PathLike] = None, depth: bool = False, attention: bool = False,
            orbit: Optional[float] = None, elevation: float = 5.0, fps: Optional[float] = None, batch: int = 1,
            device: Optional[str] = None, backend: Optional[str] = None, fast: bool = False,
            progress: bool = False, tune: bool = False) -> dict:
    """Reenact ``sources`` (image files / folders) and / or ``source_keys`` of ``dataset`` with ``driver``
    and write the outputs (module docstring). Every argument, path and the driver are checked before the
    model is loaded; errors are ``ValueError`` / ``TypeError`` / ``FileNotFoundError`` / ``KeyError`` naming
    the argument.

    Returns:
        dict: ``frames``, ``fps``, ``ms_per_frame``, ``avatar_ms``, ``num_sources``, ``identity`` ("sources",
        "driver" or "mean"), ``driver``, ``model``, ``weights``, ``device``, ``outputs`` {name: path}
    """
    from gpavatar.cli import UsageError, check_device
    from gpavatar.data.raster import render_mesh
    from gpavatar.demo import describe_model, frame_batch, load_model, write_video

    path = _check_options(out, layout, frames_dir, orbit, elevation, batch, fps, frames)
    if isinstance(sources, (str, Path)):
        sources = [sources]
    if source_keys and dataset is None:
        raise UsageError("--source KEY needs --dataset DIR (the dataset the key belongs to)")
    if dataset is not None and not source_keys:
        raise UsageError(f"--dataset {dataset} needs --source KEY (a frame key such as img_000000_0)")
    if not sources and not source_keys:
        raise UsageError("give source images (files or a folder) or --dataset DIR --source KEY")
    files = image_files(sources)  # existence checked before the model loads
    chosen = _driver(driver, driver_video, driver_keys, frames)
    dev = check_device(device)
    if preset not in (None, "tiny", "paper"):
        raise ValueError(f"preset must be 'tiny' or 'paper', got {preset!r}")
    if preset == "paper" and not (checkpoint or pretrained):
        warnings.warn("--preset paper without --checkpoint / --pretrained renders with random weights (no likeness)",
                      UserWarning, stacklevel=2)
    weights_preset = preset or (None if checkpoint or pretrained else "tiny")
    model, weights = load_model(weights_preset, checkpoint and str(checkpoint), pretrained and str(pretrained), dev,
                                backend)
    c = model.config
    if chosen.focal is not None and abs(chosen.focal - c.focal) > 1e-6:
        raise ValueError(f"driver {chosen.source} has focal_length {chosen.focal}, the model renders with {c.focal}")

    parts = []
    if files:
        parts.append(image_sources(files, c.image_size))
    if source_keys:
        parts.append(dataset_sources(dataset, list(source_keys), c.image_size))
    src = Sources(torch.cat([p.images for p in parts]), torch.cat([p.display for p in parts]),
                  sum((p.names for p in parts), []), parts[-1].shape, parts[-1].root)
    identity, shape = ("sources", src.shape) if src.shape is not None else \
        ("driver", chosen.mean_shape()) if chosen.shape is not None else ("mean", np.zeros(100, np.float32))
    layer, colours = _flame(flame, [src.root, chosen.root])
    N = chosen.num_frames
    with torch.no_grad():
        points = layer(torch.from_numpy(np.tile(_fit(shape, layer.n_shape), (N, 1))),
                       torch.from_numpy(np.ascontiguousarray(_fit(chosen.expression, layer.n_exp))),
                       torch.from_numpy(chosen.pose))
    cameras = chosen.transform if orbit is None else orbit_cameras(chosen.transform, orbit, elevation)

    # --- render: the real-time path (gpavatar.realtime; one CUDA graph per call on a GPU) ---
    from gpavatar.realtime import precision

    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    images, depths, times = [], [], []
    calls = range(0, N, batch)
    if progress:
        from tqdm import tqdm

        calls = tqdm(calls, desc="render", unit="call", leave=False)
    with torch.no_grad(), precision(fast):  # the avatar in fp32 (TF32 in fast mode), once
        sync()
        start = time.perf_counter()
        avatar = model.build_avatar(src.images[None].to(dev), return_attention=attention)
        sync()
        avatar_ms = 1000 * (time.perf_counter() - start)
    renderer = model.realtime(avatar, batch=min(batch, N), dtype=torch.bfloat16 if fast else torch.float32,
                              tune=tune)
    cams = torch.from_numpy(cameras).to(dev).float()
    points_dev = points.to(dev)
    for i in calls:
        # the last call padded with its last frame (a fixed-size graph); n frames are real
        frame_points, frame_cams, n = frame_batch(points_dev, cams, i, renderer.batch)
        start = time.perf_counter()
        result = renderer(frame_points, frame_cams)
        sync()
        times.append((n, time.perf_counter() - start))
        # copies: a graph's outputs are overwritten by the next call
        images.append(result["image"][:n].float().clamp(0, 1).cpu())
        if depth:
            opacity = result["opacity"][:n].float()[:, 0]
            surface = result["depth_expected"][:n].float()[:, 0] / opacity.clamp_min(1e-6)
            depths.append(torch.where(opacity >= OPAQUE, surface, torch.nan).cpu())
    images = torch.cat(images)
    timed = times[1:] if len(times) > 1 else times
    seconds = sum(t for _, t in timed)
    timed_frames = sum(n for n, _ in timed)

    # --- write ---
    outputs = {}
    rate = Fraction(fps or chosen.fps).limit_denominator(1001)  # PyAV wants an int or a Fraction
    rate = int(rate) if rate.denominator == 1 else rate
    if layout == "side":
        source_tile = grid2x2([tile(im) for im in src.display[:4]]) if len(src.names) > 1 else tile(src.display[0])
        lmdb = None
        if orbit is None and chosen.root is not None and chosen.keys is not None:
            from gpavatar.data.official import ImageLMDB

            lmdb = ImageLMDB(Path(chosen.root) / "img_lmdb")
        faces, world = layer.faces.numpy(), points.numpy()
        video = []
        for t in range(N):
            if lmdb is not None:
                driver_tile = tile(torch.from_numpy(lmdb.image(chosen.keys[t])).float() / 255.0)
            else:
                driver_tile, _ = render_mesh(world[t], faces, colours, cameras[t], c.focal, TILE)
            video.append(np.concatenate([source_tile, driver_tile, tile(images[t])], axis=1))
    else:
        video = [tile(im, max(TILE, c.output_size)) for im in images]
    write_video(path, video, fps=rate)
    outputs["video"] = str(path)
    stem = path.with_suffix("")
    if depth:
        depth_maps = torch.cat(depths).numpy().astype(np.float32)
        outputs["depth_npy"] = str(save_array(stem.with_name(stem.name + "_depth.npy"), depth_maps))
        depth_video = stem.with_name(stem.name + "_depth" + path.suffix)
        write_video(depth_video, depth_tiles(depth_maps, TILE if layout == "side" else max(TILE, c.output_size)),
                    fps=rate)
        outputs["depth_video"] = str(depth_video)
    if attention:
        weights_map = (avatar.attention[0].transpose(0, 1).float().cpu().numpy() if avatar.attention is not None
                       else np.ones((len(src.names), 3, c.plane_size, c.plane_size), np.float32))  # (V, 3, H, W)
        outputs["attention_npy"] = str(save_array(stem.with_name(stem.name + "_attention.npy"), weights_map))
        outputs["attention_png"] = str(save_png(stem.with_name(stem.name + "_attention.png"),
                                                attention_grid(src.display, weights_map)))
    if frames_dir is not None:
        folder = Path(frames_dir)
        folder.mkdir(parents=True, exist_ok=True)
        for t in range(N):
            save_png(folder / f"frame_{t:05d}.png", tile(images[t], c.output_size))
        outputs["frames_dir"] = str(folder)
    return {"frames": N, "fps": timed_frames / max(seconds, 1e-9), "ms_per_frame": 1000 * seconds / timed_frames,
            "avatar_ms": avatar_ms, "num_sources": len(src.names), "sources": src.names, "identity": identity,
            "driver": chosen.source, "orbit": orbit, "model": describe_model(model), "weights": weights,
            "device": str(dev), "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
            "backend": c.backend or "auto", "batch": batch, "fast": fast, "layout": layout, "outputs": outputs,
            "cuda_graph": renderer.cuda_graph, "settings": dict(renderer.settings)}


def add_parser(commands) -> None:
    from gpavatar.cli import NO_PROGRESS_HELP, positive_int

    p = commands.add_parser("reenact", help="reenact source images with a FLAME driver: video, depth, attention, "
                            "orbit", description="Reenact source images (files, a folder, or dataset frames) with "
                            "a FLAME driving sequence and write a video (source | driver | result), optionally "
                            "frames, depth maps, MTA attention maps or a novel-view orbit; prints the render FPS.")
    p.add_argument("sources", nargs="*", metavar="IMAGE", help="source image files or folders (aligned portraits)")
    p.add_argument("--dataset", metavar="DIR", help="official-layout dataset holding the --source frames")
    p.add_argument("--source", action="append", default=[], metavar="KEY",
                   help="frame key of --dataset to use as a source (repeat or comma-separate for V > 1)")
    p.add_argument("--driver", metavar="PATH", help="driver: .npz / .json file, dataset folder or tracker folder / "
                   ".pkl (default: the scripted demo driver)")
    p.add_argument("--driver-video", metavar="ID", help="video id of a dataset driver (default: the first)")
    p.add_argument("--driver-keys", type=parse_key_range, metavar="FIRST:LAST",
                   help="inclusive frame-key range of a dataset / tracker driver")
    p.add_argument("--frames", type=parse_frames, metavar="N|A:B",
                   help="driver frames by position: the first N, or the slice A:B[:STEP] (default: all; "
                   f"the scripted driver has {SCRIPTED_FRAMES})")
    p.add_argument("--checkpoint", help="official one_model.ckpt (paper preset, strict)")
    p.add_argument("--pretrained", metavar="DIR", help="folder written by GPAvatar.save_pretrained / gpavatar train")
    p.add_argument("--preset", choices=("tiny", "paper"), default=None,
                   help="model without weights: tiny = the bundled tiny model (default), paper = random weights")
    p.add_argument("--flame", metavar="FILE", help="FLAME model .pkl / .npz (default: the dataset's, else the "
                   "procedural head)")
    p.add_argument("--out", default=DEFAULT_OUT, help="video path, .mp4 (H.264) or .gif")
    p.add_argument("--layout", choices=LAYOUTS, default="side", help="side: source | driver | result; result: alone")
    p.add_argument("--frames-dir", metavar="DIR", help="also write every result frame as a PNG into DIR")
    p.add_argument("--depth", action="store_true", help="also write OUT_depth.mp4 (colour-mapped) and OUT_depth.npy")
    p.add_argument("--attention", action="store_true", help="also write OUT_attention.png / .npy (MTA weights)")
    p.add_argument("--orbit", type=float, nargs="?", const=360.0, default=None, metavar="DEGREES",
                   help="novel views: the camera sweeps DEGREES of azimuth around the head (360 if no value)")
    p.add_argument("--elevation", type=float, default=5.0, help="camera elevation of --orbit, degrees")
    p.add_argument("--fps", type=float, default=None, help="video frame rate (default: the driver's, else 25)")
    p.add_argument("--batch", type=positive_int, default=1, help="frames rendered per call (throughput)")
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda if available, else cpu)")
    p.add_argument("--backend", default=None, choices=("auto", "cuda", "triton", "cpu", "torch"),
                   help="kernel backend (default: $GPAVATAR_BACKEND, else auto)")
    p.add_argument("--fast", action="store_true", help="the real-time renderer's fast mode: bf16 channels-last "
                   "super-resolution, TF32 field (default: fp32, TF32 off)")
    p.add_argument("--tune", action="store_true", help="time the real-time path's kernel settings on this device "
                   "first and keep the fastest that pass the image check (gpavatar.realtime)")
    p.add_argument("--no-progress", action="store_true", help=NO_PROGRESS_HELP)
    p.set_defaults(run=_main)


def _main(args) -> int:
    from gpavatar.cli import progress_enabled

    keys = [k for entry in args.source for k in entry.split(",") if k]
    r = reenact(args.sources, dataset=args.dataset, source_keys=keys, driver=args.driver,
                driver_video=args.driver_video, driver_keys=args.driver_keys, frames=args.frames,
                checkpoint=args.checkpoint, pretrained=args.pretrained, preset=args.preset, flame=args.flame,
                out=args.out, layout=args.layout, frames_dir=args.frames_dir, depth=args.depth,
                attention=args.attention, orbit=args.orbit, elevation=args.elevation, fps=args.fps, batch=args.batch,
                device=args.device, backend=args.backend, fast=args.fast,
                progress=progress_enabled(args.no_progress), tune=args.tune)
    orbit = f", orbit {r['orbit']:g} degrees" if r["orbit"] else ""
    print(f"gpavatar reenact: {r['frames']} frames, {r['num_sources']} source(s), identity from {r['identity']}, "
          f"driver: {r['driver']}{orbit}")
    print(f"  {r['model']}, weights: {r['weights']}")
    print(f"  device {r['device']} ({r['gpu'] or 'CPU'}), backend {r['backend']}, batch {r['batch']}"
          f"{', fast mode (bf16 super-resolution, TF32 field)' if r['fast'] else ', fp32'}")
    print(f"  avatar (encoder + MTA, once): {r['avatar_ms']:.1f} ms")
    print(f"  render: {r['ms_per_frame']:.2f} ms/frame = {r['fps']:.3g} FPS")
    what = {"video": "source | driver | result" if r["layout"] == "side" else "result", "depth_video": "depth",
            "depth_npy": "depth, world units, NaN = background", "attention_png": "MTA weights per source",
            "attention_npy": "MTA weights (V, 3, H, W)", "frames_dir": "result frames"}
    for name, value in r["outputs"].items():
        print(f"  wrote {value} ({what[name]})")
    return 0
