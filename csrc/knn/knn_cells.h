// Exact K-nearest search with per-cell candidate lists, for the regime of the
// PEF: P ~ 1e3-1e4 points, M ~ 1e5-1e6 queries in a bounded box, K <= 32.
// Shared by the CPU loop (knn_cpu.cpp) and the CUDA kernels (knn.cu); no torch
// types.
//
// Per batch element, a uniform grid of G^3 cells covers the points' bounding
// box joined with the queries' bounding box (the latter clipped to one
// point-cloud extent around the points, so a few far queries do not stretch
// the cells).  For every cell C (its box expanded by a sliver, see below):
//
//   U_C = the K-th smallest, over all points p, of maxdist^2(p, C)
//   L_C = { p : mindist^2(p, C) <= U_C }            (in increasing index order)
//
// Why L_C holds the K nearest points of every query x inside C: the K points
// that define U_C are each within maxdist(p, C) <= sqrt(U_C) of x, so the K-th
// nearest distance d_K(x) <= sqrt(U_C); a point among the K nearest of x (ties
// included) has |x - p| <= d_K(x), and mindist(p, C) <= |x - p|, so it passes
// the test.  Scanning L_C with the distance arithmetic and the tie rule of
// knn.h therefore returns exactly what the brute-force scan returns.
//
// Rounding.  Distances are float: each of mindist^2, maxdist^2 and the query
// distance carries a relative error below 1e-6, so the test uses
// U_C * (1 + 1e-5) + 1e-36 (the absolute term covers underflow to denormals).
// A query is binned by rounding (v - lo) * inv_cell; its cell's box is
// expanded by a sliver (1e-3 of a cell plus 1e-6 of the coordinates'
// magnitude) that exceeds any binning or corner rounding, so the query lies
// inside the box the list was built for.  Queries outside the grid (beyond the
// sliver), and queries of a cell whose list overflows the storage, take the
// brute-force scan: still exact, just slower.
#pragma once

#include <cmath>

#include "knn/knn.h"

