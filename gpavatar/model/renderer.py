"""Volume renderer (SPEC sections 7 and 8): camera rays, coarse + importance samples, compositing.

A pure composition of the public ops ``ray_box``, ``stratified_depths``,
``importance_depths``, ``merge_samples``, ``merge_values`` and ``composite``
(each dispatched with the renderer's ``backend``); the field (tri-planes + PEF +
decoder, or anything else) is a callable supplied per call.

Camera convention.  ``transform`` is the (B, 3, 4) world-to-camera ``[R|T]`` that the
official tracker produces, in PyTorch3D's *row-vector* convention
``X_cam = X_world · R + T``.  Hence the camera centre (``X_cam = 0``) is
``-T · Rᵀ`` as a row, i.e. ``origin = -R · T`` as a column, and a camera-space
direction ``d_cam`` maps to the world direction ``R · d_cam``: exactly SPEC section 7's
"dir = normalize(R·d_cam), origin = −R·T".  The camera looks along its +z axis; pixel
column ``j`` has ``x = 1 - 2j/(W-1)`` and row ``i`` has ``y = 1 - 2i/(H-1)`` (both
``linspace(1, -1)``, "xy" indexing), ``d_cam = (x/f, y/f, 1)``.  Example: ``R = I``,
``T = (0, 0, 9)`` puts the camera at ``(0, 0, -9)`` looking at the origin along +z; with
``f = 12`` its corner rays spread by 1/12 per unit depth, so the box [-1, 1]^3 fills the
whole view.

    >>> import torch
    >>> from gpavatar.model.renderer import VolumeRenderer, inside_box
    >>> def field(coords, dirs):  # a solid unit ball of alpha 0.2, white
    ...     a = 0.2 * (coords.norm(dim=-1) < 1).float()
    ...     return a, torch.ones(*a.shape, 3), None
    >>> out = VolumeRenderer(image_size=8, n_coarse=8, n_fine=8)(field, torch.tensor([[[1., 0, 0, 0],
    ...                                                                              [0, 1, 0, 0],
    ...                                                                              [0, 0, 1, 9]]]))
    >>> out["fine"].shape, out["depth"].shape, out["coarse_alphas"].shape
    (torch.Size([1, 3, 8, 8]), torch.Size([1, 1, 8, 8]), torch.Size([1, 64, 8]))

Field contract: ``field(coords (B, N, 3), dirs (B, N, 3)) -> (alpha (B, N), value (B, N, C),
extras)`` with alpha in [0, 1] (not checked: the renderer does no host sync), where N = H·W·S,
samples ray-major (sample ``s`` of ray ``r`` at ``r·S + s``, rays
row-major over the image) and ``dirs`` the unit world direction of each sample's ray.  A field
with the attribute ``ray_directions = True`` gets ``dirs`` of shape (B, H·W, 3) instead: one
direction per ray, for its S consecutive samples (the model's field: its direction terms are
then computed once per ray, not once per sample).  It is
called exactly twice per forward: once with all coarse samples of all rays, once with all
fine samples (the official PEF's ``"queries"`` normalization sums over the whole set, so
the passes must not be chunked).

Missed rays.  A ray that misses the box gets ``t0 = t1 = -1``, so all its samples sit at
depth -1, i.e. at ``origin - dir``, outside the box.  The renderer does not zero their
density: the field decides.  The official decoder sets the density to 0 for every point
not strictly inside (-1, 1)^3 (SPEC section 6); :func:`inside_box` gives that mask for a
field to apply.

Depth.  ``depth`` is the official map: ``Σ w t + (1 − opacity)·t_max`` where ``t_max`` is ONE
scalar, the largest sample depth over all samples of all rays of the batch (so the
transparent part of every ray, and the whole of a ray that misses the box, is filled with
the far end), then min–max normalized over the whole batch.  It is batch-relative: the same
frame rendered in another batch, or next to another camera, gets another map.  For a
comparable, metric depth use ``depth_expected`` = ``Σ w t`` (per ray, no fill, not
normalized) with ``opacity``: ``depth_expected / opacity`` is the expected depth of the
visible surface along the ray where ``opacity > 0`` (0 and 0 for a miss).

Gradients flow from every image to the field's alphas and values of both passes (the
coarse samples are merged into the fine image); sample positions are sampling decisions:
the coords / dirs handed to the field do not require grad, and the importance sampling
uses the detached coarse weights.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, NamedTuple, Optional

import torch
from torch import nn

from gpavatar import ops
from gpavatar.model.recompute import recomputed
from gpavatar.ops import _validation as v
from gpavatar.ops._backend import needs_grad
from gpavatar.ops.knn import cpu_list_cache

__all__ = ["VolumeRenderer", "RayBatch", "inside_box", "pixel_grid", "camera_rays"]

Field = Callable[[torch.Tensor, torch.Tensor], tuple]


def inside_box(coords: torch.Tensor, box_min: float = -1.0, box_max: float = 1.0) -> torch.Tensor:
    """(..., 3) -> (...) bool: every coordinate strictly inside (box_min, box_max).

    The official decoder multiplies its density by this mask (SPEC section 6)."""
    return ((coords > box_min) & (coords < box_max)).all(dim=-1)


def pixel_grid(height: int, width: int, focal: float, *, dtype=torch.float32, device=None) -> torch.Tensor:
    """Camera-space ray directions (H·W, 3), row-major: pixel (i, j) at i·W + j is
    ``(x_j / f, y_i / f, 1)`` with ``x_j = 1 - 2j/(W-1)`` and ``y_i = 1 - 2i/(H-1)``
    (a single row / column sits at 1)."""
    xs = torch.linspace(1.0, -1.0, width, dtype=torch.float64, device=device)
    ys = torch.linspace(1.0, -1.0, height, dtype=torch.float64, device=device)
    x, y = torch.meshgrid(xs, ys, indexing="xy")  # (H, W) each
    d = torch.stack([x / focal, y / focal, torch.ones_like(x)], dim=-1)
    return d.reshape(height * width, 3).to(dtype)


def check_transform(transform, values: bool = True) -> None:
    """Shape and dtype of ``transform`` (B, 3, 4); with ``values`` also finiteness (one host sync)."""
    v.check_tensor(transform, "transform", "(B, 3, 4) world-to-camera [R|T]", ndim=3)
    if transform.shape[1:] != (3, 4) or transform.shape[0] == 0:
        raise ValueError(f"transform must have shape (B, 3, 4) with B >= 1 (world-to-camera [R|T]), "
                         f"got {tuple(transform.shape)}")
    if values and v.checking_values() and not bool(transform.detach().isfinite().all()):
        raise ValueError("transform must be finite")


def camera_rays(transform: torch.Tensor, cam_dirs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """World rays of the camera ``transform`` (B, 3, 4) for camera-space directions (N, 3).

    Returns:
        origins (B, N, 3) = -R·T (one per camera, expanded) and dirs (B, N, 3) = normalize(R·d_cam).
    """
    R, T = transform[:, :, :3], transform[:, :, 3]
    dirs = torch.einsum("bij,nj->bni", R, cam_dirs.to(transform.dtype))
    dirs = dirs / dirs.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    origins = -(R @ T[:, :, None])[:, :, 0]
    return origins[:, None, :].expand_as(dirs), dirs


class RayBatch(NamedTuple):
    """The rays of one forward: ``origins`` / ``dirs`` (B·H·W, 3) as given by :meth:`VolumeRenderer.rays`
    (transform dtype), ``origins32`` / ``dirs32`` the same detached in float32 (sample positions are
    computed from these), ``batch`` B."""

    origins: torch.Tensor
    dirs: torch.Tensor
    origins32: torch.Tensor
    dirs32: torch.Tensor
    batch: int


class VolumeRenderer(nn.Module):
    """GPAvatar's NeRF renderer: coarse stratified pass, importance pass, merged composite.

    Args:
        image_size: rays per side (H = W), 128 in the paper
        focal: focal length in normalized image units (12.0)
        n_coarse, n_fine: samples per ray of each pass (32 + 32)
        box: (box_min, box_max) of the volume cube [-1, 1]^3
        backend: kernel backend of every op (None: ``$GPAVATAR_BACKEND`` or auto)
    """

    def __init__(self, image_size: int = 128, focal: float = 12.0, n_coarse: int = 32, n_fine: int = 32,
                 box: tuple[float, float] = (-1.0, 1.0), backend: Optional[str] = None):
        super().__init__()
        v.check_int(image_size, "image_size", 1)
        v.check_int(n_coarse, "n_coarse", 2)
        v.check_int(n_fine, "n_fine", 2)
        if isinstance(focal, bool) or not isinstance(focal, (int, float)) or not float(focal) > 0:
            raise ValueError(f"focal must be a positive float, got {focal!r}")
        if len(box) != 2 or not float(box[0]) < float(box[1]):
            raise ValueError(f"box must be (box_min, box_max) with box_min < box_max, got {box!r}")
        if backend is not None and backend not in ops.BACKENDS:
            raise ValueError(f"backend must be None or one of {ops.BACKENDS}, got {backend!r}")
        self.image_size, self.focal = image_size, float(focal)
        self.n_coarse, self.n_fine = n_coarse, n_fine
        self.box = (float(box[0]), float(box[1]))
        self.backend = backend
        self.register_buffer("cam_dirs", pixel_grid(image_size, image_size, self.focal), persistent=False)

    def rays(self, transform: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, 4) -> world origins (B, H·W, 3), unit dirs (B, H·W, 3), row-major pixels."""
        check_transform(transform)
        return camera_rays(transform, self.cam_dirs.to(transform.device))

    def _query(self, field: Field, o: torch.Tensor, d: torch.Tensor, t: torch.Tensor, B: int, which: str):
        """Field at o + t d for depths t (R, S): alpha (R, S), value (R, S, C), extras."""
        R, S = t.shape
        coords = (o[:, None, :] + t[..., None] * d[:, None, :]).reshape(B, R // B * S, 3)
        if getattr(field, "ray_directions", False):
            dirs = d.reshape(B, R // B, 3)  # one per ray (module docstring)
        else:
            dirs = d[:, None, :].expand(R, S, 3).reshape(B, R // B * S, 3)
        out = field(coords, dirs)
        if not isinstance(out, (tuple, list)) or len(out) != 3:
            raise TypeError(f"field must return (alpha, value, extras), got {type(out).__name__}")
        alpha, value, extras = out
        N = coords.shape[1]
        if not isinstance(alpha, torch.Tensor) or tuple(alpha.shape) != (B, N):
            raise ValueError(f"field's alpha ({which} pass) must have shape ({B}, {N}), "
                             f"got {tuple(getattr(alpha, 'shape', ()))}")
        if not isinstance(value, torch.Tensor) or value.dim() != 3 or tuple(value.shape[:2]) != (B, N):
            raise ValueError(f"field's value ({which} pass) must have shape ({B}, {N}, C), "
                             f"got {tuple(getattr(value, 'shape', ()))}")
        return alpha.reshape(R, S), value.reshape(R, S, value.shape[-1]), extras

    def forward(self, field: Field, transform: torch.Tensor, *, stratified: bool = False,
                generator: Optional[torch.Generator] = None, validate: bool = True) -> dict[str, Any]:
        """Render ``field`` from the cameras ``transform``.

        Args:
            field: ``field(coords (B, N, 3), dirs (B, N, 3)) -> (alpha (B, N), value (B, N, C), extras)``
            transform: (B, 3, 4) world-to-camera [R|T] (module docstring)
            stratified: training mode: jittered coarse edges and one random importance offset per
                ray (evaluation: no jitter, offset 0.5)
            generator: torch.Generator on the transform's device for the random draws
            validate: check the transform's values (one host sync); False when the caller has
                checked them (the real-time path: a frame without host sync, CUDA graphs)
        Returns:
            dict with ``coarse`` (B, C, H, W) coarse-pass image, ``fine`` (B, C, H, W) image of the
            merged coarse + fine samples, ``opacity`` (B, 1, H, W) of the merged pass, ``depth``
            (B, 1, H, W) = Σ w t + (1 - opacity)·t_max with t_max the largest sample depth of the
            whole batch (one scalar), min-max normalized over the batch (the official map),
            ``depth_raw`` the same before normalization, ``depth_expected`` (B, 1, H, W) = Σ w t in
            world units (per ray, comparable between frames; divide by ``opacity`` for the
            surface depth), ``coarse_alphas`` (B, H·W, n_coarse) and ``extras`` =
            {"coarse": ..., "fine": ...} as returned by the field.
        """
        rays, coarse_t = self.coarse_samples(transform, stratified=stratified, generator=generator,
                                             validate=validate)
        with cpu_list_cache() if transform.device.type == "cpu" else contextlib.nullcontext():
            # (the two passes' CPU KNN on the same points: one list build)
            alpha_c, value_c, extras_c = self.query(field, rays, coarse_t, "coarse")
            coarse, fine_t = self.fine_samples(coarse_t, alpha_c, value_c, stratified=stratified,
                                               generator=generator)
            alpha_f, value_f, extras_f = self.query(field, rays, fine_t, "fine")
        out = self.composite_samples(coarse_t, alpha_c, value_c, fine_t, alpha_f, value_f, coarse.color,
                                     rays.batch)
        out["extras"] = {"coarse": extras_c, "fine": extras_f}
        return out

    # The stages of forward, in order (the real-time path runs and times them one by one).  The
    # ops below only see rays from a checked (finite) transform, tensors made by the ops before
    # them and the field's outputs (shapes checked in query; alphas are in [0, 1] by the field
    # contract): their value checks (host syncs) are skipped, so a frame needs no host sync.

    def coarse_samples(self, transform: torch.Tensor, *, stratified: bool = False,
                       generator: Optional[torch.Generator] = None,
                       validate: bool = True) -> tuple[RayBatch, torch.Tensor]:
        """Stage 1: camera rays and the coarse depths (B·H·W, n_coarse) (jittered when ``stratified``)."""
        if not isinstance(stratified, bool):
            raise TypeError(f"stratified must be a bool, got {type(stratified).__name__}")
        if validate:
            origins, dirs = self.rays(transform)
        else:
            check_transform(transform, values=False)
            origins, dirs = camera_rays(transform, self.cam_dirs.to(transform.device))
        B, HW = dirs.shape[:2]
        o, d = origins.reshape(B * HW, 3), dirs.reshape(B * HW, 3)
        lo, hi = self.box
        internal = dict(backend=self.backend, validate=False)
        t0, t1, _ = ops.ray_box(o, d, lo, hi, **internal)
        coarse_t = ops.stratified_depths(t0, t1, self.n_coarse, jitter=stratified, generator=generator,
                                         **internal)
        # Sample positions are computed in float32 like the depths (the ops' contract).
        return RayBatch(o, d, o.detach().float(), d.detach().float(), B), coarse_t

    def query(self, field: Field, rays: RayBatch, t: torch.Tensor, which: str):
        """Stages 2 and 4: the field at ``origins + t dirs`` for depths t (R, S): alpha (R, S),
        value (R, S, C), extras."""
        return self._query(field, rays.origins32, rays.dirs32, t, rays.batch, which)

    def fine_samples(self, coarse_t: torch.Tensor, alpha_c: torch.Tensor, value_c: torch.Tensor, *,
                     stratified: bool = False, generator: Optional[torch.Generator] = None):
        """Stage 3: composite of the coarse pass and the importance depths (R, n_fine) drawn from
        its detached weights.  Returns (coarse CompositeResult, fine depths)."""
        internal = dict(backend=self.backend, validate=False)
        coarse = ops.composite(alpha_c, value_c, **internal)
        fine_t = ops.importance_depths(coarse_t, coarse.weights.detach(), self.n_fine, stratified=stratified,
                                       generator=generator, **internal)
        return coarse, fine_t

    def composite_samples(self, coarse_t: torch.Tensor, alpha_c: torch.Tensor, value_c: torch.Tensor,
                          fine_t: torch.Tensor, alpha_f: torch.Tensor, value_f: torch.Tensor,
                          coarse_color: torch.Tensor, B: int) -> dict[str, Any]:
        """Stage 5: merge both passes by depth, composite, depth maps; the images of :meth:`forward`
        (without ``extras``)."""
        internal = dict(backend=self.backend, validate=False)
        Hs = Ws = self.image_size
        HW = Hs * Ws
        depths, order = ops.merge_samples(coarse_t, fine_t, **internal)
        if needs_grad([alpha_c, value_c, alpha_f, value_f]):
            alphas = ops.merge_values(alpha_c, alpha_f.to(alpha_c.dtype), order)
            # Training keeps the passes' values (the coarse composite keeps value_c anyway), not their
            # merged copy: the backward merges them again (gpavatar.model.recompute).
            fine = recomputed(lambda a, b: ops.merge_values(a, b, order), (value_c, value_f.to(value_c.dtype)),
                              lambda values: ops.composite(alphas, values, depths, **internal), make_saves=False)
        else:
            # Inference: the compositing kernel reads both passes' samples where they lie (no merged
            # copies of the (R, 64, 32) values and of the alphas; the same bits).
            fine = ops.composite_merged(alpha_c, value_c, alpha_f, value_f, order, depths, **internal)

        opacity = fine.opacity
        # The official fill: one scalar for the whole batch (not each ray's own maximum).
        t_max = depths.max().to(opacity.dtype)
        depth_raw = fine.depth + (1 - opacity) * t_max
        d_lo, d_hi = depth_raw.min(), depth_raw.max()
        # Official: no guard (a constant map gives 0/0 = NaN); here a constant map gives 0.
        depth = (depth_raw - d_lo) / (d_hi - d_lo).clamp_min(1e-12)

        def image(x: torch.Tensor) -> torch.Tensor:  # (B·H·W, C) -> (B, C, H, W)
            return x.reshape(B, Hs, Ws, x.shape[-1]).permute(0, 3, 1, 2)

        return {
            "coarse": image(coarse_color),
            "fine": image(fine.color),
            "depth": image(depth[:, None]),
            "depth_raw": image(depth_raw[:, None]),
            "depth_expected": image(fine.depth[:, None]),
            "opacity": image(opacity[:, None]),
            "coarse_alphas": alpha_c.reshape(B, HW, self.n_coarse),
        }

    def extra_repr(self) -> str:
        return (f"image_size={self.image_size}, focal={self.focal:g}, n_coarse={self.n_coarse}, "
                f"n_fine={self.n_fine}, box={self.box}, backend={self.backend!r}")
