"""The StyleGAN2 decoder with spatial feature transforms (stylegan.md sections 4.5-4.11 and 6).

``StyleGAN2GeneratorCSFT`` turns one style code z and 2(L - 2) SFT condition maps into an
image of ``out_size`` = 2^L pixels. It differs from textbook StyleGAN2 (stylegan.md section 13):
plain ``nn.Linear`` layers (no equalized lr), bilinear up-sampling (no transposed conv, no blur),
StyleConv = lrelu(sqrt(2) * modconv(x) + weight * noise + bias), and a full SFT
``h * scale + shift`` after the first StyleConv of every level.

Noise (``NOISE_MODES``): ``"fresh"`` draws a new N(0, 1) map (B, 1, r, r) per StyleConv on every
call (the official behaviour, ``randomize_noise=True``), in slot order, in the parameters' dtype,
from ``generator`` if given; ``"stored"`` uses the persistent buffers ``noises.noise{j}``
(1, 1, r, r), broadcast over the batch; ``"off"`` drops the noise term.

Names follow the official checkpoint (``*.stylegan_decoder.``): ``style_mlp.{1,3,..}``,
``constant_input.weight``, ``style_conv1``, ``to_rgb1``, ``style_convs.{i}``, ``to_rgbs.{k}``,
``noises.noise{j}``.

    >>> import torch
    >>> decoder = StyleGAN2GeneratorCSFT(16, 3, num_style_feat=8, num_mlp=1, narrow=1 / 64)
    >>> conditions = [torch.ones(2, 8, 8, 8), torch.zeros(2, 8, 8, 8),
    ...               torch.ones(2, 8, 16, 16), torch.zeros(2, 8, 16, 16)]
    >>> decoder(torch.randn(2, 8), conditions, noise="off").shape
    torch.Size([2, 3, 16, 16])
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from gpavatar.model.recompute import recomputed, upsampled, worth_recomputing
from gpavatar.ops.upsample import upsample2x

NOISE_MODES = ("fresh", "stored", "off")
"""Allowed values of the ``noise`` argument of the decoder and of ``StyleUNet``."""

DECODER_CHANNELS = {4: 512, 8: 512, 16: 512, 32: 512, 64: 256, 128: 128, 256: 64, 512: 32, 1024: 16}
"""Decoder width ``ch_g[r]`` per resolution at narrow = 1 (stylegan.md section 3)."""

LEAKY_SLOPE = 0.2

__all__ = ["NOISE_MODES", "DECODER_CHANNELS", "decoder_channels", "check_noise_mode", "check_size",
           "check_positive_int", "NormStyleCode", "ModulatedConv2d", "StyleConv", "ToRGB", "ConstantInput",
           "StyleGAN2GeneratorCSFT"]


def decoder_channels(narrow: float = 1.0) -> dict[int, int]:
    """``ch_g[r] = max(1, round(DECODER_CHANNELS[r] * narrow))`` for every resolution r."""
    if isinstance(narrow, bool) or not isinstance(narrow, (int, float)) or not math.isfinite(narrow) or narrow <= 0:
        raise ValueError(f"narrow must be a positive finite number, got {narrow!r}")
    return {r: max(1, int(round(c * narrow))) for r, c in DECODER_CHANNELS.items()}


def check_noise_mode(noise: str) -> None:
    """Raise ValueError unless ``noise`` is one of ``NOISE_MODES``."""
    if not isinstance(noise, str) or noise not in NOISE_MODES:
        raise ValueError(f"noise must be one of {NOISE_MODES}, got {noise!r}")


def check_size(name: str, value) -> None:
    """Raise ValueError unless ``value`` is an int resolution of the channel table (4 ... 1024)."""
    if isinstance(value, bool) or not isinstance(value, int) or value not in DECODER_CHANNELS:
        raise ValueError(f"{name} must be one of {sorted(DECODER_CHANNELS)}, got {value!r}")


def check_positive_int(name: str, value, minimum: int = 1) -> None:
    """Raise ValueError unless ``value`` is an int (not a bool) >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


