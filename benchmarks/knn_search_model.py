"""A model of the CUDA cell search's work (no GPU needed): for warps of 32 queries in bucket
order, how many list entries each lane scans before its band stop, how many it inserts into
its top-K, how many steps the warp runs (its slowest lane) and in how many of them some lane
inserts (the divergent path); the same for the grouped scan (GROUP entries a step), and both
as warp instructions estimated from the sm_90 code's counts.

    python benchmarks/knn_search_model.py --dist render --grids 12,16,24 --warps 200

The lists follow knn_cells.h (U_C, the admission bound, 16 distance bands, index order within
a band) in float64, so the counts are those of the kernel up to rounding at the boundaries.

``--order centre`` models the same lists sorted by each entry's distance r from the cell's centre,
a query stopping at the first entry with r - |q - c| > its K-th distance (exact: every later entry
is at least that far from q); ``centre-bands`` the same with ``--bands`` equal bands of r over
[0, the list's largest r] and the test at band starts; ``centre-fixed`` the bands
GPAVATAR_KNN_CUDA_ORDER=centre builds (knn_cells.h: edges over [sqrt(bound) - 2h, sqrt(bound) + h],
h the cell's half-diagonal).  ``--sub`` orders the queries within a cell: by octant (not built), or by
levels of the distance from the centre (``radius``: the CUDA centre order buckets its queries so).
MODEL_BANDS sets the box order's band count (16, as built).
"""

from __future__ import annotations

import argparse
import heapq
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _distributions  # noqa: E402

BANDS = int(os.environ.get("MODEL_BANDS", 16))
# The grouped scan (GPAVATAR_KNN_CUDA_SEARCH=grouped, knn_cells.h's scan_grouped) takes GROUP entries
# a step.  Instruction counts of the sm_90 code (nvcc 13.0, cuobjdump): a refused entry of the banded
# loop ~35 (a third of them register moves), a refused group of the grouped loop ~50; an offer that
# inserts ~40 more (the compare-and-swap pass), an entry offered in a grouped step ~15 before that.
GROUP = 4
INSTR_BANDED_STEP, INSTR_GROUP_STEP, INSTR_INSERT, INSTR_GROUP_OFFER = 35, 50, 40, 15


def grid(q: np.ndarray, p: np.ndarray, G: int):
    """lo and cell size of knn_cells.h's grid (points' box joined with the clipped queries' box)."""
    plo, phi, qlo, qhi = p.min(0), p.max(0), q.min(0), q.max(0)
    reach = (phi - plo).max()
    lo = np.minimum(plo, np.maximum(qlo, plo - reach))
    hi = np.maximum(phi, np.minimum(qhi, phi + reach))
    return lo, (hi - lo) / G


