"""Training memory: activations the backward recomputes instead of keeping.

A paper-preset training step kept about 3.7 GiB of activations for its backward
(benchmarks/bench_train.py).  Those that cost little to make again are dropped while a
gradient is being recorded:

* :func:`recomputed` ``(make, args, fn)``: ``fn(make(*args))`` without keeping ``make``'s
  output (nor its intermediates) for the backward: the tensors ``fn`` saves that view it are
  made again from ``args``.  Used for
  - :func:`upsampled`: a convolution of a bilinearly up-sampled map (the StyleGAN decoder's
    up-sampling StyleConvs, the U-Net's up ResBlocks) kept its input, four times the map it was
    up-sampled from;
  - the modulated convolutions' per-sample weights (B, C_out, C_in, 3, 3): 18 MiB twice for each
    512-channel layer of the encoder's two sources (``gpavatar.model.stylegan``).
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

import weakref
from typing import Any, Callable

import torch
from torch.utils.checkpoint import checkpoint

from gpavatar.ops._backend import env_switch
from gpavatar.ops.upsample import upsample2x, upsample2x_torch

RECOMPUTE_ENV = "GPAVATAR_RECOMPUTE"
# Activations smaller than this are kept: recomputing them saves little and its bookkeeping
# (hooks, a checkpoint frame: tens of microseconds of Python each) would cost a step of small
# tensors (the tiny preset) a fifth of its time.
RECOMPUTE_MIN_BYTES = 1 << 20


def recompute_setting() -> bool:
    """``$GPAVATAR_RECOMPUTE``: "1" / unset / "auto" -> True, "0" -> False."""
    return env_switch(RECOMPUTE_ENV) is not False


def _recording() -> bool:
    """A gradient is being recorded and recomputation is on."""
    return torch.is_grad_enabled() and recompute_setting()


class _Recipe:
    """``make`` and its arguments, kept once per :func:`recomputed` call for every saved view of
    its output.  The arguments go through the enclosing block's hooks like any saved tensor (a
    ``save_on_cpu`` block moves them, a counting block counts them); their versions are checked
    when those hooks give the same tensors back."""

    __slots__ = ("make", "args", "refs", "versions", "unpack_outer", "autocast")

    def __init__(self, make: Callable[..., torch.Tensor], args: tuple, outer, autocast: tuple):
        self.make, self.autocast = make, autocast
        self.refs = tuple(weakref.ref(a) for a in args)
        self.versions = tuple(a._version for a in args)
        self.args = args if outer is None else tuple(outer[0](a) for a in args)
        self.unpack_outer = None if outer is None else outer[1]

    def run(self) -> torch.Tensor:
        args = self.args if self.unpack_outer is None else tuple(self.unpack_outer(a) for a in self.args)
        for a, ref, version in zip(args, self.refs, self.versions):
            if a is ref() and a._version != version:
                raise RuntimeError("an input of a recomputed activation was modified in place after the forward; "
                                   "the backward cannot make the activation again (set GPAVATAR_RECOMPUTE=0)")
        device_type, enabled, dtype = self.autocast  # the forward's autocast state, not the backward's
        with torch.no_grad(), torch.autocast(device_type, dtype=dtype, enabled=enabled):
            return self.make(*args)


class _Recomputed:
    """What a saved view of ``make(*args)`` is packed as: the recipe and the view's geometry."""

    __slots__ = ("recipe", "size", "stride", "offset")

    def __init__(self, recipe: _Recipe, size, stride, offset: int):
        self.recipe, self.size, self.stride, self.offset = recipe, size, stride, offset

    def unpack(self) -> torch.Tensor:
        return self.recipe.run().as_strided(self.size, self.stride, self.offset)


class _Packed:
    """What an enclosing block's pack hook made of a tensor (any object)."""

    __slots__ = ("value",)

    def __init__(self, value: Any):
        self.value = value


