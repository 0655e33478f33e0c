"""Image metrics of the official validation (pipeline.md section 6.1) plus L1.

* :func:`psnr` / :func:`ssim` follow torchmetrics' functional ``peak_signal_noise_ratio`` /
  ``structural_similarity_index_measure`` with their default arguments (re-derived from the
  formulas, no torchmetrics dependency), including how the data range is picked when it is
  not given: PSNR uses the range of ``target``, SSIM the larger range of the two inputs, each
  over the whole tensor (batch included).
* :func:`psnr_per_image` is a per-image PSNR with a fixed data range (default 1.0), for
  tables that average PSNR over frames rather than over pooled pixels.
* :func:`l1` is the mean absolute error (paper metric, [0, 1] images).

All functions take ``(B, C, H, W)`` floating tensors of the same shape; the official
validation compares the unclamped super-resolved image (about [-0.001, 1.001]) with the target
(in [0, 255/256]), both 3 x 512 x 512.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["psnr", "psnr_per_image", "ssim", "ssim_map", "l1", "gaussian_window"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_pair(pred, target) -> None:
    for name, t in (("pred", pred), ("target", target)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of shape (B, C, H, W), got {type(t).__name__}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be a floating tensor, got dtype {str(t.dtype).replace('torch.', '')}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have shape (B, C, H, W), got {tuple(t.shape)}")
    if pred.shape != target.shape:
        raise ValueError(f"target must have the shape of pred {tuple(pred.shape)}, got {tuple(target.shape)}")
    if pred.device != target.device:
        raise ValueError(f"target must be on the device of pred ({pred.device}), got {target.device}")
    if pred.numel() == 0:
        raise ValueError(f"pred must not be empty, got shape {tuple(pred.shape)}")


def _check_data_range(data_range) -> Optional[float]:
    if data_range is None:
        return None
    if isinstance(data_range, bool) or not isinstance(data_range, (int, float)):
        raise TypeError(f"data_range must be a positive number or None, got {type(data_range).__name__}")
    if not (data_range > 0 and math.isfinite(data_range)):
        raise ValueError(f"data_range must be a positive finite number, got {data_range}")
    return float(data_range)


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (half inputs are upcast)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def l1(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean absolute error over all elements: mean |pred - target|.

    >>> l1(torch.zeros(1, 3, 4, 4), torch.full((1, 3, 4, 4), 0.5))
    tensor(0.5000)

    Args:
        pred: (B, C, H, W) float
        target: (B, C, H, W) float
    Returns:
        () scalar tensor (differentiable)
    """
    _check_pair(pred, target)
    return (pred - target).abs().mean()


def psnr(pred: torch.Tensor, target: torch.Tensor, data_range: Optional[float] = None) -> torch.Tensor:
    """PSNR over the whole tensor, torchmetrics-default style (the official validation metric).

    PSNR = 10 log10(R^2 / MSE), MSE = mean (pred - target)^2 over all elements (batch
    pooled), R = ``data_range`` or, when None, ``target.max() - target.min()`` (the range of
    the ground truth, not a fixed 1.0). Identical inputs give +inf; a constant target with
    ``data_range=None`` gives R = 0, hence -inf (or NaN if MSE is also 0), as torchmetrics does.

    >>> psnr(torch.zeros(1, 1, 2, 2), torch.tensor([[[[0.0, 1.0], [0.0, 1.0]]]]))
    tensor(3.0103)

    Args:
        pred: (B, C, H, W) float
        target: (B, C, H, W) float
        data_range: positive float or None
    Returns:
        () float32 (float64 if an input is float64) scalar tensor
    """
    _check_pair(pred, target)
    data_range = _check_data_range(data_range)
    dtype = _compute_dtype(pred, target)
    pred, target = pred.to(dtype), target.to(dtype)
    mse = (pred - target).pow(2).mean()
    value_range = target.max() - target.min() if data_range is None else torch.tensor(data_range, dtype=dtype,
                                                                                      device=pred.device)
    return 10.0 * (2.0 * torch.log10(value_range) - torch.log10(mse))


