"""``field_query``: one field pass of the decoder (SPEC section 6) as one fused kernel.

For a sample x seen along the ray direction d, with its K nearest FLAME points::

    g     = [triplane_mean(planes, x) (C), PEF(x, points) (PC)]           SPEC 4, 5
    feat  = L3(relu(L2(relu(L1(g)))))                                     feature_layers.{0,2,4}
    sigma = softplus_beta=10(density(feat)) * [x strictly inside (-1, 1)^3]
    alpha = 1 - exp(-sigma)                                               (-expm1(-sigma))
    value = R2(relu(R1([feat, gamma(normalize(d))])))                     rgb_layers.{0,2}
    value[..., :3] = sigmoid(value[..., :3]) * 1.002 - 0.001

Unfused, a pass launches the tri-plane op, the PEF op, seven Linear layers and the
element-wise steps, each writing its (N, width) result to memory.  The fused Triton
kernel (``kernels/field_query.py``) reads the KNN result (``ops.knn``: dist2, idx)
and writes only alpha (B, N) and value (B, N, V); its matrix products run on
``tl.dot``.  With ``normalize="queries"`` (the official PEF) the pass is two steps:
the per-rank weight sums (``ops.knn_blend_weight_sum``, or ``weight_sum=`` for a
chunked pass), then the fused query.

    >>> import torch, gpavatar.ops as ops
    >>> from gpavatar.model.decoder import PointsDecoder
    >>> dec = PointsDecoder(plane_channels=8, num_points=50, point_feature_dim=8, pef_dim=8, hidden=32,
    ...                     value_hidden=16, value_dim=8, normalize="neighbors")
    >>> planes = torch.randn(1, 3, 16, 16, 8)               # channels-last (B, 3, H, W, C)
    >>> coords, dirs = torch.rand(1, 64, 3) * 2 - 1, torch.randn(1, 64, 3)
    >>> out = ops.field_query(coords, dirs, planes, torch.rand(1, 50, 3) - 0.5, dec.field_weights(), K=8,
    ...                       normalize="neighbors")
    >>> out.alpha.shape, out.value.shape
    (torch.Size([1, 64]), torch.Size([1, 64, 8]))

When the fused kernel runs (``fused`` below): the backend resolves to ``"triton"``
or ``"cuda"`` (there is no CUDA-C version: ``"cuda"`` means the extension's KNN and
this Triton kernel), Triton can run on the tensors (CUDA, or CPU tensors under
``TRITON_INTERPRET=1``), no input requires grad (with grad enabled), autocast is
off, every width is <= 256 and K <= 32.  Otherwise -- and for ``fused=False`` or
``$GPAVATAR_FIELD_FUSED=0`` -- the same pass runs unfused: ``triplane_sample`` +
``knn_blend`` + ``F.linear`` layers on the same backend, exactly what
``PointsDecoder`` computed before this op (bit for bit).  The op is forward only:
training takes the unfused path, whose ops have their own backward.

Precision of the fused products (``precision=``): ``"ieee"`` (fp32, the float32
contract; ~1e-6 relative to the unfused path), ``"tf32x3"`` (tensor cores, close to
fp32), ``"tf32"`` (tensor cores, 10-bit mantissas: ~1e-3 relative) or ``"bf16"``
(the decoder's products on bfloat16 weights and activations with fp32 accumulation,
the PEF's in tf32: ~1e-2 relative).  Default: ``"tf32"`` when
``torch.backends.cuda.matmul.allow_tf32`` is on (the real-time fast mode), else
``"ieee"``.  The unfused path ignores it (its Linear layers follow torch's flags).
``"ieee"`` runs its products on the CUDA cores through a scratch buffer of 256
bytes per sample at the paper widths (``kernels/field_query.py`` says why).

NaN: ``coords`` and ``points`` are checked (finite, ``|x| <= 1e6``) when
``validate``; texels, directions and weights are not, and a NaN in them reaches
the outputs it reaches on the unfused path.  ``validate=False`` adds no host
synchronisation (the renderer's real-time path, CUDA graphs).
"""

from __future__ import annotations

import operator
import os
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from gpavatar.ops import _backend
from gpavatar.ops import _validation as v
from gpavatar.ops._backend import env_switch, needs_grad
from gpavatar.ops.knn import MAX_FUSED_K, KnnResult, check_index, knn, search_op
from gpavatar.ops.knn_blend import NORMALIZATIONS, flags_precision, knn_blend, knn_blend_weight_sum
from gpavatar.ops.reference import EMBED_DIM, harmonic_embedding
from gpavatar.ops.triplane import PLANE_DTYPES, triplane_features, triplane_mean_grads, triplane_sample

__all__ = ["field_query", "field_layers", "FieldWeights", "FieldResult", "PRECISIONS", "FUSED_ENV", "LAYERS_ENV",
           "fused_setting", "layers_setting", "layers_precision", "default_precision", "check_field_query_inputs",
           "linear_relu", "relu_epilogue", "check_directions", "samples_per_direction", "sample_directions",
           "sampled_layers", "segmented_layers", "segments_apply"]

PRECISIONS = ("ieee", "tf32x3", "tf32", "bf16")
FUSED_ENV = "GPAVATAR_FIELD_FUSED"
LAYERS_ENV = "GPAVATAR_FIELD_LAYERS"
MAX_FUSED_WIDTH = 256  # kernels/field_query.py MAX_WIDTH (not imported: triton may be absent)


class FieldWeights(NamedTuple):
    """The decoder's parameters (``PointsDecoder.field_weights()``), official names in brackets."""
    point_features: torch.Tensor  # (P, Cf) or (B, P, Cf)   [points_querier.points_feature.weight]
    point_w1: torch.Tensor  # (PH, Cf + 27)                  [points_querier.point_layers.0]
    point_b1: torch.Tensor  # (PH,)
    point_w2: torch.Tensor  # (PC, PH)                       [points_querier.point_layers.2]
    point_b2: torch.Tensor  # (PC,)
    feature_w1: torch.Tensor  # (D, C + PC)                  [feature_layers.0]
    feature_b1: torch.Tensor  # (D,)
    feature_w2: torch.Tensor  # (D, D)                       [feature_layers.2]
    feature_b2: torch.Tensor  # (D,)
    feature_w3: torch.Tensor  # (D, D)                       [feature_layers.4]
    feature_b3: torch.Tensor  # (D,)
    density_w: torch.Tensor  # (1, D)                        [density_layers.0]
    density_b: torch.Tensor  # (1,)
    rgb_w1: torch.Tensor  # (VH, D + 27)                     [rgb_layers.0]
    rgb_b1: torch.Tensor  # (VH,)
    rgb_w2: torch.Tensor  # (V, VH), V >= 3                  [rgb_layers.2]
    rgb_b2: torch.Tensor  # (V,)


class FieldResult(NamedTuple):
    alpha: torch.Tensor  # (B, N) float32
    value: torch.Tensor  # (B, N, V) float32


def fused_setting() -> Optional[bool]:
    """``$GPAVATAR_FIELD_FUSED``: "0" -> False (never fused), "1" -> True (fused wherever the kernel
    can run), unset / "" / "auto" -> None (the caller's default)."""
    return env_switch(FUSED_ENV)


def default_precision() -> str:
    """"tf32" when ``torch.backends.cuda.matmul.allow_tf32`` is on (the fast mode), else "ieee"."""
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


