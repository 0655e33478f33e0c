"""The GPAvatar model (SPEC section 1): source images -> tri-plane avatar -> rendered frames.

Two stages, so driving many frames re-uses the avatar:

* :meth:`GPAvatar.build_avatar` (once per source set): flip the sources along the height
  axis, encode each with ``style_tplane`` (a StyleUNet) into 3 planes of C channels, fuse the V
  sources with multi tri-plane attention (``attn_module`` with the learned
  ``query_style_tplane``), keep the planes channels-last.
* :meth:`GPAvatar.render` (per frame): FLAME points (B, 5023, 3) (already x5) and the camera
  [R|T] (B, 3, 4) -> volume rendering of the field ``nerf_mlp`` (tri-plane + PEF + decoder) at
  ``render_size``² -> super-resolution with ``up_renderer`` to ``output_size``².

Module names are those of the official state dict (``style_tplane``, ``nerf_mlp``,
``up_renderer``, ``query_style_tplane``, ``attn_module``); the checkpoint I/O lives in
:mod:`gpavatar.model.checkpoint`.

    >>> import torch
    >>> from gpavatar.model import GPAvatar
    >>> model = GPAvatar("tiny").eval()
    >>> avatar = model.build_avatar(torch.rand(1, 2, 3, 64, 64))   # B = 1, V = 2 sources
    >>> camera = torch.tensor([[[1., 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 9]]])
    >>> points = torch.rand(1, 5023, 3) - 0.5
    >>> out = model.render(avatar, points, camera)
    >>> out["image"].shape, out["fine"].shape
    (torch.Size([1, 3, 64, 64]), torch.Size([1, 8, 16, 16]))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from torch import nn

from gpavatar.model.checkpoint import CheckpointMixin
from gpavatar.model.config import GPAvatarConfig
from gpavatar.model.decoder import PointsDecoder
from gpavatar.model.mta import MultiTriplaneAttention
from gpavatar.model.renderer import VolumeRenderer, check_transform
from gpavatar.model.style_unet import StyleUNet
from gpavatar.ops._validation import checking_values
from gpavatar.ops.knn import share_setting


@dataclass
class Avatar:
    """What :meth:`GPAvatar.build_avatar` returns.

    planes: (B, 3, H, W, C) channels-last fused tri-planes (the model's parameter dtype)
    attention: (B, 3, V, H, W) MTA weights per texel, or None (not requested / V = 1)
    num_sources: V
    """

    planes: torch.Tensor
    attention: Optional[torch.Tensor]
    num_sources: int

    @property
    def batch_size(self) -> int:
        return self.planes.shape[0]

    def planes_channels_first(self) -> torch.Tensor:
        """(B, 3, C, H, W) view of the planes."""
        return self.planes.permute(0, 1, 4, 2, 3)


class GPAvatar(CheckpointMixin, nn.Module):
    """GPAvatar with gpavatar's kernels as the backend.

    Args:
        config: a :class:`GPAvatarConfig`, a preset name ("paper", "tiny") or None (paper)
        **overrides: fields replaced in the config
    """

    def __init__(self, config: Union[GPAvatarConfig, str, None] = None, **overrides: Any):
        super().__init__()
        if config is None or isinstance(config, str):
            config = GPAvatarConfig.preset(config or "paper", **overrides)
        elif isinstance(config, GPAvatarConfig):
            config = config.replace(**overrides) if overrides else config
        else:
            raise TypeError(f"config must be a GPAvatarConfig or a preset name, got {type(config).__name__}")
        self.config = c = config
        C = c.plane_channels
        self.style_tplane = StyleUNet(c.image_size, c.plane_size, 3, 3 * C, c.num_style_feat, c.num_mlp,
                                      activation=False, narrow=c.encoder_narrow)
        self.nerf_mlp = PointsDecoder(C, c.num_points, c.point_feature_dim, c.pef_dim, c.K, c.pef_normalize,
                                      c.pef_eps, c.decoder_hidden, c.value_hidden, c.render_channels, c.backend)
        self.up_renderer = StyleUNet(c.output_size, c.output_size, c.render_channels, 3, c.num_style_feat,
                                     c.num_mlp, activation=True, narrow=c.sr_narrow)
        self.query_style_tplane = nn.Parameter(torch.randn(1, 1, 3, C, c.plane_size, c.plane_size))
        self.attn_module = MultiTriplaneAttention(C)
        self.renderer = VolumeRenderer(c.render_size, c.focal, c.n_coarse, c.n_fine, backend=c.backend)

    # -- run-time switches -------------------------------------------------------------
    def set_backend(self, backend: Optional[str]) -> "GPAvatar":
        """Kernel backend of every op (None: ``$GPAVATAR_BACKEND`` or auto)."""
        self.config = self.config.replace(backend=backend)
        self.nerf_mlp.backend = backend
        self.renderer.backend = backend
        return self

    def set_noise(self, noise: str) -> "GPAvatar":
        """StyleGAN noise setting: "auto" | "fresh" | "stored" | "off" (see GPAvatarConfig)."""
        self.config = self.config.replace(noise=noise)
        return self

    def noise_mode(self) -> str:
        """The StyleUNets' noise for the current call: "auto" means fresh in training, stored in eval."""
        if self.config.noise == "auto":
            return "fresh" if self.training else "stored"
        return self.config.noise

    # -- stage 1: the avatar -----------------------------------------------------------
    def _check_images(self, images) -> None:
        S = self.config.image_size
        if not isinstance(images, torch.Tensor) or images.dim() != 5 or images.shape[2] != 3 \
                or images.shape[3:] != (S, S):
            raise ValueError(f"images must have shape (B, V, 3, {S}, {S}) (source images in [0, 1]), "
                             f"got {tuple(getattr(images, 'shape', ()))}")
        if not images.is_floating_point():
            raise TypeError(f"images must be floating point in [0, 1], got {images.dtype}")
        if images.shape[0] == 0 or images.shape[1] == 0:
            raise ValueError(f"images must hold at least one batch element and one source, got "
                             f"{tuple(images.shape)}")
        if checking_values() and not bool(torch.isfinite(images.detach()).all()):
            raise ValueError("images must be finite (source images in [0, 1]); they hold NaN or inf values")

    def _check_frame_values(self, points: torch.Tensor, transform: torch.Tensor) -> None:
        """One host sync: ``points`` finite, the rotation part R of ``transform`` a rotation (R Rᵀ = I
        within 1e-2, loose enough for bf16; a zero or scaled R would give degenerate rays)."""
        if not checking_values():
            return
        R = transform.detach()[:, :, :3].float()
        eye = torch.eye(3, device=R.device)
        deviation = (R @ R.transpose(1, 2) - eye).abs().amax()
        points_finite, deviation = torch.stack([torch.isfinite(points.detach()).all().float(),
                                                deviation]).tolist()
        if not points_finite:
            raise ValueError("points must be finite (FLAME vertices x flame_scale); they hold NaN or inf values")
        if not deviation <= 1e-2:  # NaN compares False
            raise ValueError(f"transform must be [R|T] with R a rotation (R Rᵀ = I), got max |R Rᵀ - I| = "
                             f"{deviation:.3g}: a degenerate camera (e.g. an all-zero rotation)")

    def build_avatar(self, images: torch.Tensor, *, single_source: bool = False, return_attention: bool = False,
                     generator: Optional[torch.Generator] = None) -> Avatar:
        """Encode and fuse the source images.

        Args:
            images: (B, V, 3, S, S) warped source images in [0, 1] (S = ``image_size``)
            single_source: keep only the first source and skip MTA (the training shortcut)
            return_attention: also return the MTA weights (B, 3, V, H, W)
            generator: RNG for fresh StyleGAN noise
        Returns:
            :class:`Avatar` with channels-last planes (B, 3, H, W, C).
        """
        self._check_images(images)
        B, V = images.shape[:2]
        C, H = self.config.plane_channels, self.config.plane_size
        dtype = self.query_style_tplane.dtype
        if single_source:
            images, V = images[:, :1], 1
        x = images.flip(-2).reshape(B * V, 3, *images.shape[3:]).to(dtype)
        key = self.style_tplane(x, noise=self.noise_mode(), generator=generator).reshape(B, V, 3, C, H, H)
        if V == 1 and not return_attention:
            # Softmax over one source is exactly 1: MTA is the identity (bit for bit).
            planes = key[:, 0].permute(0, 1, 3, 4, 2).contiguous()
            return Avatar(planes, None, 1)
        fused = self.attn_module(self.query_style_tplane.to(key.dtype), key, return_attention=return_attention)
        fused, attention = fused if return_attention else (fused, None)
        # MTA writes channels-last storage: this permute + contiguous does not copy.
        return Avatar(fused.permute(0, 1, 3, 4, 2).contiguous(), attention, V)

    # -- stage 2: frames ---------------------------------------------------------------
    def field(self, avatar: Avatar, points: torch.Tensor, *, validate: bool = True):
        """The field callable the renderer queries: (coords, dirs) -> (alpha, value, None), with
        ``dirs`` one direction per ray (``ray_directions``: the decoder's direction terms per ray).
        ``validate=False`` skips the value checks of coords and points (host syncs) for callers
        that checked them (the real-time path).  With ``$GPAVATAR_KNN_SHARE=1`` the first call
        builds the PEF's KNN lists of ``points`` over its samples' box (``ops.knn_index``) and every
        call searches them: the fine pass skips its own build (its samples lie on the coarse pass's
        rays; any outside the box are still exact, by the brute-force scan)."""
        planes, chunk = avatar.planes, self.config.query_chunk
        shared: dict[str, Any] = {"index": None, "built": not share_setting()}

        def query(coords: torch.Tensor, dirs: torch.Tensor):
            if not shared["built"]:
                shared["built"] = True
                shared["index"] = self.nerf_mlp.knn_index(points, coords)
            if shared["index"] is not None:
                alpha, value = self.nerf_mlp(coords, dirs, planes, points, chunk=chunk, validate=validate,
                                             knn_index=shared["index"])
            elif validate:
                alpha, value = self.nerf_mlp(coords, dirs, planes, points, chunk=chunk)
            else:
                alpha, value = self.nerf_mlp(coords, dirs, planes, points, chunk=chunk, validate=False)
            return alpha, value, None

        query.ray_directions = True  # the renderer hands one direction per ray (renderer.py)
        return query

    def realtime(self, avatar: Avatar, batch: int = 1, dtype: torch.dtype = torch.float32, **options: Any):
        """A :class:`gpavatar.realtime.RealtimeRenderer` of ``avatar``: frames of ``batch`` (points,
        camera) pairs rendered like :meth:`render` (evaluation sampling, no StyleGAN noise draws), on a
        GPU replayed from one CUDA graph; ``dtype=torch.bfloat16`` is the fast mode (super-resolution in
        bf16 channels-last, TF32 field).  ``options``: see the class."""
        from gpavatar.realtime import RealtimeRenderer

        return RealtimeRenderer(self, avatar, batch=batch, dtype=dtype, **options)

    def render(self, avatar: Avatar, points: torch.Tensor, transform: torch.Tensor, *, stratified: bool = False,
               generator: Optional[torch.Generator] = None) -> dict[str, torch.Tensor]:
        """Render frames of ``avatar``.

        Args:
            avatar: from :meth:`build_avatar`; batch 1 is broadcast to the batch of ``points``
            points: (B, P, 3) FLAME vertices x flame_scale (P = ``num_points``)
            transform: (B, 3, 4) world-to-camera [R|T] (PyTorch3D row-vector convention)
            stratified: training sampling (jittered coarse edges, random importance offsets)
            generator: RNG for the sampling jitter and fresh StyleGAN noise
        Returns:
            dict: ``image`` (B, 3, output_size²) super-resolved RGB in (-0.001, 1.001);
            ``coarse`` / ``fine`` (B, render_channels, render_size²) feature images (RGB first);
            ``depth`` (B, 1, render_size²): the official map (transparency filled with the
            batch's farthest sample depth, min-max normalized over the batch: batch-relative);
            ``depth_expected`` (B, 1, render_size²) Σ w t in world units (comparable between
            frames; ``depth_expected / opacity`` is the surface depth where opacity > 0);
            ``opacity``; ``coarse_alphas`` (B, render_size², n_coarse) for the density loss.
        """
        c = self.config
        check_transform(transform)
        B = transform.shape[0]
        if not isinstance(points, torch.Tensor) or points.dim() != 3 or points.shape[1:] != (c.num_points, 3) \
                or points.shape[0] != B:
            raise ValueError(f"points must have shape ({B}, {c.num_points}, 3) (FLAME vertices x5, batch of "
                             f"transform), got {tuple(getattr(points, 'shape', ()))}")
        self._check_frame_values(points, transform)
        if not isinstance(avatar, Avatar):
            raise TypeError(f"avatar must come from build_avatar, got {type(avatar).__name__}")
        if avatar.batch_size not in (1, B):
            raise ValueError(f"avatar batch {avatar.batch_size} must be 1 or the frame batch {B}")
        if avatar.batch_size != B:
            avatar = Avatar(avatar.planes.expand(B, *avatar.planes.shape[1:]).contiguous(), avatar.attention,
                            avatar.num_sources)
        out = self.renderer(self.field(avatar, points.float()), transform, stratified=stratified,
                            generator=generator)
        image = self.up_renderer(out["fine"].to(self.query_style_tplane.dtype), noise=self.noise_mode(),
                                 generator=generator)
        return {"image": image, "coarse": out["coarse"], "fine": out["fine"], "depth": out["depth"],
                "depth_expected": out["depth_expected"], "opacity": out["opacity"],
                "coarse_alphas": out["coarse_alphas"]}

    def forward(self, images: torch.Tensor, points: torch.Tensor, transform: torch.Tensor,
                **render_kwargs: Any) -> dict[str, torch.Tensor]:
        """build_avatar + render in one call (inference semantics; see :meth:`forward_train`)."""
        return self.render(self.build_avatar(images), points, transform, **render_kwargs)

    def draw_single_source(self, generator: Optional[torch.Generator] = None) -> bool:
        """The training step's coin: True (only the first source, no MTA) with probability
        ``single_source_prob``; one uniform draw from ``generator`` (default: the global RNG)."""
        draw = (torch.rand((), generator=generator, device=generator.device) if generator is not None
                else torch.rand(()))
        return bool(draw < self.config.single_source_prob)

    def forward_train(self, images: torch.Tensor, points: torch.Tensor, transform: torch.Tensor, *,
                      generator: Optional[torch.Generator] = None,
                      single_source: Optional[bool] = None) -> dict[str, Any]:
        """One training forward with the official semantics.

        With probability ``single_source_prob`` (0.3; one draw per call, i.e. per step for the
        whole local batch) only the first source is kept and MTA is skipped; the sampling is
        stratified (jittered). Returns :meth:`render`'s dict plus ``single_source`` (bool).
        ``single_source``: the coin already drawn (:meth:`draw_single_source`, e.g. outside a
        step captured as a CUDA graph: the draw is read on the host); None draws it here.
        """
        single = self.draw_single_source(generator) if single_source is None else bool(single_source)
        avatar = self.build_avatar(images, single_source=single, generator=generator)
        out = self.render(avatar, points, transform, stratified=True, generator=generator)
        out["single_source"] = single
        return out

    def param_groups(self, lr: float = 1e-4) -> list[dict[str, Any]]:
        """Adam parameter groups of the official training (pipeline.md section 5.2): names
        containing ``style_mlp`` or ``final_linear`` at lr x 0.1, ``attn_module`` and the rest
        at lr; parameters without requires_grad (the MTA scale) are left out."""
        groups: dict[str, list[nn.Parameter]] = {"mapping": [], "attention": [], "normal": []}
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            if "style_mlp" in name or "final_linear" in name:
                groups["mapping"].append(p)
            elif "attn_module" in name:
                groups["attention"].append(p)
            else:
                groups["normal"].append(p)
        scale = {"mapping": 0.1, "attention": 1.0, "normal": 1.0}
        return [{"params": ps, "lr": lr * scale[k], "name": k} for k, ps in groups.items() if ps]

    def extra_repr(self) -> str:
        n = sum(p.numel() for p in self.parameters())
        return f"parameters={n:,}, backend={self.config.backend!r}, noise={self.config.noise!r}"