namespace gpavatar {
namespace knn {

// Per batch element: lo[3], cell size[3], 1 / cell size[3], sliver[3]
// (cell size, inverse and sliver are 0 on a degenerate axis), then the lists'
// band order (kGeomOrder: kOrderBox or kOrderCentre, below) and 3 unused floats.
constexpr int kCellGeomStride = 16;
constexpr int kGeomOrder = 12;

GPA_HD float min_f(float a, float b) { return a < b ? a : b; }

// The grid of one batch element from the points' box (plo, phi) and the
// queries' box (qlo, qhi); writes kCellGeomStride floats to geom.
GPA_HD void cell_grid_geometry(const float plo[3], const float phi[3], const float qlo[3],
                               const float qhi[3], int G, float* geom) {
  double reach = 0.0;
  for (int a = 0; a < 3; ++a) {
    const double e = static_cast<double>(phi[a]) - static_cast<double>(plo[a]);
    if (e > reach) reach = e;
  }
  for (int a = 0; a < 3; ++a) {
    double lo = plo[a], hi = phi[a];
    // Queries within one extent of the points' box share the grid.
    const double ql = qlo[a] > lo - reach ? static_cast<double>(qlo[a]) : lo - reach;
    const double qh = qhi[a] < hi + reach ? static_cast<double>(qhi[a]) : hi + reach;
    if (ql < lo) lo = ql;
    if (qh > hi) hi = qh;
    const double extent = hi - lo;
    const double cell = extent / G;
    // A degenerate axis (no extent, denormal cells, or non-finite input):
    // one flat layer; only queries exactly at lo are inside.
    const bool flat = !(cell >= 1e-30) || !(extent <= 1e30);
    const float lo_f = flat ? (plo[a] == plo[a] ? plo[a] : 0.0f) : static_cast<float>(lo);
    const double lo_abs = lo < 0 ? -lo : lo, hi_abs = hi < 0 ? -hi : hi;
    geom[a] = lo_f;
    geom[3 + a] = flat ? 0.0f : static_cast<float>(cell);
    geom[6 + a] = flat ? 0.0f : static_cast<float>(G / extent);
    geom[9 + a] = flat ? 0.0f : static_cast<float>(add_rn(mul_rn(1e-3, cell), mul_rn(1e-6, lo_abs + hi_abs)));
  }
}

// The upper edge of the grid along axis a (without the sliver).
GPA_HD float grid_top(const float* geom, int G, int a) { return add_rn(geom[a], mul_rn(static_cast<float>(G), geom[3 + a])); }

// Cell (0 .. G^3 - 1) of a query, or -1 when it lies outside the grid.
GPA_HD int query_cell(const float* geom, int G, float x, float y, float z) {
  const float v[3] = {x, y, z};
  int c[3];
  for (int a = 0; a < 3; ++a) {
    const float lo = geom[a], inv = geom[6 + a], sliver = geom[9 + a];
    const float hi = grid_top(geom, G, a);
    if (!(v[a] >= lo - sliver && v[a] <= hi + sliver)) return -1;  // NaN: outside
    const float t = (v[a] - lo) * inv;
    const int top = G - 1;
    c[a] = t > 0.0f ? (t < static_cast<float>(top) ? static_cast<int>(t) : top) : 0;
  }
  return (c[2] * G + c[1]) * G + c[0];
}

// The box of a cell, expanded by the sliver.
GPA_HD void cell_box(const float* geom, int G, int cell, float lo[3], float hi[3]) {
  const int c[3] = {cell % G, (cell / G) % G, cell / (G * G)};
  for (int a = 0; a < 3; ++a) {
    const double base = geom[a], size = geom[3 + a], sliver = geom[9 + a];
    lo[a] = static_cast<float>(add_rn(base, mul_rn(static_cast<double>(c[a]), size)) - sliver);
    hi[a] = static_cast<float>(add_rn(base, mul_rn(static_cast<double>(c[a] + 1), size)) + sliver);
  }
}

// Squared distance from p to the nearest / farthest location of a box.
GPA_HD float box_min_dist2(const float lo[3], const float hi[3], float x, float y, float z) {
  const float dx = max_f(max_f(lo[0] - x, x - hi[0]), 0.0f);
  const float dy = max_f(max_f(lo[1] - y, y - hi[1]), 0.0f);
  const float dz = max_f(max_f(lo[2] - z, z - hi[2]), 0.0f);
  return sum_of_products3(dx, dx, dy, dy, dz, dz);
}

// A NaN point (or an infinite one: inf - inf) is as far as can be, +inf: it is never
// a cell's seed, and every backend ranks it the same way.
GPA_HD float box_max_dist2(const float lo[3], const float hi[3], float x, float y, float z) {
  const float dx = max_f(x - lo[0], hi[0] - x);
  const float dy = max_f(y - lo[1], hi[1] - y);
  const float dz = max_f(z - lo[2], hi[2] - z);
  const float d = sum_of_products3(dx, dx, dy, dy, dz, dz);
  return d == d ? d : INFINITY;
}

// The admission bound of a cell's list from U_C (see the header comment).
GPA_HD float candidate_bound(float kth_max_dist2) { return add_rn(mul_rn(kth_max_dist2, 1.0f + 1e-5f), 1e-36f); }

// Offers a list of candidates, in increasing index order, to `best`.
template <typename List>
GPA_HD void scan_candidates(const float* x, const float* y, const float* z, const int* index,
                            int64_t n, float qx, float qy, float qz, List& best) {
  for (int64_t s = 0; s < n; ++s) {
    const float d = squared_distance(qx, qy, qz, x[s], y[s], z[s]);
    if (best.accepts(d)) best.push(d, index[s]);
  }
}

// (scan_all, the brute force over points (P, 3) for queries outside the grid and overflow: knn.h)

// --- Banded lists (the CUDA path) ---------------------------------------------
// A cell's list is stored band after band, in index order within a band; a query
// stops before the first band that cannot hold one of its K neighbours.  Two
// orders (GPAVATAR_KNN_CUDA_ORDER, read by the build and the search: the lists
// record theirs in geom[kGeomOrder], and a search of the other order sends their
// queries to the brute-force scan, still exact):
//
// box (the default): by key = mindist^2(p, cell box), band j holding the keys in
// [band_floor(bound, j), band_floor(bound, j + 1)) (the last band is open above),
// where bound is the list's admission bound.  A query x in the cell has
// |x - p|^2 >= key for every p (the float evaluations of both are monotone in the
// per-axis gaps, and x lies in the box), so once it holds K neighbours whose worst
// distance is below band_floor(bound, j), nothing in band j or later can enter,
// not even as a tie: the scan stops there.
//
// centre: by r = |p - c| (c the centre of the cell's box), band j >= 1 holding
// r >= centre_edge(j) (the largest such j; band 0 the rest), with edges evenly
// spaced over [sqrt(bound) - 2h, sqrt(bound) + h] (h the box's half-diagonal;
// every kept point has r <= mindist + h <= sqrt(bound) + h, and the queries' K-th
// distances, which set where they stop, lie near sqrt(bound) - h ... sqrt(bound)).
// The list then runs roughly outwards from the centre: nearer candidates first
// (fewer top-K insertions), and a query x at s = |x - c| stops before band j once
// g = edge_j - s > 0 and g^2 > its K-th distance (|x - p| >= r - s >= g for every
// later p).  Rounding: r and s are float (relative errors below 1e-6), so the test
// uses edge_j (1 - 1e-5) - s (1 + 1e-5) and the bound's margin (candidate_bound).
// benchmarks/knn_search_model.py --order centre-fixed models the two orders' work.
constexpr int kCellBands = 16;
constexpr int kOrderBox = 0;
constexpr int kOrderCentre = 1;
// The CUDA scan of a query's list (GPAVATAR_KNN_CUDA_SEARCH: banded, unrolled, buffered,
// grouped): scan_banded, scan_banded with the next entry prefetched, scan_buffered,
// scan_grouped (below).  The same neighbours from each.
constexpr int kSearchBanded = 0;
constexpr int kSearchUnrolled = 1;
constexpr int kSearchBuffered = 2;
constexpr int kSearchGrouped = 3;

// bound * (j / kCellBands)^2 (0 for j = 0, also for an infinite bound).
GPA_HD float band_floor(float bound, int j) {
  return j == 0 ? 0.0f : bound * static_cast<float>(j * j) * (1.0f / (kCellBands * kCellBands));
}

// The largest j in 1 .. kCellBands - 1 with reaches(j), else 0, for a test that holds up to
// some j and not after (a key against edges that do not decrease with j): a binary search,
// 4 tests instead of 15.
static_assert(kCellBands == 16, "last_band searches 16 bands in four steps");
template <typename Reaches>
GPA_HD int last_band(const Reaches& reaches) {
  int band = 0;
  for (int step = kCellBands / 2; step > 0; step >>= 1) band = reaches(band + step) ? band + step : band;
  return band;
}

// The band of a key: the largest j with key >= band_floor(bound, j) (0 for NaN; the floors do
// not decrease with j: bound >= 0, every product rounded on its own).
GPA_HD int band_of(float key, float bound) {
  return last_band([&](int j) { return key >= band_floor(bound, j); });
}

// The centre order's frame of a cell's box: its centre, and the first edge and
// spacing of its bands for the list's admission bound.
struct CentreBands {
  float c[3];
  float first, step;
};

// (Every product is rounded on its own: the build and the search must compute the
// same edges wherever the compiler inlines them.)
GPA_HD CentreBands centre_bands(const float lo[3], const float hi[3], float bound) {
  CentreBands f;
  float e[3];
  for (int a = 0; a < 3; ++a) {
    f.c[a] = 0.5f * (lo[a] + hi[a]);
    e[a] = 0.5f * (hi[a] - lo[a]);
  }
  const float h = sqrtf(sum_of_products3(e[0], e[0], e[1], e[1], e[2], e[2])), rb = sqrtf(bound);
  f.first = max_f(rb - mul_rn(2.0f, h), 0.0f);
  f.step = mul_rn(rb + h - f.first, 1.0f / kCellBands);
  return f;
}

// Edge j (>= 1) of the centre order's bands.
GPA_HD float centre_edge(const CentreBands& f, int j) { return f.first + mul_rn(static_cast<float>(j), f.step); }

// A list entry's band: box order by key = mindist^2 (the admission key), centre order
// by its distance r from the centre (NaN: band 0).
GPA_HD int list_band(int order, const CentreBands& f, float key, float bound, float x, float y, float z) {
  if (order != kOrderCentre) return band_of(key, bound);
  const float r = sqrtf(squared_distance(f.c[0], f.c[1], f.c[2], x, y, z));
  return last_band([&](int j) { return r >= centre_edge(f, j); });  // (step >= 0: the edges do not decrease)
}

// Where a query stops scanning a list: before band j once stops(j, worst).  Box order:
template <int Order>
struct BandStop {
  float bound;  // the list's admission bound
  GPA_HD bool stops(int j, float worst) const { return band_floor(bound, j) > worst; }
};

// Centre order: the band edges of the cell, and the query's |x - c| (1 + 1e-5).
template <>
struct BandStop<kOrderCentre> {
  CentreBands f;
  float reach;
  GPA_HD bool stops(int j, float worst) const {
    const float gap = mul_rn(centre_edge(f, j), 1.0f - 1e-5f) - reach;
    return j > 0 && gap > 0.0f && gap * gap > candidate_bound(worst);
  }
};

// The stop of a query (qx, qy, qz) in `cell` of the grid `geom` whose list has admission
// bound `bound` (the caller checked that geom[kGeomOrder] is Order).
template <int Order>
GPA_HD BandStop<Order> band_stop(const float* geom, int G, int cell, float bound, float qx, float qy, float qz) {
  if constexpr (Order == kOrderCentre) {
    float lo[3], hi[3];
    cell_box(geom, G, cell, lo, hi);
    BandStop<kOrderCentre> stop;
    stop.f = centre_bands(lo, hi, bound);
    stop.reach = mul_rn(sqrtf(squared_distance(qx, qy, qz, stop.f.c[0], stop.f.c[1], stop.f.c[2])), 1.0f + 1e-5f);
    return stop;
  } else {
    return BandStop<Order>{bound};
  }
}

// The CUDA search runs the queries of a cell together (bucketed by cell).  In the centre
// order a query's scan length grows with its distance s from the centre, so there the
// queries of a cell are also sorted by kCentreQueryLevels levels of s / h (h the box's
// half-diagonal), nearest first: the lanes of a warp then stop at similar places
// (knn_search_model --sub radius: 303 warp steps against 334 at G = 16, render samples).
constexpr int kCentreQueryLevels = 16;
GPA_HD int query_levels(int order) { return order == kOrderCentre ? kCentreQueryLevels : 1; }

GPA_HD int query_level(const float* geom, int G, int cell, float x, float y, float z) {
  float lo[3], hi[3], c[3], e[3];
  cell_box(geom, G, cell, lo, hi);
  for (int a = 0; a < 3; ++a) {
    c[a] = 0.5f * (lo[a] + hi[a]);
    e[a] = 0.5f * (hi[a] - lo[a]);
  }
  const float h = sqrtf(sum_of_products3(e[0], e[0], e[1], e[1], e[2], e[2]));
  const float s = sqrtf(squared_distance(x, y, z, c[0], c[1], c[2]));
  const float level = h > 0.0f ? s / h * static_cast<float>(kCentreQueryLevels) : 0.0f;
  return level < static_cast<float>(kCentreQueryLevels - 1) ? static_cast<int>(level) : kCentreQueryLevels - 1;
}

// The order a grid's lists were built in (geom[kGeomOrder]; -1 for anything else).
GPA_HD int grid_order(const float* geom) {
  const float o = geom[kGeomOrder];
  return o == static_cast<float>(kOrderBox) ? kOrderBox : (o == static_cast<float>(kOrderCentre) ? kOrderCentre : -1);
}

// The K smallest (distance, index) pairs in lexicographic order, for candidates
// offered in any order, with every array index known at compile time (so the
// lists stay in registers on the GPU): empty slots hold (+inf, INT_MAX), and an
// insertion runs one compare-and-swap pass over the first k slots.  Holds the
// same K pairs as TopK for NaN-free distances.
template <int Capacity>
struct TopKRegs {
  float dist[Capacity];
  int idx[Capacity];
  int k;
  float worst;    // dist[k - 1]
  int worst_idx;  // idx[k - 1]

