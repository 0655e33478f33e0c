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
           "triplane_sample_reference", "ray_box_reference", "stratified_depths_reference",
           "importance_depths_reference", "composite_reference", "merge_samples_reference"]

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
    """Indices of the K smallest entries of each row, by (value, index), NaN after +inf (the
    total order of every backend: ``torch.sort``'s, stable)."""
    P = d.shape[-1]
    if d.dtype == torch.float32 and P <= 1 << 17:
        # An order-preserving float64 key: d (1 + i 2^-45) + i 2^-200.  Distinct float32
        # values differ by a factor >= 1 + 2^-24 > 1 + P 2^-45, so they keep their order;
        # equal values (zero included, via the additive term) order by index i.  +inf and NaN
        # take keys above every float32 one, 2^1000 and 2^1010 times (1 + i 2^-45): their ties
        # order by index too.
        i = torch.arange(P, dtype=torch.float64, device=d.device)
        spread = 1 + i * 2.0**-45
        key = d.double().mul_(spread).add_(i * 2.0**-200)
        key = torch.where(d == float("inf"), spread * 2.0**1000, key)
        key = torch.where(d.isnan(), spread * 2.0**1010, key)
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


# --- rays (SPEC sections 7 and 8) ---------------------------------------------------------

MISS_DEPTH = -1.0  # t0 = t1 of a ray that misses the box


def ray_box_reference(origins: torch.Tensor, dirs: torch.Tensor, box_min: float = -1.0, box_max: float = 1.0):
    """Slab test of rays against the box [box_min, box_max]^3 (near plane at -inf).

    inv = 1 / d picks the entry plane by its sign bit (d = -0 counts as negative); NaN slab
    distances (an origin on a slab plane with d = 0) impose no constraint; a ray hits when
    entry <= exit (touching counts), exit > 0 and both are finite (a zero direction or an
    infinite box has none).  A miss gives t0 = t1 = -1.

    Args:
        origins, dirs: (R, 3)
    Returns:
        t0 (R,), t1 (R,), hit (R,) bool
    """
    inv = 1.0 / dirs
    t_lo = (box_min - origins) * inv
    t_hi = (box_max - origins) * inv
    negative = torch.signbit(inv)
    enter = torch.where(negative, t_hi, t_lo)
    leave = torch.where(negative, t_lo, t_hi)
    near = torch.full_like(inv[:, 0], -float("inf"))
    far = torch.full_like(inv[:, 0], float("inf"))
    for axis in range(3):  # fmax / fmin skip NaN
        near = torch.fmax(near, enter[:, axis])
        far = torch.fmin(far, leave[:, axis])
    hit = (near <= far) & (far > 0) & near.isfinite() & far.isfinite()
    miss = torch.full_like(near, MISS_DEPTH)
    return torch.where(hit, near, miss), torch.where(hit, far, miss), hit


def stratified_edges(t0: torch.Tensor, t1: torch.Tensor, S: int) -> torch.Tensor:
    """(R,), (R,) -> (R, S + 1) equally spaced edges t0 + (t1 - t0) * (k / S)."""
    k = torch.arange(S + 1, dtype=t0.dtype, device=t0.device) / S
    return t0[:, None] + (t1 - t0)[:, None] * k


def stratified_depths_reference(t0: torch.Tensor, t1: torch.Tensor, S: int, jitter: torch.Tensor | None = None):
    """Coarse depths (SPEC section 7): midpoints of S + 1 edges between t0 and t1.

    Args:
        t0, t1: (R,)
        jitter: None (evaluation), or (R, S + 1) uniforms in [0, 1): edge k moves to
            lo_k + (hi_k - lo_k) * u_k, where lo / hi are the midpoints to its neighbours
            (the first edge only moves inward: lo_0 = e_0; the last: hi_S = e_S)
    Returns:
        depths (R, S)
    """
    edges = stratified_edges(t0, t1, S)
    if jitter is not None:
        mids = (edges[:, 1:] + edges[:, :-1]) * 0.5
        lo = torch.cat([edges[:, :1], mids], dim=1)
        hi = torch.cat([mids, edges[:, -1:]], dim=1)
        edges = lo + (hi - lo) * jitter.to(edges.dtype)
    return (edges[:, 1:] + edges[:, :-1]) * 0.5


