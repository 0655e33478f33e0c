"""K nearest neighbours in Triton (the pytorch3d ``knn_points`` contract).

Shapes:
    queries (B, M, 3) float32, points (B, P, 3) float32, 1 <= K <= min(P, 32)
    -> dist2 (B, M, K) float32 ascending, idx (B, M, K) int64

Math, for query q = queries[b, m] and point p = points[b, i]:
    d(q, p) = (dx*dx + dy*dy) + dz*dz,   dx = qx - px, ...   (fp32, no FMA)
The K smallest pairs (d, i) in lexicographic order are returned, so equal
distances keep the lower point index first.  Distances are ranked by int32 keys
(their bits: the same order for numbers >= 0 and +inf, NaN above +inf), so
non-finite input gets the total order of every backend (csrc/knn/knn.h).  The arithmetic order matches the
torch reference bit for bit; the kernel is launched with enable_fp_fusion=False
so the compiler does not contract the products into FMAs.

Scheme (no (M, P) matrix): one program owns BLOCK_M queries of one batch
element and streams the points in tiles of BLOCK_P.  Per query it keeps an
*unsorted* set of the K best (d, i) pairs seen so far in registers
(KP = next power of two >= K columns; columns >= K are unused) together with
the set's worst entry (largest (d, i)).  For each tile:
    1. distances of the tile; a candidate qualifies when (d, i) < worst;
    2. n = min(K, max over rows of #qualifying) rounds; each round takes every
       row's smallest remaining qualifying candidate and, if it still beats
       the row's worst, overwrites the worst slot and recomputes the worst.
Candidates are offered in ascending order, so after K rounds nothing else of
the tile can enter; a tile with no qualifying candidate costs no round.
At the end the set is sorted by K rounds of extract-min.

Cell lists (large query sets: from CELLS_MIN_QUERIES queries per batch element, or
``GPAVATAR_KNN=cells``): the per-cell candidate lists of ``csrc/knn/knn_cells.h`` (see
its proof of exactness), built with torch ops on the device (no host sync) by
:func:`build_cells`: G^3 cells over the points' box joined with the queries' box,
U_C = the K-th smallest farthest-distance from the cell to a point, the list = the
points whose nearest distance to the cell is <= U_C (1 + 1e-5) + 1e-36, stored in
index order in a fixed number of slots per cell.  The same kernel then streams, for
each row, its cell's list instead of all points (a gather); rows outside the grid
or in a cell whose list overflows its slots stream every point.  The offer rule is
the same lexicographic (d, i) comparison, so the result is bit-identical.  A row
whose K-th distance is not below +inf (non-finite input only: the lists leave NaN
points out and do not order +inf ties) streams every point again.
"""

import os

import torch
import triton
import triton.language as tl

__all__ = ["knn"]

BLOCK_M = 32  # queries per program
BLOCK_P = 64  # points per streamed tile
NUM_WARPS = 4

_INT32_MAX = 2147483647
CELLS_MIN_QUERIES = 8192  # as the C++ kernels (csrc/ops.h kCellsMinQueries)
CELLS_PER_AXIS = 16
CELL_SLOTS = 768  # list entries stored per cell (GPAVATAR_KNN_CELL_BUDGET overrides)


@triton.jit
def _key(d):
    """The rank of a distance as an int32: the bits of d for numbers >= 0 and +inf (the same order),
    0x7FC00000 above them for NaN (any sign bit).  Keys bitcast back to the distance."""
    return tl.where(d != d, 0x7FC00000, d.to(tl.int32, bitcast=True))


@triton.jit
def _set_worst(sk, si, col, in_set, KP: tl.constexpr):
    """Largest (key, i) pair per row among the columns < K, and its column.

    sk: [BLOCK_M, KP] int32 keys, si: [BLOCK_M, KP] int32, col: [KP], in_set: [KP]
    """
    km = tl.where(in_set[None, :], sk, -1)
    wk = tl.max(km, 1)  # [BLOCK_M]
    is_k = km == wk[:, None]
    wi = tl.max(tl.where(is_k, si, -1), 1)  # [BLOCK_M]
    at = is_k & (si == wi[:, None])
    wc = tl.min(tl.where(at, col[None, :], KP), 1)  # [BLOCK_M]
    return wk, wi, wc


