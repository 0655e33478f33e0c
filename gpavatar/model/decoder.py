"""The field decoder (SPEC section 6): tri-plane features + point expression field -> alpha, value.

For a sample at ``x`` seen along the unit direction ``d``::

    g     = [triplane_mean(planes, x) (C), PEF(x, points) (Cp)]
    feat  = L3(relu(L2(relu(L1(g)))))                         feature_layers.{0,2,4}
    sigma = softplus_beta=10(density(feat)) · [x strictly inside (-1, 1)^3]
    alpha = 1 - exp(-sigma)                                   (no interval length)
    value = R2(relu(R1([feat, gamma(normalize(d))])))         rgb_layers.{0,2}
    value[..., :3] = sigmoid(value[..., :3]) · 1.002 - 0.001  (channels 3.. stay raw)

Parameter names follow the official checkpoint under ``nerf_mlp.``:
``points_querier.*`` (the PEF), ``feature_layers.{0,2,4}``, ``density_layers.0``,
``rgb_layers.{0,2}``.

Fused pass (opt-in: slower on an H200, a real-time frame 15.0 ms fused against 12.1 ms
unfused in fast mode, 65 against 21.6 ms in fp32; benchmarks/results/bench_e2e_h200.md).  With ``$GPAVATAR_FIELD_FUSED=1`` (or the
``fused_field`` attribute set to True) a pass runs as one fused kernel
(:func:`gpavatar.ops.field_query`: KNN, then tri-plane + PEF + every layer in one Triton kernel
writing only alpha and value) when the backend resolves to ``cuda`` or ``triton``, no gradient
is needed and autocast is off (also CPU tensors with ``backend="triton"`` under
``TRITON_INTERPRET=1``: the tests); otherwise, and by default (unset / ``auto`` / ``0``), it
runs the separate ops (``triplane_sample``, ``knn_blend``, the Linear layers), which training
uses.  ``field_precision`` (None: ``"tf32"`` when
``torch.backends.cuda.matmul.allow_tf32`` is on, else ``"ieee"``; or ``"tf32x3"``,
``"bf16"``) sets the fused products' precision.

Training pass.  When a gradient is needed, the tri-plane sampling and the layers after it
(``feature_layers``, density, ``rgb_layers``) run under activation checkpointing: the pass
keeps only its (N, Cp) PEF features, coordinates and directions, and the backward samples the
tri-planes and recomputes the layers (a few matrix products) instead of holding their ~1000
floats per sample (about 2 GiB per paper-size pass).  A pass is checkpointed in segments of
``checkpoint_segment`` samples (None: 2^18, 2^15 on the CPU), so the backward holds the
recomputed activations of one segment at a time.  The outputs and gradients are those of the
plain pass (the same arithmetic again; a pass of several segments sums its weight gradients
segment by segment).  Two forms (``segmented``; None: the first on CPU tensors, the second
elsewhere): :func:`gpavatar.ops.field_query.segmented_layers`, one autograd function for the
pass whose forward records nothing and whose backward recomputes the segments and runs one
tri-plane backward for the whole pass (a paper-preset step on 2 CPU cores: 7.3 s against 7.7 s,
benchmarks/results/bench_train_cpu_paper.md), or ``torch.utils.checkpoint`` of each segment (the
form measured on GPUs).
``checkpoint_layers`` (True / False; None: ``$GPAVATAR_FIELD_CHECKPOINT`` = 1 / 0, or unset /
``auto``: passes of at least 65536 samples) chooses.

    >>> import torch
    >>> from gpavatar.model.decoder import PointsDecoder
    >>> dec = PointsDecoder(plane_channels=4, num_points=50, point_feature_dim=4, pef_dim=4, hidden=8,
    ...                     value_hidden=8, value_dim=5, normalize="neighbors")
    >>> planes = torch.randn(1, 3, 16, 16, 4)            # channels-last tri-planes (B, 3, H, W, C)
    >>> coords, dirs = torch.rand(1, 100, 3) * 2 - 1, torch.randn(1, 100, 3)
    >>> alpha, value = dec(coords, dirs, planes, torch.rand(1, 50, 3) - 0.5)
    >>> alpha.shape, value.shape
    (torch.Size([1, 100]), torch.Size([1, 100, 5]))
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from gpavatar import ops
from gpavatar.model.pef import PointExpressionField
from gpavatar.model.recompute import deterministic_checkpoint
from gpavatar.ops._backend import env_switch
from gpavatar.ops.field_query import (check_directions, fused_setting, sample_directions, sampled_layers,
                                      samples_per_direction, segmented_layers, segments_apply)
from gpavatar.ops.knn import INDEX_MIN_QUERIES
from gpavatar.ops.knn_blend import OFFICIAL_EPS
from gpavatar.ops.reference import EMBED_DIM

CHECKPOINT_ENV = "GPAVATAR_FIELD_CHECKPOINT"
# Passes of this many samples (B x N) or more checkpoint their layers by default: at the tiny
# preset's 2 x 2048 samples the recompute costs more (7 % of a CPU training step) than the
# memory it saves (11 % of the peak).
CHECKPOINT_MIN_SAMPLES = 1 << 16
# Samples (B x N) per checkpointed segment of a pass: the backward recomputes ~500 floats a
# sample of one segment at a time (512 MiB at 2^18; a whole 2^19-sample paper pass, 1 GiB, was
# the peak of a training step).  Each segment adds ~100 small ops to a step of ~8500: two per
# paper pass keep that peak below the super-resolution's.
CHECKPOINT_SEGMENT = 1 << 18
# On the CPU: 2^15 samples (16 MiB of hidden activations a layer, under glibc's 32 MiB mmap
# threshold: reused heap memory where each 2^18-sample tensor was mapped anew and paid its page
# faults).  A paper-preset CPU training step took ~8.5 s instead of ~10.3 s (2 Xeon cores).
CPU_CHECKPOINT_SEGMENT = 1 << 15


class PointsDecoder(nn.Module):
    """Per-sample decoder of SPEC section 6 (official module name ``nerf_mlp``).

    Args:
        plane_channels: C of the tri-planes (32)
        num_points, point_feature_dim, pef_dim, K, normalize, eps: the PEF's sizes (see
            :class:`PointExpressionField`)
        hidden: width of ``feature_layers`` (128)
        value_hidden: hidden width of ``rgb_layers`` (64)
        value_dim: rendered value channels (32; the first 3 are RGB)
        backend: kernel backend of ``triplane_sample`` and ``knn_blend``
    """

    def __init__(self, plane_channels: int = 32, num_points: int = 5023, point_feature_dim: int = 32,
                 pef_dim: int = 32, K: int = 8, normalize: str = "queries", eps: float = OFFICIAL_EPS,
                 hidden: int = 128, value_hidden: int = 64, value_dim: int = 32, backend: Optional[str] = None):
        super().__init__()
        if value_dim < 3:
            raise ValueError(f"value_dim must be >= 3 (RGB first), got {value_dim}")
        self.plane_channels, self.value_dim = plane_channels, value_dim
        self.points_querier = PointExpressionField(num_points, point_feature_dim, pef_dim, K, normalize, eps,
                                                   backend)
        self.feature_layers = nn.Sequential(
            nn.Linear(plane_channels + pef_dim, hidden), nn.ReLU(),
            nn.Linear(hidden, hidden), nn.ReLU(),
            nn.Linear(hidden, hidden),
        )
        self.density_layers = nn.Sequential(nn.Linear(hidden, 1))
        self.rgb_layers = nn.Sequential(nn.Linear(hidden + EMBED_DIM, value_hidden), nn.ReLU(),
                                        nn.Linear(value_hidden, value_dim))
        # Run-time switches of the fused pass and of the training pass (module docstring); not in
        # the state dict.
        self.fused_field: Optional[bool] = None
        self.field_precision: Optional[str] = None
        self.checkpoint_layers: Optional[bool] = None
        self.checkpoint_segment: Optional[int] = None  # None: segment_samples(device)
        self.segmented: Optional[bool] = None  # None: on CPU tensors (module docstring)
        # The decoder's layers as one Triton kernel (ops.field_query.field_layers' ``kernel``): None
        # follows $GPAVATAR_FIELD_LAYERS; forward only (passes that need grad run the torch layers).
        self.fused_layers: Optional[bool] = None
        # The function that runs the layers (None: field_layers); the real-time path sets a compiled
        # copy of it during its frames (RealtimeRenderer's ``compile``).
        self.layers_function: Optional[Callable[..., ops.FieldResult]] = None

    @property
    def backend(self) -> Optional[str]:
        return self.points_querier.backend

    @backend.setter
    def backend(self, name: Optional[str]) -> None:
        self.points_querier.backend = name

    def _check(self, coords, dirs, planes, points) -> None:
        C = self.plane_channels
        if not isinstance(planes, torch.Tensor) or planes.dim() != 5 or planes.shape[1] != 3 \
                or planes.shape[4] != C:
            raise ValueError(f"planes must be channels-last tri-planes of shape (B, 3, H, W, {C}), "
                             f"got {tuple(getattr(planes, 'shape', ()))}")
        if not isinstance(coords, torch.Tensor) or coords.dim() != 3 or coords.shape[-1] != 3:
            raise ValueError(f"coords must have shape (B, N, 3), got {tuple(getattr(coords, 'shape', ()))}")
        check_directions(dirs, coords.shape[:-1])
        B = coords.shape[0]
        if planes.shape[0] != B or not isinstance(points, torch.Tensor) or points.dim() != 3 \
                or points.shape[0] != B:
            raise ValueError(f"planes and points must have batch {B} like coords, got planes "
                             f"{tuple(planes.shape)} and points {tuple(getattr(points, 'shape', ()))}")

    def forward(self, coords: torch.Tensor, dirs: torch.Tensor, planes: torch.Tensor, points: torch.Tensor,
                chunk: int = 0, *, validate: bool = True,
                knn_index: Optional[ops.KnnIndex] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Alpha (B, N) and value (B, N, value_dim), both float32.

        Args:
            coords: (B, N, 3) sample positions; dirs: (B, N, 3) their rays' directions, or (B, R, 3)
                one per ray with N = R·S, each ray's S samples consecutive (the renderer's
                ``ray_directions``): the direction terms are then computed per ray
            planes: (B, 3, H, W, C) channels-last tri-planes
            points: (B, P, 3) FLAME points (x5)
            chunk: queries per chunk (0: all at once). With ``normalize="queries"`` the PEF's
                normalizer is summed over the whole pass first, so the result does not depend
                on the chunking (up to float summation order).
            validate: check the values of coords and points in the PEF (host syncs); False when
                the caller has checked them (the renderer's real-time path)
            knn_index: ``ops.knn_index(points, K)`` shared by several passes (:meth:`knn_index`), or None
        """
        self._check(coords, dirs, planes, points)
        B, N, _ = coords.shape
        if chunk <= 0 or chunk >= N:
            return self._query(coords, dirs, planes, points, None, validate, knn_index)
        weight_sum = None
        pef = self.points_querier
        if pef.normalize == "queries":
            with torch.no_grad():
                weight_sum = sum(ops.knn_blend_weight_sum(ops.knn(c, points, pef.K, backend=pef.backend,
                                                                  validate=validate, index=knn_index).dist2, pef.eps)
                                 for c in coords.split(chunk, dim=1))
        S = samples_per_direction(dirs, N)
        if chunk % S:
            dirs, S = sample_directions(dirs, N), 1
        parts = [self._query(c, d, planes, points, weight_sum, validate, knn_index)
                 for c, d in zip(coords.split(chunk, dim=1), dirs.split(chunk // S, dim=1))]
        return torch.cat([a for a, _ in parts], dim=1), torch.cat([v for _, v in parts], dim=1)

    def field_weights(self) -> ops.FieldWeights:
        """The parameters as :class:`gpavatar.ops.FieldWeights` (the tensors themselves, no copies)."""
        pef, f, r = self.points_querier, self.feature_layers, self.rgb_layers
        return ops.FieldWeights(pef.points_feature.weight, pef.point_layers[0].weight, pef.point_layers[0].bias,
                                pef.point_layers[2].weight, pef.point_layers[2].bias, f[0].weight, f[0].bias,
                                f[2].weight, f[2].bias, f[4].weight, f[4].bias, self.density_layers[0].weight,
                                self.density_layers[0].bias, r[0].weight, r[0].bias, r[2].weight, r[2].bias)

    def _wants_fused(self, coords: torch.Tensor) -> bool:
        """The fused_field attribute, else $GPAVATAR_FIELD_FUSED, else off (on an H200 the fused
        kernel made a real-time frame slower: benchmarks/results/bench_e2e_h200.md)."""
        if self.fused_field is not None:
            return bool(self.fused_field)
        return bool(fused_setting())

    def knn_index(self, points: torch.Tensor, coords: torch.Tensor) -> Optional[ops.KnnIndex]:
        """The PEF's KNN lists of ``points`` over the box of ``coords`` (``ops.knn_index``), to share
        between passes (the model's field with ``$GPAVATAR_KNN_SHARE=1``); None where the backend
        builds no such lists or the pass is small (< INDEX_MIN_QUERIES samples: CUDA scans every point)."""
        pef = self.points_querier
        if coords.shape[1] < INDEX_MIN_QUERIES:
            return None
        return ops.knn_index(points, pef.K, queries=coords, backend=pef.backend, validate=False)

    def _query(self, coords, dirs, planes, points, weight_sum, validate=True, knn_index=None):
        if self._wants_fused(coords):
            # ops.field_query fuses where it can (backend, no grad, no autocast) and otherwise runs
            # the separate ops below as functions: the same results either way
            pef = self.points_querier
            return tuple(ops.field_query(coords, sample_directions(dirs, coords.shape[1]), planes, points,
                                         self.field_weights(), pef.K,
                                         normalize=pef.normalize, eps=pef.eps, weight_sum=weight_sum,
                                         precision=self.field_precision, fused=True, backend=self.backend,
                                         validate=validate, knn_index=knn_index))
        if knn_index is None:
            expr = self.points_querier(coords, points, weight_sum, validate=validate)
        else:
            expr = self.points_querier(coords, points, weight_sum, validate=validate, index=knn_index)
        B, N = coords.shape[:2]
        if B * N == 0 or not self._checkpoints(planes, expr, B * N):  # (an empty pass keeps nothing)
            return self._sample_layers(planes, expr, coords, dirs)
        # The tri-plane features are sampled again in the backward too (cheap, C floats a sample),
        # and the pass is checkpointed in segments: the backward holds one segment's recomputed
        # activations at a time.
        # (a segment holds whole rays when dirs has one direction per ray)
        S = samples_per_direction(dirs, N)
        n = max(S, self.segment_samples(coords.device) // max(1, B) // S * S)
        if self._segmented(planes, expr, coords, dirs):
            return tuple(segmented_layers(planes, expr, coords, dirs, self.field_weights(), n, backend=self.backend))
        parts = [deterministic_checkpoint(self._sample_layers, planes, e, c, d)
                 for e, c, d in zip(expr.split(n, dim=1), coords.split(n, dim=1), dirs.split(n // S, dim=1))]
        if len(parts) == 1:
            return parts[0]
        return torch.cat([a for a, _ in parts], dim=1), torch.cat([v for _, v in parts], dim=1)

    def segment_samples(self, device: torch.device) -> int:
        """Samples (B x N) per checkpointed segment of a pass: ``checkpoint_segment``, else
        CPU_CHECKPOINT_SEGMENT on the CPU and CHECKPOINT_SEGMENT elsewhere."""
        if self.checkpoint_segment is not None:
            return int(self.checkpoint_segment)
        return CPU_CHECKPOINT_SEGMENT if device.type == "cpu" else CHECKPOINT_SEGMENT

    def _segmented(self, planes, expr, coords, dirs) -> bool:
        """Whether a checkpointed pass takes :func:`gpavatar.ops.field_query.segmented_layers`
        (``segmented``, the default layers, where :func:`segments_apply` allows it)."""
        wanted = coords.device.type == "cpu" if self.segmented is None else bool(self.segmented)
        return wanted and self.layers_function is None and segments_apply(planes, expr, coords, dirs,
                                                                          backend=self.backend)

    def _checkpoints(self, planes: torch.Tensor, expr: torch.Tensor, samples: int) -> bool:
        """Whether this pass of ``samples`` (B x N) samples recomputes its tri-plane features and
        layers in the backward (see ``checkpoint_layers``)."""
        if not torch.is_grad_enabled() or not (planes.requires_grad or expr.requires_grad
                                               or any(p.requires_grad for p in self.parameters())):
            return False
        if self.checkpoint_layers is not None:
            return bool(self.checkpoint_layers)
        setting = env_switch(CHECKPOINT_ENV)
        if setting is None:  # where the activations are large (the paper's 2^19-sample passes)
            return samples >= CHECKPOINT_MIN_SAMPLES
        return setting

    def _sample_layers(self, planes, expr, coords, dirs):
        """The tri-plane features of a pass, then the decoder's layers on them and the PEF
        features: (alpha, value) (:func:`gpavatar.ops.field_query.field_layers`: the official
        layers with the last feature layer folded into the density and rgb heads; without a
        gradient through the features, tri-plane and PEF features written side by side:
        :func:`gpavatar.ops.field_query.sampled_layers`)."""
        return tuple(sampled_layers(planes, expr, coords, dirs, self.field_weights(), backend=self.backend,
                                    layers=self.layers_function, kernel=self.fused_layers))
