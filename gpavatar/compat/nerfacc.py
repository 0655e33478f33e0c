"""nerfacc 0.5.3's volume-rendering helpers for batched rays, on gpavatar's ops.

The functions GPAvatar's camera code calls, with nerfacc 0.5.3's names, arguments
and return values, for batched (non-packed) tensors: every ray has the same number
of samples, ``(n_rays, n_samples)`` (any leading shape ``(..., n_samples)`` works
where nerfacc's batched form allows it).  Packed / flattened inputs (``packed_info``,
``ray_indices``) raise ``NotImplementedError``, except in
:func:`accumulate_along_rays`, where ``ray_indices`` is a plain scatter-add.

Math (per ray, samples front to back):

* transmittance ``T_i = prod_{j<i} (1 - alpha_j)``, weight ``w_i = alpha_i T_i``
  (:func:`render_weight_from_alpha`; ``exclusive_prod`` is the product part);
* ``accumulate_along_rays(w, v) = sum_i w_i v_i`` (``v = None``: ``sum_i w_i``), shape (n_rays, D);
* :func:`ray_aabb_intersect`: slab test of every ray against every box, then
  ``t_min = max(t_min, near_plane)``, ``t_max = min(t_max, far_plane)`` for hits and
  ``miss_value`` for misses;
* :func:`importance_sampling`: inverse-transform sampling of a piecewise-linear CDF
  given at interval edges (nerfacc's kernel: ``n`` targets
  ``u_i = c_0 + (i + b) (c_last - c_0) / n`` with ``b = 0.5``, or one uniform ``b`` per
  ray when ``stratified``; new edges halfway between the samples, the outer two
  mirrored and clipped to the ray's first / last edge).

    >>> import torch
    >>> from gpavatar.compat import nerfacc
    >>> alphas = torch.tensor([[0.4, 0.8, 0.1]])
    >>> weights, trans = nerfacc.render_weight_from_alpha(alphas)
    >>> [round(x, 3) for x in weights[0].tolist()], [round(x, 2) for x in trans[0].tolist()]
    ([0.4, 0.48, 0.012], [1.0, 0.6, 0.12])
    >>> nerfacc.accumulate_along_rays(weights, None).shape
    torch.Size([1, 1])

Kernels: boxes that are cubes ``[lo, hi]^3`` (GPAvatar's ``[-1, 1]^3``) with float32
rays go through :func:`gpavatar.ops.ray_box` (C++ / CUDA or torch, by ``backend``);
other boxes through the same slab test in torch.  Weights, accumulation and sampling
are a few tensor ops each: they run in torch (the fused compositing kernel,
:func:`gpavatar.ops.composite`, needs colors and alphas together, which nerfacc's
split API never hands over).  Ray-box conventions follow :func:`gpavatar.ops.ray_box`:
touching rays hit, NaN slab distances (an origin on a slab plane with a zero
direction component) impose no constraint, and a ray with no finite entry and exit
(a zero direction) misses, where nerfacc's kernel reports ``(-inf, inf)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from gpavatar import ops
from gpavatar.ops import _validation as v

__version__ = "0.5.3"

__all__ = ["RayIntervals", "RaySamples", "exclusive_prod", "inclusive_prod", "exclusive_sum", "inclusive_sum",
           "render_transmittance_from_alpha", "render_weight_from_alpha", "accumulate_along_rays",
           "ray_aabb_intersect", "importance_sampling"]


def _packed_unsupported(op: str, **given) -> None:
    names = [name for name, value in given.items() if value is not None]
    if names:
        raise NotImplementedError(f"{op}: gpavatar.compat.nerfacc supports batched (n_rays, n_samples) tensors "
                                  f"only; got {', '.join(names)} (packed samples)")


@dataclass
class RaySamples:
    """Sample positions along rays: ``vals`` (n_rays, n_samples) (batched form only here)."""

    vals: torch.Tensor
    packed_info: Optional[torch.Tensor] = None
    ray_indices: Optional[torch.Tensor] = None

    @property
    def device(self) -> torch.device:
        return self.vals.device


@dataclass
class RayIntervals:
    """Interval edges along rays: ``vals`` (n_rays, n_edges); interval k is [vals[k], vals[k + 1]]."""

    vals: torch.Tensor
    packed_info: Optional[torch.Tensor] = None
    ray_indices: Optional[torch.Tensor] = None
    is_left: Optional[torch.Tensor] = None
    is_right: Optional[torch.Tensor] = None

    @property
    def device(self) -> torch.device:
        return self.vals.device


# --- scans along the last axis ------------------------------------------------------------------


def _check_scan(inputs, packed_info, op):
    _packed_unsupported(op, packed_info=packed_info)
    if not isinstance(inputs, torch.Tensor) or inputs.dim() < 1:
        got = tuple(inputs.shape) if isinstance(inputs, torch.Tensor) else type(inputs).__name__
        raise ValueError(f"{op}: inputs must be a tensor of shape (..., n_samples), got {got}")


def inclusive_prod(inputs: torch.Tensor, packed_info: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(..., S) -> (..., S): ``out_i = prod_{j<=i} x_j``."""
    _check_scan(inputs, packed_info, "inclusive_prod")
    return torch.cumprod(inputs, dim=-1)


