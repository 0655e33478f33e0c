"""knn: every backend against the brute-force reference, gradients, opcheck, bad inputs."""

import pytest
import torch
from conftest import BACKEND_CASES
from hypothesis import given
from hypothesis import strategies as st

import gpavatar.ops as ops
from _data import make_pef_params, make_points, make_queries
from gpavatar.ops.reference import knn_reference


def naive_knn(queries, points, K):
    """Independent oracle: python sort by (distance, index) in float32 arithmetic."""
    B, M, _ = queries.shape
    dist = torch.empty(B, M, K)
    idx = torch.empty(B, M, K, dtype=torch.int64)
    for b in range(B):
        d = ((queries[b, :, None, 0] - points[b, None, :, 0]) ** 2 + (queries[b, :, None, 1] - points[b, None, :, 1]) ** 2) + (
            queries[b, :, None, 2] - points[b, None, :, 2]) ** 2
        for m in range(M):
            order = sorted(range(points.shape[1]), key=lambda i: (d[m, i].item(), i))[:K]
            idx[b, m] = torch.tensor(order)
            dist[b, m] = d[m, order]
    return dist, idx


def test_reference_matches_naive_oracle():
    pts = make_points(2, 40, duplicates=10)
    q = make_queries(2, 30, pts, on_points=5)
    d, i = knn_reference(q, pts, 7)
    nd, ni = naive_knn(q, pts, 7)
    assert torch.equal(i, ni)
    assert torch.equal(d, nd)


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
@given(B=st.integers(1, 3), M=st.integers(1, 70), P=st.integers(1, 90), K=st.integers(1, 32),
       dup=st.integers(0, 20), on=st.integers(0, 5), far=st.integers(0, 3), seed=st.integers(0, 2**16))
