"""Query distributions for the ``knn`` / ``knn_blend`` benchmarks (seeded, cached in memory).

The points are always the procedural FLAME head of ``gpavatar.flame.procedural`` (its
template x5, the FLAME scale the model uses: 5023 points spanning about 0.85 x 1.4 x 1.1
inside [-1, 1]^3; a seeded subset when fewer points are asked for).  The queries:

* ``render``    -- the sample positions of a real render: the model's camera
  (``gpavatar.data.synthetic.head_camera()``, focal 12, 9.5 units from the head) and its
  sampling chain (``camera_rays`` -> ``ops.ray_box`` -> ``ops.stratified_depths`` for the
  coarse pass; compositing weights of a plausible density -> ``ops.importance_depths`` for
  the fine pass).  The density is alpha = 1 - exp(-sigma), sigma = 10 exp(-(d / 0.08)^2)
  with d the distance to the nearest head point: an opaque shell around the surface, so
  the fine samples crowd near the front of the face like a trained model's.  The M queries
  are the coarse pass then the fine pass, ray-major (as the model calls the field), on a
  square grid of R x R rays with R = ceil(sqrt(M / 64)) (32 coarse + 32 fine samples per ray,
  each pass truncated to M / 2): at M = 2^19 that is 91 x 91 rays per pass, the same
  samples per pass as the paper's 128^2 x 32, with half the rays' density.
* ``uniform``   -- queries uniform in the box [-1, 1]^3, random order.
* ``clustered`` -- 8 Gaussian blobs centred on random head points, standard deviations in
  [0.02, 0.1], equal shares of the queries, blob after blob (random order inside a blob).

Generation takes about a second on the CPU at M = 65536 (plus ~1.5 s for the procedural head,
once per process); everything is made in float64 on the CPU (the render pass's nearest-point
distances in float32 on the target device), then cast.

    >>> q, p = make_queries("uniform", B=1, M=1000, P=500, seed=0)
    >>> q.shape, p.shape
    (torch.Size([1, 1000, 3]), torch.Size([1, 500, 3]))
"""

from __future__ import annotations

import functools
import math
import sys

import torch

DISTRIBUTIONS = ("render", "uniform", "clustered")
DESCRIPTIONS = {
    "render": "both passes of a render of the procedural head (model camera, focal 12)",
    "uniform": "uniform in [-1, 1]^3",
    "clustered": "8 Gaussian blobs (sd 0.02-0.1) around head points",
}
SAMPLES_PER_RAY = (32, 32)  # coarse, fine: the paper preset
FOCAL = 12.0
SHELL_SIGMA, SHELL_WIDTH = 10.0, 0.08  # density of the synthetic opaque shell


@functools.lru_cache(maxsize=None)
def _template() -> torch.Tensor:
    """(5023, 3) float64: the procedural head's template x5, or a head-sized random cloud."""
    try:
        from gpavatar.flame.procedural import make_procedural_head

        return torch.from_numpy(make_procedural_head(seed=0)["v_template"]).double() * 5.0
    except Exception as exc:  # keep going with a random cloud (recorded by the caller's env)
        print(f"[_distributions] procedural head unavailable ({type(exc).__name__}: {exc}); "
              "using a random cloud", file=sys.stderr)
        g = torch.Generator().manual_seed(1)
        return (torch.randn(5023, 3, generator=g, dtype=torch.float64) * 0.35).clamp(-0.9, 0.9)


def head_points(P: int, seed: int = 0) -> torch.Tensor:
    """(P, 3) float64 head points: the template x5 (a seeded subset when P < 5023; seeded
    jittered copies when P > 5023)."""
    v = _template()
    if P == v.shape[0]:
        return v.clone()
    g = torch.Generator().manual_seed(seed + 7)
    if P < v.shape[0]:
        return v[torch.randperm(v.shape[0], generator=g)[:P].sort().values].clone()
    extra = v[torch.randint(v.shape[0], (P - v.shape[0],), generator=g)]
    return torch.cat([v, extra + 0.01 * torch.randn(extra.shape, generator=g, dtype=v.dtype)])


def _camera(b: int) -> torch.Tensor:
    """(3, 4) float64 world-to-camera of batch element b: the model's head camera, turned by
    0.3 rad per batch element."""
    try:
        from gpavatar.data.synthetic import head_camera

        return torch.from_numpy(head_camera(yaw=0.3 * b)).double()
    except Exception:  # a plain frontal camera 9.5 units away
        c, s = math.cos(0.3 * b), math.sin(0.3 * b)
        R = torch.tensor([[-c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, -c]], dtype=torch.float64)
        return torch.cat([R, torch.tensor([[0.0], [0.12], [9.5]], dtype=torch.float64)], 1)


