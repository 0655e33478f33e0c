"""Training losses of the official GPAvatar code (pipeline.md sections 5.5 and 5.6).

* :class:`AlexNetFeatures`: the frozen AlexNet conv trunk, split into ``slice1..slice5`` with
  the original layer indices as module names, so its state-dict keys match the official
  checkpoint's ``percep_loss.net.slice*`` keys.
* :class:`PerceptualDistance`: sum over the 5 ReLU outputs of the mean squared difference of
  channel-unit-normalized features (not LPIPS: no learned linear heads, ImageNet input
  normalization of [0, 1] images).
* :func:`crop_box`: the face-box crop of the box loss.
* :class:`GPAvatarLoss`: the four weighted terms and their total, plus the training PSNR.

Loading the official frozen weights (the only persistent state of :class:`GPAvatarLoss`)::

    sd = torch.load("one_model.ckpt", weights_only=True)["state_dict"]
    loss.load_state_dict({k: v for k, v in sd.items() if k.startswith("percep_loss.")})

or torchvision's ``alexnet(weights="DEFAULT").features.state_dict()`` through
:meth:`AlexNetFeatures.load_torchvision_features`. Without either, the AlexNet is randomly
initialized (PyTorch's default conv init; pretrained weights are not downloaded here): from
the global RNG, or, with ``seed=``, from a private one (the same trunk in every process; the
trainer passes a seed derived from ``--seed`` and stores the trunk in ``last.pt``).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["AlexNetFeatures", "PerceptualDistance", "crop_box", "GPAvatarLoss", "MIN_PERCEPTUAL_SIZE"]

# Smallest H, W the AlexNet trunk accepts: conv1 (k11, s4, p2) must leave >= 7 pixels so both
# 3 x 3 / stride-2 max-pools have an input: floor((H - 7) / 4) + 1 >= 7  <=>  H >= 31.
MIN_PERCEPTUAL_SIZE = 31

# torchvision AlexNet ``features`` layer index -> slice number (max-pools open slices 2 and 3).
_SLICE_OF_LAYER = {0: 1, 1: 1, 2: 2, 3: 2, 4: 2, 5: 3, 6: 3, 7: 3, 8: 4, 9: 4, 10: 5, 11: 5}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_image(t, name: str, channels: int | None = None, min_size: int = 1) -> None:
    shape = f"(B, {channels if channels is not None else 'C'}, H, W)"
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {shape}, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor, got dtype {str(t.dtype).replace('torch.', '')}")
    if t.dim() != 4 or (channels is not None and t.shape[1] != channels):
        raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    if t.shape[2] < min_size or t.shape[3] < min_size:
        raise ValueError(f"{name} must be at least {min_size} x {min_size} pixels, got {t.shape[2]} x {t.shape[3]}")


def _alexnet_layers() -> list[nn.Module]:
    return [nn.Conv2d(3, 64, 11, stride=4, padding=2), nn.ReLU(inplace=False), nn.MaxPool2d(3, 2),
            nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(inplace=False), nn.MaxPool2d(3, 2),
            nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(inplace=False),
            nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(inplace=False),
            nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(inplace=False)]


class AlexNetFeatures(nn.Module):
    """Frozen AlexNet conv trunk (torchvision layout) returning the five ReLU outputs.

    Slices keep torchvision's layer indices as names: ``slice1`` = layers 0-1 (conv1, ReLU),
    ``slice2`` = 2-4 (max-pool, conv2, ReLU), ``slice3`` = 5-7 (max-pool, conv3, ReLU),
    ``slice4`` = 8-9, ``slice5`` = 10-11; parameters ``slice1.0.*``, ``slice2.3.*``,
    ``slice3.6.*``, ``slice4.8.*``, ``slice5.10.*``. All parameters have requires_grad False;
    gradients still flow to the input.

    >>> feats = AlexNetFeatures()(torch.rand(1, 3, 64, 64))
    >>> [tuple(f.shape) for f in feats]
    [(1, 64, 15, 15), (1, 192, 7, 7), (1, 384, 3, 3), (1, 256, 3, 3), (1, 256, 3, 3)]

    seed: None draws the random initial weights from the global RNG; an int draws them after
    ``torch.manual_seed(seed)`` in a forked RNG (the global RNG is left as it was).

    Input: (B, 3, H, W) normalized image, H, W >= 31.
    Output: 5 tensors (B, 64 | 192 | 384 | 256 | 256, h_i, w_i).
    """

    def __init__(self, seed: Optional[int] = None):
        super().__init__()
        if seed is None:
            layers = _alexnet_layers()
        else:
            if isinstance(seed, bool) or not isinstance(seed, int):
                raise TypeError(f"seed must be None or an int, got {seed!r}")
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                layers = _alexnet_layers()
        for number in range(1, 6):
            named = OrderedDict((str(i), layers[i]) for i, s in _SLICE_OF_LAYER.items() if s == number)
            setattr(self, f"slice{number}", nn.Sequential(named))
        self.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        _check_image(x, "x", 3, MIN_PERCEPTUAL_SIZE)
        features = []
        for number in range(1, 6):
            x = getattr(self, f"slice{number}")(x)
            features.append(x)
        return features

    def load_torchvision_features(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Load torchvision ``alexnet().features`` weights (keys ``N.weight`` / ``N.bias``,
        optionally prefixed ``features.``), strictly: every conv must be present."""
        mapped = {}
        for key, value in state_dict.items():
            short = key[len("features."):] if key.startswith("features.") else key
            index, _, leaf = short.partition(".")
            if not index.isdigit() or int(index) not in _SLICE_OF_LAYER:
                raise ValueError(f"state_dict has a key that is not an AlexNet features layer: {key!r}")
            mapped[f"slice{_SLICE_OF_LAYER[int(index)]}.{index}.{leaf}"] = value
        self.load_state_dict(mapped, strict=True)


