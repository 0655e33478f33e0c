"""The tri-plane sampling oracle (SPEC section 4) against a hand-written bilinear lookup."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from gpavatar.ops.reference import triplane_sample_reference


def bilinear(plane, u, v):
    """plane (C, H, W); u indexes width, v height, in [-1, 1] (align_corners=False, zero padding)."""
    C, H, W = plane.shape
    px = ((u + 1) * W - 1) / 2  # texel-centre coordinates
    py = ((v + 1) * H - 1) / 2
    x0, y0 = int(torch.floor(px)), int(torch.floor(py))
    fx, fy = float(px - x0), float(py - y0)
    out = torch.zeros(C, dtype=plane.dtype)
    for dy, wy in ((0, 1 - fy), (1, fy)):
        for dx, wx in ((0, 1 - fx), (1, fx)):
            xi, yi = x0 + dx, y0 + dy
            if 0 <= xi < W and 0 <= yi < H:
                out += wx * wy * plane[:, yi, xi]
    return out


def naive(planes, coords):
    B, M, _ = coords.shape
    out = torch.zeros(B, M, 3, planes.shape[2], dtype=planes.dtype)
    for b in range(B):
        for m in range(M):
            x, y, z = coords[b, m]
            for t, (u, v) in enumerate(((x, y), (x, z), (z, y))):
                out[b, m, t] = bilinear(planes[b, t], u, v)
    return out


@given(B=st.integers(1, 2), C=st.integers(1, 5), H=st.integers(1, 7), W=st.integers(1, 7), M=st.integers(0, 12),
       seed=st.integers(0, 1000))
def test_matches_hand_written_bilinear(B, C, H, W, M, seed):
    g = torch.Generator().manual_seed(seed)
    planes = torch.randn(B, 3, C, H, W, generator=g, dtype=torch.float64)
    coords = torch.rand(B, M, 3, generator=g, dtype=torch.float64) * 2.4 - 1.2  # some outside the box
    if M:
        coords[:, 0] = torch.tensor([-1.0, 1.0, 0.0], dtype=torch.float64)  # on the border and the centre
    per_plane = naive(planes, coords)
    torch.testing.assert_close(triplane_sample_reference(planes, coords, "concat"), per_plane.flatten(2))
    torch.testing.assert_close(triplane_sample_reference(planes, coords), per_plane.mean(dim=2))


def test_texel_centres_read_the_texel_and_planes_use_their_axes():
    C, H, W = 2, 4, 8
    planes = torch.arange(3 * C * H * W, dtype=torch.float64).reshape(1, 3, C, H, W)
    xi, yi, zi = 5, 1, 3  # texel indices: x along width, y / z along height or width per plane
    centre = lambda i, n: (2 * i + 1) / n - 1  # noqa: E731
    coords = torch.tensor([[[centre(xi, W), centre(yi, H), centre(zi, H)]]], dtype=torch.float64)
    out = triplane_sample_reference(planes, coords, "concat")[0, 0].reshape(3, C)
    assert torch.equal(out[0], planes[0, 0, :, yi, xi])        # plane 0: (x, y)
    assert torch.equal(out[1], planes[0, 1, :, zi, xi])        # plane 1: (x, z)
    # plane 2 reads (z, y): z indexes width (8 texels), y height
    coords2 = torch.tensor([[[0.0, centre(yi, H), centre(zi, W)]]], dtype=torch.float64)
    out2 = triplane_sample_reference(planes, coords2, "concat")[0, 0].reshape(3, C)
    assert torch.equal(out2[2], planes[0, 2, :, yi, zi])


def test_far_outside_reads_zero_and_gradcheck():
    planes = torch.randn(1, 3, 3, 5, 6, dtype=torch.float64, requires_grad=True)
    far = torch.tensor([[[5.0, -7.0, 3.0]]], dtype=torch.float64)
    assert torch.equal(triplane_sample_reference(planes, far), torch.zeros(1, 1, 3, dtype=torch.float64))
    coords = (torch.rand(1, 7, 3, dtype=torch.float64) * 1.8 - 0.9).requires_grad_()
    assert torch.autograd.gradcheck(lambda p, c: triplane_sample_reference(p, c), (planes, coords))


def test_bad_reduce():
    with pytest.raises(ValueError, match="reduce"):
        triplane_sample_reference(torch.zeros(1, 3, 2, 4, 4), torch.zeros(1, 1, 3), "sum")