def check_field_query_inputs(coords, dirs, planes, points, weights, K, knn_result, normalize, eps, weight_sum,
                             precision) -> int:
    """Shapes, dtypes, devices and (one host sync each) the values of coords, points and knn; returns K."""
    v.check_tensor(coords, "coords", "(B, N, 3)", ndim=3, last=3)
    B, N = coords.shape[0], coords.shape[1]
    v.check_tensor(dirs, "dirs", f"({B}, {N}, 3)", ndim=3)
    if dirs.shape != coords.shape:
        raise ValueError(f"dirs must have the shape of coords ({B}, {N}, 3), got {tuple(dirs.shape)}")
    v.check_tensor(planes, "planes", "(B, 3, H, W, C) channels-last", ndim=5)
    if planes.shape[0] != B or planes.shape[1] != 3 or planes.shape[2] < 1 or planes.shape[3] < 1:
        raise ValueError(f"planes must have shape ({B}, 3, H, W, C) (channels-last, H, W >= 1), "
                         f"got {tuple(planes.shape)}")
    v.check_tensor(points, "points", f"({B}, P, 3)", ndim=3, last=3)
    if points.shape[0] != B:
        raise ValueError(f"points must have shape ({B}, P, 3) (the batch of coords), got {tuple(points.shape)}")
    P, C = points.shape[1], planes.shape[4]
    if not isinstance(weights, FieldWeights):
        raise TypeError(f"weights must be a FieldWeights (PointsDecoder.field_weights()), got {type(weights).__name__}")
    w = weights
    v.check_tensor(w.point_features, "weights.point_features", f"({P}, Cf) or ({B}, {P}, Cf)")
    pf = w.point_features
    if not ((pf.dim() == 2 and pf.shape[0] == P) or (pf.dim() == 3 and pf.shape[:2] == (B, P))):
        raise ValueError(f"weights.point_features must have shape ({P}, Cf) or ({B}, {P}, Cf), got {tuple(pf.shape)}")
    cf = pf.shape[-1]
    v.check_tensor(w.point_w1, "weights.point_w1", f"(PH, {cf + EMBED_DIM})", ndim=2, last=cf + EMBED_DIM)
    PH = w.point_w1.shape[0]
    v.check_tensor(w.point_w2, "weights.point_w2", f"(PC, {PH})", ndim=2, last=PH)
    PC = w.point_w2.shape[0]
    v.check_tensor(w.feature_w1, "weights.feature_w1", f"(D, {C + PC}) (C = {C} plane + {PC} PEF channels)",
                   ndim=2, last=C + PC)
    D = w.feature_w1.shape[0]
    v.check_tensor(w.rgb_w1, "weights.rgb_w1", f"(VH, {D + EMBED_DIM})", ndim=2, last=D + EMBED_DIM)
    VH = w.rgb_w1.shape[0]
    v.check_tensor(w.rgb_w2, "weights.rgb_w2", f"(V, {VH}) with V >= 3", ndim=2, last=VH)
    V = w.rgb_w2.shape[0]
    if V < 3:
        raise ValueError(f"weights.rgb_w2 must have shape (V, {VH}) with V >= 3 (RGB first), "
                         f"got {tuple(w.rgb_w2.shape)}")
    matrices = {"feature_w2": (D, D), "feature_w3": (D, D), "density_w": (1, D)}
    for name, shape in matrices.items():
        t = getattr(w, name)
        v.check_tensor(t, f"weights.{name}", str(shape), ndim=2)
        if tuple(t.shape) != shape:
            raise ValueError(f"weights.{name} must have shape {shape}, got {tuple(t.shape)}")
    biases = {"point_b1": PH, "point_b2": PC, "feature_b1": D, "feature_b2": D, "feature_b3": D, "density_b": 1,
              "rgb_b1": VH, "rgb_b2": V}
    for name, n in biases.items():
        v.check_tensor(getattr(w, name), f"weights.{name}", f"({n},)", ndim=1, last=n)
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
    v.check_eps(eps)
    if precision is not None and precision not in PRECISIONS:
        raise ValueError(f"precision must be None or one of {PRECISIONS}, got {precision!r}")
    tensors = {"coords": coords, "dirs": dirs, "planes": planes, "points": points,
               **{f"weights.{k}": t for k, t in w._asdict().items()}}
    if knn_result is not None:
        if not (isinstance(knn_result, tuple) and len(knn_result) == 2):
            raise TypeError(f"knn must be None or a (dist2, idx) pair from ops.knn, got {type(knn_result).__name__}")
        dist2, idx = knn_result
        v.check_tensor(dist2, "knn.dist2", "(B, N, K) float32", ndim=3, dtypes=(torch.float32,))
        v.check_tensor(idx, "knn.idx", "(B, N, K) int64", ndim=3, dtypes=(torch.int64,))
        kk = dist2.shape[2]
        if dist2.shape[:2] != (B, N) or idx.shape != dist2.shape:
            raise ValueError(f"knn must hold dist2 and idx of shape ({B}, {N}, K), got {tuple(dist2.shape)} and "
                             f"{tuple(idx.shape)}")
        if K is not None and v.check_int(K, "K", 1) != kk:
            raise ValueError(f"K must equal the K of knn ({kk}), got {K}")
        K = kk
        tensors.update({"knn.dist2": dist2, "knn.idx": idx})
    elif K is None:
        raise ValueError("K is needed when knn is not given")
    K = v.check_int(K, "K", 1, P, high_name=f"P = {P}")
    v.check_weight_sum(weight_sum, normalize, B, K, tensors)
    v.check_same_device(tensors)
    v.check_coordinates(coords, "coords")
    v.check_coordinates(points, "points")
    if v.checking_values():
        if knn_result is not None and knn_result[0].numel():
            dist2, idx = knn_result
            if not bool(((idx >= 0) & (idx < P)).all() & ((dist2 >= 0) & dist2.isfinite()).all()):
                raise ValueError(f"knn must hold indices in [0, {P}) and finite dist2 >= 0 (ops.knn's result)")
    return K


def _fusable(name: str, coords, dirs, planes, points, weights: FieldWeights, K: int, knn_result, weight_sum) -> bool:
    """Whether the fused kernel can compute this call (module docstring)."""
    if name not in ("cuda", "triton") or not _backend.triton_available():
        return False
    dev = coords.device
    if dev.type != "cuda" and not (dev.type == "cpu" and _backend.triton_interpreted()):
        return False
    if torch.is_autocast_enabled(dev.type):
        return False
    extra = list(knn_result) if knn_result is not None else []
    if needs_grad([coords, dirs, planes, points, weight_sum, *weights, *extra]):
        return False
    widths = (planes.shape[4], weights.point_w1.shape[0], weights.point_w2.shape[0], weights.feature_w1.shape[0],
              weights.rgb_w1.shape[0], weights.rgb_w2.shape[0])
    return K <= MAX_FUSED_K and max(widths) <= MAX_FUSED_WIDTH and planes.shape[4] >= 1


