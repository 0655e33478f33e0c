"""``knn_points`` / ``knn_gather`` with pytorch3d's contract, on gpavatar's kernels.

Code written for ``pytorch3d.ops`` runs unchanged after
``from gpavatar.compat.pytorch3d_ops import knn_points, knn_gather`` (or after
:func:`gpavatar.compat.install`).  For every batch element ``n`` and query
``i < lengths1[n]``, the neighbours are the ``min(K, lengths2[n])`` points
``j < lengths2[n]`` of ``p2[n]`` with the smallest distance

    norm=2:  dist = sum_d (p1[n, i, d] - p2[n, j, d])^2    (squared L2)
    norm=1:  dist = sum_d |p1[n, i, d] - p2[n, j, d]|       (L1)

in ascending order, equal distances lower index first.  Every other slot is
padding, as in pytorch3d (its CPU and CUDA kernels start from zero-filled
outputs): ``dists = 0`` and ``idx = 0`` for ``k >= lengths2[n]`` (also when
``K > P2``) and for whole rows ``i >= lengths1[n]``.

    >>> import torch
    >>> from gpavatar.compat.pytorch3d_ops import knn_points
    >>> p1, p2 = torch.rand(2, 5, 3), torch.rand(2, 4, 3)
    >>> out = knn_points(p1, p2, lengths2=torch.tensor([4, 2]), K=3, return_nn=True)
    >>> out.dists.shape, out.idx[1, :, 2].tolist(), out.knn.shape
    (torch.Size([2, 5, 3]), [0, 0, 0, 0, 0], torch.Size([2, 5, 3, 3]))

Where the work runs:

* D = 3, ``norm=2``, float32, ``min(K, P2) <= 32``: :func:`gpavatar.ops.knn` (C++ /
  CUDA / Triton kernels or its torch reference, by ``backend``); ragged ``lengths``
  call it once per batch element on the valid slices.
* anything else (any D >= 1, ``norm=1``, float64, large K): a chunked torch search
  (at most ``CHUNK_ELEMENTS`` distances in memory at once), whatever the backend.

Both evaluate distances in the same order (``((d0 + d1) + d2) + ...``, no FMA), so
they return identical indices and distances.  ``dists`` are then recomputed from the
chosen indices with torch ops, which gives autograd to ``p1`` and ``p2`` on every
path: for ``norm=2`` ``d dist / d p1 = 2 (p1 - p2[idx])``; for ``norm=1`` the sign of
``p1 - p2[idx]`` per coordinate, with ``-1`` where they are equal (pytorch3d's choice
of subgradient).  Padding slots get no gradient.

Differences from pytorch3d, all on its unspecified edges: ties are always broken by
the lower index; ``return_sorted=False`` still returns sorted neighbours (the same
set, a valid order); float64 runs in float64 (pytorch3d's CPU kernel is float32
only); half / bfloat16 are computed in float32 and ``dists`` cast back; non-finite
coordinates raise ``ValueError``.
"""

from __future__ import annotations

from collections import namedtuple
from typing import Optional

import torch

from gpavatar import ops
from gpavatar.ops import _validation as v

__all__ = ["knn_points", "knn_gather", "KNN", "CHUNK_ELEMENTS", "MAX_KERNEL_K"]

KNN = namedtuple("KNN", "dists idx knn")
KNN.__doc__ = "dists (N, P1, K), idx (N, P1, K) int64, knn (N, P1, K, D) or None"

CHUNK_ELEMENTS = 1 << 22  # distance entries held at once by the torch search
MAX_KERNEL_K = 32  # gpavatar.ops.knn's fused kernels keep at most 32 neighbours
_MAX_KERNEL_COORD = v.MAX_ABS_COORD  # ops.knn's validated coordinate range


# --- validation ------------------------------------------------------------------------------