@triton.jit
def _offer_tile(sk, si, wk, wi, wc, key, pi2, ok, col, in_set, K, KP: tl.constexpr):
    """Offers a tile's candidates (key, pi2) [BLOCK_M, BLOCK_P] where ``ok`` to each row's set."""
    BIG: tl.constexpr = 2147483647
    # Candidates that beat the current worst entry of their row.
    qual = ((key < wk[:, None]) | ((key == wk[:, None]) & (pi2 < wi[:, None]))) & ok
    tk = tl.where(qual, key, BIG)
    ti = tl.where(qual, pi2, BIG)
    n_rounds = tl.minimum(tl.max(tl.sum(qual.to(tl.int32), 1), 0), K)
    for _r in range(0, n_rounds):
        mk = tl.min(tk, 1)  # [BLOCK_M] smallest remaining candidate
        mi = tl.min(tl.where(tk == mk[:, None], ti, BIG), 1)
        take = (mk < wk) | ((mk == wk) & (mi < wi))
        hit = take[:, None] & (col[None, :] == wc[:, None])
        sk = tl.where(hit, mk[:, None], sk)
        si = tl.where(hit, mi[:, None], si)
        gone = ti == mi[:, None]
        tk = tl.where(gone, BIG, tk)
        ti = tl.where(gone, BIG, ti)
        wk, wi, wc = _set_worst(sk, si, col, in_set, KP)
    return sk, si, wk, wi, wc


