"""Training memory (gpavatar.model.recompute): the up-sampling convolutions, the MTA chunks and the
StyleUNets' in-place LeakyReLUs keep less for the backward, and the outputs and every gradient
are the same bits as with everything kept ($GPAVATAR_RECOMPUTE=0)."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
import torch.nn.functional as F

from gpavatar.model import GPAvatar
from gpavatar.model import recompute
from gpavatar.model.mta import MultiTriplaneAttention
from gpavatar.model.recompute import RECOMPUTE_ENV, checkpointed, recompute_setting, recomputed, upsampled
from gpavatar.model.style_unet import ResBlock, StyleUNet
from gpavatar.model.stylegan import ModulatedConv2d, StyleConv
from _saved import saved_bytes
from conftest import requires_cuda


@pytest.fixture(autouse=True)
def recompute_small(monkeypatch):
    """These tensors are tiny: recompute them whatever their size (RECOMPUTE_MIN_BYTES = 0)."""
    monkeypatch.setattr(recompute, "RECOMPUTE_MIN_BYTES", 0)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run(fn, inputs, params, recompute, monkeypatch):
    """Output, gradients of inputs and params, and the bytes autograd saved (a recomputing
    helper's recipe arguments included: they pass through the counting hooks)."""
    monkeypatch.setenv(RECOMPUTE_ENV, "1" if recompute else "0")
    for t in list(inputs) + list(params):
        t.grad = None
    out, saved = saved_bytes(lambda: fn(*inputs))
    out = out if isinstance(out, torch.Tensor) else torch.cat([o.flatten() for o in out])
    g = torch.Generator().manual_seed(7)
    (out * torch.randn(out.shape, generator=g, dtype=out.dtype).to(out.device)).sum().backward()
    grads = [None if t.grad is None else t.grad.clone() for t in list(inputs) + list(params)]
    return out.detach(), grads, saved


def assert_same(a, b):
    out_a, grads_a, _ = a
    out_b, grads_b, _ = b
    assert torch.equal(out_a, out_b)
    assert len(grads_a) == len(grads_b)
    for x, y in zip(grads_a, grads_b):
        assert (x is None and y is None) or torch.equal(x, y)
    reached = [x for x in grads_a if x is not None]
    assert len(reached) >= 0.8 * len(grads_a) and all(bool(x.abs().sum() > 0) for x in reached)


DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, requires_cuda])]