  GPA_HD explicit TopKRegs(int k_) : k(k_), worst(__builtin_huge_valf()), worst_idx(0x7fffffff) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
    for (int j = 0; j < Capacity; ++j) {
      dist[j] = __builtin_huge_valf();
      idx[j] = 0x7fffffff;
    }
  }

  GPA_HD void offer(float d, int i) {
    if (!(d < worst || (d == worst && i < worst_idx))) return;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
    for (int j = 0; j < Capacity; ++j) {
      if (j < k && (d < dist[j] || (d == dist[j] && i < idx[j]))) {
        const float td = dist[j];
        const int ti = idx[j];
        dist[j] = d;
        idx[j] = i;
        d = td;
        i = ti;
      }
    }
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
    for (int j = 0; j < Capacity; ++j) {
      if (j == k - 1) {
        worst = dist[j];
        worst_idx = idx[j];
      }
    }
  }
};

// Squared distance from a query to list entry s (4 floats: x, y, z, index bits;
// one 16-byte load on the GPU); the entry's point index in `index`.
GPA_HD float entry_distance(const float* entries, int64_t s, float qx, float qy, float qz, int& index) {
#if defined(__CUDA_ARCH__)
  const float4 e = __ldg(reinterpret_cast<const float4*>(entries) + s);
  index = __float_as_int(e.w);
  return squared_distance(qx, qy, qz, e.x, e.y, e.z);
#else
  const float* e = entries + 4 * s;
  index = float_bits_to_int(e[3]);
  return squared_distance(qx, qy, qz, e[0], e[1], e[2]);
#endif
}

// One list entry (x, y, z, index bits): one 16-byte load on the GPU.
struct ListEntry {
  float x, y, z;
  int index;
};

GPA_HD ListEntry load_entry(const float* entries, int64_t s) {
#if defined(__CUDA_ARCH__)
  const float4 e = __ldg(reinterpret_cast<const float4*>(entries) + s);
  return {e.x, e.y, e.z, __float_as_int(e.w)};
#else
  const float* e = entries + 4 * s;
  return {e[0], e[1], e[2], float_bits_to_int(e[3])};
#endif
}

// Scans a banded list (entries of 4 floats: x, y, z, index bits) for a query,
// stopping at the first band that cannot hold a neighbour.  Prefetch
// (GPAVATAR_KNN_CUDA_SEARCH=unrolled): the next entry of the band is loaded
// before the current one is offered, so a load is in flight while the thread
// works (the plain loop waits on every entry's load); the offers are the same,
// in the same order.
template <int Capacity, bool Prefetch = false, typename Stop>
GPA_HD void scan_banded(const float* entries, const int* band_count, const Stop& stop, float qx, float qy,
                        float qz, TopKRegs<Capacity>& best) {
  int64_t s = 0;
  for (int j = 0; j < kCellBands; ++j) {
    if (stop.stops(j, best.worst)) break;
    const int64_t end = s + band_count[j];
    if (Prefetch && s < end) {
      ListEntry next = load_entry(entries, s);
      for (; s < end; ++s) {
        const ListEntry e = next;
        if (s + 1 < end) next = load_entry(entries, s + 1);
        best.offer(squared_distance(qx, qy, qz, e.x, e.y, e.z), e.index);
      }
    }
    for (; s < end; ++s) {
      int i;
      const float d = entry_distance(entries, s, qx, qy, qz, i);
      best.offer(d, i);
    }
  }
}

// --- Grouped scan (GPAVATAR_KNN_CUDA_SEARCH=grouped) ------------------------------
// scan_banded with a band's entries taken kScanGroup at a time: first their distances
// (kScanGroup independent loads and sums, no branch between them), then, only when
// one of them could enter (d <= worst; a NaN never can), the group is offered entry
// by entry in list order (distances recomputed: the same arithmetic, the same
// values).  An entry with d > worst at the group's start is refused by offer at
// any later point of the group too (worst only decreases), so the offers that
// change `best` are those of scan_banded, in the same order: the same K pairs.  On
// the GPU the common step (nothing enters) is four loads in flight, arithmetic and
// one compare and branch for the four (sm_90 SASS: ~50 instructions for four
// entries against ~35 an entry in scan_banded's loop), and the offers' code exists
// once.
constexpr int kScanGroup = 4;

// Whether one of the `left` (< kScanGroup when Partial) entries at e may enter `best`:
// the smallest of their distances is <= worst (fminf passes over a NaN; only when every
// distance is NaN is the smallest NaN, and then none may enter).
template <bool Partial, int Capacity>
GPA_HD bool group_may_enter(const float* e, int left, float qx, float qy, float qz, const TopKRegs<Capacity>& best) {
  float m = __builtin_huge_valf();
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int u = 0; u < kScanGroup; ++u) {
    if (!Partial || u < left) {
      const ListEntry x = load_entry(e, u);
      m = fminf(m, squared_distance(qx, qy, qz, x.x, x.y, x.z));
    }
  }
  return m <= best.worst;
}

