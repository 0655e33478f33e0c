"""knn's per-cell candidate lists (csrc/knn/knn_cells.h): bit-exact against the reference on
every cloud the other methods are tested on, at every grid size, with overflowing lists,
queries outside the grid and exact distance ties between points at different places.

``GPAVATAR_KNN=cells`` forces the lists (auto uses them from 8192 queries per batch element),
``GPAVATAR_KNN_CELLS`` sets the cells per axis, ``GPAVATAR_KNN_CELL_CAP`` (CPU) and
``GPAVATAR_KNN_CELL_BUDGET`` (CUDA) make lists overflow so their queries take the fallback.
"""

import pytest
import torch
from conftest import BACKEND_CASES, CUDA_SEARCHES
from hypothesis import given
from hypothesis import strategies as st

import gpavatar.ops as ops
from gpavatar.ops._backend import environ as environment  # hypothesis examples share one test call
from gpavatar.ops.reference import knn_reference

# Every fused backend: the C++ kernels (CPU, CUDA) and the Triton kernel (lists built with
# torch ops; under the interpreter on machines without a GPU).
CASES = BACKEND_CASES
# The Triton interpreter runs a program at a time on the CPU: smaller sets there.
INTERPRETED = not torch.cuda.is_available()


def size(backend, n, small):
    return small if backend == "triton" and INTERPRETED else n


def lattice(B, P, g, step=0.125):
    """Points on a lattice: many points at exactly equal distances from lattice queries."""
    return (torch.randint(-6, 7, (B, P, 3), generator=g) * step).float()


def cloud(kind, B, P, g):
    if kind == "lattice":
        return lattice(B, P, g)
    if kind == "sphere":
        v = torch.randn(B, P, 3, generator=g)
        return 0.7 * v / v.norm(dim=-1, keepdim=True)
    if kind == "uniform":
        return torch.rand(B, P, 3, generator=g) * 1.6 - 0.8
    if kind == "plane":
        pts = torch.rand(B, P, 3, generator=g) - 0.5
        pts[..., 1] = 0.25
        return pts
    if kind == "identical":
        return torch.full((B, P, 3), -0.3)
    if kind == "tiny":
        return torch.rand(B, P, 3, generator=g) * 1e-30
    if kind == "offset":
        return 1e5 + torch.rand(B, P, 3, generator=g)
    raise ValueError(kind)


def queries_for(pts, M, g, far=4):
    """Queries around and inside the cloud, on points, on lattice sites, and a few far away."""
    B, P, _ = pts.shape
    lo, hi = pts.amin(dim=(0, 1)), pts.amax(dim=(0, 1))
    span = (hi - lo).clamp_min(1e-30)
    q = lo + (torch.rand(B, M, 3, generator=g) * 1.6 - 0.3) * span
    n = M // 4
    q[:, :n] = pts[:, torch.randint(0, P, (n,), generator=g)]
    q[:, n:2 * n] = (torch.randint(-8, 9, (B, n, 3), generator=g) * 0.0625).float()  # lattice/half sites
    q[:, 2 * n:2 * n + far] = lo + 30.0 * span * torch.randn(B, far, 3, generator=g)
    return q.clamp(-1e6, 1e6)


def check(device, backend, pts, q, K):
    dist, idx = ops.knn(q.to(device), pts.to(device), K, backend=backend)
    ref_dist, ref_idx = knn_reference(q, pts, K)
    assert torch.equal(idx.cpu(), ref_idx)
    assert torch.equal(dist.cpu(), ref_dist)


@pytest.mark.parametrize("device,backend", CASES)
@given(kind=st.sampled_from(["lattice", "sphere", "uniform", "plane", "identical", "tiny", "offset"]),
       B=st.integers(1, 2), P=st.integers(1, 700), K=st.integers(1, 32), G=st.sampled_from([1, 2, 3, 5, 8, 16]),
       seed=st.integers(0, 2**16))
