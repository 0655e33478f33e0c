"""gpavatar.train.losses: AlexNet layout, perceptual distance, face-box crop and the full loss
against hand computations (float64 for the exact comparisons: tolerance 1e-10 covers the
rounding of a few AlexNet layers; float32 paths only get sanity checks).

Sizes are the smallest the AlexNet trunk takes (31 px) or close to it, to keep this fast.
"""

import doctest
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import torch
import torch.nn.functional as F
from torch import nn

import gpavatar.train.losses as losses_module
from gpavatar.train import MIN_PERCEPTUAL_SIZE, AlexNetFeatures, GPAvatarLoss, PerceptualDistance, crop_box

EXPECTED_KEYS = [
    ("slice1.0.weight", (64, 3, 11, 11)), ("slice1.0.bias", (64,)),
    ("slice2.3.weight", (192, 64, 5, 5)), ("slice2.3.bias", (192,)),
    ("slice3.6.weight", (384, 192, 3, 3)), ("slice3.6.bias", (384,)),
    ("slice4.8.weight", (256, 384, 3, 3)), ("slice4.8.bias", (256,)),
    ("slice5.10.weight", (256, 256, 3, 3)), ("slice5.10.bias", (256,)),
]
RELU_INDICES = (1, 4, 7, 9, 11)
# ImageNet constants as float32 values (the module stores them as float32 buffers)
MEAN = torch.tensor([0.485, 0.456, 0.406], dtype=torch.float32).double().view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225], dtype=torch.float32).double().view(1, 3, 1, 1)