def _nearest_distance(x: torch.Tensor, points: torch.Tensor, device) -> torch.Tensor:
    """(N, 3), (P, 3) -> (N,) float32 distance to the nearest point, computed on ``device``."""
    p = points.to(device=device, dtype=torch.float32)
    out = [torch.cdist(c.to(device=device, dtype=torch.float32), p).min(dim=1).values.cpu()
           for c in x.split(8192)]
    return torch.cat(out) if out else x[:, 0].float()


def _render_samples(points: torch.Tensor, M: int, b: int, device="cpu") -> torch.Tensor:
    """(M, 3): coarse then fine samples of a render of ``points`` with camera ``_camera(b)``."""
    import gpavatar.ops as ops
    from gpavatar.model.renderer import camera_rays, pixel_grid

    n_coarse, n_fine = SAMPLES_PER_RAY
    half = (M + 1) // 2
    R = max(2, math.ceil(math.sqrt(half / n_coarse)))
    o, d = camera_rays(_camera(b)[None], pixel_grid(R, R, FOCAL, dtype=torch.float64))
    o, d = o[0].float().contiguous(), d[0].float().contiguous()
    t0, t1, _ = ops.ray_box(o, d, -1.0, 1.0, backend="torch")
    coarse_t = ops.stratified_depths(t0, t1, n_coarse, backend="torch")
    coarse = o[:, None] + coarse_t[..., None] * d[:, None]  # (R^2, n_coarse, 3)
    dist = _nearest_distance(coarse.reshape(-1, 3), points, device).reshape(coarse_t.shape)
    alpha = -torch.expm1(-SHELL_SIGMA * torch.exp(-(dist / SHELL_WIDTH) ** 2)).float()
    inside = ((coarse > -1) & (coarse < 1)).all(-1)
    alpha = alpha * inside
    transmittance = torch.cumprod(torch.cat([torch.ones_like(alpha[:, :1]), 1 - alpha[:, :-1]], 1), 1)
    fine_t = ops.importance_depths(coarse_t, alpha * transmittance, n_fine, backend="torch")
    fine = o[:, None] + fine_t[..., None] * d[:, None]
    return torch.cat([coarse.reshape(-1, 3)[:half], fine.reshape(-1, 3)[:M - half]]).double()


def _uniform(M: int, g: torch.Generator) -> torch.Tensor:
    return torch.rand(M, 3, generator=g, dtype=torch.float64) * 2 - 1


def _clustered(points: torch.Tensor, M: int, g: torch.Generator, n_blobs: int = 8) -> torch.Tensor:
    centres = points[torch.randint(points.shape[0], (n_blobs,), generator=g)]
    sd = 0.02 + 0.08 * torch.rand(n_blobs, 1, generator=g, dtype=torch.float64)
    blob = torch.arange(M) * n_blobs // max(M, 1)  # equal shares, blob after blob
    order = torch.cat([torch.randperm(int((blob == k).sum()), generator=g) + int((blob < k).sum())
                       for k in range(n_blobs)]) if M else blob
    x = centres[blob] + sd[blob] * torch.randn(M, 3, generator=g, dtype=torch.float64)
    return x[order]


@functools.lru_cache(maxsize=16)
def _make(dist: str, B: int, M: int, P: int, seed: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    if dist not in DISTRIBUTIONS:
        raise ValueError(f"unknown distribution {dist!r}; choose from {DISTRIBUTIONS}")
    pts = head_points(P, seed)
    g = torch.Generator().manual_seed(seed + 11)
    queries = []
    for b in range(B):
        if dist == "render":
            queries.append(_render_samples(pts, M, b, device))
        elif dist == "uniform":
            queries.append(_uniform(M, g))
        else:
            queries.append(_clustered(pts, M, g))
    return torch.stack(queries), pts.expand(B, P, 3).contiguous()


def make_queries(dist: str, B: int, M: int, P: int, *, seed: int = 0, device="cpu",
                 dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries (B, M, 3) of distribution ``dist`` and the head points (B, P, 3) (cached)."""
    q, p = _make(dist, B, M, P, seed, str(torch.device(device)))
    return (q.to(device=device, dtype=dtype).contiguous(), p.to(device=device, dtype=dtype).contiguous())


def describe(q: torch.Tensor) -> dict:
    """Share of queries inside the box and their spread, for the report."""
    inside = ((q > -1) & (q < 1)).all(-1).double().mean().item() if q.numel() else 0.0
    return dict(inside_box=round(inside, 4), min=[round(x, 3) for x in q.reshape(-1, 3).min(0).values.tolist()],
                max=[round(x, 3) for x in q.reshape(-1, 3).max(0).values.tolist()])