def field_query(coords: torch.Tensor, dirs: torch.Tensor, planes: torch.Tensor, points: torch.Tensor,
                weights: FieldWeights, K: Optional[int] = None, *, knn: Optional[tuple] = None,
                normalize: str = "neighbors", eps: float = 1e-8, weight_sum: Optional[torch.Tensor] = None,
                precision: Optional[str] = None, fused: Optional[bool] = None, backend: Optional[str] = None,
                validate: bool = True, block_m: Optional[int] = None, num_warps: Optional[int] = None,
                knn_index=None) -> FieldResult:
    """Alpha and value of the field at samples (module docstring).

    Args:
        coords: (B, N, 3) sample positions; dirs: (B, N, 3) ray directions (any length)
        planes: (B, 3, H, W, C) channels-last tri-planes (float32 / float16 / bfloat16 read as stored)
        points: (B, P, 3) FLAME points
        weights: :class:`FieldWeights` (``PointsDecoder.field_weights()``)
        K: neighbours (1 <= K <= P); may be omitted when ``knn`` is given
        knn: ``ops.knn(coords, points, K)``'s (dist2, idx), if already computed (else computed here
            on the same backend); the unfused path recomputes it inside ``knn_blend`` (the same
            neighbours bit for bit: every backend's KNN is exact)
        normalize, eps, weight_sum: the PEF's blend (see :func:`gpavatar.ops.knn_blend`)
        precision: None | "ieee" | "tf32x3" | "tf32" | "bf16" (module docstring)
        fused: None ($GPAVATAR_FIELD_FUSED: "0" off, else on where possible), True / False
        backend: "auto" | "cuda" | "triton" | "cpu" | "torch" (default: $GPAVATAR_BACKEND or auto)
        validate: check shapes and values (values need host syncs; False adds none)
        block_m, num_warps: the kernel's tile (samples per program) and warps (default: per precision)
        knn_index: ``ops.knn_index(points, K)`` the KNN searches instead of building its lists (or None)
    Returns:
        FieldResult(alpha (B, N) float32, value (B, N, V) float32).
    """
    if validate:
        K = check_field_query_inputs(coords, dirs, planes, points, weights, K, knn, normalize, eps, weight_sum,
                                     precision)
    elif K is None:
        if knn is None:
            raise ValueError("K is needed when knn is not given")
        K = knn[0].shape[2]
    K = operator.index(K)
    name = _backend.resolve(backend, coords.device, "field_query")
    if fused is None:
        fused = fused_setting() is not False
    if not (fused and _fusable(name, coords, dirs, planes, points, weights, K, knn, weight_sum)):
        return _unfused(coords, dirs, planes, points, weights, K, normalize, eps, weight_sum, name, knn_index)

    f32 = torch.float32
    c = coords.detach().to(f32).contiguous()
    p = points.detach().to(f32).contiguous()
    with torch.no_grad():
        if knn is None:
            knn = _knn_op(c, p, K, name, points, knn_index)
        dist2, idx = (t.contiguous() for t in knn)
        if normalize == "queries" and weight_sum is None:
            weight_sum = knn_blend_weight_sum(dist2, eps)
        if weight_sum is not None:
            weight_sum = weight_sum.to(f32).contiguous()
        w = weights
        cf = w.point_features.shape[-1]
        w1 = w.point_w1.to(f32)
        with torch.autocast(coords.device.type, enabled=False):
            table = F.linear(w.point_features.to(f32), w1[:, :cf], w.point_b1.to(f32))
        table = table.reshape(-1, w1.shape[0]).contiguous()
        precision = precision or default_precision()
        mat = torch.bfloat16 if precision == "bf16" else f32
        layers = [w.feature_w1.to(mat), w.feature_b1, w.feature_w2.to(mat), w.feature_b2, w.feature_w3.to(mat),
                  w.feature_b3, w.density_w.to(f32), w.density_b, w.rgb_w1.to(mat), w.rgb_b1, w.rgb_w2.to(mat),
                  w.rgb_b2]
        layers = [t.to(f32).contiguous() if i % 2 else t.contiguous() for i, t in enumerate(layers)]
        pl = planes.detach()
        pl = (pl if pl.dtype in PLANE_DTYPES else pl.to(f32)).contiguous()
        alpha, value = torch.ops.gpavatar.field_query_forward_triton(
            c, dirs.detach().to(f32).contiguous(), pl, p, dist2, idx, weight_sum, table,
            w1[:, cf:].contiguous(), w.point_w2.to(f32).contiguous(), w.point_b2.to(f32).contiguous(), layers,
            float(eps), precision, int(block_m or 0), int(num_warps or 0))
    return FieldResult(alpha, value)


def _knn_op(coords, points, K, name, original_points=None, index=None):
    if index is not None:
        check_index(index, original_points, K)
        return KnnResult(*search_op(coords, points, K, name, index))
    return knn(coords, points, K, backend=name, validate=False)


def _unfused(coords, dirs, planes, points, w: FieldWeights, K, normalize, eps, weight_sum, backend, knn_index=None):
    """The pass as separate ops (PointsDecoder's computation before the fused kernel, bit for bit); the
    inputs were validated at the door."""
    expr = knn_blend(coords, points, w.point_features, w.point_w1, w.point_b1, w.point_w2, w.point_b2, K=K,
                     normalize=normalize, eps=eps, weight_sum=weight_sum, backend=backend, validate=False,
                     index=knn_index).feature
    return sampled_layers(planes, expr, coords, dirs, w, backend=backend)


def sampled_layers(planes: torch.Tensor, expr: torch.Tensor, coords: torch.Tensor, dirs: torch.Tensor,
                   w: FieldWeights, *, backend: Optional[str] = None, layers=None,
                   kernel: Optional[bool] = None) -> FieldResult:
    """The tri-plane features of a pass (``planes`` channels-last, mean), then ``layers`` (default
    :func:`field_layers`, called with ``kernel``) on them and the PEF features ``expr``.  With no
    gradient recorded through the features, one kernel writes their [tri-plane, PEF] rows
    (:func:`gpavatar.ops.triplane.triplane_features`) and the layers read the two column slices as
    their first input without concatenating them; otherwise the sampling and the layers'
    concatenation.  The same numbers either way.  Inputs are not validated."""
    layers = layers or field_layers
    if needs_grad([planes, expr, coords]):
        tri = triplane_sample(planes, coords, "mean", channels_last=True, backend=backend, validate=False)
        return FieldResult(*layers(tri, expr, coords, dirs, w, kernel=kernel))
    features = triplane_features(planes, coords, expr, backend=backend, validate=False)
    C = planes.shape[-1]
    return FieldResult(*layers(features[..., :C], features[..., C:], coords, dirs, w, kernel=kernel))


def segments_apply(planes, expr, coords, dirs, *, backend: Optional[str] = None) -> bool:
    """Whether :func:`segmented_layers` can run this pass: the C++ tri-plane op's backend (``cpu`` /
    ``cuda``), float32 features, no gradient wanted for ``dirs`` and no torch.compile tracing (the
    decoder also asks for the default layers)."""
    name = _backend.resolve(backend, coords.device, "triplane_sample")
    return (name in ("cpu", "cuda") and hasattr(torch.ops.gpavatar, "triplane_sample_backward")
            and not dirs.requires_grad and expr.dtype == torch.float32 and planes.dtype in PLANE_DTYPES
            and not _compiling())


