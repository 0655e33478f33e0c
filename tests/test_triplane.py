"""triplane_sample: every backend against the reference (forward, backward to planes and
coordinates), both layouts, half planes, texel centres / borders / outside points,
determinism, gradcheck, finite differences of the CPU kernel, opcheck, bad inputs."""

import pytest
import torch
from _dispatch import OpCalls
from conftest import BACKEND_CASES
from hypothesis import given
from hypothesis import strategies as st

import gpavatar.ops as ops
from gpavatar.ops.reference import triplane_sample_reference

# Tolerances.  The kernels evaluate grid_sample's float32 arithmetic; the reference runs in
# float64 on the same (float32) inputs, so the forward differs by float32 rounding of a
# 12-term weighted sum of O(1) values: ~1e-6.  A wrong corner, weight or plane moves outputs
# by ~1e-1.  Plane gradients sum a few contributions per texel (same order of error);
# coordinate gradients carry a factor W/2 and a sum over C channels, so they are compared
# relative to their largest magnitude.
FWD = dict(rtol=1e-5, atol=1e-5)
PLANE_GRAD = dict(rtol=1e-4, atol=1e-5)
COORD_RTOL = 1e-4


def make_planes(B, C, H, W, seed=0, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 3, C, H, W, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)


def texel_centre(i, n):
    return -1.0 + (2 * i + 1) / n


