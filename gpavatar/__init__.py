"""gpavatar: GPAvatar (ICLR 2024) head avatars with fused CUDA / Triton kernels.

Ops live in :mod:`gpavatar.ops` (``knn``, ``knn_blend``), model pieces in
:mod:`gpavatar.model`, the full model is ``gpavatar.GPAvatar``.
"""

__version__ = "0.1.0"

from gpavatar import ops  # noqa: E402,F401

__all__ = ["ops", "GPAvatar", "GPAvatarConfig", "__version__"]


def __getattr__(name: str):
    if name in ("GPAvatar", "GPAvatarConfig"):
        from gpavatar import model

        return getattr(model, name)
    raise AttributeError(f"module 'gpavatar' has no attribute {name!r}")
