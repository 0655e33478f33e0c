"""The decoder's layers as one Triton kernel (``field_layers(..., kernel=True)``, issue 15) against
the torch layers (``kernel=False``), which tests/test_field_query.py checks against the official
modules.

CPU: the kernel runs under TRITON_INTERPRET=1 (conftest) on CPU tensors.  Every comparison counts
the kernel's launches, so a test cannot pass by comparing the torch layers with themselves.

Tolerances.  "ieee" (and tf32, which the interpreter computes in fp32): the same float32 math in
another order (the first layer as two products, the density as a row sum, 16-wide K chunks):
rtol 1e-5, atol 1e-5 (a dropped bias or a wrong column moves outputs by >= 1e-2 here).  "bf16":
operands rounded to 8-bit mantissas, four products deep: within BF16_SCALE of each output's
scale, like tests/test_field_query.py.  At the paper's 2^19 rows on a GPU (real TF32 / bf16
products; the density's weights scaled by 100) fixed bounds are too tight: there the kernel must
stay within twice what rounding every product's operands costs the torch layers
(``rounding_budget``, tests/_rounding.py), which a dropped bias or swapped columns exceed.
"""

import math

import pytest
import torch
from _dispatch import OpCalls
from _rounding import RoundedProducts
from conftest import HAS_CUDA
from hypothesis import given, settings
from hypothesis import strategies as st

from gpavatar.model.decoder import PointsDecoder
from gpavatar.ops._backend import triton_available, triton_interpreted
from gpavatar.ops.field_query import LAYERS_ENV, field_layers, layers_precision, layers_setting

requires_triton = pytest.mark.skipif(not triton_available(), reason="needs triton")

TOL = dict(rtol=1e-5, atol=1e-5)
BF16_SCALE = 3e-2
# widths: plane C, PEF out PC, feature D, value hidden VH, value V
WIDTHS = {
    "paper": dict(C=32, PC=32, D=128, VH=64, V=32),
    "tiny": dict(C=8, PC=8, D=32, VH=16, V=8),
    "odd": dict(C=5, PC=7, D=24, VH=10, V=3),
}


@pytest.fixture
def launches(monkeypatch):
    """The layers kernel's launches, by precision (the custom op imports field_layers_forward per call)."""
    calls = []
    if not triton_available():
        return calls
    import gpavatar.kernels.field_layers as kernel_module

    real = kernel_module.field_layers_forward

    def spy(*args, **kwargs):
        calls.append(kwargs["precision"])
        return real(*args, **kwargs)

    monkeypatch.setattr(kernel_module, "field_layers_forward", spy)
    return calls


def make_decoder(C, PC, D, VH, V, seed=0, device="cpu"):
    torch.manual_seed(seed)
    dec = PointsDecoder(plane_channels=C, num_points=16, point_feature_dim=4, pef_dim=PC, hidden=D,
                        value_hidden=VH, value_dim=V)
    with torch.no_grad():
        dec.density_layers[0].weight.mul_(100.0)  # both softplus branches (beta x > 20 is x > 2)
        dec.density_layers[0].bias.fill_(1.0)
        for p in dec.parameters():  # non-trivial biases everywhere (a dropped one must show)
            if p.dim() == 1:
                p.add_(0.1)
    return dec.to(device).eval().requires_grad_(False)


