"""Activation checkpointing of the decoder's layers in training passes (PointsDecoder,
$GPAVATAR_FIELD_CHECKPOINT): the same outputs and gradients bit for bit, far fewer saved
activations, the size rule of the default, and the switches.  Both forms of a checkpointed pass
(``segmented``: ops.field_query.segmented_layers, the CPU default, or torch.utils.checkpoint per
segment) run every test of the pass (the ``form`` fixture)."""

import importlib

import pytest
import torch

from _saved import saved_bytes
from conftest import requires_cuda
from gpavatar import ops
from gpavatar.model.decoder import (CHECKPOINT_ENV, CHECKPOINT_MIN_SAMPLES, CHECKPOINT_SEGMENT, CPU_CHECKPOINT_SEGMENT,
                                    PointsDecoder)


field_query = importlib.import_module("gpavatar.ops.field_query")  # (ops.field_query is the function)
FORMS = ("segmented", "checkpoint")


@pytest.fixture(params=FORMS)
def form(request):
    return request.param


def make(N=300, seed=0, form=None):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # the decoder's initialization: the same in any test order
    dec = PointsDecoder(plane_channels=8, num_points=60, point_feature_dim=8, pef_dim=8, hidden=32,
                        value_hidden=16, value_dim=8, normalize="queries", backend="cpu")
    if form is not None:
        dec.segmented = form == "segmented"
    planes = torch.randn(1, 3, 16, 16, 8, generator=g).requires_grad_()
    coords = torch.rand(1, N, 3, generator=g) * 2.2 - 1.1  # some outside the box
    dirs = torch.randn(1, N, 3, generator=g)
    points = torch.rand(1, 60, 3, generator=g) - 0.5
    return dec, planes, coords, dirs, points


def assert_grads_close(grads, expected):
    """Gradients equal up to the summation order (over segments, or per ray against per sample):
    float rounding of sums of terms up to the gradient's scale, so ~1e-7 of each tensor's largest
    entry; an entry near zero in a row of large ones may differ by more than 1e-5 of itself
    (depending on the CPU's BLAS kernels).  A lost segment or a misplaced ray share changes whole
    rows by O(1) of that scale."""
    for a, b in zip(grads, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * max(1.0, b.abs().max().item()))


def spy_segments(dec, monkeypatch, record):
    """Calls ``record(coords)`` with each segment's coordinates as a checkpointed pass of either
    form makes its outputs (the segmented form's forward; the checkpoint form's _sample_layers,
    which its backward calls again)."""
    original = field_query.sampled_layers

    def sampled(planes, expr, coords, dirs, *args, **kwargs):
        record(coords)
        return original(planes, expr, coords, dirs, *args, **kwargs)

    monkeypatch.setattr(field_query, "sampled_layers", sampled)
    layers = dec._sample_layers

    def spy(planes, expr, coords, dirs):
        record(coords)
        return layers(planes, expr, coords, dirs)

    monkeypatch.setattr(dec, "_sample_layers", spy)


def train_pass(dec, planes, coords, dirs, points, checkpoint):
    """Outputs, gradients (parameters and planes) and the bytes autograd saved for the pass."""
    dec.checkpoint_layers = checkpoint
    dec.zero_grad()
    planes.grad = None
    (alpha, value), saved = saved_bytes(lambda: dec(coords, dirs, planes, points))
    (alpha.square().sum() + (value * torch.linspace(-1, 1, value.shape[-1])).sum()).backward()
    grads = [p.grad.clone() for p in dec.parameters()] + [planes.grad.clone()]
    return (alpha.detach(), value.detach()), grads, saved


def test_checkpointed_pass_is_bit_identical_and_saves_less(form):
    """The outputs of the plain pass bit for bit; the gradients too in the checkpoint form (autograd
    of the same ops again), up to summation order in the segmented form (its backward's products
    written out: _LayersBackward)."""
    dec, planes, coords, dirs, points = make(form=form)
    out_c, grads_c, saved_c = train_pass(dec, planes, coords, dirs, points, True)
    out_p, grads_p, saved_p = train_pass(dec, planes, coords, dirs, points, False)
    assert torch.equal(out_c[0], out_p[0]) and torch.equal(out_c[1], out_p[1])
    assert len(grads_c) == len(grads_p)
    if form == "segmented":
        assert_grads_close(grads_c, grads_p)
    for a, b in zip(grads_c, grads_p):
        assert form == "segmented" or torch.equal(a, b)
    assert any(bool(g.abs().sum() > 0) for g in grads_c)  # the gradients reach the weights
    # Plain: ~1000 floats per sample at the paper's widths (here ~400 at hidden 32); checkpointed:
    # the pass's features, coordinates and directions (and the PEF's own saved inputs).
    assert saved_c < 0.5 * saved_p, (saved_c, saved_p)