def test_cells_match_the_reference(device, backend, kind, B, P, K, G, seed):
    g = torch.Generator().manual_seed(seed)
    pts = cloud(kind, B, size(backend, P, min(P, 120)), g)
    with environment(GPAVATAR_KNN="cells", GPAVATAR_KNN_CELLS=size(backend, G, min(G, 5))):
        check(device, backend, pts, queries_for(pts, size(backend, 96, 40), g), min(K, pts.shape[1]))


def _cpu_scan_variants():
    """GPAVATAR_KNN_CPU_VARIANT values this machine runs: scalar always, avx2 where the CPU has it."""
    if "cpu" not in ops.available_backends("cpu"):
        return []
    out = ["scalar"]
    with environment(GPAVATAR_KNN="cells", GPAVATAR_KNN_CPU_VARIANT="avx2"):
        try:
            ops.knn(torch.rand(1, 8, 3), torch.rand(1, 30, 3), 2, backend="cpu")
            out.append("avx2")
        except ValueError:
            pass
    return out


@pytest.mark.parametrize("variant", _cpu_scan_variants())
@given(kind=st.sampled_from(["lattice", "sphere", "uniform", "plane", "identical", "tiny", "offset"]),
       B=st.integers(1, 2), P=st.integers(1, 700), K=st.integers(1, 32), G=st.sampled_from([1, 2, 3, 5, 8, 16]),
       M=st.integers(1, 130), seed=st.integers(0, 2**16))
def test_cpu_scan_variants_match_the_reference(variant, kind, B, P, K, G, M, seed):
    """Both loops that scan the CPU lists (8-wide distances with a compare mask, or the scalar
    block loop), on every cloud, with band lengths that are not multiples of 8 (masked loads)."""
    g = torch.Generator().manual_seed(seed)
    pts = cloud(kind, B, P, g)
    with environment(GPAVATAR_KNN="cells", GPAVATAR_KNN_CELLS=G, GPAVATAR_KNN_CPU_VARIANT=variant):
        check("cpu", "cpu", pts, queries_for(pts, max(M, 8), g), min(K, P))
        lat = lattice(B, P, g, step=0.0625)
        q = (torch.randint(-12, 13, (B, M, 3), generator=g) * 0.03125).float()
        check("cpu", "cpu", lat, q, min(K, P))


def walk(B, M, g, start, step):
    """Coherent queries: random walks from ``start`` (B, 3) with steps of about ``step``, some of them
    repeating the previous query exactly (the renderer's samples along a ray, consecutive)."""
    moves = torch.randn(B, M, 3, generator=g) * step
    moves[:, torch.rand(M, generator=g) < 0.2] = 0.0
    return start[:, None, :] + moves.cumsum(dim=1)


@pytest.mark.parametrize("variant", _cpu_scan_variants())
@pytest.mark.parametrize("hint", ["0", "1"])
@given(kind=st.sampled_from(["lattice", "sphere", "uniform", "plane", "identical"]), B=st.integers(1, 2),
       P=st.integers(1, 700), K=st.integers(1, 32), G=st.sampled_from([1, 3, 5, 8]),
       step=st.sampled_from([0.0, 1e-3, 0.03, 0.3]), seed=st.integers(0, 2**16))
def test_cpu_neighbour_hint_on_coherent_queries(variant, hint, kind, B, P, K, G, step, seed):
    """GPAVATAR_KNN_CPU_HINT (default 1): a query next to the previous one starts from the bound of
    that one's K neighbours (cells_cpu::points_bound) instead of its cell's seeds; the result stays
    the reference's bit for bit on walks of small and large steps, repeated queries (the bound is
    then d_K itself: ties at it still admitted) and lattice ties."""
    g = torch.Generator().manual_seed(seed)
    pts = cloud(kind, B, P, g)
    with environment(GPAVATAR_KNN="cells", GPAVATAR_KNN_CELLS=G, GPAVATAR_KNN_CPU_VARIANT=variant,
                     GPAVATAR_KNN_CPU_HINT=hint):
        start = pts[:, torch.randint(0, P, (1,), generator=g)[0]]
        check("cpu", "cpu", pts, walk(B, 300, g, start, step), min(K, P))
        lat = lattice(B, P, g, step=0.0625)
        q = (walk(B, 200, g, lat[:, 0], 0.05) / 0.03125).round() * 0.03125  # lattice sites, in steps
        check("cpu", "cpu", lat, q, min(K, P))


