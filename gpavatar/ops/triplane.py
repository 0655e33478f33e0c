"""``triplane_sample``: features of 3-D points read from three axis-aligned planes (SPEC section 4).

Point ``(x, y, z)`` reads plane 0 at ``(x, y)``, plane 1 at ``(x, z)`` and plane 2
at ``(z, y)``; the first coordinate indexes the width, the second the height,
exactly like ``grid_sample(mode="bilinear", padding_mode="zeros",
align_corners=False)``: the texel centres sit at ``-1 + (2 i + 1) / W``, a
point beyond the outer texel centres blends with zeros, and a point farther
than one texel outside reads nothing (zero value, zero gradient).

    >>> import torch, gpavatar.ops as ops
    >>> planes = torch.randn(1, 3, 32, 64, 64)          # (B, 3, C, H, W)
    >>> coords = torch.rand(1, 1000, 3) * 2 - 1          # (B, M, 3)
    >>> ops.triplane_sample(planes, coords).shape        # mean of the three planes
    torch.Size([1, 1000, 32])
    >>> ops.triplane_sample(planes, coords, "concat").shape
    torch.Size([1, 1000, 96])

Layouts.  ``planes`` is (B, 3, C, H, W) by default, the layout of the official
model.  The fused kernels read texels channels-last, so they convert it once
per call (a copy of the planes; its gradient flows back through the copy).
``channels_last=True`` takes (B, 3, H, W, C) planes directly: that is the fast
path (no copy; a model that produces its planes in this layout should use it).

Precision.  float16 / bfloat16 planes are read as they are and accumulated in
float32; the fused backends return float32 features; plane gradients have the
planes' dtype (accumulated in float32 and rounded once).  float64 inputs stay
float64 on the ``torch`` backend (gradcheck) and are computed in float32
elsewhere.

Gradients flow to ``planes`` and to ``coords`` on every backend.  The gradient
of ``coords`` is never computed with atomics.  The plane gradient has two
modes:

* ``deterministic=False`` (default, fastest on GPU): every (point, corner)
  pair adds its contribution with a float atomic add, so the summation order,
  and hence the last bits, can change from run to run.
* ``deterministic=True``: the points are sorted by texel cell (a stable sort)
  and every texel gathers the contributions of the points of its four
  neighbouring cells in that fixed order: bit-identical results run to run,
  for some extra time and O(B * 3 * M) extra memory.  Very uneven point
  distributions (many points in one cell) make it slower.

The CPU kernel is always deterministic (each thread owns a slice of the plane
gradient and walks the points in order), whatever the thread count.

NaN: ``coords`` are checked (finite, ``|x| <= 1e6``) when ``validate``; the planes
are not, and a NaN texel reaches every point that reads it as an in-bounds
corner, even at bilinear weight 0 (``0 * NaN``), exactly like ``grid_sample``,
on every backend.
"""

from __future__ import annotations

from typing import Optional

import torch

from gpavatar import _extension
from gpavatar.ops import _backend
from gpavatar.ops import _validation as v
from gpavatar.ops._library import register_forward_backward
from gpavatar.ops.reference import triplane_sample_reference

REDUCTIONS = ("mean", "concat")
PLANE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # read natively by the fused kernels

__all__ = ["triplane_sample", "triplane_features", "triplane_mean_grads", "check_triplane_inputs", "REDUCTIONS"]


def check_triplane_inputs(planes, coords, reduce, channels_last) -> None:
    layout = "(B, 3, H, W, C)" if channels_last else "(B, 3, C, H, W)"
    v.check_tensor(planes, "planes", layout, ndim=5)
    v.check_tensor(coords, "coords", "(B, M, 3)", ndim=3, last=3)
    if not isinstance(channels_last, bool):
        raise TypeError(f"channels_last must be a bool, got {type(channels_last).__name__}")
    if planes.shape[1] != 3:
        raise ValueError(f"planes must have shape {layout} with 3 planes, got {tuple(planes.shape)}")
    H, W = (planes.shape[2], planes.shape[3]) if channels_last else (planes.shape[3], planes.shape[4])
    if H < 1 or W < 1:
        raise ValueError(f"planes must have H >= 1 and W >= 1 (layout {layout}), got {tuple(planes.shape)}")
    if planes.shape[0] != coords.shape[0]:
        raise ValueError(f"triplane_sample: planes {layout} and coords (B, M, 3) must have the same batch size B, "
                         f"got {planes.shape[0]} and {coords.shape[0]}")
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}")
    v.check_same_device({"planes": planes, "coords": coords})
    v.check_coordinates(coords, "coords")


