"""Input checks shared by the public ops: every message names the argument,
the expected shape / dtype / device and what was given."""

from __future__ import annotations

import contextlib
import math
import numbers
import threading
from collections.abc import Iterator, Sequence

import numpy as np
import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# Coordinates are bounded so squared distances, their inverses and sums of
# millions of them stay finite in float32.
MAX_ABS_COORD = 1e6


def check_tensor(t, name: str, shape: str, ndim: int | None = None, last: int | None = None,
                 dtypes: Sequence[torch.dtype] = FLOAT_DTYPES) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {shape}, got {type(t).__name__}")
    if t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({names}), got {str(t.dtype).replace('torch.', '')}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    if last is not None and t.shape[-1] != last:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")


def check_same_device(tensors: dict[str, torch.Tensor]) -> torch.device:
    items = list(tensors.items())
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise ValueError(f"{name} must be on the same device as {first_name} ({first.device}), got {t.device}")
    return first.device


_unchecked = threading.local()


@contextlib.contextmanager
def values_unchecked() -> Iterator[None]:
    """Skip the value checks that read tensors on the host (shape, dtype and device checks stay)
    in this thread: for code that must not sync (a step captured as a CUDA graph)."""
    depth = getattr(_unchecked, "depth", 0)
    _unchecked.depth = depth + 1
    try:
        yield
    finally:
        _unchecked.depth = depth


def checking_values() -> bool:
    """Value checks need a host sync; they are skipped under torch.compile, while the current CUDA
    stream is being captured into a graph, and inside :func:`values_unchecked` (shape checks stay)."""
    if torch.compiler.is_compiling() or getattr(_unchecked, "depth", 0):
        return False
    return not (torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing())


def check_coordinates(t: torch.Tensor, name: str, *more) -> None:
    """Each tensor finite and within +-MAX_ABS_COORD: ``check_coordinates(t, "t")`` or
    ``check_coordinates(a, "a", b, "b", ...)`` (tensors on one device) -- one reduction per tensor
    and one host sync for all of them; the error names the first offending tensor."""
    pairs = [(t, name)] + list(zip(more[0::2], more[1::2]))
    pairs = [(x, n) for x, n in pairs if x.numel()]
    if not pairs or not checking_values():
        return
    worst = torch.stack([x.detach().abs().amax().float() for x, _ in pairs]).tolist()  # the one sync
    for (_, n), value in zip(pairs, worst):
        if not value <= MAX_ABS_COORD:  # NaN compares False
            raise ValueError(f"{n} must hold finite coordinates with |x| <= {MAX_ABS_COORD:g}; "
                             f"got max |x| = {value:g}")


def as_int(value, name: str) -> int:
    """``value`` as a Python int: any integral number (int, numpy integer), never a bool."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    return int(value)


def check_int(value, name: str, low: int, high: int | None = None, high_name: str = "") -> int:
    """``value`` as a Python int (numpy integers accepted, bools refused), within [low, high]."""
    value = as_int(value, name)
    if value < low or (high is not None and value > high):
        bound = f"[{low}, {high_name or high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be in {bound}, got {value}")
    return value


def check_eps(eps) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"eps must be a float, got {type(eps).__name__}")
    eps = float(eps)
    if not (math.isfinite(eps) and 1e-30 <= eps <= 1e30):
        raise ValueError(f"eps must be a finite float in [1e-30, 1e30], got {eps}")
    return eps


def check_weight_sum(weight_sum, normalize: str, B: int, K: int, tensors: dict[str, torch.Tensor]) -> None:
    """The "queries" normalization's per-rank sums: (B, K), finite and > 0 (a host sync, skipped
    when values are not checked); added to ``tensors`` for the device check."""
    if weight_sum is None:
        return
    if normalize != "queries":
        raise ValueError("weight_sum is only used with normalize='queries'")
    check_tensor(weight_sum, "weight_sum", f"({B}, {K})", ndim=2)
    if tuple(weight_sum.shape) != (B, K):
        raise ValueError(f"weight_sum must have shape ({B}, {K}), got {tuple(weight_sum.shape)}")
    tensors["weight_sum"] = weight_sum
    if weight_sum.numel() and checking_values() and not bool(((weight_sum > 0) & weight_sum.isfinite()).all()):
        raise ValueError("weight_sum must hold finite values > 0")
