"""composite: every backend against the reference (all four outputs and the gradients to
alphas and values), closed-form cases, gradcheck, finite differences of the CPU kernel,
opcheck, bad inputs."""

import pytest
import torch
from conftest import BACKEND_CASES
from hypothesis import given
from hypothesis import strategies as st

import gpavatar.ops as ops
from gpavatar.ops.reference import composite_reference

# The kernels evaluate the reference's float32 recurrences (T_{i+1} = T_i (1 - a_i), w = a T)
# in the same order; sums over S samples and C channels differ by rounding only: ~1e-6
# relative.  A wrong transmittance (inclusive instead of exclusive) or a missing suffix term
# changes results by O(1e-1).
FWD = dict(rtol=1e-5, atol=1e-5)
BWD = dict(rtol=1e-4, atol=1e-4)


def make_inputs(R, S, C, seed=0, special=True, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    alphas = torch.rand(R, S, generator=g, dtype=torch.float64) ** 2
    if special and S > 2:
        alphas[: R // 3, S // 2] = 1.0  # opaque samples: nothing behind them counts
        alphas[R // 3: R // 2] = 0.0  # empty rays
    values = torch.randn(R, S, C, generator=g, dtype=torch.float64)
    depths = torch.sort(torch.rand(R, S, generator=g, dtype=torch.float64) * 4 + 7, dim=1).values
    return [t.float().to(device) for t in (alphas, values, depths)]


def run(backend, alphas, values, depths, grads):
    a = alphas.detach().clone()
    v = values.detach().clone()
    if backend == "reference":
        a, v = a.double(), v.double()
        depths = None if depths is None else depths.double()
    a.requires_grad_()
    v.requires_grad_()
    if backend == "reference":
        out = composite_reference(a, v, depths)
    else:
        out = ops.composite(a, v, depths, backend=backend)
    outputs = [out[0], out[1], out[2]] + ([out[3]] if depths is not None else [])
    upstream = [g.to(o.dtype) for g, o in zip(grads, outputs)]
    ga, gv = torch.autograd.grad(outputs, (a, v), upstream)
    return outputs, ga, gv


def check_against_reference(device, backend, R, S, C, with_depths=True, seed=0, special=True):
    alphas, values, depths = make_inputs(R, S, C, seed=seed, special=special, device=device)
    depths = depths if with_depths else None
    g = torch.Generator().manual_seed(seed + 1)
    grads = [torch.randn(R, C, generator=g), torch.randn(R, generator=g), torch.randn(R, S, generator=g),
             torch.randn(R, generator=g)]
    grads = [x.to(device) for x in grads]
    outs, ga, gv = run(backend, alphas, values, depths, grads)
    routs, rga, rgv = run("reference", alphas, values, depths, grads)
    for name, o, r in zip(["color", "opacity", "weights", "depth"], outs, routs):
        assert o.dtype == torch.float32
        torch.testing.assert_close(o.double(), r, **FWD, msg=lambda m, name=name: f"{name}: {m}")
    torch.testing.assert_close(ga.double(), rga, **BWD, msg=lambda m: f"grad alphas: {m}")
    torch.testing.assert_close(gv.double(), rgv, **BWD, msg=lambda m: f"grad values: {m}")


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
@given(R=st.integers(1, 20), S=st.integers(1, 70), C=st.integers(1, 40), with_depths=st.booleans(),
       special=st.booleans(), seed=st.integers(0, 2**16))
def test_composite_matches_reference(device, backend, R, S, C, with_depths, special, seed):
    check_against_reference(device, backend, R, S, C, with_depths, seed, special)


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
@pytest.mark.parametrize("R,S,C", [(1, 1, 1), (3, 64, 32), (5, 7, 33), (2, 100, 3), (4, 64, 130)])
def test_composite_shapes(device, backend, R, S, C):
    check_against_reference(device, backend, R, S, C)
    check_against_reference(device, backend, R, S, C, with_depths=False)


@pytest.mark.parametrize("device,backend", BACKEND_CASES + [pytest.param("cpu", "torch", id="cpu-torch")])
def test_constant_alpha_closed_form(device, backend):
    """S samples of alpha a and colour v: opacity 1 - (1 - a)^S, colour v times that, w_i = a (1 - a)^i."""
    a, S = 0.3, 12
    alphas = torch.full((2, S), a, device=device)
    values = torch.tensor([0.2, -1.0, 3.0], device=device).expand(2, S, 3).contiguous()
    out = ops.composite(alphas, values, backend=backend)
    opacity = 1 - (1 - a) ** S
    torch.testing.assert_close(out.opacity, torch.full((2,), opacity, device=device), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.color, values[:, 0] * opacity, rtol=1e-6, atol=1e-6)
    expected = a * (1 - a) ** torch.arange(S, dtype=torch.float64)
    torch.testing.assert_close(out.weights[0].double().cpu(), expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("device,backend", BACKEND_CASES + [pytest.param("cpu", "torch", id="cpu-torch")])
def test_single_opaque_sample_hides_everything_behind(device, backend):
    alphas = torch.zeros(1, 6, device=device)
    alphas[0, 2] = 1.0
    alphas[0, 4] = 0.7
    values = torch.randn(1, 6, 4, device=device, requires_grad=True)
    a = alphas.clone().requires_grad_()
    depths = torch.arange(6.0, device=device)[None]
    out = ops.composite(a, values, depths, backend=backend)
    torch.testing.assert_close(out.color, values[:, 2].detach())
    assert float(out.opacity.detach()) == 1.0 and float(out.depth.detach()) == 2.0
    assert out.weights.tolist() == [[0.0, 0.0, 1.0, 0.0, 0.0, 0.0]]
    gv = torch.autograd.grad(out.color.sum(), values)[0]
    assert float(gv[0, 3:].abs().max()) == 0.0 and float(gv[0, :2].abs().max()) == 0.0
    # d color / d alpha_4 = T_4 * v_4 - ... = 0: T_4 = 0 behind the opaque sample.
    ga = torch.autograd.grad(ops.composite(a, values.detach(), backend=backend).color.sum(), a)[0]
    assert float(ga[0, 3:].abs().max()) == 0.0


@pytest.mark.parametrize("device,backend", BACKEND_CASES + [pytest.param("cpu", "torch", id="cpu-torch")])
def test_zero_alpha_gives_zero(device, backend):
    out = ops.composite(torch.zeros(3, 5, device=device), torch.randn(3, 5, 2, device=device),
                        torch.rand(3, 5, device=device), backend=backend)
    for t in (out.color, out.opacity, out.weights, out.depth):
        assert float(t.abs().max()) == 0.0


@pytest.mark.parametrize("device,backend", BACKEND_CASES + [pytest.param("cpu", "torch", id="cpu-torch")])
@pytest.mark.parametrize("shape", [(0, 5, 3), (4, 0, 3), (4, 5, 0)])
def test_empty(device, backend, shape):
    R, S, C = shape
    a = torch.rand(R, S, device=device, requires_grad=True)
    v = torch.rand(R, S, C, device=device, requires_grad=True)
    out = ops.composite(a, v, backend=backend)
    assert out.color.shape == (R, C) and out.opacity.shape == (R,) and out.weights.shape == (R, S)
    assert out.depth is None
    (out.color.sum() + out.opacity.sum()).backward()
    assert a.grad.shape == a.shape and v.grad.shape == v.shape


def test_opacity_gradient_ignores_the_clamp():
    """sum w = 1 - T_S: the clamp only removes rounding, so d opacity / d alpha is that of 1 - T_S."""
    a = torch.tensor([[0.5, 1.0, 0.5]], dtype=torch.float64, requires_grad=True)
    out = ops.composite(a, torch.ones(1, 3, 1, dtype=torch.float64), backend="torch")
    (ga,) = torch.autograd.grad(out.opacity.sum(), a)
    # 1 - T_3 = 1 - (1 - a0)(1 - a1)(1 - a2): d/da0 = (1 - a1)(1 - a2) = 0, d/da1 = 0.25, d/da2 = 0
    torch.testing.assert_close(ga, torch.tensor([[0.0, 0.25, 0.0]], dtype=torch.float64))


def test_reference_gradcheck_float64():
    alphas, values, depths = (t.double() for t in make_inputs(3, 6, 4, seed=5, special=False))
    alphas = (alphas * 0.9).requires_grad_()
    values.requires_grad_()

    def f(a, v):
        out = ops.composite(a, v, depths, backend="torch")
        return out.color, out.opacity, out.weights, out.depth

    assert torch.autograd.gradcheck(f, (alphas, values))


def test_cpu_kernel_backward_finite_differences():
    if "cpu" not in ops.available_backends("cpu"):
        pytest.skip("extension not built")
    alphas, values, depths = make_inputs(4, 9, 5, seed=6, special=False)
    alphas = alphas * 0.8 + 0.1
    g = torch.Generator().manual_seed(7)
    grads = [torch.randn(4, 5, generator=g), torch.randn(4, generator=g), torch.randn(4, 9, generator=g),
             torch.randn(4, generator=g)]

    def loss(a, v):
        out = ops.composite(a, v, depths, backend="cpu")
        return sum((o.double() * w.double()).sum() for o, w in zip(out, grads))

    a, v = alphas.clone().requires_grad_(), values.clone().requires_grad_()
    ga, gv = torch.autograd.grad(loss(a, v), (a, v))
    h = 1e-3
    for k, (x, grad) in enumerate(((alphas, ga), (values, gv))):
        d = torch.randn(x.shape, generator=g)
        args_plus = [alphas, values]
        args_minus = [alphas, values]
        args_plus[k] = x + h * d
        args_minus[k] = x - h * d
        with torch.no_grad():
            numeric = (loss(*args_plus) - loss(*args_minus)) / (2 * h)
        analytic = (grad.double() * d).sum()
        assert abs(numeric - analytic) <= 1e-3 * max(1.0, abs(analytic)), (k, numeric.item(), analytic.item())


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_opcheck(device, backend):
    cpp = backend in ("cpu", "cuda")
    fwd = torch.ops.gpavatar.composite_forward if cpp else torch.ops.gpavatar.composite_forward_triton
    bwd = torch.ops.gpavatar.composite_backward if cpp else torch.ops.gpavatar.composite_backward_triton
    alphas, values, depths = make_inputs(5, 8, 6, device=device)
    for d in (depths, None):
        torch.library.opcheck(fwd, (alphas.requires_grad_(), values.requires_grad_(), d))
        grads = (torch.randn(5, 6, device=device), torch.randn(5, device=device), torch.randn(5, 8, device=device),
                 torch.randn(5, device=device))
        torch.library.opcheck(bwd, (*grads, alphas.detach(), values.detach(), d))


def test_torch_compile_traces_the_op():
    backend = "cpu" if "cpu" in ops.available_backends("cpu") else "torch"
    alphas, values, depths = make_inputs(6, 10, 4)
    a, v = alphas.requires_grad_(), values.requires_grad_()

    def f(a, v):
        out = ops.composite(a, v, depths, backend=backend)
        return out.color.sum() + out.depth.sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(a, v), f(a, v))
    compiled(a, v).backward()
    assert a.grad is not None and v.grad is not None


BAD = [
    (dict(alphas=torch.rand(4)), ValueError, ["alphas", "(R, S)"]),
    (dict(values=torch.rand(4, 5)), ValueError, ["values", "(4, 5, C)"]),
    (dict(values=torch.rand(4, 6, 3)), ValueError, ["values", "(4, 5, C)"]),
    (dict(depths=torch.rand(4, 6)), ValueError, ["depths", "(4, 5)"]),
    (dict(alphas=torch.rand(4, 5).int()), TypeError, ["alphas", "dtype"]),
    (dict(values="x"), TypeError, ["values", "torch.Tensor"]),
]


@pytest.mark.parametrize("backend", ["torch"] + [b for b in ops.available_backends("cpu") if b != "torch"])
@pytest.mark.parametrize("change,exc,words", BAD)
def test_bad_inputs(backend, change, exc, words):
    check_bad_call(ops.composite, dict(alphas=torch.rand(4, 5), values=torch.rand(4, 5, 3), depths=None),
                   change, exc, words, backend)


def check_bad_call(op, args: dict, change: dict, exc, words, backend):
    """op(**args with change) raises exc with every one of words in its message."""
    with pytest.raises(exc) as info:
        op(**dict(args, **change), backend=backend)
    for word in words:
        assert word in str(info.value), str(info.value)


def test_bad_device_mix():
    other = "cuda" if torch.cuda.is_available() else "meta"
    with pytest.raises(ValueError, match="values must be on the same device as alphas"):
        ops.composite(torch.rand(2, 3), torch.rand(2, 3, 4, device=other))


def test_low_level_op_checks_its_inputs():
    if "cpu" not in ops.available_backends("cpu"):
        pytest.skip("extension not built")
    fwd, bwd = torch.ops.gpavatar.composite_forward, torch.ops.gpavatar.composite_backward
    a, v = torch.rand(3, 4), torch.rand(3, 4, 2)
    with pytest.raises(ValueError, match="values must be contiguous"):
        fwd(a, torch.rand(3, 2, 4).transpose(1, 2), None)
    with pytest.raises(TypeError, match="alphas must be float32"):
        fwd(a.double(), v, None)
    with pytest.raises(ValueError, match="values must have C >= 1"):
        fwd(a, torch.rand(3, 4, 0), None)
    with pytest.raises(ValueError, match="grad_weights must have shape"):
        bwd(torch.rand(3, 2), torch.rand(3), torch.rand(3, 5), torch.rand(3), a, v, None)


@pytest.mark.parametrize("device,backend", BACKEND_CASES + [pytest.param("cpu", "torch", id="cpu-torch")])
@pytest.mark.parametrize("bad,words", [(5.0, ["min 0", "max 5"]), (-0.25, ["min -0.25"]), (1.0000001, ["max 1"]),
                                       (float("inf"), ["max inf"]), (float("nan"), ["1 NaN"])])
def test_alphas_outside_unit_interval_are_refused(device, backend, bad, words):
    """Issue 13: alphas of 5 gave a color of -255 and weights of +-320 without a word.  Alphas
    are opacities: outside [0, 1] (or NaN) is a ValueError naming alphas and the range, the
    same on every backend; 0 and 1 themselves are fine.  validate=False skips the check (its
    host sync) and computes the formula as given, like the reference."""
    alphas, values, depths = make_inputs(4, 6, 3, device=device)
    alphas[0, 0], alphas[3, 5] = 0.0, 1.0
    ops.composite(alphas, values, depths, backend=backend)  # the bounds themselves are valid
    alphas[2, 3] = bad
    with pytest.raises(ValueError) as info:
        ops.composite(alphas, values, depths, backend=backend)
    for word in ["alphas", "[0, 1]"] + words:
        assert word in str(info.value), str(info.value)
    if bad == 5.0:
        out = ops.composite(alphas, values, depths, backend=backend, validate=False)
        ref = composite_reference(alphas.cpu().double(), values.cpu().double(), depths.cpu().double())
        for o, r in zip(out, ref):
            torch.testing.assert_close(o.cpu().double(), r, **FWD)


# --- composite_merged: two sample sets composited in merged order -----------------------------


def merged_inputs(R, Sa, Sb, C, seed=0, device="cpu"):
    """Two sample sets of R rays, their merged depths and order (ops.merge_samples on the CPU)."""
    g = torch.Generator().manual_seed(seed)
    alphas_a, alphas_b = torch.rand(R, Sa, generator=g) ** 2, torch.rand(R, Sb, generator=g) ** 2
    if Sa > 1:
        alphas_a[: R // 3, Sa // 2] = 1.0  # opaque samples
    values_a, values_b = torch.randn(R, Sa, C, generator=g), torch.randn(R, Sb, C, generator=g)
    ta = torch.sort(torch.rand(R, Sa, generator=g) * 4 + 7, dim=1).values
    tb = torch.sort(torch.rand(R, Sb, generator=g) * 4 + 7, dim=1).values
    if Sa and Sb:  # a tie between the sets
        ta[:, 0] = tb[:, 0] = torch.minimum(ta[:, 0], tb[:, 0])
    depths, order = ops.merge_samples(ta, tb, backend="torch")
    return [t.to(device) for t in (alphas_a, values_a, alphas_b, values_b, order, depths)]


def unfused_merged(alphas_a, values_a, alphas_b, values_b, order, depths, backend):
    """What composite_merged computes: composite of the gathered concatenation."""
    alphas = ops.gather_samples(torch.cat([alphas_a, alphas_b], 1), order)
    values = ops.gather_samples(torch.cat([values_a, values_b], 1), order)
    return ops.composite(alphas, values, depths, backend=backend)


@pytest.mark.parametrize("device,backend", BACKEND_CASES + [pytest.param("cpu", "torch", id="cpu-torch")])
@given(R=st.integers(1, 12), Sa=st.integers(0, 40), Sb=st.integers(0, 40), C=st.integers(1, 36),
       with_depths=st.booleans(), seed=st.integers(0, 2**16))
def test_composite_merged_is_composite_of_the_merged_samples(device, backend, R, Sa, Sb, C, with_depths, seed):
    """Every output equals composite() of the merged copies bit for bit (the same recurrences over
    the same samples in the same order; C % 4 == 0 takes the CUDA kernel's vector loads)."""
    if Sa + Sb == 0:
        Sb = 1
    alphas_a, values_a, alphas_b, values_b, order, depths = merged_inputs(R, Sa, Sb, C, seed, device)
    depths = depths if with_depths else None
    got = ops.composite_merged(alphas_a, values_a, alphas_b, values_b, order, depths, backend=backend)
    want = unfused_merged(alphas_a, values_a, alphas_b, values_b, order, depths, backend)
    for name, x, y in zip(CompositeFields, got, want):
        assert (x is None) == (y is None), name
        assert x is None or torch.equal(x, y), name


CompositeFields = ("color", "opacity", "weights", "depth")


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_composite_merged_any_order_and_launches(device, backend, monkeypatch):
    """Any order in range is a gather (not only merge_samples' permutations); on cpu / cuda the
    fused form runs one composite_merged_forward and no composite_forward."""
    alphas_a, values_a, alphas_b, values_b, _, depths = merged_inputs(6, 9, 7, 8, seed=3, device=device)
    g = torch.Generator().manual_seed(4)
    order = torch.randint(0, 16, (6, 16), generator=g).to(device)
    calls = []
    if backend in ("cpu", "cuda"):
        for name in ("composite_merged_forward", "composite_forward"):
            op = getattr(torch.ops.gpavatar, name)
            monkeypatch.setattr(torch.ops.gpavatar, name,
                                lambda *a, _op=op, _n=name: calls.append(_n) or _op(*a), raising=False)
    got = ops.composite_merged(alphas_a, values_a, alphas_b, values_b, order, depths, backend=backend)
    if backend in ("cpu", "cuda"):
        assert calls == ["composite_merged_forward"]
    want = unfused_merged(alphas_a, values_a, alphas_b, values_b, order, depths, backend)
    for name, x, y in zip(CompositeFields, got, want):
        assert torch.equal(x, y), name


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_composite_merged_gradients_take_the_unfused_ops(device, backend):
    """With gradients recorded the result and the gradients are those of the gathered composite."""
    inputs = merged_inputs(5, 6, 4, 3, seed=5, device=device)
    leaves = [t.clone().requires_grad_() for t in inputs[:4]]
    twins = [t.clone().requires_grad_() for t in inputs[:4]]
    got = ops.composite_merged(*leaves, inputs[4], inputs[5], backend=backend)
    want = unfused_merged(*twins, inputs[4], inputs[5], backend)
    (got.color.sum() + got.opacity.sum() + got.depth.sum()).backward()
    (want.color.sum() + want.opacity.sum() + want.depth.sum()).backward()
    for a, b in zip(leaves, twins):
        assert a.grad is not None and torch.equal(a.grad, b.grad)


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_composite_merged_nan_value(device, backend):
    """A NaN value makes the color NaN like the reference, through the fused form too."""
    alphas_a, values_a, alphas_b, values_b, order, depths = merged_inputs(3, 4, 4, 2, seed=6, device=device)
    values_b[1, 2, 0] = float("nan")
    got = ops.composite_merged(alphas_a, values_a, alphas_b, values_b, order, depths, backend=backend)
    want = unfused_merged(alphas_a, values_a, alphas_b, values_b, order, depths, "torch")
    assert torch.equal(got.color.isnan().cpu(), want.color.isnan().cpu()) and bool(got.color.isnan().any())


MERGED_BAD = [
    (dict(alphas_b=torch.rand(3, 2)), ValueError, ["alphas_b", "(4, Sb)"]),
    (dict(values_a=torch.rand(4, 6, 3)), ValueError, ["values_a", "(4, 5, C)"]),
    (dict(values_b=torch.rand(4, 2, 2)), ValueError, ["values_b", "(4, 2, 3)"]),
    (dict(order=torch.zeros(4, 7, dtype=torch.int32)), ValueError, ["order", "int64", "(4, 7)"]),
    (dict(order=torch.full((4, 7), 7)), ValueError, ["order", "[0, 7)", "max 7"]),
    (dict(order=torch.full((4, 7), -1)), ValueError, ["order", "min -1"]),
    (dict(depths=torch.rand(4, 5)), ValueError, ["depths", "(4, 7)"]),
    (dict(alphas_b=torch.full((4, 2), 2.0)), ValueError, ["alphas", "[0, 1]"]),
]


@pytest.mark.parametrize("backend", ["torch"] + [b for b in ops.available_backends("cpu") if b != "torch"])
@pytest.mark.parametrize("change,exc,words", MERGED_BAD)
def test_composite_merged_bad_inputs(backend, change, exc, words):
    args = dict(alphas_a=torch.rand(4, 5), values_a=torch.rand(4, 5, 3), alphas_b=torch.rand(4, 2),
                values_b=torch.rand(4, 2, 3), order=torch.arange(7).expand(4, 7).contiguous(), depths=None)
    check_bad_call(ops.composite_merged, args, change, exc, words, backend)


def test_composite_merged_low_level_op():
    """The C++ op checks its inputs by name; an order out of range (unchecked input) reads a sample
    of the ray, never outside the tensors; opcheck passes."""
    if "cpu" not in ops.available_backends("cpu"):
        pytest.skip("extension not built")
    fwd = torch.ops.gpavatar.composite_merged_forward
    aa, va, ab, vb = torch.rand(3, 4), torch.rand(3, 4, 2), torch.rand(3, 2), torch.rand(3, 2, 2)
    order = torch.arange(6).expand(3, 6).contiguous()
    with pytest.raises(ValueError, match="order must be a contiguous int64"):
        fwd(aa, va, ab, vb, order.int(), None)
    with pytest.raises(ValueError, match="values_b must have shape"):
        fwd(aa, va, ab, torch.rand(3, 2, 3), order, None)
    with pytest.raises(ValueError, match="depths must have shape"):
        fwd(aa, va, ab, vb, order, torch.rand(3, 5))
    wild = torch.tensor([[-5, 99, 0, 1, 2, 3]] * 3)
    color, opacity, weights, depth = fwd(aa, va, ab, vb, wild, None)
    clamped = wild.clamp(0, 5)
    want = unfused_merged(aa, va, ab, vb, clamped, None, "cpu")
    assert torch.equal(color, want.color) and torch.equal(weights, want.weights)
    torch.library.opcheck(fwd, (aa, va, ab, vb, order, torch.rand(3, 6)),
                          test_utils=("test_schema", "test_faketensor"))