def test_knn_matches_reference(device, backend, B, M, P, K, dup, on, far, seed):
    K = min(K, P)
    pts = make_points(B, P, seed=seed, duplicates=dup, device=device)
    q = make_queries(B, M, pts, seed=seed + 1, on_points=on, far=far, device=device)
    dist, idx = ops.knn(q, pts, K, backend=backend)
    ref_dist, ref_idx = knn_reference(q, pts, K)
    # Same arithmetic, same tie rule: bit-exact.
    assert torch.equal(idx, ref_idx)
    assert torch.equal(dist, ref_dist)


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
@pytest.mark.parametrize("B,M,P,K", [(1, 1, 1, 1), (1, 1, 5023, 8), (2, 33, 17, 17), (3, 5, 1030, 32), (1, 300, 8, 8)])
def test_knn_edge_shapes(device, backend, B, M, P, K):
    pts = make_points(B, P, seed=P, duplicates=P // 4, device=device)
    q = make_queries(B, M, pts, seed=M, on_points=M // 3, device=device)
    dist, idx = ops.knn(q, pts, K, backend=backend)
    ref_dist, ref_idx = knn_reference(q, pts, K)
    assert torch.equal(idx, ref_idx) and torch.equal(dist, ref_dist)
    assert bool((dist[..., 1:] >= dist[..., :-1]).all())


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_knn_ties_keep_lower_index(device, backend):
    # All points identical: every distance ties, the answer is 0..K-1.
    pts = torch.full((1, 50, 3), 0.25, device=device)
    q = make_queries(1, 9, device=device)
    _, idx = ops.knn(q, pts, 6, backend=backend)
    assert torch.equal(idx.cpu(), torch.arange(6).expand(1, 9, 6))
    # Query on a point that appears 3 times: those three come first, in index order.
    pts = make_points(1, 30, seed=3)
    pts[0, [4, 11, 27]] = pts[0, 20].clone()
    d, idx = ops.knn(pts[:, 20:21].to(device), pts.to(device), 4, backend=backend)
    assert idx[0, 0, :4].tolist()[:4] == [4, 11, 20, 27]
    assert d[0, 0, :4].tolist() == [0.0] * 4


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_knn_empty(device, backend):
    pts = make_points(2, 10, device=device)
    dist, idx = ops.knn(torch.zeros(2, 0, 3, device=device), pts, 3, backend=backend)
    assert dist.shape == (2, 0, 3) and idx.shape == (2, 0, 3) and idx.dtype == torch.int64
    dist, idx = ops.knn(torch.zeros(0, 4, 3, device=device), torch.zeros(0, 10, 3, device=device), 3, backend=backend)
    assert dist.shape == (0, 4, 3)


@pytest.mark.parametrize("device,backend", BACKEND_CASES + [pytest.param("cpu", "torch", id="cpu-torch")])
def test_knn_backward_matches_reference(device, backend):
    pts = make_points(2, 40, seed=5, device=device)
    q = make_queries(2, 25, pts, seed=6, device=device)
    grad = torch.randn(2, 25, 6, generator=torch.Generator().manual_seed(0)).to(device)
    q1, p1 = q.clone().requires_grad_(), pts.clone().requires_grad_()
    dist, _ = ops.knn(q1, p1, 6, backend=backend)
    gq, gp = torch.autograd.grad(dist, (q1, p1), grad)
    q2, p2 = q.clone().requires_grad_(), pts.clone().requires_grad_()
    ref, _ = knn_reference(q2, p2, 6)
    rq, rp = torch.autograd.grad(ref, (q2, p2), grad)
    # Same formula 2 (q - p) g; only the summation order of repeated neighbours differs.
    torch.testing.assert_close(gq, rq, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gp, rp, rtol=1e-5, atol=1e-6)


def test_knn_reference_gradcheck_float64():
    pts = make_points(2, 12, seed=7, dtype=torch.float64).requires_grad_()
    q = make_queries(2, 6, seed=8, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: ops.knn(a, b, 4, backend="torch").dist2, (q, pts))


def test_knn_float64_stays_float64_on_torch_backend_and_float32_on_fused():
    pts = make_points(1, 20, dtype=torch.float64)
    q = make_queries(1, 5, dtype=torch.float64)
    assert ops.knn(q, pts, 3, backend="torch").dist2.dtype == torch.float64
    for name in ops.available_backends("cpu"):
        if name != "torch":
            assert ops.knn(q, pts, 3, backend=name).dist2.dtype == torch.float32


def test_knn_half_inputs_are_computed_in_float32():
    pts = make_points(1, 50, seed=9).half()
    q = make_queries(1, 20, seed=10).half()
    dist, idx = ops.knn(q, pts, 5)
    ref_dist, ref_idx = knn_reference(q.float(), pts.float(), 5)
    assert torch.equal(idx, ref_idx) and torch.equal(dist, ref_dist)


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_knn_opcheck(device, backend):
    op = torch.ops.gpavatar.knn if backend in ("cpu", "cuda") else torch.ops.gpavatar.knn_triton
    pts = make_points(2, 30, device=device)
    q = make_queries(2, 20, device=device)
    torch.library.opcheck(op, (q, pts, 5))
    torch.library.opcheck(op, (q.clone().requires_grad_(), pts.clone().requires_grad_(), 5))


BAD_INPUTS = [
    # (queries, points, K, exception, words in the message)
    (torch.zeros(4, 3), torch.zeros(1, 5, 3), 2, ValueError, ["queries", "(B, M, 3)"]),
    (torch.zeros(1, 4, 2), torch.zeros(1, 5, 3), 2, ValueError, ["queries", "(B, M, 3)"]),
    (torch.zeros(1, 4, 3), torch.zeros(5, 3), 2, ValueError, ["points", "(B, P, 3)"]),
    (torch.zeros(2, 4, 3), torch.zeros(1, 5, 3), 2, ValueError, ["batch"]),
    (torch.zeros(1, 4, 3, dtype=torch.int32), torch.zeros(1, 5, 3), 2, TypeError, ["queries", "dtype"]),
    (torch.zeros(1, 4, 3), torch.zeros(1, 5, 3), 6, ValueError, ["K", "P = 5"]),
    (torch.zeros(1, 4, 3), torch.zeros(1, 5, 3), 0, ValueError, ["K"]),
    (torch.zeros(1, 4, 3), torch.zeros(1, 5, 3), 2.0, TypeError, ["K", "int"]),
    (torch.zeros(1, 4, 3), torch.zeros(1, 0, 3), 1, ValueError, ["K", "P = 0"]),
    (torch.tensor([[[0.0, float("nan"), 0.0]]]), torch.zeros(1, 5, 3), 2, ValueError, ["queries", "finite"]),
    (torch.zeros(1, 4, 3), torch.full((1, 5, 3), float("inf")), 2, ValueError, ["points", "finite"]),
    ([[0.0, 0.0, 0.0]], torch.zeros(1, 5, 3), 2, TypeError, ["queries", "Tensor"]),
]


@pytest.mark.parametrize("backend", ["torch"] + [b for b in ops.available_backends("cpu") if b != "torch"])
@pytest.mark.parametrize("queries,points,K,exc,words", BAD_INPUTS)
def test_knn_bad_inputs(backend, queries, points, K, exc, words):
    with pytest.raises(exc) as info:
        ops.knn(queries, points, K, backend=backend)
    for word in words:
        assert word in str(info.value)


@pytest.mark.parametrize("backend", ["torch"] + [b for b in ops.available_backends("cpu") if b != "torch"])
@pytest.mark.parametrize("K", [0, -1, 6, 2.0, True])
def test_knn_checks_k_without_validation(backend, K):
    """validate=False skips the value checks (a host sync), not K's: a K outside [1, P] is the same
    error on every backend (Triton had filled the slots past P with index 2^31 - 1)."""
    q, pts = torch.zeros(1, 4, 3), torch.rand(1, 5, 3)
    with pytest.raises((ValueError, TypeError), match="K"):
        ops.knn(q, pts, K, backend=backend, validate=False)
    with pytest.raises((ValueError, TypeError), match="K"):
        ops.knn_blend(q, pts, *make_pef_params(5, Cf=4, H=8, C=4), K=K, backend=backend, validate=False)


def test_knn_bad_backend_and_fused_k_limit():
    pts, q = make_points(1, 40), make_queries(1, 4)
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.knn(q, pts, 3, backend="gpu")
    with pytest.raises(ValueError, match="backend 'cuda' needs CUDA tensors"):
        ops.knn(q, pts, 3, backend="cuda")  # CPU tensors
    # auto falls back to the reference beyond the fused K limit; an explicit fused backend says why it can't.
    assert ops.knn(q, pts, 33).idx.shape == (1, 4, 33)
    if "cpu" in ops.available_backends("cpu"):
        with pytest.raises(ValueError, match="K must be <= 32"):
            ops.knn(q, pts, 33, backend="cpu")


def _cloud(kind, B, P, g):
    """Point clouds that stress a spatial grid: surfaces, flat axes, clusters, offsets."""
    if kind == "uniform":
        return torch.rand(B, P, 3, generator=g) * 1.6 - 0.8
    if kind == "sphere":  # FLAME-like: a surface, most cells empty
        v = torch.randn(B, P, 3, generator=g)
        return 0.7 * v / v.norm(dim=-1, keepdim=True)
    if kind == "plane":  # one flat axis
        pts = torch.rand(B, P, 3, generator=g) - 0.5
        pts[..., 1] = 0.25
        return pts
    if kind == "line":  # two flat axes
        pts = torch.zeros(B, P, 3)
        pts[..., 2] = torch.rand(B, P, generator=g)
        return pts
    if kind == "clusters":  # dense duplicates in a few spots
        centers = torch.rand(B, 4, 3, generator=g)
        return centers[:, torch.randint(0, 4, (P,), generator=g)] + 1e-3 * torch.randint(0, 3, (B, P, 3), generator=g)
    if kind == "identical":
        return torch.full((B, P, 3), -0.3)
    if kind == "offset":  # far from the origin, small extent
        return 1e5 + torch.rand(B, P, 3, generator=g)
    return _degenerate_cloud(kind, B, P, g)


DEGENERATE = ["tiny", "denormal", "one_off", "thin", "equal", "huge", "huge_offset"]


def _degenerate_cloud(kind, B, P, g):
    """Clouds whose extent breaks naive cell arithmetic: spreads from 1e-44 to 1e-8 (cell
    sizes and their inverses over/underflow, squared distances round to 0), denormals, every
    point equal, and coordinates at the validated limit |x| = 1e6."""
    if kind == "tiny":  # a cube of extent 10^-44 .. 10^-8 at 0, 1 or -3e5 (there it collapses to one value)
        spread = 10.0 ** float(torch.empty(()).uniform_(-44, -8, generator=g))
        offset = [0.0, 1.0, -3e5][int(torch.randint(0, 3, (), generator=g))]
        return offset + torch.rand(B, P, 3, generator=g, dtype=torch.float64).mul(spread).float()
    if kind == "denormal":  # multiples of the smallest denormals, many exact ties
        return torch.randint(-3, 4, (B, P, 3), generator=g).float() * 1e-45
    if kind == "one_off":  # all at 0 but the last point, 1e-40 away (issue 13)
        pts = torch.zeros(B, P, 3)
        pts[:, -1, 0] = 1e-40
        return pts
    if kind == "thin":  # a unit square 1e-30 thick: one axis below the grid's resolution
        pts = torch.rand(B, P, 3, generator=g)
        pts[..., 1] = torch.rand(B, P, generator=g) * 1e-30
        return pts
    if kind == "equal":
        return torch.full((B, P, 3), 0.5)
    if kind == "huge":  # the whole valid range
        return (torch.rand(B, P, 3, generator=g, dtype=torch.float64) * 2e6 - 1e6).float()
    if kind == "huge_offset":  # at the edge of the valid range, a few ulps apart
        return 1e6 - 0.0625 * torch.randint(0, 8, (B, P, 3), generator=g).float()
    raise ValueError(kind)


@pytest.mark.parametrize("device,backend", [c for c in BACKEND_CASES if c.values[1] != "triton"])
@given(kind=st.sampled_from(["uniform", "sphere", "plane", "line", "clusters", "identical", "offset"] + DEGENERATE),
       B=st.integers(1, 2), P=st.integers(256, 3000), K=st.integers(1, 32), seed=st.integers(0, 2**16))
def test_knn_large_point_sets(device, backend, kind, B, P, K, seed):
    """Large P: the CPU kernel switches to a grid search; the answer must stay bit-exact."""
    g = torch.Generator().manual_seed(seed)
    pts = _cloud(kind, B, P, g)
    lo, hi = pts.amin(dim=(0, 1)), pts.amax(dim=(0, 1))
    span = (hi - lo).clamp_min(1.0)
    q = lo + (torch.rand(B, 400, 3, generator=g) * 1.4 - 0.2) * span  # around and inside the cloud
    q[:, :10] = pts[:, torch.randint(0, P, (10,), generator=g)]  # on points
    q[:, 10:15] = lo + 50.0 * span * torch.randn(B, 5, 3, generator=g)  # far away
    q[:, 15:20] = (lo + hi) / 2  # the centre (may be empty space)
    q = q.clamp(-1e6, 1e6)  # the valid range (clouds at its edge)
    dist, idx = ops.knn(q.to(device), pts.to(device), K, backend=backend)
    ref_dist, ref_idx = knn_reference(q, pts, K)
    assert torch.equal(idx.cpu(), ref_idx) and torch.equal(dist.cpu(), ref_dist)


@pytest.mark.parametrize("device,backend", [c for c in BACKEND_CASES if c.values[1] != "triton"])
def test_knn_grid_and_brute_force_agree(device, backend, monkeypatch):
    """GPAVATAR_KNN_GRID=0 forces the brute-force kernel; both match the reference exactly."""
    g = torch.Generator().manual_seed(7)
    pts = _cloud("sphere", 2, 1500, g).to(device)
    q = (torch.rand(2, 300, 3, generator=g) * 2 - 1).to(device)
    ref = knn_reference(q.cpu(), pts.cpu(), 8)
    grid = ops.knn(q, pts, 8, backend=backend)
    monkeypatch.setenv("GPAVATAR_KNN_GRID", "0")
    brute = ops.knn(q, pts, 8, backend=backend)
    for out in (grid, brute):
        assert torch.equal(out.idx.cpu(), ref[1]) and torch.equal(out.dist2.cpu(), ref[0])


def _queries_at_scale(pts, M, g):
    """Queries at the cloud's own scale (its extent may be 0 or 1e-44): inside and around it,
    on points, between two points, and a few at unit distance."""
    B, P, _ = pts.shape
    lo, hi = pts.amin(dim=(0, 1)), pts.amax(dim=(0, 1))
    span = hi - lo
    q = lo + (torch.rand(B, M, 3, generator=g) * 1.4 - 0.2) * span
    n = M // 4
    q[:, :n] = pts[:, torch.randint(0, P, (n,), generator=g)]
    pick = torch.randint(0, P, (2, n), generator=g)
    q[:, n:2 * n] = pts[:, pick[0]] + (pts[:, pick[1]] - pts[:, pick[0]]) * 0.5
    q[:, 2 * n:2 * n + 3] = lo + torch.randn(B, 3, 3, generator=g)
    return q.clamp(-1e6, 1e6)  # the valid range (clouds at its edge)


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
@given(kind=st.sampled_from(DEGENERATE), B=st.integers(1, 2), P=st.integers(256, 600), K=st.integers(1, 32),
       seed=st.integers(0, 2**16))
def test_knn_degenerate_clouds(device, backend, kind, B, P, K, seed):
    """Issue 13: clouds with tiny (even denormal) extents made the grid's cell size and its
    inverse overflow (a RuntimeError from bincount at 1e-40, wrong indices at 1e-30: the
    squared distances round to 0 and the search stopped before the lower-index ties).  Every
    backend must stay bit-exact with the reference, ties lower index first."""
    g = torch.Generator().manual_seed(seed)
    pts = _degenerate_cloud(kind, B, P, g)
    q = _queries_at_scale(pts, 40, g)
    dist, idx = ops.knn(q.to(device), pts.to(device), K, backend=backend)
    ref_dist, ref_idx = knn_reference(q, pts, K)
    assert torch.equal(idx.cpu(), ref_idx) and torch.equal(dist.cpu(), ref_dist)


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
@pytest.mark.parametrize("spread", [1e-45, 1e-40, 1e-36, 1e-30, 1e-20, 1e-16])
def test_knn_tiny_extent_regression(device, backend, spread):
    """The cases of the issue: 5022 points at 0 and one at `spread`; and a random cube of that
    extent (squared distances all round to 0 or to denormals)."""
    pts = torch.zeros(1, 5023, 3)
    pts[0, -1, 0] = spread
    g = torch.Generator().manual_seed(0)
    cube = (torch.rand(1, 2000, 3, generator=g, dtype=torch.float64) * spread).float()
    for cloud in (pts, cube):
        q = _queries_at_scale(cloud, 24, g)
        dist, idx = ops.knn(q.to(device), cloud.to(device), 8, backend=backend)
        ref_dist, ref_idx = knn_reference(q, cloud, 8)
        assert torch.equal(idx.cpu(), ref_idx) and torch.equal(dist.cpu(), ref_dist)


@pytest.mark.parametrize("device,backend", [c for c in BACKEND_CASES if c.values[1] != "triton"])
@pytest.mark.parametrize("kind", DEGENERATE)
def test_knn_degenerate_clouds_many_queries(device, backend, kind):
    """The same clouds with a render-sized query set (16384 queries: the C++ kernels may pick
    another search structure for large M; every one must stay exact)."""
    g = torch.Generator().manual_seed(len(kind))
    pts = _degenerate_cloud(kind, 1, 700, g)
    q = _queries_at_scale(pts, 16384, g)
    dist, idx = ops.knn(q.to(device), pts.to(device), 8, backend=backend)
    ref_dist, ref_idx = knn_reference(q, pts, 8)
    assert torch.equal(idx.cpu(), ref_idx) and torch.equal(dist.cpu(), ref_dist)
