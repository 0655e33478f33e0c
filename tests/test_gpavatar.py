"""The full model (tiny preset): shapes through every stage, determinism, gradients of
forward_train, backends agree, chunking, noise settings, bad inputs.

Checkpoint I/O and the official key manifest are in tests/test_checkpoint.py; the paper
preset on CPU in tests/test_gpavatar_paper.py.
"""

from __future__ import annotations

import pytest
import torch

import gpavatar
from gpavatar.model import Avatar, GPAvatar, GPAvatarConfig

from conftest import BACKEND_CASES

CAMERA = [[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, 9.0]]


def camera(B=1, angle=0.0):
    c, s = torch.cos(torch.tensor(angle)), torch.sin(torch.tensor(angle))
    R = torch.tensor([[c, 0, s], [0, 1, 0], [-s, 0, c]])
    T = torch.tensor([0.0, 0.0, 9.0])
    return torch.cat([R, T[:, None]], dim=1).expand(B, 3, 4).contiguous()


def head_points(B=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, 5023, 3, generator=g) * 0.35).clamp(-0.9, 0.9)


def sources(B=1, V=2, size=64, seed=1):
    return torch.rand(B, V, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return GPAvatar("tiny").eval()


def test_package_exports():
    assert gpavatar.GPAvatar is GPAvatar
    assert gpavatar.GPAvatarConfig is GPAvatarConfig


def test_shapes_through_every_stage(tiny):
    c = tiny.config
    B, V = 2, 3
    avatar = tiny.build_avatar(sources(B, V), return_attention=True)
    assert isinstance(avatar, Avatar) and avatar.num_sources == V
    assert avatar.planes.shape == (B, 3, c.plane_size, c.plane_size, c.plane_channels)
    assert avatar.planes.is_contiguous()
    assert avatar.attention.shape == (B, 3, V, c.plane_size, c.plane_size)
    torch.testing.assert_close(avatar.attention.sum(dim=2), torch.ones(B, 3, c.plane_size, c.plane_size))
    out = tiny.render(avatar, head_points(B), camera(B))
    R = c.render_size
    assert out["image"].shape == (B, 3, c.output_size, c.output_size)
    assert out["coarse"].shape == out["fine"].shape == (B, c.render_channels, R, R)
    assert out["depth"].shape == out["opacity"].shape == (B, 1, R, R)
    assert out["coarse_alphas"].shape == (B, R * R, c.n_coarse)
    assert all(torch.isfinite(t).all() for t in out.values())
    # Output ranges: sigmoid-scaled image and RGB channels, alphas in [0, 1).
    assert out["image"].min() > -0.001 - 1e-6 and out["image"].max() < 1.001 + 1e-6
    assert out["coarse_alphas"].min() >= 0 and out["coarse_alphas"].max() < 1
    assert 0 <= out["depth"].min() and out["depth"].max() <= 1


def test_encoder_sees_flipped_sources(tiny):
    """build_avatar flips the images along the height axis before the encoder (SPEC section 1)."""
    images = sources(1, 1)
    planes = tiny.build_avatar(images).planes_channels_first()
    C, H = tiny.config.plane_channels, tiny.config.plane_size
    direct = tiny.style_tplane(images[:, 0].flip(-2), noise="stored").reshape(1, 3, C, H, H)
    torch.testing.assert_close(planes, direct, rtol=0, atol=0)


def test_single_source_mta_is_the_identity(tiny):
    """V = 1 skips MTA: softmax over one source is exactly 1, so both paths agree bit for bit."""
    images = sources(1, 1)
    skipped = tiny.build_avatar(images)
    through = tiny.build_avatar(images, return_attention=True)
    assert skipped.attention is None
    assert torch.equal(through.attention, torch.ones_like(through.attention))
    assert torch.equal(skipped.planes, through.planes)
    # single_source keeps only the first of several sources
    first = tiny.build_avatar(torch.cat([images, sources(1, 1, seed=5)], dim=1), single_source=True)
    assert first.num_sources == 1 and torch.equal(first.planes, skipped.planes)


def test_eval_is_deterministic_and_training_noise_is_fresh():
    torch.manual_seed(0)
    model = GPAvatar("tiny").eval()
    for module in model.modules():  # give the StyleGAN noise a visible strength
        if type(module).__name__ == "StyleConv":
            module.weight.data.fill_(0.5)
    args = (sources(), head_points(), camera())
    a, b = model(*args), model(*args)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    model.set_noise("fresh")
    c, d = model(*args), model(*args)
    assert not torch.equal(c["image"], d["image"]) and not torch.equal(c["fine"], d["fine"])
    avatar = model.build_avatar(args[0])
    e, f = model.render(avatar, *args[1:]), model.render(avatar, *args[1:])
    assert torch.equal(e["fine"], f["fine"])  # the renderer has no noise; only the StyleUNets do
    assert not torch.equal(e["image"], f["image"])
    model.set_noise("off")
    assert not torch.equal(model(*args)["image"], a["image"])
    model.set_noise("auto").train()
    assert model.noise_mode() == "fresh"
    model.eval()
    assert model.noise_mode() == "stored"


def test_avatar_is_reused_and_broadcast(tiny):
    avatar = tiny.build_avatar(sources())
    frames = tiny.render(avatar, head_points(3), torch.cat([camera(1, a) for a in (0.0, 0.2, -0.2)]))
    one = tiny.render(avatar, head_points(3)[1:2], camera(1, 0.2))
    torch.testing.assert_close(frames["fine"][1:2], one["fine"], rtol=1e-5, atol=1e-6)


def test_query_chunking_does_not_change_the_render(tiny):
    """The official "queries" normalization sums over the whole pass: chunks must see the total."""
    assert tiny.config.pef_normalize == "queries"
    args = (tiny.build_avatar(sources()), head_points(), camera())
    whole = tiny.render(*args)
    chunked = GPAvatar(tiny.config.replace(query_chunk=300)).eval()
    chunked.load_state_dict(tiny.state_dict())
    parts = chunked.render(*args)
    for key in ("coarse", "fine", "image"):
        torch.testing.assert_close(parts[key], whole[key], rtol=1e-5, atol=1e-6)


def test_forward_train_gradients_reach_every_parameter_group():
    torch.manual_seed(0)
    model = GPAvatar("tiny", single_source_prob=0.0).train()
    out = model.forward_train(sources(2, 2), head_points(2), camera(2), generator=torch.Generator().manual_seed(3))
    assert out["single_source"] is False
    loss = out["image"].mean() + out["coarse"][:, :3].mean() + out["fine"][:, :3].mean() \
        + 1e-5 * out["coarse_alphas"].norm()
    loss.backward()
    never = ("toRGB.",)  # the official U-Nets' unused heads
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert name == "attn_module.scale"
            continue
        if name.startswith(tuple(f"{m}.{n}" for m in ("style_tplane", "up_renderer") for n in never)):
            assert p.grad is None, name
            continue
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().max() > 0, name
    groups = {g["name"]: g for g in model.param_groups(1e-4)}
    assert groups["mapping"]["lr"] == pytest.approx(1e-5) and groups["attention"]["lr"] == 1e-4
    counted = sum(len(g["params"]) for g in groups.values())
    assert counted == sum(1 for p in model.parameters() if p.requires_grad)


def test_forward_train_single_source_skips_attention():
    torch.manual_seed(0)
    model = GPAvatar("tiny", single_source_prob=1.0).train()
    out = model.forward_train(sources(), head_points(), camera())
    assert out["single_source"] is True
    out["image"].mean().backward()
    assert model.attn_module.to_q_[1].weight.grad is None and model.query_style_tplane.grad is None
    assert model.style_tplane.final_linear.weight.grad is not None


def test_forward_train_is_reproducible_with_a_generator():
    torch.manual_seed(0)
    model = GPAvatar("tiny").train()
    args = (sources(), head_points(), camera())
    a = model.forward_train(*args, generator=torch.Generator().manual_seed(7))
    b = model.forward_train(*args, generator=torch.Generator().manual_seed(7))
    assert a["single_source"] == b["single_source"]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["coarse_alphas"], b["coarse_alphas"])