class PerceptualDistance(nn.Module):
    """Official perceptual distance P(x, y) (pipeline.md 5.6), a scalar.

    x, y in [0, 1] are normalized with the ImageNet mean / std, passed through
    :class:`AlexNetFeatures` (attribute ``net``), and for each of the 5 layers
    f_hat = f / (||f||_channels + 1e-10);
    P = sum_layers mean_{b, h, w} sum_c (f_hat_x - f_hat_y)^2.
    P(x, x) = 0, P is symmetric. The mean / std buffers are not persistent, so the state dict
    holds exactly ``net.slice*`` (``percep_loss.net.slice*`` inside :class:`GPAvatarLoss`).

    Inputs: pred, target (B, 3, H, W) float (below 31 px both are first upsampled bilinearly to
    32 px, AlexNet's minimum: only the tiny preset's renders are that small). Output: () scalar.
    ``seed``: see :class:`AlexNetFeatures`.
    """

    def __init__(self, eps: float = 1e-10, seed: Optional[int] = None):
        super().__init__()
        self.eps = eps
        self.net = AlexNetFeatures(seed=seed)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        _check_image(pred, "pred", 3)
        _check_image(target, "target", 3)
        if pred.shape != target.shape:
            raise ValueError(f"target must have the shape of pred {tuple(pred.shape)}, got {tuple(target.shape)}")
        dtype = self.net.slice1[0].weight.dtype
        both = torch.cat([pred, target]).to(dtype)
        H, W = both.shape[-2:]
        if min(H, W) < MIN_PERCEPTUAL_SIZE:
            # Smaller than AlexNet accepts (only the tiny preset's renders): upsample bilinearly
            # to at least 32 px. Official sizes (128, 256, 512) never take this branch.
            size = (max(H, MIN_PERCEPTUAL_SIZE + 1), max(W, MIN_PERCEPTUAL_SIZE + 1))
            both = F.interpolate(both, size=size, mode="bilinear", align_corners=False)
        both = (both - self.mean.to(dtype)) / self.std.to(dtype)
        total = both.new_zeros(())
        for feature in self.net(both):
            unit = feature / (torch.linalg.vector_norm(feature, dim=1, keepdim=True) + self.eps)
            unit_pred, unit_target = unit.chunk(2)
            total = total + (unit_pred - unit_target).pow(2).sum(dim=1).mean()
        return total


