"""NaN on every backend (issue 13): data the ops do not validate (features, weights, planes,
values, and everything with ``validate=False``) may hold NaN, and every backend must put NaN
exactly where the torch reference does (``torch.equal(out.isnan(), ref.isnan())``) and agree
elsewhere within the usual tolerances.  A max / fmax-style ReLU or clamp drops NaN: that is
the bug these tests catch.  Inputs validated as finite (coordinates, ray data, the
``weight_sum`` normalizer, alphas) raise a ``ValueError`` naming the argument on every
backend instead.
"""

import pytest
import torch
from conftest import BACKEND_CASES, CUDA_SEARCHES, HAS_CUDA

import gpavatar.ops as ops
from gpavatar.ops._backend import environ
from _data import make_pef_params, make_points, make_queries
from hypothesis import assume, given
from hypothesis import strategies as st

NAN = float("nan")
# Fused backends and the reference itself (the torch backend must agree with the reference
# it calls, trivially, but it also checks the test's own plumbing).
CASES = BACKEND_CASES + [pytest.param("cpu", "torch", id="cpu-torch")]
# Same tolerances as the op's own test file (see there for where they come from).
KNN_BLEND_FWD = dict(rtol=1e-4, atol=1e-5)
KNN_BLEND_BWD = dict(rtol=1e-3, atol=1e-4)
TRIPLANE_FWD = dict(rtol=1e-5, atol=1e-5)
COMPOSITE_FWD = dict(rtol=1e-5, atol=1e-5)


def assert_same_nan(out, ref, name, **tol):
    out, ref = out.detach().cpu().double(), ref.detach().cpu().double()
    assert out.shape == ref.shape, name
    where = out.isnan() != ref.isnan()
    assert torch.equal(out.isnan(), ref.isnan()), (
        f"{name}: NaN differs from the reference at {where.nonzero()[:5].tolist()} "
        f"({int(out.isnan().sum())} NaN vs {int(ref.isnan().sum())})")
    finite = ~ref.isnan()
    torch.testing.assert_close(out[finite], ref[finite], **tol, msg=lambda m: f"{name}: {m}")


def _rays_cases():
    """The ray ops have C++ kernels only (triton resolves to them or to torch)."""
    cases = [pytest.param("cpu", "torch", id="cpu-torch")]
    if "cpu" in ops.available_backends("cpu") and hasattr(torch.ops.gpavatar, "ray_box"):
        cases.append(pytest.param("cpu", "cpu", id="cpu-cpu"))
    if HAS_CUDA:
        cases.append(pytest.param("cuda", "cuda", id="cuda-cuda", marks=pytest.mark.cuda))
    return cases


RAYS_CASES = _rays_cases()


# --- knn: non-finite coordinates with validate=False -------------------------------------------
#
# Every backend returns the K smallest (distance, index) pairs in one total order: ascending
# distance, NaN after +inf, ties (NaN with NaN too) by the lower index -- torch.sort's stable
# order, which the reference follows.  Indices stay in [0, P).

BAD_VALUES = {"nan": NAN, "inf": float("inf"), "-inf": float("-inf"), "huge": 1e30}


def _spoil(t: torch.Tensor, rows, what, axes=None) -> torch.Tensor:
    """t with the rows ``rows`` (those below t.shape[1]) of its second axis set to ``what``, on one
    coordinate axis or all."""
    t = t.clone()
    for r in (r for r in rows if r < t.shape[1]):
        if axes is None:
            t[:, r] = BAD_VALUES[what]
        else:
            t[:, r, axes] = BAD_VALUES[what]
    return t


def assert_same_knn(got, ref, P, name=""):
    d, i = (x.cpu() for x in got)
    rd, ri = (x.cpu() for x in ref)
    assert bool(((i >= 0) & (i < P)).all()), f"{name}: an index outside [0, {P})"
    bad = (i != ri).any(-1)
    assert not bool(bad.any()), (f"{name}: neighbours differ from the reference at queries "
                                 f"{bad.nonzero()[:5].tolist()}: {i[bad][:2].tolist()} vs {ri[bad][:2].tolist()}")
    assert torch.equal(d.isnan(), rd.isnan()), name
    assert torch.equal(torch.nan_to_num(d, nan=0.0), torch.nan_to_num(rd, nan=0.0)), name