def make_inputs(dec, B=2, N=70, seed=1, device="cpu"):
    """tri / PEF features, samples in [-1.3, 1.3]^3 (about half outside the box, six on its faces),
    random directions (one of length 0)."""
    g = torch.Generator().manual_seed(seed)
    tri = torch.randn(B, N, dec.plane_channels, generator=g)
    expr = torch.randn(B, N, dec.points_querier.point_layers[2].out_features, generator=g)
    coords = torch.rand(B, N, 3, generator=g) * 2.6 - 1.3
    for i in range(min(6, N)):  # on a face of the box, otherwise inside: outside (the test is strict)
        coords[:, i] = coords[:, i].clamp(-0.9, 0.9)
        coords[:, i, i // 2] = 1.0 if i % 2 else -1.0
    dirs = torch.randn(B, N, 3, generator=g)
    dirs[0, -1] = 0.0  # F.normalize keeps a zero direction zero
    return [t.to(device) for t in (tri, expr, coords, dirs)]


def center_density(dec, args):
    """Shift the density bias so that half the samples' raw density is above 1 (softplus's x branch
    from 2 on: both branches are reached whatever the widths)."""
    tri, expr = args[0], args[1]
    with torch.no_grad():
        raw = dec.density_layers(dec.feature_layers(torch.cat([tri, expr], dim=-1)))[..., 0]
        dec.density_layers[0].bias.add_(1.0 - raw.median())


def both(dec, args):
    w = dec.field_weights()
    with torch.no_grad():
        return field_layers(*args, w, kernel=True), field_layers(*args, w, kernel=False)


def assert_same_nan(out, ref, **tol):
    assert torch.equal(out.isnan(), ref.isnan()), (int(out.isnan().sum()), int(ref.isnan().sum()))
    keep = ~ref.isnan()
    torch.testing.assert_close(out[keep], ref[keep], **tol)


@requires_triton
@pytest.mark.parametrize("widths", sorted(WIDTHS))
def test_kernel_matches_torch_layers(launches, widths):
    dec = make_decoder(**WIDTHS[widths])
    args = make_inputs(dec)
    center_density(dec, args)
    (alpha, value), (ref_alpha, ref_value) = both(dec, args)
    assert launches == ["ieee"]
    assert alpha.shape == ref_alpha.shape and value.shape == ref_value.shape
    assert alpha.dtype == value.dtype == torch.float32
    torch.testing.assert_close(alpha, ref_alpha, **TOL)
    torch.testing.assert_close(value, ref_value, rtol=1e-5, atol=1e-5 * float(ref_value.abs().max()))
    # both softplus branches, alpha 0 outside the box and on its faces, a real spread of values
    assert float(ref_alpha.max()) > 0.865 and bool((ref_alpha[:, :6] == 0).all())
    assert float(ref_value[..., 3:].abs().max() if ref_value.shape[-1] > 3 else 1.0) > 0.1


@requires_triton
@settings(max_examples=12, deadline=None)
@given(C=st.integers(1, 20), PC=st.integers(1, 20), D=st.integers(2, 40), VH=st.integers(1, 20),
       V=st.integers(3, 20), B=st.integers(1, 2), N=st.integers(1, 150), seed=st.integers(0, 2 ** 16))
def test_random_widths_and_sizes(C, PC, D, VH, V, B, N, seed):
    """Any widths (padding to tl.dot's 16 and the halves of D), any row count (partial tiles, one row)."""
    dec = make_decoder(C, PC, D, VH, V, seed=seed)
    args = make_inputs(dec, B=B, N=N, seed=seed)
    (alpha, value), (ref_alpha, ref_value) = both(dec, args)
    torch.testing.assert_close(alpha, ref_alpha, **TOL)
    torch.testing.assert_close(value, ref_value, rtol=1e-5, atol=1e-5 * (1 + float(ref_value.abs().max())))


@requires_triton
def test_empty_pass(launches):
    dec = make_decoder(**WIDTHS["tiny"])
    args = [t[:, :0] for t in make_inputs(dec)]
    (alpha, value), (ref_alpha, ref_value) = both(dec, args)
    assert alpha.shape == ref_alpha.shape == (2, 0) and value.shape == ref_value.shape == (2, 0, 8)


@requires_triton
@pytest.mark.parametrize("where", ["tri", "expr", "dir", "feature_b2", "rgb_w2", "density_b", "feature_w3"])
def test_nan_reaches_what_it_reaches_in_torch(launches, where):
    """A NaN reaches exactly the outputs it reaches in the torch layers: a row's features or direction
    only that row (a direction only its values), a weight every sample (its alpha or its channel)."""
    dec = make_decoder(**WIDTHS["tiny"])
    tri, expr, coords, dirs = make_inputs(dec)
    if where in ("tri", "expr", "dir"):
        {"tri": tri, "expr": expr, "dir": dirs}[where][1, 20, 1] = float("nan")
    else:
        with torch.no_grad():
            mod, name = {"feature_b2": ("feature_layers.2", "bias"), "rgb_w2": ("rgb_layers.2", "weight"),
                         "density_b": ("density_layers.0", "bias"), "feature_w3": ("feature_layers.4", "weight")}[where]
            getattr(dec.get_submodule(mod), name).view(-1)[1 % getattr(dec.get_submodule(mod), name).numel()] = \
                float("nan")
    (alpha, value), (ref_alpha, ref_value) = both(dec, (tri, expr, coords, dirs))
    assert launches and bool(ref_value.isnan().any() | ref_alpha.isnan().any())
    assert_same_nan(alpha, ref_alpha, **TOL)
    assert_same_nan(value, ref_value, rtol=1e-5, atol=1e-4)


@requires_triton
def test_saturated_density_and_far_rows(launches):
    """raw density >> 2 (softplus is x; exp would overflow) rounds alpha to 1; rows far outside the
    box get alpha 0."""
    dec = make_decoder(**WIDTHS["tiny"])
    with torch.no_grad():
        dec.density_layers[0].bias.fill_(25.0)
    tri, expr, coords, dirs = make_inputs(dec)
    coords[0, 10:20] = 1e6
    (alpha, value), (ref_alpha, ref_value) = both(dec, (tri, expr, coords, dirs))
    assert float(ref_alpha.max()) == 1.0 and bool((ref_alpha[0, 10:20] == 0).all())
    torch.testing.assert_close(alpha, ref_alpha, **TOL)
    torch.testing.assert_close(value, ref_value, **TOL)


@requires_triton
def test_bf16_autocast(launches):
    """Under bfloat16 autocast the kernel runs its products in bf16 (the interpreter: bf16-rounded
    operands, fp32 products): within BF16_SCALE of the fp32 layers, like the torch layers under the
    same autocast; float16 autocast runs the torch layers (the kernel has no float16 mode)."""
    dec = make_decoder(**WIDTHS["paper"])
    args = make_inputs(dec)
    w = dec.field_weights()
    with torch.no_grad():
        ref_alpha, ref_value = field_layers(*args, w, kernel=False)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            alpha, value = field_layers(*args, w, kernel=True)
            t_alpha, t_value = field_layers(*args, w, kernel=False)
        assert launches == ["bf16"]
        with torch.autocast("cpu", dtype=torch.float16):
            assert layers_precision(torch.device("cpu")) is None
            field_layers(*args, w, kernel=True)
    assert launches == ["bf16"]
    scale = ref_value.abs().amax(dim=(0, 1))
    for a, v in ((alpha, value), (t_alpha, t_value)):
        assert a.dtype == v.dtype == torch.float32
        assert float((a - ref_alpha).abs().max()) <= BF16_SCALE
        assert bool(((v - ref_value).abs() <= BF16_SCALE * scale).all())
    assert float((value - ref_value).abs().max()) > 1e-5  # bf16 really rounds


@requires_triton
def test_when_the_kernel_runs(launches, monkeypatch):
    """$GPAVATAR_FIELD_LAYERS: unset / auto -> torch (opt-in until timed on a GPU), triton -> the
    kernel, a bad value is refused; the argument overrides it; gradients, or a CPU without the
    interpreter, take the torch layers; tf32 follows torch's flag."""
    dec = make_decoder(**WIDTHS["tiny"])
    args = make_inputs(dec)
    w = dec.field_weights()
    monkeypatch.delenv(LAYERS_ENV, raising=False)
    assert layers_setting() == "auto"
    with torch.no_grad():
        ref = field_layers(*args, w)
        assert launches == []
        monkeypatch.setenv(LAYERS_ENV, "triton")
        field_layers(*args, w)
        assert launches == ["ieee"]
        field_layers(*args, w, kernel=False)
        assert launches == ["ieee"]
        saved = torch.backends.cuda.matmul.allow_tf32
        try:
            torch.backends.cuda.matmul.allow_tf32 = True
            out = field_layers(*args, w)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = saved
        assert launches == ["ieee", "tf32"]
        torch.testing.assert_close(out.value, ref.value, rtol=1e-5, atol=1e-4)  # fp32 under the interpreter
        monkeypatch.setenv(LAYERS_ENV, "triton-tf32x3")  # tf32x3 where the products would be fp32
        x3 = field_layers(*args, w)
        torch.backends.cuda.matmul.allow_tf32 = True
        try:
            field_layers(*args, w)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = saved
        assert launches == ["ieee", "tf32", "tf32x3", "tf32"]
        torch.testing.assert_close(x3.value, ref.value, rtol=1e-5, atol=1e-4)
        monkeypatch.setattr("gpavatar.ops._backend.triton_interpreted", lambda: False)
        field_layers(*args, w)
        assert launches == ["ieee", "tf32", "tf32x3", "tf32"]
        monkeypatch.undo()
    monkeypatch.setenv(LAYERS_ENV, "triton")
    dec.requires_grad_(True)
    alpha, value = field_layers(*args, dec.field_weights())
    assert launches == ["ieee", "tf32", "tf32x3", "tf32"] and alpha.requires_grad
    (alpha.sum() + value.sum()).backward()
    assert dec.feature_layers[0].weight.grad is not None
    monkeypatch.setenv(LAYERS_ENV, "fast")
    with pytest.raises(ValueError, match=LAYERS_ENV):
        field_layers(*args, w)


@requires_triton
def test_decoder_switch(launches, monkeypatch):
    """PointsDecoder.fused_layers (None: the variable) runs the kernel in a whole pass (tri-plane and
    PEF by their ops) with the module path's results, chunked passes too."""
    monkeypatch.delenv(LAYERS_ENV, raising=False)
    dec = make_decoder(**WIDTHS["tiny"])
    g = torch.Generator().manual_seed(2)
    points = torch.rand(1, 16, 3, generator=g) * 1.6 - 0.8
    coords = torch.rand(1, 50, 3, generator=g) * 2.4 - 1.2
    args = (coords, torch.randn(1, 50, 3, generator=g), torch.randn(1, 3, 8, 10, 8, generator=g), points)
    with torch.no_grad():
        ref_alpha, ref_value = dec(*args)
        assert launches == []
        dec.fused_layers = True
        alpha, value = dec(*args)
        chunked = dec(*args, chunk=20)
        dec.fused_layers = None
        monkeypatch.setenv(LAYERS_ENV, "triton")
        dec(*args)
    assert launches == ["ieee"] * 5
    for a, v in ((alpha, value), chunked):
        torch.testing.assert_close(a, ref_alpha, **TOL)
        torch.testing.assert_close(v, ref_value, **TOL)


# --- sm_90 code (no GPU needed) ---------------------------------------------------------------

@pytest.mark.slow
@requires_triton
def test_kernel_compiles_for_sm90_without_spills(tmp_path):
    """Compiled for sm_90 (tests/_sm90.py) at the paper widths and each precision's default tile: no
    register spills beyond 64 bytes (measured 0 for ieee, tf32 and bf16; 128 x 4 spilled 1-1.6 KB)."""
    import gpavatar.kernels.field_layers as fl
    from _sm90 import job, sm90_spills

    widths = dict(CP=32, PCP=32, DH=64, VHP=64, VP=32, EP=32, SW=64)
    cuda = type("cuda", (), {"type": "cuda"})()
    jobs = [job("gpavatar.kernels.field_layers", "_layers_fwd_kernel",
                dict(widths, BLOCK_M=fl.default_blocks(p, cuda)[0], PREC=p, INTERPRET=False),
                fl.default_blocks(p, cuda)[1], fp_fusion=False) for p in ("ieee", "tf32", "bf16")]
    spills = sm90_spills(jobs, tmp_path)
    assert max(spills) <= 64, spills


# --- CUDA ---------------------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def rounding_budget(args, w, ref, bits, modes=(True,)):
    """What rounding every product's operands to `bits` mantissa bits costs the torch layers (fp32
    accumulation): per output (alpha, value / its scale), the largest and the mean deviation from
    `ref` over the rounding modes (True: to nearest, False: truncated)."""
    worst = [0.0, 0.0, 0.0, 0.0]
    for nearest in modes:
        with RoundedProducts(bits, nearest) as mode:
            alpha, value = field_layers(*args, w, kernel=False)
        assert mode.products > 0
        for i, e in enumerate(deviation(alpha, value, ref)):
            worst[i] = max(worst[i], e)
    return worst


def deviation(alpha, value, ref):
    """(max, mean) |alpha - ref alpha| and (max, mean) |value - ref value| / scale (each value
    channel's largest |ref value|)."""
    da, dv = (alpha - ref[0]).abs(), (value - ref[1]).abs() / ref[1].abs().amax(dim=(0, 1))
    return float(da.max()), float(da.mean()), float(dv.max()), float(dv.mean())


def assert_within_budget(alpha, value, ref, budget, label):
    """The kernel's deviation from the fp32 layers is at most twice the operand rounding's (plus
    fp32's reordering): a dropped bias or a wrong column moves the means far beyond."""
    got = deviation(alpha, value, ref)
    floor = (1e-5, 1e-6, 1e-5, 1e-6)
    assert all(g <= 2 * b + f for g, b, f in zip(got, budget, floor)), (label, got, budget)


def test_rounding_budget_on_the_cpu(launches):
    """The budget at paper widths (Triton interpreter, whose bf16 conversion truncates): the bf16
    kernel lies within it; a dropped bias or two swapped input columns do not; TF32 rounding costs
    the layers more than fp32 reordering does (the budget is not empty)."""
    if not (triton_available() and triton_interpreted()):
        pytest.skip("needs triton's interpreter (CPU tensors)")
    dec = make_decoder(**WIDTHS["paper"])
    args = make_inputs(dec, B=1, N=2048)
    w = dec.field_weights()
    swapped = w.feature_w1.clone()
    swapped[:, [0, 1]] = swapped[:, [1, 0]]
    with torch.no_grad():
        ref = field_layers(*args, w, kernel=False)
        bf16 = rounding_budget(args, w, ref, 7, modes=(True, False))
        tf32 = rounding_budget(args, w, ref, 10, modes=(True, False))
        assert tf32[1] > 1e-6 and tf32[3] > 1e-6 and bf16[1] > tf32[1]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            alpha, value = field_layers(*args, w, kernel=True)
        assert launches == ["bf16"]
        assert_within_budget(alpha, value, ref, bf16, "bf16")
        for wrong in (w._replace(rgb_b2=torch.zeros_like(w.rgb_b2)), w._replace(feature_w1=swapped)):
            with RoundedProducts(7, nearest=False):
                out = field_layers(*args, wrong, kernel=False)
            with pytest.raises(AssertionError):
                assert_within_budget(*out, ref, bf16, "mutant")


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_cuda_paper_size(launches):
    """GPU, paper widths, 2^19 rows: ieee within fp32 rounding of the torch layers (TF32 off); tf32 and
    bf16 within twice what rounding the products' operands to their mantissas (to nearest or
    truncated) costs the torch layers.  The density's weights are scaled by 100 here, so at 2^19
    rows the fixed bounds this test had (1e-2, 3e-2) were too tight: emulated on the CPU, TF32
    rounding moves some alpha by 0.011-0.017, bf16 by 0.09 (the test failed on an H100).
    Graph-capturable (no host sync)."""
    dec = make_decoder(**WIDTHS["paper"], device="cuda")
    args = make_inputs(dec, B=1, N=524288, device="cuda")
    w = dec.field_weights()
    saved = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        with torch.no_grad():
            ref = field_layers(*args, w, kernel=False)
            scale = ref.value.abs().amax(dim=(0, 1))
            budgets = {"tf32": rounding_budget(args, w, ref, 10, modes=(True, False)),
                       "bf16": rounding_budget(args, w, ref, 7, modes=(True, False))}
            alpha, value = field_layers(*args, w, kernel=True)
            torch.testing.assert_close(alpha, ref.alpha, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(value, ref.value, rtol=1e-4, atol=1e-5 * float(scale.max()))
            torch.backends.cuda.matmul.allow_tf32 = True
            for label, ctx in (("tf32", torch.autocast("cuda", enabled=False)),
                               ("bf16", torch.autocast("cuda", dtype=torch.bfloat16))):
                with ctx:
                    alpha, value = field_layers(*args, w, kernel=True)
                assert_within_budget(alpha, value, ref, budgets[label], label)
            assert launches == ["ieee", "tf32", "bf16"]
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                field_layers(*args, w, kernel=True)
            finally:
                torch.cuda.set_sync_debug_mode("default")
            static = [a.clone() for a in args]
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = field_layers(*static, w, kernel=True)
            static[0].copy_(args[0].flip(1))
            graph.replay()
            ref = field_layers(args[0].flip(1), *args[1:], w, kernel=True)
            torch.testing.assert_close(out.value, ref.value)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.parametrize("per_ray", [False, True])
@pytest.mark.parametrize("widths", sorted(WIDTHS))
def test_training_form_gives_the_inference_bits_and_writes_little_in_backward(widths, per_ray):
    """With a gradient recorded, field_layers runs a form whose backward makes no zero-filled
    slice gradients and no clones of in-place updates; its outputs are the inference form's bits,
    and its gradients those of the official layers (float64, against autograd through them).
    per_ray: one direction per 7 consecutive samples (the renderer's ray_directions; a zero one
    among them), against the official layers on the directions repeated per sample."""
    from gpavatar.ops.field_query import sample_directions
    from gpavatar.ops.reference import harmonic_embedding

    dec = make_decoder(**WIDTHS[widths]).double().requires_grad_(True)
    tri, expr, coords, dirs = (t.double() for t in make_inputs(dec))
    N = tri.shape[1]
    given = dirs.reshape(dirs.shape[0], N // 7, 7, 3)[:, :, -1] if per_ray else dirs
    dirs = sample_directions(given, N)  # what the reference sees
    center_density(dec, (tri, expr))
    w = dec.field_weights()
    with torch.no_grad():
        inference = field_layers(tri, expr, coords, given, w, kernel=False)
    tri.requires_grad_(True)
    alpha, value = field_layers(tri, expr, coords, given, w, kernel=False)
    assert torch.equal(alpha, inference.alpha) and torch.equal(value, inference.value)

    g_alpha, g_value = torch.randn_like(alpha), torch.randn_like(value)
    with OpCalls() as ops:
        grads = torch.autograd.grad((alpha * g_alpha).sum() + (value * g_value).sum(), [tri, *dec.parameters()],
                                    allow_unused=True)
    # per-sample tensors only (the weights' slices may: they are small)
    per_sample = {name for name, shape in ops.calls if shape and math.prod(shape) // max(1, shape[-1]) == alpha.numel()}
    wasteful = {"new_zeros", "zeros", "slice_backward", "select_backward", "clone", "copy_"} & per_sample
    assert not wasteful, wasteful

    # the official layers (feature_layers, density_layers, rgb_layers on [feat, gamma]), by autograd
    tri_ref = tri.detach().clone().requires_grad_(True)
    feat = dec.feature_layers(torch.cat([tri_ref, expr], dim=-1))
    inside = ((coords > -1) & (coords < 1)).all(-1).float()
    # (float32 outputs, the field's contract: rounded where field_layers rounds them)
    a_ref = -torch.expm1(-torch.nn.functional.softplus(dec.density_layers(feat)[..., 0].float(), beta=10) * inside)
    gamma = harmonic_embedding(torch.nn.functional.normalize(dirs, dim=-1))
    v_ref = dec.rgb_layers(torch.cat([feat, gamma], dim=-1)).float()
    v_ref = torch.cat([torch.sigmoid(v_ref[..., :3]) * 1.002 - 0.001, v_ref[..., 3:]], dim=-1)
    ref = torch.autograd.grad((a_ref * g_alpha).sum() + (v_ref * g_value).sum(), [tri_ref, *dec.parameters()],
                              allow_unused=True)
    for got, want in zip(grads, ref):
        if want is None:
            assert got is None or not got.abs().max()
        else:
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


# ------------------------------------------------------------------ the ReLU epilogue (CUDA inference)

@settings(max_examples=25, deadline=None)
@given(lead=st.lists(st.integers(0, 5), min_size=0, max_size=2), n_in=st.integers(1, 40),
       n_out=st.integers(1, 40), transposed=st.booleans(), seed=st.integers(0, 2**16))
def test_linear_relu_with_the_epilogue_is_relu_of_linear(lead, n_in, n_out, transposed, seed):
    """linear_relu's one-product form (torch._addmm_activation; the CPU default) reshapes any leading
    shape, empty and non-contiguous inputs included, and gives relu(linear) bit for bit; so does
    the two-op form it falls back to."""
    from gpavatar.ops.field_query import linear_relu

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, n_in, 3, generator=g)[..., 1] if transposed else torch.randn(*lead, n_in, generator=g)
    w, b = torch.randn(n_out, n_in, generator=g), torch.randn(n_out, generator=g)
    ref = torch.relu(torch.nn.functional.linear(x, w, b))
    out = linear_relu(x, w, b, epilogue=True)
    assert out.shape == ref.shape and torch.equal(out, ref)
    assert torch.equal(linear_relu(x, w, b, epilogue=False), ref)


def test_relu_epilogue_on_cpu_and_cuda_without_autocast():
    from gpavatar.ops.field_query import relu_epilogue

    x, w, b = torch.randn(4, 3), torch.randn(2, 3), torch.randn(2)
    assert relu_epilogue(x, w, b)
    assert not relu_epilogue(x, w, None) and not relu_epilogue(x.double(), w, b)
    w.requires_grad_(True)
    assert not relu_epilogue(x, w, b)  # training: the two ops (autograd)
    with torch.no_grad():
        assert relu_epilogue(x, w, b)
    w.requires_grad_(False)
    assert not relu_epilogue(x.to("meta"), w.to("meta"), b.to("meta"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not relu_epilogue(x, w, b)
    if HAS_CUDA:
        assert relu_epilogue(x.cuda(), w.cuda(), b.cuda())
        with torch.autocast("cuda", dtype=torch.bfloat16):
            assert not relu_epilogue(x.cuda(), w.detach().cuda(), b.cuda())


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_cuda_inference_layers_use_the_epilogue_and_match_the_two_ops():
    """On CUDA a no-grad field_layers runs its two hidden layers as _addmm_activation (no separate
    ReLU of a hidden layer); it and the training form (the two ops) match the CPU's layers (TF32 off)."""
    dec = make_decoder(**WIDTHS[sorted(WIDTHS)[0]], device="cuda")
    tri, expr, coords, dirs = make_inputs(dec, device="cuda")
    w = dec.field_weights()

    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.no_grad(), OpCalls() as seen:
            alpha, value = field_layers(tri, expr, coords, dirs, w, kernel=False)
        assert seen.names.count("_addmm_activation") == 2
        w_grad = type(w)(*(t.detach().clone().requires_grad_(True) for t in w))
        trained = field_layers(tri, expr, coords, dirs, w_grad, kernel=False)  # the two ops
        with torch.no_grad():  # the CPU's numbers (the two ops' bits there)
            ref_alpha, ref_value = field_layers(*(t.cpu() for t in (tri, expr, coords, dirs)),
                                                type(w)(*(t.cpu() for t in w)), kernel=False)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
    for a, v in ((alpha, value), (trained.alpha.detach(), trained.value.detach())):
        torch.testing.assert_close(a.cpu(), ref_alpha, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(v.cpu(), ref_value, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ one direction per ray

@settings(max_examples=20, deadline=None)
@given(B=st.integers(1, 2), R=st.integers(1, 6), S=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_per_ray_directions_give_the_per_sample_layers(B, R, S, seed):
    """field_layers with dirs (B, R, 3), one per S consecutive samples, against the same layers on
    the directions repeated per sample: float64, inference and training forms (the training form's
    values are the inference form's bits), and the gradients."""
    from gpavatar.ops.field_query import sample_directions

    dec = make_decoder(**WIDTHS[sorted(WIDTHS)[0]], seed=seed % 7).double().requires_grad_(True)
    tri, expr, coords, _ = (t.double() for t in make_inputs(dec, B=B, N=R * S, seed=seed))
    rays = torch.randn(B, R, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    samples = sample_directions(rays, R * S)
    assert samples.shape == (B, R * S, 3) and torch.equal(samples[:, ::S], rays)
    w = dec.field_weights()
    with torch.no_grad():
        got, want = field_layers(tri, expr, coords, rays, w), field_layers(tri, expr, coords, samples, w)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    grads = []
    for d in (rays, samples):
        alpha, value = field_layers(tri, expr, coords, d, w)
        if d is rays:
            assert torch.equal(alpha, got.alpha) and torch.equal(value, got.value)
        grads.append(torch.autograd.grad(alpha.sum() + value.square().sum(), list(dec.parameters()),
                                         allow_unused=True))
    for a, b in zip(*grads):
        if b is None:
            assert a is None or not a.abs().max()
        else:
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_directions_of_a_wrong_shape_are_refused():
    from gpavatar.ops.field_query import check_directions

    dec = make_decoder(**WIDTHS[sorted(WIDTHS)[0]])
    tri, expr, coords, dirs = make_inputs(dec, B=1, N=12)
    w = dec.field_weights()
    for bad in (dirs[:, :5], dirs[:, :0], dirs[..., :2], dirs[0], torch.cat([dirs, dirs])):
        with pytest.raises(ValueError, match="dirs must have shape"):
            field_layers(tri, expr, coords, bad, w)
        with pytest.raises(ValueError, match="dirs must have shape"):
            check_directions(bad, coords.shape[:-1])
    for good in (dirs, dirs[:, :6], dirs[:, :4], dirs[:, :1]):
        check_directions(good, coords.shape[:-1])
        field_layers(tri, expr, coords, good, w)


# ------------------------------------------------------------------ features side by side

def test_layers_take_adjacent_features_without_concatenating():
    """tri and expr given as the column slices of one contiguous (B, N, C + PC) tensor (what
    ops.triplane_features writes): the layers read it as their first input instead of concatenating
    the two (no cat dispatched), with the bits of separate tensors; other layouts and a recorded
    gradient keep the concatenation."""
    from gpavatar.ops.field_query import _adjacent

    dec = make_decoder(**WIDTHS[sorted(WIDTHS)[0]])
    tri, expr, coords, dirs = make_inputs(dec)
    w = dec.field_weights()
    C = tri.shape[-1]
    joined = torch.cat([tri, expr], -1)

    with torch.no_grad():
        ref = field_layers(tri, expr, coords, dirs, w, kernel=False)
        with OpCalls() as seen:
            out = field_layers(joined[..., :C], joined[..., C:], coords, dirs, w, kernel=False)
    assert ("cat", tuple(joined.shape)) not in seen.calls  # (the small weight and embedding cats stay)
    with torch.no_grad(), OpCalls() as plain:
        field_layers(tri, expr, coords, dirs, w, kernel=False)
    assert ("cat", tuple(joined.shape)) in plain.calls
    assert torch.equal(out.alpha, ref.alpha) and torch.equal(out.value, ref.value)
    assert _adjacent(joined[..., :C], joined[..., C:]).data_ptr() == joined.data_ptr()
    assert torch.equal(_adjacent(joined[..., :C], joined[..., C:]), joined)
    wide = torch.cat([tri, expr, expr], -1)  # rows longer than C + PC
    assert _adjacent(wide[..., :C], wide[..., C:C + expr.shape[-1]]) is None
    assert _adjacent(joined[..., C:], joined[..., :C]) is None  # the wrong order
    assert _adjacent(tri, expr) is None  # two tensors
    assert _adjacent(joined[:, ::2, :C], joined[:, ::2, C:]) is None  # rows not contiguous
    with torch.no_grad():
        sub = field_layers(joined[:, ::2, :C], joined[:, ::2, C:], coords[:, ::2], dirs[:, ::2], w, kernel=False)
        sub_ref = field_layers(tri[:, ::2], expr[:, ::2], coords[:, ::2], dirs[:, ::2], w, kernel=False)
    assert torch.equal(sub.value, sub_ref.value)
    leaf = joined.clone().requires_grad_(True)
    assert _adjacent(leaf[..., :C], leaf[..., C:]) is None  # a gradient goes through cat
