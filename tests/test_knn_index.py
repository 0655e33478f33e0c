"""ops.knn_index: the KNN's cell lists built once and searched by several knn / knn_blend calls
(the two field passes of a frame, $GPAVATAR_KNN_SHARE).

CPU: the index is the CUDA path's lists (GPAVATAR_KNN_LAYOUT=cuda, the CUDA layout run on the
CPU: the same grid, lists, budget and scans), so these tests exercise the CUDA kernels'
arithmetic; the CUDA host code that builds and searches it runs in the ``cuda`` tests.  Every
result must equal the exact reference bit for bit, whatever the index's box: queries outside it,
or in a cell whose list overflowed its storage, take the brute-force scan.
"""

import pytest
import torch
from _data import make_pef_params, make_points, make_queries
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gpavatar.ops as ops
from gpavatar import _extension
from gpavatar.ops.reference import knn_reference

requires_ext = pytest.mark.skipif(not _extension.available(), reason="needs the C++ extension")
DEVICES = [pytest.param("cpu", id="cpu")] + (
    [pytest.param("cuda", id="cuda", marks=pytest.mark.cuda)] if torch.cuda.is_available() else [])


@pytest.fixture
def cuda_layout(monkeypatch):
    """The CUDA path's lists on the CPU (where knn_index returns an index)."""
    monkeypatch.setenv("GPAVATAR_KNN_LAYOUT", "cuda")
    monkeypatch.setenv("GPAVATAR_KNN", "cells")
    monkeypatch.setenv("GPAVATAR_KNN_CELLS", "6")  # small grids keep the CPU build quick


def backend(device):
    return "cuda" if device == "cuda" else "cpu"


@requires_ext
@pytest.mark.parametrize("device", DEVICES)
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])  # the fixture only sets variables
@given(B=st.integers(1, 2), M=st.integers(1, 300), P=st.integers(8, 400), K=st.integers(1, 16),
       far=st.integers(0, 5), dup=st.integers(0, 5), seed=st.integers(0, 2 ** 16))
def test_search_equals_the_reference(cuda_layout, device, B, M, P, K, far, dup, seed):
    """An index built over one query set's box, searched with that set and with another one partly
    outside the box (far queries, a shifted set): the reference's neighbours and distances, bit for bit."""
    K = min(K, P)
    pts = make_points(B, P, seed=seed, duplicates=dup, device=device)
    first = make_queries(B, M, pts, seed=seed + 1, on_points=2, device=device) * 0.5
    index = ops.knn_index(pts, K, queries=first, backend=backend(device))
    assert isinstance(index, ops.KnnIndex)
    second = make_queries(B, M, pts, seed=seed + 2, far=far, device=device) * 1.3
    for q in (first, second):
        d, i = ops.knn(q, pts, K, backend=backend(device), index=index)
        rd, ri = knn_reference(q.cpu(), pts.cpu(), K)
        assert torch.equal(i.cpu(), ri) and torch.equal(d.cpu(), rd)


@requires_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("box", ["queries", "box", "points"])
def test_boxes_and_overflow(cuda_layout, device, box, monkeypatch):
    """The grid over the queries' box, a given (lo, hi) box or the points' box alone; a budget of 4
    entries per cell overflows most lists (their queries scan every point): still exact."""
    pts = make_points(2, 500, seed=3, device=device)
    q = make_queries(2, 700, pts, seed=4, on_points=5, far=3, device=device)
    rd, ri = knn_reference(q.cpu(), pts.cpu(), 8)
    for budget in (None, "4"):
        if budget:
            monkeypatch.setenv("GPAVATAR_KNN_CELL_BUDGET", budget)
        kw = {"queries": dict(queries=q), "box": dict(box=(-1.0, 1.0)), "points": {}}[box]
        index = ops.knn_index(pts, 8, backend=backend(device), **kw)
        d, i = ops.knn(q, pts, 8, backend=backend(device), index=index)
        assert torch.equal(i.cpu(), ri) and torch.equal(d.cpu(), rd)


