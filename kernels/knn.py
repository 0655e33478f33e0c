"""K nearest neighbours in Triton (the pytorch3d ``knn_points`` contract).

Shapes:
    queries (B, M, 3) float32, points (B, P, 3) float32, 1 <= K <= min(P, 32)
    -> dist2 (B, M, K) float32 ascending, idx (B, M, K) int64

Math, for query q = queries[b, m] and point p = points[b, i]:
    d(q, p) = (dx*dx + dy*dy) + dz*dz,   dx = qx - px, ...   (fp32, no FMA)
The K smallest pairs (d, i) in lexicographic order are returned, so equal
distances keep the lower point index first.  The arithmetic order matches the
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
"""

import torch
import triton
import triton.language as tl

__all__ = ["knn"]

BLOCK_M = 32  # queries per program
BLOCK_P = 64  # points per streamed tile
NUM_WARPS = 4

_INT32_MAX = 2147483647


@triton.jit
def _set_worst(sd, si, col, in_set, KP: tl.constexpr):
    """Largest (d, i) pair per row among the columns < K, and its column.

    sd: [BLOCK_M, KP] float32, si: [BLOCK_M, KP] int32, col: [KP], in_set: [KP]
    """
    dm = tl.where(in_set[None, :], sd, float("-inf"))
    wd = tl.max(dm, 1)  # [BLOCK_M]
    is_d = dm == wd[:, None]
    wi = tl.max(tl.where(is_d, si, -1), 1)  # [BLOCK_M]
    at = is_d & (si == wi[:, None])
    wc = tl.min(tl.where(at, col[None, :], KP), 1)  # [BLOCK_M]
    return wd, wi, wc


@triton.jit
def _knn_kernel(
    q_ptr,  # [B, M, 3] float32
    p_ptr,  # [B, P, 3] float32
    dist_ptr,  # [B, M, K] float32 (out)
    idx_ptr,  # [B, M, K] int64 (out)
    M,
    P,
    K,
    BLOCK_M: tl.constexpr,
    BLOCK_P: tl.constexpr,
    KP: tl.constexpr,  # next power of two >= K
):
    BIG: tl.constexpr = 2147483647  # index of empty slots / consumed candidates
    INF: tl.constexpr = float("inf")
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
    sd = tl.full((BLOCK_M, KP), INF, tl.float32)  # set distances
    si = tl.full((BLOCK_M, KP), BIG, tl.int32)  # set indices
    wd = tl.full((BLOCK_M,), INF, tl.float32)  # worst (d, i) of the set and its column
    wi = tl.full((BLOCK_M,), BIG, tl.int32)
    wc = tl.zeros((BLOCK_M,), tl.int32)

    p_base = b * P
    for start in range(0, P, BLOCK_P):
        pidx = start + tl.arange(0, BLOCK_P)  # [BLOCK_P] int32
        p_ok = pidx < P
        p_off = (p_base + pidx) * 3  # [BLOCK_P] int64
        px = tl.load(p_ptr + p_off, mask=p_ok, other=0.0)
        py = tl.load(p_ptr + p_off + 1, mask=p_ok, other=0.0)
        pz = tl.load(p_ptr + p_off + 2, mask=p_ok, other=0.0)
        dx = qx[:, None] - px[None, :]  # [BLOCK_M, BLOCK_P]
        dy = qy[:, None] - py[None, :]
        dz = qz[:, None] - pz[None, :]
        d = (dx * dx + dy * dy) + dz * dz

        # Candidates that beat the current worst entry of their row.
        pi2 = pidx[None, :] + tl.zeros((BLOCK_M, BLOCK_P), tl.int32)
        qual = (d < wd[:, None]) | ((d == wd[:, None]) & (pi2 < wi[:, None]))
        qual = qual & p_ok[None, :] & row_ok[:, None]
        td = tl.where(qual, d, INF)
        ti = tl.where(qual, pi2, BIG)
        n_rounds = tl.minimum(tl.max(tl.sum(qual.to(tl.int32), 1), 0), K)

        for _r in range(0, n_rounds):
            md = tl.min(td, 1)  # [BLOCK_M] smallest remaining candidate
            mi = tl.min(tl.where(td == md[:, None], ti, BIG), 1)
            take = (md < wd) | ((md == wd) & (mi < wi))
            hit = take[:, None] & (col[None, :] == wc[:, None])
            sd = tl.where(hit, md[:, None], sd)
            si = tl.where(hit, mi[:, None], si)
            gone = ti == mi[:, None]
            td = tl.where(gone, INF, td)
            ti = tl.where(gone, BIG, ti)
            wd, wi, wc = _set_worst(sd, si, col, in_set, KP)

    # Sort the set: K rounds of extract-min in (d, i) order.
    sd = tl.where(in_set[None, :], sd, INF)
    si = tl.where(in_set[None, :], si, BIG)
    od = tl.full((BLOCK_M, KP), INF, tl.float32)
    oi = tl.zeros((BLOCK_M, KP), tl.int32)
    for r in range(0, K):
        md = tl.min(sd, 1)
        mi = tl.min(tl.where(sd == md[:, None], si, BIG), 1)
        slot = col[None, :] == r
        od = tl.where(slot, md[:, None], od)
        oi = tl.where(slot, mi[:, None], oi)
        gone = (si == mi[:, None]) & (sd == md[:, None])
        sd = tl.where(gone, INF, sd)
        si = tl.where(gone, BIG, si)

    o_off = (b * M + rows)[:, None] * K + col[None, :]  # [BLOCK_M, KP] int64
    o_mask = row_ok[:, None] & in_set[None, :]
    tl.store(dist_ptr + o_off, od, mask=o_mask)
    tl.store(idx_ptr + o_off, oi.to(tl.int64), mask=o_mask)


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
    _knn_kernel[grid](
        queries, points, dist2, idx, M, P, K,
        BLOCK_M=BLOCK_M, BLOCK_P=BLOCK_P, KP=KP,
        num_warps=NUM_WARPS, enable_fp_fusion=False,
    )
    return dist2, idx