@pytest.mark.parametrize("cache", ["0", "1"])
def test_cpu_list_cache_keeps_the_reference(cache):
    """GPAVATAR_KNN_CPU_CACHE (default 1): calls on the same points reuse the cell lists an earlier
    call built (a frame's two field passes); every call stays the reference's bit for bit: other
    queries inside and beyond the first grid, the points moved in place (the same tensor, the same
    address), other K, G and caps, and more clouds than the cache holds."""
    from gpavatar.ops.knn import cpu_list_cache

    g = torch.Generator().manual_seed(5)
    pts = cloud("sphere", 2, 500, g)
    with environment(GPAVATAR_KNN="cells", GPAVATAR_KNN_CPU_CACHE=cache), cpu_list_cache():
        for _ in range(2):
            check("cpu", "cpu", pts, queries_for(pts, 3000, g), 8)
        check("cpu", "cpu", pts, 3 * queries_for(pts, 3000, g), 8)  # beyond the grid: built again
        pts[:, :250] = 0.5 * pts[:, :250].flip(-1)  # in place: the cached lists are of other points
        check("cpu", "cpu", pts, queries_for(pts, 3000, g), 8)
        for K, G, cap in ((5, None, None), (8, 3, None), (8, None, 40)):
            settings = {k: v for k, v in (("GPAVATAR_KNN_CELLS", G), ("GPAVATAR_KNN_CELL_CAP", cap)) if v is not None}
            with environment(**settings):
                check("cpu", "cpu", pts, queries_for(pts, 3000, g), K)
        clouds = [cloud(kind, 1, 200, g) for kind in ("sphere", "uniform", "plane", "lattice") * 5]  # > 16 held
        for c in clouds + clouds[::-1]:
            check("cpu", "cpu", c, queries_for(c, 600, g), 8)


def test_cpu_list_cache_lives_in_its_blocks(monkeypatch):
    """Lists are kept only inside cpu_list_cache blocks (nested blocks share them) and dropped when
    the outermost block is left: calls outside a block, or in a later block, build their own."""
    from gpavatar.ops.knn import cpu_list_cache

    monkeypatch.setenv("GPAVATAR_KNN", "cells")
    monkeypatch.delenv("GPAVATAR_KNN_CPU_CACHE", raising=False)
    held = torch.ops.gpavatar.knn_cpu_list_cache  # (on) -> clouds held before the call
    g = torch.Generator().manual_seed(3)
    pts = cloud("uniform", 2, 300, g)
    ops.knn(queries_for(pts, 500, g), pts, 4, backend="cpu")  # outside a block: nothing kept
    assert held(True) == 0 and held(False) == 0
    with cpu_list_cache():
        ops.knn(queries_for(pts, 500, g), pts, 4, backend="cpu")
        with cpu_list_cache():
            ops.knn(queries_for(pts, 500, g), pts, 4, backend="cpu")  # the same two clouds: found
            assert held(True) == 2 and held(False) == 2
        assert held(True) == 2 and held(False) == 2  # the inner block left: still held
    assert held(True) == 0 and held(False) == 0  # the outer one left: dropped
    with cpu_list_cache():
        with environment(GPAVATAR_KNN_CPU_CACHE="0"):
            ops.knn(queries_for(pts, 500, g), pts, 4, backend="cpu")
        assert held(True) == 0 and held(False) == 0
    with pytest.raises(ValueError, match="without a block to leave"):
        held(False)


