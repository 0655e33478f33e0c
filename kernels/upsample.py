"""2x bilinear upsampling of channels-last (NHWC) images in Triton: forward only.

``F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)`` for x (N, C, H, W)
stored channels-last (element (n, c, h, w) at ((n H + h) W + w) C + c), the output likewise.
Output pixel (oh, ow) reads the source position s = max((o + 1/2) / 2 - 1/2, 0) on each axis:
rows h0 = floor(s_h) and h1 = min(h0 + 1, H - 1) with weights 1 - l and l (l = s_h - h0, so
0, 1/4 or 3/4), likewise columns; the value is
    (1 - l_h) ((1 - l_w) x[h0, w0] + l_w x[h0, w1]) + l_h ((1 - l_w) x[h1, w0] + l_w x[h1, w1])
in float32, rounded once to the output dtype (PyTorch's CUDA kernel's arithmetic; with these
weights every product and sum of bf16 / fp16 inputs is exact in float32, so those outputs are
the same bits).

A program owns BLOCK_P consecutive output pixels (over n, oh, ow) and BLOCK_C channels: its
loads and stores are contiguous runs of channels, and the four source pixels of neighbouring
outputs are shared through the cache.  Written for the super-resolution network's real-time
pass, where PyTorch's generic NHWC kernel ran about ten times slower than the bytes it moves
allow.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def upsample2x_kernel(x_ptr, y_ptr, H, W, C, total, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    p = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    OW = 2 * W
    OH = 2 * H
    ow = p % OW
    t = p // OW
    oh = t % OH
    n = t // OH
    sh = tl.maximum(0.5 * (oh.to(tl.float32) + 0.5) - 0.5, 0.0)
    sw = tl.maximum(0.5 * (ow.to(tl.float32) + 0.5) - 0.5, 0.0)
    h0 = sh.to(tl.int64)  # sh >= 0: truncation is the floor
    w0 = sw.to(tl.int64)
    lh = sh - h0.to(tl.float32)
    lw = sw - w0.to(tl.float32)
    h1 = h0 + (h0 < H - 1).to(tl.int64)
    w1 = w0 + (w0 < W - 1).to(tl.int64)
    row0 = (n * H + h0) * W
    row1 = (n * H + h1) * W
    mask = (p < total)[:, None] & (c < C)[None, :]
    cc = c[None, :]
    x00 = tl.load(x_ptr + ((row0 + w0) * C)[:, None] + cc, mask=mask, other=0.0).to(tl.float32)
    x01 = tl.load(x_ptr + ((row0 + w1) * C)[:, None] + cc, mask=mask, other=0.0).to(tl.float32)
    x10 = tl.load(x_ptr + ((row1 + w0) * C)[:, None] + cc, mask=mask, other=0.0).to(tl.float32)
    x11 = tl.load(x_ptr + ((row1 + w1) * C)[:, None] + cc, mask=mask, other=0.0).to(tl.float32)
    a_w = (1.0 - lw)[:, None]
    b_w = lw[:, None]
    top = a_w * x00 + b_w * x01
    bottom = a_w * x10 + b_w * x11
    value = (1.0 - lh)[:, None] * top + lh[:, None] * bottom
    tl.store(y_ptr + (p * C)[:, None] + cc, value.to(y_ptr.dtype.element_ty), mask=mask)


def upsample2x(x, y):
    """Fill y (N, C, 2H, 2W) from x (N, C, H, W), both channels-last contiguous, same dtype.

    Under TRITON_INTERPRET=1 a 16-bit output is written in float32 and rounded by torch (the
    interpreter truncates float32 -> bfloat16 casts; a GPU rounds to nearest even, like torch)."""
    if x.device.type == "cpu" and y.dtype != torch.float32:
        y32 = torch.empty(y.shape, dtype=torch.float32, memory_format=torch.channels_last)
        return y.copy_(_launch(x, y32))
    return _launch(x, y)


def _launch(x, y):
    N, C, H, W = x.shape
    total = N * 4 * H * W
    block_c = min(triton.next_power_of_2(C), 64)
    block_p = max(16, 2048 // block_c)
    grid = (triton.cdiv(total, block_p), triton.cdiv(C, block_c))
    upsample2x_kernel[grid](x, y, H, W, C, total, BLOCK_P=block_p, BLOCK_C=block_c)
    return y
