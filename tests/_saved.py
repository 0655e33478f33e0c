"""Counting what autograd keeps for a backward (the training-memory tests)."""

import torch


def saved_bytes(fn):
    """``fn()``'s result and the bytes of the tensors autograd saves while it runs (each save
    counted: views of one storage count once per save)."""
    sizes = []

    def pack(t):
        sizes.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn()
    return result, sum(sizes)
