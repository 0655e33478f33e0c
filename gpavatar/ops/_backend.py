"""Backend selection shared by every op.

A backend is chosen per call from the ``backend=`` argument, else the
``GPAVATAR_BACKEND`` environment variable, else ``"auto"``:

=========  ===========================================================
``auto``   CUDA tensors: ``cuda`` > ``triton`` > ``torch``;
           CPU tensors: ``cpu`` > ``torch``
``cuda``   the C++ extension's CUDA kernels (CUDA tensors)
``triton`` the Triton kernels (CUDA tensors; CPU tensors only under
           ``TRITON_INTERPRET=1``)
``cpu``    the C++ extension's CPU kernels (CPU tensors)
``torch``  the pure-torch reference (any device, differentiable everywhere)
=========  ===========================================================
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from typing import Iterator

import torch

from gpavatar import _extension

BACKENDS = ("auto", "cuda", "triton", "cpu", "torch")


_HAS_TRITON = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    return _HAS_TRITON


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def env_switch(name: str) -> bool | None:
    """An on / off / automatic switch from the environment: "1" -> True, "0" -> False, unset / ""
    / "auto" -> None (the caller's default); a ValueError naming ``name`` for anything else."""
    value = os.environ.get(name, "")
    if value in ("", "auto"):
        return None
    if value not in ("0", "1"):
        raise ValueError(f"{name} must be 0, 1 or auto, got {value!r}")
    return value == "1"


@contextlib.contextmanager
def environ(**values) -> Iterator[None]:
    """Set environment variables inside the block (None: unset), restored afterwards: the switches
    the C++ and Triton code read at each call."""
    saved = {k: os.environ.get(k) for k in values}
    try:
        for k, v in values.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = str(v)
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def needs_grad(tensors) -> bool:
    """Whether autograd records through any of ``tensors`` (None entries allowed)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def available_backends(device: torch.device | str) -> list[str]:
    """Backends usable for tensors on ``device`` (always includes ``"torch"``)."""
    device = torch.device(device)
    names = []
    if device.type == "cuda" and _extension.has_cuda():
        names.append("cuda")
    if device.type == "cpu" and _extension.available():
        names.append("cpu")
    if triton_available() and (device.type == "cuda" or (device.type == "cpu" and triton_interpreted())):
        names.append("triton")
    names.append("torch")
    return names


def resolve(backend: str | None, device: torch.device, op: str) -> str:
    """The concrete backend for a call of ``op`` on tensors of ``device``."""
    name = backend if backend is not None else os.environ.get("GPAVATAR_BACKEND", "auto")
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {name!r}")
    usable = available_backends(device)
    if name == "auto":
        if device.type == "cuda":
            return next(b for b in ("cuda", "triton", "torch") if b in usable)
        return "cpu" if "cpu" in usable else "torch"
    if name not in usable:
        why = {
            "cuda": "needs CUDA tensors and the extension built with CUDA",
            "cpu": "needs CPU tensors and the compiled extension",
            "triton": "needs triton and CUDA tensors (CPU tensors only with TRITON_INTERPRET=1)",
        }[name]
        extra = "" if _extension.available() else f"; extension: {_extension.load_error()}"
        raise ValueError(f"{op}: backend {name!r} {why}; tensors are on {device}{extra}")
    return name
