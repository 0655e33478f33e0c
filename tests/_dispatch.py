"""A dispatch-mode recorder shared by the tests that check which operators a call runs."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class OpCalls(TorchDispatchMode):
    """Records each operator the block dispatches as (name, output shape): ``names`` lists the
    names, ``calls`` the pairs (shape () for outputs that are not one tensor)."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, tuple]] = []

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.calls]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.calls.append((func.overloadpacket.__name__, tuple(out.shape) if isinstance(out, torch.Tensor) else ()))
        return out