class NormStyleCode(nn.Module):
    """Pixel norm of a style code: x / sqrt(mean_j x_j^2 + 1e-8).

    x: (B, F) -> (B, F)
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(dim=1, keepdim=True) + 1e-8)


class ModulatedConv2d(nn.Module):
    """StyleGAN2 modulated convolution, no bias (stylegan.md section 4.7).

    W'[b, o, i] = weight[0, o, i] * s[b, i] with s = modulation(style); if ``demodulate``,
    W'[b, o] /= sqrt(sum_{i,kh,kw} W'[b, o]^2 + eps). With ``sample_mode="upsample"`` the input is
    first resized bilinearly x2. y[b] = conv2d(x[b], W'[b], padding=k // 2), computed as one grouped
    convolution (groups = B; a plain convolution when B = 1).

    Args:
        in_channels, out_channels: C_in, C_out
        kernel_size: k (3 or 1 in this network)
        num_style_feat: F, width of the style code
        demodulate: normalize each output filter per sample
        sample_mode: None or "upsample"
        eps: demodulation epsilon inside the square root
        gain: a constant factor of the output (StyleConv's sqrt(2)), applied to the per-sample
            demodulation numbers (or weights) rather than to the output map

    Parameters: ``weight`` (1, C_out, C_in, k, k) ~ N(0, 1) / sqrt(C_in k^2);
    ``modulation`` Linear(F -> C_in), weight ~ N(0, 1/F), bias = 1.

    forward: x (B, C_in, H, W), style (B, F) -> (B, C_out, H', W') with H' = 2H when up-sampling.

    Two forms of the same function.  The official one modulates the weight per sample: W' (B,
    C_out, C_in, k, k) = W s (demodulated), a grouped convolution.  The other modulates the input
    and the output instead: ``conv(x s, W) d`` with d = rsqrt(s^2 @ sum_k W^2 + eps) (B, C_out)
    (StyleGAN2-ADA's non-fused modulation), never making the per-sample weights.  A call takes the
    one that touches fewer numbers per sample: the input form where C_in H W + C_out H' W' <
    C_out C_in k^2 (the decoders' low-resolution, wide layers: 512 x 512 x 9 weights a sample for
    an 8 x 8 map), the weight form elsewhere.  ``modulate_inputs`` (True / False) forces one.  The
    two agree up to float rounding.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, num_style_feat: int = 512,
                 demodulate: bool = True, sample_mode: Optional[str] = None, eps: float = 1e-8, gain: float = 1.0):
        super().__init__()
        if sample_mode not in (None, "upsample"):
            raise ValueError(f"sample_mode must be None or 'upsample', got {sample_mode!r}")
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels),
                            ("kernel_size", kernel_size), ("num_style_feat", num_style_feat)):
            check_positive_int(name, value)
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size
        self.demodulate, self.sample_mode, self.eps = demodulate, sample_mode, eps
        self.gain = float(gain)  # a constant factor of the output, folded into the demodulation
        fan_in = in_channels * kernel_size**2
        shape = (1, out_channels, in_channels, kernel_size, kernel_size)
        self.weight = nn.Parameter(torch.randn(shape) / math.sqrt(fan_in))
        self.modulation = nn.Linear(num_style_feat, in_channels, bias=True)
        nn.init.kaiming_normal_(self.modulation.weight, a=0, mode="fan_in", nonlinearity="linear")
        nn.init.ones_(self.modulation.bias)
        self.modulate_inputs: Optional[bool] = None  # None: the form that touches fewer numbers (above)

    def _inputs_form(self, x: torch.Tensor) -> bool:
        if self.modulate_inputs is not None:
            return bool(self.modulate_inputs)
        H, W = x.shape[-2:]
        out_pixels = 4 * H * W if self.sample_mode == "upsample" else H * W
        return self.in_channels * H * W + self.out_channels * out_pixels < \
            self.out_channels * self.in_channels * self.kernel_size ** 2

    def _modulated_inputs(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """conv(x s, W) d: the input form of the module docstring."""
        B, C_in = scale.shape
        weight = self.weight[0]  # (C_out, C_in, k, k)
        # the per-channel scale before the (linear, per-channel) up-sampling: on the smaller map
        h = x * scale.view(B, C_in, 1, 1).to(x.dtype)
        k = self.kernel_size
        if self.sample_mode == "upsample":
            out = upsampled(lambda u: F.conv2d(u, weight, padding=k // 2), h)
        else:
            out = F.conv2d(h, weight, padding=k // 2)
        if not self.demodulate:
            return out * self.gain if self.gain != 1.0 else out
        # sum_{i, k} (W[o, i, k] s[b, i])^2 = (s^2 @ sum_k W^2)[b, o]
        energy = scale.pow(2) @ weight.pow(2).sum(dim=(2, 3)).t()
        return out * (torch.rsqrt(energy + self.eps) * self.gain).view(B, -1, 1, 1).to(out.dtype)

    def modulated_weight(self, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """W' (B, C_out, C_in, k, k) from ``weight`` (the parameter) and the modulation output
        ``scale`` (B, C_in); in the autocast dtype under autocast."""
        B, C_in = scale.shape
        # Type promotion keeps the per-sample weights in the parameter dtype (float32 under autocast).
        weight = weight * scale.view(B, 1, C_in, 1, 1)
        if self.demodulate:
            weight = weight * (torch.rsqrt(weight.pow(2).sum(dim=(2, 3, 4), keepdim=True) + self.eps) * self.gain)
        elif self.gain != 1.0:
            weight = weight * self.gain
        device_type = weight.device.type
        if torch.is_autocast_enabled(device_type):
            # The convolution's own autocast cast, made here: training then recomputes the cast copy
            # (the tensor the convolution keeps) instead of keeping it.
            weight = weight.to(torch.get_autocast_dtype(device_type))
        return weight

    def forward(self, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        B, C_in = x.shape[:2]
        k, C_out = self.kernel_size, self.out_channels
        scale = self.modulation(style)  # (B, C_in)
        if B == 0:  # an empty batch gives an empty output
            return F.conv2d(upsample2x(x) if self.sample_mode == "upsample" else x, self.weight[0], padding=k // 2)
        if self._inputs_form(x):
            return self._modulated_inputs(x, scale)

        def conv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
            if B == 1:  # a plain convolution
                return F.conv2d(x, weight[0], padding=k // 2)
            H, W = x.shape[-2:]
            out = F.conv2d(x.reshape(1, B * C_in, H, W), weight.reshape(B * C_out, C_in, k, k), padding=k // 2,
                           groups=B)
            return out.view(B, C_out, out.shape[-2], out.shape[-1])

        # Training keeps neither large per-sample weights nor an up-sampled input: the backward makes
        # them again (gpavatar.model.recompute).
        run = (lambda w: upsampled(lambda u: conv(u, w), x)) if self.sample_mode == "upsample" else \
            (lambda w: conv(x, w))
        if worth_recomputing(B * self.weight[0].numel() * self.weight.element_size()):
            return recomputed(self.modulated_weight, (self.weight, scale), run)
        return run(self.modulated_weight(self.weight, scale))

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"demodulate={self.demodulate}, sample_mode={self.sample_mode!r}"
                + (f", gain={self.gain:.4g}" if self.gain != 1.0 else ""))


class StyleConv(nn.Module):
    """3x3 demodulated StyleConv (stylegan.md section 4.8).

    y = lrelu_0.2(sqrt(2) * modconv(x, style) + weight * noise + bias). ``noise`` is a given map
    (B or 1, 1, H', W'); None means no noise term (the decoder draws fresh noise itself).

    Parameters: ``weight`` (1,) noise strength = 0, ``bias`` (1, C_out, 1, 1) = 0, ``modulated_conv``.

    forward: x (B, C_in, H, W), style (B, F), noise (B|1, 1, H', W') or None -> (B, C_out, H', W').
    """

    def __init__(self, in_channels: int, out_channels: int, num_style_feat: int = 512,
                 sample_mode: Optional[str] = None):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.bias = nn.Parameter(torch.zeros(1, out_channels, 1, 1))
        # sqrt(2) * modconv: the factor rides on the per-sample demodulation (B, C_out) numbers,
        # not on a pass over the output
        self.modulated_conv = ModulatedConv2d(in_channels, out_channels, 3, num_style_feat, demodulate=True,
                                              sample_mode=sample_mode, gain=math.sqrt(2))

    def forward(self, x: torch.Tensor, style: torch.Tensor, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        h = self.modulated_conv(x, style)
        if noise is not None:
            h = h + (self.weight * noise).to(h.dtype)
        # In place on the fresh pre-activation: autograd keeps the output, not a second tensor.
        return F.leaky_relu(h + self.bias.to(h.dtype), LEAKY_SLOPE, inplace=True)


class ToRGB(nn.Module):
    """1x1 modulated conv (no demodulation) to D output channels plus bias and skip (section 4.9).

    y = modconv(x, style) + bias [+ skip, bilinearly up-sampled x2 when ``upsample``]; no activation.

    forward: x (B, C_in, H, W), style (B, F), skip (B, D, H/2, W/2) or (B, D, H, W) or None -> (B, D, H, W).
    """

    def __init__(self, in_channels: int, out_channels: int, num_style_feat: int = 512, upsample: bool = True):
        super().__init__()
        self.upsample = upsample
        self.bias = nn.Parameter(torch.zeros(1, out_channels, 1, 1))
        self.modulated_conv = ModulatedConv2d(in_channels, out_channels, 1, num_style_feat, demodulate=False)

    def forward(self, x: torch.Tensor, style: torch.Tensor, skip: Optional[torch.Tensor] = None) -> torch.Tensor:
        out = self.modulated_conv(x, style)
        out = out + self.bias.to(out.dtype)
        if skip is not None:
            if self.upsample:
                skip = upsample2x(skip)
            out = out + skip
        return out


class ConstantInput(nn.Module):
    """Learned constant ``weight`` (1, C, size, size) ~ N(0, 1), expanded over the batch.

    forward: batch B -> (B, C, size, size)
    """

    def __init__(self, channels: int, size: int = 4):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(1, channels, size, size))

    def forward(self, batch: int) -> torch.Tensor:
        return self.weight.expand(batch, -1, -1, -1)


class StyleGAN2GeneratorCSFT(nn.Module):
    """StyleGAN2 decoder with full SFT at every level (stylegan.md section 6).

    Args:
        out_size: 2^L, output resolution (4 ... 1024)
        out_dim: D, output channels
        num_style_feat: F, width of z, of the mapping MLP and of every modulation input (512)
        num_mlp: Linear + LeakyReLU pairs of the mapping MLP (8)
        narrow: scales the channel table, ``ch_g = decoder_channels(narrow)`` (1.0 = official)

    forward: z (B, F), conditions [scale_0, shift_0, scale_1, shift_1, ...] with 2(L - 2) tensors,
    level k at (B, ch_g[2^(k+3)], 2^(k+3), 2^(k+3)); noise in ``NOISE_MODES``; generator for "fresh"
    -> (B, D, out_size, out_size).
    """

    def __init__(self, out_size: int, out_dim: int, num_style_feat: int = 512, num_mlp: int = 8,
                 narrow: float = 1.0):
        super().__init__()
        check_size("out_size", out_size)
        check_positive_int("out_dim", out_dim)
        check_positive_int("num_style_feat", num_style_feat)
        check_positive_int("num_mlp", num_mlp, minimum=0)
        channels = decoder_channels(narrow)
        self.out_size, self.num_style_feat = out_size, num_style_feat
        self.log_size = int(math.log2(out_size))
        self.num_levels = self.log_size - 2
        self.num_layers = 2 * self.num_levels + 1

        layers: list[nn.Module] = [NormStyleCode()]
        for _ in range(num_mlp):
            linear = nn.Linear(num_style_feat, num_style_feat, bias=True)
            nn.init.kaiming_normal_(linear.weight, a=LEAKY_SLOPE, mode="fan_in", nonlinearity="leaky_relu")
            nn.init.zeros_(linear.bias)
            layers += [linear, nn.LeakyReLU(LEAKY_SLOPE)]
        self.style_mlp = nn.Sequential(*layers)

        self.constant_input = ConstantInput(channels[4], size=4)
        self.style_conv1 = StyleConv(channels[4], channels[4], num_style_feat)
        self.to_rgb1 = ToRGB(channels[4], out_dim, num_style_feat, upsample=False)
        self.style_convs = nn.ModuleList()
        self.to_rgbs = nn.ModuleList()
        for k in range(self.num_levels):
            r = 2 ** (k + 3)
            previous, current = channels[r // 2], channels[r]
            self.style_convs.append(StyleConv(previous, current, num_style_feat, sample_mode="upsample"))
            self.style_convs.append(StyleConv(current, current, num_style_feat))
            self.to_rgbs.append(ToRGB(current, out_dim, num_style_feat, upsample=True))
        self.noises = nn.Module()
        for j in range(self.num_layers):
            r = 2 ** ((j + 5) // 2)
            self.noises.register_buffer(f"noise{j}", torch.randn(1, 1, r, r))

    def noise_maps(self, noise: str, batch: int, device: torch.device,
                   generator: Optional[torch.Generator] = None) -> list[Optional[torch.Tensor]]:
        """One noise map per StyleConv slot j: (B, 1, r_j, r_j) fresh, (1, 1, r_j, r_j) stored, or None."""
        check_noise_mode(noise)
        buffers = [getattr(self.noises, f"noise{j}") for j in range(self.num_layers)]
        if noise == "off":
            return [None] * self.num_layers
        if noise == "stored":
            return buffers
        if generator is not None and generator.device.type != torch.device(device).type:
            raise ValueError(f"generator must be on the input's device {device}, got {generator.device}")
        dtype = self.constant_input.weight.dtype
        return [torch.randn((batch, 1) + tuple(b.shape[-2:]), generator=generator, device=device, dtype=dtype)
                for b in buffers]

    def forward(self, z: torch.Tensor, conditions: Sequence[torch.Tensor], noise: str = "fresh",
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
        check_noise_mode(noise)
        if not isinstance(z, torch.Tensor) or z.dim() != 2 or z.shape[1] != self.num_style_feat:
            shape = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
            raise ValueError(f"z must have shape (B, {self.num_style_feat}), got {shape}")
        if len(conditions) != 2 * self.num_levels:
            raise ValueError(f"conditions must hold {2 * self.num_levels} tensors, got {len(conditions)}")
        B = z.shape[0]
        style = self.style_mlp(z)  # (B, F); the same w for every layer
        noises = self.noise_maps(noise, B, z.device, generator)
        h = self.style_conv1(self.constant_input(B), style, noises[0])
        rgb = self.to_rgb1(h, style)
        for k in range(self.num_levels):
            h = self.style_convs[2 * k](h, style, noises[2 * k + 1])
            h = torch.addcmul(conditions[2 * k + 1], h, conditions[2 * k])  # h * scale + shift, one pass
            h = self.style_convs[2 * k + 1](h, style, noises[2 * k + 2])
            rgb = self.to_rgbs[k](h, style, skip=rgb)
        return rgb
