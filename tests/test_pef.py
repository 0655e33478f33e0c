"""PointExpressionField: official parameter names, backends agree, gradients reach every parameter."""

import pytest
import torch
from conftest import BACKEND_CASES

from _data import make_points, make_queries
from gpavatar.model import PointExpressionField
from gpavatar.ops.reference import knn_blend_reference

OFFICIAL_KEYS = {
    "points_feature.weight": (5023, 32),
    "point_layers.0.weight": (64, 59),
    "point_layers.0.bias": (64,),
    "point_layers.2.weight": (32, 64),
    "point_layers.2.bias": (32,),
}


def test_state_dict_matches_the_official_names_and_shapes():
    pef = PointExpressionField()
    assert {k: tuple(v.shape) for k, v in pef.state_dict().items()} == OFFICIAL_KEYS
    pef.load_state_dict({k: torch.zeros(s) for k, s in OFFICIAL_KEYS.items()}, strict=True)


def test_forward_is_the_official_computation():
    torch.manual_seed(0)
    pef = PointExpressionField(num_points=50, normalize="queries")
    pts, q = make_points(2, 50), make_queries(2, 40)
    out = pef(q, pts)
    ref, _, _ = knn_blend_reference(q, pts, pef.points_feature.weight, pef.point_layers[0].weight,
                                    pef.point_layers[0].bias, pef.point_layers[2].weight, pef.point_layers[2].bias,
                                    K=8, normalize="queries")
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
@pytest.mark.parametrize("normalize", ["neighbors", "queries"])
def test_backends_agree_forward_and_backward(device, backend, normalize):
    torch.manual_seed(1)
    ref = PointExpressionField(num_points=40, normalize=normalize, backend="torch").to(device)
    fused = PointExpressionField(num_points=40, normalize=normalize, backend=backend).to(device)
    fused.load_state_dict(ref.state_dict())
    pts, q = make_points(1, 40, device=device), make_queries(1, 30, device=device)
    grad = torch.randn(1, 30, 32, device=device)
    ref(q, pts).backward(grad)
    fused(q, pts).backward(grad)
    for (name, a), (_, b) in zip(ref.named_parameters(), fused.named_parameters()):
        assert b.grad is not None and bool(b.grad.abs().sum() > 0), name
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-3, atol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


def test_bad_normalize():
    with pytest.raises(ValueError, match="normalize"):
        PointExpressionField(normalize="batch")
