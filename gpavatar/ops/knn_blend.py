"""``knn_blend``: the fused point expression field (SPEC section 5).

For every query x: its K nearest FLAME points p_k (``knn``), a per-neighbour
feature ``h_k = W2 relu(W1 [e_{i_k}, gamma(normalize(x - p_k))] + b1) + b2``
and the inverse-distance blend ``f(x) = sum_k w_k h_k`` with
``u_k = 1 / (|x - p_k|^2 + eps)`` and

* ``normalize="neighbors"`` (the paper): ``w_k = u_k / sum_k' u_k'``;
* ``normalize="queries"`` (the official code and its checkpoint):
  ``w_{m,k} = u_{m,k} / sum_{m'} u_{m',k}`` over all M queries of the batch
  element in this call.  To process one pass in chunks, compute the sums once
  with :func:`knn_blend_weight_sum` and pass them as ``weight_sum``.

The fused backends never build an (M, P) distance matrix nor per-neighbour
MLP activations: ``knn`` keeps a running top-K, the per-point half of the
first layer is computed once per call (``table = e W1_feat^T + b1``, (P, H))
and the second layer is applied after the blend (it commutes with the
weighted sum), so memory is O(M K + P H).

    >>> import torch, gpavatar.ops as ops
    >>> B, M, P, Cf, H, C = 1, 256, 64, 32, 64, 32
    >>> q, p = torch.rand(B, M, 3) * 2 - 1, torch.rand(B, P, 3) * 2 - 1
    >>> e = torch.randn(P, Cf)
    >>> w1, b1 = torch.randn(H, Cf + 27) * 0.1, torch.zeros(H)
    >>> w2, b2 = torch.randn(C, H) * 0.1, torch.zeros(C)
    >>> out = ops.knn_blend(q, p, e, w1, b1, w2, b2, K=8)
    >>> out.feature.shape
    torch.Size([1, 256, 32])

Gradients: to ``point_features``, ``w1``, ``b1``, ``w2``, ``b2`` on every
backend; to ``queries`` and ``points`` only on the ``torch`` backend (fused
backends raise ``NotImplementedError`` if those require grad).

Tensor cores (opt-in, ``$GPAVATAR_BLEND_TENSOR_CORES=1``): on the ``cuda`` and ``triton``
backends the forward then runs the stacked Triton kernel (``kernels/knn_blend.py``: every
(query, neighbour) pair of a tile is a row of one product) with its products in tf32 when
``torch.backends.cuda.matmul.allow_tf32`` is on, in bf16 under bfloat16 autocast (the real-time
fast mode), and the fp32 kernels otherwise; ~1e-3 (tf32) / ~1e-2 (bf16) relative to the fp32
features.  ``$GPAVATAR_BLEND_TENSOR_CORES=tf32x3``: the same, and where the fp32 kernels would run
(TF32 off) the stacked kernel in tf32x3 (three tf32 products: about fp32's accuracy on the tensor
cores).  The backward stays the fp32 one.  Not yet timed on a GPU.

NaN: ``queries``, ``points`` (finite, ``|x| <= 1e6``) and ``weight_sum`` (finite,
> 0) are checked when ``validate``; features and weights are not, and a NaN in
them reaches exactly the outputs it reaches in the reference on every backend
(``relu(NaN) = NaN``; the ReLU's backward passes the gradient at NaN, as torch's
does).  One difference in the gradients: the fused backends apply the feature
half of ``w1`` to every point, so with a NaN there the gradient rows of points
no query used are NaN, where the reference leaves them 0.
"""

from __future__ import annotations

import operator
import os
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from gpavatar import _extension
from gpavatar.ops import _backend
from gpavatar.ops import _validation as v
from gpavatar.ops._library import register_forward_backward
from gpavatar.ops.knn import (KnnIndex, check_index, check_k, check_knn_inputs, choose_backend, reference_dtype,
                              search_op)
from gpavatar.ops.reference import EMBED_DIM, knn_blend_reference

NORMALIZATIONS = ("neighbors", "queries")
# The official code weighs neighbours by 1 / d² with no constant.  This epsilon is the
# smallest the ops accept: in float32 it changes no weight of any d² >= 3e-23 (adding it
# rounds away), while a query exactly on a point still gets a finite weight 1e30 (the sum of
# 3e8 such weights stays finite).  Render passes contain samples with d² ~ 1e-7, where 1e-8
# would change the weight by ~9 % and, through the global "queries" sum, the PEF at every
# sample of the pass.  The op's own default stays 1e-8: with 1e-30, gradients to
# *positions* on the torch backend overflow float32 (d u / d d² = -u²) within 1e-19 of a point.
OFFICIAL_EPS = 1e-30
MAX_CUDA_HIDDEN, MAX_CUDA_OUT = 128, 64
# "1": the forward of the cuda / triton backends runs the stacked Triton kernel (kernels/knn_blend.py:
# every (query, neighbour) pair a row of one tensor-core product) when torch's flags allow reduced
# precision: bf16 under bfloat16 autocast, tf32 with TF32 matmuls allowed (the real-time fast mode);
# else, and by default ("0"), the fp32 kernels.  Opt-in: not yet timed on a GPU.
TENSOR_CORES_ENV = "GPAVATAR_BLEND_TENSOR_CORES"


