"""Fused point-expression-field blend (``knn_blend``) in Triton: forward and backward.

For query x = queries[b, m] with neighbours i_k = idx[b, m, k] at squared
distances d_k = dist2[b, m, k], k < K <= 32, p_k = points[b, i_k]:
    r_k   = (x - p_k) / max(|x - p_k|, 1e-12)                    (3,)
    gam_k = [sin(r_d f_j)]_(d*4+j) ++ [cos(r_d f_j)]_(12+d*4+j) ++ r_k   (27,)
            f_j = 1, 2, 4, 8 ; d = x, y, z
    h_k   = table[row_k] + w1_dir @ gam_k                         (H,)
            row_k = i_k if table has P rows, else b*P + i_k
    u_k   = 1 / (d_k + eps)
    w_k   = u_k / sum_k' u_k'   (weight_sum None)  |  u_k / weight_sum[b, k]
    g     = sum_k w_k relu(h_k)                                   (H,)
    out   = w2 @ g + b2 * sum_k w_k                               (C,)
A neighbour whose index is outside [0, P) contributes nothing to g (its
weight still counts in sum_k w_k).

Backward of L = sum(out * grad_out), with v = w2^T grad_out[b, m] (H,) and
delta_k = w_k v [h_k > 0] (torch's relu rules: relu(NaN) = NaN and the
gradient mask is "not h <= 0", so NaN propagates exactly as in the reference):
    grad_table[row_k] += delta_k          grad_w1_dir += delta_k gam_k^T
    grad_w2 += grad_out[b, m] g^T         grad_b2 += grad_out[b, m] sum_k w_k

Shapes: queries (B, M, 3), points (B, P, 3), dist2 (B, M, K), idx (B, M, K)
int64, table (P or B*P, H), w1_dir (H, 27), w2 (C, H), b2 (C,), weight_sum
(B, K) or None, out / grad_out (B, M, C).

Kernels: a program handles BLOCK_M queries.  Per neighbour k it builds the
embedding as a [BLOCK_M, 32] tile (columns >= 27 are zero) and gets h with
one fp32 tl.dot against w1_dir^T padded to [32, HP] (HP, CP: powers of two
>= H, C and >= 16).  The backward kernel is fully fused: it scatters delta_k
into grad_table with atomics and accumulates grad_w1_dir / grad_w2 / grad_b2
in registers over the tiles it visits (grid-stride loop), storing them once per
program; the caller sums the programs' shares in order (deterministic).  The
matrix products run in fp32 ("ieee") unless GPAVATAR_TRITON_DOT_PRECISION asks
for the tensor cores (dot_precision()).
"""

import os

import torch
import triton
import triton.language as tl

__all__ = ["knn_blend_forward", "knn_blend_backward", "knn_blend_forward_stacked", "STACKED_PRECISIONS"]

EMBED = 27  # embedding width
EP = 32  # embedding width padded to a power of two
BLOCK_M = 16  # queries per program (the minimum tl.dot accepts)
NUM_WARPS = 8  # with BLOCK_M = 16 keeps H = 64, C = 32 free of register spills on sm_90


@triton.jit
def _relu(x):
    """torch.relu: NaN stays NaN (tl.maximum's default may drop it)."""
    return tl.where(x < 0.0, 0.0, x)


@triton.jit
def _clamp_min(x, floor):
    """torch.clamp_min: NaN stays NaN."""
    return tl.where(x < floor, floor, x)


@triton.jit
def _harmonic(rx, ry, rz, EP: tl.constexpr):
    """gamma(r) [ROWS, EP] of unit vectors r ([ROWS, 1] each): [sin(r_a 2^j)] (columns a * 4 + j),
    [cos(r_a 2^j)] (12 + a * 4 + j), r (24 .. 26); columns >= 27 are 0."""
    c = tl.arange(0, EP)[None, :]
    cc = c % 12
    axis = cc // 4
    freq = (1 << (cc % 4)).to(tl.float32)
    a = tl.where(axis == 0, rx, tl.where(axis == 1, ry, rz)) * freq
    trig = tl.where(c < 12, tl.sin(a), tl.cos(a))
    lin = tl.where(c == 24, rx, tl.where(c == 25, ry, rz))
    return tl.where(c < 24, trig, tl.where(c < 27, lin, 0.0))


