"""Front-to-back alpha compositing (``composite``) in Triton: forward and backward.

Per ray, with S samples sorted front to back, alphas a_i, values v_i (C,) and
optional depths t_i:
    T_0 = 1,  T_{i+1} = T_i (1 - a_i),  w_i = a_i T_i
    color = sum_i w_i v_i,  wsum = sum_i w_i,  opacity = clamp(wsum, 0, 1)
    depth = sum_i w_i t_i   (zeros without depths)

Backward of L = <grad_color, color> + grad_opacity opacity + <grad_weights, w>
+ grad_depth depth, with
    G_i = grad_weights_i + <grad_color, v_i> + grad_opacity + grad_depth t_i
    S_{S-1} = 0,  S_k = a_{k+1} G_{k+1} + (1 - a_{k+1}) S_{k+1}
    grad_alpha_k = T_k (G_k - S_k),  grad_values_i = w_i grad_color
(never divides by 1 - a, so a = 1 is exact: samples behind it get zero
gradients).  wsum = 1 - T_S lies in [0, 1] up to rounding, so the clamp only
removes rounding and its gradient is taken as the identity.

Shapes: alphas (R, S), values (R, S, C), depths (R, S) or None; color /
grad_color (R, C), opacity / depth and their gradients (R,), weights /
grad_weights (R, S), all float32 contiguous.

Kernels: a program owns BLOCK_R rays and walks their samples in chunks of
BLOCK_S, reading [BLOCK_R, BLOCK_S, BLOCK_C] tiles of values (BLOCK_C = next
power of two >= C, at most MAX_BLOCK_C; a larger C is walked in channel
blocks), so it keeps many loads in flight and has only S / BLOCK_S dependent
steps.  Within a chunk the recurrences are scans along the samples: the
transmittance is the carried T times the cumulative product of 1 - a of the
preceding samples (alphas loaded again, shifted by one), and the suffix is a
linear recurrence S = b + m S' taken as an associative scan of (m, b) pairs
over the chunk loaded in reverse sample order.  Forward: one walk per channel
block (each recomputes the weights and writes them, the opacity and the
depth).  Backward: a front-to-back walk writes grad_values and saves T_i and
G_i in (2, R, S) scratch; after a barrier (it reads back what other threads
of the program stored) a back-to-front walk writes grad_alphas.  Nothing of
size (R, S, C) is stored besides grad_values.
"""

import torch
import triton
import triton.language as tl

__all__ = ["composite_forward", "composite_backward"]

# Tuned on an H100 for S = 64, C = 32 (R = 16384 and 32768): BLOCK_R = 4 rays per program.
MAX_BLOCK_C = 128  # channels per tile; a larger C is walked in blocks
MAX_BLOCK_S = 32  # samples per chunk
TILE = 4096  # target elements of a [BLOCK_R, BLOCK_S, BLOCK_C] tile on a GPU
INTERPRET_TILE = 32768  # the interpreter pays per operation: larger tiles, fewer programs
NUM_WARPS = 4


@triton.jit
def _affine(m1, b1, m2, b2):
    """x -> m1 x + b1, then x -> m2 x + b2."""
    return m1 * m2, b1 * m2 + b2


@triton.jit
def _last(x, BLOCK_S: tl.constexpr):
    """Column BLOCK_S - 1 of x [BLOCK_R, BLOCK_S] as [BLOCK_R]."""
    col = tl.arange(0, BLOCK_S)[None, :]
    return tl.sum(tl.where(col == BLOCK_S - 1, x, 0.0), 1)


@triton.jit
def _transmittance(a_ptr, ray, row_ok, s0, S, trans, BLOCK_S: tl.constexpr):
    """For the chunk of samples s0 + j, j < BLOCK_S (zero alphas past S): alphas a
    and T [BLOCK_R, BLOCK_S], given trans [BLOCK_R] = T_{s0}."""
    j = tl.arange(0, BLOCK_S)[None, :]
    sam = ray[:, None] + s0 + j  # [BLOCK_R, BLOCK_S] flat sample index
    a = tl.load(a_ptr + sam, mask=row_ok[:, None] & (s0 + j < S), other=0.0)
    a_prev = tl.load(a_ptr + sam - 1, mask=row_ok[:, None] & (j >= 1) & (s0 + j <= S), other=0.0)
    return a, trans[:, None] * tl.cumprod(1.0 - a_prev, 1)