class _LayersBackward:
    """The backward of :func:`_joined_layers`' torch layers (float32, no autocast) written out, for
    :func:`segmented_layers`: each segment's activations are made again into buffers that every
    segment reuses (the same products as the inference form), then the chain rule's products; the
    weight gradients are summed over the segments in place and the folded heads' gradient is
    unfolded once at the end.  Autograd of the training form computes the same gradients (up to
    summation order) but allocates every (n, width) activation and gradient anew, a segment at a
    time."""

    def __init__(self, w: FieldWeights, rows: int, width: int, device: torch.device, weights: bool):
        self.w, self.weights = w, weights
        self.VH, self.V = w.rgb_b1.shape[0], w.rgb_b2.shape[0]
        self.pad = heads_padding(device, self.VH + 1)
        self.heads = _folded_heads(w, rgb_first=True, pad=self.pad)  # (VH + 1 + pad, hidden)
        f32 = dict(dtype=torch.float32, device=device)
        H1, H2, O = w.feature_w1.shape[0], w.feature_w2.shape[0], self.heads[0].shape[0]
        self.h1, self.h2, self.o = (torch.empty(rows, n, **f32) for n in (H1, H2, O))
        self.v, self.dv, self.dr = (torch.empty(rows, n, **f32) for n in (self.V, self.V, self.VH))
        self.do = torch.zeros(rows, O, **f32)  # (the padding's columns stay 0)
        self.dh2, self.dh1, self.dx = (torch.empty(rows, n, **f32) for n in (H2, H1, width))
        if weights:
            self.grads = [torch.zeros_like(t, dtype=torch.float32) for t in
                          (w.feature_w1, w.feature_b1, w.feature_w2, w.feature_b2, self.heads[0], self.heads[1],
                           w.rgb_w2, w.rgb_b2)]
            self.grad_dir = torch.zeros(self.VH, EMBED_DIM, **f32)

    @staticmethod
    def applies(w: FieldWeights, device: torch.device) -> bool:
        """float32 layer weights (the features are float32), autocast off on ``device``."""
        return (all(t.dtype == torch.float32 for t in _layer_weights(w))
                and not torch.is_autocast_enabled(device.type))

    def segment(self, x: torch.Tensor, inside: torch.Tensor, directions: torch.Tensor, S: int,
                grad_alpha: torch.Tensor, grad_value: torch.Tensor, inputs: bool) -> Optional[torch.Tensor]:
        """One segment: (n, C + E) feature rows ``x``, their box mask (n,), directions (n / S, 3) and
        output gradients (n,), (n, V); returns the (n, C + E) gradient of ``x`` when ``inputs``."""
        w, VH, n = self.w, self.VH, x.shape[0]
        h1, h2, o, v = self.h1[:n], self.h2[:n], self.o[:n], self.v[:n]
        torch.addmm(w.feature_b1, x, w.feature_w1.t(), out=h1).relu_()
        torch.addmm(w.feature_b2, h1, w.feature_w2.t(), out=h2).relu_()
        torch.addmm(self.heads[1], h2, self.heads[0].t(), out=o)
        rgb = o[:, :VH]
        gamma, w_dir = _direction_terms(directions, w, torch.float32)
        if S > 1:
            rgb.view(-1, S, VH).add_((gamma @ w_dir)[:, None, :])
        else:
            rgb.addmm_(gamma, w_dir)
        r = rgb.relu_()
        torch.addmm(w.rgb_b2, r, w.rgb_w2.t(), out=v)
        # value = [sigmoid(v[:, :3]) * 1.002 - 0.001, v[:, 3:]]
        dv = self.dv[:n]
        dv.copy_(grad_value)
        s = torch.sigmoid(v[:, :3])
        dv[:, :3].mul_(1.002).mul_((1 - s) * s)
        # alpha = -expm1(-softplus_10(density) * inside)
        density = o[:, VH]
        sigma = F.softplus(density, beta=10) * inside
        grad_sigma = grad_alpha * (torch.expm1(-sigma) + 1)
        do = self.do[:n]
        do[:, VH] = torch.ops.aten.softplus_backward(grad_sigma * inside, density, 10, 20)
        dp = do[:, :VH]
        torch.ops.aten.threshold_backward.grad_input(torch.mm(dv, w.rgb_w2, out=self.dr[:n]), r, 0.0,
                                                     grad_input=dp)
        dh2 = torch.mm(do, self.heads[0], out=self.dh2[:n])
        torch.ops.aten.threshold_backward.grad_input(dh2, h2, 0.0, grad_input=dh2)
        dh1 = torch.mm(dh2, w.feature_w2, out=self.dh1[:n])
        torch.ops.aten.threshold_backward.grad_input(dh1, h1, 0.0, grad_input=dh1)
        if self.weights:
            g_w1, g_b1, g_w2, g_b2, g_heads, g_heads_b, g_r2, g_rb2 = self.grads
            g_r2.addmm_(dv.t(), r)
            g_rb2.add_(dv.sum(0))
            g_heads.addmm_(do.t(), h2)
            g_heads_b.add_(do.sum(0))
            self.grad_dir.addmm_((dp.view(-1, S, VH).sum(1) if S > 1 else dp).t(), gamma)
            g_w2.addmm_(dh2.t(), h1)
            g_b2.add_(dh2.sum(0))
            g_w1.addmm_(dh1.t(), x)
            g_b1.add_(dh1.sum(0))
        return torch.mm(dh1, w.feature_w1, out=self.dx[:n]) if inputs else None

    def weight_grads(self) -> tuple[torch.Tensor, ...]:
        """The layer weights' gradients in :data:`_LAYER_FIELDS` order (their dtypes): the folded
        heads' unfolded (W_out = [W_rf; w_d] W_3, b_out = [b_r1; b_d] + [W_rf; w_d] b_3)."""
        w, VH = self.w, self.VH
        g_w1, g_b1, g_w2, g_b2, g_heads, g_heads_b, g_r2, g_rb2 = self.grads
        rows, _ = _head_rows(w, rgb_first=True, pad=self.pad)
        g_rows = g_heads @ w.feature_w3.t() + g_heads_b[:, None] * w.feature_b3[None, :]
        grads = (g_w1, g_b1, g_w2, g_b2, rows.t() @ g_heads, rows.t() @ g_heads_b,
                 g_rows[VH:VH + 1], g_heads_b[VH:VH + 1], torch.cat([g_rows[:VH], self.grad_dir], dim=1),
                 g_heads_b[:VH], g_r2, g_rb2)
        return tuple(g.to(t.dtype) for g, t in zip(grads, _layer_weights(w)))


def _autograd_segment(features, coords, dirs, w: FieldWeights, layer_weights, need_weights, grad_weights: list,
                      autocast: tuple, grad_alpha, grad_value, inputs: bool) -> Optional[torch.Tensor]:
    """One segment of :class:`_SegmentedLayers`' backward by autograd of the training form, under the
    forward's ``autocast`` state: adds the weights' gradients to ``grad_weights`` and returns the
    features' gradient when ``inputs``."""
    features.requires_grad_(inputs)
    leaves = [t.detach().requires_grad_(need) for t, need in zip(layer_weights, need_weights)]
    device, enabled, dtype = autocast
    with torch.enable_grad(), torch.autocast(device, dtype=dtype, enabled=enabled):
        alpha, value = _joined_layers(features, coords, dirs, w._replace(**dict(zip(_LAYER_FIELDS, leaves))))
    wanted = [t for t in (features, *leaves) if t.requires_grad]
    if not wanted:
        return None
    got = iter(torch.autograd.grad((alpha, value), wanted, (grad_alpha, grad_value), allow_unused=True))
    g = next(got) if inputs else None
    for k, leaf in enumerate(leaves):
        if leaf.requires_grad:
            gk = next(got)
            if gk is not None:
                grad_weights[k] = gk if grad_weights[k] is None else grad_weights[k].add_(gk)
    return g