def test_render_is_the_same_with_the_cpu_list_cache():
    """model.render's two passes share their CPU lists inside the renderer's block: the same image."""
    from gpavatar.model import GPAvatar

    torch.manual_seed(0)
    model = GPAvatar("tiny").eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        avatar = model.build_avatar(torch.rand(1, 1, 3, 64, 64, generator=g))
        points = (torch.rand(1, model.config.num_points, 3, generator=g) - 0.5) * 0.5
        camera = torch.tensor([[[1.0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 9]]])
        images = []
        for cache in ("0", "1"):
            with environment(GPAVATAR_KNN="cells", GPAVATAR_KNN_CPU_CACHE=cache):
                images.append(model.render(avatar, points, camera)["image"])
    assert torch.equal(images[0], images[1])


def test_bad_cpu_cache_switch_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("GPAVATAR_KNN", "cells")
    monkeypatch.setenv("GPAVATAR_KNN_CPU_CACHE", "yes")
    with pytest.raises(ValueError, match="GPAVATAR_KNN_CPU_CACHE must be an integer in \\[0, 1\\]"):
        ops.knn(torch.rand(1, 8, 3), torch.rand(1, 30, 3), 2, backend="cpu")


def test_bad_cpu_hint_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("GPAVATAR_KNN", "cells")
    monkeypatch.setenv("GPAVATAR_KNN_CPU_HINT", "2")
    with pytest.raises(ValueError, match="GPAVATAR_KNN_CPU_HINT must be an integer in \\[0, 1\\]"):
        ops.knn(torch.rand(1, 8, 3), torch.rand(1, 30, 3), 2, backend="cpu")


def test_bad_cpu_scan_variant_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("GPAVATAR_KNN", "cells")
    monkeypatch.setenv("GPAVATAR_KNN_CPU_VARIANT", "sse")
    with pytest.raises(ValueError, match="GPAVATAR_KNN_CPU_VARIANT must be auto, avx2 or scalar"):
        ops.knn(torch.rand(1, 8, 3), torch.rand(1, 30, 3), 2, backend="cpu")


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("G", [4, 8, 12])
def test_lattice_ties_across_bands(device, backend, G, monkeypatch):
    """Equal distances from points in different places: the CPU lists are ordered by distance
    band, not by index, and must still keep the lower index first."""
    monkeypatch.setenv("GPAVATAR_KNN", "cells")
    monkeypatch.setenv("GPAVATAR_KNN_CELLS", str(G))
    g = torch.Generator().manual_seed(G)
    pts = lattice(1, size(backend, 3000, 400), g, step=0.0625)
    q = (torch.randint(-12, 13, (1, size(backend, 4000, 64), 3), generator=g) * 0.03125).float()
    for K in (1, 8, 27):
        check(device, backend, pts, q, K)


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("cap", ["0", "1", "40", "200"])
def test_overflowing_lists_fall_back_exactly(device, backend, cap, monkeypatch):
    """Lists longer than the cap (CPU) / beyond the budget (CUDA): their queries take the
    grid or brute-force fallback, with the same answer."""
    monkeypatch.setenv("GPAVATAR_KNN", "cells")
    monkeypatch.setenv("GPAVATAR_KNN_CELL_CAP", cap)
    monkeypatch.setenv("GPAVATAR_KNN_CELL_BUDGET", cap)
    g = torch.Generator().manual_seed(int(cap))
    pts = cloud("sphere", 2, size(backend, 1200, 300), g)
    for M in (size(backend, 300, 40), size(backend, 600, 80)):  # fewer / more fallback queries than the grid threshold
        check(device, backend, pts, queries_for(pts, M, g), 8)