# --- backends ---------------------------------------------------------------------------------

def _render_and_grads(model, backend, args):
    model.set_backend(backend)
    model.zero_grad(set_to_none=True)
    out = model.render(*args)
    g = torch.Generator().manual_seed(11)
    upstream = {k: torch.randn(out[k].shape, generator=g).to(out[k].device) for k in ("image", "coarse", "fine")}
    sum((out[k] * upstream[k]).sum() for k in upstream).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {k: out[k].detach() for k in ("image", "coarse", "fine", "depth", "depth_expected", "opacity")}, grads


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_backends_agree_with_the_torch_path(device, backend):
    """Render and every parameter gradient of the tiny model, fused backend vs the torch path
    on the same device.

    Tolerances: all backends find the same neighbours and samples (KNN and sampling are
    bit-identical by design), so differences are float32 summation order in the blends,
    the tri-plane and composite kernels (~1e-6 relative), amplified by the two StyleUNets;
    gradients are compared relative to each tensor's largest entry.
    """
    torch.manual_seed(0)
    # Fewer points and rays than the tiny preset: the Triton interpreter runs on CPU here.
    model = GPAvatar("tiny", num_points=400, render_size=8).to(device).eval()
    avatar = model.build_avatar(sources().to(device))
    points = head_points()[:, :400].to(device)
    args = (Avatar(avatar.planes.detach().requires_grad_(), None, 1), points, camera(1, 0.1).to(device))
    ref_out, ref_grads = _render_and_grads(model, "torch", args)
    out, grads = _render_and_grads(model, backend, args)
    for k in ref_out:
        # The batch min-max normalization of ``depth`` divides rounding by the span of the raw
        # map (~0.1 world units here): 10x the tolerance; its inputs are compared as they are.
        tol = dict(rtol=1e-3, atol=1e-4) if k == "depth" else dict(rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(out[k], ref_out[k], **tol, msg=lambda m: f"{k}: {m}")
    assert set(grads) == set(ref_grads)
    for name, ref in ref_grads.items():
        scale = ref.abs().max().clamp_min(1e-12)
        err = (grads[name] - ref).abs().max() / scale
        assert err < 2e-3, f"{name}: relative gradient error {err:.2e}"


# --- bad inputs -------------------------------------------------------------------------------

def test_bad_images(tiny):
    with pytest.raises(ValueError, match=r"images must have shape \(B, V, 3, 64, 64\)"):
        tiny.build_avatar(torch.rand(1, 3, 64, 64))
    with pytest.raises(ValueError, match="images must have shape"):
        tiny.build_avatar(torch.rand(1, 1, 3, 32, 32))
    with pytest.raises(TypeError, match="images must be floating point"):
        tiny.build_avatar(torch.zeros(1, 1, 3, 64, 64, dtype=torch.uint8))
    with pytest.raises(ValueError, match="at least one"):
        tiny.build_avatar(torch.rand(1, 0, 3, 64, 64))


def test_bad_render_inputs(tiny):
    avatar = tiny.build_avatar(sources())
    with pytest.raises(ValueError, match=r"points must have shape \(1, 5023, 3\)"):
        tiny.render(avatar, torch.rand(1, 100, 3), camera())
    with pytest.raises(ValueError, match="transform"):
        tiny.render(avatar, head_points(), torch.rand(1, 4, 4))
    with pytest.raises(ValueError, match="avatar batch 2"):
        tiny.render(tiny.build_avatar(sources(2)), head_points(3), camera(3))
    with pytest.raises(TypeError, match="avatar must come from build_avatar"):
        tiny.render(torch.rand(1, 3, 32, 32, 8), head_points(), camera())


def test_config_presets_and_validation(tmp_path):
    paper = GPAvatarConfig.preset("paper")
    assert (paper.image_size, paper.plane_size, paper.plane_channels, paper.render_size, paper.output_size) \
        == (512, 256, 32, 128, 512)
    assert paper.queries_per_frame == 128 * 128 * 64 and paper.pef_normalize == "queries"
    assert paper.pef_eps == 1e-30  # the official 1 / d²: changes no float32 weight of d² >= 3e-23
    for bad in (0.0, 1e-31, float("inf"), 1e31):
        with pytest.raises(ValueError, match="pef_eps"):
            GPAvatarConfig(pef_eps=bad)
    tiny = GPAvatarConfig.preset("tiny", focal=10.0)
    for suffix in (".yaml", ".json"):
        tiny.dump(tmp_path / f"c{suffix}")
        assert GPAvatarConfig.load(tmp_path / f"c{suffix}") == tiny
    (tmp_path / "partial.yaml").write_text("preset: tiny\nrender_size: 8\n")
    assert GPAvatarConfig.load(tmp_path / "partial.yaml") == GPAvatarConfig.preset("tiny", render_size=8)
    with pytest.raises(ValueError, match=r"unknown config field\(s\) \['render_sise'\]"):
        GPAvatarConfig.from_dict({"render_sise": 3})
    with pytest.raises(ValueError, match="preset must be one of"):
        GPAvatarConfig.preset("huge")
    with pytest.raises(ValueError, match="image_size must be a power of two"):
        GPAvatarConfig.preset("tiny", image_size=48)
    with pytest.raises(ValueError, match="pef_normalize"):
        GPAvatarConfig(pef_normalize="all")
    with pytest.raises(ValueError, match="noise must be one of"):
        GPAvatarConfig(noise="random")
    with pytest.raises(TypeError, match="render_size must be an int"):
        GPAvatarConfig(render_size=12.0)
    with pytest.raises(ValueError, match="K must be <= num_points"):
        GPAvatarConfig(K=9, num_points=8)
    with pytest.raises(TypeError, match="config must be a GPAvatarConfig"):
        GPAvatar(3)


def test_bf16_autocast_runs_and_stays_close_to_fp32(tiny):
    """The fast mode (bf16 autocast): kernels keep their float32 contract, the image stays close."""
    args = (sources(), head_points(), camera())
    with torch.no_grad():
        ref = tiny(*args)["image"]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fast = tiny(*args)["image"]
    assert fast.shape == ref.shape and torch.isfinite(fast).all()
    psnr = -10 * torch.log10(((fast.float() - ref) ** 2).mean())
    assert psnr > 30, f"bf16 image PSNR {psnr:.1f} dB against fp32"


# --- hostile values (issue 13) ------------------------------------------------------------------------

def test_non_finite_and_degenerate_inputs_name_the_argument(tiny):
    bad = sources()
    bad[0, 1, 2, 5, 7] = float("nan")
    with pytest.raises(ValueError, match="images must be finite"):
        tiny.build_avatar(bad)
    avatar = tiny.build_avatar(sources())
    for value in (float("nan"), float("inf")):
        points = head_points()
        points[0, 17, 1] = value
        with pytest.raises(ValueError, match="points must be finite"):
            tiny.render(avatar, points, camera())
    zero = camera()
    zero[:, :, :3] = 0
    with pytest.raises(ValueError, match=r"transform.*rotation"):
        tiny.render(avatar, head_points(), zero)
    scaled = camera()
    scaled[:, :, :3] *= 2
    with pytest.raises(ValueError, match="transform"):
        tiny.render(avatar, head_points(), scaled)
    nan_camera = camera()
    nan_camera[0, 1, 3] = float("nan")
    with pytest.raises(ValueError, match="transform"):
        tiny.render(avatar, head_points(), nan_camera)
    tiny.render(avatar, head_points(), camera(angle=0.7))  # a real rotation passes


def test_config_accepts_numpy_integers_and_refuses_bools(tmp_path):
    import numpy as np

    c = GPAvatarConfig.preset("tiny", K=np.int64(4), render_size=np.int32(8), focal=np.float32(10.0))
    assert (c.K, c.render_size, c.focal) == (4, 8, 10.0) and type(c.K) is int and type(c.focal) is float
    assert GPAvatarConfig.from_dict(c.to_dict()) == c
    (tmp_path / "c.json").write_text(__import__("json").dumps(c.to_dict()))  # plain ints: JSON-serializable
    for bad in (True, np.bool_(True)):
        with pytest.raises(TypeError, match="K must be an int"):
            GPAvatarConfig.preset("tiny", K=bad)
    (tmp_path / "bad.yaml").write_text("preset: tiny\nrender_size: [8\n")
    with pytest.raises(ValueError, match=r"bad\.yaml is not valid YAML"):
        GPAvatarConfig.load(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="list.yaml must hold a mapping"):
        GPAvatarConfig.load(tmp_path / "list.yaml")
    assert GPAvatarConfig.preset("tiny").preset_name() == "tiny" and GPAvatarConfig().preset_name() == "paper"
    assert GPAvatarConfig.preset("tiny", render_size=8).preset_name() is None


@pytest.mark.parametrize("chunk", [0, 64, 300])
def test_the_model_field_takes_one_direction_per_ray(tiny, chunk):
    """The model's field asks the renderer for one direction per ray (its direction terms are then
    computed per ray); the render equals the one through the same field handed a direction per
    sample, chunked or not (a chunk of 300 is not a multiple of the 8 samples a ray: the decoder
    repeats the directions per sample)."""
    model = GPAvatar(tiny.config.replace(query_chunk=chunk)).eval()
    model.load_state_dict(tiny.state_dict())
    avatar, points = model.build_avatar(sources()), head_points()
    field = model.field(avatar, points)
    assert field.ray_directions is True
    seen = {}

    def per_sample(coords, dirs):
        seen["dirs"] = tuple(dirs.shape)
        return field(coords, dirs)

    with torch.no_grad():
        rays = model.renderer(field, camera())
        samples = model.renderer(per_sample, camera())
    assert seen["dirs"][1] == model.renderer.image_size ** 2 * model.renderer.n_fine
    for key in ("coarse", "fine"):
        torch.testing.assert_close(rays[key], samples[key], rtol=1e-5, atol=1e-6)
