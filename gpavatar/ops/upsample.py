"""``upsample2x``: 2x bilinear upsampling, ``F.interpolate(x, scale_factor=2, mode="bilinear",
align_corners=False)``, as the super-resolution network calls it.

``$GPAVATAR_UPSAMPLE`` = torch (default) | triton.  With triton, a channels-last float tensor
(bf16, fp16 or fp32) on a GPU (or on the CPU under ``TRITON_INTERPRET=1``: the tests) that needs
no gradient goes through the Triton kernel (``kernels/upsample.py``); everything else, and
every call by default, is ``F.interpolate``.  Opt-in until a GPU run times it in the real-time
frame (``benchmarks/bench_e2e.py`` realtime rows ``cuda+upsample``).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from gpavatar.ops._backend import triton_available, triton_interpreted

UPSAMPLE_ENV = "GPAVATAR_UPSAMPLE"
METHODS = ("torch", "triton")
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def upsample_method() -> str:
    name = os.environ.get(UPSAMPLE_ENV, "") or "torch"
    if name not in METHODS:
        raise ValueError(f"{UPSAMPLE_ENV} must be torch or triton, got {name!r}")
    return name


def _triton_applies(x: torch.Tensor) -> bool:
    return (x.dim() == 4 and x.dtype in _DTYPES and x.numel() > 0
            and x.is_contiguous(memory_format=torch.channels_last)
            and not (torch.is_grad_enabled() and x.requires_grad) and triton_available()
            and (x.is_cuda or (x.device.type == "cpu" and triton_interpreted())))


def upsample2x_torch(x: torch.Tensor) -> torch.Tensor:
    """``upsample2x``'s torch path, ``F.interpolate`` (any tensor, differentiable)."""
    return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)


def upsample2x(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, 2H, 2W), bilinear, align_corners=False (see the module docstring)."""
    if upsample_method() == "triton" and _triton_applies(x):
        from gpavatar.kernels.upsample import upsample2x as kernel

        N, C, H, W = x.shape
        y = torch.empty((N, C, 2 * H, 2 * W), dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
        return kernel(x, y)
    return upsample2x_torch(x)