@pytest.mark.parametrize("device,backend", CASES)
def test_auto_uses_cells_on_render_like_samples(device, backend, monkeypatch):
    if backend == "triton" and INTERPRETED:
        pytest.skip("16,384 queries x 5023 points: too slow for the Triton interpreter")
    """Auto picks the lists from 8192 queries on: samples along rays through a box around a
    head-like surface (most in empty space), some far outside (missed rays)."""
    monkeypatch.delenv("GPAVATAR_KNN", raising=False)
    g = torch.Generator().manual_seed(0)
    pts = cloud("sphere", 1, 5023, g) * torch.tensor([0.85, 1.0, 0.9])
    o = torch.tensor([0.0, 0.0, -9.0]) + 0.0 * torch.rand(1, 3)
    d = torch.nn.functional.normalize(torch.rand(512, 3, generator=g) * torch.tensor([0.25, 0.25, 0.0])
                                      - torch.tensor([0.125, 0.125, -1.0]), dim=-1)
    t = 8.0 + torch.linspace(0.0, 2.0, 32)
    q = (o + t[None, :, None] * d[:, None, :]).reshape(1, -1, 3)
    q[:, :64] = o - d[:64]  # missed rays sit at origin - dir
    ref = knn_reference(q, pts, 8)
    monkeypatch.setenv("GPAVATAR_KNN", "brute")
    brute = ops.knn(q.to(device), pts.to(device), 8, backend=backend)
    monkeypatch.delenv("GPAVATAR_KNN")
    auto = ops.knn(q.to(device), pts.to(device), 8, backend=backend)
    for out in (auto, brute):
        assert torch.equal(out.idx.cpu(), ref[1]) and torch.equal(out.dist2.cpu(), ref[0])


def test_bad_environment_is_a_clear_error(monkeypatch):
    q, pts = torch.rand(1, 10, 3), torch.rand(1, 300, 3)
    monkeypatch.setenv("GPAVATAR_KNN", "fastest")
    with pytest.raises(ValueError, match="GPAVATAR_KNN must be one of"):
        ops.knn(q, pts, 4, backend="cpu")
    monkeypatch.setenv("GPAVATAR_KNN", "cells")
    monkeypatch.setenv("GPAVATAR_KNN_CELLS", "0")
    with pytest.raises(ValueError, match="GPAVATAR_KNN_CELLS must be an integer"):
        ops.knn(q, pts, 4, backend="cpu")


# --- the CUDA pipeline's lists and scans, run on the CPU (knn_cells_cuda_layout.h) -------------
# GPAVATAR_KNN_LAYOUT=cuda makes the CPU kernel build the CUDA path's lists (seeds, bands,
# packed entries, batch-wide offsets and budget) and scan them with the same header functions
# the CUDA search kernels call (scan_banded; scan_buffered / scan_grouped with GPAVATAR_KNN_CUDA_SEARCH=buffered / grouped),
# so their arithmetic and layout are tested here without a GPU.  GPAVATAR_KNN_BUFFER (> K) sets
# the buffered scan's slots per query: K + 1 makes it flush after nearly every append.  The scans:
# CUDA_SEARCHES (conftest.py).
# GPAVATAR_KNN_CUDA_BUILD=two_level builds each cell's list from its parent's (knn_cells.h);
# GPAVATAR_KNN_PARENT_CAP forces parents past the cap to the every-point fallback (0: all of
# them, 40: most), and GPAVATAR_KNN_VERIFY_LISTS=1 makes the CPU layout check that its lists
# are the flat build's, entry for entry.  one_pass (the two-level lists in one launch, room
# reserved with an atomic) builds as two_level in the CPU layout (test_one_pass_index_on_the_cpu):
# the CUDA tests run it.
BUILDS = ["flat", "two_level", "two_level:40", "two_level:0"]
CUDA_BUILDS = BUILDS + ["one_pass", "one_pass:40", "one_pass:0"]
# GPAVATAR_KNN_CUDA_ORDER: the lists' bands by mindist^2 to the cell's box (box) or by the distance
# from the cell's centre (centre: knn_cells.h), each with its own stop test.
ORDERS = ["box", "centre"]


def build_environment(build):
    name, _, cap = build.partition(":")
    env = {"GPAVATAR_KNN_CUDA_BUILD": name}
    if name in ("two_level", "one_pass"):
        env.update(GPAVATAR_KNN_PARENT_CAP=cap or "2048", GPAVATAR_KNN_VERIFY_LISTS="1")
    return env