def test_reference_total_order():
    """The reference's float32 key path gives torch.sort's stable order with NaN and inf ties."""
    from gpavatar.ops.reference import _smallest_k

    g = torch.Generator().manual_seed(0)
    d = torch.rand(6, 40, generator=g)
    d[d < 0.3] = float("inf")
    d[d > 0.8] = NAN
    d[:, ::7] = 0.5  # finite ties
    d[5] = NAN  # a row of NaN only
    assert torch.equal(_smallest_k(d, 40), torch.sort(d, dim=-1, stable=True).indices)
    assert torch.equal(_smallest_k(d, 40), _smallest_k(d.double(), 40))


# (points spoiled, queries spoiled): (value, rows, one axis or all)
NONFINITE_CASES = {
    "nan_point": ([("nan", [3], None)], []),
    "inf_points": ([("inf", [0, 9], 1), ("-inf", [4], 2)], []),
    "most_points_nan": ([("nan", range(2, 400), None)], []),  # fewer than K points are numbers
    "nan_queries": ([], [("nan", [0, 5, 6], 0)]),
    "inf_queries": ([], [("inf", [1], 0), ("-inf", [2], None)]),
    "overflow": ([("huge", [7], 2)], [("huge", [3, 4], None)]),  # finite coordinates, distances +inf
    "everything": ([("nan", [1], 0), ("inf", [2], 1), ("huge", [5], None)],
                   [("nan", [0], 2), ("inf", [1], None), ("huge", [2], 1)]),
}


def _nonfinite_inputs(case, B=2, M=60, P=40, device="cpu"):
    pts = make_points(B, P, seed=21, duplicates=4, device=device)
    q = make_queries(B, M, pts, seed=22, on_points=5, device=device)
    spoil_p, spoil_q = NONFINITE_CASES[case]
    for what, rows, axes in spoil_p:
        pts = _spoil(pts, rows, what, axes)
    for what, rows, axes in spoil_q:
        q = _spoil(q, rows, what, axes)
    return q, pts


# The C++ knn's search methods and layouts (GPAVATAR_KNN, GPAVATAR_KNN_LAYOUT): each must reach
# the same order (the cell lists send the queries they cannot order to the brute-force scan).
CPU_METHODS = [("brute", "cpu"), ("grid", "cpu"), ("cells", "cpu"), ("cells", "cuda")]


@pytest.mark.parametrize("case", list(NONFINITE_CASES))
@pytest.mark.parametrize("device,backend", CASES)
def test_knn_nonfinite_total_order(device, backend, case, monkeypatch):
    q, pts = _nonfinite_inputs(case, device=device)
    ref = ops.knn(q.cpu(), pts.cpu(), 8, backend="torch", validate=False)
    if case == "most_points_nan":
        assert bool(ref.dist2.isnan().any())  # NaN neighbours fill the last slots
    methods = CPU_METHODS if (device, backend) == ("cpu", "cpu") else [("brute", "cpu"), ("cells", "cpu")]
    for method, layout in methods:
        monkeypatch.setenv("GPAVATAR_KNN", method)
        monkeypatch.setenv("GPAVATAR_KNN_LAYOUT", layout)
        # (the CUDA layout: each of the CUDA kernel's list scans, which the CPU runs there too)
        for search in CUDA_SEARCHES if (method, layout) == ("cells", "cuda") or device == "cuda" else ["banded"]:
            monkeypatch.setenv("GPAVATAR_KNN_CUDA_SEARCH", search)
            got = ops.knn(q, pts, 8, backend=backend, validate=False)
            assert_same_knn(got, ref, pts.shape[1], f"{backend} {method} {layout} {search}")


@given(P=st.integers(1, 50), K=st.integers(1, 32), M=st.integers(1, 40), seed=st.integers(0, 2**16),
       what=st.sampled_from(list(BAD_VALUES)), n_points=st.integers(0, 50), n_queries=st.integers(0, 40),
       method=st.sampled_from(CPU_METHODS))
