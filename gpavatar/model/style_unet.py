"""StyleUNet: a U-Net encoder feeding a StyleGAN2 decoder through SFT conditions (stylegan.md section 5).

GPAvatar uses it twice: ``style_tplane = StyleUNet(512, 256, 3, 96, activation=False)`` (source image ->
tri-plane features) and ``up_renderer = StyleUNet(512, 512, 32, 3)`` (rendered feature map -> image).

Forward (x: (B, in_dim, H, H)):

1. if H < out_size: bilinear resize to (out_size, out_size)
2. f = lrelu(conv_body_first(x)) (in_size <= out_size), or lrelu(1x1 conv) then a down ResBlock
3. f = conv_body_down[i](f) for i = 0 .. L - 3, keeping every output as a skip (deepest first)
4. f = lrelu(final_conv(f)) (B, ch_u[4], 4, 4); z = final_linear(flatten(f)) (B, F)
5. f = conv_body_up[i](f + skip[i]); conditions += [condition_scale[i](f), condition_shift[i](f)]
6. y = stylegan_decoder(z, conditions, noise); if activation: y = sigmoid(y) * 1.002 - 0.001

lrelu has slope 0.2 and no gain. ``toRGB`` is built (it is in the official checkpoint) but never called.

    >>> import torch
    >>> net = StyleUNet(32, 16, 3, 4, num_style_feat=8, num_mlp=1, narrow=1 / 64)
    >>> net(torch.rand(2, 3, 32, 32), noise="off").shape
    torch.Size([2, 4, 16, 16])
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from gpavatar.model.recompute import upsampled
from gpavatar.ops.upsample import upsample2x

from gpavatar.model.stylegan import (
    LEAKY_SLOPE,
    NOISE_MODES,
    StyleGAN2GeneratorCSFT,
    check_noise_mode,
    check_positive_int,
    check_size,
    decoder_channels,
)

__all__ = ["NOISE_MODES", "ResBlock", "StyleUNet", "unet_channels"]


def unet_channels(narrow: float = 1.0) -> dict[int, int]:
    """U-Net width ``ch_u[r] = max(1, ch_g[r] // 2)`` (half the decoder table, stylegan.md section 3)."""
    return {r: max(1, c // 2) for r, c in decoder_channels(narrow).items()}


def _lrelu_(x: torch.Tensor) -> torch.Tensor:
    """LeakyReLU in place: only on fresh tensors no other node needs (a convolution's output), so
    autograd keeps the output, which the next layer keeps anyway, instead of a second tensor."""
    return F.leaky_relu(x, LEAKY_SLOPE, inplace=True)


def _resample(x: torch.Tensor, mode: str) -> torch.Tensor:
    if mode == "up":
        return upsample2x(x)
    if x.shape[-1] % 2 == 0 and x.shape[-2] % 2 == 0:
        return F.avg_pool2d(x, 2)  # identical to bilinear x0.5 (align_corners=False) for even sizes
    return F.interpolate(x, scale_factor=0.5, mode="bilinear", align_corners=False)


class ResBlock(nn.Module):
    """Residual block with bilinear resampling (stylegan.md section 4.3).

    y = lrelu(conv2(resample(lrelu(conv1(x))))) + skip(resample(x)); conv1 3x3 C_in -> C_in, conv2 3x3
    C_in -> C_out, skip 1x1 C_in -> C_out without bias; resample = x0.5 ("down") or x2 ("up").

    forward: x (B, C_in, H, W) -> (B, C_out, H/2, W/2) for "down", (B, C_out, 2H, 2W) for "up".
    """

    def __init__(self, in_channels: int, out_channels: int, mode: str = "down"):
        super().__init__()
        if mode not in ("down", "up"):
            raise ValueError(f"mode must be 'down' or 'up', got {mode!r}")
        self.mode = mode
        self.conv1 = nn.Conv2d(in_channels, in_channels, 3, padding=1)
        self.conv2 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = _lrelu_(self.conv1(x))
        if self.mode == "up":  # the backward up-samples h and x again (gpavatar.model.recompute)
            return _lrelu_(upsampled(self.conv2, h)) + upsampled(self.skip, x)
        h = _lrelu_(self.conv2(_resample(h, self.mode)))
        return h + self.skip(_resample(x, self.mode))

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}"


def _sft_branch(channels: int, out_channels: int) -> nn.Sequential:
    """3x3 conv c -> c, LeakyReLU 0.2, 3x3 conv c -> out (section 4.4: out = 2c = ch_g; differs only when a
    ``narrow`` setting makes ch_g odd or 1, where out = ch_g keeps the SFT product well-defined)."""
    return nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.LeakyReLU(LEAKY_SLOPE, inplace=True),
                         nn.Conv2d(channels, out_channels, 3, padding=1))


class StyleUNet(nn.Module):
    """U-Net + StyleGAN2 decoder with SFT (stylegan.md section 5).

    Args:
        in_size: nominal input resolution; in_size > out_size adds a down ResBlock to ``conv_body_first``
            (then the input width must equal in_size). Must satisfy in_size <= 2 * out_size.
        out_size: 2^L, output resolution; inputs narrower than this are resized to it
        in_dim, out_dim: input / output channels
        num_style_feat: F, style code width (512)
        num_mlp: Linear layers of the mapping MLP (8)
        activation: output sigmoid(y) * 1.002 - 0.001 instead of the raw decoder output
        narrow: channel scale for small models, ``ch_g = decoder_channels(narrow)``, ``ch_u = max(1, ch_g // 2)``;
            the SFT branches map ch_u -> ch_g (= 2 ch_u whenever ch_g is even, always at narrow 1)

    Submodules, in state_dict order: conv_body_first, conv_body_down, final_conv, conv_body_up,
    toRGB (unused), final_linear, stylegan_decoder, condition_scale, condition_shift.

    forward: x (B, in_dim, H, H) float with H <= in_size (H == in_size when in_size > out_size), noise in
    ``NOISE_MODES``, generator for ``noise="fresh"`` -> (B, out_dim, out_size, out_size).
    """

    def __init__(self, in_size: int, out_size: int, in_dim: int, out_dim: int, num_style_feat: int = 512,
                 num_mlp: int = 8, activation: bool = True, narrow: float = 1.0):
        super().__init__()
        check_size("in_size", in_size)
        check_size("out_size", out_size)
        if in_size > 2 * out_size:
            raise ValueError(f"in_size must be <= 2 * out_size, got in_size={in_size}, out_size={out_size}")
        check_positive_int("in_dim", in_dim)
        check_positive_int("out_dim", out_dim)
        check_positive_int("num_style_feat", num_style_feat)
        channels, decoder_width = unet_channels(narrow), decoder_channels(narrow)
        self.in_size, self.out_size, self.in_dim, self.out_dim = in_size, out_size, in_dim, out_dim
        self.activation = bool(activation)
        self.narrow = narrow
        levels = int(math.log2(out_size)) - 2

        if in_size <= out_size:
            self.conv_body_first = nn.Conv2d(in_dim, channels[out_size], 1)
        else:
            self.conv_body_first = nn.ModuleList([nn.Conv2d(in_dim, channels[in_size], 1),
                                                  ResBlock(channels[in_size], channels[out_size], "down")])
        self.conv_body_down = nn.ModuleList(
            ResBlock(channels[out_size >> i], channels[out_size >> (i + 1)], "down") for i in range(levels))
        self.final_conv = nn.Conv2d(channels[4], channels[4], 3, padding=1)
        self.conv_body_up = nn.ModuleList(
            ResBlock(channels[2 ** (i + 2)], channels[2 ** (i + 3)], "up") for i in range(levels))
        self.toRGB = nn.ModuleList(nn.Conv2d(channels[2 ** (i + 3)], 3, 1) for i in range(levels))
        self.final_linear = nn.Linear(channels[4] * 4 * 4, num_style_feat)
        self.stylegan_decoder = StyleGAN2GeneratorCSFT(out_size, out_dim, num_style_feat, num_mlp, narrow)
        sft = [(channels[2 ** (i + 3)], decoder_width[2 ** (i + 3)]) for i in range(levels)]
        self.condition_scale = nn.ModuleList(_sft_branch(c, out) for c, out in sft)
        self.condition_shift = nn.ModuleList(_sft_branch(c, out) for c, out in sft)

    def check_input(self, x: torch.Tensor) -> None:
        """Raise TypeError / ValueError (naming ``x``) unless x is a float (B, in_dim, H, H), H valid."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
        dtype = self.final_linear.weight.dtype
        if x.dtype != dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(f"x must have the parameters' dtype {dtype} (or run under torch.autocast), got {x.dtype}")
        if x.dim() != 4 or x.shape[1] != self.in_dim:
            raise ValueError(f"x must have shape (B, {self.in_dim}, H, H), got {tuple(x.shape)}")
        H, W = x.shape[-2:]
        if H != W:
            raise ValueError(f"x must be square (H == W), got {tuple(x.shape)}")
        if self.in_size > self.out_size and W != self.in_size:
            raise ValueError(f"x must be {self.in_size}x{self.in_size} when in_size ({self.in_size}) > out_size "
                             f"({self.out_size}), got {tuple(x.shape)}")
        if W > self.in_size or W < 1:
            raise ValueError(f"x width must be in [1, in_size={self.in_size}], got {tuple(x.shape)}")

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """U-Net half: x (B, in_dim, S, S) with S = out_size (or in_size) -> z (B, F) and the
        2(L - 2) SFT conditions [scale_0, shift_0, ...], level i at (B, ch_g[2^(i+3)], 2^(i+3), 2^(i+3))."""
        if isinstance(self.conv_body_first, nn.ModuleList):
            f = self.conv_body_first[1](_lrelu_(self.conv_body_first[0](x)))
        else:
            f = _lrelu_(self.conv_body_first(x))
        skips = []
        for block in self.conv_body_down:
            f = block(f)
            skips.insert(0, f)
        f = _lrelu_(self.final_conv(f))
        z = self.final_linear(f.flatten(1))
        conditions = []
        for i, block in enumerate(self.conv_body_up):
            f = block(f + skips[i])
            conditions += [self.condition_scale[i](f), self.condition_shift[i](f)]
        return z, conditions

    def forward(self, x: torch.Tensor, noise: str = "fresh", generator: Optional[torch.Generator] = None
                ) -> torch.Tensor:
        check_noise_mode(noise)
        self.check_input(x)
        if x.shape[-1] < self.out_size:
            x = F.interpolate(x, size=(self.out_size, self.out_size), mode="bilinear", align_corners=False)
        z, conditions = self.encode(x)
        image = self.stylegan_decoder(z, conditions, noise=noise, generator=generator)
        if self.activation:
            image = torch.sigmoid(image) * 1.002 - 0.001
        return image

    def extra_repr(self) -> str:
        return (f"in_size={self.in_size}, out_size={self.out_size}, in_dim={self.in_dim}, out_dim={self.out_dim}, "
                f"activation={self.activation}, narrow={self.narrow}")
