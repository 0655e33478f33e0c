"""Integer arguments of the ops (issue 13): K, S and n accept numpy integers (a count read from
an array or a config loaded with numpy) and give exactly the int result; bools (also numpy
bools) and floats are still refused with a TypeError naming the argument."""

import numpy as np
import pytest
import torch
from conftest import BACKEND_CASES

import gpavatar.ops as ops
from _data import make_pef_params, make_points, make_queries

CASES = BACKEND_CASES + [pytest.param("cpu", "torch", id="cpu-torch")]
NUMPY_INTS = [np.int64(5), np.int32(5), np.int16(5), np.uint8(5)]


@pytest.mark.parametrize("device,backend", CASES)
def test_knn_and_knn_blend_accept_numpy_integers(device, backend):
    pts = make_points(1, 30, device=device)
    q = make_queries(1, 12, pts, device=device)
    params = make_pef_params(30, Cf=4, H=16, C=8, device=device)
    ref = ops.knn(q, pts, 5, backend=backend)
    ref_blend = ops.knn_blend(q, pts, *params, K=5, backend=backend)
    for K in NUMPY_INTS:
        out = ops.knn(q, pts, K, backend=backend)
        assert torch.equal(out.idx, ref.idx) and torch.equal(out.dist2, ref.dist2)
        blend = ops.knn_blend(q, pts, *params, K=K, backend=backend)
        assert torch.equal(blend.feature, ref_blend.feature)
    # ... and without validation
    assert torch.equal(ops.knn(q, pts, np.int64(5), backend=backend, validate=False).idx, ref.idx)


@pytest.mark.parametrize("backend", ["torch"] + (["cpu"] if hasattr(torch.ops.gpavatar, "ray_box") else []))
def test_ray_ops_accept_numpy_integers(backend):
    t0, t1 = torch.tensor([0.0, 1.0]), torch.tensor([1.0, 3.0])
    ref = ops.stratified_depths(t0, t1, 5, backend=backend)
    weights = torch.rand(2, 5, generator=torch.Generator().manual_seed(0))
    ref_fine = ops.importance_depths(ref, weights, 5, backend=backend)
    for n in NUMPY_INTS:
        coarse = ops.stratified_depths(t0, t1, n, backend=backend)
        assert torch.equal(coarse, ref)
        assert torch.equal(ops.importance_depths(ref, weights, n, backend=backend), ref_fine)


@pytest.mark.parametrize("bad", [True, np.bool_(True), 5.0, np.float32(5.0), "5", torch.tensor(5)])
def test_bools_and_non_integers_are_refused(bad):
    pts, q = make_points(1, 30), make_queries(1, 4)
    params = make_pef_params(30, Cf=4, H=16, C=8)
    t0, t1 = torch.tensor([0.0]), torch.tensor([1.0])
    calls = [
        (lambda: ops.knn(q, pts, bad), "K must be an int"),
        (lambda: ops.knn_blend(q, pts, *params, K=bad), "K must be an int"),
        (lambda: ops.stratified_depths(t0, t1, bad), "S must be an int"),
        (lambda: ops.importance_depths(torch.rand(1, 6).sort().values, torch.rand(1, 6), bad), "n must be an int"),
    ]
    for call, message in calls:
        with pytest.raises(TypeError, match=message):
            call()


def test_check_coordinates_of_several_tensors_names_the_first_bad_one():
    """One host sync for all the tensors of a call; the error names the first offending one
    (NaN, inf, beyond MAX_ABS_COORD, float64 beyond float32's range); empty tensors pass."""
    from gpavatar.ops import _validation as v

    good, empty = torch.zeros(4, 3), torch.zeros(0, 3)
    v.check_coordinates(good, "a", empty, "b", good.double(), "c")
    for bad in (float("nan"), float("inf"), 2 * v.MAX_ABS_COORD):
        t = good.clone()
        t[2, 1] = bad
        with pytest.raises(ValueError, match="^b must hold finite coordinates"):
            v.check_coordinates(good, "a", t, "b", t, "c")
        with pytest.raises(ValueError, match="^a must hold finite coordinates"):
            v.check_coordinates(t, "a", good, "b")
    huge = torch.full((2, 3), 1e300, dtype=torch.float64)
    with pytest.raises(ValueError, match="^points must hold finite coordinates"):
        v.check_coordinates(good, "queries", huge, "points")
