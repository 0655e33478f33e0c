"""Tri-plane bilinear sampling (``triplane_sample``) in Triton: forward and backward.

Shapes:
    planes (B, 3, H, W, C) channels-last, float32 / float16 / bfloat16 (read as
    stored, all arithmetic in float32); coords (B, M, 3) float32;
    out / grad_out (B, M, C) for the mean, (B, M, 3C) for concat (plane 0
    channels, then plane 1, then plane 2), float32.

Math (torch ``grid_sample``: bilinear, zero padding, align_corners=False).
Point (x, y, z) reads plane 0 at (u, v) = (x, y), plane 1 at (x, z), plane 2
at (z, y), i.e. u = coordinate t - t % 2 and v = coordinate t % 2 + 1; u
indexes the width W, v the height H:
    ix = ((u + 1) W - 1) / 2,  iy = ((v + 1) H - 1) / 2,  fx = floor(ix), fy = floor(iy)
    the plane contributes (value and gradient) only if -1 <= fx <= W - 1 and
    -1 <= fy <= H - 1, tested in float (NaN fails it; huge coordinates never
    reach an int conversion); then x0 = fx, y0 = fy and
    wx1 = ix - fx, wx0 = (fx + 1) - ix, wy1 = iy - fy, wy0 = (fy + 1) - iy
    f_t = wx0 wy0 P[y0, x0] + wx1 wy0 P[y0, x0+1] + wx0 wy1 P[y0+1, x0] + wx1 wy1 P[y0+1, x0+1]
          (corners nw, ne, sw, se; a corner outside [0, H) x [0, W) is never read)
    mean: out = (f_0 + f_1 + f_2) / 3          concat: out = [f_0, f_1, f_2]
Every kernel is compiled without FMA contraction (enable_fp_fusion=False), so
all of them find the same cell for the same point.

Backward of L = sum(out * grad_out), per plane, with g_t = grad_out / 3 (mean)
or g_t = grad_out[..., t C : (t + 1) C] (concat):
    grad_planes[corner k] += w_k g_t
    d_k = sum_c g_t[c] P[corner k, c]
    dix = -wy0 d_nw + wy0 d_ne - wy1 d_sw + wy1 d_se
    diy = -wx0 d_nw - wx1 d_ne + wx0 d_sw + wx1 d_se
    grad_coords[u] += dix W / 2,  grad_coords[v] += diy H / 2

Kernels.  A point program owns BLOCK_M points of one batch element and walks
the channels in [BLOCK_M, BLOCK_C] tiles (BLOCK_C = next power of two >= C,
at most MAX_BLOCK_C), so channels-last texels load contiguously.  The
forward writes the features; the backward point kernel reduces d_k over the
channels itself and writes grad_coords without atomics.
The plane gradient has two modes, both accumulating in float32 and cast to
the planes' dtype once at the end:
* deterministic=False: the backward point kernel adds w_k g_t into a zeroed
  float32 buffer with masked float atomics;
* deterministic=True: no float atomics.  A key kernel gives every (b, t, m)
  the key ((b * 3 + t) (H + 1) + y0 + 1) (W + 1) + x0 + 1 of its cell, or the
  sentinel B * 3 (H + 1) (W + 1) when plane t does not contribute; a stable
  torch.sort orders the points by cell and searchsorted gives every cell's
  range.  A gather program owns BLOCK_T texels (flattened (h, w)) of one plane
  and BLOCK_C channels.  Texel (h, w) visits the cells (h, w), (h, w + 1),
  (h + 1, w), (h + 1, w + 1) in (y0 + 1, x0 + 1) indexing, i.e. the cells
  whose corners include it, in that order, and each cell's points in sorted
  order (one list: the two cells of a row are adjacent in key order),
  recomputing the point's cell and its weight for this texel.  It takes
  BLOCK_J list entries per step and adds their sum: BLOCK_J = 1 on a GPU (one
  point at a time, in list order); the interpreter, which pays per operation,
  takes up to 64 (a fixed reduction tree per step).  Either way the summation
  order is fixed, so the result is bit-identical run to run.
"""

import torch
import triton
import triton.language as tl

__all__ = ["triplane_forward", "triplane_backward"]

_TRITON_AT_LEAST_3_8 = tuple(int(x) for x in triton.__version__.split(".")[:2]) >= (3, 8)
MAX_BLOCK_C = 128  # channels per tile; a larger C is walked in chunks
NUM_WARPS = 4


