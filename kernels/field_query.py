"""Fused field query (``field_query``) in Triton: one kernel per field pass, forward only.

Per sample x = coords[b, n] seen along d = dirs[b, n], with its K nearest FLAME
points (dist2, idx from ``knn``, computed before the kernel):

    pef   = W2p (sum_k w_k relu(table[i_k] + W1p_dir gamma(r_k))) + b2p sum_k w_k   (PC,)
            (the blend of kernels/knn_blend.py, whose helpers this kernel calls)
    tri   = (f_0 + f_1 + f_2) / 3                                                   (C,)
            (bilinear, zero padding, align_corners=False: kernels/triplane.py's helpers)
    h1    = relu(W1f [tri, pef] + b1f)          = relu(W1f[:, :C] tri + W1f[:, C:] pef + b1f)
    h2    = relu(W2f h1 + b2f)
    feat  = W3f h2 + b3f                                                            (D,)
    sigma = softplus_beta=10(wd . feat + bd) * [x strictly inside (-1, 1)^3]
    alpha = -expm1(-sigma)
    r1    = relu(W1r [feat, gamma(d / max(|d|, 1e-12))] + b1r)                     (VH,)
    value = W2r r1 + b2r;  value[:3] = sigmoid(value[:3]) * 1.002 - 0.001           (V,)

with gamma the 27-wide harmonic embedding ([sin(r_a 2^j)], [cos(r_a 2^j)], r;
a = x, y, z major, j = 0..3 minor).  Only alpha (B, N) and value (B, N, V) are
written.  Softplus is torch's (x for beta x > 20, else log1p(exp(beta x)) / beta),
and the inside mask multiplies (NaN * 0 stays NaN, as in torch).

Shapes (validated by ``gpavatar.ops.field_query``): coords, dirs (B, N, 3)
float32; planes (B, 3, PLH, PLW, C) channels-last float32 / float16 / bfloat16;
points (B, P, 3); dist2 (B, N, K) float32; idx (B, N, K) int64; weight_sum
(B, K) or None; table (P or B*P, PH) = point_features W1p[:, :Cf]^T + b1p;
w1_dir (PH, 27); w2p (PC, PH), b2p (PC,); W1f (D, C + PC), W2f, W3f (D, D),
wd (1, D), bd (1,); W1r (VH, D + 27), W2r (V, VH); biases (out,).  Matrix
weights are float32, or bfloat16 in the "bf16" mode; biases float32.

Tiles.  A program owns BLOCK_M samples of one batch element (a tile).  Every width is
padded to a power of two >= 16 (tl.dot's minimum): padded weight rows and
columns load as zeros, so padded activation columns stay 0 (or NaN only in a
row whose real columns are already NaN: NaN reaches the same outputs as in the
unfused path).  The concatenations are never built: the first feature layer is
two products (tri-plane columns, PEF columns), the first rgb layer two (feature
columns, direction-embedding columns).  The D-wide activations are held in two
halves, so no weight tile exceeds D/2 x D/2.  The PEF runs first, then the
tri-plane sample, so the wide activations are never live together.  Register
budget (ptxas for sm_90, compiled ahead of time without a GPU): with 64 x 8
warps the tensor-core modes spill nothing beyond sin/cos's slow-path frame.

"ieee" on the CUDA cores: Triton's FMA tl.dot keeps a K-long slice of both
operands per thread (whole 128-wide products spilled 3-50 KB per thread), so
each decoder product stores its input to the tile's scratch rows (BLOCK_M x SW
floats of a (tiles, BLOCK_M, SW) buffer: 256 bytes per sample at the paper
widths, written and read back by the same program, so it lives in L1 / L2;
barriers order the threads' writes and reads) and runs in 16-wide K chunks.
A grid-stride loop with one slab per program would need less memory, but ptxas
then spilled ~1.4 KB per thread (68 bytes with one tile per program).  The PEF's
two small products stay whole, as in kernels/knn_blend.py, whose measured
spill-free setting (BLOCK_M 16, 8 warps) "ieee" uses.

Precision (``PREC``): "ieee" (fp32 products, the float32 contract), "tf32x3",
"tf32" (tensor cores; what ``torch.backends.cuda.matmul.allow_tf32`` asks for),
or "bf16": the decoder's products take bfloat16 activations and weights and
accumulate in fp32, while the PEF's two small products run in tf32 (its 27-wide
embedding product is < 25 % of the flops).  The Triton interpreter computes
every mode in fp32 (bf16: on bf16-rounded operands, as its bf16 dot is not
usable).  The kernel is compiled without FMA contraction (as kernels/triplane.py,
so it finds the same bilinear cells); expm1 / log1p are libdevice's on the GPU
and Kahan's / Goldberg's accurate forms under the interpreter (no libdevice).
"""

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from gpavatar.kernels.knn_blend import _blended_hidden, _harmonic, _load_w1t, _relu
from gpavatar.kernels.triplane import _cell, _corners