def test_default_checkpoints_large_passes_only(monkeypatch):
    monkeypatch.delenv(CHECKPOINT_ENV, raising=False)
    dec = make(N=8)[0]
    planes, expr = torch.zeros(1, 3, 4, 4, 8), torch.zeros(1, 100, 8)
    small, big = 100, CHECKPOINT_MIN_SAMPLES
    assert not dec._checkpoints(planes, expr, small)
    assert not dec._checkpoints(planes, expr, big - 1)
    assert dec._checkpoints(planes, expr, big)
    with torch.no_grad():
        assert not dec._checkpoints(planes, expr, big)  # inference never checkpoints
    monkeypatch.setenv(CHECKPOINT_ENV, "1")
    assert dec._checkpoints(planes, expr, small)
    monkeypatch.setenv(CHECKPOINT_ENV, "0")
    assert not dec._checkpoints(planes, expr, big)
    dec.checkpoint_layers = True  # the attribute wins over the variable
    assert dec._checkpoints(planes, expr, small)
    dec.checkpoint_layers = None
    monkeypatch.setenv(CHECKPOINT_ENV, "yes")
    with pytest.raises(ValueError, match="GPAVATAR_FIELD_CHECKPOINT must be 0, 1 or auto"):
        dec._checkpoints(planes, expr, small)


def test_frozen_decoder_and_inputs_do_not_checkpoint():
    dec = make(N=8)[0]
    dec.requires_grad_(False)
    planes, expr = torch.zeros(1, 3, 4, 4, 8), torch.zeros(1, 100, 8)
    assert not dec._checkpoints(planes, expr, CHECKPOINT_MIN_SAMPLES)
    assert dec._checkpoints(planes.requires_grad_(), expr, CHECKPOINT_MIN_SAMPLES)
    assert dec._checkpoints(planes.detach(), expr.requires_grad_(), CHECKPOINT_MIN_SAMPLES)


def test_checkpoint_recomputes_the_triplane_features(form):
    """The checkpointed pass keeps its inputs (planes, coords, dirs, the PEF features) and what the
    PEF op keeps, not the (N, C) tri-plane features: the backward samples them again."""
    N = 2000
    dec, planes, coords, dirs, points = make(N=N, form=form)
    _, _, saved = train_pass(dec, planes, coords, dirs, points, True)
    _, pef = saved_bytes(lambda: dec.points_querier(coords, points))
    inputs = 4 * (planes.numel() + 2 * coords.numel() + N * 8)
    tri = 4 * N * 8
    assert saved < pef + inputs + tri / 2, (saved, pef, inputs, tri)


@pytest.mark.parametrize("segment", [64, 100, 299, 300])
def test_segmented_checkpoint_matches_the_whole_pass(segment, form):
    """A pass checkpointed in segments of ``checkpoint_segment`` samples (the last one shorter):
    the outputs of the whole pass, and its gradients up to the summation order over segments."""
    dec, planes, coords, dirs, points = make(N=300, form=form)
    dec.checkpoint_segment = 1 << 30
    out_w, grads_w, _ = train_pass(dec, planes, coords, dirs, points, True)
    dec.checkpoint_segment = segment
    out_s, grads_s, _ = train_pass(dec, planes, coords, dirs, points, True)
    torch.testing.assert_close(out_s, out_w, rtol=1e-6, atol=1e-7)
    assert_grads_close(grads_s, grads_w)


