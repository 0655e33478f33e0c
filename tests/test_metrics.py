"""gpavatar.eval.metrics: closed forms, identities, and SSIM against a slow float64 loop reference.

Tolerances: float64 comparisons use 1e-12 relative (pure rounding of a few hundred
multiply-adds); float32 ones 1e-5 (single precision over an 11 x 11 window).
"""

import doctest
import math

import numpy as np
import pytest
import torch

import gpavatar.eval.metrics as metrics_module
from gpavatar.eval import gaussian_window, l1, psnr, psnr_per_image, ssim, ssim_map


def reference_ssim_map(x, y, data_range=None, kernel_size=11, sigma=1.5, k1=0.01, k2=0.03, crop_border=True):
    """Explicit loop over every window, float64, centered moments, reflect indices by hand."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    B, C, H, W = x.shape
    p = kernel_size // 2
    offsets = np.arange(kernel_size) - p
    g = np.exp(-(offsets ** 2) / (2 * sigma ** 2))
    g /= g.sum()
    window = np.outer(g, g)
    R = data_range if data_range is not None else max(x.max() - x.min(), y.max() - y.min())
    c1, c2 = (k1 * R) ** 2, (k2 * R) ** 2

    def reflect(i, n):  # mirror without repeating the edge pixel
        return -i if i < 0 else (2 * (n - 1) - i if i >= n else i)

    out = np.empty((B, C, H, W))
    for i in range(H):
        rows = [reflect(i + o, H) for o in offsets]
        for j in range(W):
            cols = [reflect(j + o, W) for o in offsets]
            wx, wy = x[:, :, rows][:, :, :, cols], y[:, :, rows][:, :, :, cols]  # (B, C, k, k)
            mx = (window * wx).sum(axis=(2, 3))
            my = (window * wy).sum(axis=(2, 3))
            dx, dy = wx - mx[..., None, None], wy - my[..., None, None]
            vx = (window * dx * dx).sum(axis=(2, 3))
            vy = (window * dy * dy).sum(axis=(2, 3))
            cxy = (window * dx * dy).sum(axis=(2, 3))
            out[:, :, i, j] = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return out[:, :, p:H - p, p:W - p] if crop_border else out


def _pair(shape=(2, 3, 16, 15), seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    target = torch.rand(shape, generator=gen, dtype=dtype)
    pred = (target + 0.2 * torch.randn(shape, generator=gen, dtype=dtype)).clamp(-0.001, 1.001)
    return pred, target


# ---------------------------------------------------------------- PSNR / L1

def test_psnr_closed_form_known_mse():
    target = torch.zeros(1, 3, 8, 8, dtype=torch.float64)
    target[..., ::2] = 1.0  # range 1
    for delta in (0.5, 0.1, 0.01):
        pred = target + delta  # MSE = delta^2
        assert psnr(pred, target).item() == pytest.approx(-20 * math.log10(delta), rel=1e-12)
    # target range 2: +20 log10(2)
    assert psnr(2 * target + 0.1, 2 * target).item() == pytest.approx(20 * math.log10(2 / 0.1), rel=1e-12)


def test_psnr_range_comes_from_target_only():
    pred, target = _pair(seed=1)
    wide_pred = pred.clone()
    wide_pred[0, 0, 0, 0] = 50.0  # changes MSE but not the range
    mse = (wide_pred - target).pow(2).mean().item()
    R = (target.max() - target.min()).item()
    assert psnr(wide_pred, target).item() == pytest.approx(10 * math.log10(R * R / mse), rel=1e-12)
    assert psnr(wide_pred, target, data_range=1.0).item() == pytest.approx(10 * math.log10(1 / mse), rel=1e-12)


def test_psnr_identical_is_inf_and_shift_invariant():
    pred, target = _pair(seed=2)
    assert psnr(target, target).item() == math.inf
    assert psnr(pred + 3.0, target + 3.0).item() == pytest.approx(psnr(pred, target).item(), rel=1e-10)


def test_psnr_float32_inputs():
    pred, target = _pair(seed=3, dtype=torch.float32)
    value = psnr(pred, target)
    assert value.dtype == torch.float32
    assert value.item() == pytest.approx(psnr(pred.double(), target.double()).item(), rel=1e-5)


def test_psnr_per_image():
    target = torch.zeros(3, 2, 5, 7, dtype=torch.float64)
    deltas = torch.tensor([0.5, 0.1, 0.0], dtype=torch.float64)
    pred = target + deltas.view(3, 1, 1, 1)
    values = psnr_per_image(pred, target)
    assert values.shape == (3,)
    assert values[0].item() == pytest.approx(-20 * math.log10(0.5), rel=1e-12)
    assert values[1].item() == pytest.approx(20.0, rel=1e-12)
    assert values[2].item() == math.inf
    assert psnr_per_image(pred, target, data_range=255.0)[1].item() == pytest.approx(20 + 20 * math.log10(255))
    # B = 1 and the target spanning [0, 1]: same as the pooled PSNR
    p, t = _pair((1, 3, 16, 16), seed=4)
    t[0, 0, 0, 0], t[0, 0, 0, 1] = 0.0, 1.0
    assert psnr_per_image(p, t).item() == pytest.approx(psnr(p, t).item(), rel=1e-12)


def test_l1():
    pred, target = _pair(seed=5)
    assert l1(pred, target).item() == pytest.approx(np.abs(pred.numpy() - target.numpy()).mean(), rel=1e-12)
    assert l1(target, target).item() == 0.0


# ---------------------------------------------------------------- SSIM

def test_gaussian_window():
    w = gaussian_window(11, 1.5, dtype=torch.float64)
    assert w.shape == (11, 11)
    assert w.sum().item() == pytest.approx(1.0, abs=1e-15)
    assert torch.equal(w, w.T) and torch.equal(w, w.flip(0))
    assert w[5, 6].item() / w[5, 5].item() == pytest.approx(math.exp(-1 / (2 * 1.5 ** 2)), rel=1e-12)


@pytest.mark.parametrize("crop_border", [True, False])
@pytest.mark.parametrize("data_range", [None, 1.0])
def test_ssim_matches_loop_reference(crop_border, data_range):
    pred, target = _pair(seed=6)
    expected = reference_ssim_map(pred.numpy(), target.numpy(), data_range, crop_border=crop_border)
    got = ssim_map(pred, target, data_range, crop_border=crop_border)
    assert got.shape == expected.shape == ((2, 3, 6, 5) if crop_border else (2, 3, 16, 15))
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12, atol=1e-12)
    assert ssim(pred, target, data_range, crop_border=crop_border).item() == pytest.approx(expected.mean(), rel=1e-12)


def test_ssim_other_window_and_float32():
    pred, target = _pair((1, 2, 13, 12), seed=7)
    expected = reference_ssim_map(pred.numpy(), target.numpy(), None, kernel_size=7, sigma=1.0, k1=0.02, k2=0.05)
    got = ssim_map(pred, target, kernel_size=7, sigma=1.0, k1=0.02, k2=0.05)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12, atol=1e-12)
    got32 = ssim(pred.float(), target.float(), kernel_size=7, sigma=1.0, k1=0.02, k2=0.05)
    assert got32.dtype == torch.float32
    assert got32.item() == pytest.approx(expected.mean(), rel=1e-5)


def test_ssim_identity_and_symmetry():
    pred, target = _pair(seed=8)
    for crop_border in (True, False):
        assert ssim(target, target, crop_border=crop_border).item() == pytest.approx(1.0, abs=1e-12)
    assert ssim(pred, target).item() == pytest.approx(ssim(target, pred).item(), rel=1e-12)
    assert ssim(pred, target).item() < 0.9


def test_ssim_constant_shift_closed_form():
    """Constant images a and a + d: zero variance, so SSIM = (2a(a+d) + c1) / (a^2 + (a+d)^2 + c1)."""
    a, d = 0.3, 0.2
    x = torch.full((1, 1, 12, 12), a, dtype=torch.float64)
    c1 = 0.01 ** 2
    expected = (2 * a * (a + d) + c1) / (a * a + (a + d) ** 2 + c1)
    assert ssim(x, x + d, data_range=1.0).item() == pytest.approx(expected, rel=1e-10)
    # a shift of a textured image keeps the structure term at 1: SSIM stays close to, below, 1
    pred, _ = _pair(seed=9)
    shifted = ssim(pred, pred + 0.05, data_range=1.0).item()
    assert 0.95 < shifted < 1.0


def test_ssim_gradcheck():
    pred, target = _pair((1, 1, 12, 12), seed=10)
    pred.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda p: ssim(p, target, data_range=1.0), (pred,))


# ---------------------------------------------------------------- bad inputs

@pytest.mark.parametrize("fn", [psnr, psnr_per_image, ssim, l1])
def test_bad_inputs(fn):
    good = torch.rand(1, 3, 16, 16)
    with pytest.raises(ValueError, match="target"):
        fn(good, torch.rand(1, 3, 16, 15))
    with pytest.raises(ValueError, match="pred"):
        fn(torch.rand(3, 16, 16), torch.rand(3, 16, 16))
    with pytest.raises(ValueError, match="target"):
        fn(good, torch.rand(3, 16, 16))
    with pytest.raises(TypeError, match="pred"):
        fn(good.numpy(), good)
    with pytest.raises(TypeError, match="target"):
        fn(good, (good * 255).to(torch.uint8))


def test_bad_data_range_and_sizes():
    x = torch.rand(1, 3, 16, 16)
    for fn in (psnr, psnr_per_image, ssim):
        with pytest.raises(ValueError, match="data_range"):
            fn(x, x, data_range=-1.0)
        with pytest.raises(TypeError, match="data_range"):
            fn(x, x, data_range="1")
    with pytest.raises(TypeError, match="data_range"):
        psnr_per_image(x, x, data_range=None)
    with pytest.raises(ValueError, match="pred must be at least 11 x 11"):
        ssim(torch.rand(1, 3, 10, 16), torch.rand(1, 3, 10, 16))
    with pytest.raises(ValueError, match="kernel_size"):
        ssim(x, x, kernel_size=4)


def test_docstring_examples():
    assert doctest.testmod(metrics_module).failed == 0