def _box_pixels(bbox: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Integer (x1, y1, x2, y2) per image, (B, 4) int64 on bbox's device: clamp to [0, 1], scale,
    truncate; an empty box (x2 <= x1 or y2 <= y1) becomes the whole image.  No host sync."""
    # [W, H, W, H] made on the device (a tensor from host data would be a synchronous copy)
    is_x = torch.arange(4, device=bbox.device) % 2 == 0
    scale = torch.where(is_x, float(width), float(height)).to(bbox.dtype)
    pixels = (bbox.detach().clamp(0.0, 1.0) * scale).to(torch.int64)  # values >= 0: truncation = floor
    whole = torch.where(is_x, width, height) * (torch.arange(4, device=bbox.device) >= 2)  # [0, 0, W, H]
    empty = (pixels[:, 2] <= pixels[:, 0]) | (pixels[:, 3] <= pixels[:, 1])
    return torch.where(empty[:, None], whole, pixels)


def _resize_weights(start: torch.Tensor, stop: torch.Tensor, length: int, size: int,
                    dtype: torch.dtype) -> torch.Tensor:
    """(B, size, length) weights of the antialiased bilinear resize (``F.interpolate(...,
    mode="bilinear", align_corners=False, antialias=True)``) of the index range
    [start, stop) (per image, int64 (B,)) of an axis of ``length`` samples to ``size`` samples:
    row i holds output i's triangle-filter taps at their positions on the whole axis, zero outside
    the range.  The same taps as torch's kernel: centre s (i + 1/2) with s = n / size (n = stop -
    start), support max(s, 1), taps j in [trunc(centre - support + 1/2), trunc(centre + support +
    1/2)) clipped to [0, n), weight max(0, 1 - |j - centre + 1/2| / max(s, 1)), normalized."""
    n = (stop - start).to(torch.float64)[:, None, None]  # (B, 1, 1); the taps in float64, then cast
    scale = n / size
    support = scale.clamp_min(1.0)
    centre = scale * (torch.arange(size, dtype=torch.float64, device=start.device)[None, :, None] + 0.5)
    j = torch.arange(length, dtype=torch.float64, device=start.device)[None, None, :] - start[:, None, None]
    lo = (centre - support + 0.5).trunc().clamp_min(0.0)
    hi = torch.minimum((centre + support + 0.5).trunc(), n)
    taps = (1.0 - ((j - centre + 0.5) / support).abs()).clamp_min(0.0)
    taps = torch.where((j >= lo) & (j < hi), taps, 0.0)
    total = taps.sum(dim=-1, keepdim=True)
    return (taps / torch.where(total == 0, 1.0, total)).to(dtype)


def crop_box(images: torch.Tensor, bbox: torch.Tensor, size: int = 256) -> torch.Tensor:
    """Face-box crop of each image, resized to size x size (pipeline.md 5.5).

    bbox = normalized [x1, y1, x2, y2]; clamped to [0, 1], x scaled by W and y by H (the
    official code scales both by the width; identical for the square images it uses),
    truncated to int; the crop is rows y1:y2, columns x1:x2, resized with bilinear
    interpolation, antialias, align_corners False. An empty box (x2 <= x1 or y2 <= y1, which
    crashes the official code) falls back to the full image.

    The crop and resize are one separable linear map per image (``Wy @ image @ Wx^T``, the
    resize's taps placed at the box's rows and columns: :func:`_resize_weights`), so the box is
    never read on the host: shapes do not depend on it and the training step can be captured as a
    CUDA graph.  Equal to ``F.interpolate(image[:, y1:y2, x1:x2], (size, size), mode="bilinear",
    antialias=True)`` up to float rounding.  Runs in float32 at least (float64 stays float64), with
    autocast off.

    >>> crop_box(torch.rand(2, 3, 64, 64), torch.tensor([[0.25, 0.25, 0.75, 0.75]] * 2), 32).shape
    torch.Size([2, 3, 32, 32])

    Args:
        images: (B, C, H, W) float
        bbox: (B, 4) float, normalized [x1, y1, x2, y2]
        size: output side in pixels
    Returns:
        (B, C, size, size), differentiable w.r.t. images
    """
    _check_image(images, "images")
    if not isinstance(bbox, torch.Tensor) or not bbox.is_floating_point():
        raise TypeError(f"bbox must be a floating torch.Tensor of shape (B, 4), got {type(bbox).__name__}"
                        + (f" of dtype {bbox.dtype}" if isinstance(bbox, torch.Tensor) else ""))
    if bbox.shape != (images.shape[0], 4):
        raise ValueError(f"bbox must have shape ({images.shape[0]}, 4) (batch of images), got {tuple(bbox.shape)}")
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive int, got {size!r}")
    H, W = images.shape[-2:]
    dtype = torch.promote_types(images.dtype, torch.float32)
    box = _box_pixels(bbox.to(images.device), H, W)
    with torch.autocast(images.device.type, enabled=False):
        wy = _resize_weights(box[:, 1], box[:, 3], H, size, dtype)  # (B, size, H)
        wx = _resize_weights(box[:, 0], box[:, 2], W, size, dtype)  # (B, size, W)
        # columns first, then rows (torch's antialiased kernel resizes the width first too)
        rows = torch.matmul(images.to(dtype), wx.transpose(1, 2)[:, None])  # (B, C, H, size)
        return torch.matmul(wy[:, None], rows)  # (B, C, size, size)


def _resize(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    if images.shape[-2:] == (height, width):
        return images
    return F.interpolate(images, size=(height, width), mode="bilinear", align_corners=False, antialias=True)


class GPAvatarLoss(nn.Module):
    """The official training loss (pipeline.md 5.5, function ``calc_metrics``).

    With C, F the first 3 channels of the coarse / fine renders (r x r), S the super-resolved
    image and G the target (S x S), g = G resized to r x r (bilinear, antialias,
    align_corners False), L1 = mean absolute error, P = :class:`PerceptualDistance`
    (attribute ``percep_loss``) and crop = :func:`crop_box` with ``bbox`` at ``crop_size``:

    * ``percep_loss`` = percep_weight · [P(C, g) + P(F, g) + P(S, G)] / 3
    * ``img_loss`` = img_weight · [L1(C, g) + L1(F, g) + L1(S, G)]
    * ``box_loss`` = box_weight · Σ_{X in C, F, S} [box_percep_weight · P(crop X, crop GT_X)
      + L1(crop X, crop GT_X)], GT_C = GT_F = g, GT_S = G
    * ``density_loss`` = density_weight · ||coarse_alphas||_2 (plain L2 norm of all values)
    * ``total`` = sum of the four; ``psnr`` = -10 log10(MSE(S, G)) (detached, for logging).

    Defaults are the official values (the ½ of the box term is ``box_weight`` = 0.5).
    ``seed``: the random AlexNet trunk's seed (see :class:`AlexNetFeatures`; None: global RNG).

    Inputs:
        out: dict with ``coarse`` (B, Cv, r, r), ``fine`` (B, Cv, r, r), Cv >= 3, RGB first;
            ``image`` (B, 3, S, S); ``coarse_alphas`` any shape
        target: (B, 3, S, S) in [0, 1]
        bbox: (B, 4) normalized [x1, y1, x2, y2]
    Output: dict of () scalars ``percep_loss``, ``img_loss``, ``box_loss``, ``density_loss``,
        ``total``, ``psnr``.
    r, S and crop_size must be >= 31 (AlexNet).
    """

    def __init__(self, percep_weight: float = 0.01, img_weight: float = 1.0, box_weight: float = 0.5,
                 box_percep_weight: float = 0.01, density_weight: float = 1e-5, crop_size: int = 256,
                 seed: Optional[int] = None):
        super().__init__()
        if isinstance(crop_size, bool) or not isinstance(crop_size, int) or crop_size < MIN_PERCEPTUAL_SIZE:
            raise ValueError(f"crop_size must be an int >= {MIN_PERCEPTUAL_SIZE} (AlexNet), got {crop_size!r}")
        self.percep_weight, self.img_weight, self.box_weight = percep_weight, img_weight, box_weight
        self.box_percep_weight, self.density_weight, self.crop_size = box_percep_weight, density_weight, crop_size
        self.percep_loss = PerceptualDistance(seed=seed)

    def _check_inputs(self, out, target, bbox) -> None:
        if not isinstance(out, Mapping):
            raise TypeError(f"out must be a dict with coarse, fine, image, coarse_alphas; got {type(out).__name__}")
        missing = [k for k in ("coarse", "fine", "image", "coarse_alphas") if k not in out]
        if missing:
            raise ValueError(f"out is missing key(s) {missing}")
        _check_image(target, "target", 3)
        _check_image(out["image"], "out['image']", 3)
        if out["image"].shape != target.shape:
            raise ValueError(f"out['image'] must have the shape of target {tuple(target.shape)}, "
                             f"got {tuple(out['image'].shape)}")
        for key in ("coarse", "fine"):
            _check_image(out[key], f"out[{key!r}]", None)
            if out[key].shape[0] != target.shape[0] or out[key].shape[1] < 3:
                raise ValueError(f"out[{key!r}] must have shape ({target.shape[0]}, Cv >= 3, r, r), "
                                 f"got {tuple(out[key].shape)}")
        if out["coarse"].shape[-2:] != out["fine"].shape[-2:]:
            raise ValueError(f"out['fine'] must have the spatial size of out['coarse'] "
                             f"{tuple(out['coarse'].shape[-2:])}, got {tuple(out['fine'].shape[-2:])}")
        if not isinstance(out["coarse_alphas"], torch.Tensor):
            raise TypeError(f"out['coarse_alphas'] must be a torch.Tensor, got {type(out['coarse_alphas']).__name__}")

    def forward(self, out: Mapping[str, torch.Tensor], target: torch.Tensor, bbox: torch.Tensor
                ) -> dict[str, torch.Tensor]:
        self._check_inputs(out, target, bbox)
        coarse, fine, image = out["coarse"][:, :3], out["fine"][:, :3], out["image"]
        small_target = _resize(target, *coarse.shape[-2:])
        pairs = [(coarse, small_target), (fine, small_target), (image, target)]

        # Same-sized pairs share one pass of the perceptual network (fewer, larger convolutions): P
        # averages over the batch, so P on the B coarse and B fine samples together is the mean of
        # P(coarse, g) and P(fine, g); the three face-box crops (all crop_size) go through it together.
        percep = (2 * self.percep_loss(torch.cat([coarse, fine]), torch.cat([small_target, small_target]))
                  + self.percep_loss(image, target)) / 3
        img = sum((x - gt).abs().mean() for x, gt in pairs)
        both = [torch.cat([x, gt.to(torch.promote_types(x.dtype, gt.dtype))], dim=1) for x, gt in pairs]
        crops = torch.cat([crop_box(torch.cat(both[:2]), bbox.repeat(2, 1), self.crop_size),  # a bf16 render
                           crop_box(both[2], bbox, self.crop_size)])                       # never rounds gt
        crop_x, crop_gt = crops[:, :3], crops[:, 3:]
        # each of the 3 pairs' P and L1 is a mean over its B samples: 3 x the mean over all 3B
        box = 3 * (self.box_percep_weight * self.percep_loss(crop_x, crop_gt) + (crop_x - crop_gt).abs().mean())
        density = torch.linalg.vector_norm(out["coarse_alphas"].flatten())

        terms = {"percep_loss": self.percep_weight * percep, "img_loss": self.img_weight * img,
                 "box_loss": self.box_weight * box, "density_loss": self.density_weight * density}
        terms["total"] = sum(terms.values())
        with torch.no_grad():
            terms["psnr"] = -10.0 * torch.log10((image.detach().float() - target.float()).pow(2).mean())
        return terms
