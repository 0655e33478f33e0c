"""VolumeRenderer: camera rays, an analytic field against its closed form, backends agree,
gradients through both passes, stratified reproducibility, bad input.

Camera used throughout: ``[R|T]`` is world-to-camera in PyTorch3D's row-vector convention
(``X_cam = X_world R + T``), so SPEC section 7 puts the ray origin at ``-R T`` and turns the
camera-space direction ``(x/f, y/f, 1)`` into ``R d``.  With ``R = I`` and ``T = (0, 0, 9)`` the
camera sits at ``(0, 0, -9)`` and looks along +z through the origin; the widest ray has slope
``sqrt(2)/12`` so it meets z = -1 at |x|, |y| = 8/12 < 1 and z = +1 at 10/12 < 1: the box
[-1, 1]^3 fills the view and every ray enters through the front face (t0 = 8) and leaves through
the back face (t1 = 10 on the centre ray).
"""

import math

import pytest
import torch
from conftest import BACKEND_CASES
from torch import nn

import gpavatar.ops as ops
from gpavatar.model import VolumeRenderer
from gpavatar.model.renderer import inside_box, pixel_grid

A, RADIUS = 0.3, 0.5  # alpha per sample inside the sphere, its radius
COLOR = (0.2, 0.5, 0.9)


def camera(B=1, T=(0.0, 0.0, 9.0), R=None, dtype=torch.float32, device="cpu"):
    R = torch.eye(3, dtype=torch.float64) if R is None else torch.as_tensor(R, dtype=torch.float64)
    rt = torch.cat([R, torch.tensor(T, dtype=torch.float64)[:, None]], dim=1)
    return rt.expand(B, 3, 4).to(dtype=dtype, device=device).contiguous()


def rot_y(angle):
    c, s = math.cos(angle), math.sin(angle)
    return [[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]]


def sphere_alpha(coords):
    return A * (coords.norm(dim=-1) < RADIUS).to(coords.dtype)


def sphere_field(coords, dirs):
    """Constant alpha A strictly inside the sphere, 0 outside; constant color."""
    alpha = sphere_alpha(coords)
    value = torch.tensor(COLOR, dtype=coords.dtype, device=coords.device).expand(*alpha.shape, 3)
    return alpha, value, {"n": coords.shape[1]}


def recompute_samples(renderer, transform):
    """Every ray's merged sample depths, recomputed step by step with the torch ops."""
    o, d = renderer.rays(transform)
    o, d = o.reshape(-1, 3).float(), d.reshape(-1, 3).float()
    t0, t1, hit = ops.ray_box(o, d, backend="torch")
    coarse = ops.stratified_depths(t0, t1, renderer.n_coarse, backend="torch")
    alpha = sphere_alpha(o[:, None] + coarse[..., None] * d[:, None])
    weights = ops.composite(alpha, torch.ones(*alpha.shape, 1), backend="torch").weights
    fine = ops.importance_depths(coarse, weights, renderer.n_fine, backend="torch")
    merged, _ = ops.merge_samples(coarse, fine, backend="torch")
    return o, d, hit, t0, t1, coarse, merged


# --- rays ----------------------------------------------------------------------------------


def test_pixel_grid_follows_the_spec():
    f, H, W = 12.0, 5, 7
    grid = pixel_grid(H, W, f, dtype=torch.float64).reshape(H, W, 3)
    j, i = torch.arange(W, dtype=torch.float64), torch.arange(H, dtype=torch.float64)
    torch.testing.assert_close(grid[..., 0], (1 - 2 * j / (W - 1)).expand(H, W) / f)
    torch.testing.assert_close(grid[..., 1], (1 - 2 * i / (H - 1))[:, None].expand(H, W) / f)
    assert bool((grid[..., 2] == 1).all())