// The n entries at e offered in order (one copy of the offer's code on the GPU).
template <int Capacity>
GPA_HD void offer_entries(const float* e, int n, float qx, float qy, float qz, TopKRegs<Capacity>& best) {
#if defined(__CUDA_ARCH__)
#pragma unroll 1
#endif
  for (int u = 0; u < n; ++u) {
    int i;
    const float d = entry_distance(e, u, qx, qy, qz, i);
    best.offer(d, i);
  }
}

template <int Capacity, typename Stop>
GPA_HD void scan_grouped(const float* entries, const int* band_count, const Stop& stop, float qx, float qy,
                         float qz, TopKRegs<Capacity>& best) {
  const float* band = entries;
  for (int j = 0; j < kCellBands; ++j) {
    if (stop.stops(j, best.worst)) break;
    const int n = band_count[j];
    int s = 0;
    for (; s + kScanGroup <= n; s += kScanGroup) {
      if (group_may_enter<false>(band + 4 * s, kScanGroup, qx, qy, qz, best))
        offer_entries(band + 4 * s, kScanGroup, qx, qy, qz, best);
    }
    if (s < n && group_may_enter<true>(band + 4 * s, n - s, qx, qy, qz, best))
      offer_entries(band + 4 * s, n - s, qx, qy, qz, best);
    band += 4 * static_cast<int64_t>(n);
  }
}

