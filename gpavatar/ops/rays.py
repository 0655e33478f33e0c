"""Ray sampling ops (SPEC sections 7 and 8): ray-box intersection, stratified coarse depths,
importance (fine) depths and the merge of two sorted sample sets.

    >>> import torch, gpavatar.ops as ops
    >>> o = torch.tensor([[0.0, 0.0, -5.0]]); d = torch.tensor([[0.0, 0.0, 1.0]])
    >>> t0, t1, hit = ops.ray_box(o, d)
    >>> t0, t1, hit
    (tensor([4.]), tensor([6.]), tensor([True]))
    >>> coarse = ops.stratified_depths(t0, t1, 32)                 # (R, 32), evaluation: no jitter
    >>> fine = ops.importance_depths(coarse, torch.rand(1, 32), 32)  # (R, 32)
    >>> depths, order = ops.merge_samples(coarse, fine)            # (R, 64) sorted, indices into cat

Randomness (training) is drawn with ``torch`` from the given ``generator`` on the
rays' device and handed to the kernels, so every backend returns the same depths
for the same generator state.  None of these ops is differentiable (depths are
sampling decisions); they return tensors that do not require grad.
"""

from __future__ import annotations

import operator
from typing import Optional

import torch

from gpavatar import _extension
from gpavatar.ops import _backend
from gpavatar.ops import _validation as v
from gpavatar.ops.reference import (importance_depths_reference, merge_samples_reference, ray_box_reference,
                                    stratified_depths_reference)

__all__ = ["ray_box", "stratified_depths", "importance_depths", "merge_samples"]


def _cpp(name: str) -> bool:
    return name in ("cpu", "cuda") and hasattr(torch.ops.gpavatar, "ray_box")


def _resolve(backend, device, op) -> str:
    name = _backend.resolve(backend, device, op)
    if name == "triton":  # sampling is cheap and branchy: no Triton kernels; the C++ op on CUDA
        name = "cuda" if "cuda" in _backend.available_backends(device) else "torch"
    if name in ("cpu", "cuda") and not _cpp(name):
        name = "torch"
    return name


def _check_rays(t, name):
    v.check_tensor(t, name, "(R, 3)", ndim=2, last=3)


def _check_depth_range(t0, t1):
    v.check_tensor(t0, "t0", "(R,)", ndim=1)
    v.check_tensor(t1, "t1", f"({t0.shape[0]},)", ndim=1)
    if t1.shape != t0.shape:
        raise ValueError(f"t1 must have shape ({t0.shape[0]},) like t0, got {tuple(t1.shape)}")
    v.check_same_device({"t0": t0, "t1": t1})


def _check_ascending(t, name):
    """Finite, |t| <= 1e6 and ascending along the last axis (two host syncs)."""
    v.check_coordinates(t, name)
    if t.shape[1] > 1 and t.numel() and v.checking_values() and not bool((t[:, 1:] >= t[:, :-1]).all()):
        raise ValueError(f"{name} must be ascending along the last axis (sorted depths)")


def _check_generator(generator, device):
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if generator is not None and generator.device.type != torch.device(device).type:
        raise ValueError(f"generator must be on the rays' device ({device}), got {generator.device}")


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float32).contiguous()