def test_centre_and_corner_rays():
    r = VolumeRenderer(image_size=9)
    o, d = r.rays(camera())
    assert o.shape == d.shape == (1, 81, 3)
    torch.testing.assert_close(o[0], torch.tensor([0.0, 0.0, -9.0]).expand(81, 3))
    torch.testing.assert_close(d[0, 4 * 9 + 4], torch.tensor([0.0, 0.0, 1.0]))  # centre pixel
    torch.testing.assert_close(d.norm(dim=-1), torch.ones(1, 81))
    n = math.sqrt(2 / 144 + 1)
    corners = {0: (1, 1), 8: (-1, 1), 72: (1, -1), 80: (-1, -1)}  # row-major index -> (x, y)
    for idx, (x, y) in corners.items():
        torch.testing.assert_close(d[0, idx], torch.tensor([x / 12 / n, y / 12 / n, 1 / n]))


def test_rotated_camera_uses_R_d_and_minus_R_T():
    R = torch.tensor(rot_y(0.7), dtype=torch.float64) @ torch.tensor(
        [[1.0, 0, 0], [0, math.cos(0.3), -math.sin(0.3)], [0, math.sin(0.3), math.cos(0.3)]], dtype=torch.float64)
    T = (0.1, -0.2, 7.0)
    r = VolumeRenderer(image_size=3, focal=2.0)
    o, d = r.rays(camera(T=T, R=R, dtype=torch.float64))
    d_cam = pixel_grid(3, 3, 2.0, dtype=torch.float64)
    expected = d_cam @ R.T
    torch.testing.assert_close(d[0], expected / expected.norm(dim=-1, keepdim=True))
    torch.testing.assert_close(o[0, 0], -(R @ torch.tensor(T, dtype=torch.float64)))
    # the centre ray passes through the world origin at depth |T| (T = camera-space origin)
    t = torch.tensor(T, dtype=torch.float64).norm()
    centre = o[0, 4] + t * d[0, 4]
    assert float(centre.norm()) < 0.25  # T is not on the optical axis: close, not exact
    on_axis = camera(T=(0.0, 0.0, 7.0), R=R, dtype=torch.float64)
    o2, d2 = r.rays(on_axis)
    torch.testing.assert_close(o2[0, 4] + 7.0 * d2[0, 4], torch.zeros(3, dtype=torch.float64))


def test_box_fills_the_view_every_pixel_hits():
    r = VolumeRenderer(image_size=16)
    o, d = r.rays(camera(B=2))
    t0, t1, hit = ops.ray_box(o.reshape(-1, 3), d.reshape(-1, 3))
    assert bool(hit.all())
    assert bool((t0 > 7.9).all() and (t1 > t0).all())
    idx = 7 * 16 + 7  # near the centre: front and back faces
    assert abs(float(t0[idx]) - 8.0) < 1e-2 and abs(float(t1[idx]) - 10.0) < 1e-2


def test_inside_box_is_strict():
    pts = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.999, -0.999, 0.5], [0.0, -1.2, 0.0]])
    assert inside_box(pts).tolist() == [True, False, True, False]


# --- analytic field --------------------------------------------------------------------------


