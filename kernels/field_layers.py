"""The decoder's layers of one field pass (``ops.field_layers``) in one Triton kernel, forward only.

Per sample row r, with its tri-plane feature tri (C), PEF feature pef (PC), position x and ray
direction d (both from the unfused ops: ``triplane_sample``, ``knn_blend``)::

    h1    = relu(W1[:, :C] tri + W1[:, C:] pef + b1)                      (D)   feature_layers.0
    h2    = relu(W2 h1 + b2)                                              (D)   feature_layers.2
    out   = Wo h2 + bo                                                    (1 + VH)
            (Wo = [wd; W1r_feat] W3, bo = [bd; b1r] + [wd; W1r_feat] b3: feature_layers.4 folded
            into density_layers.0 and the feature columns of rgb_layers.0, as ops.field_layers does)
    sigma = softplus_beta=10(out[0]) * [x strictly inside (-1, 1)^3];  alpha = -expm1(-sigma)
    r1    = relu(out[1:] + W1r_dir gamma(d / max(|d|, 1e-12)))            (VH)
    value = W2r r1 + b2r;  value[:3] = sigmoid(value[:3]) * 1.002 - 0.001  (V)

Only alpha (R) and value (R, V) are written: the (R, D) activations, the [tri, pef]
concatenation and the (R, 27) direction embedding never reach memory.  The unfused layers
write and read each of them (at the paper's 2^19 samples per pass, 256 MiB per 128-wide
activation) and launch about twenty kernels per pass.

Tiles: a program owns BLOCK_M rows.  Every width is padded to a power of two >= 16 (tl.dot's
minimum) with masked loads (padded weight rows / columns are 0, so padded activation columns
stay 0); the D-wide activations are held in two halves, as in kernels/field_query.py, whose
product helpers (``_linear``, ``_halves``: "ieee" through a scratch buffer, "tf32x3", "tf32",
"bf16" on tensor cores), harmonic embedding and accurate expm1 / log1p under the interpreter
this kernel shares.  ReLU keeps NaN (``_relu``), so a NaN reaches the outputs it reaches in
the unfused layers.  Compiled without FMA contraction, like the other kernels.

Shapes (validated by ``gpavatar.ops.field_query.field_layers``): tri (R, C), pef (R, PC) float32 /
bfloat16 / float16 (read as stored, computed in fp32), coords and dirs (R, 3) float32; weights
float32 contiguous: W1 (D, C + PC), W2 (D, D), Wo (1 + VH, D), W1r (VH, D + 27) (only its last 27
columns are read), W2r (V, VH); biases (out,).
"""

import torch
import triton
import triton.language as tl

from gpavatar.kernels.field_query import (EP, PRECISIONS, _bias, _direction_embedding, _halves, _linear, _pad,
                                          _store_alpha, _store_value)
from gpavatar.kernels.knn_blend import _relu

__all__ = ["field_layers_forward", "PRECISIONS", "default_blocks", "MAX_WIDTH"]

MAX_WIDTH = 256  # widest layer / feature the register tiles take