def torchvision_layout_trunk(seed=0):
    """An AlexNet ``features`` Sequential written out independently, with random weights."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2), nn.ReLU(), nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(64, 192, kernel_size=5, padding=2), nn.ReLU(), nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(192, 384, kernel_size=3, padding=1), nn.ReLU(),
        nn.Conv2d(384, 256, kernel_size=3, padding=1), nn.ReLU(),
        nn.Conv2d(256, 256, kernel_size=3, padding=1), nn.ReLU(),
    ).double()


def reference_perceptual(trunk, x, y):
    """sum over ReLU outputs of mean_{b,h,w} sum_c (x/|x| - y/|y|)^2, computed layer by layer."""
    total = 0.0
    fx, fy = (x - MEAN) / STD, (y - MEAN) / STD
    for index, layer in enumerate(trunk):
        fx, fy = layer(fx), layer(fy)
        if index in RELU_INDICES:
            nx = fx / (fx.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
            ny = fy / (fy.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
            total = total + ((nx - ny) ** 2).sum(dim=1).mean()
    return total


def perceptual_from(trunk):
    distance = PerceptualDistance().double()
    distance.net.load_torchvision_features({f"features.{k}": v for k, v in trunk.state_dict().items()})
    return distance


# ---------------------------------------------------------------- AlexNetFeatures

def test_alexnet_state_dict_keys_and_shapes():
    net = AlexNetFeatures()
    assert [(k, tuple(v.shape)) for k, v in net.state_dict().items()] == EXPECTED_KEYS
    assert all(not p.requires_grad for p in net.parameters())


def test_alexnet_feature_shapes_and_minimum_size():
    net = AlexNetFeatures()
    feats = net(torch.rand(2, 3, 64, 64))
    assert [tuple(f.shape) for f in feats] == [(2, 64, 15, 15), (2, 192, 7, 7), (2, 384, 3, 3),
                                                (2, 256, 3, 3), (2, 256, 3, 3)]
    assert all((f >= 0).all() for f in feats)  # ReLU outputs
    assert [tuple(f.shape[-2:]) for f in net(torch.rand(1, 3, 31, 40))][-1] == (1, 1)
    assert MIN_PERCEPTUAL_SIZE == 31
    with pytest.raises(ValueError, match="x must be at least 31 x 31"):
        net(torch.rand(1, 3, 30, 64))
    with pytest.raises(ValueError, match="x must have shape"):
        net(torch.rand(1, 4, 64, 64))


def test_alexnet_load_torchvision_features_matches_sequential():
    trunk = torchvision_layout_trunk()
    net = AlexNetFeatures().double()
    net.load_torchvision_features(trunk.state_dict())  # keys "0.weight", ...
    x = torch.randn(1, 3, 47, 52, dtype=torch.float64)
    feats, h = net(x), x
    expected = []
    for index, layer in enumerate(trunk):
        h = layer(h)
        if index in RELU_INDICES:
            expected.append(h)
    for got, want in zip(feats, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert all(not p.requires_grad for p in net.parameters())  # loading keeps it frozen
    with pytest.raises(ValueError, match="not an AlexNet features layer"):
        net.load_torchvision_features({"classifier.1.weight": torch.zeros(1)})


# ---------------------------------------------------------------- PerceptualDistance

def test_perceptual_matches_reference_and_is_a_distance():
    trunk = torchvision_layout_trunk(seed=1)
    distance = perceptual_from(trunk)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 35, 33, generator=gen, dtype=torch.float64)
    y = torch.rand(2, 3, 35, 33, generator=gen, dtype=torch.float64)
    value = distance(x, y)
    assert value.shape == ()
    assert value.item() == pytest.approx(reference_perceptual(trunk, x, y).item(), rel=1e-10)
    assert value.item() > 0
    assert distance(y, x).item() == pytest.approx(value.item(), rel=1e-12)
    assert distance(x, x).item() == 0.0


def test_perceptual_state_dict_and_gradients():
    distance = PerceptualDistance()
    assert [k for k, _ in distance.state_dict().items()] == ["net." + k for k, _ in EXPECTED_KEYS]
    x = torch.rand(1, 3, 32, 32, requires_grad=True)
    distance(x, torch.rand(1, 3, 32, 32)).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in distance.parameters())


def test_perceptual_bad_inputs():
    distance = PerceptualDistance()
    x = torch.rand(1, 3, 32, 32)
    with pytest.raises(ValueError, match="target must have the shape of pred"):
        distance(x, torch.rand(1, 3, 33, 32))
    with pytest.raises(ValueError, match="pred must have shape"):
        distance(torch.rand(3, 32, 32), x)
    with pytest.raises(TypeError, match="pred"):
        distance(x.numpy(), x)


def test_perceptual_small_images_are_upsampled_to_alexnet_minimum():
    """Below 31 px (the tiny preset's renders) both images are upsampled to 32 px first."""
    distance = PerceptualDistance()
    a, b = torch.rand(2, 3, 16, 12), torch.rand(2, 3, 16, 12)
    up = lambda x: torch.nn.functional.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)  # noqa
    torch.testing.assert_close(distance(a, b), distance(up(a), up(b)), rtol=0, atol=0)
    assert distance(a, a) == 0


# ---------------------------------------------------------------- crop_box

def test_crop_box_known_block():
    image = torch.zeros(2, 2, 16, 16, dtype=torch.float64)
    block = torch.arange(2 * 4 * 8, dtype=torch.float64).view(2, 4, 8)
    image[0, :, 4:8, 2:10] = block  # rows 4:8, cols 2:10
    image[1] = torch.rand(2, 16, 16, dtype=torch.float64)
    # 0.26*16 = 4.16 -> 4 and 0.49*16 = 7.84 -> 7 (truncation); image 1: clamped to the full image
    bbox = torch.tensor([[2 / 16, 0.26, 10 / 16, 0.49], [-0.5, -1.0, 1.5, 2.0]], dtype=torch.float64)
    crops = crop_box(image, bbox, size=8)
    expected0 = F.interpolate(block[None, :, :3], size=(8, 8), mode="bilinear", align_corners=False,
                              antialias=True)
    torch.testing.assert_close(crops[0], expected0[0], rtol=0, atol=1e-12)
    expected1 = F.interpolate(image[1:], size=(8, 8), mode="bilinear", align_corners=False, antialias=True)
    torch.testing.assert_close(crops[1], expected1[0], rtol=0, atol=1e-12)
    # exact block, same size: identity resize
    exact = crop_box(image[:1], torch.tensor([[2 / 16, 4 / 16, 10 / 16, 12 / 16]], dtype=torch.float64), 8)
    assert torch.equal(exact[0, :, :4], block)
    assert torch.equal(exact[0, :, 4:], torch.zeros(2, 4, 8, dtype=torch.float64))


