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
Non-finite coordinates (only with ``validate=False``) follow one total order on
every backend: NaN distances after +inf, ties by the lower index, indices in
``[0, P)`` (``torch.sort(stable=True)``'s order).
Gradients of ``dist2`` flow to queries and points on every backend.
"""

from __future__ import annotations

import contextlib
import operator
import os
from typing import Iterator, NamedTuple

import torch

from gpavatar import _extension
from gpavatar.ops import _backend
from gpavatar.ops import _validation as v
from gpavatar.ops.reference import gather_points, knn_reference

MAX_FUSED_K = 32


class KnnResult(NamedTuple):
    dist2: torch.Tensor  # (B, M, K) float32 (float64 for float64 inputs on the torch backend)
    idx: torch.Tensor  # (B, M, K) int64


class KnnIndex(NamedTuple):
    """The cell lists of ``points`` (:func:`knn_index`), searched by ``knn(..., index=)``."""
    tensors: tuple  # the extension's knn_index output: geom, offset, cand, cell_bound, band_count, seeds
    points: torch.Tensor  # the points it was built from (checked at each use)
    version: int  # points._version when it was built (an in-place change makes it stale)
    K: int


SHARE_ENV = "GPAVATAR_KNN_SHARE"
# The C++ knn's automatic choice (csrc/ops.h): the CUDA cell lists from INDEX_MIN_QUERIES queries
# per batch element (kCellsMinQueries; below, CUDA scans every point and an index would not pay for
# its build).  Whether an index applies at all is the extension's answer (knn_index_applies).
INDEX_MIN_QUERIES = 8192


@contextlib.contextmanager
def cpu_list_cache() -> Iterator[None]:
    """Inside the block the C++ CPU knn keeps the cell lists it builds and reuses them for later calls
    on the same points (the same bytes and K, a grid that covers the new queries): a frame's or a
    training step's two field passes build them once (the tiny preset's CPU frame 9.8 -> 9.6 ms on
    2 Xeon cores).  The neighbours are the same bit for bit: a cell's list holds the K nearest of any
    location in its cell.  Leaving the outermost block drops the lists, so separate frames never share
    them.  Nothing happens without the extension's op or with ``GPAVATAR_KNN_CPU_CACHE=0``."""
    op = getattr(torch.ops.gpavatar, "knn_cpu_list_cache", None)
    if op is None:
        yield
        return
    op(True)
    try:
        yield
    finally:
        op(False)


def share_setting() -> bool:
    """``$GPAVATAR_KNN_SHARE``: "1" -> the model's field builds one :func:`knn_index` per frame and
    both passes search it; unset / "" / "0" -> each pass builds its own lists (the default until a
    GPU run times it).  A ValueError for other values."""
    value = os.environ.get(SHARE_ENV, "") or "0"
    if value not in ("0", "1"):
        raise ValueError(f"{SHARE_ENV} must be 0 or 1, got {value!r}")
    return value == "1"


def check_k(K, points) -> int:
    """K as an int in [1, P]: checked with validate=False too (it costs no host sync; a K > P left
    slots no point fills)."""
    return v.check_int(K, "K", 1, points.shape[1], high_name=f"P = {points.shape[1]}")


def check_knn_inputs(queries, points, K, op: str = "knn") -> None:
    v.check_tensor(queries, "queries", "(B, M, 3)", ndim=3, last=3)
    v.check_tensor(points, "points", "(B, P, 3)", ndim=3, last=3)
    if queries.shape[0] != points.shape[0]:
        raise ValueError(f"{op}: queries (B, M, 3) and points (B, P, 3) must have the same batch size B, "
                         f"got {queries.shape[0]} and {points.shape[0]}")
    v.check_same_device({"queries": queries, "points": points})
    check_k(K, points)
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


