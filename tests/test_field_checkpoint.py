"""Activation checkpointing of the decoder's layers in training passes (PointsDecoder,
$GPAVATAR_FIELD_CHECKPOINT): the same outputs and gradients bit for bit, far fewer saved
activations, the size rule of the default, and the switches."""

import pytest
import torch

from _saved import saved_bytes
from gpavatar import ops
from gpavatar.model.decoder import (CHECKPOINT_ENV, CHECKPOINT_MIN_SAMPLES, CHECKPOINT_SEGMENT, CPU_CHECKPOINT_SEGMENT,
                                    PointsDecoder)


def make(N=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # the decoder's initialization: the same in any test order
    dec = PointsDecoder(plane_channels=8, num_points=60, point_feature_dim=8, pef_dim=8, hidden=32,
                        value_hidden=16, value_dim=8, normalize="queries", backend="cpu")
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


def train_pass(dec, planes, coords, dirs, points, checkpoint):
    """Outputs, gradients (parameters and planes) and the bytes autograd saved for the pass."""
    dec.checkpoint_layers = checkpoint
    dec.zero_grad()
    planes.grad = None
    (alpha, value), saved = saved_bytes(lambda: dec(coords, dirs, planes, points))
    (alpha.square().sum() + (value * torch.linspace(-1, 1, value.shape[-1])).sum()).backward()
    grads = [p.grad.clone() for p in dec.parameters()] + [planes.grad.clone()]
    return (alpha.detach(), value.detach()), grads, saved


def test_checkpointed_pass_is_bit_identical_and_saves_less():
    dec, planes, coords, dirs, points = make()
    out_c, grads_c, saved_c = train_pass(dec, planes, coords, dirs, points, True)
    out_p, grads_p, saved_p = train_pass(dec, planes, coords, dirs, points, False)
    assert torch.equal(out_c[0], out_p[0]) and torch.equal(out_c[1], out_p[1])
    assert len(grads_c) == len(grads_p)
    for a, b in zip(grads_c, grads_p):
        assert torch.equal(a, b)
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


def test_checkpoint_recomputes_the_triplane_features():
    """The checkpointed pass keeps its inputs (planes, coords, dirs, the PEF features) and what the
    PEF op keeps, not the (N, C) tri-plane features: the backward samples them again."""
    N = 2000
    dec, planes, coords, dirs, points = make(N=N)
    _, _, saved = train_pass(dec, planes, coords, dirs, points, True)
    _, pef = saved_bytes(lambda: dec.points_querier(coords, points))
    inputs = 4 * (planes.numel() + 2 * coords.numel() + N * 8)
    tri = 4 * N * 8
    assert saved < pef + inputs + tri / 2, (saved, pef, inputs, tri)


@pytest.mark.parametrize("segment", [64, 100, 299, 300])
def test_segmented_checkpoint_matches_the_whole_pass(segment):
    """A pass checkpointed in segments of ``checkpoint_segment`` samples (the last one shorter):
    the outputs of the whole pass, and its gradients up to the summation order over segments."""
    dec, planes, coords, dirs, points = make(N=300)
    dec.checkpoint_segment = 1 << 30
    out_w, grads_w, _ = train_pass(dec, planes, coords, dirs, points, True)
    dec.checkpoint_segment = segment
    out_s, grads_s, _ = train_pass(dec, planes, coords, dirs, points, True)
    torch.testing.assert_close(out_s, out_w, rtol=1e-6, atol=1e-7)
    assert_grads_close(grads_s, grads_w)


def test_segments_follow_the_batch():
    """With B > 1 a segment holds checkpoint_segment // B samples of every batch element."""
    dec, planes, coords, dirs, points = make(N=120)
    planes2 = torch.cat([planes.detach(), planes.detach().flip(2)]).requires_grad_()
    coords2, dirs2, points2 = (torch.cat([t, t.flip(1)]) for t in (coords, dirs, points))
    calls = []
    original = dec._sample_layers

    def spy(planes, expr, coords, dirs):
        calls.append(tuple(coords.shape))
        return original(planes, expr, coords, dirs)

    dec._sample_layers = spy
    dec.checkpoint_layers, dec.checkpoint_segment = True, 100
    alpha, value = dec(coords2, dirs2, planes2, points2)
    assert calls == [(2, 50, 3), (2, 50, 3), (2, 20, 3)]
    assert alpha.shape == (2, 120) and value.shape == (2, 120, 8)
    del dec._sample_layers
    dec.checkpoint_segment = 1 << 30
    ref_alpha, ref_value = dec(coords2, dirs2, planes2, points2)
    torch.testing.assert_close(alpha, ref_alpha, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(value, ref_value, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("segment", [64, 100, 300])
def test_segments_hold_whole_rays_with_one_direction_per_ray(segment):
    """dirs with one direction per 5 samples: segments are rounded to whole rays (64 -> 60, 100,
    300), and the pass equals the pass given the directions repeated per sample."""
    from gpavatar.ops.field_query import sample_directions

    dec, planes, coords, dirs, points = make(N=300)
    rays = dirs[:, ::5].contiguous()
    dec.checkpoint_segment = 1 << 30
    out_w, grads_w, _ = train_pass(dec, planes, coords, sample_directions(rays, 300), points, True)
    dec.checkpoint_segment = segment
    out_s, grads_s, _ = train_pass(dec, planes, coords, rays, points, True)
    torch.testing.assert_close(out_s, out_w, rtol=1e-6, atol=1e-7)
    assert_grads_close(grads_s, grads_w)


def test_default_segments_by_device():
    """checkpoint_segment None: 2^15 samples on the CPU (reused heap memory), 2^18 elsewhere; a value
    given is used on every device.  A CPU pass of 40000 samples runs as 2 segments (32768 + 7232)."""
    dec, planes, coords, dirs, points = make(N=40000)
    assert dec.checkpoint_segment is None
    assert dec.segment_samples(torch.device("cpu")) == CPU_CHECKPOINT_SEGMENT == 1 << 15
    assert dec.segment_samples(torch.device("cuda")) == CHECKPOINT_SEGMENT == 1 << 18
    dec.checkpoint_segment = 1000
    assert dec.segment_samples(torch.device("cuda")) == dec.segment_samples(torch.device("cpu")) == 1000
    dec.checkpoint_segment = None
    calls = []
    original = dec._sample_layers

    def spy(planes, expr, coords, dirs):
        calls.append(coords.shape[1])
        return original(planes, expr, coords, dirs)

    dec._sample_layers = spy
    dec.checkpoint_layers = True
    alpha, value = dec(coords, dirs, planes, points)
    assert calls == [32768, 40000 - 32768]
    assert alpha.shape == (1, 40000) and value.shape == (1, 40000, 8)
