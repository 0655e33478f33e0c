"""MultiTriplaneAttention: official names, the math against a token-wise oracle,
chunking, V = 1, permutation, gradients, bad inputs."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from gpavatar.model.mta import MultiTriplaneAttention


def oracle(mta, query, key):
    """Token-wise attention: every (b, plane, y, x) is one row attending over V sources."""
    B, V, T, C, H, W = key.shape
    keys = key.permute(0, 2, 4, 5, 1, 3).reshape(B * T * H * W, V, C)
    queries = query.expand(B, -1, -1, -1, -1, -1).permute(0, 2, 4, 5, 1, 3).reshape(B * T * H * W, 1, C)
    q = mta.to_q_(queries)
    k = mta.to_k_(keys)
    attn = F.softmax(q @ k.transpose(1, 2) * mta.scale, dim=-1)  # (N, 1, V)
    out = (attn @ keys).reshape(B, T, H, W, C).permute(0, 1, 4, 2, 3)
    return out, attn.reshape(B, T, H, W, V).permute(0, 1, 4, 2, 3)


def make(B, V, C, H, W, query_batch=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(query_batch, 1, 3, C, H, W, generator=g), torch.randn(B, V, 3, C, H, W, generator=g))


def test_state_dict_matches_the_official_names():
    mta = MultiTriplaneAttention()
    shapes = {k: tuple(v.shape) for k, v in mta.state_dict().items()}
    expected = {"scale": (1,)}
    for side in ("to_q_", "to_k_"):
        expected.update({f"{side}.0.weight": (32,), f"{side}.0.bias": (32,)})
        for i in (1, 3, 5):
            expected.update({f"{side}.{i}.weight": (32, 32), f"{side}.{i}.bias": (32,)})
    assert shapes == expected
    assert not mta.scale.requires_grad and mta.scale.item() == pytest.approx(32**-0.5)


@given(B=st.integers(1, 2), V=st.integers(1, 5), C=st.sampled_from([4, 7, 32]), H=st.integers(1, 9),
       W=st.integers(1, 9), shared_query=st.booleans(), seed=st.integers(0, 1000))
def test_matches_token_oracle(B, V, C, H, W, shared_query, seed):
    torch.manual_seed(seed)
    mta = MultiTriplaneAttention(C)
    query, key = make(B, V, C, H, W, 1 if shared_query else B, seed)
    out, attn = mta(query, key, return_attention=True)
    ref_out, ref_attn = oracle(mta, query, key)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(attn, ref_attn, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(attn.sum(dim=2), torch.ones(B, 3, H, W), rtol=0, atol=1e-6)


def test_chunking_does_not_change_the_result():
    torch.manual_seed(1)
    query, key = make(2, 3, 8, 13, 6)
    whole = MultiTriplaneAttention(8)
    tiny = MultiTriplaneAttention(8, chunk_bytes=1)  # one texel row per chunk
    tiny.load_state_dict(whole.state_dict())
    a, b = whole(query, key, return_attention=True), tiny(query, key, return_attention=True)
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)
    torch.testing.assert_close(a[1], b[1], rtol=0, atol=0)


def test_single_source_gives_the_source():
    # softmax over one logit is exactly 1, so the output is the key itself: the math, not a shortcut.
    mta = MultiTriplaneAttention(16)
    query, key = make(2, 1, 16, 5, 7)
    out, attn = mta(query, key, return_attention=True)
    assert torch.equal(attn, torch.ones_like(attn))
    torch.testing.assert_close(out, key[:, 0], rtol=0, atol=0)


def test_permuting_sources_permutes_the_attention():
    torch.manual_seed(2)
    mta = MultiTriplaneAttention(8)
    query, key = make(1, 4, 8, 6, 6)
    perm = torch.tensor([2, 0, 3, 1])
    out, attn = mta(query, key, return_attention=True)
    out_p, attn_p = mta(query, key[:, perm], return_attention=True)
    torch.testing.assert_close(attn_p, attn[:, :, perm], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out_p, out, rtol=1e-5, atol=1e-6)


def test_gradients_reach_query_keys_and_weights_but_not_scale():
    torch.manual_seed(3)
    mta = MultiTriplaneAttention(8)
    query, key = make(2, 3, 8, 4, 4)
    query.requires_grad_()
    key.requires_grad_()
    mta(query, key).square().sum().backward()
    assert query.grad.abs().sum() > 0 and key.grad.abs().sum() > 0
    for name, p in mta.named_parameters():
        if name == "scale":
            assert p.grad is None
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_gradcheck_float64():
    torch.manual_seed(4)
    mta = MultiTriplaneAttention(4).double()
    query, key = make(1, 2, 4, 2, 3)
    query, key = query.double().requires_grad_(), key.double().requires_grad_()
    assert torch.autograd.gradcheck(lambda q, k: mta(q, k, return_attention=True), (query, key))


@pytest.mark.parametrize("query,key,exc,words", [
    (torch.zeros(1, 1, 3, 8, 4, 4), torch.zeros(1, 2, 2, 8, 4, 4), ValueError, ["key", "(B, V, 3, 8, H, W)"]),
    (torch.zeros(1, 1, 3, 8, 4, 4), torch.zeros(1, 2, 3, 6, 4, 4), ValueError, ["key"]),
    (torch.zeros(1, 1, 3, 8, 4, 4), torch.zeros(2, 3, 8, 4, 4), ValueError, ["key"]),
    (torch.zeros(3, 1, 3, 8, 4, 4), torch.zeros(2, 2, 3, 8, 4, 4), ValueError, ["query", "(1 or 2, 1, 3, 8, 4, 4)"]),
    (torch.zeros(1, 1, 3, 8, 5, 4), torch.zeros(1, 2, 3, 8, 4, 4), ValueError, ["query"]),
    (torch.zeros(1, 1, 3, 8, 4, 4), torch.zeros(1, 0, 3, 8, 4, 4), ValueError, ["V >= 1"]),
    (torch.zeros(1, 1, 3, 8, 4, 4, dtype=torch.float64), torch.zeros(1, 2, 3, 8, 4, 4), TypeError, ["dtype"]),
    (torch.zeros(1, 1, 3, 8, 4, 4), torch.zeros(1, 2, 3, 8, 4, 4, device="meta"), ValueError, ["same device"]),
])
def test_bad_inputs(query, key, exc, words):
    with pytest.raises(exc) as info:
        MultiTriplaneAttention(8)(query, key)
    for word in words:
        assert word in str(info.value)
