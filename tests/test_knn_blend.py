"""knn_blend: every backend against the reference (forward, backward), gradcheck,
finite differences of the CPU kernel, opcheck, numerics at the edges, bad inputs."""

import math
import os
from contextlib import contextmanager

import pytest
import torch
from conftest import BACKEND_CASES
from hypothesis import given
from hypothesis import strategies as st

import gpavatar.ops as ops
from _data import make_pef_params, make_points, make_queries
from gpavatar.ops.reference import knn_blend_reference

# Tolerances: the fused kernels compute the same float32 math as the reference
# in another order (first layer split into a per-point table plus the direction
# part, second layer after the blend), so results differ by float32 rounding
# accumulated over ~60-term dot products: ~1e-6 relative.  rtol=1e-4 / atol=1e-5
# leaves margin for sin/cos differences and still catches any wrong term (a
# dropped neighbour or bias moves outputs by ~1e-2).
FWD = dict(rtol=1e-4, atol=1e-5)
# Gradients sum over M*K contributions: allow 10x.
BWD = dict(rtol=1e-3, atol=1e-4)


def run(backend, q, pts, params, K, normalize="neighbors", grad_out=None, **kw):
    """Forward (and backward with grad_out) on `backend`; returns (feature, dist2, idx, grads)."""
    params = [p.detach().clone().requires_grad_(grad_out is not None) for p in params]
    if backend == "reference":
        out = knn_blend_reference(q, pts, *params, K=K, normalize=normalize, **kw)
    else:
        out = ops.knn_blend(q, pts, *params, K=K, normalize=normalize, backend=backend, **kw)
    grads = torch.autograd.grad(out[0], params, grad_out) if grad_out is not None else None
    return out[0], out[1], out[2], grads


# Hidden pre-activations closer than this to ReLU's kink (in float64) are moved off it before a
# gradient comparison: there the kernels' and the reference's float32 sums (~1e-6 apart) may fall
# on different sides, and the two gradients then differ by a whole term (~1e-2: a rounding
# difference, not an error).  One such pair in 2400 made a hypothesis example fail.
KINK = 1e-5


def away_from_kinks(q, pts, params, K):
    """``params`` with b1 shifted (1e-3 per step, on the hidden units concerned) until no neighbour
    pair's float64 pre-activation F.linear([features, gamma(direction)], w1, b1) is within KINK of 0."""
    from gpavatar.ops.reference import gather_points, harmonic_embedding, knn_reference

    pf, w1, b1, w2, b2 = params
    qd, pd = q.detach().double().cpu(), pts.detach().double().cpu()
    _, idx = knn_reference(qd, pd, K)
    direction = torch.nn.functional.normalize(qd[:, :, None, :] - gather_points(pd, idx), dim=-1)
    pfd = pf.detach().double().cpu()
    feats = pfd[idx] if pfd.dim() == 2 else gather_points(pfd, idx)
    x = torch.cat([feats, harmonic_embedding(direction)], dim=-1)
    w1d, shift = w1.detach().double().cpu(), torch.zeros(b1.shape[0], dtype=torch.float64)
    for _ in range(50):
        h = torch.nn.functional.linear(x, w1d, b1.detach().double().cpu() + shift)
        near = (h.abs() < KINK).reshape(-1, h.shape[-1]).any(0)
        if not bool(near.any()):
            break
        shift += near.double() * 1e-3
    return [pf, w1, b1 + shift.to(b1.dtype).to(b1.device), w2, b2]


def check_against_reference(device, backend, B, M, P, K, Cf=32, H=64, C=32, normalize="neighbors",
                            per_batch=False, seed=0, dup=0, on=0, far=0, backward=True):
    pts = make_points(B, P, seed=seed, duplicates=dup, device=device)
    q = make_queries(B, M, pts, seed=seed + 1, on_points=on, far=far, device=device)
    params = make_pef_params(P, Cf, H, C, B=B if per_batch else None, seed=seed + 2, device=device)
    if backward:
        params = away_from_kinks(q, pts, params, K)
    grad_out = torch.randn(B, M, C, generator=torch.Generator().manual_seed(seed)).to(device) if backward else None
    f, d, i, g = run(backend, q, pts, params, K, normalize, grad_out)
    rf, rd, ri, rg = run("reference", q, pts, params, K, normalize, grad_out)
    assert torch.equal(i, ri) and torch.equal(d, rd)
    assert f.dtype == torch.float32 and bool(f.isfinite().all())
    torch.testing.assert_close(f, rf, **FWD)
    if backward:
        for name, a, b in zip(["point_features", "w1", "b1", "w2", "b2"], g, rg):
            torch.testing.assert_close(a, b, **BWD, msg=lambda m, name=name: f"grad {name}: {m}")


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
@pytest.mark.parametrize("normalize", ["neighbors", "queries"])
@given(B=st.integers(1, 3), M=st.integers(1, 40), P=st.integers(1, 60), K=st.integers(1, 32),
       per_batch=st.booleans(), dup=st.integers(0, 10), on=st.integers(0, 3), seed=st.integers(0, 2**16))