@triton.jit
def _cell(c_ptr, q_row, mask, t, H, W):
    """Bilinear cell on plane t of the points q_row (flat b * M + m, masked by `mask`).

    Returns ok (the plane contributes), x0, y0 (int32, -1 where not ok) and wx0, wx1, wy0, wy1.
    """
    u = tl.load(c_ptr + q_row * 3 + (t - t % 2), mask=mask, other=0.0)
    v = tl.load(c_ptr + q_row * 3 + (t % 2 + 1), mask=mask, other=0.0)
    ix = ((u + 1.0) * W - 1.0) * 0.5
    iy = ((v + 1.0) * H - 1.0) * 0.5
    fx = tl.floor(ix)
    fy = tl.floor(iy)
    ok = mask & (fx >= -1.0) & (fx <= W - 1) & (fy >= -1.0) & (fy <= H - 1)
    x0 = tl.where(ok, fx, -1.0).to(tl.int32)
    y0 = tl.where(ok, fy, -1.0).to(tl.int32)
    return ok, x0, y0, (fx + 1.0) - ix, ix - fx, (fy + 1.0) - iy, iy - fy


@triton.jit
def _corners(plane, x0, y0, ok, H, W, C, cols, cmask):
    """Offsets and masks [BLOCK_M, BLOCK_C] of the corners nw, ne, sw, se of plane `plane` (b * 3 + t).

    ok implies -1 <= x0 <= W - 1 and -1 <= y0 <= H - 1, so each corner needs one bound test per axis.
    """
    x_lo = x0 >= 0
    x_hi = x0 < W - 1
    y_lo = y0 >= 0
    y_hi = y0 < H - 1
    nw = ((plane * H + y0) * W + x0)[:, None] * C + cols[None, :]
    m = ok[:, None] & cmask[None, :]
    return (nw, m & (y_lo & x_lo)[:, None],
            nw + C, m & (y_lo & x_hi)[:, None],
            nw + W * C, m & (y_hi & x_lo)[:, None],
            nw + (W + 1) * C, m & (y_hi & x_hi)[:, None])


@triton.jit
def _load_grad(go_ptr, q_row, t, cols, mask, C, CONCAT: tl.constexpr):
    """Upstream gradient g_t of plane t at points q_row, channels cols (broadcast against each other)."""
    if CONCAT:
        g = tl.load(go_ptr + q_row * (3 * C) + t * C + cols, mask=mask, other=0.0)
    else:
        g = tl.div_rn(tl.load(go_ptr + q_row * C + cols, mask=mask, other=0.0), 3.0)
    return g