__all__ = ["field_forward", "PRECISIONS", "default_blocks", "MAX_WIDTH"]

PRECISIONS = ("ieee", "tf32x3", "tf32", "bf16")
EP = 32  # embedding width padded to a power of two
MAX_WIDTH = 256  # widest layer / channel count the register tiles take


@triton.jit
def _expm1(x, INTERPRET: tl.constexpr):
    """torch.expm1 (accurate near 0)."""
    if INTERPRET:
        u = tl.exp(x)
        um1 = u - 1.0
        # Kahan: (u - 1) * x / log(u) cancels the rounding of u; u == 1 means |x| < 2^-24
        safe = tl.where((u == 1.0) | (um1 == -1.0), 1.0, tl.log(u))  # no 0 / 0 in the unused branch
        res = tl.where(u == 1.0, x, tl.where(um1 == -1.0, -1.0, tl.div_rn(um1 * x, safe)))
        res = tl.where(x > 80.0, u, res)  # u = inf there (log(inf) / inf would be NaN)
    else:
        res = libdevice.expm1(x)
    return res


@triton.jit
def _log1p(x, INTERPRET: tl.constexpr):
    """torch.log1p for x >= 0 (accurate near 0)."""
    if INTERPRET:
        u = 1.0 + x
        # Goldberg: log(u) * x / (u - 1) cancels the rounding of u
        res = tl.where(u == 1.0, x, tl.div_rn(tl.log(u) * x, tl.where(u == 1.0, 1.0, u - 1.0)))
    else:
        res = libdevice.log1p(x)
    return res


@triton.jit
def _weight_t(w_ptr, stride, row0, col0, n_rows, n_cols, KP: tl.constexpr, NP: tl.constexpr):
    """W[row0 : row0 + NP, col0 : col0 + KP]^T of a row-major (n_rows, stride) matrix as a [KP, NP] tile;
    zero where row0 + n >= n_rows or k >= n_cols (n_cols: the valid columns from col0 on)."""
    k = tl.arange(0, KP)[:, None]
    n = tl.arange(0, NP)[None, :]
    return tl.load(w_ptr + (row0 + n) * stride + col0 + k, mask=(row0 + n < n_rows) & (k < n_cols), other=0.0)


@triton.jit
def _bias(b_ptr, row0, n_rows, NP: tl.constexpr):
    n = row0 + tl.arange(0, NP)
    return tl.load(b_ptr + n, mask=n < n_rows, other=0.0)[None, :]