@pytest.mark.parametrize("search", CUDA_SEARCHES)
@given(kind=st.sampled_from(["lattice", "sphere", "uniform", "plane", "identical", "tiny", "offset"]),
       B=st.integers(1, 2), P=st.integers(1, 600), K=st.integers(1, 32), G=st.sampled_from([1, 2, 3, 5, 8, 16]),
       tight_buffer=st.booleans(), build=st.sampled_from(BUILDS), order=st.sampled_from(ORDERS),
       seed=st.integers(0, 2**16))
def test_cuda_layout_matches_the_reference(search, kind, B, P, K, G, tight_buffer, build, order, seed):
    g = torch.Generator().manual_seed(seed)
    pts = cloud(kind, B, P, g)
    K = min(K, P)
    extra = {"GPAVATAR_KNN_BUFFER": K + 1} if tight_buffer else {}
    with environment(GPAVATAR_KNN="cells", GPAVATAR_KNN_LAYOUT="cuda", GPAVATAR_KNN_CUDA_SEARCH=search,
                     GPAVATAR_KNN_CELLS=G, GPAVATAR_KNN_CUDA_ORDER=order, **build_environment(build), **extra):
        check("cpu", "cpu", pts, queries_for(pts, 96, g), K)


@pytest.mark.parametrize("search", CUDA_SEARCHES)
@pytest.mark.parametrize("budget", ["0", "3", "40", "768"])
@pytest.mark.parametrize("build", BUILDS[:2])
@pytest.mark.parametrize("order", ORDERS)
def test_cuda_layout_lattice_ties_and_overflow(search, budget, build, order, monkeypatch):
    """Exact ties between points in different bands, lists beyond the budget (their queries take
    the fallback), a buffer that flushes often."""
    for name, value in (("GPAVATAR_KNN", "cells"), ("GPAVATAR_KNN_LAYOUT", "cuda"),
                        ("GPAVATAR_KNN_CUDA_SEARCH", search), ("GPAVATAR_KNN_CELL_BUDGET", budget),
                        ("GPAVATAR_KNN_CELLS", "6"), ("GPAVATAR_KNN_CUDA_ORDER", order),
                        *build_environment(build).items()):
        monkeypatch.setenv(name, value)
    g = torch.Generator().manual_seed(int(budget))
    pts = lattice(2, 1500, g, step=0.0625)
    q = (torch.randint(-12, 13, (2, 800, 3), generator=g) * 0.03125).float()
    for K in (1, 8, 27):
        monkeypatch.setenv("GPAVATAR_KNN_BUFFER", str(K + 2))
        check("cpu", "cpu", pts, q, K)


def test_cuda_layout_on_render_samples(monkeypatch):
    """The paper's regime at a CPU-sized scale: samples along rays through a head-sized sphere."""
    g = torch.Generator().manual_seed(1)
    pts = cloud("sphere", 1, 5023, g) * torch.tensor([0.85, 1.0, 0.9])
    o = torch.tensor([0.0, 0.0, -9.0])
    d = torch.nn.functional.normalize(torch.rand(256, 3, generator=g) * torch.tensor([0.25, 0.25, 0.0])
                                      - torch.tensor([0.125, 0.125, -1.0]), dim=-1)
    t = 8.0 + torch.linspace(0.0, 2.0, 32)
    q = (o + t[None, :, None] * d[:, None, :]).reshape(1, -1, 3)
    monkeypatch.setenv("GPAVATAR_KNN", "cells")
    monkeypatch.setenv("GPAVATAR_KNN_LAYOUT", "cuda")
    for search in CUDA_SEARCHES:
        for build in BUILDS[:2]:
            for order in ORDERS:
                monkeypatch.setenv("GPAVATAR_KNN_CUDA_SEARCH", search)
                monkeypatch.setenv("GPAVATAR_KNN_CUDA_ORDER", order)
                for name, value in build_environment(build).items():
                    monkeypatch.setenv(name, value)
                check("cpu", "cpu", pts, q, 8)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("search", CUDA_SEARCHES)
