"""StyleUNet / StyleGAN2GeneratorCSFT: official key names and shapes (stylegan.md sections 10 and 12),
the forward against a functional float64 oracle written from the spec equations, noise modes,
gradients, initialization (section 9) and bad inputs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from gpavatar.model.style_unet import StyleUNet
from gpavatar.model.stylegan import NOISE_MODES, ModulatedConv2d, StyleConv, StyleGAN2GeneratorCSFT, ToRGB

MANIFEST_PATH = Path(__file__).parent / "data" / "official_state_dict.json"
TINY = dict(num_style_feat=32, num_mlp=2, narrow=1 / 16)
# (prefix, constructor args, kwargs, total parameters, noise elements), stylegan.md sections 1 and 12
PAPER_INSTANCES = [
    ("style_tplane", (512, 256, 3, 96), dict(activation=False), 48_785_871, 174_736),
    ("up_renderer", (512, 512, 32, 3), {}, 48_675_388, 699_024),
]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tensors are tiny: with 2 intra-op threads on a busy 2-core machine every op waits on a
    descheduled sibling thread (~50x slower); one thread keeps the file at a few seconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------------------------------------
# Functional oracle, straight from stylegan.md sections 4-7 (float64; per-sample loop; explicit resizes).

def lrelu(x):
    return torch.where(x >= 0, x, 0.2 * x)


def bilinear(x, scale=None, size=None):
    return F.interpolate(x, scale_factor=scale, size=size, mode="bilinear", align_corners=False)


def ref_resblock(sd, p, x, scale):
    h = lrelu(F.conv2d(x, sd[f"{p}.conv1.weight"], sd[f"{p}.conv1.bias"], padding=1))
    h = lrelu(F.conv2d(bilinear(h, scale), sd[f"{p}.conv2.weight"], sd[f"{p}.conv2.bias"], padding=1))
    return h + F.conv2d(bilinear(x, scale), sd[f"{p}.skip.weight"])


def ref_modconv(sd, p, x, w, demodulate, upsample):
    s = w @ sd[f"{p}.modulation.weight"].T + sd[f"{p}.modulation.bias"]  # (B, C_in)
    outs = []
    for b in range(x.shape[0]):
        weight = sd[f"{p}.weight"][0] * s[b][None, :, None, None]  # (C_out, C_in, k, k)
        if demodulate:
            weight = weight / torch.sqrt((weight**2).sum(dim=(1, 2, 3), keepdim=True) + 1e-8)
        xb = bilinear(x[b:b + 1], 2) if upsample else x[b:b + 1]
        outs.append(F.conv2d(xb, weight, padding=weight.shape[-1] // 2))
    return torch.cat(outs)


def ref_style_conv(sd, p, x, w, noise, upsample):
    h = ref_modconv(sd, f"{p}.modulated_conv", x, w, True, upsample) * math.sqrt(2)
    if noise is not None:
        h = h + sd[f"{p}.weight"] * noise
    return lrelu(h + sd[f"{p}.bias"])


def ref_to_rgb(sd, p, x, w, skip):
    y = ref_modconv(sd, f"{p}.modulated_conv", x, w, False, False) + sd[f"{p}.bias"]
    return y if skip is None else y + bilinear(skip, 2)


def ref_decoder(sd, z, conditions, noises, num_mlp):
    w = z / torch.sqrt((z**2).mean(dim=1, keepdim=True) + 1e-8)
    for i in range(num_mlp):
        w = lrelu(w @ sd[f"style_mlp.{2 * i + 1}.weight"].T + sd[f"style_mlp.{2 * i + 1}.bias"])
    h = sd["constant_input.weight"].repeat(z.shape[0], 1, 1, 1)
    h = ref_style_conv(sd, "style_conv1", h, w, noises[0], False)
    rgb = ref_to_rgb(sd, "to_rgb1", h, w, None)
    for k in range(len(conditions) // 2):
        h = ref_style_conv(sd, f"style_convs.{2 * k}", h, w, noises[2 * k + 1], True)
        h = h * conditions[2 * k] + conditions[2 * k + 1]
        h = ref_style_conv(sd, f"style_convs.{2 * k + 1}", h, w, noises[2 * k + 2], False)
        rgb = ref_to_rgb(sd, f"to_rgbs.{k}", h, w, rgb)
    return rgb


def ref_style_unet(net, x, noises=None):
    """Forward of ``net`` from its state_dict only; noises default to the stored buffers."""
    sd = net.state_dict()
    levels = int(math.log2(net.out_size)) - 2
    if x.shape[-1] < net.out_size:
        x = bilinear(x, size=(net.out_size, net.out_size))
    if net.in_size > net.out_size:
        f = lrelu(F.conv2d(x, sd["conv_body_first.0.weight"], sd["conv_body_first.0.bias"]))
        f = ref_resblock(sd, "conv_body_first.1", f, 0.5)
    else:
        f = lrelu(F.conv2d(x, sd["conv_body_first.weight"], sd["conv_body_first.bias"]))
    skips = []
    for i in range(levels):
        f = ref_resblock(sd, f"conv_body_down.{i}", f, 0.5)
        skips = [f] + skips
    f = lrelu(F.conv2d(f, sd["final_conv.weight"], sd["final_conv.bias"], padding=1))
    z = f.reshape(f.shape[0], -1) @ sd["final_linear.weight"].T + sd["final_linear.bias"]
    conditions = []
    for i in range(levels):
        f = ref_resblock(sd, f"conv_body_up.{i}", f + skips[i], 2)
        for side in ("condition_scale", "condition_shift"):
            p = f"{side}.{i}"
            c = lrelu(F.conv2d(f, sd[f"{p}.0.weight"], sd[f"{p}.0.bias"], padding=1))
            conditions.append(F.conv2d(c, sd[f"{p}.2.weight"], sd[f"{p}.2.bias"], padding=1))
    decoder_sd = {k[len("stylegan_decoder."):]: v for k, v in sd.items() if k.startswith("stylegan_decoder.")}
    if noises is None:
        noises = [decoder_sd[f"noises.noise{j}"] for j in range(2 * levels + 1)]
    num_mlp = sum(1 for k in decoder_sd if k.startswith("style_mlp.") and k.endswith(".weight"))
    y = ref_decoder(decoder_sd, z, conditions, noises, num_mlp)
    return torch.sigmoid(y) * 1.002 - 0.001 if net.activation else y


def make_net(*args, dtype=torch.float64, seed=0, **kwargs):
    """A tiny net whose zero-initialized tensors (noise strengths, biases) are made non-zero."""
    torch.manual_seed(seed)
    net = StyleUNet(*args, **{**TINY, **kwargs}).to(dtype)
    with torch.no_grad():
        for name, p in net.stylegan_decoder.named_parameters():
            if name.endswith("bias") and "modulation" not in name and "style_mlp" not in name:
                p.normal_(0, 0.1)
            elif name.endswith(".weight") and p.shape == (1,):  # StyleConv noise strength
                p.normal_(0, 0.3)
    return net


# ----------------------------------------------------------------------------------------------------------------
# Key names, shapes, order and counts against the manifest (built on the meta device: no memory, fast).

def expected_key_order(in_size: int, out_size: int) -> list[str]:
    """state_dict order implied by the registration order of stylegan.md sections 5.1, 6 and 10.2."""
    levels = int(math.log2(out_size)) - 2
    res = lambda p: [f"{p}.conv1.weight", f"{p}.conv1.bias", f"{p}.conv2.weight", f"{p}.conv2.bias",  # noqa: E731
                     f"{p}.skip.weight"]
    mod = lambda p: [f"{p}.modulated_conv.weight", f"{p}.modulated_conv.modulation.weight",  # noqa: E731
                     f"{p}.modulated_conv.modulation.bias"]
    style_conv = lambda p: [f"{p}.weight", f"{p}.bias"] + mod(p)  # noqa: E731
    to_rgb = lambda p: [f"{p}.bias"] + mod(p)  # noqa: E731
    keys = (["conv_body_first.0.weight", "conv_body_first.0.bias"] + res("conv_body_first.1")
            if in_size > out_size else ["conv_body_first.weight", "conv_body_first.bias"])
    keys += [k for i in range(levels) for k in res(f"conv_body_down.{i}")]
    keys += ["final_conv.weight", "final_conv.bias"]
    keys += [k for i in range(levels) for k in res(f"conv_body_up.{i}")]
    keys += [f"toRGB.{i}.{t}" for i in range(levels) for t in ("weight", "bias")]
    keys += ["final_linear.weight", "final_linear.bias"]
    d = "stylegan_decoder"
    keys += [f"{d}.style_mlp.{i}.{t}" for i in range(1, 16, 2) for t in ("weight", "bias")]
    keys += [f"{d}.constant_input.weight"] + style_conv(f"{d}.style_conv1") + to_rgb(f"{d}.to_rgb1")
    keys += [k for j in range(2 * levels) for k in style_conv(f"{d}.style_convs.{j}")]
    keys += [k for j in range(levels) for k in to_rgb(f"{d}.to_rgbs.{j}")]
    keys += [f"{d}.noises.noise{j}" for j in range(2 * levels + 1)]
    for side in ("condition_scale", "condition_shift"):
        keys += [f"{side}.{i}.{j}.{t}" for i in range(levels) for j in (0, 2) for t in ("weight", "bias")]
    return keys


@pytest.fixture(scope="module")
def manifest() -> dict:
    with MANIFEST_PATH.open() as fh:
        return json.load(fh)


@pytest.mark.parametrize("prefix,args,kwargs,num_params,num_noise", PAPER_INSTANCES,
                         ids=[p[0] for p in PAPER_INSTANCES])
def test_paper_instances_match_the_official_state_dict(manifest, prefix, args, kwargs, num_params, num_noise):
    with torch.device("meta"):
        net = StyleUNet(*args, **kwargs)
    state = net.state_dict()
    shapes = {f"{prefix}.{k}": list(v.shape) for k, v in state.items()}
    official = {k: v for k, v in manifest["keys"].items() if k.startswith(prefix + ".")}
    assert shapes == official
    buffers = {f"{prefix}.{k}" for k, _ in net.named_buffers()}
    assert buffers == {k for k in manifest["buffers"] if k.startswith(prefix + ".")}
    assert all(".stylegan_decoder.noises.noise" in k for k in buffers)
    assert list(state) == expected_key_order(*args[:2])
    assert sum(p.numel() for p in net.parameters()) == num_params
    assert sum(b.numel() for b in net.buffers()) == num_noise
    assert sum(p.numel() for n, p in net.named_parameters() if n.startswith("toRGB.")) in (2_994, 3_045)
    assert net.activation == (prefix == "up_renderer")


# ----------------------------------------------------------------------------------------------------------------
# Forward against the oracle (float64: the two sides differ only in summation order, ~1e-15 relative).

@pytest.mark.parametrize("in_size,in_dim,out_dim", [(64, 3, 5), (32, 6, 3)], ids=["in>out", "in==out"])
@pytest.mark.parametrize("activation", [False, True])
def test_matches_functional_oracle(in_size, in_dim, out_dim, activation):
    net = make_net(in_size, 32, in_dim, out_dim, activation=activation)
    x = torch.rand(2, in_dim, in_size, in_size, dtype=torch.float64)
    out = net(x, noise="stored")
    assert out.shape == (2, out_dim, 32, 32)
    torch.testing.assert_close(out, ref_style_unet(net, x), rtol=1e-10, atol=1e-10 * out.abs().max().item())


def test_small_input_is_resized_like_up_renderer():
    net = make_net(32, 32, 4, 3)
    x = torch.rand(2, 4, 8, 8, dtype=torch.float64)
    out = net(x, noise="stored")
    assert out.shape == (2, 3, 32, 32) and -0.001 < out.min() and out.max() < 1.001
    torch.testing.assert_close(out, ref_style_unet(net, x), rtol=1e-10, atol=1e-12)
    resized = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out, net(resized, noise="stored"), rtol=0, atol=0)


def test_fresh_noise_is_drawn_per_sample_in_slot_order():
    net = make_net(32, 16, 3, 2)
    x = torch.rand(3, 3, 32, 32, dtype=torch.float64)
    out = net(x, noise="fresh", generator=torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    noises = [torch.randn(3, 1, 2 ** ((j + 5) // 2), 2 ** ((j + 5) // 2), generator=g, dtype=torch.float64)
              for j in range(5)]
    torch.testing.assert_close(out, ref_style_unet(net, x, noises), rtol=1e-10, atol=1e-12)


def test_batch_of_one_equals_batched():
    """B == 1 takes the plain-conv path, B > 1 the grouped one."""
    net = make_net(64, 32, 3, 4)
    x = torch.rand(3, 3, 64, 64, dtype=torch.float64)
    single = torch.cat([net(x[i:i + 1], noise="stored") for i in range(3)])
    torch.testing.assert_close(net(x, noise="stored"), single, rtol=1e-12, atol=1e-12)


def test_empty_batch_gives_empty_output():
    net = make_net(64, 32, 3, 4)
    assert net(torch.rand(0, 3, 64, 64, dtype=torch.float64)).shape == (0, 4, 32, 32)


def test_channels_last_and_cpu_autocast():
    net = make_net(32, 16, 3, 3, dtype=torch.float32)
    x = torch.rand(2, 3, 32, 32)
    out = net(x, noise="stored")
    torch.testing.assert_close(net(x.to(memory_format=torch.channels_last), noise="stored"), out,
                               rtol=1e-5, atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = net(x, noise="fresh", generator=torch.Generator().manual_seed(0))
    assert low.shape == out.shape and torch.isfinite(low).all()
    # bfloat16 has 8 mantissa bits; through ~20 convolutions the sigmoid output drifts by a few 1e-2 at most
    torch.testing.assert_close(low.float(), net(x, noise="fresh", generator=torch.Generator().manual_seed(0)),
                               rtol=0, atol=0.1)


# ----------------------------------------------------------------------------------------------------------------
# Noise modes.

def test_noise_modes():
    net = make_net(32, 16, 3, 3, activation=False)
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64)
    stored, off = net(x, noise="stored"), net(x, noise="off")
    assert torch.equal(stored, net(x, noise="stored")) and torch.equal(off, net(x, noise="off"))
    assert not torch.allclose(stored, off)
    first, second = net(x), net(x)
    assert not torch.allclose(first, second)
    seeded = [net(x, noise="fresh", generator=torch.Generator().manual_seed(3)) for _ in range(2)]
    assert torch.equal(seeded[0], seeded[1]) and not torch.allclose(seeded[0], stored)
    torch.manual_seed(11)
    global_a = net(x)
    torch.manual_seed(11)
    assert torch.equal(global_a, net(x))
    with torch.no_grad():
        for j in range(5):
            conv = net.stylegan_decoder.style_conv1 if j == 0 else net.stylegan_decoder.style_convs[j - 1]
            conv.weight.zero_()
    assert torch.equal(net(x, noise="stored"), net(x, noise="off"))
    assert torch.equal(net(x, noise="fresh"), net(x, noise="off"))


@pytest.mark.parametrize("noise", ["random", "Fresh", None, 0])
def test_bad_noise_mode(noise):
    net = make_net(32, 16, 3, 3)
    with pytest.raises(ValueError, match="noise") as info:
        net(torch.rand(1, 3, 32, 32, dtype=torch.float64), noise=noise)
    assert all(mode in str(info.value) for mode in NOISE_MODES)


# ----------------------------------------------------------------------------------------------------------------
# Gradients and initialization.

def test_backward_reaches_every_used_parameter():
    net = make_net(64, 32, 3, 4, dtype=torch.float32)
    x = torch.rand(2, 3, 64, 64, requires_grad=True)
    out = net(x, generator=torch.Generator().manual_seed(0))
    (out * torch.randn_like(out)).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    for name, p in net.named_parameters():
        if name.startswith("toRGB."):
            assert p.grad is None, name
        else:
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_initialization_follows_spec_section_9():
    torch.manual_seed(0)
    conv = ModulatedConv2d(512, 512, 3, num_style_feat=512)
    assert conv.weight.std().item() == pytest.approx(1 / math.sqrt(512 * 9), rel=0.02)
    assert conv.modulation.weight.std().item() == pytest.approx(1 / math.sqrt(512), rel=0.02)
    assert torch.equal(conv.modulation.bias, torch.ones(512))
    decoder = StyleGAN2GeneratorCSFT(32, 3, num_style_feat=512, num_mlp=2, narrow=1 / 8)
    for i in (1, 3):
        linear = decoder.style_mlp[i]
        assert linear.weight.std().item() == pytest.approx(math.sqrt(2 / 1.04) / math.sqrt(512), rel=0.02)
        assert torch.equal(linear.bias, torch.zeros(512))
    for module in decoder.modules():
        if isinstance(module, StyleConv):
            assert torch.equal(module.weight, torch.zeros(1))  # noise strength
        if isinstance(module, (StyleConv, ToRGB)):
            assert torch.equal(module.bias, torch.zeros_like(module.bias))
            modulation_bias = module.modulated_conv.modulation.bias
            assert torch.equal(modulation_bias, torch.ones_like(modulation_bias))
    assert decoder.constant_input.weight.shape == (1, 64, 4, 4)
    assert decoder.constant_input.weight.std().item() == pytest.approx(1, rel=0.1)
    assert decoder.noises.noise4.std().item() == pytest.approx(1, rel=0.3)
    net = StyleUNet(16, 16, 3, 3, **TINY)
    bound = 1 / math.sqrt(net.final_linear.in_features)  # PyTorch default: kaiming-uniform(a=sqrt 5)
    assert net.final_linear.weight.abs().max() <= bound and net.final_linear.weight.std() > bound / 3


# ----------------------------------------------------------------------------------------------------------------
# Bad inputs, odd configurations.

@pytest.mark.parametrize("shape,match", [
    ((3, 64, 64), "shape"), ((1, 4, 64, 64), "shape"), ((1, 3, 64, 32), "square"), ((1, 3, 32, 32), "64x64"),
    ((1, 3, 128, 128), "64x64"),
])
def test_bad_input_shapes(shape, match):
    net = make_net(64, 32, 3, 3)
    with pytest.raises(ValueError, match=match) as info:
        net(torch.rand(*shape, dtype=torch.float64))
    assert "x" in str(info.value)


def test_bad_input_types_and_widths():
    net = make_net(32, 32, 3, 3)
    with pytest.raises(ValueError, match="x width"):
        net(torch.rand(1, 3, 64, 64, dtype=torch.float64))
    with pytest.raises(TypeError, match="x must be a floating"):
        net(torch.zeros(1, 3, 32, 32, dtype=torch.int64))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        net([[0.0]])
    with pytest.raises(TypeError, match="x must have the parameters' dtype"):
        net(torch.rand(1, 3, 32, 32, dtype=torch.float32))


@pytest.mark.parametrize("kwargs,name", [
    (dict(in_size=48), "in_size"), (dict(in_size=128), "in_size"), (dict(out_size=2048), "out_size"),
    (dict(narrow=0.0), "narrow"), (dict(in_dim=0), "in_dim"), (dict(num_mlp=-1), "num_mlp"),
    (dict(num_style_feat=1.5), "num_style_feat"),
])
def test_bad_constructor_arguments(kwargs, name):
    args = {**dict(in_size=32, out_size=32, in_dim=3, out_dim=3), **TINY, **kwargs}
    with pytest.raises(ValueError, match=name):
        StyleUNet(**args)


@settings(max_examples=10, deadline=None)
@given(batch=st.integers(1, 3), narrow=st.sampled_from([1 / 64, 1 / 40, 1 / 16]),
       sizes=st.sampled_from([(8, 8), (16, 8), (8, 16), (16, 16), (4, 4)]), activation=st.booleans(),
       noise=st.sampled_from(NOISE_MODES))
def test_shapes_and_finiteness(batch, narrow, sizes, activation, noise):
    in_size, out_size = sizes
    net = StyleUNet(in_size, out_size, 2, 3, num_style_feat=8, num_mlp=1, activation=activation, narrow=narrow)
    width = in_size if in_size > out_size else max(1, in_size // 2)
    out = net(torch.rand(batch, 2, width, width), noise=noise)
    assert out.shape == (batch, 3, out_size, out_size) and torch.isfinite(out).all()
    if activation:
        assert out.min() > -0.001 and out.max() < 1.001


@settings(max_examples=20, deadline=None)
@given(B=st.integers(1, 3), C_in=st.integers(1, 12), C_out=st.integers(1, 12), size=st.integers(1, 9),
       k=st.sampled_from([1, 3]), demodulate=st.booleans(), upsample=st.booleans(), seed=st.integers(0, 2**16))
def test_modulated_conv_input_form_equals_weight_form(B, C_in, C_out, size, k, demodulate, upsample, seed):
    """conv(x s, W) d (the input form) is the official per-sample-weight form, values and every
    gradient, in float64; the size rule picks the form that touches fewer numbers."""
    torch.manual_seed(seed)
    conv = ModulatedConv2d(C_in, C_out, k, num_style_feat=4, demodulate=demodulate,
                           sample_mode="upsample" if upsample else None).double()
    x = torch.randn(B, C_in, size, size + 1, dtype=torch.float64, requires_grad=True)
    style = torch.randn(B, 4, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(B, C_out, size * (1 + upsample), (size + 1) * (1 + upsample), dtype=torch.float64)
    results = []
    for inputs_form in (False, True):
        conv.modulate_inputs = inputs_form
        out = conv(x, style)
        results.append([out, *torch.autograd.grad((out * grad).sum(), [x, style, *conv.parameters()])])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    conv.modulate_inputs = None
    pixels = size * (size + 1)
    expected = C_in * pixels + C_out * pixels * (4 if upsample else 1) < C_out * C_in * k * k
    assert conv._inputs_form(x) is expected


def test_modulated_conv_input_form_in_the_decoders_and_under_autocast():
    """The decoders' wide low-resolution layers take the input form (no (B, C_out, C_in, 3, 3)
    weights are made or kept); under bf16 autocast it returns what the weight form returns, in
    bf16, within bf16 rounding."""
    conv = ModulatedConv2d(64, 64, 3, num_style_feat=8)  # 8 x 8 map: 64 x 64 x 9 weights a sample
    x, style = torch.randn(2, 64, 8, 8), torch.randn(2, 8)
    assert conv._inputs_form(x) and not conv._inputs_form(torch.randn(2, 64, 64, 64))
    sizes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(tuple(t.shape)) or t, lambda t: t):
        conv(x, style)
    assert (2, 64, 64, 3, 3) not in sizes and (128, 64, 3, 3) not in sizes, sizes
    outs = []
    for inputs_form in (False, True):
        conv.modulate_inputs = inputs_form
        with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
            outs.append(conv(x.to(torch.bfloat16), style))
    assert outs[0].dtype == outs[1].dtype == torch.bfloat16
    torch.testing.assert_close(outs[1].float(), outs[0].float(), rtol=3e-2, atol=3e-2 * outs[0].abs().max().item())