@requires_ext
def test_blend_and_gradients(cuda_layout):
    """knn_blend with an index gives the features of the call without one (the same neighbours), and
    knn's dist2 gradients to queries and points are the same through the index's search."""
    pts = make_points(1, 300, seed=5)
    q = make_queries(1, 400, pts, seed=6)
    params = make_pef_params(300, 8, 16, 8, seed=7)
    index = ops.knn_index(pts, 8, queries=q, backend="cpu")
    with_index = ops.knn_blend(q, pts, *params, K=8, backend="cpu", index=index)
    without = ops.knn_blend(q, pts, *params, K=8, backend="cpu")
    for a, b in zip(with_index, without):
        assert torch.equal(a, b)
    grads = []
    for idx in (index, None):
        qq, pp = q.clone().requires_grad_(), pts.clone().requires_grad_()
        d, _ = ops.knn(qq, pp, 8, backend="cpu", index=ops.knn_index(pp, 8, queries=qq, backend="cpu")
                       if idx is not None else None)
        grads.append(torch.autograd.grad(d.square().sum(), (qq, pp)))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


@requires_ext
def test_index_checks(cuda_layout):
    """An index is refused for other points, after an in-place change of its points, for another K,
    and when it is not a KnnIndex; the backends without lists get None (and ignore an index)."""
    pts = make_points(1, 300, seed=8)
    q = make_queries(1, 50, pts, seed=9)
    index = ops.knn_index(pts, 8, queries=q, backend="cpu")
    with pytest.raises(ValueError, match="other points"):
        ops.knn(q, pts.clone(), 8, backend="cpu", index=index)
    with pytest.raises(ValueError, match="built for K = 8"):
        ops.knn(q, pts, 4, backend="cpu", index=index)
    with pytest.raises(TypeError, match="KnnIndex"):
        ops.knn(q, pts, 8, backend="cpu", index=index.tensors)
    assert ops.knn_index(pts, 8, backend="torch") is None
    d, i = ops.knn(q, pts, 8, backend="torch", index=index)  # the reference ignores it
    assert torch.equal(i, knn_reference(q, pts, 8)[1])
    pts.add_(0.0)  # in place: the index is stale
    with pytest.raises(ValueError, match="stale"):
        ops.knn(q, pts, 8, backend="cpu", index=index)
    with pytest.raises(ValueError, match="box must be"):
        ops.knn_index(pts, 8, box=(1.0, -1.0), backend="cpu")
    with pytest.raises(ValueError, match="K"):
        ops.knn_index(pts, 301, backend="cpu")


@requires_ext
def test_cpu_default_layout_has_no_index(monkeypatch):
    """The CPU's own lists are built per call (sized to the queries): knn_index returns None there."""
    monkeypatch.delenv("GPAVATAR_KNN_LAYOUT", raising=False)
    assert ops.knn_index(make_points(1, 300), 8, backend="cpu") is None


@requires_ext
@pytest.mark.parametrize("device", DEVICES)
def test_index_follows_the_knn_policy(device, monkeypatch):
    """knn_index builds lists exactly where knn would search them (the extension's own reading of
    GPAVATAR_KNN / GPAVATAR_KNN_GRID: auto from 256 points, cells always, brute / grid / GRID=0 never),
    None elsewhere; a bad GPAVATAR_KNN is the same ValueError as knn's."""
    if device == "cpu":
        monkeypatch.setenv("GPAVATAR_KNN_LAYOUT", "cuda")
    cases = [({}, 300, True), ({}, 200, False), ({"GPAVATAR_KNN": "cells"}, 200, True),
             ({"GPAVATAR_KNN": "brute"}, 300, False), ({"GPAVATAR_KNN": "grid"}, 300, False),
             ({"GPAVATAR_KNN_GRID": "0"}, 300, False), ({"GPAVATAR_KNN": ""}, 300, True)]
    for env, P, built in cases:
        for name in ("GPAVATAR_KNN", "GPAVATAR_KNN_GRID"):
            monkeypatch.delenv(name, raising=False)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        index = ops.knn_index(make_points(1, P, device=device), 8, backend=backend(device))
        assert (index is not None) == built, (env, P)
    monkeypatch.setenv("GPAVATAR_KNN", "fastest")
    with pytest.raises(ValueError, match="GPAVATAR_KNN must be one of"):
        ops.knn_index(make_points(1, 300, device=device), 8, backend=backend(device))


