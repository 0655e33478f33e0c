"""Lazy access to the compiled extension ``gpavatar._C``.

Importing gpavatar never compiles anything.  When the extension is missing
(a pure-Python install, or a build without a compiler) one warning is issued
and the Triton / torch paths keep working.  ``GPAVATAR_DISABLE_EXT=1`` hides
the extension on purpose (no warning), which tests use to exercise the
fallbacks.
"""

from __future__ import annotations

import os
import warnings
from types import ModuleType

_module: ModuleType | None = None
_error: str | None = None
_loaded = False


def _load() -> ModuleType | None:
    global _module, _error, _loaded
    if _loaded:
        return _module
    _loaded = True
    if os.environ.get("GPAVATAR_DISABLE_EXT", "0") == "1":
        _error = "disabled by GPAVATAR_DISABLE_EXT=1"
        return None
    try:
        import torch  # noqa: F401  (the extension links against torch's libraries)

        from gpavatar import _C
    except ImportError as exc:  # missing or built against another torch
        _error = f"{type(exc).__name__}: {exc}"
        warnings.warn(
            "gpavatar: the compiled extension gpavatar._C could not be loaded "
            f"({_error}); using the Triton and pure-torch backends only. "
            "Build it with `pip install -e .` (see README).",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    _module = _C
    return _module


def available() -> bool:
    """True when the C++ extension (CPU kernels at least) is loaded."""
    return _load() is not None


def has_cuda() -> bool:
    """True when the extension was built with its CUDA kernels."""
    module = _load()
    return bool(module is not None and getattr(module, "WITH_CUDA", 0))


def load_error() -> str | None:
    """Why the extension is not available (None when it is)."""
    _load()
    return _error
