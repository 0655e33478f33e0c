"""gpavatar: GPAvatar (ICLR 2024) head avatars with fused CUDA / Triton kernels.

Ops live in :mod:`gpavatar.ops` (``knn``, ``knn_blend``), model pieces in
:mod:`gpavatar.model`.
"""

__version__ = "0.1.0"

from gpavatar import ops  # noqa: E402,F401

__all__ = ["ops", "__version__"]