@requires_ext
def test_low_level_search_checks_the_index(cuda_layout):
    pts = make_points(1, 300, seed=10)
    q = make_queries(1, 50, pts, seed=11)
    index = ops.knn_index(pts, 8, queries=q, backend="cpu")
    with pytest.raises(ValueError, match="6 tensors"):
        torch.ops.gpavatar.knn_search(q, pts, 8, list(index.tensors)[:5])
    with pytest.raises(ValueError, match="does not match"):
        torch.ops.gpavatar.knn_search(q, pts, 4, list(index.tensors))
    bad = list(index.tensors)
    bad[1] = bad[1].int()
    with pytest.raises(ValueError, match="offset must be a contiguous"):
        torch.ops.gpavatar.knn_search(q, pts, 8, bad)
    with pytest.raises(ValueError, match="query_box must have shape"):
        torch.ops.gpavatar.knn_index(pts, torch.zeros(1, 5), 8)


@requires_ext
def test_model_frames_share_the_index(cuda_layout, monkeypatch):
    """GPAVATAR_KNN_SHARE=1: the model's field builds one index per frame (over the coarse pass's
    samples) and both passes search it: every output equals the frame without it, bit for bit."""
    from gpavatar.model import GPAvatar

    monkeypatch.setenv("GPAVATAR_KNN_CELLS", "8")
    torch.manual_seed(0)
    model = GPAvatar("tiny", render_size=32, n_coarse=8, n_fine=8).eval().set_noise("stored")
    with torch.no_grad():
        avatar = model.build_avatar(torch.rand(1, 1, 3, 64, 64, generator=torch.Generator().manual_seed(1)))
    g = torch.Generator().manual_seed(2)
    points = (torch.randn(1, 5023, 3, generator=g) * 0.35).clamp(-0.9, 0.9)
    camera = torch.tensor([[[1.0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 9]]])
    with torch.no_grad():
        ref = model.render(avatar, points, camera)
    built = []
    real = ops.knn_index
    monkeypatch.setattr(ops, "knn_index", lambda *a, **k: built.append(1) or real(*a, **k))
    monkeypatch.setenv("GPAVATAR_KNN_SHARE", "1")
    with torch.no_grad():
        out = model.render(avatar, points, camera)
    assert built == [1]
    for key in ("fine", "coarse", "image", "depth"):
        assert torch.equal(out[key], ref[key]), key
    monkeypatch.setenv("GPAVATAR_KNN_SHARE", "yes")
    with pytest.raises(ValueError, match="GPAVATAR_KNN_SHARE must be 0 or 1"):
        model.render(avatar, points, camera)