def test_sphere_matches_the_closed_form():
    r = VolumeRenderer(image_size=9, n_coarse=8, n_fine=8, backend="torch")
    transform = camera()
    out = r(sphere_field, transform)
    assert out["fine"].shape == out["coarse"].shape == (1, 3, 9, 9)
    assert out["opacity"].shape == out["depth"].shape == (1, 1, 9, 9)
    assert out["coarse_alphas"].shape == (1, 81, 8)
    assert out["extras"] == {"coarse": {"n": 81 * 8}, "fine": {"n": 81 * 8}}

    o, d, hit, t0, t1, coarse, merged = recompute_samples(r, transform)
    assert bool(hit.all())
    # centre ray: coarse depths 8 + (k + 1/2) / 4, four of them within 0.5 of the origin
    torch.testing.assert_close(coarse[40], 8.125 + 0.25 * torch.arange(8.0))
    k_coarse = (((o[:, None] + coarse[..., None] * d[:, None]).norm(dim=-1)) < RADIUS).sum(1)
    k = (((o[:, None] + merged[..., None] * d[:, None]).norm(dim=-1)) < RADIUS).sum(1)
    assert int(k_coarse[40]) == 4 and int(k[40]) > 4  # the fine samples concentrate in the sphere
    color = torch.tensor(COLOR)
    for name, count in (("coarse", k_coarse), ("fine", k)):
        expected_opacity = 1 - (1 - A) ** count.double()
        got = out[name].permute(0, 2, 3, 1).reshape(81, 3)
        torch.testing.assert_close(got, (expected_opacity[:, None] * color).float(), rtol=1e-5, atol=1e-6)
    opacity = out["opacity"].reshape(81)
    torch.testing.assert_close(opacity, (1 - (1 - A) ** k.double()).float(), rtol=1e-5, atol=1e-6)

    # rays missing the sphere (distance of the ray from the origin >= r) give exactly zero
    missing = (torch.linalg.cross(o, d).norm(dim=-1) > RADIUS + 1e-3)
    assert 0 < int(missing.sum()) < 81 and bool(missing[[0, 8, 72, 80]].all())
    assert bool((out["fine"].permute(0, 2, 3, 1).reshape(81, 3)[missing] == 0).all())
    assert bool((out["coarse"].permute(0, 2, 3, 1).reshape(81, 3)[missing] == 0).all())

    # depth: sum w t + (1 - opacity) t_max with t_max ONE scalar (the batch's farthest sample),
    # then min-max normalized over the batch
    alpha = sphere_alpha(o[:, None] + merged[..., None] * d[:, None])
    w = ops.composite(alpha, torch.ones(*alpha.shape, 1), backend="torch").weights
    raw = (w * merged).sum(1) + (1 - w.sum(1).clamp(0, 1)) * merged.max()
    assert not torch.allclose(raw, (w * merged).sum(1) + (1 - w.sum(1).clamp(0, 1)) * merged.max(1).values)
    torch.testing.assert_close(out["depth_expected"].reshape(81), (w * merged).sum(1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["depth_raw"].reshape(81), raw, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["depth"].reshape(81), (raw - raw.min()) / (raw.max() - raw.min()),
                               rtol=1e-5, atol=1e-5)
    assert float(out["depth"].min()) == 0.0 and abs(float(out["depth"].max()) - 1.0) < 1e-6


def test_rays_missing_the_box_sit_at_depth_minus_one_and_show_as_the_far_end():
    # camera shifted to x = 1.1: columns looking along or to +x (x_cam >= 0) never enter the box
    r = VolumeRenderer(image_size=5, n_coarse=4, n_fine=4, backend="torch")
    transform = camera(T=(-1.1, 0.0, 9.0))
    seen = []

    def field(coords, dirs):
        seen.append(coords)
        return sphere_field(coords, dirs)

    out = r(field, transform)
    o, d = r.rays(transform)
    _, _, hit = ops.ray_box(o.reshape(-1, 3), d.reshape(-1, 3))
    hit = hit.reshape(5, 5)
    assert bool(hit[:, 3:].all()) and not bool(hit[:, :3].any())  # column j has x = 1 - j/2
    coarse_pts = seen[0].reshape(5, 5, 4, 3)
    miss_pts = coarse_pts[~hit]  # origin - dir: outside the box
    torch.testing.assert_close(miss_pts, (o - d).reshape(5, 5, 1, 3).expand(5, 5, 4, 3)[~hit])
    assert not bool(inside_box(miss_pts).any())
    assert bool((out["fine"][0].permute(1, 2, 0)[~hit] == 0).all())
    # A miss is filled with the batch's farthest sample depth: the far end (1 after the
    # normalization), as in the official renderer; it has no expected depth and no opacity.
    t_max = float(recompute_samples(r, transform)[-1].max())
    assert t_max > 9.0  # behind the box's centre plane: the far end
    assert bool((out["depth_raw"][0, 0][~hit] == t_max).all())
    assert bool((out["depth"][0, 0][~hit] == 1.0).all()) and float(out["depth"].min()) == 0.0
    seen_surface = out["opacity"] > 0.01
    assert bool(seen_surface.any()) and bool((out["depth"][seen_surface] < 1.0).all())
    assert bool((out["depth_expected"][0, 0][~hit] == 0).all()) and bool((out["opacity"][0, 0][~hit] == 0).all())


# --- backends --------------------------------------------------------------------------------


class TinyField(nn.Module):
    """alpha = sigmoid(linear(coords)) * 0.5, value = linear(coords, dirs): cheap and smooth."""

    def __init__(self, channels=4):
        super().__init__()
        self.density = nn.Linear(3, 1)
        self.color = nn.Linear(6, channels)

    def forward(self, coords, dirs):
        alpha = 0.5 * torch.sigmoid(3 * self.density(coords)[..., 0])
        alpha = alpha * inside_box(coords).to(alpha.dtype)
        return alpha, self.color(torch.cat([coords, dirs], dim=-1)), None


def _skip_unready(backend):
    if backend == "triton":
        try:
            import gpavatar.kernels.composite  # noqa: F401
        except ImportError as exc:
            pytest.skip(f"Triton composite kernel not available yet: {exc}")


@pytest.mark.parametrize("stratified", [False, True])
@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_backends_agree(device, backend, stratified):
    _skip_unready(backend)
    torch.manual_seed(0)
    field = TinyField().to(device)
    transform = camera(B=2, T=(0.2, -0.1, 4.0), R=rot_y(0.4), device=device)
    outs, grads = {}, {}
    for name in ("torch", backend):
        r = VolumeRenderer(image_size=6, n_coarse=8, n_fine=8, backend=name).to(device)
        g = torch.Generator(device=device).manual_seed(3) if stratified else None
        field.zero_grad()
        out = r(field, transform, stratified=stratified, generator=g)
        (out["fine"].square().sum() + out["coarse"].sum() + out["opacity"].sum()).backward()
        outs[name] = out
        grads[name] = [p.grad.clone() for p in field.parameters()]
    for key in ("coarse", "fine", "opacity", "depth", "depth_raw", "coarse_alphas"):
        torch.testing.assert_close(outs[backend][key], outs["torch"][key], rtol=1e-5, atol=1e-5,
                                   msg=lambda m, k=key: f"{k}: {m}")
    for a, b in zip(grads[backend], grads["torch"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_inference_composites_both_passes_in_place(device, backend, monkeypatch):
    """Without gradients the fine composite reads both passes' samples where they lie
    (ops.composite_merged: no merged copies); the images are the training form's bit for bit."""
    _skip_unready(backend)
    torch.manual_seed(0)
    field = TinyField().to(device)
    transform = camera(B=2, T=(0.2, -0.1, 4.0), R=rot_y(0.4), device=device)
    r = VolumeRenderer(image_size=6, n_coarse=8, n_fine=8, backend=backend).to(device)
    calls = []
    merged = ops.composite_merged
    monkeypatch.setattr(ops, "composite_merged", lambda *a, **k: calls.append(1) or merged(*a, **k))
    with torch.no_grad():
        inference = r(field, transform)
    assert calls == [1]
    trained = r(field, transform)  # the parameters require grad: merge_values + composite
    assert calls == [1]
    for key in ("coarse", "fine", "opacity", "depth", "depth_raw", "depth_expected"):
        assert torch.equal(inference[key], trained[key].detach()), key


# --- gradients, randomness, bad input --------------------------------------------------------


def test_gradients_reach_the_field_through_both_passes():
    torch.manual_seed(0)
    field = TinyField(channels=3)
    outputs = []

    def recording(coords, dirs):
        alpha, value, extras = field(coords, dirs)
        alpha.retain_grad()
        value.retain_grad()
        outputs.append((alpha, value))
        return alpha, value, extras

    r = VolumeRenderer(image_size=5, n_coarse=6, n_fine=6)
    out = r(recording, camera(T=(0.0, 0.0, 3.0)))
    out["fine"].sum().backward()  # the fine image alone: coarse samples are merged into it
    (ac, vc), (af, vf) = outputs
    for name, t in (("coarse alpha", ac), ("coarse value", vc), ("fine alpha", af), ("fine value", vf)):
        assert t.grad is not None and bool(t.grad.abs().sum() > 0), name
    for name, p in field.named_parameters():
        assert p.grad is not None and bool(p.grad.isfinite().all()) and bool(p.grad.abs().sum() > 0), name
    # the coarse image and the density loss input are differentiable too
    field.zero_grad()
    outputs.clear()
    out = r(recording, camera(T=(0.0, 0.0, 3.0)))
    (out["coarse"].sum() + out["coarse_alphas"].sum()).backward()
    assert bool(field.density.weight.grad.abs().sum() > 0)
    assert outputs[1][0].grad is None  # the coarse image does not depend on the fine pass


def test_stratified_is_reproducible_and_differs_from_eval():
    torch.manual_seed(0)
    field = TinyField()
    r = VolumeRenderer(image_size=5, n_coarse=6, n_fine=6)
    t = camera(T=(0.0, 0.0, 3.0))
    with torch.no_grad():
        a = r(field, t, stratified=True, generator=torch.Generator().manual_seed(7))
        b = r(field, t, stratified=True, generator=torch.Generator().manual_seed(7))
        c = r(field, t, stratified=True, generator=torch.Generator().manual_seed(8))
        e1, e2 = r(field, t), r(field, t)
    for key in ("coarse", "fine", "depth_raw"):
        assert torch.equal(a[key], b[key]), key
        assert torch.equal(e1[key], e2[key]), key
        assert not torch.allclose(a[key], e1[key]), key
        assert not torch.allclose(a[key], c[key]), key


@pytest.mark.parametrize("shape", [(1, 4, 4), (3, 4), (1, 3, 3), (0, 3, 4)])
def test_bad_transform_shape(shape):
    r = VolumeRenderer(image_size=4, n_coarse=4, n_fine=4)
    with pytest.raises(ValueError, match="transform"):
        r(sphere_field, torch.zeros(shape))


def test_bad_transform_type_and_values():
    r = VolumeRenderer(image_size=4, n_coarse=4, n_fine=4)
    with pytest.raises(TypeError, match="transform"):
        r(sphere_field, torch.zeros(1, 3, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="transform"):
        r(sphere_field, torch.full((1, 3, 4), float("nan")))


def test_bad_field_output():
    r = VolumeRenderer(image_size=4, n_coarse=4, n_fine=4)
    with pytest.raises(ValueError, match="alpha"):
        r(lambda c, d: (c[..., :1], c, None), camera())
    with pytest.raises(TypeError, match="field"):
        r(lambda c, d: c, camera())


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="focal"):
        VolumeRenderer(focal=0.0)
    with pytest.raises(ValueError, match="box"):
        VolumeRenderer(box=(1.0, -1.0))
    with pytest.raises(ValueError, match="n_fine"):
        VolumeRenderer(n_fine=1)
    with pytest.raises(ValueError, match="backend"):
        VolumeRenderer(backend="gpu")


def test_a_field_may_take_one_direction_per_ray():
    """A field with ray_directions = True gets dirs (B, H·W, 3), one per ray (row-major pixels), and
    renders what the same field renders from the directions repeated per sample."""
    renderer = VolumeRenderer(image_size=6, n_coarse=5, n_fine=4)
    transform = torch.cat([camera(), camera(R=rot_y(0.3))])
    shapes = []

    def tinted(coords, dirs):  # the color follows the sample's ray direction
        shapes.append(tuple(dirs.shape))
        B, N = coords.shape[:2]
        per_sample = dirs.repeat_interleave(N // dirs.shape[1], dim=1)
        return sphere_alpha(coords), (per_sample + 1) / 2, None

    plain = renderer(tinted, transform)
    tinted.ray_directions = True
    rays = renderer(tinted, transform)
    assert shapes == [(2, 6 * 6 * 5, 3), (2, 6 * 6 * 4, 3), (2, 36, 3), (2, 36, 3)]
    _, d = renderer.rays(transform)
    for key in ("coarse", "fine", "depth"):
        assert torch.equal(rays[key], plain[key]), key
    assert not torch.equal(plain["fine"][0], plain["fine"][1])  # the directions matter
    assert d.shape == (2, 36, 3)
