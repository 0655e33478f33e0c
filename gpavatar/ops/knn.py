"""``knn``: the K nearest points of every query (pytorch3d's ``knn_points`` contract).

    >>> import torch, gpavatar.ops as ops
    >>> q, p = torch.rand(1, 100, 3), torch.rand(1, 50, 3)
    >>> dist2, idx = ops.knn(q, p, K=4)
    >>> dist2.shape, idx.dtype
    (torch.Size([1, 100, 4]), torch.int64)

Backends (see :mod:`gpavatar.ops._backend`): the C++ extension (``cpu``,
``cuda``), ``triton`` and the reference (``torch``).  Every backend returns the
same indices: distances are evaluated as ``(dx*dx + dy*dy) + dz*dz`` in
float32 without FMA contraction and ties keep the lower index first, also for
degenerate clouds (every point equal, extents down to denormals whose squared
distances all round to 0, coordinates at the validated limit ``|x| = 1e6``).
Gradients of ``dist2`` flow to queries and points on every backend.
"""

from __future__ import annotations

import operator
import os
from typing import NamedTuple

import torch

from gpavatar import _extension
from gpavatar.ops import _backend
from gpavatar.ops import _validation as v
from gpavatar.ops.reference import gather_points, knn_reference

MAX_FUSED_K = 32


class KnnResult(NamedTuple):
    dist2: torch.Tensor  # (B, M, K) float32 (float64 for float64 inputs on the torch backend)
    idx: torch.Tensor  # (B, M, K) int64


def check_knn_inputs(queries, points, K, op: str = "knn") -> None:
    v.check_tensor(queries, "queries", "(B, M, 3)", ndim=3, last=3)
    v.check_tensor(points, "points", "(B, P, 3)", ndim=3, last=3)
    if queries.shape[0] != points.shape[0]:
        raise ValueError(f"{op}: queries (B, M, 3) and points (B, P, 3) must have the same batch size B, "
                         f"got {queries.shape[0]} and {points.shape[0]}")
    v.check_same_device({"queries": queries, "points": points})
    v.check_int(K, "K", 1, points.shape[1], high_name=f"P = {points.shape[1]}")
    v.check_coordinates(queries, "queries", points, "points")


def choose_backend(backend, device, K: int, op: str) -> str:
    """Resolve the backend; ``auto`` falls back to torch where fused kernels can't go."""
    name = _backend.resolve(backend, device, op)
    if name != "torch" and K > MAX_FUSED_K:
        requested = backend if backend is not None else "auto"
        if requested == "auto" and _env_backend() in (None, "auto"):
            return "torch"
        raise ValueError(f"{op}: K must be <= {MAX_FUSED_K} on backend {name!r}, got {K} (use backend='torch')")
    return name


def reference_dtype(queries: torch.Tensor, backend: str) -> torch.dtype:
    """float64 stays float64 on the torch reference (gradcheck); everything else computes in float32."""
    return torch.float64 if queries.dtype == torch.float64 and backend == "torch" else torch.float32


def _env_backend():
    return os.environ.get("GPAVATAR_BACKEND")


def knn(queries: torch.Tensor, points: torch.Tensor, K: int, *, backend: str | None = None,
        validate: bool = True) -> KnnResult:
    """K nearest points by squared Euclidean distance, sorted ascending.

    Args:
        queries: (B, M, 3) float (half / bf16 / float64 computed in float32 on fused backends)
        points: (B, P, 3) float, same device
        K: 1 <= K <= P (<= 32 on fused backends); an int or a numpy integer
        backend: "auto" | "cuda" | "triton" | "cpu" | "torch" (default: $GPAVATAR_BACKEND or auto)
        validate: check shapes and values (values need one host sync and are skipped under torch.compile)
    Returns:
        KnnResult(dist2 (B, M, K), idx (B, M, K) int64)
    """
    if validate:
        check_knn_inputs(queries, points, K)
    K = operator.index(K)  # numpy integers too (validation refused bools and non-integers)
    name = choose_backend(backend, queries.device, K, "knn")
    if name == "torch" or queries.shape[0] == 0 or queries.shape[1] == 0:
        dtype = reference_dtype(queries, name)
        return KnnResult(*knn_reference(queries.to(dtype), points.to(dtype), K))
    q = queries.to(torch.float32).contiguous()
    p = points.to(torch.float32).contiguous()
    op = torch.ops.gpavatar.knn if name in ("cpu", "cuda") else torch.ops.gpavatar.knn_triton
    return KnnResult(*op(q, p, K))


# --- torch.library registration ------------------------------------------------------------


def _knn_fake(queries, points, K):
    B, M = queries.shape[0], queries.shape[1]
    return queries.new_empty((B, M, K)), queries.new_empty((B, M, K), dtype=torch.int64)


def _knn_setup_context(ctx, inputs, output):
    queries, points, _ = inputs
    ctx.save_for_backward(queries, points, output[1])


def _knn_backward(ctx, grad_dist2, grad_idx):
    """d dist2_k / d q = 2 (q - p_k); d dist2_k / d p_k = -2 (q - p_k)."""
    queries, points, idx = ctx.saved_tensors
    grad_queries = grad_points = None
    if grad_dist2 is None:
        return None, None, None
    diff = queries[:, :, None, :] - gather_points(points, idx)  # (B, M, K, 3)
    g = 2.0 * grad_dist2[..., None] * diff
    if ctx.needs_input_grad[0]:
        grad_queries = g.sum(dim=2)
    if ctx.needs_input_grad[1]:
        B, M, K = idx.shape
        grad_points = torch.zeros_like(points).scatter_add_(
            1, idx.reshape(B, M * K, 1).expand(B, M * K, 3), -g.reshape(B, M * K, 3))
    return grad_queries, grad_points, None


@torch.library.custom_op("gpavatar::knn_triton", mutates_args=())
def _knn_triton(queries: torch.Tensor, points: torch.Tensor, K: int) -> tuple[torch.Tensor, torch.Tensor]:
    from gpavatar.kernels.knn import knn as triton_knn

    return triton_knn(queries, points, K)


def _register() -> None:
    names = ["gpavatar::knn_triton"] + (["gpavatar::knn"] if _extension.available() else [])
    for name in names:
        torch.library.register_fake(name)(_knn_fake)
        torch.library.register_autograd(name, _knn_backward, setup_context=_knn_setup_context)


_register()