class KnnBlendResult(NamedTuple):
    feature: torch.Tensor  # (B, M, C) float32 (float64 for float64 inputs on the torch backend)
    dist2: torch.Tensor  # (B, M, K)
    idx: torch.Tensor  # (B, M, K) int64


def knn_blend_weight_sum(dist2: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """sum over queries of 1 / (dist2 + eps): (B, M, K) -> (B, K).

    Sum it over all chunks of a pass (these sums add) and pass the total as
    ``weight_sum`` to get the ``"queries"`` normalization of the whole pass.
    """
    return (dist2 + eps).reciprocal_().sum(dim=1)  # 1 / x: the same bits, one kernel fewer


def tensor_cores_mode() -> str:
    """``$GPAVATAR_BLEND_TENSOR_CORES``: "1" on, "tf32x3" on and tf32x3 where fp32 would run, unset /
    "" / "0" off; a ValueError otherwise."""
    value = os.environ.get(TENSOR_CORES_ENV, "") or "0"
    if value not in ("0", "1", "tf32x3"):
        raise ValueError(f"{TENSOR_CORES_ENV} must be 0, 1 or tf32x3, got {value!r}")
    return value


def tensor_cores_setting() -> bool:
    """Whether ``$GPAVATAR_BLEND_TENSOR_CORES`` turns the stacked forward on ("1" or "tf32x3")."""
    return tensor_cores_mode() != "0"


def flags_precision(device: torch.device) -> Optional[str]:
    """The reduced-precision products the torch flags in force allow on ``device``: "bf16" under
    bfloat16 autocast, None under another autocast dtype (the Triton kernels have no float16 mode),
    "tf32" when ``torch.backends.cuda.matmul.allow_tf32`` is on, else "ieee" (fp32).  The stacked
    blend and the layers kernel (``ops.field_query.field_layers``) both follow it."""
    if torch.is_autocast_enabled(device.type):
        return "bf16" if torch.get_autocast_dtype(device.type) == torch.bfloat16 else None
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


def stacked_precision(name: str, device: torch.device) -> Optional[str]:
    """The stacked kernel's precision for a call on backend ``name`` and ``device``, or None when the
    fp32 kernels run (see TENSOR_CORES_ENV): :func:`flags_precision`, except that fp32 on a GPU runs
    the fp32 CUDA kernels ("tf32x3" instead with ``$GPAVATAR_BLEND_TENSOR_CORES=tf32x3``).  Under
    the Triton interpreter (CPU tensors, tests) it also runs at fp32."""
    if name not in ("cuda", "triton") or not tensor_cores_setting() or not _backend.triton_available():
        return None
    precision = flags_precision(device)
    if precision == "ieee" and tensor_cores_mode() == "tf32x3":
        precision = "tf32x3"
    if device.type == "cuda":
        return None if precision == "ieee" else precision
    if device.type == "cpu" and _backend.triton_interpreted():
        return precision
    return None


def check_knn_blend_inputs(queries, points, point_features, w1, b1, w2, b2, K, normalize, eps,
                           weight_sum) -> None:
    check_knn_inputs(queries, points, K, op="knn_blend")
    B, P = points.shape[0], points.shape[1]
    v.check_tensor(point_features, "point_features", "(P, Cf) or (B, P, Cf)")
    if point_features.dim() == 2:
        ok = point_features.shape[0] == P
    else:
        ok = point_features.dim() == 3 and point_features.shape[:2] == (B, P)
    if not ok:
        raise ValueError(f"point_features must have shape ({P}, Cf) or ({B}, {P}, Cf), got {tuple(point_features.shape)}")
    cf = point_features.shape[-1]
    v.check_tensor(w1, "w1", f"(H, {cf + EMBED_DIM})", ndim=2, last=cf + EMBED_DIM)
    H = w1.shape[0]
    v.check_tensor(b1, "b1", f"({H},)", ndim=1, last=H)
    v.check_tensor(w2, "w2", f"(C, {H})", ndim=2, last=H)
    v.check_tensor(b2, "b2", f"({w2.shape[0]},)", ndim=1, last=w2.shape[0])
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
    v.check_eps(eps)
    tensors = {"queries": queries, "points": points, "point_features": point_features, "w1": w1, "b1": b1,
               "w2": w2, "b2": b2}
    v.check_weight_sum(weight_sum, normalize, B, K, tensors)
    v.check_same_device(tensors)


def knn_blend(queries: torch.Tensor, points: torch.Tensor, point_features: torch.Tensor, w1: torch.Tensor,
              b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor, K: int = 8, *, normalize: str = "neighbors",
              eps: float = 1e-8, weight_sum: Optional[torch.Tensor] = None, backend: Optional[str] = None,
              validate: bool = True, index: Optional[KnnIndex] = None) -> KnnBlendResult:
    """Fused KNN + per-neighbour MLP + inverse-distance blend.

    Args:
        queries: (B, M, 3) sample positions
        points: (B, P, 3) FLAME points
        point_features: (P, Cf) learned per-point features (shared) or (B, P, Cf)
        w1: (H, Cf + 27), b1: (H,)  first Linear (input: [feature, gamma(direction)])
        w2: (C, H), b2: (C,)        second Linear
        K: neighbours, 1 <= K <= P (<= 32 on fused backends); an int or a numpy integer
        normalize: "neighbors" | "queries" (see module docstring)
        eps: added to squared distances before inverting (in [1e-30, 1e30]; a query on a point
            stays finite); ``OFFICIAL_EPS`` (1e-30) reproduces the official 1 / d² for every
            d² >= 3e-23 and is what the model uses
        weight_sum: (B, K) precomputed "queries" normalizer (see knn_blend_weight_sum)
        backend: "auto" | "cuda" | "triton" | "cpu" | "torch"
        validate: check shapes and values (values need one host sync and are skipped under torch.compile)
        index: ``ops.knn_index(points, K)`` (or None): the KNN searches it instead of building its
            cell lists again (the same neighbours)
    Returns:
        KnnBlendResult(feature (B, M, C), dist2 (B, M, K), idx (B, M, K) int64).
        Fused backends compute in float32 and return float32.
    """
    if validate:
        check_knn_blend_inputs(queries, points, point_features, w1, b1, w2, b2, K, normalize, eps, weight_sum)
    else:
        check_k(K, points)
    H, C = w1.shape[0], w2.shape[0]
    K = operator.index(K)  # numpy integers too (validation refused bools and non-integers)
    if index is not None:
        check_index(index, points, K)
    name = choose_backend(backend, queries.device, K, "knn_blend")
    if name == "cuda" and (H > MAX_CUDA_HIDDEN or C > MAX_CUDA_OUT):
        if backend in (None, "auto"):
            name = "torch"
        else:
            raise ValueError(f"knn_blend: backend 'cuda' supports H <= {MAX_CUDA_HIDDEN} and C <= {MAX_CUDA_OUT}, "
                             f"got H = {H}, C = {C} (use backend='triton' or 'torch')")
    if name == "torch" or queries.shape[0] == 0 or queries.shape[1] == 0:
        dtype = reference_dtype(queries, name)
        cast = [t.to(dtype) for t in (queries, points, point_features, w1, b1, w2, b2)]
        return KnnBlendResult(*knn_blend_reference(*cast, K=K, normalize=normalize, eps=eps, weight_sum=weight_sum))

    if torch.is_grad_enabled() and (queries.requires_grad or points.requires_grad):
        raise NotImplementedError(
            f"knn_blend: backend {name!r} does not compute gradients with respect to queries or points; "
            "detach them or use backend='torch'")
    f32 = torch.float32
    q = queries.detach().to(f32).contiguous()
    p = points.detach().to(f32).contiguous()
    with torch.no_grad():
        dist2, idx = search_op(q, p, K, name, index)
        if normalize == "queries" and weight_sum is None:
            weight_sum = knn_blend_weight_sum(dist2, eps)
    if weight_sum is not None:
        weight_sum = weight_sum.detach().to(f32).contiguous()
    cf = point_features.shape[-1]
    w1 = w1.to(f32)
    # The per-point half of the first layer, once per call: (P or B*P, H); float32 also
    # under autocast (the kernels' contract).
    with torch.autocast(queries.device.type, enabled=False):
        table = F.linear(point_features.to(f32), w1[:, :cf], b1.to(f32)).reshape(-1, H)
    precision = stacked_precision(name, queries.device)
    if precision is not None:
        feature = torch.ops.gpavatar.knn_blend_forward_stacked_triton(
            q, p, dist2, idx, table, w1[:, cf:], w2.to(f32), b2.to(f32), weight_sum, float(eps), precision)
        return KnnBlendResult(feature, dist2, idx)
    blend_op = (torch.ops.gpavatar.knn_blend_forward if name in ("cpu", "cuda")
                else torch.ops.gpavatar.knn_blend_forward_triton)
    feature = blend_op(q, p, dist2, idx, table, w1[:, cf:], w2.to(f32), b2.to(f32), weight_sum, float(eps))
    return KnnBlendResult(feature, dist2, idx)


# --- torch.library registration ------------------------------------------------------------


def _forward_fake(queries, points, dist2, idx, table, w1_dir, w2, b2, weight_sum, eps):
    return queries.new_empty((queries.shape[0], queries.shape[1], w2.shape[0]))


def _backward_fake(grad_out, queries, points, dist2, idx, table, w1_dir, w2, weight_sum, eps):
    return (table.new_empty(table.shape), w1_dir.new_empty(w1_dir.shape), w2.new_empty(w2.shape),
            w2.new_empty((w2.shape[0],)))


def _setup_context(ctx, inputs, output):
    queries, points, dist2, idx, table, w1_dir, w2, b2, weight_sum, eps = inputs
    ctx.save_for_backward(queries, points, dist2, idx, table, w1_dir, w2, weight_sum)
    ctx.eps = eps


def _make_backward(backward_op):
    def backward(ctx, grad_out):
        if any(ctx.needs_input_grad[i] for i in (0, 1, 2, 8)):
            raise NotImplementedError("knn_blend: fused backends do not differentiate with respect to queries, "
                                      "points, dist2 or weight_sum (use backend='torch')")
        queries, points, dist2, idx, table, w1_dir, w2, weight_sum = ctx.saved_tensors
        grads = backward_op(grad_out.contiguous(), queries, points, dist2, idx, table, w1_dir, w2, weight_sum,
                            ctx.eps)
        keep = ctx.needs_input_grad[4:8]
        return (None, None, None, None) + tuple(g if k else None for g, k in zip(grads, keep)) + (None, None)

    return backward


@torch.library.custom_op("gpavatar::knn_blend_forward_triton", mutates_args=())
def _forward_triton(queries: torch.Tensor, points: torch.Tensor, dist2: torch.Tensor, idx: torch.Tensor,
                    table: torch.Tensor, w1_dir: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor,
                    weight_sum: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    from gpavatar.kernels.knn_blend import knn_blend_forward

    return knn_blend_forward(queries, points, dist2, idx, table.contiguous(), w1_dir.contiguous(), w2.contiguous(),
                             b2.contiguous(), weight_sum, eps)


@torch.library.custom_op("gpavatar::knn_blend_backward_triton", mutates_args=())
def _backward_triton(grad_out: torch.Tensor, queries: torch.Tensor, points: torch.Tensor, dist2: torch.Tensor,
                     idx: torch.Tensor, table: torch.Tensor, w1_dir: torch.Tensor, w2: torch.Tensor,
                     weight_sum: Optional[torch.Tensor], eps: float
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from gpavatar.kernels.knn_blend import knn_blend_backward

    return knn_blend_backward(grad_out.contiguous(), queries, points, dist2, idx, table.contiguous(),
                              w1_dir.contiguous(), w2.contiguous(), weight_sum, eps)


register_forward_backward("knn_blend", _forward_fake, _backward_fake, _make_backward, _setup_context)


# The stacked forward (TENSOR_CORES_ENV): the same backward as the fp32 forwards (the C++ op where the
# extension has it, else Triton's), which recomputes the blend in fp32 from the saved inputs.
@torch.library.custom_op("gpavatar::knn_blend_forward_stacked_triton", mutates_args=())
def _forward_stacked(queries: torch.Tensor, points: torch.Tensor, dist2: torch.Tensor, idx: torch.Tensor,
                     table: torch.Tensor, w1_dir: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor,
                     weight_sum: Optional[torch.Tensor], eps: float, precision: str) -> torch.Tensor:
    from gpavatar.kernels.knn_blend import knn_blend_forward_stacked

    return knn_blend_forward_stacked(queries, points, dist2, idx, table.contiguous(), w1_dir.contiguous(),
                                     w2.contiguous(), b2.contiguous(), weight_sum, eps, precision)


@_forward_stacked.register_fake
def _forward_stacked_fake(queries, points, dist2, idx, table, w1_dir, w2, b2, weight_sum, eps, precision):
    return _forward_fake(queries, points, dist2, idx, table, w1_dir, w2, b2, weight_sum, eps)


def _register_stacked() -> None:
    cpp = _extension.available() and hasattr(torch.ops.gpavatar, "knn_blend_backward")
    backward = _make_backward(torch.ops.gpavatar.knn_blend_backward if cpp
                              else torch.ops.gpavatar.knn_blend_backward_triton)

    def setup_context(ctx, inputs, output):
        _setup_context(ctx, inputs[:10], output)

    def stacked_backward(ctx, grad_out):
        return backward(ctx, grad_out) + (None,)

    torch.library.register_autograd("gpavatar::knn_blend_forward_stacked_triton", stacked_backward,
                                    setup_context=setup_context)


_register_stacked()
