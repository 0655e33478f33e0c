"""Ray sampling ops: ray_box against a brute-force inside test and edge cases, stratified
and importance depths exactly against the references (and importance statistically against
the pdf), merge, reproducible randomness, opcheck, bad inputs."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import gpavatar.ops as ops
from gpavatar.ops.reference import importance_depths_reference, stratified_depths_reference

# The ray ops have C++ kernels only (no Triton: per-ray sampling is short and branchy);
# backend="triton" resolves to the CUDA op on GPUs.  Compare the C++ op with the reference.
CPP_CASES = [pytest.param("cpu", "cpu", id="cpu-cpu")]
if torch.cuda.is_available():
    CPP_CASES.append(pytest.param("cuda", "cuda", id="cuda-cuda", marks=pytest.mark.cuda))


def need_cpp(backend):
    if backend == "cpu" and ("cpu" not in ops.available_backends("cpu") or not hasattr(torch.ops.gpavatar, "ray_box")):
        pytest.skip("extension not built")


def random_rays(R, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    origins = torch.randn(R, 3, generator=g) * 3
    dirs = torch.randn(R, 3, generator=g)
    return origins.to(device), dirs.to(device)


# --- ray_box ---------------------------------------------------------------------------------


def brute_force_hits(origins, dirs, n=20001, t_max=40.0):
    """Whether any of n points o + t d, t in (0, t_max], lies inside the box (a sampled check)."""
    t = torch.linspace(t_max / n, t_max, n, dtype=torch.float64)
    p = origins.double()[:, None, :] + t[None, :, None] * dirs.double()[:, None, :]
    return (p.abs() <= 1).all(-1).any(-1)


@pytest.mark.parametrize("device,backend", CPP_CASES)
def test_ray_box_matches_reference_exactly(device, backend):
    need_cpp(backend)
    o, d = random_rays(3000, device=device)
    d[:300, 0] = 0.0
    d[300:600, 1] = -0.0
    o[600:700, 2] = 1.0  # origins on a slab plane
    d[600:700, 2] = 0.0
    for got, ref in zip(ops.ray_box(o, d, backend=backend), ops.ray_box(o, d, backend="torch")):
        assert torch.equal(got, ref)


@pytest.mark.parametrize("backend", ["torch"] + (["cpu"] if hasattr(torch.ops.gpavatar, "ray_box") else []))
def test_ray_box_against_brute_force(backend):
    o, d = random_rays(2000, seed=1)
    d = d / d.norm(dim=-1, keepdim=True)
    t0, t1, hit = ops.ray_box(o, d, backend=backend)
    inside = brute_force_hits(o, d)
    # Rays that only graze the box within the sampling step may disagree; there are none of those
    # in this seed's 2000 rays except near-misses: require agreement on all but a handful.
    assert int((hit != inside).sum()) <= 2
    h = hit & inside
    entry = o[h] + t0[h, None].clamp_min(0) * d[h]
    exit_ = o[h] + t1[h, None] * d[h]
    assert float(exit_.abs().amax(-1).sub(1).abs().max()) < 1e-4  # the exit lies on the box surface
    outside_origin = o[h].abs().amax(-1) > 1
    assert float(entry[outside_origin].abs().amax(-1).sub(1).abs().max()) < 1e-4
    assert bool((t0[~hit] == -1).all() and (t1[~hit] == -1).all())


@pytest.mark.parametrize("backend", ["torch"] + (["cpu"] if hasattr(torch.ops.gpavatar, "ray_box") else []))
def test_ray_box_edge_cases(backend):
    cases = [
        # origin, dir, t0, t1, hit
        ((0.0, 0.0, -5.0), (0.0, 0.0, 1.0), 4.0, 6.0, True),     # axis parallel
        ((0.0, 0.0, 0.0), (0.0, 0.0, 1.0), -1.0, 1.0, True),     # origin inside: t0 < 0
        ((0.0, 0.0, 5.0), (0.0, 0.0, 1.0), -1.0, -1.0, False),   # pointing away: exit <= 0
        ((1.0, 0.0, -5.0), (0.0, 0.0, 1.0), 4.0, 6.0, True),     # grazing a face (origin on the x = 1 plane)
        ((1.0, 0.0, -5.0), (-0.0, 0.0, 1.0), 4.0, 6.0, True),    # the same with d = -0
        ((1.0, 1.0, -5.0), (0.0, 0.0, 1.0), 4.0, 6.0, True),     # along an edge
        ((1.5, 0.0, -5.0), (0.0, 0.0, 1.0), -1.0, -1.0, False),  # parallel, outside the slab
        ((-3.0, 1.0, 0.0), (1.0, 1.0, 0.0), -1.0, -1.0, False),  # misses past the corner (2, ...)
        ((-2.0, 0.0, 0.0), (1.0, 1.0, 0.0), 1.0, 1.0, True),     # touches the edge (-1, 1) at one point
    ]
    o = torch.tensor([c[0] for c in cases])
    d = torch.tensor([c[1] for c in cases])
    t0, t1, hit = ops.ray_box(o, d, backend=backend)
    assert t0.tolist() == [c[2] for c in cases]
    assert t1.tolist() == [c[3] for c in cases]
    assert hit.tolist() == [c[4] for c in cases]


RAY_BOX_BACKENDS = ["torch"] + (["cpu"] if hasattr(torch.ops.gpavatar, "ray_box") else [])


@pytest.mark.parametrize("backend", RAY_BOX_BACKENDS)
def test_ray_box_degenerate_directions_miss(backend):
    """Issue 13: a zero direction (or 1e-45, where 1 / d overflows) gave t0 / t1 = +-inf and
    hit = True.  A ray without a finite entry and exit misses (t0 = t1 = -1), whatever the
    origin; a tiny but invertible direction still hits with finite (huge) depths."""
    tiny = 1e-45
    cases = [
        # origin, dir, hit
        ((0.0, 0.0, 0.0), (0.0, 0.0, 0.0), False),     # inside, zero direction
        ((0.5, -0.2, 0.9), (-0.0, 0.0, -0.0), False),  # inside, signed zeros
        ((1.0, 1.0, 1.0), (0.0, 0.0, 0.0), False),     # on a corner (NaN slab distances)
        ((3.0, 0.0, 0.0), (0.0, 0.0, 0.0), False),     # outside
        ((0.0, 0.0, 0.0), (tiny, 0.0, 0.0), False),    # 1 / 1e-45 = inf
        ((0.0, 0.0, 0.0), (tiny, -tiny, tiny), False),
        ((0.0, 0.0, -5.0), (0.0, 0.0, tiny), False),   # outside, heading at the box
        ((0.0, 0.0, 0.0), (1e-30, 0.0, 0.0), True),    # 1 / 1e-30 is finite: t = -1e30 .. 1e30
    ]
    o = torch.tensor([c[0] for c in cases])
    d = torch.tensor([c[1] for c in cases])
    t0, t1, hit = ops.ray_box(o, d, backend=backend)
    assert hit.tolist() == [c[2] for c in cases]
    assert bool(t0.isfinite().all() and t1.isfinite().all())
    assert bool((t0[~hit] == -1).all() and (t1[~hit] == -1).all())
    assert t0[-1].item() == pytest.approx(-1e30) and t1[-1].item() == pytest.approx(1e30)
    # the same answers with the checks off and from the reference
    for got, ref in zip(ops.ray_box(o, d, backend=backend, validate=False), ops.ray_box(o, d, backend="torch")):
        assert torch.equal(got, ref)
    # the depths built on the misses stay finite; the 1e30 depths of the tiny direction are
    # beyond what the sampling ops accept: a clear error, not a silent overflow
    assert bool(ops.stratified_depths(t0[:-1], t1[:-1], 4, backend=backend).isfinite().all())
    with pytest.raises(ValueError, match="t0 must hold finite coordinates with"):
        ops.stratified_depths(t0, t1, 4, backend=backend)


@pytest.mark.parametrize("backend", RAY_BOX_BACKENDS)
@pytest.mark.parametrize("box_min,box_max,name", [(-math.inf, 1.0, "box_min"), (-1.0, math.inf, "box_max"),
                                                  (math.nan, 1.0, "box_min"), (-1.0, 1e39, "box_max"),
                                                  (-2e6, 1.0, "box_min")])
def test_ray_box_refuses_infinite_boxes(backend, box_min, box_max, name):
    """An infinite box has no finite entry / exit: a ValueError naming the bound (every backend);
    bounds are coordinates, so |bound| <= 1e6 like them.  The C++ op refuses non-finite float32
    bounds itself (validate=False); the reference then still returns finite depths only (a ray
    with an infinite entry or exit misses)."""
    o, d = random_rays(10)
    with pytest.raises(ValueError, match=f"{name} must be finite"):
        ops.ray_box(o, d, box_min, box_max, backend=backend)
    if backend != "torch" and not math.isfinite(float(torch.tensor([box_min, box_max]).abs().max())):
        with pytest.raises(ValueError, match="box_min and box_max must be finite"):
            ops.ray_box(o, d, box_min, box_max, backend=backend, validate=False)
    if backend == "torch" and (math.isinf(box_min) or math.isinf(box_max)):
        t0, t1, hit = ops.ray_box(o, d, box_min, box_max, backend="torch", validate=False)
        assert bool(t0.isfinite().all() and t1.isfinite().all())
        assert bool((t0[~hit] == -1).all() and (t1[~hit] == -1).all())


# --- stratified ------------------------------------------------------------------------------


@pytest.mark.parametrize("device,backend", CPP_CASES)
@given(R=st.integers(1, 50), S=st.integers(1, 70), jitter=st.booleans(), seed=st.integers(0, 2**16))
def test_stratified_matches_reference(device, backend, R, S, jitter, seed):
    need_cpp(backend)
    g = torch.Generator().manual_seed(seed)
    t0 = torch.rand(R, generator=g) * 10 - 5
    t1 = t0 + torch.rand(R, generator=g) * 4
    t0, t1 = t0.to(device), t1.to(device)
    gens = [torch.Generator(device=device).manual_seed(seed) for _ in range(2)]
    got = ops.stratified_depths(t0, t1, S, jitter, gens[0], backend=backend)
    ref = ops.stratified_depths(t0, t1, S, jitter, gens[1], backend="torch")
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)


def test_stratified_eval_midpoints_and_jitter_strata():
    t0, t1 = torch.tensor([2.0, -1.0]), torch.tensor([4.0, 1.0])
    eval_depths = ops.stratified_depths(t0, t1, 4)
    torch.testing.assert_close(eval_depths, torch.tensor([[2.25, 2.75, 3.25, 3.75], [-0.75, -0.25, 0.25, 0.75]]))
    t0, t1 = torch.full((2000,), 2.0), torch.full((2000,), 4.0)
    d = ops.stratified_depths(t0, t1, 4, True, torch.Generator().manual_seed(0))
    assert bool((d >= 2.0).all() and (d <= 4.0).all())
    assert bool((d.diff(dim=1) >= 0).all())
    # depth k = midpoint of two jittered edges: within [edge_k - h/2, edge_{k+1} + h/2], h = 0.5
    lo = torch.tensor([2.0, 2.25, 2.75, 3.25]) - 1e-6
    hi = torch.tensor([2.75, 3.25, 3.75, 4.0]) + 1e-6
    assert bool(((d >= lo) & (d <= hi)).all())
    # reproducible with the same seed, different with another
    again = ops.stratified_depths(t0, t1, 4, True, torch.Generator().manual_seed(0))
    other = ops.stratified_depths(t0, t1, 4, True, torch.Generator().manual_seed(1))
    assert torch.equal(d, again) and not torch.equal(d, other)


# --- importance ------------------------------------------------------------------------------


def coarse(R, S, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    t0 = torch.rand(R, generator=g) * 2 + 7
    t1 = t0 + 0.5 + torch.rand(R, generator=g) * 2
    depths = stratified_depths_reference(t0, t1, S)
    weights = torch.rand(R, S, generator=g) ** 4
    return depths.to(device), weights.to(device)


def importance_tolerance(depths: torch.Tensor, weights: torch.Tensor, n: int, offset) -> torch.Tensor:
    """(R, n) bounds on how far two float32 implementations of importance_depths may differ: their
    CDFs (sums and prefix sums in another order) differ by rounding, at most about delta = (S + 2)
    2^-24 (values <= 1), so a target u lands anywhere in the inverse CDF of [u - delta, u + delta]:
    a wide interval where the bin's mass is small against its width.  The samples' intervals go
    through the edges (midpoints; the outer ones 1.5 / 0.5) and the outputs (midpoints of edges);
    plus 1e-6 of the depths for the final arithmetic.  In float64 from the reference's formulas."""
    t, w = depths.double().cpu(), weights.double().cpu()
    R, S = t.shape
    pdf = (w + 1e-5) / (w + 1e-5).sum(-1, keepdim=True)
    cdf = pdf.cumsum(-1)
    b = torch.full((R, 1), 0.5, dtype=torch.float64) if offset is None else offset.double().cpu()[:, None]
    u = cdf[:, :1] + (torch.arange(n, dtype=torch.float64) + b) * ((cdf[:, -1:] - cdf[:, :1]) / n)
    delta = (S + 2) * 2.0 ** -24

    def inverse(v):  # the piecewise-linear inverse of cdf over the knots t, clamped to [t_0, t_S-1]
        v = torch.minimum(torch.maximum(v, cdf[:, :1]), cdf[:, -1:])
        p = torch.searchsorted(cdf.contiguous(), v.contiguous(), right=True).clamp(1, S - 1)
        c_lo, c_hi, t_lo, t_hi = cdf.gather(1, p - 1), cdf.gather(1, p), t.gather(1, p - 1), t.gather(1, p)
        return t_lo + (v - c_lo).clamp_min(0) * (t_hi - t_lo) / (c_hi - c_lo).clamp_min(1e-300)

    spread = inverse(u + delta) - inverse(u - delta)  # (R, n) per sample
    edge = torch.cat([1.5 * spread[:, :1] + 0.5 * spread[:, 1:2], 0.5 * (spread[:, 1:] + spread[:, :-1]),
                      1.5 * spread[:, -1:] + 0.5 * spread[:, -2:-1]], dim=1)
    return (0.5 * (edge[:, 1:] + edge[:, :-1]) + 1e-6 * t.abs().amax(-1, keepdim=True)).float()