def psnr_per_image(pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """PSNR of every image separately, with a fixed data range.

    PSNR_b = 10 log10(R^2 / MSE_b), MSE_b = mean over (C, H, W) of image b. Unlike
    :func:`psnr` the range is fixed (default 1.0 for [0, 1] images) so one image's content does
    not change the scale; average the result over frames for a per-frame mean. For a batch of
    one image with ``data_range = target range`` it equals :func:`psnr`.

    Args:
        pred: (B, C, H, W) float
        target: (B, C, H, W) float
        data_range: positive float
    Returns:
        (B,) float32 (float64 if an input is float64); +inf where an image matches exactly
    """
    _check_pair(pred, target)
    if data_range is None:
        raise TypeError("data_range must be a positive number for psnr_per_image, got None")
    data_range = _check_data_range(data_range)
    dtype = _compute_dtype(pred, target)
    mse = (pred.to(dtype) - target.to(dtype)).pow(2).flatten(1).mean(dim=1)
    return 10.0 * (2.0 * math.log10(data_range) - torch.log10(mse))


def gaussian_window(kernel_size: int = 11, sigma: float = 1.5, dtype: torch.dtype = torch.float32,
                    device=None) -> torch.Tensor:
    """Normalized 2D Gaussian window, the outer product of a 1D window on offsets
    -(k-1)/2 .. (k-1)/2, g(d) = exp(-d^2 / (2 sigma^2)) / sum.

    Returns:
        (kernel_size, kernel_size) tensor summing to 1
    """
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd int, got {kernel_size!r}")
    if not (isinstance(sigma, (int, float)) and sigma > 0):
        raise ValueError(f"sigma must be a positive number, got {sigma!r}")
    offsets = torch.arange(kernel_size, dtype=torch.float64) - (kernel_size - 1) / 2
    g = torch.exp(-0.5 * (offsets / sigma) ** 2)
    g = g / g.sum()
    return torch.outer(g, g).to(dtype=dtype, device=device)


def ssim_map(pred: torch.Tensor, target: torch.Tensor, data_range: Optional[float] = None, *,
             kernel_size: int = 11, sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03,
             crop_border: bool = True) -> torch.Tensor:
    """Per-pixel SSIM map (torchmetrics-default definition), each channel separately.

    Both images are reflect-padded by p = (kernel_size - 1) // 2 on every side, then the local
    statistics are Gaussian-weighted means over each window (a depthwise ``conv2d``,
    ``groups = C``, no further padding):
    mu_x = w*x, sigma_x^2 = max(w*x^2 - mu_x^2, 0), sigma_xy = w*(xy) - mu_x mu_y, and
    SSIM = (2 mu_x mu_y + c1)(2 sigma_xy + c2) / ((mu_x^2 + mu_y^2 + c1)(sigma_x^2 + sigma_y^2 + c2))
    with c1 = (k1 R)^2, c2 = (k2 R)^2, R = ``data_range`` or, when None,
    max(pred.max() - pred.min(), target.max() - target.min()) over the whole tensors.
    The variance clamp at 0 only removes rounding noise.

    Border: with ``crop_border=True`` (default, recent torchmetrics: 1.x, the versions pulled
    in by Lightning 2.1.3) the p-pixel frame whose windows reach into the reflected padding is
    cropped from the map, which is then (H - 2p, W - 2p); ``crop_border=False`` keeps the full
    (H, W) map (older torchmetrics).

    Args:
        pred: (B, C, H, W) float, H and W >= kernel_size
        target: (B, C, H, W) float
        data_range: positive float or None
    Returns:
        (B, C, H - 2p, W - 2p) with crop_border, else (B, C, H, W); float32 (float64 if an
        input is float64)
    """
    _check_pair(pred, target)
    data_range = _check_data_range(data_range)
    window = gaussian_window(kernel_size, sigma, dtype=_compute_dtype(pred, target), device=pred.device)
    pad = (kernel_size - 1) // 2
    B, C, H, W = pred.shape
    if H < kernel_size or W < kernel_size:
        raise ValueError(f"pred must be at least {kernel_size} x {kernel_size} pixels (kernel_size), "
                         f"got {H} x {W}")
    for name, k in (("k1", k1), ("k2", k2)):
        if not (isinstance(k, (int, float)) and k > 0):
            raise ValueError(f"{name} must be a positive number, got {k!r}")
    dtype = window.dtype
    x, y = pred.to(dtype), target.to(dtype)
    if data_range is None:
        value_range = torch.maximum(x.max() - x.min(), y.max() - y.min())
    else:
        value_range = torch.tensor(data_range, dtype=dtype, device=x.device)
    c1, c2 = (k1 * value_range) ** 2, (k2 * value_range) ** 2

    # Five statistics in one depthwise convolution: channels grouped per image channel.
    stacked = torch.cat([x, y, x * x, y * y, x * y], dim=1)  # (B, 5C, H, W)
    stacked = F.pad(stacked, (pad, pad, pad, pad), mode="reflect")
    weight = window.expand(5 * C, 1, kernel_size, kernel_size)
    mu_x, mu_y, exx, eyy, exy = F.conv2d(stacked, weight, groups=5 * C).split(C, dim=1)

    var_x = (exx - mu_x * mu_x).clamp_min(0)
    var_y = (eyy - mu_y * mu_y).clamp_min(0)
    cov_xy = exy - mu_x * mu_y
    numerator = (2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)
    denominator = (mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2)
    result = numerator / denominator
    if crop_border and pad > 0:
        result = result[..., pad:H - pad, pad:W - pad]
    return result


def ssim(pred: torch.Tensor, target: torch.Tensor, data_range: Optional[float] = None, *,
         kernel_size: int = 11, sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03,
         crop_border: bool = True) -> torch.Tensor:
    """Mean SSIM over the map of :func:`ssim_map` (all images, channels and pixels), the
    torchmetrics-default SSIM of the official validation. See :func:`ssim_map` for the
    formula, the data range and the ``crop_border`` choice (default: cropped, torchmetrics 1.x).

    >>> x = torch.rand(1, 3, 16, 16)
    >>> round(float(ssim(x, x)), 6)
    1.0

    Args:
        pred: (B, C, H, W) float, H and W >= kernel_size
        target: (B, C, H, W) float
        data_range: positive float or None
    Returns:
        () scalar tensor, 1 for identical inputs (differentiable)
    """
    return ssim_map(pred, target, data_range, kernel_size=kernel_size, sigma=sigma, k1=k1, k2=k2,
                    crop_border=crop_border).mean()