@requires_ext
def test_opcheck(cuda_layout):
    """knn_search's registration (schema, fake, autograd) passes torch.library.opcheck."""
    pts = make_points(1, 300, seed=12)
    q = make_queries(1, 60, pts, seed=13)
    index = ops.knn_index(pts, 8, queries=q, backend="cpu")
    torch.library.opcheck(torch.ops.gpavatar.knn_search, (q, pts, 8, list(index.tensors)),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def _lists(index: ops.KnnIndex) -> tuple:
    """An index's per-cell lists, each as its (n, 4) entries (None where the list overflowed), with
    the geometry, bounds, band sizes and seeds: what a search reads, whatever the lists' places."""
    geom, offset, cand, bound, band_count, seeds = index.tensors
    lengths = band_count.view(bound.numel(), -1).sum(1).tolist()
    lists = [None if o < 0 else cand[o:o + n].cpu() for o, n in zip(offset[:-1].tolist(), lengths)]
    return geom.cpu(), bound.cpu(), band_count.cpu(), seeds.cpu(), lists


@requires_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("budget", ["3", "768"])
def test_one_pass_index_holds_the_two_level_lists(cuda_layout, device, budget, monkeypatch):
    """GPAVATAR_KNN_CUDA_BUILD=one_pass (the two-level build in one launch, each list's room reserved
    with an atomic): the same lists, bounds, bands and seeds as two_level; on the CPU layout also the
    same places (its reservations run in cell order), on CUDA wherever the warps reserved.  With a
    budget of 3 entries a cell most lists overflow (which ones may differ on CUDA: the search is
    exact either way, test_cuda_searches_match_the_reference)."""
    monkeypatch.setenv("GPAVATAR_KNN_CELL_BUDGET", budget)
    pts = make_points(2, 400, seed=3, duplicates=3, device=device)
    q = make_queries(2, 300, pts, seed=4, device=device)
    built = {}
    for build in ("two_level", "one_pass"):
        monkeypatch.setenv("GPAVATAR_KNN_CUDA_BUILD", build)
        built[build] = ops.knn_index(pts, 8, queries=q, backend=backend(device))
        d, i = ops.knn(q, pts, 8, backend=backend(device), index=built[build])
        rd, ri = knn_reference(q.cpu(), pts.cpu(), 8)
        assert torch.equal(i.cpu(), ri) and torch.equal(d.cpu(), rd)
    two, one = _lists(built["two_level"]), _lists(built["one_pass"])
    for a, b in zip(two[:4], one[:4]):
        assert torch.equal(a, b)
    kept = [(x, y) for x, y in zip(two[4], one[4]) if x is not None and y is not None]
    assert all(torch.equal(x, y) for x, y in kept)
    if device == "cpu" or budget == "768":
        assert [x is None for x in two[4]] == [x is None for x in one[4]]
        assert len(kept) == len(two[4]) if budget == "768" else 0 < len(kept) < len(two[4])
    if device == "cpu":
        for a, b in zip(built["two_level"].tensors, built["one_pass"].tensors):
            assert torch.equal(a, b)


@requires_ext
@pytest.mark.parametrize("device", DEVICES)
def test_index_keeps_its_order(cuda_layout, device, monkeypatch):
    """An index records the band order it was built in (GPAVATAR_KNN_CUDA_ORDER); a search run under
    the other order sends those queries to the brute-force scan: still the reference's neighbours."""
    pts = make_points(2, 400, seed=6, device=device)
    q = make_queries(2, 500, pts, seed=7, device=device)
    rd, ri = knn_reference(q.cpu(), pts.cpu(), 8)
    for built, searched in (("centre", "box"), ("box", "centre"), ("centre", "centre")):
        monkeypatch.setenv("GPAVATAR_KNN_CUDA_ORDER", built)
        index = ops.knn_index(pts, 8, queries=q, backend=backend(device))
        assert index.tensors[0].view(2, -1)[:, 12].tolist() == [float(built == "centre")] * 2  # kGeomOrder
        monkeypatch.setenv("GPAVATAR_KNN_CUDA_ORDER", searched)
        d, i = ops.knn(q, pts, 8, backend=backend(device), index=index)
        assert torch.equal(i.cpu(), ri) and torch.equal(d.cpu(), rd)


def _seeds_by_index(seeds: torch.Tensor, K: int) -> torch.Tensor:
    """(cells * K * 4) seed entries (x, y, z, index bits) -> (cells, K, 4), each cell's by index."""
    cells = seeds.view(-1, K, 4)
    order = cells[..., 3].contiguous().view(torch.int32).argsort(-1)
    return cells.gather(1, order[..., None].expand(-1, -1, 4))


@requires_ext
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("order", ["box", "centre"])
@pytest.mark.parametrize("build", ["two_level", "one_pass", "flat"])
@pytest.mark.parametrize("compact", ["ballot", "match"])
def test_cuda_index_is_the_cpu_layout(cuda_layout, order, build, compact, monkeypatch):
    """The CUDA build and the CPU layout (which every CPU test of this file runs) compute the same
    index bit for bit: geometry, bounds, band sizes, seeds (as a set: ties in a cell's farthest
    distance may pick them in another order) and every list; so the CPU tests cover the CUDA
    kernels' arithmetic (nvcc contracts a * b + c into an FMA unless written with mul_rn/add_rn)."""
    monkeypatch.setenv("GPAVATAR_KNN_CUDA_ORDER", order)
    monkeypatch.setenv("GPAVATAR_KNN_CUDA_BUILD", build)
    monkeypatch.setenv("GPAVATAR_KNN_CUDA_COMPACT", compact)  # (the CPU layout has no such choice)
    pts = make_points(2, 700, seed=21, duplicates=3) * 1.7
    q = make_queries(2, 900, pts, seed=22, far=3) * 1.1
    cpu = _lists(ops.knn_index(pts, 8, queries=q, backend="cpu"))
    gpu = _lists(ops.knn_index(pts.cuda(), 8, queries=q.cuda(), backend="cuda"))
    for name, a, b in zip(("geom", "bound", "band_count"), cpu[:3], gpu[:3]):
        assert torch.equal(a, b), name
    assert torch.equal(_seeds_by_index(cpu[3], 8), _seeds_by_index(gpu[3], 8))
    assert [x is None for x in cpu[4]] == [x is None for x in gpu[4]]
    assert all(x is None or torch.equal(x, y) for x, y in zip(cpu[4], gpu[4]))