@triton.jit
def _knn_kernel(
    q_ptr,  # [B, M, 3] float32
    p_ptr,  # [B, P, 3] float32
    dist_ptr,  # [B, M, K] float32 (out)
    idx_ptr,  # [B, M, K] int64 (out)
    cell_ptr,  # [B, M] int32: the row's cell, -1 = stream every point (only with CELLS)
    count_ptr,  # [B, C] int32 list lengths (only with CELLS)
    list_ptr,  # [B, C, SLOTS] int32 candidate indices, index order (only with CELLS)
    M,
    P,
    K,
    C,
    SLOTS,
    BLOCK_M: tl.constexpr,
    BLOCK_P: tl.constexpr,
    KP: tl.constexpr,  # next power of two >= K
    CELLS: tl.constexpr,
):
    BIG: tl.constexpr = 2147483647  # key and index of empty slots / consumed candidates
    INF_KEY: tl.constexpr = 0x7F800000  # _key(+inf)
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    row_ok = rows < M
    q_off = (b * M + rows) * 3  # [BLOCK_M] int64
    qx = tl.load(q_ptr + q_off, mask=row_ok, other=0.0)
    qy = tl.load(q_ptr + q_off + 1, mask=row_ok, other=0.0)
    qz = tl.load(q_ptr + q_off + 2, mask=row_ok, other=0.0)

    col = tl.arange(0, KP)  # [KP]
    in_set = col < K
    sk = tl.full((BLOCK_M, KP), BIG, tl.int32)  # set keys (_key of the distances)
    si = tl.full((BLOCK_M, KP), BIG, tl.int32)  # set indices
    wk = tl.full((BLOCK_M,), BIG, tl.int32)  # worst (key, i) of the set and its column
    wi = tl.full((BLOCK_M,), BIG, tl.int32)
    wc = tl.zeros((BLOCK_M,), tl.int32)

    p_base = b * P
    if CELLS:
        # Each row streams its cell's list (or every point: cell -1 or an overflowing list).
        cell = tl.load(cell_ptr + b * M + rows, mask=row_ok, other=-1)
        n_list = tl.load(count_ptr + b * C + cell, mask=row_ok & (cell >= 0), other=0)
        listed = (cell >= 0) & (n_list <= SLOTS)
        length = tl.where(listed, n_list, P)
        length = tl.where(row_ok, length, 0)
        list_base = (b * C + tl.where(listed, cell, 0)).to(tl.int64) * SLOTS
        n_stream = tl.max(length, 0)
        for start in range(0, n_stream, BLOCK_P):
            j = start + tl.arange(0, BLOCK_P)  # [BLOCK_P] int32
            p_ok = j[None, :] < length[:, None]  # [BLOCK_M, BLOCK_P]
            from_list = tl.load(list_ptr + list_base[:, None] + j[None, :], mask=p_ok & listed[:, None], other=0)
            pi2 = tl.where(listed[:, None], from_list, j[None, :])
            p_off = (p_base + pi2) * 3
            px = tl.load(p_ptr + p_off, mask=p_ok, other=0.0)
            py = tl.load(p_ptr + p_off + 1, mask=p_ok, other=0.0)
            pz = tl.load(p_ptr + p_off + 2, mask=p_ok, other=0.0)
            dx = qx[:, None] - px  # [BLOCK_M, BLOCK_P]
            dy = qy[:, None] - py
            dz = qz[:, None] - pz
            key = _key((dx * dx + dy * dy) + dz * dz)
            sk, si, wk, wi, wc = _offer_tile(sk, si, wk, wi, wc, key, pi2, p_ok & row_ok[:, None], col, in_set,
                                             K, KP)
        # A list row whose K-th distance is not below +inf (non-finite or overflowing input: the
        # lists leave out NaN points and do not order +inf ties) streams every point again.
        redo = row_ok & listed & (wk >= INF_KEY)
        sk = tl.where(redo[:, None], BIG, sk)
        si = tl.where(redo[:, None], BIG, si)
        wk = tl.where(redo, BIG, wk)
        wi = tl.where(redo, BIG, wi)
        wc = tl.where(redo, 0, wc)
        n_all = tl.where(tl.max(redo.to(tl.int32), 0) > 0, P, 0)
        row_all = redo
    else:
        n_all = P
        row_all = row_ok
    for start in range(0, n_all, BLOCK_P):
        j = start + tl.arange(0, BLOCK_P)  # [BLOCK_P] int32
        p_ok1 = j < P
        p_off = (p_base + j) * 3  # [BLOCK_P] int64
        px = tl.load(p_ptr + p_off, mask=p_ok1, other=0.0)
        py = tl.load(p_ptr + p_off + 1, mask=p_ok1, other=0.0)
        pz = tl.load(p_ptr + p_off + 2, mask=p_ok1, other=0.0)
        dx = qx[:, None] - px[None, :]  # [BLOCK_M, BLOCK_P]
        dy = qy[:, None] - py[None, :]
        dz = qz[:, None] - pz[None, :]
        key = _key((dx * dx + dy * dy) + dz * dz)
        pi2 = j[None, :] + tl.zeros((BLOCK_M, BLOCK_P), tl.int32)
        sk, si, wk, wi, wc = _offer_tile(sk, si, wk, wi, wc, key, pi2, p_ok1[None, :] & row_all[:, None], col,
                                         in_set, K, KP)

    # Sort the set: K rounds of extract-min in (key, i) order.
    sk = tl.where(in_set[None, :], sk, BIG)
    si = tl.where(in_set[None, :], si, BIG)
    ok = tl.full((BLOCK_M, KP), BIG, tl.int32)
    oi = tl.zeros((BLOCK_M, KP), tl.int32)
    for r in range(0, K):
        mk = tl.min(sk, 1)
        mi = tl.min(tl.where(sk == mk[:, None], si, BIG), 1)
        slot = col[None, :] == r
        ok = tl.where(slot, mk[:, None], ok)
        oi = tl.where(slot, mi[:, None], oi)
        gone = (si == mi[:, None]) & (sk == mk[:, None])
        sk = tl.where(gone, BIG, sk)
        si = tl.where(gone, BIG, si)

    o_off = (b * M + rows)[:, None] * K + col[None, :]  # [BLOCK_M, KP] int64
    o_mask = row_ok[:, None] & in_set[None, :]
    tl.store(dist_ptr + o_off, ok.to(tl.float32, bitcast=True), mask=o_mask)
    tl.store(idx_ptr + o_off, oi.to(tl.int64), mask=o_mask)