@pytest.fixture
def deterministic():
    """cuDNN's weight gradients may sum in any order: two runs compare bit for bit only with the
    deterministic algorithms."""
    saved = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    yield
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch", [1, 3])  # B = 1: a plain convolution; B > 1: grouped (a reshaped view)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("sample_mode", ["upsample", None])
def test_modulated_conv(batch, channels_last, sample_mode, device, deterministic, monkeypatch):
    torch.manual_seed(0)
    conv = ModulatedConv2d(8, 6, 3, num_style_feat=5, sample_mode=sample_mode).double().to(device)
    x = torch.randn(batch, 8, 7, 9, dtype=torch.float64, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    style = torch.randn(batch, 5, dtype=torch.float64, device=device, requires_grad=True)
    params = list(conv.parameters())
    kept = run(conv, (x, style), params, False, monkeypatch)
    recomputed = run(conv, (x, style), params, True, monkeypatch)
    assert_same(kept, recomputed)
    # Not kept: the x2 map (the grouped convolution keeps its own contiguous copy of a channels-last
    # one) and the per-sample weights (before and after demodulation).
    # The recipes keep (and count) x, the weight parameter and the modulation's output instead.
    up = 0 if (channels_last and batch > 1) or sample_mode is None else 8 * batch * 8 * 14 * 18
    weights = 2 * 8 * batch * 6 * 8 * 3 * 3
    held = 8 * (x.numel() * (sample_mode is not None) + conv.weight.numel() + batch * 8)
    assert recomputed[2] <= kept[2] - up - weights + held, (recomputed[2], kept[2], up, weights, held)
    assert recomputed[2] < kept[2]


def test_modulated_conv_under_bf16_autocast(monkeypatch):
    """Recomputed weights and maps under bf16 autocast: the same results."""
    torch.manual_seed(8)
    conv = ModulatedConv2d(8, 6, 3, num_style_feat=5, sample_mode="upsample")
    x = torch.randn(2, 8, 6, 6, requires_grad=True)
    style = torch.randn(2, 5, requires_grad=True)

    def fn(x, style):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return conv(x.to(torch.bfloat16), style).float()

    kept = run(fn, (x, style), list(conv.parameters()), False, monkeypatch)
    recomputed = run(fn, (x, style), list(conv.parameters()), True, monkeypatch)
    assert_same(kept, recomputed)
    # Kept neither the bf16 x2 map nor any per-sample weights (float32, or the bf16 copy the
    # convolution uses): nothing of their sizes is saved.
    sizes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
        fn(x, style)
    assert sizes and not {2 * 8 * 12 * 12, 2 * 6 * 8 * 9} & set(sizes), sizes
    assert recomputed[2] < kept[2] / 3
    # The same numbers as the convolution's own autocast cast of float32 weights.
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        h = F.interpolate(x.to(torch.bfloat16), scale_factor=2, mode="bilinear")
        w = conv.weight * conv.modulation(style).view(2, 1, 8, 1, 1)
        w = w * torch.rsqrt(w.pow(2).sum(dim=(2, 3, 4), keepdim=True) + conv.eps)
        ref = torch.cat([F.conv2d(h[b:b + 1], w[b], padding=1) for b in range(2)]).float()
    assert torch.equal(recomputed[0], ref)


def test_recomputation_runs_under_the_forwards_autocast_state(monkeypatch):
    """A product (bf16 under CPU autocast) made again in the backward, which runs without autocast:
    the recomputed tensor is the forward's bf16 one (x's gradient is it)."""
    monkeypatch.setenv(RECOMPUTE_ENV, "1")
    a = torch.randn(5, 7, requires_grad=True)
    b = torch.randn(7, 3)
    x = torch.randn(5, 3, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = recomputed(lambda a, b: a @ b, (a, b), lambda m: m * x)
        ref = (a @ b) * x
    assert torch.equal(y, ref)
    (gx,) = torch.autograd.grad(y.float().sum(), (x,))
    (rx,) = torch.autograd.grad(ref.float().sum(), (x,))
    assert torch.equal(gx, rx)


def test_upsampling_conv_gradcheck(monkeypatch):
    monkeypatch.setenv(RECOMPUTE_ENV, "1")
    torch.manual_seed(1)
    conv = torch.nn.Conv2d(3, 2, 3, padding=1).double()
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    w = conv.weight.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda x, w: upsampled(lambda u: F.conv2d(u, w, padding=1), x), (x, w))


def test_upsampling_resblock_and_styleconv(monkeypatch):
    torch.manual_seed(2)
    block = ResBlock(4, 6, "up").double()
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    kept = run(block, (x,), list(block.parameters()), False, monkeypatch)
    recomputed = run(block, (x,), list(block.parameters()), True, monkeypatch)
    assert_same(kept, recomputed)
    # conv2's and skip's inputs (4 channels at 10 x 10 each) are no longer kept; the recipes keep
    # (and count) the maps they were up-sampled from, x and h (2 x 4 x 5 x 5 each)
    assert recomputed[2] <= kept[2] - 2 * 8 * 2 * 4 * 100 + 2 * 8 * 2 * 4 * 25

    sconv = StyleConv(4, 5, num_style_feat=3, sample_mode="upsample").double()
    with torch.no_grad():
        sconv.weight.fill_(0.3)
        sconv.bias.normal_()
    style = torch.randn(2, 3, dtype=torch.float64)
    noise = torch.randn(2, 1, 10, 10, dtype=torch.float64)
    fn = lambda x: sconv(x, style, noise)  # noqa: E731
    assert_same(run(fn, (x,), list(sconv.parameters()), False, monkeypatch),
                run(fn, (x,), list(sconv.parameters()), True, monkeypatch))


def test_enclosing_hooks_see_the_other_saved_tensors(monkeypatch):
    """save_on_cpu-style hooks around an up-sampling convolution still pack (and unpack) every
    tensor but the dropped map."""
    monkeypatch.setenv(RECOMPUTE_ENV, "1")
    w = torch.randn(2, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    x = torch.randn(1, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    seen, unpacked = [], []

    def pack(t):
        seen.append(tuple(t.shape))
        return ("mine", t)

    def unpack(p):
        unpacked.append(p[0])
        return p[1]

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        y = upsampled(lambda u: F.conv2d(u, w, padding=1), x)
    # the weights and the recipe's argument x pass through them; the x2 map does not
    assert (2, 3, 3, 3) in seen and (1, 3, 4, 4) in seen and (1, 3, 8, 8) not in seen
    y.square().sum().backward()
    assert unpacked and set(unpacked) == {"mine"}
    ref = torch.autograd.grad(F.conv2d(F.interpolate(x, scale_factor=2, mode="bilinear"), w, padding=1)
                              .square().sum(), (x, w))
    assert torch.equal(x.grad, ref[0]) and torch.equal(w.grad, ref[1])


def test_the_made_tensor_is_freed_before_the_backward(monkeypatch):
    """Nothing (hooks, recipe) keeps the x2 map or the per-sample weights alive after the forward:
    the memory is free until the backward makes them again."""
    monkeypatch.setenv(RECOMPUTE_ENV, "1")
    w = torch.randn(2, 3, 3, 3, requires_grad=True)
    x = torch.randn(1, 3, 4, 4, requires_grad=True)
    refs = []

    def conv(u):
        refs.append(weakref.ref(u))
        return F.conv2d(u, w, padding=1)

    y = upsampled(conv, x)
    gc.collect()
    assert refs[0]() is None
    y.sum().backward()
    assert x.grad is not None and w.grad is not None

    mod = ModulatedConv2d(3, 2, 3, num_style_feat=4)
    made = []
    original = mod.modulated_weight

    def spy(weight, scale):
        out = original(weight, scale)
        made.append(weakref.ref(out))
        return out

    mod.modulated_weight = spy
    y = mod(torch.randn(2, 3, 4, 4), torch.randn(2, 4))
    gc.collect()
    assert made and made[0]() is None
    y.sum().backward()


def test_input_modified_in_place_after_the_forward_is_refused(monkeypatch):
    monkeypatch.setenv(RECOMPUTE_ENV, "1")
    w = torch.randn(2, 3, 3, 3, requires_grad=True)
    x = torch.randn(1, 3, 4, 4)
    y = upsampled(lambda u: F.conv2d(u, w, padding=1), x)
    x.mul_(2)
    with pytest.raises(RuntimeError, match="modified in place.*GPAVATAR_RECOMPUTE=0"):
        y.sum().backward()
    # Also when an enclosing block's hooks hand the same tensor back.
    x = torch.randn(1, 3, 4, 4)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        y = upsampled(lambda u: F.conv2d(u, w, padding=1), x)
    x.add_(1)
    with pytest.raises(RuntimeError, match="modified in place"):
        y.sum().backward()
    # A parameter updated between the forward and the backward (the modulated weights' recipe).
    conv = ModulatedConv2d(3, 2, 3, num_style_feat=4)
    y = conv(torch.randn(2, 3, 4, 4), torch.randn(2, 4))
    with torch.no_grad():
        conv.weight.mul_(2)
    with pytest.raises(RuntimeError, match="modified in place"):
        y.sum().backward()


def test_no_grad_and_disabled_paths_are_plain(monkeypatch):
    monkeypatch.setenv(RECOMPUTE_ENV, "1")
    x = torch.randn(1, 2, 3, 3)
    with torch.no_grad():
        y = upsampled(lambda u: u * 2, x)
    assert torch.equal(y, 2 * F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False))
    assert checkpointed(lambda a, b: a + b, x, x).equal(2 * x)


def test_small_activations_are_kept(monkeypatch):
    """Below RECOMPUTE_MIN_BYTES the plain call runs (no hooks, no checkpoint): the x2 map and the
    weights are saved as usual; at the threshold they are recomputed."""
    monkeypatch.setenv(RECOMPUTE_ENV, "1")
    conv = ModulatedConv2d(8, 6, 3, num_style_feat=5, sample_mode="upsample")
    x, style = torch.randn(2, 8, 6, 6), torch.randn(2, 5)
    up, weights = 4 * 2 * 8 * 12 * 12, 4 * 2 * 6 * 8 * 9
    for limit, kept in ((up + 1, True), (weights, False)):  # weights < up
        monkeypatch.setattr(recompute, "RECOMPUTE_MIN_BYTES", limit)
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel() * 4) or t, lambda t: t):
            conv(x, style)
        assert (up in sizes) is kept and (weights in sizes) is kept, (limit, sizes)
    assert not recompute.worth_recomputing(recompute.RECOMPUTE_MIN_BYTES - 1)
    with torch.no_grad():
        assert not recompute.worth_recomputing(recompute.RECOMPUTE_MIN_BYTES)