@triton.jit
def _fwd_kernel(
    p_ptr,  # [B, 3, H, W, C] float32 / float16 / bfloat16
    c_ptr,  # [B, M, 3] float32
    out_ptr,  # [B, M, C] or [B, M, 3C] float32 (out)
    M, H, W, C,
    CONCAT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    q_row = b * M + rows  # [BLOCK_M] int64

    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        cmask = cols < C
        out_mask = row_ok[:, None] & cmask[None, :]
        acc = tl.zeros((BLOCK_M, BLOCK_C), tl.float32)
        for t in tl.static_range(3):
            ok, x0, y0, wx0, wx1, wy0, wy1 = _cell(c_ptr, q_row, row_ok, t, H, W)
            o_nw, m_nw, o_ne, m_ne, o_sw, m_sw, o_se, m_se = _corners(b * 3 + t, x0, y0, ok, H, W, C, cols, cmask)
            f = (tl.load(p_ptr + o_nw, mask=m_nw, other=0.0).to(tl.float32) * (wx0 * wy0)[:, None]
                 + tl.load(p_ptr + o_ne, mask=m_ne, other=0.0).to(tl.float32) * (wx1 * wy0)[:, None]
                 + tl.load(p_ptr + o_sw, mask=m_sw, other=0.0).to(tl.float32) * (wx0 * wy1)[:, None]
                 + tl.load(p_ptr + o_se, mask=m_se, other=0.0).to(tl.float32) * (wx1 * wy1)[:, None])
            if CONCAT:
                tl.store(out_ptr + q_row[:, None] * (3 * C) + t * C + cols[None, :], f, mask=out_mask)
            else:
                acc += f
        if not CONCAT:
            tl.store(out_ptr + q_row[:, None] * C + cols[None, :], tl.div_rn(acc, 3.0), mask=out_mask)


@triton.jit
def _bwd_points_kernel(
    go_ptr,  # [B, M, C] or [B, M, 3C] float32
    p_ptr,  # [B, 3, H, W, C]
    c_ptr,  # [B, M, 3] float32
    gp_ptr,  # [B, 3, H, W, C] float32 (out, zero initialised; only used when PLANES_GRAD)
    gc_ptr,  # [B, M, 3] float32 (out; only used when COORDS_GRAD)
    M, H, W, C,
    CONCAT: tl.constexpr, PLANES_GRAD: tl.constexpr, COORDS_GRAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    q_row = b * M + rows  # [BLOCK_M] int64
    gx = tl.zeros((BLOCK_M,), tl.float32)
    gy = tl.zeros((BLOCK_M,), tl.float32)
    gz = tl.zeros((BLOCK_M,), tl.float32)

    for t in tl.static_range(3):
        ok, x0, y0, wx0, wx1, wy0, wy1 = _cell(c_ptr, q_row, row_ok, t, H, W)
        d_nw = tl.zeros((BLOCK_M,), tl.float32)
        d_ne = tl.zeros((BLOCK_M,), tl.float32)
        d_sw = tl.zeros((BLOCK_M,), tl.float32)
        d_se = tl.zeros((BLOCK_M,), tl.float32)
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            cmask = cols < C
            g = _load_grad(go_ptr, q_row[:, None], t, cols[None, :], ok[:, None] & cmask[None, :], C, CONCAT)
            o_nw, m_nw, o_ne, m_ne, o_sw, m_sw, o_se, m_se = _corners(b * 3 + t, x0, y0, ok, H, W, C, cols, cmask)
            if PLANES_GRAD:
                tl.atomic_add(gp_ptr + o_nw, (wx0 * wy0)[:, None] * g, mask=m_nw)
                tl.atomic_add(gp_ptr + o_ne, (wx1 * wy0)[:, None] * g, mask=m_ne)
                tl.atomic_add(gp_ptr + o_sw, (wx0 * wy1)[:, None] * g, mask=m_sw)
                tl.atomic_add(gp_ptr + o_se, (wx1 * wy1)[:, None] * g, mask=m_se)
            if COORDS_GRAD:
                d_nw += tl.sum(g * tl.load(p_ptr + o_nw, mask=m_nw, other=0.0).to(tl.float32), 1)
                d_ne += tl.sum(g * tl.load(p_ptr + o_ne, mask=m_ne, other=0.0).to(tl.float32), 1)
                d_sw += tl.sum(g * tl.load(p_ptr + o_sw, mask=m_sw, other=0.0).to(tl.float32), 1)
                d_se += tl.sum(g * tl.load(p_ptr + o_se, mask=m_se, other=0.0).to(tl.float32), 1)
        if COORDS_GRAD:
            du = (-wy0 * d_nw + wy0 * d_ne - wy1 * d_sw + wy1 * d_se) * W * 0.5
            dv = (-wx0 * d_nw - wx1 * d_ne + wx0 * d_sw + wx1 * d_se) * H * 0.5
            if t == 0:  # (u, v) = (x, y)
                gx += du
                gy += dv
            elif t == 1:  # (x, z)
                gx += du
                gz += dv
            else:  # (z, y)
                gz += du
                gy += dv

    if COORDS_GRAD:
        tl.store(gc_ptr + q_row * 3, gx, mask=row_ok)
        tl.store(gc_ptr + q_row * 3 + 1, gy, mask=row_ok)
        tl.store(gc_ptr + q_row * 3 + 2, gz, mask=row_ok)


@triton.jit
def _keys_kernel(
    c_ptr,  # [B, M, 3] float32
    key_ptr,  # [B, 3, M] int64 (out)
    M, H, W, n_cells,
    BLOCK_M: tl.constexpr,
):
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    for t in tl.static_range(3):
        ok, x0, y0, wx0, wx1, wy0, wy1 = _cell(c_ptr, b * M + rows, row_ok, t, H, W)
        plane = b * 3 + t
        key = (plane * (H + 1) + (y0 + 1)) * (W + 1) + (x0 + 1)
        tl.store(key_ptr + plane * M + rows, tl.where(ok, key, n_cells), mask=row_ok)


@triton.jit
def _gather_kernel(
    go_ptr,  # [B, M, C] or [B, M, 3C] float32
    c_ptr,  # [B, M, 3] float32
    perm_ptr,  # [B * 3 * M] int64: flat key index (b * 3 + t) * M + m, in cell order
    start_ptr,  # [n_cells + 1] int64: first sorted position of every cell
    gp_ptr,  # [B, 3, H, W, C] float32 (out)
    M, H, W, C,
    CONCAT: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_t = tl.program_id(0)
    plane = tl.program_id(1).to(tl.int64)  # b * 3 + t
    t = plane % 3
    to_row = (plane // 3 - plane) * M  # key index -> flat point b * M + m
    tex = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)  # flattened (h, w)
    tex_ok = tex < H * W
    h = tex // W
    w = tex % W
    cols = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    # The texel's cells, in (y0 + 1, x0 + 1) indexing, are (h, w), (h, w + 1), (h + 1, w),
    # (h + 1, w + 1); the two cells of a row are adjacent in key order, so the texel's list is the
    # sorted range [top, top + n_top) of the upper row, then the one of the lower row.
    cell = plane * (H + 1) * (W + 1) + h * (W + 1) + w
    top = tl.load(start_ptr + cell, mask=tex_ok, other=0)
    n_top = tl.load(start_ptr + cell + 2, mask=tex_ok, other=0) - top
    bottom = tl.load(start_ptr + cell + (W + 1), mask=tex_ok, other=0)
    n_all = n_top + tl.load(start_ptr + cell + (W + 3), mask=tex_ok, other=0) - bottom
    top = top[:, None]
    bottom = (bottom - n_top)[:, None]  # list entry j >= n_top sits at bottom + j
    n_top = n_top[:, None]
    n_all = n_all[:, None]

    acc = tl.zeros((BLOCK_T, BLOCK_C), tl.float32)
    for j0 in range(0, tl.max(n_all), BLOCK_J):
        j = j0 + tl.arange(0, BLOCK_J)[None, :]
        live = j < n_all  # [BLOCK_T, BLOCK_J]
        q_row = tl.load(perm_ptr + j + tl.where(j < n_top, top, bottom), mask=live, other=0) + to_row
        ok, x0, y0, wx0, wx1, wy0, wy1 = _cell(c_ptr, q_row, live, t, H, W)
        # the texel is corner x0 + 1 (weight wx1) of a cell with x0 = w - 1, corner x0 (wx0) when x0 = w
        weight = tl.where(x0 == w[:, None], wx0, wx1) * tl.where(y0 == h[:, None], wy0, wy1)
        g = _load_grad(go_ptr, q_row[:, :, None], t, cols[None, None, :], live[:, :, None] & cmask[None, None, :],
                       C, CONCAT)
        acc += tl.sum(weight[:, :, None] * g, 1)  # g is 0 on dead entries, whose weights are finite

    offs = (plane * H * W + tex)[:, None] * C + cols[None, :]
    tl.store(gp_ptr + offs, acc, mask=tex_ok[:, None] & cmask[None, :])


def _blocks(C: int, device: torch.device) -> tuple[int, int]:
    """(BLOCK_C, BLOCK_M): channel chunk, and points (or texels) per program."""
    block_c = min(triton.next_power_of_2(C), MAX_BLOCK_C)
    # GPU: 1K-element tiles keep the backward at 128 registers on sm_90 (2K tiles need ~240);
    # the interpreter pays per operation, so it gets large tiles
    tile, cap = (1024, 1024) if device.type == "cuda" else (65536, 4096)
    return block_c, max(8, min(cap, tile // block_c))


def _gather_blocks(block_c: int, block_m: int, cell_start: torch.Tensor) -> tuple[int, int]:
    """(BLOCK_T, BLOCK_J) of the gather: texels per program, list entries per texel per step."""
    if cell_start.device.type == "cuda":
        return block_m, 1  # every texel adds its points one by one, in list order
    # the interpreter pays per operation: big tiles and up to 64 entries per step, about half the
    # largest cell (a texel's list spans four cells); the host sync is free on CPU
    most = int((cell_start[1:] - cell_start[:-1]).max())
    block_j = min(64, triton.next_power_of_2(max(1, most // 2)))
    return max(16, min(4096, 131072 // (block_j * block_c))), block_j


def triplane_forward(planes: torch.Tensor, coords: torch.Tensor, concat: bool) -> torch.Tensor:
    """Features (B, M, C) (mean) or (B, M, 3C) (concat) float32; see the module docstring.

    planes: (B, 3, H, W, C) contiguous float32 / float16 / bfloat16, coords: (B, M, 3) contiguous
    float32, B, M, C, H, W >= 1 (validated by the caller).
    """
    B, _, H, W, C = planes.shape
    M = coords.shape[1]
    out = torch.empty((B, M, 3 * C if concat else C), dtype=torch.float32, device=coords.device)
    block_c, block_m = _blocks(C, coords.device)
    _fwd_kernel[(triton.cdiv(M, block_m), B)](
        planes, coords, out, M, H, W, C,
        CONCAT=concat, BLOCK_M=block_m, BLOCK_C=block_c,
        num_warps=NUM_WARPS, enable_fp_fusion=False,
    )
    return out


def triplane_backward(grad_out: torch.Tensor, planes: torch.Tensor, coords: torch.Tensor, concat: bool,
                      deterministic: bool, planes_grad: bool, coords_grad: bool
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients (grad_planes, grad_coords) of sum(out * grad_out); see the module docstring.

    grad_out: (B, M, C) (mean) or (B, M, 3C) (concat) contiguous float32.  grad_planes is
    (B, 3, H, W, C) in planes.dtype, or an empty (0,) tensor when not planes_grad; grad_coords is
    (B, M, 3) float32, or an empty (0,) tensor when not coords_grad.  deterministic=True computes
    the plane gradient without float atomics, bit-identical run to run.
    """
    B, _, H, W, C = planes.shape
    M = coords.shape[1]
    dev = coords.device
    block_c, block_m = _blocks(C, dev)
    grid_points = (triton.cdiv(M, block_m), B)
    atomic_planes = planes_grad and not deterministic

    grad_planes = planes.new_empty((0,))
    if planes_grad:  # the gather writes every texel; the atomics need zeros
        grad_planes = (torch.empty if deterministic else torch.zeros)(planes.shape, dtype=torch.float32, device=dev)
    grad_coords = torch.empty_like(coords) if coords_grad else coords.new_empty((0,))
    if atomic_planes or coords_grad:
        # triton 3.6 fails to compile this kernel for 16-bit planes (a layout error in
        # make_ttgir); below 3.8 it reads a float32 copy (exact: widening is lossless).
        values = planes if planes.dtype == torch.float32 or _TRITON_AT_LEAST_3_8 else planes.float()
        _bwd_points_kernel[grid_points](
            grad_out, values, coords,
            grad_planes if atomic_planes else coords,  # any float32 tensor when unused
            grad_coords if coords_grad else coords,
            M, H, W, C,
            CONCAT=concat, PLANES_GRAD=atomic_planes, COORDS_GRAD=coords_grad,
            BLOCK_M=block_m, BLOCK_C=block_c,
            num_warps=NUM_WARPS, enable_fp_fusion=False,
        )

    if planes_grad and deterministic:
        n_cells = B * 3 * (H + 1) * (W + 1)
        keys = torch.empty((B * 3 * M,), dtype=torch.int64, device=dev)
        _keys_kernel[grid_points](
            coords, keys, M, H, W, n_cells,
            BLOCK_M=block_m, num_warps=NUM_WARPS, enable_fp_fusion=False,
        )
        sorted_keys, perm = torch.sort(keys, stable=True)
        cell_start = torch.searchsorted(sorted_keys, torch.arange(n_cells + 1, dtype=torch.int64, device=dev))
        block_t, block_j = _gather_blocks(block_c, block_m, cell_start)
        _gather_kernel[(triton.cdiv(H * W, block_t), B * 3, triton.cdiv(C, block_c))](
            grad_out, coords, perm, cell_start, grad_planes, M, H, W, C,
            CONCAT=concat, BLOCK_T=block_t, BLOCK_J=block_j, BLOCK_C=block_c,
            num_warps=NUM_WARPS, enable_fp_fusion=False,
        )
    if planes_grad:
        grad_planes = grad_planes.to(planes.dtype)
    return grad_planes, grad_coords