def _env_int(name: str, default: int, lo: int, hi: int) -> int:
    text = os.environ.get(name, "")
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        value = lo - 1
    if not lo <= value <= hi:
        raise ValueError(f"{name} must be an integer in [{lo}, {hi}], got {text!r}")
    return value


def use_cells(M: int, P: int) -> bool:
    """GPAVATAR_KNN as the C++ kernels read it (``grid`` means brute force here)."""
    if os.environ.get("GPAVATAR_KNN_GRID") == "0":
        return False
    name = os.environ.get("GPAVATAR_KNN", "auto") or "auto"
    if name not in ("auto", "brute", "grid", "cells"):
        raise ValueError(f"GPAVATAR_KNN must be one of auto, brute, grid, cells; got {name!r}")
    if name == "auto":
        return P >= 256 and M >= CELLS_MIN_QUERIES
    return name == "cells"


def _geometry(points: torch.Tensor, queries: torch.Tensor, G: int):
    """csrc/knn/knn_cells.h cell_grid_geometry on the device: lo, cell, inv, sliver (B, 3) float32."""
    f64 = torch.float64
    plo, phi = points.amin(1).to(f64), points.amax(1).to(f64)
    qlo, qhi = queries.amin(1).to(f64), queries.amax(1).to(f64)
    reach = (phi - plo).amax(1, keepdim=True)
    ql = torch.where(qlo > plo - reach, qlo, plo - reach)  # NaN queries: ignored
    qh = torch.where(qhi < phi + reach, qhi, phi + reach)
    lo = torch.where(ql < plo, ql, plo)
    hi = torch.where(qh > phi, qh, phi)
    extent = hi - lo
    cell = extent / G
    flat = ~((cell >= 1e-30) & (extent <= 1e30))
    lo_f = torch.where(flat, torch.nan_to_num(plo, nan=0.0), lo).float()
    zero = torch.zeros_like(cell)
    sliver = 1e-3 * cell + 1e-6 * (lo.abs() + hi.abs())
    return (lo_f, torch.where(flat, zero, cell).float(), torch.where(flat, zero, G / extent).float(),
            torch.where(flat, zero, sliver).float())