def test_crop_box_non_square_scales_y_by_height():
    image = torch.zeros(1, 1, 8, 16)
    image[0, 0, 2:4, 4:8] = 1.0
    crop = crop_box(image, torch.tensor([[0.25, 0.25, 0.5, 0.5]]), size=2)  # rows 2:4, cols 4:8
    assert torch.allclose(crop, torch.ones(1, 1, 2, 2))


def test_crop_box_empty_box_falls_back_to_full_image():
    image = torch.rand(2, 3, 20, 20)
    bbox = torch.tensor([[0.5, 0.2, 0.5, 0.8], [0.9, 0.9, 0.1, 0.1]])  # zero width; inverted
    crops = crop_box(image, bbox, size=10)
    expected = F.interpolate(image, size=(10, 10), mode="bilinear", align_corners=False, antialias=True)
    torch.testing.assert_close(crops, expected)
    # a box thinner than a pixel truncates to an empty one too
    tiny = crop_box(image[:1], torch.tensor([[0.51, 0.5, 0.52, 0.6]]), size=10)
    torch.testing.assert_close(tiny, expected[:1])


@settings(max_examples=60, deadline=None)
@given(H=st.integers(1, 40), W=st.integers(1, 40), size=st.integers(1, 24),
       box=st.lists(st.floats(-0.2, 1.2, allow_nan=False), min_size=4, max_size=4),
       dtype=st.sampled_from([torch.float32, torch.float64]), seed=st.integers(0, 2**16))
def test_crop_box_matches_slice_and_interpolate(H, W, size, box, dtype, seed):
    """The separable crop map equals slicing the box on the host and F.interpolate(antialias)
    for boxes that shrink, enlarge or keep the size, at the edges, empty and outside the image."""
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(2, 3, H, W, generator=g, dtype=dtype)
    bbox = torch.tensor([box, [0.0, 0.0, 1.0, 1.0]], dtype=dtype)
    crops = crop_box(images, bbox, size=size)
    assert crops.shape == (2, 3, size, size) and crops.dtype == dtype
    for b in range(2):
        x1, y1, x2, y2 = (int(min(max(float(v), 0.0), 1.0) * n)
                          for v, n in zip(bbox[b].tolist(), (W, H, W, H)))
        part = images[b, :, y1:y2, x1:x2] if (x2 > x1 and y2 > y1) else images[b]
        expected = F.interpolate(part[None], size=(size, size), mode="bilinear", align_corners=False,
                                 antialias=True)[0]
        tol = 1e-12 if dtype == torch.float64 else 2e-6
        torch.testing.assert_close(crops[b], expected, rtol=0, atol=tol)


def test_crop_box_gradient_and_no_host_sync():
    """The crop's gradient is F.interpolate's on the sliced box (float64), and the crop reads no
    value on the host (its shapes do not depend on the box: CUDA-graph capturable)."""
    from gpavatar.train.graphed import host_syncs

    images = torch.rand(1, 2, 12, 10, dtype=torch.float64, requires_grad=True)
    bbox = torch.tensor([[0.1, 0.25, 0.75, 0.9]], dtype=torch.float64)
    weights = torch.rand(1, 2, 7, 7, dtype=torch.float64)
    with host_syncs() as syncs:
        out = crop_box(images, bbox, size=7)
    assert syncs == []
    (grad,) = torch.autograd.grad((out * weights).sum(), images)
    sliced = images.detach().clone().requires_grad_(True)
    ref = F.interpolate(sliced[:, :, 3:10, 1:7], size=(7, 7), mode="bilinear", align_corners=False, antialias=True)
    (ref_grad,) = torch.autograd.grad((ref * weights).sum(), sliced)
    torch.testing.assert_close(grad, ref_grad, rtol=0, atol=1e-12)


