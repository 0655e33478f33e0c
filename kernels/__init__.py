"""Triton kernels of gpavatar (installed as ``gpavatar.kernels``).

Each module mirrors an op of :mod:`gpavatar.ops` by name and takes validated,
contiguous float32 tensors (``upsample``: channels-last bf16 / fp16 / fp32).  On machines without a GPU they run on CPU tensors
under ``TRITON_INTERPRET=1`` (how the test suite exercises them).
"""