def _check_points(p1, p2) -> None:
    v.check_tensor(p1, "p1", "(N, P1, D)", ndim=3)
    v.check_tensor(p2, "p2", f"({p1.shape[0]}, P2, {p1.shape[2]})", ndim=3)
    if p1.shape[0] != p2.shape[0]:
        raise ValueError(f"knn_points: p1 (N, P1, D) and p2 (N, P2, D) must have the same batch size N, "
                         f"got {p1.shape[0]} and {p2.shape[0]}")
    if p1.shape[2] != p2.shape[2]:
        raise ValueError(f"knn_points: p1 (N, P1, D) and p2 (N, P2, D) must have the same point dimension D, "
                         f"got {p1.shape[2]} and {p2.shape[2]}")
    if p1.shape[2] < 1:
        raise ValueError(f"knn_points: the point dimension D must be >= 1, got p1 of shape {tuple(p1.shape)}")
    if p1.dtype != p2.dtype:
        raise TypeError(f"knn_points: p1 and p2 must have the same dtype, got {p1.dtype} and {p2.dtype}")
    v.check_same_device({"p1": p1, "p2": p2})


def _lengths(lengths, name: str, N: int, P: int, device) -> tuple[torch.Tensor, list[int], bool]:
    """lengths as an int64 tensor (N,), its values on the host and whether any is < P."""
    if lengths is None:
        return torch.full((N,), P, dtype=torch.int64, device=device), [P] * N, False
    if not isinstance(lengths, torch.Tensor):
        raise TypeError(f"{name} must be an integer tensor of shape ({N},) or None, got {type(lengths).__name__}")
    if lengths.dtype.is_floating_point or lengths.dtype.is_complex or lengths.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor of shape ({N},), got dtype {lengths.dtype}")
    if tuple(lengths.shape) != (N,):
        raise ValueError(f"{name} must have shape ({N},) (one length per cloud), got {tuple(lengths.shape)}")
    if lengths.device != torch.device(device):
        raise ValueError(f"{name} must be on the points' device ({device}), got {lengths.device}")
    values = lengths.tolist()
    bad = [x for x in values if not 0 <= x <= P]
    if bad:
        raise ValueError(f"{name} must hold values in [0, {P}], got {bad[0]}")
    return lengths.to(torch.int64), values, any(x < P for x in values)


def _check_finite(p: torch.Tensor, name: str) -> float:
    """max |x| over p (one host sync); ValueError for NaN / inf."""
    if p.numel() == 0:
        return 0.0
    worst = float(p.detach().abs().amax())
    if not worst < float("inf"):
        raise ValueError(f"knn_points: {name} must hold finite coordinates, got max |x| = {worst}")
    return worst


# --- the search (no autograd) ------------------------------------------------------------------


def _distances(q: torch.Tensor, p: torch.Tensor, norm: int) -> torch.Tensor:
    """(N, M, D), (N, P, D) -> (N, M, P), summed left to right over D (the kernels' order)."""
    total = None
    for d in range(q.shape[2]):
        diff = q[:, :, None, d] - p[:, None, :, d]
        term = diff * diff if norm == 2 else diff.abs()
        total = term if total is None else total + term
    return total