// --- Seed bound and buffered scan (GPAVATAR_KNN_CUDA_SEARCH=buffered) ------------
// The K points that define U_C (the seeds, stored with the list) are K distinct
// points, so for a query x, limit = max_k |x - seed_k|^2 (float, the distance
// arithmetic of the scan) is at least its K-th nearest distance.  The scan
// appends every entry with d <= limit to a small per-query buffer (a cheap,
// branch-short step: on the GPU the lanes of a warp rarely diverge for long) and
// only when the buffer is full selects its K best, keeps them and lowers limit
// to the K-th of them; the final selection runs once per query.  A dropped
// entry had K lexicographically smaller ones, and an entry never appended has
// d > limit >= the final K-th distance, so the K nearest (ties by index) are
// exactly those of the brute-force scan.  The band stop applies from the first
// band: stops(j, limit) ends the scan.
//
// buf_d / buf_i: `cap` slots (cap > K) at stride `stride` (shared memory,
// interleaved across the threads of a block, on the GPU).
template <int Capacity>
GPA_HD void select_buffer(float* buf_d, int* buf_i, int stride, int n, TopKRegs<Capacity>& best) {
  for (int t = 0; t < n; ++t) best.offer(buf_d[t * stride], buf_i[t * stride]);
}

template <int Capacity, typename Stop>
GPA_HD void scan_buffered(const float* entries, const int* band_count, const Stop& stop, const float* seeds,
                          float qx, float qy, float qz, float* buf_d, int* buf_i, int stride, int cap,
                          TopKRegs<Capacity>& best) {
  const int K = best.k;
  float limit = 0.0f;
  for (int j = 0; j < K; ++j) {
    const float* e = seeds + 4 * j;
    limit = max_f(limit, squared_distance(qx, qy, qz, e[0], e[1], e[2]));
  }
  int n = 0;
  int64_t s = 0;
  for (int band = 0; band < kCellBands; ++band) {
    if (stop.stops(band, limit)) break;
    const int64_t end = s + band_count[band];
    for (; s < end; ++s) {
      int i;
      const float d = entry_distance(entries, s, qx, qy, qz, i);
      if (d <= limit) {
        buf_d[n * stride] = d;
        buf_i[n * stride] = i;
        if (++n == cap) {  // keep the K best, lower the limit to the K-th of them
          TopKRegs<Capacity> part(K);
          select_buffer(buf_d, buf_i, stride, n, part);
          for (int t = 0; t < Capacity; ++t) {
            if (t < K) {
              buf_d[t * stride] = part.dist[t];
              buf_i[t * stride] = part.idx[t];
            }
          }
          n = K;
          limit = part.worst;
        }
      }
    }
  }
  select_buffer(buf_d, buf_i, stride, n, best);
}