def _enclosing_hooks():
    """The (pack, unpack) pair of the innermost enclosing ``saved_tensors_hooks`` block, or None
    (hooks do not nest: a block's hooks replace the enclosing ones, so :func:`recomputed`
    forwards the tensors it keeps to them: :func:`checkpointed` and ``save_on_cpu`` blocks around
    it still see them)."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    if top is None:
        return None
    try:
        return top(False)  # ignore_is_tracing (torch.utils.checkpoint's call)
    except TypeError:  # a torch without that argument
        return top()


def recomputed(make: Callable[..., torch.Tensor], args: tuple, fn: Callable[[torch.Tensor], Any], *,
               make_saves: bool = True) -> Any:
    """``fn(make(*args))``; while a gradient is recorded (and ``$GPAVATAR_RECOMPUTE`` is not 0),
    neither ``make``'s intermediates nor the tensors ``fn`` saves that view ``make``'s output
    are kept: the backward runs ``make(*args)`` again (the same bits: it must be deterministic and
    return a fresh tensor, not a view of an argument).  The gradient still reaches ``args``.  The
    tensor ``args`` must not be modified in place before the backward (checked).  ``make_saves=False``
    declares that ``make``'s own backward keeps nothing (a bilinear resize): it then runs outside a
    checkpoint, which would keep ``args``."""
    if not _recording():
        return fn(make(*args))
    if make_saves and any(a.requires_grad for a in args):
        made = checkpoint(make, *args, use_reentrant=False, preserve_rng_state=False)
    else:
        made = make(*args)
    storage = made.untyped_storage()
    ptr, nbytes, dtype, device = storage.data_ptr(), storage.nbytes(), made.dtype, made.device
    autocast = (device.type, torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type))
    outer = _enclosing_hooks()
    # The recipe is made (its arguments packed) at the first saved view, once for all of them.
    state: dict[str, Any] = {"args": tuple(a.detach() for a in args), "recipe": None}

    def pack(t: torch.Tensor) -> Any:
        s = t.untyped_storage()
        if nbytes and s.data_ptr() == ptr and s.nbytes() == nbytes and t.dtype == dtype and t.device == device:
            if state["recipe"] is None:
                state["recipe"] = _Recipe(make, state.pop("args"), outer, autocast)
            return _Recomputed(state["recipe"], t.size(), t.stride(), t.storage_offset())
        return t if outer is None else _Packed(outer[0](t))

    def unpack(p: Any) -> torch.Tensor:
        if isinstance(p, _Recomputed):
            return p.unpack()
        return p if outer is None else outer[1](p.value)

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        return fn(made)


def worth_recomputing(nbytes: int) -> bool:
    """A gradient is being recorded, recomputation is on and an activation of ``nbytes`` is large
    enough (``RECOMPUTE_MIN_BYTES``) to be made again rather than kept."""
    return nbytes >= RECOMPUTE_MIN_BYTES and _recording()


def upsampled(fn: Callable[[torch.Tensor], Any], x: torch.Tensor) -> Any:
    """``fn(upsample2x(x))`` where the backward up-samples ``x`` again instead of keeping the x2
    map (:func:`recomputed`); outside training, or for a map under ``RECOMPUTE_MIN_BYTES``, the
    plain call."""
    if not worth_recomputing(4 * x.numel() * x.element_size()):
        return fn(upsample2x(x))
    # The torch path in the forward and in the backward's recomputation alike (the Triton kernel is
    # an inference opt-in and may round differently).
    return recomputed(upsample2x_torch, (x,), fn, make_saves=False)


def checkpointed(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)``, under ``torch.utils.checkpoint`` while a gradient is recorded (and
    ``$GPAVATAR_RECOMPUTE`` is not 0): only ``args`` are kept, the backward runs ``fn`` again
    (:func:`deterministic_checkpoint`: ``fn`` draws no random numbers)."""
    if not _recording():
        return fn(*args)
    return deterministic_checkpoint(fn, *args)


def deterministic_checkpoint(fn: Callable[..., Any], *args: Any) -> Any:
    """``torch.utils.checkpoint`` (non-reentrant) of a ``fn`` that draws no random numbers: the RNG
    states are not saved and restored around the recomputation (reading a CUDA generator's state
    is not allowed while a CUDA graph is captured, and costs two state copies per call)."""
    return checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=False)