def _index_applies(name: str, points: torch.Tensor) -> bool:
    """Whether ``name``'s knn searches cell lists that an index can hold: the extension's CUDA path
    (the lists from 8192 queries; GPAVATAR_KNN auto or cells), and the CPU's CUDA-layout path
    (GPAVATAR_KNN_LAYOUT=cuda: tests).  The extension answers (``knn_index_applies``: its own
    reading of the GPAVATAR_KNN* switches)."""
    if name not in ("cpu", "cuda") or not hasattr(torch.ops.gpavatar, "knn_index_applies"):
        return False
    return bool(torch.ops.gpavatar.knn_index_applies(points))


def knn_index(points: torch.Tensor, K: int, *, queries: torch.Tensor | None = None,
              box: tuple[float, float] | None = None, backend: str | None = None,
              validate: bool = True) -> KnnIndex | None:
    """The cell lists of ``points`` for K neighbours, once, for several :func:`knn` calls (``index=``):
    the two field passes of a frame share their points.  The grid covers the points' box joined with
    ``queries``' box (their amin / amax on the device: no host sync), or with ``box`` = (lo, hi) on
    every axis; a later query outside it is still exact (the brute-force scan), just slower.

    Returns None where ``backend`` has no such lists (the torch and Triton backends, the CPU's own
    layout, fewer than 256 points): ``knn`` ignores ``index=None``.  Every backend's result is the
    same with or without an index (exact KNN)."""
    if validate:
        v.check_tensor(points, "points", "(B, P, 3)", ndim=3, last=3)
        check_k(K, points)
        if queries is not None:
            v.check_tensor(queries, "queries", "(B, M, 3)", ndim=3, last=3)
            if queries.shape[0] != points.shape[0] or queries.device != points.device:
                raise ValueError(f"knn_index: queries must have the batch size and device of points, got "
                                 f"{tuple(queries.shape)} on {queries.device} and {tuple(points.shape)} on "
                                 f"{points.device}")
            v.check_coordinates(queries, "queries", points, "points")
        else:
            v.check_coordinates(points, "points")
        if box is not None and not (len(box) == 2 and float(box[0]) <= float(box[1])):
            raise ValueError(f"box must be (lo, hi) with lo <= hi, got {box!r}")
    K = operator.index(K)
    name = choose_backend(backend, points.device, K, "knn_index")
    B, P = points.shape[0], points.shape[1]
    if not _index_applies(name, points) or B == 0 or K > MAX_FUSED_K:
        return None
    p = points.detach().to(torch.float32).contiguous()
    with torch.no_grad():
        if queries is not None and queries.shape[1] > 0:
            q = queries.detach().to(torch.float32)
            query_box = torch.cat([q.amin(1), q.amax(1)], 1)
        elif box is not None:
            lo, hi = float(box[0]), float(box[1])
            query_box = torch.tensor([lo] * 3 + [hi] * 3, device=p.device).expand(B, 6)
        else:
            query_box = torch.cat([p.amin(1), p.amax(1)], 1)
        tensors = torch.ops.gpavatar.knn_index(p, query_box.contiguous(), K)
    return KnnIndex(tuple(tensors), points, points._version, K)


def check_index(index: KnnIndex, points: torch.Tensor, K: int) -> None:
    """A ValueError unless ``index`` was built by :func:`knn_index` from these points (same storage,
    shape and device, unchanged since) for this K."""
    if not isinstance(index, KnnIndex):
        raise TypeError(f"index must be a KnnIndex from knn_index (or None), got {type(index).__name__}")
    built = index.points
    same = (built.device == points.device and built.shape == points.shape and built.data_ptr() == points.data_ptr()
            and built.stride() == points.stride())
    if not same:
        raise ValueError("index was built from other points: build it with knn_index(points, K) for these points")
    if points._version != index.version:
        raise ValueError("index is stale: its points changed in place since knn_index built it")
    if index.K != K:
        raise ValueError(f"index was built for K = {index.K}, got K = {K}")


