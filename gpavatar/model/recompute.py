"""Training memory: activations the backward recomputes instead of keeping.

A paper-preset training step keeps about 3.8 GB of activations for its backward
(benchmarks/bench_train.py).  Three kinds of them cost little to make again and are dropped
while a gradient is being recorded:

* :func:`upsampled`: a convolution of a bilinearly up-sampled map (the StyleGAN decoder's
  up-sampling StyleConvs, the U-Net's up ResBlocks) keeps its input, four times the map it was
  up-sampled from.  It keeps the small map instead and up-samples it again in the backward.
* :func:`checkpointed`: ``torch.utils.checkpoint`` of a cheap block with large intermediates
  (the MTA token MLPs: six (V·3·H·W, C) tensors per source set).
* the field decoder samples its tri-plane features again inside its layer checkpoint
  (:mod:`gpavatar.model.decoder`).

The outputs and the gradients are the same numbers (the same arithmetic runs again).
``$GPAVATAR_RECOMPUTE`` = 1 (unset: the default) or 0 (keep every activation, as the official
code does: the benchmarks' baselines and ``+keep`` rows) chooses; the decoder's layer checkpoint
has its own switch (``$GPAVATAR_FIELD_CHECKPOINT``).

The StyleUNets' LeakyReLUs run in place on fresh pre-activations, so autograd keeps their outputs,
which the next layer keeps anyway, instead of a second tensor (the official code does the same).
"""

from __future__ import annotations

import os
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from gpavatar.ops.upsample import upsample2x

RECOMPUTE_ENV = "GPAVATAR_RECOMPUTE"


def recompute_setting() -> bool:
    """``$GPAVATAR_RECOMPUTE``: "1" / unset / "auto" -> True, "0" -> False."""
    value = os.environ.get(RECOMPUTE_ENV, "")
    if value not in ("", "auto", "0", "1"):
        raise ValueError(f"{RECOMPUTE_ENV} must be 0, 1 or auto, got {value!r}")
    return value != "0"


def _recording() -> bool:
    """A gradient is being recorded and recomputation is on."""
    return torch.is_grad_enabled() and recompute_setting()


def _bilinear2x(x: torch.Tensor) -> torch.Tensor:
    """``upsample2x``'s torch path, in the forward and in the backward's recomputation alike (its
    Triton kernel is an inference opt-in and may round differently)."""
    return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)


class _Upsampled:
    """What a saved view of the up-sampled map is packed as: its source and its geometry."""

    __slots__ = ("source", "version", "size", "stride", "offset")

    def __init__(self, source: torch.Tensor, size, stride, offset: int):
        self.source, self.version = source, source._version
        self.size, self.stride, self.offset = size, stride, offset

    def unpack(self) -> torch.Tensor:
        if self.source._version != self.version:
            raise RuntimeError("the input of an up-sampling convolution was modified in place after the forward; "
                               "its backward cannot up-sample it again (set GPAVATAR_RECOMPUTE=0)")
        with torch.no_grad():
            up = _bilinear2x(self.source)
        return up.as_strided(self.size, self.stride, self.offset)


class _Packed:
    """What an enclosing block's pack hook made of a tensor (any object)."""

    __slots__ = ("value",)

    def __init__(self, value: Any):
        self.value = value


def _enclosing_hooks():
    """The (pack, unpack) pair of the innermost enclosing ``saved_tensors_hooks`` block, or None
    (hooks do not nest: a block's hooks replace the enclosing ones, so :func:`upsampled` forwards
    the tensors it keeps to them, e.g. ``torch.autograd.graph.save_on_cpu``)."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return None if top is None else top(False)


def upsampled(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``fn(upsample2x(x))``; while a gradient is recorded (and ``$GPAVATAR_RECOMPUTE`` is not 0)
    the tensors ``fn`` saves that view the up-sampled map are not kept: the backward up-samples
    ``x`` again (the same bits: the up-sampling is deterministic).  ``x`` must not be modified in
    place before the backward (checked)."""
    if not _recording():
        return fn(upsample2x(x))
    up = _bilinear2x(x)
    storage = up.untyped_storage()
    ptr, nbytes = storage.data_ptr(), storage.nbytes()
    source = x.detach()

    outer = _enclosing_hooks()  # the hooks of an enclosing block still see the other tensors

    def pack(t: torch.Tensor) -> Any:
        s = t.untyped_storage()
        if nbytes and s.data_ptr() == ptr and s.nbytes() == nbytes and t.dtype == up.dtype \
                and t.device == up.device:
            return _Upsampled(source, t.size(), t.stride(), t.storage_offset())
        return t if outer is None else _Packed(outer[0](t))

    def unpack(p: Any) -> torch.Tensor:
        if isinstance(p, _Upsampled):
            return p.unpack()
        return p if outer is None else outer[1](p.value)

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        return fn(up)


def checkpointed(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)``, under ``torch.utils.checkpoint`` while a gradient is recorded (and
    ``$GPAVATAR_RECOMPUTE`` is not 0): only ``args`` are kept, the backward runs ``fn`` again."""
    if not _recording():
        return fn(*args)
    return checkpoint(fn, *args, use_reentrant=False)