def _search_torch(q: torch.Tensor, p: torch.Tensor, lengths2: Optional[torch.Tensor], norm: int,
                  K: int) -> torch.Tensor:
    """Indices (N, M, K) of the K smallest distances among the first lengths2[n] points (stable:
    ties by index); slots past lengths2[n] come out as indices of +inf entries (masked later)."""
    N, M, _ = q.shape
    P = p.shape[1]
    idx = torch.empty((N, M, K), dtype=torch.int64, device=q.device)
    invalid = None
    if lengths2 is not None:
        invalid = (torch.arange(P, device=q.device)[None, :] >= lengths2[:, None])[:, None, :]  # (N, 1, P)
    chunk = max(1, CHUNK_ELEMENTS // max(1, N * P))
    for start in range(0, M, chunk):
        d = _distances(q[:, start:start + chunk], p, norm)
        if invalid is not None:
            d = d.masked_fill(invalid, float("inf"))
        idx[:, start:start + chunk] = torch.sort(d, dim=-1, stable=True).indices[..., :K]
    return idx


def _use_kernel(q: torch.Tensor, norm: int, K: int, worst: float) -> bool:
    """Whether gpavatar.ops.knn covers the search: D = 3, squared L2, float32, K <= 32, |x| <= 1e6."""
    return (q.shape[2] == 3 and norm == 2 and q.dtype == torch.float32 and K <= MAX_KERNEL_K
            and worst <= _MAX_KERNEL_COORD)


def _search(q, p, lengths1, len1, ragged1, lengths2, len2, ragged2, norm, K, worst, backend):
    """idx (N, P1, min(K, P2)) int64; entries outside the valid region are arbitrary in-range indices."""
    N, M, _ = q.shape
    Kc = min(K, p.shape[1])
    if not _use_kernel(q, norm, Kc, worst):
        return _search_torch(q, p, lengths2 if ragged2 else None, norm, Kc)
    if not (ragged1 or ragged2):
        return ops.knn(q, p, Kc, backend=backend, validate=False).idx
    idx = torch.zeros((N, M, Kc), dtype=torch.int64, device=q.device)
    for n in range(N):  # one kernel call per cloud on its valid slices
        m, k = len1[n], min(Kc, len2[n])
        if m == 0 or k == 0:
            continue
        idx[n, :m, :k] = ops.knn(q[n:n + 1, :m], p[n:n + 1, :len2[n]], k, backend=backend, validate=False).idx[0]
    return idx


# --- distances with autograd ---------------------------------------------------------------------


def _neighbour_distances(p1: torch.Tensor, nn: torch.Tensor, norm: int) -> torch.Tensor:
    """p1 (N, P1, D), nn (N, P1, K, D) -> (N, P1, K) in the search's order of summation."""
    diff = p1[:, :, None, :] - nn
    total = None
    for d in range(diff.shape[3]):
        x = diff[..., d]
        if norm == 2:
            term = x * x
        else:
            # |x| with pytorch3d's subgradient: sign(x), and -1 where x == 0 (exact: s * x = |x|).
            sign = torch.where(x > 0, 1.0, -1.0).to(x.dtype).detach()
            term = sign * x
        total = term if total is None else total + term
    return total


def _gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x (N, M, U), idx (N, L, K) in [0, M) -> (N, L, K, U), differentiable w.r.t. x."""
    N, L, K = idx.shape
    U = x.shape[2]
    flat = idx.reshape(N, L * K, 1).expand(N, L * K, U)
    return x.gather(1, flat).reshape(N, L, K, U)


def knn_points(p1: torch.Tensor, p2: torch.Tensor, lengths1: Optional[torch.Tensor] = None,
               lengths2: Optional[torch.Tensor] = None, norm: int = 2, K: int = 1, version: int = -1,
               return_nn: bool = False, return_sorted: bool = True, *, backend: Optional[str] = None) -> KNN:
    """The K nearest points of ``p2[n]`` for every point of ``p1[n]`` (pytorch3d's contract).

    Args:
        p1: (N, P1, D) float queries, D >= 1, finite
        p2: (N, P2, D) same dtype and device
        lengths1: (N,) integer, values in [0, P1]: valid queries per cloud (None: all P1)
        lengths2: (N,) integer, values in [0, P2]: valid points per cloud (None: all P2)
        norm: 2 (squared Euclidean distance) or 1 (L1 distance)
        K: neighbours per query, >= 1 (K > P2 allowed: the extra slots are padding)
        version: pytorch3d's kernel selector; accepted (an int) and ignored
        return_nn: also return the neighbours' coordinates, ``knn_gather(p2, idx, lengths2)``
        return_sorted: accepted; the neighbours are always sorted ascending
        backend: gpavatar's backend for the D = 3, norm = 2 kernel path ("auto" | "cuda" |
            "triton" | "cpu" | "torch"; default $GPAVATAR_BACKEND or auto)
    Returns:
        KNN(dists (N, P1, K) p1.dtype, idx (N, P1, K) int64, knn (N, P1, K, D) or None);
        padding: dists 0, idx 0, knn 0.  dists is differentiable w.r.t. p1 and p2.
    """
    _check_points(p1, p2)
    if norm not in (1, 2) or isinstance(norm, bool):
        raise ValueError(f"knn_points: norm must be 1 (L1) or 2 (squared L2), got {norm!r}")
    K = v.check_int(K, "K", 1)
    v.as_int(version, "version")
    for name, flag in (("return_nn", return_nn), ("return_sorted", return_sorted)):
        if not isinstance(flag, bool):
            raise TypeError(f"knn_points: {name} must be a bool, got {type(flag).__name__}")
    if backend is not None and backend not in ops.BACKENDS:
        raise ValueError(f"knn_points: backend must be one of {ops.BACKENDS}, got {backend!r}")
    N, P1, D = p1.shape
    P2 = p2.shape[1]
    device = p1.device
    lengths1, len1, ragged1 = _lengths(lengths1, "lengths1", N, P1, device)
    lengths2, len2, ragged2 = _lengths(lengths2, "lengths2", N, P2, device)
    worst = max(_check_finite(p1, "p1"), _check_finite(p2, "p2"))

    compute = torch.float64 if p1.dtype == torch.float64 else torch.float32
    q, p = p1.to(compute), p2.to(compute)
    Kc = min(K, P2)
    if N == 0 or P1 == 0 or Kc == 0:
        dists = p1.new_zeros((N, P1, K)) + 0.0 * (p1.sum() + p2.sum())  # keeps the graph connected
        idx = torch.zeros((N, P1, K), dtype=torch.int64, device=device)
        return KNN(dists, idx, p2.new_zeros((N, P1, K, D)) if return_nn else None)

    with torch.no_grad():
        idx = _search(q.detach(), p.detach(), lengths1, len1, ragged1, lengths2, len2, ragged2, norm, K, worst,
                      backend)
    # valid[n, i, k]: query i and neighbour slot k exist in cloud n.
    rows = torch.arange(P1, device=device)[None, :, None] < lengths1[:, None, None]
    slots = torch.arange(Kc, device=device)[None, None, :] < lengths2[:, None, None]
    valid = rows & slots
    idx = torch.where(valid, idx, 0)
    dists = _neighbour_distances(q, _gather(p, idx), norm)
    dists = torch.where(valid, dists, torch.zeros((), dtype=dists.dtype, device=device))
    if Kc < K:
        dists = torch.cat([dists, dists.new_zeros((N, P1, K - Kc))], dim=2)
        idx = torch.cat([idx, idx.new_zeros((N, P1, K - Kc))], dim=2)
    nn = knn_gather(p2, idx, lengths2) if return_nn else None
    return KNN(dists.to(p1.dtype), idx, nn)


def knn_gather(x: torch.Tensor, idx: torch.Tensor, lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``out[n, l, k] = x[n, idx[n, l, k]]``, zero for the slots ``k >= lengths[n]`` (pytorch3d's contract).

    Negative indices (the ``-1`` padding of older code) also give zeros.

    Args:
        x: (N, M, U) features to gather (any U, e.g. the points of ``knn_points``' p2)
        idx: (N, L, K) integer indices in [0, M), e.g. ``knn_points(...).idx``
        lengths: (N,) integer in [0, M] or None (all M)
    Returns:
        (N, L, K, U), differentiable w.r.t. x
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        raise ValueError(f"knn_gather: x must be a tensor of shape (N, M, U), got {tuple(getattr(x, 'shape', ()))}")
    if not isinstance(idx, torch.Tensor) or idx.dim() != 3:
        raise ValueError(f"knn_gather: idx must be a tensor of shape (N, L, K), got "
                         f"{tuple(getattr(idx, 'shape', ()))}")
    if idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool:
        raise TypeError(f"knn_gather: idx must be an integer tensor, got dtype {idx.dtype}")
    N, M, U = x.shape
    if idx.shape[0] != N:
        raise ValueError(f"knn_gather: x (N, M, U) and idx (N, L, K) must have the same batch size N, "
                         f"got {N} and {idx.shape[0]}")
    v.check_same_device({"x": x, "idx": idx})
    K = idx.shape[2]
    lengths, _, ragged = _lengths(lengths, "lengths", N, M, x.device)
    idx = idx.to(torch.int64)
    if idx.numel() and int(idx.max()) >= M:
        raise ValueError(f"knn_gather: idx must hold indices < M = {M}, got {int(idx.max())}")
    keep = idx >= 0
    if ragged:
        keep = keep & (torch.arange(K, device=x.device)[None, None, :] < lengths[:, None, None])
    out = _gather(x, torch.where(keep, idx, 0)) if M > 0 else x.new_zeros((N, idx.shape[1], K, U))
    return torch.where(keep[..., None], out, torch.zeros((), dtype=x.dtype, device=x.device))