class _SegmentedLayers(torch.autograd.Function):
    """:func:`sampled_layers` over a pass whose backward makes its activations again one segment
    at a time (:func:`segmented_layers`)."""

    @staticmethod
    def forward(ctx, planes, expr, coords, dirs, w: FieldWeights, segment: int, backend, *layer_weights):
        B, N = coords.shape[:2]
        S = samples_per_direction(dirs, N)
        # no gradient is recorded here: the inference form of the layers (products with the ReLU in
        # place, blocks of rows), the tri-plane and PEF features written side by side
        parts = [sampled_layers(planes, expr[:, i:i + segment], coords[:, i:i + segment],
                                dirs[:, i // S:(i + segment) // S], w, backend=backend, kernel=False)
                 for i in range(0, N, segment)]
        ctx.save_for_backward(planes, expr, coords, dirs, *layer_weights)
        ctx.w, ctx.segment, ctx.backend = w, segment, backend
        device = coords.device.type
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        if len(parts) == 1:
            return parts[0].alpha, parts[0].value
        return torch.cat([a for a, _ in parts], dim=1), torch.cat([v for _, v in parts], dim=1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_alpha, grad_value):
        planes, expr, coords, dirs, *layer_weights = ctx.saved_tensors
        need_planes, need_expr, need_coords = ctx.needs_input_grad[:3]
        need_weights = ctx.needs_input_grad[7:]
        B, N = coords.shape[:2]
        C, segment = planes.shape[-1], ctx.segment
        S = samples_per_direction(dirs, N)
        need_tri = need_planes or need_coords
        grad_tri = coords.new_empty((B, N, C), dtype=torch.float32) if need_tri else None
        grad_expr = torch.empty_like(expr) if need_expr else None
        grad_weights: list[Optional[torch.Tensor]] = [None] * len(layer_weights)
        device, enabled, dtype = ctx.autocast  # the forward's autocast state
        manual = None
        if not enabled and _LayersBackward.applies(ctx.w, coords.device):
            manual = _LayersBackward(ctx.w, B * min(N, segment), planes.shape[-1] + expr.shape[-1], coords.device,
                                     any(need_weights))
        for i in range(0, N, segment):
            j = min(N, i + segment)
            c, d = coords[:, i:j], dirs[:, i // S:j // S]
            with torch.no_grad():  # [tri-plane, PEF] rows, one kernel
                features = triplane_features(planes, c, expr[:, i:j], backend=ctx.backend, validate=False)
            if manual is not None:
                rows = features.reshape(-1, features.shape[-1])
                inside = _inside_rows(c).to(torch.float32)
                g = manual.segment(rows, inside, d.reshape(-1, 3), S, grad_alpha[:, i:j].reshape(-1),
                                   grad_value[:, i:j].reshape(rows.shape[0], -1), need_tri or need_expr)
            else:
                g = _autograd_segment(features, c, d, ctx.w, layer_weights, need_weights, grad_weights, ctx.autocast,
                                      grad_alpha[:, i:j], grad_value[:, i:j], need_tri or need_expr)
            if g is not None:
                g = g.view(*features.shape)
                if grad_tri is not None:
                    grad_tri[:, i:j] = g[..., :C]
                if grad_expr is not None:
                    grad_expr[:, i:j] = g[..., C:]
        if manual is not None and manual.weights:
            grad_weights = [g if need else None for g, need in zip(manual.weight_grads(), need_weights)]
        grad_planes, grad_coords = triplane_mean_grads(grad_tri, planes, coords, backend=ctx.backend,
                                                       planes_grad=need_planes, coords_grad=need_coords) \
            if need_tri else (None, None)
        return (grad_planes, grad_expr, grad_coords, None, None, None, None, *grad_weights)


def segmented_layers(planes: torch.Tensor, expr: torch.Tensor, coords: torch.Tensor, dirs: torch.Tensor,
                     w: FieldWeights, segment: int, *, backend: Optional[str] = None) -> FieldResult:
    """:func:`sampled_layers` (the default layers) over a whole pass whose backward keeps only the
    inputs: it makes the tri-plane features and the layers' activations again ``segment`` samples
    at a time (whole rays: ``segment`` a multiple of the samples per direction), and sends the
    tri-plane gradient of the whole pass through one backward of the tri-plane op.

    The same outputs as ``torch.utils.checkpoint`` of :func:`sampled_layers` per segment (the
    decoder's other form, bit for bit), with less work: the forward records nothing and runs the
    layers' inference form (no autograd graph, ReLUs in place); the backward's features are one
    kernel's [tri-plane, PEF] rows (no concatenation), a float32 pass without autocast runs the
    chain rule written out in buffers every segment reuses (:class:`_LayersBackward`; under
    autocast, autograd of the training form under the forward's autocast), and the plane gradient
    is written once per pass instead of a zero-filled (B, 3, H, W, C) gradient per segment summed
    by autograd.  The gradients agree up to float summation order.  Where
    :func:`segments_apply` allows it; inputs are not validated."""
    if expr.dim() != 3 or coords.dim() != 3:
        raise ValueError(f"segmented_layers takes (B, N, .) expr and coords, got {tuple(expr.shape)} and "
                         f"{tuple(coords.shape)}")
    alpha, value = _SegmentedLayers.apply(planes, expr, coords, dirs, w, int(segment), backend, *_layer_weights(w))
    return FieldResult(alpha, value)


def layers_setting() -> str:
    """``$GPAVATAR_FIELD_LAYERS``: "torch" (the separate layers), "triton" (the fused layers kernel
    wherever it can run: see :func:`field_layers`), "triton-tf32x3" (the same, with its products in
    tf32x3 where they would be fp32: about fp32's accuracy on the tensor cores), unset / "" / "auto"
    -> "auto" (today: torch)."""
    value = os.environ.get(LAYERS_ENV, "") or "auto"
    if value not in ("auto", "torch", "triton", "triton-tf32x3"):
        raise ValueError(f"{LAYERS_ENV} must be auto, torch, triton or triton-tf32x3, got {value!r}")
    return value


def layers_precision(device: torch.device) -> Optional[str]:
    """The products' precision the layers kernel takes on ``device``: :func:`gpavatar.ops.knn_blend.
    flags_precision` (bf16 under bfloat16 autocast, tf32 with TF32 matmuls allowed, else "ieee"; None
    under another autocast dtype)."""
    return flags_precision(device)


def _layers_kernel(kernel: Optional[bool], tri, expr, coords, dirs, w: FieldWeights) -> Optional[str]:
    """The layers kernel's precision if it computes this call, else None (field_layers' docstring)."""
    setting = layers_setting()
    if kernel is None:
        kernel = setting.startswith("triton")
    if not kernel or not _backend.triton_available():
        return None
    dev = tri.device
    if dev.type != "cuda" and not (dev.type == "cpu" and _backend.triton_interpreted()):
        return None
    if needs_grad([tri, expr, coords, dirs, *_layer_weights(w)]):
        return None
    widths = (tri.shape[-1], expr.shape[-1], w.feature_w1.shape[0], w.rgb_w1.shape[0], w.rgb_w2.shape[0])
    if max(widths) > MAX_FUSED_WIDTH or min(widths) < 1:
        return None
    precision = layers_precision(dev)
    return "tf32x3" if precision == "ieee" and setting == "triton-tf32x3" else precision


def relu_epilogue(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> bool:
    """Whether :func:`linear_relu` runs as one product with the ReLU in its epilogue: a CPU or CUDA
    tensor, a 1-D bias, one dtype for the three tensors, nothing that needs grad and no autocast on
    the device (``torch._addmm_activation`` has no autograd formula and is on none of autocast's
    lists).  Training keeps the two ops: a custom backward for the fused product measured no faster
    on the CPU and held the incoming and the masked (N, 128) gradients at once (+85 MiB at the peak
    of a paper-preset step)."""
    return (x.device.type in ("cpu", "cuda") and hasattr(torch, "_addmm_activation") and bias is not None
            and bias.dim() == 1 and x.dtype == weight.dtype == bias.dtype and x.dim() >= 1
            and not needs_grad([x, weight, bias]) and not torch.is_autocast_enabled(x.device.type))


def linear_relu(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], *,
                epilogue: Optional[bool] = None) -> torch.Tensor:
    """``relu(F.linear(x, weight, bias))``.  Where :func:`relu_epilogue` allows it is one product whose
    epilogue applies the ReLU (``torch._addmm_activation``: on CUDA a cuBLASLt epilogue with the bias,
    on the CPU a ReLU in place on the fresh product), so the (N, out) result is written once instead
    of written, read and written to a new tensor by a separate ReLU kernel (two ReLUs of (2^19, 128)
    floats a field pass at the paper sizes).  Elsewhere (training, autocast, other devices or dtypes)
    the two ops.  The same function: on the CPU the same bits (tested), on CUDA the library may
    pick another kernel (rounding).  ``epilogue`` (None: :func:`relu_epilogue`) forces the choice
    (no autograd: only without a gradient recorded)."""
    if relu_epilogue(x, weight, bias) if epilogue is None else epilogue:
        rows = x.reshape(-1, x.shape[-1])
        return torch._addmm_activation(bias, rows, weight.t()).reshape(*x.shape[:-1], weight.shape[0])
    return F.relu(F.linear(x, weight, bias))


def check_directions(dirs, samples: tuple) -> None:
    """``dirs`` for samples of leading shape ``samples`` (..., N): one direction per sample (..., N, 3),
    or one per ray (..., R, 3) with N = R·S, each ray's S samples consecutive; a ValueError naming
    the shapes otherwise."""
    samples = tuple(samples)
    N = samples[-1]
    ok = isinstance(dirs, torch.Tensor) and dirs.dim() == len(samples) + 1 \
        and tuple(dirs.shape[:-2]) == samples[:-1] and dirs.shape[-1] == 3
    if not (ok and (dirs.shape[-2] == N or (dirs.shape[-2] > 0 and N % dirs.shape[-2] == 0))):
        raise ValueError(f"dirs must have shape {samples + (3,)} (one direction per sample), or "
                         f"{samples[:-1] + ('R', 3)} with one direction per ray (R dividing {N}), "
                         f"got {tuple(getattr(dirs, 'shape', ()))}")


def samples_per_direction(dirs: torch.Tensor, n: int) -> int:
    """S: the consecutive samples each of ``dirs``' directions covers among ``n`` (1: one a sample)."""
    return n // max(1, dirs.shape[-2])


def sample_directions(dirs: torch.Tensor, n: int) -> torch.Tensor:
    """(..., n, 3): ``dirs`` itself when it has one direction per sample, else each of its R ray
    directions repeated for the ray's n / R consecutive samples."""
    R = dirs.shape[-2]
    if R == n:
        return dirs
    return dirs.unsqueeze(-2).expand(*dirs.shape[:-1], n // R, 3).reshape(*dirs.shape[:-2], n, 3)


def _inside_rows(coords: torch.Tensor) -> torch.Tensor:
    """(rows,) bool: each sample strictly inside (-1, 1)^3 (``renderer.inside_box``), flattened."""
    return ((coords > -1.0) & (coords < 1.0)).all(dim=-1).reshape(-1)


def _compiling() -> bool:
    """Whether torch.compile is tracing this call (dynamo)."""
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and hasattr(compiler, "is_compiling") and compiler.is_compiling())


def _adjacent(tri: torch.Tensor, expr: torch.Tensor) -> Optional[torch.Tensor]:
    """``torch.cat([tri, expr], -1)`` without a copy when the two are the column slices [:C] and
    [C:] of one contiguous (..., C + E) tensor (``ops.triplane_features``' output) and no gradient is
    recorded through them; else None.  None under torch.compile: dynamo would guard on the storage's
    address and compile the layers again for every new tensor (a recompilation a frame, then eager
    after its limit); the compiled concatenation is fused instead."""
    if _compiling():
        return None
    if needs_grad([tri, expr]) or tri.dtype != expr.dtype or tri.device != expr.device or tri.dim() < 1 \
            or tri.shape[:-1] != expr.shape[:-1] or tri.stride() != expr.stride() or tri.stride(-1) != 1:
        return None
    if tri.untyped_storage().data_ptr() != expr.untyped_storage().data_ptr() \
            or expr.storage_offset() != tri.storage_offset() + tri.shape[-1]:
        return None
    joined = tri.as_strided((*tri.shape[:-1], tri.shape[-1] + expr.shape[-1]), tri.stride(), tri.storage_offset())
    return joined if joined.is_contiguous() else None


def _folded_heads(w: FieldWeights, *, rgb_first: bool = False, pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """feature_layers.4 folded into density_layers.0 and rgb_layers.0's feature columns: the
    (1 + VH + pad, D) weight and bias of one product of the second hidden layer.  Rows: density then
    the VH rgb rows (the layers kernel's order), or with ``rgb_first`` the rgb rows then density (the
    torch layers' order: the rgb columns of the product are a view at offset 0); then ``pad`` zero
    rows (exact zeros in the product: zero weights and bias)."""
    heads, bias = _head_rows(w, rgb_first=rgb_first, pad=pad)
    return heads @ w.feature_w3, bias + heads @ w.feature_b3


def _head_rows(w: FieldWeights, *, rgb_first: bool, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The unfolded heads :func:`_folded_heads` multiplies by feature_layers.4: the (1 + VH + pad,
    hidden) rows [w_d; W_rf] (or [W_rf; w_d] with ``rgb_first``) and their biases, ``pad`` zero rows
    last."""
    hidden = w.feature_w3.shape[0]
    rgb_w, rgb_b = w.rgb_w1[:, :hidden], w.rgb_b1
    zeros = w.density_w.new_zeros(pad, hidden)
    rows = (rgb_w, w.density_w) if rgb_first else (w.density_w, rgb_w)
    biases = (rgb_b, w.density_b) if rgb_first else (w.density_b, rgb_b)
    return torch.cat([*rows, zeros]), torch.cat([*biases, zeros[:, 0]])


def heads_padding(device: torch.device, width: int) -> int:
    """Zero rows :func:`_folded_heads` appends to a heads product of ``width`` (1 + VH) rows on ``device``:
    on CUDA up to a multiple of 8, so that the (N, width) product's rows start on 16-byte boundaries
    (fp32 and bf16) and cuBLAS takes its aligned kernels for that output and for the rgb product
    that reads its first VH columns in place (the 65-column product ran an align1 kernel, 0.45 ms
    for two passes in the last H200 frame profile); none on the CPU (its products take any stride)."""
    return -width % 8 if device.type == "cuda" else 0


# The FieldWeights of the decoder's layers (after the PEF).
_LAYER_FIELDS = ("feature_w1", "feature_b1", "feature_w2", "feature_b2", "feature_w3", "feature_b3",
                 "density_w", "density_b", "rgb_w1", "rgb_b1", "rgb_w2", "rgb_b2")


def _layer_weights(w: FieldWeights) -> tuple[torch.Tensor, ...]:
    """The parameters of the decoder's layers (after the PEF)."""
    return tuple(getattr(w, name) for name in _LAYER_FIELDS)


# Rows of a CPU inference pass the torch layers compute at a time.  A whole paper pass wrote
# (2^19, 128) hidden activations, and each fresh 256 MiB tensor paid its page faults (glibc maps
# every allocation over 32 MiB anew): the bias copies, ReLUs and products of the layers were ~40 %
# of a paper CPU frame.  A block's (16384, 128) activations (8 MiB) reuse the heap's memory and
# mostly stay in the cache: the layers of a paper pass in 0.20 s instead of 0.38 s (2 Xeon cores;
# 4096 to 32768 rows within 15 %).  GPUs take the pass at once (one product per layer; the layers
# kernel is the fused alternative).
CPU_ROW_BLOCK = 16384


def _block_rows(device: torch.device, rows: int, S: int) -> int:
    """Rows per block of an inference pass of ``rows`` rows (whole rays of S samples per block)."""
    if device.type != "cpu":
        return rows
    S = max(1, S)  # (0 for an empty pass)
    return max(S, CPU_ROW_BLOCK // S * S)


def field_layers(tri: torch.Tensor, expr: torch.Tensor, coords: torch.Tensor, dirs: torch.Tensor,
                 w: FieldWeights, *, kernel: Optional[bool] = None, block_m: Optional[int] = None,
                 num_warps: Optional[int] = None) -> FieldResult:
    """The decoder's layers on one pass's tri-plane (B, N, C) and PEF (B, N, pef_dim) features:
    ``feature_layers``, ``density_layers``, softplus, the box mask, alpha, the direction
    embedding, ``rgb_layers`` and the sigmoid remap (PointsDecoder and the unfused op share it).
    ``dirs``: (B, N, 3), or one direction per ray (B, R, 3) with N = R·S and each ray's S samples
    consecutive (:func:`check_directions`, the renderer's ``ray_directions``): the direction
    embedding and its share of the rgb layer, ``gamma(d) W_dir``, are then computed once per ray and
    added to the ray's samples (at the paper's 32 samples a ray, 1/32 of the sines, cosines and
    (N, 27) embedding of the per-sample form).

    The last feature layer has no activation and feeds only two linear maps, ``density_layers``
    and the feature columns of ``rgb_layers[0]``: they are folded into it, one product of the
    second hidden layer to (rgb hidden, density) whose weights are W_out = [W_rf; w_d] W_3 and
    bias [b_r1; b_d] + [W_rf; w_d] b_3 (on CUDA with zero rows up to a multiple of 8:
    :func:`heads_padding`), and the direction embedding's share is accumulated into the rgb columns
    in place.  The (N, hidden) feature and its (N, hidden + 27) concatenation with the embedding
    are never written (at the paper's 2^19 samples per pass they were the largest tensors of the
    field); without a gradient the ReLU of the rgb columns is taken in place and the last product
    reads them where they are.  A CPU inference pass runs in blocks of :data:`CPU_ROW_BLOCK` rows
    (whole rays) written into its outputs.  While a gradient is recorded the same arithmetic runs
    in a form whose backward writes little (``split`` and out-of-place updates instead of slices
    and in-place updates of views: no zero-filled or cloned (N, ·) gradients; the same bits).  The
    same function as the official layers, up to float rounding.

    ``kernel`` (None: ``$GPAVATAR_FIELD_LAYERS``, "triton" -> True, else False): run the layers as
    one Triton kernel (``kernels/field_layers.py``: only alpha and value reach memory) where it
    can -- Triton runs on the tensors (CUDA, or CPU under ``TRITON_INTERPRET=1``), nothing needs
    grad, every width is <= 256 and autocast, if on, is bfloat16.  Its products follow the torch
    flags (:func:`layers_precision`: bf16 under bf16 autocast, tf32 with TF32 matmuls allowed,
    else fp32 "ieee"); elsewhere the torch layers below run.  Opt-in: not yet timed on a GPU.
    ``block_m``, ``num_warps``: the kernel's tile (rows per program) and warps (default: per precision,
    ``kernels/field_layers.py``)."""
    check_directions(dirs, tri.shape[:-1])
    precision = _layers_kernel(kernel, tri, expr, coords, dirs, w)
    if precision is not None:
        return _layers_triton(tri, expr, coords, sample_directions(dirs, tri.shape[-2]), w, precision,
                              int(block_m or 0), int(num_warps or 0))
    features = _adjacent(tri, expr)  # (ops.triplane_features wrote them side by side)
    if features is None:
        features = torch.cat([tri, expr.to(tri.dtype)], dim=-1)
    return _joined_layers(features, coords, dirs, w)


def _joined_layers(features: torch.Tensor, coords: torch.Tensor, dirs: torch.Tensor, w: FieldWeights) -> FieldResult:
    """The torch layers of :func:`field_layers` on the tri-plane and PEF features side by side
    (..., C + E): the inference form without a gradient, else the training form."""
    lead = features.shape[:-1]
    S = samples_per_direction(dirs, features.shape[-2])
    rows = features.reshape(-1, features.shape[-1])
    inside = _inside_rows(coords)
    directions = dirs.reshape(-1, 3)  # one per row, or per S consecutive rows
    VH = w.rgb_b1.shape[0]
    heads = _folded_heads(w, rgb_first=True, pad=heads_padding(rows.device, VH + 1))
    if not needs_grad([features, dirs, *_layer_weights(w)]):
        n = rows.shape[0]
        block = _block_rows(rows.device, n, S)
        if block >= n:
            alpha, value = _inference_rows(rows, inside, directions, w, heads, S)
        else:  # blocks of whole rays written into the outputs
            alpha = torch.empty(n, dtype=torch.float32, device=rows.device)
            value = torch.empty(n, w.rgb_b2.shape[0], dtype=torch.float32, device=rows.device)
            for i in range(0, n, block):
                j = min(n, i + block)
                alpha[i:j], value[i:j] = _inference_rows(rows[i:j], inside[i:j], directions[i // S:j // S], w,
                                                         heads, S)
        return FieldResult(alpha.reshape(lead), value.reshape(*lead, value.shape[-1]))
    # Training: the same arithmetic in a form whose backward writes little.  `split`'s backward is
    # one concatenation of the parts' gradients, where slicing `out` twice made a zero-filled
    # (N, 1 + VH) gradient per slice and added them, and the in-place updates of a view (the
    # embedding's share, the remap) cloned and copied the whole gradient in the backward.
    out = _hidden_heads(rows, w, heads)
    rgb, density, _ = out.split([VH, 1, out.shape[-1] - VH - 1], dim=-1)  # (the padding: 0 columns on the CPU)
    sigma = F.softplus(density.reshape(lead).float(), beta=10) * inside.reshape(lead).to(torch.float32)
    gamma, w_dir = _direction_terms(directions, w, out.dtype)
    # (no name holds the pre-activation: it is freed as soon as the ReLU has run)
    if S > 1:
        hidden_rgb = F.relu(rgb.view(-1, S, VH) + (gamma @ w_dir)[:, None, :]).view(-1, VH)
    else:
        hidden_rgb = F.relu(torch.addmm(rgb, gamma, w_dir))
    value = F.linear(hidden_rgb, w.rgb_w2, w.rgb_b2).float()
    remapped, rest = value.split([3, value.shape[-1] - 3], dim=-1)
    value = torch.cat([torch.sigmoid(remapped) * 1.002 - 0.001, rest], dim=-1)
    return FieldResult(-torch.expm1(-sigma), value.reshape(*lead, value.shape[-1]))


def _hidden_heads(rows: torch.Tensor, w: FieldWeights, heads: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The two hidden feature layers on (n, C + E) ``rows``, then the folded heads: (n, VH + 1 + pad)."""
    h = linear_relu(rows, w.feature_w1, w.feature_b1)
    h = linear_relu(h, w.feature_w2, w.feature_b2)
    return F.linear(h, *heads)


def _direction_terms(directions: torch.Tensor, w: FieldWeights, dtype: torch.dtype):
    """gamma(normalize(d)) of (n, 3) directions and the rgb layer's direction weights (27, VH)."""
    gamma = harmonic_embedding(F.normalize(directions.to(dtype), dim=-1))
    return gamma, w.rgb_w1[:, w.feature_w3.shape[0]:].t().to(dtype)


def _inference_rows(rows: torch.Tensor, inside: torch.Tensor, directions: torch.Tensor, w: FieldWeights,
                    heads: tuple[torch.Tensor, torch.Tensor], S: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha (n,), value (n, V)) float32 of (n, C + E) feature ``rows`` with nothing recorded for
    autograd: the direction embedding's share accumulated into the rgb columns in place, their ReLU
    in place, the RGB channels remapped in place -- nothing but the products is written."""
    out = _hidden_heads(rows, w, heads)
    VH = w.rgb_b1.shape[0]
    rgb = out[:, :VH]  # a view at offset 0 (its rows aligned on CUDA: heads_padding)
    gamma, w_dir = _direction_terms(directions, w, out.dtype)
    if S > 1:  # one (R, VH) product, added to each ray's S samples
        rgb.view(-1, S, VH).add_((gamma @ w_dir)[:, None, :])
    else:
        rgb.addmm_(gamma, w_dir)
    sigma = F.softplus(out[:, VH].float(), beta=10) * inside.to(torch.float32)
    value = F.linear(rgb.relu_(), w.rgb_w2, w.rgb_b2).float()
    value[:, :3] = torch.sigmoid(value[:, :3]) * 1.002 - 0.001
    return -torch.expm1(-sigma), value


def _layers_triton(tri, expr, coords, dirs, w: FieldWeights, precision: str, block_m: int,
                   num_warps: int) -> FieldResult:
    lead = tri.shape[:-1]
    f32 = torch.float32
    with torch.no_grad(), torch.autocast(tri.device.type, enabled=False):
        wo, bo = _folded_heads(FieldWeights(*(t.to(f32) for t in w)))

        def rows(t, width):
            t = t.detach()
            return (t if t.dtype in PLANE_DTYPES else t.to(f32)).reshape(-1, width).contiguous()

        def weight(t):
            return t.detach().to(f32).contiguous()

        alpha, value = torch.ops.gpavatar.field_layers_forward_triton(
            rows(tri, tri.shape[-1]), rows(expr, expr.shape[-1]), rows(coords, 3).to(f32), rows(dirs, 3).to(f32),
            [weight(t) for t in (w.feature_w1, w.feature_b1, w.feature_w2, w.feature_b2, wo, bo, w.rgb_w1,
                                 w.rgb_w2, w.rgb_b2)], precision, block_m, num_warps)
    return FieldResult(alpha.reshape(lead), value.reshape(*lead, value.shape[-1]))


# --- torch.library registration ------------------------------------------------------------
#
#   field_query_forward_triton(coords (B, N, 3), dirs (B, N, 3), planes (B, 3, H, W, C), points (B, P, 3),
#       dist2 (B, N, K), idx (B, N, K) int64, weight_sum (B, K) | None, table (P or B*P, PH),
#       w1_dir (PH, 27), w2 (PC, PH), b2 (PC,), layers [12 tensors, kernels/field_query.py],
#       eps, precision, block_m (0: default), num_warps (0: default)) -> (alpha (B, N), value (B, N, V))
#
# Forward only: no autograd formula (field_query sends calls that need gradients to the unfused ops).


@torch.library.custom_op("gpavatar::field_query_forward_triton", mutates_args=())
def _forward_triton(coords: torch.Tensor, dirs: torch.Tensor, planes: torch.Tensor, points: torch.Tensor,
                    dist2: torch.Tensor, idx: torch.Tensor, weight_sum: Optional[torch.Tensor], table: torch.Tensor,
                    w1_dir: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor, layers: list[torch.Tensor], eps: float,
                    precision: str, block_m: int, num_warps: int) -> tuple[torch.Tensor, torch.Tensor]:
    from gpavatar.kernels.field_query import field_forward

    return field_forward(coords, dirs, planes, points, dist2, idx, weight_sum, table, w1_dir, w2, b2,
                         [t.contiguous() for t in layers], eps, precision, block_m or None, num_warps or None)


@_forward_triton.register_fake
def _forward_fake(coords, dirs, planes, points, dist2, idx, weight_sum, table, w1_dir, w2, b2, layers, eps,
                  precision, block_m, num_warps):
    B, N = coords.shape[0], coords.shape[1]
    return coords.new_empty((B, N)), coords.new_empty((B, N, layers[10].shape[0]))


#   field_layers_forward_triton(tri (R, C), pef (R, PC), coords (R, 3), dirs (R, 3),
#       weights [W1, b1, W2, b2, Wo, bo, W1r, W2r, b2r] (kernels/field_layers.py), precision,
#       block_m (0: default), num_warps (0: default))
#       -> (alpha (R,), value (R, V))   forward only (field_layers sends calls that need grad to torch)


@torch.library.custom_op("gpavatar::field_layers_forward_triton", mutates_args=())
def _layers_forward_triton(tri: torch.Tensor, pef: torch.Tensor, coords: torch.Tensor, dirs: torch.Tensor,
                           weights: list[torch.Tensor], precision: str, block_m: int,
                           num_warps: int) -> tuple[torch.Tensor, torch.Tensor]:
    from gpavatar.kernels.field_layers import field_layers_forward

    return field_layers_forward(tri, pef, coords, dirs, *weights, precision=precision, block_m=block_m or None,
                                num_warps=num_warps or None)


@_layers_forward_triton.register_fake
def _layers_forward_fake(tri, pef, coords, dirs, weights, precision, block_m, num_warps):
    R = tri.shape[0]
    return tri.new_empty((R,), dtype=torch.float32), tri.new_empty((R, weights[7].shape[0]), dtype=torch.float32)