@triton.jit
def _weights(
    dist_ptr,  # [B, M, K] float32
    ws_ptr,  # [B, K] float32 (only read when HAS_WS)
    b, q_row, row_ok, K, eps,
    HAS_WS: tl.constexpr, KP: tl.constexpr,
):
    """w [BLOCK_M, KP] (zero outside k < K and valid rows) and total [BLOCK_M]."""
    kcol = tl.arange(0, KP)
    kmask = row_ok[:, None] & (kcol[None, :] < K)
    d = tl.load(dist_ptr + q_row[:, None] * K + kcol[None, :], mask=kmask, other=0.0)
    u = tl.where(kmask, tl.div_rn(1.0, d + eps), 0.0)
    if HAS_WS:
        ws = tl.load(ws_ptr + b * K + kcol, mask=kcol < K, other=1.0)  # [KP]
        w = tl.where(kmask, tl.div_rn(u, ws[None, :]), 0.0)
    else:
        s = tl.sum(u, 1)
        s = tl.where(row_ok, s, 1.0)
        w = tl.where(kmask, tl.div_rn(u, s[:, None]), 0.0)
    return w, tl.sum(w, 1)


@triton.jit
def _neighbour(
    q_ptr,  # [B, M, 3] float32
    p_ptr,  # [B, P, 3] float32
    idx_ptr,  # [B, M, K] int64
    tab_ptr,  # [P or B*P, H] float32
    w1t,  # [EP, HP] w1_dir^T, zero padded
    b, q_row, row_ok, k, K, P, H,
    PER_BATCH: tl.constexpr, EP: tl.constexpr, HP: tl.constexpr, DOT: tl.constexpr,
):
    """For neighbour k of each query: valid [BLOCK_M], table row [BLOCK_M] int64,
    gamma [BLOCK_M, EP] and pre-activation h [BLOCK_M, HP] (zero when invalid)."""
    nb = tl.load(idx_ptr + q_row * K + k, mask=row_ok, other=-1)  # [BLOCK_M] int64
    valid = row_ok & (nb >= 0) & (nb < P)
    nb = tl.where(valid, nb, 0)
    p_off = (b * P + nb) * 3
    q_off = q_row * 3
    dx = tl.load(q_ptr + q_off, mask=row_ok, other=0.0) - tl.load(p_ptr + p_off, mask=valid, other=0.0)
    dy = tl.load(q_ptr + q_off + 1, mask=row_ok, other=0.0) - tl.load(p_ptr + p_off + 1, mask=valid, other=0.0)
    dz = tl.load(q_ptr + q_off + 2, mask=row_ok, other=0.0) - tl.load(p_ptr + p_off + 2, mask=valid, other=0.0)
    den = _clamp_min(tl.sqrt_rn((dx * dx + dy * dy) + dz * dz), 1e-12)
    rx = tl.div_rn(dx, den)[:, None]  # [BLOCK_M, 1]
    ry = tl.div_rn(dy, den)[:, None]
    rz = tl.div_rn(dz, den)[:, None]

    gamma = tl.where(valid[:, None], _harmonic(rx, ry, rz, EP), 0.0)

    if PER_BATCH:
        trow = b * P + nb
    else:
        trow = nb
    hcol = tl.arange(0, HP)
    tmask = valid[:, None] & (hcol[None, :] < H)
    tab = tl.load(tab_ptr + trow[:, None] * H + hcol[None, :], mask=tmask, other=0.0)
    h = tab + tl.dot(gamma, w1t, input_precision=DOT)
    return valid, trow, gamma, h


