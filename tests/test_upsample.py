"""ops.upsample2x: the Triton 2x bilinear upsampling of channels-last images ($GPAVATAR_UPSAMPLE=triton)
against F.interpolate(scale_factor=2, mode="bilinear", align_corners=False): the same bits for bf16
and fp16 (every product and sum is exact in float32 with weights 0, 1/4, 3/4, 1), float rounding for
fp32; the fallbacks (other layouts, gradients, the default) and the super-resolution network."""

import pytest
import torch
import torch.nn.functional as F
from conftest import HAS_CUDA
from hypothesis import given
from hypothesis import strategies as st

from gpavatar.ops._backend import triton_available
from gpavatar.ops.upsample import UPSAMPLE_ENV, upsample2x

pytestmark = pytest.mark.skipif(not triton_available(), reason="needs triton")
DEVICES = [pytest.param("cpu", id="cpu")] + ([pytest.param("cuda", id="cuda", marks=pytest.mark.cuda)]
                                             if HAS_CUDA else [])


def reference(x):
    return F.interpolate(x.float(), scale_factor=2, mode="bilinear", align_corners=False)


def channels_last(N, C, H, W, dtype, seed, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(N, C, H, W, generator=g) * 3).to(dtype)
    return x.to(device).contiguous(memory_format=torch.channels_last)


@pytest.fixture
def triton_upsample(monkeypatch):
    monkeypatch.setenv(UPSAMPLE_ENV, "triton")


@pytest.mark.parametrize("device", DEVICES)
@given(N=st.integers(1, 2), C=st.integers(1, 70), H=st.integers(1, 9), W=st.integers(1, 9),
       dtype=st.sampled_from([torch.bfloat16, torch.float16, torch.float32]), seed=st.integers(0, 2**16))
def test_matches_interpolate(device, N, C, H, W, dtype, seed):
    x = channels_last(N, C, H, W, dtype, seed, device)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(UPSAMPLE_ENV, "triton")
        y = upsample2x(x)
    assert y.shape == (N, C, 2 * H, 2 * W) and y.dtype == dtype
    assert y.is_contiguous(memory_format=torch.channels_last)
    ref = reference(x)
    if dtype == torch.float32:
        torch.testing.assert_close(y, ref, rtol=1e-6, atol=1e-6)
    else:  # exact in float32 before the one rounding
        assert torch.equal(y, ref.to(dtype))


def test_edges_and_nan(triton_upsample):
    """Rows / columns at the borders take the edge pixel (the clamped source index), a 1 x 1 image
    is replicated, and a NaN reaches the outputs F.interpolate's reaches (its zero-weight
    neighbours too: 0 * NaN)."""
    x = channels_last(1, 5, 6, 7, torch.float32, 3)
    x[0, 2, 3, 4] = float("nan")
    y, ref = upsample2x(x), reference(x)
    assert torch.equal(y.isnan(), ref.isnan())
    torch.testing.assert_close(y.nan_to_num(), ref.nan_to_num(), rtol=1e-6, atol=1e-6)
    one = channels_last(2, 3, 1, 1, torch.bfloat16, 4)
    assert torch.equal(upsample2x(one), one.expand(2, 3, 2, 2))


def test_falls_back_where_the_kernel_does_not_apply(triton_upsample, monkeypatch):
    """Contiguous (NCHW) input, a tensor that needs a gradient and float64 run F.interpolate; the
    default ($GPAVATAR_UPSAMPLE unset) is F.interpolate everywhere; a bad name is refused."""
    import gpavatar.kernels.upsample as kernel_module

    calls = []
    real = kernel_module.upsample2x
    monkeypatch.setattr(kernel_module, "upsample2x", lambda *a: calls.append(1) or real(*a))
    nchw = torch.randn(1, 4, 5, 6)
    assert torch.equal(upsample2x(nchw), reference(nchw)) and not calls
    leaf = channels_last(1, 4, 5, 6, torch.float32, 1).requires_grad_(True)
    upsample2x(leaf).sum().backward()
    assert leaf.grad is not None and not calls
    x64 = channels_last(1, 4, 5, 6, torch.float64, 2)
    assert torch.equal(upsample2x(x64), F.interpolate(x64, scale_factor=2, mode="bilinear", align_corners=False))
    assert not calls
    upsample2x(channels_last(1, 4, 5, 6, torch.bfloat16, 2))
    assert calls == [1]
    monkeypatch.delenv(UPSAMPLE_ENV)
    upsample2x(channels_last(1, 4, 5, 6, torch.bfloat16, 2))
    assert calls == [1]
    monkeypatch.setenv(UPSAMPLE_ENV, "cudnn")
    with pytest.raises(ValueError, match="GPAVATAR_UPSAMPLE must be torch or triton"):
        upsample2x(nchw)


def test_super_resolution_network_is_unchanged(monkeypatch):
    """The bf16 channels-last StyleUNet (the real-time fast mode's copy) gives the same image with
    the Triton upsampling as with F.interpolate."""
    from gpavatar.model import GPAvatar
    from gpavatar.realtime import _channels_last_copy

    torch.manual_seed(0)
    model = GPAvatar("tiny").eval()
    sr = _channels_last_copy(model.up_renderer, torch.device("cpu"), torch.bfloat16)
    c = model.config
    fine = torch.rand(1, c.render_channels, c.render_size, c.render_size, generator=torch.Generator().manual_seed(1))
    fine = fine.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        ref = sr(fine, noise="off")
        monkeypatch.setenv(UPSAMPLE_ENV, "triton")
        out = sr(fine, noise="off")
    assert torch.equal(out, ref)
