"""Pure-torch references (the oracles): short, differentiable everywhere,
any device, float32 or float64.  They are the ``"torch"`` backend, the test
oracle and the benchmark baseline.  They follow the official GPAvatar code
path (KNN, gather, harmonic embedding, a per-neighbour MLP, inverse-distance
blend) and materialize its per-neighbour intermediates; the KNN distance
matrix is built in chunks of queries to bound its memory.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["knn_reference", "harmonic_embedding", "knn_blend_reference", "inverse_distance_weights",
           "triplane_sample_reference"]

_CHUNK_ELEMENTS = 1 << 24  # distance-matrix entries per chunk
EMBED_DIM = 27  # harmonic embedding of a direction: 4 frequencies x (sin, cos) x 3 + 3


def _squared_distance(diff: torch.Tensor) -> torch.Tensor:
    # (dx*dx + dy*dy) + dz*dz: the exact evaluation order of the kernels.
    dx, dy, dz = diff.unbind(-1)
    return (dx * dx + dy * dy) + dz * dz


def _distance_matrix(queries: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """(B, M, 3), (B, P, 3) -> (B, M, P), evaluated like _squared_distance."""
    dx, dy, dz = (queries[..., c, None] - points[:, None, :, c] for c in range(3))
    return (dx * dx + dy * dy) + dz * dz


def _smallest_k(d: torch.Tensor, K: int) -> torch.Tensor:
    """Indices of the K smallest entries of each row, by (value, index)."""
    P = d.shape[-1]
    if d.dtype == torch.float32 and P <= 1 << 17:
        # An order-preserving float64 key: d (1 + i 2^-45) + i 2^-200.  Distinct float32
        # values differ by a factor >= 1 + 2^-24 > 1 + P 2^-45, so they keep their order;
        # equal values (zero included, via the additive term) order by index i.
        i = torch.arange(P, dtype=torch.float64, device=d.device)
        key = d.double().mul_(1 + i * 2.0**-45).add_(i * 2.0**-200)
        return key.topk(K, dim=-1, largest=False, sorted=True).indices
    return torch.sort(d, dim=-1, stable=True).indices[..., :K]


def knn_reference(queries: torch.Tensor, points: torch.Tensor, K: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Brute-force K nearest neighbours.

    Args:
        queries: (B, M, 3)
        points: (B, P, 3)
        K: number of neighbours, 1 <= K <= P
    Returns:
        dist2: (B, M, K) squared distances, ascending, differentiable w.r.t. both inputs
        idx: (B, M, K) int64; equal distances keep the lower index first
    """
    B, M, _ = queries.shape
    P = points.shape[1]
    chunk = max(1, _CHUNK_ELEMENTS // max(1, B * P))
    with torch.no_grad():
        parts = [
            _smallest_k(_distance_matrix(q, points), K)
            for q in queries.split(chunk, dim=1)
        ] if M > 0 else []
        idx = torch.cat(parts, dim=1) if parts else queries.new_empty((B, 0, K), dtype=torch.int64)
    nearest = gather_points(points, idx)
    dist2 = _squared_distance(queries[:, :, None, :] - nearest)
    return dist2, idx


def gather_points(points: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """points (B, P, D), idx (B, M, K) -> (B, M, K, D)."""
    B, M, K = idx.shape
    flat = idx.reshape(B, M * K, 1).expand(B, M * K, points.shape[-1])
    return points.gather(1, flat).reshape(B, M, K, points.shape[-1])


def harmonic_embedding(r: torch.Tensor, n_frequencies: int = 4) -> torch.Tensor:
    """gamma(r) = [sin(r_d 2^j) for d, j], [cos(r_d 2^j) for d, j], r: (..., 3) -> (..., 27)."""
    freqs = 2.0 ** torch.arange(n_frequencies, dtype=r.dtype, device=r.device)
    angles = (r[..., None] * freqs).flatten(-2)
    return torch.cat([angles.sin(), angles.cos(), r], dim=-1)


def inverse_distance_weights(dist2: torch.Tensor, normalize: str, eps: float,
                             weight_sum: torch.Tensor | None = None) -> torch.Tensor:
    """Blend weights (B, M, K) from squared distances (B, M, K).

    ``"neighbors"``: u / sum over the K neighbours of the query.
    ``"queries"``: u / sum over all M queries of the batch element, per neighbour
    rank (the official code); ``weight_sum`` (B, K) overrides that sum (chunked use).
    """
    u = 1.0 / (dist2 + eps)
    if normalize == "neighbors":
        return u / u.sum(dim=-1, keepdim=True)
    total = u.sum(dim=1) if weight_sum is None else weight_sum.to(u.dtype)
    return u / total[:, None, :]


def knn_blend_reference(queries, points, point_features, w1, b1, w2, b2, K: int = 8,
                        normalize: str = "neighbors", eps: float = 1e-8,
                        weight_sum: torch.Tensor | None = None):
    """Point expression field (SPEC section 5), the official way.

    Args:
        queries: (B, M, 3); points: (B, P, 3)
        point_features: (P, Cf) shared, or (B, P, Cf) per batch element
        w1: (H, Cf + 27), b1: (H,), w2: (C, H), b2: (C,)
    Returns:
        feature (B, M, C), dist2 (B, M, K), idx (B, M, K)
    """
    dist2, idx = knn_reference(queries, points, K)
    direction = F.normalize(queries[:, :, None, :] - gather_points(points, idx), dim=-1)
    if point_features.dim() == 2:
        feats = point_features[idx]
    else:
        feats = gather_points(point_features, idx)
    x = torch.cat([feats.to(direction.dtype), harmonic_embedding(direction)], dim=-1)
    per_neighbor = F.linear(F.relu(F.linear(x, w1, b1)), w2, b2)  # (B, M, K, C)
    weights = inverse_distance_weights(dist2, normalize, eps, weight_sum)
    feature = (per_neighbor * weights[..., None]).sum(dim=2)
    return feature, dist2, idx


def triplane_sample_reference(planes: torch.Tensor, coords: torch.Tensor, reduce: str = "mean") -> torch.Tensor:
    """Tri-plane features at points (SPEC section 4), the official way (three grid_sample calls).

    Point (x, y, z) reads plane 0 at (x, y), plane 1 at (x, z), plane 2 at (z, y); the first
    coordinate indexes width, the second height; bilinear, zero padding, align_corners=False.

    Args:
        planes: (B, 3, C, H, W)
        coords: (B, M, 3) in [-1, 1]^3 (outside points read zeros beyond the border texels)
        reduce: "mean" -> (B, M, C); "concat" -> (B, M, 3C) in plane order
    """
    x, y, z = coords.unbind(-1)
    grids = (torch.stack([x, y], -1), torch.stack([x, z], -1), torch.stack([z, y], -1))
    feats = [
        F.grid_sample(planes[:, t], grid[:, :, None, :].to(planes.dtype), mode="bilinear",
                      padding_mode="zeros", align_corners=False)[..., 0].transpose(1, 2)  # (B, M, C)
        for t, grid in enumerate(grids)
    ]
    if reduce == "mean":
        return (feats[0] + feats[1] + feats[2]) / 3
    if reduce == "concat":
        return torch.cat(feats, dim=-1)
    raise ValueError(f"reduce must be 'mean' or 'concat', got {reduce!r}")