def importance_depths_reference(depths: torch.Tensor, weights: torch.Tensor, n: int,
                                offset: torch.Tensor | float = 0.5) -> torch.Tensor:
    """Fine depths (SPEC section 8), GPAvatar's camera code with nerfacc 0.5.3's inversion.

    Args:
        depths: (R, S) sorted coarse depths t (the knots), S >= 2
        weights: (R, S) their compositing weights w
        n: fine samples per ray, >= 2
        offset: b in u_i = c_0 + (i + b) * step: 0.5 (evaluation) or (R,) uniforms (training)
    Returns:
        (R, n) fine depths: midpoints of the edges around the inverted samples
    """
    R, S = depths.shape
    pdf = weights + 1e-5
    pdf = pdf / pdf.sum(dim=-1, keepdim=True)
    cdf = torch.cumsum(pdf, dim=-1)
    step = (cdf[:, -1] - cdf[:, 0]) / n
    b = offset if isinstance(offset, float) else offset.to(depths.dtype)[:, None]
    i = torch.arange(n, dtype=depths.dtype, device=depths.device)
    u = cdf[:, :1] + (i + b) * step[:, None]
    # p: the first j in [0, S - 2] with cdf_j > u, else S - 1 (never 0: u >= cdf_0).
    p = torch.searchsorted(cdf[:, :-1].contiguous(), u.contiguous(), right=True).clamp(1, S - 1)
    c_lo, c_hi = cdf.gather(1, p - 1), cdf.gather(1, p)
    t_lo, t_hi = depths.gather(1, p - 1), depths.gather(1, p)
    denom = c_hi - c_lo
    safe = torch.where(denom < 1e-10, torch.ones_like(denom), denom)
    samples = torch.where(denom < 1e-10, (t_lo + t_hi) * 0.5, t_lo + (u - c_lo) * (t_hi - t_lo) / safe)
    first = torch.maximum(samples[:, :1] - (samples[:, 1:2] - samples[:, :1]) * 0.5, depths[:, :1])
    last = torch.minimum(samples[:, -1:] + (samples[:, -1:] - samples[:, -2:-1]) * 0.5, depths[:, -1:])
    edges = torch.cat([first, (samples[:, 1:] + samples[:, :-1]) * 0.5, last], dim=1)
    return (edges[:, 1:] + edges[:, :-1]) * 0.5


class _ClampKeepGrad(torch.autograd.Function):
    """clamp(x, 0, 1) in value (exactly: ``x + (clamp(x) - x).detach()`` rounds, 0 for x = 1e30 and
    NaN for x = inf), the identity in gradient."""

    @staticmethod
    def forward(ctx, x):
        return x.clamp(0, 1)

    @staticmethod
    def backward(ctx, grad):
        return grad


def composite_reference(alphas: torch.Tensor, values: torch.Tensor, depths: torch.Tensor | None = None):
    """Front-to-back alpha compositing (SPEC section 8) of S samples sorted by depth.

    T_i = prod_{j < i} (1 - alpha_j), w_i = alpha_i T_i.

    Args:
        alphas: (R, S); values: (R, S, C); depths: optional (R, S)
    Returns:
        color (R, C) = sum_i w_i v_i, opacity (R,) = clamp(sum_i w_i, 0, 1) (the clamp only removes
        rounding: its gradient is the identity), weights (R, S),
        depth (R,) = sum_i w_i t_i (None without depths)
    """
    transmittance = torch.cumprod(torch.cat([torch.ones_like(alphas[:, :1]), 1 - alphas[:, :-1]], dim=1), dim=1)
    weights = alphas * transmittance
    color = (weights[..., None] * values).sum(dim=1)
    total = weights.sum(dim=1)  # = 1 - T_S in [0, 1] up to rounding
    opacity = _ClampKeepGrad.apply(total)  # clamp the value, keep d(total)
    depth = (weights * depths).sum(dim=1) if depths is not None else None
    return color, opacity, weights, depth


def merge_samples_reference(depths_a: torch.Tensor, depths_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two per-ray sorted depth sets: (R, Sa), (R, Sb) -> depths (R, Sa + Sb) sorted,
    order (R, Sa + Sb) int64 indices into cat([a, b], dim=1) (ties: a before b, stable)."""
    both = torch.cat([depths_a, depths_b], dim=1)
    merged, order = torch.sort(both, dim=1, stable=True)
    return merged, order