@triton.jit
def _fwd_kernel(
    a_ptr,  # [R, S]
    v_ptr,  # [R, S, C]
    t_ptr,  # [R, S] (only read when HAS_DEPTH)
    color_ptr,  # [R, C] (out)
    opacity_ptr,  # [R] (out)
    w_ptr,  # [R, S] (out)
    depth_ptr,  # [R] (out)
    R, S, C,
    HAS_DEPTH: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    r2 = rows.to(tl.int64)[:, None]  # [BLOCK_R, 1]
    ray = rows.to(tl.int64) * S  # [BLOCK_R] flat index of sample 0
    j2 = tl.arange(0, BLOCK_S)[None, :]  # [1, BLOCK_S]
    j3 = j2[:, :, None]  # [1, BLOCK_S, 1]
    c2 = tl.arange(0, BLOCK_C)[None, :]  # [1, BLOCK_C]
    c3 = c2[:, None, :]  # [1, 1, BLOCK_C]
    for c0 in range(0, C, BLOCK_C):
        trans = tl.full((BLOCK_R,), 1.0, tl.float32)
        wsum = tl.zeros((BLOCK_R,), tl.float32)
        depth = tl.zeros((BLOCK_R,), tl.float32)
        color = tl.zeros((BLOCK_R, BLOCK_C), tl.float32)
        for s0 in range(0, S, BLOCK_S):
            a, t_chunk = _transmittance(a_ptr, ray, row_ok, s0, S, trans, BLOCK_S)
            smask = row_ok[:, None] & (s0 + j2 < S)  # [BLOCK_R, BLOCK_S]
            # (a lane past S has a = 0 but T = T_S (1 - a_{S-1})...: 0 * inf = NaN for an infinite alpha)
            w = tl.where(smask, a * t_chunk, 0.0)
            tl.store(w_ptr + ray[:, None] + s0 + j2, w, mask=smask)
            wsum += tl.sum(w, 1)
            if HAS_DEPTH:
                depth += tl.sum(w * tl.load(t_ptr + ray[:, None] + s0 + j2, mask=smask, other=0.0), 1)
            vmask = smask[:, :, None] & (c0 + c3 < C)
            v = tl.load(v_ptr + (r2[:, :, None] * S + s0 + j3) * C + c0 + c3, mask=vmask, other=0.0)
            color += tl.sum(w[:, :, None] * v, 1)
            trans = _last(t_chunk * (1.0 - a), BLOCK_S)
        tl.store(color_ptr + r2 * C + c0 + c2, color, mask=row_ok[:, None] & (c0 + c2 < C))
        # clamp(wsum, 0, 1) with torch's NaN rule (NaN stays NaN; tl.minimum / tl.maximum may drop it)
        tl.store(opacity_ptr + rows, tl.where(wsum < 0.0, 0.0, tl.where(wsum > 1.0, 1.0, wsum)), mask=row_ok)
        tl.store(depth_ptr + rows, depth, mask=row_ok)


@triton.jit
def _bwd_kernel(
    gc_ptr,  # [R, C] grad_color
    go_ptr,  # [R] grad_opacity
    gw_ptr,  # [R, S] grad_weights
    gd_ptr,  # [R] grad_depth (only read when HAS_DEPTH)
    a_ptr,  # [R, S]
    v_ptr,  # [R, S, C]
    t_ptr,  # [R, S] (only read when HAS_DEPTH)
    trans_ptr,  # [R, S] scratch: T_i
    g_ptr,  # [R, S] scratch: G_i
    ga_ptr,  # [R, S] (out) grad_alphas
    gv_ptr,  # [R, S, C] (out) grad_values
    R, S, C,
    HAS_DEPTH: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    r2 = rows.to(tl.int64)[:, None]  # [BLOCK_R, 1]
    ray = rows.to(tl.int64) * S  # [BLOCK_R]
    j2 = tl.arange(0, BLOCK_S)[None, :]  # [1, BLOCK_S]
    j3 = j2[:, :, None]  # [1, BLOCK_S, 1]
    c2 = tl.arange(0, BLOCK_C)[None, :]  # [1, BLOCK_C]
    c3 = c2[:, None, :]  # [1, 1, BLOCK_C]
    g_ray = tl.load(go_ptr + rows, mask=row_ok, other=0.0)[:, None]  # [BLOCK_R, 1]
    if HAS_DEPTH:
        gd = tl.load(gd_ptr + rows, mask=row_ok, other=0.0)[:, None]

    # Front to back: T, G (saved) and grad_values.
    trans = tl.full((BLOCK_R,), 1.0, tl.float32)
    for s0 in range(0, S, BLOCK_S):
        a, t_chunk = _transmittance(a_ptr, ray, row_ok, s0, S, trans, BLOCK_S)
        sam = ray[:, None] + s0 + j2  # [BLOCK_R, BLOCK_S]
        smask = row_ok[:, None] & (s0 + j2 < S)
        w = a * t_chunk
        g = tl.load(gw_ptr + sam, mask=smask, other=0.0) + g_ray
        if HAS_DEPTH:
            g += gd * tl.load(t_ptr + sam, mask=smask, other=0.0)
        for c0 in range(0, C, BLOCK_C):
            gc = tl.load(gc_ptr + r2 * C + c0 + c2, mask=row_ok[:, None] & (c0 + c2 < C), other=0.0)
            vmask = smask[:, :, None] & (c0 + c3 < C)
            v_off = (r2[:, :, None] * S + s0 + j3) * C + c0 + c3
            v = tl.load(v_ptr + v_off, mask=vmask, other=0.0)
            g += tl.sum(gc[:, None, :] * v, 2)
            tl.store(gv_ptr + v_off, w[:, :, None] * gc[:, None, :], mask=vmask)
        tl.store(trans_ptr + sam, t_chunk, mask=smask)
        tl.store(g_ptr + sam, g, mask=smask)
        trans = _last(t_chunk * (1.0 - a), BLOCK_S)
    tl.debug_barrier()

    # Back to front, each chunk in reverse: column j is sample k = s0 + BLOCK_S - 1 - j.
    # Column j >= 1 holds the step of sample k + 1, (m, b) = (1 - a_{k+1}, a_{k+1} G_{k+1});
    # column 0 the identity, since the carry is S of the chunk's last sample.
    suffix = tl.zeros((BLOCK_R,), tl.float32)
    for i0 in range(0, S, BLOCK_S):
        s0 = (tl.cdiv(S, BLOCK_S) - 1) * BLOCK_S - i0
        k = s0 + BLOCK_S - 1 - j2  # [1, BLOCK_S]
        sam = ray[:, None] + k
        kmask = row_ok[:, None] & (k < S)
        nmask = row_ok[:, None] & (j2 >= 1) & (k + 1 < S)
        a_next = tl.load(a_ptr + sam + 1, mask=nmask, other=0.0)
        g_next = tl.load(g_ptr + sam + 1, mask=nmask, other=0.0)
        m, b = tl.associative_scan((1.0 - a_next, a_next * g_next), 1, _affine)
        s_chunk = m * suffix[:, None] + b  # S_k
        g = tl.load(g_ptr + sam, mask=kmask, other=0.0)
        t_k = tl.load(trans_ptr + sam, mask=kmask, other=0.0)
        tl.store(ga_ptr + sam, t_k * (g - s_chunk), mask=kmask)
        a = tl.load(a_ptr + sam, mask=kmask, other=0.0)
        suffix = _last(a * g + (1.0 - a) * s_chunk, BLOCK_S)  # S of sample s0 - 1


def _config(R, S, C, device):
    block_c = min(triton.next_power_of_2(C), MAX_BLOCK_C)
    block_s = min(triton.next_power_of_2(S), MAX_BLOCK_S)
    tile = TILE if device.type == "cuda" else INTERPRET_TILE
    block_r = max(1, min(tile // (block_s * block_c), triton.next_power_of_2(R)))
    return dict(BLOCK_R=block_r, BLOCK_S=block_s, BLOCK_C=block_c, num_warps=NUM_WARPS)


def composite_forward(alphas, values, depths):
    """(color (R, C), opacity (R,), weights (R, S), depth (R,)) float32; inputs already
    validated; depth is zeros when depths is None."""
    R, S = alphas.shape
    C = values.shape[2]
    dev = alphas.device
    color = torch.empty((R, C), dtype=torch.float32, device=dev)
    opacity = torch.empty((R,), dtype=torch.float32, device=dev)
    weights = torch.empty((R, S), dtype=torch.float32, device=dev)
    depth = torch.empty((R,), dtype=torch.float32, device=dev)
    cfg = _config(R, S, C, dev)
    has_depth = depths is not None
    _fwd_kernel[(triton.cdiv(R, cfg["BLOCK_R"]),)](
        alphas, values, depths if has_depth else alphas,
        color, opacity, weights, depth,
        R, S, C,
        HAS_DEPTH=has_depth, **cfg,
    )
    return color, opacity, weights, depth


def composite_backward(grad_color, grad_opacity, grad_weights, grad_depth, alphas, values, depths):
    """(grad_alphas (R, S), grad_values (R, S, C)) of the composite's loss (module docstring)."""
    R, S = alphas.shape
    C = values.shape[2]
    dev = alphas.device
    grad_alphas = torch.empty((R, S), dtype=torch.float32, device=dev)
    grad_values = torch.empty((R, S, C), dtype=torch.float32, device=dev)
    scratch = torch.empty((2, R, S), dtype=torch.float32, device=dev)
    cfg = _config(R, S, C, dev)
    has_depth = depths is not None
    _bwd_kernel[(triton.cdiv(R, cfg["BLOCK_R"]),)](
        grad_color, grad_opacity, grad_weights, grad_depth,
        alphas, values, depths if has_depth else alphas,
        scratch[0], scratch[1], grad_alphas, grad_values,
        R, S, C,
        HAS_DEPTH=has_depth, **cfg,
    )
    return grad_alphas, grad_values
