"""Matrix products with their operands rounded as reduced-precision hardware reads them: a budget for
what a tensor-core kernel may differ from float32 layers (tests/test_field_layers.py)."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# product -> positions of its two matrix operands
_OPERANDS = {"mm": (0, 1), "bmm": (0, 1), "matmul": (0, 1), "addmm": (1, 2), "addmm_": (1, 2),
             "baddbmm": (1, 2), "_addmm_activation": (1, 2)}


def keep_bits(t: torch.Tensor, bits: int, nearest: bool) -> torch.Tensor:
    """float32 t with `bits` mantissa bits: rounded to nearest (ties to even; bf16 conversions,
    cuBLAS's TF32) or truncated (what tensor cores may read of an fp32 register)."""
    if t.dtype != torch.float32:
        return t
    drop = 23 - bits
    i = t.contiguous().view(torch.int32).to(torch.int64)
    if nearest:
        i = i + ((1 << (drop - 1)) - 1) + ((i >> drop) & 1)
    out = ((i >> drop) << drop).to(torch.int32).view(torch.float32).reshape(t.shape)
    return torch.where(torch.isfinite(t), out, t)


class RoundedProducts(TorchDispatchMode):
    """Inside the block, both matrix operands of every product (mm, addmm, bmm, ...) keep `bits`
    mantissa bits (10: TF32, 7: bfloat16); accumulation stays float32."""

    def __init__(self, bits: int, nearest: bool = True):
        super().__init__()
        self.bits, self.nearest = bits, nearest
        self.products = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        where = _OPERANDS.get(func.overloadpacket.__name__)
        if where is not None:
            args = list(args)
            for i in where:
                args[i] = keep_bits(args[i], self.bits, self.nearest)
            self.products += 1
        return func(*args, **(kwargs or {}))
