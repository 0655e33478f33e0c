"""Evaluation metrics: PSNR and SSIM as in the official validation (torchmetrics defaults,
re-implemented without torchmetrics), a per-image PSNR and L1. See :mod:`gpavatar.eval.metrics`."""

from gpavatar.eval.metrics import gaussian_window, l1, psnr, psnr_per_image, ssim, ssim_map

__all__ = ["psnr", "psnr_per_image", "ssim", "ssim_map", "l1", "gaussian_window"]