@pytest.mark.parametrize("budget", ["3", "768"])
@pytest.mark.parametrize("build", CUDA_BUILDS)
@pytest.mark.parametrize("order", ORDERS)
def test_cuda_searches_match_the_reference(search, budget, build, order, monkeypatch):
    """Every CUDA scan, with and without overflowing lists, every list build (and parents past
    the cap) and band order, bit-identical to the reference."""
    for name, value in build_environment(build).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("GPAVATAR_KNN_CUDA_ORDER", order)
    monkeypatch.setenv("GPAVATAR_KNN", "cells")
    monkeypatch.setenv("GPAVATAR_KNN_CUDA_SEARCH", search)
    monkeypatch.setenv("GPAVATAR_KNN_CELL_BUDGET", budget)
    g = torch.Generator().manual_seed(5)
    for kind in ("sphere", "lattice", "uniform"):
        pts = cloud(kind, 2, 1500, g)
        q = queries_for(pts, 3000, g)
        for K in (1, 8, 16, 32):
            check("cuda", "cuda", pts, q, K)


def test_bad_layout_environment_is_a_clear_error(monkeypatch):
    q, pts = torch.rand(1, 10, 3), torch.rand(1, 300, 3)
    monkeypatch.setenv("GPAVATAR_KNN", "cells")
    monkeypatch.setenv("GPAVATAR_KNN_LAYOUT", "gpu")
    with pytest.raises(ValueError, match="GPAVATAR_KNN_LAYOUT must be cpu or cuda"):
        ops.knn(q, pts, 4, backend="cpu")
    monkeypatch.setenv("GPAVATAR_KNN_LAYOUT", "cuda")
    monkeypatch.setenv("GPAVATAR_KNN_CUDA_SEARCH", "fast")
    with pytest.raises(ValueError, match="GPAVATAR_KNN_CUDA_SEARCH must be banded, unrolled, buffered or grouped"):
        ops.knn(q, pts, 4, backend="cpu")
    monkeypatch.setenv("GPAVATAR_KNN_CUDA_SEARCH", "banded")
    monkeypatch.setenv("GPAVATAR_KNN_CUDA_BUILD", "tree")
    with pytest.raises(ValueError, match="GPAVATAR_KNN_CUDA_BUILD must be flat, two_level or one_pass"):
        ops.knn(q, pts, 4, backend="cpu")
    monkeypatch.setenv("GPAVATAR_KNN_CUDA_BUILD", "two_level")
    monkeypatch.setenv("GPAVATAR_KNN_CUDA_ORDER", "middle")
    with pytest.raises(ValueError, match="GPAVATAR_KNN_CUDA_ORDER must be box or centre"):
        ops.knn(q, pts, 4, backend="cpu")
    monkeypatch.setenv("GPAVATAR_KNN_CUDA_ORDER", "centre")
    monkeypatch.setenv("GPAVATAR_KNN_CUDA_COMPACT", "sort")
    with pytest.raises(ValueError, match="GPAVATAR_KNN_CUDA_COMPACT must be ballot or match"):
        ops.knn(q, pts, 4, backend="cpu")
    monkeypatch.setenv("GPAVATAR_KNN_CUDA_COMPACT", "match")
    monkeypatch.setenv("GPAVATAR_KNN_PARENT_CAP", "5000")
    with pytest.raises(ValueError, match="GPAVATAR_KNN_PARENT_CAP must be an integer"):
        ops.knn(q, pts, 4, backend="cpu")
    monkeypatch.delenv("GPAVATAR_KNN_PARENT_CAP")
    monkeypatch.setenv("GPAVATAR_KNN_CUDA_SEARCH", "buffered")
    monkeypatch.setenv("GPAVATAR_KNN_BUFFER", "4")
    with pytest.raises(ValueError, match="GPAVATAR_KNN_BUFFER must be an integer"):
        ops.knn(q, pts, 4, backend="cpu")
