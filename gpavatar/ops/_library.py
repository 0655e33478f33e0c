"""torch.library plumbing shared by the ops whose forward and backward are separate
custom ops (the C++ op and the Triton op of each): fake (meta) functions for both
and the autograd formula of the forward, calling the matching backward op."""

from __future__ import annotations

from collections.abc import Callable

import torch

from gpavatar import _extension


def register_forward_backward(op: str, forward_fake: Callable, backward_fake: Callable,
                              make_backward: Callable, setup_context: Callable) -> None:
    """Register ``gpavatar::<op>_forward_triton`` / ``_backward_triton`` and, when the
    extension has them, ``gpavatar::<op>_forward`` / ``_backward``.

    ``make_backward(backward_op)`` returns the autograd function of the forward op.
    """
    pairs = [(f"{op}_forward_triton", f"{op}_backward_triton")]
    # hasattr: an extension built before this op existed (a stale in-place build) lacks it.
    if _extension.available() and hasattr(torch.ops.gpavatar, f"{op}_forward"):
        pairs.append((f"{op}_forward", f"{op}_backward"))
    for forward_name, backward_name in pairs:
        torch.library.register_fake(f"gpavatar::{forward_name}")(forward_fake)
        torch.library.register_fake(f"gpavatar::{backward_name}")(backward_fake)
        backward_op = getattr(torch.ops.gpavatar, backward_name)
        torch.library.register_autograd(f"gpavatar::{forward_name}", make_backward(backward_op),
                                        setup_context=setup_context)
