"""``composite``: front-to-back alpha compositing of samples along rays (SPEC section 8).

For every ray with S samples sorted by depth: ``T_i = prod_{j<i} (1 - alpha_j)``,
``w_i = alpha_i T_i``, ``color = sum_i w_i v_i``, ``opacity = clamp(sum_i w_i, 0, 1)``
and, when ``depths`` are given, ``depth = sum_i w_i t_i``.

    >>> import torch, gpavatar.ops as ops
    >>> alphas = torch.full((2, 4), 0.5)
    >>> out = ops.composite(alphas, torch.ones(2, 4, 3))
    >>> out.opacity
    tensor([0.9375, 0.9375])

Gradients flow to ``alphas`` and ``values`` from every output (color, opacity,
weights, depth); ``depths`` are sampling positions and get none.  The fused
backward recomputes the transmittance and walks each ray backwards
(``dL/dalpha_k = T_k (G_k - S_k)`` with ``G_k = dL/dw_k`` and the suffix
``S_k = alpha_{k+1} G_{k+1} + (1 - alpha_{k+1}) S_{k+1}``), so it never divides by
``1 - alpha`` and stores nothing of size (R, S, C) besides the value gradient.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from gpavatar.ops import _backend
from gpavatar.ops import _validation as v
from gpavatar.ops._library import register_forward_backward
from gpavatar.ops.reference import composite_reference

__all__ = ["composite", "CompositeResult"]


class CompositeResult(NamedTuple):
    color: torch.Tensor  # (R, C)
    opacity: torch.Tensor  # (R,)
    weights: torch.Tensor  # (R, S)
    depth: Optional[torch.Tensor]  # (R,) when depths were given


def check_composite_inputs(alphas, values, depths) -> None:
    v.check_tensor(alphas, "alphas", "(R, S)", ndim=2)
    R, S = alphas.shape
    v.check_tensor(values, "values", f"({R}, {S}, C)", ndim=3)
    if values.shape[:2] != alphas.shape:
        raise ValueError(f"values must have shape ({R}, {S}, C), got {tuple(values.shape)}")
    tensors = {"alphas": alphas, "values": values}
    if depths is not None:
        v.check_tensor(depths, "depths", f"({R}, {S})", ndim=2)
        if depths.shape != alphas.shape:
            raise ValueError(f"depths must have shape ({R}, {S}), got {tuple(depths.shape)}")
        tensors["depths"] = depths
    v.check_same_device(tensors)
    check_alphas_range(alphas)


def check_alphas_range(alphas) -> None:
    """alphas in [0, 1], NaN refused (one reduction, one host sync; skipped under torch.compile)."""
    if alphas.numel() == 0 or not v.checking_values():
        return
    a = alphas.detach()
    lo, hi = torch.aminmax(a)  # NaN if any alpha is NaN (then both comparisons are False)
    if not bool((lo >= 0) & (hi <= 1)):
        nan = a.isnan()
        rest = a[~nan]
        got = []
        if rest.numel() and not bool(((rest >= 0) & (rest <= 1)).all()):
            got.append(f"min {rest.min().item():g}, max {rest.max().item():g}")
        if bool(nan.any()):
            got.append(f"{int(nan.sum())} NaN")
        raise ValueError(f"alphas must lie in [0, 1] (opacities; NaN is not allowed), got {' and '.join(got)}")


def composite(alphas: torch.Tensor, values: torch.Tensor, depths: Optional[torch.Tensor] = None, *,
              backend: Optional[str] = None, validate: bool = True) -> CompositeResult:
    """Alpha compositing along rays.

    Args:
        alphas: (R, S) opacities in [0, 1] of samples sorted front to back.  With ``validate``
            (the default) alphas outside [0, 1] or NaN raise ``ValueError`` (one host sync);
            with ``validate=False`` they are the caller's promise, and a NaN alpha gives NaN
            weights from its sample on and a NaN color, opacity and depth on every backend
            (like the reference).
        values: (R, S, C) per-sample features (colors); not checked: a NaN value makes the
            color channels it touches NaN on every backend, even behind an opaque sample
            (0 * NaN = NaN, as in the reference)
        depths: optional (R, S) sample depths for the expected depth
        backend: "auto" | "cuda" | "triton" | "cpu" | "torch"
        validate: check shapes and the alphas' range
    Returns:
        CompositeResult(color (R, C), opacity (R,), weights (R, S), depth (R,) or None);
        float32 on fused backends (float64 stays float64 on ``torch``).
    """
    if validate:
        check_composite_inputs(alphas, values, depths)
    name = _backend.resolve(backend, alphas.device, "composite")
    if name in ("cpu", "cuda") and not hasattr(torch.ops.gpavatar, "composite_forward"):
        name = "torch"
    R, S = alphas.shape
    if name == "torch" or R == 0 or S == 0 or values.shape[2] == 0:
        dtype = torch.float64 if (alphas.dtype == torch.float64 and name == "torch") else torch.float32
        d = depths.detach().to(dtype) if depths is not None else None
        return CompositeResult(*composite_reference(alphas.to(dtype), values.to(dtype), d))
    a = alphas.to(torch.float32).contiguous()
    x = values.to(torch.float32).contiguous()
    d = depths.detach().to(torch.float32).contiguous() if depths is not None else None
    op = (torch.ops.gpavatar.composite_forward if name in ("cpu", "cuda")
          else torch.ops.gpavatar.composite_forward_triton)
    color, opacity, weights, depth = op(a, x, d)
    return CompositeResult(color, opacity, weights, depth if depths is not None else None)


# --- torch.library registration ------------------------------------------------------------
#
# Low-level contract shared by the C++ op (csrc/composite) and the Triton op (kernels/composite.py):
#
#   composite_forward(alphas (R, S) f32, values (R, S, C) f32, depths (R, S) f32 or None)
#       -> (color (R, C), opacity (R,), weights (R, S), depth (R,); depth is zeros without depths)
#   composite_backward(grad_color (R, C), grad_opacity (R,), grad_weights (R, S), grad_depth (R,),
#                      alphas, values, depths or None)
#       -> (grad_alphas (R, S), grad_values (R, S, C))
# All float32 contiguous.  sum_i w_i = 1 - T_S is in [0, 1] up to rounding: the opacity clamp
# only removes rounding and its gradient is the identity (a torch.clamp gradient would switch
# on the last bit of a sum near 1).


def _forward_fake(alphas, values, depths):
    R, S = alphas.shape
    return (alphas.new_empty((R, values.shape[2])), alphas.new_empty((R,)), alphas.new_empty((R, S)),
            alphas.new_empty((R,)))


def _backward_fake(grad_color, grad_opacity, grad_weights, grad_depth, alphas, values, depths):
    return alphas.new_empty(alphas.shape), values.new_empty(values.shape)


def _setup_context(ctx, inputs, output):
    alphas, values, depths = inputs
    ctx.save_for_backward(alphas, values, depths)


def _make_backward(backward_op):
    def backward(ctx, grad_color, grad_opacity, grad_weights, grad_depth):
        alphas, values, depths = ctx.saved_tensors
        if not (ctx.needs_input_grad[0] or ctx.needs_input_grad[1]):
            return None, None, None
        R, S = alphas.shape

        def dense(g, shape):
            return alphas.new_zeros(shape) if g is None else g.to(torch.float32).contiguous()

        ga, gv = backward_op(dense(grad_color, (R, values.shape[2])), dense(grad_opacity, (R,)),
                             dense(grad_weights, (R, S)), dense(grad_depth, (R,)), alphas, values, depths)
        return (ga if ctx.needs_input_grad[0] else None), (gv if ctx.needs_input_grad[1] else None), None

    return backward


@torch.library.custom_op("gpavatar::composite_forward_triton", mutates_args=())
def _forward_triton(alphas: torch.Tensor, values: torch.Tensor, depths: Optional[torch.Tensor]
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from gpavatar.kernels.composite import composite_forward

    return composite_forward(alphas.contiguous(), values.contiguous(),
                             None if depths is None else depths.contiguous())


@torch.library.custom_op("gpavatar::composite_backward_triton", mutates_args=())
def _backward_triton(grad_color: torch.Tensor, grad_opacity: torch.Tensor, grad_weights: torch.Tensor,
                     grad_depth: torch.Tensor, alphas: torch.Tensor, values: torch.Tensor,
                     depths: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    from gpavatar.kernels.composite import composite_backward

    return composite_backward(grad_color.contiguous(), grad_opacity.contiguous(), grad_weights.contiguous(),
                              grad_depth.contiguous(), alphas.contiguous(), values.contiguous(),
                              None if depths is None else depths.contiguous())


register_forward_backward("composite", _forward_fake, _backward_fake, _make_backward, _setup_context)