// --- Two-level build (GPAVATAR_KNN_CUDA_BUILD=two_level) ---------------------------
// A parent cell covers up to 2 x 2 x 2 cells (ceil(G / 2) parents per axis).  Its
// list holds, in index order, the points with mindist^2(parent box, p) <=
// candidate_bound(U'), where U' is the smallest of kParentChunks K-th smallest
// maxdist^2 over the chunks of the points (chunk w: p % 256 in [32 w, 32 w + 32),
// one warp of a 256-thread block each): each chunk's K-th is >= U of the whole
// box, so U' >= U_parent >= U_C of every child C (a child's maxdist^2 <= its
// parent's).  A child's list then needs only its parent's list: p in L_C means
// mindist^2(parent, p) <= mindist^2(C, p) <= bound_C <= candidate_bound(U'), and
// the K points that define U_C have mindist^2(parent, p) <= maxdist^2(C, p) <= U_C.
// So the child's U_C, bound and list are those of a scan over every point, in the
// same (index) order.  A parent list longer than kParentCap entries is not kept:
// its children scan every point.
constexpr int kParentChunks = 8;
constexpr int kParentCap = 2048;  // entries (x, y, z, index bits): 32 KiB of shared memory

// Parents per axis.
GPA_HD int parent_cells(int G) { return (G + 1) / 2; }

