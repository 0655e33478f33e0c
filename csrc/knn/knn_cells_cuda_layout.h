// The CUDA cell-list pipeline (knn_cells.cu) run on the CPU: the same grid, the
// same lists (U_C, admission bound, seeds, bands, packed entries in index order
// within a band, offsets over the whole batch, the budget's overflow rule: offset
// -1) and the same per-query scans of knn_cells.h (scan_banded, scan_buffered, scan_grouped).  Only for
// tests and diagnostics (GPAVATAR_KNN=cells with GPAVATAR_KNN_LAYOUT=cuda): it
// runs the CUDA kernels' arithmetic and list layout where there is no GPU.
// Host only; included by knn_cpu.cpp.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <utility>
#include <vector>

#include "knn/knn.h"
#include "knn/knn_cells.h"

namespace gpavatar {
namespace knn {
namespace cuda_layout {

// min / max that keep NaN, like the torch reductions the CUDA host code uses for
// the two bounding boxes.
inline float nan_min(float a, float b) { return a != a || b != b ? NAN : (a < b ? a : b); }
inline float nan_max(float a, float b) { return a != a || b != b ? NAN : (a > b ? a : b); }

struct Lists {
  int G = 0, K = 0;
  int64_t B = 0, cells = 0, budget = 0;
  std::vector<float> geom;        // [B, kCellGeomStride]
  std::vector<float> bound;       // [B * cells]
  std::vector<int> band_count;    // [B * cells * kCellBands]
  std::vector<float> seeds;       // [B * cells * K * 4]
  std::vector<int64_t> offset;    // [B * cells + 1]
  std::vector<float> entries;     // [total * 4]
};

// The two-level build's parent lists (knn_cells.h) of batch element b: for each parent
// cell, its points in index order, or {-1} when the list is longer than parent_cap (the
// children then take every point), as the CUDA kernel's chunks and compaction give them.
inline std::vector<std::vector<int>> parent_lists(const float* pts, const float* geom, int64_t P, int K, int G,
                                                  int parent_cap) {
  const int Gp = parent_cells(G);
  std::vector<std::vector<int>> out(static_cast<size_t>(Gp) * Gp * Gp);
  at::parallel_for(0, static_cast<int64_t>(out.size()), 4, [&](int64_t begin, int64_t end) {
    std::vector<float> chunk;
    for (int64_t pc = begin; pc < end; ++pc) {
      float lo[3], hi[3];
      parent_box(geom, G, static_cast<int>(pc), lo, hi);
      float u = __builtin_huge_valf();
      for (int w = 0; w < kParentChunks; ++w) {
        chunk.clear();
        for (int64_t base = 32 * w; base < P; base += 32 * kParentChunks)
          for (int64_t p = base; p < std::min<int64_t>(base + 32, P); ++p)
            chunk.push_back(box_max_dist2(lo, hi, pts[3 * p], pts[3 * p + 1], pts[3 * p + 2]));
        if (static_cast<int>(chunk.size()) < K) continue;  // a K-th of +inf
        std::nth_element(chunk.begin(), chunk.begin() + (K - 1), chunk.end());
        u = chunk[K - 1] < u ? chunk[K - 1] : u;
      }
      const float bound = candidate_bound(u);
      std::vector<int>& list = out[pc];
      for (int64_t p = 0; p < P; ++p)
        if (box_min_dist2(lo, hi, pts[3 * p], pts[3 * p + 1], pts[3 * p + 2]) <= bound)
          list.push_back(static_cast<int>(p));
      if (static_cast<int64_t>(list.size()) > parent_cap) list.assign(1, -1);
    }
  });
  return out;
}

// The parent of cell c (two-level build).
inline int parent_of(int G, int c) {
  const int Gp = parent_cells(G);
  return (((c / (G * G)) / 2) * Gp + ((c / G) % G) / 2) * Gp + (c % G) / 2;
}

// queries (B, M, 3), points (B, P, 3), contiguous.  two_level: each cell's candidates
// come from its parent's list (parent_cap as GPAVATAR_KNN_PARENT_CAP); the same lists.
// query_box (B, 6: lo xyz, hi xyz), when given, replaces the queries' bounding box (an
// index built once for several query sets: knn_index).
inline void build(Lists& L, const float* queries, const float* points, int64_t B, int64_t M, int64_t P,
                  int K, int G, int64_t per_cell, bool two_level = false, int parent_cap = kParentCap,
                  const float* query_box = nullptr, int order = kOrderBox) {
  L.G = G;
  L.K = K;
  L.B = B;
  L.cells = static_cast<int64_t>(G) * G * G;
  L.budget = B * L.cells * per_cell;
  const int64_t cells = L.cells;
  L.geom.assign(B * kCellGeomStride, 0.0f);
  L.bound.assign(B * cells, 0.0f);
  L.band_count.assign(B * cells * kCellBands, 0);
  L.seeds.assign(B * cells * K * 4, 0.0f);
  for (int64_t b = 0; b < B; ++b) {
    float r[12];
    for (int a = 0; a < 3; ++a) {
      r[a] = r[6 + a] = __builtin_huge_valf();
      r[3 + a] = r[9 + a] = -__builtin_huge_valf();
    }
    for (int64_t p = 0; p < P; ++p)
      for (int a = 0; a < 3; ++a) {
        const float v = points[(b * P + p) * 3 + a];
        r[a] = nan_min(r[a], v);
        r[3 + a] = nan_max(r[3 + a], v);
      }
    if (query_box != nullptr) {
      for (int a = 0; a < 6; ++a) r[6 + a] = query_box[b * 6 + a];
    } else {
      for (int64_t m = 0; m < M; ++m)
        for (int a = 0; a < 3; ++a) {
          const float v = queries[(b * M + m) * 3 + a];
          r[6 + a] = nan_min(r[6 + a], v);
          r[9 + a] = nan_max(r[9 + a], v);
        }
    }
    cell_grid_geometry(r, r + 3, r + 6, r + 9, G, L.geom.data() + b * kCellGeomStride);
    L.geom[b * kCellGeomStride + kGeomOrder] = static_cast<float>(order);
  }
  // Candidates of each cell: every point, or its parent's list (two-level build).
  std::vector<std::vector<std::vector<int>>> parents(two_level ? B : 0);
  for (int64_t b = 0; b < static_cast<int64_t>(parents.size()); ++b)
    parents[b] = parent_lists(points + b * P * 3, L.geom.data() + b * kCellGeomStride, P, K, G, parent_cap);
  std::vector<int> all(P);
  for (int64_t p = 0; p < P; ++p) all[p] = static_cast<int>(p);
  auto source = [&](int64_t slot) -> const std::vector<int>& {
    if (!two_level) return all;
    const std::vector<int>& list = parents[slot / cells][parent_of(G, static_cast<int>(slot % cells))];
    // (Shorter than K only with NaN points, which the op's checks refuse.)
    return (list.size() == 1 && list[0] < 0) || static_cast<int>(list.size()) < K ? all : list;
  };
  // Per cell: the list's bound, seeds and band sizes (pass "count").
  std::vector<int> count(B * cells, 0);
  at::parallel_for(0, B * cells, 8, [&](int64_t begin, int64_t end) {
    std::vector<std::pair<float, int>> far;
    for (int64_t slot = begin; slot < end; ++slot) {
      const int64_t b = slot / cells;
      const float* pts = points + b * P * 3;
      float lo[3], hi[3];
      cell_box(L.geom.data() + b * kCellGeomStride, G, static_cast<int>(slot % cells), lo, hi);
      const std::vector<int>& src = source(slot);
      far.resize(src.size());
      for (size_t s = 0; s < src.size(); ++s) {
        const int p = src[s];
        far[s] = {box_max_dist2(lo, hi, pts[3 * p], pts[3 * p + 1], pts[3 * p + 2]), p};
      }
      std::partial_sort(far.begin(), far.begin() + K, far.end());
      const float bound = candidate_bound(far[K - 1].first);
      L.bound[slot] = bound;
      for (int j = 0; j < K; ++j) {
        const int p = far[j].second;
        float* e = L.seeds.data() + (slot * K + j) * 4;
        e[0] = pts[3 * p];
        e[1] = pts[3 * p + 1];
        e[2] = pts[3 * p + 2];
        e[3] = int_bits_to_float(p);
      }
      int* bc = L.band_count.data() + slot * kCellBands;
      const CentreBands frame = centre_bands(lo, hi, bound);
      for (const int p : src) {
        const float key = box_min_dist2(lo, hi, pts[3 * p], pts[3 * p + 1], pts[3 * p + 2]);
        if (key <= bound) ++bc[list_band(order, frame, key, bound, pts[3 * p], pts[3 * p + 1], pts[3 * p + 2])];
      }
      int total = 0;
      for (int j = 0; j < kCellBands; ++j) total += bc[j];
      count[slot] = total;
    }
  });
  L.offset.assign(B * cells + 1, 0);
  for (int64_t slot = 0; slot < B * cells; ++slot) L.offset[slot + 1] = L.offset[slot] + count[slot];
  L.entries.assign(std::min(L.offset.back(), L.budget) * 4, 0.0f);
  // Pass "fill": the lists that fit in the budget, band after band, index order within.
  at::parallel_for(0, B * cells, 8, [&](int64_t begin, int64_t end) {
    for (int64_t slot = begin; slot < end; ++slot) {
      if (L.offset[slot + 1] > L.budget) continue;
      const int64_t b = slot / cells;
      const float* pts = points + b * P * 3;
      float lo[3], hi[3];
      cell_box(L.geom.data() + b * kCellGeomStride, G, static_cast<int>(slot % cells), lo, hi);
      const float bound = L.bound[slot];
      const CentreBands frame = centre_bands(lo, hi, bound);
      int64_t run[kCellBands];
      int64_t at = L.offset[slot];
      for (int j = 0; j < kCellBands; ++j) {
        run[j] = at;
        at += L.band_count[slot * kCellBands + j];
      }
      for (const int p : source(slot)) {
        const float key = box_min_dist2(lo, hi, pts[3 * p], pts[3 * p + 1], pts[3 * p + 2]);
        if (!(key <= bound)) continue;
        float* e = L.entries.data() + 4 * run[list_band(order, frame, key, bound, pts[3 * p], pts[3 * p + 1],
                                                        pts[3 * p + 2])]++;
        e[0] = pts[3 * p];
        e[1] = pts[3 * p + 1];
        e[2] = pts[3 * p + 2];
        e[3] = int_bits_to_float(p);
      }
    }
  });
  // Overflow marks: offset -1 (also what the one-pass build's reservations in slot order give).
  for (int64_t slot = 0; slot < B * cells; ++slot)
    if (L.offset[slot + 1] > L.budget) L.offset[slot] = -1;
}

// Read-only pointers to lists (a Lists' vectors, or knn_index's tensors).
struct View {
  int G = 0, K = 0;
  int64_t cells = 0, budget = 0;
  const float* geom;
  const float* bound;
  const int* band_count;
  const float* seeds;
  const int64_t* offset;
  const float* entries;
};

inline View view(const Lists& L) {
  return View{L.G, L.K, L.cells, L.budget, L.geom.data(), L.bound.data(), L.band_count.data(), L.seeds.data(),
              L.offset.data(), L.entries.data()};
}

// The K nearest of query qi = b * M + m into (dist, idx); false when the CUDA
// path would give it to the brute-force bucket (outside the grid, overflow).
template <int Capacity, int Order>
void scan(const View& L, int64_t slot, int c, const float* geom, float qx, float qy, float qz, int search,
          int cap, TopKRegs<Capacity>& best) {
  const float* entries = L.entries + 4 * L.offset[slot];
  const int* bc = L.band_count + slot * kCellBands;
  const BandStop<Order> stop = band_stop<Order>(geom, L.G, c, L.bound[slot], qx, qy, qz);
  if (search == kSearchBuffered) {
    std::vector<float> buf_d(cap);
    std::vector<int> buf_i(cap);
    scan_buffered(entries, bc, stop, L.seeds + 4 * slot * L.K, qx, qy, qz, buf_d.data(), buf_i.data(), 1, cap,
                  best);
  } else if (search == kSearchUnrolled) {
    scan_banded<Capacity, true>(entries, bc, stop, qx, qy, qz, best);
  } else if (search == kSearchGrouped) {
    scan_grouped(entries, bc, stop, qx, qy, qz, best);
  } else {
    scan_banded<Capacity, false>(entries, bc, stop, qx, qy, qz, best);
  }
}

// order: the search's (GPAVATAR_KNN_CUDA_ORDER); lists built in another go to the brute force.
template <int Capacity>
bool search(const View& L, int64_t b, float qx, float qy, float qz, int search, int cap, int order, float* dist,
            int64_t* idx) {
  const float* geom = L.geom + b * kCellGeomStride;
  const int c = query_cell(geom, L.G, qx, qy, qz);
  if (c < 0) return false;
  const int64_t slot = b * L.cells + c;
  if (L.offset[slot] < 0 || grid_order(geom) != order) return false;  // overflow, or another order
  TopKRegs<Capacity> best(L.K);
  if (order == kOrderCentre) {
    scan<Capacity, kOrderCentre>(L, slot, c, geom, qx, qy, qz, search, cap, best);
  } else {
    scan<Capacity, kOrderBox>(L, slot, c, geom, qx, qy, qz, search, cap, best);
  }
  for (int j = 0; j < L.K; ++j) {
    dist[j] = best.dist[j];
    idx[j] = best.idx[j];
  }
  return true;
}

}  // namespace cuda_layout
}  // namespace knn
}  // namespace gpavatar