def ray_box(origins: torch.Tensor, dirs: torch.Tensor, box_min: float = -1.0, box_max: float = 1.0, *,
            backend: Optional[str] = None, validate: bool = True):
    """Entry / exit depths of rays through the box [box_min, box_max]^3 (slab test, SPEC section 7).

    Args:
        origins, dirs: (R, 3) (dirs need not be normalized; depths are in units of |dir|);
            finite, |x| <= 1e6
        box_min, box_max: the cube's bounds, finite, |x| <= 1e6, box_min < box_max
    Returns:
        t0 (R,), t1 (R,) float32 and hit (R,) bool.  No near plane: t0 < 0 when the origin is
        inside.  Rays touching the box hit; a ray whose exit is at t <= 0 misses; a ray
        without a finite entry and exit in float32 misses too: a zero direction, or one so
        small that 1 / d overflows on every axis it moves along (e.g. 1e-45), never reaches
        a face.  Misses get t0 = t1 = -1.
    """
    if validate:
        _check_rays(origins, "origins")
        _check_rays(dirs, "dirs")
        if dirs.shape[0] != origins.shape[0]:
            raise ValueError(f"dirs must have shape ({origins.shape[0]}, 3) like origins, got {tuple(dirs.shape)}")
        v.check_same_device({"origins": origins, "dirs": dirs})
        for name, value in (("box_min", box_min), ("box_max", box_max)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{name} must be a float, got {type(value).__name__}")
            if not abs(value) <= v.MAX_ABS_COORD:  # NaN and inf compare False
                raise ValueError(f"{name} must be finite with |{name}| <= {v.MAX_ABS_COORD:g} (like coordinates), "
                                 f"got {value}")
        if not float(box_min) < float(box_max):
            raise ValueError(f"box_min must be < box_max, got {box_min} and {box_max}")
        v.check_coordinates(origins, "origins", dirs, "dirs")
    name = _resolve(backend, origins.device, "ray_box")
    o, d = _f32(origins), _f32(dirs)
    if name == "torch" or o.shape[0] == 0:
        return ray_box_reference(o, d, float(box_min), float(box_max))
    return torch.ops.gpavatar.ray_box(o, d, float(box_min), float(box_max))


def stratified_depths(t0: torch.Tensor, t1: torch.Tensor, S: int, jitter: bool = False,
                      generator: Optional[torch.Generator] = None, *, backend: Optional[str] = None,
                      validate: bool = True) -> torch.Tensor:
    """S coarse depths per ray: midpoints of S + 1 equally spaced edges from t0 to t1.

    With ``jitter`` (training) every edge moves uniformly between the midpoints to its
    neighbours (the first and last edges only inward), drawn from ``generator``.

    Args:
        t0, t1: (R,) from :func:`ray_box`; S >= 1
    Returns:
        (R, S) float32, ascending where t0 <= t1
    """
    if validate:
        _check_depth_range(t0, t1)
        v.check_int(S, "S", 1)
        if not isinstance(jitter, bool):
            raise TypeError(f"jitter must be a bool, got {type(jitter).__name__}")
        _check_generator(generator, t0.device)
        v.check_coordinates(t0, "t0", t1, "t1")
    S = operator.index(S)  # numpy integers too
    name = _resolve(backend, t0.device, "stratified_depths")
    a, b = _f32(t0), _f32(t1)
    u = torch.rand(a.shape[0], S + 1, generator=generator, device=a.device) if jitter else None
    if name == "torch" or a.shape[0] == 0:
        return stratified_depths_reference(a, b, S, u)
    return torch.ops.gpavatar.stratified_depths(a, b, S, u)


def importance_depths(depths: torch.Tensor, weights: torch.Tensor, n: int, stratified: bool = False,
                      generator: Optional[torch.Generator] = None, *, backend: Optional[str] = None,
                      validate: bool = True) -> torch.Tensor:
    """n fine depths per ray by inverting the piecewise-linear CDF of the coarse weights (SPEC section 8).

    Args:
        depths: (R, S) sorted coarse depths, S >= 2; weights: (R, S) their compositing weights (>= 0)
        n: fine samples per ray, >= 2
        stratified: training: one uniform offset per ray (shared by its n targets) instead of 0.5
    Returns:
        (R, n) float32 fine depths, ascending, within [depths[:, 0], depths[:, -1]]
    """
    if validate:
        v.check_tensor(depths, "depths", "(R, S)", ndim=2)
        v.check_tensor(weights, "weights", f"{tuple(depths.shape)}", ndim=2)
        if weights.shape != depths.shape:
            raise ValueError(f"weights must have the shape of depths {tuple(depths.shape)}, got {tuple(weights.shape)}")
        if depths.shape[1] < 2:
            raise ValueError(f"depths must have shape (R, S) with S >= 2, got {tuple(depths.shape)}")
        v.check_int(n, "n", 2)
        if not isinstance(stratified, bool):
            raise TypeError(f"stratified must be a bool, got {type(stratified).__name__}")
        v.check_same_device({"depths": depths, "weights": weights})
        _check_generator(generator, depths.device)
        v.check_coordinates(depths, "depths")
        if weights.numel() and v.checking_values() and not bool(((weights >= 0) & weights.isfinite()).all()):
            raise ValueError("weights must be finite and >= 0")
    n = operator.index(n)  # numpy integers too
    name = _resolve(backend, depths.device, "importance_depths")
    t, w = _f32(depths), _f32(weights)
    offset = torch.rand(t.shape[0], generator=generator, device=t.device) if stratified else None
    if name == "torch" or t.shape[0] == 0:
        return importance_depths_reference(t, w, n, 0.5 if offset is None else offset)
    return torch.ops.gpavatar.importance_depths(t, w, n, offset)


def merge_samples(depths_a: torch.Tensor, depths_b: torch.Tensor, *, backend: Optional[str] = None,
                  validate: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two per-ray ascending depth sets into one.

    Args:
        depths_a: (R, Sa), depths_b: (R, Sb), each ascending along the last axis, finite, |t| <= 1e6
            (checked when ``validate``; unchecked NaNs sort last on every backend, like ``torch.sort``)
    Returns:
        depths (R, Sa + Sb) ascending and order (R, Sa + Sb) int64: indices into
        ``cat([a, b], dim=1)`` (equal depths: a's first).  Gather alphas / values with it
        (``torch.gather`` / :func:`gather_samples`): that keeps autograd.
    """
    if validate:
        v.check_tensor(depths_a, "depths_a", "(R, Sa)", ndim=2)
        v.check_tensor(depths_b, "depths_b", f"({depths_a.shape[0]}, Sb)", ndim=2)
        if depths_b.shape[0] != depths_a.shape[0]:
            raise ValueError(f"depths_b must have shape ({depths_a.shape[0]}, Sb), got {tuple(depths_b.shape)}")
        v.check_same_device({"depths_a": depths_a, "depths_b": depths_b})
        _check_ascending(depths_a, "depths_a")
        _check_ascending(depths_b, "depths_b")
    name = _resolve(backend, depths_a.device, "merge_samples")
    a, b = _f32(depths_a), _f32(depths_b)
    if name == "torch" or a.shape[0] == 0:
        return merge_samples_reference(a, b)
    return torch.ops.gpavatar.merge_samples(a, b)


def gather_samples(x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """x: (R, S) or (R, S, C) (the concatenation of both sets), order (R, S) -> x in merged order."""
    if x.dim() == 2:
        return x.gather(1, order)
    return x.gather(1, order[..., None].expand(-1, -1, x.shape[-1]))


class _MergeValues(torch.autograd.Function):
    """Place both sample sets straight into merged order: each element is written once (no
    concatenation, no gather). The order is a permutation per ray, so the backward is a
    plain gather of the gradient (deterministic, no atomics)."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor, order: torch.Tensor):
        R, Sa, Sb = a.shape[0], a.shape[1], b.shape[1]
        S = Sa + Sb
        inverse = torch.empty_like(order)
        inverse.scatter_(1, order, torch.arange(S, device=order.device).expand(R, S))
        rows = (inverse + torch.arange(R, device=order.device)[:, None] * S)
        rows_a, rows_b = rows[:, :Sa].reshape(-1), rows[:, Sa:].reshape(-1)
        tail = a.shape[2:]
        out = a.new_empty((R * S, *tail))
        out.index_copy_(0, rows_a, a.reshape(R * Sa, *tail))
        out.index_copy_(0, rows_b, b.reshape(R * Sb, *tail))
        ctx.save_for_backward(rows_a, rows_b)
        ctx.shapes = (a.shape, b.shape)
        return out.reshape(R, S, *tail)

    @staticmethod
    def backward(ctx, grad):
        rows_a, rows_b = ctx.saved_tensors
        shape_a, shape_b = ctx.shapes
        flat = grad.reshape(-1, *grad.shape[2:])
        grad_a = flat.index_select(0, rows_a).reshape(shape_a) if ctx.needs_input_grad[0] else None
        grad_b = flat.index_select(0, rows_b).reshape(shape_b) if ctx.needs_input_grad[1] else None
        return grad_a, grad_b, None


def merge_values(a: torch.Tensor, b: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Per-sample values of two sample sets in the merged order of :func:`merge_samples`.

    Same result as ``gather_samples(torch.cat([a, b], dim=1), order)`` with half the memory
    traffic; differentiable w.r.t. ``a`` and ``b``.

    Args:
        a: (R, Sa) or (R, Sa, C); b: (R, Sb) or (R, Sb, C), same dtype, device and C
        order: (R, Sa + Sb) int64 from ``merge_samples(depths_a, depths_b)``, a permutation
            of 0 .. Sa + Sb - 1 per ray (index < Sa: from a, else b)
    Returns:
        (R, Sa + Sb) or (R, Sa + Sb, C)
    """
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor) or a.dim() not in (2, 3) \
            or b.dim() != a.dim() or a.shape[0] != b.shape[0] or a.shape[2:] != b.shape[2:]:
        raise ValueError(f"a and b must have shapes (R, Sa[, C]) and (R, Sb[, C]), got "
                         f"{tuple(getattr(a, 'shape', ()))} and {tuple(getattr(b, 'shape', ()))}")
    if a.dtype != b.dtype or a.device != b.device:
        raise TypeError(f"a and b must share dtype and device, got {a.dtype}/{a.device} and {b.dtype}/{b.device}")
    R, S = a.shape[0], a.shape[1] + b.shape[1]
    if not isinstance(order, torch.Tensor) or order.dtype != torch.int64 or tuple(order.shape) != (R, S) \
            or order.device != a.device:
        raise ValueError(f"order must be an int64 tensor of shape ({R}, {S}) on {a.device} (from merge_samples), "
                         f"got {getattr(order, 'dtype', type(order).__name__)} {tuple(getattr(order, 'shape', ()))}")
    return _MergeValues.apply(a, b, order)


# --- torch.library registration ------------------------------------------------------------


def _register() -> None:
    if not (_extension.available() and hasattr(torch.ops.gpavatar, "ray_box")):
        return
    torch.library.register_fake("gpavatar::ray_box")(
        lambda o, d, lo, hi: (o.new_empty(o.shape[:1]), o.new_empty(o.shape[:1]),
                              o.new_empty(o.shape[:1], dtype=torch.bool)))
    torch.library.register_fake("gpavatar::stratified_depths")(
        lambda t0, t1, S, u: t0.new_empty((t0.shape[0], S)))
    torch.library.register_fake("gpavatar::importance_depths")(
        lambda t, w, n, offset: t.new_empty((t.shape[0], n)))
    torch.library.register_fake("gpavatar::merge_samples")(
        lambda a, b: (a.new_empty((a.shape[0], a.shape[1] + b.shape[1])),
                      a.new_empty((a.shape[0], a.shape[1] + b.shape[1]), dtype=torch.int64)))


_register()