// The box of parent cell `parent` (the union of its children's boxes, slivers included).
GPA_HD void parent_box(const float* geom, int G, int parent, float lo[3], float hi[3]) {
  const int Gp = parent_cells(G);
  const int c[3] = {parent % Gp, (parent / Gp) % Gp, parent / (Gp * Gp)};
  int first[3], last[3];
  for (int a = 0; a < 3; ++a) {
    first[a] = 2 * c[a];
    last[a] = 2 * c[a] + 1 < G ? 2 * c[a] + 1 : G - 1;
  }
  float lo2[3], hi2[3];
  cell_box(geom, G, (first[2] * G + first[1]) * G + first[0], lo, hi2);
  cell_box(geom, G, (last[2] * G + last[1]) * G + last[0], lo2, hi);
}

// Child w (0..7: x, y, z bits) of a parent, or -1 past the grid's edge.
GPA_HD int parent_child(int G, int parent, int w) {
  const int Gp = parent_cells(G);
  const int cx = 2 * (parent % Gp) + (w & 1);
  const int cy = 2 * ((parent / Gp) % Gp) + ((w >> 1) & 1);
  const int cz = 2 * (parent / (Gp * Gp)) + ((w >> 2) & 1);
  if (cx >= G || cy >= G || cz >= G) return -1;
  return (cz * G + cy) * G + cx;
}