def test_crop_box_bad_inputs():
    image = torch.rand(2, 3, 16, 16)
    with pytest.raises(ValueError, match=r"bbox must have shape \(2, 4\)"):
        crop_box(image, torch.rand(1, 4))
    with pytest.raises(TypeError, match="bbox"):
        crop_box(image, torch.ones(2, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="images must have shape"):
        crop_box(image[0], torch.rand(2, 4))
    with pytest.raises(ValueError, match="size"):
        crop_box(image, torch.rand(2, 4), size=0)


# ---------------------------------------------------------------- GPAvatarLoss

def make_batch(B=2, r=32, S=64, channels=5, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    out = {"coarse": torch.rand(B, channels, r, r, generator=gen, dtype=dtype),
           "fine": torch.rand(B, channels, r, r, generator=gen, dtype=dtype),
           "image": torch.rand(B, 3, S, S, generator=gen, dtype=dtype),
           "coarse_alphas": torch.rand(B, r * r, 6, generator=gen, dtype=dtype)}
    target = torch.rand(B, 3, S, S, generator=gen, dtype=dtype)
    bbox = torch.tensor([[0.1, 0.2, 0.8, 0.9], [0.0, 0.05, 0.95, 0.7]], dtype=dtype)[:B]
    return out, target, bbox


def hand_loss(trunk, out, target, bbox, crop):
    """pipeline.md 5.5, written out term by term with explicit slicing."""
    P = lambda a, b: reference_perceptual(trunk, a, b)  # noqa: E731
    r, S = out["coarse"].shape[-1], target.shape[-1]
    g = F.interpolate(target, size=(r, r), mode="bilinear", align_corners=False, antialias=True)
    C, Fi, Si = out["coarse"][:, :3], out["fine"][:, :3], out["image"]
    pairs = [(C, g), (Fi, g), (Si, target)]
    percep = 0.01 * sum(P(x, t) for x, t in pairs) / 3
    img = sum((x - t).abs().mean() for x, t in pairs)
    box = 0.0
    for x, t in pairs:
        n = x.shape[-1]
        cx, ct = [], []
        for b in range(x.shape[0]):
            x1, y1, x2, y2 = (int(v * n) for v in bbox[b].clamp(0, 1).tolist())
            resize = lambda a: F.interpolate(a[None, :, y1:y2, x1:x2], size=(crop, crop), mode="bilinear",  # noqa
                                             align_corners=False, antialias=True)
            cx.append(resize(x[b]))
            ct.append(resize(t[b]))
        cx, ct = torch.cat(cx), torch.cat(ct)
        box = box + 0.5 * (0.01 * P(cx, ct) + (cx - ct).abs().mean())
    density = 1e-5 * out["coarse_alphas"].pow(2).sum().sqrt()
    assert S != r
    return {"percep_loss": percep, "img_loss": img, "box_loss": box, "density_loss": density,
            "total": percep + img + box + density}


def test_loss_terms_match_hand_computation():
    trunk = torchvision_layout_trunk(seed=2)
    loss = GPAvatarLoss(crop_size=32).double()
    loss.percep_loss.net.load_torchvision_features(trunk.state_dict())
    out, target, bbox = make_batch()
    got = loss(out, target, bbox)
    want = hand_loss(trunk, out, target, bbox, crop=32)
    assert set(got) == {"percep_loss", "img_loss", "box_loss", "density_loss", "total", "psnr"}
    for key, value in want.items():
        assert got[key].shape == ()
        assert got[key].item() == pytest.approx(value.item(), rel=1e-10), key
    mse = (out["image"] - target).pow(2).mean().item()
    assert got["psnr"].item() == pytest.approx(-10 * math.log10(mse), rel=1e-6)
    assert not got["psnr"].requires_grad


def test_loss_ignores_feature_channels_and_perfect_prediction():
    loss = GPAvatarLoss(crop_size=32).double()
    out, target, bbox = make_batch(seed=1)
    base = loss(out, target, bbox)["total"].item()
    out["coarse"][:, 3:] += 10.0
    out["fine"][:, 3:] -= 10.0
    assert loss(out, target, bbox)["total"].item() == pytest.approx(base, rel=1e-12)
    # perfect prediction at both resolutions: only the density term is left
    g = F.interpolate(target, size=(32, 32), mode="bilinear", align_corners=False, antialias=True)
    out = {"coarse": g.clone(), "fine": g.clone(), "image": target.clone(), "coarse_alphas": torch.zeros(3)}
    terms = loss(out, target, bbox)
    for key in ("percep_loss", "img_loss", "box_loss", "density_loss", "total"):
        assert terms[key].item() == 0.0, key
    assert terms["psnr"].item() == math.inf


def test_loss_gradients_reach_predictions_not_alexnet():
    loss = GPAvatarLoss(crop_size=32)
    out, target, bbox = make_batch(seed=2, dtype=torch.float32)
    for v in out.values():
        v.requires_grad_(True)
    loss(out, target, bbox)["total"].backward()
    for key in ("coarse", "fine", "image"):
        grad = out[key].grad
        assert torch.isfinite(grad).all() and grad[:, :3].abs().sum() > 0, key
    assert torch.count_nonzero(out["coarse"].grad[:, 3:]) == 0
    alphas = out["coarse_alphas"].detach()
    torch.testing.assert_close(out["coarse_alphas"].grad, 1e-5 * alphas / alphas.norm())
    assert all(p.grad is None and not p.requires_grad for p in loss.parameters())


def test_loss_defaults_and_checkpoint_keys():
    loss = GPAvatarLoss()
    assert (loss.percep_weight, loss.img_weight, loss.box_weight, loss.box_percep_weight, loss.density_weight,
            loss.crop_size) == (0.01, 1.0, 0.5, 0.01, 1e-5, 256)
    keys = list(loss.state_dict())
    assert keys == ["percep_loss.net." + k for k, _ in EXPECTED_KEYS]
    # the official checkpoint path: a state_dict filtered to percep_loss.* loads strictly
    other = GPAvatarLoss()
    official = {"style_tplane.x": torch.zeros(1), **other.state_dict()}
    loss.load_state_dict({k: v for k, v in official.items() if k.startswith("percep_loss.")})
    assert torch.equal(loss.percep_loss.net.slice5[0].weight, other.percep_loss.net.slice5[0].weight)


def test_loss_bad_inputs():
    loss = GPAvatarLoss(crop_size=32)
    out, target, bbox = make_batch(dtype=torch.float32)
    with pytest.raises(TypeError, match="out must be a dict"):
        loss([out["image"]], target, bbox)
    with pytest.raises(ValueError, match="missing key.*coarse_alphas"):
        loss({k: v for k, v in out.items() if k != "coarse_alphas"}, target, bbox)
    with pytest.raises(ValueError, match=r"out\['image'\] must have the shape of target"):
        loss({**out, "image": out["image"][:, :, :32, :32]}, target, bbox)
    with pytest.raises(ValueError, match=r"out\['coarse'\]"):
        loss({**out, "coarse": out["coarse"][:, :2]}, target, bbox)
    with pytest.raises(ValueError, match=r"out\['fine'\] must have the spatial size"):
        loss({**out, "fine": torch.rand(2, 5, 40, 40)}, target, bbox)
    with pytest.raises(ValueError, match="target must have shape"):
        loss(out, target[0], bbox)
    with pytest.raises(ValueError, match="bbox must have shape"):
        loss(out, target, bbox[:1])
    with pytest.raises(ValueError, match="crop_size"):
        GPAvatarLoss(crop_size=16)


def test_docstring_examples():
    assert doctest.testmod(losses_module).failed == 0
