"""gpavatar.compat against pytorch3d's and nerfacc 0.5.3's documented contracts.

Oracles are written here, independently of the code under test: a float64 brute-force
KNN with pytorch3d's padding, the slab test, a per-sample loop for the CDF inversion.
Coordinates on an integer grid make every distance exact in float32 and float64 (and
full of ties), so the kernels can be held to exact equality with the float64 oracle.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
from conftest import BACKEND_CASES
from hypothesis import given
from hypothesis import strategies as st

import gpavatar.ops as ops
from gpavatar.compat import nerfacc, pytorch3d_ops
from gpavatar.compat.pytorch3d_ops import knn_gather, knn_points

ROOT = Path(__file__).resolve().parents[1]
KNN_BACKENDS = [pytest.param("cpu", "torch", id="cpu-torch")] + BACKEND_CASES


# --- oracles ---------------------------------------------------------------------------------


def oracle_knn(p1, p2, lengths1, lengths2, K, norm):
    """Brute force in float64, ties by index; padding (dists 0, idx 0) as pytorch3d's kernels write it."""
    N, P1, _ = p1.shape
    P2 = p2.shape[1]
    l1 = [P1] * N if lengths1 is None else lengths1.tolist()
    l2 = [P2] * N if lengths2 is None else lengths2.tolist()
    dists = torch.zeros(N, P1, K, dtype=torch.float64)
    idx = torch.zeros(N, P1, K, dtype=torch.int64)
    for n in range(N):
        diff = p1[n, :l1[n], None, :].double() - p2[n, None, :l2[n], :].double()
        d = (diff**2 if norm == 2 else diff.abs()).sum(-1)
        for i in range(l1[n]):
            order = sorted(range(l2[n]), key=lambda j: (d[i, j].item(), j))[:K]
            idx[n, i, :len(order)] = torch.tensor(order, dtype=torch.int64)
            dists[n, i, :len(order)] = d[i, order]
    return dists, idx


