"""Test data: point clouds with the situations the kernels must handle."""

import torch


def make_points(B, P, seed=0, duplicates=0, dtype=torch.float32, device="cpu"):
    """(B, P, 3) points in [-0.8, 0.8]^3; the last `duplicates` repeat earlier ones (exact ties)."""
    g = torch.Generator().manual_seed(seed)
    pts = torch.rand(B, P, 3, generator=g, dtype=torch.float64) * 1.6 - 0.8
    if duplicates and P > 1:
        n = min(duplicates, P - 1)
        src = torch.randint(0, P - n, (n,), generator=g)
        pts[:, P - n:] = pts[:, src]
    return pts.to(dtype=dtype, device=device)


def make_queries(B, M, points=None, seed=1, on_points=0, far=0, dtype=torch.float32, device="cpu"):
    """(B, M, 3) queries in [-1, 1]^3; the first `on_points` sit exactly on points, the next `far` far away."""
    g = torch.Generator().manual_seed(seed)
    q = torch.rand(B, M, 3, generator=g, dtype=torch.float64) * 2 - 1
    if on_points and points is not None:
        n = min(on_points, M)
        pick = torch.randint(0, points.shape[1], (n,), generator=g)
        q[:, :n] = points[:, pick].to(torch.float64).cpu()
    if far:
        n = min(far, M - min(on_points, M))
        start = min(on_points, M)
        q[:, start:start + n] *= 1e4
    return q.to(dtype=dtype, device=device)


def make_pef_params(P, Cf=32, H=64, C=32, B=None, seed=2, dtype=torch.float32, device="cpu"):
    """point_features (P, Cf) or (B, P, Cf), w1 (H, Cf + 27), b1 (H,), w2 (C, H), b2 (C,)."""
    g = torch.Generator().manual_seed(seed)
    shape = (P, Cf) if B is None else (B, P, Cf)
    tensors = [
        torch.randn(*shape, generator=g, dtype=torch.float64),
        torch.randn(H, Cf + 27, generator=g, dtype=torch.float64) / (Cf + 27) ** 0.5,
        torch.randn(H, generator=g, dtype=torch.float64) * 0.1,
        torch.randn(C, H, generator=g, dtype=torch.float64) / H**0.5,
        torch.randn(C, generator=g, dtype=torch.float64) * 0.1,
    ]
    return [t.to(dtype=dtype, device=device) for t in tensors]