def exclusive_prod(inputs: torch.Tensor, packed_info: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(..., S) -> (..., S): ``out_i = prod_{j<i} x_j`` (``out_0 = 1``)."""
    _check_scan(inputs, packed_info, "exclusive_prod")
    return torch.cumprod(torch.cat([torch.ones_like(inputs[..., :1]), inputs[..., :-1]], dim=-1), dim=-1)


def inclusive_sum(inputs: torch.Tensor, packed_info: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(..., S) -> (..., S): ``out_i = sum_{j<=i} x_j``."""
    _check_scan(inputs, packed_info, "inclusive_sum")
    return torch.cumsum(inputs, dim=-1)


def exclusive_sum(inputs: torch.Tensor, packed_info: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(..., S) -> (..., S): ``out_i = sum_{j<i} x_j`` (``out_0 = 0``)."""
    _check_scan(inputs, packed_info, "exclusive_sum")
    return torch.cumsum(torch.cat([torch.zeros_like(inputs[..., :1]), inputs[..., :-1]], dim=-1), dim=-1)


# --- weights and accumulation -------------------------------------------------------------------


def render_transmittance_from_alpha(alphas: torch.Tensor, packed_info: Optional[torch.Tensor] = None,
                                    ray_indices: Optional[torch.Tensor] = None, n_rays: Optional[int] = None,
                                    prefix_trans: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Transmittance ``T_i = prod_{j<i} (1 - alpha_j)`` (times ``prefix_trans`` if given).

    Args:
        alphas: (n_rays, n_samples) opacities; prefix_trans: optional, same shape
    Returns:
        (n_rays, n_samples), differentiable w.r.t. alphas
    """
    _packed_unsupported("render_transmittance_from_alpha", packed_info=packed_info, ray_indices=ray_indices)
    _check_scan(alphas, None, "render_transmittance_from_alpha")
    trans = exclusive_prod(1 - alphas)
    if prefix_trans is not None:
        if not isinstance(prefix_trans, torch.Tensor) or prefix_trans.shape != alphas.shape:
            raise ValueError(f"prefix_trans must have the shape of alphas {tuple(alphas.shape)}, got "
                             f"{tuple(getattr(prefix_trans, 'shape', ()))}")
        trans = trans * prefix_trans
    return trans


def render_weight_from_alpha(alphas: torch.Tensor, packed_info: Optional[torch.Tensor] = None,
                             ray_indices: Optional[torch.Tensor] = None, n_rays: Optional[int] = None,
                             prefix_trans: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Compositing weights ``w_i = alpha_i T_i`` and the transmittance ``T_i``.

    Args:
        alphas: (n_rays, n_samples) opacities in [0, 1], sorted front to back
        prefix_trans: optional (n_rays, n_samples) transmittance in front of the samples
    Returns:
        weights (n_rays, n_samples), trans (n_rays, n_samples); differentiable w.r.t. alphas
    """
    trans = render_transmittance_from_alpha(alphas, packed_info, ray_indices, n_rays, prefix_trans)
    return trans * alphas, trans


def accumulate_along_rays(weights: torch.Tensor, values: Optional[torch.Tensor] = None,
                          ray_indices: Optional[torch.Tensor] = None, n_rays: Optional[int] = None) -> torch.Tensor:
    """``sum_i w_i v_i`` per ray (``values=None``: ``sum_i w_i``).

    Args:
        weights: (n_rays, n_samples), or (all_samples,) with ``ray_indices`` and ``n_rays``
        values: (n_rays, n_samples, D) or (all_samples, D), or None
        ray_indices: optional (all_samples,) int64 ray of each flattened sample
        n_rays: number of rays, with ``ray_indices``
    Returns:
        (n_rays, D), D = 1 without values; differentiable w.r.t. weights and values
    """
    if not isinstance(weights, torch.Tensor) or weights.dim() < 1:
        raise ValueError("accumulate_along_rays: weights must be a tensor of shape (n_rays, n_samples) "
                         "or (all_samples,)")
    if values is None:
        src = weights[..., None]
    else:
        if (not isinstance(values, torch.Tensor) or values.dim() != weights.dim() + 1
                or values.shape[:-1] != weights.shape):
            raise ValueError(f"accumulate_along_rays: values must have shape {tuple(weights.shape)} + (D,), got "
                             f"{tuple(getattr(values, 'shape', ()))}")
        src = weights[..., None] * values
    if ray_indices is None:
        if weights.dim() < 2:
            raise ValueError(f"accumulate_along_rays: batched weights must have shape (n_rays, n_samples), got "
                             f"{tuple(weights.shape)} (flattened samples need ray_indices and n_rays)")
        return src.sum(dim=-2)
    if n_rays is None or weights.dim() != 1:
        raise ValueError("accumulate_along_rays: with ray_indices, weights must be flattened (all_samples,) "
                         "and n_rays must be given")
    n_rays = v.check_int(n_rays, "n_rays", 0)
    if not isinstance(ray_indices, torch.Tensor) or ray_indices.shape != weights.shape:
        raise ValueError(f"accumulate_along_rays: ray_indices must have shape {tuple(weights.shape)}")
    out = src.new_zeros((n_rays, src.shape[-1]))
    return out.index_add(0, ray_indices.to(torch.int64), src)


# --- ray-box intersection -----------------------------------------------------------------------


def _slab_test(o: torch.Tensor, d: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor):
    """o, d (R, 3); lo, hi (m, 3) -> t0, t1, hit (R, m): gpavatar.ops.ray_box's test for m boxes."""
    inv = 1.0 / d[:, None, :]
    t_lo = (lo[None] - o[:, None, :]) * inv
    t_hi = (hi[None] - o[:, None, :]) * inv
    negative = torch.signbit(inv)  # d = -0 counts as negative
    enter = torch.where(negative, t_hi, t_lo)
    leave = torch.where(negative, t_lo, t_hi)
    near = torch.full_like(enter[..., 0], -float("inf"))
    far = torch.full_like(enter[..., 0], float("inf"))
    for axis in range(3):  # fmax / fmin: a NaN slab distance imposes no constraint
        near = torch.fmax(near, enter[..., axis])
        far = torch.fmin(far, leave[..., axis])
    hit = (near <= far) & (far > 0) & near.isfinite() & far.isfinite()
    return near, far, hit


def _cube_bounds(aabbs: torch.Tensor):
    """[(lo, hi)] floats when every box is a cube [lo, hi]^3 with lo < hi, else None."""
    rows = aabbs.detach().cpu().tolist()
    cubes = []
    for row in rows:
        lo, hi = row[0], row[3]
        if not (row[0] == row[1] == row[2] and row[3] == row[4] == row[5] and lo < hi):
            return None
        if not max(abs(lo), abs(hi)) <= v.MAX_ABS_COORD:
            return None
        cubes.append((lo, hi))
    return cubes


@torch.no_grad()
def ray_aabb_intersect(rays_o: torch.Tensor, rays_d: torch.Tensor, aabbs: torch.Tensor,
                       near_plane: float = -float("inf"), far_plane: float = float("inf"),
                       miss_value: float = float("inf"), *, backend: Optional[str] = None):
    """Entry and exit depths of every ray in every axis-aligned box.

    Args:
        rays_o: (n_rays, 3) origins; rays_d: (n_rays, 3) directions (depths are in units of |d|)
        aabbs: (m, 6) boxes {xmin, ymin, zmin, xmax, ymax, zmax}
        near_plane, far_plane: clamp the depths of hits to [near_plane, far_plane]
        miss_value: t_min and t_max of a miss
        backend: gpavatar's backend for the cube-box kernel path
    Returns:
        t_mins (n_rays, m), t_maxs (n_rays, m), hits (n_rays, m) bool; not differentiable
    """
    v.check_tensor(rays_o, "rays_o", "(n_rays, 3)", ndim=2, last=3)
    v.check_tensor(rays_d, "rays_d", f"({rays_o.shape[0]}, 3)", ndim=2, last=3)
    v.check_tensor(aabbs, "aabbs", "(m, 6)", ndim=2, last=6)
    if rays_d.shape[0] != rays_o.shape[0]:
        raise ValueError(f"rays_d must have shape ({rays_o.shape[0]}, 3) like rays_o, got {tuple(rays_d.shape)}")
    v.check_same_device({"rays_o": rays_o, "rays_d": rays_d, "aabbs": aabbs})
    for name, value in (("near_plane", near_plane), ("far_plane", far_plane), ("miss_value", miss_value)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    R, m = rays_o.shape[0], aabbs.shape[0]
    dtype = torch.promote_types(rays_o.dtype, rays_d.dtype)
    cubes = _cube_bounds(aabbs) if dtype == torch.float32 and R and m else None
    if cubes is not None and max(float(rays_o.abs().amax()), float(rays_d.abs().amax())) <= v.MAX_ABS_COORD:
        hits = [ops.ray_box(rays_o, rays_d, lo, hi, backend=backend, validate=False) for lo, hi in cubes]
        t0, t1, hit = (torch.stack(parts, dim=1) for parts in zip(*hits))
    else:
        box = aabbs.to(dtype)
        t0, t1, hit = _slab_test(rays_o.to(dtype), rays_d.to(dtype), box[:, :3], box[:, 3:])
    miss = torch.full_like(t0, float(miss_value))
    t_mins = torch.where(hit, t0.clamp(min=float(near_plane)), miss)
    t_maxs = torch.where(hit, t1.clamp(max=float(far_plane)), miss)
    return t_mins, t_maxs, hit


# --- importance sampling ------------------------------------------------------------------------


@torch.no_grad()
def importance_sampling(intervals: RayIntervals, cdfs: torch.Tensor, n_intervals_per_ray: int,
                        stratified: bool = False, *, generator: Optional[torch.Generator] = None
                        ) -> tuple[RayIntervals, RaySamples]:
    """Resample every ray into ``n`` intervals by inverting the CDF given at its edges.

    For target ``u`` the knots ``p - 1, p`` around it are found with ``cdf[p - 1] <= u < cdf[p]``
    (clamped to the ray) and ``t = (u - c_{p-1}) (t_p - t_{p-1}) / (c_p - c_{p-1}) + t_{p-1}``,
    or the knots' midpoint when ``c_p - c_{p-1} < 1e-10``.  ``stratified`` draws one uniform
    ``b`` in [0, 1) per ray from ``generator`` (nerfacc's CUDA draw is in (0, 1]).

    Args:
        intervals: RayIntervals with batched ``vals`` (..., n_edges), ascending
        cdfs: (..., n_edges) non-decreasing CDF at those edges
        n_intervals_per_ray: n >= 2 (an int: the batched form)
        stratified: jittered targets (training) instead of centred ones
    Returns:
        RayIntervals with vals (..., n + 1) and RaySamples with vals (..., n); not differentiable

    GPAvatar's fine depths: ``cdfs = cumsum(w + 1e-5) / sum(w + 1e-5)`` at the coarse depths,
    then the midpoints of the returned intervals (:func:`gpavatar.ops.importance_depths` fuses it).
    """
    if isinstance(intervals, torch.Tensor):
        intervals = RayIntervals(vals=intervals)
    if not isinstance(intervals, RayIntervals):
        raise TypeError(f"importance_sampling: intervals must be a RayIntervals, got {type(intervals).__name__}")
    _packed_unsupported("importance_sampling", packed_info=intervals.packed_info, ray_indices=intervals.ray_indices)
    if isinstance(n_intervals_per_ray, torch.Tensor):
        raise NotImplementedError("importance_sampling: a tensor n_intervals_per_ray gives packed output, which "
                                  "gpavatar.compat.nerfacc does not support; pass an int")
    n = v.check_int(n_intervals_per_ray, "n_intervals_per_ray", 2)
    if not isinstance(stratified, bool):
        raise TypeError(f"importance_sampling: stratified must be a bool, got {type(stratified).__name__}")
    vals = intervals.vals
    v.check_tensor(vals, "intervals.vals", "(..., n_edges)")
    v.check_tensor(cdfs, "cdfs", f"{tuple(vals.shape)}")
    if vals.dim() < 1 or vals.shape[-1] < 1 or cdfs.shape != vals.shape:
        raise ValueError(f"importance_sampling: cdfs must have the shape of intervals.vals (..., n_edges >= 1), "
                         f"got {tuple(cdfs.shape)} and {tuple(vals.shape)}")
    v.check_same_device({"intervals.vals": vals, "cdfs": cdfs})
    if generator is not None and generator.device.type != vals.device.type:
        raise ValueError(f"generator must be on the intervals' device ({vals.device}), got {generator.device}")
    lead, E = vals.shape[:-1], vals.shape[-1]
    t = vals.reshape(-1, E)
    c = cdfs.to(t.dtype).reshape(-1, E)
    if c.numel() and not bool((c.isfinite().all()) & ((c[:, 1:] >= c[:, :-1]).all())):
        raise ValueError("importance_sampling: cdfs must be finite and non-decreasing along the last axis")
    R = t.shape[0]
    step = (c[:, -1] - c[:, 0]) / n
    bias = (torch.rand(R, generator=generator, device=t.device, dtype=t.dtype)[:, None] if stratified else 0.5)
    sid = torch.arange(n, device=t.device, dtype=t.dtype)
    u = c[:, :1] + (sid + bias) * step[:, None]
    # upper bound over the first E - 1 knots: cdf[p - 1] <= u < cdf[p], p in [0, E - 1]
    p = torch.searchsorted(c[:, :-1].contiguous(), u.contiguous(), right=True)
    p0, p1 = (p - 1).clamp(0, E - 1), p.clamp(0, E - 1)
    u_lo, u_hi = c.gather(1, p0), c.gather(1, p1)
    t_lo, t_hi = t.gather(1, p0), t.gather(1, p1)
    flat = (u_hi - u_lo) < 1e-10
    scale = (t_hi - t_lo) / torch.where(flat, torch.ones_like(u_hi), u_hi - u_lo)
    samples = torch.where(flat, (t_lo + t_hi) * 0.5, (u - u_lo) * scale + t_lo)
    first = torch.fmax(samples[:, :1] - (samples[:, 1:2] - samples[:, :1]) * 0.5, t[:, :1])
    last = torch.fmin(samples[:, -1:] + (samples[:, -1:] - samples[:, -2:-1]) * 0.5, t[:, -1:])
    edges = torch.cat([first, (samples[:, 1:] + samples[:, :-1]) * 0.5, last], dim=1)
    return RayIntervals(vals=edges.reshape(*lead, n + 1)), RaySamples(vals=samples.reshape(*lead, n))