def test_knn_blend_matches_reference(device, backend, normalize, B, M, P, K, per_batch, dup, on, seed):
    check_against_reference(device, backend, B, M, P, min(K, P), normalize=normalize, per_batch=per_batch, seed=seed,
                            dup=dup, on=on)


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
@pytest.mark.parametrize("B,M,P,K,Cf,H,C", [
    (1, 1, 1, 1, 32, 64, 32),      # M = 1, K = P = 1
    (2, 17, 9, 9, 32, 64, 32),     # K = P, B > 1
    (1, 50, 300, 8, 32, 64, 32),   # paper K, P not a tile multiple
    (1, 20, 40, 32, 32, 64, 32),   # K at the fused limit
    (2, 23, 31, 5, 7, 24, 5),      # odd feature / hidden / output sizes
    (1, 9, 12, 3, 1, 128, 64),     # largest CUDA sizes, one feature channel
])
@pytest.mark.parametrize("normalize", ["neighbors", "queries"])
def test_knn_blend_shapes(device, backend, B, M, P, K, Cf, H, C, normalize):
    check_against_reference(device, backend, B, M, P, K, Cf, H, C, normalize=normalize, dup=P // 5, on=M // 4,
                            far=1)


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_query_on_a_point_is_finite_and_dominated_by_it(device, backend):
    pts = make_points(1, 30, seed=4, device=device)
    q = pts[:, [3, 7, 7]].clone()  # exactly on points (twice the same one)
    params = make_pef_params(30, device=device)
    for normalize in ["neighbors", "queries"]:
        f, d, i, _ = run(backend, q, pts, params, 8, normalize)
        assert bool(f.isfinite().all()) and d[0, :, 0].abs().max().item() == 0.0
    # "neighbors": w_0 = 1/(1 + eps * sum_k>0 1/d_k) ~ 1, so f is the MLP of that point with direction 0.
    f, _, _, _ = run(backend, q, pts, params, 8)
    e, w1, b1, w2, b2 = params
    x = torch.cat([e[[3, 7, 7]], torch.zeros(3, 27, device=device)], dim=1)
    x[:, 32 + 12:32 + 24] = 1.0  # gamma(0): sin 0, cos 1, r 0
    expected = torch.relu(x @ w1.T + b1) @ w2.T + b2
    torch.testing.assert_close(f[0], expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_far_queries_and_coincident_points(device, backend):
    check_against_reference(device, backend, 2, 20, 25, 8, dup=12, far=10, on=3)
    # every point identical: all K neighbours tie, directions equal, weights equal
    pts = torch.full((1, 10, 3), 0.1, device=device)
    q = make_queries(1, 5, device=device)
    params = make_pef_params(10, device=device)
    f, _, i, _ = run(backend, q, pts, params, 4)
    rf, _, ri, _ = run("reference", q, pts, params, 4)
    assert torch.equal(i, ri)
    torch.testing.assert_close(f, rf, **FWD)


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_queries_normalization_chunked_equals_whole(device, backend):
    pts = make_points(2, 40, seed=11, device=device)
    q = make_queries(2, 64, seed=12, device=device)
    params = make_pef_params(40, device=device)
    whole = ops.knn_blend(q, pts, *params, K=8, normalize="queries", backend=backend)
    total = ops.knn_blend_weight_sum(whole.dist2)
    chunks = [ops.knn_blend(c, pts, *params, K=8, normalize="queries", weight_sum=total, backend=backend).feature
              for c in q.split(24, dim=1)]
    torch.testing.assert_close(torch.cat(chunks, dim=1), whole.feature, rtol=1e-6, atol=1e-7)
    # Without the global sum, chunks normalize differently: the option matters.
    alone = ops.knn_blend(q[:, :24], pts, *params, K=8, normalize="queries", backend=backend).feature
    assert (alone - whole.feature[:, :24]).abs().max() > 1e-3


def test_normalizations_differ_and_neighbors_weights_sum_to_one():
    pts, q = make_points(1, 30), make_queries(1, 20)
    e, w1, b1, w2, b2 = make_pef_params(30)
    a = ops.knn_blend(q, pts, e, w1, b1, w2, b2, K=4, normalize="neighbors", backend="torch").feature
    b = ops.knn_blend(q, pts, e, w1, b1, w2, b2, K=4, normalize="queries", backend="torch").feature
    assert (a - b).abs().max() > 1e-2
    # With w2 = 0 the output is b2 * sum_k w_k: exactly b2 for "neighbors".
    zero = torch.zeros_like(w2)
    for backend in ops.available_backends("cpu"):
        out = ops.knn_blend(q, pts, e, w1, b1, zero, b2, K=4, backend=backend).feature
        torch.testing.assert_close(out, b2.expand_as(out), rtol=1e-6, atol=1e-6)


def test_reference_gradcheck_float64():
    """All inputs, queries and points included, both normalizations."""
    pts = make_points(2, 10, seed=13, dtype=torch.float64).requires_grad_()
    q = make_queries(2, 5, seed=14, dtype=torch.float64).requires_grad_()
    params = [p.requires_grad_() for p in make_pef_params(10, Cf=3, H=6, C=4, dtype=torch.float64)]
    for normalize in ["neighbors", "queries"]:
        def f(q, pts, *params):
            return ops.knn_blend(q, pts, *params, K=3, normalize=normalize, backend="torch").feature
        assert torch.autograd.gradcheck(f, (q, pts, *params))


@pytest.mark.parametrize("normalize", ["neighbors", "queries"])
def test_cpu_kernel_backward_finite_differences(normalize):
    """Directional derivatives of the CPU kernel's own forward vs its backward (float32)."""
    if "cpu" not in ops.available_backends("cpu"):
        pytest.skip("extension not built")
    pts = make_points(1, 20, seed=15)
    q = make_queries(1, 12, seed=16)
    e, w1, b1, w2, b2 = make_pef_params(20, Cf=4, H=16, C=8, seed=17)
    # Pre-activations are ~N(0, 1); biases of +-6 put every hidden unit firmly on one side of
    # its ReLU kink (half always active, half never), so central differences see a smooth
    # function and both sides of the mask are exercised.
    b1 = torch.where(torch.arange(16) % 2 == 0, 6.0, -6.0)
    params = [e, w1, b1, w2, b2]
    g = torch.Generator().manual_seed(18)
    grad_out = torch.randn(1, 12, 8, generator=g)

    def loss(ps):
        feature = ops.knn_blend(q, pts, *ps, K=5, normalize=normalize, backend="cpu").feature
        return (feature.double() * grad_out.double()).sum()  # accumulate in float64: less rounding noise

    ps = [p.clone().requires_grad_() for p in params]
    grads = torch.autograd.grad(loss(ps), ps)
    h = 1e-2  # float32 rounding noise ~1e-7 * |loss| / h ~ 1e-4 relative
    for k, (p, grad) in enumerate(zip(params, grads)):
        direction = torch.randn(p.shape, generator=g)
        plus = [x + h * direction if j == k else x for j, x in enumerate(params)]
        minus = [x - h * direction if j == k else x for j, x in enumerate(params)]
        with torch.no_grad():
            numeric = (loss(plus) - loss(minus)) / (2 * h)
        analytic = (grad * direction).sum()
        assert abs(numeric - analytic) <= 1e-3 * max(1.0, abs(analytic)), (k, numeric.item(), analytic.item())
    assert float(grads[2][1::2].abs().max()) == 0.0  # units that never fire get no gradient


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_fused_backends_refuse_query_and_point_gradients(device, backend):
    pts = make_points(1, 10, device=device)
    q = make_queries(1, 4, device=device).requires_grad_()
    with pytest.raises(NotImplementedError, match="queries or points"):
        ops.knn_blend(q, pts, *make_pef_params(10, device=device), K=3, backend=backend)
    with torch.no_grad():  # fine without autograd
        ops.knn_blend(q, pts, *make_pef_params(10, device=device), K=3, backend=backend)


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_empty_queries(device, backend):
    pts = make_points(2, 10, device=device)
    params = [p.requires_grad_() for p in make_pef_params(10, device=device)]
    out = ops.knn_blend(torch.zeros(2, 0, 3, device=device), pts, *params, K=3, backend=backend)
    assert out.feature.shape == (2, 0, 32) and out.idx.shape == (2, 0, 3)
    out.feature.sum().backward()
    assert params[0].grad is not None and float(params[0].grad.abs().sum()) == 0.0


def test_half_and_bf16_inputs_compute_in_float32():
    pts, q = make_points(1, 40, seed=19), make_queries(1, 16, seed=20)
    params = make_pef_params(40, seed=21)
    for dtype in (torch.float16, torch.bfloat16):
        lo = [t.to(dtype) for t in (q, pts, *params)]
        out = ops.knn_blend(*lo, K=6)
        ref, _, _ = knn_blend_reference(*[t.float() for t in lo], K=6)
        assert out.feature.dtype == torch.float32
        torch.testing.assert_close(out.feature, ref, **FWD)


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_opcheck(device, backend):
    fwd = torch.ops.gpavatar.knn_blend_forward if backend in ("cpu", "cuda") else torch.ops.gpavatar.knn_blend_forward_triton
    bwd = torch.ops.gpavatar.knn_blend_backward if backend in ("cpu", "cuda") else torch.ops.gpavatar.knn_blend_backward_triton
    B, M, P, K, Cf, H, C = 2, 12, 15, 4, 5, 16, 8
    pts = make_points(B, P, device=device)
    q = make_queries(B, M, device=device)
    dist2, idx = ops.knn(q, pts, K, backend=backend)
    e, w1, b1, w2, b2 = make_pef_params(P, Cf, H, C, device=device)
    table = (e @ w1[:, :Cf].T + b1).requires_grad_()
    w1_dir = w1[:, Cf:].contiguous().requires_grad_()
    w2, b2 = w2.requires_grad_(), b2.requires_grad_()
    for weight_sum in (None, ops.knn_blend_weight_sum(dist2)):
        torch.library.opcheck(fwd, (q, pts, dist2, idx, table, w1_dir, w2, b2, weight_sum, 1e-8))
        grad_out = torch.randn(B, M, C, device=device)
        torch.library.opcheck(bwd, (grad_out, q, pts, dist2, idx, table.detach(), w1_dir.detach(), w2.detach(),
                                    weight_sum, 1e-8))


def test_torch_compile_traces_the_ops():
    backend = "cpu" if "cpu" in ops.available_backends("cpu") else "torch"
    pts, q = make_points(1, 30), make_queries(1, 20)
    params = [p.requires_grad_() for p in make_pef_params(30)]

    def f(q, pts, *params):
        return ops.knn_blend(q, pts, *params, K=4, normalize="queries", backend=backend).feature

    # fullgraph: validation must not break the graph (value checks are skipped when compiling).
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    out = compiled(q, pts, *params)
    torch.testing.assert_close(out, f(q, pts, *params))
    out.sum().backward()
    assert all(p.grad is not None for p in params)


def _params(P=10, **kw):
    return make_pef_params(P, Cf=4, H=8, C=3, **kw)


def _bad(**changes):
    pts, q = make_points(1, 10), make_queries(1, 5)
    e, w1, b1, w2, b2 = _params()
    args = dict(queries=q, points=pts, point_features=e, w1=w1, b1=b1, w2=w2, b2=b2, K=3)
    args.update(changes)
    return args


BAD = [
    (_bad(point_features=torch.zeros(9, 4)), ValueError, ["point_features", "(10, Cf)"]),
    (_bad(point_features=torch.zeros(2, 10, 4)), ValueError, ["point_features"]),
    (_bad(w1=torch.zeros(8, 30)), ValueError, ["w1", "(H, 31)"]),
    (_bad(b1=torch.zeros(7)), ValueError, ["b1", "(8,)"]),
    (_bad(w2=torch.zeros(3, 9)), ValueError, ["w2", "(C, 8)"]),
    (_bad(b2=torch.zeros(4)), ValueError, ["b2", "(3,)"]),
    (_bad(w2=torch.zeros(3, 8, dtype=torch.int64)), TypeError, ["w2", "dtype"]),
    (_bad(K=11), ValueError, ["K", "P = 10"]),
    (_bad(K=0), ValueError, ["K"]),
    (_bad(queries=torch.zeros(2, 5, 3)), ValueError, ["batch"]),
    (_bad(queries=torch.zeros(5, 3)), ValueError, ["queries", "(B, M, 3)"]),
    (_bad(points=torch.full((1, 10, 3), float("nan"))), ValueError, ["points", "finite"]),
    (_bad(queries=torch.full((1, 5, 3), 1e7)), ValueError, ["queries", "1e+06"]),
    (_bad(normalize="global"), ValueError, ["normalize"]),
    (_bad(eps=0.0), ValueError, ["eps"]),
    (_bad(eps=float("nan")), ValueError, ["eps"]),
    (_bad(normalize="queries", weight_sum=torch.ones(1, 4)), ValueError, ["weight_sum", "(1, 3)"]),
    (_bad(normalize="queries", weight_sum=torch.zeros(1, 3)), ValueError, ["weight_sum", "> 0"]),
    (_bad(weight_sum=torch.ones(1, 3)), ValueError, ["weight_sum", "queries"]),
]


@pytest.mark.parametrize("backend", ["torch"] + [b for b in ops.available_backends("cpu") if b != "torch"])
@pytest.mark.parametrize("args,exc,words", BAD)
def test_bad_inputs(backend, args, exc, words):
    with pytest.raises(exc) as info:
        ops.knn_blend(**args, backend=backend)
    for word in words:
        assert word in str(info.value), str(info.value)


@pytest.mark.parametrize("name", ["points", "point_features", "w1", "b1", "w2", "b2"])
def test_bad_device_mix(name):
    # A second device without a GPU: "meta" tensors (no data) are enough to test the check.
    other = "cuda" if torch.cuda.is_available() else "meta"
    args = _bad()
    args[name] = args[name].to(other)
    with pytest.raises(ValueError, match=f"{name} must be on the same device as queries"):
        ops.knn_blend(**args)


def test_low_level_op_checks_its_inputs():
    """The C++ op validates too (ValueError / TypeError, never a crash)."""
    if "cpu" not in ops.available_backends("cpu"):
        pytest.skip("extension not built")
    pts, q = make_points(1, 10), make_queries(1, 5)
    dist2, idx = ops.knn(q, pts, 3)
    e, w1, b1, w2, b2 = _params()
    table = e @ w1[:, :4].T + b1
    w1_dir = w1[:, 4:]
    op = torch.ops.gpavatar.knn_blend_forward
    with pytest.raises(ValueError, match="idx must hold indices"):
        op(q, pts, dist2, idx + 100, table, w1_dir, w2, b2, None, 1e-8)
    with pytest.raises(ValueError, match="w1_dir must have shape"):
        op(q, pts, dist2, idx, table, w1_dir[:, :5], w2, b2, None, 1e-8)
    with pytest.raises(TypeError, match="idx must be int64"):
        op(q, pts, dist2, idx.int(), table, w1_dir, w2, b2, None, 1e-8)
    with pytest.raises(ValueError, match="eps must be > 0"):
        op(q, pts, dist2, idx, table, w1_dir, w2, b2, None, 0.0)
    with pytest.raises(ValueError, match="K must be <= the number of points"):
        torch.ops.gpavatar.knn(q, pts, 11)
    with pytest.raises(ValueError, match="K must be in"):
        torch.ops.gpavatar.knn(q, pts, 0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_backward_chunk_loop(monkeypatch):
    """The CUDA backward reduces over chunks of queries; force many small, uneven chunks."""
    if "cuda" not in ops.available_backends("cuda"):
        pytest.skip("extension built without CUDA")
    monkeypatch.setenv("GPAVATAR_BLEND_CHUNK_FLOATS", "20000")  # a few dozen queries per chunk
    for per_batch in (False, True):
        check_against_reference("cuda", "cuda", 3, 301, 50, 8, per_batch=per_batch, normalize="queries")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("variant", ["default", "occupancy", "generic"])
def test_cuda_kernel_variants(variant, monkeypatch):
    """GPAVATAR_BLEND_CUDA_VARIANT compiles the H = 64, C = 32 kernels differently, with the
    same arithmetic: forward and backward match the reference in each; a bad name is refused."""
    if "cuda" not in ops.available_backends("cuda"):
        pytest.skip("extension built without CUDA")
    monkeypatch.setenv("GPAVATAR_BLEND_CUDA_VARIANT", variant)
    for per_batch in (False, True):
        for normalize in ("neighbors", "queries"):
            check_against_reference("cuda", "cuda", 2, 700, 300, 8, per_batch=per_batch, normalize=normalize)
    monkeypatch.setenv("GPAVATAR_BLEND_CUDA_VARIANT", "fastest")
    with pytest.raises(ValueError, match="GPAVATAR_BLEND_CUDA_VARIANT must be"):
        check_against_reference("cuda", "cuda", 1, 10, 20, 4)


CPP_DEVICES = [pytest.param(d, id=d, marks=[pytest.mark.cuda] if d == "cuda" else [])
               for d in ("cpu",) + (("cuda",) if torch.cuda.is_available() else ())
               if d in ops.available_backends(d)]


@pytest.mark.parametrize("device", CPP_DEVICES)
def test_tiles_low_level_ops_take_a_misaligned_table(device, monkeypatch):
    """The tiled CUDA kernels read table rows 16 bytes at a time; a table view that starts 4
    bytes into its storage is copied first (the same numbers as an aligned table)."""
    monkeypatch.setenv("GPAVATAR_BLEND_FORWARD", "tiles")
    monkeypatch.setenv("GPAVATAR_BLEND_BACKWARD", "tiles")
    pts = make_points(1, 50, seed=3, device=device)
    q = make_queries(1, 70, pts, seed=4, device=device)
    dist2, idx = ops.knn(q, pts, 8, backend=device)
    g = torch.Generator().manual_seed(5)
    table = torch.randn(50, 64, generator=g).to(device)
    w1_dir = (torch.randn(64, 27, generator=g) / 6).to(device)
    w2 = (torch.randn(32, 64, generator=g) / 8).to(device)
    b2 = torch.randn(32, generator=g).to(device)
    storage = torch.empty(50 * 64 + 1, device=device)
    shifted = storage[1:].view(50, 64)
    shifted.copy_(table)
    assert shifted.data_ptr() % 16 != 0
    fwd, bwd = torch.ops.gpavatar.knn_blend_forward, torch.ops.gpavatar.knn_blend_backward
    out = fwd(q, pts, dist2, idx, shifted, w1_dir, w2, b2, None, 1e-8)
    assert torch.equal(out, fwd(q, pts, dist2, idx, table, w1_dir, w2, b2, None, 1e-8))
    go = torch.randn(1, 70, 32, generator=g).to(device)
    for a, b in zip(bwd(go, q, pts, dist2, idx, shifted, w1_dir, w2, None, 1e-8),
                    bwd(go, q, pts, dist2, idx, table, w1_dir, w2, None, 1e-8)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", CPP_DEVICES)
@pytest.mark.parametrize("method", ["gather", "tiles"])
@pytest.mark.parametrize("normalize", ["neighbors", "queries"])
@pytest.mark.parametrize("per_batch", [False, True])
@pytest.mark.parametrize("P", [5, 300])
def test_pair_backwards_match_the_reference(device, method, normalize, per_batch, P, monkeypatch):
    """GPAVATAR_BLEND_BACKWARD=gather: pairs grouped by table row and summed in chunks (no
    per-neighbour buffers, no atomics); =tiles: one pass over tiles of 16 queries (grad_table
    added per pair, grad_w1 in block shares).  P = 5 puts hundreds of pairs on each row
    (several gather chunks per row); 300 queries are 19 tiles, the last one partial, over 3
    blocks on the CPU.  On the CPU each runs the CUDA kernels' order, layout and sums."""
    monkeypatch.setenv("GPAVATAR_BLEND_BACKWARD", method)
    check_against_reference(device, device, 2, 300, P, min(8, P), per_batch=per_batch, normalize=normalize,
                            dup=1 if P > 5 else 0, on=3)


@pytest.mark.parametrize("device", CPP_DEVICES)
@given(B=st.integers(1, 3), M=st.integers(1, 70), P=st.integers(1, 40), K=st.integers(1, 8),
       per_batch=st.booleans(), queries=st.booleans(), seed=st.integers(0, 2**16))
def test_tiles_backward_random_shapes(device, B, M, P, K, per_batch, queries, seed):
    """The tiled backward at every K <= 8 (empty pair slots), partial tiles and tiles that
    span two batch elements."""
    with env("GPAVATAR_BLEND_BACKWARD", "tiles"):
        check_against_reference(device, device, B, M, P, min(K, P), per_batch=per_batch,
                                normalize="queries" if queries else "neighbors", seed=seed, dup=1)


@pytest.mark.parametrize("device", CPP_DEVICES)
@given(B=st.integers(1, 3), M=st.integers(1, 70), P=st.integers(1, 40), K=st.integers(1, 8),
       per_batch=st.booleans(), queries=st.booleans(), on=st.integers(0, 3), seed=st.integers(0, 2**16))
def test_tiles_forward_random_shapes(device, B, M, P, K, per_batch, queries, on, seed):
    """GPAVATAR_BLEND_FORWARD=tiles against the reference, and against the per-query kernel:
    the same sums in the same order, so on the CPU (no FMA contraction in either) the same
    bits."""
    K = min(K, P)
    normalize = "queries" if queries else "neighbors"
    with env("GPAVATAR_BLEND_FORWARD", "tiles"):
        check_against_reference(device, device, B, M, P, K, per_batch=per_batch, normalize=normalize,
                                seed=seed, dup=1, on=on, backward=False)
    pts = make_points(B, P, seed=seed, device=device)
    q = make_queries(B, M, pts, seed=seed + 1, on_points=on, device=device)
    params = make_pef_params(P, 32, 64, 32, B=B if per_batch else None, seed=seed + 2, device=device)
    with env("GPAVATAR_BLEND_FORWARD", "tiles"):
        tiled = run(device, q, pts, params, K, normalize)[0]
    with env("GPAVATAR_BLEND_FORWARD", "queries"), blend_cpu_variant("scalar"):
        per_query = run(device, q, pts, params, K, normalize)[0]
    if device == "cpu":
        assert torch.equal(tiled, per_query)
    else:
        torch.testing.assert_close(tiled, per_query, rtol=1e-6, atol=1e-6)


# GPAVATAR_BLEND_FORWARD=tiles_tf32: the hidden layer's direction products in TF32 (10-bit
# mantissas).  Over 200 random cases on the CPU the error against the float64 reference was at
# most 2.8e-4 of the largest output (mean 4.4e-5); a fragment coordinate swapped (a1 <-> a2 of the
# weights) moved outputs by 0.6 of it.
TF32_MAX, TF32_MEAN = 2e-3, 2e-4


@pytest.mark.parametrize("device", CPP_DEVICES)
@given(B=st.integers(1, 3), M=st.integers(1, 70), P=st.integers(1, 40), K=st.integers(1, 8),
       per_batch=st.booleans(), queries=st.booleans(), on=st.integers(0, 3), seed=st.integers(0, 2**16))
def test_tiles_tf32_forward_random_shapes(device, B, M, P, K, per_batch, queries, on, seed):
    """The tensor-core forward (knn_blend_tiles.h; on the CPU the same fragments through an
    emulation of mma.m16n8k8) within TF32's rounding of the float64 reference: empty slots (K < 8,
    P < 8), partial tiles, per-batch tables, both normalizations, queries on points."""
    K = min(K, P)
    normalize = "queries" if queries else "neighbors"
    pts = make_points(B, P, seed=seed, device=device)
    q = make_queries(B, M, pts, seed=seed + 1, on_points=on, device=device)
    params = make_pef_params(P, 32, 64, 32, B=B if per_batch else None, seed=seed + 2, device=device)
    with env("GPAVATAR_BLEND_FORWARD", "tiles_tf32"):
        got, d, i, _ = run(device, q, pts, params, K, normalize)
    ref, rd, ri, _ = run("reference", q.double().cpu(), pts.double().cpu(), [t.double().cpu() for t in params], K,
                         normalize)
    assert torch.equal(i.cpu(), ri)
    assert got.dtype == torch.float32 and bool(got.isfinite().all())
    scale = float(ref.abs().max()) + 1e-30
    err = (got.double().cpu() - ref).abs()
    assert float(err.max()) <= TF32_MAX * scale and float(err.mean()) <= TF32_MEAN * scale, (
        f"tf32 forward: max error {float(err.max()) / scale:.2e}, mean {float(err.mean()) / scale:.2e} of the scale")


@pytest.mark.parametrize("device", CPP_DEVICES)
@pytest.mark.parametrize("where", ["point_features", "w1_direction", "b1", "w2"])
def test_tiles_tf32_forward_propagates_nan_like_the_tiles(device, where):
    """A NaN parameter reaches the same outputs through the tensor-core forward as through the fp32
    tiles (a NaN weight of the direction half: every live slot's hidden unit; empty slots and the
    zero padding of the embedding stay out)."""
    B, M, P = 2, 70, 5  # P < 8: empty slots in every query
    pts = make_points(B, P, seed=3, device=device)
    q = make_queries(B, M, pts, seed=4, on_points=2, device=device)
    params = make_pef_params(P, 32, 64, 32, seed=5, device=device)
    which, flat = {"point_features": (0, 2 * 32 + 7), "w1_direction": (1, 9 * 59 + 32 + 20), "b1": (2, 11),
                   "w2": (3, 3 * 64 + 40)}[where]
    params[which].view(-1)[flat] = float("nan")
    out = {}
    for method in ("tiles", "tiles_tf32"):
        with env("GPAVATAR_BLEND_FORWARD", method):
            out[method] = run(device, q, pts, params, P)[0]
    assert bool(out["tiles"].isnan().any())
    assert torch.equal(out["tiles"].isnan(), out["tiles_tf32"].isnan())


def test_tiles_forward_falls_back_and_checks_its_name(monkeypatch):
    """Where the tiled forwards do not apply (H != 64, C != 32, K > 8) the per-query kernel
    runs; a bad name is refused."""
    if "cpu" not in ops.available_backends("cpu"):
        pytest.skip("extension not built")
    monkeypatch.setenv("GPAVATAR_BLEND_FORWARD", "tiles")
    check_against_reference("cpu", "cpu", 2, 50, 30, 12, backward=False)
    check_against_reference("cpu", "cpu", 2, 50, 30, 8, H=32, C=16, backward=False)
    monkeypatch.setenv("GPAVATAR_BLEND_FORWARD", "tiles_tf32")  # (and its tensor-core variant)
    check_against_reference("cpu", "cpu", 2, 50, 30, 12, backward=False)
    check_against_reference("cpu", "cpu", 2, 50, 30, 8, H=32, C=16, backward=False)
    monkeypatch.setenv("GPAVATAR_BLEND_FORWARD", "warps")
    with pytest.raises(ValueError, match="GPAVATAR_BLEND_FORWARD must be auto, queries, tiles or tiles_tf32"):
        check_against_reference("cpu", "cpu", 1, 5, 10, 4, backward=False)


@pytest.mark.parametrize("device", CPP_DEVICES)
def test_pair_backwards_agree_with_the_buffers(device, monkeypatch):
    """Every C++/CUDA backward on one input: the same gradients to float32 rounding; the
    tiled one falls back to the buffers where it does not apply (H != 64 or K > 8)."""
    pts = make_points(2, 200, seed=11, device=device)
    q = make_queries(2, 500, pts, seed=12, device=device)
    params = make_pef_params(200, 32, 64, 32, B=2, seed=13, device=device)
    grad_out = torch.randn(2, 500, 32, generator=torch.Generator().manual_seed(14)).to(device)
    monkeypatch.setenv("GPAVATAR_BLEND_BACKWARD", "buffers")
    _, _, _, g_buffers = run(device, q, pts, params, 8, grad_out=grad_out)
    for method in ("gather", "tiles"):
        monkeypatch.setenv("GPAVATAR_BLEND_BACKWARD", method)
        _, _, _, g_pairs = run(device, q, pts, params, 8, grad_out=grad_out)
        for a, b in zip(g_pairs, g_buffers):
            assert (a - b).abs().max() <= 1e-5 * (1 + b.abs().max()), method
    monkeypatch.setenv("GPAVATAR_BLEND_BACKWARD", "tiles")
    _, _, _, g_tiles12 = run(device, q, pts, params, 12, grad_out=grad_out)  # K > 8: the buffers
    monkeypatch.setenv("GPAVATAR_BLEND_BACKWARD", "buffers")
    _, _, _, g_buffers12 = run(device, q, pts, params, 12, grad_out=grad_out)
    for a, b in zip(g_tiles12, g_buffers12):
        assert torch.equal(a, b) or device == "cuda"
    monkeypatch.setenv("GPAVATAR_BLEND_BACKWARD", "atomics")
    with pytest.raises(ValueError, match="GPAVATAR_BLEND_BACKWARD must be auto, buffers, gather or tiles"):
        run(device, q, pts, params, 8, grad_out=grad_out)


@pytest.mark.parametrize("device", CPP_DEVICES)
def test_auto_methods_are_the_documented_ones(device, monkeypatch):
    """GPAVATAR_BLEND_FORWARD / _BACKWARD unset (= auto): on the CPU the per-query forward and the
    buffers backward; on CUDA the tiles, and the gather backward (no atomics: the same bits on
    every run) under torch.use_deterministic_algorithms(True)."""
    pts = make_points(2, 200, seed=21, device=device)
    q = make_queries(2, 300, pts, seed=22, device=device)
    params = make_pef_params(200, 32, 64, 32, seed=23, device=device)
    grad_out = torch.randn(2, 300, 32, generator=torch.Generator().manual_seed(24)).to(device)

    def outputs(forward=None, backward=None):
        for name, value in (("GPAVATAR_BLEND_FORWARD", forward), ("GPAVATAR_BLEND_BACKWARD", backward)):
            if value is None:
                monkeypatch.delenv(name, raising=False)
            else:
                monkeypatch.setenv(name, value)
        out, _, _, grads = run(device, q, pts, params, 8, grad_out=grad_out)
        return [out, *grads]

    auto = outputs()
    again = outputs("auto", "auto")  # CUDA: the grad_table atomics may sum in another order
    assert all(torch.equal(a, b) for a, b in zip(auto[:1] if device == "cuda" else auto, again))
    forward, backward = ("tiles", "tiles") if device == "cuda" else ("queries", "buffers")
    expected = outputs(forward, backward)
    assert torch.equal(auto[0], expected[0])
    for a, b in zip(auto[1:], expected[1:]):
        assert torch.equal(a, b) if device == "cpu" else (a - b).abs().max() <= 1e-5 * (1 + b.abs().max())
    if device == "cuda":
        previous = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True, warn_only=True)  # cuBLAS would want CUBLAS_WORKSPACE_CONFIG
        try:
            first, second = outputs(), outputs()
        finally:
            torch.use_deterministic_algorithms(previous)
        gather = outputs(backward="gather")
        for a, b, c in zip(first[1:], second[1:], gather[1:]):
            assert torch.equal(a, b) and torch.equal(a, c)


TRITON_DEVICES = [pytest.param(d, id=d, marks=[pytest.mark.cuda] if d == "cuda" else [])
                  for d in ("cpu",) + (("cuda",) if torch.cuda.is_available() else ())
                  if "triton" in ops.available_backends(d)]


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("precision", ["tf32", "tf32x3"])
def test_triton_dot_precision(device, precision, monkeypatch):
    """GPAVATAR_TRITON_DOT_PRECISION puts the Triton kernels' matrix products on the tensor cores
    (fast mode): features and gradients stay within tf32's error of the fp32 result (the
    interpreter on the CPU computes in fp32: equal there), tf32x3 within 1e-5.  tf32 on an H200:
    features within 2e-2, gradients within 8e-2 (measured 3.6e-2 relative to 1 + max)."""
    pts = make_points(2, 300, seed=3, device=device)
    q = make_queries(2, 200, pts, seed=4, device=device)
    params = make_pef_params(300, 32, 64, 32, seed=5, device=device)
    grad_out = torch.randn(2, 200, 32, generator=torch.Generator().manual_seed(6)).to(device)
    f32, _, _, g32 = run("triton", q, pts, params, 8, grad_out=grad_out)
    monkeypatch.setenv("GPAVATAR_TRITON_DOT_PRECISION", precision)
    f, _, _, g = run("triton", q, pts, params, 8, grad_out=grad_out)
    exact = precision == "tf32x3" or device == "cpu"
    for i, (a, b) in enumerate(zip((f, *g), (f32, *g32))):
        tol = 1e-5 if exact else (2e-2 if i == 0 else 8e-2)
        assert (a - b).abs().max() <= tol * (1 + b.abs().max())


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_triton_backward_is_deterministic(device):
    """The Triton backward sums the programs' shares of grad_w1_dir / grad_w2 / grad_b2 in order
    (no atomics there): two runs give the same bits for them.  (The point features', b1's and
    w1's feature columns' gradients come from grad_table's atomic scatter: not compared.)"""
    pts = make_points(1, 200, seed=7, device=device)
    q = make_queries(1, 300, pts, seed=8, device=device)
    params = make_pef_params(200, 32, 64, 32, seed=9, device=device)
    grad_out = torch.randn(1, 300, 32, generator=torch.Generator().manual_seed(10)).to(device)
    _, _, _, g1 = run("triton", q, pts, params, 8, grad_out=grad_out)
    _, _, _, g2 = run("triton", q, pts, params, 8, grad_out=grad_out)
    cf = params[0].shape[-1]
    assert torch.equal(g1[1][:, cf:], g2[1][:, cf:])  # w1's direction columns
    assert torch.equal(g1[3], g2[3]) and torch.equal(g1[4], g2[4])  # w2, b2


def test_triton_bad_dot_precision_is_a_clear_error(monkeypatch):
    from gpavatar.kernels.knn_blend import dot_precision

    monkeypatch.setenv("GPAVATAR_TRITON_DOT_PRECISION", "bf16")
    with pytest.raises(ValueError, match="GPAVATAR_TRITON_DOT_PRECISION must be one of ieee, tf32, tf32x3"):
        dot_precision()


# --- the stacked tensor-core forward (GPAVATAR_BLEND_TENSOR_CORES) ------------------------------


@contextmanager
def stacked_launches(monkeypatch):
    """Sets GPAVATAR_BLEND_TENSOR_CORES=1 and yields the stacked kernel's launches (precisions)."""
    import gpavatar.kernels.knn_blend as kernel_module

    calls = []
    real = kernel_module.knn_blend_forward_stacked

    def spy(*args, **kwargs):
        calls.append(args[10] if len(args) > 10 else kwargs.get("precision", "ieee"))
        return real(*args, **kwargs)

    monkeypatch.setattr(kernel_module, "knn_blend_forward_stacked", spy)
    monkeypatch.setenv("GPAVATAR_BLEND_TENSOR_CORES", "1")
    try:
        yield calls
    finally:
        monkeypatch.delenv("GPAVATAR_BLEND_TENSOR_CORES")


@pytest.mark.skipif("triton" not in ops.available_backends("cpu"), reason="needs triton (interpreter)")
@pytest.mark.parametrize("normalize", ["neighbors", "queries"])
@given(B=st.integers(1, 3), M=st.integers(1, 40), P=st.integers(1, 60), K=st.integers(1, 32),
       per_batch=st.booleans(), H=st.sampled_from([8, 20, 64]), C=st.sampled_from([3, 16, 32]),
       on=st.integers(0, 3), seed=st.integers(0, 2**16))
def test_stacked_forward_matches_reference(normalize, B, M, P, K, per_batch, H, C, on, seed):
    """Every (query, neighbour) pair a row of one product: the reference's features at fp32 (the
    interpreter), any K (padded slots), any widths, both normalizations; gradients through the fp32
    backward."""
    mp = pytest.MonkeyPatch()
    try:
        with stacked_launches(mp) as calls:
            check_against_reference("cpu", "triton", B, M, P, min(K, P), H=H, C=C, normalize=normalize,
                                    per_batch=per_batch, seed=seed, on=on)
    finally:
        mp.undo()
    assert calls == ["ieee"]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("normalize", ["neighbors", "queries"])
def test_cuda_stacked_forward(normalize, monkeypatch):
    """GPU, paper sizes: tf32 (TF32 allowed) within 2e-2 and bf16 (autocast) within 3e-2 of the fp32
    kernels' features, relative to the largest; with TF32 off the fp32 kernels run."""
    pts = make_points(1, 5023, seed=17, device="cuda")
    q = make_queries(1, 65536, pts, seed=18, device="cuda")
    params = make_pef_params(5023, 32, 64, 32, seed=19, device="cuda")
    saved = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        ref = run("cuda", q, pts, params, 8, normalize)[0]
        with stacked_launches(monkeypatch) as calls:
            run("cuda", q, pts, params, 8, normalize)
            torch.backends.cuda.matmul.allow_tf32 = True
            tf32 = run("cuda", q, pts, params, 8, normalize)[0]
            with torch.autocast("cuda", dtype=torch.bfloat16):
                bf16 = run("cuda", q, pts, params, 8, normalize)[0]
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
    assert calls == ["tf32", "bf16"]
    scale = float(ref.abs().max())
    assert float((tf32 - ref).abs().max()) <= 2e-2 * scale
    assert float((bf16 - ref).abs().max()) <= 3e-2 * scale


@pytest.mark.skipif("triton" not in ops.available_backends("cpu"), reason="needs triton (interpreter)")
@pytest.mark.parametrize("where", ["point_features", "w1", "b2"])
def test_stacked_forward_nan_like_the_reference(where, monkeypatch):
    """A NaN in a point's feature reaches the queries that use that point; in w1 / b2 every query."""
    pts = make_points(1, 60, seed=11)
    q = make_queries(1, 50, pts, seed=12)
    params = list(make_pef_params(60, 8, 16, 8, seed=13))
    i = {"point_features": 0, "w1": 1, "b2": 4}[where]
    params[i] = params[i].clone()
    params[i].view(-1)[3] = float("nan")
    ref = run("reference", q, pts, params, 8)[0]
    with stacked_launches(monkeypatch) as calls:
        out = run("triton", q, pts, params, 8)[0]
    assert calls == ["ieee"] and bool(ref.isnan().any())
    assert torch.equal(out.isnan(), ref.isnan())
    torch.testing.assert_close(out[~ref.isnan()], ref[~ref.isnan()], **FWD)


@pytest.mark.skipif("triton" not in ops.available_backends("cpu"), reason="needs triton (interpreter)")
def test_stacked_forward_switch_and_precisions(monkeypatch):
    """Off by default and for backends other than cuda / triton; bf16 under bf16 autocast (within
    bf16's error of fp32), tf32 when torch allows TF32 (fp32 under the interpreter); another autocast
    dtype runs the fp32 kernels; a bad value is refused."""
    from gpavatar.ops.knn_blend import stacked_precision

    pts = make_points(1, 200, seed=14)
    q = make_queries(1, 120, pts, seed=15)
    params = make_pef_params(200, 32, 64, 32, seed=16)
    ref = run("reference", q, pts, params, 8)[0]
    assert stacked_precision("triton", q.device) is None
    with stacked_launches(monkeypatch) as calls:
        run("cpu", q, pts, params, 8)
        assert calls == [] and stacked_precision("cpu", q.device) is None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = run("triton", q, pts, params, 8)[0]
        with torch.autocast("cpu", dtype=torch.float16):
            run("triton", q, pts, params, 8)
        saved = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = True
        try:
            tf32 = run("triton", q, pts, params, 8)[0]
        finally:
            torch.backends.cuda.matmul.allow_tf32 = saved
        assert calls == ["bf16", "tf32"]
    assert bf16.dtype == torch.float32 and 0 < float((bf16 - ref).abs().max()) <= 3e-2 * float(ref.abs().max())
    torch.testing.assert_close(tf32, ref, **FWD)
    # tf32x3: where the flags leave fp32, the stacked kernel in tf32x3 (fp32 under the interpreter)
    with stacked_launches(monkeypatch) as calls:
        monkeypatch.setenv("GPAVATAR_BLEND_TENSOR_CORES", "tf32x3")
        x3 = run("triton", q, pts, params, 8)[0]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            run("triton", q, pts, params, 8)
        assert calls == ["tf32x3", "bf16"] and stacked_precision("cpu", q.device) is None
    torch.testing.assert_close(x3, ref, **FWD)
    monkeypatch.setenv("GPAVATAR_BLEND_TENSOR_CORES", "yes")
    with pytest.raises(ValueError, match="GPAVATAR_BLEND_TENSOR_CORES must be 0, 1 or tf32x3"):
        run("triton", q, pts, params, 8)


@pytest.mark.slow
@pytest.mark.skipif("triton" not in ops.available_backends("cpu"), reason="needs triton")
def test_stacked_forward_compiles_for_sm90_without_spills(tmp_path):
    """Compiled for sm_90 (tests/_sm90.py) at the paper's sizes (K 8, H 64, C 32) and the default tile:
    no register spills (measured 0; 32 queries x 4 warps spilled 1.8 KB)."""
    import gpavatar.kernels.knn_blend as kb
    from _sm90 import job, sm90_spills

    bq, num_warps = kb.stacked_blocks(8, None)
    types = dict(idx_ptr="*i64", eps="fp32")
    jobs = [job("gpavatar.kernels.knn_blend", "_blend_stacked_fwd_kernel",
                dict(PER_BATCH=False, HAS_WS=True, BQ=bq, KP=8, HP=64, CP=32, EP=32, PREC=p, INTERPRET=False),
                num_warps, types) for p in ("tf32", "bf16")]
    assert sm90_spills(jobs, tmp_path) == [0, 0]


# --- the official 1 / d² (issue 12) -----------------------------------------------------------


def blend_float64(q, pts, params, dist2, idx, weights):
    """Σ_k w_k h_k in float64 from given neighbours (idx) and blend weights (B, M, K)."""
    from gpavatar.ops.reference import gather_points, harmonic_embedding

    e, w1, b1, w2, b2 = [t.detach().double().cpu() for t in params]
    q, pts, idx = q.double().cpu(), pts.double().cpu(), idx.cpu()
    r = torch.nn.functional.normalize(q[:, :, None] - gather_points(pts, idx), dim=-1)
    h = torch.relu(torch.cat([e[idx], harmonic_embedding(r)], dim=-1) @ w1.T + b1) @ w2.T + b2
    return (h * weights.double().cpu()[..., None]).sum(dim=2)


def official_weights(dist2):
    """The official 'queries' weights: (1 / d²) / Σ_m (1 / d²), float64, no epsilon."""
    u = 1.0 / dist2.double()
    return u / u.sum(dim=1, keepdim=True)


@pytest.mark.parametrize("device,backend", BACKEND_CASES + [pytest.param("cpu", "torch", id="cpu-torch")])
def test_official_eps_keeps_the_weight_of_a_tiny_distance(device, backend):
    # A render pass holds samples within d² ~ 1e-7 of a FLAME point.  With the official eps
    # their weight is exactly 1 / d² normalized (within float32 rounding); eps = 1e-8 would
    # change that sample's weight by ~9 % and, through the sum over all queries, every sample.
    pts = make_points(1, 50, seed=21, device=device)
    q = make_queries(1, 40, seed=22, device=device)
    offset = torch.tensor([2.2e-4, -1.9e-4, 1.3e-4], device=device)  # |offset|² ~ 1e-7
    q[0, :3] = pts[0, [4, 9, 9]] + offset * torch.tensor([[1.0], [1.0], [-0.5]], device=device)
    params = make_pef_params(50, device=device)
    out = ops.knn_blend(q, pts, *params, K=8, normalize="queries", eps=ops.OFFICIAL_EPS, backend=backend)
    d0 = out.dist2[0, :3, 0].double()
    assert bool(((d0 > 2e-8) & (d0 < 2e-7)).all()), d0
    expected = blend_float64(q, pts, params, out.dist2, out.idx, official_weights(out.dist2))

    def relative_error(feature):  # per query, relative to the query's largest channel
        scale = expected.abs().amax(dim=-1, keepdim=True)
        return ((feature.double().cpu() - expected).abs() / scale).amax(dim=-1)[0]

    # Weights of "queries" span 1e-7 (far samples) to ~0.5 (the near ones): compare each
    # query at its own scale.
    assert relative_error(out.feature).max() < 1e-4
    # The test can fail: eps = 1e-8 moves the near samples by ~7 % (and, in a full render pass
    # where they are a small part of the rank-0 sum, every other sample by ~1e-2).
    err = relative_error(ops.knn_blend(q, pts, *params, K=8, normalize="queries", eps=1e-8, backend=backend).feature)
    assert err[:3].min() > 1e-2, err


def test_official_eps_changes_no_float32_weight():
    # Adding 1e-30 rounds away for every d² >= 3e-23 in float32.
    d2 = torch.logspace(math.log10(3e-23), 2, 20000, dtype=torch.float64).float()
    assert torch.equal(1.0 / (d2 + ops.OFFICIAL_EPS), 1.0 / d2)
    assert not torch.equal(1.0 / (d2 + 1e-8), 1.0 / d2)


@pytest.mark.parametrize("device,backend", BACKEND_CASES + [pytest.param("cpu", "torch", id="cpu-torch")])
@pytest.mark.parametrize("normalize", ["neighbors", "queries"])
def test_official_eps_queries_on_points_stay_finite(device, backend, normalize):
    # A paper-size pass (524,288 queries) whose every query sits exactly on a point: each weight
    # is 1 / eps = 1e30 and the per-rank sums 5.2e35 must stay finite in float32, and so must the
    # features and the gradients to every parameter.  The sums are taken over the whole pass,
    # then each backend evaluates a chunk of it (mixed with ordinary queries) against them.
    M, P, K = 524288, 16, 8
    pts = make_points(1, P, seed=31, device=device)
    g = torch.Generator().manual_seed(32)
    q_all = pts[:, torch.randint(0, P, (M,), generator=g).to(device)]
    eps = ops.OFFICIAL_EPS
    weight_sum = None
    if normalize == "queries":
        dist2 = ops.knn(q_all, pts, K, backend="cpu" if device == "cpu" else "cuda").dist2
        weight_sum = ops.knn_blend_weight_sum(dist2, eps)
        assert bool(weight_sum.isfinite().all()) and float(weight_sum[0, 0]) == pytest.approx(M / eps, rel=1e-3)
    q = torch.cat([q_all[:, :48], make_queries(1, 16, seed=33, device=device)], dim=1)
    params = [t.requires_grad_() for t in make_pef_params(P, Cf=8, H=16, C=8, device=device)]
    out = ops.knn_blend(q, pts, *params, K=K, normalize=normalize, eps=eps, weight_sum=weight_sum,
                        backend=backend)
    assert bool(out.feature.isfinite().all())
    grads = torch.autograd.grad(out.feature.square().sum(), params)
    for name, grad in zip(["point_features", "w1", "b1", "w2", "b2"], grads):
        assert bool(grad.isfinite().all()), name
    if normalize == "neighbors":
        # a query on a point takes that point's MLP output alone (weight 1 - O(1e-28))
        ref = knn_blend_reference(q.double(), pts.double(), *[t.detach().double() for t in params], K=K,
                                  normalize="neighbors", eps=eps)[0]
        torch.testing.assert_close(out.feature.double(), ref, **FWD)


def test_full_pass_of_coincident_queries_on_the_cpu_kernel():
    # The whole 524,288-query pass in one call of the fused CPU kernel (no precomputed sums).
    if "cpu" not in ops.available_backends("cpu"):
        pytest.skip("the C++ extension is not built")
    M, P = 524288, 16
    pts = make_points(1, P, seed=41)
    q = pts[:, torch.randint(0, P, (M,), generator=torch.Generator().manual_seed(42))]
    params = [t.requires_grad_() for t in make_pef_params(P, Cf=4, H=8, C=4)]
    out = ops.knn_blend(q, pts, *params, K=8, normalize="queries", eps=ops.OFFICIAL_EPS, backend="cpu")
    assert bool(out.feature.isfinite().all())
    grads = torch.autograd.grad(out.feature.sum(), params)
    assert all(bool(g.isfinite().all()) for g in grads)


# --- The CPU forward's two loops (GPAVATAR_BLEND_CPU_VARIANT) ---------------------------------
# auto runs the AVX-512 loops (csrc/knn_blend/knn_blend_simd.inc, 16 lanes) where the CPU has
# AVX-512F, AVX2 and FMA and H in {16, 32, 64}, else the AVX2 + FMA loops (8 lanes) where it has
# those and H in {8, 16, 32, 64}, else the scalar loop of knn_blend.h; each is checked here on
# every input.

def _cpu_variants():
    out = [pytest.param("scalar", id="scalar")]
    if "cpu" in ops.available_backends("cpu"):
        pts = make_points(1, 20, seed=0)
        params = make_pef_params(20, 32, 64, 32, seed=1)
        for variant in ("avx2", "avx512"):
            os.environ["GPAVATAR_BLEND_CPU_VARIANT"] = variant
            try:
                ops.knn_blend(make_queries(1, 4, pts, seed=2), pts, *params, K=4, backend="cpu")
                out.append(pytest.param(variant, id=variant))
            except ValueError:  # a CPU without the instructions, or a build for another architecture
                pass
            finally:
                del os.environ["GPAVATAR_BLEND_CPU_VARIANT"]
    return out


CPU_VARIANTS = _cpu_variants() if "cpu" in ops.available_backends("cpu") else []


@contextmanager
def env(name, value):
    """os.environ[name] = value inside the block (hypothesis tests cannot take monkeypatch)."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ[name]
        else:
            os.environ[name] = old


def blend_cpu_variant(name):
    return env("GPAVATAR_BLEND_CPU_VARIANT", name)


@pytest.mark.parametrize("variant", CPU_VARIANTS)
@pytest.mark.parametrize("normalize", ["neighbors", "queries"])
@given(B=st.integers(1, 3), M=st.integers(1, 40), P=st.integers(1, 60), K=st.integers(1, 32),
       per_batch=st.booleans(), dup=st.integers(0, 10), on=st.integers(0, 3), far=st.integers(0, 3),
       H=st.sampled_from([8, 16, 32, 64]), C=st.sampled_from([3, 8, 13, 32, 45]), seed=st.integers(0, 2**16))
def test_cpu_variants_match_the_reference(variant, normalize, B, M, P, K, per_batch, dup, on, far, H, C, seed):
    """Forward and backward at every hidden width the AVX2 loops take, outputs in blocks of 32,
    of 8 and one at a time, K up to 32 (four 8-neighbour groups of the embedding), duplicate
    points, queries on points (zero directions) and far away."""
    if variant == "avx512" and H == 8:
        H = 16  # (its narrowest vector; auto takes the AVX2 loops at H = 8)
    with blend_cpu_variant(variant):
        check_against_reference("cpu", "cpu", B, M, P, min(K, P), H=H, C=C, normalize=normalize,
                                per_batch=per_batch, seed=seed, dup=dup, on=on, far=far)


@pytest.mark.parametrize("variant", CPU_VARIANTS)
@pytest.mark.parametrize("which", [0, 1, 2, 4])  # point_features, w1, b1, b2 (make_pef_params order)
def test_cpu_forward_variants_put_nan_where_the_reference_does(variant, which):
    """A NaN feature reaches exactly the queries next to that point; a NaN weight or bias every
    output it feeds (relu(NaN) = NaN; a max-based ReLU that drops NaN fails here)."""
    pts = make_points(1, 40, seed=3)
    q = make_queries(1, 50, pts, seed=4)
    params = make_pef_params(40, 32, 64, 32, seed=5)
    params[which].view(-1)[40 if which == 1 else 7] = float("nan")  # w1: a direction column
    with blend_cpu_variant(variant):
        out = ops.knn_blend(q, pts, *params, K=6, backend="cpu").feature
    ref = knn_blend_reference(q, pts, *params, K=6)[0]
    assert bool(ref.isnan().any())
    assert torch.equal(out.isnan(), ref.isnan())
    finite = ~ref.isnan()
    torch.testing.assert_close(out[finite], ref[finite], **FWD)


@pytest.mark.skipif(len(CPU_VARIANTS) < 2, reason="needs a CPU with AVX2 and FMA")
def test_cpu_forward_variants_agree_and_bad_names_are_refused():
    pts = make_points(2, 300, seed=6)
    q = make_queries(2, 700, pts, seed=7, on_points=5)
    params = make_pef_params(300, 32, 64, 32, B=2, seed=8)
    outs = []
    for variant in ("scalar", "avx2"):
        with blend_cpu_variant(variant):
            outs.append(ops.knn_blend(q, pts, *params, K=8, backend="cpu").feature)
    assert (outs[0] - outs[1]).abs().max() <= 1e-5 * (1 + outs[0].abs().max())
    with blend_cpu_variant("avx2"), pytest.raises(ValueError, match=r"needs a CPU with AVX2 and FMA and H in"):
        ops.knn_blend(q, pts, *make_pef_params(300, 32, 24, 32, B=2, seed=8), K=8, backend="cpu")


@pytest.mark.skipif("avx512" not in [p.values[0] for p in CPU_VARIANTS], reason="needs a CPU with AVX-512F")
@pytest.mark.parametrize("H", [16, 32, 64])
def test_cpu_avx512_loops_are_the_avx2_bits(H):
    """The 16-lane loops do each lane's operations in the AVX2 loops' order: the same forward and
    the same gradients bit for bit (outputs in blocks of 32, of 16 and one at a time: C = 45); auto
    takes them; H = 8 or 24 is refused by name."""
    pts = make_points(2, 300, seed=6)
    q = make_queries(2, 700, pts, seed=7, on_points=5)
    params = [t.requires_grad_(True) for t in make_pef_params(300, 32, H, 45, B=2, seed=8)]
    results = {}
    for variant in ("avx2", "avx512", "auto"):
        with blend_cpu_variant(variant):
            out = ops.knn_blend(q, pts, *params, K=8, normalize="queries", backend="cpu").feature
            grads = torch.autograd.grad((out * torch.linspace(-1, 1, out.shape[-1])).sum(), params)
        results[variant] = (out, grads)
    for variant in ("avx512", "auto"):
        assert torch.equal(results[variant][0], results["avx2"][0]), variant
        for a, b in zip(results[variant][1], results["avx2"][1]):
            assert torch.equal(a, b), variant
    for bad_H in (8, 24):
        with blend_cpu_variant("avx512"), pytest.raises(ValueError, match=r"avx512 needs a CPU with AVX-512F"):
            ops.knn_blend(q, pts, *make_pef_params(300, 32, bad_H, 32, B=2, seed=8), K=8, backend="cpu")
    with blend_cpu_variant("fastest"), pytest.raises(ValueError, match="GPAVATAR_BLEND_CPU_VARIANT must be"):
        ops.knn_blend(q, pts, *params, K=8, backend="cpu")