def search_op(q: torch.Tensor, p: torch.Tensor, K: int, name: str, index: KnnIndex | None):
    """The knn custom op of backend ``name`` on float32 contiguous q, p: the index's search when one is
    given for a backend with cell lists, else the backend's knn."""
    if index is not None and name in ("cpu", "cuda"):
        return torch.ops.gpavatar.knn_search(q, p, K, list(index.tensors))
    return torch.ops.gpavatar.knn(q, p, K) if name in ("cpu", "cuda") else torch.ops.gpavatar.knn_triton(q, p, K)


def knn(queries: torch.Tensor, points: torch.Tensor, K: int, *, backend: str | None = None,
        validate: bool = True, index: KnnIndex | None = None) -> KnnResult:
    """K nearest points by squared Euclidean distance, sorted ascending.

    Args:
        queries: (B, M, 3) float (half / bf16 / float64 computed in float32 on fused backends)
        points: (B, P, 3) float, same device
        K: 1 <= K <= P (<= 32 on fused backends); an int or a numpy integer
        backend: "auto" | "cuda" | "triton" | "cpu" | "torch" (default: $GPAVATAR_BACKEND or auto)
        validate: check shapes and values (values need one host sync and are skipped under torch.compile)
        index: :func:`knn_index` of these points and K (or None): searched instead of building the
            cell lists again (the same result)
    Returns:
        KnnResult(dist2 (B, M, K), idx (B, M, K) int64)
    """
    if validate:
        check_knn_inputs(queries, points, K)
    else:
        check_k(K, points)
    K = operator.index(K)  # numpy integers too (validation refused bools and non-integers)
    if index is not None:
        check_index(index, points, K)
    name = choose_backend(backend, queries.device, K, "knn")
    if name == "torch" or queries.shape[0] == 0 or queries.shape[1] == 0:
        dtype = reference_dtype(queries, name)
        return KnnResult(*knn_reference(queries.to(dtype), points.to(dtype), K))
    q = queries.to(torch.float32).contiguous()
    p = points.to(torch.float32).contiguous()
    return KnnResult(*search_op(q, p, K, name, index))


# --- torch.library registration ------------------------------------------------------------


def _knn_fake(queries, points, K):
    B, M = queries.shape[0], queries.shape[1]
    return queries.new_empty((B, M, K)), queries.new_empty((B, M, K), dtype=torch.int64)


def _knn_setup_context(ctx, inputs, output):
    queries, points = inputs[0], inputs[1]
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


def _knn_search_setup_context(ctx, inputs, output):
    _knn_setup_context(ctx, inputs, output)
    ctx.index_size = len(inputs[3])


def _knn_search_backward(ctx, grad_dist2, grad_idx):
    return _knn_backward(ctx, grad_dist2, grad_idx) + ([None] * ctx.index_size,)


def _knn_search_fake(queries, points, K, index):
    return _knn_fake(queries, points, K)


@torch.library.custom_op("gpavatar::knn_triton", mutates_args=())
def _knn_triton(queries: torch.Tensor, points: torch.Tensor, K: int) -> tuple[torch.Tensor, torch.Tensor]:
    from gpavatar.kernels.knn import knn as triton_knn

    return triton_knn(queries, points, K)


def _register() -> None:
    names = ["gpavatar::knn_triton"] + (["gpavatar::knn"] if _extension.available() else [])
    for name in names:
        torch.library.register_fake(name)(_knn_fake)
        torch.library.register_autograd(name, _knn_backward, setup_context=_knn_setup_context)
    # hasattr: an extension built before the index ops existed (a stale in-place build) lacks them
    if _extension.available() and hasattr(torch.ops.gpavatar, "knn_search"):
        torch.library.register_fake("gpavatar::knn_search")(_knn_search_fake)
        torch.library.register_autograd("gpavatar::knn_search", _knn_search_backward,
                                        setup_context=_knn_search_setup_context)


_register()