@triton.jit
def _linear(x, w_ptr, stride, row0, col0, n_rows, n_cols, scr, BLOCK_M: tl.constexpr, KP: tl.constexpr,
            NP: tl.constexpr, SW: tl.constexpr, PREC: tl.constexpr, INTERPRET: tl.constexpr):
    """x [BLOCK_M, KP] float32 times W[row0 : row0 + NP, col0 : col0 + KP]^T (_weight_t) -> [BLOCK_M, NP] float32.

    "ieee": the CUDA cores' tl.dot keeps a K-long slice of both operands per thread (a 128 x 128
    weight spilled thousands of bytes per thread on sm_90), so x goes through this program's
    scratch rows (scr, row stride SW; L1 / L2 resident) and the product runs in 16-wide K chunks.
    The barriers order the scratch writes and reads of the program's threads.
    "bf16": bfloat16 operands, fp32 accumulation.  Else tl.dot's tf32 / tf32x3."""
    if PREC == "ieee":
        r = tl.arange(0, BLOCK_M)[:, None]
        n = tl.arange(0, NP)[None, :]
        tl.debug_barrier()  # the previous product's reads of the scratch are done
        tl.store(scr + r * SW + tl.arange(0, KP)[None, :], x)
        tl.debug_barrier()
        out = tl.zeros((BLOCK_M, NP), tl.float32)
        for k0 in range(0, KP, 16):
            k = k0 + tl.arange(0, 16)
            a = tl.load(scr + r * SW + k[None, :])
            w = tl.load(w_ptr + (row0 + n) * stride + col0 + k[:, None],
                        mask=(row0 + n < n_rows) & (k[:, None] < n_cols), other=0.0)
            out += tl.dot(a, w, input_precision="ieee")
    else:
        wt = _weight_t(w_ptr, stride, row0, col0, n_rows, n_cols, KP, NP)
        if PREC == "bf16":
            xb = x.to(tl.bfloat16)
            if INTERPRET:  # the interpreter's bf16 dot is unusable: the same rounded operands in fp32
                out = tl.dot(xb.to(tl.float32), wt.to(tl.float32), input_precision="ieee")
            else:
                out = tl.dot(xb, wt.to(tl.bfloat16), out_dtype=tl.float32)
        else:
            out = tl.dot(x, wt, input_precision=PREC)
    return out


@triton.jit
def _halves(x_a, x_b, w_ptr, stride, row0, col0, n_rows, n_cols, scr, BLOCK_M: tl.constexpr, KH: tl.constexpr,
            NH: tl.constexpr, SW: tl.constexpr, PREC: tl.constexpr, INTERPRET: tl.constexpr):
    """Rows row0 .. row0 + NH of W applied to an input held in two halves: x_a [BLOCK_M, KH] = input
    columns col0 .. col0 + KH, x_b the next KH (n_cols valid in all) -> [BLOCK_M, NH]."""
    y = _linear(x_a, w_ptr, stride, row0, col0, n_rows, n_cols, scr, BLOCK_M, KH, NH, SW, PREC, INTERPRET)
    return y + _linear(x_b, w_ptr, stride, row0, col0 + KH, n_rows, n_cols - KH, scr, BLOCK_M, KH, NH, SW, PREC,
                       INTERPRET)


@triton.jit
def _store_alpha(raw_sigma, c_ptr, alpha_ptr, q_row, row_ok, INTERPRET: tl.constexpr):
    """alpha = -expm1(-softplus_beta=10(raw_sigma) * [x strictly inside (-1, 1)^3]) of the rows q_row
    (torch's softplus: x for beta x > 20; the inside mask multiplies, so NaN stays NaN)."""
    beta_x = raw_sigma * 10.0
    safe_x = tl.where(beta_x > 20.0, 0.0, beta_x)  # the unused branch does not overflow (NaN stays)
    soft = tl.where(beta_x > 20.0, raw_sigma, tl.div_rn(_log1p(tl.exp(safe_x), INTERPRET), 10.0))
    x = tl.load(c_ptr + q_row * 3, mask=row_ok, other=0.0)
    y = tl.load(c_ptr + q_row * 3 + 1, mask=row_ok, other=0.0)
    z = tl.load(c_ptr + q_row * 3 + 2, mask=row_ok, other=0.0)
    inside = (x > -1.0) & (x < 1.0) & (y > -1.0) & (y < 1.0) & (z > -1.0) & (z < 1.0)
    alpha = -_expm1(-(soft * inside.to(tl.float32)), INTERPRET)
    tl.store(alpha_ptr + q_row, alpha, mask=row_ok)