def test_setting(monkeypatch):
    monkeypatch.delenv(RECOMPUTE_ENV, raising=False)
    assert recompute_setting()
    for value, expected in (("auto", True), ("1", True), ("0", False)):
        monkeypatch.setenv(RECOMPUTE_ENV, value)
        assert recompute_setting() is expected
    monkeypatch.setenv(RECOMPUTE_ENV, "yes")
    with pytest.raises(ValueError, match="GPAVATAR_RECOMPUTE must be 0, 1 or auto"):
        recompute_setting()


@pytest.mark.parametrize("device", DEVICES)
def test_mta_checkpointed_chunks(device, monkeypatch):
    torch.manual_seed(3)
    mta = MultiTriplaneAttention(8, chunk_bytes=4 * 2 * 3 * 6 * 300).double().to(device)  # 3 rows per chunk
    query = torch.randn(1, 1, 3, 8, 10, 6, dtype=torch.float64, device=device, requires_grad=True)
    key = torch.randn(2, 3, 3, 8, 10, 6, dtype=torch.float64, device=device, requires_grad=True)
    params = [p for p in mta.parameters() if p.requires_grad]
    kept = run(mta, (query, key), params, False, monkeypatch)
    recomputed = run(mta, (query, key), params, True, monkeypatch)
    assert_same(kept, recomputed)
    # The token MLPs' intermediates (a dozen tensors of the keys' size) are gone.
    assert recomputed[2] < 0.2 * kept[2], (recomputed[2], kept[2])
    fn = lambda q, k: torch.cat([t.flatten() for t in mta(q, k, return_attention=True)])  # noqa: E731
    assert_same(run(fn, (query, key), params, False, monkeypatch), run(fn, (query, key), params, True, monkeypatch))


