"""field_query (issue 15): the fused field pass against the unfused PointsDecoder pass.

CPU: the Triton kernel runs under TRITON_INTERPRET=1 (conftest) on CPU tensors with
``backend="triton"`` and ``fused_field=True``; the unfused pass is the decoder's module path
(``fused_field=False``).  Every comparison also counts the kernel's launches, so a test cannot
pass by comparing the unfused path with itself.  CUDA (``cuda`` marker): the paper size on the
GPU in every precision, a CUDA-graph capture and a frame without host syncs.

Tolerances.  "ieee": the same float32 math in another order (the PEF's table split, the
concatenations split into two products, row sums instead of GEMMs): ~1e-7 absolute here,
so rtol=1e-5, atol=1e-6 (a dropped bias moves outputs by >= 1e-3).  "bf16" (CPU: operands
rounded to bfloat16 by the interpreter, fp32 products): every product rounds its inputs to
8-bit mantissas (2^-9 relative), five products deep: within 3e-2 of each output's scale.
"""

import pytest
import torch
from conftest import HAS_CUDA

import gpavatar.ops as ops
from gpavatar.model.decoder import PointsDecoder
from gpavatar.ops._backend import triton_available
from gpavatar.ops.field_query import FUSED_ENV, default_precision
from gpavatar.ops.knn_blend import OFFICIAL_EPS

# The fused kernel is Triton; without triton only the unfused fallbacks and the checks are tested.
requires_triton = pytest.mark.skipif(not triton_available(), reason="needs triton")

IEEE = dict(rtol=1e-5, atol=1e-6)
BF16_SCALE = 3e-2
# widths: plane C, point feature Cf, PEF out PC, feature D, value hidden VH, value V
WIDTHS = {
    "paper": dict(plane_channels=32, point_feature_dim=32, pef_dim=32, hidden=128, value_hidden=64, value_dim=32),
    "tiny": dict(plane_channels=8, point_feature_dim=8, pef_dim=8, hidden=32, value_hidden=16, value_dim=8),
    "odd": dict(plane_channels=5, point_feature_dim=3, pef_dim=7, hidden=24, value_hidden=10, value_dim=3),
}


@pytest.fixture
def launches(monkeypatch):
    """Counts the fused kernel's launches (the custom op imports field_forward at each call)."""
    calls = []
    if not triton_available():
        return calls
    import gpavatar.kernels.field_query as kernel_module

    real = kernel_module.field_forward

    def spy(*args, **kwargs):
        calls.append(args[-3])  # the precision
        return real(*args, **kwargs)

    monkeypatch.setattr(kernel_module, "field_forward", spy)
    return calls


def make_decoder(widths="paper", P=120, normalize="neighbors", eps=1e-8, seed=0, device="cpu", backend="triton"):
    torch.manual_seed(seed)
    dec = PointsDecoder(num_points=P, normalize=normalize, eps=eps, backend=backend, **WIDTHS[widths])
    with torch.no_grad():
        # spread the raw density over both softplus branches (beta x > 20 is x > 2)
        dec.density_layers[0].weight.mul_(100.0)
        dec.density_layers[0].bias.fill_(1.0)
        for p in dec.parameters():  # non-trivial biases everywhere (a dropped one must show)
            if p.dim() == 1:
                p.add_(0.1)
    return dec.to(device).eval()