def test_segments_follow_the_batch(form, monkeypatch):
    """With B > 1 a segment holds checkpoint_segment // B samples of every batch element."""
    dec, planes, coords, dirs, points = make(N=120, form=form)
    planes2 = torch.cat([planes.detach(), planes.detach().flip(2)]).requires_grad_()
    coords2, dirs2, points2 = (torch.cat([t, t.flip(1)]) for t in (coords, dirs, points))
    calls, forward = [], [True]
    with monkeypatch.context() as m:
        spy_segments(dec, m, lambda c: calls.append(tuple(c.shape)) if forward[0] else None)
        dec.checkpoint_layers, dec.checkpoint_segment = True, 100
        alpha, value = dec(coords2, dirs2, planes2, points2)
        forward[0] = False
        (alpha.sum() + value.sum()).backward()
    assert calls == [(2, 50, 3), (2, 50, 3), (2, 20, 3)]
    assert alpha.shape == (2, 120) and value.shape == (2, 120, 8)
    grads = [p.grad.clone() for p in dec.parameters()] + [planes2.grad.clone()]
    dec.zero_grad()
    planes2.grad = None
    dec.checkpoint_segment = 1 << 30
    ref_alpha, ref_value = dec(coords2, dirs2, planes2, points2)
    (ref_alpha.sum() + ref_value.sum()).backward()
    torch.testing.assert_close(alpha, ref_alpha, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(value, ref_value, rtol=1e-6, atol=1e-7)
    assert_grads_close(grads, [p.grad for p in dec.parameters()] + [planes2.grad])


@pytest.mark.parametrize("segment", [64, 100, 300])
def test_segments_hold_whole_rays_with_one_direction_per_ray(segment, form):
    """dirs with one direction per 5 samples: segments are rounded to whole rays (64 -> 60, 100,
    300), and the pass equals the pass given the directions repeated per sample."""
    from gpavatar.ops.field_query import sample_directions

    dec, planes, coords, dirs, points = make(N=300, form=form)
    rays = dirs[:, ::5].contiguous()
    dec.checkpoint_segment = 1 << 30
    out_w, grads_w, _ = train_pass(dec, planes, coords, sample_directions(rays, 300), points, True)
    dec.checkpoint_segment = segment
    out_s, grads_s, _ = train_pass(dec, planes, coords, rays, points, True)
    torch.testing.assert_close(out_s, out_w, rtol=1e-6, atol=1e-7)
    assert_grads_close(grads_s, grads_w)


def test_default_segments_by_device(form, monkeypatch):
    """checkpoint_segment None: 2^15 samples on the CPU (reused heap memory), 2^18 elsewhere; a value
    given is used on every device.  A CPU pass of 40000 samples runs as 2 segments (32768 + 7232)."""
    dec, planes, coords, dirs, points = make(N=40000, form=form)
    assert dec.checkpoint_segment is None
    assert dec.segment_samples(torch.device("cpu")) == CPU_CHECKPOINT_SEGMENT == 1 << 15
    assert dec.segment_samples(torch.device("cuda")) == CHECKPOINT_SEGMENT == 1 << 18
    dec.checkpoint_segment = 1000
    assert dec.segment_samples(torch.device("cuda")) == dec.segment_samples(torch.device("cpu")) == 1000
    dec.checkpoint_segment = None
    calls = []
    spy_segments(dec, monkeypatch, lambda c: calls.append(c.shape[1]))
    dec.checkpoint_layers = True
    alpha, value = dec(coords, dirs, planes, points)
    assert calls == [32768, 40000 - 32768]
    assert alpha.shape == (1, 40000) and value.shape == (1, 40000, 8)


def test_segmented_form_by_device(monkeypatch):
    """``segmented`` None: the segmented form on CPU tensors (a spy on segmented_layers), the
    checkpoint form elsewhere; True / False choose; passes that need a gradient for their
    directions, and other layer functions, take the checkpoint form."""
    dec, planes, coords, dirs, points = make(N=300)
    expr = torch.zeros(1, 300, 8)
    assert dec.segmented is None
    assert dec._segmented(planes, expr, coords, dirs)
    assert not dec._segmented(planes.to("meta"), expr.to("meta"), coords.to("meta"), dirs.to("meta"))
    dec.segmented = False
    assert not dec._segmented(planes, expr, coords, dirs)
    dec.segmented = True
    assert dec._segmented(planes, expr, coords, dirs)
    assert not dec._segmented(planes, expr, coords, dirs.clone().requires_grad_())
    dec.layers_function = field_query.field_layers
    assert not dec._segmented(planes, expr, coords, dirs)
    dec.layers_function, dec.segmented = None, None
    ran = []
    original = field_query.segmented_layers

    def spy(*args, **kwargs):
        ran.append(True)
        return original(*args, **kwargs)

    monkeypatch.setattr("gpavatar.model.decoder.segmented_layers", spy)
    dec.checkpoint_layers = True
    dec(coords, dirs, planes, points)
    assert ran == [True]


@pytest.mark.parametrize("B", [1, 2])
def test_forms_agree(monkeypatch, B):
    """The two forms: the same outputs bit for bit (the segmented forward runs the inference
    form of the layers), gradients up to summation order, with several segments, directions per
    ray and B = 1 or 2; one tri-plane backward per segmented pass."""
    results = []
    calls = []
    original = field_query.triplane_mean_grads

    def spy(*args, **kwargs):
        calls.append(True)
        return original(*args, **kwargs)

    monkeypatch.setattr(field_query, "triplane_mean_grads", spy)
    for form in FORMS:
        dec, planes, coords, dirs, points = make(N=300, form=form)
        if B == 2:
            planes = torch.cat([planes.detach(), planes.detach().flip(2)]).requires_grad_()
            coords, dirs, points = (torch.cat([t, t.flip(1)]) for t in (coords, dirs, points))
        rays = dirs[:, ::5].contiguous()
        dec.checkpoint_layers, dec.checkpoint_segment = True, 100 * B
        alpha, value = dec(coords, rays, planes, points)
        (alpha.square().sum() + (value * torch.linspace(-1, 1, value.shape[-1])).sum()).backward()
        results.append(((alpha.detach(), value.detach()),
                        [p.grad.clone() for p in dec.parameters()] + [planes.grad.clone()]))
    assert calls == [True]
    (out_s, grads_s), (out_c, grads_c) = results
    assert torch.equal(out_s[0], out_c[0]) and torch.equal(out_s[1], out_c[1])
    assert_grads_close(grads_s, grads_c)
    assert bool(grads_s[-1].abs().sum() > 0)


@pytest.mark.parametrize("need", ["planes", "expr", "weights", "coords"])
def test_segmented_gradients_for_each_input(need):
    """segmented_layers with a gradient wanted for one kind of input only: that gradient equals the
    plain pass's (up to summation order), and nothing else gets one."""
    dec, planes, coords, dirs, points = make(N=200)
    planes = planes.detach()
    g = torch.Generator().manual_seed(3)
    expr = torch.randn(1, 200, 8, generator=g)
    coords = coords.clamp(-0.95, 0.95)
    dec.requires_grad_(need == "weights")
    inputs = {"planes": planes, "expr": expr, "coords": coords}
    if need in inputs:
        inputs[need].requires_grad_()
    w = dec.field_weights()

    def run(layers):
        a, v = layers(planes, expr, coords, dirs, w)
        loss = a.square().sum() + (v * torch.linspace(-1, 1, v.shape[-1])).sum()
        wanted = [inputs[need]] if need in inputs else list(dec.parameters())
        return [t if t is not None else None for t in
                torch.autograd.grad(loss, wanted, allow_unused=True)]

    got = run(lambda *a: field_query.segmented_layers(*a, 64, backend="cpu"))
    expected = run(lambda *a: field_query.sampled_layers(*a, backend="cpu"))
    if need == "weights":  # the PEF's weights are not the layers' inputs
        got, expected = zip(*[(x, y) for x, y in zip(got, expected) if y is not None])
        assert len(got) == 12
    assert all(x is not None for x in got)
    assert_grads_close(got, expected)


def test_segmented_backward_is_written_out_in_float32(monkeypatch):
    """The segmented backward runs _LayersBackward (its products written out) for a float32 pass
    without autocast, one call per segment, and autograd of the training form under autocast."""
    calls = []
    original = field_query._LayersBackward.segment

    def spy(self, x, *args):
        calls.append(x.shape[0])
        return original(self, x, *args)

    monkeypatch.setattr(field_query._LayersBackward, "segment", spy)
    dec, planes, coords, dirs, points = make(N=300, form="segmented")
    dec.checkpoint_layers, dec.checkpoint_segment = True, 128
    alpha, value = dec(coords, dirs, planes, points)
    (alpha.sum() + value.sum()).backward()
    assert calls == [128, 128, 44]
    calls.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        alpha, value = dec(coords, dirs, planes, points)
    (alpha.sum() + value.sum()).backward()
    assert calls == []


@pytest.mark.parametrize("pad", [0, 7])
def test_written_out_backward_with_padded_heads(monkeypatch, pad):
    """The padded heads product of CUDA (heads_padding forced on the CPU): the written-out backward
    still gives the checkpoint form's gradients (the padding's zero columns get no gradient)."""
    monkeypatch.setattr(field_query, "heads_padding", lambda device, width: pad)
    results = []
    for form in FORMS:
        dec, planes, coords, dirs, points = make(N=300, form=form)
        dec.checkpoint_layers, dec.checkpoint_segment = True, 100
        alpha, value = dec(coords, dirs[:, ::5].contiguous(), planes, points)
        (alpha.square().sum() + (value * torch.linspace(-1, 1, value.shape[-1])).sum()).backward()
        results.append(((alpha.detach(), value.detach()),
                        [p.grad.clone() for p in dec.parameters()] + [planes.grad.clone()]))
    (out_s, grads_s), (out_c, grads_c) = results
    assert torch.equal(out_s[0], out_c[0]) and torch.equal(out_s[1], out_c[1])
    assert_grads_close(grads_s, grads_c)


def test_segmented_under_bf16_autocast():
    """Under bf16 autocast (the trainer's --amp bf16) the backward recomputes under the forward's
    autocast: the gradients of the checkpoint form, up to summation order."""
    results = []
    for form in FORMS:
        dec, planes, coords, dirs, points = make(N=300, form=form)
        dec.checkpoint_layers, dec.checkpoint_segment = True, 128
        with torch.autocast("cpu", dtype=torch.bfloat16):
            alpha, value = dec(coords, dirs, planes, points)
        (alpha.sum() + value.sum()).backward()
        results.append((alpha.detach(), [p.grad.clone() for p in dec.parameters()] + [planes.grad.clone()]))
    (a_s, g_s), (a_c, g_c) = results
    assert torch.equal(a_s, a_c)
    for x, y in zip(g_s, g_c):
        torch.testing.assert_close(x, y, rtol=2e-2, atol=1e-3 * max(1.0, y.abs().max().item()))


@pytest.mark.parametrize("backend", ["cpu", "torch", "triton"])
def test_triplane_mean_grads_is_the_ops_backward(backend):
    """ops.triplane.triplane_mean_grads: the gradients autograd gives through triplane_sample
    ("mean", channels-last) on the same backend, only those asked for."""
    from gpavatar.ops.triplane import triplane_mean_grads

    if backend not in ops.available_backends("cpu"):
        pytest.skip(f"backend {backend} not available")
    g = torch.Generator().manual_seed(5)
    planes = torch.randn(2, 3, 9, 7, 5, generator=g).requires_grad_()
    coords = (torch.rand(2, 40, 3, generator=g) * 2.4 - 1.2).requires_grad_()
    grad = torch.randn(2, 40, 5, generator=g)
    out = ops.triplane_sample(planes, coords, "mean", channels_last=True, backend=backend)
    want_p, want_c = torch.autograd.grad(out, [planes, coords], grad)
    gp, gc = triplane_mean_grads(grad, planes.detach(), coords.detach(), backend=backend, planes_grad=True,
                                 coords_grad=True)
    torch.testing.assert_close(gp, want_p, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gc, want_c, rtol=1e-5, atol=1e-6)
    gp, gc = triplane_mean_grads(grad, planes.detach(), coords.detach(), backend=backend, planes_grad=True,
                                 coords_grad=False)
    assert gc is None and torch.allclose(gp, want_p, rtol=1e-5, atol=1e-6)
    assert triplane_mean_grads(grad, planes, coords, backend=backend, planes_grad=False,
                               coords_grad=False) == (None, None)


@pytest.mark.cuda
@requires_cuda
def test_forms_agree_on_cuda():
    """On a GPU (where the checkpoint form is the default): the segmented form's outputs and
    gradients are the checkpoint form's, up to the products' rounding and summation order."""
    if "cuda" not in ops.available_backends("cuda"):
        pytest.skip("no cuda backend")
    results = []
    for form in FORMS:
        dec, planes, coords, dirs, points = make(N=3000, form=form)
        dec.points_querier.backend = "cuda"
        dec = dec.cuda()
        planes = planes.detach().cuda().requires_grad_()
        coords, rays, points = coords.cuda(), dirs[:, ::5].contiguous().cuda(), points.cuda()
        dec.checkpoint_layers, dec.checkpoint_segment = True, 1000
        alpha, value = dec(coords, rays, planes, points)
        (alpha.square().sum() + (value * torch.linspace(-1, 1, value.shape[-1], device="cuda")).sum()).backward()
        results.append(((alpha.detach(), value.detach()),
                        [p.grad.clone() for p in dec.parameters()] + [planes.grad.clone()]))
    (out_s, grads_s), (out_c, grads_c) = results
    torch.testing.assert_close(out_s, out_c, rtol=1e-4, atol=1e-5)
    for a, b in zip(grads_s, grads_c):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4 * max(1.0, b.abs().max().item()))


@pytest.mark.parametrize("empty", ["samples", "batch"])
def test_empty_pass_with_checkpointing_forced(form, empty):
    """A pass of no samples (N = 0) or no batch elements (B = 0) with checkpointing forced: empty
    outputs and a backward that runs (an empty pass keeps nothing; N = 0 divided by zero before)."""
    dec, planes, coords, dirs, points = make(N=10, form=form)
    dec.checkpoint_layers = True
    if empty == "samples":
        coords, dirs = coords[:, :0], dirs[:, :0]
    else:
        planes, coords, dirs, points = planes.detach()[:0].requires_grad_(), coords[:0], dirs[:0], points[:0]
    alpha, value = dec(coords, dirs, planes, points)
    assert alpha.shape == coords.shape[:2] and value.shape == (*coords.shape[:2], 8)
    (alpha.sum() + value.sum()).backward()
