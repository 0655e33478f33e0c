"""Multi tri-plane attention (MTA, SPEC section 3): fuses the tri-planes of V
source images into one.

Every texel of every plane is an independent attention problem over the V
sources: a learned query tri-plane gives the query token, each source gives a
key token (its 32 features), and the output is the softmax-weighted mean of the
raw source features (no value projection):

    q = f_q(query[t, :, y, x]),  k_v = f_k(key[v, t, :, y, x])
    a_v = softmax_v(q . k_v * scale),  out[t, :, y, x] = sum_v a_v key[v, t, :, y, x]

with f = LayerNorm -> Linear -> GELU -> Linear -> GELU -> Linear and
scale = C^-0.5 stored as a non-trainable parameter.  Parameter names follow the
official checkpoint (``attn_module.``): ``scale`` (1,), ``to_q_.{0,1,3,5}.*``,
``to_k_.{0,1,3,5}.*``.

The work is done in chunks of texel rows, channels-last, so memory beyond the
inputs and the output is bounded by ``chunk_bytes`` whatever the plane size.  While
a gradient is recorded each chunk runs under activation checkpointing
(:mod:`gpavatar.model.recompute`): the backward runs its token MLPs again instead
of keeping their ~12 intermediates of (B, 3, h, W, V or 1, C) floats.

    >>> import torch
    >>> from gpavatar.model.mta import MultiTriplaneAttention
    >>> mta = MultiTriplaneAttention(channels=8)
    >>> query = torch.randn(1, 1, 3, 8, 16, 16)
    >>> keys = torch.randn(2, 4, 3, 8, 16, 16)           # B = 2, V = 4 source images
    >>> mta(query, keys).shape
    torch.Size([2, 3, 8, 16, 16])
    >>> mta(query, keys, return_attention=True)[1].shape  # (B, 3, V, H, W)
    torch.Size([2, 3, 4, 16, 16])
"""

from __future__ import annotations

import torch
from torch import nn

from gpavatar.model.recompute import checkpointed


def _token_mlp(channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.LayerNorm(channels),
        nn.Linear(channels, channels),
        nn.GELU(),
        nn.Linear(channels, channels),
        nn.GELU(),
        nn.Linear(channels, channels),
    )


class MultiTriplaneAttention(nn.Module):
    """Per-texel attention over V source tri-planes.

    Args:
        channels: C, features per plane (32)
        chunk_bytes: bound on the float32 temporaries of one chunk of texel rows
    """

    def __init__(self, channels: int = 32, chunk_bytes: int = 256 << 20):
        super().__init__()
        self.channels = channels
        self.chunk_bytes = chunk_bytes
        self.scale = nn.Parameter(torch.tensor([channels**-0.5]), requires_grad=False)
        self.to_q_ = _token_mlp(channels)
        self.to_k_ = _token_mlp(channels)

    def _check(self, query: torch.Tensor, key: torch.Tensor) -> None:
        C = self.channels
        if not isinstance(key, torch.Tensor) or key.dim() != 6 or key.shape[2] != 3 or key.shape[3] != C:
            shape = tuple(key.shape) if isinstance(key, torch.Tensor) else type(key).__name__
            raise ValueError(f"key must have shape (B, V, 3, {C}, H, W), got {shape}")
        B, V, _, _, H, W = key.shape
        if V < 1:
            raise ValueError(f"key must hold at least one source (V >= 1), got V = {V}")
        if not isinstance(query, torch.Tensor) or query.dim() != 6 or query.shape[1:] != (1, 3, C, H, W) \
                or query.shape[0] not in (1, B):
            shape = tuple(query.shape) if isinstance(query, torch.Tensor) else type(query).__name__
            raise ValueError(f"query must have shape (1 or {B}, 1, 3, {C}, {H}, {W}), got {shape}")
        if not key.is_floating_point() or query.dtype != key.dtype:
            raise TypeError(f"query and key must share a floating dtype, got {query.dtype} and {key.dtype}")
        if query.device != key.device:
            raise ValueError(f"query and key must be on the same device, got {query.device} and {key.device}")

    def _attend(self, query: torch.Tensor, key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One chunk of texel rows: query (1|B, 3, C, h, W), key (B, V, 3, C, h, W) -> fused
        (B, 3, h, W, C) and the weights (B, 3, h, W, V)."""
        k = key.permute(0, 2, 4, 5, 1, 3)  # (B, 3, h, W, V, C)
        q = self.to_q_(query.permute(0, 1, 3, 4, 2))  # (1|B, 3, h, W, C)
        logits = torch.einsum("...c,...vc->...v", q, self.to_k_(k)) * self.scale
        weights = logits.softmax(dim=-1)
        return torch.einsum("...v,...vc->...c", weights, k), weights

    def forward(self, query: torch.Tensor, key: torch.Tensor, return_attention: bool = False):
        """query (1 or B, 1, 3, C, H, W), key (B, V, 3, C, H, W) -> (B, 3, C, H, W)
        [, attention (B, 3, V, H, W)]."""
        self._check(query, key)
        B, V, _, C, H, W = key.shape
        out = key.new_empty((B, 3, H, W, C))
        attention = key.new_empty((B, 3, H, W, V)) if return_attention else None
        # Temporaries per texel row: key tokens, projected keys, logits and the query side.
        per_row = 4 * B * 3 * W * (3 * V * C + 2 * C + 2 * V)
        rows = max(1, min(H, self.chunk_bytes // max(1, per_row)))
        for y0 in range(0, H, rows):
            y1 = min(H, y0 + rows)
            # Training keeps only the chunk's inputs; the backward runs the token MLPs again.
            fused, weights = checkpointed(self._attend, query[:, 0, :, :, y0:y1, :], key[..., y0:y1, :])
            out[:, :, y0:y1] = fused
            if attention is not None:
                attention[:, :, y0:y1] = weights
        out = out.permute(0, 1, 4, 2, 3)
        if attention is None:
            return out
        return out, attention.permute(0, 1, 4, 2, 3)