def test_knn_nonfinite_cpu_random(P, K, M, seed, what, n_points, n_queries, method):
    """Random clouds with random coordinates set to NaN / +-inf / 1e30: the C++ CPU knn in every
    method equals the reference's total order."""
    assume(K <= P and "cpu" in ops.available_backends("cpu"))
    g = torch.Generator().manual_seed(seed)
    pts = make_points(1, P, seed=seed, duplicates=P // 4)
    q = make_queries(1, M, pts, seed=seed + 1, on_points=M // 4)
    for t, n in ((pts, n_points), (q, n_queries)):
        flat = t.view(-1)
        flat[torch.randperm(flat.numel(), generator=g)[:min(n, flat.numel())]] = BAD_VALUES[what]
    ref = ops.knn(q, pts, K, backend="torch", validate=False)
    with environ(GPAVATAR_KNN=method[0], GPAVATAR_KNN_LAYOUT=method[1]):
        got = ops.knn(q, pts, K, backend="cpu", validate=False)
    assert_same_knn(got, ref, P, str(method))


@pytest.mark.parametrize("hint", ["0", "1"])
@pytest.mark.parametrize("finite", [1, 3, 7, 8, 20])
@pytest.mark.parametrize("what", ["nan", "inf"])
def test_knn_nonfinite_points_coherent_queries(hint, finite, what):
    """Consecutive queries a small step apart (the CPU lists then start from the previous query's
    neighbours: GPAVATAR_KNN_CPU_HINT) among points of which only ``finite`` are finite, K = 8: a
    list then holds fewer than K points and the result the reference's total order.  A previous
    query whose K-th slot is empty must not lend its neighbours (it read index INT_MAX: a crash in
    CI)."""
    if "cpu" not in ops.available_backends("cpu"):
        pytest.skip("no C++ extension")
    g = torch.Generator().manual_seed(finite)
    pts = torch.rand(1, 64, 3, generator=g) - 0.5
    pts[0, finite:] = BAD_VALUES[what]  # (the first point finite: the grid's box stays finite for NaN)
    q = (pts[0, 0] + (torch.randn(1, 600, 3, generator=g) * 0.01).cumsum(1)).contiguous()
    ref = ops.knn(q, pts, 8, backend="torch", validate=False)
    with environ(GPAVATAR_KNN="cells", GPAVATAR_KNN_CPU_HINT=hint):
        got = ops.knn(q, pts, 8, backend="cpu", validate=False)
    assert_same_knn(got, ref, pts.shape[1], f"hint {hint}")


@pytest.mark.parametrize("case", ["nan_point", "most_points_nan", "nan_queries", "everything"])
def test_knn_search_nonfinite_total_order(case, monkeypatch):
    """knn with a shared index (knn_index / knn_search: the CUDA layout's lists, on the CPU)."""
    monkeypatch.setenv("GPAVATAR_KNN_LAYOUT", "cuda")
    q, pts = _nonfinite_inputs(case, P=300)
    index = ops.knn_index(pts, 8, box=(-1.0, 1.0), backend="cpu", validate=False)
    if index is None:
        pytest.skip("no C++ extension")
    ref = ops.knn(q, pts, 8, backend="torch", validate=False)
    for search in CUDA_SEARCHES:
        monkeypatch.setenv("GPAVATAR_KNN_CUDA_SEARCH", search)
        got = ops.knn(q, pts, 8, backend="cpu", validate=False, index=index)
        assert_same_knn(got, ref, pts.shape[1], f"knn_search {search}")


@pytest.mark.parametrize("case", ["nan_point", "most_points_nan", "inf_queries"])
@pytest.mark.parametrize("normalize", ["neighbors", "queries"])
@pytest.mark.parametrize("device,backend", CASES)
def test_knn_blend_nonfinite_coordinates(device, backend, case, normalize):
    """knn_blend with non-finite coordinates (validate=False): the reference's neighbours, and NaN
    in the features exactly where the reference has it (with "queries", a NaN weight reaches the
    whole batch element through the sums over its queries)."""
    q, pts = _nonfinite_inputs(case, device=device)
    params = make_pef_params(pts.shape[1], Cf=8, H=16, C=8, seed=13, device=device)
    out = ops.knn_blend(q, pts, *params, K=5, normalize=normalize, backend=backend, validate=False)
    ref = ops.knn_blend(q, pts, *params, K=5, normalize=normalize, backend="torch", validate=False)
    assert_same_knn((out.dist2, out.idx), (ref.dist2, ref.idx), pts.shape[1], backend)
    assert_same_nan(out.feature, ref.feature, "feature", **KNN_BLEND_FWD)


# --- knn_blend -------------------------------------------------------------------------------

# (parameter index in make_pef_params, flat position of the NaN): point_features, the feature
# and the direction half of w1, b1, w2, b2.
KNN_BLEND_NAN = {
    "point_features": (0, 3 * 8 + 2),  # one channel of point 3
    "w1_feature": (1, 5 * 35 + 1),  # hidden unit 5, feature channel 1
    "w1_direction": (1, 7 * 35 + 8 + 20),  # hidden unit 7, embedding channel 20
    "b1": (2, 4),
    "w2": (3, 2 * 16 + 9),
    "b2": (4, 6),
}


def _knn_blend_inputs(device, where, per_batch):
    B, P, M = 2, 40, 30
    pts = make_points(B, P, seed=11, device=device)
    q = make_queries(B, M, pts, seed=12, on_points=3, device=device)
    params = make_pef_params(P, Cf=8, H=16, C=8, B=B if per_batch else None, seed=13, device=device)
    which, flat = KNN_BLEND_NAN[where]
    params[which].view(-1)[flat] = NAN
    return q, pts, params


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("where", list(KNN_BLEND_NAN))
@pytest.mark.parametrize("normalize,per_batch", [("neighbors", False), ("queries", True)])
def test_knn_blend_nan_propagates(device, backend, where, normalize, per_batch):
    """A NaN feature reaches exactly the queries that have that point among their neighbours;
    a NaN weight or bias reaches every output it feeds (relu(NaN) = NaN, as in torch).  The
    gradients to features and weights carry NaN where the reference's do (torch's relu
    backward passes the gradient at NaN).  One documented exception: the fused backends apply
    the feature half of w1 to every point (the table), so with a NaN there the gradient rows of
    points that no query uses are NaN where the reference leaves them 0."""
    q, pts, params = _knn_blend_inputs(device, where, per_batch)
    grad = torch.randn(2, 30, 8, generator=torch.Generator().manual_seed(0)).to(device)
    results = {}
    for name in (backend, "torch"):
        leaves = [p.clone().requires_grad_() for p in params]
        out = ops.knn_blend(q, pts, *leaves, K=5, normalize=normalize, backend=name)
        grads = torch.autograd.grad(out.feature, leaves, grad)
        results[name] = (out, grads)
    (out, grads), (ref, ref_grads) = results[backend], results["torch"]
    assert bool(ref.feature.isnan().any())  # the NaN reached the output (else the test is vacuous)
    if where == "point_features":
        assert not bool(ref.feature.isnan().all())  # ... and only the queries next to that point
    assert torch.equal(out.idx, ref.idx) and torch.equal(out.dist2, ref.dist2)
    assert_same_nan(out.feature, ref.feature, "feature", **KNN_BLEND_FWD)
    for pname, g, rg in zip(("point_features", "w1", "b1", "w2", "b2"), grads, ref_grads):
        if pname == "point_features" and backend != "torch":
            rows = g.reshape(-1, g.shape[-1]).cpu()
            ref_rows = rg.reshape(-1, g.shape[-1]).cpu()
            P = pts.shape[1]
            idx = ref.idx.cpu() + (torch.arange(2)[:, None, None] * P if per_batch else 0)
            used = torch.zeros(rows.shape[0], dtype=torch.bool)
            used[idx.reshape(-1)] = True
            assert bool((ref_rows[~used] == 0).all())
            unused = rows[~used]
            assert bool(((unused == 0) | (unused.isnan() & (where == "w1_feature"))).all())
            g, rg = rows[used], ref_rows[used]
        assert_same_nan(g, rg, f"grad {pname}", **KNN_BLEND_BWD)


@pytest.mark.parametrize("device,backend", CASES)
def test_knn_blend_validated_inputs_reject_nan(device, backend):
    """queries, points and weight_sum are checked (finite; weight_sum also > 0): a NaN there is
    a ValueError naming the argument, the same on every backend."""
    q, pts, params = _knn_blend_inputs(device, "b2", False)
    params[4] = params[4].nan_to_num()
    bad_q = q.clone()
    bad_q[1, 4, 2] = NAN
    bad_p = pts.clone()
    bad_p[0, 7, 0] = NAN
    with pytest.raises(ValueError, match="queries must hold finite coordinates"):
        ops.knn_blend(bad_q, pts, *params, K=5, backend=backend)
    with pytest.raises(ValueError, match="points must hold finite coordinates"):
        ops.knn_blend(q, bad_p, *params, K=5, backend=backend)
    weight_sum = torch.ones(2, 5, device=device)
    weight_sum[1, 2] = NAN
    with pytest.raises(ValueError, match="weight_sum must hold finite values > 0"):
        ops.knn_blend(q, pts, *params, K=5, normalize="queries", weight_sum=weight_sum, backend=backend)
    with pytest.raises(ValueError, match="queries must hold finite coordinates"):
        ops.knn(bad_q, pts, 5, backend=backend)


# --- triplane_sample -------------------------------------------------------------------------


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last,reduce", [(False, "mean"), (True, "concat")])
def test_triplane_nan_propagates(device, backend, dtype, channels_last, reduce):
    """A NaN texel reaches every point that reads it as an in-bounds corner, even with weight 0
    (a point exactly on a neighbouring texel centre: 0 * NaN = NaN, as in grid_sample); the
    coordinate gradient follows the reference too."""
    B, C, H, W = 1, 4, 8, 6
    g = torch.Generator().manual_seed(5)
    planes = torch.randn(B, 3, C, H, W, generator=g)
    planes[0, 0, 1, 3, 4] = NAN
    planes[0, 2, 2, 0, 0] = NAN  # a corner texel
    planes[0, 1, :, 7, 5] = NAN  # every channel of the last texel
    coords = torch.rand(B, 400, 3, generator=g) * 2.4 - 1.2
    cx = lambda i: -1 + (2 * i + 1) / W  # noqa: E731  texel centres
    cy = lambda j: -1 + (2 * j + 1) / H  # noqa: E731
    coords[0, 0] = torch.tensor([cx(5), cy(3), 0.0])  # on the centre next to (3, 4): weight 0 for it
    coords[0, 1] = torch.tensor([cx(4), cy(2), 0.0])
    coords[0, 2] = torch.tensor([cx(4), cy(3), 0.0])  # exactly on the NaN texel
    coords[0, 3] = torch.tensor([-1.0, cy(7), 0.9])  # left border of plane 1 (x, z)
    planes = planes.to(dtype)
    if channels_last:
        planes = planes.permute(0, 1, 3, 4, 2).contiguous()
    results = {}
    for name in (backend, "torch"):
        c = coords.clone().to(device).requires_grad_()
        out = ops.triplane_sample(planes.to(device), c, reduce, channels_last=channels_last, backend=name)
        (gc,) = torch.autograd.grad(out, c, torch.ones_like(out))
        results[name] = (out, gc)
    (out, gc), (ref, rgc) = results[backend], results["torch"]
    assert bool(ref.isnan().any()) and not bool(ref.isnan().all())
    assert_same_nan(out, ref, "features", **TRIPLANE_FWD)
    # Coordinate gradients: same NaN mask; finite parts as loose as the op's own fp16 test.
    assert_same_nan(gc, rgc, "grad coords", rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("device,backend", CASES)
def test_triplane_rejects_nan_coords(device, backend):
    planes = torch.randn(1, 3, 4, 8, 8, device=device)
    coords = torch.zeros(1, 5, 3, device=device)
    coords[0, 2, 1] = NAN
    with pytest.raises(ValueError, match="coords must hold finite coordinates"):
        ops.triplane_sample(planes, coords, backend=backend)


# A NaN or infinite coordinate (validate=False) reads NaN on the planes it takes part in, as
# grid_sample: the zero padding times NaN bilinear weights; so does a finite one whose texel
# coordinate ((c + 1) size - 1) / 2 overflows.  Its coordinate gradient is NaN across (d/du where
# v is not finite, d/dv where u is not), 0 along its own axis.
TRIPLANE_BAD = {"nan_x": (0, NAN), "inf_y": (1, float("inf")), "-inf_z": (2, float("-inf")),
                "overflow_x": (0, 3e38), "huge_finite": (None, 1e30)}


def _triplane_grads(planes, coords, reduce, channels_last, backend):
    p = (planes.permute(0, 1, 3, 4, 2).contiguous() if channels_last else planes).requires_grad_()
    c = coords.clone().requires_grad_()
    out = ops.triplane_sample(p, c, reduce=reduce, channels_last=channels_last, backend=backend, validate=False)
    g = torch.linspace(-1, 1, out.numel(), device=out.device).reshape(out.shape)
    gp, gc = torch.autograd.grad(out, (p, c), g)
    return out, (gp.permute(0, 1, 4, 2, 3) if channels_last else gp), gc


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("bad", list(TRIPLANE_BAD))
@pytest.mark.parametrize("reduce,channels_last", [("mean", False), ("concat", True)])
def test_triplane_nonfinite_coords(device, backend, bad, reduce, channels_last):
    """One point with a non-finite (or overflowing) coordinate among finite ones: outputs and both
    gradients equal the reference's, NaN where it has NaN."""
    g = torch.Generator().manual_seed(5)
    planes = torch.randn(1, 3, 4, 5, 6, generator=g).to(device)
    coords = (torch.rand(1, 5, 3, generator=g) * 2.4 - 1.2).to(device)
    axis, value = TRIPLANE_BAD[bad]
    if axis is None:
        coords[0, 2] = value
    else:
        coords[0, 2, axis] = value
    got = _triplane_grads(planes, coords, reduce, channels_last, backend)
    # The oracle is grid_sample on the CPU: CUDA's may read an infinite coordinate as a miss (0).
    ref = _triplane_grads(planes.cpu(), coords.cpu(), reduce, False, "torch")
    if bad != "huge_finite":
        assert bool(ref[0].isnan().any()) and bool(ref[2].isnan().any())  # else the test is vacuous
    for name, x, r in zip(("feature", "grad planes", "grad coords"), got, ref):
        assert_same_nan(x, r, name, **TRIPLANE_FWD)


@pytest.mark.parametrize("device,backend", CASES)
def test_triplane_nonfinite_coords_backends_agree(device, backend):
    """Several bad points in one batch: the fused backends agree with each other, and the forward
    with the reference (CPU grid_sample, whose backward gave other points of such a batch other
    gradients in one trial: the gradients are compared between the fused backends only)."""
    if backend == "torch":
        pytest.skip("the fused backends against each other")
    g = torch.Generator().manual_seed(6)
    planes = torch.randn(2, 3, 4, 5, 6, generator=g).to(device)
    coords = (torch.rand(2, 9, 3, generator=g) * 2.4 - 1.2).to(device)
    for row, (axis, value) in enumerate(TRIPLANE_BAD.values()):
        if axis is None:
            coords[row % 2, row + 1] = value
        else:
            coords[row % 2, row + 1, axis] = value
    got = _triplane_grads(planes, coords, "mean", False, backend)
    assert_same_nan(got[0], ops.triplane_sample(planes.cpu(), coords.cpu(), backend="torch", validate=False),
                    "feature", **TRIPLANE_FWD)
    other = "triton" if backend != "triton" and "triton" in ops.available_backends(device) else "cpu"
    if other not in ops.available_backends(device) or other == backend:
        pytest.skip("no second fused backend here")
    for name, x, r in zip(("feature", "grad planes", "grad coords"), got,
                          _triplane_grads(planes, coords, "mean", False, other)):
        assert_same_nan(x, r, name, **TRIPLANE_FWD)


# --- composite -------------------------------------------------------------------------------


def _composite_inputs(device):
    g = torch.Generator().manual_seed(7)
    alphas = torch.rand(6, 10, generator=g)
    values = torch.randn(6, 10, 5, generator=g)
    depths = torch.rand(6, 10, generator=g).sort(dim=1).values
    alphas[0, 3] = 1.0  # opaque: the samples behind it weigh 0
    alphas[1, 0] = 0.0
    return alphas.to(device), values.to(device), depths.to(device)


@pytest.mark.parametrize("device,backend", CASES)
def test_composite_nan_values_propagate(device, backend):
    """A NaN value makes its color channel NaN, also behind an opaque sample (weight 0 * NaN);
    a NaN depth (not validated either) makes that ray's expected depth NaN."""
    alphas, values, depths = _composite_inputs(device)
    values[0, 5, 1] = NAN  # behind the opaque sample
    values[1, 0, 2] = NAN  # alpha 0
    values[2, 9, :] = NAN
    depths[4, 2] = NAN
    out = ops.composite(alphas, values, depths, backend=backend)
    ref = ops.composite(alphas, values, depths, backend="torch")
    assert bool(ref.color.isnan().any()) and bool(ref.depth[4].isnan())
    for name, o, r in zip(("color", "opacity", "weights", "depth"), out, ref):
        assert_same_nan(o, r, name, **COMPOSITE_FWD)


@pytest.mark.parametrize("device,backend", CASES)
def test_composite_nan_alphas(device, backend):
    """NaN alphas: refused (ValueError naming alphas) when validating, like out-of-range ones;
    with validate=False they propagate like the reference on every backend: weights NaN from
    that sample on, color / opacity / depth NaN for that ray."""
    alphas, values, depths = _composite_inputs(device)
    alphas[3, 4] = NAN
    alphas[5, 0] = NAN
    with pytest.raises(ValueError, match=r"alphas must lie in \[0, 1\].*2 NaN"):
        ops.composite(alphas, values, depths, backend=backend)
    out = ops.composite(alphas, values, depths, backend=backend, validate=False)
    ref = ops.composite(alphas, values, depths, backend="torch", validate=False)
    assert bool(ref.weights[3, 4:].isnan().all()) and not bool(ref.weights[3, :4].isnan().any())
    for name, o, r in zip(("color", "opacity", "weights", "depth"), out, ref):
        assert_same_nan(o, r, name, **COMPOSITE_FWD)


def _composite_grads(alphas, values, depths, backend):
    a, v = alphas.clone().requires_grad_(), values.clone().requires_grad_()
    out = ops.composite(a, v, depths, backend=backend, validate=False)
    loss = 0.3 * out.color.sum() + 0.7 * out.opacity.sum() + 0.1 * out.weights.sum() + 0.2 * out.depth.sum()
    return out, torch.autograd.grad(loss, (a, v))


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("value", [float("inf"), float("-inf"), 1e30, -1e30, 3e38, 2.0, -0.5])
@pytest.mark.parametrize("pos", [0, 9])
def test_composite_out_of_range_alphas(device, backend, value, pos):
    """Alphas outside [0, 1] (validate=False): every output equals the reference's -- the opacity is
    clamp(sum w, 0, 1) exactly (1 for a sum of 1e30 or inf, where x + (clamp(x) - x) gave 0 and NaN),
    the Triton kernel keeps its lanes past S out of the sums (0 * inf) -- and so does the values'
    gradient.  The alphas' gradient follows the kernels' recurrence (the derivative: the outputs are
    affine in each alpha), where torch's cumprod backward gives NaN; there the fused backends agree
    with each other."""
    alphas, values, depths = _composite_inputs(device)
    alphas[2, pos] = value
    out, (ga, gv) = _composite_grads(alphas, values, depths, backend)
    ref, (_, ref_gv) = _composite_grads(alphas, values, depths, "torch")
    for name, o, r in zip(("color", "opacity", "weights", "depth"), out, ref):
        assert_same_nan(o, r, name, **COMPOSITE_FWD)
    assert_same_nan(gv, ref_gv, "grad values", **COMPOSITE_FWD)
    other = "cpu" if backend != "cpu" else "triton"
    if backend != "torch" and other in ops.available_backends(device):
        assert_same_nan(ga, _composite_grads(alphas, values, depths, other)[1][0], "grad alphas", rtol=1e-4,
                        atol=1e-4)


# --- ray sampling ----------------------------------------------------------------------------


@pytest.mark.parametrize("device,backend", RAYS_CASES)
def test_ray_ops_reject_nan_when_validating(device, backend):
    """Every float input of the ray ops is validated (finite, |x| <= 1e6): a NaN is a
    ValueError naming it, the same on every backend."""
    o = torch.zeros(4, 3, device=device)
    d = torch.ones(4, 3, device=device)
    bad = torch.tensor([0.0, NAN, 0.0, 0.0], device=device)
    t = torch.linspace(0, 1, 8, device=device).expand(4, 8).contiguous()
    calls = [
        (lambda: ops.ray_box(o.index_copy(1, torch.tensor([1], device=device), bad[:, None]), d,
                             backend=backend), "origins"),
        (lambda: ops.ray_box(o, d.index_copy(1, torch.tensor([0], device=device), bad[:, None]),
                             backend=backend), "dirs"),
        (lambda: ops.stratified_depths(bad, bad.nan_to_num() + 1, 8, backend=backend), "t0"),
        (lambda: ops.stratified_depths(bad.nan_to_num(), bad, 8, backend=backend), "t1"),
        (lambda: ops.importance_depths(t, t.index_fill(1, torch.tensor([3], device=device), NAN), 8,
                                       backend=backend), "weights"),
        (lambda: ops.importance_depths(t.index_fill(1, torch.tensor([7], device=device), NAN), t, 8,
                                       backend=backend), "depths"),
        (lambda: ops.merge_samples(t.index_fill(1, torch.tensor([7], device=device), NAN), t, backend=backend),
         "depths_a"),
        (lambda: ops.merge_samples(t, t.index_fill(1, torch.tensor([0], device=device), NAN), backend=backend),
         "depths_b"),
    ]
    for call, name in calls:
        with pytest.raises(ValueError, match=name):
            call()


@pytest.mark.parametrize("device,backend", RAYS_CASES)
def test_ray_ops_nan_unvalidated(device, backend):
    """With validate=False a NaN goes where the reference puts it: ray_box skips NaN slab
    distances (fmax / fmin) like the reference; stratified depths are plain arithmetic;
    importance depths bound their outer edges with torch.maximum / minimum (NaN kept); the
    merge sorts NaN last, like torch.sort."""
    g = torch.Generator().manual_seed(3)
    o = torch.randn(64, 3, generator=g) * 3
    d = torch.randn(64, 3, generator=g)
    o[0, 1] = NAN
    d[1, 2] = NAN
    d[2] = NAN
    o, d = o.to(device), d.to(device)
    for got, ref in zip(ops.ray_box(o, d, backend=backend, validate=False),
                        ops.ray_box(o, d, backend="torch", validate=False)):
        assert_same_nan(got.float(), ref.float(), "ray_box", rtol=0, atol=0)

    t0 = torch.tensor([0.0, NAN, 1.0, 2.0], device=device)
    t1 = torch.tensor([1.0, 2.0, NAN, 3.0], device=device)
    got = ops.stratified_depths(t0, t1, 8, backend=backend, validate=False)
    ref = ops.stratified_depths(t0, t1, 8, backend="torch", validate=False)
    assert_same_nan(got, ref, "stratified", rtol=0, atol=1e-6)

    depths = torch.linspace(1, 3, 16, device=device).expand(5, 16).contiguous()
    weights = torch.rand(5, 16, generator=g).to(device)
    weights[1, 3] = NAN
    weights[4] = NAN
    got = ops.importance_depths(depths, weights, 12, backend=backend, validate=False)
    ref = ops.importance_depths(depths, weights, 12, backend="torch", validate=False)
    assert bool(ref.isnan().any())
    assert_same_nan(got, ref, "importance", rtol=0, atol=1e-5)

    a = torch.tensor([[0.1, 0.5, NAN], [0.2, NAN, NAN], [0.3, 0.4, 0.5]], device=device)
    b = torch.tensor([[0.3, NAN], [0.1, 0.2], [NAN, NAN]], device=device)
    (got, got_order), (ref, ref_order) = (ops.merge_samples(a, b, backend=name, validate=False)
                                          for name in (backend, "torch"))
    assert_same_nan(got, ref, "merge", rtol=0, atol=0)
    assert torch.equal(got_order, ref_order)