@triton.jit
def _direction_embedding(d_ptr, q_row, row_ok, EP: tl.constexpr):
    """gamma(d / max(|d|, 1e-12)) [BLOCK_M, EP] of the rows' ray directions (F.normalize's clamp;
    NaN stays NaN)."""
    dx = tl.load(d_ptr + q_row * 3, mask=row_ok, other=0.0)
    dy = tl.load(d_ptr + q_row * 3 + 1, mask=row_ok, other=0.0)
    dz = tl.load(d_ptr + q_row * 3 + 2, mask=row_ok, other=0.0)
    norm = tl.sqrt_rn((dx * dx + dy * dy) + dz * dz)
    norm = tl.where(norm < 1e-12, 1e-12, norm)
    return _harmonic(tl.div_rn(dx, norm)[:, None], tl.div_rn(dy, norm)[:, None], tl.div_rn(dz, norm)[:, None], EP)


@triton.jit
def _store_value(raw, value_ptr, q_row, row_ok, V, VP: tl.constexpr):
    """value = raw with its first three channels remapped: sigmoid(raw) * 1.002 - 0.001."""
    vcol = tl.arange(0, VP)[None, :]
    rgb = tl.div_rn(1.0, 1.0 + tl.exp(-raw)) * 1.002 - 0.001
    value = tl.where(vcol < 3, rgb, raw)
    tl.store(value_ptr + q_row[:, None] * V + vcol, value, mask=row_ok[:, None] & (vcol < V))