def cell_list(p: np.ndarray, lo, cell, G: int, c: int, K: int):
    """(indices, bands, band floors) of cell c's list, in scan order."""
    ix = np.array([c % G, (c // G) % G, c // (G * G)])
    blo, bhi = lo + ix * cell - 1e-3 * cell, lo + (ix + 1) * cell + 1e-3 * cell
    max_d = (np.maximum(p - blo, bhi - p) ** 2).sum(1)
    bound = np.partition(max_d, K - 1)[K - 1] * (1 + 1e-5)
    key = (np.maximum(np.maximum(blo - p, p - bhi), 0) ** 2).sum(1)
    keep = np.nonzero(key <= bound)[0]
    floors = bound * np.arange(BANDS) ** 2 / BANDS**2
    band = np.searchsorted(floors, key[keep], side="right") - 1
    o = np.lexsort((keep, band))
    return keep[o], band[o], floors


def scan(d: np.ndarray, band: np.ndarray, floors: np.ndarray, K: int):
    """(entries scanned, insert flags) of scan_banded for one query."""
    ins = np.zeros(len(d), bool)
    heap: list[float] = []  # the K smallest so far, negated
    for s in range(len(d)):
        worst = -heap[0] if len(heap) == K else np.inf
        if (s == 0 or band[s] != band[s - 1]) and floors[band[s]] > worst:
            return s, ins
        if d[s] < worst:
            ins[s] = True
            (heapq.heapreplace if len(heap) == K else heapq.heappush)(heap, -d[s])
    return len(d), ins


def scan_centre(d: np.ndarray, r: np.ndarray, s: float, K: int, bands: int = 0,
                edges: np.ndarray | None = None) -> tuple[int, np.ndarray]:
    """(entries scanned, insert flags) of one query (distance s from the cell centre) over a list
    sorted by r (the entries' distances from the centre, ascending; d: the query's distances to
    them): it stops at the first entry, or with ``bands`` at the first band start, whose r - s
    exceeds the K-th distance so far."""
    band = np.minimum((r / max(r[-1], 1e-30) * bands).astype(int), bands - 1) if bands and len(r) else None
    floor = r[-1] / bands if bands and len(r) else 0.0
    if edges is not None:  # band j: r >= edges[j] (edges[0] = -inf)
        band = np.searchsorted(edges, r, side="right") - 1
    ins = np.zeros(len(d), bool)
    heap: list[float] = []  # the K smallest distances so far, negated
    for i in range(len(d)):
        if len(heap) == K:
            start = band is not None and (i == 0 or band[i] != band[i - 1])
            if edges is not None:
                test = edges[band[i]] if start else -np.inf
            else:
                test = (band[i] * floor if start else -np.inf) if bands else r[i]
            if test - s > -heap[0]:
                return i, ins
        if len(heap) < K:
            ins[i] = True
            heapq.heappush(heap, -d[i])
        elif d[i] < -heap[0]:
            ins[i] = True
            heapq.heapreplace(heap, -d[i])
    return len(d), ins


def pooled(work: list, refill: int) -> tuple[int, int]:
    """(steps, steps with an insert) of a warp whose 32 lanes take the queries of ``work`` (each its
    (entries scanned, insert flags)) in order, a lane taking the next one as soon as it is done
    (``refill`` steps to load it)."""
    free = [(0, lane) for lane in range(32)]
    heapq.heapify(free)
    insert_at = np.zeros(0, bool)
    end = 0
    for n, ins in work:
        start, lane = heapq.heappop(free)
        stop = start + n
        if len(insert_at) < stop:
            insert_at = np.concatenate([insert_at, np.zeros(stop - len(insert_at), bool)])
        insert_at[start:stop] |= ins[:n]
        end = max(end, stop)
        heapq.heappush(free, (stop + refill, lane))
    return end, int(insert_at.sum())


def model(q: np.ndarray, p: np.ndarray, G: int, K: int, warps: int, seed: int = 0, list_order: str = "box",
          bands: int = BANDS, sub: str = "none", pool: int = 32, refill: int = 2, sub_levels: int = 16) -> dict:
    lo, cell = grid(q, p, G)
    c3 = np.clip(((q - lo) / cell).astype(int), 0, G - 1)
    cid = (c3[:, 2] * G + c3[:, 1]) * G + c3[:, 0]
    if sub == "octant":  # queries grouped by cell, then by the octant of the cell they lie in
        o3 = np.clip(((q - lo) / cell * 2).astype(int), 0, 2 * G - 1) % 2
        order = np.lexsort((o3[:, 0] + 2 * o3[:, 1] + 4 * o3[:, 2], cid))
    elif sub == "radius":  # grouped by cell, then by sub_levels levels of the distance from the cell centre
        centre = lo + (c3 + 0.5) * cell
        s_rel = np.sqrt(((q - centre) ** 2).sum(1)) / np.sqrt((cell ** 2).sum() / 4)
        order = np.lexsort((np.minimum((s_rel * sub_levels).astype(int), sub_levels - 1), cid))
    else:
        order = np.argsort(cid, kind="stable")
    lists: dict[int, tuple] = {}
    starts = np.random.default_rng(seed).integers(0, len(q) // pool, warps) * pool
    scanned = inserts = steps = insert_steps = lanes = group_steps = group_offers = 0
    lengths = []
    for s0 in starts:
        runs: dict[int, list[int]] = {}
        work = {}
        for qi in order[s0:s0 + pool]:
            runs.setdefault(int(cid[qi]), []).append(qi)
        # Lanes of other cells run the same loop over their own list (no serialisation): the
        # warp's steps are its slowest lane's, an insert step is a position where some lane inserts.
        longest, insert_at = 0, np.zeros(0, bool)
        for c, members in runs.items():
            if c not in lists:
                lists[c] = cell_list(p, lo, cell, G, c, K)
            idx, band, floors = lists[c]
            lengths.append(len(idx))
            if list_order != "box":
                centre = lo + (np.array([c % G, (c // G) % G, c // (G * G)]) + 0.5) * cell
                r = np.sqrt(((p[idx] - centre) ** 2).sum(1))
                by_r = np.argsort(r, kind="stable")
            for qi in members:
                if list_order == "box":
                    n, ins = scan(((p[idx] - q[qi]) ** 2).sum(1), band, floors, K)
                else:
                    d = np.sqrt(((p[idx[by_r]] - q[qi]) ** 2).sum(1))
                    edges = None
                    if list_order == "centre-fixed":  # edges from the bound and the half-diagonal h only
                        h = float(np.sqrt((cell ** 2).sum()) / 2)
                        rb = float(np.sqrt(floors[-1] * BANDS ** 2 / (BANDS - 1) ** 2))  # sqrt(bound)
                        lo_r, hi_r = max(0.0, rb - 2 * h), rb + h
                        edges = lo_r + (hi_r - lo_r) * np.arange(bands) / bands
                        edges[0] = -np.inf
                    n, ins = scan_centre(d, r[by_r], float(np.sqrt(((q[qi] - centre) ** 2).sum())), K,
                                         bands=bands if list_order == "centre-bands" else 0, edges=edges)
                scanned, inserts, lanes = scanned + n, inserts + int(ins[:n].sum()), lanes + 1
                work[qi] = (n, ins)
                longest = max(longest, n)
                if len(insert_at) < n:
                    insert_at = np.concatenate([insert_at, np.zeros(n - len(insert_at), bool)])
                insert_at[:n] |= ins[:n]
        if pool > 32:  # lanes take the next query when done (per 32 queries below)
            longest, n_ins = pooled([work[qi] for qi in order[s0:s0 + pool]], refill)
            steps += longest * 32 / pool
            insert_steps += n_ins * 32 / pool
        else:
            steps += longest
            insert_steps += int(insert_at.sum())
            # the grouped scan: ceil(longest / GROUP) steps (band boundaries ignored), each offering its
            # GROUP entries when some lane may insert one of them
            padded = np.zeros(-(-longest // GROUP) * GROUP, bool)
            padded[:len(insert_at)] = insert_at[:len(padded)]
            group_steps += len(padded) // GROUP
            group_offers += int(padded.reshape(-1, GROUP).any(1).sum())
    out = dict(G=G, list=float(np.mean(lengths)), scanned=scanned / lanes,
               inserts=inserts / lanes, warp_steps=steps / warps, insert_steps=insert_steps / warps,
               lane_use=scanned / lanes / (steps / warps))
    if pool <= 32:  # warp instructions estimated from the SASS counts above
        out.update(group_steps=group_steps / warps, group_offers=group_offers / warps,
                   instr_banded=(steps * INSTR_BANDED_STEP + insert_steps * INSTR_INSERT) / warps,
                   instr_grouped=(group_steps * INSTR_GROUP_STEP
                                  + group_offers * GROUP * INSTR_GROUP_OFFER + insert_steps * INSTR_INSERT) / warps)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dist", default="render")
    ap.add_argument("--M", type=int, default=524288)
    ap.add_argument("--P", type=int, default=5023)
    ap.add_argument("--K", type=int, default=8)
    ap.add_argument("--grids", default="12,16,24")
    ap.add_argument("--warps", type=int, default=200)
    ap.add_argument("--order", choices=("box", "centre", "centre-bands", "centre-fixed"), default="box",
                    help="box: today's lists; centre / centre-bands: sorted by distance from the cell centre "
                         "(module docstring)")
    ap.add_argument("--bands", type=int, default=BANDS, help="bands of r for --order centre-bands")
    ap.add_argument("--sub", choices=("none", "octant", "radius"), default="none",
                    help="query order within a cell: as given, by octant, or by --sub-levels levels of the distance "
                         "from the centre (radius with 16 levels: the CUDA centre order's buckets)")
    ap.add_argument("--sub-levels", type=int, default=16)
    ap.add_argument("--pool", type=int, default=32,
                    help="queries a warp takes at once (> 32: a lane takes the next one when done, 2 steps to "
                         "load it; steps are then given per 32 queries)")
    args = ap.parse_args(argv)
    q, p = _distributions.make_queries(args.dist, 1, args.M, args.P, device=torch.device("cpu"))
    q, p = q[0].double().numpy(), p[0].double().numpy()
    print(f"{args.dist}: M={args.M} P={args.P} K={args.K}, {args.warps} warps of 32 queries in bucket order, "
          f"order {args.order}\n")
    print("| G | mean list | scanned / lane | inserts / lane | warp steps | steps with an insert | lane use | "
          f"grouped steps ({GROUP}) | with an offer | instructions banded | grouped |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for G in (int(g) for g in args.grids.split(",")):
        r = model(q, p, G, args.K, args.warps, list_order=args.order, bands=args.bands,
                  sub=args.sub, pool=args.pool, sub_levels=args.sub_levels)
        grouped = (f"{r['group_steps']:.0f} | {r['group_offers']:.0f} | {r['instr_banded']:.0f} | "
                   f"{r['instr_grouped']:.0f}" if "group_steps" in r else "- | - | - | -")
        print(f"| {G} | {r['list']:.0f} | {r['scanned']:.0f} | {r['inserts']:.1f} | {r['warp_steps']:.0f} | "
              f"{r['insert_steps']:.0f} | {r['lane_use']:.0%} | {grouped} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