def triplane_sample(planes: torch.Tensor, coords: torch.Tensor, reduce: str = "mean", *,
                    channels_last: bool = False, deterministic: bool = False, backend: Optional[str] = None,
                    validate: bool = True) -> torch.Tensor:
    """Bilinear tri-plane features at points.

    Args:
        planes: (B, 3, C, H, W), or (B, 3, H, W, C) with ``channels_last=True``; float16 / bfloat16 /
            float32 / float64. Any C >= 0, H >= 1, W >= 1 (H != W allowed).
        coords: (B, M, 3) points; [-1, 1]^3 is the volume (outside points read zeros). Finite, |x| <= 1e6.
        reduce: "mean" -> (B, M, C); "concat" -> (B, M, 3C), planes in order 0, 1, 2
        channels_last: layout of ``planes`` (see module docstring; True is the fast path)
        deterministic: plane gradient without float atomics (see module docstring)
        backend: "auto" | "cuda" | "triton" | "cpu" | "torch" (default: $GPAVATAR_BACKEND or auto)
        validate: check shapes and values (values need one host sync and are skipped under torch.compile)
    Returns:
        features (B, M, C) or (B, M, 3C); float32 on fused backends (float64 for float64 on ``torch``).
    """
    if validate:
        check_triplane_inputs(planes, coords, reduce, channels_last)
    if not isinstance(deterministic, bool):
        raise TypeError(f"deterministic must be a bool, got {type(deterministic).__name__}")
    name = _backend.resolve(backend, coords.device, "triplane_sample")
    B, M = coords.shape[0], coords.shape[1]
    C = planes.shape[4] if channels_last else planes.shape[2]
    if name == "torch" or B == 0 or M == 0 or C == 0:
        dtype = torch.float64 if (planes.dtype == torch.float64 and name == "torch") else torch.float32
        p = planes.permute(0, 1, 4, 2, 3) if channels_last else planes
        return triplane_sample_reference(p.to(dtype), coords.to(dtype), reduce)

    if channels_last:
        p = planes
    else:
        p = planes.permute(0, 1, 3, 4, 2)  # (B, 3, H, W, C) view; .contiguous() below copies it once
    if p.dtype not in PLANE_DTYPES:
        p = p.to(torch.float32)
    p = p.contiguous()
    c = coords.to(torch.float32).contiguous()
    concat = reduce == "concat"
    if name in ("cpu", "cuda"):
        return torch.ops.gpavatar.triplane_sample_forward(p, c, concat, deterministic)
    return torch.ops.gpavatar.triplane_sample_forward_triton(p, c, concat, deterministic)


def triplane_features(planes: torch.Tensor, coords: torch.Tensor, extra: torch.Tensor, *,
                      backend: Optional[str] = None, validate: bool = True) -> torch.Tensor:
    """``torch.cat([triplane_sample(planes, coords, "mean", channels_last=True), extra], -1)``: the
    field's first-layer input, (B, M, C + E) float32, for ``extra`` (B, M, E) (the PEF features).

    Where the extension's forward-only ``triplane_sample_forward_extra`` can compute it (backends
    ``cpu`` / ``cuda``, no gradient recorded, float32 ``extra``) one kernel writes whole rows: the
    tri-plane features and the copied extra ones, instead of a (B, M, C) result that a concatenation
    reads back with ``extra`` and writes again (at the paper's 2^19 samples a pass, 0.18 ms of an
    H200 pass).  The same values bit for bit either way (a copy); elsewhere the two steps.
    ``planes`` channels-last (B, 3, H, W, C); ``validate`` as in :func:`triplane_sample` (and the
    shape of ``extra``)."""
    if validate:
        check_triplane_inputs(planes, coords, "mean", True)
        v.check_tensor(extra, "extra", "(B, M, E)", ndim=3)
        if tuple(extra.shape[:2]) != tuple(coords.shape[:2]):
            raise ValueError(f"extra must have shape ({coords.shape[0]}, {coords.shape[1]}, E) (the batch and "
                             f"queries of coords), got {tuple(extra.shape)}")
        v.check_same_device({"coords": coords, "extra": extra})
    name = _backend.resolve(backend, coords.device, "triplane_sample")
    if (name not in ("cpu", "cuda") or _backend.needs_grad([planes, coords, extra]) or extra.dtype != torch.float32
            or planes.dtype not in PLANE_DTYPES or not hasattr(torch.ops.gpavatar, "triplane_sample_forward_extra")):
        tri = triplane_sample(planes, coords, "mean", channels_last=True, backend=name, validate=False)
        return torch.cat([tri, extra.to(tri.dtype)], dim=-1)
    return torch.ops.gpavatar.triplane_sample_forward_extra(planes.contiguous(), coords.to(torch.float32).contiguous(),
                                                            extra.contiguous())


