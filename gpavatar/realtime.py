"""Real-time rendering: one avatar, a fixed batch of frames, the whole frame replayed from a CUDA graph.

:meth:`GPAvatar.render` checks its inputs' values (host syncs) and launches a few hundred kernels
per frame from Python; at the paper sizes on a GPU the launches, not the arithmetic, set the frame
rate.  :class:`RealtimeRenderer` renders the same frames (evaluation sampling, the stored StyleGAN
noise or none) without either:

* the avatar's tri-planes are built once (:meth:`GPAvatar.build_avatar`) and expanded to the batch;
* on a GPU the first call warms up on a side stream, then captures the five stages of a frame --
  rays and coarse depths, field pass 1, importance depths, field pass 2, compositing -- and the
  super-resolution as one ``torch.cuda.CUDAGraph``; every call copies the new FLAME points and
  cameras into the graph's static inputs and replays it.  No op inside a frame synchronises with
  the host (the ops run with ``validate=False``; the renderer's sampling is deterministic);
* ``dtype=torch.bfloat16`` is the fast mode: the super-resolution StyleUNet runs on a bf16,
  channels-last copy of ``up_renderer`` (cuDNN tensor cores; on a CPU with AMX only from
  :data:`CPU_BF16_SR_MIN_PIXELS` output pixels a call, fp32 below) and the field's matmuls may use TF32
  (with ``$GPAVATAR_FIELD_FUSED=1`` each field pass on a GPU is the fused ``ops.field_query``,
  which then runs its products in tf32; ``model.nerf_mlp.field_precision = "bf16"`` asks for bf16);
  ``field_dtype=torch.bfloat16`` also runs the field passes' layers under bf16 autocast (opt-in: on
  an H100 no faster than the Triton layers in tf32); ``compile`` (or ``$GPAVATAR_REALTIME_COMPILE``)
  runs the super-resolution and/or the field's layers as ``torch.compile``'d functions (inductor
  fuses their element-wise chains; opt-in here: tens of seconds of first compile; on an H100 the fast
  super-resolution 1.8 ms instead of 2.9, the fp32 frame 17.8 ms instead of 18.8; ``gpavatar demo``
  compiles the super-resolution on a CUDA GPU by default);
  ``torch.float32`` keeps TF32 off for matmuls and convolutions (full fp32 arithmetic).

``settings`` ({name: value} of :data:`SETTINGS`: the KNN's list sharing, grid and scan, the Triton
layers / blend / upsampling kernels, bf16 field layers, the fp32 super-resolution's layout, cuDNN
benchmarking) switch a renderer's kernels for its own frames only; on a CUDA device those the
caller and the environment leave out take :data:`CUDA_DEFAULTS` (the values an H100's tuning runs
kept); ``tune=True`` times them on the device at the first call and keeps the faster values whose
image passes a check (:meth:`RealtimeRenderer.tune`).
The fp32 frame on a GPU hands the super-resolution an NCHW image (the fp32 weights' layout).

On the CPU (or with ``cuda_graph=False``) a call runs the same stages eagerly: an fp32 frame is
:meth:`GPAvatar.render`'s frame (the same ops in the same order).

KNN on CUDA: the extension's automatic choice (brute force below 8192 queries per pass, the cell
lists from there) launches without a host sync; ``GPAVATAR_KNN=grid`` would fail the capture (the
grid's build reads its size back to the host).

The tensors a graph call returns are the graph's static outputs: the next call overwrites them
(``clone()`` what must be kept).  Values are not checked (a check needs a host sync): give finite
points and a rotation in ``transform`` (``check_values=True`` checks them per call, with one sync).

    >>> import torch
    >>> from gpavatar.model import GPAvatar
    >>> model = GPAvatar("tiny").eval()
    >>> avatar = model.build_avatar(torch.rand(1, 1, 3, 64, 64))
    >>> rt = model.realtime(avatar, batch=2)
    >>> points = (torch.rand(2, 5023, 3) - 0.5)
    >>> camera = torch.tensor([[1., 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 9]]).expand(2, 3, 4)
    >>> rt(points, camera)["image"].shape
    torch.Size([2, 3, 64, 64])
    >>> sorted(rt.profile(points, camera, repeats=1))
    ['compositing', 'field pass 1', 'field pass 2', 'frame', 'rays', 'super-resolution']
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import statistics
import time
from typing import Any, Callable, Iterator, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from gpavatar.model.gpavatar import Avatar, GPAvatar
from gpavatar.model.renderer import check_transform
from gpavatar.ops import _backend
from gpavatar.ops.knn import cpu_list_cache

__all__ = ["RealtimeRenderer", "STAGES", "REPORTED_STAGES", "MODE_DTYPES", "COMPILE_ENV", "COMPILE_PARTS",
           "compile_parts", "precision", "Setting", "SETTINGS", "SETTING_NAMES", "check_settings", "psnr",
           "TUNE_MARGIN", "GRAPH_TUNE_MARGIN", "tune_keeps", "FP32_TUNE_PSNR", "CPU_BF16_MIN_SAMPLES", "CPU_BF16_SR_MIN_PIXELS", "cpu_native_bf16",
           "CUDA_DEFAULTS", "COMPILED_SETTINGS", "default_settings", "split_tf32_convolutions"]

# The stages of one frame, in order; "importance" (coarse composite + importance depths) is
# reported under "rays" (ray generation and both samplings) by :meth:`RealtimeRenderer.profile`.
STAGES = ("rays", "field pass 1", "importance", "field pass 2", "compositing", "super-resolution")
REPORTED_STAGES = ("rays", "field pass 1", "field pass 2", "compositing", "super-resolution")
MODE_DTYPES = {"fp32": torch.float32, "fast": torch.bfloat16}
OUTPUT_KEYS = ("image", "coarse", "fine", "depth", "depth_expected", "opacity", "coarse_alphas")
COMPILE_ENV = "GPAVATAR_REALTIME_COMPILE"
COMPILE_PARTS = ("sr", "layers")  # the super-resolution network, the field's layers (ops.field_layers)


@dataclasses.dataclass(frozen=True)
class Setting:
    """A switch of a frame's kernels that a :class:`RealtimeRenderer` applies to its own frames only
    (set around each eager call, and during the warm-up and the capture of its CUDA graph, whose
    replays keep the kernels it captured).  Its default (None) leaves the process as it is: for an
    ``env`` setting the variable's current value, else the behaviour documented below.  ``choices``:
    {mode: the other values}, the ones :meth:`RealtimeRenderer.tune` tries in that mode ("fp32" /
    "fast"; a mode without an entry has no such setting).  ``off``: the value that asks for the
    built-in default explicitly, whatever the environment says (not tried by a tuning run, whose
    base is the process as it is)."""

    name: str
    choices: dict
    env: Optional[str] = None  # the environment variable the C++ / Triton code reads at each call
    off: Any = None
    devices: tuple = ("cuda",)  # the device types it is tuned on (a setting given explicitly applies anywhere)
    triton: bool = False  # tuned only where Triton runs on the device
    help: str = ""

    @property
    def modes(self) -> tuple:
        return tuple(self.choices)


def _both(*values) -> dict:
    return {"fp32": values, "fast": values}


# In the order a tuning run tries them (the KNN first: the field passes are most of a frame).
SETTINGS = (
    Setting("knn_share", _both("1"), env="GPAVATAR_KNN_SHARE", off="0",
            help="one KNN index (cell lists) per frame for both field passes (same neighbours)"),
    Setting("knn_cells", _both("12", "20", "24"), env="GPAVATAR_KNN_CELLS", off="16",
            help="the CUDA KNN grid's cells per axis (default 16; same neighbours)"),
    Setting("knn_search", _both("grouped", "unrolled", "buffered"), env="GPAVATAR_KNN_CUDA_SEARCH", off="banded",
            help="the CUDA KNN's list scan (default banded; grouped: four entries' distances compared with the K-th "
                 "before any is offered; same neighbours)"),
    Setting("knn_order", _both("centre"), env="GPAVATAR_KNN_CUDA_ORDER", off="box",
            help="the CUDA KNN lists' bands: by distance from the cell's centre (default box: by distance to "
                 "the cell's box; same neighbours)"),
    Setting("knn_build", _both("one_pass", "flat"), env="GPAVATAR_KNN_CUDA_BUILD", off="two_level",
            help="the CUDA KNN's list build (default two_level: each cell's list from its parent cell's, a count "
                 "launch and a fill launch): one_pass (the same in one launch, room reserved with an atomic) or "
                 "flat (one warp per cell over all points); the same lists"),
    Setting("knn_compact", _both("match"), env="GPAVATAR_KNN_CUDA_COMPACT", off="ballot",
            help="how the CUDA KNN's list build places entries in their bands (default ballot: a ballot per band "
                 "a step; match: one match instruction a step and shared counters; the same lists)"),
    Setting("blend_forward", {"fast": ("tiles_tf32",)}, env="GPAVATAR_BLEND_FORWARD", off="auto",
            help="the PEF blend's CUDA forward with its hidden layer's direction products on the tensor cores "
                 "(tiles_tf32: TF32 mma in the tiled kernel; default auto: the fp32 tiles)"),
    Setting("blend_tensor_cores", {"fp32": ("tf32x3",), "fast": ("1",)}, env="GPAVATAR_BLEND_TENSOR_CORES",
            off="0", triton=True, help="the PEF blend's forward as one tensor-core product (fast: tf32, bf16 with "
            "field_bf16; fp32: tf32x3, about fp32's accuracy)"),
    Setting("field_layers", {"fp32": ("triton", "triton-tf32x3"), "fast": ("triton",)}, env="GPAVATAR_FIELD_LAYERS",
            off="torch", triton=True, help="each field pass's decoder layers as one Triton kernel (fast: tf32; "
            "fp32: ieee, or tf32x3 on the tensor cores)"),
    Setting("field_bf16", {"fast": (True,)}, off=False, devices=("cuda", "cpu"),
            help="the field passes' layers under bf16 autocast (the KNN, blend and tri-plane stay fp32; tuned on "
                 "the CPU too, where the fast mode's default is on with native bf16 products and large passes: "
                 "CPU_BF16_MIN_SAMPLES)"),
    Setting("upsample", {"fast": ("triton",)}, env="GPAVATAR_UPSAMPLE", off="torch", triton=True,
            help="the super-resolution's 2x upsampling as the Triton kernel (channels-last)"),
    Setting("sr_layout", {"fp32": ("channels_last", "as_composited")}, off="default",
            help="fp32 super-resolution on a channels-last copy, or on the composited image as it is (channels-"
                 "last strides, NCHW weights: model.render's frame); default on a GPU: NCHW (the fp32 weights' "
                 "layout), on the CPU: as composited"),
    Setting("sr_precision", {"fp32": ("tf32x3",)}, off="fp32",
            help="the fp32 super-resolution's convolutions as three TF32 convolutions of split operands "
                 "(split_tf32_convolutions: about fp32's accuracy on the tensor cores; its 137 GFLOP in fp32 "
                 "took 10.3 ms of the H100's fp32 frame, 5x the fp32 units' bound)"),
    Setting("cudnn_benchmark", _both(True), off=False,
            help="cuDNN times its convolution algorithms for the super-resolution's shapes (in the warm-up)"),
)
SETTING_NAMES = tuple(s.name for s in SETTINGS)
# What a renderer on a CUDA device runs when neither its ``settings`` nor the process's environment
# name a setting: the values its tuning runs kept on an H100 (benchmarks/results/
# bench_e2e_h100_realtime.md, paper preset, each trial its own CUDA graph).  The fast frame went
# 10.3 -> 8.3 ms with the four (knn_share 9.9 ms, + knn_order 9.6, + field_layers 8.6, + upsample
# 8.3; at B = 8 66.6 -> 54.5 ms); the fp32 frame 18.9 -> 18.5 / 18.7 ms with either KNN switch (the
# Triton layers are slower in fp32: ieee products).  Every one gives the same neighbours or an image
# within the mode's check; ``settings={name: its off value}`` turns one off.  The Triton ones apply
# where Triton runs on a GPU with TF32 (default_settings).
CUDA_DEFAULTS = {"fp32": {"knn_share": "1", "knn_order": "centre"},
                 "fast": {"knn_share": "1", "knn_order": "centre", "field_layers": "triton", "upsample": "triton"}}
# The settings a compiled part makes moot (a compiled function keeps the kernels it traced).
COMPILED_SETTINGS = {"sr": ("sr_layout", "upsample", "sr_precision"), "layers": ("field_layers",)}
# A tried value is kept when its frame is faster than the best so far by at least the margin and
# their timings do not overlap (the trial's 80th percentile below the best's 20th).  Eager frames
# (host clocks, 3 of them a trial) take TUNE_MARGIN; CUDA-graph replays, whose p20-p80 spread was
# ~0.2 % of the frame on an H100, GRAPH_TUNE_MARGIN: with 2 % that run left four values 0.5-1.9 %
# faster untaken (bench_e2e_h100_realtime.md: knn_cells=20 / 24, knn_build=one_pass).
TUNE_MARGIN = 0.02
GRAPH_TUNE_MARGIN = 0.005
# The fast mode's field layers on the CPU when ``field_bf16`` is not given: under bf16 autocast where
# the CPU multiplies bf16 natively (AMX) and a field pass has at least this many samples (B x rays x
# samples per ray).  A paper-preset frame (2^19 samples a pass) took 0.96 s instead of 1.15 s on 2
# Xeon cores with AMX; a tiny one (2048) 13.0 ms instead of 12.2 ms (alternating runs).
CPU_BF16_MIN_SAMPLES = 1 << 16
# The fast mode's super-resolution on a CPU with native bf16 products: bf16 channels-last from this
# many output pixels a call (B x S^2), fp32 on the composited image below.  On 2 Xeon cores with AMX
# the tiny preset's network (1 x 64^2) took 5.6 ms in bf16 against 4.7 ms in fp32, at B = 4 the two
# were level, and the paper preset's (512^2) 188 ms against 510 ms.  CPUs without AMX keep bf16.
CPU_BF16_SR_MIN_PIXELS = 1 << 14
FP32_TUNE_PSNR = 60.0  # the fp32 mode's floor (dB against its untuned frame): rounding-level changes only


def check_settings(settings: Optional[dict], mode: str) -> dict:
    """``settings`` ({name: value} of :data:`SETTINGS`) checked for ``mode`` ("fp32" / "fast"), with
    the defaults (None) dropped; a ValueError names an unknown setting, a value outside its choices or
    a setting of the other mode."""
    if settings is None:
        return {}
    if not isinstance(settings, dict):
        raise TypeError(f"settings must be a dict {{name: value}}, got {type(settings).__name__}")
    by_name = {s.name: s for s in SETTINGS}
    checked = {}
    for name, value in settings.items():
        if name not in by_name:
            raise ValueError(f"unknown setting {name!r}; settings: {', '.join(SETTING_NAMES)}")
        s = by_name[name]
        if value is None:
            continue
        if s.env is not None and isinstance(value, bool) and s.off == "0":
            value = "1" if value else "0"  # an on/off switch
        elif s.env is not None and isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        if mode not in s.choices:
            raise ValueError(f"setting {name!r} applies to the {' and '.join(s.modes)} mode only, "
                             f"not to {mode}")
        allowed = (s.off,) + tuple(s.choices[mode])
        if value not in allowed or isinstance(value, bool) != isinstance(s.off, bool):
            raise ValueError(f"setting {name!r} must be None or one of {list(allowed)} in the {mode} mode, "
                             f"got {value!r}")
        checked[name] = value
    return checked


def _tf32_capable(device: torch.device) -> bool:
    """Whether ``device`` (CUDA) multiplies TF32 on its tensor cores (compute capability 8.0 or more:
    the Triton layers' products in the fast mode)."""
    try:
        return torch.cuda.get_device_capability(device) >= (8, 0)
    except Exception:  # no such device
        return False


def default_settings(device: Any, mode: str, compiled: frozenset = frozenset()) -> dict:
    """The :data:`CUDA_DEFAULTS` of ``mode`` that apply on ``device`` ({} off CUDA): without the
    settings of a compiled part, those whose environment variable the process sets (its choice) and
    the Triton ones where Triton is missing or the GPU predates TF32 (compute capability < 8.0)."""
    device = torch.device(device)
    if device.type != "cuda":
        return {}
    by_name = {s.name: s for s in SETTINGS}
    moot = {name for part in compiled for name in COMPILED_SETTINGS[part]}
    triton_here = _backend.triton_available() and _tf32_capable(device)
    chosen = {}
    for name, value in CUDA_DEFAULTS[mode].items():
        s = by_name.get(name)
        if s is None or name in moot or (s.env is not None and os.environ.get(s.env, "") != "") \
                or (s.triton and not triton_here):
            continue
        chosen[name] = value
    return chosen


def tune_keeps(trial: dict, best: dict, margin: float) -> bool:
    """Whether a tuning trial beats the best so far: its median ``ms`` below ``best``'s by at least
    ``margin`` (a fraction) and its ``p80_ms`` below ``best``'s ``p20_ms`` (rows without percentiles:
    their median)."""
    def q(row: dict, key: str) -> float:
        value = row.get(key)
        return row["ms"] if value is None else value
    return trial["ms"] < best["ms"] * (1.0 - margin) and q(trial, "p80_ms") < q(best, "p20_ms")


def _summary(times: list) -> tuple[float, float, float]:
    """(median, 20th, 80th percentile) of ``times``."""
    if len(times) < 2:
        return (times[0],) * 3
    q = statistics.quantiles(times, n=5, method="inclusive")
    return statistics.median(times), q[0], q[3]


def cpu_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices natively (AMX tiles; torch's private probe, False
    where the torch build has none)."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    try:
        return bool(probe()) if probe is not None else False
    except Exception:  # a probe that fails on this build or CPU: no
        return False


def psnr(image: torch.Tensor, ref: torch.Tensor) -> float:
    """PSNR (dB) of two (B, C, H, W) images in [0, 1] (clamped, range 1, float64): inf when equal, NaN
    when either has a NaN (:func:`gpavatar.eval.metrics.psnr`)."""
    from gpavatar.eval.metrics import psnr as metric

    return float(metric(image.detach().double().clamp(0, 1), ref.detach().double().clamp(0, 1), data_range=1.0))


def compile_parts(value: Any = None) -> frozenset:
    """The parts :class:`RealtimeRenderer` compiles: ``value`` (None: ``$GPAVATAR_REALTIME_COMPILE``)
    is "" / "0" / "none" / False (none), "1" / "all" / True (both) or a comma list of :data:`COMPILE_PARTS`
    (also a list or tuple of them); a ValueError names anything else."""
    if value is None:
        value = os.environ.get(COMPILE_ENV, "")
    given = value
    if isinstance(value, bool):
        return frozenset(COMPILE_PARTS) if value else frozenset()
    if isinstance(value, str):
        value = value.strip()
        if value in ("", "0", "none"):
            return frozenset()
        if value in ("1", "all"):
            return frozenset(COMPILE_PARTS)
        value = [part.strip() for part in value.split(",")]
    parts = frozenset(value) if isinstance(value, (list, tuple, set, frozenset)) else None
    if parts is None or not parts <= set(COMPILE_PARTS):
        raise ValueError(f"compile (or ${COMPILE_ENV}) must be 0, none, 1, all or a comma list of "
                         f"{', '.join(COMPILE_PARTS)}, got {given!r}")
    return parts


@contextlib.contextmanager
def precision(fast: bool) -> Iterator[None]:
    """TF32 for matmuls and cuDNN convolutions on (``fast``) or off (fp32), restored on exit."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = bool(fast)
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _tf32_split(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) with hi = t truncated to TF32's 10 mantissa bits and lo = t - hi (exact in fp32)."""
    hi = (t.view(torch.int32) & -8192).view(torch.float32)  # -8192 = 0xFFFFE000: sign, exponent, 10 bits
    return hi, t - hi


class _SplitTF32Convolutions(TorchDispatchMode):
    """The dispatch mode of :func:`split_tf32_convolutions`."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not torch.ops.aten.convolution.default or not (args[0].dtype == args[1].dtype == torch.float32):
            return func(*args, **kwargs)
        (x, w, bias), rest = args[:3], args[3:]
        x_hi, x_lo = _tf32_split(x)
        w_hi, w_lo = _tf32_split(w)
        saved = torch.backends.cudnn.allow_tf32
        torch.backends.cudnn.allow_tf32 = True
        try:  # the two small products first, then the large one and the bias
            small = func(x_lo, w_hi, None, *rest, **kwargs)
            small.add_(func(x_hi, w_lo, None, *rest, **kwargs))
            return small.add_(func(x_hi, w_hi, bias, *rest, **kwargs))
        finally:
            torch.backends.cudnn.allow_tf32 = saved


@contextlib.contextmanager
def split_tf32_convolutions() -> Iterator[None]:
    """Inside the block every float32 convolution (``aten.convolution``: ``nn.Conv2d``, ``F.conv2d``)
    runs as three convolutions with TF32 on, of ``x = x_hi + x_lo`` and ``w = w_hi + w_lo`` split at
    TF32's precision: ``conv(x_lo, w_hi) + conv(x_hi, w_lo) + conv(x_hi, w_hi)`` (the ``lo * lo`` term,
    about 2^-22 of the product, is left out): about fp32's accuracy on the tensor cores ("3xTF32"),
    for three times the tensor-core work and the splits' element-wise passes.  On a CPU (no TF32)
    the three convolutions are fp32.  A non-finite input gives NaN where fp32 gives inf (inf - inf
    in the split)."""
    with _SplitTF32Convolutions():
        yield


def _frame_noise(model: GPAvatar) -> str:
    mode = model.noise_mode()
    if mode == "fresh":
        raise ValueError("real-time rendering is deterministic: it uses the stored StyleGAN noise or none, but the "
                         f"model draws fresh noise (noise={model.config.noise!r}, training={model.training}); call "
                         "model.eval() and/or model.set_noise('stored' or 'off')")
    return mode


def _channels_last_copy(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """A ``dtype`` copy of ``module`` on ``device`` with its 4-D weights (convolutions) channels-last;
    the 5-D modulated-conv weights keep their layout (their per-style weights are made per call)."""
    copied = copy.deepcopy(module).to(device=device, dtype=dtype).eval().requires_grad_(False)
    for param in copied.parameters():
        if param.dim() == 4:
            param.data = param.data.contiguous(memory_format=torch.channels_last)
    return copied


@contextlib.contextmanager
def _applied(settings: dict) -> Iterator[None]:
    """The environment variables and torch flags of ``settings`` (checked) inside the block, restored
    on exit; settings left at None leave the process as it is."""
    env = {s.env: settings[s.name] for s in SETTINGS if s.env is not None and s.name in settings}
    saved_benchmark = torch.backends.cudnn.benchmark
    try:
        with _backend.environ(**env):
            if "cudnn_benchmark" in settings:
                torch.backends.cudnn.benchmark = bool(settings["cudnn_benchmark"])
            yield
    finally:
        torch.backends.cudnn.benchmark = saved_benchmark


class RealtimeRenderer:
    """Frames of one avatar at a fixed batch size (see the module docstring).

    Args:
        model: a :class:`GPAvatar` (its weights are used as they are at each call; the fast mode's
            super-resolution is a bf16 copy made here, except on a CPU with native bf16 products for
            frames under :data:`CPU_BF16_SR_MIN_PIXELS` output pixels a call: fp32 is faster there)
        avatar: from ``model.build_avatar``, batch 1 (broadcast) or ``batch``
        batch: frames per call B
        dtype: ``torch.float32`` (TF32 off) or ``torch.bfloat16`` (fast mode)
        cuda_graph: capture a CUDA graph (default: when the avatar is on a GPU)
        warmup: eager frames on a side stream before the capture (kernel compilation, autotuning)
        check_values: check every call's points and transform values (one host sync per call)
        field_dtype: ``torch.bfloat16`` runs both field passes' layers under bf16 autocast (fast
            mode only; the KNN, PEF blend and tri-plane ops stay fp32, alpha and value are fp32):
            the setting ``field_bf16``; ``torch.float32``: fp32 layers (TF32 products in fast mode on
            a GPU); None: fp32 layers, except in the fast mode on a CPU with native bf16 products
            (AMX) at passes of :data:`CPU_BF16_MIN_SAMPLES` samples or more
        compile: parts run as ``torch.compile``'d functions (:func:`compile_parts`: "sr", "layers",
            both, none; None: ``$GPAVATAR_REALTIME_COMPILE``).  Compiled in the first frames (the
            warm-up before a capture; tens of seconds), with static shapes; the same function up to
            float rounding.  Opt-in (``bench_e2e.py`` rows ``+compile``; see the module docstring)
        settings: {name: value} of :data:`SETTINGS`, the kernel switches of this renderer's frames
            (:attr:`settings`); on a CUDA device the ones left out whose environment variable is not
            set take :data:`CUDA_DEFAULTS` (:attr:`defaults`), elsewhere the process's environment applies
        tune: on the first call, time the :data:`SETTINGS` this device can run, one value at a time on
            top of the best so far (each a captured graph on a GPU, eager frames elsewhere), and keep
            a value when its frame is faster (by 0.5 % with CUDA graphs, 2 % eager: ``tune_keeps``)
            and its image passes the check: the fp32
            mode's PSNR against the untuned frame >= 60 dB (rounding only), the fast mode's against
            the fp32 frame >= ``tune_psnr``.  Settings given in ``settings`` are not tuned; the trials
            start from the device defaults and try turning each off.  The trials are in :attr:`tuning`,
            the values kept in :attr:`settings`.  Seconds of warm-up (Triton kernels compile on their
            first use); on an H100 the paper preset's fast frame 8.35 ms tuned against 10.4 untuned
            before the defaults.
        tune_psnr: the fast mode's PSNR floor in dB (images in [0, 1]; the issue's target is 35)
        tune_repeats: timed frames per trial (default 20 with a CUDA graph, 3 eager)

    Call: ``points`` (B, P, 3) FLAME vertices x flame_scale, ``transform`` (B, 3, 4) world-to-camera
    [R|T], any float dtype and device (copied to float32 on the avatar's device) -> dict like
    :meth:`GPAvatar.render`: ``image`` (B, 3, S, S) float32, ``coarse`` / ``fine``
    (B, Cv, r, r), ``depth``, ``depth_expected``, ``opacity`` (B, 1, r, r), ``coarse_alphas``.
    """

    def __init__(self, model: GPAvatar, avatar: Avatar, *, batch: int = 1, dtype: torch.dtype = torch.float32,
                 cuda_graph: Optional[bool] = None, warmup: int = 3, check_values: bool = False,
                 field_dtype: Optional[torch.dtype] = None, compile: Any = None, settings: Optional[dict] = None,
                 tune: bool = False, tune_psnr: float = 40.0, tune_repeats: Optional[int] = None):
        if not isinstance(model, GPAvatar):
            raise TypeError(f"model must be a GPAvatar, got {type(model).__name__}")
        if not isinstance(avatar, Avatar):
            raise TypeError(f"avatar must come from build_avatar, got {type(avatar).__name__}")
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ValueError(f"batch must be an int >= 1, got {batch!r}")
        if avatar.batch_size not in (1, batch):
            raise ValueError(f"avatar batch {avatar.batch_size} must be 1 or batch = {batch}")
        if dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"dtype must be torch.float32 or torch.bfloat16 (fast mode), got {dtype}")
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 1:
            raise ValueError(f"warmup must be an int >= 1, got {warmup!r}")
        if field_dtype not in (None, torch.float32, torch.bfloat16):
            raise ValueError(f"field_dtype must be None, torch.float32 or torch.bfloat16, got {field_dtype}")
        if field_dtype == torch.bfloat16 and dtype != torch.bfloat16:
            raise ValueError("field_dtype=torch.bfloat16 needs the fast mode (dtype=torch.bfloat16); "
                             "dtype=torch.float32 keeps the whole frame in fp32")
        if not isinstance(tune, bool):
            raise TypeError(f"tune must be a bool, got {type(tune).__name__}")
        if isinstance(tune_psnr, bool) or not isinstance(tune_psnr, (int, float)) or not tune_psnr > 0:
            raise ValueError(f"tune_psnr must be a number of dB > 0, got {tune_psnr!r}")
        if tune_repeats is not None and (isinstance(tune_repeats, bool) or not isinstance(tune_repeats, int)
                                         or tune_repeats < 1):
            raise ValueError(f"tune_repeats must be None or an int >= 1, got {tune_repeats!r}")
        self.model, self.batch, self.dtype = model, batch, dtype
        self.fast = dtype == torch.bfloat16
        self.mode = "fast" if self.fast else "fp32"
        given = check_settings(settings, self.mode)
        if field_dtype is not None and self.fast:
            given["field_bf16"] = field_dtype == torch.bfloat16
        self.noise = _frame_noise(model)
        self.device = avatar.planes.device
        config = model.config
        native = self.fast and self.device.type == "cpu" and cpu_native_bf16()  # (the fast mode on an AMX CPU)
        # (field_bf16 not given: see CPU_BF16_MIN_SAMPLES)
        self._default_field_bf16 = native and (batch * config.render_size ** 2 * max(config.n_coarse, config.n_fine)
                                               >= CPU_BF16_MIN_SAMPLES)
        # (the fast mode's super-resolution: see CPU_BF16_SR_MIN_PIXELS)
        self._bf16_sr = self.fast and not (native and batch * model.up_renderer.out_size ** 2 < CPU_BF16_SR_MIN_PIXELS)
        self.cuda_graph = self.device.type == "cuda" if cuda_graph is None else bool(cuda_graph)
        if self.cuda_graph and self.device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs the avatar on a CUDA device, it is on {self.device}")
        self.warmup, self.check_values = warmup, bool(check_values)
        self.tune_on, self.tune_psnr = tune, float(tune_psnr)
        self.tune_repeats = tune_repeats or (20 if self.cuda_graph else 3)
        self.tuning: list[dict] = []  # the trials of tune(), in order
        self.tune_seconds: Optional[float] = None  # how long the last tuning run took (wall clock)
        planes = avatar.planes.detach()
        if planes.shape[0] != batch:
            planes = planes.expand(batch, *planes.shape[1:]).contiguous()
        self.avatar = Avatar(planes, None, avatar.num_sources)
        self.compiled = compile_parts(compile)
        # the device's defaults for what ``settings`` leaves out (CUDA_DEFAULTS); a tuning run starts there
        self.defaults = {k: v for k, v in default_settings(self.device, self.mode, self.compiled).items()
                         if k not in given}
        self.settings = {**self.defaults, **given}
        self._sr_modules: dict[str, Callable] = {}
        self._layers = None
        if "layers" in self.compiled:
            from gpavatar.ops.field_query import field_layers

            self._layers = torch.compile(field_layers, dynamic=False)
        self._super_resolution(self._sr_layout())  # the fast mode's bf16 copy is made now
        self._fixed = given  # the settings a tuning run leaves as given
        self._graph: Optional[torch.cuda.CUDAGraph] = None
        self._static: dict[str, torch.Tensor] = {}
        self._outputs: dict[str, torch.Tensor] = {}

    @property
    def field_bf16(self) -> bool:
        """Whether the field passes' layers run under bf16 autocast: the ``field_bf16`` setting, else
        the fast mode on a CPU with native bf16 products at passes of CPU_BF16_MIN_SAMPLES or more."""
        if "field_bf16" in self.settings:
            return bool(self.settings["field_bf16"])
        return self._default_field_bf16

    def _sr_layout(self) -> str:
        """The super-resolution's activation layout: "bf16_channels_last" (fast mode; on a CPU with
        native bf16 products only from CPU_BF16_SR_MIN_PIXELS output pixels a call, fp32 "as_composited"
        below), "channels_last" (the fp32 setting), "nchw" (fp32 on a GPU: the fp32 weights' layout --
        with the composited image's channels-last strides cuDNN converted activations and weights ~190
        times a frame) or "as_composited" (fp32 on the CPU: model.render's frame; oneDNN runs it faster
        than NCHW)."""
        if self.fast:
            return "bf16_channels_last" if self._bf16_sr else "as_composited"
        if self.settings.get("sr_layout", "default") != "default":
            return self.settings["sr_layout"]
        return "nchw" if self.device.type == "cuda" else "as_composited"

    def _super_resolution(self, layout: str) -> Callable:
        """The network of ``layout`` (a channels-last copy for the two channels-last layouts, made once),
        compiled when ``compile`` asks for "sr"."""
        if layout not in self._sr_modules:
            if layout == "bf16_channels_last":
                module = _channels_last_copy(self.model.up_renderer, self.device, torch.bfloat16)
            elif layout == "channels_last":
                module = _channels_last_copy(self.model.up_renderer, self.device, torch.float32)
            else:
                module = self.model.up_renderer
            self._sr_modules[layout] = torch.compile(module, dynamic=False) if "sr" in self.compiled else module
        return self._sr_modules[layout]

    @property
    def super_resolution(self) -> Callable:
        """The super-resolution network the frames run with the current settings."""
        return self._super_resolution(self._sr_layout())

    # -- the stages of a frame ------------------------------------------------------------------
    def _stages(self) -> list[tuple[str, Callable[[dict], None]]]:
        """(name, fn) per stage of :data:`STAGES`; each fn reads and extends a state dict that starts
        as {"points", "transform"} and ends with the outputs."""
        model, renderer = self.model, self.model.renderer

        def rays(s):
            s["field"] = model.field(self.avatar, s["points"], validate=False)
            s["rays"], s["coarse_t"] = renderer.coarse_samples(s["transform"], validate=False)

        def field_autocast():
            # no weight-cast cache: a cache filled during a CUDA graph capture would outlive it
            return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.field_bf16,
                                  cache_enabled=False)

        def field_coarse(s):
            with field_autocast():
                s["alpha_c"], s["value_c"], _ = renderer.query(s["field"], s["rays"], s["coarse_t"], "coarse")

        def importance(s):
            coarse, s["fine_t"] = renderer.fine_samples(s["coarse_t"], s["alpha_c"], s["value_c"])
            s["coarse_color"] = coarse.color

        def field_fine(s):
            with field_autocast():
                s["alpha_f"], s["value_f"], _ = renderer.query(s["field"], s["rays"], s["fine_t"], "fine")

        def compositing(s):
            s["out"] = renderer.composite_samples(s["coarse_t"], s["alpha_c"], s["value_c"], s["fine_t"], s["alpha_f"],
                                                  s["value_f"], s["coarse_color"], s["rays"].batch)

        def super_resolution(s):
            fine, layout = s["out"]["fine"], self._sr_layout()
            if layout == "bf16_channels_last":
                fine = fine.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
            elif layout == "channels_last":
                fine = fine.contiguous(memory_format=torch.channels_last)
            else:
                fine = fine.to(model.query_style_tplane.dtype)
                if layout == "nchw":
                    fine = fine.contiguous()
            split = self.settings.get("sr_precision", "fp32") == "tf32x3" and "sr" not in self.compiled
            with split_tf32_convolutions() if split else contextlib.nullcontext():
                s["image"] = self._super_resolution(layout)(fine, noise=self.noise).float()

        return list(zip(STAGES, (rays, field_coarse, importance, field_fine, compositing, super_resolution)))

    def _run(self, points: torch.Tensor, transform: torch.Tensor,
             stages: Optional[list] = None) -> dict[str, torch.Tensor]:
        state: dict[str, Any] = {"points": points, "transform": transform}
        # the two passes' CPU KNN on the same points: one list build
        with cpu_list_cache() if self.device.type == "cpu" else contextlib.nullcontext():
            for _, fn in stages or self._stages():
                fn(state)
        return {"image": state["image"], **{k: state["out"][k] for k in OUTPUT_KEYS[1:]}}

    @contextlib.contextmanager
    def _context(self) -> Iterator[None]:
        decoder = self.model.nerf_mlp
        saved = decoder.layers_function
        if self._layers is not None:  # only during this renderer's frames: model.render is untouched
            decoder.layers_function = self._layers
        try:
            with torch.no_grad(), precision(self.fast), _applied(self.settings):
                yield
        finally:
            decoder.layers_function = saved

    # -- inputs ------------------------------------------------------------------------------------
    def _inputs(self, points, transform) -> tuple[torch.Tensor, torch.Tensor]:
        B, P = self.batch, self.model.config.num_points
        check_transform(transform, values=False)
        if tuple(transform.shape) != (B, 3, 4):
            raise ValueError(f"transform must have shape ({B}, 3, 4) (the renderer's batch), got "
                             f"{tuple(transform.shape)}")
        if not isinstance(points, torch.Tensor) or tuple(points.shape) != (B, P, 3) or not points.is_floating_point():
            raise ValueError(f"points must be a float tensor of shape ({B}, {P}, 3) (FLAME vertices x5), got "
                             f"{tuple(getattr(points, 'shape', ()))} {getattr(points, 'dtype', type(points).__name__)}")
        points = points.detach().to(self.device, torch.float32)
        transform = transform.detach().to(self.device, torch.float32)
        if self.check_values:
            self.model._check_frame_values(points, transform)
        return points, transform

    # -- frames ------------------------------------------------------------------------------------
    def __call__(self, points: torch.Tensor, transform: torch.Tensor) -> dict[str, torch.Tensor]:
        points, transform = self._inputs(points, transform)
        if self.tune_on and not self.tuning:
            self._tune(points, transform)  # on a GPU: leaves the chosen settings' graph captured
        if not self.cuda_graph:
            with self._context():
                return self._run(points.contiguous(), transform.contiguous())
        if self._graph is None:
            self._capture(points, transform)
        else:
            self._static["points"].copy_(points)
            self._static["transform"].copy_(transform)
        self._graph.replay()
        return dict(self._outputs)

    def capture(self, points: torch.Tensor, transform: torch.Tensor) -> None:
        """Warm up with these inputs on a side stream, then capture the frame as a CUDA graph (the
        first call does it; call it to keep the capture out of a timing); with ``tune``, the tuning
        first.  GPU only."""
        if not self.cuda_graph:
            raise RuntimeError("capture needs cuda_graph=True (a CUDA avatar)")
        points, transform = self._inputs(points, transform)
        if self.tune_on and not self.tuning:
            self._tune(points, transform)
        else:
            self._capture(points, transform)

    def _capture(self, points: torch.Tensor, transform: torch.Tensor) -> None:
        self._static = {"points": points.clone(), "transform": transform.clone()}
        self._graph = None
        self._graph, self._outputs = self._capture_graph(self._stages())

    # -- tuning ------------------------------------------------------------------------------------
    def tune(self, points: torch.Tensor, transform: torch.Tensor) -> list[dict]:
        """Tune the :data:`SETTINGS` on these inputs now (see the class's ``tune``; the first call of a
        renderer made with ``tune=True`` does it) and return :attr:`tuning`: one row per trial with
        ``settings`` (the values set), ``ms`` (median frame) with ``p20_ms`` / ``p80_ms``, ``psnr``
        (dB against the reference image), ``status`` (base, kept, slower, within margin, rejected: ...,
        failed: ...) and ``chosen``."""
        points, transform = self._inputs(points, transform)
        self._tune(points, transform)
        return self.tuning

    def tunable(self) -> list[Setting]:
        """The settings a tuning run tries here: of this mode, for this device (Triton ones where
        Triton runs on it), not given in ``settings``, and not the parts ``compile`` compiles (a
        compiled function keeps what it traced: the layers kernel switch; another super-resolution
        layout would compile another network)."""
        skip = set(self._fixed) | {name for part in self.compiled for name in COMPILED_SETTINGS[part]}
        triton_here = _backend.triton_available() and self.device.type == "cuda"
        return [s for s in SETTINGS if self.mode in s.modes and self.device.type in s.devices
                and s.name not in skip and (triton_here or not s.triton)]

    def trial_values(self, setting: Setting) -> tuple:
        """The values a tuning run tries for ``setting``: its choices in this mode, and for a setting at
        its device default (:attr:`defaults`) the other choices and its off value."""
        values = tuple(setting.choices[self.mode])
        if setting.name in self.defaults:
            values = tuple(v for v in values if v != self.defaults[setting.name]) + (setting.off,)
        return values

    def _tune(self, points: torch.Tensor, transform: torch.Tensor) -> None:
        """Trials from the settings given at construction (a second run starts there again)."""
        if self.cuda_graph:
            self._static = {"points": points.clone(), "transform": transform.clone()}
            self._graph, self._outputs = None, {}
        started = time.perf_counter()
        reference = None
        if self.fast:  # the fp32 frame of the same inputs (TF32 off): the fast mode's PSNR reference
            with torch.no_grad(), precision(False):
                reference = self.model.render(self.avatar, points, transform)["image"].float()
        rows: list[dict] = []
        best_row, best = self._trial({**self.defaults, **self._fixed}, points, transform, required=True)
        best_row["status"] = "base"
        if reference is None:
            reference = best[2].clone()
        best_row["psnr"] = psnr(best[2], reference)
        rows.append(best_row)
        floor = self.tune_psnr if self.fast else FP32_TUNE_PSNR
        margin = GRAPH_TUNE_MARGIN if self.cuda_graph else TUNE_MARGIN
        for setting in self.tunable():
            for value in self.trial_values(setting):
                row, result = self._trial({**best_row["settings"], setting.name: value}, points, transform)
                rows.append(row)
                if result is None:
                    continue
                row["psnr"] = psnr(result[2], reference)
                if not row["psnr"] >= floor:
                    row["status"] = f"rejected: PSNR {row['psnr']:.1f} dB < {floor:g}"
                elif tune_keeps(row, best_row, margin):
                    row["status"] = "kept"
                    best_row, best = row, result
                else:
                    row["status"] = "slower" if row["ms"] >= best_row["ms"] else "within margin"
                result = None  # a graph not kept goes (its memory pool with it)
        best_row["chosen"] = True
        for row in rows:
            row.setdefault("chosen", False)
        self.settings = dict(best_row["settings"])
        self.tuning = rows
        self.tune_seconds = time.perf_counter() - started
        if self.cuda_graph:
            self._graph, self._outputs = best[0], best[1]

    def _trial(self, settings: dict, points: torch.Tensor, transform: torch.Tensor, required: bool = False):
        """One tuning trial: (row, (graph, outputs, image)) or (row, None) when it failed (``required``:
        the exception propagates)."""
        self.settings = settings
        row: dict[str, Any] = {"settings": dict(settings),
                               "ms": None, "p20_ms": None, "p80_ms": None, "psnr": None, "status": None}
        try:
            if self.cuda_graph:
                graph, outputs = self._capture_graph(self._stages())
                row["ms"], row["p20_ms"], row["p80_ms"] = _summary(self._time_replays(graph))
                image = outputs["image"].detach().float().clone()
            else:
                graph, times = None, []
                with self._context():
                    outputs = self._run(points.contiguous(), transform.contiguous())  # the first use compiles
                    for _ in range(self.tune_repeats):
                        start = self._clock()
                        outputs = self._run(points.contiguous(), transform.contiguous())
                        times.append(1e3 * (self._clock() - start))
                row["ms"], row["p20_ms"], row["p80_ms"] = _summary(times)
                image = outputs["image"].detach().float().clone()
        except Exception as exc:
            if required:
                raise
            row["status"] = f"failed: {type(exc).__name__}: {exc}"[:300]
            return row, None
        return row, (graph, outputs, image)

    def _clock(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _time_replays(self, graph: torch.cuda.CUDAGraph) -> list[float]:
        """The ms of each of ``tune_repeats`` replays of ``graph`` between CUDA events (after 3 untimed)."""
        with torch.cuda.device(self.device):
            for _ in range(3):
                graph.replay()
            events = [torch.cuda.Event(enable_timing=True) for _ in range(self.tune_repeats + 1)]
            events[0].record()
            for event in events[1:]:
                graph.replay()
                event.record()
            torch.cuda.synchronize(self.device)
            return [a.elapsed_time(b) for a, b in zip(events, events[1:])]

    def _capture_graph(self, stages, state: Optional[dict] = None):
        """Warm-up + capture of ``stages`` on the static inputs (or ``state``: a per-stage capture)."""
        with torch.cuda.device(self.device), self._context():
            if state is None:
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    for _ in range(self.warmup):
                        self._run(self._static["points"], self._static["transform"], stages)
                torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                if state is None:
                    outputs = self._run(self._static["points"], self._static["transform"], stages)
                else:
                    for _, fn in stages:
                        fn(state)
                    outputs = None
        return graph, outputs

    # -- stage timings --------------------------------------------------------------------------
    def profile(self, points: torch.Tensor, transform: torch.Tensor, repeats: int = 20) -> dict[str, float]:
        """Median milliseconds per stage (:data:`REPORTED_STAGES`, "rays" including the importance
        depths) and of the whole frame ("frame") over ``repeats`` frames of these inputs.

        GPU (``cuda_graph``): each stage is captured as its own CUDA graph and the graphs are
        replayed in order between CUDA events (the stages' sum is close to the one-graph frame,
        timed as "frame"); CPU: eager stages between ``time.perf_counter`` reads."""
        if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
            raise ValueError(f"repeats must be an int >= 1, got {repeats!r}")
        times: dict[str, list[float]] = {name: [] for name in STAGES + ("frame",)}
        if not self.cuda_graph:
            points, transform = self._inputs(points, transform)
            stages = self._stages()
            with self._context():
                for _ in range(repeats):
                    state: dict[str, Any] = {"points": points.contiguous(), "transform": transform.contiguous()}
                    start = last = time.perf_counter()
                    for name, fn in stages:
                        fn(state)
                        now = time.perf_counter()
                        times[name].append(1e3 * (now - last))
                        last = now
                    times["frame"].append(1e3 * (last - start))
        else:
            self(points, transform)  # captures on the first call; copies the inputs in
            state = {"points": self._static["points"], "transform": self._static["transform"]}
            staged = [(name, self._capture_graph([(name, fn)], state)[0]) for name, fn in self._stages()]
            with torch.cuda.device(self.device):
                events = [torch.cuda.Event(enable_timing=True) for _ in range(len(staged) + 1)]
                frame = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
                for _ in range(repeats):
                    events[0].record()
                    for (_, graph), event in zip(staged, events[1:]):
                        graph.replay()
                        event.record()
                    frame[0].record()
                    self._graph.replay()
                    frame[1].record()
                    torch.cuda.synchronize()
                    for i, (name, _) in enumerate(staged):
                        times[name].append(events[i].elapsed_time(events[i + 1]))
                    times["frame"].append(frame[0].elapsed_time(frame[1]))
            del staged, state
        median = {name: statistics.median(ts) for name, ts in times.items()}
        median["rays"] += median.pop("importance")
        return median

    def extra_repr(self) -> str:  # for repr()
        settings = ", ".join(f"{k}={v!r}" for k, v in self.settings.items()) or "none"
        if "field_bf16" not in self.settings and self._default_field_bf16:
            settings += " (field_bf16 by default: this CPU's bf16 products)"
        if self.defaults:
            settings += f" ({', '.join(self.defaults)} by default on {self.device.type})"
        return (f"batch={self.batch}, dtype={self.dtype}, cuda_graph={self.cuda_graph}, device={self.device}, "
                f"noise={self.noise!r}, compile={','.join(sorted(self.compiled)) or 'none'}, settings={settings}"
                + (", tune=True" if self.tune_on else ""))

    def __repr__(self) -> str:
        return f"RealtimeRenderer({self.extra_repr()})"