def build_cells(queries: torch.Tensor, points: torch.Tensor, K: int, G: int, slots: int):
    """The cell of every query (B, M) int32 (-1 outside the grid), the list lengths (B, G^3)
    int32 and the lists (B, G^3, slots) int32, with torch ops only (no host sync)."""
    B, M, _ = queries.shape
    P = points.shape[1]
    lo, cell, inv, sliver = _geometry(points, queries, G)
    # Queries: inside the grid (within the sliver) and their cell, as query_cell.
    hi = lo + G * cell
    inside = ((queries >= (lo - sliver)[:, None]) & (queries <= (hi + sliver)[:, None])).all(-1)
    t = (queries - lo[:, None]) * inv[:, None]
    c = torch.where(t > 0, torch.minimum(t, torch.full_like(t, G - 1)), torch.zeros_like(t)).to(torch.int32)
    qcell = (c[..., 2] * G + c[..., 1]) * G + c[..., 0]
    qcell = torch.where(inside, qcell, torch.full_like(qcell, -1))
    # Cell boxes expanded by the sliver (float64 corners, stored float32).
    C = G ** 3
    ijk = torch.arange(C, device=points.device)
    ijk = torch.stack([ijk % G, (ijk // G) % G, ijk // (G * G)], -1).double()  # (C, 3)
    box_lo = (lo.double()[:, None] + ijk[None] * cell.double()[:, None] - sliver.double()[:, None]).float()
    box_hi = (lo.double()[:, None] + (ijk[None] + 1) * cell.double()[:, None] + sliver.double()[:, None]).float()
    counts = torch.empty((B, C), dtype=torch.int32, device=points.device)
    lists = torch.empty((B, C, slots), dtype=torch.int32, device=points.device)
    chunk = max(1, (1 << 21) // max(1, B * P))  # cells per chunk: ~2M (cell, point) pairs
    order_key = torch.arange(P, device=points.device)
    for start in range(0, C, chunk):
        a = box_lo[:, start:start + chunk, None, :]  # (B, c, 1, 3)
        b = box_hi[:, start:start + chunk, None, :]
        p = points[:, None]  # (B, 1, P, 3)
        far = torch.maximum(p - a, b - p)
        far2 = (far[..., 0] * far[..., 0] + far[..., 1] * far[..., 1]) + far[..., 2] * far[..., 2]
        far2 = torch.where(far2 == far2, far2, float("inf"))  # a NaN point: as far as can be (box_max_dist2)
        bound = far2.kthvalue(K, dim=-1).values * (1.0 + 1e-5) + 1e-36
        near = torch.clamp_min(torch.maximum(a - p, p - b), 0.0)
        near2 = (near[..., 0] * near[..., 0] + near[..., 1] * near[..., 1]) + near[..., 2] * near[..., 2]
        keep = near2 <= bound[..., None]
        counts[:, start:start + chunk] = keep.sum(-1, dtype=torch.int32)
        key = torch.where(keep, order_key, order_key + P)  # listed points first, in index order
        k = min(slots, P)
        lists[:, start:start + chunk, :k] = key.topk(k, dim=-1, largest=False, sorted=True).values.to(torch.int32)
    return qcell.to(torch.int32).contiguous(), counts, lists


def knn(queries: torch.Tensor, points: torch.Tensor, K: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K nearest points of every query; see the module docstring.

    queries: (B, M, 3) float32 contiguous, points: (B, P, 3) float32 contiguous,
    1 <= K <= min(P, 32) (validated by the caller).
    Returns dist2 (B, M, K) float32 ascending and idx (B, M, K) int64.
    """
    B, M, _ = queries.shape
    P = points.shape[1]
    K = int(K)
    dist2 = torch.empty((B, M, K), dtype=torch.float32, device=queries.device)
    idx = torch.empty((B, M, K), dtype=torch.int64, device=queries.device)
    if B == 0 or M == 0:
        return dist2, idx
    assert P < _INT32_MAX, "knn: P must fit in int32"
    KP = max(2, triton.next_power_of_2(K))
    grid = (triton.cdiv(M, BLOCK_M), B)
    if use_cells(M, P):
        G = _env_int("GPAVATAR_KNN_CELLS", CELLS_PER_AXIS, 1, 32)
        slots = _env_int("GPAVATAR_KNN_CELL_BUDGET", CELL_SLOTS, 0, 1 << 20)
        qcell, counts, lists = build_cells(queries, points, K, G, max(slots, 1))
        if slots == 0:
            counts.fill_(_INT32_MAX)  # every list overflows: stream every point (tests)
        _knn_kernel[grid](
            queries, points, dist2, idx, qcell, counts, lists, M, P, K, G ** 3, max(slots, 1),
            BLOCK_M=BLOCK_M, BLOCK_P=BLOCK_P, KP=KP, CELLS=True,
            num_warps=NUM_WARPS, enable_fp_fusion=False,
        )
        return dist2, idx
    _knn_kernel[grid](
        queries, points, dist2, idx, queries, queries, queries, M, P, K, 1, 1,
        BLOCK_M=BLOCK_M, BLOCK_P=BLOCK_P, KP=KP, CELLS=False,
        num_warps=NUM_WARPS, enable_fp_fusion=False,
    )
    return dist2, idx