def make_coords(B, M, H, W, seed=1, special=True, device="cpu"):
    """(B, M, 3) coordinates and a (B, M) mask of 'generic' points.

    Generic points are uniform in [-1.25, 1.25]^3 (some just outside the volume) and at
    least 1e-3 texel away from a texel boundary in every plane (the coordinate gradient
    jumps across texel boundaries: one-sided derivatives of float32 and float64 inputs may
    pick different sides there).  With ``special`` the first points are texel centres,
    borders (+-1) and far-outside points (5, 1e5); those are compared for values and plane
    gradients, not coordinate gradients.
    """
    gen = torch.Generator().manual_seed(seed)
    c = torch.rand(B, M, 3, generator=gen, dtype=torch.float64) * 2.5 - 1.25
    if special:
        rows = []
        rows.append([texel_centre(0, W), texel_centre(H - 1, H), texel_centre(0, H)])  # corner centres
        rows.append([texel_centre(W // 2, W), texel_centre(H // 2, H), texel_centre(W // 3, W)])
        rows += [[1.0, -1.0, 1.0], [-1.0, 1.0, -1.0], [1.0, 0.3, -1.0]]  # on the border
        rows += [[5.0, 0.0, 0.0], [0.0, -5.0, 0.0], [1e5, 1e5, 1e5], [-1e6, 0.2, 0.1]]  # outside
        special_rows = torch.tensor(rows, dtype=torch.float64)[:M]
        c[:, : len(special_rows)] = special_rows
    c = c.float()
    generic = torch.ones(B, M, dtype=torch.bool)
    if special:
        generic[:, : min(M, 9)] = False
    # Move generic points off texel boundaries: fractional texel position in [1e-3, 1 - 1e-3].
    for axis, sizes in ((0, [W]), (1, [H]), (2, [H, W])):  # z: height of plane 1, width of plane 2
        for n in sizes:
            pos = ((c[..., axis].double() + 1) * n - 1) / 2
            frac = pos - pos.floor()
            near = (frac < 1e-3) | (frac > 1 - 1e-3)
            generic &= ~near
    return c.to(device), generic.to(device)


def run(backend, planes, coords, reduce, grad_out, channels_last=False, deterministic=False):
    """Output and (planes, coords) gradients; planes are given as (B, 3, C, H, W)."""
    p = planes.detach().clone()
    if backend == "reference":  # float64 leaves: float64 gradients
        p = p.double()
    if channels_last:
        p = p.permute(0, 1, 3, 4, 2).contiguous()
    p.requires_grad_()
    c = coords.detach().clone()
    c = (c.double() if backend == "reference" else c).requires_grad_()
    if backend == "reference":
        out = triplane_sample_reference(p, c, reduce)
    else:
        out = ops.triplane_sample(p, c, reduce, channels_last=channels_last, deterministic=deterministic,
                                  backend=backend)
    gp, gc = torch.autograd.grad(out, (p, c), grad_out.to(out.dtype))
    if channels_last:
        gp = gp.permute(0, 1, 4, 2, 3)
    return out, gp, gc


def check_against_reference(device, backend, B, M, C, H, W, reduce="mean", channels_last=False,
                            deterministic=False, dtype=torch.float32, seed=0, special=True):
    planes = make_planes(B, C, H, W, seed=seed, dtype=dtype, device=device)
    coords, generic = make_coords(B, M, H, W, seed=seed + 1, special=special, device=device)
    width = 3 * C if reduce == "concat" else C
    grad_out = torch.randn(B, M, width, generator=torch.Generator().manual_seed(seed + 2)).to(device)
    out, gp, gc = run(backend, planes, coords, reduce, grad_out, channels_last, deterministic)
    rout, rgp, rgc = run("reference", planes.float(), coords, reduce, grad_out)
    assert out.dtype == torch.float32 and out.shape == (B, M, width)
    assert gp.dtype == dtype and gc.dtype == torch.float32
    assert bool(out.isfinite().all()) and bool(gp.isfinite().all()) and bool(gc.isfinite().all())
    torch.testing.assert_close(out.double(), rout, **FWD)
    if dtype == torch.float32:
        torch.testing.assert_close(gp.double(), rgp, **PLANE_GRAD)
    else:  # one rounding of a float32 sum to the planes' dtype
        torch.testing.assert_close(gp.double(), rgp.to(dtype).double(), rtol=1e-2, atol=1e-2)
    scale = max(1.0, float(rgc.abs().max()))
    torch.testing.assert_close(gc.double()[generic], rgc[generic], rtol=COORD_RTOL, atol=COORD_RTOL * scale)
    return out, gp, gc


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
@given(B=st.integers(1, 3), M=st.integers(1, 40), C=st.integers(1, 40), H=st.integers(1, 17), W=st.integers(1, 17),
       concat=st.booleans(), channels_last=st.booleans(), deterministic=st.booleans(),
       seed=st.integers(0, 2**16))
def test_triplane_matches_reference(device, backend, B, M, C, H, W, concat, channels_last, deterministic, seed):
    check_against_reference(device, backend, B, M, C, H, W, "concat" if concat else "mean", channels_last,
                            deterministic, seed=seed)


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
@pytest.mark.parametrize("B,M,C,H,W", [
    (1, 1, 32, 16, 16),     # M = 1, paper channels
    (2, 50, 1, 1, 1),       # one texel, one channel
    (1, 40, 3, 5, 9),       # odd C, H != W
    (1, 60, 33, 8, 4),      # C not a multiple of 4, W < H
    (2, 30, 130, 6, 7),     # C beyond one channel block (CPU 64) and one warp of vectors (CUDA 128)
    (1, 200, 32, 64, 48),   # many points per texel row
])
@pytest.mark.parametrize("reduce", ["mean", "concat"])
@pytest.mark.parametrize("deterministic", [False, True])
def test_triplane_shapes(device, backend, B, M, C, H, W, reduce, deterministic):
    check_against_reference(device, backend, B, M, C, H, W, reduce, deterministic=deterministic)
    check_against_reference(device, backend, B, M, C, H, W, reduce, channels_last=True, deterministic=deterministic)


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_half_planes_accumulate_in_float32(device, backend, dtype, channels_last):
    """Half planes are read as they are (the reference sees the same rounded values in float32)."""
    for reduce in ("mean", "concat"):
        check_against_reference(device, backend, 2, 50, 8, 9, 11, reduce, channels_last, dtype=dtype)


def test_torch_backend_half_planes_and_float64():
    planes, (coords, _) = make_planes(1, 4, 5, 6), make_coords(1, 20, 5, 6)
    out = ops.triplane_sample(planes.bfloat16(), coords, backend="torch")
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, triplane_sample_reference(planes.bfloat16().float(), coords))
    assert ops.triplane_sample(planes.double(), coords.double(), backend="torch").dtype == torch.float64


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_texel_centres_read_texels_exactly(device, backend):
    """A point on a texel centre of every plane reads (the mean of) those texels."""
    C, H, W = 4, 6, 6
    planes = make_planes(1, C, H, W, seed=3, device=device)
    i, j, k = 1, 4, 2  # x on column i, y on row j, z on column/row k
    x, y, z = texel_centre(i, W), texel_centre(j, H), texel_centre(k, W)
    coords = torch.tensor([[[x, y, z]]], device=device)
    out = ops.triplane_sample(planes, coords, "concat", backend=backend)[0, 0]
    expected = torch.cat([planes[0, 0, :, j, i], planes[0, 1, :, k, i], planes[0, 2, :, j, k]])
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_border_blends_with_zero_padding(device, backend):
    """At x = +-1 a point sits half a texel beyond the outer texel centre: half its value."""
    C, H, W = 3, 4, 5
    planes = make_planes(1, C, H, W, seed=4, device=device)
    y = texel_centre(2, H)
    coords = torch.tensor([[[1.0, y, texel_centre(0, W)], [-1.0, y, texel_centre(0, W)]]], device=device)
    out = ops.triplane_sample(planes, coords, "concat", backend=backend)[0]
    torch.testing.assert_close(out[0, :C], 0.5 * planes[0, 0, :, 2, W - 1], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out[1, :C], 0.5 * planes[0, 0, :, 2, 0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_outside_points_read_zero_and_get_zero_gradient(device, backend):
    planes = make_planes(2, 5, 7, 8, device=device).requires_grad_()
    # Every plane reads two of the three coordinates: two far coordinates miss all planes.
    far = torch.tensor([[5.0, 5.0, 0.0], [0.0, -5.0, -5.0], [5.0, 0.0, 5.0], [1e5, -1e5, 1e6], [-1e6, -1e6, -1e6],
                        [1.0 + 2.0 / 7, 1.0 + 2.0 / 7, 1.0 + 2.0 / 7]], device=device)
    coords = far.expand(2, -1, -1).contiguous().requires_grad_()
    out = ops.triplane_sample(planes, coords, "concat", backend=backend)
    assert float(out.detach().abs().max()) == 0.0
    gp, gc = torch.autograd.grad(out, (planes, coords), torch.ones_like(out))
    assert float(gp.abs().max()) == 0.0 and float(gc.abs().max()) == 0.0


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_deterministic_backward_is_bitwise_reproducible(device, backend):
    planes = make_planes(1, 8, 6, 6, device=device)
    coords, _ = make_coords(1, 400, 6, 6, seed=5, device=device)  # ~10 points per texel: many sums
    grad_out = torch.randn(1, 400, 8, generator=torch.Generator().manual_seed(6)).to(device)
    first = run(backend, planes, coords, "mean", grad_out, deterministic=True)
    second = run(backend, planes, coords, "mean", grad_out, deterministic=True)
    fast = run(backend, planes, coords, "mean", grad_out, deterministic=False)
    for a, b, c in zip(first, second, fast):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_only_the_needed_gradient(device, backend):
    planes = make_planes(1, 4, 5, 5, device=device)
    coords, _ = make_coords(1, 30, 5, 5, device=device)
    grad_out = torch.randn(1, 30, 4).to(device)
    _, rgp, rgc = run("reference", planes, coords, "mean", grad_out)
    p = planes.clone().requires_grad_()
    (gp,) = torch.autograd.grad(ops.triplane_sample(p, coords, backend=backend), p, grad_out)
    torch.testing.assert_close(gp.double(), rgp, **PLANE_GRAD)
    c = coords.clone().requires_grad_()
    (gc,) = torch.autograd.grad(ops.triplane_sample(planes, c, backend=backend), c, grad_out)
    assert gc.shape == coords.shape
    with torch.no_grad():
        assert not ops.triplane_sample(p, c, backend=backend).requires_grad


@pytest.mark.parametrize("device,backend", BACKEND_CASES + [pytest.param("cpu", "torch", id="cpu-torch")])
@pytest.mark.parametrize("shape", [(2, 0, 4, 3, 3), (0, 5, 4, 3, 3), (1, 5, 0, 3, 3)])
def test_empty(device, backend, shape):
    B, M, C, H, W = shape
    planes = torch.randn(B, 3, C, H, W, device=device, requires_grad=True)
    coords = torch.zeros(B, M, 3, device=device, requires_grad=True)
    out = ops.triplane_sample(planes, coords, "concat", backend=backend)
    assert out.shape == (B, M, 3 * C)
    out.sum().backward()
    assert planes.grad.shape == planes.shape and float(planes.grad.abs().sum()) == 0.0
    assert coords.grad.shape == coords.shape and float(coords.grad.abs().sum()) == 0.0


def test_reference_gradcheck_float64():
    planes = make_planes(2, 3, 4, 5, seed=7, dtype=torch.float64).requires_grad_()
    coords, generic = make_coords(2, 12, 4, 5, seed=8, special=False)
    assert bool(generic.all())
    coords = coords.double().requires_grad_()
    for reduce in ("mean", "concat"):
        assert torch.autograd.gradcheck(lambda p, c: ops.triplane_sample(p, c, reduce, backend="torch"),
                                        (planes, coords), eps=1e-6, atol=1e-5)
        assert torch.autograd.gradcheck(
            lambda p, c: ops.triplane_sample(p.permute(0, 1, 3, 4, 2), c, reduce, channels_last=True,
                                             backend="torch"), (planes, coords), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("reduce", ["mean", "concat"])
def test_cpu_kernel_backward_finite_differences(reduce):
    """Directional derivatives of the CPU kernel's own forward vs its backward (float32)."""
    if "cpu" not in ops.available_backends("cpu"):
        pytest.skip("extension not built")
    C, H, W = 5, 6, 7
    planes = make_planes(1, C, H, W, seed=9)
    coords, generic = make_coords(1, 40, H, W, seed=10, special=False)
    coords = coords[generic][None]  # 1e-3 texel from any boundary: h below keeps each point in its cell
    g = torch.Generator().manual_seed(11)
    grad_out = torch.randn(1, coords.shape[1], 3 * C if reduce == "concat" else C, generator=g)

    def loss(p, c):
        out = ops.triplane_sample(p, c, reduce, backend="cpu")
        return (out.double() * grad_out.double()).sum()

    p, c = planes.clone().requires_grad_(), coords.clone().requires_grad_()
    gp, gc = torch.autograd.grad(loss(p, c), (p, c))
    # Linear in the planes: central differences are exact up to float32 rounding.
    d = torch.randn(planes.shape, generator=g)
    with torch.no_grad():
        numeric = (loss(planes + d, coords) - loss(planes - d, coords)) / 2
    analytic = (gp.double() * d).sum()
    assert abs(numeric - analytic) <= 1e-4 * max(1.0, abs(analytic)), (numeric.item(), analytic.item())
    # Bilinear in each cell: h = 1e-4 of a texel stays inside the cell; float32 noise ~1e-7 / 1e-4 relative.
    h = 1e-4 * 2.0 / max(H, W)
    d = torch.randn(coords.shape, generator=g)
    with torch.no_grad():
        numeric = (loss(planes, coords + h * d) - loss(planes, coords - h * d)) / (2 * h)
    analytic = (gc.double() * d).sum()
    assert abs(numeric - analytic) <= 1e-2 * max(1.0, abs(analytic)), (numeric.item(), analytic.item())


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_opcheck(device, backend):
    cpp = backend in ("cpu", "cuda")
    fwd = torch.ops.gpavatar.triplane_sample_forward if cpp else torch.ops.gpavatar.triplane_sample_forward_triton
    bwd = torch.ops.gpavatar.triplane_sample_backward if cpp else torch.ops.gpavatar.triplane_sample_backward_triton
    planes = make_planes(2, 6, 5, 4, device=device).permute(0, 1, 3, 4, 2).contiguous()
    coords, _ = make_coords(2, 20, 5, 4, special=False, device=device)
    for concat in (False, True):
        for deterministic in (False, True):
            torch.library.opcheck(fwd, (planes.requires_grad_(), coords.requires_grad_(), concat, deterministic))
            grad_out = torch.randn(2, 20, 18 if concat else 6, device=device)
            for need in ((True, True), (True, False), (False, True)):
                torch.library.opcheck(bwd, (grad_out, planes.detach(), coords.detach(), concat, deterministic, *need))


def test_torch_compile_traces_the_op():
    backend = "cpu" if "cpu" in ops.available_backends("cpu") else "torch"
    planes = make_planes(1, 4, 6, 6).requires_grad_()
    coords, _ = make_coords(1, 25, 6, 6, special=False)
    coords.requires_grad_()

    def f(p, c):
        return ops.triplane_sample(p, c, "concat", backend=backend)

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    out = compiled(planes, coords)
    torch.testing.assert_close(out, f(planes, coords))
    out.sum().backward()
    assert planes.grad is not None and coords.grad is not None


def _bad(**changes):
    args = dict(planes=torch.zeros(1, 3, 4, 5, 6), coords=torch.zeros(1, 7, 3))
    args.update(changes)
    return args


BAD = [
    (_bad(planes=torch.zeros(1, 2, 4, 5, 6)), ValueError, ["planes", "3 planes"]),
    (_bad(planes=torch.zeros(3, 4, 5, 6)), ValueError, ["planes", "(B, 3, C, H, W)"]),
    (_bad(planes=torch.zeros(1, 3, 4, 0, 6)), ValueError, ["planes", "H >= 1"]),
    (_bad(planes=torch.zeros(1, 3, 4, 5, 6, dtype=torch.int32)), TypeError, ["planes", "dtype"]),
    (_bad(coords=torch.zeros(2, 7, 3)), ValueError, ["batch size"]),
    (_bad(coords=torch.zeros(1, 7, 2)), ValueError, ["coords", "(B, M, 3)"]),
    (_bad(coords=torch.zeros(7, 3)), ValueError, ["coords", "(B, M, 3)"]),
    (_bad(coords=torch.zeros(1, 7, 3, dtype=torch.int64)), TypeError, ["coords", "dtype"]),
    (_bad(coords=torch.full((1, 7, 3), float("nan"))), ValueError, ["coords", "finite"]),
    (_bad(coords=torch.full((1, 7, 3), 2e6)), ValueError, ["coords", "1e+06"]),
    (_bad(coords=[[0.0, 0.0, 0.0]]), TypeError, ["coords", "torch.Tensor"]),
    (_bad(reduce="sum"), ValueError, ["reduce"]),
    (_bad(channels_last=1), TypeError, ["channels_last"]),
    (_bad(deterministic="yes"), TypeError, ["deterministic"]),
    (_bad(channels_last=True, planes=torch.zeros(1, 3, 0, 5, 6)), ValueError, ["(B, 3, H, W, C)", "H >= 1"]),
]


@pytest.mark.parametrize("backend", ["torch"] + [b for b in ops.available_backends("cpu") if b != "torch"])
@pytest.mark.parametrize("args,exc,words", BAD)
def test_bad_inputs(backend, args, exc, words):
    with pytest.raises(exc) as info:
        ops.triplane_sample(**args, backend=backend)
    for word in words:
        assert word in str(info.value), str(info.value)


def test_bad_device_mix():
    other = "cuda" if torch.cuda.is_available() else "meta"
    with pytest.raises(ValueError, match="coords must be on the same device as planes"):
        ops.triplane_sample(torch.zeros(1, 3, 4, 5, 6), torch.zeros(1, 7, 3, device=other))


def test_low_level_op_checks_its_inputs():
    """The C++ op validates too (ValueError / TypeError, never a crash)."""
    if "cpu" not in ops.available_backends("cpu"):
        pytest.skip("extension not built")
    op, bwd = torch.ops.gpavatar.triplane_sample_forward, torch.ops.gpavatar.triplane_sample_backward
    planes, coords = torch.zeros(1, 3, 5, 6, 4), torch.zeros(1, 7, 3)
    with pytest.raises(ValueError, match="planes must be contiguous"):
        op(torch.zeros(1, 3, 4, 5, 6).permute(0, 1, 3, 4, 2), coords, False, False)
    with pytest.raises(TypeError, match="planes must be float32, float16 or bfloat16"):
        op(planes.double(), coords, False, False)
    with pytest.raises(ValueError, match=r"planes must have shape \(B, 3, H, W, C\)"):
        op(torch.zeros(1, 2, 5, 6, 4), coords, False, False)
    with pytest.raises(ValueError, match="coords must have shape"):
        op(planes, torch.zeros(2, 7, 3), False, False)
    with pytest.raises(ValueError, match="grad_out must have shape"):
        bwd(torch.zeros(1, 7, 4), planes, coords, True, False, True, True)


# --- triplane_features: [tri-plane features, extra] rows in one kernel (inference) --------------

@pytest.mark.parametrize("device,backend", BACKEND_CASES)
@given(B=st.integers(0, 2), M=st.integers(0, 17), C=st.integers(1, 9), E=st.integers(0, 9),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]), seed=st.integers(0, 2**16))
def test_triplane_features_are_sample_and_concatenation(device, backend, B, M, C, E, dtype, seed):
    """Bit for bit the concatenation of the mean tri-plane features and extra, on every backend (the
    C++ op on cpu / cuda: the extension's forward-only kernel), points inside and outside the box,
    16-bit planes, E = 0 and widths that are not a multiple of 4 (the CUDA kernel's vector path)."""
    planes = make_planes(B, C, 5, 4, seed=seed, dtype=dtype, device=device).permute(0, 1, 3, 4, 2).contiguous()
    coords, _ = make_coords(B, M, 5, 4, seed=seed + 1, device=device)
    extra = torch.randn(B, M, E, generator=torch.Generator().manual_seed(seed)).to(device)
    with torch.no_grad():
        out = ops.triplane_features(planes, coords, extra, backend=backend)
        ref = torch.cat([ops.triplane_sample(planes, coords, "mean", channels_last=True, backend=backend), extra], -1)
    assert out.shape == (B, M, C + E) and out.dtype == torch.float32
    assert torch.equal(out, ref)


def test_triplane_features_use_the_kernel_without_grad_and_the_concatenation_with_it():
    if "cpu" not in ops.available_backends("cpu") or not hasattr(torch.ops.gpavatar, "triplane_sample_forward_extra"):
        pytest.skip("needs the extension")
    planes = make_planes(1, 8, 6, 6).permute(0, 1, 3, 4, 2).contiguous()
    coords, _ = make_coords(1, 30, 6, 6)
    extra = torch.randn(1, 30, 5)

    with torch.no_grad(), OpCalls() as seen:
        fused = ops.triplane_features(planes, coords, extra, backend="cpu")
    assert "triplane_sample_forward_extra" in seen.names and "cat" not in seen.names
    extra.requires_grad_(True)
    with OpCalls() as seen:
        out = ops.triplane_features(planes, coords, extra, backend="cpu")
    assert "cat" in seen.names and torch.equal(out, fused)
    (grad,) = torch.autograd.grad(out[..., 8:].sum(), [extra])
    assert torch.equal(grad, torch.ones_like(extra))


@pytest.mark.parametrize("device,backend", [c for c in BACKEND_CASES if c.values[1] in ("cpu", "cuda")])
def test_triplane_features_opcheck(device, backend):
    if not hasattr(torch.ops.gpavatar, "triplane_sample_forward_extra"):
        pytest.skip("needs the extension")
    planes = make_planes(2, 6, 5, 4, device=device).permute(0, 1, 3, 4, 2).contiguous()
    coords, _ = make_coords(2, 20, 5, 4, special=False, device=device)
    torch.library.opcheck(torch.ops.gpavatar.triplane_sample_forward_extra,
                          (planes, coords, torch.randn(2, 20, 8, device=device)))


@pytest.mark.parametrize("extra,words", [
    (torch.zeros(1, 7, 4), "extra must have shape (1, 6, E)"),
    (torch.zeros(2, 6, 4), "extra must have shape (1, 6, E)"),
    (torch.zeros(1, 6), "extra"),
])
def test_triplane_features_bad_extra(extra, words):
    planes = make_planes(1, 3, 4, 4).permute(0, 1, 3, 4, 2).contiguous()
    coords, _ = make_coords(1, 6, 4, 4)
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
        ops.triplane_features(planes, coords, extra)
    if hasattr(torch.ops.gpavatar, "triplane_sample_forward_extra") and extra.dim() == 3:
        with pytest.raises(ValueError, match="extra must have shape"):
            torch.ops.gpavatar.triplane_sample_forward_extra(planes, coords.float(), extra)