@triton.jit
def _field_fwd_kernel(
    c_ptr,  # [B, N, 3] float32 coords
    d_ptr,  # [B, N, 3] float32 ray directions
    pl_ptr,  # [B, 3, PLH, PLW, C] channels-last planes
    p_ptr,  # [B, P, 3] float32 points
    dist_ptr,  # [B, N, K] float32
    idx_ptr,  # [B, N, K] int64
    ws_ptr,  # [B, K] float32 (only read when HAS_WS)
    tab_ptr,  # [P or B*P, PH] float32 per-point first-layer half of the PEF
    pw1_ptr,  # [PH, 27] float32 direction half of the PEF's first layer
    pw2_ptr,  # [PC, PH] float32
    pb2_ptr,  # [PC]
    fw1_ptr, fb1_ptr,  # [D, C + PC], [D]
    fw2_ptr, fb2_ptr,  # [D, D], [D]
    fw3_ptr, fb3_ptr,  # [D, D], [D]
    dw_ptr, db_ptr,  # [1, D] float32, [1]
    rw1_ptr, rb1_ptr,  # [VH, D + 27], [VH]
    rw2_ptr, rb2_ptr,  # [V, VH], [V]
    alpha_ptr,  # [B, N] float32 (out)
    value_ptr,  # [B, N, V] float32 (out)
    scr_ptr,  # [tiles, BLOCK_M, SW] float32 scratch ("ieee" only)
    N, P, K, PLH, PLW, C, PH, PC, D, VH, V, eps, n_mblocks,
    PER_BATCH: tl.constexpr, HAS_WS: tl.constexpr, BLOCK_M: tl.constexpr,
    KP: tl.constexpr, CP: tl.constexpr, PHP: tl.constexpr, PCP: tl.constexpr, DH: tl.constexpr,
    VHP: tl.constexpr, VP: tl.constexpr, EP: tl.constexpr, SW: tl.constexpr,
    PREC: tl.constexpr, PEF_PREC: tl.constexpr, INTERPRET: tl.constexpr,
):
    tile = tl.program_id(0)
    scr = scr_ptr + tile.to(tl.int64) * (BLOCK_M * SW)  # this tile's scratch rows ("ieee")
    b = (tile // n_mblocks).to(tl.int64)
    rows = (tile % n_mblocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    q_row = b * N + rows  # [BLOCK_M] int64, flat sample index

    # --- PEF: inverse-distance blend of relu(table + W1p_dir gamma), then W2p (knn_blend's math)
    w1t = _load_w1t(pw1_ptr, PH, EP, PHP)  # [EP, PHP]
    g, total = _blended_hidden(c_ptr, p_ptr, idx_ptr, tab_ptr, dist_ptr, ws_ptr, w1t, b, q_row, row_ok, K, P, PH,
                               eps, PER_BATCH, HAS_WS, BLOCK_M, KP, EP, PHP, PEF_PREC)
    pef = (tl.dot(g, _weight_t(pw2_ptr, PH, 0, 0, PC, PH, PHP, PCP), input_precision=PEF_PREC)
           + _bias(pb2_ptr, 0, PC, PCP) * total[:, None])  # [BLOCK_M, PCP]

    # --- tri-plane mean (kernels/triplane.py's cell and corner rules)
    cols = tl.arange(0, CP)
    cmask = cols < C
    acc = tl.zeros((BLOCK_M, CP), tl.float32)
    for t in tl.static_range(3):
        ok, x0, y0, wx0, wx1, wy0, wy1 = _cell(c_ptr, q_row, row_ok, t, PLH, PLW)
        o_nw, m_nw, o_ne, m_ne, o_sw, m_sw, o_se, m_se = _corners(b * 3 + t, x0, y0, ok, PLH, PLW, C, cols,
                                                                  cmask)
        acc += (tl.load(pl_ptr + o_nw, mask=m_nw, other=0.0).to(tl.float32) * (wx0 * wy0)[:, None]
                + tl.load(pl_ptr + o_ne, mask=m_ne, other=0.0).to(tl.float32) * (wx1 * wy0)[:, None]
                + tl.load(pl_ptr + o_sw, mask=m_sw, other=0.0).to(tl.float32) * (wx0 * wy1)[:, None]
                + tl.load(pl_ptr + o_se, mask=m_se, other=0.0).to(tl.float32) * (wx1 * wy1)[:, None])
    tri = tl.div_rn(acc, 3.0)  # [BLOCK_M, CP]

    # --- feature_layers; every D-wide activation in two halves [BLOCK_M, DH] (smaller weight tiles)
    h_a = _relu(_linear(tri, fw1_ptr, C + PC, 0, 0, D, C, scr, BLOCK_M, CP, DH, SW, PREC, INTERPRET)
                + _linear(pef, fw1_ptr, C + PC, 0, C, D, PC, scr, BLOCK_M, PCP, DH, SW, PREC, INTERPRET)
                + _bias(fb1_ptr, 0, D, DH))
    h_b = _relu(_linear(tri, fw1_ptr, C + PC, DH, 0, D, C, scr, BLOCK_M, CP, DH, SW, PREC, INTERPRET)
                + _linear(pef, fw1_ptr, C + PC, DH, C, D, PC, scr, BLOCK_M, PCP, DH, SW, PREC, INTERPRET)
                + _bias(fb1_ptr, DH, D, DH))
    g_a = _relu(_halves(h_a, h_b, fw2_ptr, D, 0, 0, D, D, scr, BLOCK_M, DH, DH, SW, PREC, INTERPRET)
                + _bias(fb2_ptr, 0, D, DH))
    g_b = _relu(_halves(h_a, h_b, fw2_ptr, D, DH, 0, D, D, scr, BLOCK_M, DH, DH, SW, PREC, INTERPRET)
                + _bias(fb2_ptr, DH, D, DH))
    feat_a = (_halves(g_a, g_b, fw3_ptr, D, 0, 0, D, D, scr, BLOCK_M, DH, DH, SW, PREC, INTERPRET)
              + _bias(fb3_ptr, 0, D, DH))
    feat_b = (_halves(g_a, g_b, fw3_ptr, D, DH, 0, D, D, scr, BLOCK_M, DH, DH, SW, PREC, INTERPRET)
              + _bias(fb3_ptr, DH, D, DH))

    # --- density -> alpha
    raw_sigma = (tl.sum(feat_a * _bias(dw_ptr, 0, D, DH), 1) + tl.sum(feat_b * _bias(dw_ptr, DH, D, DH), 1)
                 + tl.load(db_ptr))  # [BLOCK_M]
    _store_alpha(raw_sigma, c_ptr, alpha_ptr, q_row, row_ok, INTERPRET)

    # --- direction embedding -> rgb_layers
    gdir = _direction_embedding(d_ptr, q_row, row_ok, EP)
    r = (_halves(feat_a, feat_b, rw1_ptr, D + 27, 0, 0, VH, D, scr, BLOCK_M, DH, VHP, SW, PREC, INTERPRET)
         + _linear(gdir, rw1_ptr, D + 27, 0, D, VH, 27, scr, BLOCK_M, EP, VHP, SW, PREC, INTERPRET)
         + _bias(rb1_ptr, 0, VH, VHP))
    r = _relu(r)
    raw = (_linear(r, rw2_ptr, VH, 0, 0, V, VH, scr, BLOCK_M, VHP, VP, SW, PREC, INTERPRET)
           + _bias(rb2_ptr, 0, V, VP))
    _store_value(raw, value_ptr, q_row, row_ok, V, VP)


def _pad(n: int, least: int = 16) -> int:
    return max(least, triton.next_power_of_2(n))


def default_blocks(precision: str, device: torch.device) -> tuple[int, int]:
    """(BLOCK_M, num_warps).  GPU: chosen by ptxas's spill report for sm_90 (compiled ahead of time
    without a GPU; not timed): "tf32" / "bf16" 64 samples, 8 warps (two warpgroups on wgmma; ~250
    bytes spilled per thread, 4 warps or 128 samples ~1.5 KB); "ieee" and "tf32x3" 16 samples, 8 warps
    (92 / 160 bytes; "tf32x3" at 64 spills 1.4 KB).  Interpreter: 64 (it pays per operation, not per
    element).  ``benchmarks/bench_field.py --sweep`` times the alternatives on a GPU."""
    if device.type != "cuda":
        return 64, 4
    return (16, 8) if precision in ("ieee", "tf32x3") else (64, 8)


def field_forward(coords, dirs, planes, points, dist2, idx, weight_sum, table, w1_dir, w2p, b2p, layers, eps,
                  precision="ieee", block_m=None, num_warps=None):
    """alpha (B, N), value (B, N, V) float32 (module docstring); inputs validated and contiguous.

    layers: [W1f, b1f, W2f, b2f, W3f, b3f, wd, bd, W1r, b1r, W2r, b2r] (matrices in the dot dtype).
    """
    B, N, _ = coords.shape
    P, K = points.shape[1], dist2.shape[2]
    PLH, PLW, C = planes.shape[2], planes.shape[3], planes.shape[4]
    PH, PC = table.shape[1], w2p.shape[0]
    D, VH, V = layers[0].shape[0], layers[8].shape[0], layers[10].shape[0]
    dev = coords.device
    alpha = torch.empty((B, N), dtype=torch.float32, device=dev)
    value = torch.empty((B, N, V), dtype=torch.float32, device=dev)
    if B == 0 or N == 0:
        return alpha, value
    default_m, default_w = default_blocks(precision, dev)
    block_m = block_m or default_m
    sizes = dict(KP=max(2, triton.next_power_of_2(K)), CP=_pad(C), PHP=_pad(PH), PCP=_pad(PC), DH=_pad(D, 32) // 2,
                 VHP=_pad(VH), VP=_pad(V), EP=EP)
    n_mblocks = triton.cdiv(N, block_m)
    n_tiles = B * n_mblocks
    sw = max(sizes["CP"], sizes["PCP"], sizes["DH"], sizes["VHP"], EP)  # widest input of a product
    scratch = (torch.empty(n_tiles * block_m * sw, dtype=torch.float32, device=dev) if precision == "ieee"
               else alpha)
    has_ws = weight_sum is not None
    _field_fwd_kernel[(n_tiles,)](
        coords, dirs, planes, points, dist2, idx, weight_sum if has_ws else dist2, table, w1_dir, w2p, b2p,
        *layers, alpha, value, scratch,
        N, P, K, PLH, PLW, C, PH, PC, D, VH, V, float(eps), n_mblocks,
        PER_BATCH=table.shape[0] != P, HAS_WS=has_ws, BLOCK_M=block_m, SW=sw, **sizes,
        PREC=precision, PEF_PREC="tf32" if precision == "bf16" else precision, INTERPRET=dev.type != "cuda",
        num_warps=num_warps or default_w, enable_fp_fusion=False,
    )
    return alpha, value