def make_inputs(dec, B=2, N=60, P=120, H=12, W=20, seed=1, device="cpu", on_points=3):
    """Samples in [-1.3, 1.3]^3 (about half outside the box), ``on_points`` exactly on points, then six
    on the box's faces; random directions (one of length 0); channels-last planes H != W."""
    g = torch.Generator().manual_seed(seed)
    C = dec.plane_channels
    points = torch.rand(B, P, 3, generator=g) * 1.6 - 0.8
    coords = torch.rand(B, N, 3, generator=g) * 2.6 - 1.3
    coords[:, :on_points] = points[:, 5:5 + on_points]
    for i in range(6):  # on each face of the box, otherwise inside: outside (the test is strict)
        coords[:, on_points + i] = coords[:, on_points + i].clamp(-0.9, 0.9)
        coords[:, on_points + i, i // 2] = 1.0 if i % 2 else -1.0
    dirs = torch.randn(B, N, 3, generator=g)
    dirs[0, -1] = 0.0  # F.normalize keeps a zero direction zero
    planes = torch.randn(B, 3, H, W, C, generator=g)
    return [t.to(device) for t in (coords, dirs, planes, points)]


def run(dec, args, fused, chunk=0):
    dec.fused_field = fused
    with torch.no_grad():
        return dec(*args, chunk=chunk)


def assert_same_nan(out, ref, **tol):
    assert torch.equal(out.isnan(), ref.isnan()), (int(out.isnan().sum()), int(ref.isnan().sum()))
    keep = ~ref.isnan()
    torch.testing.assert_close(out[keep], ref[keep], **tol)


# --- fused vs unfused -------------------------------------------------------------------------

@requires_triton
@pytest.mark.parametrize("normalize", ["neighbors", "queries"])
@pytest.mark.parametrize("widths", ["paper", "odd"])
def test_fused_matches_unfused(launches, widths, normalize):
    dec = make_decoder(widths, normalize=normalize)
    args = make_inputs(dec)
    alpha, value = run(dec, args, True)
    ref_alpha, ref_value = run(dec, args, False)
    assert launches == ["ieee"]
    assert alpha.dtype == value.dtype == torch.float32 and value.shape == ref_value.shape
    torch.testing.assert_close(alpha, ref_alpha, **IEEE)
    torch.testing.assert_close(value, ref_value, **IEEE)
    # the inputs reach both softplus branches (alpha > 1 - exp(-2)), both sides of the box, alpha 0 outside
    assert float(ref_alpha.max()) > 0.865 and float(ref_alpha.min()) == 0.0
    assert bool((ref_alpha[:, 3:9] == 0).all())


def _layers_case(widths, N=84, S=1, dtype=torch.float64):
    """A decoder and (tri, expr, coords, dirs) of N samples; dirs one per S consecutive samples."""
    dec = make_decoder(widths).to(dtype)
    coords, dirs, _, _ = (t.to(dtype) for t in make_inputs(dec, N=N))
    g = torch.Generator().manual_seed(3)
    tri = torch.randn(*coords.shape[:2], dec.plane_channels, generator=g, dtype=dtype)
    expr = torch.randn(*coords.shape[:2], dec.points_querier.point_layers[2].out_features, generator=g,
                       dtype=dtype)
    if S > 1:
        dirs = dirs[:, ::S].contiguous()
    return dec, (tri, expr, coords, dirs)


@requires_triton
def official_layers(dec, tri, expr, coords, dirs):
    """The official decoder layers written out as modules and concatenations (SPEC section 6)."""
    import torch.nn.functional as F

    from gpavatar.model.renderer import inside_box
    from gpavatar.ops.reference import harmonic_embedding

    feat = dec.feature_layers(torch.cat([tri, expr], dim=-1))
    sigma = F.softplus(dec.density_layers(feat)[..., 0], beta=10) * inside_box(coords).to(feat.dtype)
    gamma = harmonic_embedding(F.normalize(dirs, dim=-1))
    raw = dec.rgb_layers(torch.cat([feat, gamma], dim=-1))
    return -torch.expm1(-sigma), torch.cat([torch.sigmoid(raw[..., :3]) * 1.002 - 0.001, raw[..., 3:]], dim=-1)


@pytest.mark.parametrize("widths", sorted(WIDTHS))
def test_folded_layers_are_the_official_layers(widths):
    """field_layers folds the last feature layer into the density and rgb heads and accumulates the
    direction embedding in place: the official function to float32 rounding (the pass casts the
    density and the values to float32; the rest runs in float64 here), values and every parameter's
    gradient (a wrong column split, bias or fold order is off by O(1))."""
    from gpavatar.ops.field_query import field_layers

    dec, (tri, expr, coords, dirs) = _layers_case(widths, N=80)
    params = [p for n, p in dec.named_parameters() if not n.startswith("points_querier")]
    results = []
    for fn in (lambda: field_layers(tri, expr, coords, dirs, dec.field_weights()),
               lambda: official_layers(dec, tri, expr, coords, dirs)):
        alpha, value = fn()
        grads = torch.autograd.grad((alpha * 3).sum() + (value * torch.linspace(-1, 1, value.shape[-1],
                                                                                  dtype=value.dtype)).sum(), params)
        results.append((alpha, value, grads))
    (a, v, ga), (ra, rv, rga) = results
    torch.testing.assert_close(a, ra.float(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(v, rv.float(), rtol=1e-6, atol=1e-6)
    for (name, _), x, y in zip([(n, p) for n, p in dec.named_parameters() if not n.startswith("points_querier")],
                               ga, rga):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5 * (1 + float(y.abs().max())),
                                   msg=lambda m, name=name: f"grad {name}: {m}")


@pytest.mark.parametrize("S", [1, 7])
@pytest.mark.parametrize("widths", ["paper", "odd"])
def test_cpu_inference_blocks_are_the_whole_pass(monkeypatch, widths, S):
    """A CPU inference pass runs its layers in blocks of CPU_ROW_BLOCK rows, rounded to whole rays
    (here 20 -> 20 rows per-sample or 14 with 7 samples a ray, a last block shorter; B = 2 rows
    flattened across the batch): the values and alphas of the pass taken at once, to float64 rounding
    (a block given another block's directions or rows is off by O(1))."""
    import importlib

    fq = importlib.import_module("gpavatar.ops.field_query")
    dec, args = _layers_case(widths, S=S)
    w = dec.field_weights()
    blocks = []
    original = fq._inference_rows

    def spy(rows, *rest):
        blocks.append(rows.shape[0])
        return original(rows, *rest)

    monkeypatch.setattr(fq, "_inference_rows", spy)
    with torch.no_grad():
        monkeypatch.setattr(fq, "CPU_ROW_BLOCK", 1 << 30)
        whole = fq.field_layers(*args, w)
        assert blocks == [2 * 84]
        blocks.clear()
        monkeypatch.setattr(fq, "CPU_ROW_BLOCK", 20)
        got = fq.field_layers(*args, w)
    step = 20 if S == 1 else 14
    assert blocks == [step] * (168 // step) + ([168 % step] if 168 % step else [])
    assert got.alpha.shape == whole.alpha.shape and got.value.shape == whole.value.shape
    assert got.alpha.dtype == got.value.dtype == torch.float32
    torch.testing.assert_close(got.alpha, whole.alpha, rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(got.value, whole.value, rtol=1e-7, atol=1e-7)
    assert float(whole.alpha.max()) > 0.5 and float(whole.value.abs().max()) > 0.5  # not all zeros


@pytest.mark.parametrize("widths", ["paper", "odd"])
def test_padded_heads_give_the_same_field(monkeypatch, widths):
    """On CUDA the heads product gets zero rows up to a multiple of 8 (aligned rows for cuBLAS): the
    same alphas, values and gradients as without (run here on the CPU with the padding forced to 5
    and to 8 - (VH + 1) % 8), in the inference and the training forms."""
    import importlib

    fq = importlib.import_module("gpavatar.ops.field_query")
    dec, args = _layers_case(widths, S=7)
    params = [p for n, p in dec.named_parameters() if not n.startswith("points_querier")]
    VH = dec.rgb_layers[0].out_features

    def results():
        with torch.no_grad():
            inference = fq.field_layers(*args, dec.field_weights())
        alpha, value = fq.field_layers(*args, dec.field_weights())
        grads = torch.autograd.grad((alpha * 3).sum() + (value * torch.linspace(-1, 1, value.shape[-1])).sum(),
                                    params)
        return inference, (alpha, value), grads

    ref = results()
    for pad in (5, -(VH + 1) % 8 or 8):
        monkeypatch.setattr(fq, "heads_padding", lambda device, width, pad=pad: pad)
        widths_seen = []
        original = fq._hidden_heads

        def spy(*a, original=original, widths_seen=widths_seen):
            out = original(*a)
            widths_seen.append(out.shape[-1])
            return out

        monkeypatch.setattr(fq, "_hidden_heads", spy)
        got = results()
        assert widths_seen and set(widths_seen) == {VH + 1 + pad}
        for x, y in zip([*got[0], *got[1], *got[2]], [*ref[0], *ref[1], *ref[2]]):
            torch.testing.assert_close(x, y, rtol=1e-7, atol=1e-7)
        monkeypatch.undo()


def test_heads_padding_by_device():
    from gpavatar.ops.field_query import heads_padding

    assert heads_padding(torch.device("cpu"), 65) == 0
    assert [heads_padding(torch.device("cuda"), w) for w in (65, 64, 11, 1)] == [7, 0, 5, 7]


def test_saturated_density(launches):
    """sigma ~ 20 (beta x >> 20: softplus is x; exp(beta x) would overflow): alpha rounds to 1."""
    dec = make_decoder("tiny")
    with torch.no_grad():
        dec.density_layers[0].bias.fill_(25.0)
    args = make_inputs(dec)
    alpha, _ = run(dec, args, True)
    ref_alpha, _ = run(dec, args, False)
    assert launches and float(ref_alpha.max()) == 1.0
    torch.testing.assert_close(alpha, ref_alpha, **IEEE)


@requires_triton
def test_chunked_queries_normalization(launches):
    """A chunked pass (weight_sum over the whole pass, then one fused launch per chunk) equals the
    unfused chunked pass, and the whole pass up to float summation order."""
    dec = make_decoder("tiny", normalize="queries")
    args = make_inputs(dec, N=70)
    alpha, value = run(dec, args, True, chunk=32)
    ref_alpha, ref_value = run(dec, args, False, chunk=32)
    assert len(launches) == 3
    torch.testing.assert_close(alpha, ref_alpha, **IEEE)
    torch.testing.assert_close(value, ref_value, **IEEE)
    whole_alpha, whole_value = run(dec, args, False)
    torch.testing.assert_close(value, whole_value, rtol=1e-5, atol=1e-5)


@requires_triton
def test_coincident_samples_with_the_official_eps(launches):
    """Samples exactly on points (d² = 0, weight 1e30 with eps = 1e-30) stay finite and equal."""
    dec = make_decoder("tiny", normalize="queries", eps=OFFICIAL_EPS)
    args = make_inputs(dec, on_points=10)
    alpha, value = run(dec, args, True)
    ref_alpha, ref_value = run(dec, args, False)
    assert launches and bool(value.isfinite().all()) and bool(alpha.isfinite().all())
    torch.testing.assert_close(alpha, ref_alpha, **IEEE)
    torch.testing.assert_close(value, ref_value, **IEEE)


@requires_triton
@pytest.mark.parametrize("where", ["texel", "feature_b2", "rgb_w2", "density_b", "dir", "point_features"])
def test_nan_reaches_what_it_reaches_unfused(launches, where):
    dec = make_decoder("tiny")
    coords, dirs, planes, points = make_inputs(dec)
    with torch.no_grad():
        if where == "texel":
            planes[1, 2, 4:8, 5:12, 3] = float("nan")  # plane 2 of batch 1: the samples reading these texels
        elif where == "feature_b2":
            dec.feature_layers[2].bias[4] = float("nan")  # every output
        elif where == "rgb_w2":
            dec.rgb_layers[2].weight[5, 2] = float("nan")  # value channel 5 only
        elif where == "density_b":
            dec.density_layers[0].bias.fill_(float("nan"))  # alpha only (0 * NaN outside the box too)
        elif where == "dir":
            dirs[0, 7, 1] = float("nan")  # the value of one sample
        else:
            dec.points_querier.points_feature.weight[11, 0] = float("nan")  # samples near point 11
    args = (coords, dirs, planes, points)
    alpha, value = run(dec, args, True)
    ref_alpha, ref_value = run(dec, args, False)
    assert launches
    assert bool(ref_alpha.isnan().any() or ref_value.isnan().any())
    assert_same_nan(alpha, ref_alpha, **IEEE)
    assert_same_nan(value, ref_value, **IEEE)


@requires_triton
def test_half_planes_and_per_batch_point_features(launches):
    """bf16 planes are read as stored (as triplane_sample does); (B, P, Cf) point features."""
    dec = make_decoder("tiny")
    coords, dirs, planes, points = make_inputs(dec)
    weights = dec.field_weights()
    weights = weights._replace(point_features=torch.randn(2, 120, 8, generator=torch.Generator().manual_seed(3)))
    planes = planes.to(torch.bfloat16)
    with torch.no_grad():
        out = ops.field_query(coords, dirs, planes, points, weights, 8, backend="triton", fused=True)
        ref = ops.field_query(coords, dirs, planes, points, weights, 8, backend="triton", fused=False)
    assert len(launches) == 1
    torch.testing.assert_close(out.alpha, ref.alpha, **IEEE)
    torch.testing.assert_close(out.value, ref.value, **IEEE)


# --- precision ----------------------------------------------------------------------------------

@requires_triton
def test_precisions(launches):
    """tf32 / tf32x3 compute in fp32 under the interpreter (ieee's results); bf16 within BF16_SCALE of
    each output's scale; the default follows torch.backends.cuda.matmul.allow_tf32."""
    dec = make_decoder("paper")
    args = make_inputs(dec)
    ref_alpha, ref_value = run(dec, args, False)
    outs = {}
    for precision in ("ieee", "tf32", "tf32x3", "bf16"):
        dec.field_precision = precision
        outs[precision] = run(dec, args, True)
    assert launches == ["ieee", "tf32", "tf32x3", "bf16"]
    for precision in ("tf32", "tf32x3"):  # the same fp32 products (ieee sums K in 16-wide chunks)
        torch.testing.assert_close(outs[precision][1], outs["ieee"][1], **IEEE)
    alpha, value = outs["bf16"]
    assert float((alpha - ref_alpha).abs().max()) <= BF16_SCALE
    scale = ref_value.abs().amax(dim=(0, 1))
    assert bool(((value - ref_value).abs() <= BF16_SCALE * scale).all())
    assert float((value - ref_value).abs().max()) > 1e-5  # bf16 really rounds
    saved = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        assert default_precision() == "tf32"
        torch.backends.cuda.matmul.allow_tf32 = False
        assert default_precision() == "ieee"
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


# --- when the kernel runs -----------------------------------------------------------------------

@requires_triton
def test_gradients_take_the_unfused_path(launches):
    """With grad enabled and parameters requiring grad, the pass runs the unfused ops (which have a
    backward): no launch, and the gradients equal the module path's."""
    dec = make_decoder("tiny")
    args = make_inputs(dec)
    grads = []
    for fused in (True, False):
        dec.fused_field = fused
        dec.zero_grad(set_to_none=True)
        alpha, value = dec(*args)
        (alpha.sum() + value.sum()).backward()
        grads.append({n: p.grad.clone() for n, p in dec.named_parameters()})
    assert launches == []
    for name in grads[1]:
        assert torch.equal(grads[0][name], grads[1][name]), name


@requires_triton
def test_switches(launches, monkeypatch):
    """CPU default: the module path (CPU results unchanged); $GPAVATAR_FIELD_FUSED=1 fuses, 0 never
    (also for the op itself), a bad value is refused; the attribute overrides the variable."""
    dec = make_decoder("tiny")
    args = make_inputs(dec)
    monkeypatch.delenv(FUSED_ENV, raising=False)
    run(dec, args, None)
    assert launches == []
    monkeypatch.setenv(FUSED_ENV, "1")
    run(dec, args, None)
    assert len(launches) == 1
    run(dec, args, False)
    assert len(launches) == 1
    monkeypatch.setenv(FUSED_ENV, "0")
    run(dec, args, None)
    run(dec, args, True)  # the decoder asks for fusing; the op's own default is overridden by fused=True
    assert len(launches) == 2
    with torch.no_grad():
        ops.field_query(*args, dec.field_weights(), 8, backend="triton")  # fused=None: $GPAVATAR_FIELD_FUSED=0
    assert len(launches) == 2
    monkeypatch.setenv(FUSED_ENV, "yes")
    with pytest.raises(ValueError, match="GPAVATAR_FIELD_FUSED must be 0, 1 or auto"):
        run(dec, args, None)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_op_runs_the_unfused_ops_on_other_backends(launches, backend):
    """Backends without the fused kernel: the op computes exactly the decoder's module path."""
    if backend not in ops.available_backends("cpu"):
        pytest.skip(f"no {backend} backend")
    dec = make_decoder("tiny", backend=backend, normalize="queries")
    coords, dirs, planes, points = args = make_inputs(dec)
    ref_alpha, ref_value = run(dec, args, False)
    with torch.no_grad():
        out = ops.field_query(coords, dirs, planes, points, dec.field_weights(), 8, normalize="queries",
                              backend=backend)
    assert launches == []
    assert torch.equal(out.alpha, ref_alpha) and torch.equal(out.value, ref_value)


@requires_triton
def test_precomputed_knn_and_empty_passes(launches):
    dec = make_decoder("tiny")
    coords, dirs, planes, points = args = make_inputs(dec)
    weights = dec.field_weights()
    with torch.no_grad():
        ref = ops.field_query(*args, weights, 8, backend="triton")
        knn = ops.knn(coords, points, 8)
        out = ops.field_query(*args, weights, knn=knn, backend="triton", validate=False)
        assert torch.equal(out.alpha, ref.alpha) and torch.equal(out.value, ref.value)
        empty = ops.field_query(coords[:, :0], dirs[:, :0], planes, points, weights, 8, backend="triton")
    assert empty.alpha.shape == (2, 0) and empty.value.shape == (2, 0, 8)


@requires_triton
def test_opcheck():
    dec = make_decoder("odd", P=20)
    coords, dirs, planes, points = make_inputs(dec, B=2, N=9, P=20)
    w = dec.field_weights()
    with torch.no_grad():
        dist2, idx = ops.knn(coords, points, 4)
        table = w.point_features @ w.point_w1[:, :3].T + w.point_b1
        layers = [t.detach().contiguous() for t in w[5:]]
        for weight_sum in (None, ops.knn_blend_weight_sum(dist2)):
            torch.library.opcheck(torch.ops.gpavatar.field_query_forward_triton,
                                  (coords, dirs, planes, points, dist2, idx, weight_sum, table,
                                   w.point_w1[:, 3:].contiguous(), w.point_w2.detach(), w.point_b2.detach(),
                                   layers, 1e-8, "ieee", 0, 0))


# --- bad input ----------------------------------------------------------------------------------

def _bad_call(change):
    dec = make_decoder("odd", P=20, backend=None)
    coords, dirs, planes, points = make_inputs(dec, B=1, N=12, P=20)
    kw = dict(coords=coords, dirs=dirs, planes=planes, points=points, weights=dec.field_weights(), K=4)
    change(kw)
    return lambda: ops.field_query(**kw)


def _w(name, value):
    return lambda kw: kw.update(weights=kw["weights"]._replace(**{name: value}))


BAD = [
    (lambda kw: kw.update(coords=torch.zeros(12, 3)), ValueError, ["coords", "(B, N, 3)"]),
    (lambda kw: kw.update(dirs=torch.zeros(1, 5, 3)), ValueError, ["dirs", "(1, 12, 3)"]),
    (lambda kw: kw.update(planes=torch.zeros(1, 3, 5, 12, 20)), ValueError, ["weights.feature_w1", "C = 20"]),
    (lambda kw: kw.update(planes=torch.zeros(1, 2, 12, 20, 5)), ValueError, ["planes", "(1, 3, H, W, C)"]),
    (lambda kw: kw.update(points=torch.zeros(2, 20, 3)), ValueError, ["points", "(1, P, 3)"]),
    (lambda kw: kw.update(points=torch.full((1, 20, 3), float("nan"))), ValueError, ["points", "finite"]),
    (lambda kw: kw.update(coords=torch.full((1, 12, 3), 1e7), dirs=torch.ones(1, 12, 3)), ValueError,
     ["coords", "1e+06"]),
    (lambda kw: kw.update(weights=tuple(kw["weights"])), TypeError, ["weights", "FieldWeights"]),
    (_w("point_features", torch.zeros(19, 3)), ValueError, ["weights.point_features", "(20, Cf)"]),
    (_w("point_w1", torch.zeros(8, 29)), ValueError, ["weights.point_w1", "(PH, 30)"]),
    (_w("feature_w2", torch.zeros(24, 23)), ValueError, ["weights.feature_w2", "(24, 24)"]),
    (_w("density_w", torch.zeros(2, 24)), ValueError, ["weights.density_w", "(1, 24)"]),
    (_w("rgb_w1", torch.zeros(10, 50)), ValueError, ["weights.rgb_w1", "(VH, 51)"]),
    (_w("rgb_w2", torch.zeros(2, 10)), ValueError, ["weights.rgb_w2", "V >= 3"]),
    (_w("rgb_b2", torch.zeros(4)), ValueError, ["weights.rgb_b2", "(3,)"]),
    (_w("feature_b1", torch.zeros(24, dtype=torch.int64)), TypeError, ["weights.feature_b1", "dtype"]),
    (lambda kw: kw.update(K=21), ValueError, ["K", "P = 20"]),
    (lambda kw: kw.update(K=None), ValueError, ["K is needed"]),
    (lambda kw: kw.update(K=5, knn=ops.knn(kw["coords"], kw["points"], 4)), ValueError, ["K must equal"]),
    (lambda kw: kw.update(knn=(torch.zeros(1, 12, 4), torch.zeros(1, 12, 4))), TypeError, ["knn.idx", "int64"]),
    (lambda kw: kw.update(knn=(torch.zeros(1, 12, 4), torch.full((1, 12, 4), 20))), ValueError, ["knn", "[0, 20)"]),
    (lambda kw: kw.update(knn=(torch.zeros(1, 5, 4), torch.zeros(1, 5, 4, dtype=torch.int64))), ValueError,
     ["knn", "(1, 12, K)"]),
    (lambda kw: kw.update(normalize="all"), ValueError, ["normalize"]),
    (lambda kw: kw.update(eps=0.0), ValueError, ["eps"]),
    (lambda kw: kw.update(precision="fp8"), ValueError, ["precision", "bf16"]),
    (lambda kw: kw.update(weight_sum=torch.ones(1, 4)), ValueError, ["weight_sum", "queries"]),
    (lambda kw: kw.update(normalize="queries", weight_sum=torch.ones(1, 3)), ValueError, ["weight_sum", "(1, 4)"]),
    (lambda kw: kw.update(normalize="queries", weight_sum=torch.zeros(1, 4)), ValueError, ["weight_sum", "> 0"]),
    (lambda kw: kw.update(dirs=kw["dirs"].to("meta")), ValueError, ["dirs", "same device"]),
]


@pytest.mark.parametrize("change,exc,words", BAD)
def test_bad_inputs(change, exc, words):
    call = _bad_call(change)
    with pytest.raises(exc) as info:
        call()
    for word in words:
        assert word in str(info.value), str(info.value)


# --- the GPU build, without a GPU ---------------------------------------------------------------

@pytest.mark.slow
@requires_triton
def test_kernel_compiles_for_sm90_without_large_spills(tmp_path):
    """Compiled for sm_90 (tests/_sm90.py) in every precision at its default tile: ptxas's register
    spills bounded.  Measured here: ieee 92, tf32x3 160, tf32 272, bf16 212 bytes per thread; the bound
    (1 KB) catches the 1.4-50 KB of the layouts that were rejected."""
    import gpavatar.kernels.field_query as fq
    from _sm90 import job, sm90_spills

    widths = dict(KP=8, CP=32, PHP=64, PCP=32, DH=64, VHP=64, VP=32, EP=32, SW=64)  # the paper preset
    cuda = type("cuda", (), {"type": "cuda"})()
    jobs = []
    for precision in fq.PRECISIONS:
        block_m, num_warps = fq.default_blocks(precision, cuda)
        bf16 = ("fw1_ptr", "fw2_ptr", "fw3_ptr", "rw1_ptr", "rw2_ptr") if precision == "bf16" else ()
        types = dict({n: "*bf16" for n in bf16}, idx_ptr="*i64", eps="fp32")
        jobs.append(job("gpavatar.kernels.field_query", "_field_fwd_kernel",
                        dict(widths, PER_BATCH=False, HAS_WS=True, BLOCK_M=block_m, PREC=precision,
                             PEF_PREC="tf32" if precision == "bf16" else precision, INTERPRET=False),
                        num_warps, types, fp_fusion=False))
    spills = sm90_spills(jobs, tmp_path)
    assert max(spills) <= 1024, dict(zip(fq.PRECISIONS, spills))


# --- CUDA -------------------------------------------------------------------------------------

def _paper_case(normalize="queries", N=524288):
    """Paper sizes: P = 5023 points near a head-sized shell, 3 x 32 x 256² planes, N samples."""
    dec = make_decoder("paper", P=5023, normalize=normalize, eps=OFFICIAL_EPS, device="cuda", backend=None)
    g = torch.Generator().manual_seed(4)
    points = torch.randn(1, 5023, 3, generator=g)
    points = points / points.norm(dim=-1, keepdim=True) * (0.5 + 0.1 * torch.rand(1, 5023, 1, generator=g))
    coords = torch.rand(1, N, 3, generator=g) * 2.2 - 1.1
    dirs = torch.randn(1, N, 3, generator=g)
    planes = torch.randn(1, 3, 256, 256, 32, generator=g) * 0.5
    return dec, [t.cuda() for t in (coords, dirs, planes, points)]


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("normalize", ["neighbors", "queries"])
def test_cuda_paper_size_every_precision(launches, normalize):
    """GPU, paper size: ieee within IEEE of the unfused pass (TF32 off for both); tf32 / tf32x3 within
    1e-2 / 1e-4 of each output's scale, bf16 within BF16_SCALE (10-bit / 8-bit mantissas)."""
    dec, args = _paper_case(normalize)
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        ref_alpha, ref_value = run(dec, args, False)
        scale = ref_value.abs().amax(dim=(0, 1))
        for precision, tol in (("ieee", None), ("tf32x3", 1e-4), ("tf32", 1e-2), ("bf16", BF16_SCALE)):
            dec.field_precision = precision
            alpha, value = run(dec, args, True)
            if tol is None:
                torch.testing.assert_close(alpha, ref_alpha, rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(value, ref_value, rtol=1e-5, atol=1e-5)
            else:
                assert float((alpha - ref_alpha).abs().max()) <= tol, precision
                err = float(((value - ref_value).abs() / scale).max())
                assert err <= tol, f"{precision}: {err:.2e}"
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
    assert launches == ["ieee", "tf32x3", "tf32", "bf16"]


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_cuda_fused_pass_is_graph_capturable(launches, monkeypatch):
    """On CUDA the decoder does not fuse by default (opt-in: slower on an H200); with
    $GPAVATAR_FIELD_FUSED=1 and validate=False a pass makes no host sync and captures in a CUDA
    graph whose replays (new samples copied in) equal eager passes."""
    dec, (coords, dirs, planes, points) = _paper_case(N=65536)
    dec.fused_field = None
    monkeypatch.delenv(FUSED_ENV, raising=False)
    with torch.no_grad():
        dec(coords, dirs, planes, points, validate=False)
    assert launches == []
    monkeypatch.setenv(FUSED_ENV, "1")
    with torch.no_grad():
        eager = dec(coords, dirs, planes, points, validate=False)
        assert launches
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            dec(coords, dirs, planes, points, validate=False)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        static = coords.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            dec(static, dirs, planes, points, validate=False)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = dec(static, dirs, planes, points, validate=False)
        graph.replay()
        torch.testing.assert_close(out[0], eager[0], rtol=1e-6, atol=1e-6)  # cuBLAS may pick another algorithm
        torch.testing.assert_close(out[1], eager[1], rtol=1e-6, atol=1e-6)
        moved = coords.flip(1).contiguous()
        static.copy_(moved)
        graph.replay()
        ref = dec(moved, dirs, planes, points, validate=False)
        torch.testing.assert_close(out[1], ref[1], rtol=1e-6, atol=1e-6)


def test_unfused_pass_writes_the_features_side_by_side_without_grad():
    """ops.field_query(fused=False) on the cpu backend: without a gradient the tri-plane and PEF
    features come from one kernel (triplane_sample_forward_extra) and the layers take them without
    a (B, N, C + PC) concatenation; with one, sampling + concatenation; the same numbers."""
    from _dispatch import OpCalls

    if "cpu" not in ops.available_backends("cpu") or not hasattr(torch.ops.gpavatar, "triplane_sample_forward_extra"):
        pytest.skip("needs the extension")
    dec = make_decoder("tiny", backend="cpu")
    coords, dirs, planes, points = make_inputs(dec)
    weights = dec.field_weights()
    width = (coords.shape[0], coords.shape[1], dec.plane_channels + weights.point_w2.shape[0])
    with torch.no_grad(), OpCalls() as seen:
        out = ops.field_query(coords, dirs, planes, points, weights, 8, backend="cpu", fused=False)
    assert "triplane_sample_forward_extra" in seen.names and ("cat", width) not in seen.calls
    with OpCalls() as seen:
        ref = ops.field_query(coords, dirs, planes.requires_grad_(True), points, weights, 8, backend="cpu",
                              fused=False)
    assert "triplane_sample_forward_extra" not in seen.names and ("cat", width) in seen.calls
    assert torch.equal(out.alpha, ref.alpha.detach()) and torch.equal(out.value, ref.value.detach())