@pytest.mark.parametrize("device", DEVICES)
def test_style_unet_in_place_activations_and_recompute(device, deterministic, monkeypatch):
    """Whole StyleUNets (SFT, the decoder; with and without an input resize and a down first
    block): the same image and gradients as the all-kept run, and fewer saved bytes (at these
    narrow widths the per-sample modulated weights are a large share; 0.82 of the bytes at 64²)."""
    torch.manual_seed(4)
    for in_size, out_size, x_size, limit in ((64, 64, 64, 0.85), (64, 32, 64, 0.95), (32, 32, 16, 0.95)):
        net = StyleUNet(in_size, out_size, 3, 5, num_style_feat=16, num_mlp=1, narrow=1 / 64).double().to(device)
        x = torch.rand(2, 3, x_size, x_size, dtype=torch.float64, device=device, requires_grad=True)
        fn = lambda x: net(x, noise="off")  # noqa: E731
        kept = run(fn, (x,), list(net.parameters()), False, monkeypatch)
        recomputed = run(fn, (x,), list(net.parameters()), True, monkeypatch)
        assert_same(kept, recomputed)
        assert recomputed[2] < limit * kept[2], (in_size, out_size, recomputed[2], kept[2])


def test_style_unet_gradcheck(monkeypatch):
    monkeypatch.setenv(RECOMPUTE_ENV, "1")
    torch.manual_seed(5)
    net = StyleUNet(8, 8, 2, 2, num_style_feat=4, num_mlp=1, narrow=1 / 128).double()
    x = torch.rand(1, 2, 8, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: net(x, noise="off"), (x,), atol=1e-6)


def test_training_step_same_loss_and_gradients(monkeypatch):
    """GPAvatar("tiny").forward_train (MTA over 2 sources, both StyleUNets, fresh noise from a
    generator): the same outputs and parameter gradients with and without recomputation."""
    torch.manual_seed(6)
    model = GPAvatar("tiny", single_source_prob=0.0).train()
    c = model.config
    g = torch.Generator().manual_seed(0)
    images = torch.rand(1, 2, 3, c.image_size, c.image_size, generator=g)
    points = (torch.rand(1, c.num_points, 3, generator=g) - 0.5)
    camera = torch.tensor([[[1.0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 9]]])

    def step(recompute):
        monkeypatch.setenv(RECOMPUTE_ENV, "1" if recompute else "0")
        model.zero_grad(set_to_none=True)
        out = model.forward_train(images, points, camera, generator=torch.Generator().manual_seed(1))
        (out["image"].square().mean() + out["fine"].abs().mean()).backward()
        return out["image"].detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    image_k, grads_k = step(False)
    image_r, grads_r = step(True)
    assert torch.equal(image_k, image_r)
    assert grads_k.keys() == grads_r.keys() and len(grads_k) > 50
    for name in grads_k:
        assert torch.equal(grads_k[name], grads_r[name]), name
