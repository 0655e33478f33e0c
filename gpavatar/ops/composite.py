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
from gpavatar.ops.rays import gather_samples
from gpavatar.ops.reference import composite_reference

__all__ = ["composite", "composite_merged", "CompositeResult"]


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
    check_depths(depths, R, S, {"alphas": alphas, "values": values})
    check_alphas_range(alphas)


def check_depths(depths, R: int, S: int, tensors: dict) -> None:
    """``depths`` None or (R, S); it and ``tensors`` on one device."""
    if depths is not None:
        v.check_tensor(depths, "depths", f"({R}, {S})", ndim=2)
        if tuple(depths.shape) != (R, S):
            raise ValueError(f"depths must have shape ({R}, {S}), got {tuple(depths.shape)}")
        tensors = dict(tensors, depths=depths)
    v.check_same_device(tensors)


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


def composite_merged(alphas_a: torch.Tensor, values_a: torch.Tensor, alphas_b: torch.Tensor,
                     values_b: torch.Tensor, order: torch.Tensor, depths: Optional[torch.Tensor] = None, *,
                     backend: Optional[str] = None, validate: bool = True) -> CompositeResult:
    """:func:`composite` of two sample sets in merged order, without writing the merged copies.

    The result of ``composite(gather_samples(cat([alphas_a, alphas_b], 1), order),
    gather_samples(cat([values_a, values_b], 1), order), depths)``: sample ``s`` of ray ``r`` is
    sample ``order[r, s]`` of the ray's set a (indices < Sa) followed by its set b, the order of
    ``ops.merge_samples(depths_a, depths_b)`` (a permutation per ray, so also the order
    ``ops.merge_values`` places them in).  On the ``cpu`` and ``cuda`` backends the compositing
    kernel reads each sample where it lies (the renderer's fine composite: no (R, S, C) merged
    values written and read back, one launch instead of a dozen); that form is forward only, and
    a call that needs gradients (or another backend) runs the gather and :func:`composite`.

    Args:
        alphas_a: (R, Sa), values_a: (R, Sa, C); alphas_b: (R, Sb), values_b: (R, Sb, C)
        order: (R, Sa + Sb) int64 in [0, Sa + Sb)
        depths: optional (R, Sa + Sb) depths in merged order (``merge_samples``' depths)
        backend, validate: as :func:`composite` (``validate`` also checks the order's range: one
            host sync; unchecked, an index out of range reads a wrong sample, never outside the
            tensors)
    Returns:
        CompositeResult over the Sa + Sb merged samples.
    """
    if validate:
        check_merged_inputs(alphas_a, values_a, alphas_b, values_b, order, depths)
    name = _backend.resolve(backend, alphas_a.device, "composite")
    R, Sa, Sb = alphas_a.shape[0], alphas_a.shape[1], alphas_b.shape[1]
    fused = (name in ("cpu", "cuda") and hasattr(torch.ops.gpavatar, "composite_merged_forward")
             and R > 0 and Sa + Sb > 0 and values_a.shape[2] > 0
             and not _backend.needs_grad([alphas_a, values_a, alphas_b, values_b]))
    if not fused:
        return composite(gather_samples(torch.cat([alphas_a, alphas_b.to(alphas_a.dtype)], 1), order),
                         gather_samples(torch.cat([values_a, values_b.to(values_a.dtype)], 1), order), depths,
                         backend=name, validate=False)
    f32 = torch.float32
    d = depths.detach().to(f32).contiguous() if depths is not None else None
    color, opacity, weights, depth = torch.ops.gpavatar.composite_merged_forward(
        *(t.to(f32).contiguous() for t in (alphas_a, values_a, alphas_b, values_b)), order.contiguous(), d)
    return CompositeResult(color, opacity, weights, depth if depths is not None else None)


def check_merged_inputs(alphas_a, values_a, alphas_b, values_b, order, depths) -> None:
    v.check_tensor(alphas_a, "alphas_a", "(R, Sa)", ndim=2)
    R, Sa = alphas_a.shape
    v.check_tensor(alphas_b, "alphas_b", f"({R}, Sb)", ndim=2)
    Sb = alphas_b.shape[1]
    if alphas_b.shape[0] != R:
        raise ValueError(f"alphas_b must have shape ({R}, Sb), got {tuple(alphas_b.shape)}")
    v.check_tensor(values_a, "values_a", f"({R}, {Sa}, C)", ndim=3)
    if values_a.shape[:2] != alphas_a.shape:
        raise ValueError(f"values_a must have shape ({R}, {Sa}, C), got {tuple(values_a.shape)}")
    C = values_a.shape[2]
    v.check_tensor(values_b, "values_b", f"({R}, {Sb}, {C})", ndim=3)
    if tuple(values_b.shape) != (R, Sb, C):
        raise ValueError(f"values_b must have shape ({R}, {Sb}, {C}), got {tuple(values_b.shape)}")
    S = Sa + Sb
    if not isinstance(order, torch.Tensor) or order.dtype != torch.int64 or tuple(order.shape) != (R, S):
        raise ValueError(f"order must be an int64 tensor of shape ({R}, {S}) (from merge_samples), got "
                         f"{getattr(order, 'dtype', type(order).__name__)} {tuple(getattr(order, 'shape', ()))}")
    check_depths(depths, R, S, {"alphas_a": alphas_a, "values_a": values_a, "alphas_b": alphas_b,
                                "values_b": values_b, "order": order})
    check_alphas_range(alphas_a)
    check_alphas_range(alphas_b)
    if order.numel() and v.checking_values():
        lo, hi = torch.aminmax(order)
        if not bool((lo >= 0) & (hi < S)):
            raise ValueError(f"order must hold indices in [0, {S}), got min {int(lo)}, max {int(hi)}")


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


def _register_merged() -> None:
    if hasattr(torch.ops.gpavatar, "composite_merged_forward"):
        torch.library.register_fake("gpavatar::composite_merged_forward")(
            lambda alphas_a, values_a, alphas_b, values_b, order, depths: _forward_fake(
                alphas_a.new_empty(order.shape), values_a, depths))


_register_merged()