@pytest.mark.parametrize("device,backend", CPP_CASES)
@given(R=st.integers(1, 40), S=st.integers(2, 70), n=st.integers(2, 70), stratified=st.booleans(),
       zero=st.booleans(), seed=st.integers(0, 2**16))
def test_importance_matches_reference(device, backend, R, S, n, stratified, zero, seed):
    """The kernel against the reference up to the two CDFs' rounding, which moves a sample by up to
    its bin's width times the rounding over the bin's mass (importance_tolerance): tight where a bin
    holds much of the mass, loose only in the near-empty bins a target rarely lands in."""
    need_cpp(backend)
    depths, weights = coarse(R, S, seed, device)
    if zero:
        weights[: R // 2] = 0
    gens = [torch.Generator(device=device).manual_seed(seed) for _ in range(3)]
    got = ops.importance_depths(depths, weights, n, stratified, gens[0], backend=backend)
    ref = ops.importance_depths(depths, weights, n, stratified, gens[1], backend="torch")
    offset = torch.rand(R, generator=gens[2], device=device) if stratified else None  # the ops' draw
    tol = importance_tolerance(depths, weights, n, offset)
    err = (got.cpu() - ref.cpu()).abs()
    assert bool((err <= tol).all()), f"max excess {float((err - tol).max()):.3g} at {divmod(int((err - tol).argmax()), n)}"
    assert bool((got.diff(dim=1) >= -1e-5).all())
    assert bool((got >= depths[:, :1] - 1e-5).all() and (got <= depths[:, -1:] + 1e-5).all())


def test_importance_tolerance_is_tight_where_bins_hold_mass():
    """The bound of test_importance_matches_reference is loose only in near-empty bins: on the coarse
    weights most samples get ~6e-6 of the depth range, on uniform weights every one under 2e-5."""
    depths, weights = coarse(40, 64, seed=5)
    span = float((depths[:, -1] - depths[:, 0]).max())
    assert float(importance_tolerance(depths, weights, 64, None).median()) <= 1e-5 * span
    assert float(importance_tolerance(depths, torch.ones_like(weights), 64, None).max()) <= 2e-5 * span


@pytest.mark.parametrize("backend", ["torch"] + (["cpu"] if hasattr(torch.ops.gpavatar, "ray_box") else []))
def test_importance_zero_weights_are_uniform(backend):
    depths = torch.linspace(0.5, 15.5, 16)[None]  # knots 1 apart
    fine = ops.importance_depths(depths, torch.zeros(1, 16), 30, backend=backend)
    # uniform pdf: the inverted samples are evenly spaced over [t_0, t_15] -> fine depths too
    gaps = fine.diff(dim=1)
    torch.testing.assert_close(gaps, torch.full_like(gaps, 0.5), rtol=0, atol=1e-4)


@pytest.mark.parametrize("backend", ["torch"] + (["cpu"] if hasattr(torch.ops.gpavatar, "ray_box") else []))
def test_importance_follows_the_pdf(backend):
    """Many fine samples: the share falling in each knot interval (t_{j-1}, t_j] approaches pdf_j."""
    S, n = 8, 4000
    depths = torch.arange(S, dtype=torch.float32)[None] + 0.5
    weights = torch.tensor([[0.0, 0.05, 0.4, 0.05, 0.0, 0.3, 0.2, 0.0]])
    fine = ops.importance_depths(depths, weights, n, backend=backend)[0]
    pdf = (weights[0] + 1e-5) / (weights[0] + 1e-5).sum()
    counts = torch.histc(fine, bins=S - 1, min=0.5, max=S - 0.5)
    expected = pdf[1:] / pdf[1:].sum()  # the first knot's mass is never used (SPEC section 8)
    torch.testing.assert_close(counts / counts.sum(), expected, rtol=0, atol=2e-3)


def test_importance_stratified_offsets_are_reproducible():
    depths, weights = coarse(50, 16)
    a = ops.importance_depths(depths, weights, 16, True, torch.Generator().manual_seed(3))
    b = ops.importance_depths(depths, weights, 16, True, torch.Generator().manual_seed(3))
    c = ops.importance_depths(depths, weights, 16, False)
    assert torch.equal(a, b) and not torch.equal(a, c)
    # b = 0.5 in evaluation: the reference with offset 0.5
    torch.testing.assert_close(c, importance_depths_reference(depths, weights, 16, 0.5), rtol=0, atol=1e-5)


# --- merge -----------------------------------------------------------------------------------


@pytest.mark.parametrize("device,backend", CPP_CASES)
@given(R=st.integers(1, 30), Sa=st.integers(0, 40), Sb=st.integers(0, 40), ties=st.booleans(),
       seed=st.integers(0, 2**16))
def test_merge_matches_reference(device, backend, R, Sa, Sb, ties, seed):
    need_cpp(backend)
    g = torch.Generator().manual_seed(seed)
    a = torch.sort(torch.rand(R, Sa, generator=g), dim=1).values
    b = torch.sort(torch.rand(R, Sb, generator=g), dim=1).values
    if ties and Sa and Sb:
        b[:, : min(Sa, Sb)] = a[:, : min(Sa, Sb)]
        b = torch.sort(b, dim=1).values
    got = ops.merge_samples(a.to(device), b.to(device), backend=backend)
    ref = ops.merge_samples(a, b, backend="torch")
    assert torch.equal(got[0].cpu(), ref[0]) and torch.equal(got[1].cpu(), ref[1])
    cat = torch.cat([a, b], dim=1)
    assert torch.equal(ops.gather_samples(cat, ref[1]), ref[0])


def test_gather_samples_keeps_autograd():
    a, b = torch.tensor([[0.1, 0.5]]), torch.tensor([[0.3]])
    _, order = ops.merge_samples(a, b)
    values = torch.randn(1, 3, 2, requires_grad=True)
    merged = ops.gather_samples(values, order)
    assert torch.equal(merged[0, 1], values[0, 2].detach())
    merged.sum().backward()
    assert torch.equal(values.grad, torch.ones(1, 3, 2))


@given(R=st.integers(0, 20), Sa=st.integers(0, 12), Sb=st.integers(0, 12), C=st.sampled_from([None, 1, 5]),
       seed=st.integers(0, 2**16))
def test_merge_values_equals_cat_then_gather(R, Sa, Sb, C, seed):
    """merge_values places both sets straight into merged order: identical to cat + gather,
    forward and backward (a random upstream gradient)."""
    g = torch.Generator().manual_seed(seed)
    da = torch.sort(torch.rand(R, Sa, generator=g), dim=1).values
    db = torch.sort(torch.rand(R, Sb, generator=g), dim=1).values
    _, order = ops.merge_samples(da, db)
    tail = () if C is None else (C,)
    a = torch.randn(R, Sa, *tail, generator=g, requires_grad=True)
    b = torch.randn(R, Sb, *tail, generator=g, requires_grad=True)
    got = ops.merge_values(a, b, order)
    ref = ops.gather_samples(torch.cat([a, b], dim=1), order)
    assert torch.equal(got, ref)
    upstream = torch.randn(ref.shape, generator=g)
    grads = torch.autograd.grad((got * upstream).sum(), (a, b), allow_unused=True)
    ref_grads = torch.autograd.grad((ref * upstream).sum(), (a, b), allow_unused=True)
    for x, y in zip(grads, ref_grads):
        assert (x is None and y is None) or torch.equal(x, y)


def test_merge_values_gradcheck_and_bad_inputs():
    da, db = torch.tensor([[0.1, 0.5, 0.9]]), torch.tensor([[0.3, 0.95]])
    _, order = ops.merge_samples(da, db)
    a = torch.randn(1, 3, 2, dtype=torch.float64, requires_grad=True)
    b = torch.randn(1, 2, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, y: ops.merge_values(x, y, order), (a, b))
    with pytest.raises(ValueError, match="order must be an int64 tensor of shape \\(1, 5\\)"):
        ops.merge_values(a, b, order[:, :4])
    with pytest.raises(ValueError, match="a and b must have shapes"):
        ops.merge_values(a, b[..., :1], order)
    with pytest.raises(TypeError, match="a and b must share dtype"):
        ops.merge_values(a, b.float(), order)


# --- torch.library, bad inputs ---------------------------------------------------------------


def test_opcheck():
    if not hasattr(torch.ops.gpavatar, "ray_box"):
        pytest.skip("extension not built")
    o, d = random_rays(50)
    torch.library.opcheck(torch.ops.gpavatar.ray_box, (o, d, -1.0, 1.0))
    t0, t1, _ = ops.ray_box(o, d)
    torch.library.opcheck(torch.ops.gpavatar.stratified_depths, (t0, t1, 8, None))
    torch.library.opcheck(torch.ops.gpavatar.stratified_depths, (t0, t1, 8, torch.rand(50, 9)))
    depths, weights = coarse(50, 8)
    torch.library.opcheck(torch.ops.gpavatar.importance_depths, (depths, weights, 6, None))
    torch.library.opcheck(torch.ops.gpavatar.importance_depths, (depths, weights, 6, torch.rand(50)))
    torch.library.opcheck(torch.ops.gpavatar.merge_samples, (depths, depths + 0.1))


BAD = [
    (lambda: ops.ray_box(torch.zeros(4, 2), torch.ones(4, 3)), ValueError, ["origins", "(R, 3)"]),
    (lambda: ops.ray_box(torch.zeros(4, 3), torch.ones(5, 3)), ValueError, ["dirs", "(4, 3)"]),
    (lambda: ops.ray_box(torch.zeros(4, 3), torch.ones(4, 3), 1.0, -1.0), ValueError, ["box_min", "box_max"]),
    (lambda: ops.ray_box(torch.full((4, 3), math.nan), torch.ones(4, 3)), ValueError, ["origins", "finite"]),
    (lambda: ops.ray_box(torch.zeros(4, 3, dtype=torch.int32), torch.ones(4, 3)), TypeError, ["origins", "dtype"]),
    (lambda: ops.stratified_depths(torch.zeros(4), torch.ones(5), 8), ValueError, ["t1", "(4,)"]),
    (lambda: ops.stratified_depths(torch.zeros(4), torch.ones(4), 0), ValueError, ["S"]),
    (lambda: ops.stratified_depths(torch.zeros(4), torch.ones(4), 8, jitter=1), TypeError, ["jitter"]),
    (lambda: ops.stratified_depths(torch.zeros(4), torch.ones(4), 8, True, generator=3), TypeError, ["generator"]),
    (lambda: ops.importance_depths(torch.zeros(4, 1), torch.zeros(4, 1), 8), ValueError, ["S >= 2"]),
    (lambda: ops.importance_depths(torch.zeros(4, 5), torch.zeros(4, 6), 8), ValueError, ["weights", "(4, 5)"]),
    (lambda: ops.importance_depths(torch.zeros(4, 5), -torch.ones(4, 5), 8), ValueError, ["weights", ">= 0"]),
    (lambda: ops.importance_depths(torch.zeros(4, 5), torch.zeros(4, 5), 1), ValueError, ["n"]),
    (lambda: ops.merge_samples(torch.zeros(4, 5), torch.zeros(3, 5)), ValueError, ["depths_b", "(4, Sb)"]),
]


@pytest.mark.parametrize("call,exc,words", BAD)
def test_bad_inputs(call, exc, words):
    with pytest.raises(exc) as info:
        call()
    for word in words:
        assert word in str(info.value), str(info.value)
