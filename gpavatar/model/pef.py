"""The point expression field (PEF, SPEC section 5) as an ``nn.Module``.

Parameter names follow the official checkpoint (under
``nerf_mlp.points_querier.``): ``points_feature.weight`` (P, Cf),
``point_layers.0.weight`` (2C, Cf + 27), ``point_layers.0.bias``,
``point_layers.2.weight`` (C, 2C), ``point_layers.2.bias``.

    >>> import torch
    >>> from gpavatar.model import PointExpressionField
    >>> pef = PointExpressionField(num_points=100)
    >>> feats = pef(torch.rand(1, 64, 3) * 2 - 1, torch.rand(1, 100, 3) - 0.5)
    >>> feats.shape
    torch.Size([1, 64, 32])
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from gpavatar.ops import knn_blend
from gpavatar.ops.knn import KnnIndex
from gpavatar.ops.knn_blend import NORMALIZATIONS, KnnBlendResult
from gpavatar.ops.reference import EMBED_DIM


class PointExpressionField(nn.Module):
    """Per-point learned features blended at query positions by their K nearest FLAME points.

    Args:
        num_points: P, the number of FLAME vertices (5023)
        feature_dim: Cf, learned feature per point (32)
        out_dim: C, output feature per query (32); the hidden layer has 2C units
        K: neighbours (8)
        normalize: "neighbors" (the paper's formula, default) or "queries" (what the
            official code computes; needed to reproduce the official checkpoint)
        eps: added to squared distances before inverting
        backend: kernel backend for ``knn_blend`` (None: $GPAVATAR_BACKEND or auto)
    """

    def __init__(self, num_points: int = 5023, feature_dim: int = 32, out_dim: int = 32, K: int = 8,
                 normalize: str = "neighbors", eps: float = 1e-8, backend: Optional[str] = None):
        super().__init__()
        if normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
        self.K, self.normalize, self.eps, self.backend = K, normalize, eps, backend
        self.points_feature = nn.Embedding(num_points, feature_dim)
        self.point_layers = nn.Sequential(
            nn.Linear(feature_dim + EMBED_DIM, 2 * out_dim),
            nn.ReLU(),
            nn.Linear(2 * out_dim, out_dim),
        )

    def query(self, queries: torch.Tensor, points: torch.Tensor,
              weight_sum: Optional[torch.Tensor] = None, validate: bool = True,
              index: Optional[KnnIndex] = None) -> KnnBlendResult:
        """Features, squared distances and indices of the neighbours.

        Args:
            queries: (B, M, 3); points: (B, P, 3) with P = num_points
            weight_sum: (B, K) sums for the "queries" normalization of a chunked pass
            validate: check the inputs (their values need a host sync; False when the caller
                has checked them, e.g. the renderer's real-time path)
            index: ``ops.knn_index(points, K)`` shared by several calls (or None)
        Returns:
            KnnBlendResult(feature (B, M, C), dist2 (B, M, K), idx (B, M, K))
        """
        first, second = self.point_layers[0], self.point_layers[2]
        return knn_blend(queries, points, self.points_feature.weight, first.weight, first.bias, second.weight,
                         second.bias, K=self.K, normalize=self.normalize, eps=self.eps, weight_sum=weight_sum,
                         backend=self.backend, validate=validate, index=index)

    def forward(self, queries: torch.Tensor, points: torch.Tensor,
                weight_sum: Optional[torch.Tensor] = None, *, validate: bool = True,
                index: Optional[KnnIndex] = None) -> torch.Tensor:
        """(B, M, 3), (B, P, 3) -> (B, M, C)."""
        if index is not None:
            return self.query(queries, points, weight_sum, validate=validate, index=index).feature
        if validate:  # the three-argument call: ``query`` may be shadowed by one without ``validate``
            return self.query(queries, points, weight_sum).feature
        return self.query(queries, points, weight_sum, validate=False).feature

    def extra_repr(self) -> str:
        return f"K={self.K}, normalize={self.normalize!r}, eps={self.eps:g}, backend={self.backend!r}"