def grid_points(shape, seed, dtype=torch.float32, span=3):
    """Integer coordinates in [-span, span]: exact distances, many ties."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-span, span + 1, shape, generator=g).to(dtype)


def random_lengths(N, P, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, P + 1, (N,), generator=g)


# --- knn_points ------------------------------------------------------------------------------


@given(N=st.integers(1, 3), P1=st.integers(0, 9), P2=st.integers(0, 11), D=st.integers(1, 8), K=st.integers(1, 13),
       norm=st.sampled_from([1, 2]), ragged1=st.booleans(), ragged2=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.float64]), seed=st.integers(0, 2**16))
def test_knn_points_matches_oracle_exactly(N, P1, P2, D, K, norm, ragged1, ragged2, dtype, seed):
    p1, p2 = grid_points((N, P1, D), seed, dtype), grid_points((N, P2, D), seed + 1, dtype)
    l1 = random_lengths(N, P1, seed + 2) if ragged1 else None
    l2 = random_lengths(N, P2, seed + 3) if ragged2 else None
    out = knn_points(p1, p2, lengths1=l1, lengths2=l2, K=K, norm=norm)
    ref_d, ref_i = oracle_knn(p1, p2, l1, l2, K, norm)
    assert out.dists.dtype == dtype and out.idx.dtype == torch.int64 and out.knn is None
    assert torch.equal(out.idx, ref_i)
    assert torch.equal(out.dists, ref_d.to(dtype))  # integer distances: exact in both dtypes


@pytest.mark.parametrize("device,backend", KNN_BACKENDS)
@given(N=st.integers(1, 3), P1=st.integers(1, 30), P2=st.integers(1, 40), K=st.integers(1, 36),
       ragged=st.booleans(), dup=st.integers(0, 8), seed=st.integers(0, 2**16))
def test_fast_path_is_exact_on_every_backend(device, backend, N, P1, P2, K, ragged, dup, seed):
    """D = 3, norm = 2, float32: the kernel path (per backend) equals the chunked torch search bit for bit."""
    g = torch.Generator().manual_seed(seed)
    p1, p2 = torch.rand(N, P1, 3, generator=g) * 2 - 1, torch.rand(N, P2, 3, generator=g) * 2 - 1
    if dup and P2 > 1:  # exact ties, queries on points
        p2[:, -min(dup, P2 - 1):] = p2[:, :min(dup, P2 - 1)].clone()
        p1[:, :min(dup, P1, P2)] = p2[:, :min(dup, P1, P2)].clone()
    l1, l2 = (random_lengths(N, P1, seed), random_lengths(N, P2, seed + 1)) if ragged else (None, None)
    dev = [t if t is None else t.to(device) for t in (p1, p2, l1, l2)]
    out = knn_points(*dev, K=K, backend=backend)
    with mock.patch.object(pytorch3d_ops, "_use_kernel", lambda *args: False):
        slow = knn_points(p1, p2, l1, l2, K=K)
    assert torch.equal(out.idx.cpu(), slow.idx)
    assert torch.equal(out.dists.cpu(), slow.dists)


@pytest.mark.parametrize("device,backend", KNN_BACKENDS)
@given(N=st.integers(1, 3), P1=st.integers(0, 12), P2=st.integers(0, 40), K=st.integers(1, 34),
       ragged1=st.booleans(), ragged2=st.booleans(), seed=st.integers(0, 2**16))
def test_fast_path_matches_oracle_on_grid(device, backend, N, P1, P2, K, ragged1, ragged2, seed):
    """D = 3, norm = 2, float32 through the kernels (ragged: one call per cloud): exact, ties by index."""
    p1, p2 = grid_points((N, P1, 3), seed), grid_points((N, P2, 3), seed + 1, span=2)
    l1 = random_lengths(N, P1, seed + 2) if ragged1 else None
    l2 = random_lengths(N, P2, seed + 3) if ragged2 else None
    dev = [t if t is None else t.to(device) for t in (p1, p2, l1, l2)]
    out = knn_points(*dev, K=K, backend=backend)
    ref_d, ref_i = oracle_knn(p1, p2, l1, l2, K, 2)
    assert torch.equal(out.idx.cpu(), ref_i) and torch.equal(out.dists.cpu(), ref_d.float())


@pytest.mark.parametrize("device,backend", KNN_BACKENDS)
@pytest.mark.parametrize("P1,P2,K,l1,l2", [(5, 40, 32, [5, 2], [40, 33]), (5, 40, 33, [5, 2], [40, 33]),
                                           (7, 32, 32, None, [32, 31]), (1, 1, 1, None, None),
                                           (3, 9, 40, [0, 3], [9, 0])])
def test_fast_path_edge_shapes(device, backend, P1, P2, K, l1, l2):
    p1, p2 = grid_points((2, P1, 3), P1), grid_points((2, P2, 3), P2, span=2)
    l1, l2 = (None if x is None else torch.tensor(x) for x in (l1, l2))
    out = knn_points(*(t if t is None else t.to(device) for t in (p1, p2, l1, l2)), K=K, backend=backend)
    ref_d, ref_i = oracle_knn(p1, p2, l1, l2, K, 2)
    assert torch.equal(out.idx.cpu(), ref_i) and torch.equal(out.dists.cpu(), ref_d.float())


def test_kernel_path_is_taken_where_it_applies():
    calls = []

    def spy(q, p, K, **kwargs):
        calls.append((tuple(q.shape), tuple(p.shape), K))
        backends.append(kwargs.get("backend"))
        return real(q, p, K, **kwargs)

    backends = []

    real = ops.knn
    p1, p2 = torch.rand(2, 6, 3), torch.rand(2, 9, 3)
    with mock.patch.object(ops, "knn", spy):
        knn_points(p1, p2, K=4)
        assert calls == [((2, 6, 3), (2, 9, 3), 4)]
        calls.clear()
        knn_points(p1, p2, lengths1=torch.tensor([6, 2]), lengths2=torch.tensor([3, 9]), K=4)
        assert calls == [((1, 6, 3), (1, 3, 3), 3), ((1, 2, 3), (1, 9, 3), 4)]  # one call per cloud
        calls.clear()
        knn_points(p1, p2, K=40)  # K > P2: the kernel gets min(K, P2)
        assert calls == [((2, 6, 3), (2, 9, 3), 9)]
        calls.clear()
        knn_points(torch.rand(1, 4, 3), torch.rand(1, 40, 3), K=33)  # > 32 neighbours: torch
        knn_points(p1, p2, K=4, norm=1)
        knn_points(p1.double(), p2.double(), K=4)
        knn_points(torch.rand(2, 6, 4), torch.rand(2, 9, 4), K=4)
        assert calls == []
        knn_points(p1, p2, K=4, backend="torch")
    assert backends[:4] == [None] * 4 and backends[-1] == "torch"  # the requested backend reaches ops.knn


def test_chunked_search_matches_unchunked(monkeypatch):
    p1, p2 = grid_points((2, 37, 5), 0), grid_points((2, 23, 5), 1)
    l2 = torch.tensor([23, 7])
    whole = knn_points(p1, p2, lengths2=l2, K=6)
    monkeypatch.setattr(pytorch3d_ops, "CHUNK_ELEMENTS", 50)  # 1 query row per chunk
    chunked = knn_points(p1, p2, lengths2=l2, K=6)
    assert torch.equal(whole.idx, chunked.idx) and torch.equal(whole.dists, chunked.dists)


def test_padding_as_pytorch3d_documents():
    p1, p2 = torch.rand(3, 5, 2), torch.rand(3, 4, 2)
    out = knn_points(p1, p2, lengths1=torch.tensor([5, 3, 0]), lengths2=torch.tensor([4, 2, 4]), K=6,
                     return_nn=True)
    assert out.dists.shape == (3, 5, 6) and out.knn.shape == (3, 5, 6, 2)
    assert bool((out.dists[:, :, 4:] == 0).all() and (out.idx[:, :, 4:] == 0).all())  # K > P2
    assert bool((out.dists[1, :, 2:] == 0).all() and (out.idx[1, :, 2:] == 0).all())  # lengths2 = 2
    assert bool((out.dists[1, 3:] == 0).all() and (out.idx[1, 3:] == 0).all())  # rows past lengths1
    assert bool((out.dists[2] == 0).all() and (out.idx[2] == 0).all())  # lengths1 = 0
    # knn = knn_gather(p2, idx, lengths2): it knows nothing of lengths1, so padded rows hold p2[n, 0]
    assert torch.equal(out.knn, knn_gather(p2, out.idx, torch.tensor([4, 2, 4])))
    assert torch.equal(out.knn[2, :, :4], p2[2, 0].expand(5, 4, 2))
    assert bool((out.knn[1, :, 2:] == 0).all() and (out.dists[0, :, :4] > 0).all())
    assert torch.equal(out.knn[0, :, :4], p2[0][out.idx[0, :, :4]])
    empty = knn_points(torch.rand(2, 0, 3), torch.rand(2, 4, 3), K=2)
    assert empty.dists.shape == (2, 0, 2)
    no_points = knn_points(torch.rand(1, 3, 3), torch.rand(1, 0, 3), K=2, return_nn=True)
    assert bool((no_points.dists == 0).all() and (no_points.idx == 0).all()) and no_points.knn.shape == (1, 3, 2, 3)


@pytest.mark.parametrize("norm", [1, 2])
@pytest.mark.parametrize("D", [1, 3, 6])
def test_gradcheck_both_point_sets_float64(norm, D):
    g = torch.Generator().manual_seed(D + norm)
    p1 = torch.rand(2, 5, D, generator=g, dtype=torch.float64, requires_grad=True)
    p2 = torch.rand(2, 6, D, generator=g, dtype=torch.float64, requires_grad=True)
    l1, l2 = torch.tensor([5, 3]), torch.tensor([6, 2])

    def f(a, b):
        out = knn_points(a, b, lengths1=l1, lengths2=l2, K=4, norm=norm, return_nn=True)
        return out.dists, out.knn

    assert torch.autograd.gradcheck(f, (p1, p2))
    out = knn_points(p1, p2, lengths1=l1, lengths2=l2, K=4, norm=norm)
    ga, gb = torch.autograd.grad(out.dists.sum(), (p1, p2))
    assert bool((ga[1, 3:] == 0).all()) and bool((gb[1, 2:] == 0).all())  # padding: no gradient
    assert bool((ga[0] != 0).any()) and bool((gb[0] != 0).any())


def expected_grads(p1, p2, idx, valid, upstream, norm):
    """pytorch3d's backward formula in float64: d/dp1 = 2 g (p1 - p2[j]) or g sign (sign = -1 at 0)."""
    ga, gb = torch.zeros_like(p1, dtype=torch.float64), torch.zeros_like(p2, dtype=torch.float64)
    N, P1, K = idx.shape
    for n, i, k in valid.nonzero().tolist():
        j = idx[n, i, k]
        diff = p1[n, i].double() - p2[n, j].double()
        term = 2 * upstream[n, i, k].double() * diff if norm == 2 else upstream[n, i, k].double() * torch.where(
            diff > 0, 1.0, -1.0).double()
        ga[n, i] += term
        gb[n, j] -= term
    return ga, gb