@triton.jit
def _blended_hidden(
    q_ptr, p_ptr, idx_ptr, tab_ptr, dist_ptr, ws_ptr, w1t, b, q_row, row_ok, K, P, H, eps,
    PER_BATCH: tl.constexpr, HAS_WS: tl.constexpr, BLOCK_M: tl.constexpr, KP: tl.constexpr,
    EP: tl.constexpr, HP: tl.constexpr, DOT: tl.constexpr,
):
    """g = sum_k w_k relu(h_k) of a tile [BLOCK_M, HP] (a neighbour outside [0, P) adds
    nothing) and total = sum_k w_k [BLOCK_M]: the blend before its output layer."""
    kcol = tl.arange(0, KP)
    w, total = _weights(dist_ptr, ws_ptr, b, q_row, row_ok, K, eps, HAS_WS, KP)
    g = tl.zeros((BLOCK_M, HP), tl.float32)
    for k in range(0, K):
        wk = tl.sum(tl.where(kcol[None, :] == k, w, 0.0), 1)  # [BLOCK_M]
        valid, trow, gamma, h = _neighbour(
            q_ptr, p_ptr, idx_ptr, tab_ptr, w1t, b, q_row, row_ok, k, K, P, H,
            PER_BATCH, EP, HP, DOT)
        g += tl.where(valid[:, None], wk[:, None] * _relu(h), 0.0)
    return g, total


@triton.jit
def _load_w1t(w1_ptr, H, EP: tl.constexpr, HP: tl.constexpr):
    """w1_dir (H, 27) transposed and zero padded to [EP, HP]."""
    e = tl.arange(0, EP)[:, None]
    hc = tl.arange(0, HP)[None, :]
    return tl.load(w1_ptr + hc * 27 + e, mask=(e < 27) & (hc < H), other=0.0)


@triton.jit
def _output_layer(w2_ptr, b2_ptr, H, C, HP: tl.constexpr, CP: tl.constexpr):
    """w2 (C, H) transposed and zero padded to [HP, CP], and b2 padded to [CP]."""
    hcol = tl.arange(0, HP)
    ccol = tl.arange(0, CP)
    w2t = tl.load(w2_ptr + ccol[None, :] * H + hcol[:, None], mask=(hcol[:, None] < H) & (ccol[None, :] < C),
                  other=0.0)
    return w2t, tl.load(b2_ptr + ccol, mask=ccol < C, other=0.0)


@triton.jit
def _store_out(out_ptr, out, q_row, row_ok, C, CP: tl.constexpr):
    """The rows q_row of out (B * M, C) from a [ROWS, CP] tile."""
    ccol = tl.arange(0, CP)
    tl.store(out_ptr + q_row[:, None] * C + ccol[None, :], out, mask=row_ok[:, None] & (ccol[None, :] < C))


@triton.jit
def _blend_fwd_kernel(
    q_ptr,  # [B, M, 3]
    p_ptr,  # [B, P, 3]
    dist_ptr,  # [B, M, K]
    idx_ptr,  # [B, M, K] int64
    tab_ptr,  # [P or B*P, H]
    w1_ptr,  # [H, 27]
    w2_ptr,  # [C, H]
    b2_ptr,  # [C]
    ws_ptr,  # [B, K] (unused unless HAS_WS)
    out_ptr,  # [B, M, C] (out)
    M, P, K, H, C, eps,
    PER_BATCH: tl.constexpr, HAS_WS: tl.constexpr,
    BLOCK_M: tl.constexpr, KP: tl.constexpr, HP: tl.constexpr, CP: tl.constexpr,
    EP: tl.constexpr, DOT: tl.constexpr,
):
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    q_row = b * M + rows  # [BLOCK_M] int64, flat query index

    w1t = _load_w1t(w1_ptr, H, EP, HP)  # [EP, HP]
    g, total = _blended_hidden(q_ptr, p_ptr, idx_ptr, tab_ptr, dist_ptr, ws_ptr, w1t, b, q_row, row_ok, K, P, H,
                               eps, PER_BATCH, HAS_WS, BLOCK_M, KP, EP, HP, DOT)

    w2t, b2 = _output_layer(w2_ptr, b2_ptr, H, C, HP, CP)
    _store_out(out_ptr, tl.dot(g, w2t, input_precision=DOT) + b2[None, :] * total[:, None], q_row, row_ok, C, CP)