// Cells per axis of the CUDA path, and its list budget in entries per cell
// (lists are stored back to back; one that ends past B * G^3 * budget overflows
// and its queries take the brute-force scan): 768 at G = 16, scaled like the mean
// list length at P = 5023 (x 0.43 per doubling of G on render and uniform samples:
// 483 / 277 / 208 entries at G = 16 / 24 / 32, benchmarks/knn_search_model.py), so a
// finer grid does not allocate 400 MB at G = 32.  The buffered search's slots per
// query (> K).
constexpr int kCudaCells = 16;
constexpr int64_t kCudaBudgetPerCell = 768;
inline int64_t cuda_budget_per_cell(int G) {
  const double scaled = static_cast<double>(kCudaBudgetPerCell) * std::pow(16.0 / G, 1.2);
  return scaled < 256.0 ? 256 : static_cast<int64_t>(scaled);
}
GPA_HD int buffer_slots(int capacity) { return capacity <= 8 ? 32 : (capacity <= 16 ? 48 : 64); }

#if defined(WITH_CUDA)

// Device pointers of one call; B batch elements, M queries and P points each.
struct CellKnnCuda {
  const float* queries;    // [B, M, 3]
  const float* points;     // [B, P, 3]
  float* dist2;            // [B, M, K]
  int64_t* idx;            // [B, M, K]
  const float* bounds;     // [B, 12]: points min xyz, max xyz, queries min xyz, max xyz
  float* geom;             // [B, kCellGeomStride]
  int* count;              // [B * G^3] list lengths
  int64_t* offset;         // [B * G^3 + 1] start of each list (-1: overflow); the last: entries used
  float* cand;             // [budget * 4] candidates (x, y, z, index bits), cell after cell, band after band
  float* cell_bound;       // [B * G^3] admission bound of each list
  float* seeds;            // [B * G^3 * K * 4] the K points that define U_C (x, y, z, index bits)
  int search;              // the scan: kSearchBanded, kSearchUnrolled (scan_banded with the next entry
                           // prefetched), kSearchBuffered (scan_buffered) or kSearchGrouped (scan_grouped)
  int* band_count;         // [B * G^3 * kCellBands] entries per band
  int64_t budget;          // entries
  // Buckets: L = query_levels(list_order) per cell, bucket = cell * L + query level, and
  // G^3 * L for the brute force.
  int* query_cell;         // [B * M] bucket of each query
  int* bucket_count;       // [B * (G^3 * L + 1)] zeroed by the caller
  const int64_t* bucket_start;  // [B * (G^3 * L + 1)] exclusive prefix sums of bucket_count
  int* bucket_fill;        // [B * (G^3 * L + 1)] zeroed by the caller
  int* order;              // [B * M] query indices b * M + m grouped by bucket
  int64_t B, M, P;
  int K, G;
  bool two_level;          // lists of G^3 cells from the lists of their parents (above)
  bool match;              // places in a band by one match a step, not a ballot per band (the same lists)
  int list_order;          // kOrderBox / kOrderCentre: the lists' order (the build writes it to geom) and the
                           // order the search is compiled for (lists of another order: brute force)
  int parent_cap;          // <= kParentCap (smaller in tests: forces the fallback)
};

// The lists' passes (knn_cells.cu): count, fill, or both in one launch (one_pass).
enum CellListPass { kListCount = 0, kListFill = 1, kListBoth = 2 };

// The launch sequence, all on `stream` with no host synchronisation (the
// caller computes bounds and the prefix sums with device tensor ops between):
//   lists(kListCount) -> offset (prefix sums) -> lists(kListFill) -> overflow marks
//   (offset -1), or lists(kListBoth) alone on a zeroed offset (GPAVATAR_KNN_CUDA_BUILD=one_pass);
//   then bucket(scatter = false) -> bucket_start -> bucket(scatter = true) -> search.
// Each returns a CUDA error code (0 on success).
int launch_cell_lists_cuda(const CellKnnCuda& a, int pass, void* stream);
int launch_cell_bucket_cuda(const CellKnnCuda& a, bool scatter, void* stream);
int launch_cell_search_cuda(const CellKnnCuda& a, void* stream);
#endif

}  // namespace knn
}  // namespace gpavatar