def triplane_mean_grads(grad: torch.Tensor, planes: torch.Tensor, coords: torch.Tensor, *, backend: Optional[str],
                        planes_grad: bool, coords_grad: bool) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """The gradients (planes, coords) of ``triplane_sample(planes, coords, "mean", channels_last=True,
    backend=backend)`` for the output gradient ``grad`` (B, M, C), None where not asked: the backward
    op alone, with no forward recorded (a caller that made the features itself, e.g. a
    checkpointed field pass: one plane gradient for the whole pass).  The torch backend goes through
    autograd of its reference.  Inputs are not validated."""
    if not (planes_grad or coords_grad):
        return None, None
    name = _backend.resolve(backend, coords.device, "triplane_sample")
    B, M, C = coords.shape[0], coords.shape[1], planes.shape[4]
    if name == "torch" or B == 0 or M == 0 or C == 0:
        p = planes.detach().requires_grad_(planes_grad)
        c = coords.detach().requires_grad_(coords_grad)
        with torch.enable_grad():
            out = triplane_sample(p, c, "mean", channels_last=True, backend=name, validate=False)
            inputs = [t for t in (p, c) if t.requires_grad]
            got = iter(torch.autograd.grad(out, inputs, grad.to(out.dtype), allow_unused=True))
        gp = next(got) if planes_grad else None
        gc = next(got) if coords_grad else None
        return (torch.zeros_like(planes) if planes_grad and gp is None else gp,
                torch.zeros_like(coords) if coords_grad and gc is None else gc)
    p = (planes if planes.dtype in PLANE_DTYPES else planes.to(torch.float32)).contiguous()
    op = torch.ops.gpavatar.triplane_sample_backward if name in ("cpu", "cuda") else \
        torch.ops.gpavatar.triplane_sample_backward_triton
    gp, gc = op(grad.to(torch.float32).contiguous(), p, coords.to(torch.float32).contiguous(), False, False,
                planes_grad, coords_grad)
    return (gp.to(planes.dtype) if planes_grad else None), (gc.to(coords.dtype) if coords_grad else None)


# --- torch.library registration ------------------------------------------------------------
#
# Low-level contract shared by the C++ op (csrc/triplane) and the Triton op (kernels/triplane.py):
#
#   triplane_sample_forward(planes (B, 3, H, W, C) contiguous float32 | float16 | bfloat16,
#                           coords (B, M, 3) contiguous float32, concat: bool, deterministic: bool)
#       -> (B, M, C) or (B, M, 3C) float32
#   triplane_sample_backward(grad_out (B, M, C or 3C) float32 contiguous, planes, coords, concat,
#                            deterministic, planes_grad: bool, coords_grad: bool)
#       -> (grad_planes (B, 3, H, W, C) in planes.dtype, or an empty (0,) tensor when not planes_grad,
#           grad_coords (B, M, 3) float32, or an empty (0,) tensor when not coords_grad)
#
# ``deterministic`` only matters to the backward; the forward takes it so autograd can pass it on.


def _forward_fake(planes, coords, concat, deterministic):
    C = planes.shape[4]
    return coords.new_empty((coords.shape[0], coords.shape[1], 3 * C if concat else C))


def _backward_fake(grad_out, planes, coords, concat, deterministic, planes_grad, coords_grad):
    gp = planes.new_empty(planes.shape) if planes_grad else planes.new_empty((0,))
    gc = coords.new_empty(coords.shape) if coords_grad else coords.new_empty((0,))
    return gp, gc


def _setup_context(ctx, inputs, output):
    planes, coords, concat, deterministic = inputs
    ctx.save_for_backward(planes, coords)
    ctx.concat = concat
    ctx.deterministic = deterministic


def _make_backward(backward_op):
    def backward(ctx, grad_out):
        planes, coords = ctx.saved_tensors
        need_planes, need_coords = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_planes or need_coords):
            return None, None, None, None
        gp, gc = backward_op(grad_out.to(torch.float32).contiguous(), planes, coords, ctx.concat,
                             ctx.deterministic, need_planes, need_coords)
        return (gp if need_planes else None), (gc if need_coords else None), None, None

    return backward


@torch.library.custom_op("gpavatar::triplane_sample_forward_triton", mutates_args=())
def _forward_triton(planes: torch.Tensor, coords: torch.Tensor, concat: bool, deterministic: bool) -> torch.Tensor:
    from gpavatar.kernels.triplane import triplane_forward

    return triplane_forward(planes.contiguous(), coords.contiguous(), concat)


@torch.library.custom_op("gpavatar::triplane_sample_backward_triton", mutates_args=())
def _backward_triton(grad_out: torch.Tensor, planes: torch.Tensor, coords: torch.Tensor, concat: bool,
                     deterministic: bool, planes_grad: bool, coords_grad: bool
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    from gpavatar.kernels.triplane import triplane_backward

    return triplane_backward(grad_out.contiguous(), planes.contiguous(), coords.contiguous(), concat,
                             deterministic, planes_grad, coords_grad)


register_forward_backward("triplane_sample", _forward_fake, _backward_fake, _make_backward, _setup_context)

#   triplane_sample_forward_extra(planes (B, 3, H, W, C) contiguous float32 | float16 | bfloat16,
#                                 coords (B, M, 3) contiguous float32, extra (B, M, E) contiguous float32)
#       -> (B, M, C + E) float32: [mean tri-plane features, extra] per row.  Forward only (C++).
if _extension.available() and hasattr(torch.ops.gpavatar, "triplane_sample_forward_extra"):
    @torch.library.register_fake("gpavatar::triplane_sample_forward_extra")
    def _forward_extra_fake(planes, coords, extra):
        return coords.new_empty((coords.shape[0], coords.shape[1], planes.shape[4] + extra.shape[2]))