@pytest.mark.parametrize("device,backend,norm,D", [pytest.param(*c.values, 2, 3, id=c.id) for c in KNN_BACKENDS]
                         + [("cpu", None, 1, 4), ("cpu", None, 1, 3), ("cpu", None, 2, 7)])
def test_gradients_match_pytorch3d_formula(device, backend, norm, D):
    p1 = grid_points((2, 9, D), 3).to(device).requires_grad_()
    p2 = grid_points((2, 7, D), 4).to(device).requires_grad_()
    l1, l2 = torch.tensor([9, 4], device=device), torch.tensor([7, 3], device=device)
    out = knn_points(p1, p2, lengths1=l1, lengths2=l2, K=5, norm=norm, backend=backend)
    upstream = torch.randn(out.dists.shape, generator=torch.Generator().manual_seed(5)).to(device)
    ga, gb = torch.autograd.grad((out.dists * upstream).sum(), (p1, p2))
    valid = ((torch.arange(9)[None, :, None] < l1.cpu()[:, None, None])
             & (torch.arange(5)[None, None] < l2.cpu()[:, None, None]))
    ea, eb = expected_grads(p1.detach().cpu(), p2.detach().cpu(), out.idx.cpu(), valid, upstream.cpu(), norm)
    # float32 sums of <= 5 * 9 terms of size <= 2 * 4 * |g|: a few ulps of 1e2
    torch.testing.assert_close(ga.cpu().double(), ea, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(gb.cpu().double(), eb, atol=1e-4, rtol=1e-5)


def test_return_sorted_version_and_sorted_order():
    p1, p2 = torch.rand(2, 20, 5), torch.rand(2, 30, 5)
    ref = knn_points(p1, p2, K=7)
    assert bool((ref.dists[..., 1:] >= ref.dists[..., :-1]).all())
    for version in (-1, 0, 1, 2, 3):
        out = knn_points(p1, p2, K=7, version=version, return_sorted=False)
        # unsorted output may come in any order: the same neighbour sets
        assert torch.equal(out.idx.sort(-1).values, ref.idx.sort(-1).values)
        assert torch.equal(out.dists.sort(-1).values, ref.dists.sort(-1).values)


def test_norm_1_and_2_differ_as_defined():
    p1, p2 = torch.tensor([[[0.0, 0.0]]]), torch.tensor([[[3.0, 0.0], [2.0, 2.0]]])
    l2 = knn_points(p1, p2, K=2, norm=2)
    l1 = knn_points(p1, p2, K=2, norm=1)
    assert l2.idx.tolist() == [[[1, 0]]] and l2.dists.tolist() == [[[8.0, 9.0]]]
    assert l1.idx.tolist() == [[[0, 1]]] and l1.dists.tolist() == [[[3.0, 4.0]]]


def test_half_precision_is_computed_in_float32():
    p1, p2 = torch.rand(1, 8, 3), torch.rand(1, 9, 3)
    out = knn_points(p1.half(), p2.half(), K=3)
    ref = knn_points(p1.half().float(), p2.half().float(), K=3)
    assert out.dists.dtype == torch.float16 and torch.equal(out.idx, ref.idx)


@pytest.mark.parametrize("kwargs,exc,words", [
    (dict(p1=torch.rand(2, 3, 3), p2=torch.rand(3, 3, 3)), ValueError, "batch size"),
    (dict(p1=torch.rand(2, 3, 3), p2=torch.rand(2, 3, 2)), ValueError, "point dimension"),
    (dict(norm=3), ValueError, "norm"),
    (dict(K=0), ValueError, "K"),
    (dict(K=True), TypeError, "K"),
    (dict(lengths1=torch.tensor([1, 4])), ValueError, "lengths1"),
    (dict(lengths2=torch.tensor([1.0, 2.0])), TypeError, "lengths2"),
    (dict(lengths2=torch.tensor([1])), ValueError, "lengths2"),
    (dict(p1=torch.full((2, 3, 3), float("nan"))), ValueError, "finite"),
    (dict(p2=torch.rand(2, 3, 3).double()), TypeError, "dtype"),
    (dict(backend="gpu"), ValueError, "backend"),
    (dict(return_nn=1), TypeError, "return_nn"),
])
def test_knn_points_bad_inputs(kwargs, exc, words):
    args = dict(p1=torch.rand(2, 3, 3), p2=torch.rand(2, 3, 3)) | kwargs
    with pytest.raises(exc, match=words):
        knn_points(**args)


def test_knn_gather_with_lengths():
    g = torch.Generator().manual_seed(7)
    x = torch.rand(3, 6, 4, generator=g, requires_grad=True)
    idx = torch.randint(0, 6, (3, 5, 4), generator=g)
    lengths = torch.tensor([6, 2, 0])
    out = knn_gather(x, idx, lengths)
    assert out.shape == (3, 5, 4, 4)
    for n in range(3):
        for k in range(4):
            want = x[n, idx[n, :, k]] if k < lengths[n] else torch.zeros(5, 4)
            assert torch.equal(out[n, :, k], want)
    out.sum().backward()
    assert x.grad.sum().item() == pytest.approx(4 * 5 * (4 + 2 + 0))  # U * L * kept slots per cloud
    padded = knn_gather(x, torch.full((3, 2, 2), -1), None)  # older code's -1 padding
    assert bool((padded == 0).all())
    with pytest.raises(ValueError, match="idx"):
        knn_gather(x, torch.full((3, 2, 2), 6))


# --- nerfacc -------------------------------------------------------------------------------


def oracle_slab(o, d, boxes):
    """float64 slab test: (t_min, t_max, hit) of each ray in each box; touching counts, exit must be > 0."""
    o, d, boxes = o.double(), d.double(), boxes.double()
    t1 = (boxes[None, :, :3] - o[:, None]) / d[:, None]
    t2 = (boxes[None, :, 3:] - o[:, None]) / d[:, None]
    t_min = torch.minimum(t1, t2).amax(-1)
    t_max = torch.maximum(t1, t2).amin(-1)
    return t_min, t_max, (t_max >= t_min) & (t_max > 0)


def test_ray_aabb_intersect_vs_slab_oracle():
    g = torch.Generator().manual_seed(0)
    o = torch.randn(400, 3, generator=g) * 2
    d = torch.nn.functional.normalize(torch.randn(400, 3, generator=g), dim=-1)
    boxes = torch.tensor([[-1.0, -1.0, -1.0, 1.0, 1.0, 1.0], [-0.5, 0.0, -2.0, 1.5, 0.7, 0.1]])
    t_min, t_max, hit = nerfacc.ray_aabb_intersect(o, d, boxes, near_plane=0.2, far_plane=3.0, miss_value=-7.0)
    ref_min, ref_max, ref_hit = oracle_slab(o, d, boxes)
    assert t_min.shape == (400, 2) and hit.dtype == torch.bool
    assert torch.equal(hit, ref_hit) and 20 < int(hit.sum()) < 780
    torch.testing.assert_close(t_min[hit].double(), ref_min[hit].clamp(min=0.2), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(t_max[hit].double(), ref_max[hit].clamp(max=3.0), atol=1e-5, rtol=1e-5)
    assert bool((t_min[~hit] == -7.0).all() and (t_max[~hit] == -7.0).all())


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_ray_aabb_cube_kernel_matches_torch_slab(backend):
    if backend not in ops.available_backends("cpu"):
        pytest.skip("C++ extension not built")
    g = torch.Generator().manual_seed(1)
    o = torch.randn(300, 3, generator=g) * 1.5
    d = torch.randn(300, 3, generator=g)
    d[:40, 0] = 0.0  # axis-parallel rays
    d[40:60, 1] = -0.0
    o[60:70] = torch.tensor([0.0, 1.0, 2.0])  # on a face plane
    boxes = torch.tensor([[-1.0] * 3 + [1.0] * 3, [-0.25] * 3 + [2.0] * 3])
    with mock.patch.object(ops, "ray_box", wraps=ops.ray_box) as spy:
        t_min, t_max, hit = nerfacc.ray_aabb_intersect(o, d, boxes, backend=backend)
    assert spy.call_count == 2  # cubes go through gpavatar.ops.ray_box
    ref_min, ref_max, ref_hit = nerfacc._slab_test(o, d, boxes[:, :3], boxes[:, 3:])
    assert torch.equal(hit, ref_hit)
    inf = torch.full_like(t_min, float("inf"))
    assert torch.equal(t_min, torch.where(ref_hit, ref_min, inf))
    assert torch.equal(t_max, torch.where(ref_hit, ref_max, inf))


def test_ray_aabb_intersect_gpavatar_usage():
    o = torch.tensor([[0.0, 0.0, -5.0], [0.0, 0.0, 0.0], [0.0, 3.0, -5.0], [0.0, 0.0, 5.0]])
    d = torch.tensor([[0.0, 0.0, 1.0]] * 4)
    t_min, t_max, hit = nerfacc.ray_aabb_intersect(o, d, torch.tensor([[-1.0, -1, -1, 1, 1, 1]]), miss_value=-1.0)
    assert hit[:, 0].tolist() == [True, True, False, False]  # the last ray exits behind its origin
    assert t_min[:, 0].tolist() == [4.0, -1.0, -1.0, -1.0] and t_max[:, 0].tolist() == [6.0, 1.0, -1.0, -1.0]
    t_min, t_max, hit = nerfacc.ray_aabb_intersect(o, d, torch.tensor([[-1.0, -1, -1, 1, 1, 1]]), near_plane=0.0)
    assert t_min[:2, 0].tolist() == [4.0, 0.0] and t_max[2, 0] == float("inf")  # default miss_value: inf


def test_render_weight_from_alpha_doc_values_and_formula():
    alphas = torch.tensor([[0.4, 0.8, 0.1], [0.8, 0.1, 0.0]])
    weights, trans = nerfacc.render_weight_from_alpha(alphas)
    torch.testing.assert_close(weights, torch.tensor([[0.4, 0.48, 0.012], [0.8, 0.02, 0.0]]))
    torch.testing.assert_close(trans, torch.tensor([[1.0, 0.6, 0.12], [1.0, 0.2, 0.18]]))
    g = torch.Generator().manual_seed(2)
    a = torch.rand(4, 9, generator=g, dtype=torch.float64)
    a[0, 3], a[1, 0], a[2, 5] = 1.0, 0.0, 1.0  # opaque and empty samples
    w, _ = nerfacc.render_weight_from_alpha(a)
    for r in range(4):
        for i in range(9):
            t = 1.0
            for j in range(i):
                t *= 1 - a[r, j].item()
            assert w[r, i].item() == pytest.approx(a[r, i].item() * t, abs=1e-14)
    assert torch.autograd.gradcheck(lambda x: nerfacc.render_weight_from_alpha(x), (a.requires_grad_(),))
    prefix = torch.rand(2, 3, generator=g)
    w_prefix, t_prefix = nerfacc.render_weight_from_alpha(alphas, prefix_trans=prefix)
    torch.testing.assert_close(t_prefix, trans * prefix)
    torch.testing.assert_close(w_prefix, weights * prefix)


def test_scans_doc_values():
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    assert nerfacc.exclusive_prod(x).tolist() == [[1.0, 1.0, 2.0, 6.0]]
    assert nerfacc.inclusive_prod(x).tolist() == [[1.0, 2.0, 6.0, 24.0]]
    assert nerfacc.exclusive_sum(x).tolist() == [[0.0, 1.0, 3.0, 6.0]]
    assert nerfacc.inclusive_sum(x).tolist() == [[1.0, 3.0, 6.0, 10.0]]


def test_accumulate_along_rays_batched_and_flattened():
    g = torch.Generator().manual_seed(3)
    w = torch.rand(5, 7, generator=g, dtype=torch.float64, requires_grad=True)
    values = torch.rand(5, 7, 4, generator=g, dtype=torch.float64, requires_grad=True)
    out = nerfacc.accumulate_along_rays(w, values)
    torch.testing.assert_close(out, torch.einsum("rs,rsc->rc", w, values))
    assert torch.equal(nerfacc.accumulate_along_rays(w, None), w.sum(-1, keepdim=True))
    assert torch.autograd.gradcheck(nerfacc.accumulate_along_rays, (w, values))
    ray_indices = torch.tensor([0, 0, 2, 2, 2, 3])
    flat_w, flat_v = w.detach()[0, :6], values.detach()[0, :6]
    flat = nerfacc.accumulate_along_rays(flat_w, flat_v, ray_indices=ray_indices, n_rays=5)
    expect = torch.zeros(5, 4, dtype=torch.float64)
    for s, r in enumerate(ray_indices.tolist()):
        expect[r] += flat_w[s] * flat_v[s]
    torch.testing.assert_close(flat, expect)


def oracle_importance(t, c, n, bias):
    """nerfacc 0.5.3's CDF inversion and interval construction, one ray, one sample at a time, float64."""
    E = len(t)
    step = (c[-1] - c[0]) / n
    samples = []
    for i in range(n):
        u = c[0] + (i + bias) * step
        p = next((j for j in range(E - 1) if c[j] > u), E - 1)  # cdf[p - 1] <= u < cdf[p]
        lo, hi = max(p - 1, 0), p
        if c[hi] - c[lo] < 1e-10:
            samples.append((t[lo] + t[hi]) / 2)
        else:
            samples.append(t[lo] + (u - c[lo]) * (t[hi] - t[lo]) / (c[hi] - c[lo]))
    edges = [max(samples[0] - (samples[1] - samples[0]) / 2, t[0])]
    edges += [(a + b) / 2 for a, b in zip(samples[:-1], samples[1:])]
    edges.append(min(samples[-1] + (samples[-1] - samples[-2]) / 2, t[-1]))
    return edges, samples


def test_importance_sampling_doc_example():
    for vals, cdfs, edges, samples in [([0.0, 1.0], [0.0, 0.5], [0.0, 0.5, 1.0], [0.25, 0.75]),
                                       ([0.0, 1.0, 2.0], [0.0, 0.5, 1.0], [0.0, 1.0, 2.0], [0.5, 1.5])]:
        iv, s = nerfacc.importance_sampling(nerfacc.RayIntervals(vals=torch.tensor([vals])), torch.tensor([cdfs]), 2)
        assert iv.vals.tolist() == [edges] and s.vals.tolist() == [samples]


@given(R=st.integers(1, 4), E=st.integers(1, 12), n=st.integers(2, 9), zeros=st.integers(0, 6),
       seed=st.integers(0, 2**16))
def test_importance_sampling_vs_loop_oracle(R, E, n, zeros, seed):
    g = torch.Generator().manual_seed(seed)
    t = torch.sort(torch.rand(R, E, generator=g) * 4, dim=-1).values
    w = torch.rand(R, E, generator=g)
    w[:, :min(zeros, E)] = 0.0  # flat stretches of the CDF
    c = torch.cumsum(w, -1) / w.sum(-1, keepdim=True).clamp_min(1e-6)
    iv, s = nerfacc.importance_sampling(nerfacc.RayIntervals(vals=t), c, n)
    assert iv.vals.shape == (R, n + 1) and s.vals.shape == (R, n)
    for r in range(R):
        edges, samples = oracle_importance(t[r].double().tolist(), c[r].double().tolist(), n, 0.5)
        # float32 arithmetic on values <= 4: a few ulps, amplified by the slope (t_hi - t_lo) / (c_hi - c_lo)
        torch.testing.assert_close(s.vals[r].double(), torch.tensor(samples, dtype=torch.float64), atol=2e-4, rtol=0)
        torch.testing.assert_close(iv.vals[r].double(), torch.tensor(edges, dtype=torch.float64), atol=2e-4, rtol=0)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_importance_sampling_reproduces_gpavatar_fine_depths(backend):
    if backend not in ops.available_backends("cpu"):
        pytest.skip("C++ extension not built")
    g = torch.Generator().manual_seed(4)
    t0 = torch.rand(64, generator=g) + 1.0
    coarse = ops.stratified_depths(t0, t0 + 2.0, 32)
    weights = torch.rand(64, 32, generator=g) ** 4
    cdf = torch.cumsum(weights + 1e-5, -1) / (weights + 1e-5).sum(-1, keepdim=True)
    intervals, _ = nerfacc.importance_sampling(nerfacc.RayIntervals(vals=coarse), cdf, 32)
    fine = (intervals.vals[:, 1:] + intervals.vals[:, :-1]) * 0.5
    torch.testing.assert_close(fine, ops.importance_depths(coarse, weights, 32, backend=backend), atol=1e-5, rtol=0)


def test_importance_sampling_stratified_shares_one_offset_per_ray():
    t = torch.linspace(0.0, 1.0, 11).expand(3, 11)
    c = t.clone()  # uniform density: samples are the targets u themselves
    _, s = nerfacc.importance_sampling(nerfacc.RayIntervals(vals=t), c, 5, stratified=True,
                                       generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(s.vals.diff(dim=-1), torch.full((3, 4), 0.2), atol=1e-6, rtol=0)
    offsets = s.vals[:, 0] / 0.2
    assert bool(((offsets >= 0) & (offsets < 1)).all()) and len(set(offsets.tolist())) == 3
    _, again = nerfacc.importance_sampling(nerfacc.RayIntervals(vals=t), c, 5, stratified=True,
                                           generator=torch.Generator().manual_seed(0))
    assert torch.equal(s.vals, again.vals)


def test_packed_inputs_are_refused_clearly():
    with pytest.raises(NotImplementedError, match="batched"):
        nerfacc.render_weight_from_alpha(torch.rand(5), ray_indices=torch.zeros(5, dtype=torch.int64))
    with pytest.raises(NotImplementedError, match="packed"):
        nerfacc.importance_sampling(nerfacc.RayIntervals(vals=torch.rand(2, 3)), torch.rand(2, 3), torch.tensor([2, 3]))
    with pytest.raises(NotImplementedError, match="packed"):
        nerfacc.exclusive_prod(torch.rand(5), packed_info=torch.tensor([[0, 5]]))
    with pytest.raises(ValueError, match="non-decreasing"):
        nerfacc.importance_sampling(nerfacc.RayIntervals(vals=torch.rand(1, 3)), torch.tensor([[0.5, 0.2, 1.0]]), 2)


# --- install() -------------------------------------------------------------------------------


def run_python(code: str, pythonpath: list[str] = ()) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([*map(str, pythonpath), str(ROOT)])
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


INSTALL_PROBE = """
import json, warnings
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import gpavatar.compat as compat
    first, second = compat.install(), compat.install()
messages = [str(w.message) for w in caught if issubclass(w.category, compat.CompatWarning)]
import nerfacc, pytorch3d.ops
from pytorch3d.ops import knn_points
try:
    import pytorch3d.renderer
    missing = None
except ModuleNotFoundError as error:
    missing = str(error)
print(json.dumps(dict(first=first, second=second, messages=messages, missing=missing,
                      knn=getattr(knn_points, "__module__", repr(knn_points)),
                      nerfacc=getattr(nerfacc.importance_sampling, "__module__", None))))
"""


def test_install_substitutes_missing_packages_once():
    import importlib.util

    if importlib.util.find_spec("pytorch3d") or importlib.util.find_spec("nerfacc"):
        pytest.skip("pytorch3d or nerfacc is installed here")
    result = run_python(INSTALL_PROBE)
    assert result.returncode == 0, result.stderr
    got = json.loads(result.stdout.strip().splitlines()[-1])
    assert got["first"] == ["pytorch3d.ops", "nerfacc"] and got["second"] == []  # idempotent
    assert len(got["messages"]) == 1 and "pytorch3d.ops" in got["messages"][0] and "nerfacc" in got["messages"][0]
    assert got["knn"] == "gpavatar.compat.pytorch3d_ops" and got["nerfacc"] == "gpavatar.compat.nerfacc"
    assert "pytorch3d.renderer" in got["missing"] and "gpavatar.compat" in got["missing"]


def test_install_leaves_an_installed_package_alone(tmp_path):
    fake = tmp_path / "pytorch3d"
    fake.mkdir()
    (fake / "__init__.py").write_text("")
    (fake / "ops.py").write_text("def knn_points(*args, **kwargs):\n    return 'the real one'\n")
    (fake / "renderer.py").write_text("")
    result = run_python(INSTALL_PROBE, [tmp_path])
    assert result.returncode == 0, result.stderr
    got = json.loads(result.stdout.strip().splitlines()[-1])
    assert got["first"] == ["nerfacc"] and got["second"] == [] and got["missing"] is None
    assert got["knn"] == "pytorch3d.ops"  # the installed package wins
    assert len(got["messages"]) == 1 and "pytorch3d" not in got["messages"][0]


def test_docs_recipe_runs():
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "compat.md").read_text(), flags=re.S)
    recipe = next(b for b in blocks if "install()" in b)
    result = run_python(recipe + "\nprint('recipe ok')\n")
    assert result.returncode == 0 and "recipe ok" in result.stdout, result.stderr