@triton.jit
def _layers_fwd_kernel(
    tri_ptr,  # [R, C] tri-plane features
    pef_ptr,  # [R, PC] PEF features
    c_ptr,  # [R, 3] float32 sample positions
    d_ptr,  # [R, 3] float32 ray directions
    w1_ptr, b1_ptr,  # [D, C + PC], [D]
    w2_ptr, b2_ptr,  # [D, D], [D]
    wo_ptr, bo_ptr,  # [1 + VH, D], [1 + VH]: the folded heads (density row first)
    rw1_ptr,  # [VH, D + 27]: rgb_layers.0 (its direction columns D .. D + 27 are read)
    rw2_ptr, rb2_ptr,  # [V, VH], [V]
    alpha_ptr,  # [R] float32 (out)
    value_ptr,  # [R, V] float32 (out)
    scr_ptr,  # [programs, BLOCK_M, SW] float32 scratch ("ieee" only)
    R, C, PC, D, VH, V,
    BLOCK_M: tl.constexpr, CP: tl.constexpr, PCP: tl.constexpr, DH: tl.constexpr, VHP: tl.constexpr,
    VP: tl.constexpr, EP: tl.constexpr, SW: tl.constexpr, PREC: tl.constexpr, INTERPRET: tl.constexpr,
):
    pid = tl.program_id(0)
    scr = scr_ptr + pid.to(tl.int64) * (BLOCK_M * SW)
    rows = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < R

    # --- feature_layers.0 on [tri, pef] (two products: the concatenation is never built)
    ccol = tl.arange(0, CP)[None, :]
    tri = tl.load(tri_ptr + rows[:, None] * C + ccol, mask=row_ok[:, None] & (ccol < C), other=0.0).to(tl.float32)
    pcol = tl.arange(0, PCP)[None, :]
    pef = tl.load(pef_ptr + rows[:, None] * PC + pcol, mask=row_ok[:, None] & (pcol < PC),
                  other=0.0).to(tl.float32)
    h_a = _relu(_linear(tri, w1_ptr, C + PC, 0, 0, D, C, scr, BLOCK_M, CP, DH, SW, PREC, INTERPRET)
                + _linear(pef, w1_ptr, C + PC, 0, C, D, PC, scr, BLOCK_M, PCP, DH, SW, PREC, INTERPRET)
                + _bias(b1_ptr, 0, D, DH))
    h_b = _relu(_linear(tri, w1_ptr, C + PC, DH, 0, D, C, scr, BLOCK_M, CP, DH, SW, PREC, INTERPRET)
                + _linear(pef, w1_ptr, C + PC, DH, C, D, PC, scr, BLOCK_M, PCP, DH, SW, PREC, INTERPRET)
                + _bias(b1_ptr, DH, D, DH))
    # --- feature_layers.2
    g_a = _relu(_halves(h_a, h_b, w2_ptr, D, 0, 0, D, D, scr, BLOCK_M, DH, DH, SW, PREC, INTERPRET)
                + _bias(b2_ptr, 0, D, DH))
    g_b = _relu(_halves(h_a, h_b, w2_ptr, D, DH, 0, D, D, scr, BLOCK_M, DH, DH, SW, PREC, INTERPRET)
                + _bias(b2_ptr, DH, D, DH))

    # --- density (row 0 of the folded heads) -> alpha
    raw_sigma = (tl.sum(g_a * _bias(wo_ptr, 0, D, DH), 1) + tl.sum(g_b * _bias(wo_ptr, DH, D, DH), 1)
                 + tl.load(bo_ptr))  # [BLOCK_M]
    _store_alpha(raw_sigma, c_ptr, alpha_ptr, rows, row_ok, INTERPRET)

    # --- rgb_layers: the folded feature columns (rows 1 .. VH of the heads) + the direction embedding
    gdir = _direction_embedding(d_ptr, rows, row_ok, EP)
    hr = (_halves(g_a, g_b, wo_ptr, D, 1, 0, 1 + VH, D, scr, BLOCK_M, DH, VHP, SW, PREC, INTERPRET)
          + _linear(gdir, rw1_ptr, D + 27, 0, D, VH, 27, scr, BLOCK_M, EP, VHP, SW, PREC, INTERPRET)
          + _bias(bo_ptr, 1, 1 + VH, VHP))
    hr = _relu(hr)
    raw = (_linear(hr, rw2_ptr, VH, 0, 0, V, VH, scr, BLOCK_M, VHP, VP, SW, PREC, INTERPRET)
           + _bias(rb2_ptr, 0, V, VP))
    _store_value(raw, value_ptr, rows, row_ok, V, VP)


def default_blocks(precision: str, device: torch.device) -> tuple[int, int]:
    """(BLOCK_M, num_warps).  GPU: from ptxas's spill report for sm_90 at the paper widths (compiled
    ahead of time without a GPU, tests/test_field_layers.py; not yet timed): "tf32" and "bf16" 128 rows
    x 8 warps (wgmma, 0 bytes spilled; 64 x 8: 24 / 0, 128 x 4: 1.6 / 1.0 KB), "ieee" 32 x 8 (0; 64 x 8:
    8), "tf32x3" 64 x 8 (732; it spills at every tile).  Interpreter: 64.  ``benchmarks/bench_field.py
    --sweep`` times the alternatives on a GPU."""
    if device.type != "cuda":
        return 64, 4
    return {"ieee": (32, 8), "tf32x3": (64, 8)}.get(precision, (128, 8))


def field_layers_forward(tri, pef, coords, dirs, w1, b1, w2, b2, wo, bo, rw1, rw2, rb2, precision="ieee",
                         block_m=None, num_warps=None):
    """alpha (R,), value (R, V) float32 (module docstring); inputs validated, 2-D and contiguous."""
    R, C = tri.shape
    PC, D, VH, V = pef.shape[1], w1.shape[0], rw1.shape[0], rw2.shape[0]
    dev = tri.device
    alpha = torch.empty((R,), dtype=torch.float32, device=dev)
    value = torch.empty((R, V), dtype=torch.float32, device=dev)
    if R == 0:
        return alpha, value
    default_m, default_w = default_blocks(precision, dev)
    block_m = block_m or default_m
    sizes = dict(CP=_pad(C), PCP=_pad(PC), DH=_pad(D, 32) // 2, VHP=_pad(VH), VP=_pad(V), EP=EP)
    programs = triton.cdiv(R, block_m)
    sw = max(sizes["CP"], sizes["PCP"], sizes["DH"], sizes["VHP"], EP)  # widest input of a product
    scratch = (torch.empty(programs * block_m * sw, dtype=torch.float32, device=dev) if precision == "ieee"
               else alpha)
    _layers_fwd_kernel[(programs,)](
        tri, pef, coords, dirs, w1, b1, w2, b2, wo, bo, rw1, rw2, rb2, alpha, value, scratch,
        R, C, PC, D, VH, V, BLOCK_M=block_m, SW=sw, **sizes, PREC=precision, INTERPRET=dev.type != "cuda",
        num_warps=num_warps or default_w, enable_fp_fusion=False,
    )
    return alpha, value