@triton.jit
def _blend_bwd_kernel(
    go_ptr,  # [B, M, C] upstream gradient
    q_ptr,  # [B, M, 3]
    p_ptr,  # [B, P, 3]
    dist_ptr,  # [B, M, K]
    idx_ptr,  # [B, M, K] int64
    tab_ptr,  # [P or B*P, H]
    w1_ptr,  # [H, 27]
    w2_ptr,  # [C, H]
    ws_ptr,  # [B, K] (unused unless HAS_WS)
    gtab_ptr,  # [P or B*P, H] (out, zero initialised)
    gw1_ptr,  # [programs, H, 27] (out: this program's share)
    gw2_ptr,  # [programs, C, H] (out: this program's share)
    gb2_ptr,  # [programs, C] (out: this program's share)
    M, P, K, H, C, eps, n_mblocks, n_tiles,
    PER_BATCH: tl.constexpr, HAS_WS: tl.constexpr,
    BLOCK_M: tl.constexpr, KP: tl.constexpr, HP: tl.constexpr, CP: tl.constexpr,
    EP: tl.constexpr, DOT: tl.constexpr,
):
    hcol = tl.arange(0, HP)
    ccol = tl.arange(0, CP)
    kcol = tl.arange(0, KP)
    ecol = tl.arange(0, EP)
    w1t = _load_w1t(w1_ptr, H, EP, HP)  # [EP, HP]
    w2 = tl.load(w2_ptr + ccol[:, None] * H + hcol[None, :],
                 mask=(ccol[:, None] < C) & (hcol[None, :] < H), other=0.0)  # [CP, HP]
    acc_w1 = tl.zeros((HP, EP), tl.float32)
    acc_w2 = tl.zeros((CP, HP), tl.float32)
    acc_b2 = tl.zeros((CP,), tl.float32)

    # Grid-stride loop over (batch element, block of queries) tiles.
    for t in range(tl.program_id(0), n_tiles, tl.num_programs(0)):
        b = (t // n_mblocks).to(tl.int64)
        rows = (t % n_mblocks) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        q_row = b * M + rows  # [BLOCK_M] int64
        go = tl.load(go_ptr + q_row[:, None] * C + ccol[None, :],
                     mask=row_ok[:, None] & (ccol[None, :] < C), other=0.0)  # [BLOCK_M, CP]
        v = tl.dot(go, w2, input_precision=DOT)  # [BLOCK_M, HP]
        w, total = _weights(dist_ptr, ws_ptr, b, q_row, row_ok, K, eps, HAS_WS, KP)
        g = tl.zeros((BLOCK_M, HP), tl.float32)
        for k in range(0, K):
            wk = tl.sum(tl.where(kcol[None, :] == k, w, 0.0), 1)[:, None]  # [BLOCK_M, 1]
            valid, trow, gamma, h = _neighbour(
                q_ptr, p_ptr, idx_ptr, tab_ptr, w1t, b, q_row, row_ok, k, K, P, H,
                PER_BATCH, EP, HP, DOT)
            g += tl.where(valid[:, None], wk * _relu(h), 0.0)
            # torch's relu backward: the gradient passes unless h <= 0 (so also at NaN)
            delta = tl.where(valid[:, None], tl.where(h <= 0.0, 0.0, wk * v), 0.0)  # [BLOCK_M, HP]
            tmask = valid[:, None] & (hcol[None, :] < H)
            tl.atomic_add(gtab_ptr + trow[:, None] * H + hcol[None, :], delta, mask=tmask)
            acc_w1 += tl.dot(tl.trans(delta), gamma, input_precision=DOT)  # [HP, EP]
        acc_w2 += tl.dot(tl.trans(go), g, input_precision=DOT)  # [CP, HP]
        acc_b2 += tl.sum(go * total[:, None], 0)

    # This program's shares, summed by the caller in program order (deterministic; no atomics).
    pid = tl.program_id(0).to(tl.int64)
    w1_mask = (hcol[:, None] < H) & (ecol[None, :] < 27)
    tl.store(gw1_ptr + pid * H * 27 + hcol[:, None] * 27 + ecol[None, :], acc_w1, mask=w1_mask)
    w2_mask = (ccol[:, None] < C) & (hcol[None, :] < H)
    tl.store(gw2_ptr + pid * C * H + ccol[:, None] * H + hcol[None, :], acc_w2, mask=w2_mask)
    tl.store(gb2_ptr + pid * C + ccol, acc_b2, mask=ccol < C)


@triton.jit
def _stacked_dot(x, wt, PREC: tl.constexpr, INTERPRET: tl.constexpr):
    """x [R, KP] times wt [KP, NP] in fp32 ("ieee" / "tf32") or on bf16 operands ("bf16": the
    interpreter rounds them to bf16 and multiplies in fp32, its bf16 dot being unusable)."""
    if PREC == "bf16":
        if INTERPRET:
            out = tl.dot(x.to(tl.bfloat16).to(tl.float32), wt.to(tl.bfloat16).to(tl.float32),
                         input_precision="ieee")
        else:
            out = tl.dot(x.to(tl.bfloat16), wt.to(tl.bfloat16), out_dtype=tl.float32)
    else:
        out = tl.dot(x, wt, input_precision=PREC)
    return out


@triton.jit
def _blend_stacked_fwd_kernel(
    q_ptr,  # [B, M, 3]
    p_ptr,  # [B, P, 3]
    dist_ptr,  # [B, M, K]
    idx_ptr,  # [B, M, K] int64
    tab_ptr,  # [P or B*P, H]
    w1_ptr,  # [H, 27]
    w2_ptr,  # [C, H]
    b2_ptr,  # [C]
    ws_ptr,  # [B, K] (unused unless HAS_WS)
    out_ptr,  # [B, M, C] (out)
    M, P, K, H, C, eps,
    PER_BATCH: tl.constexpr, HAS_WS: tl.constexpr,
    BQ: tl.constexpr, KP: tl.constexpr, HP: tl.constexpr, CP: tl.constexpr, EP: tl.constexpr,
    PREC: tl.constexpr, INTERPRET: tl.constexpr,
):
    """The forward with every (query, neighbour) pair of a tile stacked as one row: BQ queries x KP
    slots = R rows, one [R, EP] x [EP, HP] product for the direction halves of the hidden units
    (tensor cores in "tf32" / "bf16"), the gathered table rows, the weighted ReLU summed over each
    query's KP rows, then one [BQ, HP] x [HP, CP] product."""
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    rows = pid_m * BQ + tl.arange(0, BQ)
    row_ok = rows < M
    q_row = b * M + rows  # [BQ] int64, flat query index
    kcol = tl.arange(0, KP)
    hcol = tl.arange(0, HP)

    w, total = _weights(dist_ptr, ws_ptr, b, q_row, row_ok, K, eps, HAS_WS, KP)  # [BQ, KP], [BQ]
    kmask = row_ok[:, None] & (kcol[None, :] < K)
    nb = tl.load(idx_ptr + q_row[:, None] * K + kcol[None, :], mask=kmask, other=-1)  # [BQ, KP] int64
    valid = kmask & (nb >= 0) & (nb < P)
    nb = tl.where(valid, nb, 0)
    p_off = (b * P + nb) * 3
    q_off = q_row[:, None] * 3
    dx = tl.load(q_ptr + q_off, mask=row_ok[:, None], other=0.0) - tl.load(p_ptr + p_off, mask=valid, other=0.0)
    dy = (tl.load(q_ptr + q_off + 1, mask=row_ok[:, None], other=0.0)
          - tl.load(p_ptr + p_off + 1, mask=valid, other=0.0))
    dz = (tl.load(q_ptr + q_off + 2, mask=row_ok[:, None], other=0.0)
          - tl.load(p_ptr + p_off + 2, mask=valid, other=0.0))
    den = _clamp_min(tl.sqrt_rn((dx * dx + dy * dy) + dz * dz), 1e-12)
    rx = tl.reshape(tl.div_rn(dx, den), (BQ * KP,))[:, None]  # [BQ * KP, 1]
    ry = tl.reshape(tl.div_rn(dy, den), (BQ * KP,))[:, None]
    rz = tl.reshape(tl.div_rn(dz, den), (BQ * KP,))[:, None]
    vrow = tl.reshape(valid, (BQ * KP,))
    gamma = tl.where(vrow[:, None], _harmonic(rx, ry, rz, EP), 0.0)  # [R, EP]

    if PER_BATCH:
        trow = tl.reshape(b * P + nb, (BQ * KP,))
    else:
        trow = tl.reshape(nb, (BQ * KP,))
    tab = tl.load(tab_ptr + trow[:, None] * H + hcol[None, :], mask=vrow[:, None] & (hcol[None, :] < H), other=0.0)
    h = tab + _stacked_dot(gamma, _load_w1t(w1_ptr, H, EP, HP), PREC, INTERPRET)  # [R, HP]
    wrow = tl.reshape(w, (BQ * KP,))
    contrib = tl.where(vrow[:, None], wrow[:, None] * _relu(h), 0.0)
    g = tl.sum(tl.reshape(contrib, (BQ, KP, HP)), 1)  # [BQ, HP]

    w2t, b2 = _output_layer(w2_ptr, b2_ptr, H, C, HP, CP)
    _store_out(out_ptr, _stacked_dot(g, w2t, PREC, INTERPRET) + b2[None, :] * total[:, None], q_row, row_ok, C, CP)


DOT_PRECISIONS = ("ieee", "tf32", "tf32x3")


def dot_precision() -> str:
    """The matrix products' precision: $GPAVATAR_TRITON_DOT_PRECISION, default "ieee" (fp32 on
    the CUDA cores: the op's float32 contract).  "tf32" runs them on the tensor cores (inputs
    rounded to 10-bit mantissas: a fast mode, ~1e-3 relative in the hidden units), "tf32x3"
    splits each input in two tf32 parts (close to fp32).  The Triton interpreter computes all
    three in fp32."""
    value = os.environ.get("GPAVATAR_TRITON_DOT_PRECISION", "") or "ieee"
    if value not in DOT_PRECISIONS:
        raise ValueError(f"GPAVATAR_TRITON_DOT_PRECISION must be one of {', '.join(DOT_PRECISIONS)}, got {value!r}")
    return value


def _sizes(K, H, C):
    KP = max(2, triton.next_power_of_2(K))
    HP = max(16, triton.next_power_of_2(H))
    CP = max(16, triton.next_power_of_2(C))
    return KP, HP, CP, NUM_WARPS


def _max_programs(device: torch.device) -> int:
    if device.type == "cuda":
        # the backward kernel fits about one program per SM; a few per SM hide the tail
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return 8  # the Triton interpreter on CPU tensors


def knn_blend_forward(queries, points, dist2, idx, table, w1_dir, w2, b2, weight_sum, eps):
    """out (B, M, C) float32 of the blend (module docstring); inputs already validated."""
    B, M, _ = queries.shape
    P = points.shape[1]
    K = dist2.shape[2]
    H = table.shape[1]
    C = w2.shape[0]
    out = torch.zeros((B, M, C), dtype=torch.float32, device=queries.device)
    if B == 0 or M == 0:
        return out
    KP, HP, CP, num_warps = _sizes(K, H, C)
    per_batch = table.shape[0] != P
    has_ws = weight_sum is not None
    grid = (triton.cdiv(M, BLOCK_M), B)
    _blend_fwd_kernel[grid](
        queries, points, dist2, idx, table, w1_dir, w2, b2,
        weight_sum if has_ws else dist2, out,
        M, P, K, H, C, float(eps),
        PER_BATCH=per_batch, HAS_WS=has_ws,
        BLOCK_M=BLOCK_M, KP=KP, HP=HP, CP=CP, EP=EP, DOT=dot_precision(),
        num_warps=num_warps,
    )
    return out


def knn_blend_backward(grad_out, queries, points, dist2, idx, table, w1_dir, w2, weight_sum, eps):
    """Gradients (grad_table, grad_w1_dir, grad_w2, grad_b2) of sum(out * grad_out)."""
    B, M, _ = queries.shape
    P = points.shape[1]
    K = dist2.shape[2]
    H = table.shape[1]
    C = w2.shape[0]
    dev = queries.device
    grad_table = torch.zeros(table.shape, dtype=torch.float32, device=dev)
    grad_w1 = torch.zeros((H, EMBED), dtype=torch.float32, device=dev)
    grad_w2 = torch.zeros((C, H), dtype=torch.float32, device=dev)
    grad_b2 = torch.zeros((C,), dtype=torch.float32, device=dev)
    if B == 0 or M == 0:
        return grad_table, grad_w1, grad_w2, grad_b2
    KP, HP, CP, num_warps = _sizes(K, H, C)
    per_batch = table.shape[0] != P
    has_ws = weight_sum is not None
    n_mblocks = triton.cdiv(M, BLOCK_M)
    n_tiles = B * n_mblocks
    programs = min(n_tiles, _max_programs(dev))
    part_w1 = torch.empty((programs, H, EMBED), dtype=torch.float32, device=dev)
    part_w2 = torch.empty((programs, C, H), dtype=torch.float32, device=dev)
    part_b2 = torch.empty((programs, C), dtype=torch.float32, device=dev)
    _blend_bwd_kernel[(programs,)](
        grad_out.contiguous(), queries, points, dist2, idx, table, w1_dir, w2,
        weight_sum if has_ws else dist2,
        grad_table, part_w1, part_w2, part_b2,
        M, P, K, H, C, float(eps), n_mblocks, n_tiles,
        PER_BATCH=per_batch, HAS_WS=has_ws,
        BLOCK_M=BLOCK_M, KP=KP, HP=HP, CP=CP, EP=EP, DOT=dot_precision(),
        num_warps=num_warps,
    )
    torch.sum(part_w1, 0, out=grad_w1)
    torch.sum(part_w2, 0, out=grad_w2)
    torch.sum(part_b2, 0, out=grad_b2)
    return grad_table, grad_w1, grad_w2, grad_b2


STACKED_PRECISIONS = ("ieee", "tf32", "bf16")


def stacked_blocks(K: int, device: torch.device) -> tuple[int, int]:
    """(queries per program BQ, num_warps) of the stacked forward: BQ * KP = 128 rows (KP the padded
    K), 8 warps on a GPU (sm_90 ptxas: 220 registers, no spills; 4 warps: 255; BQ 32: spills); untimed (``benchmarks/bench_knn_blend.py`` rows ``cuda+tc``)."""
    KP = max(2, triton.next_power_of_2(K))
    return max(1, 128 // KP), 8


def knn_blend_forward_stacked(queries, points, dist2, idx, table, w1_dir, w2, b2, weight_sum, eps,
                              precision="ieee", block_q=None, num_warps=None):
    """out (B, M, C) float32 of the blend by the stacked kernel (_blend_stacked_fwd_kernel) at
    ``precision`` (STACKED_PRECISIONS); inputs already validated."""
    B, M, _ = queries.shape
    P = points.shape[1]
    K = dist2.shape[2]
    H = table.shape[1]
    C = w2.shape[0]
    out = torch.zeros((B, M, C), dtype=torch.float32, device=queries.device)
    if B == 0 or M == 0:
        return out
    KP, HP, CP, _ = _sizes(K, H, C)
    default_q, default_w = stacked_blocks(K, queries.device)
    block_q = block_q or default_q
    has_ws = weight_sum is not None
    _blend_stacked_fwd_kernel[(triton.cdiv(M, block_q), B)](
        queries, points, dist2, idx, table, w1_dir, w2, b2, weight_sum if has_ws else dist2, out,
        M, P, K, H, C, float(eps),
        PER_BATCH=table.shape[0] != P, HAS_WS=has_ws, BQ=block_q, KP=KP, HP=HP, CP=CP, EP=EP, PREC=precision,
        INTERPRET=queries.device.type != "cuda", num_warps=num_warps or default_w,
    )
    return out
